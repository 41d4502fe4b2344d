"""lorafit's loader and `lorafit convert` accept the kohya files ComfyUI and diffusers accept, and refuse
(in one line, writing nothing) a file whose tensors do not fit the base model."""

from __future__ import annotations

import pytest
import torch
from app_reference import apply_kohya_file
from network_reference import pipeline
from safetensors.torch import load_file, save_file
from training import unet_output

import lorafit
from lorafit.cli import main
from lorafit.networks.kohya_format import kohya_stem

PROJ = ("proj_in", "proj_out")


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


@torch.no_grad()
def _merged(model_dir: str, deltas: dict[tuple[str, str], torch.Tensor]):
    """Ground truth: the base pipeline with each (component, module)'s update added to its weight."""
    pipe = pipeline(model_dir)
    for (component, name), delta in deltas.items():
        weight = getattr(pipe, component).get_submodule(name).weight
        weight += delta.reshape(weight.shape)
    return pipe


def test_sdxl_kohya_file_with_diffusers_unet_names_loads(tiny_models, tmp_path):
    """What diffusers' convert_state_dict_to_kohya writes for SDXL (lora_unet_down_blocks_1_...)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    pipe = pipeline(tiny_models["sdxl"])
    peft, deltas = {}, {}
    for index, (name, layer) in enumerate(n for n in pipe.unet.named_modules() if n[0].endswith(("to_k", *PROJ))):
        out, inner = layer.weight.shape[:2]
        down, up = _random(2, inner, seed=index), _random(out, 2, seed=100 + index)
        if layer.weight.dim() == 4:
            down, up = down[..., None, None], up[..., None, None]
        peft[f"unet.{name}.lora_A.weight"], peft[f"unet.{name}.lora_B.weight"] = down, up
        deltas[("unet", name)] = up.flatten(1) @ down.flatten(1)  # alpha = rank: scale 1
    layer = "text_model.encoder.layers.1.self_attn.q_proj"
    peft[f"text_encoder.{layer}.lora_A.weight"] = down_te = _random(2, 32, seed=7)
    peft[f"text_encoder.{layer}.lora_B.weight"] = up_te = _random(32, 2, seed=8)
    deltas[("text_encoder", layer.removeprefix("text_model."))] = up_te @ down_te
    kohya = convert_state_dict_to_kohya(peft)
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in kohya  # diffusers' names, not SGM's
    path = tmp_path / "diffusers-kohya.safetensors"
    save_file(kohya, str(path))

    truth = _merged(tiny_models["sdxl"], deltas)
    lorafit.load_lora(pipe, path)
    assert (unet_output(truth.unet) - unet_output(pipeline(tiny_models["sdxl"]).unet)).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(truth.unet), rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[49406, 5, 9, 49407]]) % pipe.text_encoder.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], truth.text_encoder(ids)[0], rtol=1e-4, atol=1e-5)
    # diffusers' own loader reads the UNet part the same way (its kohya path fails on these text-encoder keys).
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, str(tmp_path / "unet.safetensors"))
    theirs = pipeline(tiny_models["sdxl"])
    theirs.load_lora_weights(str(tmp_path / "unet.safetensors"))
    torch.testing.assert_close(unet_output(theirs.unet), unet_output(truth.unet), rtol=1e-4, atol=1e-5)


def _sd1_file_with_2d_projections(pipe, path):
    """SD1.5 proj_in/proj_out are 1x1 convs; this file stores their LoRA as 2-D matrices."""
    tensors = {}
    for index, (name, layer) in enumerate(n for n in pipe.unet.named_modules() if n[0].endswith(PROJ)):
        assert layer.weight.shape[2:] == (1, 1)
        stem = kohya_stem("sd1", "unet", name)
        channels = layer.weight.shape[0]
        tensors[f"{stem}.lora_down.weight"] = _random(2, channels, seed=index)
        tensors[f"{stem}.lora_up.weight"] = _random(channels, 2, seed=50 + index)
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def test_sd1_file_with_2d_projection_matrices_loads_as_comfyui_reads_it(tiny_models, tmp_path):
    pipe = pipeline(tiny_models["sd1"])
    path = _sd1_file_with_2d_projections(pipe, tmp_path / "flat.safetensors")
    truth = apply_kohya_file(pipeline(tiny_models["sd1"]), "sd1", path, strength=0.7)  # flatten, mm, reshape
    lorafit.load_lora(pipe, path, weight=0.7)
    assert (unet_output(truth.unet) - unet_output(pipeline(tiny_models["sd1"]).unet)).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(truth.unet), rtol=1e-4, atol=1e-5)


def test_convert_puts_2d_projections_in_the_bases_layout(tiny_models, tmp_path):
    pipe = pipeline(tiny_models["sd1"])
    path = _sd1_file_with_2d_projections(pipe, tmp_path / "flat.safetensors")
    main(["convert", str(path), str(tmp_path / "d.safetensors"), "--base", tiny_models["sd1"]])
    main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--base", tiny_models["sd1"]])
    assert all(t.dim() == 4 for k, t in load_file(str(tmp_path / "k.safetensors")).items() if "weight" in k)
    truth = unet_output(apply_kohya_file(pipeline(tiny_models["sd1"]), "sd1", path).unet)
    theirs = pipeline(tiny_models["sd1"])
    theirs.load_lora_weights(str(tmp_path / "d.safetensors"))  # diffusers/PEFT needs the conv's 4-D shape
    torch.testing.assert_close(unet_output(theirs.unet), truth, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("part, shape", [("lora_down.weight", (2, 31)), ("lora_up.weight", (16, 2))])
def test_convert_refuses_a_tensor_that_does_not_fit_the_base(tiny_models, tmp_path, capsys, part, shape):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    stem = kohya_stem("sd1", "unet", name)
    tensors = {f"{stem}.lora_down.weight": _random(2, 32, seed=1), f"{stem}.lora_up.weight": _random(32, 2, seed=2)}
    tensors[f"{stem}.{part}"] = _random(*shape, seed=3)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    for to in ("diffusers", "kohya"):
        target = tmp_path / f"out-{to}.safetensors"
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", str(tmp_path / "bad.safetensors"), str(target), "--base", tiny_models["sd1"], "--to", to])
        assert exit_info.value.code == 2 and not target.exists()
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorafit: error:") and "\n" not in err
        assert name in err and str(shape) in err and "(32, 32)" in err, err
