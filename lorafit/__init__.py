"""lorafit: LoRA training for Stable Diffusion 1.x, 2.x and SDXL on PyTorch Lightning."""

__version__ = "0.1.0"
