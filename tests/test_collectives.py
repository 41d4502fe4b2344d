"""Per-step collectives that never stall the GPU keep Lightning's meaning (one process group, gloo)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lorafit.bench.host_syncs import HostSyncCounter
from lorafit.distributed.collectives import DeferredSigtermCheck, all_reduce_in_place


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sigterm_on_rank_zero_stops_every_rank_one_step_later_without_a_sync(process_group):
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), received_sigterm=False)
    check = DeferredSigtermCheck(trainer)
    counter = HostSyncCounter(torch.device("cpu"))
    with counter:
        check()
        check()
        trainer.received_sigterm = True
        check()  # this step's broadcast carries the signal; it is read at the next step
    assert counter.count == 0, counter.sites
    with pytest.raises(SIGTERMException):
        check()


def test_all_reduce_in_place_is_the_identity_in_one_process(process_group):
    value = torch.tensor([3.0])
    assert all_reduce_in_place(value, "mean") is value and value.item() == 3.0
    assert all_reduce_in_place(value, "sum").item() == 3.0
