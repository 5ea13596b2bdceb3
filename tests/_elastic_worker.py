"""A torchrun worker for tests/test_elastic.py: trains with windowed plans while its elastic
job's membership changes.

    torchrun --nnodes=1:2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \
        tests/_elastic_worker.py OUT_DIR [--journal coordinator.jsonl]

Alone (world size 1) it trains until its agent restarts it for the node that joined, and writes
``OUT_DIR/alone`` once it holds a plan from the coordinator; with two ranks it trains
``--epochs`` epochs and exits. The rank's emulated speed is ``$ELASTIC_SPEED``. Every rank
appends one JSON line per epoch to ``OUT_DIR/rank<RANK>-world<WORLD>.jsonl``, and shardbalance's
warnings are printed (the test asserts there are none).
"""

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from shardbalance import WeightedDistributedSampler
from shardbalance.emulate import EmulatedSpeed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--journal", default=None)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out_dir)
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *a, **k: print(f"WARNING {message}", flush=True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = TensorDataset(torch.randn(512, 8, generator=torch.Generator().manual_seed(0)),
                         torch.randint(0, 2, (512,), generator=torch.Generator().manual_seed(1)))
    sampler = WeightedDistributedSampler(data, global_batch_size=32, rebalance_every=2,
                                         coordinator_log=args.journal, timeout_s=10)
    speed = float(os.environ.get("ELASTIC_SPEED", "1"))
    model = DDP(torch.nn.Sequential(EmulatedSpeed(speed, per_sample_s=0.002, overhead_s=0.001),
                                    torch.nn.Linear(8, 2)))
    sampler.attach(model)
    lines = out / f"rank{rank}-world{world}.jsonl"
    # Alone: train until the agent restarts this worker group (bounded, so that a join that
    # never comes ends the test instead of hanging it).
    deadline = time.monotonic() + 90
    epochs = args.epochs if world > 1 else 10_000
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in DataLoader(data, batch_sampler=sampler):
            F.cross_entropy(model(x), y).backward()
            model.zero_grad()
        plan = sampler.plan
        with lines.open("a") as fh:
            fh.write(json.dumps({
                "epoch": epoch, "rank": rank, "world": world, "speed": speed,
                "generation": sampler.generation, "run": sampler.session.run_id,
                "plan": list(plan.batch_sizes), "plan_generation": plan.generation,
                "restart_count": int(os.environ["TORCHELASTIC_RESTART_COUNT"])}) + "\n")
        if world == 1:
            (out / "alone").touch()
        if time.monotonic() > deadline:
            raise SystemExit("alone for 90 s: no node joined")
    del model
    dist.barrier()
    sampler.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
