"""Known torch / TorchRec noise that this package triggers, silenced where it is triggered.

A default run of any tool prints no warning line: real problems (a scratchpad that may be
too small, a window that stalled, a trace shorter than a batch) are reported once, in one
short line each, and nothing else. These four kinds of message come from torch and TorchRec
themselves and say nothing about the user's job:

- torch's one-time log "is_fx_tracing will return true for both ..." fires the first time
  any ``KeyedJaggedTensor`` (an fx-proxyable class) is built. :func:`quiet_known_noise`
  lets it fire once with its logger muted, so it cannot fire again in the process.
- TorchRec's ``DistributedModelParallel`` builds its ``DistributedDataParallel`` with
  ``broadcast_buffers=False``, and its row-wise and column-wise collectives call
  ``reduce_scatter_tensor`` / ``all_gather_into_tensor``, which torch 2.13 deprecates
  (``FutureWarning``s): :func:`quiet_known_noise` ignores exactly those messages inside its
  block.
- TorchRec warns when a ``Topology`` is built directly and when
  ``HeuristicalStorageReservation`` is used without a dense-tensor estimate: we avoid those
  instead, with :func:`make_topology` (TorchRec's ``TopologyFactory``) and
  :func:`default_storage_reservation`.
- On the oldest stack, TorchRec 1.6.1's collectives call a torch helper that torch 2.11
  flags (``UserWarning``s about ``_get_pg_default_device``): ignored inside the block too;
  fbgemm-gpu 1.6.0's import-time notice that its own version table lacks torch 2.11 is
  dropped while ``torchrec_scratchpipe.compat`` imports it.

Nothing is patched and no filter is installed at import time.

Example:
    >>> with quiet_known_noise():
    ...     pass  # build the DMP model here
    >>> make_topology(world_size=1, compute_device="cpu").world_size
    1
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

from torchrec.distributed.planner.types import StorageReservation, Topology

from torchrec_scratchpipe.compat import (
    FixedPercentageStorageReservation,
    fx_tracing_notice,
    topology_factory,
)

#: Deprecations torch 2.13 reports about calls TorchRec makes (DMP's DDP, row-wise collectives).
_TORCHREC_DEPRECATIONS = (
    r".*`broadcast_buffers` is deprecated",
    r".*`torch\.distributed\.reduce_scatter_tensor` is deprecated",
    r".*`torch\.distributed\.all_gather_into_tensor` is deprecated",
)
#: What torch 2.11 says about a call TorchRec 1.6.1 makes in its collectives (oldest stack).
_TORCHREC_OLD_STACK_NOTICES = (
    r".*`_get_pg_default_device` will be deprecated",
    r".*Multiple backends are registered with this ProcessGroup",
)
#: Head room the planner keeps free on each device (TorchRec's default percentage).
STORAGE_RESERVATION_PERCENTAGE = 0.15


def _consume_fx_tracing_notice() -> None:
    """Emit torch's one-time ``is_fx_tracing`` notice with its logger disabled."""
    found = fx_tracing_notice()
    if found is None:
        return
    notice, logger_name = found
    log = logging.getLogger(logger_name)
    disabled, log.disabled = log.disabled, True
    try:
        notice()  # lru_cached in torch: later calls do nothing
    finally:
        log.disabled = disabled


@contextlib.contextmanager
def quiet_known_noise() -> Iterator[None]:
    """Inside the block, torch's and TorchRec's known noise (see the module doc) is silent.

    Only the named messages are dropped; every other warning shows as usual.
    """
    _consume_fx_tracing_notice()
    with warnings.catch_warnings():
        for message in _TORCHREC_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        for message in _TORCHREC_OLD_STACK_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def make_topology(world_size: int, compute_device: str, **kwargs: Any) -> Topology:
    """A TorchRec ``Topology`` built the recommended way (``TopologyFactory``).

    Falls back to the ``Topology`` constructor on TorchRec versions without the factory.

    Args:
        world_size: ranks.
        compute_device: ``"cpu"`` or ``"cuda"``.
        **kwargs: further ``TrainerConfig`` fields (e.g. ``local_world_size``,
            ``hbm_cap_bytes``).

    Example:
        >>> make_topology(2, "cpu").compute_device
        'cpu'
    """
    factory = topology_factory()
    if factory is None:  # older TorchRec: no factory, no warning either
        return Topology(world_size=world_size, compute_device=compute_device, **kwargs)
    TopologyFactory, TrainerConfig, KernelConfig = factory
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, **kwargs),
        kernel_config=KernelConfig(compute_device=compute_device),
    )


def default_storage_reservation() -> StorageReservation:
    """TorchRec's fixed-percentage reservation (15% head room), the one TorchRec recommends
    over its heuristic one (which warns and over-estimates dense tensors of meta models)."""
    return FixedPercentageStorageReservation(STORAGE_RESERVATION_PERCENTAGE)
