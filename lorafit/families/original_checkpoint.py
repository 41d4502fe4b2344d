"""Write a diffusers pipeline as one original-layout (A1111/ComfyUI) ``.safetensors`` checkpoint.

A single-file checkpoint keeps each part under the name the original Stable Diffusion / SGM code
gives it: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and the text encoder(s)
under ``cond_stage_model.*`` (SD1/SD2) or ``conditioner.embedders.{0,1}.*`` (SDXL). diffusers can
read such files (``from_single_file``) but has no public function to write one, so the
diffusers -> original direction is written here by hand, checked against what diffusers'
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``
and ``convert_open_clip_checkpoint`` read back. Its first use is letting tests drive the real
``from_single_file`` loading path offline with tiny models.

Every weight is mapped or the conversion fails: nothing is dropped silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.families.original_layout import unet_module_to_original

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

# OpenCLIP names of one transformer layer's parts, keyed by the HF CLIP names.
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",  # a bare parameter
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _hf_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under transformers-4 names (``text_model.encoder.layers...``).

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` (but not from
    ``CLIPTextModelWithProjection``); the original checkpoints, and diffusers' reader of them,
    keep it.
    """
    state = {}
    for name, tensor in text_encoder.state_dict().items():
        if not name.startswith(("text_model.", "text_projection.")):
            name = f"text_model.{name}"
        state[name] = tensor
    return state


def _unet_state_dict(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    return {UNET_PREFIX + unet_module_to_original(name, config): t for name, t in unet.state_dict().items()}


def _vae_key(name: str, up_levels: int) -> str:
    """One VAE parameter name in the original (``ldm`` ``Encoder``/``Decoder``) layout."""
    side, _, rest = name.partition(".")
    if side not in ("encoder", "decoder"):
        return name  # quant_conv / post_quant_conv keep their names
    parts = rest.split(".")
    if parts[0] in ("conv_in", "conv_out"):
        pass
    elif parts[0] == "conv_norm_out":
        parts[0] = "norm_out"
    elif parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "downsamplers", "upsamplers"):
        # The original decoder numbers its levels from the highest resolution up; diffusers numbers
        # them in the order they run, so up_blocks.i is up.{levels-1-i}. The encoder agrees.
        level = int(parts[1]) if parts[0] == "down_blocks" else up_levels - 1 - int(parts[1])
        side_name = "down" if parts[0] == "down_blocks" else "up"
        if parts[2] == "resnets":
            parts = [side_name, str(level), "block", *parts[3:]]
        else:  # downsamplers.0.conv -> downsample.conv, upsamplers.0.conv -> upsample.conv
            parts = [side_name, str(level), f"{side_name}sample", *parts[4:]]
    elif parts[0] == "mid_block" and parts[1] == "resnets":
        parts = ["mid", f"block_{int(parts[2]) + 1}", *parts[3:]]  # block_1 / block_2
    elif parts[0] == "mid_block" and parts[1] == "attentions" and parts[3] in _VAE_ATTENTION_PARTS:
        leaf = parts[5:] if parts[3] == "to_out" else parts[4:]  # to_out.0.weight -> proj_out.weight
        parts = ["mid", "attn_1", _VAE_ATTENTION_PARTS[parts[3]], *leaf]
    else:
        raise LorafitError(f"VAE weight {name!r} has no place in the original layout")
    parts = ["nin_shortcut" if part == "conv_shortcut" else part for part in parts]
    return ".".join([side, *parts])


def _vae_state_dict(vae) -> dict[str, torch.Tensor]:
    up_levels = len(vae.config.up_block_types)
    state = {}
    for name, tensor in vae.state_dict().items():
        key = _vae_key(name, up_levels)
        if ".mid.attn_1." in key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original mid attention uses 1x1 convs
        state[VAE_PREFIX + key] = tensor
    return state


