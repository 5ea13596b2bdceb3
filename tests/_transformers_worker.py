"""One rank of the HF Trainer test (tests/test_transformers.py), started by torchrun.

A 1-layer GPT-2 built from a config (nothing downloaded) learns 64 sequences of 8 tokens whose
first token is the sample's index, so the training step itself says which samples it trained.

    --phase train:  ShardBalanceTrainer, 3 epochs, per-device batch 4 (B = 8), 2 batches per
                    optimizer step, dataloader_num_workers=2, emulated speeds 1 and 4, the
                    Trainer's global token average (weighting "none"); checkpoints every 6 steps.
    --phase resume: from checkpoint-6 (epoch 1, after 2 of its 4 steps), with a model whose
                    loss is a local mean (model_accepts_loss_kwargs=False: weighting b_i/B).

Rank 0 writes ``--out``/<phase>.json: every optimizer step's global sample indices, the plans,
the weighting, the final parameters and their largest difference from one process replaying
the same optimizer steps on their whole sets of samples.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import (GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments,
                          default_data_collator)

from shardbalance.emulate import EmulatedSpeed
from shardbalance.transformers import ShardBalanceTrainer

N, LENGTH, PER_DEVICE, STEPS_PER_GROUP, EPOCHS, LR = 64, 8, 4, 2, 3, 0.1
SPEEDS = (1.0, 4.0)


class Sequences(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(N, 128, (N, LENGTH), generator=g)
        self.ids[:, 0] = torch.arange(N)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].clone()
        labels[0] = -100   # the index token is not predicted: 7 labels a sequence, however counted
        return {"input_ids": self.ids[i], "labels": labels}


def build_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class Plans(TrainerCallback):
    def __init__(self) -> None:
        self.trainer = None
        self.plans: dict[int, list[int]] = {}

    def on_epoch_end(self, args, state, control, **kwargs):
        self.plans[round(state.epoch) - 1] = list(self.trainer.shardbalance_sampler.batch_sizes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["train", "resume"], required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    resume = args.phase == "resume"
    run_dir = os.path.join(args.out, "run")
    ds = Sequences()
    model = build_model()
    model.emulated_speed = EmulatedSpeed(SPEEDS[rank], per_sample_s=0.02, overhead_s=0.002)
    trained: list[tuple[int, list[int]]] = []
    plans = Plans()
    training_args = TrainingArguments(
        output_dir=run_dir, per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=STEPS_PER_GROUP, num_train_epochs=EPOCHS,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, logging_strategy="no", save_strategy="steps", save_steps=6,
        report_to=[], dataloader_num_workers=0 if resume else 2, use_cpu=True,
        ddp_backend="gloo", seed=0, disable_tqdm=True,
        average_tokens_across_devices=not resume)
    trainer = ShardBalanceTrainer(model=model, args=training_args, train_dataset=ds,
                                  data_collator=default_data_collator, callbacks=[plans],
                                  sampler_kwargs={"rebalance_every": 4,
                                                  "policy": "proportional"})
    plans.trainer = trainer
    if resume:
        trainer.model_accepts_loss_kwargs = False   # a loss that is a mean over the local batch

    def record(module, inputs, kwargs):
        ids = kwargs["input_ids"]
        module.emulated_speed(ids)
        if module.training and torch.is_grad_enabled():
            trained.append((trainer.state.global_step, ids[:, 0].tolist()))

    model.register_forward_pre_hook(record, with_kwargs=True)
    checkpoint = os.path.join(run_dir, "checkpoint-6") if resume else None
    trainer.train(resume_from_checkpoint=checkpoint)

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, trained)
    if rank == 0:
        steps: dict[int, list[int]] = {}
        for part in everyone:
            for step, ids in part:
                steps.setdefault(step, []).extend(ids)
        groups = [steps[s] for s in sorted(steps)]
        reference = build_model()
        if resume:
            reference = GPT2LMHeadModel.from_pretrained(checkpoint)
        opt = torch.optim.SGD(reference.parameters(), lr=LR)
        for idx in groups:
            batch = [ds[i] for i in idx]
            reference(input_ids=torch.stack([b["input_ids"] for b in batch]),
                      labels=torch.stack([b["labels"] for b in batch])).loss.backward()
            opt.step()
            opt.zero_grad()
        ours = dict(model.named_parameters())
        diff = max((ours[name].detach() - p.detach()).abs().max().item()
                   for name, p in reference.named_parameters())
        result = {"steps": sorted(steps), "groups": groups, "plans": plans.plans,
                  "weighting": trainer.shardbalance_weighting, "max_param_diff": diff,
                  "batches_per_rank": [len(part) for part in everyone],
                  "params": [p.detach().flatten().tolist() for p in model.parameters()],
                  "checkpoints": sorted(os.listdir(run_dir))}
        if not resume:
            with open(os.path.join(run_dir, "checkpoint-6", "shardbalance_sampler.json")) as f:
                result["saved_sampler"] = json.load(f)
        with open(os.path.join(args.out, f"{args.phase}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main()
