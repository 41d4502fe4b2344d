"""Every network type trains, exports in kohya/LyCORIS (and diffusers where it can) and reloads exactly.

Each case trains a tiny model for a few steps, then checks the exported files three ways against
the training-time model: lorafit's loader, an independent A1111/ComfyUI reading of the kohya file
(``app_reference``), and diffusers' own loader where diffusers supports the type.
"""

from __future__ import annotations

import json

import pytest
import torch
from app_reference import apply_kohya_file
from network_reference import pipeline, text_outputs
from safetensors import safe_open
from safetensors.torch import load_file
from training import train, unet_output

import lorafit
from lorafit.cli import main

CASES = {
    "sd1-locon": (
        "sd1",
        "locon",
        {
            "target_preset": "attn-mlp",
            "conv_rank": 2,
            "conv_alpha": 1.0,
            "rank_pattern": {r"up_blocks\.1\..*": 8},
            "alpha_pattern": {r"ff\.net\.2": 1.0},
        },
    ),
    "sdxl-locon": ("sdxl", "locon", {}),
    "sd1-loha": ("sd1", "loha", {"target_preset": "full"}),
    "sdxl-lokr": ("sdxl", "lokr", {"target_preset": "full", "conv_rank": 2}),
    "sdxl-dora": ("sdxl", "dora", {"target_preset": "full"}),
}
DIFFUSERS_LOADS = {"lora", "locon", "dora"}


class _Encoders:
    def __init__(self, module):
        self.tokenizer = module.base.tokenizers[0]
        self.text_encoder = module.text_encoders[0]
        self.text_encoder_2 = module.text_encoders[1] if len(module.text_encoders) > 1 else None


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tiny_models, demo_data, tmp_path_factory):
    family, network_type, options = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    _, module = train(
        tiny_models[family],
        demo_data,
        root,
        max_epochs=1,
        rank=4,
        alpha=2.0,
        learning_rate=1e-2,
        train_text_encoder=True,
        network_type=network_type,
        export={"every_n_epochs": 0},
        **options,
    )
    expected = {"unet": unet_output(module.unet), "text": text_outputs(_Encoders(module))}
    base = unet_output(pipeline(tiny_models[family]).unet)
    assert (base - expected["unet"]).abs().max() > 1e-3, "training changed nothing; the comparisons prove nothing"
    return family, network_type, root / "lora", expected, tiny_models[family]


def _close(got, want, tolerance: float = 1e-4) -> bool:
    return (got - want).abs().max().item() < tolerance


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lorafit_loader_reproduces_training_model(trained, fmt):
    _family, network_type, lora, expected, model_dir = trained
    path = lora / ("test.safetensors" if fmt == "kohya" else "diffusers/test.safetensors")
    if fmt == "diffusers" and network_type not in DIFFUSERS_LOADS:
        assert not path.exists(), "a diffusers-format file diffusers cannot load was written"
        return
    pipe = pipeline(model_dir)
    lorafit.load_lora(pipe, path)
    assert _close(unet_output(pipe.unet), expected["unet"])
    assert all(_close(got, want) for got, want in zip(text_outputs(pipe), expected["text"]))


def test_apps_read_the_kohya_file_as_trained(trained):
    """A1111/ComfyUI's formulas for the type (LyCORIS's for DoRA), applied to the raw file."""
    family, _network_type, lora, expected, model_dir = trained
    pipe = apply_kohya_file(pipeline(model_dir), family, lora / "test.safetensors")
    assert _close(unet_output(pipe.unet), expected["unet"])
    assert all(_close(got, want) for got, want in zip(text_outputs(pipe), expected["text"]))


def test_diffusers_loads_what_it_supports(trained):
    _family, network_type, lora, expected, model_dir = trained
    pipe = pipeline(model_dir)
    if network_type not in DIFFUSERS_LOADS:
        with pytest.raises(ValueError):  # diffusers 0.42 refuses LoHa/LoKr keys
            pipe.load_lora_weights(str(lora / "test.safetensors"))
        return
    pipe.load_lora_weights(str(lora / "diffusers" / "test.safetensors"))
    assert _close(unet_output(pipe.unet), expected["unet"])
    # Text encoders included, DoRA magnitudes too (transformers 5 reads them only as ...magnitude_vector.weight).
    assert all(_close(got, want) for got, want in zip(text_outputs(pipe), expected["text"]))
    # diffusers' kohya path: LoCon convs load exactly; DoRA's dora_scale is dropped (plain LoRA, wrong).
    kohya = pipeline(model_dir)
    kohya.load_lora_weights(str(lora / "test.safetensors"))
    error = (unet_output(kohya.unet) - expected["unet"]).abs().max().item()
    assert error > 1e-3 if network_type == "dora" else error < 1e-4


