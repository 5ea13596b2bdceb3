"""HF Trainer: ``ShardBalanceTrainer`` in one process, and real 2-rank runs under torchrun.

The multi-rank test launches ``tests/_transformers_worker.py`` twice: training with the
Trainer's global token average, then resuming from the Trainer's own mid-epoch checkpoint with
a loss that is a local mean; rank 0 reports what the training steps trained.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (GPT2Config, GPT2LMHeadModel, TrainingArguments,  # noqa: E402
                          default_data_collator)

import _launch  # noqa: E402
from distributed import ROOT  # noqa: E402
from shardbalance import ConfigError, WeightedDistributedSampler  # noqa: E402
from shardbalance.transformers import SAMPLER_STATE_NAME, ShardBalanceTrainer  # noqa: E402


class Tokens(Dataset):
    def __init__(self, n: int = 20) -> None:
        self.ids = torch.arange(n * 4).reshape(n, 4) % 32
        self.ids[:, 0] = torch.arange(n)   # the first token says which sample it is

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_trainer(tmp_path, **kwargs) -> ShardBalanceTrainer:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=4, n_embd=8, n_layer=1,
                                       n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, use_cpu=True, report_to=[],
                             disable_tqdm=True, seed=7)
    return ShardBalanceTrainer(model=model, args=args, train_dataset=kwargs.pop("ds", Tokens()),
                               data_collator=default_data_collator, **kwargs)


def test_the_training_loader_is_the_sampler_unsharded(tmp_path):
    trainer = tiny_trainer(tmp_path, sampler_kwargs={"drop_last": True})
    loader = trainer.get_train_dataloader()
    sampler = trainer.shardbalance_sampler
    assert isinstance(sampler, WeightedDistributedSampler)
    assert sampler.global_batch_size == 3 and sampler.accumulation_steps == 2
    assert sampler.seed == 7 and sampler.policy == "equal" and sampler.drop_last
    batches = [b["input_ids"] for b in loader]
    assert len(batches) == len(loader) == 6
    trained = torch.cat(batches)[:, 0].tolist()
    assert len(trained) == len(set(trained)) == 18         # 6 steps of B = 3, each sample once
    assert loader in trainer.accelerator._dataloaders
    sampler.close()


def test_one_weighting_chosen_from_how_the_trainer_normalises_the_loss(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert trainer.model_accepts_loss_kwargs and trainer.args.average_tokens_across_devices
    count = torch.tensor(12)
    assert trainer._weighting_for(count) == "none"          # global token average: no b_i/B
    trainer.args.average_tokens_across_devices = False
    assert trainer._weighting_for(count) == "tokens"        # this rank's own token count
    assert trainer._weighting_for(None) == "samples"        # a local mean: b_i/B
    trainer.model_accepts_loss_kwargs = False
    assert trainer._weighting_for(count) == "samples"
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch=None: outputs.loss
    assert trainer._weighting_for(count) == "tokens"


def test_a_checkpoint_whose_sampler_position_disagrees_is_refused(tmp_path):
    trainer = tiny_trainer(tmp_path)
    loader = trainer.get_train_dataloader()
    sampler = trainer.shardbalance_sampler
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    # Saved with a global batch of 6 (2 ranks): 4 batches in are position 24, not 4 × 3.
    (checkpoint / SAMPLER_STATE_NAME).write_text(json.dumps(
        {**sampler.state_dict(), "epoch": 0, "position": 24}))
    with pytest.raises(ConfigError, match="position 24.*position 12.*world size"):
        trainer._run_epoch(model=trainer.model, epoch=0, train_dataloader=loader,
                           steps_in_epoch=7, num_update_steps_per_epoch=4, trial=None,
                           ignore_keys_for_eval=None, start_time=0.0,
                           resume_from_checkpoint=str(checkpoint), epochs_trained=0,
                           steps_trained_in_current_epoch=4)
    assert sampler.state_dict()["position"] == 0           # nothing changed
    sampler.close()


def test_bad_settings_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="sampler_kwargs must not set 'rank'"):
        tiny_trainer(tmp_path, sampler_kwargs={"rank": 1})
    with pytest.raises(ConfigError, match="Invalid sampler_kwargs"):
        tiny_trainer(tmp_path, sampler_kwargs=[("policy", "equal")])

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ()

    trainer = tiny_trainer(tmp_path)
    trainer.train_dataset = Stream()
    with pytest.raises(ConfigError, match="map-style train_dataset"):
        trainer.get_train_dataloader()


def _launch_worker(phase: str, out) -> dict:
    _launch.torchrun(2, ROOT / "tests" / "_transformers_worker.py",
                     ["--phase", phase, "--out", str(out)], timeout_s=300, merge_output=True)
    return json.loads((out / f"{phase}.json").read_text())


def test_two_ranks_train_exactly_balance_and_resume_from_the_trainers_checkpoint(tmp_path):
    train = _launch_worker("train", tmp_path)
    # The Trainer divides by the global token count already: shardbalance only measures.
    assert train["weighting"] == "none"
    # 64 samples, B = 8, 2 batches per optimizer step: 4 steps an epoch, 16 samples each.
    groups = train["groups"]
    assert train["steps"] == list(range(12)) and train["batches_per_rank"] == [24, 24]
    for epoch in range(3):
        trained = [i for g in groups[4 * epoch:4 * epoch + 4] for i in g]
        assert sorted(trained) == list(range(64)), f"epoch {epoch} not covered exactly once"
    # Emulated speeds 1 and 4 (dataloader_num_workers=2): the plan moves toward rank 1.
    last = train["plans"]["2"]
    assert sum(last) == 8 and last[1] > last[0]
    # Each optimizer step's gradient is the token mean over its 16 samples (one process).
    assert train["max_param_diff"] < 1e-5
    assert train["saved_sampler"]["epoch"] == 1 and train["saved_sampler"]["position"] == 32

    # Resume from checkpoint-6 (epoch 1 after 2 of 4 steps) with a local-mean loss (b_i/B).
    resumed = _launch_worker("resume", tmp_path)
    assert resumed["weighting"] == "samples"
    assert resumed["steps"] == list(range(6, 12))
    assert resumed["batches_per_rank"] == [12, 12]          # 4 left of epoch 1, then 8
    epoch1 = groups[4:6] + resumed["groups"][:2]
    assert Counter(i for g in epoch1 for i in g) == Counter(range(64))
    assert sorted(i for g in resumed["groups"][2:] for i in g) == list(range(64))
    assert resumed["max_param_diff"] < 1e-5
    # The same optimizer steps, whatever the plans: the same model as the uninterrupted run.
    assert max(abs(a - b) for pa, pb in zip(train["params"], resumed["params"])
               for a, b in zip(pa, pb)) < 1e-5
