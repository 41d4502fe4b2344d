"""lorafit's own training module on a random-weight architecture: the step the benchmark times.

Everything but loading is ``LoraDiffusionModule``'s: LoRA attachment (``configure_model``), the
training step, gradient checkpointing, ``torch.compile`` and the optimizer, so the benchmark times
exactly what ``lorafit fit`` runs.
"""

from __future__ import annotations

from lorafit.bench.architectures import base_model
from lorafit.families.family import BaseModel
from lorafit.families.loading import DTYPES
from lorafit.training.module import LoraDiffusionModule


class BenchLoraModule(LoraDiffusionModule):
    """``LoraDiffusionModule`` whose base model is built from the published configs, random weights.

    Args:
        family: ``sd1`` (SD1.5), ``sdxl``, ``flux`` (FLUX.1 [dev]) or ``flux-schnell``.
        width_divisor: Divide every channel width by this (1 = the real model; 8 for CPU runs).
        build_device: Where the frozen base is built: ``cpu``, ``cuda`` or ``meta`` (FLOP counting,
            nothing allocated).
        with_vae: Build the VAE's weights (on-the-fly latents); without it only its settings exist.
        **kwargs: ``LoraDiffusionModule`` arguments (network, optimizer, memory, weight_dtype,
            quantization, ...).
    """

    def __init__(
        self, family: str, width_divisor: int = 1, build_device: str = "cpu", with_vae: bool = False, **kwargs
    ):
        super().__init__(model=f"bench/{family}", **kwargs)
        self.bench_family = family
        self.width_divisor = width_divisor
        self.build_device = build_device
        self.with_vae = with_vae

    def load_base(self) -> BaseModel:
        hp = self.hparams
        return base_model(
            self.bench_family,
            self.width_divisor,
            self.build_device,
            DTYPES[hp.weight_dtype],
            self.with_vae,
            hp.quantization,
        )
