"""Toy-world quality benchmark: judge, toy CLIP, VAE, base model, and a LoRA run measured two ways.

    bash tools/demo.sh                                   # trains the demo LoRA into runs/demo
    python tools/bench_toyworld.py --run runs/demo --write benchmarks/toyworld.md --images docs/images

Prints (and with ``--write`` saves) markdown tables:

* the judge's accuracy on fresh rendered pictures, and the toy CLIP's zero-shot accuracy;
* the VAE: share of reconstructed pictures the judge still reads correctly (world shapes, and the
  star, which the VAE never saw);
* the base model: shape/colour accuracy on in-world prompts, and how often it draws the held-out
  star for the trigger prompt ("a red ohwx on a blue background") and for "a red star on ...";
* each exported LoRA epoch at each strength, judged (star rate, in-world accuracy) and scored by
  the metrics a user sees (toy CLIP fidelity/flexibility through torchmetrics, KID/FID against
  rendered stars); their Spearman correlations, and the epoch ``lorafit grid``'s rule suggests
  against the judge's best trade-off (lorafit/toyworld/benchmark.py);
* ``lorafit probe``'s verdicts with the toy CLIP for the star and for a circle;
* with ``--before RUN``: the same acceptance numbers for an earlier run (the recipe before).

With ``--images`` it also writes the README's pictures: ``toyworld-base-samples.png``, the
``lorafit grid`` sheets of the run (``toyworld-demo-grid-00/01.png``, with the toy CLIP's
selection metrics in ``runs/.../grid/index.html``) and the probe sheet (``toyworld-probe.png``).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld_pictures import base_samples_image, enlarged  # noqa: E402
from toyworld_report import replace_part  # noqa: E402

from lorafit.inference.render_options import RenderOptions  # noqa: E402
from lorafit.toyworld import evaluate as ev  # noqa: E402
from lorafit.toyworld.judge import Judge, accuracy_on_fresh_pictures, to_pixels  # noqa: E402
from lorafit.toyworld.world import HELD_OUT_SHAPE, WORLD_SHAPES, render, scenes  # noqa: E402

GRID_PROMPTS = ("a green ohwx on a black background", "a red circle on a green background")
SELECTION_PROMPTS = (
    "a green ohwx on a black background",
    "a red ohwx on a yellow background",
    "a white ohwx on a blue background",
)
FLEXIBILITY_PROMPTS = (
    "a red circle on a green background",
    "a blue square on a yellow background",
    "a white triangle on a black background",
    "a yellow circle on a blue background",
)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def vae_rows(pipe, judge: Judge, count: int) -> list[str]:
    rows = ["| pictures | judge reads the reconstruction's shape correctly | colour |", "|---|---|---|"]
    for name, shapes in (("world shapes", WORLD_SHAPES), ("star (never seen by the VAE)", (HELD_OUT_SHAPE,))):
        world = scenes(777, count, shapes)
        with torch.no_grad():
            x = to_pixels([render(s) for s in world])
            decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        pictures = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        verdicts = judge(pictures)
        shape = np.mean([v.shape == s.shape for v, s in zip(verdicts, world)])
        colour = np.mean([v.colour == s.colour for v, s in zip(verdicts, world)])
        rows.append(f"| {name} | {pct(shape)} | {pct(colour)} |")
    return rows


def concept_folder(run: Path) -> Path:
    """The run's star pictures (``<train_dir>/N_ohwx``), read from its resolved config."""
    import yaml

    train_dir = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["train_dir"])
    folders = sorted(train_dir.glob("*_ohwx"))
    if not folders:
        raise SystemExit(f"{train_dir}: no *_ohwx folder (the run's data.train_dir); run `lorafit toy-data` first")
    return folders[0]


