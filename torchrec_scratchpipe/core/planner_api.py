"""The planner seam: what a table group's slot planner offers, and which one a group gets.

Three implementations make identical plans:

- ``"native"``: ``SlotPlanner`` with the C++ operator (``core/native.py``), maps on the host;
- ``"torch"``: ``SlotPlanner``'s PyTorch reference, maps on the host;
- ``"device"``: ``DevicePlanner`` (``core/device_plan.py``), maps on the scratchpad's device,
  each step a fixed sequence of tensor ops with no data-dependent shapes.

``make_planner`` picks one: the ``planner`` argument (``ScratchPipeConfig.planner``), else
``SCRATCHPIPE_PLANNER``, else by device: a CPU scratchpad gets ``"native"`` when this
stack's build exists (and ``SCRATCHPIPE_NATIVE`` allows it), else ``"torch"``; a CUDA
scratchpad gets ``"device"``.

Example::

    >>> choose_planner(torch.device("cuda"), None)
    'device'
    >>> choose_planner(torch.device("cpu"), "torch")
    'torch'
    >>> choose_planner(torch.device("cpu"), "gpu")
    Traceback (most recent call last):
    ...
    ValueError: planner must be one of 'native', 'device', 'torch' (or unset: automatic), got 'gpu'.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from torchrec_scratchpipe.core import native as _native
from torchrec_scratchpipe.core.plan import NextUseFn, SlotPlan, SlotPlanner
from torchrec_scratchpipe.core.policy import VictimPolicy, VictimStrategy

#: Environment variable that overrides the planner (when the config names none).
PLANNER_ENV = "SCRATCHPIPE_PLANNER"
#: The planners, by name.
PLANNER_KINDS = ("native", "device", "torch")


class NextUseTracker(Protocol):
    """Each row's next use among the queued batches (``NextUse``, ``DeviceNextUse``).

    Attributes:
        next: int32 per row: the step of its next queued use (``next_use.NONE``: none).
    """

    next: torch.Tensor

    def push(self, step: int, rows: torch.Tensor) -> None:
        """Record a batch (its distinct rows, as the planner's ``group_rows`` gives them)."""

    def planned(self, rows: torch.Tensor) -> None:
        """The oldest waiting batch, whose rows are ``rows``, was planned."""

    def clear(self) -> None:
        """Forget every queued batch."""


@runtime_checkable
class Planner(Protocol):
    """A table group's slot planner, as the window, the group and the engine use it.

    Attributes:
        kind: ``"native"``, ``"torch"`` or ``"device"``.
        num_rows, capacity: the row space and the slots C.
        policy, strategy: the victim policy and how it chooses.
        device: where the maps live.
        row_to_slot: int32 ``[num_rows]`` slot of each row (-1: not resident).
        slot_to_row: int64 ``[capacity]`` row of each slot (-1: empty).
    """

    kind: str
    num_rows: int
    capacity: int
    policy: VictimPolicy
    strategy: VictimStrategy
    device: torch.device
    row_to_slot: torch.Tensor
    slot_to_row: torch.Tensor

    def try_plan(self, rows: torch.Tensor, step: int, next_use: Optional[NextUseFn] = None) -> Optional[SlotPlan]:
        """Plan batch ``step`` (its distinct ``rows`` as ``group_rows`` gives them); None: a stall."""

    def release(self, plan: SlotPlan) -> None:
        """Drop the holds of the oldest planned batch."""

    def held_slots(self) -> int:
        """Slots held by planned, unreleased batches (a report: may wait for the device)."""

    def resident(self) -> torch.Tensor:
        """Boolean mask over slots that hold a row."""

    def unrank(self) -> None:
        """Forget any ranking that read next uses (they were cleared or the horizon changed)."""

    def group_rows(
        self, values: torch.Tensor, feature_base: torch.Tensor, per_feature: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(distinct rows, group row of each id)`` of a batch's ids."""

    def row_count(self, rows: torch.Tensor) -> Union[int, torch.Tensor]:
        """How many distinct rows ``rows`` holds (a 0-dim device tensor for the device planner)."""

    def distinct(self, rows: torch.Tensor) -> int:
        """``row_count`` as a host int (the device planner reads the device only when
        ``rows`` has more entries than slots, or for messages)."""

    def new_next_use(self) -> NextUseTracker:
        """A next-use tracker over this planner's rows, where its maps live."""

    def train_misses(self, plan: SlotPlan) -> Union[int, torch.Tensor]:
        """Rows of ``plan`` not resident in their planned slot now (0 by construction)."""


def choose_planner(device: torch.device, requested: Optional[str]) -> str:
    """Which planner a group on ``device`` gets.

    Args:
        device: the scratchpad's device.
        requested: ``ScratchPipeConfig.planner``; None: ``SCRATCHPIPE_PLANNER``, else automatic.

    Raises:
        ValueError: an unknown name (names the setting and the choices).
    """
    what = "planner"
    if requested is None:
        env = os.environ.get(PLANNER_ENV, "").strip().lower()
        requested, what = (env or None), PLANNER_ENV
    if requested is None:
        if device.type != "cpu":
            return "device"
        return "native" if _native.enabled(None) else "torch"
    check_planner(requested, what)
    return requested


def check_planner(value: str, what: str = "planner") -> None:
    """Raise a ValueError naming ``what`` unless ``value`` is one of ``PLANNER_KINDS``."""
    if value not in PLANNER_KINDS:
        choices = ", ".join(repr(k) for k in PLANNER_KINDS)
        raise ValueError(f"{what} must be one of {choices} (or unset: automatic), got {value!r}.")


def make_planner(
    num_rows: int,
    capacity: int,
    policy: Union[VictimPolicy, str],
    device: torch.device,
    requested: Optional[str] = None,
) -> Planner:
    """The planner of a group on ``device`` (see ``choose_planner``).

    Host planners keep their maps on the CPU whatever ``device`` is; the device planner
    keeps them on ``device``.

    Example::

        >>> make_planner(10, 4, "future", torch.device("cpu"), "device").kind
        'device'
    """
    kind = choose_planner(device, requested)
    if kind == "device":
        from torchrec_scratchpipe.core.device_plan import DevicePlanner

        return DevicePlanner(num_rows, capacity, policy, device)
    return SlotPlanner(num_rows, capacity, policy, native=kind == "native")
