"""Step time on emulated clusters whose speed curves are not lines: each policy against an oracle.

    python benchmarks/curves.py                         # 4 clusters x 3 repeats, ~8 min on 2 cores
    python benchmarks/curves.py --clusters flat --repeats 1 --policies curve
    python benchmarks/curves.py --scale                 # + the simulator at 4096 ranks
    python benchmarks/curves.py --modes epoch --epochs 3 --repeats 2   # the first-epoch figures
    python benchmarks/curves.py --clusters capped --modes epoch --seeded \
        --static-plans '9,31,44,44;8,33,43,44'          # what machinery and near-ties cost

Each launch is one ``torchrun`` (gloo, CPU, 127.0.0.1, a free port, a time bound that kills the
whole process group) of this file's worker. In that one run, one after the other on the same
ranks, data and DataLoader (``--num-workers`` > 0, persistent workers), each contender trains
``--epochs`` epochs with a fresh model and a fresh :class:`~shardbalance.emulate.EmulatedSpeed`
(so every contender pays the one-off cost of each new batch size it tries):

* ``oracle``: the same WeightedDistributedSampler with the optimal plan fixed (policy
  ``static``, ``initial_weights`` = the plan). The plan is exact: every integer plan within the
  bounds, a multiple of the quantum, is scored with the emulator's own curve
  (:func:`shardbalance.emulate.curve_seconds`) and the one with the least step is kept.
* each adaptive policy of ``--policies`` with a plan every ``--window`` steps
  (``rebalance_every``), and with one plan per epoch (``/epoch``, for the first-epoch figures).
* with ``--seeded``, each of those started on the oracle plan (``/seeded-window``,
  ``/seeded-epoch``: ``initial_weights``, so no early re-plans): what the coordinator's
  machinery and the policy's own plan changes cost once it starts at the optimum.
* with ``--static-plans``, each plan given fixed (``static[...]``): how far near-ties of the
  oracle plan are from it on this machine.

Epochs are ``--steps-per-epoch`` long: 192 by default with ``--modes epoch``, 24 otherwise.
The window figures count windows, so short epochs serve them; the epoch figures are ratios of
whole epochs, and a real epoch is hundreds of steps or more. At 24 steps, the steps on the
equal split before the first early re-plan can land (the measured warm-up, 4 steps, then
the loader's prefetch, 2 here) and the one-off costs of the new sizes cap epoch 0 near 0.8
whatever the policy decides; a run of hundreds of steps pays the same few steps once.

Figures, per contender and repeat, from rank 0's wall time of every optimizer step:

* ``eff@3w``: in window mode, the oracle's mean step over the policy's mean step, over the
  windows from 3 after the first decision that had measurements (read from the coordinator's
  journal) to the end. Means, not medians: the one-off costs of exploring count.
* ``plan@3w``: the same ratio for the emulator's modelled step times of the plans each run
  trained (its sleeps, one-off costs included, without the real overheads): what the policy
  chose, free of the machine's noise, which on a shared 2-core machine is ±10-20 % per window.
* ``epoch0`` / ``epoch1``: in epoch mode, the oracle's epoch time over the policy's.

The repeats rotate the order of the contenders inside a launch, so a slow phase of a shared
machine does not always hit the same one; the table gives the median and the range over repeats.

Clusters (``--clusters``, names from :data:`CLUSTERS`): rank i of speed s_i sleeps
``overhead + tiles(max(b, flat_i))·per_sample/s_i`` (see :mod:`shardbalance.emulate`).

* ``flat``: speeds 1:2:4, each rank flat below 12·s_i samples (a bigger GPU needs more to
  fill), so at the equal split the fastest rank is flat below the 55 samples the optimum gives
  it; 30 ms extra on each of the first 2 steps at a new batch size.
* ``flat-deep``: the same with 16·s_i: the optimum's 48 samples for the fastest rank are all
  in its flat region, so every size it is measured at up to 64 looks the same (the issue's
  "settles 11 % slower than the best plan" case).
* ``stepped``: speeds 1:1:2:4, time steps at multiples of 16 samples, plans in multiples of 8;
  the same one-off cost.
* ``capped``: speeds 1:2:4:4, flat below 12·s_i and steps of 8, the two fast ranks capped at 44
  samples (``max_batch_size``, and the emulator raises an out-of-memory error above it: a
  policy that explored past a cap would crash the run); 40 ms on each of 3 steps at a new size.

Measured on the shared 2-core VM (load average 8-12 from other jobs during the run), torch 2.13
CPU, gloo; ``python benchmarks/curves.py --repeats 3 --verbose --scale`` (26 launches of
75-130 s, 23 min), medians [ranges] over the 3 repeats:

    cluster    contender       eff@3w               plan@3w              final plan
    flat       affine/window   0.974 [0.895-1.102]  0.983 [0.976-1.000]  [13, 26, 57]
    flat       curve/window    0.950 [0.882-1.071]  0.955 [0.950-0.976]  [14, 28, 54]
    flat-deep  affine/window   0.840 [0.811-0.964]  0.870 [0.865-0.956]  [18, 35, 43]
    flat-deep  curve/window    0.910 [0.894-0.925]  0.942 [0.942-0.985]  [17, 32, 47]
    stepped    affine/window   1.033 [0.967-1.052]  1.000 [1.000-1.000]  [16, 16, 32, 64]
    stepped    curve/window    0.938 [0.854-1.002]  1.000 [1.000-1.000]  [16, 16, 32, 64]
    capped     affine/window   0.974 [0.941-0.985]  1.000 [0.970-1.000]  [12, 31, 41, 44]
    capped     curve/window    0.918 [0.826-1.006]  1.000 [0.970-1.000]  [13, 27, 44, 44]
    4096 ranks (simulated)     affine curve: affine 0.9955, curve 0.9933 of the oracle
                               flat:48:      affine 0.9504, curve 0.9897

Read: the measured ratios are dominated by the machine: on ``stepped`` both policies trained
the same plans from window 1 on (plan@3w 1.000 for both) and still measured 1.033 vs 0.938.
The plans tell the story: on the flat-below-the-optimum curve (``flat-deep``, the issue's case)
``curve`` trains plans 0.94 (one repeat 0.985) of the oracle where ``affine`` settles at 0.87;
on the milder ``flat`` cluster ``affine`` happens to be right (its proportional fallback lands
near the optimum) and ``curve`` pays for exploring (one-off costs of the sizes it tries, 0.955);
both are exact on ``stepped`` and ``capped`` (no out-of-memory error: exploration stayed within
the caps). The target of 0.97 within 3 windows is not met by either policy on ``flat-deep``.

After the issue-11 follow-up (the affine fit leaves a new shape's first steps out, ``curve``
explores only tops that are flat rather than noisy and holds a try until it is measured), on
the same VM at load average 13-16, medians [ranges]:

    python benchmarks/curves.py --clusters flat-deep --modes window --repeats 3 --verbose
    cluster    contender       eff@3w               plan@3w              final plan
    flat-deep  affine/window   0.897 [0.852-1.071]  0.867 [0.851-0.896]  [17, 34, 45]
    flat-deep  curve/window    0.980 [0.882-1.121]  0.985 [0.967-1.000]  [16, 32, 48]

    python benchmarks/curves.py --clusters capped --modes epoch --repeats 2 --verbose
    cluster    contender       epoch0               epoch1               final plan
    capped     affine/epoch    0.772 [0.679-0.864]  0.823 [0.811-0.835]  [11, 29, 44, 44]
    capped     curve/epoch     0.834 [0.672-0.995]  0.947 [0.920-0.974]  [10, 30, 44, 44]

The flat-deep target (0.97 within 3 windows) is met by ``curve`` (0.980; plans 0.985 of the
oracle's). On ``capped`` per-epoch ``affine`` no longer settles at [2, 38, 44, 44] (0.83): that
plan came from the emulator's 40 ms one-off cost on each of the first 3 steps at a new size,
of which the rank discards one; the other two, read as a fixed cost per step, gave rank 0 a
84 ms intercept. Not a water-filling bug: the caps were filled exactly. Left: ``affine``'s
secant between a tile-rounded size (18 costs as 24) and 32 still gives rank 0 a sizeable
intercept early on ([7, 34, 43, 44] as the epoch-0 re-plan in one repeat). Epoch 0 stays below
0.85: with S steps per epoch and the equal split trained for n steps at r times the oracle's
step, epoch 0 is at most S / (S + n·(r − 1)); here S = 24, n ≈ 7 (3 measured warm-up steps,
the discarded first one and the loader's prefetch) and r ≈ 2, so about 0.8 whatever the
policy decides after (the simulator with ``--early-windows 7,7,10`` agrees: 0.67-0.78; shorter
warm-ups, ``--early-windows 5,5,14`` or ``4,4,16``, are no better, since the re-plan then has
no measured step at the new sizes). Longer epochs pass it: the same bound is 0.93 at S = 96.

After payback_steps, the epoch-0 warm-up counted in measured steps and the filled tries, on
the same VM at load average 2-5 (each figure's launch; the baseline from the branch point, run
in the same session), medians [ranges]:

    python benchmarks/curves.py --clusters capped --modes epoch --policies curve \
        --steps-per-epoch 192 --epochs 2 --repeats 2 --timeout 600 --seeded --verbose
    cluster    contender           epoch0               epoch1               final plan
    capped     curve/epoch         0.948 [0.947-0.950]  0.990 [0.990-0.991]  [13, 27, 44, 44]
    capped     curve/seeded-epoch  1.009 [1.004-1.015]  1.000 [0.993-1.007]  [8, 32, 44, 44]

    python benchmarks/curves.py --clusters capped --modes epoch --policies curve \
        --steps-per-epoch 24 --repeats 3 --verbose
    capped     curve/epoch         0.751 [0.723-0.798]  0.986 [0.971-1.007]  [13, 27, 44, 44]

    python benchmarks/curves.py --clusters flat-deep --modes window --policies curve --repeats 3
    cluster    contender       eff@3w               plan@3w              last epoch
    flat-deep  curve (before)  0.945 [0.939-0.955]  0.945 [0.940-0.945]  0.986 [0.980-1.003]
    flat-deep  curve (after)   0.933 [0.931-0.938]  0.940 [0.916-0.940]  0.972 [0.965-0.986]
    flat       curve (before)  0.911 [0.873-0.914]  0.883 [0.867-0.883]  0.961 [0.917-0.981]
    flat       curve (after)   0.897 [0.891-0.907]  0.888 [0.883-0.888]  0.941 [0.941-0.950]

Both epoch targets are met at 192-step epochs (the seeded run: the coordinator's machinery on
the oracle plan costs nothing measurable here). At 24 steps epoch 0 stays near its bound: the
first re-plan is triggered once step 3, the first clean one at the equal split, is measured
(at the forward of step 4) and switches at step 7, the first step the loader (prefetch 2) has
not yet asked for; an earlier switch would stall the loader. The flat-deep window target is
not met, before or after, and not for the policy: its settled plans are 0.97-1.0 of the
oracle, but each plan lands a window after the one it was decided for (the journal: the plan
decided for epoch 0 step 8 is trained from step 16, the try decided for epoch 1 step 8 from
step 16), so window 4, the first one counted, still trains the first move ([20, 38, 38],
0.80 of the oracle) and the try of the fast rank's flat top arrives in window 5. Meeting it
needs plans that land on their window (the planner's lead), not a different policy. The
filled try (``_fill_tries``) fixes the policy's own near-tie ([16, 33, 47] held within the
band, 3 % off) in the in-process closed loop; on this benchmark the unfilled try already
landed on near-optimal plans in most repeats, so the two are within noise.

``--scale`` adds the simulator's judgement at 4096 ranks (lognormal speeds σ=0.5, noise 0.1,
flat below 48·s_i and affine, 20 ms one-off cost) for every policy of ``--policies``.
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

from _launch import REPO, LaunchError, torchrun

import numpy as np

#: name -> cluster. Per rank: speeds, flat_below (samples), caps (None: no cap).
CLUSTERS = {
    "flat": dict(speeds=[1, 2, 4], flat_per_speed=12, step_multiple=1, quantum=1, caps=None,
                 global_batch_size=96, new_shape_ms=30.0, new_shape_steps=2),
    "flat-deep": dict(speeds=[1, 2, 4], flat_per_speed=16, step_multiple=1, quantum=1,
                      caps=None, global_batch_size=96, new_shape_ms=30.0, new_shape_steps=2),
    "stepped": dict(speeds=[1, 1, 2, 4], flat_per_speed=0, step_multiple=16, quantum=8,
                    caps=None, global_batch_size=128, new_shape_ms=30.0, new_shape_steps=2),
    "capped": dict(speeds=[1, 2, 4, 4], flat_per_speed=12, step_multiple=8, quantum=1,
                   caps=[128, 128, 44, 44], global_batch_size=128, new_shape_ms=40.0,
                   new_shape_steps=3),
}
#: Targets of issue 11 on curves: 0.97 of the oracle within 3 windows of the first measurement;
#: epoch 0 at 0.85 and epoch 1 at 0.97 of the oracle's epoch without a probe.
TARGET_WINDOWS, TARGET_EPOCH0, TARGET_EPOCH1 = 0.97, 0.85, 0.97
#: Default steps per epoch: window figures count windows, so short epochs do; epoch figures
#: are a ratio of whole epochs, and a real epoch is hundreds of steps or more: at 24 steps the
#: equal-split steps before the first re-plan can land (about 7: the measured warm-up and the
#: loader's prefetch) cap epoch 0 near 0.8 whatever the policy decides.
WINDOW_STEPS, EPOCH_STEPS = 24, 192


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clusters", default=",".join(CLUSTERS),
                   help=f"comma-separated cluster names of {sorted(CLUSTERS)}")
    p.add_argument("--policies", default="affine,curve", help="adaptive policies to compare")
    p.add_argument("--modes", default="window",
                   help="window: a plan every --window steps; epoch: one plan per epoch")
    p.add_argument("--window", type=int, default=8, help="steps per plan in window mode")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help=f"steps per epoch. Default: {EPOCH_STEPS} with --modes epoch (a first "
                        f"epoch of realistic length), else {WINDOW_STEPS}")
    p.add_argument("--seeded", action="store_true",
                   help="also run each adaptive contender started on the oracle plan "
                        "(initial_weights): what its machinery and plan changes cost")
    p.add_argument("--static-plans", default="",
                   help="also run these plans fixed, e.g. '12,30,44,42;11,31,44,42' (policy "
                        "static): near-ties of the oracle plan")
    p.add_argument("--per-sample-ms", type=float, default=6.0,
                   help="emulated compute per sample at speed 1")
    p.add_argument("--overhead-ms", type=float, default=2.0, help="emulated fixed cost per step")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=420.0, help="seconds per torchrun launch")
    p.add_argument("--scale", action="store_true",
                   help="also judge the policies with the simulator at 4096 ranks")
    p.add_argument("--verbose", action="store_true",
                   help="also print each contender's plan and mean step per window")
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        args.cluster_list = [c.strip() for c in args.clusters.split(",") if c.strip()]
        bad = [c for c in args.cluster_list if c not in CLUSTERS]
        if bad:
            p.error(f"unknown cluster(s) {bad}; choose from {sorted(CLUSTERS)}")
        args.policy_list = [x.strip() for x in args.policies.split(",") if x.strip()]
        args.mode_list = [x.strip() for x in args.modes.split(",") if x.strip()]
        bad = [m for m in args.mode_list if m not in ("window", "epoch")]
        if bad or not args.mode_list:
            p.error(f"invalid --modes {args.modes!r}: use window, epoch or both")
        if args.num_workers < 1:
            p.error("--num-workers must be >= 1 (the benchmark runs with DataLoader workers)")
        if args.repeats < 1 or args.window < 1 or args.epochs < 2:
            p.error("--repeats and --window must be >= 1, --epochs >= 2")
        if args.steps_per_epoch is None:
            args.steps_per_epoch = EPOCH_STEPS if "epoch" in args.mode_list else WINDOW_STEPS
        if args.steps_per_epoch < 1:
            p.error(f"invalid --steps-per-epoch {args.steps_per_epoch}: must be >= 1")
        args.static_plan_list = []
        for text in (x.strip() for x in args.static_plans.split(";") if x.strip()):
            try:
                plan = [int(b) for b in text.split(",")]
            except ValueError:
                p.error(f"invalid --static-plans entry {text!r}: expected comma-separated "
                        "integers")
            for name in args.cluster_list:
                c = CLUSTERS[name]
                caps = c["caps"] or [c["global_batch_size"]] * len(c["speeds"])
                if len(plan) != len(c["speeds"]) or sum(plan) != c["global_batch_size"] or \
                        any(not 1 <= b <= cap or b % c["quantum"] for b, cap in zip(plan, caps)):
                    p.error(f"invalid --static-plans entry {text!r} for cluster {name}: "
                            f"expected {len(c['speeds'])} multiples of {c['quantum']} within "
                            f"the caps {caps}, summing to {c['global_batch_size']}")
            args.static_plan_list.append(plan)
    return args


# ---------------------------------------------------------------------------------------------
# The emulated curves and the oracle plan


def rank_curves(cluster: dict, per_sample_ms: float, overhead_ms: float) -> list[dict]:
    """The EmulatedSpeed keyword arguments of each rank."""
    out = []
    for i, s in enumerate(cluster["speeds"]):
        cap = cluster["caps"][i] if cluster["caps"] else None
        out.append(dict(speed=float(s), per_sample_s=per_sample_ms / 1e3,
                        overhead_s=overhead_ms / 1e3,
                        flat_below=int(round(cluster["flat_per_speed"] * s)),
                        step_multiple=cluster["step_multiple"],
                        new_shape_s=cluster["new_shape_ms"] / 1e3,
                        new_shape_steps=cluster["new_shape_steps"], max_batch_size=cap))
    return out


def oracle_plan(cluster: dict, curves: list[dict]) -> tuple[tuple[int, ...], float]:
    """The integer plan with the least step under the emulator's curves, by exhaustive search."""
    from shardbalance.emulate import curve_seconds

    B, q, k = cluster["global_batch_size"], cluster["quantum"], len(curves)
    caps = cluster["caps"] or [B] * k
    sizes = np.arange(q, B + 1, q)
    table = np.array([[curve_seconds(int(b), c["speed"], c["per_sample_s"], c["overhead_s"],
                                     flat_below=c["flat_below"],
                                     step_multiple=c["step_multiple"]) if b <= cap else np.inf
                       for b in sizes] for c, cap in zip(curves, caps)])
    grids = np.meshgrid(*[np.arange(len(sizes))] * (k - 1), indexing="ij")
    idx = [g.ravel() for g in grids]
    rest = B - sum(sizes[i] for i in idx)
    ok = (rest >= q) & (rest <= B)
    idx = [i[ok] for i in idx]
    last = rest[ok] // q - 1
    step = np.max([table[r][i] for r, i in enumerate(idx)] + [table[k - 1][last]], axis=0)
    best = int(np.argmin(step))
    plan = tuple(int(sizes[i[best]]) for i in idx) + (int(sizes[last[best]]),)
    return plan, float(step[best])


