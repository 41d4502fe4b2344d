"""Write and read network files in kohya/LyCORIS and diffusers/PEFT format, atomically.

Every write goes to a temporary name in the same directory and is renamed into place, so a run
killed mid-save (OOM, SLURM preemption, Ctrl-C) leaves the previous file whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafit.errors import LorafitError
from lorafit.networks.kohya_format import from_kohya_state_dict, is_kohya_state_dict, to_kohya_state_dict
from lorafit.networks.lora_weights import (
    LoraModuleWeights,
    LoraWeights,
    alpha_from_config,
    cast,
    network_kinds,
    peft_config_for,
)

LoraFormat = Literal["kohya", "diffusers"]
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DIFFUSERS_KINDS = {"lora", "dora"}  # network kinds the diffusers/PEFT LoRA format can hold
# Key suffix -> part, for PEFT names and the older diffusers ``lora.down``/``lora.up`` names.
_DIFFUSERS_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_magnitude_vector": "magnitude",
}


def _usual_permissions(path: str | Path) -> None:
    """Give ``path`` the permissions any new file gets (0666 minus the umask).

    safetensors (0.8) and mkstemp create files owner-only (0600); a LoRA should be readable by
    whoever the user's umask allows, e.g. collaborators on a shared cluster filesystem.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """``safetensors.save_file`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        _usual_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_kohya(
    path: str | Path,
    family: str,
    weights: LoraWeights,
    denoiser_config=None,
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
    denoiser: torch.nn.Module | None = None,
) -> Path:
    """Write ``weights`` as a kohya/A1111 LoRA file (``denoiser``: see :func:`to_kohya_state_dict`)."""
    tensors = to_kohya_state_dict(family, cast(weights, dtype), denoiser_config, denoiser)
    return atomic_save_safetensors(tensors, path, metadata)


def save_diffusers(path: str | Path, family: str, weights: LoraWeights, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``weights`` in diffusers/PEFT format with ``lora_adapter_metadata`` (alpha survives a reload).

    The format holds LoRA/LoCon and DoRA (PEFT's ``lora_magnitude_vector``); diffusers has no
    LoHa/LoKr format, so those are refused here (write kohya/LyCORIS format instead).

    The file is written by diffusers' own ``save_lora_weights`` into a temporary directory next to
    the target, then renamed: the format stays whatever ``pipe.load_lora_weights`` expects.
    """
    from lorafit.families.registry import get_family

    kinds = network_kinds(weights)
    if not kinds <= DIFFUSERS_KINDS:
        raise LorafitError(
            f"{path}: diffusers format cannot hold {sorted(kinds - DIFFUSERS_KINDS)} networks; "
            "write the kohya/LyCORIS format instead"
        )
    weights = cast(weights, dtype)
    spec = get_family(family)
    pipeline_class = spec.pipeline_type()
    layers, configs = {}, {}
    for component, modules in weights.items():
        tensors = {}
        for name, m in modules.items():
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = m.down, m.up
            if m.dora_scale is not None:  # PEFT's shape: [out] for a Linear, [1, out, 1, 1] for a conv
                magnitude = m.dora_scale.flatten()
                tensors[f"{name}.lora_magnitude_vector"] = (
                    magnitude if m.down.dim() == 2 else magnitude.reshape(1, -1, 1, 1)
                )
        layers[f"{component}_lora_layers"] = tensors
        configs[f"{component}_lora_adapter_metadata"] = peft_config_for(modules)
    unknown = sorted(set(weights) - {spec.denoiser_component, *spec.trainable_text_encoders})
    if unknown:
        raise LorafitError(
            f"{path}: {spec.title} has no trainable component {unknown[0]!r} for a diffusers-format file"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        pipeline_class.save_lora_weights(tmp_dir, weight_name=path.name, safe_serialization=True, **layers, **configs)
        _usual_permissions(Path(tmp_dir) / path.name)
        os.replace(Path(tmp_dir) / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own error types for corrupt headers
        raise LorafitError(f"{path} is not a readable .safetensors file ({error})") from None


def _from_diffusers_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    packed = json.loads(metadata.get(_DIFFUSERS_METADATA_KEY, "{}"))
    weights: LoraWeights = {}
    parts_of: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        for suffix, part in _DIFFUSERS_PARTS.items():
            if rest.endswith(suffix):
                parts_of.setdefault((component, rest.removesuffix(suffix)), {})[part] = tensor
                break
        else:
            raise LorafitError(f"{source}: key {key} is neither kohya/LyCORIS nor diffusers/PEFT LoRA format")
    for (component, module), parts in sorted(parts_of.items()):
        if not {"down", "up"} <= set(parts):
            raise LorafitError(f"{source}: {component}.{module} lacks its {'up' if 'down' in parts else 'down'} matrix")
        config = {k.partition(".")[2]: v for k, v in packed.items() if k.startswith(f"{component}.")}
        # Without lora_adapter_metadata diffusers reloads with alpha = rank; read it the same way.
        alpha = alpha_from_config(config, module) if config else float(parts["down"].shape[0])
        dora_scale = parts.get("magnitude")
        if dora_scale is not None:  # back to LyCORIS's [out, 1(, 1, 1)]
            dora_scale = dora_scale.flatten().reshape(-1, *[1] * (parts["down"].dim() - 1))
        weights.setdefault(component, {})[module] = LoraModuleWeights(parts["down"], parts["up"], alpha, dora_scale)
    return weights


# The generic layout ComfyUI also reads: the original model's (BFL's, for Flux) module path under
# ``diffusion_model.``, with PEFT's or kohya's part names.
_GENERIC_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def _bfl_generic_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` -> the kohya key of the same module."""
    if not tensors or not all(key.startswith("diffusion_model.") for key in tensors):
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        path = key.removeprefix("diffusion_model.")
        for suffix in ("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "alpha", "dora_scale"):
            if path.endswith("." + suffix):
                module = path[: -len(suffix) - 1]
                renamed[f"lora_unet_{module.replace('.', '_')}.{_GENERIC_PARTS.get(suffix, suffix)}"] = tensor
                break
        else:
            raise LorafitError(f"key {key} is no LoRA part this reader knows (diffusion_model.* layout)")
    return renamed


def read_lora_file(path: str | Path, kohya_table: dict | None = None) -> tuple[LoraWeights, LoraFormat, dict]:
    """Read a kohya or diffusers-format LoRA into :class:`LoraWeights`.

    Args:
        path: The ``.safetensors`` file.
        kohya_table: Name table of the base model (``kohya_name_table``); required for kohya files.
    """
    tensors, metadata = read_safetensors(path)
    tensors = _bfl_generic_to_kohya(tensors)
    if is_kohya_state_dict(tensors):
        if kohya_table is None:
            raise LorafitError(f"{path}: reading a kohya file needs the base model's module names (--base)")
        return from_kohya_state_dict(tensors, kohya_table, source=str(path)), "kohya", metadata
    return _from_diffusers_state_dict(tensors, metadata, str(path)), "diffusers", metadata
