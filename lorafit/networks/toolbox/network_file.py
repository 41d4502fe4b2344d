"""A network file as the toolbox works on it: its modules under the names the file uses.

``Network.modules`` maps each name in the file to that module's weights (LoRA/LoCon/DoRA, LoHa,
LoKr; :mod:`lorafit.networks.lora_weights`): a kohya stem (``lora_unet_input_blocks_4_1_...``,
``lora_unet_double_blocks_0_img_attn_qkv``) or, for a diffusers/PEFT file, ``component.module``.
Resizing and merging work name by name, so a resized or merged file keeps the input's names and
loads wherever the input did, and none of it needs the base model. The base model's layout
(:mod:`~lorafit.networks.toolbox.base_layout`) is needed only to change format (kohya names are
the base's module paths) and for module shapes no tensor of the file tells.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.networks.embedding_files import BUNDLE_PREFIX, embedding_names
from lorafit.networks.files import (
    LoraFormat,
    atomic_save_safetensors,
    read_lora_file,
    read_safetensors,
    save_diffusers,
)
from lorafit.networks.kohya_format import from_kohya_state_dict, is_kohya_state_dict, to_kohya_state_dict
from lorafit.networks.lora_weights import LoraWeights, ModuleWeights, cast, module_from_parts
from lorafit.networks.toolbox.base_layout import BaseLayout
from lorafit.networks.toolbox.file_family import guess_family

log = logging.getLogger("lorafit.toolbox")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STALE = ("sshs_model_hash", "sshs_legacy_hash")  # hashes of the input's tensors, wrong for any output


@dataclass
class Network:
    """One network file's modules by their names in the file (see the module docstring)."""

    source: str
    format: LoraFormat
    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None
    layout: BaseLayout | None = None
    # A1111's ``bundle_emb.*`` tensors (pivotal tuning's embeddings) as the file holds them: not
    # modules, but carried into every kohya file written from this one.
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    def dtype(self) -> torch.dtype:
        first = next(iter(self.modules.values()))
        return next(iter(first.parts().values())).dtype

    def weight_shape(self, name: str, module: ModuleWeights | None = None) -> torch.Size:
        """The base weight shape of module ``name``, from the base layout or else the tensors."""
        if self.layout is not None:
            if self.format == "kohya":
                return self.layout.stem_shape(name)
            component, _, module_name = name.partition(".")
            return self.layout.weight_shape(component, module_name)
        module = module or self.modules[name]
        down = getattr(module, "down", None)
        if down is not None:  # LoRA/DoRA factors carry the shape (a conv's down holds its kernel)
            return torch.Size([module.up.shape[0], *down.shape[1:]])
        w2 = getattr(module, "w2", None)
        if w2 is not None and w2.dim() == 4:
            w1 = module.factors()[0]
            return torch.Size([w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:]])
        raise LorafitError(
            f"{self.source}: {name} is a {module.kind} module, whose weight shape (Linear or conv kernel) only the "
            "base model tells; pass --base <model> (its configs are read, not its weights)"
        )

    def component_weights(self) -> LoraWeights:
        """The modules by (component, diffusers module name); kohya files need the base layout."""
        if self.format == "diffusers":
            weights: LoraWeights = {}
            for name, module in self.modules.items():
                component, _, module_name = name.partition(".")
                weights.setdefault(component, {})[module_name] = module
            return weights
        if self.layout is None:
            raise LorafitError(f"{self.source}: changing the format of a kohya file needs the base model (--base)")
        return from_kohya_state_dict(kohya_tensors(self.modules), self.layout.table, self.source)


