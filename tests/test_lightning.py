"""PyTorch Lightning through ``ShardBalanceCallback``: real Trainer fits on two gloo ranks.

One torchrun launch (``tests/lightning_run.py``: Lightning's import costs more than its fits)
runs every multi-rank fit; each test checks one invariant of what the ranks recorded from
``training_step``:

- every epoch covers the dataset exactly once, with a worker loader and with accumulation;
- plans move toward the fast rank (emulated speeds 1 and 4);
- ``accumulate_grad_batches=2`` (a short last group too), with ``weighting="hook"`` and
  ``"output"``: the synchronised gradient is the one a single process computes on the same
  samples;
- a mid-epoch resume from Lightning's own checkpoint keeps Lightning's batch count and the
  epoch's length, and trains each remaining sample once; a resume at an epoch boundary trains
  the next epoch's order.

In-process (one device, no launch): the Trainer settings that would silently go wrong are
refused with a clear error.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import _launch  # noqa: E402
from distributed import ROOT  # noqa: E402
from shardbalance import ConfigError, WeightedDistributedSampler  # noqa: E402
from shardbalance.lightning import ShardBalanceCallback  # noqa: E402

import lightning_run as run  # noqa: E402

#: Bound on the launch: importing Lightning takes ~20 s of CPU per rank on a 2-core machine.
LAUNCH_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("lightning")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SHARDBALANCE_LOG": str(out / "coordinator.jsonl")}
    try:
        _launch.torchrun(2, ROOT / "tests" / "lightning_run.py", ["--out", str(out)],
                         LAUNCH_TIMEOUT_S, name="lightning fits", env=env, merge_output=True)
    except _launch.LaunchError as exc:
        raise AssertionError(str(exc)) from None
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _global_batches(ranks: list[dict], fit: str, epoch: int) -> dict[int, list[int]]:
    """``batch index -> the samples every rank trained in it`` for one epoch of one fit."""
    batches: dict[int, list[int]] = {}
    for result in ranks:
        for record in result[fit]:
            if record["epoch"] == epoch:
                batches.setdefault(record["batch"], []).extend(record["indices"])
    return batches


def _epochs(ranks: list[dict], fit: str) -> list[int]:
    return sorted({record["epoch"] for record in ranks[0][fit]})


def _exactly_once(samples: list[int]) -> bool:
    return Counter(samples) == Counter(range(run.N))


@pytest.mark.parametrize("fit", ["accumulate", "output", "first"])
def test_every_epoch_covers_the_dataset_exactly_once(ranks, fit):
    steps = run.N // run.B
    for epoch in _epochs(ranks, fit):
        batches = _global_batches(ranks, fit, epoch)
        assert sorted(batches) == list(range(steps))
        assert all(len(samples) == run.B for samples in batches.values())
        assert _exactly_once([i for samples in batches.values() for i in samples]), epoch
    assert all(r["num_batches"] == steps for result in ranks for r in result[fit])


@pytest.mark.parametrize("fit", ["accumulate", "first"])
def test_plans_move_toward_the_fast_rank(ranks, fit):
    last = _epochs(ranks, fit)[-1]
    slow, fast = ([len(r["indices"]) for r in result[fit] if r["epoch"] == last]
                  for result in ranks)
    assert all(f > s for s, f in zip(slow, fast)), (slow, fast)
    first_epoch = [len(r["indices"]) for r in ranks[1][fit] if r["epoch"] == 0]
    assert first_epoch[0] == run.B // 2  # started from the equal split


@pytest.mark.parametrize("fit", ["accumulate", "output"])
def test_accumulated_gradient_equals_one_process(ranks, fit):
    x, y, _ = run.dataset().tensors
    steps = ranks[0][f"{fit}_steps"]
    assert len(steps) == 3 * len(_epochs(ranks, fit))  # groups of 2, 2 and 1 batches
    for step, other in zip(steps, ranks[1][f"{fit}_steps"]):
        batches = _global_batches(ranks, fit, step["epoch"])
        last = step["last_batch"]
        group = [b for b in batches if b // 2 == last // 2]
        model = run.network()
        with torch.no_grad():
            for p, value in zip(model.parameters(), step["params"]):
                p.copy_(torch.tensor(value))
        for b in group:
            samples = torch.tensor(batches[b])
            # Lightning divides every batch's loss by accumulate_grad_batches.
            (F.cross_entropy(model(x[samples]), y[samples]) / 2).backward()
        for p, got, got_other in zip(model.parameters(), step["grads"], other["grads"]):
            torch.testing.assert_close(torch.tensor(got), p.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(torch.tensor(got_other), p.grad, rtol=1e-5, atol=1e-6)


def test_mid_epoch_resume_trains_the_rest_of_the_epoch_once(ranks):
    steps = run.N // run.B
    before = _global_batches(ranks, "first", 1)
    resumed = _global_batches(ranks, "middle", 1)
    # The checkpoint came after two batches of epoch 1: Lightning counts on from there, and
    # the epoch keeps its length.
    assert sorted(resumed) == [2, 3, 4]
    assert all(r["num_batches"] == steps for result in ranks for r in result["middle"])
    assert resumed == {b: before[b] for b in resumed}
    done = [i for b in (0, 1) for i in before[b]]
    assert _exactly_once(done + [i for samples in resumed.values() for i in samples])
    # The epoch after it is a whole one, in its own order.
    assert _global_batches(ranks, "middle", 2) == _global_batches(ranks, "first", 2)


def test_resume_at_an_epoch_boundary_trains_the_next_epochs_order(ranks):
    resumed = _global_batches(ranks, "boundary", 1)
    assert _epochs(ranks, "boundary") == [1]
    assert resumed == _global_batches(ranks, "first", 1)
    assert resumed != _global_batches(ranks, "first", 0)


# -- refused before anything trains (one process, in-process Trainer) ---------------------------


class _OneRank(pl.LightningModule):
    """A module whose loader is a one-rank WeightedDistributedSampler (no coordinator)."""

    def __init__(self, accumulation_steps: int = 1, batch_sampler: bool = True) -> None:
        super().__init__()
        self.net = torch.nn.Linear(run.DIM, run.CLASSES)
        self.accumulation_steps = accumulation_steps
        self.batch_sampler = batch_sampler
        self.sampler = None
        self.trained = 0

    def train_dataloader(self) -> DataLoader:
        data = run.dataset()
        if not self.batch_sampler:
            return DataLoader(data, batch_size=8)
        self.sampler = WeightedDistributedSampler(
            data, 8, num_replicas=1, rank=0, policy="equal",
            accumulation_steps=self.accumulation_steps)
        return DataLoader(data, batch_sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        self.trained += 1
        x, y, _ = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: pl.LightningModule, callback: ShardBalanceCallback, **trainer_args) -> None:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, use_distributed_sampler=False)
    args.update(trainer_args)
    pl.Trainer(callbacks=[callback], **args).fit(module)


def test_a_trainer_that_would_replace_the_sampler_is_refused():
    module = _OneRank()
    with pytest.raises(ConfigError, match=r"use_distributed_sampler=False"):
        _fit(module, ShardBalanceCallback(), use_distributed_sampler=True)
    assert module.trained == 0 and module.sampler is None  # refused before the loader is built


def test_the_default_trainer_is_refused():
    module = _OneRank()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[ShardBalanceCallback()])
    with pytest.raises(ConfigError, match=r"Lightning's default"):
        trainer.fit(module)
    assert module.trained == 0


def test_accumulation_with_the_hook_needs_accumulation_steps():
    module = _OneRank(accumulation_steps=1)
    with pytest.raises(ConfigError, match=r"accumulation_steps=2 .*it has 1"):
        _fit(module, ShardBalanceCallback(), accumulate_grad_batches=2)
    assert module.trained == 0
    module = _OneRank(accumulation_steps=2)
    _fit(module, ShardBalanceCallback(), accumulate_grad_batches=2)
    assert module.trained == run.N // 8
    module = _OneRank(accumulation_steps=1)
    _fit(module, ShardBalanceCallback(weighting="output"), accumulate_grad_batches=2)
    assert module.trained == run.N // 8


def test_a_loader_without_the_sampler_is_refused():
    module = _OneRank(batch_sampler=False)
    with pytest.raises(ConfigError, match=r"batch_sampler=sampler"):
        _fit(module, ShardBalanceCallback())
    assert module.trained == 0


def test_a_sampler_other_than_the_loaders_is_refused():
    other = WeightedDistributedSampler(run.dataset(), 8, num_replicas=1, rank=0, policy="equal")
    module = _OneRank()
    with pytest.raises(ConfigError, match=r"not the one this ShardBalanceCallback holds"):
        _fit(module, ShardBalanceCallback(other))
    assert module.trained == 0


def test_the_epoch_is_set_every_epoch_and_the_loader_is_left_as_it_was():
    module = _OneRank()
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append((trainer.current_epoch, module.sampler.epoch, batch[2].tolist()))

    pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, use_distributed_sampler=False,
               callbacks=[ShardBalanceCallback(), Watch()]).fit(module)
    assert [(e, s) for e, s, _ in seen] == [(0, 0), (1, 1), (2, 2)]
    assert len({tuple(first) for _, _, first in seen}) == 3  # a new order every epoch
    assert "train_dataloader" not in vars(module)  # the callback's wrapper is gone


@pytest.mark.parametrize("bad", [dict(sampler=object()), dict(weighting="sum")])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ConfigError, match=r"object|'sum'"):
        ShardBalanceCallback(**bad)


def test_resume_from_an_end_of_epoch_checkpoint_trains_the_next_epochs_order(tmp_path):
    """ModelCheckpoint's default (saved at the end of each epoch): Lightning restores no loader
    state then and starts the loader's iterator before any epoch hook; the callback's own
    checkpoint state sets the sampler's epoch first."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs, **fit_args):
        module, seen = _OneRank(), []

        class Watch(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append((trainer.current_epoch, batch_idx, batch[2].tolist()))

        saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
        pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   use_distributed_sampler=False, default_root_dir=tmp_path,
                   callbacks=[ShardBalanceCallback(), Watch(), saver]).fit(module, **fit_args)
        return seen

    full = fit(2)
    resumed = fit(2, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert resumed == [record for record in full if record[0] == 1]
    assert resumed[0][2] != full[0][2]
