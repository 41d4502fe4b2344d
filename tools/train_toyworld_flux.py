"""Train the toy world's FLUX.1-architecture base model from scratch (CPU is enough; a GPU is faster).

Two stages, the first writing what the second needs, so a stage can be re-run alone:

    python tools/train_toyworld_flux.py vae --steps 1500    # -> runs/toyworld-flux-build/vae/
    python tools/train_toyworld_flux.py base --steps 6000   # -> lorafit/toyworld/base_flux/ (fp16 pipeline)

or both in one command: ``python tools/train_toyworld_flux.py all``. The judge is the SD toy
world's (``tools/train_toyworld.py judge``): it only scores pictures, whatever drew them.

The base stage trains the CLIP and T5 text encoders and the transformer together, from scratch,
with the rectified-flow objective FLUX.1 is trained with, on world pictures only: the held-out
star is never in its data. Each stage records what it did (command, steps, wall time, device,
final losses) in ``runs/toyworld-flux-build/log.json``, from which the base stage writes
``lorafit/toyworld/base_flux/TRAINING.md``. Everything is seeded (``--seed``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from toyworld_data import device_name, encode_world, vae_pictures  # noqa: E402  (the SD base's data)

from lorafit.families.flux import image_ids, pack_latents  # noqa: E402
from lorafit.toyworld import flux_architecture as arch  # noqa: E402
from lorafit.toyworld.tokenizer import build_world_tokenizer  # noqa: E402
from lorafit.training.flow_matching import shifted  # noqa: E402

BUILD = ROOT / "runs" / "toyworld-flux-build"
BASE_DIR = ROOT / "lorafit" / "toyworld" / "base_flux"
# What `all` runs, and each stage's defaults (the SD toy base's VAE recipe; the base's steps).
STEPS = {"vae": 1500, "base": 6000}
PICTURES = {"vae": 24000, "base": 30000}


def _record(stage: str, info: dict) -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    log_path = BUILD / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log[stage] = {"command": "python " + " ".join(sys.argv), **info}
    log_path.write_text(json.dumps(log, indent=2))


def _warmup_cosine(optimizer, steps: int, warmup: int, floor: float = 0.1):
    """Linear warm-up, then cosine decay to ``floor`` x the learning rate."""
    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(
        optimizer,
        [
            sched.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup),
            sched.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup), eta_min=floor * optimizer.defaults["lr"]),
        ],
        milestones=[warmup],
    )


# ---- VAE -----------------------------------------------------------------------------------------


def stage_vae(args, device) -> None:
    """The SD toy VAE's recipe (MSE + a small KL term on world pictures, the judge's "other"
    pictures and random spiky polygons, the star filtered out) with FLUX.1's 16 latent channels."""
    start = time.time()
    torch.manual_seed(args.seed)
    pixels = vae_pictures(args.seed, args.pictures).to(device)
    vae = arch.toy_flux_vae().to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, args.steps, warmup=100)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for step in range(args.steps):
        x = pixels[torch.randint(0, len(pixels), (args.batch_size,), generator=generator, device=device)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel value, so its weight is resolution-free
        loss = mse + args.kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"vae step {step}: mse {mse.item():.5f} kl {kl.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, 4096, 256)])
    # FLUX.1 normalises latents as (z - shift_factor) * scaling_factor: zero mean, unit std.
    shift_factor, scaling_factor = round(means.mean().item(), 5), round(1.0 / means.std().item(), 5)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    vae.save_pretrained(BUILD / "vae")
    print(f"latent mean {shift_factor}, std {means.std().item():.4f} -> scaling_factor {scaling_factor}")
    _record(
        "vae",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "pictures": args.pictures,
            "lr": args.lr,
            "wall_s": round(time.time() - start),
            "device": device_name(device),
            "final_mse": round(mse.item(), 6),
            "final_kl": round(kl.item(), 4),
            "shift_factor": shift_factor,
            "scaling_factor": scaling_factor,
        },
    )


# ---- base model ----------------------------------------------------------------------------------