def _open_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """The encoder in OpenCLIP's layout: fused q/k/v ``in_proj``, ``resblocks``, transposed projection.

    Only the layers the encoder has are written. Real SD2 checkpoints hold one more resblock
    (24) than diffusers keeps (23, the penultimate-layer output SD2 conditions on); diffusers
    skips that block by its literal name (``resblocks.23``), so a file with exactly the kept
    layers loads back to the same weights. A1111 and ComfyUI never run that block either and
    load such files too (lorafit/families/single_file_weights.py says how each reader treats it).
    """
    state, qkv = {}, {}
    for name, tensor in _hf_clip_state_dict(text_encoder).items():
        if name in _OPEN_CLIP_TOP:
            state[_OPEN_CLIP_TOP[name]] = tensor
            continue
        if name == "text_projection.weight":
            state["text_projection"] = tensor.T.contiguous()  # OpenCLIP computes x @ proj
            continue
        match = _LAYER.fullmatch(name)
        if not match:
            raise LorafitError(f"text encoder weight {name!r} has no place in the OpenCLIP layout")
        layer, part, kind = match.groups()
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[part.removeprefix("self_attn.")[0]] = tensor
            continue
        if part not in _OPEN_CLIP_LAYER_PARTS:
            raise LorafitError(f"text encoder weight {name!r} has no place in the OpenCLIP layout")
        state[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_PARTS[part]}.{kind}"] = tensor
    for (layer, kind), parts in qkv.items():
        # diffusers splits in_proj back into thirds of the hidden width, in q, k, v order.
        fused = torch.cat([parts["q"], parts["k"], parts["v"]])
        state[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return state


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def original_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """Rename a pipeline's weights to the original single-file layout.

    Tensors are shared with the models, except the fused q/k/v and transposed projections of
    OpenCLIP encoders, which are new.

    The text layout follows the family: with ``text_encoder_2`` it is SDXL (CLIP-L in HF layout
    as ``conditioner.embedders.0``, OpenCLIP bigG as ``conditioner.embedders.1``); without, an
    encoder with exact GELU is SD2's OpenCLIP ViT-H (``cond_stage_model.model``) and one with
    ``quick_gelu`` is SD1's OpenAI CLIP-L (``cond_stage_model.transformer``), the activation
    being what tells the two CLIP trainings apart.

    Args:
        unet: The pipeline's ``UNet2DConditionModel``.
        vae: The pipeline's ``AutoencoderKL``.
        text_encoder: The first (or only) CLIP text encoder.
        text_encoder_2: SDXL's second, OpenCLIP bigG, encoder (``CLIPTextModelWithProjection``).

    Returns:
        ``{original key: tensor}``; tensors may live on the meta device if the models do.

    Raises:
        LorafitError: If a model still carries adapter layers or has a weight with no original name.
    """
    models = [m for m in (unet, vae, text_encoder, text_encoder_2) if m is not None]
    if any("lora_" in name or "base_layer" in name for m in models for name, _ in m.named_parameters()):
        raise LorafitError("the pipeline has LoRA layers: fuse and unload them before writing a checkpoint")
    state = {**_unet_state_dict(unet), **_vae_state_dict(vae)}
    if text_encoder_2 is not None:
        state.update(_prefixed(SDXL_TEXT_PREFIXES[0], _hf_clip_state_dict(text_encoder)))
        state.update(_prefixed(SDXL_TEXT_PREFIXES[1], _open_clip_state_dict(text_encoder_2)))
    elif text_encoder.config.hidden_act == "gelu":
        state.update(_prefixed(SD2_TEXT_PREFIX, _open_clip_state_dict(text_encoder)))
    else:
        state.update(_prefixed(SD1_TEXT_PREFIX, _hf_clip_state_dict(text_encoder)))
    return state


def save_original_checkpoint(pipe, path: str | Path) -> Path:
    """Write ``pipe``'s UNet, VAE and text encoder(s) as one original-layout ``.safetensors`` file.

    The file loads with ``StableDiffusionPipeline.from_single_file`` /
    ``StableDiffusionXLPipeline.from_single_file`` (given the pipeline's diffusers directory as
    ``config``); the names are the ones A1111/ComfyUI read, but only diffusers' reader is checked
    here. Scheduler and tokenizers are not stored: the original format has no place for them.

    Args:
        pipe: A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (SDXL base layout).
        path: File to write; parent folders are created.

    Returns:
        The path written.

    Raises:
        LorafitError: If the pipeline lacks a part the format needs or carries LoRA layers.
    """
    from safetensors.torch import save_file

    parts = [getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "text_encoder_2")]
    if any(part is None for part in parts[:3]):
        raise LorafitError("an original checkpoint needs unet, vae and text_encoder (SD1/SD2/SDXL base)")
    state = original_state_dict(*parts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
