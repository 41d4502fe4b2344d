"""Textual-inversion embedding files: what A1111, ComfyUI, kohya and diffusers read, and the bundle.

Layouts, as their loaders read them (checked against A1111's ``modules/textual_inversion``
``create_embedding_from_data``, ComfyUI's ``comfy/sd1_clip.py`` ``load_embed``, kohya's
``train_textual_inversion.py``/``sdxl_train_textual_inversion.py`` and diffusers'
``TextualInversionLoaderMixin``):

- SD1/SD2 ``{"emb_params": [n, width]}`` (kohya's safetensors layout): A1111 takes the one
  tensor of a one-key file, ComfyUI the first tensor, diffusers it with ``token=`` given;
- SDXL ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``: A1111 and kohya need both keys, ComfyUI
  picks its encoder's key, diffusers loads each into its encoder (``load_textual_inversion(sd["clip_g"],
  token=..., text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)``);
- diffusers' own ``{token: [n, width]}`` (``learned_embeds.safetensors``), SD1/SD2: the key names the token;
- the A1111 ``.pt`` dict (``string_to_param: {"*": tensor}``, ``name``) is read, never written (a pickle);
- the bundle: A1111's LoRA loader (``extensions-builtin/Lora/networks.py``) takes keys
  ``bundle_emb.<name>.string_to_param.*`` (SD1/SD2) or ``bundle_emb.<name>.clip_l`` / ``.clip_g``
  (SDXL) from a LoRA file and loads them as the embedding ``<name>`` with the LoRA. ComfyUI and
  kohya ignore those keys, diffusers' ``load_lora_weights`` refuses them: lorafit keeps them out of
  the diffusers-format LoRA file and writes the standalone embedding files beside it.

The embedding of a file is ``{component: [n, width]}`` by diffusers component (``text_encoder``,
``text_encoder_2``); A1111 names the embedding after the file, so lorafit writes the token into
the metadata (``lorafit_token``) and names the final file after it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.files import atomic_save_safetensors, read_safetensors

# The families whose text encoders are all CLIPs these layouts cover.
EMBEDDING_FAMILIES = ("sd1", "sd2", "sdxl")
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
BUNDLE_PREFIX = "bundle_emb."
TOKEN_METADATA = "lorafit_token"


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens of a ``count``-vector embedding, named as diffusers' loader names them (``ohwx``, ``ohwx_1``, ...)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def a1111_tensors(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The A1111/ComfyUI/kohya layout of ``vectors`` (one encoder: ``emb_params``; SDXL: ``clip_l``/``clip_g``)."""
    if set(vectors) == {"text_encoder"}:
        return {"emb_params": vectors["text_encoder"]}
    if set(vectors) == set(SDXL_KEYS):
        return {SDXL_KEYS[name]: vector for name, vector in vectors.items()}
    raise LorafitError(f"no A1111 embedding layout for the text encoders {sorted(vectors)}")


def bundle_tensors(token: str, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vectors`` as A1111's ``bundle_emb`` keys of a LoRA file."""
    if set(vectors) == {"text_encoder"}:
        return {f"{BUNDLE_PREFIX}{token}.string_to_param.*": vectors["text_encoder"]}
    return {f"{BUNDLE_PREFIX}{token}.{key}": vector for key, vector in a1111_tensors(vectors).items()}


def embedding_names(keys) -> list[str]:
    """The embeddings' names (A1111's tokens) among ``bundle_emb.<name>.*`` keys (other keys are ignored)."""
    return sorted({key[len(BUNDLE_PREFIX) :].partition(".")[0] for key in keys if key.startswith(BUNDLE_PREFIX)})


def bundled_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.*`` tensors of a LoRA file (empty for a file without embeddings); only they are read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(BUNDLE_PREFIX)}


