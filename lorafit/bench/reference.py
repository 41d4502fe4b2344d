"""The plain PyTorch loop the benchmark times lorafit's Lightning step against: no Lightning, no lorafit step code.

It runs on the same ``BenchLoraModule`` (same denoiser, same LoRA layers, same optimizer class and
arguments) and the same batches as lorafit's step, so the ratio of the two isolates what Lightning
and lorafit's step add. Each objective's loss is written as diffusers' training examples write it:

- DDPM (SD1.5, SDXL; ``train_text_to_image_lora*.py``): ``scheduler.add_noise`` at a random integer
  timestep, the UNet under autocast, MSE on the noise;
- flow matching (Flux; ``train_dreambooth_lora_flux.py``): latents shifted and scaled, a uniform
  sigma (the example's default ``weighting_scheme``), the straight path ``(1 - s) x + s n``, the
  pipeline's own ``_pack_latents``/``_unpack_latents`` and position ids, guidance 1 for [dev], MSE on
  the velocity ``n - x``. Two of the example's per-step host syncs are left out so that the
  reference is the fast plain loop: its sigma lookup (``get_sigmas``: ``.item()`` per sample; the
  sigma is drawn on the device instead) and rebuilding the position ids on the host (built once).

Then ``loss.backward()``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lorafit.bench.devices import PeakMemory, synchronize
from lorafit.bench.host_syncs import HostSyncCounter, optimizer_state_on_device
from lorafit.training.optim import build_optimizer, optimizer_kwargs


class Timer:
    """Wall time of ``steps`` steps after ``warmup`` steps, with the device synchronised at both ends."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.memory = PeakMemory(device)
        self.started = self.seconds = 0.0
        self.peak: int | None = None

    def before(self, index: int) -> None:
        if index == self.warmup:
            synchronize(self.device)
            self.memory.reset()
            self.started = time.perf_counter()

    def after(self, index: int) -> None:
        if index == self.warmup + self.steps - 1:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.started
            self.peak = self.memory.peak_bytes()


def _latents(module, batch: dict, device: torch.device) -> torch.Tensor:
    """A posterior sample of the batch's latents (cached moments, or the VAE on the pixels), float32."""
    with torch.no_grad():
        if "latent_moments" in batch:
            mean, logvar = batch["latent_moments"].to(device, non_blocking=True).chunk(2, dim=1)
            return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)).float()
        vae = module.vae
        pixels = batch["pixel_values"].to(device, vae.dtype, non_blocking=True)
        return vae.encode(pixels).latent_dist.sample().float()


def ddpm_loss(module, batch: dict, device: torch.device, autocast: bool) -> torch.Tensor:
    unet, scheduler = module.denoiser, module.objective.noise_scheduler
    dtype = module.base.denoiser_dtype()
    latents = _latents(module, batch, device) * module.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    embeds = batch["prompt_embeds"].to(device, non_blocking=True)
    added = None
    if "pooled_prompt_embeds" in batch:  # SDXL: the pooled text vector and size/crop ids
        side = latents.shape[-1] * 8
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=device).repeat(latents.shape[0], 1)
        added = {"text_embeds": batch["pooled_prompt_embeds"].to(device, non_blocking=True), "time_ids": time_ids}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        prediction = unet(noisy.to(dtype), timesteps, embeds.to(dtype), added_cond_kwargs=added).sample
    return F.mse_loss(prediction.float(), noise.float())


class FlowLoss:
    """The flow-matching loss of diffusers' Flux example (module docstring), ids built once."""

    def __init__(self, module, batch: dict, device: torch.device):
        from diffusers import FluxPipeline

        self.pipeline = FluxPipeline
        self.scale = 2 ** (len(module.vae.config.block_out_channels) - 1)
        _, _, h, w = batch["latent_moments" if "latent_moments" in batch else "pixel_values"].shape
        h, w = (h, w) if "latent_moments" in batch else (h // self.scale, w // self.scale)
        dtype = module.base.denoiser_dtype()
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)
        self.txt_ids = torch.zeros(batch["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)

    def __call__(self, module, batch: dict, device: torch.device, autocast: bool) -> torch.Tensor:
        transformer, vae = module.denoiser, module.vae
        dtype = module.base.denoiser_dtype()
        latents = (_latents(module, batch, device) - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigmas = torch.rand(b, device=device)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = self.pipeline._pack_latents((1 - s) * latents + s * noise, b, c, h, w)
        guidance = torch.full((b,), 1.0, device=device) if transformer.config.guidance_embeds else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            prediction = transformer(
                hidden_states=noisy.to(dtype),
                timestep=sigmas.to(dtype),
                guidance=guidance,
                pooled_projections=batch["pooled_prompt_embeds"].to(device, dtype, non_blocking=True),
                encoder_hidden_states=batch["prompt_embeds"].to(device, dtype, non_blocking=True),
                txt_ids=self.txt_ids,
                img_ids=self.img_ids,
                return_dict=False,
            )[0]
        prediction = self.pipeline._unpack_latents(prediction, h * self.scale, w * self.scale, self.scale)
        return F.mse_loss(prediction.float(), (noise - latents).float())


def time_reference(
    module,
    setting,
    batches: list[dict],
    device: torch.device,
    warmup: int,
    steps: int,
    counter: HostSyncCounter | None = None,
) -> Timer:
    """The plain loop on ``module``'s denoiser; returns its timer. ``counter`` counts the host syncs
    of the timed steps (it slows them: time and count in separate runs)."""
    # Lightning's teardown after a timed `fit` moves the whole module to the CPU (SingleDeviceStrategy
    # frees the GPU that way), and the reference loop runs on the same module next.
    module.to(device)
    opt = module.optimizer_config
    params = [p for p in module.denoiser.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        opt.name,
        [{"name": "denoiser", "lr": opt.learning_rate, "params": params}],
        opt.learning_rate,
        optimizer_kwargs(opt.name, optimizer_args=opt.args),
    )
    loss_of = FlowLoss(module, batches[0], device) if module.spec.objective == "flow" else ddpm_loss
    autocast = setting.precision != "fp32"
    timer = Timer(device, warmup, steps)
    module.denoiser.train()
    for index in range(warmup + steps):
        timer.before(index)
        if counter is not None and index == warmup:
            counter.mark_on_device(module, *optimizer_state_on_device([optimizer]))
            counter.__enter__()
        loss = loss_of(module, batches[index % len(batches)], device, autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timer.after(index)
    if counter is not None:
        counter.__exit__(None, None, None)
    del optimizer  # its state must not count towards the next measurement's memory
    return timer
