"""``lorafit resize``: a network file cut to a lower rank by SVD, module by module, with what each kept.

kohya's ``networks/resize_lora.py`` is the reference for the options: ``--rank`` (its
``new_rank``), ``--conv_rank`` (``new_conv_rank``, for convolutions with a kernel larger than 1x1;
default: ``--rank``), and the dynamic rules ``--sv_ratio``/``--sv_fro``/``--sv_cumulative`` with
``--rank`` as their cap (:mod:`~lorafit.networks.toolbox.low_rank` has their exact meanings).
As kohya does, each module keeps its scale ``alpha / rank``: the new alpha is ``scale x new rank``,
so the file means the same at the same strength, and a cut to the full rank changes nothing.

The output keeps the input's format and names (kohya SGM/BFL stems, or diffusers keys), so it
loads wherever the input did; no base model is read. LoRA and LoCon are cut exactly from their
factors (no dense matrix); DoRA keeps its magnitudes and cuts its low-rank direction update; LoHa
and LoKr become LoRA through their dense update (that needs the module's shape, which for LoHa
only the base model tells: ``--base``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraModuleWeights, ModuleWeights
from lorafit.networks.toolbox.base_layout import base_layout
from lorafit.networks.toolbox.low_rank import (
    RankRule,
    as_matrix,
    kept,
    lora_shapes,
    numerical_rank,
    svd_of_matrix,
    svd_of_product,
)
from lorafit.networks.toolbox.network_file import Network, read_network, save_dtype_of, write_network
from lorafit.networks.toolbox.progress import progress
from lorafit.networks.toolbox.report import ModuleRow, row, summary_lines, write_report

log = logging.getLogger("lorafit.toolbox")


def is_spatial(shape: torch.Size) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def cut_module(
    network: Network, name: str, module: ModuleWeights, rule: RankRule, device: str = "cpu"
) -> tuple[LoraModuleWeights, ModuleRow]:
    """One module at the rank ``rule`` gives it, and its report line."""
    shape = network.weight_shape(name, module)
    if isinstance(module, LoraModuleWeights):
        scale = module.alpha / module.rank
        svd = svd_of_product(module.up.flatten(1), module.down.flatten(1))
        rank_before = module.rank
    else:  # LoHa / LoKr: their whole update (scale included) as one matrix
        scale = 1.0
        svd = svd_of_matrix(as_matrix(module.delta_weight().reshape(shape)), device)
        rank_before = numerical_rank(svd.s)  # its numerical rank
    rank = rule.choose(svd.s, cap=max(1, rank_before))  # no more directions than the update has
    up, down = lora_shapes(*svd.factors(rank), shape)
    dora = module.dora_scale if isinstance(module, LoraModuleWeights) else None
    result = LoraModuleWeights(down, up, scale * rank, dora)
    return result, row(name, network.family, module.kind, kept(svd.s, rank, rank_before))


def resize_modules(
    network: Network, rule: RankRule, conv_rule: RankRule, device: str = "cpu"
) -> tuple[dict[str, LoraModuleWeights], list[ModuleRow]]:
    modules, rows = {}, []
    for name, module in progress(network.modules.items(), "resize", total=len(network.modules)):
        chosen = conv_rule if is_spatial(network.weight_shape(name, module)) else rule
        modules[name], line = cut_module(network, name, module, chosen, device)
        rows.append(line)
    return modules, rows


def default_output(source: str, rule: RankRule) -> Path:
    path = Path(source)
    tag = f"rank{rule.rank}" if rule.method == "fixed" else f"{rule.method}{rule.value:g}"
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def resize(
    file: str,
    out: str | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    base: str | None = None,
    single_file_config: str | None = None,
    save_dtype: str | None = None,
    device: str = "cpu",
    report: str | None = None,
    verbose: bool = False,
) -> Path:
    """Cut a LoRA/LoCon/DoRA (LoHa/LoKr: via their dense update) to a lower rank, kohya's resize_lora.

    Args:
        file: The network file (kohya/LyCORIS or diffusers format; the output keeps it).
        out: The file to write; empty: ``<file>-rank<N>.safetensors`` beside the input.
        rank: The new rank; with a dynamic rule, the most any module keeps.
        conv_rank: The new rank of convolutions with a kernel larger than 1x1 (LoCon); empty: ``rank``.
        sv_ratio: Dynamic: keep singular values within this factor of the largest (kohya's sv_ratio).
        sv_fro: Dynamic: keep the fewest directions holding this share of the Frobenius norm (0-1).
        sv_cumulative: Dynamic: keep the fewest directions holding this share of the singular values' sum.
        base: The base model (directory, hub id or single file; configs only), needed for LoHa modules.
        single_file_config: For a single-file ``base``: a diffusers directory of the same architecture.
        save_dtype: ``float32``, ``float16`` or ``bfloat16``; empty keeps the input's dtype.
        device: Where dense SVDs run (LoHa/LoKr): ``cpu`` or ``cuda``.
        report: Also write every module's kept energy to this ``.csv`` or ``.json`` file.
        verbose: Print every module's line, not only the per-block summary.
    """
    rule = RankRule.from_options(rank, sv_ratio, sv_fro, sv_cumulative)
    conv_rule = RankRule(conv_rank, rule.method, rule.value) if conv_rank is not None else rule
    if rule.method == "fixed" and rank is None:
        raise LorafitError("resize: give --rank N or a dynamic rule")
    layout = base_layout(base, single_file_config) if base else None
    network = read_network(file, layout)
    dtype = save_dtype_of(save_dtype, network)
    out_path = Path(out) if out else default_output(file, rule)
    modules, rows = resize_modules(network, rule, conv_rule, device)
    before = sorted({r.kept.rank_before for r in rows})
    comment = f"resized by lorafit from rank {'/'.join(map(str, before))} to {rule.describe()}"
    path = write_network(network, modules, out_path, dtype, comment)
    print(f"wrote {path} ({network.format}, {len(modules)} modules, {rule.describe()})")
    print("\n".join(summary_lines(rows, verbose)))
    if report:
        print(f"per-module report: {write_report(rows, report)}")
    changed = sorted({m.kind for m in network.modules.values()} - {"lora", "dora"})
    if changed:
        log.info("%s modules were written as LoRA (their dense update cut by SVD)", "/".join(changed))
    return path
