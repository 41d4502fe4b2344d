"""What the data module checks and says once it has planned the first epoch: cached shards that
cannot serve these data settings, epochs no batch can fill or too large to plan, and the plan itself."""

from __future__ import annotations

import logging

from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")

# The most samples one epoch may hold: far beyond any LoRA dataset, below what planning can hold.
MAX_SAMPLES_PER_EPOCH = 100_000_000


def check_cached_settings(cached: dict | None, key: str, resolution: int, spec, hp, captions_fixed: bool) -> None:
    """Refuse data settings that latents cached by ``lorafit cache`` (``cached``: the shards' record of it)
    cannot honour: other buckets, per-draw crops or colours, flips not cached, changing captions."""
    if not cached:
        return
    if cached["resolution"] != resolution or cached.get("bucket_spec") != repr(spec):
        raise LorafitError(
            f"{key} holds latents cached for {cached['bucket_spec']}; set the same data.* bucket "
            "settings or run `lorafit cache` again"
        )
    if hp.random_crop or hp.color_aug:
        raise LorafitError(
            "cached latents fix each crop and colour; turn data.random_crop/data.color_aug off "
            "or train from uncached shards"
        )
    if hp.flip_aug and not cached.get("flip_aug"):
        raise LorafitError("data.flip_aug needs latents cached with flips: run `lorafit cache ... --flip_aug true`")
    if cached.get("text_embeddings") and not captions_fixed:
        raise LorafitError(
            "these shards hold cached text embeddings, so captions cannot change per draw; "
            "turn off trigger_word/shuffle_caption/caption dropout or cache latents only"
        )


def check_epoch_size(plan, key: str, batch_size: int, world: int, global_batch: bool) -> None:
    """Refuse an epoch no batch can fill, or too large to plan (a repeats field gone wrong)."""
    samples = sum(map(sum, plan.copies))
    if samples > MAX_SAMPLES_PER_EPOCH:
        raise LorafitError(
            f"{key}: {samples} samples per epoch (repeats included) is more than lorafit plans "
            f"({MAX_SAMPLES_PER_EPOCH}); lower the repeat counts or data.repeats"
        )
    batch, per_rank = batch_size, samples // world
    if global_batch:  # every rank plays the one-process epoch with world-size batches
        batch, per_rank = batch * world, samples
    if 0 < per_rank < batch:
        ranks = f" for each of {world} ranks" if world > 1 else ""
        raise LorafitError(
            f"data.batch_size {batch_size} is larger than the {per_rank} samples per epoch{ranks} "
            f"({key}, repeats included), so no batch would be that large; set data.batch_size to at most "
            f"{max(1, per_rank // (world if global_batch else 1))}"
        )


def log_plan(plan, batch_size: int, world: int, global_batch: bool, loss_masks: dict | None) -> None:
    """One line on the epoch's size, and lines on loss masks and on samples left out for even ranks."""
    samples = sum(sum(row) for row in plan.copies)
    logger.info(
        "data: %d samples per epoch (repeats and reg included), %d batches per rank of %d, %d rank(s)%s",
        samples,
        plan.batches_per_rank,
        batch_size,
        world,
        f", global batches of {world * batch_size}" if global_batch else "",
    )
    if loss_masks:
        logger.info(
            "data: %d images have a loss mask (%s); model.loss.mask_floor weighs their background",
            sum(loss_masks.values()),
            ", ".join(f"{n} from {'_mask files' if how == 'file' else 'alpha'}" for how, n in loss_masks.items()),
        )
    if plan.dropped_samples:
        logger.info(
            "data: %d samples per epoch are left out so every rank runs the same number of batches",
            plan.dropped_samples,
        )
