"""Python's full garbage collections during `lorafit fit` on the toy demo: how many, how long.

    python tools/bench_gc_pauses.py [--steps 120] [--repeats 3]

Each repeat launches two fresh `lorafit fit --config configs/demo.yaml` processes (sample rounds off):
one as lorafit runs (the objects built before training frozen for the collector,
lorafit/training/garbage_collection.py) and one with them handed back to the collector at the first
step, as before that change. A callback records every generation-2 collection from the first step
to the end of training with ``gc.callbacks``. A full collection walks every tracked object (about
half a million in this process) and lands inside one step: a pause the median step does not show,
and under DDP a wait for every other rank.

Prints one JSON line per launch and a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]


class FullCollectionLog(pl.Callback):
    """Built by the CLI in the launched run (``--trainer.callbacks+=`` its class path)."""

    def __init__(self, out: str, unfreeze: bool = False):
        self.out, self.unfreeze = out, unfreeze
        self.pauses: list[float] = []
        self.on, self.started, self.tracked = False, 0.0, 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if self.on and info["generation"] == 2:
            if phase == "start":
                self.started = time.perf_counter()
            else:
                self.pauses.append((time.perf_counter() - self.started) * 1000)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.on:
            if self.unfreeze:
                gc.unfreeze()
            self.tracked = len(gc.get_objects()) + gc.get_freeze_count()
            self.on = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.on = False
        result = {"steps": trainer.global_step, "tracked": self.tracked, "pauses": self.pauses}
        Path(self.out).write_text(json.dumps(result))


def launch(data: str, steps: int, unfreeze: bool) -> dict:
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "gc.json"
        init_args = {"out": str(out), "unfreeze": unfreeze}
        callback = {"class_path": "bench_gc_pauses.FullCollectionLog", "init_args": init_args}
        command = [sys.executable, "-m", "lorafit.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml")]
        command += ["--data.train_dir", data, "--trainer.default_root_dir", str(Path(root) / "run")]
        command += ["--trainer.max_steps", str(steps), "--samples.prompts", "[]", "--trainer.logger", "false"]
        command += ["--trainer.callbacks+=" + json.dumps(callback)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tools"), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise SystemExit(f"lorafit fit failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows: dict[str, list[dict]] = {"frozen (lorafit)": [], "handed back at the first step (before)": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "toy-data")
        subprocess.run([sys.executable, "-m", "lorafit.cli", "toy-data", data], check=True, capture_output=True)
        for _ in range(args.repeats):
            for name, unfreeze in zip(rows, (False, True)):
                result = launch(data, args.steps, unfreeze)
                print(json.dumps({"mode": name, **result, "pauses": [round(p, 1) for p in result["pauses"]]}))
                rows[name].append(result)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    print(f"\n{datetime.date.today().isoformat()} · {machine} · {args.steps} steps, {args.repeats} launches each\n")
    print("| | objects at the first step | full collections per run | longest | total per run |\n|---|---|---|---|---|")
    for name, results in rows.items():
        counts = [len(r["pauses"]) for r in results]
        longest = max((p for r in results for p in r["pauses"]), default=0.0)
        total = statistics.median(sum(r["pauses"]) for r in results)
        tracked = statistics.median(r["tracked"] for r in results)
        print(f"| {name} | {tracked:.0f} tracked | {', '.join(map(str, counts))} | {longest:.0f} ms | {total:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
