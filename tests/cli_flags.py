"""Command-line flags shared by tests that run `lorafit fit` for a few steps on the CPU."""

from __future__ import annotations


def cpu_fit_flags(train_dir, root, max_steps: int = 2, no_samples: bool = False) -> list[str]:
    """Small buckets, no workers, fp32 on the CPU, no logger or progress bar, outputs under ``root``."""
    flags = ["--data.train_dir", str(train_dir), "--data.resolution", "64", "--data.min_bucket_reso", "64"]
    flags += ["--data.max_bucket_reso", "128", "--data.num_workers", "0", "--trainer.accelerator", "cpu"]
    flags += ["--trainer.precision", "32-true", "--trainer.max_steps", str(max_steps), "--trainer.logger", "false"]
    flags += ["--trainer.enable_progress_bar", "false"]
    if no_samples:
        flags += ["--samples.prompts", "[]"]
    return flags + ["--trainer.default_root_dir", str(root)]
