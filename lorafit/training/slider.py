"""Concept slider: a LoRA trained at strength +1 and -1 to move one attribute both ways.

Gandikota et al., "Concept Sliders" (2023), as ai-toolkit's slider trainer runs it: the training
pictures only supply noisy latents ``x_t``. At each step the frozen base model (every adapter off,
no gradient) predicts them for the positive prompt ``c+``, the negative prompt ``c-`` and the neutral
prompt ``c`` (``model.slider.target``, or each picture's caption). The LoRA, run on the neutral
prompt, regresses at strength +1 onto

    neutral + guidance * (positive - negative)

and at strength -1 onto ``neutral + guidance * (negative - positive)``: the update it learns is the
direction from ``c-`` to ``c+`` and nothing else (what both prompts share cancels), so the file
applied at strength s moves the attribute by about ``s`` steps of ``guidance`` along it, for negative
``s`` too. ai-toolkit rescales each target to the neutral prediction's mean and standard deviation
(``model.slider.normalize``; here per sample, so a sample's target does not depend on its batch). An
optional anchor prompt is held at the base's prediction at both strengths.

The loss is the mean of both strengths' squared errors (masks weigh positions as for plain LoRA);
it replaces the denoising loss in training (validation losses stay the denoising loss at strength
1). Each forward reads its strength into the graph (``adapter_strength``), so one backward through
the sum is exact without gradient checkpointing, which would recompute both passes at one strength
and is refused. Works for every family whose ``predict`` this step calls (UNet families and Flux).
"""

from __future__ import annotations

import torch

from lorafit.errors import LorafitError
from lorafit.networks.adapter_switch import adapter_strength, adapters_disabled
from lorafit.training import losses
from lorafit.training.config import MemoryConfig, NetworkConfig, PriorConfig, SliderConfig
from lorafit.training.masked_loss import latent_weights


def normalized_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``tensor`` shifted and scaled to each sample's mean and standard deviation of ``reference``."""
    dims = tuple(range(1, tensor.dim()))
    mean, std = tensor.mean(dim=dims, keepdim=True), tensor.std(dim=dims, keepdim=True)
    return (tensor - mean) / (std + 1e-8) * reference.std(dim=dims, keepdim=True) + reference.mean(
        dim=dims, keepdim=True
    )


class ConceptSlider:
    """The slider objective of one run (see module docstring).

    Args:
        config: ``model.slider`` (checked by :func:`check_slider`).
    """

    def __init__(self, config: SliderConfig):
        self.config = config
        self.positive, self.negative = config.positive.strip(), config.negative.strip()
        self.target = (config.target or "").strip() or None
        self.anchor = (config.anchor or "").strip() or None

    def neutral_prompts(self, captions: list[str]) -> list[str]:
        return [self.target] * len(captions) if self.target else list(captions)

    def targets(self, positive: torch.Tensor, negative: torch.Tensor, neutral: torch.Tensor):
        """The regression targets at strength +1 and -1 from the base's three predictions."""
        direction = self.config.guidance * (positive.float() - negative.float())
        up, down = neutral.float() + direction, neutral.float() - direction
        if self.config.normalize:
            up, down = normalized_like(up, neutral.float()), normalized_like(down, neutral.float())
        return up, down

    @staticmethod
    def check_cache(cached: dict | None) -> None:
        if cached and cached.get("text_embeddings"):
            raise LorafitError(
                "model.slider.positive: a slider encodes its prompts each step, but data.shards hold cached "
                "text embeddings; cache latents only (lorafit cache without --text_embeddings)"
            )

    def loss(self, step, batch: dict, draw, device: torch.device, adapted: list[torch.nn.Module]) -> torch.Tensor:
        """The slider loss at ``draw``'s noisy latents; ``adapted``: the modules carrying adapters."""
        family, base, options = step.family, step.base, step.options
        if family.conditioning_keys[0] in batch:
            self.check_cache({"text_embeddings": True})
        size = len(batch["captions"])
        neutral_prompts = self.neutral_prompts(batch["captions"])
        prompts = {"positive": [self.positive] * size, "negative": [self.negative] * size, "neutral": neutral_prompts}
        if self.anchor:
            prompts["anchor"] = [self.anchor] * size

        def predict(captions: list[str], text_grad: bool) -> torch.Tensor:
            with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
                conditioning = family.encode_text(base, captions, options, device)
            step_batch = {**batch, "captions": captions}
            return family.predict(base, draw.noisy, draw.timesteps, conditioning, step_batch, options)

        with torch.no_grad(), adapters_disabled(adapted):
            frozen = {name: predict(captions, False) for name, captions in prompts.items()}
        up, down = self.targets(frozen["positive"], frozen["negative"], frozen["neutral"])
        mask = batch.get("loss_mask")
        cfg = step.objective.loss_config
        weight = latent_weights(
            None if mask is None else mask.to(device), draw.noisy.shape[-2:], cfg.mask_floor, cfg.mask_normalize
        )
        total = 0.0
        for strength, target in ((1.0, up), (-1.0, down)):
            with adapter_strength(adapted, strength):
                prediction = predict(neutral_prompts, step.trains_text)
                anchor = predict(prompts["anchor"], step.trains_text) if self.anchor else None
            per_sample = losses.per_sample_loss(prediction, target, weight=weight)
            term = losses.weighted_mean(per_sample, batch.get("global_weights"))
            if anchor is not None:
                anchor_loss = losses.per_sample_loss(anchor, frozen["anchor"])
                term = term + self.config.anchor_weight * losses.weighted_mean(anchor_loss, batch.get("global_weights"))
            total = total + term / 2
        return total


def check_slider(slider: SliderConfig, network: NetworkConfig, memory: MemoryConfig, prior: PriorConfig) -> None:
    """Fail on an impossible slider (one line naming the key), before any weights are read."""
    positive, negative = (slider.positive or "").strip(), (slider.negative or "").strip()
    if not positive and not negative:
        return
    if not positive or not negative:
        missing = "positive" if not positive else "negative"
        raise LorafitError(
            f"model.slider.{missing}: a slider needs both ends, a positive and a negative prompt that differ "
            "only in the attribute (e.g. 'a person, smiling' and 'a person, frowning')"
        )
    if positive == negative:
        raise LorafitError("model.slider.negative: the same prompt as model.slider.positive; nothing to learn")
    if slider.guidance <= 0:
        raise LorafitError(f"model.slider.guidance: {slider.guidance} must be > 0 (ai-toolkit uses 3)")
    if slider.anchor_weight < 0:
        raise LorafitError(f"model.slider.anchor_weight: {slider.anchor_weight} is negative; use 0 (off) or e.g. 1")
    if network.type == "dora":
        raise LorafitError(
            "model.network.type: a DoRA's strength is not a scale of its update, so it cannot be trained at -1; "
            "train a slider as lora, locon, loha or lokr"
        )
    if memory.gradient_checkpointing:
        raise LorafitError(
            "model.memory.gradient_checkpointing: a slider runs the LoRA at +1 and -1 in one step, and checkpointing "
            "would recompute both at one strength; turn it off (or lower data.batch_size)"
        )
    if prior.weight > 0:
        raise LorafitError(
            "model.prior.weight: the output-preserving prior and a slider both replace the trigger's targets; use "
            "model.slider.anchor to keep a prompt as the base draws it"
        )


def concept_slider(slider: SliderConfig) -> ConceptSlider | None:
    """The run's slider objective, or None when ``model.slider.positive`` is empty."""
    return ConceptSlider(slider) if (slider.positive or "").strip() else None
