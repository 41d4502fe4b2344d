"""``lorafit extract --base A --tuned B --rank N``: a LoRA (LoCon with ``--conv_rank``) of ``B - A`` by SVD.

kohya's ``networks/extract_lora_from_models.py`` is the reference: the same modules (its LoRA
targets: attention and MLP of the transformer blocks, ``--preset attn-mlp``; ResNet convolutions
once ``--conv_rank`` is given; the text encoders' attention and MLP unless they are the same in
both models within ``--min_diff``), ``dim``/``conv_dim`` as ``--rank``/``--conv_rank``, alpha =
rank. Differences from it: no clamping of the factors to a quantile (it moves the result away from
the best rank-``k`` fit), the dynamic rank rules of ``resize`` also work here, modules the tune
left unchanged are left out instead of written as zeros, and each module's error is reported.

Both models are read one module at a time (:mod:`~lorafit.networks.toolbox.model_files`), from
diffusers directories, hub ids or single files, in any mix. kohya-format Flux files get one LoRA
per BFL module (fused ``qkv``/``linear1``, as kohya's ``flux_extract_lora.py``); diffusers-format
files one per diffusers module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import resolve_model_source
from lorafit.networks.adapters import DEFAULT_TEXT_ENCODER_TARGETS
from lorafit.networks.lora_weights import LoraModuleWeights
from lorafit.networks.presets import select_modules
from lorafit.networks.toolbox.base_layout import BaseLayout, base_layout
from lorafit.networks.toolbox.extract_metadata import extract_metadata
from lorafit.networks.toolbox.low_rank import RankRule, as_matrix, kept, lora_shapes, numerical_rank, svd_of_matrix
from lorafit.networks.toolbox.model_files import ModelWeights
from lorafit.networks.toolbox.network_file import DTYPES, Network, write_network
from lorafit.networks.toolbox.progress import progress
from lorafit.networks.toolbox.report import ModuleRow, row, summary_lines, write_report
from lorafit.networks.toolbox.resize import is_spatial

log = logging.getLogger("lorafit.toolbox")


@dataclass(frozen=True)
class Unit:
    """One module of the output file: its name there and the (component, module) weights it covers,
    stacked by rows (several for a fused Flux module; ``swap`` for BFL's swapped final modulation)."""

    name: str
    component: str
    parts: tuple[str, ...]
    swap: bool = False


def _selected(layout: BaseLayout, preset: str, conv_rank: int | None) -> dict[str, set[str]]:
    spec = layout.spec
    denoiser = layout.components[spec.denoiser_component]
    chosen = {spec.denoiser_component: set(spec.preset_modules(denoiser, preset, conv_rank is not None))}
    for component in spec.trainable_text_encoders:
        if component in layout.components:
            chosen[component] = set(select_modules(layout.components[component], DEFAULT_TEXT_ENCODER_TARGETS))
    if conv_rank is None:  # kohya extracts 3x3 convolutions only with conv_dim
        for component, names in chosen.items():
            dropped = {n for n in names if is_spatial(layout.weight_shape(component, n))}
            names -= dropped
    return chosen


def units(layout: BaseLayout, chosen: dict[str, set[str]], file_format: str) -> list[Unit]:
    """The output's modules: kohya stems (Flux: BFL modules, fused) or ``component.module`` names."""
    spec = layout.spec
    found = []
    for component, names in chosen.items():
        kohya_layout = spec.kohya_layout(layout.denoiser_config) if component == spec.denoiser_component else None
        if file_format == "kohya" and kohya_layout is not None:
            for stem, module in kohya_layout.items():
                parts = tuple(name for name, _ in module.parts)
                if any(p in names for p in parts):  # the fused module is extracted whole
                    found.append(Unit(stem, component, parts, module.swap_halves))
            continue
        for name in sorted(names):
            label = (
                spec.kohya_stem(component, name, layout.denoiser_config)
                if file_format == "kohya"
                else f"{component}.{name}"
            )
            found.append(Unit(label, component, (name,)))
    return found


def _delta(unit: Unit, base: ModelWeights, tuned: ModelWeights) -> torch.Tensor:
    pieces = []
    for part in unit.parts:
        before, after = base.weight(unit.component, part), tuned.weight(unit.component, part)
        if before.shape != after.shape:
            raise LorafitError(
                f"{unit.component}.{part} is {tuple(before.shape)} in --base but {tuple(after.shape)} in --tuned: "
                "models of different architectures"
            )
        pieces.append(after.float() - before.float())
    delta = torch.cat(pieces)
    if unit.swap:
        half = delta.shape[0] // 2
        delta = torch.cat([delta[half:], delta[:half]])
    return delta


def extract_units(
    todo: list[Unit], base: ModelWeights, tuned: ModelWeights, rule: RankRule, conv_rule: RankRule, device: str
) -> tuple[dict[str, LoraModuleWeights], list[ModuleRow], dict[str, float]]:
    """Each unit's LoRA, its report line, and the largest weight change per component."""
    modules, rows, largest = {}, [], {}
    for unit in progress(todo, "extract", total=len(todo)):
        delta = _delta(unit, base, tuned)
        change = float(delta.abs().max()) if delta.numel() else 0.0
        largest[unit.component] = max(largest.get(unit.component, 0.0), change)
        if change == 0.0:
            continue  # the tune left this module alone
        svd = svd_of_matrix(as_matrix(delta), device)
        rank_before = numerical_rank(svd.s)
        rank = (conv_rule if is_spatial(delta.shape) else rule).choose(svd.s, cap=rank_before)
        up, down = lora_shapes(*svd.factors(rank), delta.shape)
        modules[unit.name] = LoraModuleWeights(down, up, float(rank))
        rows.append(row(unit.name, base.layout.family, "full", kept(svd.s, rank, rank_before)))
    return modules, rows, largest


def extract(
    *,
    base: str,
    tuned: str,
    out: str,
    rank: int | None = None,
    conv_rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    preset: Literal["attn", "attn-mlp", "full"] = "attn-mlp",
    min_diff: float = 0.01,
    format: Literal["kohya", "diffusers"] = "kohya",
    single_file_config: str | None = None,
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    device: str = "cpu",
    report: str | None = None,
    verbose: bool = False,
) -> Path:
    """Extract a LoRA (LoCon with --conv_rank) of the difference ``tuned - base`` by SVD, per module.

    Args:
        base: The original model (diffusers directory, hub id or single file).
        tuned: The fine-tuned model, of the same architecture (any of the same forms).
        out: The LoRA ``.safetensors`` file to write.
        rank: The LoRA rank (kohya's ``dim``); with a dynamic rule, the most any module keeps.
        conv_rank: Also extract convolutions with a kernel larger than 1x1 (LoCon) at this rank (kohya's ``conv_dim``).
        sv_ratio: Dynamic rank: keep singular values within this factor of the largest.
        sv_fro: Dynamic rank: keep this share (0-1) of each module's Frobenius norm.
        sv_cumulative: Dynamic rank: keep this share (0-1) of the singular values' sum.
        preset: The denoiser modules to extract (the family's target presets; ``attn-mlp`` is kohya's).
        min_diff: Leave a text encoder out when no weight of it changed by more than this (kohya's ``min_diff``).
        format: ``kohya`` (A1111, ComfyUI) or ``diffusers``.
        single_file_config: For single-file models: a diffusers directory (or cached hub id) of the same
            architecture; empty: ``base`` when it is a directory.
        save_dtype: dtype of the written tensors.
        device: Where the SVDs run: ``cpu`` or ``cuda`` (much faster for SDXL/Flux).
        report: Also write every module's kept energy and error to this ``.csv`` or ``.json`` file.
        verbose: Print every module's line, not only the per-block summary.
    """
    rule = RankRule.from_options(rank, sv_ratio, sv_fro, sv_cumulative)
    conv_rule = RankRule(conv_rank, rule.method, rule.value) if conv_rank is not None else rule
    if single_file_config is None and resolve_model_source(base, key="--base") != "single_file":
        single_file_config = base
    base_model = base_layout(base, single_file_config, key="--base")
    tuned_model = base_layout(tuned, single_file_config, key="--tuned")
    if tuned_model.family != base_model.family:
        raise LorafitError(
            f"--tuned is {tuned_model.spec.title}, --base {base_model.spec.title}: extract needs one family"
        )
    base_weights, tuned_weights = ModelWeights(base, base_model), ModelWeights(tuned, tuned_model)
    chosen = _selected(base_model, preset, conv_rank)
    for component in list(chosen):
        if not (base_weights.has(component) and tuned_weights.has(component)):
            log.info(
                "%s is not in both models' files (a FLUX.1 single file holds the transformer only): left out", component
            )
            del chosen[component]
    todo = units(base_model, chosen, format)
    try:
        modules, rows, largest = extract_units(todo, base_weights, tuned_weights, rule, conv_rule, device)
    finally:
        base_weights.close()
        tuned_weights.close()
    for component in base_model.spec.text_encoder_components:
        if component in largest and largest[component] <= min_diff:
            log.info("%s: no weight changed by more than --min_diff %g; it is left out", component, min_diff)
            modules = {n: m for n, m in modules.items() if not _in_component(n, component, todo)}
            rows = [r for r in rows if r.name in modules]
    if not modules:
        raise LorafitError(f"--tuned {tuned} does not differ from --base {base} in any extracted module")
    network = Network(out, format, modules, {}, base_model.family, base_model)
    metadata = extract_metadata(base_model, base, tuned, rule, conv_rank, modules) if format == "kohya" else None
    comment = f"extracted by lorafit from {Path(tuned).name} - {Path(base).name}, {rule.describe()}"
    path = write_network(network, modules, Path(out), DTYPES[save_dtype], comment, metadata)
    print(f"wrote {path} ({format}, {base_model.spec.title}, {len(modules)} modules, {rule.describe()})")
    print("\n".join(summary_lines(rows, verbose)))
    if report:
        print(f"per-module report: {write_report(rows, report)}")
    return path


def _in_component(name: str, component: str, todo: list[Unit]) -> bool:
    return any(unit.name == name and unit.component == component for unit in todo)
