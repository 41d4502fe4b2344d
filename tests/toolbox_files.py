"""Network files and merged models for the toolbox tests (``lorafit inspect/resize/merge/extract``).

``random_network`` makes a network of any kind on a tiny model's modules (read from its configs on
the meta device); ``merged_components`` is the ground truth of merging files into a base: the
base's real modules with ``W += strength * delta`` added by hand, from lorafit's reader of the
files (which tests/test_lycoris_files.py and test_load_lora.py check against A1111/ComfyUI).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.families.loading import model_skeleton
from lorafit.families.registry import get_family
from lorafit.networks.files import read_lora_file, save_diffusers, save_kohya
from lorafit.networks.kohya_format import kohya_name_table
from lorafit.networks.lora_weights import LoraModuleWeights, delta_weight
from lorafit.networks.lycoris_weights import LohaModuleWeights, LokrModuleWeights
from lorafit.networks.model_fit import fit_to_model

_TEXT = ("q_proj", "v_proj", "fc1")


def _random(generator, *shape, scale=0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=generator) * scale


def target_modules(model_dir: str, conv: bool = False, text_encoder: bool = True) -> dict:
    """(component, module) -> meta module: the family's ``attn`` preset (+ ResNet convs), text q/v."""
    family, components = model_skeleton(model_dir)
    spec = get_family(family)
    denoiser = components[spec.denoiser_component]
    names = spec.preset_modules(denoiser, "attn", with_conv_blocks=conv)
    found = {(spec.denoiser_component, n): denoiser.get_submodule(n) for n in sorted(names)}
    if text_encoder:
        for component in spec.trainable_text_encoders:
            for name, module in components[component].named_modules():
                if name.endswith(_TEXT):
                    found[(component, name)] = module
    return found


