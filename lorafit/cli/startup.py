"""What a ``lorafit`` process does before any library loads: keep library start-up noise off the screen.

A user should see lorafit's own lines, and a library's only when it is about their run. Two kinds
of start-up noise are handled here, each narrowly:

* **bitsandbytes is not imported until asked for** (:func:`block_optional_imports`). diffusers
  (``diffusers.quantizers``), PEFT and transformers import it at import time whenever it is
  installed; on CPUs with AVX512-BF16 its import then fetches a kernel from the Hugging Face Hub,
  logging two warnings ("Failed to load CPU gemm_4bit_forward ...") on every verb, and costs about a
  second. lorafit lifts the block where bitsandbytes is used (the 8-bit optimizers,
  :func:`lorafit.training.optim.optimizer_class`); see lorafit/io/optional_imports.py.
* **Known-benign notices are filtered by their exact text**, never by level or by library, so a
  library warning about the user's run still shows. Each entry below says why it is benign.
"""

from __future__ import annotations

import logging
import re
import warnings

from lorafit.io.optional_imports import BITSANDBYTES, block_import

# (logger name, message pattern): log records lorafit drops, matched against the formatted message.
KNOWN_BENIGN_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # bitsandbytes' CPU 4-bit matmul kernel from the Hub: lorafit never runs 4-bit matmuls on the
    # CPU (its 8-bit optimizers do not use them), and offline the fetch can only fail.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community: "),
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
    # transformers 5 without torchvision: lorafit's image processors (CLIP for grid/probe metrics)
    # run on the PIL backend it falls back to, which is what transformers 4 always used.
    (
        "transformers.utils.import_utils",
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
    ),
    # SD3's encode_prompt (which training calls) tokenizes each caption untruncated to warn, every batch, that
    # CLIP reads 77 tokens and T5 max_sequence_length: training truncates long captions as every trainer does
    # (`lorafit prepare` lists the captions over the limit once).
    (
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
        r"The following part of your input was truncated because",
    ),
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the specified maximum"),
)

# Python warnings lorafit silences, by the start of their message (a regex, as warnings.filterwarnings takes).
KNOWN_BENIGN_WARNINGS: tuple[str, ...] = (
    # lorafit passes the (rewritten) command line to LightningCLI on purpose.
    "LightningCLI's args parameter is intended to run from within Python",
    # lorafit's streaming dataset has a length (the epoch's exact batch count, lorafit/data/epoch_plan.py)
    # and splits the shards over DataLoader workers itself, so the count Lightning doubts is right.
    re.escape("Your `IterableDataset` has `__len__` defined. In combination with multi-process data loading"),
    # Frozen base modules stay in eval mode by design (no dropout in the frozen parts).
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # diffusers passes a deprecated argument to huggingface_hub; nothing a user can change.
    ".*local_dir_use_symlinks",
    # Lightning's pytree use on torch 2.13.
    re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
    # val_dataloader returns [] when no data.val_dir is set: no validation, nothing to warn about.
    "Total length of `list` across ranks is zero",
    # Lightning's hint on a machine with SLURM installed, for a run started without srun: lorafit runs
    # locally then on purpose (`lorafit submit` writes the sbatch script that uses srun).
    re.escape("The `srun` command is available on your system but is not used"),
    # Several LoRAs loaded into one pipeline (generate/grid) is intended.
    "Already found a `peft_config` attribute",
    # diffusers' own ChromaTransformer2DModel builds FluxPosEmbed from its deprecated place; nothing a user can change.
    re.escape("`FluxPosEmbed` is deprecated and will be removed"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def block_optional_imports() -> None:
    """Keep bitsandbytes unimportable until lorafit's code asks for it."""
    block_import(BITSANDBYTES)


def quiet_known_notices() -> None:
    """Install the exact-message filters above (idempotent: a filter is added once per logger)."""
    for name, pattern in KNOWN_BENIGN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecords) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropKnownRecords(pattern))
    for message in KNOWN_BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
