"""Load lorafit's network files into a diffusers pipeline at a strength, several at once.

    pipe = StableDiffusionXLPipeline.from_pretrained(...)
    load_lora(pipe, "runs/x/lora/x.safetensors", weight=0.8)            # adapter name "x"
    load_lora(pipe, "style.safetensors", weight=0.5, adapter_name="style")
    set_lora_weight(pipe, "x", 1.0)
    set_block_weights(pipe, "x", "INALL")                             # per-block strength (LBW)
    unload_lora(pipe, "style")

Why not ``pipe.load_lora_weights`` (diffusers 0.42): its kohya path builds ``alpha_pattern`` keys
from the converted key names (``...attn1.processor.to_q_lora.down.weight``), which match no module,
so every attention module whose alpha differs from the most common one silently gets the wrong
scale (checked in ``tests/test_load_lora.py``); it drops ``dora_scale`` keys with a warning
(``lora_pipeline.py``: "filter out the keys associated to 'dora_scale'") and refuses LoHa/LoKr
keys. This loader reads every format lorafit writes (kohya/LyCORIS incl. SDXL SGM names, diffusers
+ metadata) and the layouts of other trainers that ComfyUI reads (docs/network-types.md) into
:class:`LoraWeights`, checks them against the pipeline's modules (:func:`fit_to_model`) and
injects PEFT adapters itself, one per file and kind. DoRA per input channel, which PEFT has no
layer for, is applied by a hook on the base layer (:mod:`lorafit.networks.input_dora`).

Strength follows A1111/ComfyUI: ``W + weight * (W' - W)``. For LoRA/LoHa/LoKr that is PEFT's
adapter scale. For DoRA PEFT's scale would also change the direction inside the norm, so the
DoRA part's output is multiplied by ``weight`` instead (a forward hook); 0 is the base model exactly.
DoRA applies to the weight as patched by the adapters loaded before it, as in ComfyUI.
Block weights (A1111's LoRA Block Weight, :mod:`lorafit.networks.block_weights`) multiply the
strength per layer: each layer's adapter scale (or DoRA output) is ``weight x`` its block's value.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lorafit.errors import LorafitError
from lorafit.networks.block_weights import BlockWeights, parse_block_weights
from lorafit.networks.files import read_lora_file
from lorafit.networks.input_dora import InputAxisDora, attach
from lorafit.networks.kohya_format import kohya_name_table
from lorafit.networks.lora_weights import LoraModuleWeights
from lorafit.networks.model_fit import adaptable_layers, fit_to_model
from lorafit.networks.peft_layers import adapter_layers, injection_config, outer_name, write_layer

log = logging.getLogger("lorafit.lora")

_REGISTRY = "_lorafit_loras"  # attribute on each adapted component: {name: LoadedLora}


@dataclass
class LoadedLora:
    """One loaded file in one component: its PEFT adapter name per kind, its strength, DoRA hooks."""

    weight: float
    adapters: dict[str, str] = field(default_factory=dict)  # PEFT adapter name -> kind
    hooks: list = field(default_factory=list)
    blocks: BlockWeights | None = None  # per-block strength; None = the same strength everywhere
    dora_scales: dict = field(default_factory=dict)  # DoRA module (PEFT's or an InputAxisDora) -> its strength
    input_dora: dict[str, InputAxisDora] = field(default_factory=dict)  # module name -> input-axis DoRA


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    """The denoiser and text encoders of ``pipe`` that exist, by diffusers name (any pipeline of a
    family lorafit knows: txt2img, img2img, inpaint ...)."""
    from lorafit.families.registry import family_of_denoiser

    parts = getattr(pipe, "components", {})  # pipe.unet of a FluxPipeline is not None (a config attribute)
    denoiser = parts.get("unet") or parts.get("transformer")
    if denoiser is None:
        raise LorafitError(f"{type(pipe).__name__} has no UNet or transformer to load a LoRA into")
    spec = family_of_denoiser(denoiser)
    components = {spec.denoiser_component: denoiser}
    components.update({n: parts[n] for n in spec.text_encoder_components if parts.get(n) is not None})
    return components


def _family(components: dict[str, torch.nn.Module]) -> str:
    from lorafit.families.registry import family_of_denoiser

    denoiser = components.get("unet") or components.get("transformer")
    spec = family_of_denoiser(denoiser)
    if spec.name in ("sd1", "sd2", "sdxl") and "text_encoder_2" in components:
        return "sdxl"
    return spec.name


def _registry(module: torch.nn.Module) -> dict[str, LoadedLora]:
    if not hasattr(module, _REGISTRY):
        object.__setattr__(module, _REGISTRY, {})
    return getattr(module, _REGISTRY)


def loaded_loras(pipe) -> dict[str, float]:
    """Name -> strength of every file loaded into ``pipe`` with :func:`load_lora`."""
    found: dict[str, float] = {}
    for module in pipeline_components(pipe).values():
        found.update({name: loaded.weight for name, loaded in _registry(module).items()})
    return found


def _adapter_name(path: Path, adapter_name: str | None, components: dict[str, torch.nn.Module]) -> str:
    name = adapter_name or re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise LorafitError(f"adapter_name {name!r}: use letters, digits, '_' and '-' only")
    taken = {a for module in components.values() for loaded in _registry(module).values() for a in loaded.adapters}
    taken |= {a for module in components.values() for a in getattr(module, "peft_config", {})}
    if name in taken or any(a.startswith(f"{name}__") for a in taken):
        raise LorafitError(
            f"adapter name {name!r} is already loaded; pass adapter_name=... or unload_lora(pipe, {name!r})"
        )
    return name


def load_lora(
    pipe,
    path: str | Path,
    weight: float = 1.0,
    adapter_name: str | None = None,
    block_weights: str | BlockWeights | None = None,
    *,
    bundled_embeddings: Literal["warn", "skip"] = "warn",
) -> str:
    """Load a LoRA/LoCon/DoRA/LoHa/LoKr file (kohya/LyCORIS or diffusers format) into ``pipe``.

    Args:
        pipe: A diffusers pipeline of a family lorafit knows (SD1/SD2/SDXL, Flux; txt2img, img2img, inpaint ...).
        path: The ``.safetensors`` file.
        weight: Strength: 1 = as trained, 0 = the base model exactly; other values scale the update.
        adapter_name: Name to refer to it later; default: the file name without extension.
        block_weights: Strength per block, A1111 LBW style ("INALL", a 17/26-value vector,
            "IN=1,OUT=0"; see :mod:`lorafit.networks.block_weights`); empty = ``weight`` everywhere.
        bundled_embeddings: A pivotal-tuning file's embeddings (A1111's ``bundle_emb`` keys) are not
            loaded here: ``warn`` says so (``lorafit.inference.embeddings.load_lora_or_embedding``, what
            ``lorafit generate`` uses, loads both), ``skip`` is for that caller.

    Returns:
        The adapter name, for :func:`set_lora_weight` and :func:`unload_lora`.
    """
    path = Path(path)
    components = pipeline_components(pipe)
    name = _adapter_name(path, adapter_name, components)
    family = _family(components)
    if isinstance(block_weights, str):  # parsed before the file is read: a typo fails at once
        block_weights = parse_block_weights(block_weights, family)
    table = kohya_name_table(family, components)
    weights, _, _ = read_lora_file(path, table)
    weights = fit_to_model(weights, components, str(path))
    if bundled_embeddings == "warn":
        _warn_bundled_embeddings(path)
    try:
        for component, modules in weights.items():
            _inject(components[component], name, modules, weight, f"{path}: {component}")
    except Exception:
        _remove(components, [name])  # a half-loaded file must not stay active
        raise
    for model in components.values():
        if name in _registry(model):
            _registry(model)[name].blocks = block_weights
    set_lora_weight(pipe, name, weight)
    return name


def _warn_bundled_embeddings(path: Path) -> None:
    from safetensors import safe_open

    from lorafit.networks.embedding_files import embedding_names

    with safe_open(str(path), framework="pt") as handle:
        names = embedding_names(handle.keys())
    if names:
        log.warning(
            "%s also bundles the embedding(s) %s (pivotal tuning), which load_lora leaves out; "
            "lorafit.inference.embeddings.load_lora_or_embedding loads the LoRA with them (as `lorafit generate` does)",
            path,
            ", ".join(names),
        )


def _inject(model: torch.nn.Module, name: str, modules: dict, weight: float, where: str) -> None:
    """Inject one file's modules of one component, one PEFT adapter per network kind, and activate them."""
    from peft import inject_adapter_in_model

    active_before = {id(layer): list(layer.active_adapters) for layer in _tuner_layers(model)}
    loaded = LoadedLora(weight=weight)
    _registry(model)[name] = loaded  # registered first, so a failure below can be cleaned up
    by_input = {m: w for m, w in modules.items() if isinstance(w, LoraModuleWeights) and w.dora_axis == 1}
    if by_input:  # PEFT has no input-axis DoRA: a hook on the base layer applies it (input_dora.py)
        layers = adaptable_layers(model)
        for module, module_weights in by_input.items():
            dora = InputAxisDora(layers[module], module_weights, f"{where} {module}")
            loaded.input_dora[module] = dora
            loaded.hooks.append(attach(layers[module], dora, _input_dora_strength(loaded, dora)))
        modules = {m: w for m, w in modules.items() if m not in by_input}
    kinds = sorted({m.kind for m in modules.values()})
    for kind in kinds:
        # One PEFT adapter per kind: a LoraConfig cannot hold LoHa modules, nor DoRA and plain LoRA.
        peft_name = name if len(kinds) == 1 else f"{name}__{kind}"
        group = {module: m for module, m in modules.items() if m.kind == kind}
        loaded.adapters[peft_name] = kind
        inject_adapter_in_model(injection_config(kind, group), model, adapter_name=peft_name)
        layers = adapter_layers(model, peft_name)
        by_module = {outer_name(layer_name): layer for layer_name, layer in layers.items()}
        for module, module_weights in group.items():
            try:
                write_layer(by_module[module], peft_name, module_weights)
            except LorafitError as error:
                raise LorafitError(f"{where} {module}: {error}") from None
        if kind == "dora":
            loaded.hooks += [_dora_strength_hook(layer, peft_name, loaded) for layer in layers.values()]
    for layer in _tuner_layers(model):
        available = layer._all_available_adapter_names()
        before = [a for a in active_before.get(id(layer), []) if a in available]
        mine = [a for a in loaded.adapters if a in available]
        layer.set_adapter(list(dict.fromkeys(before + mine)), inference_mode=True)


