"""Adaptive plan windows against the optimal plan fixed, interleaved epoch by epoch in one run.

    python benchmarks/windows.py                 # ~4 min: 3 ranks, K = 2, 3, 8, per-epoch, sync K=3
    python benchmarks/windows.py --repeats 3 --epochs 4
    python benchmarks/windows.py --repeats 1 --epochs 5 --windows 3 --sync-windows

Three forked gloo ranks with emulated speeds 1:2:4 (``shardbalance.emulate``: 2 ms a sample at
speed 1 plus 5 ms a step, so the optimal plan for B=96 is [14, 27, 55] at about 33 ms a step),
real DDP with the comm-hook weighting, a DataLoader with workers (``--num-workers``, persistent)
on every rank. The *oracle* is the same sampler with ``policy="static"`` and the optimal plan
fixed; ``adaptive K=k`` re-plans every k steps (``rebalance_every``), ``adaptive per-epoch``
once per epoch, and ``sync`` rows run the adaptive sampler with ``plan_in_background=False``
(the synchronous agreement at every window boundary, as before the background planner).

Interleaved, so that a slow phase of a shared machine hits every configuration alike: each
repeat builds every configuration once (its own sampler, DataLoader and DDP model, on the same
processes), then runs *round* after round, one epoch of every configuration per round, in an
order that rotates by one each round. Figures:

* ``epoch s``: the median epoch time over the converged epochs of every repeat and its spread
  (min-max). Converged: every epoch after the first ``--warmup-epochs`` (default 1) of each
  repeat; the first is where the adaptive configurations start from the equal split (and the
  oracle's first epoch is left out alike).
* ``oracle/this``: the oracle's median over this one's (1.00: as fast as the optimal plan).
* ``paired``: the median over converged rounds of (the oracle's epoch / this one's epoch in the
  same round), which cancels load that changes from round to round; its min-max.
* ``plan model``: the oracle's over this one's mean *modelled* step (the emulator's curve,
  :func:`shardbalance.emulate.curve_seconds`, for the plan each converged step trained): what
  the plans alone cost, free of the machine's noise and of the planning overheads.
* ``CPU ms/step``: the median over converged epochs of rank 0's process CPU time (training,
  loader feeding and planner threads) and of its embedded coordinator's, per step: on a
  2-core machine every CPU millisecond beside the ranks' sleeps can land on a step.
* ``plans at epoch ends``: the plans trained at the end of the converged epochs (all repeats),
  and ``generator waits`` (a switch step whose plan was not agreed yet when the loader
  reached it).

Every wait is bounded: the gloo group (``--peer-timeout``), the samplers (``timeout_s``), and
the parent waits at most ``--stall`` seconds for the next epoch's figures and ``--timeout`` in
all; on a failure it prints the rounds it got and stops every rank by its PID.
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
ORACLE = "oracle (static, optimal)"


def _configs(args) -> list[tuple[str, dict]]:
    out = [(ORACLE, dict(policy="static", initial_weights=list(SPEEDS)))]
    for k in args.windows:
        out.append((f"adaptive K={k}", dict(rebalance_every=k)))
    if not args.no_per_epoch:
        out.append(("adaptive per-epoch", dict()))
    for k in args.sync_windows:
        out.append((f"sync K={k} (before)", dict(rebalance_every=k, sync=True)))
    return out


def _modelled_step(sizes) -> float:
    """The emulator's step time for a plan: its slowest rank's curve."""
    from shardbalance.emulate import curve_seconds

    return max(curve_seconds(b, s, PER_SAMPLE_S, OVERHEAD_S) for b, s in zip(sizes, SPEEDS))


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` used so far; 0 without one."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
                            world_size=world, timeout=timedelta(seconds=args.peer_timeout))
    n = B * STEPS
    data = TensorDataset(torch.randn(n, 8), torch.randint(0, 3, (n,)))
    try:
        for repeat in range(args.repeats):
            runs = []
            for name, kwargs in configs:  # the same order on every rank
                kwargs = dict(kwargs)
                sync = kwargs.pop("sync", False)
                sampler = WeightedDistributedSampler(data, B, seed=repeat, timeout_s=20,
                                                     **kwargs)
                sampler.plan_in_background = not sync
                loader = DataLoader(data, batch_sampler=sampler, num_workers=args.num_workers,
                                    prefetch_factor=args.prefetch_factor,
                                    persistent_workers=args.num_workers > 0)
                model = DDP(torch.nn.Sequential(
                    EmulatedSpeed(SPEEDS[rank], per_sample_s=PER_SAMPLE_S,
                                  overhead_s=OVERHEAD_S), torch.nn.Linear(8, 3)))
                sampler.attach(model)
                runs.append((name, sampler, loader, model))
            for epoch in range(args.epochs):
                shift = (repeat * args.epochs + epoch) % len(runs)
                for name, sampler, loader, model in runs[shift:] + runs[:shift]:
                    sampler.set_epoch(epoch)
                    plans = {}
                    embedded = getattr(sampler.session, "embedded", None)
                    coordinator = None if embedded is None else embedded.pid
                    dist.barrier()
                    cpu = time.process_time(), _cpu_s(coordinator)
                    start = time.perf_counter()
                    for x, y in loader:
                        F.cross_entropy(model(x), y).backward()
                        model.zero_grad()
                        sizes = sampler.last_trained.plan.batch_sizes
                        plans[sizes] = plans.get(sizes, 0) + 1
                    dist.barrier()
                    elapsed = time.perf_counter() - start
                    cpu = (time.process_time() - cpu[0], _cpu_s(coordinator) - cpu[1])
                    if rank == 0:
                        planner = sampler.planner
                        waits = planner.stats.get("waits", 0) if planner is not None else 0
                        out.put(("epoch", name, repeat, epoch, elapsed, plans,
                                 sampler.batch_sizes, waits, cpu))
            dist.barrier()
            for name, sampler, loader, model in runs:
                sampler.close()
            del runs
            dist.barrier()
    finally:
        dist.destroy_process_group()
        if rank == 0:
            out.put(None)


def _summarise(configs, rows, warmup: int) -> list[dict]:
    """Per configuration: medians, spreads, paired ratios and the plans' modelled cost."""
    times: dict[str, list[float]] = {name: [] for name, _ in configs}
    by_round: dict[tuple[int, int], dict[str, float]] = {}
    steps: dict[str, dict] = {name: {} for name, _ in configs}
    cpus: dict[str, list] = {name: [] for name, _ in configs}
    finals: dict[str, set] = {name: set() for name, _ in configs}
    waits: dict[str, int] = {name: 0 for name, _ in configs}
    for name, repeat, epoch, elapsed, plans, final, waited, cpu in rows:
        if epoch < warmup:
            continue
        times[name].append(elapsed)
        cpus[name].append(cpu)
        by_round.setdefault((repeat, epoch), {})[name] = elapsed
        for sizes, count in plans.items():
            steps[name][sizes] = steps[name].get(sizes, 0) + count
        finals[name].add(tuple(final))
    last_waits: dict[tuple[str, int], int] = {}
    for name, repeat, epoch, elapsed, plans, final, waited, _ in rows:
        last_waits[(name, repeat)] = waited  # a sampler's counter is cumulative
    for (name, _), waited in last_waits.items():
        waits[name] += waited

    def modelled(name: str) -> float | None:
        counts = steps[name]
        total = sum(counts.values())
        if not total:
            return None
        return sum(_modelled_step(s) * c for s, c in counts.items()) / total

    oracle_times, oracle_model = times[ORACLE], modelled(ORACLE)
    oracle = statistics.median(oracle_times) if oracle_times else None
    out = []
    for name, _ in configs:
        t = times[name]
        row = dict(name=name, n=len(t), finals=sorted(finals[name]), waits=waits[name])
        if t:
            row.update(median=statistics.median(t), low=min(t), high=max(t))
            row["ratio"] = oracle / row["median"] if oracle else None
        pairs = [r[ORACLE] / r[name] for r in by_round.values() if ORACLE in r and name in r]
        if pairs:
            row.update(paired=statistics.median(pairs), paired_low=min(pairs),
                       paired_high=max(pairs))
        model = modelled(name)
        if model and oracle_model:
            row["model"] = oracle_model / model
        if cpus[name]:
            row["rank_cpu_ms"] = statistics.median(c[0] for c in cpus[name]) * 1e3 / STEPS
            row["coordinator_cpu_ms"] = statistics.median(c[1] for c in cpus[name]) * 1e3 / STEPS
        out.append(row)
    return out


