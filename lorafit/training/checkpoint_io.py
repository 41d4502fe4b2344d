"""The checkpoint plugin that writes local checkpoints atomically (see :mod:`lorafit.io.atomic`).

Kept apart from :mod:`lorafit.io.atomic` because it subclasses Lightning's ``TorchCheckpointIO``: importing it
imports torch and Lightning, which the caption tools that use it must not pay for.
"""

from __future__ import annotations

from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lorafit.io.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary sibling + ``os.replace``).

    Remote paths (``s3://`` ...) keep Lightning's own code path. ``lorafit fit`` installs this
    plugin unless the config names another ``CheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local paths")
        atomic_torch_save(checkpoint, path)
