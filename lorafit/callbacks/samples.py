"""Sample images during training: the LoRA's progress, as PNGs under the run and in the logger.

The pipeline is built from the training module's own UNet, VAE, text encoders and tokenizers
(adapters included), never a second copy, so samples show exactly the weights being trained.
Sampling runs on global rank 0 only and contains no collective operation: other ranks go on to
their next step and wait for rank 0 in the next gradient all-reduce. (With DDP's default 30 min
timeout, keep a round of samples well below that.)

Sampling leaves training untouched: module train/eval modes, ``requires_grad`` flags and the
global RNG state (used by dropout) are restored afterwards, and every image draws its noise from
its own seeded generator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.png_info import a1111_parameters, save_png
from lorafit.inference.prompts import SamplePrompt, collect_prompts
from lorafit.inference.render import Renderer, adapters_disabled
from lorafit.inference.samplers import canonical_sampler

log = logging.getLogger("lorafit.samples")


@contextlib.contextmanager
def sampling_state(pl_module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and a forked RNG for the duration; every module's mode restored afterwards."""
    modes = {module: module.training for module in pl_module.modules()}
    device = next(pl_module.parameters()).device
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    pl_module.eval()
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


class SampleImages(pl.Callback):
    """Render sample prompts every N epochs/steps into ``<default_root_dir>/samples/`` and the logger.

    Prompts use kohya's inline syntax (``a photo of ohwx --n blurry --w 768 --h 640 --s 30 --l 7.5
    --d 42 --ss euler_a``); see docs/sampling-and-selection.md. Images go to TensorBoard
    (``add_image``) or W&B (``log_image``), whichever logger the trainer has, under ``samples/NN``.

    Args:
        prompts: Prompts in kohya's inline syntax, or mappings with kohya's prompt-file keys
            (``prompt``, ``negative_prompt``, ``width``, ``height``, ``sample_steps``, ``scale``,
            ``seed``, ``sample_sampler``). Empty (and no ``prompt_file``) = no sampling.
        prompt_file: A kohya prompt file (kohya's ``sample_prompts``): ``.txt`` one prompt per line
            (``#`` comments), or ``.toml``/``.json``. Its prompts follow ``prompts``.
        every_n_epochs: Sample after every this many epochs (kohya's ``sample_every_n_epochs``);
            0 = not by epoch.
        every_n_steps: Sample after every this many optimizer steps (kohya's
            ``sample_every_n_steps``); 0 = not by step.
        before_training: Also sample before the first step (kohya's ``sample_at_first``): the
            base model's answer to each prompt, for comparison.
        sampler: Default sampler (kohya's ``sample_sampler``): euler, euler_a, dpmpp_2m,
            dpmpp_2m_karras, ddim, ... (``--ss`` overrides per prompt).
        steps: Default sampling steps (``--s`` overrides).
        cfg: Default classifier-free guidance scale (``--l`` overrides).
        width: Default width in pixels; empty = the training resolution, else the model's native size.
        height: Default height in pixels; empty = like ``width``.
        seed: Seed of prompt i is ``seed + i`` unless it sets ``--d``; the same every time, so
            samples of different epochs differ only by the training in between.
        compare_base: Also render each prompt with the LoRA switched off and save it beside the
            LoRA image (left: base model, right: LoRA).
        log_images: Send the images to the trainer's logger(s) as well as writing PNGs.
        dirpath: Folder for the PNGs; empty = ``<trainer.default_root_dir>/samples``.
    """

    def __init__(
        self,
        prompts: list[str | dict] = [],  # noqa: B006 -- jsonargparse shows it in --help; never mutated
        prompt_file: str | None = None,
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        before_training: bool = False,
        sampler: str = "euler_a",
        steps: int = 20,
        cfg: float = 7.0,
        width: int | None = None,
        height: int | None = None,
        seed: int = 0,
        compare_base: bool = False,
        log_images: bool = True,
        dirpath: str | None = None,
    ):
        # Parsed now: a typo in a prompt file fails before minutes of model loading.
        self.prompts: list[SamplePrompt] = collect_prompts(prompts, prompt_file, key="samples.prompts")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.before_training = before_training
        self.sampler = canonical_sampler(sampler, key="samples.sampler")
        self.steps, self.cfg, self.seed = steps, cfg, seed
        self.width, self.height = width, height
        self.compare_base = compare_base
        self.log_images = log_images
        self.dirpath = dirpath
        self.written: list[Path] = []
        self._renderer: Renderer | None = None
        self._last_sampled_step = -1

    # ---- when ---------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        if self.before_training:
            self.sample(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Runs per micro-batch under gradient accumulation; sample once per optimizer step.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_sampled_step:
            self.sample(trainer, pl_module, epoch=trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and trainer.global_step != self._last_sampled_step:
            self.sample(trainer, pl_module, epoch=epoch)

    # ---- what ---------------------------------------------------------------------------

    def _dir(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "samples"

    def _default_size(self, trainer, renderer: Renderer) -> tuple[int, int]:
        resolution = getattr(trainer.datamodule, "resolution", None) if trainer.datamodule is not None else None
        side = resolution if isinstance(resolution, int) else renderer.default_size
        width = self.width or side
        return width, self.height or (self.width and width) or side

    def requests(self, trainer, renderer: Renderer) -> list[SamplePrompt]:
        """The prompts with every default filled in (the seed of prompt i is ``seed + i``)."""
        width, height = self._default_size(trainer, renderer)
        return [
            p.with_defaults(width, height, self.steps, self.cfg, self.seed + i, self.sampler)
            for i, p in enumerate(self.prompts)
        ]

    def sample(self, trainer: pl.Trainer, pl_module, epoch: int) -> list[Path]:
        """Render every prompt now (global rank 0 only) and save/log the images."""
        self._last_sampled_step = trainer.global_step
        if not self.prompts or not trainer.is_global_zero:
            return []
        if self._renderer is None:
            self._renderer = Renderer(
                pl_module.base,
                clip_skip=pl_module.conditioning_config.clip_skip,
                max_token_length=pl_module.conditioning_config.max_token_length,
            )
        step = trainer.global_step
        paths = []
        # Parts kept on the host for cached data (host_parts.py) come to the device for this round.
        with sampling_state(pl_module), pl_module.host_parts_on_device():
            for index, request in enumerate(self.requests(trainer, self._renderer)):
                image = self._render(pl_module, request, epoch, step)
                parameters = a1111_parameters(
                    request, str(pl_module.hparams.model), extra={"Epoch": epoch, "Training step": step}
                )
                path = save_png(
                    image, self._dir(trainer) / f"epoch-{epoch:03d}_step-{step:06d}_{index:02d}.png", parameters
                )
                paths.append(path)
                self._log(trainer, f"samples/{index:02d}", image, request.prompt, step)
        log.info("wrote %d sample image(s) to %s", len(paths), self._dir(trainer))
        self.written.extend(paths)
        return paths

    def _render(self, pl_module, request: SamplePrompt, epoch: int, step: int) -> Image.Image:
        lora_image = self._renderer(request)
        if not self.compare_base:
            return lora_image
        with adapters_disabled([pl_module.denoiser, *pl_module.text_encoders]):
            base_image = self._renderer(request)
        sheet, _ = make_sheet([[base_image, lora_image]], ["base model", f"LoRA, epoch {epoch} step {step}"])
        return sheet

    def _log(self, trainer, tag: str, image: Image.Image, caption: str, step: int) -> None:
        if not self.log_images:
            return
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[image], step=step, caption=[caption])
            else:
                log.debug("%s cannot show images; samples are only written as PNG", type(logger).__name__)
