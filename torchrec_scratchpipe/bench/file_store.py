"""File-store benchmark: a table larger than host memory, against the same ids in RAM and
``fused`` over an ``mmap``ed file, with the disk's random-read IOPS measured in the same run.

Run (about 10 minutes; needs ``--table-gb`` of free disk in ``--dir``; deletes its files)::

    python -m torchrec_scratchpipe.bench.file_store --dir /var/tmp/sp --table-gb 48 --host-cache-gb 4 \\
        --json out/bench_file_store.json

One table of ``--dim`` FP32 columns trained with exact SGD (so a row is its weights only and
both contenders read the same file layout), batches of Zipf(``--alpha``) ids whose hot rows
are spread over the table by a fixed permutation. Each arm runs in its own process (so its
peak RSS is its own):

- ``iops``: random 4 KiB ``O_DIRECT`` reads of the file from 32 threads (queue depth 32),
  the limit reads can reach;
- ``file``: the ScratchPipe engine over a ``FileStore`` (host cache ``--host-cache-gb``),
  batches announced ``H`` ahead so their misses are read ahead;
- ``ram``: the same engine and window, host store, the same id stream folded into a table
  of ``--ram-rows`` rows that fits in memory;
- ``mmap``: FBGEMM's TBE (the ``fused`` kernel's) training the table in place through a
  shared mapping of the same file: the OS page cache is its cache. There is no cgroup here
  to cap the page cache, so it may use all free memory: its RSS is reported as measured
  (a conservative comparison: it gets more memory than the file store's budget).

The file is written once with real values (random reads of unwritten extents would not
touch the disk) by large sequential ``O_DIRECT`` writes, shared by ``file`` and ``mmap``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

#: Samples of the id stream's Zipf law (drawn once, cycled).
_POOL = 1 << 22


def _rss() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) << 10
    return out


def _batches(rows: int, n: int, batch: int, pooling: int, alpha: float, seed: int, fold: Optional[int]) -> List[Any]:
    """``n`` batches of Zipf ids over ``rows`` (hot rows permuted by a fixed affine map), or folded mod ``fold``."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, _POOL + 1, dtype=torch.float64)
    p = ranks.pow(-alpha)
    cdf = (p / p.sum()).cumsum(0)
    out = []
    for _ in range(n):
        u = torch.rand(batch * pooling, generator=g, dtype=torch.float64)
        r = torch.searchsorted(cdf, u).clamp(max=_POOL - 1)
        # ranks beyond the pool: spread uniformly over the whole table
        tail = torch.rand(r.numel(), generator=g) < 0.25
        ids = torch.where(tail, torch.randint(0, rows, (r.numel(),), generator=g), (r * 2654435761) % rows)
        if fold is not None:
            ids = ids % fold
        out.append(KeyedJaggedTensor.from_lengths_sync(["f"], ids, torch.full((batch,), pooling)))
    return out


def _fill(path: str, offset: int, nbytes: int, dim: int) -> float:
    """Write ``nbytes`` of rows (small uniform weights) at ``offset`` with O_DIRECT; seconds."""
    chunk = 64 << 20
    raw = torch.empty(chunk + 4096, dtype=torch.uint8)
    buf = raw[(-raw.data_ptr()) % 4096 :][:chunk]
    buf.view(torch.float32).uniform_(-0.01, 0.01, generator=torch.Generator().manual_seed(0))
    mv = memoryview(buf.numpy())
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    t0 = time.perf_counter()
    try:
        at = 0
        while at < nbytes:
            n = min(chunk, nbytes - at)
            n = (n + 4095) // 4096 * 4096
            os.pwrite(fd, mv[:n], offset + at)
            at += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _iops(path: str, offset: int, nbytes: int, seconds: float, depth: int = 32) -> Dict[str, float]:
    """Random 4 KiB O_DIRECT reads from ``depth`` threads for ``seconds``."""
    blocks = nbytes // 4096
    counts = [0] * depth
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        raw = torch.empty(8192, dtype=torch.uint8)
        mv = memoryview(raw[(-raw.data_ptr()) % 4096 :][:4096].numpy())
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        g = torch.Generator().manual_seed(i)
        offs = (torch.randint(0, blocks, (1 << 16,), generator=g) * 4096 + offset).tolist()
        n = 0
        while time.perf_counter() < stop:
            os.preadv(fd, [mv], offs[n % len(offs)])
            n += 1
        counts[i] = n
        os.close(fd)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"iops": sum(counts) / (time.perf_counter() - t0), "depth": depth}


