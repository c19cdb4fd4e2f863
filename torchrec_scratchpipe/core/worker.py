"""Planning next to training: one background thread that plans and moves future batches.

ScratchPipe plans batch i+L while batch i trains. On a GPU that overlap comes for free:
the host plans while the device computes. On a CPU-only machine both share the host; FBGEMM's
CPU TBE keeps about 1.4 of 2 cores busy, so for large batches the engine hands the
planning of future batches (plan, collect, insert, write-back) to this worker and trains
meanwhile (see ``ScratchPipeConfig.background_planning``).

Why it is safe: the worker only touches unheld slots (victims and the rows moved into
them), and the batch that trains holds all of its slots. The engine waits for the worker
before anything else reads or changes the window, the maps or the backing store.
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional


class PlanWorker:
    """Runs one job at a time, each either in a background thread or inline.

    Args:
        on_blocked: called with the seconds a caller waited for a background job (the
            engine adds them to its groups' ``GroupStats.blocked_s``); the worker keeps no
            counter of its own.

    Example::

        >>> done, waited = [], []
        >>> w = PlanWorker(waited.append)
        >>> w.submit(lambda: done.append(1), background=True)
        >>> w.wait(); done, len(waited)
        ([1], 1)
    """

    def __init__(self, on_blocked: Optional[Callable[[float], None]] = None) -> None:
        self.on_blocked = on_blocked
        self._pool: Optional[ThreadPoolExecutor] = None
        self._job: Optional[Future[Any]] = None

    def submit(self, job: Callable[[], Any], background: bool) -> None:
        """Run ``job`` after the previous one has finished: in the thread, or now when not ``background``."""
        self.wait()
        if not background:
            job()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="scratchpipe-plan")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        self._job = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the running job, if any, has finished; re-raise its error."""
        job, self._job = self._job, None
        if job is None:
            return
        t0 = time.perf_counter()
        try:
            job.result()
        finally:
            if self.on_blocked is not None:
                self.on_blocked(time.perf_counter() - t0)

    def __getstate__(self) -> Dict[str, Any]:
        """Copies (deepcopy, pickling) start idle, with no thread of their own yet."""
        self.wait()
        return {"on_blocked": self.on_blocked}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["on_blocked"])  # type: ignore[misc]
