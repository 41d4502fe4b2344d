"""Sample images during training: the LoRA's progress, as PNGs under the run and in the logger.

The pipeline is built from the training module's own UNet, VAE, text encoders and tokenizers
(adapters included), never a second copy, so samples show exactly the weights being trained: a
sample is the image ``lorafit generate`` draws with that epoch's LoRA file at strength 1 and the
same render options (tests/test_samples_callback.py checks it pixel for pixel). Its PNG text says
so: the prompt carries ``<lora:NAME-epoch-NNN:1>`` (the exported file, with its hash once written).

Under DDP every rank draws its share of a round and rank 0 writes it (see
:mod:`lorafit.callbacks.sample_round`, which also keeps the optimizer state off the accelerator
during the round). Sampling leaves training untouched: module train/eval modes, ``requires_grad``
flags and the global RNG state (used by dropout) are restored afterwards, and every image draws
its noise from its own seeded generator.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

from lorafit.callbacks.export import LoraExport
from lorafit.callbacks.sample_round import gather_on_rank_zero, rank_share, training_state_on_host
from lorafit.inference.contact_sheet import make_sheet
from lorafit.inference.png_info import AppliedLora, a1111_parameters, save_png
from lorafit.inference.prompts import SamplePrompt, collect_prompts
from lorafit.inference.render import Renderer, adapters_disabled
from lorafit.inference.render_options import RenderOptions

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


@dataclass(frozen=True)
class SampleImage:
    """One image of a round: which prompt it belongs to, and the fully specified request."""

    prompt: int
    request: SamplePrompt


def _token_vectors_at_start(pl_module) -> contextlib.AbstractContextManager:
    """A textual-inversion run's token encoded as training began (its base-model side shows nothing learnt)."""
    tokens = getattr(pl_module, "trained_tokens", None)
    return contextlib.nullcontext() if tokens is None else tokens.at_start()


