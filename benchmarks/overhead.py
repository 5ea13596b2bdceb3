"""Per-step cost of shardbalance's gradient weighting + sampler (+ coordinator) next to plain DDP.

    python benchmarks/overhead.py --repeats 40   # ~140 s: torchrun ~125 s, microbenchmarks ~10 s

Measured on the 2-core x86 VM shared with other jobs (load average 1.1 -> 2.6), torch 2.13
CPU, gloo, ``--repeats 40``:

    variant | median step ms | overhead vs (a) % | p90 ms | mean ms (vs (a) %) | paired overhead % (all rounds) | per repeat: median [IQR] (min..max) | plans
    (a) distributed | 25.24 | +0.00 | 31.01 | 25.81 (+0.00) | +0.00 | - | [64, 64]
    (a2) control | 25.42 | +0.72 | 30.76 | 25.88 (+0.25) | +1.12 | +1.16 [-1.52, +3.92] (-7.7..+10.8) | [64, 64]
    (a') hooked | 25.83 | +2.33 | 31.13 | 26.32 (+1.99) | +1.97 | +2.05 [+0.68, +5.81] (-5.6..+10.9) | [64, 64]
    (b) equal | 26.00 | +2.99 | 31.23 | 26.45 (+2.47) | +2.66 | +2.21 [-0.01, +5.45] (-7.8..+11.4) | [64, 64]
    (b') output | 25.41 | +0.65 | 31.09 | 25.98 (+0.65) | +0.43 | +0.28 [-1.62, +1.91] (-7.4..+9.9) | [64, 64]
    (c) affine | 26.65 | +5.56 | 32.99 | 27.31 (+5.82) | +4.69 | +5.72 [+1.53, +6.97] (-4.2..+15.1) | [64, 64]
    paired over (a') (any Python comm hook -> shardbalance's part): (b) +0.53 %; (b') -1.98 %; (c) +1.78 %
    (c) plan fetch (each window's first step): step median 34.03 ms vs 26.18 ms for other steps; 80 fetches, median 6.48 ms each = sender flush 0.05 + coordinator request 4.40 + digest all-reduce 0.98 + barrier and checks (rest)
    sampler alone: DistributedSampler+BatchSampler 5.3 µs/step, WeightedDistributedSampler(equal) 15.1 µs/step
    weighting='output' alone (forward hook, output node, two autograd callbacks): -25..+15 µs/step over 4 runs

Other runs of the same day (medians / paired, % over (a); (a2) is the noise floor):

    --batch 256 (45-48 ms steps)  (a2) +1.3 / +2.1   (b) +2.7 / +2.4   (b') +0.8 / +1.4   (c) +3.9 / +4.3
    --bucket-view (25 ms steps)   (a2) +0.6 / +1.0   (b) +2.6 / +3.2   (b') -0.1 / -0.3   (c) +4.0 / +4.7

Read: ``attach(model, weighting="output")`` (b') is indistinguishable from plain DDP: its
overhead sits inside the spread of (a2), the same plain DDP measured twice (the A/A control
that says what "+1 %" means on this machine). Its own parts cost microseconds a step. The
default comm hook (b) costs what any Python comm hook costs ((b) vs (a'): +0.5 %): one pass
over the gradient buckets, which DDP's built-in all-reduce avoids by dividing while it copies
gradients into the bucket. On this CPU that pass is ~0.5 ms over 8 MiB, 2-3 % of a 25 ms
step; on a GPU, at HBM bandwidth, it is microseconds. (c) added a plan fetch of ~6.5 ms per
window (here every 10 steps) while plans were agreed at each window's first step; they are now
agreed by a background planner thread, rounds starting inside a forward, and its line reports
the rounds and requests instead. The sampler is ~10 µs
a step more than DistributedSampler. (The "hook alone" microbenchmark below times the hook in
front of an averaging stand-in, i.e. the user-hook path with its extra pass.)

What runs. One torchrun of this file (2 gloo ranks on 127.0.0.1, a free port, OMP_NUM_THREADS=1,
bounded by --timeout, its process group killed on timeout). Both ranks train the same MLP
(``--depth`` Linear+ReLU layers of ``--width``, then a 10-way head) on the same in-memory data,
``--batch`` samples per rank per step, num_workers=0, no emulated sleep, six ways, each with
its own DDP copy of the same initial weights:

(a) ``distributed``: torch's DistributedSampler + DataLoader(batch_size=b), DDP's built-in
    all-reduce (no comm hook).
(a2) ``control``: (a) again, a second DDP copy: the A/A control, the noise floor.
(a') ``hooked``: as (a) plus torch's own ``allreduce_hook`` registered as the comm hook: the
    price of any Python comm hook, to separate it from shardbalance's own part.
(b) ``equal``: WeightedDistributedSampler(policy="equal", B = 2b) as batch_sampler, and
    ``attach()``: the comm hook (pre-scale by b_i/B, then a summing all-reduce), the step
    ledger and the CPU busy clock. No coordinator.
(b') ``output``: as (b) with ``attach(model, weighting="output")``: no comm hook (DDP's
    built-in all-reduce), one autograd node on the output, busy time from autograd callbacks.
(c) ``affine``: as (b) with policy="affine" and ``rebalance_every=--rebalance-every``: also the
    embedded coordinator (a child process of rank 0) and the background planner's rounds
    (per window: two small all-reduces, a gather, rank 0's ZeroMQ request and a broadcast,
    in a thread of their own). Its no-change band is huge by default (``--affine-band``), so the plan stays
    the equal split and (c) measures the machinery; with the library's band (0.02) noise on
    these equal CPU ranks moved the plan as far as [110, 18] in one run, which then measures a
    different workload, not overhead.

The variants are interleaved step by step, in an order that rotates every round (so a burst of
load from elsewhere hits all variants alike and each runs first equally often): one *round* is one
step of each. A step is timed on rank 0 with time.perf_counter from just before fetching its
batch (sampler, collate, and for (c) any plan fetch) to the end of ``opt.step()``. An epoch of
``--steps`` rounds is one *repeat*; ``--warmup`` repeats are dropped. Reported per variant: the
median and p90 of all its steps and the overhead of that median over (a)'s; the mean (which,
unlike the median, carries the once-per-window plan fetch); and the paired overhead, each
step over (a)'s step of the same round: the median over all rounds, and the spread across
repeats (per-repeat median of the paired ratios: median, IQR, min..max). With step-level
interleaving, (b), (b') and (c)'s busy clocks also count the other variants' steps: harmless here,
as the plan is pinned, but it is why the band must stay pinned.

Then, in this process (one thread, as the ranks), three microbenchmarks:

* sampler alone: one epoch of index batches for rank 0 of 2 at the training run's N and batch,
  ``BatchSampler(DistributedSampler)`` vs ``WeightedDistributedSampler(policy="equal")``,
  interleaved, median per step in µs;
* hook alone: ``WeightedCommHook.on_bucket`` on stand-in buckets of the model's gradient size
  (split as DDP's default 1 MiB first bucket and 25 MiB caps would), with a stand-in inner hook
  that does allreduce_hook's ``div_`` pass and returns a completed future (no communication),
  vs that inner hook alone, and one ``mul_`` pass alone; per step in µs;
* output weighting alone: a tiny Linear(8, 8) step with and without ``OutputWeighting``'s
  forward hook (its node and callbacks run in backward); the difference per step in µs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _launch

VARIANTS = ("distributed", "control", "hooked", "equal", "output", "affine")
TAGS = {"distributed": "(a)", "control": "(a2)", "hooked": "(a')", "equal": "(b)",
        "output": "(b')", "affine": "(c)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=2, help="hidden Linear layers of --width")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=20, help="steps per epoch (one repeat)")
    p.add_argument("--repeats", type=int, default=20, help="measured epochs per variant")
    p.add_argument("--warmup", type=int, default=1, help="leading epochs per variant dropped")
    p.add_argument("--rebalance-every", type=int, default=10,
                   help="plan window of the affine variant (0: one plan per epoch)")
    p.add_argument("--affine-band", type=float, default=1e6,
                   help="the affine policy's no-change band: the default pins the plan at the "
                        "equal split so (c) measures the machinery, not other plans; 0.02 is "
                        "the library's default (on equal CPU ranks noise then moves the plan)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the torchrun launch")
    p.add_argument("--bucket-view", action="store_true",
                   help="DDP(gradient_as_bucket_view=True) for every variant: gradients live in "
                        "the buckets, so no variant pays a copy into them")
    p.add_argument("--skip-micro", action="store_true", help="no sampler/hook microbenchmarks")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# The ranks

def _make_model(width: int, depth: int):
    import torch

    layers, dim = [], width
    for _ in range(depth):
        layers += [torch.nn.Linear(dim, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 10))
    return torch.nn.Sequential(*layers)


def _worker(args: argparse.Namespace, out_path: str, journal: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from shardbalance import WeightedDistributedSampler

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    B = args.batch * world
    n = args.steps * B
    gen = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(n, args.width, generator=gen),
                            torch.randint(0, 10, (n,), generator=gen))
    torch.manual_seed(0)
    base = _make_model(args.width, args.depth)
    runs = {}
    for v in VARIANTS:
        model = DDP(_make_model(args.width, args.depth),
                    gradient_as_bucket_view=args.bucket_view)
        model.module.load_state_dict(base.state_dict())
        if v in ("distributed", "control", "hooked"):
            sampler = DistributedSampler(dataset, seed=0)
            loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch)
            if v == "hooked":
                model.register_comm_hook(None, default_hooks.allreduce_hook)
        else:
            sampler = WeightedDistributedSampler(
                dataset, global_batch_size=B, seed=0, policy="equal" if v == "output" else v,
                rebalance_every=args.rebalance_every or None, coordinator_log=journal,
                options={"band": args.affine_band} if v == "affine" else None)
            loader = DataLoader(dataset, batch_sampler=sampler)
            sampler.attach(model, weighting="output" if v == "output" else "hook")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        runs[v] = {"model": model, "sampler": sampler, "loader": loader, "opt": opt}
    # Where a plan fetch spends its time (private names: skipped if they ever change).
    fetch = {"total": [], "flush": [], "request": [], "agree": []}
    recording = {"on": False}

    def timed(obj, name, key):
        fn = getattr(obj, name, None)
        if fn is None:
            return

        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if recording["on"]:
                    fetch[key].append(time.perf_counter() - t)

        setattr(obj, name, wrapper)

    aff = runs["affine"]["sampler"]
    timed(aff.plan_source, "plan_for", "total")
    timed(aff.plan_source, "agree", "agree")
    timed(aff.session, "flush", "flush")
    timed(aff.plan_source, "fetch", "request")
    times = {v: [] for v in VARIANTS}
    plans = {v: [] for v in VARIANTS}
    for r in range(args.warmup + args.repeats):
        recording["on"] = r >= args.warmup
        for v in VARIANTS:
            runs[v]["sampler"].set_epoch(r)
        dist.barrier()
        its = {v: iter(runs[v]["loader"]) for v in VARIANTS}
        epoch = {v: [] for v in VARIANTS}
        for i in range(args.steps):
            # Step-level interleaving in a rotating order: a burst of load from elsewhere on
            # the machine hits the variants alike, and each is first equally often.
            k = (r * args.steps + i) % len(VARIANTS)
            for v in VARIANTS[k:] + VARIANTS[:k]:
                run = runs[v]
                t0 = time.perf_counter()
                x, y = next(its[v])
                loss = F.cross_entropy(run["model"](x), y)
                loss.backward()
                run["opt"].step()
                run["opt"].zero_grad(set_to_none=True)
                epoch[v].append(time.perf_counter() - t0)
        for v in VARIANTS:
            if next(its[v], None) is not None:
                raise RuntimeError(f"{v}: the epoch has more than --steps {args.steps} steps")
            times[v].append(epoch[v])
            plans[v].append(list(getattr(runs[v]["sampler"], "batch_sizes",
                                         [args.batch] * world)))
    recording["on"] = False
    dist.barrier()
    samplers = [runs[v]["sampler"] for v in VARIANTS]
    planner = runs["affine"]["sampler"].planner
    runs.clear()  # drop the DDP models before closing and tearing down
    dist.barrier()
    for s in samplers:
        if hasattr(s, "close"):
            s.close()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        decisions = []
        if Path(journal).exists():
            for line in Path(journal).read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "plan":
                    decisions.append({k: event.get(k) for k in (
                        "epoch", "window", "batch_sizes", "busy_ms", "reason")})
        Path(out_path).write_text(json.dumps({
            "times": times, "plans": plans, "fetch": fetch, "decisions": decisions,
            "planner": {} if planner is None else dict(planner.stats)}), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Microbenchmarks (this process, no process group)

def _interleaved(fns: dict, rounds: int) -> dict:
    """Call each fn once per round, in a rotated order; seconds per call, per fn."""
    out = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            fns[k]()
            out[k].append(time.perf_counter() - t0)
    return out


def sampler_micro(n: int, batch: int, world: int = 2, rounds: int = 300) -> dict:
    from torch.utils.data import BatchSampler, DistributedSampler

    from shardbalance import WeightedDistributedSampler

    class Sized:
        def __len__(self):
            return n

    data = Sized()
    ds = DistributedSampler(data, num_replicas=world, rank=0, shuffle=True, seed=0)
    ws = WeightedDistributedSampler(data, global_batch_size=batch * world, num_replicas=world,
                                    rank=0, policy="equal", seed=0)
    epoch = {"d": 0, "w": 0}

    def run_ds():
        ds.set_epoch(epoch["d"])
        epoch["d"] += 1
        for _ in BatchSampler(ds, batch, drop_last=False):
            pass

    def run_ws():
        ws.set_epoch(epoch["w"])
        epoch["w"] += 1
        for _ in ws:
            pass

    steps = len(ws)
    res = _interleaved({"DistributedSampler+BatchSampler": run_ds,
                        "WeightedDistributedSampler(equal)": run_ws}, rounds)
    ws.close()
    return {k: {"median_us_per_step": 1e6 * statistics.median(v) / steps,
                "p10_us": 1e6 * _quantile(v, 0.1) / steps,
                "p90_us": 1e6 * _quantile(v, 0.9) / steps}
            for k, v in res.items()} | {"steps": steps, "n": n}


def _bucket_sizes(width: int, depth: int) -> list[int]:
    """Element counts of DDP's buckets (reverse parameter order, 1 MiB first cap, then 25 MiB)."""
    sizes = [p.numel() for p in _make_model(width, depth).parameters()][::-1]
    caps, buckets, cur = [1 << 20, 25 << 20], [], 0
    for s in sizes:
        cur += s
        if cur * 4 >= caps[min(len(buckets), 1)]:
            buckets.append(cur)
            cur = 0
    if cur:
        buckets.append(cur)
    return buckets


