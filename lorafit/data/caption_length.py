"""Which captions training would cut: CLIP token counts with the base model's own tokenizer(s).

CLIP reads 77 tokens, 75 of them caption (kohya's ``max_token_length`` 150/225 reads 2 or 3
chunks of 75); training truncates anything longer, silently, as every trainer does. ``lorafit
prepare`` counts each caption's tokens with the tokenizer(s) of the model the dataset is for
(``--tokenizer``, or ``model.model`` of ``--fit_config``) and lists the captions over the limit in its
report, so a user learns before training which words never reach the model.

Only the tokenizer files are read (``tokenizer/``, ``tokenizer_2/`` of a diffusers folder or hub
id, or a tokenizer folder itself); no weights are loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError

logger = logging.getLogger("lorafit.data")


@dataclass(frozen=True)
class CaptionLengths:
    """Counts caption tokens and knows the limit training cuts at.

    Attributes:
        tokenizers: The model's tokenizers (SDXL has two; a caption is cut if either cuts it).
        limit: Caption tokens training keeps: ``max_token_length``, else the tokenizer's
            ``model_max_length`` minus its start and end tokens (75 for CLIP).
        source: The model or folder the tokenizers came from, for the report.
    """

    tokenizers: tuple
    limit: int
    source: str

    def tokens(self, caption: str) -> int:
        """The caption's length in tokens (the longest over the tokenizers), start/end tokens excluded."""
        return max(len(t(caption, add_special_tokens=False)["input_ids"]) for t in self.tokenizers)

    def over_limit(self, caption: str) -> int | None:
        """The token count when it exceeds :attr:`limit`, else None."""
        count = self.tokens(caption)
        return count if count > self.limit else None


def _tokenizer_folders(source: str) -> list[tuple[str, str | None]]:
    """(path or hub id, subfolder) of each tokenizer of ``source``."""
    path = Path(source).expanduser()
    if (path / "tokenizer_config.json").is_file():
        return [(str(path), None)]
    if path.is_dir():
        return [(str(path), sub) for sub in ("tokenizer", "tokenizer_2") if (path / sub).is_dir()]
    return [(source, "tokenizer"), (source, "tokenizer_2")]  # a hub id: tokenizer_2 may not exist


def load_caption_lengths(source: str, max_token_length: int | None = None) -> CaptionLengths:
    """The tokenizer(s) of ``source`` (a diffusers folder, hub id or tokenizer folder).

    Raises:
        LorafitError: ``source`` has no tokenizer lorafit can read (a single-file checkpoint, a
            hub id not in the cache while offline, a folder of something else).
    """
    from transformers import AutoTokenizer

    if Path(source).suffix in (".safetensors", ".ckpt"):
        raise LorafitError(
            f"--tokenizer {source} is a single-file checkpoint, which holds no tokenizer; give the diffusers "
            "folder or hub id of the same family (what model.single_file_config names)"
        )
    tokenizers = []
    for folder, sub in _tokenizer_folders(source):
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(folder, subfolder=sub or ""))
        except (OSError, ValueError) as err:
            if sub == "tokenizer_2":
                continue  # SD1/SD2 have one tokenizer
            reason = " ".join(str(err).split())[:200]
            raise LorafitError(
                f"--tokenizer {source}: no tokenizer could be read ({reason}); give a diffusers folder, a cached "
                "hub id or a tokenizer folder"
            ) from None
    if not tokenizers:
        raise LorafitError(f"--tokenizer {source} has no tokenizer/ folder; give the base model's diffusers folder")
    limit = max_token_length or min(t.model_max_length for t in tokenizers) - 2
    return CaptionLengths(tuple(tokenizers), limit, source)
