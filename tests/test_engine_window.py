"""The engine keeps its window full: a batch that needs no backward frees its slots at once,
and the batches behind it are planned (their rows moved in) in the same call."""

from __future__ import annotations

import pytest
import torch

from engine_utils import make_tables, power_law_stream, window_capacity
from torchrec_scratchpipe import ScratchPipeConfig, ScratchPipeEmbeddingBags

ROWS = [80, 60]


@pytest.mark.parametrize("lookahead", [1, 2])
def test_no_grad_forward_of_the_head_refills_the_window_in_the_same_call(lookahead: int) -> None:
    stream = power_law_stream(ROWS, 8, 4, seed=2)
    cfg = ScratchPipeConfig(cache_rows=2 * window_capacity(stream, ROWS, lookahead + 1), lookahead=lookahead,
                            background_planning=False)
    emb = ScratchPipeEmbeddingBags(make_tables(ROWS, [4, 8]), cfg)
    for k in stream:
        emb.prefetch(k)
    for i, k in enumerate(stream[:4]):
        with torch.no_grad():
            emb(k)
        # no other call in between: batch i is released and i+1 .. i+1+L are planned already
        for name, g in emb.groups.items():
            assert g.window.planned_steps() == list(range(i + 1, i + 2 + lookahead)), (name, i)
            held = torch.unique(torch.cat([e.plan.slots for e in g.window.planned])).numel()  # slots shared count once
            assert g.planner.held_slots() == held, (name, i)
