"""Real DDP on gloo ranks: exact gradients, the step ledger under prefetch, plan agreement."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from distributed import run_ranks
from shardbalance import WeightedDistributedSampler
from shardbalance.emulate import EmulatedSpeed
from shardbalance.order import EpochOrder

N, DIM, CLASSES = 64, 8, 3
#: Tokens per sample, for the token-mean loss.
TOKENS = torch.arange(1, N + 1, dtype=torch.float32) % 7 + 1


def _indices_of(x):
    """Dataset indices of a batch of inputs (the inputs are distinct random vectors)."""
    x_all = _data().tensors[0]
    return torch.tensor([int((x_all == row).all(dim=1).nonzero()) for row in x])


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, DIM, generator=gen),
                         torch.randint(0, CLASSES, (N,), generator=gen))


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, CLASSES))


def _train_weighted(rank, world, steps):
    data = _data()
    sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                         initial_weights=[1, 3], shuffle=True, seed=3)
    loader = DataLoader(data, batch_sampler=sampler)
    model = DDP(_model())
    sampler.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads, sizes = [], []
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        sizes.append(len(y))
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    # One more step with a token-mean loss: sample j stands for TOKENS[j] tokens, and the
    # loss is normalised by this rank's token count, which becomes the gradient weight.
    x, y = next(iter(loader))
    idx = sampler.ledger.last_yielded
    tokens = TOKENS[_indices_of(x)]
    opt.zero_grad()
    sampler.set_step_weight(float(tokens.sum()))
    per_sample = F.cross_entropy(model(x), y, reduction="none")
    ((per_sample * tokens).sum() / tokens.sum()).backward()
    token_grads = [p.grad.clone() for p in model.parameters()]
    del model
    dist.barrier()
    return grads, params, sizes, sampler.batch_sizes, token_grads, idx.step


def test_weighted_allreduce_equals_one_process_on_the_global_batch():
    steps = 3
    results = run_ranks(_train_weighted, 2, steps)
    assert [r[2] for r in results] == [[4] * steps, [12] * steps]
    assert results[0][3] == results[1][3] == (4, 12)

    # Reference: one process, the same model, each step's 16-sample global batch.
    x_all, y_all = _data().tensors
    order = EpochOrder(N, seed=3, epoch=0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        idx = torch.from_numpy(order.indices_range(step * 16, (step + 1) * 16))
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        for rank in range(2):
            for got, want in zip(results[rank][0][step], (p.grad for p in model.parameters())):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        opt.step()
    for rank in range(2):
        for got, want in zip(results[rank][1], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)

    # The token-weighted step: the gradient of Σ tokens·loss / Σ tokens over the global batch.
    step = results[0][5]
    assert results[1][5] == step == 0  # a fresh iterator: step 0 of epoch 0 again
    idx = torch.from_numpy(order.indices_range(0, 16))
    opt.zero_grad()
    per_sample = F.cross_entropy(model(x_all[idx]), y_all[idx], reduction="none")
    tokens = TOKENS[idx]
    ((per_sample * tokens).sum() / tokens.sum()).backward()
    for rank in range(2):
        for got, want in zip(results[rank][4], (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _train_adaptive(rank, world, log_path):
    data = _data()
    sampler = WeightedDistributedSampler(data, global_batch_size=16, seed=1, policy="affine",
                                         coordinator_log=log_path, timeout_s=20)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, prefetch_factor=2,
                        persistent_workers=True)
    speed = [1.0, 4.0][rank]
    model = DDP(torch.nn.Sequential(EmulatedSpeed(speed, per_sample_s=0.004, overhead_s=0.002),
                                    _model()))
    sampler.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, plans, mismatches, positions = [], [], [], []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            if epoch == 1 and step == 2:
                # Two steps trained; the DataLoader has prefetched more than that.
                positions.append((sampler.state_dict()["position"],
                                  sampler.ledger.last_yielded.step))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            hook = sampler._hook
            # The weight used in this step's all-reduce is this step's own b_i / B.
            if hook.entry.batch_size != len(y) or abs(hook.scale - world * len(y) / 16) > 1e-12:
                mismatches.append((epoch, hook.entry.step, len(y), hook.entry.batch_size))
            opt.step()
        plans.append((sampler.batch_sizes, sampler.plan.digest))
    del model
    dist.barrier()
    sampler.close()
    return plans, mismatches, positions


@pytest.mark.world_size(2)
def test_ledger_weights_each_step_by_its_own_batch_under_prefetch(tmp_path):
    results = run_ranks(_train_adaptive, 2, str(tmp_path / "coord.jsonl"), timeout_s=120)
    plans = [r[0] for r in results]
    assert results[0][1] == [] and results[1][1] == []
    # The resume position counts trained steps, not the batches prefetched ahead of them.
    for _, _, positions in results:
        assert positions[0][0] == 2 * 16
        assert positions[0][1] > 2
    # Every rank held the same plan at the end of every epoch.
    assert plans[0] == plans[1]
    sizes = [p[0] for p in plans[0]]
    assert all(sum(s) == 16 for s in sizes)
    # The plan did change between epochs (so prefetch crossed a plan boundary), and the
    # 4x faster rank ends with the larger share.
    assert len(set(sizes)) > 1
    assert sizes[-1][1] > sizes[-1][0]
