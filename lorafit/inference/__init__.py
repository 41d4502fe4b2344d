"""Looking at what a LoRA does: sample images, ``generate``, the epoch grid, selection metrics, ``probe``."""
