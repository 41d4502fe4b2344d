"""The DataLoader of one planned epoch (:mod:`lorafit.data.epoch_plan`), which tells its stream the
epoch and resume offset to play at the moment its workers start."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader

from lorafit.data.stream import ShardStream


class EpochLoader(DataLoader):
    """A DataLoader that tells its stream which epoch (and resume offset) to play before workers start.

    Workers get a copy of the dataset when they start, so the epoch must be set on the dataset
    right then; Lightning's ``set_epoch`` protocol only reaches samplers, and an iterable dataset
    has none. The workers start at the first ``next()``, not at ``iter()``: Lightning may call
    ``iter()`` before it restores a checkpoint's loop state (when a scheduler asks for
    ``estimated_stepping_batches`` during setup), and the epoch read then would be the wrong one.
    """

    def __init__(
        self,
        dataset: ShardStream,
        position: Callable[[], tuple[int, int]],
        upcoming: Callable[[], int] = lambda: 0,
        **kwargs,
    ) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.position = position
        self.upcoming = upcoming

    def __iter__(self):
        return _LazyEpochIterator(self)

    def __len__(self) -> int:
        """Batches of the epoch about to be played: Lightning reads it when each epoch starts."""
        return self.dataset.plan(self.upcoming()).batches_per_rank


class _LazyEpochIterator:
    def __init__(self, loader: EpochLoader) -> None:
        self.loader = loader
        self.iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self.loader.dataset.epoch, self.loader.dataset.skip = self.loader.position()
            self.iterator = DataLoader.__iter__(self.loader)
        return next(self.iterator)
