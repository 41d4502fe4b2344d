"""Block-weight strength: a LoRA's strength per model block, as A1111's LoRA Block Weight ("LBW") sets it.

    load_lora(pipe, "x.safetensors", weight=0.8, block_weights="INALL")   # an LBW preset
    set_block_weights(pipe, "x", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")    # an LBW vector (17 values)
    set_block_weights(pipe, "x", "IN=1,MID=0.5,OUT=0")                    # named blocks; the rest keep 1

Every module's strength is the LoRA's strength times its block's value, set as that layer's PEFT
adapter scale (lorafit/networks/loading.py): no weight is rewritten, a value can change between
images. Block names are the ones of the sd-webui-lora-block-weight extension (its
``scripts/lora_block_weight.py``: ``BLOCKID26``, ``BLOCKID17``, ``BLOCKID12``, ``BLOCKID20``,
``BLOCKIDFLUX``), found by the same rule: ``BASE`` is the text encoder(s), ``INnn`` / ``M00`` /
``OUTnn`` the original UNet's ``input_blocks.nn`` / ``middle_block`` / ``output_blocks.nn`` (diffusers
names are translated with lorafit/families/original_layout.py); for Flux ``CLIP``, ``T5``, ``IN``
(the input embedders), ``D00``-``D18`` (double blocks), ``S00``-``S37`` (single blocks), ``OUT``.
A module in no block (time embedding, ``conv_out``) keeps the LoRA's strength, as in the extension.

A spec is one of:

- a preset of the extension (SD1/SD2): ``NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL ALL0.5``, the
  same 17 values;
- a vector in one of the extension's formats of the family: SD1/SD2 17 values (LoRA blocks:
  ``BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,OUT03..OUT11``) or 26 (every block, LyCORIS), SDXL 12
  (``BASE,IN04,IN05,IN07,IN08,M00,OUT00..OUT05``) or 20 (every block), Flux 61. As in the
  extension, blocks a vector does not list get 0;
- named blocks, ``BLOCK=value`` pairs: an id (``IN04``, ``MID``), a group (``BASE IN MID OUT ALL``;
  Flux ``CLIP T5 IN D S OUT ALL``) or a range in block order (``IN04-OUT03``, ``D00-D09``). Blocks
  not named keep 1; a later pair wins over an earlier one. This is the form for any family.

Stricter than the extension, on purpose: it takes every vector length for every model and maps
it by block names, so a 17-value preset on SDXL weights ``OUT00``-``OUT02`` (SDXL's deepest
attention) 0 even for ``ALL``. Here a vector must be one of the family's formats, and presets are
SD1/SD2's; on SDXL name the blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafit.errors import LorafitError


def _ids(prefix: str, count: int, start: int = 0) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(start, start + count))


_SD_BLOCKS = ("BASE", *_ids("IN", 12), "M00", *_ids("OUT", 12))
_SD_LORA = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", 9, start=3))
_XL_BLOCKS = ("BASE", *_ids("IN", 9), "M00", *_ids("OUT", 9))
_XL_LORA = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", 6))
_FLUX_BLOCKS = ("CLIP", "T5", "IN", *_ids("D", 19), *_ids("S", 38), "OUT")

# The extension's default presets (DEF_WEIGHT_PRESET), in its 17-value SD1 LoRA format.
SD_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}

_ORIGINAL_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.|^middle_block\.")


def _unet_block(component: str, module: str, config: Any) -> str | None:
    if component != "unet":
        return "BASE"  # text encoders, as the extension's "encoder"/"embedders"/"transformer_resblocks"
    from lorafit.families.original_layout import unet_module_to_original

    try:
        original = unet_module_to_original(module, config)
    except LorafitError:
        return None
    match = _ORIGINAL_BLOCK.match(original)
    if match is None:
        return None  # time_embed, label_emb, out: no block, the LoRA's strength
    if match.group(1) is None:
        return "M00"
    return f"{'IN' if match.group(1) == 'input_blocks' else 'OUT'}{int(match.group(2)):02d}"


_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_FLUX_IN = ("x_embedder", "context_embedder", "time_text_embed")  # BFL: img_in, txt_in, time/vector/guidance_in
_FLUX_OUT = ("norm_out", "proj_out")  # BFL: final_layer


def _flux_block(component: str, module: str, config: Any) -> str | None:
    """diffusers ``FluxTransformer2DModel`` module paths in the extension's Flux blocks."""
    if component in ("text_encoder", "text_encoder_2"):
        return "CLIP" if component == "text_encoder" else "T5"
    match = _FLUX_BLOCK.match(module)
    if match:
        return f"{'D' if match.group(1) == 'transformer_blocks' else 'S'}{int(match.group(2)):02d}"
    if module.startswith(_FLUX_IN):
        return "IN"
    return "OUT" if module.startswith(_FLUX_OUT) else None


@dataclass(frozen=True)
class BlockLayout:
    """How one family's modules fall into blocks, and the block-weight formats it takes.

    Attributes:
        blocks: Every block, in the order ranges (``IN04-OUT03``) follow.
        vectors: Accepted vector lengths -> the blocks their values name, in order.
        groups: Names that stand for several blocks (``IN``, ``OUT``; Flux ``D``, ``S``).
        presets: Preset name -> vector text.
        block_of: ``(component, module path, component config) -> block`` (None: in no block).
    """

    blocks: tuple[str, ...]
    vectors: dict[int, tuple[str, ...]]
    groups: dict[str, tuple[str, ...]]
    presets: dict[str, str]
    block_of: Callable[[str, str, Any], str | None]


