"""After ``from_single_file``: every weight of the pipeline came from the file, or the load stops in one line.

diffusers builds a single file's models empty (on the meta device) from their configs and fills in
what the file holds; a tensor the file lacks stays empty without a word, and the run fails much
later with "Tensor on device meta is not on the expected device". One case is normal and handled
as A1111 and ComfyUI handle it:

**SD2 files without the last OpenCLIP block.** SD2 conditions on the penultimate layer of its
24-layer OpenCLIP ViT-H text encoder. A1111 (``FrozenOpenCLIPEmbedder``, ``layer="penultimate"``)
stops before the last block and ComfyUI (``sd2_clip.py``, ``layer_idx=-2``) reads the penultimate
hidden state, so neither ever uses ``cond_stage_model.model.transformer.resblocks.23`` and both load
files without it (``load_state_dict(strict=False)``). diffusers keeps 23 layers for SD2 and drops
that block by name, which gives the same conditioning. When the text-encoder config still counts
the last block (24 layers, e.g. a diffusers folder converted with it), the layers at the end that
the file has no weights for are dropped here: the encoder's last hidden state is then the
penultimate one, SD2's conditioning, exactly as A1111 and ComfyUI compute it (same final layer
norm). Other families read their text encoders' last layer (SD1; SDXL's pooled output), so a
missing layer there is a broken file, refused like any other gap.
"""

from __future__ import annotations

import logging
import re

import torch

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.models")

_LAYER = re.compile(r"^(?P<stack>.*\blayers)\.(?P<index>\d+)\.")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def unloaded_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` still on the meta device (never filled in)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in named if tensor.is_meta]


def drop_unread_final_layers(encoder: torch.nn.Module, unloaded: list[str]) -> int:
    """Remove the trailing encoder layers that hold every unloaded tensor; the number removed (0: not that case).

    Only whole layers at the end of the layer stack count; anything else unloaded leaves the
    encoder as it is (0 is returned).
    """
    matches = [_LAYER.match(name) for name in unloaded]
    if not unloaded or not all(matches) or len({m.group("stack") for m in matches}) != 1:
        return 0
    stack_name = matches[0].group("stack")
    layers = encoder.get_submodule(stack_name)
    first = min(int(m.group("index")) for m in matches)
    trailing = {
        f"{stack_name}.{index}.{name}"
        for index in range(first, len(layers))
        for name, _ in layers[index].named_parameters()
    }
    if first == 0 or not trailing <= set(unloaded):  # a gap inside the stack, or a layer only partly missing
        return 0
    removed = len(layers) - first
    del layers[first:]
    encoder.config.num_hidden_layers = first
    return removed


def settle_single_file_weights(pipe, family: str, source: str) -> None:
    """Check that ``pipe`` (loaded by ``from_single_file``) holds a weight for every tensor.

    Args:
        pipe: The loaded pipeline.
        family: The detected family (``sd1``, ``sd2``, ``sdxl``): SD2's unread last text layer is allowed.
        source: The file, named in messages.

    Raises:
        LorafitError: When the file lacks weights the model uses.
    """
    for part_name in PARTS:
        part = getattr(pipe, part_name, None)
        if part is None:
            continue
        unloaded = unloaded_tensors(part)
        if not unloaded:
            continue
        if family == "sd2" and part_name == "text_encoder":
            removed = drop_unread_final_layers(part, unloaded)
            if removed:
                log.info(
                    "%s has no weights for the text encoder's last %d layer(s); SD2 conditions on the penultimate "
                    "layer (as A1111 and ComfyUI do), so the encoder keeps its first %d",
                    source,
                    removed,
                    part.config.num_hidden_layers,
                )
                continue
        raise LorafitError(
            f"model.model: {source} has no weights for {len(unloaded)} tensor(s) of the {part_name} "
            f"(e.g. {unloaded[0]}); the file is incomplete or of another architecture than its config "
            "(model.single_file_config)"
        )
