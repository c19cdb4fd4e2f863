"""PlanWindow plans ahead by default: a pushed batch is planned at once while the window has
room, and taking a batch for training plans the next L behind it."""

from __future__ import annotations

import torch

from torchrec_scratchpipe.core.plan import SlotPlanner
from torchrec_scratchpipe.core.window import PlanWindow


def test_push_plans_at_once_while_there_is_room() -> None:
    w = PlanWindow(SlotPlanner(100, 16), lookahead=1, horizon=3)
    first, second, third = (w.push(torch.tensor([i, i + 10])) for i in range(3))
    assert first.plan is not None and second.plan is not None and third.plan is None  # L + 1 = 2 hold slots
    assert w.planned_steps() == [0, 1]


def test_take_plans_the_next_batches_behind_the_one_taken() -> None:
    w = PlanWindow(SlotPlanner(100, 16), lookahead=2, horizon=4)
    for i in range(5):
        w.push(torch.tensor([i]), fill=False)
    assert w.planned_steps() == []
    taken = w.take()
    assert taken is not None and taken.step == 0
    assert w.planned_steps() == [0, 1, 2]  # the taken batch and L = 2 behind it


def test_clear_releases_the_dropped_plans() -> None:
    p = SlotPlanner(100, 4)
    w = PlanWindow(p, lookahead=1, horizon=2)
    for i in range(3):
        w.push(torch.tensor([2 * i, 2 * i + 1]))
    assert p.held_slots() == 4  # two planned batches fill the slots
    w.clear()
    assert p.held_slots() == 0 and w.planned_steps() == []
    assert w.push(torch.tensor([50, 51])).plan is not None and w.push(torch.tensor([60, 61])).plan is not None