def _unet_layout(blocks: tuple[str, ...], lora: tuple[str, ...], presets: dict[str, str]) -> BlockLayout:
    groups = {
        "BASE": ("BASE",),
        "IN": tuple(b for b in blocks if b.startswith("IN")),
        "MID": ("M00",),
        "OUT": tuple(b for b in blocks if b.startswith("OUT")),
    }
    return BlockLayout(blocks, {len(lora): lora, len(blocks): blocks}, groups, presets, _unet_block)


LAYOUTS: dict[str, BlockLayout] = {
    "sd1": _unet_layout(_SD_BLOCKS, _SD_LORA, SD_PRESETS),
    "sd2": _unet_layout(_SD_BLOCKS, _SD_LORA, SD_PRESETS),
    "sdxl": _unet_layout(_XL_BLOCKS, _XL_LORA, {}),
    "flux": BlockLayout(
        _FLUX_BLOCKS,
        {len(_FLUX_BLOCKS): _FLUX_BLOCKS},
        {
            **{name: (name,) for name in ("CLIP", "T5", "IN", "OUT")},
            "D": tuple(b for b in _FLUX_BLOCKS if re.fullmatch(r"D\d\d", b)),
            "S": tuple(b for b in _FLUX_BLOCKS if re.fullmatch(r"S\d\d", b)),
        },
        {},
        _flux_block,
    ),
}


def block_layout(family: str) -> BlockLayout:
    if family not in LAYOUTS:
        raise LorafitError(f"block weights: no block layout for {family} models (known: {', '.join(LAYOUTS)})")
    return LAYOUTS[family]


@dataclass(frozen=True)
class BlockWeights:
    """A parsed spec: the value of every block of one family (see the module docstring).

    Attributes:
        spec: The spec as given (for messages and PNG text).
        family: The family it was parsed for.
        values: Block -> value, for every block of the family.
    """

    spec: str
    family: str
    values: dict[str, float]

    def factor(self, component: str, module: str, config: Any = None) -> float:
        """The multiplier of one module's strength (1 for modules in no block)."""
        block = block_layout(self.family).block_of(component, module, config)
        return 1.0 if block is None else self.values[block]

    def a1111(self) -> str:
        """The ``lbw=`` value A1111's extension reads: the preset name, else every block's value in order."""
        layout = block_layout(self.family)
        if self.spec in layout.presets:
            return self.spec
        return ",".join(f"{self.values[b]:g}" for b in layout.blocks)


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LorafitError(f"{where}: {text!r} is not a number") from None


def _named_blocks(name: str, layout: BlockLayout, where: str) -> tuple[str, ...]:
    name = name.strip().upper()
    if name == "ALL":
        return layout.blocks
    if name in layout.groups:
        return layout.groups[name]
    if name in layout.blocks:
        return (name,)
    first, dash, last = name.partition("-")
    if dash:
        ends = ["M00" if end == "MID" else end for end in (first, last)]
        if all(end in layout.blocks for end in ends):
            low, high = sorted(layout.blocks.index(end) for end in ends)
            return layout.blocks[low : high + 1]
    groups = " ".join([*layout.groups, "ALL"])
    raise LorafitError(
        f"{where}: no block {name!r}; use a block ({layout.blocks[0]}, {layout.blocks[len(layout.blocks) // 2]}, "
        f"...), a group ({groups}) or a range ({layout.blocks[1]}-{layout.blocks[-1]})"
    )


def parse_block_weights(spec: str, family: str, where: str = "block weights") -> BlockWeights:
    """Parse ``spec`` (a preset, a vector or ``BLOCK=value`` pairs) for a ``family`` model."""
    layout = block_layout(family)
    text = spec.strip()
    where = f"{where} {text!r}"
    if "=" in text:
        values = dict.fromkeys(layout.blocks, 1.0)
        for pair in filter(None, (p.strip() for p in text.split(","))):
            name, equals, value = pair.partition("=")
            if not equals:
                raise LorafitError(f"{where}: {pair!r} is not BLOCK=value (mix no vector values with named blocks)")
            number = _number(value.strip(), where)
            values.update(dict.fromkeys(_named_blocks(name, layout, where), number))
        return BlockWeights(spec, family, values)
    if text in layout.presets:
        text = layout.presets[text]
    elif re.fullmatch(r"[A-Za-z][\w.]*", text):
        known = ", ".join(layout.presets) or "none for this family"
        raise LorafitError(f"{where}: no such preset for {family} (presets: {known}); or name blocks, IN=1,OUT=0")
    numbers = [_number(part.strip(), where) for part in text.split(",")]
    if len(numbers) not in layout.vectors:
        formats = " or ".join(f"{n} ({','.join(layout.vectors[n][:3])},...)" for n in sorted(layout.vectors))
        raise LorafitError(
            f"{where}: {len(numbers)} values; {family} vectors have {formats}, or name blocks: IN=1,OUT=0"
        )
    values = dict.fromkeys(layout.blocks, 0.0)  # the extension: blocks a vector does not list get 0
    values.update(zip(layout.vectors[len(numbers)], numbers))
    return BlockWeights(spec, family, values)


def check_block_weights(spec: str, where: str = "block weights") -> None:
    """Fail fast, before a model loads, on a spec no family could read."""
    errors = []
    for family in LAYOUTS:
        try:
            parse_block_weights(spec, family, where)
            return
        except LorafitError as error:
            errors.append(error)
    raise errors[0]
