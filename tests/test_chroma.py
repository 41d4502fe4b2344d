"""What Chroma does beyond the shared family tests (test_families*.py): its T5 padding is masked for real
(diffusers 0.42's pipeline passes the mask as floats, which attention adds instead of masking), also under
gradient checkpointing; at the released width lorafit's layout table and kohya file agree with diffusers'
own readers (which hard-code that width, so the tiny model cannot show it); the ``full`` preset's kohya
file (the approximator's modules too) merges as ComfyUI merges it; ai-toolkit's files load."""

from __future__ import annotations

import pytest
import torch
from family_reference import denoiser_output
from safetensors.torch import load_file

from lorafit.families.family import BaseModel, TextOptions
from lorafit.families.registry import get_family


def _tiny():
    return get_family("chroma").tiny_pipeline()


def _prediction(base, captions, options, noisy, sigmas):
    spec = get_family("chroma")
    return spec.predict(base, noisy, sigmas, spec.encode_text(base, captions, options, "cpu"), {}, options)


def test_the_caption_budget_does_not_change_the_prediction_padding_is_masked():
    """Captions read to 40 or 96 tokens condition alike: only a caption's tokens and its first pad take part
    (lodestone's trainer, ComfyUI); with diffusers' float mask the padding would shift the prediction."""
    pipe = _tiny()
    base = BaseModel("chroma", "flow", pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer])
    noisy, sigmas = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.8, 0.4])
    captions = ["ohwx star", "a much longer caption of a star"]
    with torch.no_grad():
        short = _prediction(base, captions, TextOptions(max_sequence_length=40), noisy, sigmas)
        long = _prediction(base, captions, TextOptions(max_sequence_length=96), noisy, sigmas)
        encoded = get_family("chroma").encode_text(base, captions, TextOptions(), "cpu")
        embeds, _, float_mask, *_ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert encoded["prompt_embeds_mask"].sum(1).tolist() == float_mask.sum(1).tolist()  # tokens + the first pad
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)
    from lorafit.families.flux import image_ids, pack_latents

    with torch.no_grad():  # what ChromaPipeline 0.42 computes with its own (float) mask: not the same
        floats = pipe.transformer(
            hidden_states=pack_latents(noisy),
            timestep=sigmas,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3),
            img_ids=image_ids(8, 8, "cpu", torch.float32),
            attention_mask=torch.cat([float_mask, torch.ones(2, 16)], dim=1),
            return_dict=False,
        )[0]
    assert (pack_latents(short) - floats).abs().max() > 1e-3


