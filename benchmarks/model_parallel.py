"""Epoch time of a 2 data-parallel x 2 model-parallel job with one slow member, side by side.

    python benchmarks/model_parallel.py                  # 3 launches, ~1 min on 2 idle cores
    python benchmarks/model_parallel.py --repeats 2 --epochs 5 --slow 0.5

Four gloo ranks on 127.0.0.1 form the mesh [[0, 1], [2, 3]] (dims "dp", "tp"): ranks 0 and 1
are replica 0, ranks 2 and 3 replica 1. Every rank runs an emulated compute layer
(``shardbalance.emulate.EmulatedSpeed``: sleeps like a GPU of relative speed s) in front of a
small replicated model, DDP over the data-parallel group; rank 3 has speed ``--slow``, the
others 1. The members of a replica wait for each other every step (a scalar all-reduce over
the model-parallel group, as tensor parallelism's collectives make them), so a replica runs at
its slowest member's pace. Contenders, one launch each:

- ``distributed``: torch's DistributedSampler over the data-parallel group (num_replicas 2,
  rank = data-parallel index), the equal split;
- ``equal``: WeightedDistributedSampler(device_mesh=mesh, mesh_dim="dp", policy="equal");
- ``affine``: the same with the default adaptive policy (per-epoch plans, early re-plans).

Figures: the median epoch time over the epochs after the first two (the steady state), the
speedup over ``distributed`` and the final plan. The ideal split follows from the emulation:
replica i's step takes overhead + b_i * per_sample / speed_i (its slowest member's speed).

Measured on the 2-core x86 VM while other jobs kept its load average at 9-18 (so each step
carried ~100 ms of CPU starvation on top of the emulated time), torch 2.13 CPU, gloo,
``python benchmarks/model_parallel.py --repeats 2 --epochs 5`` (6 launches, 383 s), verbatim:

    2 dp x 2 tp, rank 3 at speed 0.25; B=64, 8 steps/epoch; model: equal split 261.0 ms/step, optimum [51.2, 12.8] 107.4 ms/step, ideal speedup 2.43x
    contender | median s/epoch (epochs 3.., median over launches) | per launch | speedup vs the first | final plan
    distributed | 2.867 | 2.625, 3.109 | 1.00x | [32, 32]
    equal | 2.925 | 2.887, 2.964 | 0.98x | [32, 32]
    affine | 2.488 | 2.270, 2.706 | 1.15x | [53, 11]

Read: the plan follows replica 1's slow member to within two samples of the optimum ([53, 11]
vs [51.2, 12.8]) although its peer, rank 2, is as fast as replica 0; ``equal`` runs like
DistributedSampler. The speedup is far below the ideal 2.43x on that loaded machine: the
starvation cost is the same per step on every rank whatever the split. Not yet re-measured on
an idle machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _launch import free_port  # noqa: E402

CONTENDERS = ("distributed", "equal", "affine")


def _rank(rank, port, contender, args, queue):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

    from shardbalance import WeightedDistributedSampler
    from shardbalance.emulate import EmulatedSpeed

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=4, timeout=timedelta(seconds=60))
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp, tp = mesh.get_group("dp"), mesh.get_group("tp")
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(args.samples, 16, generator=gen),
                             torch.randint(0, 4, (args.samples,), generator=gen))
        sampler = None
        if contender == "distributed":
            inner = DistributedSampler(data, num_replicas=2, rank=rank // 2, seed=1)
            loader = DataLoader(data, batch_sampler=BatchSampler(inner, args.batch // 2, True))
        else:
            policy = "equal" if contender == "equal" else "affine"
            sampler = WeightedDistributedSampler(data, args.batch, device_mesh=mesh,
                                                 mesh_dim="dp", policy=policy, seed=1,
                                                 drop_last=True, coordinator_log=os.devnull)
            inner = sampler
            loader = DataLoader(data, batch_sampler=sampler)
        torch.manual_seed(7)
        speed = args.slow if rank == 3 else 1.0
        model = DDP(torch.nn.Sequential(
            EmulatedSpeed(speed, per_sample_s=args.per_sample_ms / 1e3,
                          overhead_s=args.overhead_ms / 1e3),
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)), process_group=dp)
        if sampler is not None:
            sampler.attach(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        epochs = []
        for epoch in range(args.epochs):
            inner.set_epoch(epoch)
            start = time.perf_counter()
            for x, y in loader:
                out = model(x)
                # The model-parallel pair meets inside the step, as tensor parallelism does.
                dist.all_reduce(torch.zeros(1), group=tp)
                F.cross_entropy(out, y).backward()
                opt.step()
                opt.zero_grad()
            epochs.append(time.perf_counter() - start)
        plan = list(sampler.batch_sizes) if sampler is not None else [args.batch // 2] * 2
        del model
        if sampler is not None:
            sampler.close()
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, epochs, plan))
    except BaseException as exc:  # report, then let the parent stop the others
        queue.put((rank, None, repr(exc)))


def run(contender: str, args) -> tuple[list[float], list[int]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, contender, args, queue)) for r in range(4)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + args.timeout_s
        while len(results) < 4 and time.monotonic() < deadline:
            try:
                rank, epochs, plan = queue.get(timeout=1.0)
            except Exception:
                continue
            if epochs is None:
                raise RuntimeError(f"{contender}: rank {rank} failed: {plan}")
            results[rank] = (epochs, plan)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
    if len(results) < 4:
        raise RuntimeError(f"{contender}: no answer from ranks {sorted(set(range(4)) - set(results))}")
    # An epoch ends when the slowest rank's does.
    epochs = [max(r[0][e] for r in results.values()) for e in range(args.epochs)]
    return epochs, results[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", type=float, default=0.25, help="rank 3's relative speed")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--per-sample-ms", type=float, default=2.0)
    parser.add_argument("--overhead-ms", type=float, default=5.0)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="launches per contender, interleaved (A B C A B C)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    args = parser.parse_args()
    steps = args.samples // args.batch
    # The emulation's optimum: both replicas finish together.
    speeds = (1.0, args.slow)
    per = [args.per_sample_ms / s for s in speeds]
    over = [args.overhead_ms] * 2  # EmulatedSpeed: overhead + b * per_sample / speed
    b0 = (args.batch * per[1] + over[1] - over[0]) / (per[0] + per[1])
    ideal = over[0] + b0 * per[0]
    equal = max(o + args.batch / 2 * p for o, p in zip(over, per))
    print(f"2 dp x 2 tp, rank 3 at speed {args.slow:g}; B={args.batch}, {steps} steps/epoch; "
          f"model: equal split {equal:.1f} ms/step, optimum [{b0:.1f}, {args.batch - b0:.1f}] "
          f"{ideal:.1f} ms/step, ideal speedup {equal / ideal:.2f}x")
    contenders = args.contenders.split(",")
    medians = {c: [] for c in contenders}
    plans = {}
    for _ in range(args.repeats):
        for contender in contenders:
            epochs, plans[contender] = run(contender, args)
            medians[contender].append(statistics.median(epochs[2:] or epochs))
    print("contender | median s/epoch (epochs 3.., median over launches) | per launch | "
          "speedup vs the first | final plan")
    base = statistics.median(medians[contenders[0]])
    for contender in contenders:
        median = statistics.median(medians[contender])
        launches = ", ".join(f"{m:.3f}" for m in medians[contender])
        print(f"{contender} | {median:.3f} | {launches} | {base / median:.2f}x | "
              f"{plans[contender]}", flush=True)


if __name__ == "__main__":
    main()