def _module(kind: str, module: torch.nn.Module, rank: int, index: int, generator, alpha: float | None):
    out_features, in_flat = module.weight.shape[0], module.weight[0].numel()
    conv = module.weight.dim() == 4
    if alpha is None:
        alpha = float(rank) if index % 2 else rank / 2  # two alphas: per-module alphas are exercised
    if kind in ("lora", "dora"):
        down_shape = (rank, *module.weight.shape[1:]) if conv else (rank, in_flat)
        up_shape = (out_features, rank, 1, 1) if conv else (out_features, rank)
        scale = None
        if kind == "dora":
            scale = (torch.rand(out_features, generator=generator) + 0.5).reshape(-1, *[1] * (len(down_shape) - 1))
        return LoraModuleWeights(_random(generator, *down_shape), _random(generator, *up_shape), alpha, scale)
    if kind == "loha":
        parts = [(out_features, rank), (rank, in_flat), (out_features, rank), (rank, in_flat)]
        return LohaModuleWeights(*[_random(generator, *s, scale=0.3) for s in parts], alpha)
    if kind == "lokr":  # w1 full 2x2, w2 factored (rank), as LyCORIS writes with factor 2
        w2_b_cols = in_flat // 2
        return LokrModuleWeights(
            alpha,
            w1=_random(generator, 2, 2, scale=1.0),
            w2_a=_random(generator, out_features // 2, rank),
            w2_b=_random(generator, rank, w2_b_cols),
        )
    raise ValueError(kind)


def random_weights(
    model_dir: str, kind: str = "lora", rank: int = 4, seed: int = 0, alpha: float | None = None, **targets
) -> dict:
    """LoraWeights of ``kind`` on :func:`target_modules` of the model (``alpha`` None: two alphas)."""
    generator = torch.Generator().manual_seed(seed)
    weights: dict = {}
    for index, ((component, name), module) in enumerate(target_modules(model_dir, **targets).items()):
        weights.setdefault(component, {})[name] = _module(kind, module, rank, index, generator, alpha)
    return weights


def random_network(
    model_dir: str, path: Path, file_format: str = "kohya", kind: str = "lora", metadata: dict | None = None, **kwargs
) -> Path:
    """Write a random network file for the tiny model in ``model_dir`` and return its path."""
    family, components = model_skeleton(model_dir)
    weights = random_weights(model_dir, kind, **kwargs)
    denoiser = components[get_family(family).denoiser_component]
    if file_format == "kohya":
        return save_kohya(path, family, weights, denoiser.config, metadata or {})
    return save_diffusers(path, family, weights)


def pipeline(model_dir: str):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model_dir)


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    names = ("unet", "transformer", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def family_of(model_dir: str) -> str:
    return model_skeleton(model_dir)[0]


@torch.no_grad()
def merged_components(model_dir: str, files: list[tuple[str | Path, float]], pipe=None) -> dict[str, torch.nn.Module]:
    """The base's components with every file merged in turn at its strength (float32)."""
    pipe = pipe or pipeline(model_dir)
    components = pipeline_components(pipe)
    table = kohya_name_table(family_of(model_dir), components)
    for path, strength in files:
        weights, _, _ = read_lora_file(path, table)
        weights = fit_to_model(weights, components, str(path))  # names as the model has them, as load_lora does
        for component, modules in weights.items():
            for name, module in modules.items():
                layer = components[component].get_submodule(name)
                layer.weight += strength * delta_weight(module, layer.weight)
    return components


def updates(path: str | Path, model_dir: str) -> dict[tuple[str, str], torch.Tensor]:
    """Every module's update ``W' - W`` in a file, by (component, diffusers module); DoRA on the base."""
    pipe = pipeline(model_dir)
    components = pipeline_components(pipe)
    weights, _, _ = read_lora_file(path, kohya_name_table(family_of(model_dir), components))
    weights = fit_to_model(weights, components, str(path))
    found = {}
    for component, modules in weights.items():
        for name, module in modules.items():
            base = components[component].get_submodule(name).weight
            found[(component, name)] = delta_weight(module, base.detach())
    return found


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@torch.no_grad()
def denoiser_output(components: dict[str, torch.nn.Module]) -> torch.Tensor:
    """The denoiser's output on fixed inputs (UNet or Flux transformer)."""
    from flux_reference import flux_output
    from training import unet_output

    if "transformer" in components:
        return flux_output(components["transformer"])
    return unet_output(components["unet"])


def _app_output(path: Path, model_dir: str) -> torch.Tensor:
    """The denoiser as A1111/ComfyUI patch it from a kohya file (tests/app_reference.py,
    tests/flux_reference.py: their formulas on the raw tensors, not lorafit's reader)."""
    from app_reference import apply_kohya_file
    from flux_reference import comfy_merge
    from safetensors.torch import load_file

    from lorafit.families.flux_layout import bfl_state_dict, diffusers_state_dict

    pipe = pipeline(model_dir)
    if getattr(pipe, "transformer", None) is not None:
        transformer = pipe.transformer
        kohya = {k: v for k, v in load_file(str(path)).items() if k.startswith("lora_unet_")}
        merged = comfy_merge(bfl_state_dict(transformer), kohya)
        transformer.load_state_dict(diffusers_state_dict(merged, transformer.config))
    else:
        apply_kohya_file(pipe, family_of(model_dir), path)
    return denoiser_output(pipeline_components(pipe))


def assert_loads_like(path: Path, model_dir: str, diffusers_too: bool = True) -> None:
    """``path`` loaded by lorafit, applied as A1111/ComfyUI do (kohya files) and by diffusers' own
    loader gives the denoiser merged by hand from it."""
    import lorafit
    from lorafit.networks.files import read_safetensors
    from lorafit.networks.kohya_format import is_kohya_state_dict

    truth = denoiser_output(merged_components(model_dir, [(path, 1.0)]))
    base = denoiser_output(pipeline_components(pipeline(model_dir)))
    assert (truth - base).abs().max() > 1e-4, "the file changes nothing; the comparison proves nothing"
    pipe = pipeline(model_dir)
    lorafit.load_lora(pipe, path)
    torch.testing.assert_close(denoiser_output(pipeline_components(pipe)), truth, rtol=1e-4, atol=1e-4)
    kohya = is_kohya_state_dict(read_safetensors(path)[0])
    if kohya:
        torch.testing.assert_close(_app_output(path, model_dir), truth, rtol=1e-4, atol=1e-4)
    # diffusers' kohya Flux converter hard-codes FLUX.1's widths (3072), so it cannot read a tiny
    # model's kohya file; its diffusers-format reader can.
    if diffusers_too and not (kohya and family_of(model_dir) == "flux"):
        pipe = pipeline(model_dir)
        pipe.load_lora_weights(str(path))
        torch.testing.assert_close(denoiser_output(pipeline_components(pipe)), truth, rtol=1e-4, atol=1e-4)