def _input_dora_strength(loaded: LoadedLora, dora: InputAxisDora):
    return lambda: loaded.dora_scales.get(dora, loaded.weight)


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _dora_strength_hook(layer: torch.nn.Module, peft_name: str, loaded: LoadedLora):
    # The DoRA module returns this adapter's whole contribution (W' - W) x; scaling it by the
    # strength interpolates between the base and the DoRA weight, as A1111/ComfyUI do.
    def scale_output(module, args, output):
        scale = loaded.dora_scales.get(module, loaded.weight)
        return output if scale == 1.0 else output * scale

    return layer.lora_magnitude_vector[peft_name].register_forward_hook(scale_output)


def set_lora_weight(pipe, adapter_name: str, weight: float) -> None:
    """Change the strength of a loaded file (1 = as trained, 0 = off); its block weights stay."""
    found = False
    for component, model in pipeline_components(pipe).items():
        loaded = _registry(model).get(adapter_name)
        if loaded is None:
            continue
        found = True
        loaded.weight = float(weight)
        _apply_strength(component, model, loaded)
    if not found:
        raise LorafitError(f"no LoRA named {adapter_name!r} is loaded (loaded: {sorted(loaded_loras(pipe)) or 'none'})")


def set_block_weights(pipe, adapter_name: str, block_weights: str | BlockWeights | None) -> None:
    """Set a loaded file's strength per block (A1111 LBW: a preset, a vector or ``BLOCK=value`` pairs).

    None gives every block the file's strength again. See :mod:`lorafit.networks.block_weights`.
    """
    components = pipeline_components(pipe)
    if isinstance(block_weights, str):
        block_weights = parse_block_weights(block_weights, _family(components))
    loaded = [_registry(model).get(adapter_name) for model in components.values()]
    if not any(loaded):
        raise LorafitError(f"no LoRA named {adapter_name!r} is loaded (loaded: {sorted(loaded_loras(pipe)) or 'none'})")
    for entry in filter(None, loaded):
        entry.blocks = block_weights
        weight = entry.weight
    set_lora_weight(pipe, adapter_name, weight)


