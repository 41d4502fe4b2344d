"""What one benchmark row measures (``BenchSetting``), how it maps onto lorafit's options, and the presets.

A setting names every knob that changes speed or memory; the bench runs lorafit's module with the
matching ``LoraDiffusionModule`` arguments and the plain reference loop with the same choices.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from lorafit.bench.architectures import ARCHITECTURES
from lorafit.errors import LorafitError

PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
OPTIMIZERS = ("adamw", "adamw-fused", "adamw8bit", "adafactor")
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn", "math")
LATENTS = ("cached", "vae")
TARGETS = ("attn", "attn-mlp", "full")
QUANTIZATIONS = ("none", "nf4")


@dataclass(frozen=True)
class BenchSetting:
    """One row of the grid.

    Args:
        family: ``sd1`` (SD1.5 architecture), ``sdxl``, ``flux`` (FLUX.1 [dev]) or ``flux-schnell``.
        resolution: Image side in pixels (latents are 1/8 of it; Flux: a multiple of 16).
        batch_size: Images per step.
        rank: LoRA rank (alpha = rank).
        targets: lorafit's ``target_preset``: ``attn``, ``attn-mlp`` or ``full``.
        precision: ``fp32``; ``bf16-autocast`` (fp32 base weights, bf16 autocast); ``bf16-weights``
            (bf16 base weights, bf16 autocast; LoRA weights stay fp32 in both).
        gradient_checkpointing: lorafit's ``gradient_checkpointing``.
        sdpa: ``default`` (PyTorch picks) or a forced ``torch.nn.attention.SDPBackend``.
        channels_last: UNet weights and activations in channels-last memory format.
        compile: lorafit's ``compile_unet`` (``torch.compile`` of the UNet).
        optimizer: ``adamw`` (torch's default: foreach on CUDA), ``adamw-fused``, ``adamw8bit``
            (bitsandbytes) or ``adafactor`` (transformers, fixed learning rate).
        latents: ``cached`` (the batch carries VAE moments) or ``vae`` (encode pixels every step).
        width_divisor: Every channel width divided by this; 1 = the real model.
        quantization: Storage of the frozen denoiser: ``none`` (the precision's dtype) or ``nf4``
            (bitsandbytes NF4 computing in bf16, or float32 with ``precision=fp32``), as
            ``model.quantization`` loads it (:mod:`lorafit.bench.nf4`).
        text_tokens: Flux: T5 tokens per caption (``model.conditioning.max_sequence_length``); 0 =
            the pipeline's default, 512 for [dev] and 256 for [schnell]. CLIP families: 0.
    """

    family: str = "sdxl"
    resolution: int = 1024
    batch_size: int = 1
    rank: int = 32
    targets: str = "attn"
    precision: str = "bf16-weights"
    gradient_checkpointing: bool = False
    sdpa: str = "default"
    channels_last: bool = False
    compile: bool = False
    optimizer: str = "adamw-fused"
    latents: str = "cached"
    width_divisor: int = 1
    quantization: str = "none"
    text_tokens: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("precision", PRECISIONS),
            ("optimizer", OPTIMIZERS),
            ("sdpa", SDPA_BACKENDS),
            ("latents", LATENTS),
            ("targets", TARGETS),
            ("family", tuple(ARCHITECTURES)),
            ("quantization", QUANTIZATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise LorafitError(
                    f"bench --{name.replace('_', '-')}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        if self.text_tokens and ARCHITECTURES[self.family].denoiser_part != "transformer":
            raise LorafitError(f"bench --text-tokens: {self.family} reads CLIP's 77 tokens; leave it 0")

    def module_kwargs(self) -> dict[str, Any]:
        """``LoraDiffusionModule`` arguments of this setting."""
        optimizer, args = {
            "adamw": ("AdamW", {"fused": False}),  # torch's default update (lorafit's own default is fused)
            "adamw-fused": ("AdamW", {"fused": True}),
            "adamw8bit": ("AdamW8bit", {}),
            "adafactor": ("Adafactor", {"scale_parameter": False, "relative_step": False, "warmup_init": False}),
        }[self.optimizer]
        # NF4 computes in the weight dtype (lorafit's bnb_4bit_compute_dtype), so bf16 autocast
        # over an NF4 base means bf16 compute, as configs/presets/flux-lowvram.yaml trains.
        bf16_weights = self.precision == "bf16-weights" or (self.quantization == "nf4" and self.precision != "fp32")
        return dict(
            weight_dtype="bfloat16" if bf16_weights else "float32",
            quantization=self.quantization,
            network={"rank": self.rank, "alpha": float(self.rank), "preset": self.targets},
            conditioning={"max_sequence_length": self.text_tokens or None},
            optimizer={"name": optimizer, "args": args, "learning_rate": 1e-4},
            memory={
                "gradient_checkpointing": self.gradient_checkpointing,
                "channels_last": self.channels_last,
                "compile": self.compile,
            },
        )

    @property
    def trainer_precision(self) -> str:
        return "32-true" if self.precision == "fp32" else "bf16-mixed"

    @property
    def label(self) -> str:
        """Short description of what differs from the defaults, for tables."""
        default = BenchSetting()
        parts = [f"{self.family} {self.resolution}px b{self.batch_size}"]
        for field in dataclasses.fields(self):
            if field.name in ("family", "resolution", "batch_size"):
                continue
            value = getattr(self, field.name)
            if value != getattr(default, field.name):
                parts.append(
                    field.name if value is True else f"no-{field.name}" if value is False else f"{field.name}={value}"
                )
        return " ".join(parts)


def grid(base: BenchSetting, **choices: list) -> list[BenchSetting]:
    """Every combination of ``choices`` (field -> values) applied to ``base``."""
    names = [name for name, values in choices.items() if values]
    return [
        dataclasses.replace(base, **dict(zip(names, combo)))
        for combo in itertools.product(*(choices[name] for name in names))
    ]


def _vary(base: BenchSetting, *changes: dict) -> list[BenchSetting]:
    return [dataclasses.replace(base, **change) for change in changes]


SDXL = BenchSetting()  # the target row: SDXL 1024², rank 32 attention, cached, bf16 weights
SD15 = BenchSetting(family="sd1", resolution=512, batch_size=8)
LOW_VRAM = BenchSetting(gradient_checkpointing=True, optimizer="adafactor")  # configs/presets/sdxl-lowvram.yaml
# configs/flux.yaml: FLUX.1 [dev] 1024², rank 16 on attention + MLP, AdamW8bit, checkpointing, bf16 base.
FLUX = BenchSetting(
    family="flux", rank=16, targets="attn-mlp", optimizer="adamw8bit", gradient_checkpointing=True, resolution=1024
)

PRESETS: dict[str, list[BenchSetting]] = {
    # ~25 min of H100 time (see docs/performance.md): each row builds the model, warms up and times
    # lorafit's step and the reference loop; the compile rows spend most of their time compiling.
    "h100": [
        *_vary(
            SDXL,
            {},
            {"batch_size": 4},
            {"compile": True},
            {"compile": True, "batch_size": 4},
            {"gradient_checkpointing": True},
            {"gradient_checkpointing": True, "batch_size": 4},
            {"precision": "bf16-autocast"},
            {"optimizer": "adamw"},
            {"optimizer": "adamw8bit"},
            {"sdpa": "flash"},
            {"sdpa": "cudnn"},
            {"latents": "vae"},
            {"targets": "attn-mlp"},
        ),
        *_vary(
            SD15,
            {},
            {"batch_size": 32},
            {"channels_last": True},
            {"compile": True},
            {"compile": True, "channels_last": True, "batch_size": 32},
        ),
        *_vary(LOW_VRAM, {}, {"optimizer": "adamw8bit"}),
    ],
    "low-vram": _vary(LOW_VRAM, {}, {"optimizer": "adamw8bit"}, {"gradient_checkpointing": False}),
    # Always runs: the real block layout at 1/8 of the width, small images, on 1-2 CPU cores.
    "cpu": [
        *_vary(
            dataclasses.replace(
                SD15, resolution=256, batch_size=1, width_divisor=8, precision="fp32", optimizer="adamw"
            ),
            {},
            {"gradient_checkpointing": True},
            {"latents": "vae"},
            {"channels_last": True},
        ),
        *_vary(
            dataclasses.replace(SDXL, resolution=256, width_divisor=8, precision="fp32", optimizer="adamw"),
            {},
            {"precision": "bf16-weights"},
            {"gradient_checkpointing": True, "optimizer": "adafactor"},
            {"optimizer": "adamw8bit"},
        ),
        # Flux at 1/8 width (3 heads of 128), 256 px = 256 image tokens; 32 T5 tokens keep 1024²'s
        # 8 image tokens per text token (4096 : 512).
        *_vary(
            dataclasses.replace(
                FLUX,
                resolution=256,
                width_divisor=8,
                precision="fp32",
                optimizer="adamw",
                gradient_checkpointing=False,
                text_tokens=32,
            ),
            {},
            {"gradient_checkpointing": True},
            {"quantization": "nf4"},
        ),
    ],
}
# The CI-sized rows of tests/test_bench.py: the smallest steps that still have every part.
PRESETS["ci"] = [
    BenchSetting(family="sdxl", resolution=64, width_divisor=8, precision="fp32", optimizer="adamw", rank=4),
    BenchSetting(
        family="flux", resolution=64, width_divisor=8, precision="fp32", optimizer="adamw", rank=4, text_tokens=64
    ),
]
