"""Train a tiny GPT-2 with the Hugging Face Trainer and shardbalance, on CPUs or GPUs.

    # CPU: two ranks emulating GPUs of relative speed 1 and 4 (or three: 1,2,4)
    torchrun --nproc_per_node=2 examples/hf_trainer.py --emulate-speeds 1,4
    # the same cluster with the plain Trainer (DistributedSampler, even split), to compare
    torchrun --nproc_per_node=2 examples/hf_trainer.py --emulate-speeds 1,4 --trainer plain
    # resume from the Trainer's newest checkpoint in --output-dir
    torchrun --nproc_per_node=2 examples/hf_trainer.py --emulate-speeds 1,4 --resume

The model is built from a ``GPT2Config`` in code and the data is generated (random token
sequences), so nothing is downloaded. Rank 0 prints each epoch's time, then the training time
and the last plan.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import Dataset
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments, default_data_collator)

from shardbalance.emulate import EmulatedSpeed, parse_speeds
from shardbalance.transformers import ShardBalanceTrainer


class RandomTokens(Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.ids = torch.randint(vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class EpochTimes(TrainerCallback):
    """Rank 0 prints each epoch's seconds (the line the benchmark reads)."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"epoch {round(state.epoch) - 1} | {time.perf_counter() - self.start:.2f} s",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trainer", choices=["shardbalance", "plain"], default="shardbalance")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--per-device-batch-size", type=int, default=16)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--output-dir", default="hf_trainer_out")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint")
    p.add_argument("--emulate-speeds", default=None,
                   help="comma-separated relative speeds, one per rank (CPU emulation)")
    p.add_argument("--per-sample-ms", type=float, default=2.0)
    args = p.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=1,
                                       n_head=2))
    if args.emulate_speeds:
        emulated = EmulatedSpeed(parse_speeds(args.emulate_speeds, world)[rank],
                                 per_sample_s=args.per_sample_ms / 1e3)

        def emulate(module, args, kwargs):
            emulated(kwargs["input_ids"])     # sleeps as a GPU of this speed would compute

        model.register_forward_pre_hook(emulate, with_kwargs=True)
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs,
        per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=1e-3,
        dataloader_num_workers=args.num_workers, save_strategy="epoch", logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo")
    cls = ShardBalanceTrainer if args.trainer == "shardbalance" else Trainer
    trainer = cls(model=model, args=training_args, data_collator=default_data_collator,
                  train_dataset=RandomTokens(args.samples, 16, 256), callbacks=[EpochTimes()])
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=True if args.resume else None)
    seconds = time.perf_counter() - start
    if rank == 0:
        plan = getattr(trainer, "shardbalance_sampler", None)
        plan = list(plan.batch_sizes) if plan is not None else [args.per_device_batch_size] * world
        weighting = getattr(trainer, "shardbalance_weighting", None)
        print(f"{args.trainer} | {seconds:.2f} s | loss {output.training_loss:.4f} | "
              f"last plan {plan} | weighting {weighting}", flush=True)


if __name__ == "__main__":
    main()
