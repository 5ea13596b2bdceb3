"""PyTorch Lightning on an emulated 1:2:4 cluster: its own default against ShardBalanceCallback.

    python benchmarks/frameworks_lightning.py                 # 2 launches of 3 ranks
    python benchmarks/frameworks_lightning.py --repeats 3     # alternating, medians over all

Each launch is ``torchrun examples/lightning_train.py`` on 3 CPU ranks (gloo) emulating GPUs
of relative speed 1, 2 and 4 (``shardbalance.emulate``: a sleep of ``overhead + b·per_sample/
speed`` in the forward pass). Contenders, run alternately so that a shared machine's load
falls on both: ``distributed`` (Lightning's default ``DistributedSampler``: every rank gets
B/3) and ``shardbalance`` (``WeightedDistributedSampler`` + ``ShardBalanceCallback``). The
figure is the median epoch time over the steady-state epochs (from ``--warmup-epochs`` on: the
first plans are still being measured) of every launch of a contender; the speedup is the ratio
of the two medians. ``ideal``: the emulated compute alone, Σ speed / (k · min speed).

Measured on a 2-core x86 VM shared with other jobs, torch 2.13 CPU, Lightning 2.6, gloo.
``python benchmarks/frameworks_lightning.py --repeats 2`` (4 launches, ~7 min wall), verbatim:

    == Lightning, emulated cluster 1:2:4: 3 ranks, B=192, N=3072, 6 ms/sample at speed 1, 2 launch(es) each, median of epochs 2..5; ideal speedup 2.33x
    contender | steady-state s/epoch (median) | speedup vs Lightning's default | final plan
    distributed | 7.252 | 1.00x | [64, 64, 64]
    shardbalance | 3.680 | 1.97x | [28, 55, 109]

(per launch, shardbalance's steady epochs were 3.9-4.0 s and 3.4-3.5 s: the machine's load
moved; a single-launch run gave 2.10x.) Epoch 0 runs the equal split while the first
measurements arrive (6.6-6.9 s for both contenders); from epoch 1 on the plan is within a sample or two of the optimum [27, 55, 110]. The gap to the ideal is
Lightning's own per-step cost on these CPUs (~90 ms a step with 3 ranks on 2 cores, paid by
both contenders); with ``--per-sample-ms 2`` that cost dominates and the speedup is 1.41x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _launch import REPO, torchrun_or_exit

CONTENDERS = {"distributed": ["--sampler", "distributed"], "shardbalance": []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speeds", default="1,2,4")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=3072)
    p.add_argument("--global-batch-size", type=int, default=192)
    p.add_argument("--per-sample-ms", type=float, default=6.0,
                   help="emulated compute per sample at speed 1 (large against Lightning's "
                        "own per-step cost on CPU)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=900)
    args = p.parse_args()
    speeds = [float(s) for s in args.speeds.split(",")]
    epochs: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    plans: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, extra in CONTENDERS.items():
                metrics = Path(tmp) / f"{name}-{repeat}.jsonl"
                script_args = ["--emulate-speeds", args.speeds, "--epochs", str(args.epochs),
                               "--samples", str(args.samples), "--global-batch-size",
                               str(args.global_batch_size), "--per-sample-ms",
                               str(args.per_sample_ms), "--metrics-out", str(metrics),
                               *extra]
                torchrun_or_exit(len(speeds), REPO / "examples" / "lightning_train.py",
                                 script_args, args.timeout_s)
                lines = [json.loads(line) for line in metrics.read_text().splitlines()]
                epochs[name] += [r["seconds"] for r in lines if r["epoch"] >= args.warmup_epochs]
                plans[name] = lines[-1]["plan"]
                print(f"[lightning] {name} repeat {repeat}: epochs "
                      f"{[round(r['seconds'], 2) for r in lines]} s", file=sys.stderr, flush=True)
    base = statistics.median(epochs["distributed"])
    ideal = sum(speeds) / (len(speeds) * min(speeds))
    print(f"== Lightning, emulated cluster {args.speeds.replace(',', ':')}: {len(speeds)} ranks, "
          f"B={args.global_batch_size}, N={args.samples}, {args.per_sample_ms:g} ms/sample at "
          f"speed 1, {args.repeats} launch(es) each, "
          f"median of epochs {args.warmup_epochs}..{args.epochs - 1}; ideal speedup {ideal:.2f}x")
    print("contender | steady-state s/epoch (median) | speedup vs Lightning's default | "
          "final plan")
    for name, times in epochs.items():
        median = statistics.median(times)
        print(f"{name} | {median:.3f} | {base / median:.2f}x | {plans[name]}")


if __name__ == "__main__":
    main()
