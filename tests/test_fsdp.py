"""FSDP2 and collectives inside the step, on real gloo ranks.

- An FSDP2 (``fully_shard``) model trained with an uneven plan gets the gradient of the mean loss
  over the global batch, also with gradient accumulation (``set_requires_gradient_sync``).
- Collectives inside the step keep ranks in lockstep; compute-only busy time still sees which
  rank is fast, so the plan moves toward it: with FSDP2 (detected), and with an all-reduce in
  the forward of the user's own (``busy="compute"``).
"""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from distributed import free_port, run_ranks
from shardbalance import WeightedDistributedSampler
from shardbalance._compute import lockstep_cause
from shardbalance._exceptions import ConfigError
from shardbalance.emulate import EmulatedSpeed

N, B, DIM, CLASSES = 96, 16, 8, 3


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, DIM, generator=gen),
                         torch.randint(0, CLASSES, (N,), generator=gen), torch.arange(N))


def _layers() -> list[torch.nn.Module]:
    torch.manual_seed(7)
    return [torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, CLASSES)]


def _sharded(*extra: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(*extra, *_layers())
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _full_grads(model) -> list[torch.Tensor]:
    return [p.grad.full_tensor().clone() for p in model.parameters()]


def _fsdp_exact(rank, world):
    data = _data()
    sampler = WeightedDistributedSampler(data, B, policy="static", initial_weights=[1, 3],
                                         seed=3)
    model = _sharded()
    sampler.attach(model)
    batches = iter(DataLoader(data, batch_sampler=sampler))
    x, y, idx = next(batches)
    F.cross_entropy(model(x), y).backward()
    one = (_full_grads(model), idx, sampler.step_weight)
    model.zero_grad(set_to_none=True)
    # Two batches accumulated: the first without reduce-scatter, each loss divided by 2.
    group = []
    for sync in (False, True):
        model.set_requires_gradient_sync(sync)
        x, y, idx = next(batches)
        (F.cross_entropy(model(x), y) / 2).backward()
        group.append(idx)
    accumulated = (_full_grads(model), torch.cat(group), sampler.trained_steps,
                   sampler.state_dict()["position"])
    # A custom divide factor (sum reduction): the output scale follows it.
    summed = _sharded()
    summed.set_gradient_divide_factor(1.0)
    summed_sampler = WeightedDistributedSampler(data, B, policy="static", initial_weights=[1, 3],
                                                seed=3)
    summed_sampler.attach(summed)
    x, y, idx = next(iter(DataLoader(data, batch_sampler=summed_sampler)))
    F.cross_entropy(summed(x), y).backward()
    divided = (_full_grads(summed), idx)
    # accumulate() micro-batches: ranks would run different numbers of forwards, each with
    # FSDP2's all-gathers: refused before the first one, on every rank.
    micro_sampler = WeightedDistributedSampler(data, B, policy="static", initial_weights=[1, 3],
                                               micro_batch_size=4, seed=3)
    try:
        next(micro_sampler.accumulate(DataLoader(data, batch_sampler=micro_sampler), summed))
        micro_refused = None
    except ConfigError as exc:
        micro_refused = str(exc)
    # weighting="hook" means a DDP comm hook: refused for FSDP2 with a clear message.
    try:
        WeightedDistributedSampler(data, B, policy="equal", seed=3).attach(
            _sharded(), weighting="hook")
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    dist.barrier()
    return one, accumulated, refused, (divided, micro_refused)


def _reference(indices: torch.Tensor) -> list[torch.Tensor]:
    x, y, _ = _data().tensors
    model = torch.nn.Sequential(*_layers())
    F.cross_entropy(model(x[indices]), y[indices]).backward()
    return [p.grad for p in model.parameters()]


def test_fsdp2_with_an_uneven_plan_gives_the_global_batch_gradient():
    results = run_ranks(_fsdp_exact, 2, timeout_s=120)
    (one0, acc0, refused0, micro0), (one1, acc1, _, micro1) = results
    assert (len(one0[1]), len(one1[1])) == (4, 12) and (one0[2], one1[2]) == (4 / 16, 12 / 16)
    want = _reference(torch.cat([one0[1], one1[1]]))
    for got in (one0[0], one1[0]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    want = _reference(torch.cat([acc0[1], acc1[1]]))
    for got in (acc0[0], acc1[0]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # Two optimizer steps, three batches trained: the checkpoint counts all three.
    assert acc0[2] == acc1[2] == 2 and acc0[3] == acc1[3] == 3 * B
    assert "weighting='output'" in refused0
    (div0, idx0), refused_micro = micro0
    (div1, idx1), _ = micro1
    want = _reference(torch.cat([idx0, idx1]))
    for got in (div0, div1):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert "accumulate() cannot be used with FSDP2" in refused_micro


class _AllReduceInForward(torch.nn.Module):
    """A collective of the user's own inside the forward: ranks meet in every step."""

    def forward(self, x):
        total = x.detach().sum().reshape(1)
        dist.all_reduce(total)
        return x + 0 * total


def _train_lockstep(rank, world, kind):
    data = _data()
    speed = EmulatedSpeed([1.0, 3.0][rank], per_sample_s=0.003, overhead_s=0.002)
    sampler = WeightedDistributedSampler(data, B, rebalance_every=2, seed=3, timeout_s=30)
    if kind == "fsdp":
        model = _sharded(speed)
        sampler.attach(model)
    else:
        model = DDP(torch.nn.Sequential(speed, _AllReduceInForward(), *_layers()))
        sampler.attach(model, busy="compute")
    loader = DataLoader(data, batch_sampler=sampler)
    plans = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)
            plans.append(sampler.batch_sizes)
    busy = list(sampler.recent_busy)
    del model
    dist.barrier()
    sampler.close()
    return plans, busy


def test_compute_only_busy_time_balances_ranks_held_in_lockstep():
    for kind in ("fsdp", "user collective"):
        (plans, busy0), (plans1, busy1) = run_ranks(_train_lockstep, 2, kind, timeout_s=180)
        assert plans == plans1 and plans[0] == (8, 8)
        # Rank 1 is three times as fast: the plan moves toward it and stays there.
        assert plans[-1][1] > plans[-1][0] + 2, (kind, plans)
        # What each rank reported is its own compute: the slow rank's per-sample time is
        # about three times the fast one's (in lockstep both would see the same step time).
        per0 = sorted(s / b for _, _, b, s in busy0)[len(busy0) // 2]
        per1 = sorted(s / b for _, _, b, s in busy1)[len(busy1) // 2]
        assert per0 > 1.5 * per1, (kind, per0, per1)


def test_lockstep_causes_are_named_and_step_timing_warns():
    assert lockstep_cause(torch.nn.Sequential(torch.nn.SyncBatchNorm(4))).startswith(
        "SyncBatchNorm")
    assert lockstep_cause(torch.nn.Sequential(torch.nn.BatchNorm1d(4))) is None
    sampler = WeightedDistributedSampler(range(8), 4, num_replicas=1, rank=0, policy="equal")
    # (SyncBatchNorm refuses CPU modules under DDP; the GPU tests cover it. FSDP2 here.)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                    world_size=1)
            sampler.attach(_sharded(), busy="step")
        finally:
            dist.destroy_process_group()
    assert any("lockstep" in str(w.message) and "FSDP2" in str(w.message) for w in caught)
    other = WeightedDistributedSampler(range(8), 4, num_replicas=1, rank=0, policy="equal")
    with pytest.raises(ConfigError, match="Invalid busy 'sometimes'"):
        other.attach(torch.nn.Linear(2, 2), busy="sometimes")
