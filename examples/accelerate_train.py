"""Train a small model with Hugging Face Accelerate and shardbalance, on CPUs or GPUs.

    # CPU: two ranks emulating GPUs of relative speed 1 and 4 (or three: 1,2,4)
    torchrun --nproc_per_node=2 examples/accelerate_train.py --emulate-speeds 1,4
    # the same cluster with Accelerate's own loader (accelerator.prepare, even split), to compare
    torchrun --nproc_per_node=2 examples/accelerate_train.py --emulate-speeds 1,4 --loader accelerate
    # GPUs
    accelerate launch examples/accelerate_train.py

Gradient accumulation over ``--accumulation`` batches with ``accelerator.accumulate``; the data
is generated (a fixed random teacher labels Gaussian inputs), nothing is downloaded. Rank 0
prints one line per epoch: time, throughput, loss and the plan.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from shardbalance import WeightedDistributedSampler
from shardbalance.accelerate import prepare_dataloader
from shardbalance.emulate import EmulatedSpeed, parse_speeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loader", choices=["shardbalance", "accelerate"], default="shardbalance")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=3072)
    p.add_argument("--global-batch-size", type=int, default=96)
    p.add_argument("--accumulation", type=int, default=2, help="batches per optimizer step")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--emulate-speeds", default=None,
                   help="comma-separated relative speeds, one per rank (CPU emulation)")
    p.add_argument("--per-sample-ms", type=float, default=2.0)
    args = p.parse_args()

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulation,
                              cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g))
    ds = TensorDataset(x, y)

    layers = [torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)]
    if args.emulate_speeds:
        speed = parse_speeds(args.emulate_speeds, world)[rank]
        layers.insert(0, EmulatedSpeed(speed, per_sample_s=args.per_sample_ms / 1e3))
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    sampler = None
    if args.loader == "shardbalance":
        sampler = WeightedDistributedSampler(ds, args.global_batch_size,
                                             accumulation_steps=args.accumulation)
        loader = prepare_dataloader(accelerator, DataLoader(
            ds, batch_sampler=sampler, num_workers=args.num_workers))
        model, opt = accelerator.prepare(model, opt)
        sampler.attach(model)                  # b_i/B weighting + busy-time measurement
    else:  # Accelerate's own: each rank takes B/k of every global batch
        loader = DataLoader(ds, batch_size=args.global_batch_size // world, shuffle=True,
                            num_workers=args.num_workers)
        model, opt, loader = accelerator.prepare(model, opt, loader)

    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        start, total = time.perf_counter(), torch.zeros(())
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            total += loss.detach()
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - start
        mean = accelerator.reduce(total, "mean").item() / len(loader)
        plan = list(sampler.batch_sizes) if sampler is not None else \
            [args.global_batch_size // world] * world
        if accelerator.is_main_process:
            print(f"epoch {epoch} | {seconds:.2f} s | {args.samples / seconds:.0f} samples/s | "
                  f"loss {mean:.4f} | plan {plan}", flush=True)
    if sampler is not None:
        sampler.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
