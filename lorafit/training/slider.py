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

With ``model.slider.image_pairs`` the slider learns from pictures instead (ai-toolkit's image
reference slider, the paper's image-based sliders): each training picture holds a pair side by side,
left "less", right "more". Both halves get the same noise and timestep (plain noise, the recipe's
timestep distribution); the LoRA at +1 learns to denoise the right half, at -1 the left half, with
the family's own target and loss weighting, each picture's caption as the prompt.
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
        self.positive, self.negative = (config.positive or "").strip(), (config.negative or "").strip()
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

    def check_cache(self, cached: dict | None) -> None:
        if cached and cached.get("text_embeddings") and not self.config.image_pairs:
            raise LorafitError(
                "model.slider.positive: a slider encodes its prompts each step, but data.shards hold cached "
                "text embeddings; cache latents only (lorafit cache without --text_embeddings)"
            )

    def loss(
        self, step, batch: dict, latents: torch.Tensor, generator: torch.Generator, device, adapted
    ) -> torch.Tensor:
        """The slider loss on ``latents`` (noised with ``generator``); ``adapted``: the modules carrying adapters."""
        if self.config.image_pairs:
            return self.pair_loss(step, batch, latents, generator, device, adapted)
        draw = step.objective.draw(latents, generator, batch.get("global_rows"), batch.get("global_size"))
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

    def pair_loss(self, step, batch: dict, latents: torch.Tensor, generator, device, adapted) -> torch.Tensor:
        """Image pairs: the right half denoised at +1, the left half at -1, same noise and timesteps."""
        width = latents.shape[-1]
        if width % 2:
            raise LorafitError(
                f"model.slider.image_pairs: a picture {width} latents wide does not split into two halves; use "
                "pictures whose bucket width is a multiple of twice data.bucket_reso_steps"
            )
        less, more = latents[..., : width // 2], latents[..., width // 2 :]
        rows, size = batch.get("global_rows"), batch.get("global_size")
        timesteps = step.objective.draw(more, generator, rows, size).timesteps  # the recipe's distribution
        shape = more.shape if rows is None else (size, *more.shape[1:])
        noise = torch.randn(shape, generator=generator, device=more.device)
        noise = noise if rows is None else noise[rows.to(noise.device)]
        half = dict(batch)
        if "original_size" in batch:  # SDXL's size conditioning: each half is a picture of its own
            half["original_size"] = batch["original_size"].clone()
            half["original_size"][:, 1] //= 2
            half["crop_top_left"] = batch["crop_top_left"].clone()
            half["crop_top_left"][:, 1] //= 2
        mask = batch.get("loss_mask")
        cfg = step.objective.loss_config
        total = 0.0
        for strength, part, side in ((1.0, more, 1), (-1.0, less, 0)):
            draw = step.objective.at(part, noise, timesteps)
            weight = None
            if mask is not None:
                mask_half = mask.chunk(2, dim=-1)[side].to(device)
                weight = latent_weights(mask_half, part.shape[-2:], cfg.mask_floor, cfg.mask_normalize)
            with adapter_strength(adapted, strength):
                conditioning = step.conditioning(half, device, training=True)
                prediction = step.family.predict(
                    step.base, draw.noisy, draw.timesteps, conditioning, half, step.options
                )
            loss = step.objective.loss(
                prediction, draw.target, draw.timesteps, batch.get("is_reg"), batch.get("global_weights"), weight
            )
            total = total + loss / 2
        return total


def check_slider(slider: SliderConfig, network: NetworkConfig, memory: MemoryConfig, prior: PriorConfig) -> None:
    """Fail on an impossible slider (one line naming the key), before any weights are read."""
    positive, negative = (slider.positive or "").strip(), (slider.negative or "").strip()
    if slider.image_pairs and (positive or negative):
        raise LorafitError(
            "model.slider.image_pairs: the slider learns from the picture pairs; leave model.slider.positive and "
            "negative empty (or train a prompt-pair slider without image_pairs)"
        )
    if not positive and not negative and not slider.image_pairs:
        return
    if not slider.image_pairs and (not positive or not negative):
        missing = "positive" if not positive else "negative"
        raise LorafitError(
            f"model.slider.{missing}: a slider needs both ends, a positive and a negative prompt that differ "
            "only in the attribute (e.g. 'a person, smiling' and 'a person, frowning')"
        )
    if positive and positive == negative:
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


def concept_slider(slider: SliderConfig, datamodule=None) -> ConceptSlider | None:
    """The run's slider objective, or None when neither ``model.slider.positive`` nor ``image_pairs`` is set;
    image pairs refuse the data module's flips and random crops, which would tear a pair apart."""
    if not (slider.positive or "").strip() and not slider.image_pairs:
        return None
    settings = getattr(datamodule, "hparams", None)
    if slider.image_pairs:
        for key in ("flip_aug", "random_crop"):
            if getattr(settings, key, False):
                raise LorafitError(
                    f"data.{key}: would swap or shift the halves of model.slider.image_pairs pictures; turn it off"
                )
    return ConceptSlider(slider)
