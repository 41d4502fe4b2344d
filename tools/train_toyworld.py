"""Train the toy world's judge, VAE and base model from scratch (CPU is enough; a GPU is faster).

Three stages, each writing what the next needs, so a stage can be re-run alone, and the toy CLIP:

    python tools/train_toyworld.py judge --steps 600   # -> lorafit/toyworld/judge.safetensors
    python tools/train_toyworld.py vae --steps 1500    # -> runs/toyworld-build/vae/
    python tools/train_toyworld.py vae-decoder --steps 3000  # fine-tunes the decoder of
                                                       #    lorafit/toyworld/base/vae in place (encoder frozen)
    python tools/train_toyworld.py base --steps 6000   # -> lorafit/toyworld/base/ (fp16 pipeline)
    python tools/train_toyworld.py clip --steps 2000 --batch-size 128 --pictures 20000 --lr 0.002
                                                       # -> lorafit/toyworld/clip/ (fp16 CLIPModel)

The base stage trains the text encoder and the UNet together, from scratch, on world pictures
only: the held-out star is never in its data. Each stage appends what it did (command, steps,
wall time, device, final losses) to ``lorafit/toyworld/base/TRAINING.md``'s source,
``runs/toyworld-build/log.json``, from which the base stage writes that file.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # toyworld_data, toyworld_decoder

from toyworld_data import device_name, encode_world, vae_pictures, warmup_cosine  # noqa: E402

from lorafit.toyworld import architecture as arch  # noqa: E402
from lorafit.toyworld.judge import JUDGE_FILE, Judge, accuracy_on_fresh_pictures, train_judge  # noqa: E402
from lorafit.toyworld.tokenizer import build_world_tokenizer  # noqa: E402

BUILD = ROOT / "runs" / "toyworld-build"
BASE_DIR = ROOT / "lorafit" / "toyworld" / "base"


def _shipped_log() -> dict:
    """The stages recorded in the shipped TRAINING.md (its JSON blocks under "## stage" headings).

    runs/ is not in git: in a fresh checkout this is how a later stage keeps the earlier stages'
    records instead of rewriting TRAINING.md with only its own.
    """
    notes = BASE_DIR / "TRAINING.md"
    if not notes.exists():
        return {}
    found = re.findall(r"^## (\S+)\n\n```json\n(.*?)\n```", notes.read_text(), flags=re.M | re.S)
    return {stage: json.loads(block) for stage, block in found}


def _record(stage: str, info: dict) -> None:
    BUILD.mkdir(parents=True, exist_ok=True)
    log_path = BUILD / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else _shipped_log()
    log[stage] = {"command": "python " + " ".join(sys.argv), **info}
    log_path.write_text(json.dumps(log, indent=2))


# ---- judge ---------------------------------------------------------------------------------------


def stage_judge(args, device) -> None:
    start = time.time()
    net = train_judge(steps=args.steps, seed=args.seed)
    judge = Judge(net)
    judge.save(JUDGE_FILE)
    accuracy = accuracy_on_fresh_pictures(judge)
    augmented = accuracy_on_fresh_pictures(judge, augmented=True)
    print("judge accuracy on fresh pictures:", accuracy, "augmented:", augmented)
    _record(
        "judge",
        {
            "steps": args.steps,
            "wall_s": round(time.time() - start),
            "device": device_name(device),
            "accuracy": accuracy,
            "accuracy_augmented": augmented,
        },
    )
    if (BASE_DIR / "model_index.json").exists():
        write_training_notes(BASE_DIR)


# ---- toy CLIP -----------------------------------------------------------------------------------


def stage_clip(args, device) -> None:
    from lorafit.toyworld.toy_clip import CLIP_DIR, save_toy_clip, train_toy_clip, zero_shot_accuracy

    start = time.time()
    model, processor = train_toy_clip(
        steps=args.steps, batch_size=args.batch_size, pool_size=args.pictures, lr=args.lr, seed=args.seed
    )
    wall = round(time.time() - start)
    out = Path(args.out) if args.out != str(BASE_DIR) else CLIP_DIR
    save_toy_clip(model, processor, out)
    accuracy = zero_shot_accuracy(model, processor)
    print("toy CLIP zero-shot accuracy on fresh pictures:", accuracy)
    _record(
        "clip",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "pictures": args.pictures,
            "lr": args.lr,
            "wall_s": wall,
            "device": device_name(device),
            "zero_shot_accuracy": accuracy,
        },
    )
    (out / "TRAINING.md").write_text(
        "# How this toy CLIP was trained\n\n`tools/train_toyworld.py clip` (lorafit/toyworld/toy_clip.py), from "
        "the toy world's rendered pictures and captions only. Wall time on a 2-core machine shared with "
        "other jobs: an upper bound.\n\n```json\n"
        + json.dumps(json.loads((BUILD / "log.json").read_text())["clip"], indent=2)
        + "\n```\n"
    )


# ---- VAE -----------------------------------------------------------------------------------------


def stage_vae(args, device) -> None:
    start = time.time()
    torch.manual_seed(args.seed)
    pixels = vae_pictures(args.seed, args.pictures).to(device)
    vae = arch.toy_vae().to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, args.steps, warmup=100)
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
    scaling_factor = round(1.0 / means.std().item(), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.save_pretrained(BUILD / "vae")
    print(f"latent std {means.std().item():.4f} -> scaling_factor {scaling_factor}")
    _record(
        "vae",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "wall_s": round(time.time() - start),
            "device": device_name(device),
            "final_mse": round(mse.item(), 6),
            "final_kl": round(kl.item(), 4),
            "scaling_factor": scaling_factor,
        },
    )


def stage_vae_decoder(args, device) -> None:
    """Fine-tune the shipped VAE's decoder on world pictures and generic shapes (tools/toyworld_decoder.py).

    Reads ``--vae-from`` (default: the base's own VAE) and writes the result into the base
    (``--out``/vae). The encoder, quant_conv and scaling_factor come out bit-identical: the
    stage refuses to save otherwise.
    """
    import toyworld_decoder as td
    from diffusers import AutoencoderKL

    start = time.time()
    torch.manual_seed(args.seed)
    source = Path(args.vae_from)
    vae = AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32).to(device)
    encoder_before, scaling = td.encoder_digest(vae.state_dict()), vae.config.scaling_factor
    # (a) the vae stage's own mix (world scenes without the star, the judge's "other" pictures,
    # random polygons), so the decoder keeps what it draws well; (b) as many generic shapes.
    pixels = torch.cat(
        [vae_pictures(args.seed, args.pictures // 2), td.generic_pictures(args.seed + 1, args.pictures // 2)]
    ).to(device)
    before = td.reconstruction_check(vae)
    vae.to(device)
    print("before:", before, flush=True)
    losses = td.finetune_decoder(
        vae,
        pixels,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        edge_weight=args.edge_weight,
        seed=args.seed,
        make_schedule=lambda optimizer, steps: warmup_cosine(optimizer, steps, warmup=min(100, steps // 10 + 1)),
    )
    wall = time.time() - start
    after = td.reconstruction_check(vae)
    print("after:", after, flush=True)
    if td.encoder_digest(vae.state_dict()) != encoder_before or vae.config.scaling_factor != scaling:
        raise SystemExit(f"vae-decoder: the encoder drifted from {source}'s; nothing saved")
    out = Path(args.out) / "vae" if args.out == str(BASE_DIR) else Path(args.out)
    td.save_fp16(vae, out)
    print(f"saved {out}", flush=True)
    _record(
        "vae-decoder",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "pictures": args.pictures,
            "lr": args.lr,
            "edge_weight": args.edge_weight,
            "wall_s": round(wall),
            "device": device_name(device),
            "final_mse": round(losses["final_mse"], 6),
            "final_edge_l1": round(losses["final_edge_l1"], 5),
            "encoder_sha256": encoder_before,
            "scaling_factor": scaling,
            "judge_reads_reconstructions_before": {k: round(v, 4) for k, v in before.items()},
            "judge_reads_reconstructions_after": {k: round(v, 4) for k, v in after.items()},
        },
    )
    if out == BASE_DIR / "vae":
        write_training_notes(BASE_DIR)


# ---- base model ----------------------------------------------------------------------------------


def stage_base(args, device) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler

    start = time.time()
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(BUILD / "vae").to(device).eval()
    tokenizer = build_world_tokenizer()
    moments, captions = encode_world(vae, args.seed + 1, args.pictures, device)
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    empty = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)
    print(f"encoded {len(captions)} pictures in {time.time() - start:.0f} s", flush=True)

    text_encoder, unet = arch.toy_text_encoder(tokenizer).to(device).train(), arch.toy_unet().to(device).train()
    params = [*text_encoder.parameters(), *unet.parameters()]
    # No weight decay: it would shrink the embeddings of tokens the world never uses (the trigger,
    # "star") towards zero, unlike a real CLIP's rare tokens, which stay ordinary vectors.
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, args.steps, warmup=200)
    ema = [copy.deepcopy(text_encoder).eval().requires_grad_(False), copy.deepcopy(unet).eval().requires_grad_(False)]
    noise_scheduler = DDPMScheduler(**arch.scheduler_kwargs())
    snr = (noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)).to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    scaling = vae.config.scaling_factor
    losses = []
    for step in range(args.steps):
        index = torch.randint(0, len(moments), (args.batch_size,), generator=generator, device=device)
        mean, logvar = moments[index].chunk(2, dim=1)
        latents = (
            mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=device)
        ) * scaling
        noise = torch.randn(latents.shape, generator=generator, device=device)
        t = torch.randint(0, 1000, (args.batch_size,), generator=generator, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        # Caption dropout: the empty prompt's output is what classifier-free guidance steers away from.
        drop = torch.rand(args.batch_size, generator=generator, device=device) < args.caption_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[index])
        prediction = unet(noisy, t, text_encoder(batch_ids)[0]).sample
        # Min-SNR-5 weighting (Hang et al. 2023): converges several times faster than plain MSE.
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean((1, 2, 3))).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema, (text_encoder, unet)):
                for a, p in zip(averaged.parameters(), live.parameters()):
                    a.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"base step {step}: loss {recent:.4f} ({time.time() - start:.0f} s)", flush=True)
        if args.save_every and step and step % args.save_every == 0:
            save_base(vae, ema[0], tokenizer, ema[1], BUILD / f"base-step{step}")
    wall = time.time() - start
    save_base(vae, ema[0], tokenizer, ema[1], Path(args.out))
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
            "wall_s": round(wall),
            "device": device_name(device),
            "final_loss_last_200_steps": round(final, 5),
        },
    )
    write_training_notes(Path(args.out))


def save_base(vae, text_encoder, tokenizer, unet, out: Path) -> None:
    """Save the parts as an fp16 diffusers ``StableDiffusionPipeline`` directory."""
    parts = [copy.deepcopy(m).to("cpu", torch.float16) for m in (vae, text_encoder, unet)]
    pipe = arch.assemble_pipeline(parts[0], parts[1], tokenizer, parts[2])
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"saved {out}", flush=True)


def write_training_notes(out: Path) -> None:
    log = json.loads((BUILD / "log.json").read_text())
    import diffusers
    import transformers

    lines = [
        "# How this toy base model was trained",
        "",
        "Trained from scratch by `tools/train_toyworld.py`: the VAE first, then the text encoder and UNet",
        "together on the VAE's latents; the judge is independent of both (it only scores pictures). The",
        "VAE's decoder was fine-tuned afterwards (vae-decoder: encoder, quant_conv and scaling_factor",
        "unchanged, so the UNet's latents are the same). The held-out shape (star) is in none of the",
        "training data of any stage. Versions: torch "
        + torch.__version__
        + ", diffusers "
        + diffusers.__version__
        + ", transformers "
        + transformers.__version__
        + ".",
        "",
        "Wall times were measured on a 2-core machine shared with other jobs (load average 5 to 10 during",
        "the VAE and base stages), so they are upper bounds for one core.",
        "",
    ]
    for stage in ("vae", "vae-decoder", "base", "judge"):
        if stage in log:
            lines += [f"## {stage}", "", "```json", json.dumps(log[stage], indent=2), "```", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("judge", "vae", "vae-decoder", "base", "clip"))
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pictures", type=int, default=30000, help="distinct training pictures")
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="VAE: weight of the KL term")
    parser.add_argument(
        "--vae-from", default=str(BASE_DIR / "vae"), help="vae-decoder: the VAE whose decoder is fine-tuned"
    )
    parser.add_argument("--edge-weight", type=float, default=0.5, help="vae-decoder: weight of the edge L1 term")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="base: share of empty captions")
    parser.add_argument("--ema", type=float, default=0.999, help="base: EMA decay of the saved weights")
    parser.add_argument("--save-every", type=int, default=0, help="base: also save a snapshot every N steps")
    parser.add_argument(
        "--out", default=str(BASE_DIR), help="base/clip: output directory (clip: lorafit/toyworld/clip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stages = {"judge": stage_judge, "vae": stage_vae, "vae-decoder": stage_vae_decoder, "base": stage_base}
    {**stages, "clip": stage_clip}[args.stage](args, device)


if __name__ == "__main__":
    main()
