"""Batch inference in pull mode: every rank takes the next chunk when it is free.

    # CPU: three ranks emulating GPUs of relative speed 1, 2 and 4
    torchrun --nproc_per_node=3 examples/infer.py --emulate-speeds 1,2,4 --out-dir infer_out
    # independent processes sharing a standalone coordinator (no process group at all)
    shardbalance coordinator --bind tcp://127.0.0.1:5555 --log coord.jsonl &
    for r in 0 1 2; do python examples/infer.py --rank $r --world-size 3 --emulate-speeds 1,2,4 \
        --coordinator tcp://127.0.0.1:5555 --run-id demo --out-dir infer_out & done; wait
    python examples/infer.py --merge-only --out-dir infer_out

The data is generated (Gaussian inputs, a fixed random model), so nothing is downloaded. Each
process appends ``index<TAB>output`` lines to its own file ``part-<rank>-<pid>.tsv`` and flushes
them *before* the chunk is acknowledged, so a completed chunk's outputs are on disk. A chunk may
be processed twice (a re-leased or speculative chunk): the outputs are keyed by index and
idempotent, and the merge keeps one copy of each (checking that copies agree), writes
``merged.tsv`` in index order and checks that every index ``[0, N)`` is there: exactly-once
results on top of at-least-once delivery. Rank 0 merges once its loop ends (the epoch is then
completed by every rank); ``--merge-only`` merges what a directory holds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

from shardbalance import DynamicShardSampler


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=6000, help="dataset size N")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--min-chunk-size", type=int, default=None)
    p.add_argument("--out-dir", default="infer_out")
    p.add_argument("--emulate-speeds", default=None,
                   help="comma-separated relative speeds, one per rank (CPU emulation)")
    p.add_argument("--per-sample-ms", type=float, default=2.0,
                   help="emulated compute per sample at speed 1")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="emulated fixed cost per chunk")
    p.add_argument("--lease-s", type=float, default=30.0)
    p.add_argument("--rank", type=int, default=None, help="independent processes: this rank")
    p.add_argument("--world-size", type=int, default=None,
                   help="independent processes: how many ranks")
    p.add_argument("--coordinator", default=None, help="a standalone coordinator's address")
    p.add_argument("--run-id", default=None, help="the same on every independent process")
    p.add_argument("--coordinator-log", default=None, help="the embedded coordinator's journal")
    p.add_argument("--static", action="store_true",
                   help="baseline: rank r processes the r-th equal contiguous share, no coordinator")
    p.add_argument("--start-file", default=None,
                   help="print READY, then wait for this file before working (benchmarks "
                        "exclude process start this way)")
    p.add_argument("--print-chunks", action="store_true", help="print 'chunk START LEN' lines")
    p.add_argument("--summary", default=None, help="write this rank's figures as JSON here")
    p.add_argument("--merge-only", action="store_true", help="only merge --out-dir")
    p.add_argument("--no-merge", action="store_true", help="rank 0 does not merge")
    return p.parse_args(argv)


def make_data(n: int, features: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, features, generator=gen)
    model = torch.nn.Linear(features, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, features, generator=gen))
        model.bias.zero_()
    return inputs, model


def merge(out_dir: str, n: int) -> tuple[int, int]:
    """Merge every part file into ``merged.tsv`` in index order; (duplicates dropped, missing)."""
    outputs: dict[int, float] = {}
    duplicates = 0
    for path in sorted(glob.glob(os.path.join(out_dir, "part-*.tsv"))):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                fields = line.split("\t")
                if len(fields) != 2 or not line.endswith("\n"):
                    continue  # a torn last line of a killed process
                index, value = int(fields[0]), float(fields[1])
                if index in outputs:
                    duplicates += 1
                    if abs(outputs[index] - value) > 1e-5 * max(1.0, abs(value)):
                        raise SystemExit(f"index {index}: copies disagree ({outputs[index]} vs "
                                         f"{value}): outputs are not idempotent")
                    continue
                outputs[index] = value
    missing = n - sum(1 for i in outputs if 0 <= i < n)
    with open(os.path.join(out_dir, "merged.tsv"), "w", encoding="utf-8") as fh:
        for index in sorted(outputs):
            fh.write(f"{index}\t{outputs[index]!r}\n")
    return duplicates, missing


def wait_for(path: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"no start file {path} within {timeout_s:g} s")
        time.sleep(0.005)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge_only:
        duplicates, missing = merge(args.out_dir, args.samples)
        print(f"merged {args.samples - missing} outputs, {duplicates} duplicates dropped, "
              f"{'complete' if not missing else f'INCOMPLETE: {missing} missing'}")
        return 0 if not missing else 1
    # Imported here: merging needs no torch.
    import torch
    import torch.distributed as dist

    from shardbalance.emulate import EmulatedSpeed, parse_speeds

    torchrun = "LOCAL_RANK" in os.environ and args.rank is None
    if torchrun:
        # The process group only carries the coordinator's address (its store): pull mode runs
        # no collective.
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = args.rank or 0, args.world_size or 1
    torch.set_num_threads(1)
    inputs, model = make_data(args.samples, args.features)
    layers = [model]
    speed = 1.0
    if args.emulate_speeds:
        speed = parse_speeds(args.emulate_speeds, world)[rank]
        layers.insert(0, EmulatedSpeed(speed, args.per_sample_ms / 1e3, args.overhead_ms / 1e3))
    net = torch.nn.Sequential(*layers).eval()
    os.makedirs(args.out_dir, exist_ok=True)
    part = open(os.path.join(args.out_dir, f"part-{rank}-{os.getpid()}.tsv"), "a",
                encoding="utf-8")

    sampler = None
    if args.static:
        lo, hi = rank * args.samples // world, (rank + 1) * args.samples // world
        chunks = ([list(range(a, min(a + args.chunk_size, hi)))
                   for a in range(lo, hi, args.chunk_size)])
    else:
        sampler = DynamicShardSampler(range(args.samples), args.chunk_size,
                                      num_replicas=None if torchrun else world,
                                      rank=None if torchrun else rank,
                                      coordinator=args.coordinator, run_id=args.run_id,
                                      min_chunk_size=args.min_chunk_size, lease_s=args.lease_s,
                                      coordinator_log=args.coordinator_log)
        sampler.set_epoch(0)
        chunks = sampler
    if args.start_file:
        print("READY", flush=True)
        wait_for(args.start_file)
    start = time.time()
    items = n_chunks = 0
    with torch.no_grad():
        for indices in chunks:
            if args.print_chunks:
                print(f"chunk {indices[0]} {len(indices)}", flush=True)
            out = net(inputs[indices]).squeeze(1).tolist()
            part.write("".join(f"{i}\t{v!r}\n" for i, v in zip(indices, out)))
            part.flush()  # on disk before the next request acknowledges this chunk
            items += len(indices)
            n_chunks += 1
    end = time.time()
    part.close()
    if sampler is not None:
        sampler.close()
    summary = {"rank": rank, "speed": speed, "items": items, "chunks": n_chunks,
               "start": start, "end": end}
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as fh:
            json.dump(summary, fh)
    print(f"rank {rank} (speed {speed:g}): {items} items in {n_chunks} chunks, "
          f"{end - start:.2f} s", flush=True)
    if rank == 0 and not args.no_merge and not args.static:
        duplicates, missing = merge(args.out_dir, args.samples)
        print(f"merged {args.samples - missing} outputs in index order, {duplicates} duplicates "
              f"dropped, {'complete' if not missing else f'INCOMPLETE: {missing} missing'}",
              flush=True)
        if missing:
            return 1
    if torchrun:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