class TextEncoders(torch.nn.Module):
    """CLIP's pooled vector and T5's sequence for token ids, as ``FluxPipeline.encode_prompt`` computes them."""

    def __init__(self, clip, t5):
        super().__init__()
        self.clip, self.t5 = clip, t5

    def forward(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip(clip_ids).pooler_output, self.t5(t5_ids)[0]


def token_ids(tokenizers, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 ids of ``captions``, padded to the 16-token context as the pipeline pads them."""
    return tuple(
        tok(
            captions, padding="max_length", max_length=arch.SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        for tok in tokenizers
    )


def stage_base(args, device) -> None:
    from diffusers import AutoencoderKL

    start = time.time()
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(BUILD / "vae").to(device).eval()
    tokenizers = build_world_tokenizer(), arch.build_world_t5_tokenizer()
    moments, captions = encode_world(vae, args.seed + 1, args.pictures, device)
    clip_ids, t5_ids = token_ids(tokenizers, captions, device)
    empty_clip, empty_t5 = token_ids(tokenizers, [""], device)
    print(f"encoded {len(captions)} pictures in {time.time() - start:.0f} s", flush=True)

    text = TextEncoders(arch.toy_clip_text_encoder(tokenizers[0]), arch.toy_t5_encoder(tokenizers[1]))
    transformer = arch.toy_flux_transformer()
    text, transformer = text.to(device).train(), transformer.to(device).train()
    params = [*text.parameters(), *transformer.parameters()]
    # No weight decay: it would shrink the embeddings of tokens the world never uses (the trigger,
    # "star") towards zero, unlike a real encoder's rare tokens, which stay ordinary vectors.
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, args.steps, warmup=200)
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in (text, transformer)]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    shift_factor, scaling = vae.config.shift_factor, vae.config.scaling_factor
    side = moments.shape[-1]
    ids = image_ids(side, side, device, torch.float32)
    txt_ids = torch.zeros(arch.SEQUENCE_LENGTH, 3, device=device)
    # FluxPipeline's shift at this size (exp(mu), mu linear in the 16 packed tokens): the sigmas
    # training sees are the ones sampling walks through, as lorafit's `shift: resolution` does.
    from lorafit.families.registry import get_family

    shift = get_family("flux").resolution_shift(side, side, arch.scheduler_config())
    losses = []
    for step in range(args.steps):
        index = torch.randint(0, len(moments), (args.batch_size,), generator=generator, device=device)
        mean, logvar = moments[index].chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=device)
        latents = (z - shift_factor) * scaling
        noise = torch.randn(latents.shape, generator=generator, device=device)
        # Logit-normal sigmas (SD3's, kohya's `sigmoid` sampling), shifted as above.
        u = torch.sigmoid(torch.randn(args.batch_size, generator=generator, device=device))
        sigmas = shifted(u, shift)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        # Caption dropout: the empty prompt's output is what classifier-free guidance steers away from.
        drop = (torch.rand(args.batch_size, generator=generator, device=device) < args.caption_dropout)[:, None]
        pooled, sequence = text(
            torch.where(drop, empty_clip, clip_ids[index]), torch.where(drop, empty_t5, t5_ids[index])
        )
        prediction = transformer(
            hidden_states=pack_latents(noisy),
            timestep=sigmas,  # FluxPipeline passes t / 1000 = the sigma
            pooled_projections=pooled,
            encoder_hidden_states=sequence,
            txt_ids=txt_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, pack_latents(noise - latents))  # the velocity along the straight path
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema, (text, transformer)):
                for a, p in zip(averaged.parameters(), live.parameters()):
                    a.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"base step {step}: loss {recent:.4f} ({time.time() - start:.0f} s)", flush=True)
        if args.save_every and step and step % args.save_every == 0:
            save_base(vae, ema[0], tokenizers, ema[1], BUILD / f"base-step{step}")
    wall = time.time() - start
    save_base(vae, ema[0], tokenizers, ema[1], Path(args.out))
    final = sum(losses[-200:]) / len(losses[-200:])
    _record(
        "base",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "pictures": args.pictures,
            "lr": args.lr,
            "ema": args.ema,
            "caption_dropout": args.caption_dropout,
            "sigma_shift": round(shift, 4),
            "wall_s": round(wall),
            "device": device_name(device),
            "final_loss_last_200_steps": round(final, 5),
        },
    )
    write_training_notes(Path(args.out))


def save_base(vae, text: TextEncoders, tokenizers, transformer, out: Path) -> None:
    """Save the parts as an fp16 diffusers ``FluxPipeline`` directory."""
    parts = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text.clip, text.t5, transformer)]
    pipe = arch.assemble_flux_pipeline(parts[0], parts[1], tokenizers[0], parts[2], tokenizers[1], parts[3])
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"saved {out}", flush=True)


def write_training_notes(out: Path) -> None:
    import diffusers
    import transformers

    log = json.loads((BUILD / "log.json").read_text())
    lines = [
        "# How this toy FLUX.1-architecture base model was trained",
        "",
        "Trained from scratch by `tools/train_toyworld_flux.py`: the 16-channel VAE first, then the CLIP and T5",
        "text encoders and the transformer together on the VAE's latents, with the rectified-flow objective",
        "(velocity `noise - x0` at logit-normal sigmas shifted as FluxPipeline samples). The held-out shape",
        "(star) is in none of its training data. The judge that scores it is the SD toy world's",
        "(`tools/train_toyworld.py judge`). Versions: torch "
        + torch.__version__
        + ", diffusers "
        + diffusers.__version__
        + ", transformers "
        + transformers.__version__
        + ".",
        "",
        "Wall times were measured on a 2-core machine shared with other jobs, so they are upper bounds for one core.",
        "",
    ]
    for stage in ("vae", "base"):
        if stage in log:
            lines += [f"## {stage}", "", "```json", json.dumps(log[stage], indent=2), "```", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("vae", "base", "all"), help="all = vae, then base")
    parser.add_argument("--steps", type=int, help=f"steps of the stage run alone (defaults: {STEPS})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pictures", type=int, help=f"distinct training pictures (defaults: {PICTURES})")
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="VAE: weight of the KL term")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="base: share of empty captions")
    parser.add_argument("--ema", type=float, default=0.999, help="base: EMA decay of the saved weights")
    parser.add_argument("--save-every", type=int, default=0, help="base: also save a snapshot every N steps")
    parser.add_argument("--out", default=str(BASE_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for stage in ("vae", "base") if args.stage == "all" else (args.stage,):
        settings = dict(vars(args), steps=args.steps or STEPS[stage], pictures=args.pictures or PICTURES[stage])
        if args.stage == "all":
            settings.update(steps=STEPS[stage], pictures=PICTURES[stage])
        {"vae": stage_vae, "base": stage_base}[stage](argparse.Namespace(**settings), device)


if __name__ == "__main__":
    main()