def _train(args: argparse.Namespace, arm: str) -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from torchrec_scratchpipe.core.config import ScratchPipeConfig
    from torchrec_scratchpipe.core.engine import ScratchPipeEmbeddingBags
    from torchrec_scratchpipe.core.store_api import StoreSpec

    torch.set_num_threads(1)
    rows = args.ram_rows if arm == "ram" else args.rows
    n = args.warmup + args.steps
    batches = _batches(args.rows, n + args.horizon, args.batch_size, args.pooling, args.alpha, 0,
                       args.ram_rows if arm == "ram" else None)
    out: Dict[str, Any] = {"arm": arm, "rows": rows, "table_bytes": rows * args.dim * 4}
    sgd = EmbOptimType.EXACT_SGD
    if arm == "mmap":
        import numpy as np

        from torchrec_scratchpipe.compat import host_tbe_over

        m = np.memmap(args.data, dtype=np.float32, mode="r+", offset=4096, shape=(rows, args.dim))
        tbe = host_tbe_over(torch.from_numpy(m), optimizer=sgd, learning_rate=0.01)
        step = lambda kjt: tbe(kjt.values(), kjt.offsets())  # noqa: E731
        queue = None
    else:
        noop = lambda w: None  # noqa: E731  (the file arm's rows are already written; see _fill)
        table = EmbeddingBagConfig(name="t", embedding_dim=args.dim, num_embeddings=rows, feature_names=["f"],
                                   init_fn=noop if arm == "file" else None)
        store = StoreSpec("file", args.dir, int(args.host_cache_gb * (1 << 30))) if arm == "file" else None
        emb = ScratchPipeEmbeddingBags([table], ScratchPipeConfig(
            cache_rows=args.cache_rows, lookahead=args.lookahead, horizon=args.horizon, optimizer=sgd,
            learning_rate=0.01, store=store))
        g = emb.groups["dim%d_sum" % args.dim]
        if arm == "file":
            path = g.store.file.path  # type: ignore[attr-defined]
            out["fill_s"] = _fill(path, 4096, rows * args.dim * 4, args.dim)
            os.link(path, args.data)  # the mmap arm trains the same bytes
        queue = iter(batches)
        for _ in range(args.horizon):
            emb.prefetch(next(queue))
        step = lambda kjt: emb(kjt).values()  # noqa: E731
    times, peak = [], 0
    before: Dict[str, int] = {}
    deadline = time.perf_counter() + args.max_seconds
    for i, kjt in enumerate(batches[:n]):
        if i > args.warmup and time.perf_counter() > deadline:
            break  # a slow arm (fused over mmap): the steps run so far are its measurement
        t0 = time.perf_counter()
        if queue is not None:
            nxt = next(queue, None)
            if nxt is not None:
                emb.prefetch(nxt)
        y = step(kjt)
        y.sum().backward()
        times.append(time.perf_counter() - t0)
        peak = max(peak, _rss()["VmRSS"])
        if i == args.warmup - 1 and arm == "file":
            before = dict(g.store.stats())  # type: ignore[attr-defined]
    timed = times[args.warmup :]
    out["timed_steps"] = len(timed)
    out["samples_per_s"] = args.batch_size * len(timed) / sum(timed)
    out["step_ms"] = 1e3 * sum(timed) / len(timed)
    out["peak_rss_bytes"] = peak
    out["rss"] = _rss()
    if arm == "file":
        s = g.store.stats()  # type: ignore[attr-defined]
        d = {k: s[k] - before.get(k, 0) for k in s}
        out["store"] = d
        out["reads_per_s"] = d["read_calls"] / sum(timed)
        out["host_cache_bytes"] = int(args.host_cache_gb * (1 << 30))
        out["store_host_bytes"] = g.store.nbytes()
        out["planner_host_bytes"] = g.planner.host_bytes(rows, g.capacity)
        st = g.stats
        out["misses_per_step"] = st.plan_misses / max(1, st.steps)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m torchrec_scratchpipe.bench.file_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="directory for the file (needs --table-gb free)")
    p.add_argument("--table-gb", type=float, default=48.0)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--host-cache-gb", type=float, default=4.0)
    p.add_argument("--ram-rows", type=int, default=1 << 20)
    p.add_argument("--cache-rows", type=int, default=1 << 17, help="scratchpad slots")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--pooling", type=int, default=8)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--lookahead", type=int, default=1)
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--mmap-steps", type=int, default=30)
    p.add_argument("--iops-seconds", type=float, default=10.0)
    p.add_argument("--max-seconds", type=float, default=600.0, help="wall-time cap of one arm's steps")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.rows = int(args.table_gb * 1e9) // (args.dim * 4)
    if args.arm is not None:  # one arm, in its own process
        print(json.dumps(_train(args, args.arm)))
        return
    data = os.path.join(args.dir, "bench-file-store.data")
    if os.path.exists(data):
        raise SystemExit(f"{data} exists (a previous run's): remove it first.")
    base = [sys.executable, "-m", "torchrec_scratchpipe.bench.file_store", *(argv if argv is not None else sys.argv[1:]),
            "--data", data]
    results: Dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k not in ("arm", "data", "json")}}
    try:
        for arm in ("file", "ram", "mmap"):
            extra = ["--steps", str(args.mmap_steps), "--warmup", "5", "--max-seconds", "300"] if arm == "mmap" else []
            res = subprocess.run([*base, "--arm", arm, *extra], check=True, capture_output=True, text=True)
            results[arm] = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{arm}: {json.dumps(results[arm])}", file=sys.stderr, flush=True)  # kept if a later arm fails
            if arm == "file":
                results["iops"] = _iops(data, 4096, args.rows * args.dim * 4, args.iops_seconds)
                print(f"iops: {json.dumps(results['iops'])}", file=sys.stderr, flush=True)
    finally:
        if os.path.exists(data):
            os.unlink(data)
    f, r, m, io = results["file"], results["ram"], results["mmap"], results["iops"]
    results["goals"] = {
        "rss_within_cache_plus_10pct": f["peak_rss_bytes"] <= 1.1 * f["host_cache_bytes"],
        "x_fused_mmap": f["samples_per_s"] / m["samples_per_s"],
        "of_in_ram": f["samples_per_s"] / r["samples_per_s"],
        "reads_of_qd32_iops": f["reads_per_s"] / io["iops"],
    }
    gb = 1e9
    print(f"| arm | table GB | samples/s | step ms | peak RSS GB |\n|---|---|---|---|---|")
    for k in ("file", "ram", "mmap"):
        a = results[k]
        print(f"| {k} | {a['table_bytes'] / gb:.1f} | {a['samples_per_s']:,.0f} | {a['step_ms']:.1f} | {a['peak_rss_bytes'] / gb:.2f} |")
    print(f"\nQD32 random 4 KiB reads: {io['iops']:,.0f} IOPS; file store reads {f['reads_per_s']:,.0f}/s "
          f"({f['misses_per_step']:,.0f} misses a step); goals: {json.dumps(results['goals'])}")
    print(json.dumps(results, indent=1))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
