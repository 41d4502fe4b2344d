"""Textual-inversion embeddings in a pipeline: standalone files and the ones bundled in a LoRA file.

``generate`` and ``grid`` take a run's LoRA file as it is: a pivotal-tuning run's kohya file
carries its embeddings as A1111's ``bundle_emb`` keys (:mod:`lorafit.networks.embedding_files`),
a textual-inversion run's holds nothing else; an embedding file given as ``--lora`` (A1111,
ComfyUI, kohya or diffusers layout) loads too. The vectors go in through diffusers' own
``load_textual_inversion`` (tokens ``ohwx``, ``ohwx_1`` ... appended to each tokenizer and text
encoder) and the pipeline's ``maybe_convert_prompt`` expands the token in prompts, as it does for
any embedding a diffusers user loads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.embedding_files import (
    BUNDLE_PREFIX,
    is_embedding_file,
    read_embedding_file,
    split_bundle,
    vector_tokens,
)


def load_embedding(pipe, token: str, vectors: dict[str, torch.Tensor], where: str = "") -> None:
    """Add ``token`` with ``vectors`` (``{component: [n, width]}``) to the pipeline's tokenizers and text encoders."""
    from diffusers.loaders import TextualInversionLoaderMixin

    for component, rows in vectors.items():
        encoder = getattr(pipe, component, None)
        tokenizer = getattr(pipe, component.replace("text_encoder", "tokenizer"), None)
        if encoder is None or tokenizer is None:
            raise LorafitError(f"{where}: embedding {token!r} is for {component}, which this model has not")
        width = encoder.get_input_embeddings().weight.shape[-1]
        if rows.shape[-1] != width:
            raise LorafitError(
                f"{where}: embedding {token!r} has {rows.shape[-1]}-wide vectors, this model's {component} takes "
                f"{width}; it was trained for another model family"
            )
        try:
            TextualInversionLoaderMixin.load_textual_inversion(
                pipe, rows, token=token, tokenizer=tokenizer, text_encoder=encoder
            )
        except ValueError as error:  # diffusers: "Token ... already in tokenizer vocabulary"
            raise LorafitError(f"{where}: embedding {token!r} cannot be loaded ({error})") from None


def unload_embedding(pipe, token: str, vectors: dict[str, torch.Tensor]) -> None:
    """Remove what :func:`load_embedding` added (the grid loads one epoch's embedding at a time)."""
    from diffusers.loaders import TextualInversionLoaderMixin

    for component, rows in vectors.items():
        TextualInversionLoaderMixin.unload_textual_inversion(
            pipe,
            vector_tokens(token, rows.shape[0]),
            tokenizer=getattr(pipe, component.replace("text_encoder", "tokenizer")),
            text_encoder=getattr(pipe, component),
        )


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def embeddings_of(path: str | Path) -> tuple[bool, dict[str, dict[str, torch.Tensor]]]:
    """``(has LoRA weights, {token: {component: vectors}})`` of a file given as a LoRA."""
    path = Path(path)
    if path.suffix != ".safetensors":  # A1111's .pt embeddings
        token, vectors = read_embedding_file(path)
        return False, {token: vectors}
    keys = _keys(path)
    if not any(key.startswith(BUNDLE_PREFIX) for key in keys):
        if len(keys) > 2:  # a LoRA has 2-3 tensors per module; embedding files 1-2 tensors
            return True, {}
        from lorafit.networks.files import read_safetensors

        if not is_embedding_file(read_safetensors(path)[0]):
            return True, {}
        token, vectors = read_embedding_file(path)
        return False, {token: vectors}
    from safetensors.torch import load_file

    lora, bundled = split_bundle(load_file(str(path)))
    return bool(lora), bundled


def load_lora_or_embedding(
    pipe, path: str | Path, weight: float = 1.0, adapter_name: str | None = None, block_weights=None
) -> tuple[str | None, dict[str, dict[str, torch.Tensor]]]:
    """Load a LoRA file with its bundled embeddings, or an embedding file: ``(adapter name or None,
    the embeddings loaded)``. The strength applies to the LoRA; an embedding has none (as in A1111)."""
    from lorafit.networks.loading import load_lora

    has_lora, embeddings = embeddings_of(path)
    name = None
    if has_lora:
        name = load_lora(
            pipe, path, weight=weight, adapter_name=adapter_name, block_weights=block_weights, bundled_embeddings="skip"
        )
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for token, vectors in embeddings.items():
            load_embedding(pipe, token, vectors, str(path))
            loaded[token] = vectors
    except Exception:
        unload(pipe, name, loaded)
        raise
    return name, loaded


def unload(pipe, name: str | None, embeddings: dict[str, dict[str, torch.Tensor]]) -> None:
    """Undo :func:`load_lora_or_embedding`."""
    from lorafit.networks.loading import unload_lora

    if name:
        unload_lora(pipe, name)
    for token, vectors in embeddings.items():
        unload_embedding(pipe, token, vectors)
