"""shardbalance against each Hugging Face framework's own default, on an emulated 1:2:4 cluster.

    python benchmarks/frameworks_hf.py [--speeds 1,2,4] [--epochs 4]

Runs, side by side in one invocation, on CPU ranks (gloo) that emulate GPUs of relative speed
1, 2 and 4 (``shardbalance.emulate``: a sleep of ``overhead + b·per_sample/speed`` in the
forward pass):

- ``examples/accelerate_train.py``: ``prepare_dataloader`` + ``accelerate()`` against
  ``accelerator.prepare(loader)`` (every rank B/k). Figure: median seconds per epoch over the
  epochs after the first (steady state).
- ``examples/hf_trainer.py``: ``ShardBalanceTrainer`` against the plain ``Trainer``. Figures:
  the median seconds per epoch after the first, and the seconds of ``trainer.train()`` (the
  first, balancing epoch, the coordinator's start and the checkpoints included).

Prints one table row per framework: both figures and their ratio (the speedup).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile

from _launch import REPO, torchrun_or_exit


def epoch_seconds(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"^epoch \d+ \| ([0-9.]+) s", output, re.M)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--speeds", default="1,2,4")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--per-sample-ms", type=float, default=4.0,
                   help="emulated compute per sample at speed 1 (Accelerate's small MLP)")
    p.add_argument("--trainer-per-sample-ms", type=float, default=15.0,
                   help="the same for the Trainer's GPT-2, whose real CPU compute is larger")
    args = p.parse_args()
    nproc = len(args.speeds.split(","))
    common = ["--emulate-speeds", args.speeds]
    rows = []

    figures = {}
    for loader in ("shardbalance", "accelerate"):
        out, _ = torchrun_or_exit(nproc, REPO / "examples" / "accelerate_train.py",
                                  [*common, "--loader", loader, "--epochs", str(args.epochs),
                                   "--per-sample-ms", str(args.per_sample_ms)],
                                  600)
        figures[loader] = statistics.median(epoch_seconds(out)[1:])
    rows.append(("Accelerate", "s/epoch (median, epochs 1+)", figures["accelerate"],
                 figures["shardbalance"]))

    figures = {}
    for trainer in ("shardbalance", "plain"):
        with tempfile.TemporaryDirectory() as output_dir:
            out, _ = torchrun_or_exit(nproc, REPO / "examples" / "hf_trainer.py",
                                      [*common, "--trainer", trainer, "--epochs",
                                       str(args.epochs), "--output-dir", output_dir,
                                       "--per-sample-ms", str(args.trainer_per_sample_ms)], 600)
        figures[trainer] = (statistics.median(epoch_seconds(out)[1:]),
                            float(re.search(rf"^{trainer} \| ([0-9.]+) s", out, re.M).group(1)))
    rows.append(("HF Trainer", "s/epoch (median, epochs 1+)", figures["plain"][0],
                 figures["shardbalance"][0]))
    rows.append(("HF Trainer", "s of train()", figures["plain"][1], figures["shardbalance"][1]))

    print(f"speeds {args.speeds}, {nproc} CPU ranks (gloo), emulated per sample at speed 1: "
          f"{args.per_sample_ms} ms (Accelerate), {args.trainer_per_sample_ms} ms (Trainer)")
    print(f"{'framework':<12} {'figure':<30} {'default':>9} {'shardbalance':>13} {'speedup':>8}")
    for name, what, default, ours in rows:
        print(f"{name:<12} {what:<30} {default:9.2f} {ours:13.2f} {default / ours:7.2f}x")


if __name__ == "__main__":
    main()
