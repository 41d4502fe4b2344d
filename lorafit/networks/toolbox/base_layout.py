"""A base model's module names, shapes and kohya names, read from its configs alone (no weights).

Every verb that needs to know the base (converting a kohya file to diffusers names, LoHa/LoKr
kernel shapes, the modules to extract, where to patch a checkpoint) asks a :class:`BaseLayout`.
Its modules live on the meta device, so it costs no memory even for Flux.

A single ``.safetensors``/``.ckpt`` file has no configs of its own: its family is read from its
tensor names and the configs come from ``single_file_config`` (a diffusers directory or cached hub
id of the same architecture, as ``model.single_file_config`` in training), or else from the hub
repository diffusers itself picks for such a file (``fetch_diffusers_config``), if it is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import model_skeleton, resolve_model_source, single_file_keys
from lorafit.families.registry import detect_from_keys, get_family
from lorafit.networks.kohya_format import KohyaTable, kohya_name_table

_TEXT_MODEL = "text_model."


@dataclass
class BaseLayout:
    """The base model as names and shapes: ``components`` are meta-device modules by diffusers name."""

    family: str
    components: dict[str, torch.nn.Module]
    source: str
    single_file: bool = False
    config_source: str | None = None  # a single file's: the directory or hub id its configs came from

    def __post_init__(self):
        self.table: KohyaTable = kohya_name_table(self.family, self.components)
        self._modules = {c: dict(m.named_modules()) for c, m in self.components.items()}

    @property
    def spec(self):
        return get_family(self.family)

    @property
    def denoiser_config(self):
        return self.components[self.spec.denoiser_component].config

    def live_name(self, component: str, name: str) -> str:
        """``name`` as this base names the module: CLIP text encoders appear with or without
        transformers 4's ``text_model.`` level, in files (lorafit writes it) and in models (transformers 5
        dropped it from ``CLIPTextModel`` only)."""
        modules = self._modules.get(component, {})
        for candidate in (name, _TEXT_MODEL + name, name.removeprefix(_TEXT_MODEL)):
            if candidate in modules:
                return candidate
        raise LorafitError(f"{self.source}: the base model has no module {component}.{name}")

    def module(self, component: str, name: str) -> torch.nn.Module:
        return self._modules[component][self.live_name(component, name)]

    def weight_shape(self, component: str, name: str) -> torch.Size:
        return self.module(component, name).weight.shape

    def kohya_parts(self, stem: str) -> list[tuple[str, str, int]]:
        """(component, module, output rows) of the modules a kohya stem names, in output order
        (several for a Flux fused module; the halves of a swapped one are still one part)."""
        if stem in self.table.fused:
            component, module = self.table.fused[stem]
            return [(component, name, rows) for name, rows in module.parts]
        if stem in self.table:
            component, name = self.table[stem]
            return [(component, name, self.weight_shape(component, name)[0])]
        raise LorafitError(f"{self.source}: key {stem} names no module of this base model (wrong family or base?)")

    def stem_shape(self, stem: str) -> torch.Size:
        """The weight shape of the module a kohya stem names (a fused module's rows summed)."""
        parts = self.kohya_parts(stem)
        first = self.weight_shape(parts[0][0], parts[0][1])
        return torch.Size([sum(rows for _, _, rows in parts), *first[1:]])


def _fetched_config(path: Path) -> str | None:
    """The hub repository diffusers would take configs from for this single file (None: unknown)."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from diffusers.loaders.single_file_utils import fetch_diffusers_config

        # diffusers reads names and a few shapes only: meta tensors of the header's shapes stand in.
        with safe_open(str(path), framework="pt") as handle:
            checkpoint = {}
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                checkpoint[key] = torch.empty(shape, device="meta")
        return fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    except Exception:  # noqa: BLE001 -- any failure means "no default config"; the caller says what to pass
        return None


def base_layout(source: str, single_file_config: str | None = None, key: str = "--base") -> BaseLayout:
    """The layout of ``source`` (diffusers directory, hub id or single file); see the module docstring."""
    kind = resolve_model_source(source, key=key)
    if kind != "single_file":
        family, components = model_skeleton(source, key=key)
        return BaseLayout(family, components, source)
    path = Path(source).expanduser()
    family = detect_from_keys(single_file_keys(path), source).name
    config = single_file_config or _fetched_config(path)
    if config is None:
        raise LorafitError(
            f"{key}: {source} is a single file; pass --single_file_config with a diffusers directory (or cached "
            "hub id) of the same architecture, whose configs name its modules"
        )
    try:
        config_family, components = model_skeleton(config, key="--single_file_config")
    except LorafitError:
        raise
    except Exception as error:  # noqa: BLE001 -- the hub cache missing, a broken folder: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LorafitError(
            f"{key}: {source} is a single file and the configs of {config} could not be read ({first}); pass "
            "--single_file_config with a diffusers directory of the same architecture"
        ) from None
    if config_family != family:
        raise LorafitError(
            f"--single_file_config: {config} is a {get_family(config_family).title} model, but {source} is "
            f"{get_family(family).title}"
        )
    return BaseLayout(family, components, source, single_file=True, config_source=config)
