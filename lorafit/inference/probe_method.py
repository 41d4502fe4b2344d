"""Which method to train, from the probe's verdict: nothing, a textual embedding, or a LoRA.

A textual embedding (textual inversion, ``model.embedding.*``) moves a new word in the text
encoder's input space and leaves the denoiser as it is: it can only reach images the base model
can already draw from *some* prompt, but it finds that prompt more precisely than words can and
costs a few kilobytes. A LoRA changes the denoiser and can teach what the model cannot draw. The
probe measures exactly the difference, so the rule is (thresholds of
:mod:`~lorafit.inference.probe_verdict`):

1. **performs well** -> ``prompt``: no training, use the best phrasing.
2. **inconsistent** or **gets close** (some seed reaches ``good``, or the best phrasing averages
   ``close``: the concept is within a prompt's reach) -> ``embedding``, on the families that
   train one (SD1/SD2/SDXL); started from the class word, with the trigger as its token. If its
   images still miss details, pivotal tuning (the same embedding with a LoRA) is the next step.
3. **doesn't know it** -> ``lora`` (the denoiser must learn); on SD1/SD2/SDXL pivotal tuning is
   the alternative when the subject should also answer to a word of its own.

On families without textual inversion (Flux and later) every training verdict is ``lora``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.inference.probe_verdict import Verdict
from lorafit.networks.embedding_files import EMBEDDING_FAMILIES


@dataclass(frozen=True)
class Method:
    key: str  # prompt, embedding or lora
    advice: str


def recommend_method(verdict: Verdict, family: str, subject: str | None, class_word: str | None) -> Method:
    """The method for ``verdict`` on ``family`` (rule in the module docstring); ``subject``/``class_word``
    (``ohwx dog`` / ``dog`` from the concept folder) fill in the suggested settings."""
    if verdict.key == "performs_well":
        return Method("prompt", "no training: prompt with the best phrasing")
    trigger = (subject or "").split()[0] if subject else "ohwx"
    if verdict.key in ("inconsistent", "gets_close") and family in EMBEDDING_FAMILIES:
        init = f" --model.embedding.init_word {class_word}" if class_word else ""
        return Method(
            "embedding",
            f"textual inversion: the model can draw it from a prompt, an embedding finds that prompt "
            f"(--model.embedding.token {trigger}{init} --model.embedding.learning_rate 5e-3 "
            "--model.optimizer.denoiser_lr 0); pivotal tuning (the same with a LoRA) if details stay missing",
        )
    if family in EMBEDDING_FAMILIES:
        return Method(
            "lora",
            "a LoRA: no prompt gets close, so the denoiser must learn it (pivotal tuning, "
            f"--model.embedding.token {trigger} with the LoRA, if it should answer to a word of its own)",
        )
    return Method("lora", f"a LoRA (textual inversion is not offered for {family})")
