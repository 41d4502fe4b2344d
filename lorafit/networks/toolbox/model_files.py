"""A model's weights read one tensor at a time from its files: a diffusers directory or a single file.

``safetensors`` maps a file and reads only the tensors (or rows of a tensor) asked for, so
extracting a LoRA from two full SDXL/Flux models, or merging one into a model, holds a few
modules in memory at any moment instead of the models. :class:`TensorFiles` is a set of
``.safetensors`` files (a component folder, sharded or not, or one checkpoint) by tensor name;
:class:`ModelWeights` finds a diffusers module's weight in them, by the directory's names or by
the single file's original layout (:mod:`~lorafit.networks.toolbox.checkpoint_keys`).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.families.loading import resolve_model_source
from lorafit.networks.toolbox.base_layout import BaseLayout
from lorafit.networks.toolbox.checkpoint_keys import Location, checkpoint_location

# safetensors' dtype names (its Rust crate's Dtype enum) -> torch.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorFiles:
    """Tensors of several ``.safetensors`` files by name, read on demand (headers are read at once)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = list(files)
        self._stack = ExitStack()
        self._handles, self._where = [], {}
        for path in self.files:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as error:  # noqa: BLE001 -- safetensors raises its own types for bad headers
                raise LorafitError(f"{path} is not a readable .safetensors file ({error})") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = len(self._handles) - 1

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def metadata(self, index: int = 0) -> dict[str, str]:
        return dict(self._handles[index].metadata() or {})

    def file_of(self, key: str) -> Path:
        return self.files[self._where[key]]

    def keys_of(self, path: Path) -> list[str]:
        index = self.files.index(path)
        return [k for k, i in self._where.items() if i == index]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        if name not in SAFETENSORS_DTYPES:
            raise LorafitError(f"{self.file_of(key)}: tensor {key} has dtype {name}, which lorafit cannot read")
        return SAFETENSORS_DTYPES[name]

    def nbytes(self, key: str) -> int:
        count = 1
        for size in self.shape(key):
            count *= size
        return count * torch.empty((), dtype=self.dtype(key)).element_size()

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``key`` (only rows ``start:stop`` of it when ``rows`` is given)."""
        handle = self._handles[self._where[key]]
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows[0] : rows[1]]

    def close(self) -> None:
        self._stack.close()


def weight_files(folder: Path) -> list[Path]:
    """A component folder's ``.safetensors`` weight files (every variant and shard); one line if none."""
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        others = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (it has {others[0]}: save the model with safe_serialization=True first)" if others else ""
        raise LorafitError(f"{folder} has no .safetensors weights{hint}")
    return files


def local_directory(source: str) -> Path:
    """A diffusers directory on disk for ``source``: the folder itself, or a hub id's snapshot with
    just the pipeline's components (the local cache offline; never the root's single files, ONNX or
    Flax copies that some repositories also hold)."""
    if resolve_model_source(source) == "directory":
        return Path(source).expanduser()
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        index = json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
        folders = [name for name, value in index.items() if isinstance(value, list)]
        patterns = ["model_index.json"] + [
            f"{f}/*.{ext}" for f in folders for ext in ("json", "txt", "model", "safetensors")
        ]
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as error:  # noqa: BLE001 -- offline without a cache, network errors: one line
        raise LorafitError(f"{source}: not a local path and not available from the Hub cache ({error})") from None


def pipeline_files(root: Path) -> list[Path]:
    """The files of a diffusers directory a pipeline reads: ``model_index.json`` and its components'
    folders, without weights in other formats (``.bin``, ONNX, Flax, OpenVINO), which a merge could
    not patch and must not pass on unpatched."""
    index = json.loads((root / "model_index.json").read_text())
    folders = [name for name, value in index.items() if isinstance(value, list) and (root / name).is_dir()]
    found = [root / "model_index.json"]
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.suffix not in _OTHER_WEIGHTS:
                found.append(path)
    return found


_OTHER_WEIGHTS = {".bin", ".onnx", ".onnx_data", ".msgpack", ".pb", ".ckpt", ".pt", ".pth", ".xml", ".h5"}


def read_rows(files: TensorFiles, location: Location) -> torch.Tensor:
    """The module's weight at ``location``: the whole tensor, or its segments of rows stacked."""
    if location.segments is None:
        return files.get(location.key)
    pieces = sorted(location.segments, key=lambda s: s[1])
    return torch.cat([files.get(location.key, (start, start + count)) for start, _, count in pieces])


class ModelWeights:
    """The weights of a model's Linear/Conv modules by (component, diffusers module name)."""

    def __init__(self, source: str, layout: BaseLayout):
        self.source, self.layout = source, layout
        self.single_file = layout.single_file
        if self.single_file:
            self.files = {"": TensorFiles([Path(source).expanduser()])}
            keys = self.files[""].keys()
            self.prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in keys) else ""
        else:
            self.root = local_directory(source)
            self.files = {}
            for component in layout.components:
                folder = self.root / component
                if folder.is_dir():
                    self.files[component] = TensorFiles(_preferred(weight_files(folder)))

    def has(self, component: str) -> bool:
        """Whether the files hold ``component`` at all (a FLUX.1 single file holds the transformer only)."""
        if self.single_file:
            return self.layout.family != "flux" or component == "transformer"
        return component in self.files

    def location(self, component: str, module: str) -> Location:
        """Where ``module``'s weight is (its key in the component folder's files, or in the single file)."""
        if self.single_file:
            configs = {c: m.config for c, m in self.layout.components.items()}
            return checkpoint_location(self.layout.family, component, module, configs, self.prefix)
        files = self.files.get(component)
        if files is None:
            raise LorafitError(f"{self.source} has no {component} folder")
        # transformers 4 saved CLIP text encoders under text_model.*, transformers 5 without it.
        for key in (f"{module}.weight", f"text_model.{module}.weight", f"{module.removeprefix('text_model.')}.weight"):
            if key in files:
                return Location(key)
        raise LorafitError(f"{self.source}: no weight for {component}.{module} in {files.files[0].parent}")

    def tensor_files(self, component: str) -> TensorFiles:
        return self.files["" if self.single_file else component]

    def weight(self, component: str, module: str) -> torch.Tensor:
        return read_rows(self.tensor_files(component), self.location(component, module))

    def close(self) -> None:
        for files in self.files.values():
            files.close()


def _preferred(files: list[Path]) -> list[Path]:
    """One set of weights of a folder to read: the shards of its index, else the file without a
    variant suffix (``.fp16``), else the shards of a variant's index, else the first file."""
    folder = files[0].parent
    indexes = sorted(folder.glob("*.safetensors.index*.json"), key=lambda p: (p.name.count("."), p.name))
    plain_index = [p for p in indexes if p.name.endswith(".safetensors.index.json")]
    plain = [p for p in files if p.name.count(".") == 1]
    for index in plain_index or ([] if plain else indexes):
        return [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return plain[:1] or files[:1]
