"""Output-preserving prior: the frozen model's own prediction on the class prompt as a second target.

ai-toolkit's "differential output preservation" (``SDTrainer``: ``diff_output_preservation``):
for the noisy latents the step trains on, the captions with the trigger replaced by the class
word ("a photo of ohwx dog" -> "a photo of dog") are run through the denoiser twice, once with
every adapter off (the base model, no gradient) and once with the LoRA, and the squared difference
is added to the loss at ``model.prior.weight``. It asks the LoRA to leave the class as the base
model draws it, like regularization images do, but against the model's own prediction instead of
a folder of class pictures (none to generate or caption, and no batches spent on them).

The base prediction is the same forward pass with the adapters switched off
(:func:`~lorafit.networks.adapter_switch.adapters_disabled`), so no second model is loaded. With a
text-encoder LoRA the class conditioning is encoded twice (adapters off, then on); without one,
once. Validation losses stay the plain denoising loss.
"""

from __future__ import annotations

import re

import torch

from lorafit.errors import LorafitError
from lorafit.networks.adapter_switch import adapters_disabled
from lorafit.training import losses
from lorafit.training.config import PriorConfig


class OutputPrior:
    """The preservation term of one run (see module docstring).

    Args:
        config: ``model.prior``.
        trigger: The word(s) replaced by ``config.class_word`` (``model.prior.trigger`` or the
            data's trigger word).
    """

    def __init__(self, config: PriorConfig, trigger: str):
        self.weight, self.class_word = config.weight, config.class_word.strip()
        # Whole words only: "ohwx" in "ohwx, dog" is replaced, in "ohwxy" it is not.
        self.pattern = re.compile(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)")
        self.trigger = trigger.strip()

    def class_captions(self, captions: list[str]) -> list[str]:
        return [self.pattern.sub(self.class_word, caption) for caption in captions]

    @staticmethod
    def check_cache(cached: dict | None) -> None:
        if cached and cached.get("text_embeddings"):
            raise LorafitError(
                "model.prior.weight: the output-preserving prior encodes the class prompts each step, but "
                "data.shards hold cached text embeddings; cache latents only (lorafit cache without "
                "--text_embeddings)"
            )

    def loss(self, step, batch: dict, draw, device: torch.device, adapted: list[torch.nn.Module]) -> torch.Tensor:
        """``weight x`` mean squared difference between the LoRA's and the base's prediction for the
        class prompts at ``draw``'s noisy latents; ``adapted``: the modules carrying adapters."""
        family, base, options = step.family, step.base, step.options
        if family.conditioning_keys[0] in batch:  # cached conditioning is the trigger captions'
            self.check_cache({"text_embeddings": True})
        class_batch = {**batch, "captions": self.class_captions(batch["captions"])}
        with torch.no_grad(), adapters_disabled(adapted):
            frozen = step.conditioning(class_batch, device, training=False)
            target = family.predict(base, draw.noisy, draw.timesteps, frozen, class_batch, options)
        conditioning = step.conditioning(class_batch, device, training=True) if step.trains_text else frozen
        prediction = family.predict(base, draw.noisy, draw.timesteps, conditioning, class_batch, options)
        per_sample = losses.per_sample_loss(prediction, target.detach())
        return self.weight * losses.weighted_mean(per_sample, batch.get("global_weights"))


def output_prior(config: PriorConfig, datamodule=None) -> OutputPrior | None:
    """The run's prior term, or None when ``model.prior.weight`` is 0; the trigger defaults to the
    data module's ``trigger_word``."""
    if config.weight <= 0:
        return None
    trigger = config.trigger or getattr(getattr(datamodule, "hparams", None), "trigger_word", None)
    if not (trigger or "").strip():
        raise LorafitError(
            "model.prior.trigger: the output-preserving prior replaces the trigger word by model.prior.class_word; "
            "set model.prior.trigger (or data.trigger_word)"
        )
    return OutputPrior(config, trigger)
