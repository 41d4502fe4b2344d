"""Write and read network files in kohya/LyCORIS and diffusers/PEFT format, atomically.

Every write goes to a temporary name in the same directory and is renamed into place, so a run
killed mid-save (OOM, SLURM preemption, Ctrl-C) leaves the previous file whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorafit.errors import LorafitError
from lorafit.networks.diffusers_format import DIFFUSERS_KINDS, diffusers_layers, from_diffusers_state_dict
from lorafit.networks.kohya_format import from_kohya_state_dict, is_kohya_state_dict, to_kohya_state_dict
from lorafit.networks.lora_weights import LoraWeights, cast, network_kinds
from lorafit.networks.other_layouts import generic_to_kohya, is_generic_layout

LoraFormat = Literal["kohya", "diffusers"]


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
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``weights`` as a kohya/A1111 LoRA file (``denoiser``: see :func:`to_kohya_state_dict`);
    ``extra``: more tensors of the file, e.g. A1111's ``bundle_emb`` embedding keys (embedding_files.py)."""
    tensors = to_kohya_state_dict(family, cast(weights, dtype), denoiser_config, denoiser)
    tensors.update({key: value.detach().to("cpu", dtype) for key, value in (extra or {}).items()})
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
    unknown = sorted(set(weights) - {spec.denoiser_component, *spec.trainable_text_encoders})
    if unknown:
        raise LorafitError(
            f"{path}: {spec.title} has no trainable component {unknown[0]!r} for a diffusers-format file"
        )
    layers = diffusers_layers(spec, weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        spec.pipeline_type().save_lora_weights(tmp_dir, weight_name=path.name, safe_serialization=True, **layers)
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


def read_lora_file(path: str | Path, kohya_table: dict | None = None) -> tuple[LoraWeights, LoraFormat, dict]:
    """Read a kohya or diffusers-format LoRA into :class:`LoraWeights`.

    Args:
        path: The ``.safetensors`` file.
        kohya_table: Name table of the base model (``kohya_name_table``); required for kohya files
            (and ComfyUI's generic ``diffusion_model.`` layout, see :mod:`lorafit.networks.other_layouts`).
    """
    tensors, metadata = read_safetensors(path)
    # A1111's bundled embeddings (pivotal tuning) are not LoRA weights; lorafit.inference loads them.
    tensors = {key: value for key, value in tensors.items() if not key.startswith("bundle_emb.")}
    generic = is_generic_layout(tensors)
    if generic or is_kohya_state_dict(tensors):
        if kohya_table is None:
            raise LorafitError(f"{path}: reading a kohya file needs the base model's module names (--base)")
        if generic:
            from lorafit.families.registry import get_family

            try:
                tensors = generic_to_kohya(tensors, get_family(kohya_table.family))
            except LorafitError as error:
                raise LorafitError(f"{path}: {error}") from None
        return from_kohya_state_dict(tensors, kohya_table, source=str(path)), "kohya", metadata
    return from_diffusers_state_dict(tensors, metadata, str(path)), "diffusers", metadata
