"""Several networks into one, module by module: exactly by concatenation, or by SVD to a rank.

With strengths ``w_i`` and scales ``s_i = alpha_i / rank_i``, the merged update of a module is
``Σ w_i s_i up_i @ down_i``. That is itself one LoRA of rank ``Σ rank_i``:

    down = [down_1; down_2; ...]    up = [w_1 s_1 up_1, w_2 s_2 up_2, ...]    alpha = Σ rank_i

(``--concat``, exact; kohya's ``merge_lora.py --concat`` keeps the first file's alpha for the sum
of ranks, which changes the scale, and its default mode adds the factors, which is not the sum of
the updates). With a rank (``--rank``/``--sv_*``) the sum is cut by SVD to that rank, as kohya's
``svd_merge_lora.py`` does, but without its clamping of the factors' largest values (0.99
quantile), which moves the result away from the best rank-k approximation the SVD gives.
LoRA/LoCon sums are cut from their stacked factors (exact, no dense matrix); LoHa/LoKr join the
sum through their dense update. DoRA is refused: a DoRA's update depends on the base weights (bake
it into the base with ``--into``, or resize it alone).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.lora_weights import LoraModuleWeights, ModuleWeights
from lorafit.networks.toolbox.low_rank import (
    RankRule,
    as_matrix,
    kept,
    lora_shapes,
    numerical_rank,
    svd_of_matrix,
    svd_of_product,
)
from lorafit.networks.toolbox.network_file import Network, output_metadata
from lorafit.networks.toolbox.progress import progress
from lorafit.networks.toolbox.report import ModuleRow, row
from lorafit.networks.toolbox.resize import is_spatial

Contributions = list[tuple[float, ModuleWeights, Network]]


def _check_shapes(name: str, contributions: Contributions) -> torch.Size:
    shapes = {tuple(net.weight_shape(name, module)) for _, module, net in contributions}
    if len(shapes) > 1:
        files = ", ".join(Path(net.source).name for _, _, net in contributions)
        raise LorafitError(f"{name} has different shapes in {files} ({sorted(shapes)}): LoRAs of different models")
    return torch.Size(shapes.pop())


def _refuse_dora(name: str, contributions: Contributions) -> None:
    for _, module, net in contributions:
        if module.kind == "dora":
            raise LorafitError(
                f"{net.source}: {name} is DoRA, whose update depends on the base weights; merge it into the base "
                "model with --into, or resize it alone"
            )


def concatenated(name: str, contributions: Contributions) -> LoraModuleWeights:
    """The exact sum of LoRA modules as one LoRA of the summed rank (scale 1)."""
    _refuse_dora(name, contributions)
    _check_shapes(name, contributions)
    downs, ups = [], []
    for strength, module, net in contributions:
        if not isinstance(module, LoraModuleWeights):
            raise LorafitError(
                f"{net.source}: {name} is {module.kind}, which cannot be concatenated with LoRA factors; "
                "merge by SVD instead (--rank N or --sv_fro 0.99)"
            )
        downs.append(module.down.float())
        ups.append(module.up.float() * (strength * module.alpha / module.rank))
    down, up = torch.cat(downs), torch.cat(ups, dim=1)
    return LoraModuleWeights(down, up, float(down.shape[0]))


def cut_sum(
    name: str, contributions: Contributions, rule: RankRule, family: str | None, device: str = "cpu"
) -> tuple[LoraModuleWeights, ModuleRow]:
    """The sum cut by SVD to the rank ``rule`` gives (scale 1), and its report line."""
    _refuse_dora(name, contributions)
    shape = _check_shapes(name, contributions)
    if all(isinstance(m, LoraModuleWeights) for _, m, _ in contributions):
        joined = concatenated(name, contributions)
        svd = svd_of_product(joined.up.flatten(1), joined.down.flatten(1))
        rank_before = joined.rank
    else:
        total = sum(strength * as_matrix(m.delta_weight().reshape(shape)) for strength, m, _ in contributions)
        svd = svd_of_matrix(total, device)
        rank_before = numerical_rank(svd.s)
    rank = rule.choose(svd.s, cap=max(1, rank_before))  # no more directions than the sum has
    up, down = lora_shapes(*svd.factors(rank), shape)
    kinds = "+".join(sorted({m.kind for _, m, _ in contributions}))
    return LoraModuleWeights(down, up, float(rank)), row(name, family, kinds, kept(svd.s, rank, rank_before))


def merge_modules(
    networks: list[Network],
    strengths: list[float],
    rule: RankRule | None,
    conv_rule: RankRule | None,
    device: str = "cpu",
) -> tuple[dict[str, LoraModuleWeights], list[ModuleRow]]:
    """Every module of any input, merged (``rule`` None: concatenated exactly)."""
    by_name: dict[str, Contributions] = {}
    for net, strength in zip(networks, strengths):
        for name, module in net.modules.items():
            by_name.setdefault(name, []).append((strength, module, net))
    family = networks[0].family
    modules, rows = {}, []
    for name, contributions in progress(sorted(by_name.items()), "merge", total=len(by_name)):
        if rule is None:
            modules[name] = concatenated(name, contributions)
            continue
        spatial = is_spatial(contributions[0][2].weight_shape(name, contributions[0][1]))
        modules[name], line = cut_sum(name, contributions, conv_rule if spatial else rule, family, device)
        rows.append(line)
    return modules, rows


def merged_metadata(
    networks: list[Network], strengths: list[float], modules: dict, out: Path, comment: str
) -> dict[str, str]:
    """The first file's metadata for the merged modules, with ``modelspec.merged_from`` and every
    input's tag frequencies (by ``file/dataset``), so A1111's tag list shows all of them."""
    meta = output_metadata(networks[0], modules, comment, out)
    meta["modelspec.merged_from"] = ", ".join(f"{Path(n.source).stem}:{w:g}" for n, w in zip(networks, strengths))
    tags = {}
    for net in networks:
        try:
            frequency = json.loads(net.metadata.get("ss_tag_frequency", "{}"))
        except json.JSONDecodeError:
            continue
        tags.update({f"{Path(net.source).stem}/{dataset}": counts for dataset, counts in frequency.items()})
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    return meta
