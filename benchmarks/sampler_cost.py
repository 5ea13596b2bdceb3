"""Cost of one epoch of indices for one rank: torch DistributedSampler vs shardbalance.

    python benchmarks/sampler_cost.py

Measured on a 2-core x86 VM shared with other jobs, numpy 2.4, torch 2.13 CPU, iterating the
real WeightedDistributedSampler (equal policy):

    N | DistributedSampler s | ours s | time ratio | DS extra MiB | ours extra MiB | memory ratio
    1e+06 | 0.056 | 0.026 | 0.4592 | 47.4 | 8.5 | 0.17940
    1e+07 | 0.683 | 0.073 | 0.1064 | 470.0 | 9.0 | 0.01918
    1e+08 | 11.365 | 0.896 | 0.0789 | 4591.4 | 9.5 | 0.00207

Wall times move by up to ~50% between runs on that shared machine. Ours is flat in memory (one
chunk of 65536 positions), so its ratio only looks large at 1e6, where both are tiny. At 1e8
about 0.5 s is the Feistel order (a 27-bit domain: 1.34 passes per position) and the rest is
building the 12.5 M Python ints of the batch lists and yielding them. Ours yields
32 * ceil(N/256) samples (the last global batch wraps around), DS ceil(N/8), hence 125024 vs
125000 at 1e6.

What is compared, for rank 0 of ``--ranks`` ranks, per-rank batch ``--per-rank-batch``:

(a) ``BatchSampler(DistributedSampler(dataset, num_replicas=R, rank=0, shuffle=True),
    batch_size=b, drop_last=False)`` iterated to exhaustion, as a DataLoader does. The
    DistributedSampler draws ``torch.randperm(N).tolist()`` and slices it, on every rank, every
    epoch. The dataset is a class with ``__len__`` only, so no N items are allocated for it.
(b) ``WeightedDistributedSampler(dataset, R*b, num_replicas=R, rank=0, policy="equal")``
    iterated to exhaustion: rank 0 takes positions ``s*R*b + [0, b)`` of every global step
    ``s`` (the last global batch wraps around, as with drop_last=False), evaluated through the
    Feistel order in chunks, each step's batch yielded as a Python list.

Each contender runs in its own subprocess so that memory is measured cleanly. Time is the
median wall time (time.perf_counter) of ``--repeats`` epochs, including building the sampler.
Memory is the extra peak resident set size of the child over its own baseline after imports:
the child resets the kernel's high-water mark (``/proc/self/clear_refs``), then reads
``VmHWM`` after the epochs. If that reset is not available, it falls back to ``ru_maxrss``,
which also counts the import-time peak and so can under-report a small extra. RSS can also
miss allocations that reuse pages freed after the imports, so for ours (numpy and Python
objects only) the child also measures the tracemalloc peak in a separate, untimed epoch and
reports the larger of the two. tracemalloc cannot see torch tensors, so it is not used for (a).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
#: Bound on one measuring child (N = 1e8 takes about a minute for DistributedSampler).
_CHILD_TIMEOUT_S = 1800.0


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


class _Peak:
    """Extra peak RSS since construction, in bytes."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
            self._base = self._status("VmRSS")
        except OSError:
            self.method = "ru_maxrss delta"
            self._base = self._maxrss()

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{field} not in /proc/self/status")

    @staticmethod
    def _maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def extra(self) -> int:
        peak = self._status("VmHWM") if self.method.startswith("VmHWM") else self._maxrss()
        return max(0, peak - self._base)


def _child_torch(n: int, ranks: int, batch: int, repeats: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline so it does not count)
    from torch.utils.data import BatchSampler, DistributedSampler

    peak = _Peak()
    times = []
    for epoch in range(repeats):
        t0 = time.perf_counter()
        sampler = DistributedSampler(_LengthOnly(n), num_replicas=ranks, rank=0, shuffle=True)
        sampler.set_epoch(epoch)
        count = 0
        for b in BatchSampler(sampler, batch_size=batch, drop_last=False):
            count += len(b)
        times.append(time.perf_counter() - t0)
        del sampler, b
    return {"time": statistics.median(times), "extra": peak.extra(), "method": peak.method,
            "count": count}