def kohya_tensors(modules: dict[str, ModuleWeights]) -> dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors of ``modules`` by stem (``alpha`` a float32 scalar, as lorafit writes it)."""
    tensors = {}
    for stem, module in modules.items():
        tensors.update({f"{stem}.{part}": t.contiguous() for part, t in module.parts().items()})
        tensors[f"{stem}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


def _kohya_modules(tensors: dict[str, torch.Tensor], source: str) -> dict[str, ModuleWeights]:
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        stems.setdefault(stem, {})[part] = tensor
    return {stem: module_from_parts(parts, f"{source}: {stem}") for stem, parts in sorted(stems.items())}


def read_network(path: str | Path, layout: BaseLayout | None = None) -> Network:
    """Read a kohya/LyCORIS or diffusers/PEFT network file (``layout``: the base model, if known)."""
    source = str(path)
    tensors, metadata = read_safetensors(path)
    embeddings = {k: v for k, v in tensors.items() if k.startswith(BUNDLE_PREFIX)}
    tensors = {k: v for k, v in tensors.items() if k not in embeddings}
    if not tensors:
        what = "only embeddings (bundle_emb keys), no LoRA modules" if embeddings else "no tensors"
        raise LorafitError(f"{source} holds {what}")
    if all(key.startswith("diffusion_model.") for key in tensors):
        raise LorafitError(
            f"{source} is in ComfyUI's diffusion_model.* layout; write it in kohya format first: "
            f"lorafit convert {source} OUT.safetensors --base MODEL --to kohya"
        )
    if is_kohya_state_dict(tensors):
        fmt: LoraFormat = "kohya"
        modules = _kohya_modules(tensors, source)
        if layout is not None:  # every name must be the base's: a LoRA of another model fails here, in one line
            for stem in modules:
                layout.kohya_parts(stem)
    else:
        fmt = "diffusers"
        weights, _, _ = read_lora_file(path)
        # With the base known, names as the base has them (a LoRA of another model fails here, in one
        # line): text encoders' with or without transformers 4's ``text_model.``, whichever the file used.
        live = (lambda c, m: m) if layout is None else layout.live_name
        modules = {f"{c}.{live(c, m)}": w for c, named in weights.items() for m, w in sorted(named.items())}
    family = (
        layout.family
        if layout is not None
        else guess_family(list(tensors), metadata, {k: tuple(t.shape) for k, t in tensors.items()})
    )
    return Network(source, fmt, modules, metadata, family, layout, embeddings)


def in_format(network: Network, target: LoraFormat) -> Network:
    """``network`` with its modules named for ``target`` format (exact; needs the base layout to change)."""
    if network.format == target:
        return network
    if network.layout is None:
        raise LorafitError(
            f"{network.source} is a {network.format} file; writing it as {target} needs the base model's module "
            "names: pass --base <model dir, hub id or single file>"
        )
    weights = network.component_weights()
    if target == "diffusers":
        modules = {f"{c}.{m}": w for c, named in weights.items() for m, w in sorted(named.items())}
    else:
        tensors = to_kohya_state_dict(network.family, weights, network.layout.denoiser_config)
        modules = _kohya_modules(tensors, network.source)
    return Network(
        network.source, target, modules, network.metadata, network.family, network.layout, network.embeddings
    )


def uniform(values) -> str:
    """kohya's metadata convention: the value if every module has it, else ``Dynamic``."""
    counts = Counter(values)
    if len(counts) != 1:
        return "Dynamic"
    value = next(iter(counts))
    return str(int(value)) if float(value).is_integer() else str(value)