class SampleImages(pl.Callback):
    """Render sample prompts every N epochs/steps into ``<default_root_dir>/samples/`` and the logger.

    Prompts use kohya's inline syntax (``a photo of ohwx --n blurry --w 768 --h 640 --s 30 --l 7.5
    --d 42 --ss euler_a``); see docs/sampling-and-selection.md. Images go to TensorBoard
    (``add_image``) or W&B (``log_image``), whichever logger the trainer has, under ``samples/NN``:
    one PNG per prompt, its seeds side by side, the base model above (or beside) the LoRA.

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
        render: How each image is drawn, as for ``lorafit generate`` (kohya's ``sample_sampler``
            is ``render.sampler``); a prompt's own --s/--l/--d/--ss win. Prompt i is drawn at each
            ``render.seed`` + i (one image per seed: several seeds show how often the LoRA gets it
            right, one seed is a coin flip), the same every round, so rounds differ only by training.
        compare_base: Also render each prompt with the LoRA switched off (and a textual-inversion
            token at the vectors it started from) and show it beside (one seed) or above (several)
            the LoRA's images.
        log_images: Send the images to the trainer's logger(s) as well as writing PNGs.
        dirpath: Folder for the PNGs; empty = ``<trainer.default_root_dir>/samples``.
    """

    # Keys these options had before they were grouped under ``render`` (lorafit/cli/renamed.py).
    renamed_keys: ClassVar[dict[str, str]] = {
        name: f"render.{name}" for name in ("sampler", "steps", "cfg", "width", "height", "seed")
    }

    def __init__(
        self,
        prompts: list[str | dict] | None = None,
        prompt_file: str | None = None,
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        before_training: bool = False,
        render: RenderOptions = RenderOptions(steps=20),
        compare_base: bool = False,
        log_images: bool = True,
        dirpath: str | None = None,
    ):
        # Parsed now: a typo in a prompt file fails before minutes of model loading.
        self.prompts: list[SamplePrompt] = collect_prompts(prompts, prompt_file, key="samples.prompts")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.before_training = before_training
        self.render = render
        self.compare_base = compare_base
        self.log_images = log_images
        self.dirpath = dirpath
        self.written: list[Path] = []
        self.drawn_here: list[SampleImage] = []  # what this rank drew in the last round
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

    def _native_size(self, trainer, renderer: Renderer) -> int:
        resolution = getattr(trainer.datamodule, "resolution", None) if trainer.datamodule is not None else None
        return resolution if isinstance(resolution, int) else renderer.default_size

    def images(self, trainer, renderer: Renderer) -> list[SampleImage]:
        """Every image of a round: prompt i at each seed + i (its own --d: that seed), each CFG."""
        native = self._native_size(trainer, renderer)
        cfgs = self.render.cfgs
        return [
            SampleImage(i, self.render.fill(prompt, native, seed, cfg, force_cfg=len(cfgs) > 1))
            for i, prompt in enumerate(self.prompts)
            for cfg in ([prompt.cfg] if prompt.cfg is not None else cfgs)
            for seed in ([prompt.seed] if prompt.seed is not None else [s + i for s in self.render.seeds])
        ]

    def _renderer_for(self, pl_module) -> Renderer:
        if self._renderer is None:
            self._renderer = Renderer(
                pl_module.base,
                clip_skip=self.render.clip_skip or pl_module.conditioning_config.clip_skip,
                max_token_length=self.render.max_token_length or pl_module.conditioning_config.max_token_length,
                max_sequence_length=(
                    self.render.max_sequence_length or pl_module.conditioning_config.max_sequence_length
                ),
            )
        return self._renderer

    def sample(self, trainer: pl.Trainer, pl_module, epoch: int) -> list[Path]:
        """Draw a round now (every rank its share) and save/log the images on global rank 0."""
        self._last_sampled_step = trainer.global_step
        if not self.prompts:
            return []
        renderer = self._renderer_for(pl_module)
        images = self.images(trainer, renderer)
        mine = rank_share(len(images), trainer.global_rank, trainer.world_size)
        self.drawn_here = [images[i] for i in mine]
        with sampling_state(pl_module), training_state_on_host(trainer):
            drawn = self._draw(pl_module, renderer, {i: images[i] for i in mine})
        everything = gather_on_rank_zero(drawn, trainer)
        if everything is None:  # not rank 0: its images are on their way there
            return []
        paths = self._write(trainer, pl_module, epoch, images, everything)
        log.info("wrote %d sample image(s) to %s", len(paths), self._dir(trainer))
        self.written.extend(paths)
        return paths

    def _draw(self, pl_module, renderer: Renderer, todo: dict[int, SampleImage]) -> dict[int, tuple]:
        """``{index: (LoRA image, base image or None)}``; text encoders, then the VAE, borrowed in turn."""
        adapted = [pl_module.denoiser, *pl_module.text_encoders]
        with pl_module.host_parts_on_device(["text_encoders"]):
            encoded = {i: renderer.encode(image.request) for i, image in todo.items()}
            if self.compare_base:
                with adapters_disabled(adapted), _token_vectors_at_start(pl_module):
                    encoded_base = {i: renderer.encode(image.request) for i, image in todo.items()}
        hires = self.render.hires
        drawn = {}
        with pl_module.host_parts_on_device(["vae"]):
            for i, image in todo.items():
                lora = renderer(image.request, hires, encoded[i])
                base = None
                if self.compare_base:
                    with adapters_disabled(adapted):
                        base = renderer(image.request, hires, encoded_base[i])
                drawn[i] = (lora, base)
        return drawn

    def _lora(self, trainer, epoch: int) -> AppliedLora:
        """The LoRA the images show, named as its exported kohya file (with the file's hash once written)."""
        export = next((c for c in trainer.callbacks if isinstance(c, LoraExport)), None)
        name = export.name if export else "lora"
        stems = (f"{name}-step-{trainer.global_step:06d}", f"{name}-epoch-{epoch:03d}")
        # LoraExport runs before this callback in the same hook, so this round's file is written.
        written = [p for p in (export.written if export else []) if p.stem in stems and p.parent.name != "diffusers"]
        return AppliedLora(str(written[-1]) if written else stems[1], 1.0)

    def _write(self, trainer, pl_module, epoch: int, images: list[SampleImage], drawn: dict[int, tuple]) -> list[Path]:
        step = trainer.global_step
        lora = self._lora(trainer, epoch)
        hires = self.render.hires
        paths = []
        for index in range(len(self.prompts)):
            mine = [i for i, image in enumerate(images) if image.prompt == index]
            request = images[mine[0]].request
            sheet = self._sheet([drawn[i] for i in mine], [images[i].request for i in mine], epoch, step)
            parameters = a1111_parameters(
                request,
                str(pl_module.hparams.model),
                [lora],
                hires.scale,
                hires.denoise,
                hires.steps,
                extra={"Epoch": epoch, "Training step": step, **self._layout_note(len(mine))},
            )
            name = f"epoch-{epoch:03d}_step-{step:06d}_{index:02d}.png"
            paths.append(save_png(sheet, self._dir(trainer) / name, parameters))
            self._log(trainer, f"samples/{index:02d}", sheet, request.prompt, step)
        return paths

    def _layout_note(self, count: int) -> dict:
        """A PNG field saying which part of the sheet the parameters describe (the LoRA's images)."""
        if count == 1:
            return {"Sample layout": "left base model, right LoRA"} if self.compare_base else {}
        rows = ", top row base model, bottom row LoRA" if self.compare_base else ""
        return {"Sample layout": f"one seed per column{rows}"}

    def _sheet(self, drawn: list[tuple], requests: list[SamplePrompt], epoch: int, step: int) -> Image.Image:
        loras = [lora for lora, _ in drawn]
        if len(drawn) == 1 and not self.compare_base:
            return loras[0]
        lora_label = f"LoRA, epoch {epoch} step {step}"
        if len(drawn) == 1:
            sheet, _ = make_sheet([[drawn[0][1], loras[0]]], ["base model", lora_label])
            return sheet
        columns = [f"seed {r.seed}" + (f", CFG {r.cfg:g}" if len(self.render.cfgs) > 1 else "") for r in requests]
        rows, labels = [loras], [lora_label]
        if self.compare_base:
            rows, labels = [[base for _, base in drawn], loras], ["base model", lora_label]
        sheet, _ = make_sheet(rows, columns, labels)
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