def hook_micro(width: int, depth: int, batch: int, world: int = 2, rounds: int = 400) -> dict:
    import torch

    from shardbalance._ledger import LedgerEntry, StepLedger
    from shardbalance._weighting import OutputWeighting, WeightedCommHook
    from shardbalance.plan import Plan

    torch.set_num_threads(1)  # as in the ranks (OMP_NUM_THREADS=1)
    sizes = _bucket_sizes(width, depth)
    buffers = [torch.randn(s) for s in sizes]

    class Bucket:  # what the hook uses of dist.GradBucket
        def __init__(self, i):
            self.i = i

        def index(self):
            return self.i

        def is_last(self):
            return self.i == len(buffers) - 1

        def buffer(self):
            return buffers[self.i]

    buckets = [Bucket(i) for i in range(len(buffers))]

    def inner(state, bucket):  # allreduce_hook without the communication
        fut = torch.futures.Future()
        # Divides by 1.0, not k: the same pass, but the values cannot decay into denormals
        # (which are ~40x slower) over hundreds of rounds.
        fut.set_result(bucket.buffer().div_(1.0))
        return fut

    plan = Plan("bench", 0, 0, 0, (batch,) * world, batch * world, "equal")
    ledger, busy = StepLedger(), []
    ledger.consumed = True  # as attach() sets it: the weighting takes one entry per batch
    hook = WeightedCommHook(ledger, batch * world, world, lambda e, s: busy.append((e, s)),
                            torch.device("cpu"), inner, None, check_batch_size=False)
    step = {"n": 0}
    no_module = torch.nn.Identity()

    def with_hook():
        # The forward hook's part of a step (take the batch's entry), then every bucket.
        ledger.append(LedgerEntry(1, 0, step["n"], batch, plan, 0))
        hook.on_forward(no_module, (), {}, None)
        step["n"] += 1
        for b in buckets:
            hook.on_bucket(b).wait()
            if len(busy) > 1024:
                busy.clear()

    def inner_only():
        for b in buckets:
            inner(None, b).wait()

    def mul_only():
        for buf in buffers:
            buf.mul_(1.0)

    # weighting="output": its whole per-step cost is a forward hook, a gradient hook on the
    # output and two autograd callbacks, timed around a tiny model's step (no DDP needed).
    tiny = torch.nn.Linear(8, 8)
    weighted = torch.nn.Linear(8, 8)
    out_ledger = StepLedger()
    out_ledger.consumed = True
    weighting = OutputWeighting(out_ledger, batch * world, world,
                                lambda e, s: busy.append((e, s)), torch.device("cpu"),
                                list(weighted.parameters()), check_batch_size=False)
    weighted.register_forward_hook(weighting.on_forward, with_kwargs=True)
    x = torch.randn(4, 8)

    def tiny_step():
        tiny(x).sum().backward()

    def weighted_step():
        out_ledger.append(LedgerEntry(1, 0, step["n"], batch, plan, 0))
        step["n"] += 1
        weighted(x).sum().backward()
        if len(busy) > 1024:
            busy.clear()

    res = _interleaved({"allreduce_hook stand-in (div_ pass + future)": inner_only,
                        "shardbalance hook + that stand-in": with_hook,
                        "one mul_ pass alone": mul_only,
                        "tiny model step": tiny_step,
                        "tiny model step with weighting='output'": weighted_step}, rounds)
    med = {k: 1e6 * statistics.median(v) for k, v in res.items()}
    return {"bucket_elements": sizes, "median_us": med,
            "hook_overhead_us": med["shardbalance hook + that stand-in"]
            - med["allreduce_hook stand-in (div_ pass + future)"],
            "output_overhead_us": med["tiny model step with weighting='output'"]
            - med["tiny model step"]}