# ---------------------------------------------------------------------------------------------
# The worker: one torchrun launch, every contender in turn


def _worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from shardbalance import WeightedDistributedSampler
    from shardbalance.emulate import EmulatedSpeed

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    B = spec["global_batch_size"]
    n = B * spec["steps_per_epoch"]
    gen = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(n, 32, generator=gen), torch.randint(0, 10, (n,),
                                                                             generator=gen))
    results = {}
    for contender in spec["contenders"]:
        log = os.path.join(spec["workdir"], f"{contender['name'].replace('/', '-')}.jsonl")
        sampler = WeightedDistributedSampler(
            dataset, B, policy=contender["policy"], initial_weights=contender.get("weights"),
            rebalance_every=contender.get("rebalance_every"), max_batch_size=spec["caps"],
            batch_size_multiple=spec["quantum"], coordinator_log=log, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=spec["num_workers"],
                            persistent_workers=True)
        emulated = EmulatedSpeed(**spec["curves"][rank])
        model = DDP(torch.nn.Sequential(emulated, torch.nn.Linear(32, 10)))
        sampler.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        step_s, plans, epoch_s = [], [], []
        for epoch in range(spec["epochs"]):
            sampler.set_epoch(epoch)
            dist.barrier()
            start = last = time.perf_counter()
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                now = time.perf_counter()
                step_s.append(now - last)
                last = now
                plans.append(list(sampler.batch_sizes))
            dist.barrier()
            epoch_s.append(time.perf_counter() - start)
        del model, loader
        sampler.close()
        dist.barrier()
        results[contender["name"]] = {"step_s": step_s, "plans": plans, "epoch_s": epoch_s}
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The driver


