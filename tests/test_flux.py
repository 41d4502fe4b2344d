"""FLUX.1 end to end on the tiny random-weight Flux: load (directory, BFL single file + parts), train every
network type, export both formats, and reload them in lorafit, diffusers and as ComfyUI reads them."""

from __future__ import annotations

import pytest
import torch
from flux_reference import comfy_merge, flux_output, write_lora_file
from safetensors.torch import load_file
from training import train

import lorafit
from lorafit.errors import LorafitError
from lorafit.families.flux_layout import bfl_state_dict, diffusers_state_dict
from lorafit.families.loading import load_base_model
from lorafit.training.module import LoraDiffusionModule


def _pipeline(model_dir: str):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def bfl_file(tiny_models, tmp_path_factory):
    """The tiny Flux transformer as BFL's flux1-dev.safetensors layout, plus its other parts as files."""
    folder = tmp_path_factory.mktemp("flux-files")
    pipe = _pipeline(tiny_models["flux"])
    write_lora_file(folder / "flux1-tiny.safetensors", bfl_state_dict(pipe.transformer))
    write_lora_file(folder / "clip_l.safetensors", pipe.text_encoder.state_dict())
    t5 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "shared.weight"}  # as ComfyUI's files
    write_lora_file(folder / "t5xxl_fp16.safetensors", t5)
    return folder


def test_a_flux_directory_is_detected_as_flux_with_a_flow_objective(tiny_models):
    base = load_base_model(tiny_models["flux"])
    assert (base.family, base.prediction_type, type(base.denoiser).__name__) == (
        "flux",
        "flow",
        "FluxTransformer2DModel",
    )
    assert [type(e).__name__ for e in base.text_encoders] == ["CLIPTextModel", "T5EncoderModel"]


def test_bfl_single_file_with_separate_parts_loads_the_same_model(tiny_models, bfl_file):
    reference = _pipeline(tiny_models["flux"])
    base = load_base_model(
        str(bfl_file / "flux1-tiny.safetensors"),
        single_file_config=tiny_models["flux"],
        parts={
            "text_encoder": str(bfl_file / "clip_l.safetensors"),
            "text_encoder_2": str(bfl_file / "t5xxl_fp16.safetensors"),
        },
    )
    assert base.family == "flux"
    torch.testing.assert_close(flux_output(base.denoiser), flux_output(reference.transformer), rtol=0, atol=0)
    ids = torch.tensor([[5, 9, 14, 1]])
    with torch.no_grad():
        torch.testing.assert_close(base.text_encoders[1](ids)[0], reference.text_encoder_2(ids)[0])
        torch.testing.assert_close(base.text_encoders[0](ids).pooler_output, reference.text_encoder(ids).pooler_output)


def test_single_file_errors_are_one_line(tiny_models, bfl_file):
    with pytest.raises(LorafitError, match="model.single_file_config: a Flux single file needs"):
        load_base_model(str(bfl_file / "flux1-tiny.safetensors"))
    with pytest.raises(LorafitError, match=r"model.parts.text_encoder_2: .*missing.safetensors does not exist"):
        load_base_model(
            str(bfl_file / "flux1-tiny.safetensors"),
            single_file_config=tiny_models["flux"],
            parts={"text_encoder_2": str(bfl_file / "missing.safetensors")},
        )
    with pytest.raises(LorafitError, match="model.parts: 'unet' is no Flux component"):
        load_base_model(
            str(bfl_file / "flux1-tiny.safetensors"),
            single_file_config=tiny_models["flux"],
            parts={"unet": "x.safetensors"},
        )