def test_gradient_checkpointing_keeps_the_mask():
    """diffusers' checkpointed single blocks are called without the mask; lorafit runs each caption alone
    then, so a batch of captions of different lengths predicts (and trains) the same either way."""
    pipe = _tiny()
    base = BaseModel("chroma", "flow", pipe.transformer, pipe.vae, [pipe.text_encoder], [pipe.tokenizer])
    noisy, sigmas = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.7, 0.2])
    captions = ["ohwx", "a much longer caption of a star"]
    with torch.no_grad():
        plain = _prediction(base, captions, TextOptions(), noisy, sigmas)
    pipe.transformer.enable_gradient_checkpointing()
    noisy.requires_grad_(True)
    checkpointed = _prediction(base, captions, TextOptions(), noisy, sigmas)
    torch.testing.assert_close(checkpointed.detach(), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_our_original_layout_agrees_with_diffusers_reader_on_the_released_width():
    """diffusers' reader of original Chroma files hard-codes width 3072: compare with ours on a 1+1-block model
    (half-precision integers, distinct per slice, to keep it small)."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    from lorafit.families.chroma_layout import diffusers_state_dict, original_state_dict

    with torch.device("meta"):
        model = ChromaTransformer2DModel(
            num_layers=1, num_single_layers=1, joint_attention_dim=16, approximator_hidden_dim=32
        )
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randint(0, 2048, v.shape, generator=generator).to(torch.float16) for k, v in model.state_dict().items()
    }
    model.load_state_dict(state, assign=True)
    original = original_state_dict(model)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(original))
    ours = diffusers_state_dict(dict(original), model.config)
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], state[k]) for k in ours)


def test_diffusers_kohya_reader_reads_lorafit_chroma_files_at_full_size(tmp_path):
    """ChromaPipeline reads kohya files with FLUX.1's converter, which hard-codes the released sizes: build
    Chroma1-HD's transformer on the meta device, a rank-1/2 LoRA on every Linear of the ``attn-mlp`` preset,
    write it with lorafit and compare each module's update on a random probe vector."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from lorafit.networks.files import save_kohya
    from lorafit.networks.lora_weights import LoraModuleWeights
    from lorafit.networks.model_fit import adaptable_layers

    with torch.device("meta"):
        transformer = ChromaTransformer2DModel()  # Chroma1-HD's config is the default
    chosen = get_family("chroma").preset_modules(transformer, "attn-mlp")
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for index, (name, layer) in enumerate(sorted(adaptable_layers(transformer).items())):
        if name in chosen:
            rank = 1 + index % 2
            down = torch.randn(rank, layer.in_features, generator=generator, dtype=torch.float64)
            up = torch.randn(layer.out_features, rank, generator=generator, dtype=torch.float64)
            modules[name] = LoraModuleWeights(down, up, 0.5 + index % 3)
    # float64 throughout, so what differs is the layout, not rounding over 3072-wide sums
    path = save_kohya(
        tmp_path / "full.safetensors", "chroma", {"transformer": modules}, transformer.config, dtype=torch.float64
    )
    assert "lora_unet_single_blocks_37_linear1.lora_down.weight" in load_file(str(path))
    theirs = _convert_kohya_flux_lora_to_diffusers(load_file(str(path)))
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    assert {k.rsplit(".lora_", 1)[0] for k in theirs} == set(modules)
    for name, lora in modules.items():
        probe = torch.randn(lora.down.shape[1], generator=generator, dtype=torch.float64)
        ours = lora.alpha / lora.rank * lora.up @ (lora.down @ probe)
        got = theirs[f"{name}.lora_B.weight"] @ (theirs[f"{name}.lora_A.weight"] @ probe)
        error = ((got - ours).abs().max() / ours.abs().max()).item()
        assert error < 1e-9, f"{name}: diffusers' update differs by {error:.2e}"


def test_ai_toolkit_files_load_as_the_kohya_file(family_models, tmp_path):
    """ai-toolkit writes Chroma LoRAs as ``diffusion_model.`` + the original path with PEFT's part names
    (ComfyUI's generic layout): lorafit reads one as the kohya file of the same weights."""
    from flux_reference import write_lora_file

    import lorafit
    from lorafit.networks.files import save_kohya
    from lorafit.networks.lora_weights import LoraModuleWeights

    pipe = get_family("chroma").pipeline_type().from_pretrained(family_models["chroma"])
    generator = torch.Generator().manual_seed(2)
    modules = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"):
        layer = pipe.transformer.get_submodule(name)
        modules[name] = LoraModuleWeights(
            torch.randn(2, layer.in_features, generator=generator),
            torch.randn(layer.out_features, 2, generator=generator),
            2.0,
        )
    kohya = load_file(
        str(save_kohya(tmp_path / "k.safetensors", "chroma", {"transformer": modules}, pipe.transformer.config))
    )
    toolkit = {}
    for key, tensor in kohya.items():
        stem, part = key.split(".", 1)
        assert stem == "lora_unet_double_blocks_0_img_attn_qkv"
        part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        toolkit[f"diffusion_model.double_blocks.0.img_attn.qkv.{part}"] = tensor
    outputs = []
    for file in (tmp_path / "k.safetensors", write_lora_file(tmp_path / "toolkit.safetensors", toolkit)):
        pipe = get_family("chroma").pipeline_type().from_pretrained(family_models["chroma"])
        before = denoiser_output("chroma", pipe.transformer)
        lorafit.load_lora(pipe, file)
        outputs.append(denoiser_output("chroma", pipe.transformer))
    assert (outputs[0] - before).abs().max() > 1e-4
    torch.testing.assert_close(outputs[1], outputs[0])


def test_diffusers_deprecation_notice_of_its_own_chroma_class_is_not_shown():
    """diffusers' ChromaTransformer2DModel builds FluxPosEmbed from its deprecated place on every load: a
    FutureWarning no user can act on, which lorafit's CLI drops (other warnings still show)."""
    import warnings

    from diffusers import ChromaTransformer2DModel

    from lorafit.cli.startup import quiet_known_notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notices()  # catch_warnings reset the filters
        ChromaTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
        warnings.warn("a warning of the user's own", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]


def test_the_full_preset_kohya_file_merges_into_original_weights_as_comfyui_does(family_models, demo_data, tmp_path):
    """Every Linear, the approximator's (``distilled_guidance_layer.layers.N.in_layer``...) included: merged
    into the original-layout weights as ComfyUI merges ``lora_unet_`` + path, the file reproduces the model."""
    from family_reference import diffusers_from_native, native_state_dict
    from flux_reference import comfy_merge
    from training import train

    from lorafit.training.config import NetworkConfig

    _, module = train(
        family_models["chroma"],
        demo_data,
        tmp_path,
        max_steps=2,
        learning_rate=1e-2,
        network=NetworkConfig(rank=4, alpha=2.0, preset="full"),
        conditioning={"max_sequence_length": 32},
    )
    kohya = load_file(str(tmp_path / "lora" / "test.safetensors"))
    stems = {key.split(".")[0] for key in kohya}
    assert {"lora_unet_distilled_guidance_layer_layers_1_out_layer", "lora_unet_final_layer_linear"} <= stems
    pipe = get_family("chroma").pipeline_type().from_pretrained(family_models["chroma"])
    merged = comfy_merge(native_state_dict("chroma", pipe.transformer), kohya)
    pipe.transformer.load_state_dict(diffusers_from_native("chroma", merged, pipe.transformer.config))
    torch.testing.assert_close(
        denoiser_output("chroma", pipe.transformer), denoiser_output("chroma", module.transformer), rtol=1e-4, atol=1e-5
    )
