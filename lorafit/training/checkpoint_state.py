"""What a lorafit checkpoint holds: the adapter weights only, and what exact resume needs.

The frozen base (gigabytes) is never written: the checkpoint names its model in the
hyperparameters and holds the adapter weights, the optimizer and scheduler state (Lightning's
part), the noise seed, the start time, the count of skipped non-finite batches and every rank's
global RNG state. :func:`save` and :func:`load` are the module's ``on_save_checkpoint`` /
``on_load_checkpoint``.
"""

from __future__ import annotations

from lorafit.errors import LorafitError
from lorafit.networks.adapters import ADAPTER_NAME
from lorafit.training.resume_settings import prepare_resume
from lorafit.training.rng_state import gather_rng_states, restore_rng_states


def save(module, checkpoint: dict) -> None:
    """Keep only the adapter weights in ``checkpoint`` and add what exact resume needs."""
    module.ensure_finite()  # a checkpoint with NaN weights would replace the last good one (nonfinite.py)
    # Every adapter weight, trained or frozen (see _freeze_unread_text_layers): a resumed run must
    # export exactly what the uninterrupted one would, whatever the seed it starts with.
    adapter = {name for name, p in module.named_parameters() if p.requires_grad or f".{ADAPTER_NAME}" in name}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in adapter}
    checkpoint["lorafit"] = {
        "noise_seed": module.noise_seed,
        "started_at": module.started_at,
        "family": module.family,
        "skipped_nonfinite": module.nonfinite.skipped,
        "rng_states": gather_rng_states(),
    }


def load(module, checkpoint: dict) -> None:
    """Check ``checkpoint`` fits ``module`` (one line if not) and restore the resume state."""
    prepare_resume(checkpoint, module)  # refuses a changed network, applies the config's learning rates
    # Lightning would raise a page of "size mismatch" lines; say in one what went wrong.
    params = dict(module.named_parameters())
    for key, tensor in checkpoint.get("state_dict", {}).items():
        if key not in params or params[key].shape != tensor.shape:
            found = "is missing here" if key not in params else f"is {tuple(params[key].shape)} here"
            raise LorafitError(
                f"checkpoint LoRA weight {key} {tuple(tensor.shape)} {found}; resume with the same base model "
                "and model.network settings (rank, targets, train_text_encoder) the checkpoint was trained with"
            )
    info = checkpoint.get("lorafit", {})
    module.noise_seed = info.get("noise_seed", module.noise_seed)
    module.started_at = info.get("started_at", module.started_at)
    module.nonfinite.skipped = info.get("skipped_nonfinite", 0)
    if info.get("rng_states"):
        restore_rng_states(info["rng_states"], module.global_rank)
