"""diffusers-format files load in the consumers' own loaders: text encoders (DoRA magnitudes included)
under the key layout diffusers on transformers 4 and 5 and ComfyUI read, and lorafit reads both layouts."""

from __future__ import annotations

import pytest
import torch
from app_reference import comfy_diffusers_clip_keys
from network_reference import merge_into, pipeline, text_outputs
from safetensors.torch import load_file, save_file
from training import unet_output

import lorafit
from lorafit.networks.files import read_lora_file, save_diffusers
from lorafit.networks.lora_weights import LoraModuleWeights
from lorafit.networks.model_fit import fit_to_model

TEXT_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")


def _random_network(pipe, dora: bool, seed: int = 0) -> dict:
    """Random LoRA/DoRA weights on both text encoders and the UNet's attention, alphas per module."""
    generator = torch.Generator().manual_seed(seed)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    weights = {}
    for component, model in parts.items():
        targets = ("attn1.to_q", "attn2.to_v") if component == "unet" else TEXT_TARGETS
        modules = {}
        for index, (name, layer) in enumerate(n for n in model.named_modules() if n[0].endswith(targets)):
            out, inner = layer.weight.shape
            scale = None
            if dora:  # magnitudes away from the weight's row norms, so a magnitude left at its init shows
                scale = layer.weight.detach().norm(dim=1, keepdim=True) * (
                    1.5 + torch.rand(out, 1, generator=generator)
                )
            modules[name] = LoraModuleWeights(
                torch.randn(2, inner, generator=generator) * 0.3,
                torch.randn(out, 2, generator=generator) * 0.3,
                alpha=1.0 + index % 3,
                dora_scale=scale,
            )
        weights[component] = modules
    return weights


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_keys_are_what_comfyui_and_transformers_4_read(tiny_models, tmp_path, family):
    pipe = pipeline(tiny_models[family])
    path = save_diffusers(tmp_path / "lora.safetensors", family, _random_network(pipe, dora=False))
    keys = set(load_file(str(path)))
    for component in ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",):
        modules = {k.rsplit(".lora_", 1)[0] for k in keys if k.startswith(component + ".")}
        assert modules, f"no {component} keys written"
        # ComfyUI's model_lora_keys_clip maps exactly these names for diffusers LoRAs (no others).
        assert modules <= comfy_diffusers_clip_keys(component, num_layers=3), sorted(modules)[:2]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_loads_text_encoder_dora_magnitudes(tiny_models, tmp_path, family):
    """Compare the magnitudes diffusers' loader puts in every layer, not only the key names."""
    pipe = pipeline(tiny_models[family])
    weights = _random_network(pipe, dora=True)
    path = save_diffusers(tmp_path / "dora.safetensors", family, weights)
    loaded = pipeline(tiny_models[family])
    loaded.load_lora_weights(str(path), adapter_name="x")
    for component, modules in weights.items():
        model = getattr(loaded, component)
        layers = {n: m for n, m in model.named_modules() if hasattr(m, "lora_magnitude_vector")}
        assert set(layers) == set(modules), f"{component}: diffusers put DoRA on other modules"
        for name, module_weights in modules.items():
            got = layers[name].lora_magnitude_vector["x"].weight.detach()
            torch.testing.assert_close(got, module_weights.dora_scale.flatten(), rtol=0, atol=0, msg=f"{name}")
            torch.testing.assert_close(layers[name].lora_B["x"].weight.detach(), module_weights.up, rtol=0, atol=0)
    truth = merge_into(pipeline(tiny_models[family]), path)
    for got, want in zip(text_outputs(loaded), text_outputs(truth)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unet_output(loaded.unet), unet_output(truth.unet), rtol=1e-4, atol=1e-5)


def test_lorafit_reads_both_text_encoder_layouts(tiny_models, tmp_path):
    """Files lorafit wrote before (transformers-5 names, bare magnitude keys) read the same as new ones."""
    pipe = pipeline(tiny_models["sdxl"])
    weights = _random_network(pipe, dora=True)
    new = save_diffusers(tmp_path / "new.safetensors", "sdxl", weights)
    from safetensors import safe_open

    with safe_open(str(new), framework="pt") as handle:
        metadata = handle.metadata()
    old = {
        k.replace(".text_model.", ".", 1).replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
        for k, v in load_file(str(new)).items()
    }
    assert old.keys() != load_file(str(new)).keys()
    save_file(old, str(tmp_path / "old.safetensors"), metadata=metadata)
    read_new, _, _ = read_lora_file(new)
    read_old, _, _ = read_lora_file(tmp_path / "old.safetensors")
    assert read_new.keys() == read_old.keys() == weights.keys()
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    read_new, read_old = (fit_to_model(read, components, "file") for read in (read_new, read_old))
    for component in weights:
        assert read_new[component].keys() == read_old[component].keys() == weights[component].keys()
        for name, module in weights[component].items():
            for got in (read_new[component][name], read_old[component][name]):
                assert got.alpha == module.alpha and torch.equal(got.dora_scale, module.dora_scale)
    base = text_outputs(pipeline(tiny_models["sdxl"]))
    truth = text_outputs(merge_into(pipeline(tiny_models["sdxl"]), new))
    for path in (new, tmp_path / "old.safetensors"):
        loaded = pipeline(tiny_models["sdxl"])
        lorafit.load_lora(loaded, path)
        for got, want, before in zip(text_outputs(loaded), truth, base):
            assert (want - before).abs().max() > 1e-3
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