def _print(args, configs, rows, load_start: float, started: float, complete: bool) -> None:
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    rounds = len({(r[1], r[2]) for r in rows})
    print(f"3 ranks, emulated speeds {':'.join(f'{s:g}' for s in SPEEDS)}, "
          f"{PER_SAMPLE_S * 1e3:g} ms/sample at speed 1 + {OVERHEAD_S * 1e3:g} ms/step, "
          f"B={B}, {STEPS} steps/epoch, num_workers={args.num_workers}, "
          f"prefetch_factor={args.prefetch_factor}; {args.repeats} repeats x {args.epochs} "
          f"epochs interleaved (first {args.warmup_epochs} of each repeat left out), "
          f"{rounds} rounds{'' if complete else ' (INCOMPLETE)'}; load average at start "
          f"{load_start:.1f}")
    print()
    print("| configuration | epochs | epoch s (median) | spread (min-max) | oracle/this | "
          "paired (median, min-max) | plan model | CPU ms/step rank 0, coordinator | "
          "plans at epoch ends | generator waits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in _summarise(configs, rows, args.warmup_epochs):
        plans = " ".join(str(list(s)) for s in row["finals"])
        spread = f"{fmt(row.get('low'))}-{fmt(row.get('high'))}"
        paired = f"{fmt(row.get('paired'))} ({fmt(row.get('paired_low'))}-" \
                 f"{fmt(row.get('paired_high'))})"
        cpu = f"{fmt(row.get('rank_cpu_ms'), '.2f')}, {fmt(row.get('coordinator_cpu_ms'), '.2f')}"
        print(f"| {row['name']} | {row['n']} | {fmt(row.get('median'))} | {spread} | "
              f"{fmt(row.get('ratio'))} | {paired} | {fmt(row.get('model'))} | {cpu} | "
              f"{plans} | {row['waits']} |")
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s, load average at end "
          f"{os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per repeat and config")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="first epochs of each repeat left out of the figures")
    parser.add_argument("--windows", type=int, nargs="*", default=[2, 3, 8])
    parser.add_argument("--sync-windows", type=int, nargs="*", default=[3])
    parser.add_argument("--no-per-epoch", action="store_true",
                        help="leave out the per-epoch adaptive configuration")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="bound on the whole run, seconds")
    parser.add_argument("--stall", type=float, default=180.0,
                        help="bound on the wait for the next epoch's figures, seconds")
    parser.add_argument("--peer-timeout", type=float, default=120.0,
                        help="the gloo group's timeout, seconds")
    args = parser.parse_args(argv)
    for name in ("repeats", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_epochs < args.epochs:
        parser.error(f"--warmup-epochs must be in [0, --epochs), got {args.warmup_epochs}")
    if any(k < 1 for k in args.windows + args.sync_windows):
        parser.error(f"window sizes must be >= 1, got {args.windows + args.sync_windows}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.num_workers == 0:
        args.prefetch_factor = None
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
    rows: list[tuple] = []
    complete = False
    try:
        deadline = started + args.timeout
        stalled = time.monotonic() + args.stall + 60.0  # the first one builds everything
        while True:
            now = time.monotonic()
            try:
                item = out.get(timeout=max(0.1, min(5.0, deadline - now, stalled - now)))
            except queue_mod.Empty:
                now = time.monotonic()
                failed = [p.pid for p in procs if p.exitcode not in (None, 0)]
                if now > deadline or now > stalled or failed:
                    why = f"ranks {failed} failed" if failed else \
                        "timed out" if now > deadline else \
                        f"no epoch finished within {args.stall:g} s"
                    print(f"benchmark stopped: {why}", file=sys.stderr)
                    break
                continue
            if item is None:
                complete = True
                break
            rows.append(item[1:])
            stalled = time.monotonic() + args.stall
    finally:
        for p in procs:
            p.join(30 if complete else 1)
            if p.is_alive():
                os.kill(p.pid, 9)
                p.join(5)
    if rows:
        _print(args, configs, rows, load, started, complete)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
