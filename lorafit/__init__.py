"""lorafit: LoRA training for Stable Diffusion 1.x, 2.x and SDXL on PyTorch Lightning."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``lorafit.load_lora`` etc. without importing torch/diffusers on ``import lorafit`` (the CLI
    # starts faster and ``lorafit --help`` works without them loaded).
    if name in ("load_lora", "set_lora_weight", "set_block_weights", "unload_lora", "loaded_loras"):
        from lorafit.networks import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'lorafit' has no attribute {name!r}")