def _ours_batches(n: int, ranks: int, batch: int, epoch: int):
    """Rank 0's batches of one epoch, from the real sampler with the equal split."""
    from shardbalance import WeightedDistributedSampler

    sampler = WeightedDistributedSampler(_LengthOnly(n), ranks * batch, num_replicas=ranks,
                                         rank=0, policy="equal")
    sampler.set_epoch(epoch)
    yield from sampler


class _LengthOnly:
    """A dataset of length N that allocates nothing."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length


def _child_ours(n: int, ranks: int, batch: int, repeats: int) -> dict:
    import tracemalloc

    import numpy as np  # noqa: F401

    import shardbalance.sampler  # noqa: F401

    peak = _Peak()
    times = []
    for epoch in range(repeats):
        t0 = time.perf_counter()
        count = 0
        for b in _ours_batches(n, ranks, batch, epoch):
            count += len(b)
        times.append(time.perf_counter() - t0)
    rss_extra = peak.extra()
    tracemalloc.start()
    for b in _ours_batches(n, ranks, batch, 0):
        pass
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"time": statistics.median(times), "extra": max(rss_extra, traced),
            "rss_extra": rss_extra, "traced": traced, "method": peak.method, "count": count}


def _run_child(kind: str, n: int, args: argparse.Namespace, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--sizes", str(n), "--ranks",
           str(args.ranks), "--per-rank-batch", str(args.per_rank_batch), "--repeats",
           str(repeats)]
    try:
        # The child is stopped (by PID) if it runs past the bound.
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=_REPO,
                              timeout=_CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{kind} child for N={n} ran past {_CHILD_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed for N={n}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="comma-separated N values")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--per-rank-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None,
                        help="epochs per contender (default 3, or 1 for N >= 1e8)")
    parser.add_argument("--child", choices=["torch", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = _parse_sizes(args.sizes)

    if args.child:
        sys.path.insert(0, str(_REPO))
        n, repeats = sizes[0], args.repeats or 1
        if args.child == "torch":
            result = _child_torch(n, args.ranks, args.per_rank_batch, repeats)
        else:
            result = _child_ours(n, args.ranks, args.per_rank_batch, repeats)
        print(json.dumps(result))
        return

    mib = 1 << 20
    header = ("N", "DistributedSampler s", "ours s", "time ratio", "DS extra MiB",
              "ours extra MiB", "memory ratio")
    print(" | ".join(header))
    method = None
    for n in sizes:
        repeats = args.repeats or (1 if n >= 10**8 else 3)
        ds = _run_child("torch", n, args, repeats)
        ours = _run_child("ours", n, args, repeats)
        method = ds["method"]
        mem_ratio = ours["extra"] / ds["extra"] if ds["extra"] else float("nan")
        print(" | ".join([
            f"{n:.0e}", f"{ds['time']:.3f}", f"{ours['time']:.3f}",
            f"{ours['time'] / ds['time']:.4f}", f"{ds['extra'] / mib:.1f}",
            f"{ours['extra'] / mib:.1f}", f"{mem_ratio:.5f}",
        ]), flush=True)
        print(f"    (rank-0 samples: DS {ds['count']}, ours {ours['count']}; ours RSS extra "
              f"{ours['rss_extra'] / mib:.1f} MiB, tracemalloc peak "
              f"{ours['traced'] / mib:.1f} MiB)", flush=True)
    print("time: median wall time of an epoch, sampler construction included. ratios: ours / DS.")
    print(f"memory: extra peak RSS over the child's post-import baseline ({method}); for ours, "
          f"the larger of that and the tracemalloc peak of a separate untimed epoch.")


if __name__ == "__main__":
    main()
