"""Frozen parts that cached data never runs stay in host memory, off the GPU.

With latents cached by ``lorafit cache`` no batch goes through the VAE, and with text embeddings
cached too (and no text-encoder LoRA) none goes through the text encoders. On the GPU they would
only take memory: about 0.17 GB for the VAE and 1.6 GB for SDXL's two text encoders in bf16, a
fifth of an 8 GB card (kohya's ``cache_latents`` / ``cache_text_encoder_outputs`` keep them on the
CPU likewise). Lightning moves every submodule of the LightningModule to the device, so such parts
leave the module tree (``park_unused_parts``); the attributes stay, and sampling borrows them on the
device for a round of images (``host_parts_on_device``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator

import torch

log = logging.getLogger("lorafit.train")

PARKABLE = ("vae", "text_encoders")


class HostParts:
    """Keep the VAE / text encoders of ``module`` on the host when no batch needs them (see module docstring).

    Parked parts leave ``module._modules`` for ``module.__dict__``: the attribute still resolves
    (``module.vae``), but ``.modules()``, ``.to()`` and DDP no longer see it.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the parts held outside the module tree (``vae``, ``text_encoders``)."""
        return tuple(name for name in PARKABLE if name in self.module.__dict__)

    def park(self, unused: Iterable[str], text_encoders_train: bool) -> None:
        """Take the ``unused`` parts out of the module tree, so ``.to(device)`` (and DDP) pass them by.

        Text encoders with LoRA always stay: they train.
        """
        module = self.module
        for name in unused:
            if name not in PARKABLE or name not in module._modules:
                continue
            if name == "text_encoders" and text_encoders_train:
                continue
            part = module._modules.pop(name)
            module.__dict__[name] = part  # found before nn.Module.__getattr__, invisible to .modules()
        if self.names:
            log.info("cached data: %s stay on the host (not moved to the training device)", " and ".join(self.names))

    @contextlib.contextmanager
    def on_device(self, device: torch.device, names: Iterable[str] | None = None) -> Iterator[None]:
        """The host parts (or only ``names`` of them) on ``device`` for the duration, then back.

        Sampling borrows the text encoders to encode the prompts and the VAE to decode, one after the
        other, so the two are never on the device at the same time. Their weights are frozen, so
        going back needs no copy: each tensor is swapped with a device copy
        (``torch.utils.swap_tensors``, so every reference to it sees the move) and swapped back.
        """
        swapped = []
        try:
            for name in self.names:
                if names is not None and name not in names:
                    continue
                part = self.module.__dict__[name]
                for tensor in itertools.chain(part.parameters(), part.buffers()):
                    on_device = tensor.detach().to(device, non_blocking=True)
                    if isinstance(tensor, torch.nn.Parameter):
                        on_device = torch.nn.Parameter(on_device, requires_grad=tensor.requires_grad)
                    torch.utils.swap_tensors(tensor, on_device)
                    swapped.append((tensor, on_device))  # on_device now holds the host tensor
            yield
        finally:
            for tensor, host in reversed(swapped):
                torch.utils.swap_tensors(tensor, host)


def note_resident_text_encoders(text_encoders: list, parked: Iterable[str], flow: bool) -> None:
    """Say how much memory several text encoders take when they stay on the device and run every step."""
    if len(text_encoders) < 2 or "text_encoders" in parked:
        return
    size = sum(p.numel() * p.element_size() for e in text_encoders for p in e.parameters()) / 2**30
    log.info(
        "the text encoders (%.2f GB here) stay on the training device and run every step; cache the "
        "text embeddings (`lorafit cache ... --text_embeddings true`, data.shards) to free them%s",
        size,
        " (T5-XXL alone is 9.5 GB in bf16)" if flow else "",
    )