def test_our_bfl_reader_agrees_with_diffusers_on_the_released_width():
    """diffusers' BFL reader only works at width 3072: compare it with ours there on a 1+1-block model."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = dict(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        in_channels=16,
        guidance_embeds=True,
    )
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    # Distinct values per weight so any swapped or mis-split tensor shows; small enough to hold in memory.
    state = {
        k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) + i
        for i, (k, v) in enumerate(model.state_dict().items())
    }
    model.load_state_dict(state, assign=True)
    bfl = bfl_state_dict(model)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = diffusers_state_dict(dict(bfl), model.config)
    assert ours.keys() == theirs.keys() == state.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], state[k]) for k in ours)


@pytest.fixture(scope="module")
def trained(tiny_models, demo_data, tmp_path_factory):
    """``trained(kind)``: (LoRA folder, the training model's output) of a 3-step run, trained once per kind."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            root = tmp_path_factory.mktemp(f"flux-{kind}")
            _, module = train(
                tiny_models["flux"],
                demo_data,
                root,
                max_steps=3,
                rank=4,
                alpha=2.0,
                learning_rate=1e-2,
                network_type=kind,
                export={"every_n_epochs": 0},
            )
            runs[kind] = (root / "lora", flux_output(module.transformer))
        return runs[kind]

    return run


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_every_network_type_trains_and_writes_the_formats_consumers_read(trained, kind):
    lora, _ = trained(kind)
    keys = set(load_file(str(lora / "test.safetensors")))
    stems = {k.split(".")[0] for k in keys}
    if kind in ("lora", "dora"):
        # kohya/BFL names with q, k, v (and a single block's MLP) fused, as kohya's lora_flux writes them
        assert "lora_unet_double_blocks_0_img_attn_qkv" in stems and "lora_unet_single_blocks_1_linear1" in stems
        assert all(s.startswith("lora_unet_") for s in stems)
        assert (lora / "diffusers" / "test.safetensors").is_file()
        assert ("lora_unet_double_blocks_0_img_attn_qkv.dora_scale" in keys) == (kind == "dora")
    else:  # not fusable: SimpleTuner's LyCORIS names, which ComfyUI maps onto the fused weights
        assert all(s.startswith("lycoris_") for s in stems) and "lycoris_transformer_blocks_0_attn_to_q" in stems
        assert not (lora / "diffusers").exists()  # diffusers has no LoHa/LoKr format


@pytest.mark.parametrize(
    "kind, fmt",
    [
        ("lora", "kohya"),
        ("lora", "diffusers"),
        ("dora", "kohya"),
        ("dora", "diffusers"),
        ("loha", "kohya"),
        ("lokr", "kohya"),
    ],
)
def test_exported_files_reproduce_the_training_model(trained, tiny_models, kind, fmt):
    lora, expected = trained(kind)
    pipe = _pipeline(tiny_models["flux"])
    before = flux_output(pipe.transformer)
    lorafit.load_lora(pipe, lora / ("test.safetensors" if fmt == "kohya" else "diffusers/test.safetensors"))
    assert (before - expected).abs().max() > 1e-4, "training changed nothing; the comparison proves nothing"
    torch.testing.assert_close(flux_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_diffusers_own_loader_reproduces_the_diffusers_file(trained, tiny_models):
    lora, expected = trained("lora")
    pipe = _pipeline(tiny_models["flux"])
    pipe.load_lora_weights(str(lora / "diffusers" / "test.safetensors"))
    torch.testing.assert_close(flux_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_comfyui_merge_of_the_kohya_file_reproduces_the_training_model(trained, tiny_models):
    lora, expected = trained("lora")
    pipe = _pipeline(tiny_models["flux"])
    merged = comfy_merge(bfl_state_dict(pipe.transformer), load_file(str(lora / "test.safetensors")))
    pipe.transformer.load_state_dict(diffusers_state_dict(merged, pipe.transformer.config))
    torch.testing.assert_close(flux_output(pipe.transformer), expected, rtol=1e-4, atol=1e-5)


def test_flux_refuses_ddpm_settings_with_one_line(tiny_models):
    for kwargs, key in [
        ({"min_snr_gamma": 5.0}, "loss.min_snr_gamma"),
        ({"noise_offset": 0.1}, "noise.offset"),
        ({"network_type": "locon"}, "network.type"),
    ]:
        module = LoraDiffusionModule(model=tiny_models["flux"], **kwargs)
        with pytest.raises(LorafitError, match=f"model.{key}"):
            module.configure_model()