def split_bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(LoRA tensors, {token: {component: vectors}})`` of a LoRA file that may carry ``bundle_emb`` keys."""
    lora = {key: value for key, value in tensors.items() if not key.startswith(BUNDLE_PREFIX)}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            token, _, rest = key[len(BUNDLE_PREFIX) :].partition(".")
            grouped.setdefault(token, {})[rest.split(".")[0]] = value
    return lora, {token: _components(layout, f"bundle_emb.{token}") for token, layout in grouped.items()}


def _components(layout: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """``{component: [n, width]}`` from one embedding's A1111 keys (``string_to_param``, ``emb_params``,
    ``clip_l``/``clip_g``)."""
    if "clip_l" in layout or "clip_g" in layout:
        if not ("clip_l" in layout and "clip_g" in layout):
            raise LorafitError(f"{where}: an SDXL embedding needs both clip_l and clip_g, found {sorted(layout)}")
        return {name: _rows(layout[key]) for name, key in SDXL_KEYS.items()}
    if len(layout) != 1:
        raise LorafitError(f"{where}: one embedding tensor expected, found {sorted(layout)}")
    return {"text_encoder": _rows(next(iter(layout.values())))}


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def is_embedding_file(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a safetensors file holds an embedding and no LoRA (a one-tensor file, clip_l/clip_g,
    or nothing but ``bundle_emb`` keys)."""
    if not tensors:
        return False
    if all(key.startswith(BUNDLE_PREFIX) for key in tensors) or set(tensors) <= {"clip_l", "clip_g"}:
        return True
    return len(tensors) == 1 and next(iter(tensors.values())).dim() <= 2 and "." not in next(iter(tensors))


def read_embedding_file(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(token, {component: vectors})`` of an embedding file in any layout above.

    The token is the file's ``lorafit_token``, else the key of a diffusers file, else (A1111's rule)
    the file name without extension.
    """
    path = Path(path)
    if path.suffix in (".pt", ".bin"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable pickle gets the same one line
            raise LorafitError(f"{path} is not a readable embedding file ({error})") from None
        if isinstance(data, dict) and "string_to_param" in data:
            return str(data.get("name") or path.stem), _components(dict(data["string_to_param"]), str(path))
        tensors, metadata = dict(data), {}
    else:
        tensors, metadata = read_safetensors(path)
    if all(key.startswith(BUNDLE_PREFIX) for key in tensors) and tensors:
        _, bundled = split_bundle(tensors)
        if len(bundled) != 1:
            raise LorafitError(f"{path}: holds {len(bundled)} bundled embeddings; load it as a LoRA file")
        return next(iter(bundled.items()))
    if not is_embedding_file(tensors):
        raise LorafitError(f"{path} is not a textual-inversion embedding (keys {sorted(tensors)[:3]} ...)")
    token = metadata.get(TOKEN_METADATA)
    if token is None:
        key = next(iter(tensors))
        token = key if len(tensors) == 1 and key not in ("emb_params", "*") else path.stem
    return token, _components(tensors, str(path))


def save_embedding_files(
    directory: Path,
    stem: str,
    token: str,
    vectors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``<directory>/<stem>.safetensors`` (A1111/ComfyUI/kohya) and, with one text encoder,
    ``<directory>/diffusers/<stem>.safetensors`` (diffusers' ``{token: vectors}``)."""
    vectors = {name: vector.detach().to("cpu", dtype) for name, vector in vectors.items()}
    metadata = {
        **(metadata or {}),
        TOKEN_METADATA: token,
        "lorafit_vectors": str(next(iter(vectors.values())).shape[0]),
    }
    paths = [atomic_save_safetensors(a1111_tensors(vectors), directory / f"{stem}.safetensors", metadata)]
    if set(vectors) == {"text_encoder"}:  # SDXL's diffusers loading reads the clip_l/clip_g file above
        paths.append(
            atomic_save_safetensors({token: vectors["text_encoder"]}, directory / "diffusers" / f"{stem}.safetensors")
        )
    return paths
