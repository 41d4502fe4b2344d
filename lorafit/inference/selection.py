"""Which epoch to keep: fidelity vs flexibility per saved epoch, and a suggestion with its reason.

The seeds' "LoRA Selector": later epochs reproduce the subject more faithfully but follow other
prompts less willingly (overfitting); the best file is usually an earlier one that has both. Two
numbers per epoch make that trade-off visible next to the grid:

- **fidelity**: mean CLIP image-image score between generations of the grid's prompts and
  the training images. Rises as the LoRA learns the subject.
- **flexibility**: mean CLIP text-image score between generations of prompts that put the
  subject somewhere else (a watercolor, the moon, pixel art, ...) and those prompts, with the
  trigger phrase replaced by the plain class word (CLIP does not know ``ohwx``). Falls when the
  LoRA starts to draw its training images whatever the prompt says.

Suggestion rule (documented in docs/sampling-and-selection.md): rescale both numbers to 0..1
across the LoRA's epochs (lowest epoch 0, highest 1), average them into a *balance* score, and
suggest the epoch with the highest balance; on a tie, the earlier epoch (the seeds' advice: the
flexible early file, sharpened with hires fix, beats a later stiff one). The base model's row is
shown for reference and never suggested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from lorafit.inference.clip_scores import ClipScorer

DEFAULT_FLEXIBILITY_PROMPTS = (
    "a watercolor painting of {subject}",
    "a pencil sketch of {subject}",
    "{subject} on the surface of the moon",
    "{subject} in a snowy forest at night",
    "a pixel art illustration of {subject}",
    "a low-poly 3D render of {subject}",
)


@dataclass
class EpochScore:
    """Selection numbers of one LoRA file (or of the base model)."""

    label: str
    fidelity: float
    flexibility: float
    is_base: bool = False
    balance: float | None = None


def flexibility_prompts(templates: Sequence[str], subject: str, class_word: str | None) -> list[tuple[str, str]]:
    """(prompt to generate, text to score against) for each template.

    ``{subject}`` becomes the trigger phrase in the prompt and the class word (if known) in the
    scored text; a template without the placeholder is used as written for both.
    """
    pairs = []
    for template in templates:
        pairs.append((template.replace("{subject}", subject), template.replace("{subject}", class_word or subject)))
    return pairs


def fidelity_score(scorer: ClipScorer, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """Mean over generations of their CLIP score against every training image (torchmetrics, / 100)."""
    values = scorer.similarity_to_set(images, references)
    return sum(values) / len(values)


def flexibility_score(scorer: ClipScorer, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
    """CLIP score of each generation against the text of its own prompt (paired; torchmetrics, / 100)."""
    return scorer.text_similarity(images, texts)


def _rescale(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low <= 1e-12:
        return [1.0] * len(values)  # all equal: none is worse than another
    return [(v - low) / (high - low) for v in values]


def suggest_epoch(scores: list[EpochScore]) -> tuple[EpochScore | None, str]:
    """Fill in ``balance`` for the LoRA rows and return the suggested row with the reason in words."""
    candidates = [s for s in scores if not s.is_base]
    if not candidates:
        return None, "no LoRA files were scored"
    fidelity = _rescale([s.fidelity for s in candidates])
    flexibility = _rescale([s.flexibility for s in candidates])
    for score, f, x in zip(candidates, fidelity, flexibility):
        score.balance = (f + x) / 2
    best = candidates[0]
    for score in candidates[1:]:
        if score.balance > best.balance + 1e-12:  # strictly better: ties keep the earlier epoch
            best = score
    if len(candidates) == 1:
        return best, f"{best.label} is the only LoRA file scored"
    low_f, high_f = min(s.fidelity for s in candidates), max(s.fidelity for s in candidates)
    low_x, high_x = min(s.flexibility for s in candidates), max(s.flexibility for s in candidates)
    reason = (
        f"{best.label} has the best balance ({best.balance:.2f}): fidelity {best.fidelity:.3f} "
        f"(epochs range {low_f:.3f}-{high_f:.3f}) and flexibility {best.flexibility:.3f} "
        f"(epochs range {low_x:.3f}-{high_x:.3f}); balance = mean of both rescaled to 0-1 across epochs, "
        "earlier epoch on a tie"
    )
    base = next((s for s in scores if s.is_base), None)
    if base is not None and high_f <= base.fidelity:
        reason += (
            f". Caution: no epoch resembles the training images more than the base model does "
            f"(base fidelity {base.fidelity:.3f}); the LoRA may be undertrained or the prompts miss the trigger"
        )
    return best, reason
