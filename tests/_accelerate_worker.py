"""One rank of the Accelerate test (tests/test_accelerate.py), started by torchrun.

    --phase train:  3 epochs with accelerator.accumulate() (2 batches per step), num_workers=2,
                    emulated speeds 1 and 4; accelerator.save_state() after the second optimizer
                    step of epoch 1; a pad=True evaluation gathered with gather_for_metrics; the
                    loader accelerator.prepare() makes, refused.
    --phase resume: accelerator.load_state() of that checkpoint, then train to the end.

Rank 0 writes what the test checks to ``--out``/<phase>.json: every optimizer step's global
sample indices (gathered from the training step), the plans, the final parameters and their
largest difference from one process replaying the same steps on the whole global batches.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from shardbalance import ConfigError, WeightedDistributedSampler
from shardbalance.accelerate import prepare_dataloader
from shardbalance.emulate import EmulatedSpeed

N, B, STEPS_PER_GROUP, EPOCHS, LR = 96, 12, 2, 3, 0.1
SPEEDS = (1.0, 4.0)


class Indexed(Dataset):
    """Fixed Gaussian inputs, a teacher's targets, and each sample's index."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def build_model(speed: float | None = None) -> torch.nn.Sequential:
    torch.manual_seed(0)
    emulated = torch.nn.Identity() if speed is None else \
        EmulatedSpeed(speed, per_sample_s=0.01, overhead_s=0.002)
    return torch.nn.Sequential(emulated, torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def replay(groups: list[list[int]], ds: Indexed, start: dict | None) -> torch.nn.Module:
    """One process: SGD on the mean loss of every optimizer step's whole set of samples."""
    model = build_model()
    if start is not None:
        model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for idx in groups:
        x, y = ds.x[idx], ds.y[idx]
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["train", "resume"], required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=STEPS_PER_GROUP)
    rank, world = accelerator.process_index, accelerator.num_processes
    ds = Indexed(N)
    result: dict = {"rank_errors": []}

    if args.phase == "train":
        # The silent failure of the issue: prepare() re-shards the sampler; refused on every rank.
        other = WeightedDistributedSampler(ds, B, policy="equal")
        try:
            next(iter(accelerator.prepare(DataLoader(ds, batch_sampler=other))))
            result["prepare_refused"] = ""
        except ConfigError as exc:
            result["prepare_refused"] = str(exc)

    sampler = WeightedDistributedSampler(ds, B, accumulation_steps=STEPS_PER_GROUP, seed=3,
                                         rebalance_every=4, policy="proportional")
    loader = prepare_dataloader(accelerator, DataLoader(ds, batch_sampler=sampler, num_workers=2))
    model = build_model(SPEEDS[rank])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt = accelerator.prepare(model, opt)
    sampler.attach(model)
    start_state = None
    first_epoch = 0
    ckpt = os.path.join(args.out, "ckpt")
    if args.phase == "resume":
        accelerator.load_state(ckpt)
        first_epoch = sampler.epoch
        start_state = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        result["resumed_at"] = sampler.state_dict()
        result["resumed_len"] = len(loader)

    # (epoch, optimizer step of the run, indices) of this rank; gathered after training, so no
    # collective outside backward disturbs the busy-time measurement.
    mine: list[tuple[int, int, list[int]]] = []
    plans = {}
    saved_after = None
    step = 0
    for epoch in range(first_epoch, EPOCHS):
        sampler.set_epoch(epoch)
        steps_this_epoch = 0
        for x, y, idx in loader:
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                mine.append((epoch, step, idx.tolist()))
                if accelerator.sync_gradients:
                    step += 1
                    steps_this_epoch += 1
                opt.step()
                opt.zero_grad()
            if args.phase == "train" and epoch == 1 and steps_this_epoch == 2 and \
                    accelerator.sync_gradients and saved_after is None:
                accelerator.save_state(ckpt)
                saved_after = step
        plans[epoch] = list(sampler.batch_sizes)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    merged: dict[int, tuple[int, list[int]]] = {}
    for part in everyone:
        for epoch, s, idx in part:
            merged.setdefault(s, (epoch, []))[1].extend(idx)
    groups = [merged[s] for s in sorted(merged)]
    result.update(groups=groups, plans=plans, saved_after=saved_after)
    unwrapped = accelerator.unwrap_model(model)
    result["params"] = [p.detach().flatten().tolist() for p in unwrapped.parameters()]
    reference = replay([g for _, g in groups], ds, start_state)
    result["max_param_diff"] = max(
        (a.detach() - b.detach()).abs().max().item()
        for a, b in zip(unwrapped.parameters(), reference.parameters()))

    if args.phase == "train":
        # Evaluation over uneven batches (1:3) with a padded last global batch: gathered rows
        # of each sample once, the padding dropped by gather_for_metrics.
        eval_ds = Indexed(30, seed=1)
        eval_sampler = WeightedDistributedSampler(eval_ds, B, shuffle=False, policy="static",
                                                  initial_weights=[1, 3])
        eval_loader = prepare_dataloader(accelerator, DataLoader(eval_ds, batch_sampler=eval_sampler))
        seen, sizes = [], []
        model.eval()
        with torch.no_grad():
            for x, y, idx in eval_loader:
                sizes.append(len(idx))
                seen.extend(accelerator.gather_for_metrics(idx, use_gather_object=True))
        result["eval_seen"] = [int(i) for i in seen]
        result["eval_sizes"] = sizes
    sampler.close()
    if rank == 0:
        with open(os.path.join(args.out, f"{args.phase}.json"), "w") as f:
            json.dump(result, f)
    else:
        with open(os.path.join(args.out, f"{args.phase}.rank{rank}.json"), "w") as f:
            json.dump({"eval_sizes": result.get("eval_sizes"),
                       "prepare_refused": result.get("prepare_refused")}, f)
    # DDP objects go before the process group, or gloo's teardown can hang at exit.
    accelerator.free_memory()
    del model, opt, unwrapped
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
