"""Accelerate: ``prepare_dataloader`` in one process, and real 2-rank runs under torchrun.

The multi-rank test launches ``tests/_accelerate_worker.py`` twice (train, then resume from
``accelerator.save_state``) and checks what rank 0 gathered from the training steps.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.data_loader import BatchSamplerShard  # noqa: E402

import _launch  # noqa: E402
from distributed import ROOT  # noqa: E402
from shardbalance import ConfigError, WeightedDistributedSampler  # noqa: E402
from shardbalance.accelerate import prepare_dataloader  # noqa: E402


def local_sampler(n=10, b=4, **kwargs):
    kwargs.setdefault("policy", "equal")
    return WeightedDistributedSampler(TensorDataset(torch.arange(n)), b, num_replicas=1,
                                      rank=0, **kwargs)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_prepared_loader_keeps_accelerate_bookkeeping_without_resharding(accelerator):
    sampler = local_sampler(10, 4)
    loader = prepare_dataloader(accelerator, DataLoader(sampler_dataset(sampler),
                                                        batch_sampler=sampler))
    assert loader in accelerator._dataloaders
    assert any(obj is sampler for obj in accelerator._custom_objects)
    state = accelerator.gradient_state
    seen, ends, gathered = [], [], []
    for (x,) in loader:
        assert state.in_dataloader and state.active_dataloader is loader
        seen.append(x.tolist())
        ends.append(state.end_of_dataloader)
        gathered.extend(accelerator.gather_for_metrics(x, use_gather_object=True))
    assert [len(b) for b in seen] == [4, 4, 4]          # the sampler's batches, all of them
    assert ends == [False, False, True]
    assert not state.in_dataloader
    # The last global batch is padded with 2 samples from the start; gather_for_metrics drops them.
    assert sorted(int(i) for i in gathered) == list(range(10))
    assert prepare_dataloader(accelerator, loader) is loader


def sampler_dataset(sampler):
    return TensorDataset(torch.arange(sampler.num_samples))


def test_accelerator_prepare_of_a_shardbalance_loader_is_refused_naming_the_fix(accelerator):
    sampler = local_sampler()
    loader = accelerator.prepare(DataLoader(sampler_dataset(sampler), batch_sampler=sampler))
    with pytest.raises(ConfigError, match="prepare_dataloader"):
        next(iter(loader))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_batch_sampler_shard_is_refused_before_any_batch(num_workers):
    # What accelerator.prepare() builds on 2 processes, made by hand on one.
    sampler = WeightedDistributedSampler(TensorDataset(torch.arange(16)), 8, num_replicas=2,
                                         rank=0, policy="equal")
    loader = DataLoader(TensorDataset(torch.arange(16)),
                        batch_sampler=BatchSamplerShard(sampler, num_processes=2, process_index=0),
                        num_workers=num_workers)
    with pytest.raises(ConfigError, match="BatchSamplerShard.*prepare_dataloader"):
        next(iter(loader))
    assert len(sampler.ledger) == 0


def test_skip_first_batches_is_refused_the_sampler_resumes_itself(accelerator):
    sampler = local_sampler(12, 4)
    loader = prepare_dataloader(accelerator, DataLoader(sampler_dataset(sampler),
                                                        batch_sampler=sampler))
    with pytest.raises(ConfigError, match="skip_first_batches.*load_state_dict"):
        next(iter(accelerator.skip_first_batches(loader, 1)))


def test_the_samplers_epoch_wins_over_the_loaders_count_of_passes(accelerator):
    sampler = local_sampler(12, 4)
    loader = prepare_dataloader(accelerator, DataLoader(sampler_dataset(sampler),
                                                        batch_sampler=sampler))
    epoch0 = [b[0].tolist() for b in loader]
    epoch1 = [b[0].tolist() for b in loader]          # Accelerate advances the epoch itself
    assert sampler.epoch == 1 and epoch0 != epoch1
    # A resume mid-epoch (what accelerator.load_state() does): epoch 0, after one step.
    sampler.load_state_dict({**sampler.state_dict(), "epoch": 0, "position": 4})
    assert [b[0].tolist() for b in loader] == epoch0[1:]
    sampler.set_epoch(5)
    assert len(list(loader)) == 3 and sampler.epoch == 5


def test_bad_loaders_are_refused_with_the_reason(accelerator):
    sampler = local_sampler()
    ds = sampler_dataset(sampler)
    with pytest.raises(ConfigError, match="sampler=: pass it as batch_sampler="):
        prepare_dataloader(accelerator, DataLoader(ds, sampler=sampler))
    with pytest.raises(ConfigError, match="batch_sampler is BatchSampler"):
        prepare_dataloader(accelerator, DataLoader(ds, batch_size=2))
    with pytest.raises(ConfigError, match="in_order=False"):
        prepare_dataloader(accelerator, DataLoader(ds, batch_sampler=sampler, num_workers=1,
                                                   in_order=False))
    with pytest.raises(ConfigError, match="num_replicas=2"):
        prepare_dataloader(accelerator, DataLoader(ds, batch_sampler=WeightedDistributedSampler(
            ds, 4, num_replicas=2, rank=1, policy="equal")))
    with pytest.raises(ConfigError, match="torch DataLoader, got list"):
        prepare_dataloader(accelerator, [])


def _launch_worker(phase: str, out) -> dict:
    _launch.torchrun(2, ROOT / "tests" / "_accelerate_worker.py",
                     ["--phase", phase, "--out", str(out)], timeout_s=240, merge_output=True)
    return json.loads((out / f"{phase}.json").read_text())


def test_two_ranks_accumulate_exactly_cover_each_epoch_balance_and_resume(tmp_path):
    train = _launch_worker("train", tmp_path)
    rank1 = json.loads((tmp_path / "train.rank1.json").read_text())
    # accelerator.prepare() of a shardbalance loader: refused on every rank, naming the fix.
    for said in (train["prepare_refused"], rank1["prepare_refused"]):
        assert "BatchSamplerShard" in said and "prepare_dataloader" in said
    groups = train["groups"]
    # 96 samples, B = 12, 2 batches per optimizer step: 4 steps per epoch, each 24 samples.
    assert [e for e, _ in groups] == [0] * 4 + [1] * 4 + [2] * 4
    for epoch in range(3):
        trained = [i for e, g in groups if e == epoch for i in g]
        assert sorted(trained) == list(range(96)), f"epoch {epoch} not covered exactly once"
    # Emulated speeds 1 and 4: the plan moves toward rank 1 and still sums to B.
    last = train["plans"]["2"]
    assert sum(last) == 12 and last[1] > last[0]
    # The gradient of every optimizer step is the mean over its 24 samples (one process).
    assert train["max_param_diff"] < 1e-5
    # gather_for_metrics over uneven batches (3 and 9 a step), padded last global batch.
    assert train["eval_sizes"] == [3, 3, 3] and rank1["eval_sizes"] == [9, 9, 9]
    assert sorted(train["eval_seen"]) == list(range(30))

    # Resume from accelerator.save_state() taken after 2 of epoch 1's 4 optimizer steps.
    resumed = _launch_worker("resume", tmp_path)
    assert resumed["resumed_at"]["epoch"] == 1 and resumed["resumed_at"]["position"] == 48
    assert resumed["resumed_len"] == 4                  # the 4 batches left of epoch 1
    before = [i for e, g in groups[:train["saved_after"]] if e == 1 for i in g]
    after = [i for e, g in resumed["groups"] if e == 1 for i in g]
    assert Counter(before + after) == Counter(range(96))
    assert len(resumed["groups"]) == 6
    assert resumed["max_param_diff"] < 1e-5
    # The same global steps, whatever plans the resumed run took: the same final model.
    assert max(abs(a - b) for pa, pb in zip(train["params"], resumed["params"])
               for a, b in zip(pa, pb)) < 1e-5
