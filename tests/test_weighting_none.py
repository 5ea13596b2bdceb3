"""``attach(model, weighting="none")`` on real gloo ranks with an uneven plan: the gradient is
plain DDP's, untouched (for losses a framework already normalises over all ranks), and busy
time is still measured, per trained batch, with that batch's own size."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from distributed import run_ranks
from shardbalance import WeightedDistributedSampler
from shardbalance.emulate import EmulatedSpeed

from test_loops import CLASSES, DIM, B, N, _data  # the loop tests' data
WEIGHTS = (1.0, 3.0)  # plan (4, 12): plain DDP's average and the b_i/B weighting differ
PER_SAMPLE_S = 0.002



def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(EmulatedSpeed(1.0, per_sample_s=PER_SAMPLE_S, overhead_s=0.0),
                               torch.nn.Linear(DIM, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, CLASSES))


def _train_none_beside_plain_ddp(rank, world):
    sampler = WeightedDistributedSampler(_data(), B, policy="static", initial_weights=WEIGHTS,
                                         seed=3)
    measured, plain = DDP(_model()), DDP(_model())
    sampler.attach(measured, weighting="none")
    steps = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y, idx in DataLoader(_data(), batch_sampler=sampler):
            for model in (measured, plain):
                F.cross_entropy(model(x), y).backward()
            steps.append(([p.grad.clone() for p in measured.parameters()],
                          [p.grad.clone() for p in plain.parameters()], idx))
            for model in (measured, plain):
                model.zero_grad(set_to_none=True)
    result = (steps, list(sampler.recent_busy), sampler.trained_steps, sampler.batch_sizes)
    del measured, plain
    dist.barrier()
    sampler.close()
    return result


def _weighted_reference(indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """The b_i/B-weighted gradient: the mean loss over every rank's samples, one process."""
    x, y, _ = _data().tensors
    model = _model()
    samples = torch.cat(indices)
    F.cross_entropy(model(x[samples]), y[samples]).backward()
    return [p.grad for p in model.parameters()]


def test_weighting_none_leaves_the_gradient_to_ddp_and_measures_busy_time():
    results = run_ranks(_train_none_beside_plain_ddp, 2, timeout_s=240)
    steps_per_epoch = N // B
    for rank, (steps, busy, trained, sizes) in enumerate(results):
        assert sizes == (4, 12)
        assert trained == 2 * steps_per_epoch
        for got, plain, _ in steps:
            for g, p in zip(got, plain):
                torch.testing.assert_close(g, p, rtol=0, atol=0)
        # Measured for every step but each iterator's first, with the batch's own size, and
        # at least the emulated compute of that batch.
        assert len(busy) >= 2 * (steps_per_epoch - 1)
        assert {b for _, _, b, _ in busy} == {sizes[rank]}
        assert all(seconds >= sizes[rank] * PER_SAMPLE_S for *_, seconds in busy)
    # The gradient is plain DDP's average, not the b_i/B weighting: the two differ here.
    (got, _, idx0), (_, _, idx1) = results[0][0][0], results[1][0][0]
    weighted = _weighted_reference([idx0, idx1])
    assert not all(torch.allclose(g, w, rtol=1e-4) for g, w in zip(got, weighted))
