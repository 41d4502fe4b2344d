"""Lightning's own cost per training step, on a model too small to hide it.

    python tools/bench_lightning_loop.py [--steps 600] [--repeats 3]

A 4-layer MLP (64 wide, batch 16) trained on one fixed batch, so the step's own work is well under
a millisecond and what is left is the loop: a plain PyTorch loop (forward, backward, clipping at 1.0,
AdamW, zero_grad) against Lightning's ``Trainer.fit`` with automatic optimization (clipping by
``gradient_clip_val``), with manual optimization (``manual_backward``, ``clip_gradients``), and with
automatic optimization and ten callbacks that do nothing (Lightning's per-hook dispatch). No
progress bar, logger, checkpoint or model summary. Median microseconds a step, after 20 warm-up
steps, median over the repeats. Used in benchmarks/RESULTS.md ("Per-step overhead on the toy demo").
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

WARMUP = 20


class OneBatch(IterableDataset):
    def __init__(self, steps: int):
        self.steps, self.x = steps, torch.randn(16, 64)

    def __iter__(self):
        return (self.x for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])


class Mlp(pl.LightningModule):
    def __init__(self, manual: bool):
        super().__init__()
        self.net, self.automatic_optimization = mlp(), not manual

    def training_step(self, x, batch_idx):
        loss = self.net(x).pow(2).mean()
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, 1.0, "norm")
        optimizer.step()
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), 1e-3)


class Clock(pl.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())


def _median_step_us(starts: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(starts[WARMUP:], starts[WARMUP + 1 :])) * 1e6


def lightning_step(steps: int, manual: bool, idle_callbacks: int) -> float:
    clock = Clock()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=None if manual else 1.0,
        callbacks=[clock, *(pl.Callback() for _ in range(idle_callbacks))],
    )
    trainer.fit(Mlp(manual), DataLoader(OneBatch(steps), batch_size=None))
    return _median_step_us(clock.starts)


def plain_step(steps: int) -> float:
    model, x, starts = mlp(), torch.randn(16, 64), []
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(steps):
        starts.append(time.perf_counter())
        model(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return _median_step_us(starts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = {
        "plain loop": lambda: plain_step(args.steps),
        "Lightning, automatic optimization": lambda: lightning_step(args.steps, False, 0),
        "Lightning, manual optimization": lambda: lightning_step(args.steps, True, 0),
        "Lightning, automatic, + 10 idle callbacks": lambda: lightning_step(args.steps, False, 10),
    }
    results: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, run in variants.items():
            results.setdefault(name, []).append(run())
    print("| loop | median step |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.0f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
