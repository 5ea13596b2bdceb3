"""Lightning fits on real gloo ranks for tests/test_lightning.py (run under torchrun).

    torchrun --nproc_per_node=2 tests/lightning_run.py --out DIR

Several fits in one launch (importing Lightning costs more than the fits), emulated speeds 1
and 4; each rank writes what every ``training_step`` trained (epoch, batch index, sample
indices, the loader length Lightning uses) to ``DIR/rank<r>.json``:

- ``accumulate``: ``accumulate_grad_batches=2`` (each epoch's last group is short) with a
  worker loader; at every optimizer step also the parameters and the synchronised gradient.
  ``output``: the same with ``weighting="output"`` and a sampler without accumulation_steps.
- ``first``: no accumulation, a checkpoint after every step; ``middle`` resumes from one in
  the middle of epoch 1, ``boundary`` from the end of epoch 0 (a new Trainer, module and
  sampler each, as a restarted job has).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from shardbalance import WeightedDistributedSampler
from shardbalance.emulate import EmulatedSpeed
from shardbalance.lightning import ShardBalanceCallback

N, B, DIM, CLASSES = 80, 16, 8, 3


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, DIM, generator=gen),
                         torch.randint(0, CLASSES, (N,), generator=gen), torch.arange(N))


def network() -> torch.nn.Sequential:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, CLASSES))


class Recorder(pl.LightningModule):
    def __init__(self, speed: float, num_workers: int, accumulate: int = 1,
                 record_grads: bool = False, accumulation_steps: int | None = None) -> None:
        super().__init__()
        self.accumulation_steps = accumulate if accumulation_steps is None \
            else accumulation_steps
        self.speed = EmulatedSpeed(speed, per_sample_s=0.01, overhead_s=0.002)
        self.accumulate = accumulate
        self.net = network()
        self.num_workers = num_workers
        self.record_grads = record_grads
        self.trained: list[dict] = []
        self.steps: list[dict] = []

    def train_dataloader(self) -> DataLoader:
        data = dataset()
        sampler = WeightedDistributedSampler(data, B, accumulation_steps=self.accumulation_steps, seed=5,
                                             timeout_s=30)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.trained.append({"epoch": self.current_epoch, "batch": batch_idx,
                             "indices": idx.tolist(),
                             "num_batches": self.trainer.num_training_batches})
        return F.cross_entropy(self.net(self.speed(x)), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.record_grads:
            self.steps.append({
                "epoch": self.current_epoch, "last_batch": self.trained[-1]["batch"],
                "params": [p.detach().clone().tolist() for p in self.net.parameters()],
                "grads": [p.grad.detach().clone().tolist() for p in self.net.parameters()]})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: Recorder, epochs: int, callbacks=(), ckpt_path=None, weighting="hook") -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]),
                         strategy="ddp", use_distributed_sampler=False, max_epochs=epochs,
                         accumulate_grad_batches=module.accumulate,
                         callbacks=[ShardBalanceCallback(weighting=weighting), *callbacks], logger=False,
                         enable_checkpointing=bool(callbacks), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, ckpt_path=ckpt_path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--speeds", default="1,4")
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    speed = float(args.speeds.split(",")[rank])
    out = Path(args.out)
    accumulate = Recorder(speed, num_workers=2, accumulate=2, record_grads=True)
    fit(accumulate, 3)
    # weighting="output" weights each batch itself: no accumulation_steps needed.
    output = Recorder(speed, num_workers=0, accumulate=2, record_grads=True,
                      accumulation_steps=1)
    fit(output, 2, weighting="output")
    ckpt_dir = out / "ckpt"
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1,
                            filename="{epoch}-{step}")
    first = Recorder(speed, num_workers=0)
    fit(first, 4, callbacks=[saver])
    # Epoch 1 runs steps 6-10: after step 7 two of its batches are trained.
    middle = Recorder(speed, num_workers=2)
    fit(middle, 3, ckpt_path=str(ckpt_dir / "epoch=1-step=7.ckpt"))
    boundary = Recorder(speed, num_workers=0)
    fit(boundary, 2, ckpt_path=str(ckpt_dir / "epoch=0-step=5.ckpt"))
    result = {"accumulate": accumulate.trained, "accumulate_steps": accumulate.steps,
              "output": output.trained, "output_steps": output.steps,
              "first": first.trained, "middle": middle.trained, "boundary": boundary.trained}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