def output_metadata(network: Network, modules: dict[str, ModuleWeights], comment: str, out: Path) -> dict[str, str]:
    """The input's metadata, updated for ``modules``: ranks, alphas, network kind, title, comment.

    Training records (``ss_*``: base model, dataset, tags, steps) stay; the input's content hashes
    are dropped (A1111 computes them again) rather than left wrong.
    """
    meta = {k: v for k, v in network.metadata.items() if k not in _STALE}
    meta["ss_network_dim"] = uniform(m.rank for m in modules.values() if m.rank is not None)
    meta["ss_network_alpha"] = uniform(m.alpha for m in modules.values())
    kinds = {m.kind for m in modules.values()}
    if kinds <= {"lora"}:  # kohya's module for plain LoRA (a LoHa/LoKr/DoRA file may have become one)
        if not str(meta.get("ss_network_module", "")).startswith("networks.lora"):
            meta["ss_network_module"] = "networks.lora_flux" if network.family == "flux" else "networks.lora"
    else:
        meta.setdefault("ss_network_module", "lycoris.kohya")
    if kinds <= {"lora"} and meta.get("ss_network_args"):
        try:
            args = json.loads(meta["ss_network_args"])
        except json.JSONDecodeError:
            args = {}
        args = {k: v for k, v in args.items() if k not in ("algo", "dora_wd", "factor", "conv_dim", "conv_alpha")}
        meta["ss_network_args"] = json.dumps(args) if args else ""
    meta["ss_training_comment"] = (
        f"{comment}; {meta['ss_training_comment']}" if meta.get("ss_training_comment") else comment
    )
    if "modelspec.title" in meta:
        meta["modelspec.title"] = out.stem
    return {k: v for k, v in meta.items() if v != ""}


def write_network(
    network: Network,
    modules: dict[str, ModuleWeights],
    out: str | Path,
    dtype: torch.dtype,
    comment: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``modules`` (named as in ``network``'s format) to ``out`` in that format, atomically.

    kohya files get ``metadata``, or else the input's updated by :func:`output_metadata`.
    """
    out = Path(out)
    if out.exists() and out.resolve() == Path(network.source).resolve():
        raise LorafitError(f"{out} is the input file; choose another output path")
    if out.suffix.lower() != ".safetensors":
        raise LorafitError(f"--out {out}: network files are written as .safetensors")
    if network.format == "kohya":
        tensors = kohya_tensors({name: m.to(dtype) for name, m in modules.items()})
        tensors.update({key: value.to(dtype) for key, value in network.embeddings.items()})
        return atomic_save_safetensors(tensors, out, metadata or output_metadata(network, modules, comment, out))
    if network.family is None:
        raise LorafitError(
            f"{network.source}: the model family of this diffusers-format file is not recorded; pass --base <model>"
        )
    dropped = sorted(k for k in network.metadata if k.startswith("ss_"))
    if dropped:
        log.info(
            "diffusers format has no place for %d kohya ss_* metadata keys (kept in %s)", len(dropped), network.source
        )
    warn_embeddings_left_out(network.embeddings, network.source, "a diffusers-format LoRA file")
    weights = Network(network.source, "diffusers", modules, family=network.family).component_weights()
    return save_diffusers(out, network.family, cast(weights, dtype), dtype)


def save_dtype_of(save_dtype: str | None, network: Network) -> torch.dtype:
    """``--save_dtype`` as a torch dtype; empty keeps the input file's dtype."""
    if save_dtype is None:
        return network.dtype()
    if save_dtype not in DTYPES:
        raise LorafitError(f"--save_dtype {save_dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[save_dtype]


def warn_embeddings_left_out(embeddings: dict[str, torch.Tensor], source: str, where: str) -> None:
    """Say that a file's bundled embeddings cannot go into the output, and where they still are."""
    if embeddings:
        log.warning(
            "%s has no place for the embedding(s) %s bundled in %s; they stay in that file (a kohya-format "
            "output keeps them)",
            where,
            ", ".join(embedding_names(embeddings)),
            source,
        )


def merged_embeddings(networks: list[Network]) -> dict[str, torch.Tensor]:
    """Every input's bundled embeddings, for a merged file; one name bundled with different vectors is refused."""
    merged: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for network in networks:
        for key, value in network.embeddings.items():
            if key in merged and not torch.equal(merged[key], value):
                name = embedding_names([key])[0]
                raise LorafitError(
                    f"merge: {owner[key]} and {network.source} both bundle an embedding named {name} with different "
                    "vectors, and a merged file can hold one; merge the LoRAs of one of them without it"
                )
            merged[key], owner[key] = value, network.source
    return merged
