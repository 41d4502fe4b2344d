"""LoRAs merged into a base model's weights (``lorafit merge ... --into MODEL``), tensor by tensor.

Each patched weight becomes ``W + strength * (W' - W)`` per LoRA, in the order given, as A1111 and
ComfyUI apply them (a DoRA's normalisation sees the weight as the LoRAs before it left it), in
float32, then stored in the output dtype. A directory is written as a directory and a single file
as a single file, streamed: every tensor is read, patched, written and dropped in turn
(:mod:`~lorafit.networks.toolbox.safetensors_stream`), so a full SDXL or Flux never sits in memory.

Changing the layout (directory -> single file, or back) goes through diffusers, whose
``from_pretrained``/``from_single_file`` build the model in memory: one copy in the output dtype
(SDXL fp16: 7 GB), patched in place, then written (single files streamed by the same writer).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import ModuleWeights, delta_weight
from lorafit.networks.toolbox.base_layout import BaseLayout
from lorafit.networks.toolbox.checkpoint_keys import Location
from lorafit.networks.toolbox.model_files import (
    ModelWeights,
    TensorFiles,
    local_directory,
    pipeline_files,
    weight_files,
)
from lorafit.networks.toolbox.progress import progress
from lorafit.networks.toolbox.safetensors_stream import Planned, write_streamed

log = logging.getLogger("lorafit.toolbox")


@dataclass(frozen=True)
class Contribution:
    """One LoRA file's module, applied at ``strength``."""

    strength: float
    module: ModuleWeights


Patches = dict[tuple[str, str], list[Contribution]]  # (component, module) -> contributions in order


@torch.no_grad()
def patched(weight: torch.Tensor, contributions: list[Contribution]) -> torch.Tensor:
    """``weight`` (any dtype) with every contribution added in turn, in float32."""
    merged = weight.float()
    for contribution in contributions:
        merged = merged + contribution.strength * delta_weight(contribution.module, merged)
    return merged


def _rows(tensor: torch.Tensor, location: Location) -> torch.Tensor:
    pieces = sorted(location.segments, key=lambda s: s[1])
    return torch.cat([tensor[start : start + count] for start, _, count in pieces])


def _put_rows(tensor: torch.Tensor, location: Location, rows: torch.Tensor) -> None:
    for start, offset, count in location.segments:
        tensor[start : start + count] = rows[offset : offset + count]


def _out_dtype(dtype: torch.dtype, save_dtype: torch.dtype | None) -> torch.dtype:
    return save_dtype if save_dtype is not None and dtype.is_floating_point else dtype


def _file_plan(files: TensorFiles, targets: dict, save_dtype: torch.dtype | None) -> dict[str, Planned]:
    """Every tensor of ``files``: patched where ``targets`` say (key -> [(location, contributions)]),
    else copied, in the output dtype (floating tensors only; integer buffers keep theirs)."""
    plan = {}
    for key in files.keys():
        dtype = _out_dtype(files.dtype(key), save_dtype)

        def make(key=key, dtype=dtype):
            tensor = files.get(key)
            if key in targets:
                merged = tensor.float()
                for location, contributions in targets[key]:
                    if location.segments is None:
                        merged = patched(merged, contributions)
                    else:
                        _put_rows(merged, location, patched(_rows(merged, location), contributions))
                tensor = merged
            return tensor.to(dtype)

        plan[key] = Planned(files.shape(key), dtype, make)
    return plan


def _targets(weights: ModelWeights, patches: Patches) -> dict[str, dict[str, list]]:
    """file key -> [(location, contributions)] per component (``""`` for a single file)."""
    by_key: dict[str, dict[str, list]] = {}
    for (component, module), contributions in patches.items():
        location = weights.location(component, module)
        group = "" if weights.single_file else component
        by_key.setdefault(group, {}).setdefault(location.key, []).append((location, contributions))
    return by_key


def check_free_path(out: Path) -> None:
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise LorafitError(f"--out {out} already exists; choose a new path (a merge never overwrites a model)")


def bake_streamed(
    layout: BaseLayout, patches: Patches, out: Path, save_dtype: torch.dtype | None, metadata: dict
) -> Path:
    """Same layout in and out: a directory copied with its weight files patched, or a single file patched."""
    check_free_path(out)
    weights = ModelWeights(layout.source, layout)
    try:
        targets = _targets(weights, patches)  # every module located before anything is written
        if layout.single_file:
            files = weights.tensor_files("")
            plan = _file_plan(files, targets.get("", {}), save_dtype)
            merged_meta = {**files.metadata(), **metadata}
            return write_with_progress(out, plan, merged_meta)
        return _bake_directory(local_directory(layout.source), out, targets, save_dtype)
    finally:
        weights.close()


def write_with_progress(path: Path, plan: dict, metadata: dict | None, bar=None) -> Path:
    """:func:`write_streamed` with a progress bar over tensors (``bar``: an iterator to advance, shared
    by several files; else one for this file)."""
    if bar is None:
        bar = iter(progress(range(len(plan)), f"merge -> {path.name}", total=len(plan), unit="tensor"))
    return write_streamed(path, plan, metadata, on_tensor=lambda key: next(bar, None))


def _bake_directory(root: Path, out: Path, targets: dict, save_dtype) -> Path:
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    files_to_copy = pipeline_files(root)
    weights = [p for p in files_to_copy if p.suffix == ".safetensors"]
    for component in targets:
        if component:
            weight_files(root / component)  # a component with .bin weights only: one line, before any writing
    count = 0
    for path in weights:
        files = TensorFiles([path])
        count += len(files.keys())
        files.close()
    bar = iter(progress(range(count), f"merge -> {out.name}", total=count, unit="tensor"))
    try:
        for path in files_to_copy:
            relative = path.relative_to(root)
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            component = relative.parts[0] if len(relative.parts) > 1 else ""
            if path.suffix == ".safetensors":
                files = TensorFiles([path])
                try:
                    found = {k: v for k, v in targets.get(component, {}).items() if k in files}
                    write_with_progress(target, _file_plan(files, found, save_dtype), files.metadata(), bar)
                finally:
                    files.close()
            elif path.name == "config.json" and save_dtype is not None:
                _write_config(path, target, save_dtype)
            else:
                shutil.copy2(path, target)  # copies a hub cache symlink's file, not the link
        _fix_indexes(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_config(source: Path, target: Path, dtype: torch.dtype) -> None:
    """A transformers config names its weights' dtype (``torch_dtype``/``dtype``): keep it true."""
    config = json.loads(source.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fix_indexes(folder: Path) -> None:
    """Sharded weights: the index's ``total_size`` is the new shards' size (the dtype may have changed)."""
    for index in folder.rglob("*.safetensors.index*.json"):
        data = json.loads(index.read_text())
        shards = set(data.get("weight_map", {}).values())
        total = 0
        for shard in shards:
            files = TensorFiles([index.parent / shard])
            total += sum(files.nbytes(key) for key in files.keys())
            files.close()
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
