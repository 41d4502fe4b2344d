"""Textual inversion: trained vectors for a new token in every CLIP text encoder, the rest frozen.

The token (``model.embedding.token``, e.g. ``ohwx``) and, with several vectors, ``ohwx_1`` ...
are added to each tokenizer of the family, so they get the ids right after the vocabulary: the
ids diffusers' ``load_textual_inversion`` gives them at generation time. Each text encoder's
token embedding is replaced by :class:`ExtendedTokenEmbedding`, which looks new ids up in the
trained vectors and every other id in the frozen matrix, untouched.

Why not the diffusers example's way (resize the matrix, train all of it, copy the old rows back
after every step): the optimizer would hold moments for the whole vocabulary (49408 x 1280 for
SDXL's bigG), weight decay would touch rows that are then restored, and a checkpoint would carry
the matrix. Here only the new rows are parameters: the optimizer, checkpoints and the EMA see
``n_vectors x width`` numbers per encoder.

Captions name the token once; :meth:`TrainedTokens.expand` writes ``ohwx ohwx_1 ohwx_2`` for it,
the replacement diffusers' ``maybe_convert_prompt`` makes in the pipelines, so training encodes
exactly what generation will.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator

import lightning.pytorch as pl
import torch

from lorafit.errors import LorafitError
from lorafit.networks.embedding_files import EMBEDDING_FAMILIES, vector_tokens
from lorafit.training.config import EmbeddingConfig

log = logging.getLogger("lorafit.train")

# EMBEDDING_FAMILIES: those whose every text encoder is a CLIP with a token embedding (the
# A1111/ComfyUI formats cover exactly these); Flux reads only CLIP-L's pooled vector, T5 the prompt.


def check_embedding(config: EmbeddingConfig) -> None:
    """Fail on an impossible ``model.embedding`` (one line naming the key), before weights load."""
    if config.token is None:
        defaults = EmbeddingConfig()
        for key in ("init_word", "vectors", "learning_rate", "freeze_after"):
            if getattr(config, key) != getattr(defaults, key):
                raise LorafitError(f"model.embedding.{key} is set but model.embedding.token is empty; name the token")
        return
    token = config.token
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", token):
        raise LorafitError(
            f"model.embedding.token: {token!r}; use one lowercase word of letters, digits, '_' or '-' (e.g. ohwx): "
            "CLIP lowercases prompts, and the word is also the embedding's file name in A1111"
        )
    if config.vectors < 1:
        raise LorafitError(f"model.embedding.vectors: {config.vectors}; use 1 or more (1-8 are usual)")
    if config.learning_rate is not None and config.learning_rate <= 0:
        raise LorafitError(f"model.embedding.learning_rate: {config.learning_rate} must be > 0 (e.g. 5e-3)")
    if config.freeze_after is not None and config.freeze_after < 1:
        raise LorafitError(
            f"model.embedding.freeze_after: {config.freeze_after}; use a number of optimizer steps >= 1, "
            "or leave it empty to train the vectors throughout"
        )


def expand_token(text: str, token: str, count: int) -> str:
    """``text`` with ``token`` written as all its vector tokens (diffusers' ``_maybe_convert_prompt``
    replaces the same way: every occurrence of the token's text)."""
    return text if count == 1 else text.replace(token, " ".join(vector_tokens(token, count)))


class ExtendedTokenEmbedding(torch.nn.Module):
    """A text encoder's token embedding with trained rows for the ids from ``first_new_id`` on.

    ``rows`` returns the trained vectors; they live in :class:`TrainedTokens`, not in the text
    encoder, so the encoder's own parameters are exactly the frozen ones.
    """

    def __init__(self, base: torch.nn.Embedding, first_new_id: int, rows):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:  # pipelines read get_input_embeddings().weight for size and dtype
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = input_ids >= self.first_new_id
        frozen = self.base(input_ids.masked_fill(new, 0))
        rows = self.rows()
        # Clamped indices so the lookup is valid everywhere; torch.where keeps only the new ids' rows.
        index = (input_ids - self.first_new_id).clamp(0, rows.shape[0] - 1)
        return torch.where(new.unsqueeze(-1), rows.to(frozen.dtype)[index], frozen)


def initial_vectors(tokenizer, matrix: torch.Tensor, init_word: str | None, count: int, key: str) -> torch.Tensor:
    """The vectors' start: the init word's token embeddings spread over ``count`` (A1111's rule), or
    the vocabulary's mean embedding."""
    matrix = matrix.detach().float()
    if not (init_word or "").strip():
        return matrix.mean(dim=0, keepdim=True).repeat(count, 1)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise LorafitError(f"{key}: {init_word!r} has no tokens; use a word such as the class (dog, woman)")
    rows = matrix[torch.tensor(ids)]
    return torch.stack([rows[i * len(ids) // count] for i in range(count)])


class TrainedTokens(torch.nn.Module):
    """The trained vectors of one token, per text encoder (``text_encoder``, ``text_encoder_2``).

    Building it adds the token(s) to the tokenizers and puts :class:`ExtendedTokenEmbedding` in
    front of each encoder's token embedding; ``vectors[component]`` is ``[count, width]`` float32.
    """

    def __init__(self, config: EmbeddingConfig, components: dict[str, tuple]):
        super().__init__()
        self.token, self.count = config.token, config.vectors
        self.tokens = vector_tokens(config.token, config.vectors)
        self.vectors = torch.nn.ParameterDict()
        self._at_start = False  # rows() hands out the vectors training began from (at_start())
        self._named = False  # whether a caption named the token yet (else one warning)
        for component, (tokenizer, encoder) in components.items():
            self._extend(component, tokenizer, encoder, config.init_word)

    def _extend(self, component: str, tokenizer, encoder, init_word: str | None) -> None:
        pieces = tokenizer.tokenize(self.token)
        if (len(pieces) == 1 and pieces[0] in tokenizer.get_vocab()) or self.token in tokenizer.get_vocab():
            raise LorafitError(
                f"model.embedding.token: {self.token!r} is already a token of {component}'s vocabulary; pick a "
                "made-up word that splits into pieces (ohwx) so the embedding does not replace a word the model knows"
            )
        first = len(tokenizer)
        tokenizer.add_tokens(self.tokens)
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if ids != list(range(first, first + self.count)):  # a tokenizer already holding some of them
            raise LorafitError(f"model.embedding.token: {self.tokens} got ids {ids} in {component}'s tokenizer")
        embedding = encoder.get_input_embeddings()
        start = initial_vectors(tokenizer, embedding.weight, init_word, self.count, "model.embedding.init_word")
        self.vectors[component] = torch.nn.Parameter(start)
        # Not in checkpoints (persistent=False): rebuilt the same from the base on resume.
        self.register_buffer(f"start_{component}", start.clone(), persistent=False)
        encoder.set_input_embeddings(ExtendedTokenEmbedding(embedding, first, functools.partial(self.rows, component)))

    def rows(self, component: str) -> torch.Tensor:
        return getattr(self, f"start_{component}") if self._at_start else self.vectors[component]

    @contextlib.contextmanager
    def at_start(self) -> Iterator[None]:
        """Encode with the vectors training began from: the base model's side of a sample
        (``samples.compare_base``) shows nothing the run learnt, with the LoRA off as well."""
        self._at_start = True
        try:
            yield
        finally:
            self._at_start = False

    def expand(self, captions: list[str]) -> list[str]:
        if not self._named and captions:
            self._named = any(self.token in caption.lower() for caption in captions)
            if not self._named:  # regularization batches may lack it; a run whose captions never name it learns nothing
                log.warning(
                    "model.embedding.token %r is in none of the first batch's captions (e.g. %r); its vectors learn "
                    "only from captions that name it (kohya folder `10_%s dog`, or data.trigger_word)",
                    self.token,
                    captions[0],
                    self.token,
                )
                self._named = True  # said once
        return [expand_token(caption, self.token, self.count) for caption in captions]

    def export(self) -> dict[str, torch.Tensor]:
        """The vectors per component, detached float32 copies on the host (for the files)."""
        return {name: vector.detach().float().cpu().clone() for name, vector in self.vectors.items()}

    def check_cache(self, cached: dict | None) -> None:
        if cached and cached.get("text_embeddings"):
            raise LorafitError(
                "model.embedding.token: textual inversion encodes the captions every step, but data.shards hold "
                "cached text embeddings; cache latents only (lorafit cache without --text_embeddings)"
            )


def trained_tokens(config: EmbeddingConfig, base, family) -> TrainedTokens | None:
    """The run's :class:`TrainedTokens` (None when ``model.embedding.token`` is empty)."""
    if config.token is None:
        return None
    if base.family not in EMBEDDING_FAMILIES:
        raise LorafitError(
            f"model.embedding.token: textual inversion is for SD1/SD2/SDXL, not {family.title}: its prompt reaches "
            "the model through T5/an LLM (Flux reads only CLIP-L's pooled vector), where an embedding barely "
            "steers it and no A1111/ComfyUI embedding format exists; train a LoRA with a trigger word instead"
        )
    components = {
        name: (tokenizer, encoder)
        for name, tokenizer, encoder in zip(family.text_encoder_components, base.tokenizers, base.text_encoders)
    }
    return TrainedTokens(config, components)


class EmbeddingFreeze(pl.Callback):
    """Pivotal tuning's ``model.embedding.freeze_after``: from that optimizer step on, the vectors'
    gradients are dropped before the optimizer steps, so they stay exactly as they are.

    Dropping the gradient (rather than cutting the graph) keeps DDP's reduction the same every
    step, and an optimizer skips a parameter without a gradient: no moment or weight-decay drift.
    It depends only on the step count, so a resumed run freezes at the same step.
    """

    def __init__(self, freeze_after: int):
        self.freeze_after = freeze_after

    def frozen(self, step: int) -> bool:
        return step >= self.freeze_after

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        tokens = pl_module.trained_tokens
        if tokens is None or not self.frozen(trainer.global_step):
            return
        if trainer.global_step == self.freeze_after:
            log.info("embedding vectors of %r frozen after %d steps (pivotal tuning)", tokens.token, self.freeze_after)
        for vector in tokens.vectors.values():
            vector.grad = None
