"""Which block of the model a module of a network file sits in, for reports (``inspect``, kept energy).

Block names are A1111's LoRA Block Weight ones (lorafit/networks/block_weights.py), read off the
names in the file so no base model is needed: SGM names (SDXL kohya files) carry the block
(``input_blocks_4`` = ``IN04``); diffusers names (SD1/SD2 kohya files, diffusers files) map as the
original UNet numbers them: ``down_blocks.i.{attentions,resnets}.j`` = ``IN{3i+j+1}``,
``down_blocks.i.downsamplers`` = ``IN{3i+3}``, ``up_blocks.i.*.j`` = ``OUT{3i+j}``,
``up_blocks.i.upsamplers`` = ``OUT{3i+2}``, the middle block ``M00``. Flux: ``D00``... (double
blocks), ``S00``... (single blocks), ``IN``/``OUT`` for the embedders and the final layer. Text
encoders are ``TE`` (``TE1``/``TE2`` where there are two: CLIP-L, then bigG or T5).
"""

from __future__ import annotations

import re

_SGM = re.compile(r"(input_blocks|output_blocks)[._](\d+)[._]|middle_block[._]")
_DIFFUSERS_UNET = re.compile(
    r"(down_blocks|up_blocks)[._](\d+)[._](attentions|resnets|downsamplers|upsamplers)[._](\d+)"
)
_FLUX = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks|transformer_blocks)[._](\d+)[._]")
_FLUX_IN = (
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
)
_FLUX_OUT = ("final_layer", "norm_out", "proj_out")
_TEXT = {
    "lora_te_": "TE",
    "lora_te1_": "TE1",
    "lora_te2_": "TE2",
    "text_encoder.": "TE",
    "text_encoder_2.": "TE2",
}


def _unet_block(name: str) -> str | None:
    match = _SGM.search(name)
    if match:
        if match.group(1) is None:
            return "M00"
        return f"{'IN' if match.group(1) == 'input_blocks' else 'OUT'}{int(match.group(2)):02d}"
    match = _DIFFUSERS_UNET.search(name)
    if match:
        side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if side == "down_blocks":
            return f"IN{3 * i + 3:02d}" if kind == "downsamplers" else f"IN{3 * i + j + 1:02d}"
        return f"OUT{3 * i + 2:02d}" if kind == "upsamplers" else f"OUT{3 * i + j:02d}"
    if re.search(r"mid_block[._]", name):
        return "M00"
    return None


def block_of(name: str, family: str | None) -> str:
    """The block label of a module named ``name`` in a file of ``family`` (``other`` when in no block)."""
    for prefix, label in _TEXT.items():
        if name.startswith(prefix):
            return "TE1" if label == "TE" and family in ("sdxl", "flux") and prefix == "text_encoder." else label
    if family == "flux" or name.startswith(("transformer.", "lora_transformer_", "lycoris_")):
        match = _FLUX.search(name)
        if match:
            double = match.group(1) in ("double_blocks", "transformer_blocks")
            return f"{'D' if double else 'S'}{int(match.group(2)):02d}"
        stripped = re.sub(r"^(lora_unet_|lora_transformer_|lycoris_|transformer\.)", "", name)
        if stripped.startswith(_FLUX_IN):
            return "IN"
        if stripped.startswith(_FLUX_OUT):
            return "OUT"
        return "other"
    return _unet_block(name) or "other"


def block_order(label: str) -> tuple:
    """Sort key: text encoders, IN, middle / double, single blocks, OUT, then ``other``."""
    for rank, prefix in enumerate(("TE", "IN", "M", "D", "S", "OUT")):
        if label.startswith(prefix):
            return (rank, label)
    return (9, label)
