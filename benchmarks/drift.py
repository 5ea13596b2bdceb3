"""A rank slows 2x mid-run: how many plan windows until shardbalance is balanced again.

    python benchmarks/drift.py

FIGURES_PLACEHOLDER

What runs. One torchrun of ``examples/train.py`` (3 gloo ranks on 127.0.0.1, a free port),
emulated speeds 1,2,4 (rank i sleeps ``overhead + b*per_sample/s_i`` per step, see
``shardbalance/emulate.py``), the ``affine`` policy, ``--rebalance-every K`` (one plan per
window of K steps) and ``--slowdown S:2:2``: from global step S on, the fastest rank runs 2x
slower. The coordinator journal gives each window's plan and predicted step time. Per-rank busy
times per step (what the comm hook measured, ``sampler.recent_busy``) are not in train.py's
outputs, so each rank runs train.py through a small shim (this file with ``--_worker``) that
runs it unchanged with ``runpy`` and dumps the sampler's busy records when it returns.

What is reported, per window: its first global step, the plan, the coordinator's predicted
step, the measured median busy ms of each rank over the window's steps and their imbalance
(max/mean), and ``plan/opt``: the plan's modelled step time over the equal-finish optimum's,
both under the emulation model in force (``t_i(b) = overhead + b*per_sample/s_i``, the slowed
rank's speed halved from the window containing S on; optimum via ``shardbalance.plan.water_fill``
and ``apportion``, as in benchmarks/hetero.py).

The lag rule. A plan is decided when the sampler reaches the window's first step g, so it can
only use steps already trained: with ``--num-workers 0`` steps < g (lag 0); with W workers the
DataLoader runs prefetch_factor*W = 2W steps ahead, so steps < g - 2W (the first window of an
epoch sees the whole previous epoch). The *visible* window is the first whose decision could
have seen a slowed step. Windows to re-converge are counted from it (the visible window is
window 1), for (1) the plan within 5% of the new optimum (plan/opt <= 1.05) and (2) measured
busy times balanced again (imbalance <= 1.1). The issue's target: within 2 windows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_TRAIN = _REPO / "examples" / "train.py"
PLAN_TOLERANCE = 1.05
BUSY_TOLERANCE = 1.10
TARGET_WINDOWS = 2


def _worker(dump_dir: str, train_args: list[str]) -> None:
    """Run examples/train.py unchanged in this rank; then dump its samplers' busy records."""
    import runpy

    from shardbalance import WeightedDistributedSampler

    samplers = []
    original_init = WeightedDistributedSampler.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        samplers.append(self)

    WeightedDistributedSampler.__init__ = init
    sys.argv = [str(_TRAIN), *train_args]
    runpy.run_path(str(_TRAIN), run_name="__main__")
    records = [list(r) for s in samplers for r in s.recent_busy]
    out = Path(dump_dir) / f"busy-rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(records), encoding="utf-8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speeds", default="1,2,4")
    p.add_argument("--rebalance-every", type=int, default=8, help="K, steps per plan window")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples", type=int, default=6144)
    p.add_argument("--global-batch-size", type=int, default=192)
    p.add_argument("--per-sample-ms", type=float, default=2.0)
    p.add_argument("--overhead-ms", type=float, default=5.0)
    p.add_argument("--slow-rank", type=int, default=None, help="default: the fastest rank")
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--slowdown-step", type=int, default=None,
                   help="global step S of the slowdown (default: the window boundary nearest "
                        "the middle of the run)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader workers per rank (the lag is 2 per worker)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds for the torchrun launch")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop torchrun and everything it started (its own session, so its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def torchrun(nproc: int, script_args: list[str], timeout_s: float) -> tuple[str, str]:
    """torchrun this file on 127.0.0.1 with a free port (retried if taken); bounded by timeout_s."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--nnodes", "1",
               "--nproc_per_node", str(nproc), str(Path(__file__).resolve()), *script_args]
        proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise SystemExit(f"torchrun timed out after {timeout_s:.0f} s\n{err[-3000:]}")
        except BaseException:  # Ctrl-C: do not leave the ranks behind
            _kill_group(proc)
            raise
        if proc.returncode == 0:
            return out, err
        if "address already in use" not in (out + err).lower() or attempt == 2:
            raise SystemExit(f"torchrun failed (exit {proc.returncode})\n--- stdout ---\n"
                             f"{out[-3000:]}\n--- stderr ---\n{err[-3000:]}")
    raise AssertionError("unreachable")


def oracle(speeds, B: int, per_sample_ms: float, overhead_ms: float):
    """Equal-finish optimum of the emulation model: (integer plan, its step ms, step_ms fn)."""
    from shardbalance.plan import apportion, water_fill

    betas = [per_sample_ms / s for s in speeds]
    k = len(speeds)
    shares, _ = water_fill([1 / b for b in betas], [-overhead_ms / b for b in betas],
                           [1] * k, [B] * k, B)
    best = list(apportion(shares, B, [1] * k, [B] * k))

    def step_ms(sizes) -> float:
        return max(overhead_ms + beta * b for beta, b in zip(betas, sizes))

    return best, step_ms(best), step_ms


def analyse(args, speeds, S: int, steps_per_epoch: int, lag: int, decisions, busy) -> dict:
    K, B = args.rebalance_every, args.global_batch_size
    slowed = list(speeds)
    slowed[args.slow_rank] /= args.factor
    before = oracle(speeds, B, args.per_sample_ms, args.overhead_ms)
    after = oracle(slowed, B, args.per_sample_ms, args.overhead_ms)
    rows = []
    for d in decisions:
        g = d["epoch"] * steps_per_epoch + d["window"]
        end = d["epoch"] * steps_per_epoch + min(d["window"] + K, steps_per_epoch)
        seen_before = g if d["window"] == 0 else g - lag  # steps < seen_before were trained
        best, best_ms, step_ms = after if end > S else before
        med = []
        for rank_records in busy:
            vals = [r[3] * 1e3 for r in rank_records
                    if g <= r[0] * steps_per_epoch + r[1] < end]
            med.append(statistics.median(vals) if vals else None)
        imb = (max(med) / statistics.fmean(med)) if None not in med else None
        rows.append({"global_step": g, "epoch": d["epoch"], "window": d["window"],
                     "plan": d["batch_sizes"], "predicted_ms": d.get("predicted_step_ms"),
                     "reason": d.get("reason"), "busy_ms": med, "imbalance": imb,
                     "optimum": best, "plan_over_opt": step_ms(d["batch_sizes"]) / best_ms,
                     "slowed": end > S, "contains_slowdown": g <= S < end,
                     "could_see": seen_before > S})
    slow_i = next(i for i, r in enumerate(rows) if r["slowed"])
    vis_i = next((i for i, r in enumerate(rows) if r["could_see"]), None)

    def first(pred):
        return next((i for i in range(slow_i, len(rows)) if pred(rows[i])), None)

    plan_i = first(lambda r: r["plan_over_opt"] <= PLAN_TOLERANCE)
    busy_i = first(lambda r: r["imbalance"] is not None and r["imbalance"] <= BUSY_TOLERANCE)

    def count(i):  # windows from the visible window, which counts as 1
        return None if i is None or vis_i is None else i - vis_i + 1

    relapses = [rows[i]["global_step"] for i in range(plan_i + 1, len(rows))
                if rows[i]["plan_over_opt"] > PLAN_TOLERANCE] if plan_i is not None else []
    busy_relapses = [rows[i]["global_step"] for i in range(busy_i + 1, len(rows))
                     if rows[i]["imbalance"] is not None
                     and rows[i]["imbalance"] > BUSY_TOLERANCE] if busy_i is not None else []
    return {"rows": rows, "before_optimum": before[:2], "after_optimum": after[:2],
            "slowdown_window_step": rows[slow_i]["global_step"],
            "visible_window_step": None if vis_i is None else rows[vis_i]["global_step"],
            "plan_converged_step": None if plan_i is None else rows[plan_i]["global_step"],
            "busy_balanced_step": None if busy_i is None else rows[busy_i]["global_step"],
            "plan_windows": count(plan_i), "busy_windows": count(busy_i),
            "plan_windows_from_slowdown": None if plan_i is None else plan_i - slow_i + 1,
            "busy_windows_from_slowdown": None if busy_i is None else busy_i - slow_i + 1,
            "plan_relapses": relapses, "busy_relapses": busy_relapses}


def _f(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def report(args, speeds, S, lag, res, wall_s) -> None:
    K = args.rebalance_every
    print(f"emulated speeds {args.speeds}, {args.per_sample_ms:g} ms/sample at speed 1, "
          f"{args.overhead_ms:g} ms overhead; B={args.global_batch_size}, N={args.samples}, "
          f"{args.epochs} epochs, policy affine, K={K}, num_workers={args.num_workers} "
          f"(lag {lag} steps)")
    print(f"slowdown: rank {args.slow_rank} {args.factor:g}x slower from global step {S}; "
          f"optimum {res['before_optimum'][0]} ({res['before_optimum'][1]:.1f} ms) -> "
          f"{res['after_optimum'][0]} ({res['after_optimum'][1]:.1f} ms)")
    print()
    print("step | ep:win | plan | predicted ms | busy ms/rank (measured) | imbalance | plan/opt | note")
    for r in res["rows"]:
        notes = []
        if r["contains_slowdown"]:
            notes.append(f"<- slowdown at step {S}")
        if r["global_step"] == res["visible_window_step"]:
            notes.append("<- first decision that could see it (window 1)")
        if r["global_step"] == res["plan_converged_step"]:
            notes.append("plan within 5%")
        if r["global_step"] == res["busy_balanced_step"]:
            notes.append("busy balanced")
        busy = "[" + ", ".join(_f(b) for b in r["busy_ms"]) + "]"
        print(f"{r['global_step']} | {r['epoch']}:{r['window']} | {r['plan']} | "
              f"{_f(r['predicted_ms'])} | {busy} | {_f(r['imbalance'], '.2f')} | "
              f"{r['plan_over_opt']:.3f} | {' '.join(notes)}")
    print()
    vis = res["visible_window_step"]
    print(f"slowdown window starts at step {res['slowdown_window_step']}; first window whose "
          f"decision could see a slowed step: {vis}")
    for key, label, tol in (("plan", "plan within 5% of the new optimum", PLAN_TOLERANCE),
                            ("busy", f"measured busy imbalance <= {BUSY_TOLERANCE}", None)):
        n, n0 = res[f"{key}_windows"], res[f"{key}_windows_from_slowdown"]
        step = res["plan_converged_step" if key == "plan" else "busy_balanced_step"]
        met = n is not None and n <= TARGET_WINDOWS
        rel = res[f"{key}_relapses"]
        print(f"  {label}: at window starting step {_f(step, 'd')}; "
              f"{_f(n, 'd')} window(s) counted from the visible window "
              f"({_f(n0, 'd')} from the slowdown window) -> target <= {TARGET_WINDOWS}: "
              f"{'met' if met else 'MISSED'}; "
              + (f"relapses after it at steps {rel}" if rel else "stays there"))
    print(f"total wall time {wall_s:.0f} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    speeds = [float(s) for s in args.speeds.split(",")]
    k = len(speeds)
    if args.slow_rank is None:
        args.slow_rank = max(range(k), key=lambda i: speeds[i])
    K = args.rebalance_every
    steps_per_epoch = -(-args.samples // args.global_batch_size)
    total = steps_per_epoch * args.epochs
    S = args.slowdown_step if args.slowdown_step is not None else round(total / 2 / K) * K
    if not 0 < S < total:
        raise SystemExit(f"--slowdown-step {S} is outside the run's {total} steps")
    lag = 2 * args.num_workers
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shardbalance-drift-") as tmp:
        journal = Path(tmp) / "coordinator.jsonl"
        train = ["--sampler", "weighted", "--policy", "affine", "--epochs", str(args.epochs),
                 "--samples", str(args.samples),
                 "--global-batch-size", str(args.global_batch_size),
                 "--rebalance-every", str(K), "--emulate-speeds", args.speeds,
                 "--per-sample-ms", str(args.per_sample_ms),
                 "--overhead-ms", str(args.overhead_ms), "--num-workers", str(args.num_workers),
                 "--slowdown", f"{S}:{args.slow_rank}:{args.factor}",
                 "--coordinator-log", str(journal)]
        print(f"[drift] torchrun of examples/train.py {' '.join(train[:-2])} ...",
              file=sys.stderr, flush=True)
        torchrun(k, ["--_worker", tmp, *train], args.timeout)
        decisions = [e for e in map(json.loads, journal.read_text().splitlines())
                     if e.get("event") == "plan"]
        busy = [json.loads((Path(tmp) / f"busy-rank{r}.json").read_text()) for r in range(k)]
    decisions.sort(key=lambda d: (d["epoch"], d["window"]))
    wall_s = time.perf_counter() - started
    res = analyse(args, speeds, S, steps_per_epoch, lag, decisions, busy)
    report(args, speeds, S, lag, res, wall_s)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"config": vars(args), "slowdown_step": S,
                                                   "lag": lag, **res}, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        _worker(sys.argv[2], sys.argv[3:])
    else:
        main()
