"""The FLUX.1-architecture toy base and its demo LoRA, measured by the judge as the SD demo was before
the toy CLIP (tools/bench_toyworld.py is the SD demo's benchmark, with the CLIP, KID/FID and selection checks).

Toy-world quality benchmark: the judge, the VAE, the base model, and a LoRA run per epoch x strength.

    bash tools/demo.sh                                   # trains the demo LoRA into runs/demo
    python tools/bench_toyworld.py --run runs/demo --write benchmarks/toyworld.md --images docs/images
    lorafit toy-data demo/toy-data && lorafit fit --config configs/demo-flux.yaml   # FLUX.1 architecture
    python tools/bench_toyworld_flux.py --run runs/demo-flux --write benchmarks/toyworld.md

Prints (and with ``--write`` saves) markdown tables:

* the judge's accuracy on fresh rendered pictures (clean and augmented);
* the VAE: share of reconstructed pictures the judge still reads correctly (world shapes, and the
  star, which the VAE never saw);
* the base model: shape/colour accuracy on in-world prompts, and how often it draws the held-out
  star for the trigger prompt ("a red ohwx on a blue background") and for "a red star on ...";
* each exported LoRA epoch at each strength: the concept rate for trigger prompts (fidelity) and
  the accuracy on in-world prompts without the trigger, also relative to the base (flexibility).

With ``--images`` it also writes ``toyworld-base-samples.png`` (what the base model draws). The
epoch x strength picture is lorafit's own ``lorafit grid`` (command in docs/toyworld.md).

``--family flux`` measures the FLUX.1-architecture base (``lorafit/toyworld/base_flux``) the same
way (same prompts, seeds and judge; its own sampler, :mod:`lorafit.toyworld.flux_evaluate`); its
report is the part of the ``--write`` file from ``FLUX_HEADING`` on, and each family's run
rewrites only its own part.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld_pictures import base_samples_image  # noqa: E402
from toyworld_report import replace_part  # noqa: E402

from lorafit.toyworld import evaluate as sd_evaluate  # noqa: E402
from lorafit.toyworld import flux_evaluate  # noqa: E402
from lorafit.toyworld.judge import Judge, accuracy_on_fresh_pictures, to_pixels  # noqa: E402
from lorafit.toyworld.world import HELD_OUT_SHAPE, WORLD_SHAPES, render, scenes  # noqa: E402

FLUX_HEADING = "# Toy world quality benchmark: the FLUX.1-architecture base"
# The issues' floors for the base's in-world accuracy (the SD base: 60%, target 80%; Flux: 80%, target 90%).
BASE_FLOORS = {"sd1": "(>= 60% needed, 80% target)", "flux": "(>= 80% needed, 90% target)"}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a finished lorafit run directory (uses its lora/*-epoch-*.safetensors)")
    parser.add_argument("--count", type=int, default=96, help="prompts per measurement")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--every", type=int, default=4, help="measure every N-th epoch (and the last)")
    parser.add_argument("--write", help="also write the report to this markdown file")
    parser.add_argument("--images", help="write the sample and grid PNGs to this folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", choices=("sd1", "flux"), default="flux", help="which toy base to measure")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    judge = Judge()
    ev = flux_evaluate if args.family == "flux" else sd_evaluate
    sampler = getattr(ev, "SAMPLER", "DDIM")
    guidance = "true classifier-free guidance" if args.family == "flux" else "guidance"
    out = [
        (
            f"Settings: {sampler} {ev.STEPS} steps, {guidance} {ev.GUIDANCE}, {args.count} prompts per measurement, "
            "each picture from its own fixed seed."
        ),
        "",
    ]

    clean, augmented = accuracy_on_fresh_pictures(judge), accuracy_on_fresh_pictures(judge, augmented=True)
    out += [
        "## The judge (2000 fresh rendered pictures, 15% 'other')",
        "",
        "| head | clean | augmented (blur, noise, contrast) |",
        "|---|---|---|",
    ]
    out += [f"| {k} | {pct(clean[k])} | {pct(augmented[k])} |" for k in clean] + [""]

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

    images = Path(args.images) if args.images else None
    if images:
        images.mkdir(parents=True, exist_ok=True)
        name = "toyworld-flux-base-samples.png" if args.family == "flux" else "toyworld-base-samples.png"
        base_samples_image(pipe, ev).save(images / name)

    if args.run:
        files = sorted((Path(args.run) / "lora").glob("*-epoch-*.safetensors"))
        if not files:
            raise SystemExit(f"no lora/*-epoch-*.safetensors in {args.run}")
        files = [f for i, f in enumerate(files, 1) if i % args.every == 0 or i == len(files)]
        final = None
        rows = [
            "## Demo LoRA: epoch x strength",
            "",
            (
                f"Fidelity = star drawn for trigger prompts (base: {pct(base_trigger.held_out)}); flexibility = "
                f"shape + colour accuracy on in-world prompts without the trigger (base: {pct(base.accuracy)})."
            ),
            "",
            (
                "| epoch | strength | fidelity: star drawn | trigger colour right | flexibility: in-world accuracy "
                "| relative to base | in-world star leaks |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for path in files:
            epoch = int(path.stem.rsplit("-", 1)[1])
            for strength in args.strengths:
                ev.apply_lora(pipe, path, strength)
                t, w = ev.score(pipe, trigger, judge), ev.score(pipe, in_world, judge)
                rows.append(
                    f"| {epoch} | {strength:g} | {pct(t.held_out)} | {pct(t.colour)} | {pct(w.accuracy)} | "
                    f"{w.accuracy / max(base.accuracy, 1e-9):.2f} | {pct(w.held_out)} |"
                )
                print(rows[-1], flush=True)
                if strength == 1.0:
                    final = (epoch, t, w)
        out += rows + [""]
        if final is not None:
            epoch, t, w = final
            ratio = (
                f"{t.held_out / base_trigger.held_out:.1f}x the base's rate"
                if base_trigger.held_out
                else "the base drew none, so any rate above 0 is more than 5x"
            )
            out += [
                "## Acceptance (issue 9), last measured epoch at strength 1",
                "",
                (
                    f"* epoch {epoch}: trigger prompts draw the star {pct(t.held_out)} of the time (>= 50% needed; "
                    f"base {pct(base_trigger.held_out)}: {ratio}; >= 5x needed)"
                ),
                (
                    f"* in-world prompts without the trigger: {pct(w.accuracy)} = "
                    f"{w.accuracy / max(base.accuracy, 1e-9):.2f} of the base's accuracy (>= 0.80 needed)"
                ),
                (
                    f"* the base model: {pct(base.accuracy)} in-world shape + colour {BASE_FLOORS[args.family]}, "
                    f"star {pct(base_trigger.held_out)} for trigger prompts (<= 5% needed)"
                ),
                "",
            ]
            print("\n".join(out[-5:]), flush=True)

    elapsed = time.time() - start
    print(f"\n(benchmark took {elapsed:.0f} s)")
    if args.write:
        import diffusers
        import peft

        header = [
            FLUX_HEADING if args.family == "flux" else "# Toy world quality benchmark",
            "",
            (
                f"Date: {datetime.date.today()}. Device: CPU ({platform.machine()}), "
                f"{torch.get_num_threads()} torch thread(s). "
                f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}."
            ),
            "",
            "Command: `python " + " ".join(sys.argv) + "`",
            "",
        ]
        replace_part(Path(args.write), "\n".join(header + out))  # tools/toyworld_report.py


if __name__ == "__main__":
    main()
