"""Merging into a base when the output's layout differs from the input's (directory <-> single file).

The layouts differ in more than names (OpenCLIP's fused q/k/v, the VAE's attention convs, Flux's
fused and swapped modules), and diffusers' ``from_pretrained``/``from_single_file`` already convert
between them exactly, so the model is built by diffusers in the dtype it is stored in, patched in
place (one copy in memory; the LoRAs are added before any rounding to a smaller output dtype), and
written in the output dtype: a directory by ``save_pretrained``, a single file through lorafit's
original-layout tables (:mod:`lorafit.families.original_checkpoint`, BFL's layout for Flux from
:func:`lorafit.families.flux_layout.bfl_state_dict`) and the streaming writer, which casts each
tensor as it writes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.toolbox.bake import Patches, check_free_path, patched, write_with_progress
from lorafit.networks.toolbox.base_layout import BaseLayout
from lorafit.networks.toolbox.model_files import ModelWeights, local_directory
from lorafit.networks.toolbox.safetensors_stream import eager


def source_dtype(layout: BaseLayout) -> torch.dtype:
    """The dtype the base stores its denoiser in (the output's when no --save_dtype is given)."""
    weights = ModelWeights(layout.source, layout)
    try:
        files = weights.tensor_files(layout.spec.denoiser_component)
        for key in files.keys():
            if files.dtype(key).is_floating_point:
                return files.dtype(key)
        return torch.float32
    finally:
        weights.close()


@torch.no_grad()
def patch_in_memory(components: dict[str, torch.nn.Module], patches: Patches) -> None:
    for (component, module), contributions in patches.items():
        if component not in components:
            raise LorafitError(f"the merged model has no {component} for the LoRA's {module}")
        layer = components[component].get_submodule(module)
        layer.weight.data = patched(layer.weight.data, contributions).to(layer.weight.dtype)


def _single_file_state(layout: BaseLayout, patches: Patches, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    root = local_directory(layout.source)
    spec = layout.spec
    if layout.family == "flux":
        from diffusers import FluxTransformer2DModel

        from lorafit.families.flux_layout import bfl_state_dict

        others = sorted({c for c, _ in patches} - {"transformer"})
        if others:
            raise LorafitError(
                f"a FLUX.1 single file holds the transformer only, not the {others[0]} this LoRA also changes; write "
                "a diffusers directory instead (--out without .safetensors), or leave it out with --text_encoders false"
            )
        transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", dtype=dtype)
        patch_in_memory({"transformer": transformer}, patches)
        return bfl_state_dict(transformer)
    from lorafit.families.original_checkpoint import original_state_dict

    pipe = spec.pipeline_type().from_pretrained(root, dtype=dtype, **spec.pipeline_kwargs())
    components = {name: getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")}
    patch_in_memory({k: v for k, v in components.items() if v is not None}, patches)
    return original_state_dict(pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))


def bake_relayout(
    layout: BaseLayout, patches: Patches, out: Path, save_dtype: torch.dtype | None, metadata: dict
) -> Path:
    """Merge ``patches`` into ``layout``'s model and write it in the other layout (see module docstring)."""
    check_free_path(out)
    stored = source_dtype(layout)
    dtype = save_dtype or stored
    if not layout.single_file:  # directory -> single file
        state = _single_file_state(layout, patches, stored)
        plan = {key: eager(tensor, dtype) for key, tensor in state.items()}
        return write_with_progress(out, plan, {"format": "pt", **metadata})
    spec = layout.spec
    pipe = spec.load_single_file(layout.source, layout.config_source, {}, "none", stored)
    if spec.objective == "ddpm":
        from lorafit.families.single_file_weights import settle_single_file_weights

        settle_single_file_weights(pipe, spec.name, layout.source)
    names = (spec.denoiser_component, *spec.text_encoder_components)
    patch_in_memory({n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}, patches)
    pipe.to(dtype)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