def _first_measured_window(journal: Path, steps_per_epoch: int, window: int) -> int | None:
    """Global index of the first window whose plan was decided from measurements."""
    if not journal.exists():
        return None
    per_epoch = -(-steps_per_epoch // window)
    for line in journal.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "plan" and not str(rec.get("reason", "")).startswith("waiting"):
            return rec["epoch"] * per_epoch + rec["window"] // window
    return None


def modelled_steps(plans: list[list[int]], curves: list[dict]) -> list[float]:
    """The emulator's step time of each step's plan without the real overheads, the one-off
    cost of each new batch size included (what EmulatedSpeed sleeps, slowest rank)."""
    from shardbalance.emulate import curve_seconds

    seen = [dict() for _ in curves]
    out = []
    for plan in plans:
        busy = []
        for c, counts, b in zip(curves, seen, plan):
            t = curve_seconds(b, c["speed"], c["per_sample_s"], c["overhead_s"],
                              flat_below=c["flat_below"], step_multiple=c["step_multiple"])
            if counts.get(b, 0) < c["new_shape_steps"]:
                t += c["new_shape_s"]
            counts[b] = counts.get(b, 0) + 1
            busy.append(t)
        out.append(max(busy))
    return out


def _window_means(step_s: list[float], steps_per_epoch: int, window: int) -> list[float]:
    out = []
    for e in range(len(step_s) // steps_per_epoch):
        epoch = step_s[e * steps_per_epoch:(e + 1) * steps_per_epoch]
        out += [float(np.mean(epoch[i:i + window])) for i in range(0, len(epoch), window)]
    return out


def run_cluster(name: str, args) -> dict:
    cluster = CLUSTERS[name]
    curves = rank_curves(cluster, args.per_sample_ms, args.overhead_ms)
    plan, step = oracle_plan(cluster, curves)
    contenders = [{"name": "oracle", "policy": "static", "weights": list(plan)}]
    for policy in args.policy_list:
        if "window" in args.mode_list:
            contenders.append({"name": f"{policy}/window", "policy": policy,
                               "rebalance_every": args.window})
        if "epoch" in args.mode_list:
            contenders.append({"name": f"{policy}/epoch", "policy": policy})
        if args.seeded:
            for c in [c for c in contenders if c["policy"] == policy]:
                contenders.append({**c, "name": f"{policy}/seeded-{c['name'].split('/')[1]}",
                                   "weights": list(plan)})
    for fixed in args.static_plan_list:
        contenders.append({"name": f"static{fixed}".replace(" ", ""), "policy": "static",
                           "weights": fixed})
    print(f"== {name}: speeds {cluster['speeds']}, B={cluster['global_batch_size']}, oracle "
          f"plan {list(plan)} -> {step * 1e3:.1f} ms/step (model), caps {cluster['caps']}, "
          f"quantum {cluster['quantum']}", flush=True)
    repeats = []
    for r in range(args.repeats):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        with tempfile.TemporaryDirectory(prefix="curves-") as workdir:
            spec = dict(global_batch_size=cluster["global_batch_size"],
                        steps_per_epoch=args.steps_per_epoch, epochs=args.epochs,
                        caps=cluster["caps"], quantum=cluster["quantum"], curves=curves,
                        num_workers=args.num_workers, contenders=order, workdir=workdir)
            t0 = time.perf_counter()
            try:
                out, _ = torchrun(len(curves), Path(__file__), ["--worker", json.dumps(spec)],
                                  args.timeout, name=f"{name} repeat {r}")
            except LaunchError as exc:
                print(f"   repeat {r}: {exc}", flush=True)
                repeats.append(None)
                continue
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            runs = json.loads(line[len("RESULT "):])
            for c in contenders:
                if c["name"].endswith("/window"):
                    runs[c["name"]]["first_measured"] = _first_measured_window(
                        Path(workdir) / f"{c['name'].replace('/', '-')}.jsonl",
                        args.steps_per_epoch, args.window)
        repeats.append(figures(runs, args, curves))
        if args.verbose:
            for c in contenders:
                run = runs[c["name"]]
                means = _window_means(run["step_s"], args.steps_per_epoch, args.window)
                plans = run["plans"][::args.window]
                print(f"   {c['name']}: " + " ".join(f"{p}:{m * 1e3:.0f}"
                                                    for p, m in zip(plans, means)), flush=True)
        print(f"   repeat {r} ({time.perf_counter() - t0:.0f} s): " + "; ".join(
            f"{k} {v}" for k, v in repeats[-1].items() if k != "oracle"), flush=True)
    return {"cluster": name, "oracle_plan": list(plan), "oracle_model_ms": step * 1e3,
            "repeats": repeats}


def figures(runs: dict, args, curves: list[dict]) -> dict:
    spe, K = args.steps_per_epoch, args.window
    oracle = runs["oracle"]
    o_windows = _window_means(oracle["step_s"], spe, K)
    o_model = _window_means(modelled_steps(oracle["plans"], curves), spe, K)
    out = {"oracle": {"ms_per_step": round(1e3 * float(np.mean(oracle["step_s"])), 2)}}
    for name, run in runs.items():
        if name == "oracle":
            continue
        fig = {"final_plan": run["plans"][-1]}
        if name.endswith("/window"):
            w0 = run.get("first_measured")
            windows = _window_means(run["step_s"], spe, K)
            model = _window_means(modelled_steps(run["plans"], curves), spe, K)
            if w0 is not None and w0 + 3 < len(windows):
                fig["eff@3w"] = round(float(np.mean(o_windows[w0 + 3:])) /
                                      float(np.mean(windows[w0 + 3:])), 4)
                fig["plan@3w"] = round(float(np.mean(o_model[w0 + 3:])) /
                                       float(np.mean(model[w0 + 3:])), 4)
                fig["first_measured_window"] = w0
            fig["eff_last_epoch"] = round(oracle["epoch_s"][-1] / run["epoch_s"][-1], 4)
        else:
            fig["epoch0"] = round(oracle["epoch_s"][0] / run["epoch_s"][0], 4)
            fig["epoch1"] = round(oracle["epoch_s"][1] / run["epoch_s"][1], 4)
            fig["eff_last_epoch"] = round(oracle["epoch_s"][-1] / run["epoch_s"][-1], 4)
        out[name] = fig
    return out


def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def print_cluster(result: dict) -> None:
    reps = [r for r in result["repeats"] if r is not None]
    if not reps:
        print("   no repeat completed")
        return
    print(f"   oracle ms/step (measured): {_spread([r['oracle']['ms_per_step'] for r in reps])}")
    print("   contender | eff@3w (median [range]) | plan@3w | epoch0 | epoch1 | last epoch | "
          "final plan")
    for name in [k for k in reps[0] if k != "oracle"]:
        col = lambda key: _spread([r[name].get(key) for r in reps])  # noqa: E731
        print(f"   {name} | {col('eff@3w')} | {col('plan@3w')} | {col('epoch0')} | "
              f"{col('epoch1')} | "
              f"{col('eff_last_epoch')} | {reps[-1][name]['final_plan']}")
    for name in [k for k in reps[0] if k.endswith("/window")]:
        med = statistics.median([r[name].get("eff@3w", 0.0) for r in reps])
        print(f"     target {name} >= {TARGET_WINDOWS} of the oracle within 3 windows: "
              f"{med:.3f} -> {'met' if med >= TARGET_WINDOWS else 'NOT met'}")
    for name in [k for k in reps[0] if k.endswith("/epoch")]:
        e0 = statistics.median([r[name]["epoch0"] for r in reps])
        e1 = statistics.median([r[name]["epoch1"] for r in reps])
        print(f"     target {name} epoch 0 >= {TARGET_EPOCH0}: {e0:.3f} -> "
              f"{'met' if e0 >= TARGET_EPOCH0 else 'NOT met'}; epoch 1 >= {TARGET_EPOCH1}: "
              f"{e1:.3f} -> {'met' if e1 >= TARGET_EPOCH1 else 'NOT met'}")


def run_scale(policies: list[str]) -> list[dict]:
    """The simulator at 4096 ranks, every policy on the same cluster and noise."""
    from shardbalance.simulate import SimulationConfig, simulate

    rows = []
    print("== simulator, 4096 ranks (lognormal:0.5 speeds, noise 0.1, 400 steps, window 20)")
    print("   curve | policy | steady efficiency vs oracle | speedup vs equal | decide() ms")
    for curve in ("affine", "flat:48"):
        for policy in policies:
            cfg = SimulationConfig(ranks=4096, speeds="lognormal:0.5", noise=0.1, steps=400,
                                   window=20, policy=policy, curve=curve,
                                   new_shape_s=0.0 if curve == "affine" else 0.02)
            s = simulate(cfg).summary
            rows.append({"curve": curve, "policy": policy, "efficiency": s.efficiency,
                         "speedup": s.speedup, "decision_ms": s.decision_ms_median})
            print(f"   {curve} | {policy} | {s.efficiency:.4f} | {s.speedup:.2f}x | "
                  f"{s.decision_ms_median:.0f}", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        _worker(json.loads(args.worker))
        return
    sys.path.insert(0, str(REPO))
    print(f"curves benchmark: {args.repeats} repeat(s), {args.epochs} epochs x "
          f"{args.steps_per_epoch} steps, window {args.window}, {args.num_workers} DataLoader "
          f"worker(s) per rank, {args.per_sample_ms:g} ms/sample at speed 1, overhead "
          f"{args.overhead_ms:g} ms", flush=True)
    results = []
    for name in args.cluster_list:
        result = run_cluster(name, args)
        print_cluster(result)
        results.append(result)
    payload = {"clusters": results}
    if args.scale:
        payload["scale"] = run_scale(args.policy_list)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=1))
    if any(r is None for res in results for r in res["repeats"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
