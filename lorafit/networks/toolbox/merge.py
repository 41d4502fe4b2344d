"""``lorafit merge``: several LoRAs into one LoRA, or LoRAs into the base model.

    lorafit merge style.safetensors:0.7 subject.safetensors --out both.safetensors            # exact concat
    lorafit merge style.safetensors:0.7 subject.safetensors --rank 32 --out both-r32.safetensors   # SVD
    lorafit merge style.safetensors:0.8 --into sd_xl_base_1.0.safetensors --out merged.safetensors
    lorafit merge style.safetensors:0.8 --into stabilityai/stable-diffusion-xl-base-1.0 --out merged-dir

Each LoRA is ``PATH[:STRENGTH]`` as in ``generate``'s ``--lora`` (strength 1 when absent, negative
to subtract). The LoRA+LoRA maths is in :mod:`~lorafit.networks.toolbox.merge_networks`, merging
into a base in :mod:`~lorafit.networks.toolbox.bake` (same layout in and out, streamed) and
:mod:`~lorafit.networks.toolbox.bake_relayout` (directory <-> single file).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal

from lorafit.errors import LorafitError
from lorafit.networks.embedding_files import bundled_embeddings
from lorafit.networks.files import read_lora_file
from lorafit.networks.toolbox.bake import Contribution, Patches, bake_streamed
from lorafit.networks.toolbox.bake_relayout import bake_relayout
from lorafit.networks.toolbox.base_layout import BaseLayout, base_layout
from lorafit.networks.toolbox.low_rank import RankRule
from lorafit.networks.toolbox.merge_networks import merge_modules, merged_metadata
from lorafit.networks.toolbox.network_file import (
    DTYPES,
    Network,
    in_format,
    merged_embeddings,
    read_network,
    warn_embeddings_left_out,
    write_network,
)
from lorafit.networks.toolbox.report import summary_lines, write_report

log = logging.getLogger("lorafit.toolbox")


def split_spec(spec: str) -> tuple[str, float]:
    """``x.safetensors:0.8`` -> (path, 0.8); only a trailing number is a strength (``C:\\x`` stays a path)."""
    path, strength = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        with contextlib.suppress(ValueError):
            path, strength = head, float(tail)
    if not Path(path).expanduser().is_file():
        raise LorafitError(f"merge {spec}: LoRA file {path} does not exist")
    return str(Path(path).expanduser()), strength


def _patches(specs: list[tuple[str, float]], layout: BaseLayout, text_encoders: bool) -> Patches:
    patches: Patches = {}
    for path, strength in specs:
        weights, _, _ = read_lora_file(path, layout.table)
        for component, modules in weights.items():
            if not text_encoders and component != layout.spec.denoiser_component:
                log.info("%s: its %d %s modules are left out (--text_encoders false)", path, len(modules), component)
                continue
            for module, module_weights in modules.items():
                layout.weight_shape(component, module)  # a module the base lacks: one line, before any work
                patches.setdefault((component, module), []).append(Contribution(strength, module_weights))
    return patches


def _merge_into_base(specs, into, out, single_file_config, save_dtype, text_encoders) -> Path:
    layout = base_layout(into, single_file_config, key="--into")
    patches = _patches(specs, layout, text_encoders)
    for path, _ in specs:  # a model file has no place for embeddings: say so rather than drop them unseen
        warn_embeddings_left_out(bundled_embeddings(path), path, "a merged base model")
    if not patches:
        raise LorafitError("merge: the LoRAs have no module left to merge")
    out_path = Path(out)
    single_out = out_path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth")
    if single_out and out_path.suffix.lower() != ".safetensors":
        raise LorafitError(f"--out {out}: single files are written as .safetensors")
    dtype = DTYPES[save_dtype] if save_dtype else None
    merged_from = ", ".join([Path(into).name] + [f"{Path(p).stem}:{w:g}" for p, w in specs])
    metadata = {"modelspec.merged_from": merged_from} if single_out else {}
    if single_out == layout.single_file:
        path = bake_streamed(layout, patches, out_path, dtype, metadata)
    else:
        path = bake_relayout(layout, patches, out_path, dtype, metadata)
    kind = "single file" if single_out else "diffusers directory"
    components = sorted({c for c, _ in patches})
    print(f"wrote {path} ({kind}, {layout.spec.title}): {len(patches)} modules of {', '.join(components)} merged")
    return path


def merge(
    loras: str | list[str],
    *,
    out: str,
    into: str | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    format: Literal["kohya", "diffusers"] | None = None,
    base: str | None = None,
    single_file_config: str | None = None,
    save_dtype: Literal["float32", "float16", "bfloat16"] | None = None,
    device: str = "cpu",
    text_encoders: bool = True,
    report: str | None = None,
    verbose: bool = False,
) -> Path:
    """Merge LoRAs into one LoRA (concatenated exactly, or cut by SVD to a rank), or into a base model.

    Args:
        loras: LoRA files, each ``PATH[:STRENGTH]`` (strength 1 when absent; negative subtracts).
        out: The file to write: a LoRA ``.safetensors``; with ``--into``, a ``.safetensors`` single-file
            checkpoint (A1111, ComfyUI, Forge) or a folder (diffusers pipeline directory).
        into: Merge into this base model (diffusers directory, hub id or single file) instead of into one LoRA.
        rank: LoRA merge: cut the sum to this rank by SVD (with a dynamic rule: the most any module keeps);
            empty: concatenate (exact, the ranks add up).
        conv_rank: LoRA merge: the rank of convolutions with a kernel larger than 1x1; empty: ``rank``.
        sv_ratio: LoRA merge, dynamic rank: keep singular values within this factor of the largest.
        sv_fro: LoRA merge, dynamic rank: keep this share (0-1) of each module's Frobenius norm.
        sv_cumulative: LoRA merge, dynamic rank: keep this share (0-1) of the singular values' sum.
        format: LoRA merge: the output format; empty: the first file's (others are converted, which needs --base).
        base: LoRA merge: the base model, for its module names (files of different formats) and shapes (LoHa).
        single_file_config: For a single-file ``into``/``base``: a diffusers directory (or cached hub id)
            of the same architecture, whose configs name its modules.
        save_dtype: ``float32``, ``float16`` or ``bfloat16``; empty keeps the first LoRA's (``into``: the base's).
        device: Where dense SVDs run (LoHa/LoKr in an SVD merge): ``cpu`` or ``cuda``.
        text_encoders: ``--into``: merge the LoRAs' text-encoder modules too; ``false`` merges the denoiser
            only (a FLUX.1 single file holds just the transformer).
        report: LoRA merge by SVD: also write every module's kept energy to this ``.csv`` or ``.json`` file.
        verbose: Print every module's line of the SVD report, not only the per-block summary.
    """
    specs = [split_spec(s) for s in ([loras] if isinstance(loras, str) else loras)]
    if not specs:
        raise LorafitError("merge: name at least one LoRA file")
    if into is not None:
        if any(x is not None for x in (rank, conv_rank, sv_ratio, sv_fro, sv_cumulative, format)):
            raise LorafitError(
                "merge --into bakes the LoRAs into the base exactly; --rank/--sv_*/--format are for LoRA merges"
            )
        return _merge_into_base(specs, into, out, single_file_config, save_dtype, text_encoders)
    layout = base_layout(base, single_file_config) if base else None
    networks = [read_network(path, layout) for path, _ in specs]
    target = format or networks[0].format
    networks = [in_format(n, target) for n in networks]
    families = {n.family for n in networks}
    if len(families) > 1 and layout is None:
        raise LorafitError(f"merge: the files are for different model families ({', '.join(sorted(families))})")
    dynamic = any(x is not None for x in (rank, sv_ratio, sv_fro, sv_cumulative))
    rule = RankRule.from_options(rank, sv_ratio, sv_fro, sv_cumulative) if dynamic else None
    conv_rule = RankRule(conv_rank, rule.method, rule.value) if rule and conv_rank is not None else rule
    strengths = [w for _, w in specs]
    modules, rows = merge_modules(networks, strengths, rule, conv_rule, device)
    how = "concatenated" if rule is None else f"SVD, {rule.describe()}"
    comment = f"merged by lorafit ({how}) from " + ", ".join(f"{Path(p).name}:{w:g}" for p, w in specs)
    dtype = DTYPES[save_dtype] if save_dtype else networks[0].dtype()
    out_path = Path(out)
    if any(out_path.resolve() == Path(p).resolve() for p, _ in specs):
        raise LorafitError(f"--out {out} is one of the inputs; choose another path")
    embeddings = merged_embeddings(networks)
    first = Network(networks[0].source, target, modules, networks[0].metadata, networks[0].family, layout, embeddings)
    metadata = merged_metadata(networks, strengths, modules, out_path, comment) if target == "kohya" else None
    path = write_network(first, modules, out_path, dtype, comment, metadata)
    ranks = sorted({m.rank for m in modules.values()})
    span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(f"wrote {path} ({target}, {len(modules)} modules, {how}, rank {span})")
    if rows:
        print("\n".join(summary_lines(rows, verbose)))
        if report:
            print(f"per-module report: {write_report(rows, report)}")
    return path
