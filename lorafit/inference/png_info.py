"""Generation parameters written into PNGs the way AUTOMATIC1111 writes them.

A1111 stores one ``tEXt`` chunk named ``parameters``::

    a photo of ohwx dog <lora:ohwx-epoch-003:0.8>
    Negative prompt: blurry
    Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model: sdxl-base, ...

so A1111's "PNG Info" tab, ComfyUI and civitai read lorafit images like their own, and a user can
reproduce one by pasting it back. LoRAs appear as A1111 prompt tags plus ``Lora hashes`` (first 12
hex digits of the file's SHA-256, A1111's short hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lorafit.inference.prompts import SamplePrompt
from lorafit.inference.samplers import display_name


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA file applied at a strength (and block weights), as recorded in the PNG."""

    path: str
    strength: float
    block_weights: str | None = None  # A1111 LoRA Block Weight spec, written as ``lbw=...``

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def tag(self) -> str:
        """A1111's prompt tag: ``<lora:name:0.8>``, with ``:lbw=...`` when block weights are set."""
        blocks = f":lbw={self.block_weights}" if self.block_weights else ""
        return f"<lora:{self.name}:{_number(self.strength)}{blocks}>"


def short_hash(path: str | Path, digits: int = 12) -> str:
    """First ``digits`` hex digits of the file's SHA-256 (A1111's short hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


def _number(value: float) -> str:
    return f"{value:g}"


def a1111_parameters(
    request: SamplePrompt,
    model: str = "",
    loras: Sequence[AppliedLora] = (),
    hires_scale: float = 1.0,
    hires_denoise: float | None = None,
    hires_steps: int | None = None,
    extra: dict | None = None,
) -> str:
    """The ``parameters`` text for ``request`` (fields filled in) with the LoRAs and hires settings."""
    prompt = request.prompt + "".join(f" {lora.tag}" for lora in loras)
    lines = [prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = {
        "Steps": request.steps,
        "Sampler": display_name(request.sampler),
        "CFG scale": _number(request.cfg),
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
    }
    if model:
        fields["Model"] = Path(model.rstrip("/")).stem if Path(model).exists() else model
        if Path(model).is_file():
            fields["Model hash"] = short_hash(model, 10)
    if hires_scale != 1.0:
        fields["Denoising strength"] = _number(hires_denoise)
        fields["Hires upscale"] = _number(hires_scale)
        fields["Hires steps"] = hires_steps or 0  # A1111: 0 = as many as the first pass
        fields["Hires upscaler"] = "Lanczos"
    hashed = [lora for lora in loras if Path(lora.path).is_file()]  # a sample's file may not be written yet
    if hashed:
        fields["Lora hashes"] = '"' + ", ".join(f"{lora.name}: {short_hash(lora.path)}" for lora in hashed) + '"'
    fields.update(extra or {})
    from lorafit import __version__

    fields["Version"] = f"lorafit {__version__}"
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write ``image`` as PNG with an A1111 ``parameters`` text chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)
    return path
