"""Write a ``.safetensors`` file one tensor at a time, each made only when its turn comes.

``safetensors.torch.save_file`` (0.8) turns every tensor into bytes before writing the first one,
so writing a merged SDXL (7 GB in fp16) needs its 7 GB once more as bytes, and a merge that reads
its input tensor by tensor would still end with the whole model in memory. The format is simple
(an 8-byte little-endian header length, a JSON header of dtype/shape/offsets, the raw data), so it
is written here: the header from the planned shapes and dtypes, then each tensor as it is made
and freed. Tensors are laid out in key order; readers (safetensors, diffusers, A1111, ComfyUI)
look tensors up by the header, whatever the order. Written to a temporary name and renamed, as
every lorafit file: a killed merge leaves no half file under the real name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.toolbox.model_files import SAFETENSORS_DTYPES

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: its shape and dtype now, its values from ``make()`` when written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def _header(plan: dict[str, Planned], metadata: dict[str, str] | None) -> bytes:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(plan):
        planned = plan[key]
        if planned.dtype not in _NAMES:
            raise LorafitError(f"tensor {key}: dtype {planned.dtype} cannot be written to .safetensors")
        header[key] = {
            "dtype": _NAMES[planned.dtype],
            "shape": list(planned.shape),
            "data_offsets": [offset, offset + planned.nbytes],
        }
        offset += planned.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def _raw(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_streamed(
    path: str | Path,
    plan: dict[str, Planned],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write ``plan`` to ``path``: header first, then each tensor made, written and dropped in turn.

    ``on_tensor(key)`` is called after each tensor (a progress bar). A made tensor whose shape or
    dtype differs from its plan stops the write (the header already promised them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as handle:
            handle.write(_header(plan, metadata))
            for key in sorted(plan):
                planned = plan[key]
                tensor = planned.make()
                if tuple(tensor.shape) != tuple(planned.shape) or tensor.dtype != planned.dtype:
                    raise LorafitError(
                        f"{path}: tensor {key} came out {tuple(tensor.shape)} {tensor.dtype}, planned "
                        f"{tuple(planned.shape)} {planned.dtype}"
                    )
                handle.write(_raw(tensor))
                del tensor
                if on_tensor is not None:
                    on_tensor(key)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def eager(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Planned:
    """A plan entry for a tensor already in memory, cast to ``dtype`` (floating tensors) when written."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return Planned(tuple(tensor.shape), target, lambda: tensor.detach().to(target))
