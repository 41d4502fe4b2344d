"""``lorafit convert``: a network file from kohya/LyCORIS format to diffusers format and back, exactly.

kohya names depend on the base model's module layout (SGM block numbers for SDXL), so a
conversion needs the base model's *configs*; its weights are never read. The modules are built
on the meta device, which costs no memory even for SDXL.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import model_skeleton
from lorafit.networks.diffusers_format import diffusers_can_hold
from lorafit.networks.files import DIFFUSERS_KINDS, read_lora_file, save_diffusers, save_kohya
from lorafit.networks.kohya_format import kohya_name_table
from lorafit.networks.lora_weights import network_kinds
from lorafit.networks.model_fit import fit_to_model

log = logging.getLogger("lorafit.convert")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(
    src: str,
    dst: str,
    base: str | None = None,
    to: Literal["kohya", "diffusers"] | None = None,
    save_dtype: Literal["float32", "float16", "bfloat16"] | None = None,
) -> Path:
    """Convert a network file between kohya/LyCORIS (A1111/ComfyUI) and diffusers/PEFT format.

    LoRA, LoCon and DoRA convert both ways; LoHa/LoKr exist only in kohya/LyCORIS format (``--to
    kohya`` rewrites them, e.g. to another ``--save_dtype``).

    Args:
        src: The LoRA ``.safetensors`` file to read (either format; detected from its keys).
        dst: The file to write.
        base: The base model the LoRA belongs to (diffusers directory, hub id or single file);
            only its configs are read, to name modules exactly. Empty means the base recorded in
            the file's ``ss_sd_model_name`` (lorafit and kohya write it).
        to: Target format; empty means the other one.
        save_dtype: dtype of the written tensors; empty keeps the source file's dtype.
    """
    if base is None:
        from lorafit.networks.files import read_safetensors

        base = read_safetensors(src)[1].get("ss_sd_model_name")
        if not base:
            raise LorafitError(f"convert: {src} does not record its base model; pass --base <model dir or hub id>")
    family, components = model_skeleton(base)
    weights, source_format, metadata = read_lora_file(src, kohya_name_table(family, components))
    # Shapes are checked against the base as load_lora checks them: a file for another model is refused
    # here, not rewritten into a file that fails (or silently misbehaves) wherever it is loaded next.
    weights = fit_to_model(weights, components, f"convert: {src}")
    target = to or ("diffusers" if source_format == "kohya" else "kohya")
    if target == "diffusers" and not network_kinds(weights) <= DIFFUSERS_KINDS:
        kinds = sorted(network_kinds(weights) - DIFFUSERS_KINDS)
        raise LorafitError(
            f"convert: {src} is a {'/'.join(kinds)} network, which diffusers has no format for; "
            "use --to kohya to rewrite it in kohya/LyCORIS format"
        )
    if target == "diffusers" and not diffusers_can_hold(weights):
        raise LorafitError(
            f"convert: {src} is DoRA normalised per input channel (A1111/OneTrainer/LyCORIS < 3.2 layout), which "
            "diffusers/PEFT cannot hold (PEFT's DoRA is per output channel); use --to kohya"
        )
    if Path(dst).resolve() == Path(src).resolve():
        raise LorafitError(f"convert: {dst} is the source file; choose another output path")
    if save_dtype:
        dtype = _DTYPES[save_dtype]
    else:
        first = next(m for modules in weights.values() for m in modules.values())
        dtype = next(iter(first.parts().values())).dtype
    from lorafit.networks.embedding_files import bundled_embeddings
    from lorafit.networks.toolbox.network_file import warn_embeddings_left_out

    bundle = bundled_embeddings(src)
    if target == "kohya":
        from lorafit.networks.metadata import modelspec_architecture

        prediction = "v_prediction" if metadata.get("ss_v_parameterization") == "True" else "epsilon"
        kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}
        kept.setdefault("modelspec.sai_model_spec", "1.0.0")
        kept.setdefault("modelspec.architecture", modelspec_architecture(family, prediction))
        # LyCORIS writes lycoris.kohya for its kinds; A1111/ComfyUI go by the keys, kohya by this.
        kinds = network_kinds(weights)
        kept.setdefault("ss_network_module", "networks.lora" if kinds <= {"lora"} else "lycoris.kohya")
        denoiser = next(components[c] for c in ("unet", "transformer") if c in components)
        path = save_kohya(dst, family, weights, denoiser.config, kept, dtype, extra=bundle)
    else:
        warn_embeddings_left_out(bundle, src, "a diffusers-format LoRA file")
        dropped = sorted(k for k in metadata if k.startswith("ss_"))
        if dropped:
            log.info("diffusers format has no place for %d kohya ss_* metadata keys (kept in %s)", len(dropped), src)
        path = save_diffusers(dst, family, weights, dtype)
    modules = sum(len(m) for m in weights.values())
    print(f"wrote {path} ({target}, {family}, {modules} modules, from {source_format})")
    return path