def _apply_strength(component: str, model: torch.nn.Module, loaded: LoadedLora) -> None:
    """Each layer's adapter scale: the file's strength times its block's value."""
    loaded.dora_scales.clear()
    config = getattr(model, "config", None)
    for module, dora in loaded.input_dora.items():
        factor = 1.0 if loaded.blocks is None else loaded.blocks.factor(component, module, config)
        loaded.dora_scales[dora] = loaded.weight * factor
    for peft_name, kind in loaded.adapters.items():
        for layer_name, layer in adapter_layers(model, peft_name).items():
            scale = loaded.weight
            if loaded.blocks is not None:
                scale *= loaded.blocks.factor(component, outer_name(layer_name), getattr(model, "config", None))
            if kind == "dora":
                # PEFT's scale would also move the direction inside DoRA's norm: the hook scales its output.
                layer.set_scale(peft_name, 1.0)
                loaded.dora_scales[layer.lora_magnitude_vector[peft_name]] = scale
            else:
                layer.set_scale(peft_name, scale)


def unload_lora(pipe, adapter_name: str | None = None) -> None:
    """Remove one loaded file (or all, when ``adapter_name`` is None) and restore the plain modules."""
    names = [adapter_name] if adapter_name else sorted(loaded_loras(pipe))
    if adapter_name and adapter_name not in loaded_loras(pipe):
        raise LorafitError(f"no LoRA named {adapter_name!r} is loaded (loaded: {sorted(loaded_loras(pipe)) or 'none'})")
    _remove(pipeline_components(pipe), names)


def _remove(components: dict[str, torch.nn.Module], names: list[str]) -> None:
    for model in components.values():
        registry = _registry(model)
        for name in names:
            loaded = registry.pop(name, None)
            if loaded is None:
                continue
            for hook in loaded.hooks:
                hook.remove()
            for peft_name in loaded.adapters:
                for layer in adapter_layers(model, peft_name).values():
                    layer.delete_adapter(peft_name)
                getattr(model, "peft_config", {}).pop(peft_name, None)
        _unwrap_empty_layers(model)


def _unwrap_empty_layers(model: torch.nn.Module) -> None:
    """Put the original module back wherever a PEFT wrapper holds no adapter any more."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in sorted(wrappers, key=lambda item: -item[0].count(".")):  # inner wrappers first
        if layer._all_available_adapter_names():
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "peft_config") and not model.peft_config:
        del model.peft_config
