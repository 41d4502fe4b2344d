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
    """A mixin of LoraDiffusionModule: keep the VAE / text encoders on the host when no batch needs them."""

    @property
    def host_parts(self) -> tuple[str, ...]:
        """Names of the parts held outside the module tree (``vae``, ``text_encoders``)."""
        return tuple(name for name in PARKABLE if name in self.__dict__)

    def park_unused_parts(self, unused: Iterable[str]) -> None:
        """Take the ``unused`` parts out of the module tree, so ``.to(device)`` (and DDP) pass them by.

        Text encoders with LoRA always stay: they train.
        """
        for name in unused:
            if name not in PARKABLE or name not in self._modules:
                continue
            if name == "text_encoders" and self.trained_text_encoders():
                continue
            module = self._modules.pop(name)
            self.__dict__[name] = module  # found before nn.Module.__getattr__, invisible to .modules()
        if self.host_parts:
            log.info(
                "cached data: %s stay on the host (not moved to the training device)", " and ".join(self.host_parts)
            )

    @contextlib.contextmanager
    def host_parts_on_device(self, names: Iterable[str] | None = None) -> Iterator[None]:
        """The host parts (or only ``names`` of them) on the training device for the duration, then back.

        Sampling borrows the text encoders to encode the prompts and the VAE to decode, one after the
        other, so the two are never on the device at the same time. Their weights are frozen, so
        going back needs no copy: each tensor is swapped with a device copy
        (``torch.utils.swap_tensors``, so every reference to it sees the move) and swapped back.
        """
        swapped = []
        try:
            for name in self.host_parts:
                if names is not None and name not in names:
                    continue
                module = self.__dict__[name]
                for tensor in itertools.chain(module.parameters(), module.buffers()):
                    on_device = tensor.detach().to(self.device, non_blocking=True)
                    if isinstance(tensor, torch.nn.Parameter):
                        on_device = torch.nn.Parameter(on_device, requires_grad=tensor.requires_grad)
                    torch.utils.swap_tensors(tensor, on_device)
                    swapped.append((tensor, on_device))  # on_device now holds the host tensor
            yield
        finally:
            for tensor, host in reversed(swapped):
                torch.utils.swap_tensors(tensor, host)