def judge_table(cells) -> list[str]:
    rows = [
        (
            "| epoch | strength | fidelity: star drawn | trigger colour right | flexibility: in-world accuracy "
            "| in-world star leaks | CLIP fidelity | CLIP flexibility | KID | FID |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        name = "base" if c.epoch == 0 else str(c.epoch)
        rows.append(
            f"| {name} | {c.strength:g} | {pct(c.star)} | {pct(c.trigger_colour)} | {pct(c.in_world)} | "
            f"{pct(c.leaks)} | {c.clip_fidelity:.4f} | {c.clip_flexibility:.4f} | {c.kid:.3f} | {c.fid:.1f} |"
        )
    return rows


def probe_verdicts(clip: str, images: Path | None) -> list[str]:
    """``lorafit probe`` with the toy CLIP on 16 stars and on 16 circles (captions use the trigger word)."""
    from lorafit.inference.probe import probe
    from lorafit.toyworld.concept_data import write_concept_dataset

    rows = ["| concept | phrasing tried besides the captions | verdict | what to do |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("star", "circle"):
            data = write_concept_dataset(Path(tmp) / shape, world_images=0, shape=shape)
            phrasing = f"a red {shape} on a blue background"
            out = Path(tmp) / f"probe-{shape}"
            s = probe(str(ev.BASE_DIR), data=str(data), phrasing=[phrasing], clip_model=clip, out=str(out),
                      render=RenderOptions(sampler="ddim", steps=20, cfg=4.0, seed=[0, 1, 2, 3]))  # fmt: skip
            rows.append(f"| {shape} | `{phrasing}` | {s['title']} | {s['advice']} |")
            if images and shape == "star":
                enlarged(out / "probe.png", images / "toyworld-probe.png", scale=2)
    return rows


def grid_images(run: Path, images: Path) -> None:
    """The README's sheets: ``lorafit grid`` over every other epoch, one seed, three strengths."""
    from lorafit.inference.grid import grid

    files = sorted((run / "lora").glob("*-epoch-*.safetensors"))
    chosen = [str(f) for i, f in enumerate(files, 1) if i % 2 == 0]
    render = RenderOptions(sampler="ddim", steps=20, cfg=4.0, seed=[1])
    summary = grid(str(ev.BASE_DIR), lora=chosen, prompt=list(GRID_PROMPTS), strength=[0.5, 0.75, 1.0], render=render,
                   out=str(run / "grid"))  # fmt: skip
    for i, sheet in enumerate(summary["sheets"]):
        enlarged(Path(sheet), images / f"toyworld-demo-grid-{i:02d}.png")


def grid_selection(run: Path, clip: str, references: Path) -> dict:
    """What a user's ``lorafit grid --clip_model lorafit/toyworld/clip`` suggests: every saved epoch at
    strength 1, three trigger prompts and four in-world flexibility prompts, four seeds each."""
    from lorafit.inference.grid import grid

    return grid(str(ev.BASE_DIR), lora=str(run), prompt=list(SELECTION_PROMPTS), x="epoch", y="seed", z="prompt",
                render=RenderOptions(sampler="ddim", steps=20, cfg=4.0, seed=[1, 2, 3, 4]), clip_model=clip,
                train_images=str(references), flexibility_prompt=list(FLEXIBILITY_PROMPTS),
                out=str(run / "grid-selection"))  # fmt: skip


def acceptance(cells, base_in_world: float, base_star: float, title: str, ceiling: float | None = None) -> list[str]:
    last = max(c.epoch for c in cells)
    at = {c.strength: c for c in cells if c.epoch == last}
    full, three = at.get(1.0), at.get(0.75)
    rows = [f"## {title}", ""]
    if full:
        rows.append(f"* epoch {last}, strength 1: {pct(full.star)} stars for trigger prompts (goal >= 90%, floor 80%)")
    if three:
        rows.append(f"* epoch {last}, strength 0.75: {pct(three.star)} stars (goal >= 50%)")
    if full:
        ratio = full.in_world / max(base_in_world, 1e-9)
        rows.append(
            f"* in-world prompts without the trigger, strength 1: {pct(full.in_world)} = {ratio:.2f} of the base's "
            f"{pct(base_in_world)} (goal >= 0.95, floor 0.9)"
        )
    rows.append(f"* the base model draws a star for {pct(base_star)} of trigger prompts (goal 0%)")
    if ceiling is not None:
        rows.append(
            f"* the VAE's own limit: of rendered stars in the trigger prompts' colours, encoded and decoded by "
            f"the base's VAE, the judge reads {pct(ceiling)} as stars; a LoRA imitates the VAE's latents, so "
            "this is about the highest star rate any LoRA on this base can reach"
        )
    rows.append("")
    return rows


def run_description(args) -> list[str]:
    """Which LoRA run was measured: its config's recipe and, if given, how long training took."""
    if not args.run:
        return []
    import yaml

    config = yaml.safe_load((Path(args.run) / "config.yaml").read_text())
    model, data, trainer = config["model"], config["data"], config["trainer"]
    # config.yaml groups the model's settings (model.network.rank, ...); a run from before the grouping has them flat.
    net, opt, noise = (
        model[group] if isinstance(model.get(group), dict) else model for group in ("network", "optimizer", "noise")
    )
    lines = [
        (
            f"The LoRA run measured below: `lorafit toy-data demo/toy-data && lorafit fit --config configs/demo.yaml` "
            f"({trainer['max_epochs']} epochs, batch {data['batch_size']}, rank {net['rank']}, "
            f"alpha {net['alpha']}, "
            f"lr {opt['learning_rate']:g} / text encoder {opt['text_encoder_lr']:g}, timesteps from "
            f"{noise['min_timestep']}, gradient clipping {trainer['gradient_clip_val']})."
        )
    ]
    if args.fit_time:
        lines.append(f"`lorafit fit` took {args.fit_time}.")
    return [" ".join(lines), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished lorafit run directory (uses its lora/*-epoch-*.safetensors)")
    parser.add_argument(
        "--before",
        help="an earlier run for the before/after lines (the first recipe: `lorafit toy-data` + `lorafit fit "
        "--config configs/demo.yaml` in a clone at commit afad78f, docs/toyworld.md)",
    )
    parser.add_argument("--count", type=int, default=96, help="prompts per measurement")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    parser.add_argument("--every", type=int, default=2, help="table: every N-th epoch (and the last)")
    parser.add_argument("--clip", default=None, help="CLIP for the metrics (default: lorafit/toyworld/clip)")
    parser.add_argument("--write", help="also write the report to this markdown file")
    parser.add_argument("--images", help="write the README's PNGs to this folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit-time", help="how long the run's `lorafit fit` took (text, quoted in the report)")
    args = parser.parse_args()
    from lorafit.inference.clip_scores import ClipScorer
    from lorafit.inference.reference_images import load_reference_set
    from lorafit.toyworld import benchmark as bm
    from lorafit.toyworld.toy_clip import CLIP_DIR, zero_shot_accuracy

    torch.set_num_threads(args.threads)
    start = time.time()
    clip = args.clip or str(CLIP_DIR)
    judge, scorer = Judge(), ClipScorer(clip)
    images = Path(args.images) if args.images else None
    if images:
        images.mkdir(parents=True, exist_ok=True)
    out = [
        (
            f"Settings: DDIM {ev.STEPS} steps, guidance {ev.GUIDANCE}, {args.count} prompts per measurement (every "
            "colour pair), each picture from its own fixed seed."
        ),
        "",
    ]

    clean, augmented = accuracy_on_fresh_pictures(judge), accuracy_on_fresh_pictures(judge, augmented=True)
    zero_shot = zero_shot_accuracy(scorer.scored.model, scorer.processor)
    out += [
        "## The judge and the toy CLIP (2000 fresh rendered pictures, 15% 'other')",
        "",
        "| head | judge, clean | judge, augmented (blur, noise, contrast) | toy CLIP, zero-shot (best of 150) |",
        "|---|---|---|---|",
    ]
    out += [f"| {k} | {pct(clean[k])} | {pct(augmented[k])} | {pct(zero_shot[k])} |" for k in clean] + [""]

    pipe = ev.load_pipeline()
    out += ["## The VAE (256 pictures each)", ""] + vae_rows(pipe, judge, 256) + [""]

    in_world, trigger = ev.in_world_cases(args.count), ev.trigger_cases(args.count)
    star = ev.trigger_cases(args.count, word=HELD_OUT_SHAPE)
    base = ev.score(pipe, in_world, judge)
    base_trigger, base_star = ev.score(pipe, trigger, judge), ev.score(pipe, star, judge)
    out += [
        "## Base model",
        "",
        "| prompts | shape | colour | background | shape + colour | star drawn |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in (
        ("in-world", base),
        ("trigger (`a red ohwx on ...`)", base_trigger),
        ("held-out name (`a red star on ...`)", base_star),
    ):
        out.append(
            f"| {name} | {pct(s.shape)} | {pct(s.colour)} | {pct(s.background)} | {pct(s.accuracy)} | "
            f"{pct(s.held_out)} |"
        )
    out.append("")
    print("\n".join(out), flush=True)
    if images:
        base_samples_image(pipe).save(images / "toyworld-base-samples.png")

    if args.run:
        run = Path(args.run)
        saved = sorted(int(p.stem.rsplit("-", 1)[1]) for p in (run / "lora").glob("*-epoch-*.safetensors"))
        if not saved:
            raise SystemExit(f"no lora/*-epoch-*.safetensors in {args.run}")
        references = concept_folder(run)
        measure = bm.RunMeasure(scorer, load_reference_set(str(references)).images, args.count)
        table = [e for e in saved if e % args.every == 0 or e == saved[-1]]
        cells = bm.measure_run(run, measure, table, args.strengths, progress=lambda c: print(c, flush=True))
        # The selection compares every saved epoch at strength 1 (the grid's default selection strength).
        cells += bm.measure_run(run, measure, [e for e in saved if e not in table], [1.0], progress=print)[1:]
        cells.sort(key=lambda c: (c.epoch, c.strength))
        agree = bm.agreement(cells, 1.0, saved)
        out += [
            "## Demo LoRA: epoch x strength, judged and scored",
            "",
            (
                f"The same pictures, read by the judge (ground truth) and scored by what `lorafit grid` shows a "
                f"user: CLIP fidelity (toy CLIP score of the trigger prompts' pictures against the {references.name} "
                "training images) and CLIP flexibility (of the in-world pictures against their prompts), both "
                "torchmetrics' `clip_score` / 100 with the toy CLIP; KID and FID (torchmetrics) of the trigger "
                "pictures against 4 rendered stars per prompt of the same colours, in the toy CLIP's image-embedding "
                "space (torchmetrics' `feature=`: its default Inception weights are a download this machine cannot "
                "make), so they are comparable within this table only. Base: epoch 'base'."
            ),
            "",
            *judge_table([c for c in cells if c.epoch == 0 or c.epoch in table]),
            "",
            "Every other saved epoch at strength 1 (for the selection below): "
            + ", ".join(
                f"{c.epoch}: {pct(c.star)} / {pct(c.in_world)}" for c in cells if c.epoch not in table and c.epoch
            ),
            "",
            "## Do the metrics a user sees track the judge?",
            "",
            (
                f"Spearman rank correlation over the {agree.cells} (epoch, strength) cells of the LoRA "
                "(torchmetrics' `spearman_corrcoef`):"
            ),
            "",
            f"* CLIP fidelity vs the judge's star rate: **{agree.fidelity_spearman:.2f}** (goal >= 0.8)",
            f"* KID (lower = closer to real stars) vs the judge's star rate: **{agree.kid_spearman:.2f}**",
            f"* CLIP flexibility vs the judge's in-world accuracy: **{agree.flexibility_spearman:.2f}**",
            "",
            (
                f"Selection at strength 1 over all {len(saved)} saved epochs, by `lorafit grid`'s rule "
                "(lorafit/inference/selection.py: both numbers rescaled 0-1 across epochs and averaged; "
                "earlier on a tie): "
                f"from the CLIP scores it suggests **epoch {agree.suggested}**; the same rule on the judge's star rate "
                f"and in-world accuracy picks **epoch {agree.judge_best}**: {agree.saved_epochs_apart} saved epoch(s) "
                "apart (goal <= 1)."
            ),
            "",
        ]
        base_cell = cells[0]
        ceiling = bm.vae_ceiling(pipe, trigger, judge)
        out += acceptance(cells, base_cell.in_world, base_cell.star, "Acceptance (issue 19)", ceiling)
        if args.before:
            before = bm.measure_run(Path(args.before), measure, [saved[-1]], [0.75, 1.0], progress=print)
            out += acceptance(
                before, base_cell.in_world, base_cell.star, f"Before: the previous recipe ({args.before})"
            )
        print("\n".join(out[-30:]), flush=True)
        out += ["## `lorafit probe` with the toy CLIP", "", *probe_verdicts(clip, images), ""]
        picked = grid_selection(run, clip, references)
        label = int(picked["suggested"].split()[-1])
        out += [
            "## `lorafit grid --clip_model lorafit/toyworld/clip` as a user runs it",
            "",
            (
                f"Every saved epoch at strength 1, prompts {', '.join(f'`{p}`' for p in SELECTION_PROMPTS)} and the "
                f"flexibility prompts {', '.join(f'`{p}`' for p in FLEXIBILITY_PROMPTS)}, seeds 1-4 "
                f"(`{run}/grid-selection/index.html`): {picked['reason']}. That is "
                f"{abs(saved.index(label) - saved.index(agree.judge_best))} saved epoch(s) from the judge's best "
                f"trade-off (epoch {agree.judge_best})."
            ),
            "",
        ]
        if images:
            grid_images(run, images)

    elapsed = time.time() - start
    print("\n".join(out[-8:]), f"\n(benchmark took {elapsed:.0f} s)")
    if args.write:
        import diffusers
        import peft
        import torchmetrics

        header = [
            "# Toy world quality benchmark",
            "",
            (
                f"Date: {datetime.date.today()}. Device: CPU ({platform.machine()}), "
                f"{torch.get_num_threads()} torch thread(s). torch {torch.__version__}, diffusers "
                f"{diffusers.__version__}, peft {peft.__version__}, torchmetrics {torchmetrics.__version__}."
            ),
            "",
            "Command: `python " + shlex.join(sys.argv) + "`",
            "",
            *run_description(args),
        ]
        # Other tools write their own parts of the same file (tools/toyworld_report.py).
        replace_part(Path(args.write), "\n".join(header + out))


if __name__ == "__main__":
    main()
