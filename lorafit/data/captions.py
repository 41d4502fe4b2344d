"""Caption operations applied each time a sample is drawn, with kohya's meanings.

kohya's order (``BaseDataset.process_caption``): the whole caption may be dropped; otherwise the
first ``keep_tokens`` tags stay in place (the trigger word is usually the first), the rest are
shuffled and individually dropped. Tags are the pieces between separators, stripped.

Regularization samples show the *class* without the identifier, so the trigger word is never
added to them (adding it would teach that any dog is "ohwx").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafit.errors import LorafitError


@dataclass(frozen=True)
class CaptionOps:
    """Per-draw caption changes.

    Attributes:
        trigger_word: Prepended (as the first tag) to instance captions that do not contain it.
        shuffle_caption: Shuffle the tags after the first ``keep_tokens`` (kohya ``shuffle_caption``).
        keep_tokens: Leading tags kept in place and never dropped (kohya ``keep_tokens``).
        separator: What separates tags (kohya ``caption_separator``).
        caption_dropout_rate: Probability of training on an empty caption (kohya
            ``caption_dropout_rate``): keeps the LoRA useful without its prompt, and is what
            classifier-free guidance learns from.
        tag_dropout_rate: Probability of dropping each non-kept tag (kohya ``caption_tag_dropout_rate``).
    """

    trigger_word: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    separator: str = ","
    caption_dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        for key in ("caption_dropout_rate", "tag_dropout_rate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise LorafitError(f"data.{key} is {value}; use a probability between 0 and 1")
        if self.keep_tokens < 0:
            raise LorafitError(f"data.keep_tokens is {self.keep_tokens}; use 0 or more")
        if not self.separator:
            raise LorafitError("data.caption_separator is empty; use e.g. ','")

    @property
    def is_identity(self) -> bool:
        """True when captions pass unchanged (then text-encoder outputs can be cached)."""
        return (
            not self.trigger_word
            and not self.shuffle_caption
            and not self.caption_dropout_rate
            and not self.tag_dropout_rate
        )

    def _join(self, tags: list[str]) -> str:
        # "a, b" for the usual comma; any other separator is used as given.
        glue = ", " if self.separator.strip() == "," else self.separator
        return glue.join(tags)

    def apply(self, caption: str, rng: random.Random, is_reg: bool = False) -> str:
        """The caption to train on this time; ``rng`` makes the choice reproducible per draw."""
        if self.caption_dropout_rate and rng.random() < self.caption_dropout_rate:
            return ""
        tags = [tag.strip() for tag in caption.split(self.separator)]
        tags = [tag for tag in tags if tag]
        if self.trigger_word and not is_reg and not _contains_word(caption, self.trigger_word):
            tags.insert(0, self.trigger_word)
        if not (self.shuffle_caption or self.tag_dropout_rate):
            return self._join(tags)
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.shuffle_caption:
            rng.shuffle(rest)
        if self.tag_dropout_rate:
            rest = [tag for tag in rest if rng.random() >= self.tag_dropout_rate]
        return self._join(kept + rest)


def _contains_word(caption: str, word: str) -> bool:
    padded = f" {' '.join(caption.replace(',', ' ').split())} "
    return f" {word.strip()} " in padded
