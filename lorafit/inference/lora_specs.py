"""``--lora`` values, spelled the same in every verb: ``PATH[:STRENGTH][:lbw=BLOCKS]``.

``generate`` takes each file with its own strength and block weights, as A1111's prompt tag
``<lora:name:0.8:lbw=INALL>`` does; ``grid`` takes run folders or files for its epoch axis and puts
strengths and block weights on axes of their own (``--strength``, ``--lbw``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.inference.png_info import AppliedLora
from lorafit.networks.block_weights import check_block_weights

_LBW = ":lbw="


def split_lora_spec(spec: str) -> tuple[str, float | None, str | None]:
    """``x.safetensors:0.8:lbw=INALL`` -> (path, 0.8, "INALL"); absent parts are None.

    Only a trailing ``:<number>`` is a strength, so ``C:\\loras\\x.safetensors`` stays a path.
    """
    path, blocks = spec, None
    if _LBW in spec:
        path, _, blocks = spec.rpartition(_LBW)
    strength = None
    head, sep, tail = path.rpartition(":")
    if sep and head:
        with contextlib.suppress(ValueError):
            path, strength = head, float(tail)
    return path, strength, blocks


def parse_lora_spec(spec: str, key: str = "--lora") -> AppliedLora:
    """A file to apply at a strength (1 when none is given), with optional block weights (checked here)."""
    path, strength, blocks = split_lora_spec(spec)
    if not Path(path).expanduser().is_file():
        raise LorafitError(f"{key} {spec}: LoRA file {path} does not exist")
    if blocks is not None:
        check_block_weights(blocks, f"{key} {spec}: lbw")
    return AppliedLora(str(Path(path).expanduser()), 1.0 if strength is None else strength, blocks)