def test_kohya_keys_shapes_and_metadata(trained):
    family, network_type, lora, _, _ = trained
    with safe_open(str(lora / "test.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    parts = {k.partition(".")[2] for k in tensors}
    args = json.loads(metadata["ss_network_args"]) if "ss_network_args" in metadata else {}
    conv1 = next(k.partition(".")[0] for k in tensors if k.endswith("conv1.alpha") or "in_layers_2.alpha" in k)
    if network_type in ("locon", "dora"):
        assert {"lora_down.weight", "lora_up.weight", "alpha"} <= parts
        down, up = tensors[f"{conv1}.lora_down.weight"], tensors[f"{conv1}.lora_up.weight"]
        assert down.dim() == 4 and down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1)
    if network_type == "locon":
        assert metadata["ss_network_module"] == "networks.lora" and not parts - {
            "lora_down.weight",
            "lora_up.weight",
            "alpha",
        }
        if family == "sd1":
            assert args == {"conv_dim": "2", "conv_alpha": "1.0"} and tensors[f"{conv1}.alpha"].item() == 1.0
            assert tensors[f"{conv1}.lora_down.weight"].shape[0] == 2
            assert tensors["lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
            assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.alpha"].item() == 1.0
    if network_type == "dora":
        assert metadata["ss_network_module"] == "lycoris.kohya" and args["algo"] == "lora" and args["dora_wd"] == "True"
        for stem in {k.partition(".")[0] for k in tensors}:
            up, scale = tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.dora_scale"]
            assert scale.shape == (up.shape[0],) + (1,) * (up.dim() - 1)  # LyCORIS wd_on_out layout
    if network_type == "loha":
        assert parts == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} and args["algo"] == "loha"
        assert tensors[f"{conv1}.hada_w1_b"].dim() == 2  # convs keep w*_b flat: [rank, in * 3 * 3]
    if network_type == "lokr":
        assert parts <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
        assert "lokr_w1" in parts and args["algo"] == "lokr"
    if network_type in ("loha", "lokr", "dora"):
        assert metadata["ss_network_module"] == "lycoris.kohya"


def test_kohya_lorafit_kohya_round_trip_is_byte_stable(trained, tmp_path):
    _family, network_type, lora, _, model_dir = trained
    source = lora / "test.safetensors"
    main(["convert", str(source), str(tmp_path / "same.safetensors"), "--base", model_dir, "--to", "kohya"])
    rounds = [tmp_path / "same.safetensors"]
    if network_type in DIFFUSERS_LOADS:
        main(["convert", str(source), str(tmp_path / "d.safetensors"), "--base", model_dir])
        main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "back.safetensors"), "--base", model_dir])
        rounds.append(tmp_path / "back.safetensors")
    else:
        with pytest.raises(SystemExit):  # one-line error: diffusers has no format for LoHa/LoKr
            main(["convert", str(source), str(tmp_path / "d.safetensors"), "--base", model_dir])
    original = load_file(str(source))
    for path in rounds:
        again = load_file(str(path))
        assert again.keys() == original.keys()
        assert all(again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]) for k in original)


def test_strength_follows_the_apps(trained):
    """0 is the base model bit for bit; 0.5 is W + 0.5 (W' - W), DoRA included."""
    family, _network_type, lora, _, model_dir = trained
    pipe = pipeline(model_dir)
    base = unet_output(pipe.unet)
    name = lorafit.load_lora(pipe, lora / "test.safetensors", weight=0.0)
    assert torch.equal(unet_output(pipe.unet), base)
    lorafit.set_lora_weight(pipe, name, 0.5)
    half = apply_kohya_file(pipeline(model_dir), family, lora / "test.safetensors", strength=0.5)
    assert _close(unet_output(pipe.unet), unet_output(half.unet))
    lorafit.unload_lora(pipe)
    assert torch.equal(unet_output(pipe.unet), base)
