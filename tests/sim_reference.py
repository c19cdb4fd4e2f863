"""Small, obviously correct pure-Python references for every simulated policy.

Slow (dicts, sets and loops per row) and meant for tests on small traces only. Each takes
``batches``: a list of lists of distinct row ids, one list per step, and returns the
misses per step (and evictions / bypasses where the policy has them).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Set, Tuple

Batches = Sequence[Sequence[int]]
MASK64 = (1 << 64) - 1


def reference_lru(batches: Batches, capacity: int) -> Tuple[List[int], List[int]]:
    """Batch-granularity fully associative LRU; ties (same last use) evict the lower row.

    Example::

        >>> reference_lru([[0, 1], [2], [0]], 2)
        ([2, 1, 1], [0, 1, 1])
    """
    last: Dict[int, int] = {}
    misses, evictions = [], []
    for step, batch in enumerate(batches):
        need = [r for r in batch if r not in last]
        overflow = len(last) + len(need) - capacity
        candidates = sorted((t, r) for r, t in last.items() if r not in set(batch))
        for _, r in candidates[: max(overflow, 0)]:
            del last[r]
        for r in batch:
            last[r] = step
        misses.append(len(need))
        evictions.append(max(overflow, 0))
    return misses, evictions


def reference_opt(batches: Batches, capacity: int) -> List[int]:
    """Belady at batch granularity: evict the rows whose next use is farthest.

    Example::

        >>> reference_opt([[0, 1], [2], [0]], 2)
        [2, 1, 0]
    """
    uses: Dict[int, List[int]] = defaultdict(list)
    for step, batch in enumerate(batches):
        for r in batch:
            uses[r].append(step)

    def next_use(r: int, step: int) -> int:
        i = bisect.bisect_right(uses[r], step)
        return uses[r][i] if i < len(uses[r]) else len(batches)

    cache: Set[int] = set()
    misses = []
    for step, batch in enumerate(batches):
        need = [r for r in batch if r not in cache]
        overflow = len(cache) + len(need) - capacity
        if overflow > 0:
            candidates = sorted(cache - set(batch), key=lambda r: -next_use(r, step))
            cache -= set(candidates[:overflow])
        cache |= set(batch)
        misses.append(len(need))
    return misses


def fmix64_set(row: int, num_sets: int) -> int:
    """MurmurHash3 ``fmix64`` of ``row`` modulo ``num_sets``, in Python integers."""
    h = row & MASK64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    h ^= h >> 33
    return h % num_sets


def reference_set_assoc(
    batches: Batches,
    capacity: int,
    ways: int,
    algorithm: str = "lru",
    prefetch: bool = False,
    counts: Optional[Sequence[Sequence[int]]] = None,
) -> Tuple[List[int], List[int], List[int]]:
    """FBGEMM-style set-associative cache, written as the CUDA kernels loop (one set at a time).

    See :mod:`torchrec_scratchpipe.sim.setassoc` for the semantics. Returns per-step
    ``(misses, evictions, bypassed)``.

    Example::

        >>> reference_set_assoc([[1, 2], [1, 2]], capacity=4, ways=4)
        ([2, 0], [0, 0], [0, 0])
    """
    num_sets = max(1, capacity // ways)
    tags = [[-1] * ways for _ in range(num_sets)]
    stamp = [[0] * ways for _ in range(num_sets)]
    freq: Dict[int, int] = defaultdict(int)
    locked: Set[Tuple[int, int]] = set()
    out: Tuple[List[int], List[int], List[int]] = ([], [], [])
    for step, batch in enumerate(batches):
        now = step + 1
        if algorithm == "lfu":
            for i, r in enumerate(batch):
                freq[r] += counts[step][i] if counts is not None else 1
        used: Set[Tuple[int, int]] = set()
        missing: Dict[int, List[int]] = defaultdict(list)
        for r in sorted(batch):
            s = fmix64_set(r, num_sets)
            if r in tags[s]:
                w = tags[s].index(r)
                used.add((s, w))
                stamp[s][w] = now
            else:
                missing[s].append(r)
        protected = used | (locked if prefetch else set())
        evicted = inserted = 0
        for s, rows in missing.items():
            if algorithm == "lru":
                order = sorted(range(ways), key=lambda w: (stamp[s][w], w))
                n_in = 0
                for pos in range(min(len(rows), ways)):
                    w = order[pos]
                    if prefetch and (s, w) in locked:
                        continue
                    if stamp[s][w] == now:
                        break
                    evicted += tags[s][w] >= 0
                    tags[s][w], stamp[s][w] = rows[n_in], now
                    used.add((s, w))
                    n_in += 1
            else:
                rows = sorted(rows, key=lambda r: (-freq[r], r))

                def cost(w: int) -> int:
                    return freq[tags[s][w]] if tags[s][w] >= 0 else -1

                free = [w for w in sorted(range(ways), key=lambda w: (cost(w), w)) if (s, w) not in protected]
                costs = [cost(w) for w in free]  # fixed before any insert, as in the kernel
                n_in = 0
                for pos in range(min(len(rows), len(free))):
                    if costs[pos] > freq[rows[pos]]:
                        break
                    w = free[pos]
                    evicted += tags[s][w] >= 0
                    tags[s][w] = rows[pos]
                    used.add((s, w))
                    n_in += 1
            inserted += n_in
        n_miss = sum(len(v) for v in missing.values())
        out[0].append(n_miss)
        out[1].append(evicted)
        out[2].append(n_miss - inserted)
        locked = used
    return out


def check_scratchpipe(
    batches: Batches,
    capacity: int,
    lookahead: int,
    horizon: int,
    plans: Sequence[Tuple[int, Sequence[int], Sequence[int]]],
) -> List[int]:
    """Re-run the ScratchPipe window in Python and check every plan the engine made.

    The window (what is planned when, holds, the batches ahead) is re-implemented here. Victim
    choice is checked, not copied: each victim must be an unheld resident row outside the
    batch, empty slots must be used first, and no unchosen candidate may have a strictly
    better score (next use among the batches ahead farther, then older last use). Where ties leave a
    choice, the engine's victims are adopted so both stay in step.

    Args:
        batches: distinct rows per step.
        capacity, lookahead, horizon: the simulated configuration.
        plans: the engine's plans in planning order, ``(step, miss_rows, victim_rows)``.

    Returns:
        Misses per step according to the reference.

    Raises:
        AssertionError: naming the step where the engine disagrees.
    """
    resident: Dict[int, int] = {}  # row -> step of last plan using it
    hold: Dict[int, int] = defaultdict(int)
    misses = [0] * len(batches)
    planned: List[int] = []
    pending: List[int] = []
    training: Optional[int] = None
    log = list(plans)

    def try_plan(j: int, ahead: List[int]) -> bool:
        rows = set(batches[j])
        need = sorted(rows - resident.keys())
        held = {r for r, h in hold.items() if h > 0}
        if len(need) > capacity - len(held | (rows & resident.keys())):
            return False
        assert log, f"engine made no plan for step {j}"
        step, miss, victims = log.pop(0)
        assert step == j, f"engine planned step {step}, reference expects step {j}"
        assert sorted(miss) == need, f"step {j}: engine misses {sorted(miss)} != {need}"
        n_victims = max(0, len(need) - (capacity - len(resident)))
        assert len(victims) == n_victims, f"step {j}: {len(victims)} victims, expected {n_victims}"
        candidates = {r for r in resident if r not in rows and r not in held}
        assert set(victims) <= candidates, f"step {j}: a victim is held, in the batch or not resident"

        def score(r: int) -> Tuple[int, int]:
            pos = next((i + 1 for i, b in enumerate(ahead) if r in set(batches[b])), len(ahead) + 1)
            return pos, j - resident[r]

        if victims:
            worst_chosen = min(score(r) for r in victims)
            rest = candidates - set(victims)
            assert not rest or max(score(r) for r in rest) <= worst_chosen, f"step {j}: a better victim was skipped"
        for r in victims:
            del resident[r]
        for r in rows:
            resident[r] = j
            hold[r] += 1
        misses[j] = len(need)
        return True

    def fill() -> None:
        while pending and len(planned) + (training is not None) <= lookahead:
            ahead = pending[1:][: max(horizon - lookahead, 0)]
            if not try_plan(pending[0], ahead):
                return
            planned.append(pending.pop(0))

    def release(j: int) -> None:
        for r in batches[j]:
            hold[r] -= 1

    n = len(batches)
    for j in range(min(horizon + 1, n)):
        pending.append(j)
        fill()
    nxt = min(horizon + 1, n)
    for _ in range(n):
        if training is not None:
            release(training)
            training = None
        fill()
        training = planned.pop(0)
        fill()
        if nxt < n:
            pending.append(nxt)
            nxt += 1
            fill()
    assert not log, f"engine made {len(log)} plans the reference did not expect"
    return misses
