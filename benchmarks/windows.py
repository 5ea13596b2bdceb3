"""Adaptive plan windows against the optimal plan fixed, side by side in one run.

    python benchmarks/windows.py                 # ~3 min: 3 ranks, K = 2, 3, 8, per-epoch
    python benchmarks/windows.py --repeats 5 --epochs 5

Three forked gloo ranks with emulated speeds 1:2:4 (``shardbalance.emulate``: 2 ms a sample at
speed 1 plus 5 ms a step, so the optimal plan for B=96 is [14, 27, 55] at about 33 ms a step),
real DDP with the comm-hook weighting, a DataLoader with workers on every rank. Each
configuration trains the same epochs with the same sampler; the *oracle* is that sampler with
``policy="static"`` and the optimal plan fixed. Configurations run interleaved, repeated; the
table gives each one's median epoch time over the converged epochs of every repeat (the first
epoch, where the adaptive ones start from the equal split, is left out), its spread (min-max)
and its ratio to the oracle (oracle time / its time: 1.00 is as fast as the optimal plan).

``sync`` rows run the same adaptive sampler with ``plan_in_background=False``: the synchronous
agreement at every window boundary, as before the background planner (for the before/after).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import sys
import time
from datetime import timedelta

import _launch

SPEEDS = (1.0, 2.0, 4.0)
PER_SAMPLE_S, OVERHEAD_S = 0.002, 0.005
B = 96
STEPS = 40  # an epoch


def _configs(args) -> list[tuple[str, dict]]:
    out = [("oracle (static, optimal)", dict(policy="static", initial_weights=list(SPEEDS)))]
    for k in args.windows:
        out.append((f"adaptive K={k}", dict(rebalance_every=k)))
    out.append(("adaptive per-epoch", dict()))
    for k in args.sync_windows:
        out.append((f"sync K={k} (before)", dict(rebalance_every=k, sync=True)))
    return out


def _rank(rank: int, world: int, port: int, args, configs, out: "mp.Queue") -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from shardbalance import WeightedDistributedSampler
    from shardbalance.emulate import EmulatedSpeed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    n = B * STEPS
    data = TensorDataset(torch.randn(n, 8), torch.randint(0, 3, (n,)))
    try:
        for repeat in range(args.repeats):
            for name, kwargs in configs:
                kwargs = dict(kwargs)
                sync = kwargs.pop("sync", False)
                sampler = WeightedDistributedSampler(data, B, seed=repeat, timeout_s=20,
                                                     **kwargs)
                sampler.plan_in_background = not sync
                loader = DataLoader(data, batch_sampler=sampler, num_workers=args.num_workers,
                                    prefetch_factor=args.prefetch_factor,
                                    persistent_workers=True)
                model = DDP(torch.nn.Sequential(
                    EmulatedSpeed(SPEEDS[rank], per_sample_s=PER_SAMPLE_S,
                                  overhead_s=OVERHEAD_S), torch.nn.Linear(8, 3)))
                sampler.attach(model)
                times = []
                for epoch in range(args.epochs):
                    sampler.set_epoch(epoch)
                    dist.barrier()
                    start = time.perf_counter()
                    for x, y in loader:
                        F.cross_entropy(model(x), y).backward()
                        model.zero_grad()
                    dist.barrier()
                    times.append(time.perf_counter() - start)
                sizes = sampler.batch_sizes
                waits = sampler.planner.stats.get("waits", 0) if sampler.planner else 0
                del model, loader
                dist.barrier()
                sampler.close()
                if rank == 0:
                    out.put((name, repeat, times, sizes, waits))
        dist.barrier()
    finally:
        dist.destroy_process_group()
        if rank == 0:
            out.put(None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--windows", type=int, nargs="*", default=[2, 3, 8])
    parser.add_argument("--sync-windows", type=int, nargs="*", default=[3])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    configs = _configs(args)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "shardbalance.sampler"])
    out = ctx.Queue()
    port = _launch.free_port()
    load = os.getloadavg()[0]
    started = time.monotonic()
    procs = [ctx.Process(target=_rank, args=(r, len(SPEEDS), port, args, configs, out))
             for r in range(len(SPEEDS))]
    for p in procs:
        p.start()
    results: dict[str, list] = {name: [] for name, _ in configs}
    finals: dict[str, set] = {name: set() for name, _ in configs}
    waits: dict[str, int] = {name: 0 for name, _ in configs}
    try:
        deadline = started + args.timeout
        while True:
            try:
                item = out.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue_mod.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0)
                                                       for p in procs):
                    print("benchmark failed or timed out", file=sys.stderr)
                    return 1
                continue
            if item is None:
                break
            name, _, times, sizes, waited = item
            results[name].extend(times[1:])  # the first epoch starts from the equal split
            finals[name].add(tuple(sizes))
            waits[name] += waited
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                os.kill(p.pid, 9)
                p.join(5)
    oracle = statistics.median(results[configs[0][0]])
    print(f"3 ranks, emulated speeds {':'.join(f'{s:g}' for s in SPEEDS)}, "
          f"{PER_SAMPLE_S * 1e3:g} ms/sample at speed 1 + {OVERHEAD_S * 1e3:g} ms/step, "
          f"B={B}, {STEPS} steps/epoch, num_workers={args.num_workers}, "
          f"prefetch_factor={args.prefetch_factor}, {args.repeats} repeats x "
          f"{args.epochs - 1} converged epochs; load average at start {load:.1f}")
    print()
    print("| configuration | epoch s (median) | spread (min-max) | oracle/this | "
          "final plans | generator waits |")
    print("|---|---|---|---|---|---|")
    for name, _ in configs:
        times = results[name]
        med = statistics.median(times)
        plans = " ".join(str(list(s)) for s in sorted(finals[name]))
        print(f"| {name} | {med:.3f} | {min(times):.3f}-{max(times):.3f} | "
              f"{oracle / med:.3f} | {plans} | {waits[name]} |")
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s, load average at end "
          f"{os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
