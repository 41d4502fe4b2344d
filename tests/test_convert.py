"""`lorafit convert` between kohya and diffusers formats is exact in both directions."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from training import unet_output

from lorafit.cli import main
from lorafit.networks.adapters import add_lora, lora_config, lora_modules
from lorafit.networks.files import read_lora_file, save_kohya
from lorafit.networks.kohya_format import kohya_name_table
from lorafit.networks.lora_weights import LoraModuleWeights, delta_weight


def _random_lora(pipe, family: str, seed: int = 0):
    """Random LoRA weights on the UNet attention and the text encoder(s), with per-module alphas."""
    generator = torch.Generator().manual_seed(seed)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if family == "sdxl":
        components["text_encoder_2"] = pipe.text_encoder_2
    weights = {}
    for component, model in components.items():
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if component == "unet" else ["q_proj", "v_proj", "fc1"]
        add_lora(model, lora_config(4, 4.0, targets, "test"), "test")
        modules = {}
        for index, (name, layer) in enumerate(sorted(lora_modules(model).items())):
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            # Alternate alphas so the per-module alpha patterns are exercised, not just the default.
            modules[name] = LoraModuleWeights(
                torch.randn(down.shape, generator=generator) * 0.1,
                torch.randn(up.shape, generator=generator) * 0.1,
                alpha=1.0 if index % 2 else 4.0,
            )
        weights[component] = modules
        model.delete_adapters("default") if hasattr(model, "delete_adapters") else None
    return weights


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def kohya_file(request, tiny_models, tmp_path_factory):
    from diffusers import DiffusionPipeline

    family = request.param
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    weights = _random_lora(pipe, family)
    path = tmp_path_factory.mktemp(f"convert-{family}") / "lora.safetensors"
    save_kohya(path, family, weights, pipe.unet.config, {"ss_network_dim": "4", "ss_v_parameterization": "False"})
    return family, path


def _loaded_output(model_dir: str, lora_path) -> torch.Tensor:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_path))
    return unet_output(pipe.unet)


def test_kohya_to_diffusers_to_kohya_is_stable(kohya_file, tiny_models, tmp_path):
    family, kohya = kohya_file
    diffusers_path, back = tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    main(["convert", str(kohya), str(diffusers_path), "--base", tiny_models[family]])
    main(["convert", str(diffusers_path), str(back), "--base", tiny_models[family], "--to", "kohya"])
    original, roundtrip = load_file(str(kohya)), load_file(str(back))
    assert original.keys() == roundtrip.keys()
    assert all(torch.equal(original[k], roundtrip[k]) for k in original)
    assert {v.item() for k, v in original.items() if k.endswith(".alpha")} == {1.0, 4.0}


@torch.no_grad()
def _merged_output(model_dir: str, kohya_path, family: str) -> torch.Tensor:
    """Ground truth: W + alpha / rank * up @ down merged by hand into the base UNet (A1111's reading)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    table = kohya_name_table(family, components | ({"text_encoder_2": pipe.text_encoder_2} if family == "sdxl" else {}))
    weights, _, _ = read_lora_file(kohya_path, table)
    modules = dict(pipe.unet.named_modules())
    for name, lora in weights["unet"].items():
        modules[name].weight += delta_weight(lora)
    return unet_output(pipe.unet)


def test_converted_file_loads_in_diffusers_with_every_modules_alpha(kohya_file, tiny_models, tmp_path):
    family, kohya = kohya_file
    converted = tmp_path / "diffusers.safetensors"
    main(["convert", str(kohya), str(converted), "--base", tiny_models[family]])
    truth = _merged_output(tiny_models[family], kohya, family)
    assert (_loaded_output(tiny_models[family], converted) - truth).abs().max() < 1e-5
    # diffusers' own kohya loader (0.42) drops per-module alphas that differ from the first one
    # (its alpha_pattern keys never match); converting with lorafit first avoids that bug.


def test_convert_refuses_a_lora_of_another_architecture(kohya_file, tiny_models, tmp_path, capsys):
    family, kohya = kohya_file
    other = "sd1" if family == "sdxl" else "sdxl"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(kohya), str(tmp_path / "x.safetensors"), "--base", tiny_models[other]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and "names no module of this base model" in err and "\n" not in err
