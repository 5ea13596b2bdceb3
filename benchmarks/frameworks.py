"""shardbalance against each framework's own default on the emulated 1:2:4 cluster, in one run.

    python benchmarks/frameworks.py                  # Lightning, then Accelerate and HF Trainer
    python benchmarks/frameworks.py --only lightning

Runs ``frameworks_lightning.py`` (Lightning's ``DistributedSampler`` against
``ShardBalanceCallback``) and ``frameworks_hf.py`` (``accelerator.prepare(loader)`` against
``prepare_dataloader``, the plain ``Trainer`` against ``ShardBalanceTrainer``) one after the
other, each comparing its two contenders side by side, and prints their tables. See those
scripts for the setup and the figures' definitions.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"lightning": ["frameworks_lightning.py", "--repeats", "2"],
           "hf": ["frameworks_hf.py", "--epochs", "4"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=sorted(SCRIPTS), default=None)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per script")
    args = p.parse_args(argv)
    status = 0
    for name, (script, *extra) in SCRIPTS.items():
        if args.only not in (None, name):
            continue
        print(f"== {script} {' '.join(extra)}", flush=True)
        try:
            status |= subprocess.run([sys.executable, str(HERE / script), *extra],
                                     timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"{script} timed out after {args.timeout:g} s", file=sys.stderr)
            status |= 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
