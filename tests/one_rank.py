"""A gloo process group of one rank inside the test process (no spawn), for TorchRec-level
tests that need DMP but not several ranks. Import the fixture: ``from one_rank import one_rank``."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
