"""Does the base model already know the concept? The numbers and seed 000's four verdicts.

For each phrasing (a training caption, a synonym, a visual description) the base model draws one
image per seed; CLIP compares each image with the training images. The raw similarity depends on
the CLIP model and the dataset, so it is placed on a scale with two anchors measured on the
same data:

- **floor**: similarity of images drawn for an unrelated control prompt ("a photograph of an
  empty room") to the training images: what "not the concept at all" scores;
- **ceiling**: mean similarity between two different training images: what "another picture of
  the concept" scores.

``closeness = (similarity - floor) / (ceiling - floor)``: 0 = no closer than the control, 1 = as
close as the training images are to each other (it can leave 0..1).

Verdicts (thresholds are heuristics, tunable on the command line):

1. **already performs well**: the best phrasing's images are close (closeness >= ``good``, default
   0.8) for at least ``consistent`` (default 75%) of the seeds: refine the prompt instead of
   training.
2. **knows it but inconsistent**: some image reaches ``good``, but no phrasing does so
   consistently: a small "helper" LoRA (smaller dataset, shorter training), beware overfitting.
3. **gets close**: no image reaches ``good``, but the best phrasing averages at least ``close``
   (default 0.5): caption with the words that came closest, focus the dataset on what is missing;
   on SDXL a textual embedding may do.
4. **doesn't know it**: below that: a full LoRA, the usual path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VERDICTS = {
    "performs_well": (
        "the base model already performs well",
        "refine your prompting (use the best phrasing below) instead of training a LoRA",
    ),
    "inconsistent": (
        "the base model recognizes the concept but lacks consistency",
        "a small 'helper' LoRA is enough: smaller dataset, less training; watch for overfitting",
    ),
    "gets_close": (
        "the base model gets close to the concept but not quite there",
        (
            "caption with the phrasing that came closest and build the dataset around what the model "
            "misses; watch for overfitting (on SDXL a textual embedding may be enough)"
        ),
    ),
    "unknown": (
        "the base model doesn't recognize the concept at all",
        "train a full LoRA from scratch (the usual path)",
    ),
}


@dataclass(frozen=True)
class Thresholds:
    """Cut-offs of the verdicts (closeness units; see the module docstring)."""

    good: float = 0.8
    close: float = 0.5
    consistent: float = 0.75


@dataclass
class PhrasingScore:
    """One phrasing's images: similarity and closeness per seed."""

    kind: str  # caption, synonym, description, control
    prompt: str
    similarities: list[float]
    closeness: list[float] = field(default_factory=list)

    @property
    def mean_closeness(self) -> float:
        return sum(self.closeness) / len(self.closeness) if self.closeness else 0.0

    def hit_rate(self, good: float) -> float:
        return sum(c >= good for c in self.closeness) / len(self.closeness) if self.closeness else 0.0


@dataclass
class Verdict:
    key: str
    title: str
    advice: str
    best: PhrasingScore | None
    floor: float
    ceiling: float
    reliable: bool
    explanation: str


def decide(
    phrasings: list[PhrasingScore], control: PhrasingScore, ceiling: float, thresholds: Thresholds = Thresholds()
) -> Verdict:
    """Fill in each phrasing's closeness and pick the verdict, with the numbers behind it in words."""
    floor = sum(control.similarities) / len(control.similarities)
    span = ceiling - floor
    reliable = span > 1e-6
    for score in [*phrasings, control]:
        # A CLIP model that rates the control as close as the training images themselves cannot
        # tell the concept apart; every closeness is 0 then and the verdict says so.
        score.closeness = [(s - floor) / span if reliable else 0.0 for s in score.similarities]
    best = max(phrasings, key=lambda s: (s.hit_rate(thresholds.good), s.mean_closeness), default=None)
    any_good = any(p.hit_rate(thresholds.good) > 0 for p in phrasings)
    if best is not None and best.hit_rate(thresholds.good) >= thresholds.consistent:
        key = "performs_well"
    elif any_good:
        key = "inconsistent"
    elif best is not None and max(p.mean_closeness for p in phrasings) >= thresholds.close:
        key = "gets_close"
    else:
        key = "unknown"
    if key == "gets_close":
        best = max(phrasings, key=lambda s: s.mean_closeness)
    title, advice = VERDICTS[key]
    explanation = (
        f"scale: control prompt {floor:.3f} (closeness 0) to training images among themselves "
        f"{ceiling:.3f} (closeness 1)"
    )
    if best is not None:
        explanation += (
            f'; best phrasing ({best.kind}) "{best.prompt}": mean closeness {best.mean_closeness:.2f}, '
            f"{best.hit_rate(thresholds.good):.0%} of seeds >= {thresholds.good:g} "
            f"(performs well needs >= {thresholds.consistent:.0%}; gets close needs a mean >= "
            f"{thresholds.close:g})"
        )
    if not reliable:
        explanation += "; UNRELIABLE: the CLIP model rates the control prompt as close as the training images"
    return Verdict(key, title, advice, best, floor, ceiling, reliable, explanation)
