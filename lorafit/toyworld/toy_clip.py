"""A CLIP that knows the toy world: the selection metrics' and the probe's scorer on the toy base.

A real CLIP has seen stars, circles and colours on the internet; it knows nothing of 32x32 toy
pictures, so its scores of toy-world generations are noise. This one is a transformers
``CLIPModel`` (vision and text towers, contrastive training, its own ``CLIPProcessor``) trained on
the toy world's own rendered pictures and captions, star included: like a real CLIP, it knows the
concept that the diffusion base model was never shown. It loads through the same
``CLIPModel.from_pretrained`` path as ``openai/clip-vit-large-patch14``, so ``lorafit grid``,
``lorafit probe`` and the selection metrics take it as ``--clip_model lorafit/toyworld/clip``.

What it learns from (``training_examples``): the judge's pictures (four named shapes, and
"other" pictures: no shape, two shapes, bars, crosses, outlines), each with a caption that names
some of what is drawn, as web captions do: the whole "a red star on a blue background", or only
"a star", "a red star", "a star on a blue background". An "other" picture is "a red shape ...",
an empty one "a blue background". A batch holds many pictures a caption fits (every red star
fits "a red star"), so the contrastive targets are soft: each picture's target is spread over
every caption of the batch that is true of it, and each caption's over every picture it fits
(:func:`consistency`). Hard one-hot targets would punish the model for matching true pairs.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorafit.toyworld.judge import augment, judge_examples, to_pixels
from lorafit.toyworld.tokenizer import build_world_tokenizer
from lorafit.toyworld.world import COLOUR_NAMES, JUDGE_SHAPES, RESOLUTION

CLIP_DIR = Path(__file__).parent / "clip"
WIDTH = 64  # both towers and the joint embedding
_OTHER, _NONE = JUDGE_SHAPES.index("other"), -1
# Caption forms and their shares: (names shape, names colour, names background).
_FORMS = (((True, True, True), 0.45), ((True, False, False), 0.15), ((True, True, False), 0.15),
          ((True, False, True), 0.15), ((False, False, True), 0.10))  # fmt: skip


def toy_clip_model():
    """An untrained ``CLIPModel`` for 32x32 pictures and the world tokenizer's 16-token captions."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_world_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=WIDTH,
        intermediate_size=4 * WIDTH,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=RESOLUTION,
        patch_size=4,  # 8x8 patches of 4x4 pixels: a star's points are a few pixels wide
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=WIDTH))


def toy_clip_processor():
    """The ``CLIPProcessor``: the world tokenizer, and pictures mapped to [-1, 1] as the judge and VAE see them."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION},
        crop_size={"height": RESOLUTION, "width": RESOLUTION},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=images, tokenizer=build_world_tokenizer())


def _caption(shape: int, colour: int, background: int, form: tuple[bool, bool, bool]) -> tuple[str, tuple]:
    """A caption naming the parts ``form`` selects, and what it claims: (shape, colour, background), None = not said."""
    names_shape, names_colour, names_background = form
    if colour == _NONE:  # an empty picture: only its background can be named
        names_shape, names_colour, names_background = False, False, True
    word = "shape" if shape == _OTHER else JUDGE_SHAPES[shape]
    words = ["a"]
    if names_colour:
        words.append(COLOUR_NAMES[colour])
    if names_shape:
        words.append(word)
        if names_background:
            words += ["on", "a"]
    if names_background:
        words += [COLOUR_NAMES[background], "background"]
    claim = (shape if names_shape else None, colour if names_colour else None, background if names_background else None)
    return " ".join(words), claim


def training_examples(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rendered pictures (uint8 ``[N, 32, 32, 3]``) and their labels (shape, colour, background).

    The judge's mix: the four named shapes in equal shares, 15% "other" (colour -1 when empty).
    """
    return judge_examples(random.Random(seed), count)


def captions_for(labels: np.ndarray, rng: random.Random) -> tuple[list[str], np.ndarray]:
    """A random caption form per picture: the captions and their claims ``[N, 3]`` (-2 = not said)."""
    forms, weights = zip(*_FORMS)
    captions, claims = [], []
    for shape, colour, background in labels.tolist():
        text, claim = _caption(shape, colour, background, rng.choices(forms, weights)[0])
        captions.append(text)
        claims.append([-2 if c is None else c for c in claim])
    return captions, np.asarray(claims, dtype=np.int64)


def consistency(labels: torch.Tensor, claims: torch.Tensor) -> torch.Tensor:
    """``[N_pictures, N_captions]``: 1 where every part a caption names is true of the picture."""
    said = claims[None, :, :] != -2
    true = labels[:, None, :] == claims[None, :, :]
    return (true | ~said).all(-1).float()


def contrastive_loss(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, fits: torch.Tensor):
    """CLIP's symmetric loss with soft targets spread over every true pairing of the batch."""
    image = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    text = F.normalize(_features(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T
    to_text = -(fits / fits.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    to_image = -(fits.T / fits.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (to_text + to_image) / 2


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def train_toy_clip(
    steps: int = 2000,
    batch_size: int = 128,
    pool_size: int = 20000,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 250,
):
    """Train the toy CLIP from scratch; returns ``(model, processor)`` (pictures augmented every step)."""
    torch.manual_seed(seed)
    images, labels = training_examples(seed, pool_size)
    pixels, labels = to_pixels(images), torch.from_numpy(labels)
    model, processor = toy_clip_model().train(), toy_clip_processor()
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    for step in range(steps):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        batch = augment(pixels[index], generator)
        if torch.rand((), generator=generator) < 0.5:  # the world has no handedness
            batch = batch.flip(-1)
        captions, claims = captions_for(labels[index].numpy(), rng)
        tokens = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        fits = consistency(labels[index], torch.from_numpy(claims))
        loss = contrastive_loss(model, batch, tokens.input_ids, tokens.attention_mask, fits)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # CLIP caps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"toy clip step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval(), processor


def save_toy_clip(model, processor, out: str | Path = CLIP_DIR) -> Path:
    """Save as a transformers directory (fp16 safetensors): loads with ``CLIPModel.from_pretrained``."""
    out = Path(out)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    processor.save_pretrained(out)
    return out


@torch.no_grad()
def zero_shot_accuracy(model, processor, seed: int = 12345, count: int = 2000) -> dict[str, float]:
    """Zero-shot accuracy on fresh rendered pictures: the full caption that scores highest names
    the right shape, colour and background (pictures with a named shape only)."""
    images, labels = training_examples(seed, count)
    keep = labels[:, 1] != _NONE
    images, labels = images[keep], labels[keep]
    candidates = [
        (s, c, b) for s in range(len(JUDGE_SHAPES)) for c in range(len(COLOUR_NAMES)) for b in range(len(COLOUR_NAMES))
    ]
    candidates = [k for k in candidates if k[1] != k[2]]
    texts = [_caption(*k, (True, True, True))[0] for k in candidates]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    text = F.normalize(_features(model.get_text_features(**tokens)), dim=-1)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    image = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    best = torch.tensor(candidates)[(image @ text.T).argmax(1)]
    truth = torch.from_numpy(labels)
    return {
        name: float((best[:, i] == truth[:, i]).float().mean())
        for i, name in enumerate(("shape", "colour", "background"))
    }
