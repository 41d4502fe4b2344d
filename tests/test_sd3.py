"""What SD3.5 does beyond the shared family tests (test_families*.py): its CLIP-L and CLIP-G can train
(kohya's ``lora_te1``/``lora_te2``) and both files carry those adapters back into a fresh pipeline; the
``full`` preset's kohya file (fused, swapped and conv modules) merges as ComfyUI merges it."""

from __future__ import annotations

import torch
from family_reference import denoiser_output
from safetensors.torch import load_file
from training import train

import lorafit
from lorafit.families.family import BaseModel, TextOptions
from lorafit.families.registry import get_family
from lorafit.training.config import NetworkConfig


def _conditioning(pipe) -> dict[str, torch.Tensor]:
    spec = get_family("sd3")
    encoders = [getattr(pipe, name) for name in spec.text_encoder_components]
    tokenizers = [getattr(pipe, name) for name in spec.tokenizer_components]
    base = BaseModel("sd3", "flow", pipe.transformer, pipe.vae, encoders, tokenizers)
    with torch.no_grad():
        return spec.encode_text(base, ["ohwx star"], TextOptions(max_sequence_length=32), "cpu")


def test_clip_l_and_clip_g_train_and_reload_from_both_files(family_models, demo_data, tmp_path):
    _, module = train(
        family_models["sd3"],
        demo_data,
        tmp_path,
        max_steps=3,
        rank=4,
        learning_rate=1e-2,
        train_text_encoder=True,
        conditioning={"max_sequence_length": 32},
    )
    kohya = load_file(str(tmp_path / "lora" / "test.safetensors"))
    prefixes = {key.split("_text_model_")[0] for key in kohya if "_text_model_" in key}
    assert prefixes == {"lora_te1", "lora_te2"}  # CLIP-L, CLIP-G; T5 never trains
    spec = get_family("sd3")
    trained = BaseModel("sd3", "flow", module.transformer, None, list(module.text_encoders), module.base.tokenizers)
    with torch.no_grad():
        expected = spec.encode_text(trained, ["ohwx star"], TextOptions(max_sequence_length=32), "cpu")
    for file in ("test.safetensors", "diffusers/test.safetensors"):
        pipe = spec.pipeline_type().from_pretrained(family_models["sd3"])
        before = _conditioning(pipe)
        lorafit.load_lora(pipe, tmp_path / "lora" / file)
        after = _conditioning(pipe)
        assert (before["pooled_prompt_embeds"] - expected["pooled_prompt_embeds"]).abs().max() > 1e-4
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            torch.testing.assert_close(after[key], expected[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            denoiser_output("sd3", pipe.transformer), denoiser_output("sd3", module.transformer), rtol=1e-4, atol=1e-5
        )


def test_the_full_preset_kohya_file_merges_into_sais_weights_as_comfyui_does(family_models, demo_data, tmp_path):
    """Every Linear and the patch embedding's Conv2d: fused q/k/v (MMDiT-X's attn2 too), the last block's
    pre-only text modulation and the final layer's (both with swapped halves) merged into the MMDiT's
    weights as ComfyUI merges ``lora_unet_`` + path (conv LoRAs flattened), read back by diffusers' reader."""
    from family_reference import diffusers_from_native, native_state_dict

    _, module = train(
        family_models["sd3"],
        demo_data,
        tmp_path,
        max_steps=2,
        learning_rate=1e-2,
        network=NetworkConfig(rank=4, alpha=2.0, preset="full"),
        conditioning={"max_sequence_length": 32},
    )
    kohya = load_file(str(tmp_path / "lora" / "test.safetensors"))
    stems = {key.split(".")[0] for key in kohya}
    last = module.transformer.config.num_layers - 1
    assert {
        "lora_unet_x_embedder_proj",
        f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1",
        "lora_unet_final_layer_adaLN_modulation_1",
        "lora_unet_joint_blocks_0_x_block_attn2_qkv",
    } <= stems
    pipe = get_family("sd3").pipeline_type().from_pretrained(family_models["sd3"])
    merged = native_state_dict("sd3", pipe.transformer)
    for stem in stems:
        target = stem.removeprefix("lora_unet_")
        key = next(k for k in merged if k.replace(".", "_") == f"{target}_weight")
        down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
        scale = float(kohya[f"{stem}.alpha"]) / down.shape[0]
        merged[key] = merged[key] + scale * (up.flatten(1) @ down.flatten(1)).reshape(merged[key].shape)
    pipe.transformer.load_state_dict(diffusers_from_native("sd3", merged))
    torch.testing.assert_close(
        denoiser_output("sd3", pipe.transformer), denoiser_output("sd3", module.transformer), rtol=1e-4, atol=1e-5
    )


def test_a_kohya_file_with_a_t5_lora_loads_onto_t5(family_models, tmp_path):
    """kohya's sd3_train_network can train T5 (``lora_te3_``); lorafit never does, but reads such files."""
    from flux_reference import write_lora_file

    pipe = get_family("sd3").pipeline_type().from_pretrained(family_models["sd3"])
    name = "encoder.block.0.layer.0.SelfAttention.q"
    layer = pipe.text_encoder_3.get_submodule(name)
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(2, layer.in_features, generator=generator)
    up = torch.randn(layer.out_features, 2, generator=generator)
    stem = "lora_te3_" + name.replace(".", "_")
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)}
    ids = torch.tensor([[5, 9, 14, 1]])
    with torch.no_grad():
        before = pipe.text_encoder_3(ids)[0]
        layer.weight += 0.5 * up @ down  # alpha / rank = 1 / 2
        expected = pipe.text_encoder_3(ids)[0]
        layer.weight -= 0.5 * up @ down
    lorafit.load_lora(pipe, write_lora_file(tmp_path / "t5.safetensors", tensors))
    with torch.no_grad():
        after = pipe.text_encoder_3(ids)[0]
    assert (before - expected).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


def test_long_captions_train_without_the_pipelines_truncation_notice_every_batch(family_models):
    """StableDiffusion3Pipeline.encode_prompt (which training calls) warns on every batch that CLIP and T5
    truncate a long caption; lorafit truncates silently, as every trainer does (`lorafit prepare` lists
    such captions), so the CLI drops exactly that notice."""
    import logging

    from lorafit.cli.startup import quiet_known_notices

    quiet_known_notices()
    names = (
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
        "transformers.tokenization_utils_base",
    )
    loggers = [logging.getLogger(name) for name in names]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler, levels = Collect(logging.WARNING), [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    try:
        pipe = get_family("sd3").pipeline_type().from_pretrained(family_models["sd3"])
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
        base = BaseModel("sd3", "flow", pipe.transformer, pipe.vae, encoders, tokenizers)
        with torch.no_grad():
            get_family("sd3").encode_text(base, ["a " * 100], TextOptions(max_sequence_length=32), "cpu")
        loggers[0].warning("another notice of the pipeline")  # the pipeline's other warnings still show
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert records == ["another notice of the pipeline"]
