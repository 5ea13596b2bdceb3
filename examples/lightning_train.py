"""Train a small model with PyTorch Lightning and shardbalance, on CPUs (gloo) or GPUs.

    # CPU: three ranks emulating GPUs of relative speed 1, 2 and 4
    torchrun --nproc_per_node=3 examples/lightning_train.py --emulate-speeds 1,2,4
    # the same emulated cluster with Lightning's own DistributedSampler, to compare
    torchrun --nproc_per_node=3 examples/lightning_train.py --emulate-speeds 1,2,4 \
        --sampler distributed
    # gradient accumulation: the sampler gets accumulation_steps=K (weighting="hook")
    torchrun --nproc_per_node=3 examples/lightning_train.py --emulate-speeds 1,2,4 --accumulate 2
    # Lightning's own launcher instead of torchrun
    python examples/lightning_train.py --devices 2 --emulate-speeds 1,3

The model and the data are built in code (a fixed random teacher network labels Gaussian
inputs): nothing to download. Rank 0 prints one line per epoch: time, throughput, loss and the
plan. ``--metrics-out FILE`` also appends those lines as JSON (for benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from shardbalance import WeightedDistributedSampler
from shardbalance.emulate import EmulatedSpeed, parse_speeds
from shardbalance.lightning import ShardBalanceCallback


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sampler", choices=["weighted", "distributed"], default="weighted")
    p.add_argument("--devices", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="processes (default: torchrun's WORLD_SIZE)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples", type=int, default=6144, help="dataset size N")
    p.add_argument("--global-batch-size", type=int, default=192)
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--weighting", choices=["hook", "output"], default="hook")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--emulate-speeds", default=None,
                   help="comma-separated relative speeds, one per rank (CPU emulation)")
    p.add_argument("--per-sample-ms", type=float, default=2.0,
                   help="emulated compute per sample at speed 1")
    p.add_argument("--overhead-ms", type=float, default=5.0, help="emulated fixed cost per step")
    p.add_argument("--metrics-out", default=None, help="rank 0 appends one JSON line per epoch")
    return p.parse_args(argv)


def make_dataset(num_samples: int, dim: int = 32, classes: int = 10) -> TensorDataset:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, dim, generator=gen)
    teacher = torch.randn(dim, classes, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(num_samples, classes, generator=gen)).argmax(dim=1)
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.dataset = make_dataset(args.samples)
        self.speed = torch.nn.Identity()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 10))

    def setup(self, stage: str) -> None:
        if self.args.emulate_speeds:  # the rank is known here
            speeds = parse_speeds(self.args.emulate_speeds, self.trainer.world_size)
            self.speed = EmulatedSpeed(speeds[self.trainer.global_rank],
                                       self.args.per_sample_ms / 1e3, self.args.overhead_ms / 1e3)

    def train_dataloader(self) -> DataLoader:
        args = self.args
        if args.sampler == "distributed":  # Lightning injects its DistributedSampler
            return DataLoader(self.dataset, batch_size=args.global_batch_size // args.devices,
                              shuffle=True, num_workers=args.num_workers)
        # The process group exists here: the sampler agrees its settings with the other ranks.
        sampler = WeightedDistributedSampler(self.dataset, args.global_batch_size,
                                             seed=args.seed, accumulation_steps=args.accumulate)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=args.num_workers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(self.speed(x)), y)  # the mean over the local batch
        self.log("loss", loss, sync_dist=False, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.args.lr)


class EpochReport(pl.Callback):
    """Rank 0: one line per epoch (and a JSON line with ``--metrics-out``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        seconds = time.perf_counter() - self.start
        loader = trainer.train_dataloader
        sampler = loader.batch_sampler
        plan = list(sampler.batch_sizes) if isinstance(sampler, WeightedDistributedSampler) \
            else [self.args.global_batch_size // trainer.world_size] * trainer.world_size
        samples = len(loader) * self.args.global_batch_size
        loss = float(trainer.callback_metrics.get("loss", float("nan")))
        print(f"epoch {trainer.current_epoch}: {seconds:.2f} s, {samples / seconds:.0f} "
              f"samples/s, loss {loss:.4f}, plan {plan}", flush=True)
        if self.args.metrics_out:
            with open(self.args.metrics_out, "a") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, "seconds": seconds,
                                    "samples_per_s": samples / seconds, "loss": loss,
                                    "plan": plan, "sampler": self.args.sampler}) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    weighted = args.sampler == "weighted"
    callbacks = [EpochReport(args)]
    if weighted:
        callbacks.insert(0, ShardBalanceCallback(weighting=args.weighting))
    trainer = pl.Trainer(
        accelerator="auto", devices=args.devices, strategy="ddp", max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        # shardbalance's sampler splits the batches: Lightning must not replace it.
        use_distributed_sampler=not weighted,
        callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(args))


if __name__ == "__main__":
    main()
