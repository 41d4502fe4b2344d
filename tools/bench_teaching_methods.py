"""Toy-world comparison of the teaching methods of docs/teaching-methods.md, for benchmarks/toyworld.md.

    python tools/bench_teaching_methods.py prior --out runs/bench-prior --write benchmarks/toyworld.md
    python tools/bench_teaching_methods.py slider --out runs/bench-slider --write benchmarks/toyworld.md

``prior``: the demo's star LoRA (configs/demo.yaml's recipe, 480 steps) three ways: without any prior
(stars only), with regularization images (the demo: 320 world pictures), and with the
output-preserving prior instead of them (stars only, ``model.prior.*``, class words from
``--class_word``). Reported: the share of trigger prompts that draw a star (fidelity), and for
in-world prompts without the trigger the shape + colour accuracy (kept world) and star leaks.

``slider``: a background-brightness slider from a prompt pair ("... on a white background" vs
"... on a black background"; ``model.slider.*``), trained on world pictures (their noisy latents
and captions), with and without ai-toolkit's target normalization, and one from image pairs (the
same scene on black and on white, ``model.slider.image_pairs``), measured at strengths -N..N on
in-world prompts with coloured backgrounds: the border pixels' mean luminance (which a slider must
move monotonically), the judge's white/black background shares, and the shape + colour accuracy.

``--write`` replaces this tool's section of the file (from its heading to the next of its own
headings or the end), leaving the rest as it is.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorafit.cli.main import main as lorafit  # noqa: E402
from lorafit.toyworld import evaluate as ev  # noqa: E402
from lorafit.toyworld.concept_data import write_concept_dataset  # noqa: E402
from lorafit.toyworld.method_data import (  # noqa: E402
    background_luminance,
    write_brightness_pairs,
    write_world_folder,
)

SECTION = "## Teaching methods on the toy world"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fit(out: Path, data: Path, epochs: int, *args: str) -> Path:
    """`lorafit fit` with the demo config (no samples), returns the final LoRA file."""
    if not (out / "lora" / "ohwx.safetensors").is_file():
        lorafit(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "demo.yaml"),
                "--data.train_dir",
                str(data),
                "--trainer.default_root_dir",
                str(out),
                "--trainer.max_epochs",
                str(epochs),
                "--trainer.enable_progress_bar",
                "false",
                "--samples.prompts",
                "[]",
                *args,
            ]
        )
    return out / "lora" / "ohwx.safetensors"


def prior_rows(args) -> list[str]:
    out = Path(args.out)
    with_world = write_concept_dataset(out / "data-world", seed=0)
    stars = write_concept_dataset(out / "data-stars", world_images=0, seed=0)
    # configs/demo.yaml: 40 steps an epoch with the world pictures, 20 without: the same 480 steps.
    runs = [("no prior (stars only)", fit(out / "none", stars, 24), 24)]
    started = time.time()
    runs.append(("regularization images (320 world pictures, the demo)", fit(out / "reg", with_world, 12), 12))
    timings = {"reg": time.time() - started}
    for word in args.class_word:
        started = time.time()
        run = fit(
            out / f"prior-{word}",
            stars,
            24,
            "--model.prior.weight",
            str(args.weight),
            "--model.prior.class_word",
            word,
            "--model.prior.trigger",
            "ohwx",
        )
        timings[word] = time.time() - started
        runs.append((f'output-preserving prior, class "{word}", weight {args.weight:g}', run, 24))
    pipe = ev.load_pipeline()
    trigger, world = ev.trigger_cases(args.count), ev.in_world_cases(args.count)
    base_world = ev.score(pipe, world)
    rows = [
        "### Output-preserving prior vs regularization images",
        "",
        (
            "The demo's star LoRA (configs/demo.yaml, 480 steps of batch 16, strength 1, final epoch), "
            f"{args.count} prompts each, fixed seeds. Fidelity: trigger prompts that draw a star. Kept world: "
            f"shape + colour accuracy of in-world prompts without the trigger (base {pct(base_world.accuracy)})."
        ),
        "",
        "| prior | fidelity: star drawn | kept world: in-world accuracy | in-world star leaks |",
        "|---|---|---|---|",
    ]
    for name, path, _ in runs:
        ev.apply_lora(pipe, path, 1.0)
        t, w = ev.score(pipe, trigger), ev.score(pipe, world)
        rows.append(f"| {name} | {pct(t.held_out)} | {pct(w.accuracy)} | {pct(w.held_out)} |")
        print(rows[-1], flush=True)
    rows += [
        "",
        "Training time (wall, this machine): "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
        + " (the prior runs two more denoiser passes a step, one with gradients).",
        "",
    ]
    return rows


def increasing_range(strengths: list[float], values: list[float]) -> tuple[float, float]:
    """The widest run of ``strengths`` around 0 (or the first) over which ``values`` rise strictly."""
    start = strengths.index(0.0) if 0.0 in strengths else 0
    lo = hi = start
    while lo > 0 and values[lo - 1] < values[lo]:
        lo -= 1
    while hi < len(values) - 1 and values[hi + 1] > values[hi]:
        hi += 1
    return strengths[lo], strengths[hi]


SLIDER_PROMPTS = ("a red circle on a white background", "a red circle on a black background")


SLIDER_VARIANTS = {
    "on": "prompt pair, normalization on",
    "off": "prompt pair, normalization off",
    "pairs": "image pairs (black / white)",
}


def slider_rows(args) -> list[str]:
    out = Path(args.out)
    world = write_world_folder(out / "data-world", num_images=64, repeats=5, seed=1)  # 20 batches of 16 an epoch
    positive, negative = SLIDER_PROMPTS
    runs, timings = [], {}
    for name in args.variants:
        if name == "pairs":  # 64x32 pictures: resolution 48 holds the 64x32 bucket, each half 32x32
            data = write_brightness_pairs(out / "data-pairs", num_images=64, repeats=5)
            settings = ["--model.slider.image_pairs", "true", "--data.resolution", "48", "--data.max_bucket_reso", "64"]
        else:
            data = world
            settings = ["--model.slider.positive", positive, "--model.slider.negative", negative]
            normalize = "true" if name == "on" else "false"
            settings += ["--model.slider.guidance", str(args.guidance), "--model.slider.normalize", normalize]
        started = time.time()
        runs.append((name, fit(out / f"slider-{name}", data, args.epochs, *settings)))
        timings[name] = time.time() - started
    pipe = ev.load_pipeline()
    cases = [c for c in ev.in_world_cases(4 * args.count) if c.background not in ("white", "black")][: args.count]
    strengths = [float(s) for s in args.strengths]
    steps = args.epochs * 20
    rows = [
        "### Slider: background brightness",
        "",
        (
            f'Sliders trained from the prompt pair "{positive}" / "{negative}" (model.slider.guidance '
            f"{args.guidance:g}, target = each picture's caption; 64 world pictures) and from 64 image pairs (a "
            "world scene on black beside the same scene on white, captioned with another background; "
            f"model.slider.image_pairs), {steps} steps of batch 16 each with the demo recipe, applied at strengths "
            f"{', '.join(f'{s:g}' for s in strengths)} to {len(cases)} in-world prompts with coloured backgrounds "
            "(red, green, blue, yellow; fixed seeds). Luminance: mean of the pictures' border pixels (0-255); "
            "white/black: the judge's background verdict; shape + colour: as asked (the world kept)."
        ),
        "",
        "| slider | strength | border luminance | judged white | judged black | shape + colour |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for name, path in runs:
        ev.apply_lora(pipe, path, strengths[0])
        lums = []
        for strength in strengths:
            ev.set_lora_strength(pipe, strength)
            pictures = ev.generate(pipe, cases)
            score = ev.judge_pictures(pictures, cases)
            lum = sum(background_luminance(pictures)) / len(cases)
            lums.append(lum)
            white = sum(v.background == "white" for v in score.verdicts) / len(cases)
            black = sum(v.background == "black" for v in score.verdicts) / len(cases)
            label = SLIDER_VARIANTS[name]
            rows.append(f"| {label} | {strength:g} | {lum:.1f} | {pct(white)} | {pct(black)} | {pct(score.accuracy)} |")
            print(rows[-1], flush=True)
        verdicts[name] = increasing_range(strengths, lums)
    rows += [
        "",
        "Border luminance rises strictly with strength: "
        + "; ".join(f"{SLIDER_VARIANTS[n]} from {lo:g} to {hi:g}" for n, (lo, hi) in verdicts.items())
        + ". Training time (wall, this machine): "
        + ", ".join(f"{SLIDER_VARIANTS[n]} {seconds:.0f} s" for n, seconds in timings.items())
        + ".",
        "",
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["prior", "slider"])
    parser.add_argument("--out", required=True, help="folder for the runs (reused when their files exist)")
    parser.add_argument("--count", type=int, default=96, help="prompts per measurement")
    parser.add_argument("--class_word", nargs="+", default=["shape"], help="prior: class words to try")
    parser.add_argument("--weight", type=float, default=1.0, help="prior: model.prior.weight")
    parser.add_argument("--epochs", type=int, default=8, help="slider: epochs of 20 steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="slider: model.slider.guidance")
    parser.add_argument(
        "--strengths", nargs="+", default=["-2", "-1", "-0.5", "0", "0.5", "1", "2"], help="slider: strengths"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(SLIDER_VARIANTS), choices=list(SLIDER_VARIANTS), help="slider: which"
    )
    parser.add_argument("--write", help="replace this method's section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    rows = prior_rows(args) if args.method == "prior" else slider_rows(args)
    note = (
        f"{datetime.date.today()}, CPU ({platform.machine()}), 1 torch thread, torch {torch.__version__}; "
        f"`python {' '.join(sys.argv)}` took {time.time() - started:.0f} s."
    )
    rows += [note, ""]
    print("\n".join(rows))
    if args.write:
        write_section(Path(args.write), rows[0], rows)


def write_section(path: Path, heading: str, rows: list[str]) -> None:
    """Put ``rows`` under :data:`SECTION` in ``path``, replacing the block that starts with ``heading``."""
    text = path.read_text() if path.is_file() else ""
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\nMeasured by `tools/bench_teaching_methods.py`.\n"
    head, _, tail = text.partition(SECTION)
    blocks = tail.split("\n### ")
    kept = [blocks[0]] + [b for b in blocks[1:] if not ("### " + b).startswith(heading)]
    body = "\n### ".join(kept).rstrip() + "\n\n" + "\n".join(rows).rstrip() + "\n"
    path.write_text(head + SECTION + body)


if __name__ == "__main__":
    main()