# ---------------------------------------------------------------------------------------------
# Figures

def _quantile(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def summarize(data: dict, args) -> dict:
    warm = args.warmup
    times = {v: data["times"][v][warm:] for v in VARIANTS}
    base = times["distributed"]
    out = {}
    for v in VARIANTS:
        flat = [t for e in times[v] for t in e]
        rep = [statistics.median(e) for e in times[v]]
        # Per repeat (epoch): the median over its rounds of this step over (a)'s step of the
        # same round (adjacent in time, so they saw the same load).
        paired = [100 * (statistics.median(t / u for t, u in zip(e, eb)) - 1)
                  for e, eb in zip(times[v], base)]
        rounds = [100 * (t / u - 1) for e, eb in zip(times[v], base) for t, u in zip(e, eb)]
        vs_hooked = [100 * (t / u - 1) for e, eh in zip(times[v], times["hooked"])
                     for t, u in zip(e, eh)]
        out[v] = {"median_ms": 1e3 * statistics.median(flat), "p90_ms": 1e3 * _quantile(flat, 0.9),
                  "mean_ms": 1e3 * statistics.fmean(flat),
                  "repeat_medians_ms": [round(1e3 * m, 2) for m in rep],
                  "paired_overhead_pct": paired, "steps": len(flat),
                  "round_overhead_median_pct": statistics.median(rounds),
                  "round_overhead_vs_hooked_pct": statistics.median(vs_hooked),
                  "plans": sorted({tuple(p) for p in data["plans"][v][warm:]})}
    for v in VARIANTS:
        base = out["distributed"]
        out[v]["overhead_pct"] = 100 * (out[v]["median_ms"] / base["median_ms"] - 1)
        out[v]["mean_overhead_pct"] = 100 * (out[v]["mean_ms"] / base["mean_ms"] - 1)
    K = args.rebalance_every or args.steps
    aff = times["affine"]
    out["affine"]["fetch_step_ms"] = 1e3 * statistics.median(
        [e[i] for e in aff for i in range(0, len(e), K)])
    out["affine"]["other_step_ms"] = 1e3 * statistics.median(
        [e[i] for e in aff for i in range(len(e)) if i % K])
    out["fetch_ms"] = {k: 1e3 * statistics.median(v) for k, v in data["fetch"].items() if v}
    out["fetches"] = len(data["fetch"]["total"])
    out["planner"] = data.get("planner") or {}
    return out


def _spread(values) -> str:
    return (f"{statistics.median(values):+.2f} [{_quantile(values, 0.25):+.2f}, "
            f"{_quantile(values, 0.75):+.2f}] ({min(values):+.1f}..{max(values):+.1f})")


def report(args, s: dict, micro: dict | None, wall_s: float, load: tuple) -> None:
    params = sum(p.numel() for p in _make_model(args.width, args.depth).parameters())
    print(f"2 gloo ranks on CPU, OMP_NUM_THREADS=1, MLP {args.depth}x{args.width} + head "
          f"({params / 1e6:.2f} M params, {params * 4 / 2**20:.1f} MiB of gradients), "
          f"{args.batch} samples/rank/step, {args.steps} steps/epoch, {args.repeats} measured "
          f"epochs per variant interleaved (+{args.warmup} warm-up); affine: rebalance_every="
          f"{args.rebalance_every or 'epoch'}, band {args.affine_band:g}; load average "
          f"{load[0]:.1f} before, {load[1]:.1f} after")
    print()
    print("variant | median step ms | overhead vs (a) % | p90 ms | mean ms (vs (a) %) | "
          "paired overhead % (all rounds) | per repeat: median [IQR] (min..max) | plans")
    for v in VARIANTS:
        r, tag = s[v], TAGS[v]
        print(f"{tag} {v} | {r['median_ms']:.2f} | {r['overhead_pct']:+.2f} | "
              f"{r['p90_ms']:.2f} | {r['mean_ms']:.2f} ({r['mean_overhead_pct']:+.2f}) | "
              f"{r['round_overhead_median_pct']:+.2f} | "
              f"{_spread(r['paired_overhead_pct']) if v != 'distributed' else '-'} | "
              f"{', '.join(str(list(p)) for p in r['plans'])}")
    print("per-repeat medians ms, " + "; ".join(
        f"{t} {min(s[v]['repeat_medians_ms']):.1f}..{max(s[v]['repeat_medians_ms']):.1f}"
        for v, t in TAGS.items()))
    print("paired over (a') (any Python comm hook -> shardbalance's part): " + "; ".join(
        f"{TAGS[v]} {s[v]['round_overhead_vs_hooked_pct']:+.2f} %" for v in ("equal", "output", "affine")))
    f = s["fetch_ms"]
    if s["planner"].get("rounds"):
        # The background planner (the default with attach()): no step fetches a plan; the
        # rounds run in a thread of their own, the leader's request among them.
        p = s["planner"]
        print(f"(c) plans agreed in the background: {p.get('rounds', 0)} rounds, "
              f"{p.get('requests', 0)} coordinator requests (median "
              f"{f.get('request', 0):.2f} ms each, in the planner thread), "
              f"{p.get('waits', 0)} generator waits at a switch step; each window's first step "
              f"median {s['affine']['fetch_step_ms']:.2f} ms vs "
              f"{s['affine']['other_step_ms']:.2f} ms for other steps")
    elif f:
        print(f"(c) plan fetch (each window's first step): step median "
              f"{s['affine']['fetch_step_ms']:.2f} ms vs {s['affine']['other_step_ms']:.2f} ms for "
              f"other steps; {s['fetches']} fetches, median {f.get('total', 0):.2f} ms each = "
              f"sender flush {f.get('flush', 0):.2f} + coordinator request "
              f"{f.get('request', 0):.2f} + digest all-reduce {f.get('agree', 0):.2f} + barrier "
              f"and checks (rest)")
    if micro:
        sm, hm = micro["sampler"], micro["hook"]
        print()
        print(f"sampler alone (rank 0 of 2, N={sm['n']}, {args.batch}/rank, {sm['steps']} steps, "
              "one epoch per call, interleaved): sampler | median µs/step | p10 | p90")
        for k in ("DistributedSampler+BatchSampler", "WeightedDistributedSampler(equal)"):
            print(f"  {k} | {sm[k]['median_us_per_step']:.1f} | {sm[k]['p10_us']:.1f} | "
                  f"{sm[k]['p90_us']:.1f}")
        step_us = 1e3 * s["distributed"]["median_ms"]
        print(f"hook alone (buckets of {hm['bucket_elements']} fp32 elements, no communication): "
              "call | median µs/step | % of (a)'s median step")
        for k, v in hm["median_us"].items():
            print(f"  {k} | {v:.1f} | {100 * v / step_us:.2f}")
        print(f"  shardbalance's hook over torch's allreduce_hook: {hm['hook_overhead_us']:.1f} "
              f"µs/step ({100 * hm['hook_overhead_us'] / step_us:.2f} %); DDP's built-in path "
              "does neither pass (it divides while copying grads into the bucket)")
        print(f"  weighting='output' (no comm hook) over the same tiny step: "
              f"{hm['output_overhead_us']:.1f} µs/step "
              f"({100 * hm['output_overhead_us'] / step_us:.2f} % of (a)'s step)")
    print(f"total wall time {wall_s:.0f} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.warmup < 0 or args.repeats < 1 or args.steps < 2:
        raise SystemExit("need --repeats >= 1, --warmup >= 0, --steps >= 2")
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shardbalance-overhead-") as tmp:
        out = Path(tmp) / "times.json"
        worker = ["--_worker", str(out), str(Path(tmp) / "coordinator.jsonl"),
                  *(argv if argv is not None else sys.argv[1:])]
        print("[overhead] torchrun, 2 ranks ...", file=sys.stderr, flush=True)
        _launch.torchrun_or_exit(2, Path(__file__).resolve(), worker, args.timeout)
        data = json.loads(out.read_text())
    load_after = os.getloadavg()[0]
    summary = summarize(data, args)
    micro = None
    if not args.skip_micro:
        print("[overhead] microbenchmarks ...", file=sys.stderr, flush=True)
        micro = {"sampler": sampler_micro(args.steps * args.batch * 2, args.batch),
                 "hook": hook_micro(args.width, args.depth, args.batch)}
    wall_s = time.perf_counter() - started
    report(args, summary, micro, wall_s, (load_before, load_after))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"config": vars(args), "summary": summary, "micro": micro, "raw": data},
            indent=1, default=list) + "\n", encoding="utf-8")

if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--_worker":
        _worker(parse_args(sys.argv[4:]), sys.argv[2], sys.argv[3])
    else:
        main()
