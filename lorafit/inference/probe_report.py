"""The probe's report: CLIP scores and the verdict, the sheet under the training images, ``index.html``,
``probe.json`` and the lines printed on stdout (the verdict and the numbers behind it)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageOps

from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.probe_method import Method, recommend_method
from lorafit.inference.probe_plan import ProbePlan
from lorafit.inference.probe_verdict import PhrasingScore, Thresholds, Verdict, decide
from lorafit.inference.render import Renderer
from lorafit.inference.report_html import Report, Table, write_html


def score_phrasings(plan: ProbePlan, images, clip_model: str, device, thresholds: Thresholds):
    """Each phrasing's CLIP similarity to the training images, on the control-to-ceiling scale, and the verdict."""
    from lorafit.inference.clip_scores import ClipScorer

    scorer = ClipScorer(clip_model, device)
    ceiling = scorer.pairwise_similarity(plan.reference.images)
    scores = [
        PhrasingScore(kind, text, scorer.similarity_to_set(row, plan.reference.images))
        for (kind, text), row in zip(plan.tried, images)
    ]
    verdict = decide(scores[:-1], scores[-1], ceiling, thresholds)
    return verdict, scores


def _verdict_lines(verdict: Verdict, scores: list[PhrasingScore], good: float, method: Method) -> list[str]:
    lines = [
        f"verdict: {verdict.title}",
        f"  what to do: {verdict.advice}",
        f"  method: {method.key}: {method.advice}",
        f"  {verdict.explanation}",
    ]
    return lines + [
        f"  {s.kind:<11} similarity {sum(s.similarities) / len(s.similarities):6.3f}  closeness "
        f"{s.mean_closeness:6.2f}  {s.hit_rate(good):4.0%} good  {s.prompt}"
        for s in scores
    ]


def _scores_table(verdict: Verdict, scores: list[PhrasingScore], good: float) -> Table:
    return Table(
        "Closeness per phrasing (0 = like the control prompt, 1 = like the training images)",
        ["phrasing", "kind", "mean similarity", "mean closeness", f"seeds >= {good:g}"],
        [
            [s.prompt, s.kind, sum(s.similarities) / len(s.similarities), s.mean_closeness, f"{s.hit_rate(good):.0%}"]
            for s in scores
        ],
        highlight=scores.index(verdict.best) if verdict.best in scores else None,
    )


def write_probe_report(
    plan: ProbePlan,
    images: list[list[Image.Image]],
    model: str,
    renderer: Renderer,
    clip_model: str | None,
    thresholds: Thresholds,
    out: Path,
) -> dict:
    """Score (given a CLIP model), write ``probe.png``, ``index.html``, ``probe.json``; print the verdict."""
    render = plan.render
    width, height = render.size(renderer.default_size)
    seeds = list(render.seeds)
    report = Report(
        title=f"lorafit probe: does {Path(model).name or model} already know the concept?",
        settings={
            "model": model,
            "data": plan.data,
            "seeds": ", ".join(map(str, seeds)),
            "steps": render.steps,
            "cfg": ", ".join(f"{c:g}" for c in render.cfgs),
            "sampler": render.sampler,
            "size": f"{width}x{height}",
        },
    )
    summary: dict = {"phrasings": [{"kind": k, "prompt": t} for k, t in plan.tried]}
    labels = [f"{kind}: {text}" for kind, text in plan.tried]
    if clip_model:
        verdict, scores = score_phrasings(plan, images, clip_model, renderer.pipe.device, thresholds)
        reference = plan.reference
        method = recommend_method(verdict, renderer.base.family, reference.subject, reference.class_word)
        labels = [f"{label} (closeness {s.mean_closeness:.2f})" for label, s in zip(labels, scores)]
        report.notes += [
            f"Verdict: {verdict.title}. {verdict.advice}.",
            f"Method: {method.key}: {method.advice}.",
            verdict.explanation,
        ]
        report.tables.append(_scores_table(verdict, scores, thresholds.good))
        summary.update(
            verdict=verdict.key,
            title=verdict.title,
            advice=verdict.advice,
            method=method.key,
            method_advice=method.advice,
            explanation=verdict.explanation,
            floor=verdict.floor,
            ceiling=verdict.ceiling,
            scores=[{**vars(s), "mean_closeness": s.mean_closeness} for s in scores],
        )
        lines = _verdict_lines(verdict, scores, thresholds.good, method)
    else:
        lines = [
            (
                f"no --clip_model: compare the rows of {out / 'probe.png'} with the training images by eye "
                "(pass --clip_model for scores and a verdict)"
            )
        ]
    columns = len(images[0])
    references = [ImageOps.fit(im, (width, height), Image.LANCZOS) for im in plan.reference.images[:columns]]
    rows, row_labels = ([references], ["training images"]) if references else ([], [])
    column_labels = [f"seed {s}" for s in seeds]
    if len(render.cfgs) > 1:
        column_labels = [f"seed {s}, CFG {c:g}" for c in render.cfgs for s in seeds]
    sheet, _ = make_sheet(
        [*rows, *images],
        column_labels,
        [*row_labels, *labels],
        title="base model images per phrasing, under sample training images",
    )
    sheet_path = out / "probe.png"
    sheet.save(sheet_path)
    report.sheets.append(("Training images (top row) and the base model's images per phrasing", sheet_path))
    summary["html"] = str(write_html(report, out / "index.html"))
    (out / "probe.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return summary
