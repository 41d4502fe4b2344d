"""EMA of the adapter weights: a smoother LoRA exported beside the raw one, every epoch.

An exponential moving average of the trained weights (``ema = decay * ema + (1 - decay) * w``
after every optimizer step) averages out the last steps' noise; SimpleTuner, OneTrainer and the
diffusers examples offer it, and for short, high-learning-rate LoRA runs the EMA file often keeps
the concept with fewer artefacts. The average is diffusers' own ``EMAModel`` (warm-up schedules
included) over exactly the trainable weights (adapters, and trained token embeddings):

- it is updated on the training device with ``torch._foreach`` kernels and a decay computed on
  the host from the step count, so the step never waits for the GPU (tests/test_host_syncs.py);
- every file :class:`~lorafit.callbacks.export.LoraExport` writes gets an EMA twin in
  ``lora/ema/`` (same names, same formats, ``lorafit_ema_*`` metadata): ``lorafit grid --lora
  runs/x/lora/ema`` compares its epochs like the raw ones;
- checkpoints carry the average and its update count, so a resumed run ends with the same EMA
  file as an uninterrupted one, bit for bit.

Under DDP every rank holds the same weights and so computes the same average; rank 0 writes it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import lightning.pytorch as pl
import torch

from lorafit.errors import LorafitError

log = logging.getLogger("lorafit.export")

SUBDIR = "ema"


class AdapterEMA(pl.Callback):
    """Keep an EMA of the trainable adapter weights and export it beside the raw LoRA (``ema.*``).

    Args:
        decay: The EMA decay, e.g. 0.999 (about the last 1000 steps; SimpleTuner's default 0.995
            for short runs); empty = no EMA. The decay actually used ramps up from 0, as diffusers'
            ``EMAModel`` does: ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, or the
            ``warmup`` schedule.
        update_after_step: Updates before this one only copy the weights (diffusers' ``update_after_step``).
        warmup: Use diffusers' "EMA warmup" ``1 - (1 + n) ** -power`` instead of ``(1 + n) / (10 + n)``.
        power: Exponent of the ``warmup`` schedule (2/3 for runs of a million steps, 3/4 for shorter ones).
        every_n_steps: Update after every this many optimizer steps (SimpleTuner's ``ema_update_interval``).
    """

    def __init__(
        self,
        decay: float | None = None,
        update_after_step: int = 0,
        warmup: bool = False,
        power: float = 2 / 3,
        every_n_steps: int = 1,
    ):
        if decay is not None and not 0.0 < decay < 1.0:
            raise LorafitError(f"ema.decay: {decay}; use a value between 0 and 1 such as 0.999, or leave it empty")
        if every_n_steps < 1:
            raise LorafitError(f"ema.every_n_steps: {every_n_steps}; use 1 or more")
        self.decay, self.update_after_step, self.warmup, self.power = decay, update_after_step, warmup, power
        self.every_n_steps = every_n_steps
        self._ema = None  # diffusers' EMAModel, built when training starts
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._loaded: dict | None = None
        self._last_step = -1

    @property
    def enabled(self) -> bool:
        return self.decay is not None

    @staticmethod
    def tracked(pl_module) -> list[tuple[str, torch.nn.Parameter]]:
        """The weights the optimizer trains, by name (the same set, in the same order, on every rank)."""
        return [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]

    def on_train_start(self, trainer, pl_module) -> None:
        # Here, not in setup: the weights and this callback's saved state are both loaded by now,
        # and trainer.global_step is the resumed one.
        if not self.enabled:
            return
        from diffusers.training_utils import EMAModel

        named = self.tracked(pl_module)
        self._names, self._params = [name for name, _ in named], [p for _, p in named]
        self._ema = EMAModel(
            self._params,
            decay=self.decay,
            update_after_step=self.update_after_step,
            use_ema_warmup=self.warmup,
            power=self.power,
            foreach=True,
        )
        if self._loaded is not None:
            self._restore(self._loaded, pl_module.device)
            self._loaded = None
        elif trainer.global_step:
            log.info("ema: the checkpoint holds no EMA; it starts from the weights of step %d", trainer.global_step)
        self._last_step = trainer.global_step

    def _restore(self, state: dict, device: torch.device) -> None:
        if state.get("names") != self._names:
            raise LorafitError(
                "the checkpoint's EMA tracks other weights than this run trains (another network, "
                "text encoder or embedding setting); resume with the checkpoint's settings or turn ema off"
            )
        shadow = [tensor.to(device) for tensor in state["shadow_params"]]
        self._ema.shadow_params = shadow
        self._ema.optimization_step = int(state["optimization_step"])

    def update(self, trainer) -> None:
        """One EMA update per optimizer step (idempotent within a step; gradient accumulation
        calls the batch hooks once per micro-batch)."""
        step = trainer.global_step
        if self._ema is None or step == self._last_step:
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            self._ema.step(self._params)  # on-device foreach kernels; the decay is a host float

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.update(trainer)

    # ---- export ------------------------------------------------------------------------

    def export_variant(self, trainer) -> tuple[str, dict[str, str]] | None:
        """``(sub-folder, extra metadata)`` of the EMA twin files, or None when there is no EMA yet."""
        if self._ema is None:
            return None
        self.update(trainer)  # a step export may run before this callback's batch hook
        metadata = {
            "lorafit_ema_decay": str(self.decay),
            "lorafit_ema_updates": str(self._ema.optimization_step),
            "lorafit_ema_warmup": str(self.warmup),
        }
        return SUBDIR, metadata

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the module for the duration (for export), the trained ones afterwards."""
        self._ema.store(self._params)
        self._ema.copy_to(self._params)
        try:
            yield
        finally:
            self._ema.restore(self._params)

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self._ema is None:
            return {}
        return {
            "names": list(self._names),
            "optimization_step": self._ema.optimization_step,
            "shadow_params": [tensor.detach().to("cpu", copy=True) for tensor in self._ema.shadow_params],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and self.enabled:
            self._loaded = state_dict
        elif state_dict:
            log.info("ema: the checkpoint holds an EMA but ema.decay is empty here; it is not continued")
