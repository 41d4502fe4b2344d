"""Keep Python's cyclic garbage collector off the objects built before training.

By the first step a ``lorafit fit`` process tracks about half a million Python objects: the modules
of torch, Lightning, diffusers, transformers and PEFT, the base model's ``nn.Module`` tree with its
LoRA layers, the parsed config. Python's collector walks all of them in each full collection, and
the objects those set-up steps leave pending trigger one within the first epoch: a pause of about
200 ms in the middle of a step on the toy demo (measured with ``gc.callbacks``, issue 19), and under
DDP a pause on one rank that every other rank waits for at the next all-reduce. The steps themselves
free their tensors by reference counting and leave almost no cycles.

So at the start of training everything alive is moved to the collector's permanent generation
(``gc.freeze()``, the mechanism Python documents for long-lived set-up state); the collector keeps
running, only over what training creates. ``gc.collect()`` first would free the few cycles set-up
left (about 30 objects on the demo) at the price of that same 200 ms walk, so it is not done. At the
end of training (or on an error) the objects go back to the collector.
"""

from __future__ import annotations

import gc

import lightning.pytorch as pl


class SetupObjectsFrozen(pl.Callback):
    """``gc.freeze()`` from the start of training to its end (see module docstring)."""

    def __init__(self):
        self._frozen = False

    def on_train_start(self, trainer, pl_module) -> None:
        gc.freeze()
        self._frozen = True

    def _unfreeze(self) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False

    def on_train_end(self, trainer, pl_module) -> None:
        self._unfreeze()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._unfreeze()
