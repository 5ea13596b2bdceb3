"""Real DDP on gloo ranks: exact gradients, the step ledger under prefetch, plan agreement."""

import contextlib
import dataclasses

import numpy as np
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


def assert_same_tensors(per_rank, want, rtol=1e-5, atol=1e-7):
    """Every rank's list of tensors equals ``want`` (gradients or parameters)."""
    want = [w.detach() for w in want]
    for rank, got in enumerate(per_rank):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=f"rank {rank}")


def _train_weighted(rank, world, steps, weighting):
    data = _data()
    sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                         initial_weights=[1, 3], shuffle=True, seed=3)
    loader = DataLoader(data, batch_sampler=sampler)
    model = DDP(_model())
    sampler.attach(model, weighting=weighting)
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

    # A model that already has a comm hook: refused with a clear error by the comm-hook
    # weighting; kept as it is by the output weighting (it averages, the weights stay exact).
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooked = DDP(_model())
    hooked.register_comm_hook(None, default_hooks.allreduce_hook)
    other = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                       initial_weights=[1, 3], seed=3)
    try:
        other.attach(hooked, weighting=weighting)
        x, y = next(iter(DataLoader(data, batch_sampler=other)))
        F.cross_entropy(hooked(x), y).backward()
        refused = [p.grad.clone() for p in hooked.parameters()]
    except ValueError as exc:
        refused = str(exc)
    # A user's averaging hook (fp16 compression) is wrapped, not replaced.
    other = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                       initial_weights=[1, 3], seed=3)
    compressed = DDP(_model())
    other.attach(compressed, comm_hook=default_hooks.fp16_compress_hook, weighting=weighting)
    x, y = next(iter(DataLoader(data, batch_sampler=other)))
    F.cross_entropy(compressed(x), y).backward()
    fp16_grads = [p.grad.clone() for p in compressed.parameters()]
    del hooked, compressed
    dist.barrier()
    return (grads, params, sizes, sampler.batch_sizes, token_grads, idx.step, refused,
            fp16_grads)


@pytest.mark.parametrize("weighting", ["hook", "output"])
def test_weighted_allreduce_equals_one_process_on_the_global_batch(weighting):
    steps = 3
    results = run_ranks(_train_weighted, 2, steps, weighting)
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
        assert_same_tensors([r[0][step] for r in results], [p.grad for p in model.parameters()])
        opt.step()
    assert_same_tensors([r[1] for r in results], list(model.parameters()))

    # The token-weighted step: the gradient of Σ tokens·loss / Σ tokens over the global batch.
    step = results[0][5]
    assert results[1][5] == step == 0  # a fresh iterator: step 0 of epoch 0 again
    idx = torch.from_numpy(order.indices_range(0, 16))
    opt.zero_grad()
    per_sample = F.cross_entropy(model(x_all[idx]), y_all[idx], reduction="none")
    tokens = TOKENS[idx]
    ((per_sample * tokens).sum() / tokens.sum()).backward()
    assert_same_tensors([r[4] for r in results], [p.grad for p in model.parameters()])

    reference = _model()
    F.cross_entropy(reference(x_all[idx]), y_all[idx]).backward()
    if weighting == "hook":
        for rank in range(2):
            assert "already has a comm hook" in results[rank][6]
    else:
        assert_same_tensors([r[6] for r in results], [p.grad for p in reference.parameters()])
    # With fp16 compression the weighted gradient matches to fp16 precision.
    assert_same_tensors([r[7] for r in results], [p.grad for p in reference.parameters()],
                        rtol=2e-3, atol=2e-4)


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
    plans, mismatches, positions = [], [], []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            if epoch == 1 and step == 2:
                # Two steps trained; the DataLoader has prefetched more than that.
                positions.append((sampler.state_dict()["position"],
                                  sampler.ledger.last_yielded.step))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            entry = sampler.last_trained
            # The weight used in this step's all-reduce is this step's own b_i / B.
            if entry.batch_size != len(y) or abs(sampler.step_weight - len(y) / 16) > 1e-12:
                mismatches.append((epoch, entry.step, len(y), entry.batch_size))
            opt.step()
        plans.append((sampler.batch_sizes, sampler.plan.digest))
    del model
    dist.barrier()
    sampler.close()
    return plans, mismatches, positions


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


def _accumulate_and_probe(rank, world):
    import random

    data = _data()
    # Probe: the fast rank (rank 1) gets the larger first share; nothing of the run is touched.
    probe_sampler = WeightedDistributedSampler(data, global_batch_size=32, policy="static",
                                               initial_weights="probe", seed=2)
    probe_model = DDP(_model())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)

    def step_fn(b):
        import time

        time.sleep((0.002 + 0.001 * b) / (1 + 3 * rank))
        probe_model(torch.randn(b, DIM)).sum().backward()

    weights = probe_sampler.probe(step_fn, model=probe_model)
    after = (torch.rand(3), random.random(), np.random.rand())
    untouched = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                    for a, b in zip(expected, after))
    grads_cleared = all(p.grad is None for p in probe_model.parameters())
    first_batch = next(iter(probe_sampler))

    # Accumulation: plan [4, 12] in micro-batches of 4 (rank 0 one, rank 1 three per step).
    sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                         initial_weights=[1, 3], seed=3, micro_batch_size=4)
    loader = DataLoader(data, batch_sampler=sampler)
    model = DDP(_model())
    sampler.attach(model)
    micro_counts = []
    for micro, scale, last in sampler.accumulate(loader, model):
        x, y = micro
        (F.cross_entropy(model(x), y) * scale).backward()
        micro_counts.append(len(y))
        if last:
            break
    grads = [p.grad.clone() for p in model.parameters()]
    hook_steps = sampler.trained_steps
    try:
        next(sampler.accumulate(loader))
        no_model = None
    except ValueError as exc:
        no_model = str(exc)
    del model

    # DDP over a process group of its own (here one rank each): the default hook reduces
    # over the model's group, not the whole world.
    own_group = [dist.new_group([r]) for r in range(world)][rank]
    solo = WeightedDistributedSampler(data, global_batch_size=8, num_replicas=1, rank=0,
                                      policy="equal", seed=rank)
    solo_model = DDP(_model(), process_group=own_group)
    solo.attach(solo_model)
    x, y = next(iter(DataLoader(data, batch_sampler=solo)))
    F.cross_entropy(solo_model(x), y).backward()
    reference = _model()
    F.cross_entropy(reference(x), y).backward()
    solo_exact = all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
                     for a, b in zip(solo_model.parameters(), reference.parameters()))
    del solo_model

    # Ranks that build their samplers differently are refused before anything trains.
    try:
        WeightedDistributedSampler(data, global_batch_size=16, policy="affine", seed=rank,
                                   timeout_s=10)
        mismatch = None
    except ValueError as exc:
        mismatch = str(exc)
    dist.barrier()
    return (weights, untouched, grads_cleared, first_batch, probe_sampler.batch_sizes,
            grads, micro_counts, hook_steps, no_model, solo_exact, mismatch)


def test_accumulation_in_micro_batches_is_exact_and_the_probe_balances_epoch_zero():
    results = run_ranks(_accumulate_and_probe, 2)
    weights = [r[0] for r in results]
    assert weights[0] == weights[1] and weights[0][1] > 1.5 * weights[0][0]
    for _, untouched, cleared, first_batch, sizes, *_ in results:
        assert untouched and cleared
        assert sizes == results[0][4] and sizes[1] > sizes[0] and sum(sizes) == 32
    # The probe consumed no sample: the first batches are positions [0, 32) of the order.
    order = EpochOrder(N, seed=2, epoch=0)
    assert results[0][3] + results[1][3] == order.indices_range(0, 32).tolist()

    assert all("needs the DDP model" in r[8] for r in results)
    assert all(r[9] for r in results)
    assert all("different settings" in r[10] for r in results)

    assert results[0][6] == [4] and results[1][6] == [4, 4, 4]
    assert results[0][7] == results[1][7] == 1  # the comm hook fired once for the step
    x_all, y_all = _data().tensors
    idx = torch.from_numpy(EpochOrder(N, seed=3, epoch=0).indices_range(0, 16))
    model = _model()
    F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
    assert_same_tensors([r[5] for r in results], [p.grad for p in model.parameters()])


def _train_windows(rank, world, log_path, weighting):
    # Epochs of 12 steps: plans are agreed in the background, a few steps (the prefetch depth)
    # ahead of the boundary they switch at, so a mid-epoch switch needs a longer epoch.
    data = TensorDataset(*(t.repeat(3, *[1] * (t.dim() - 1)) for t in _data().tensors))
    sampler = WeightedDistributedSampler(data, global_batch_size=16, seed=1, policy="affine",
                                         rebalance_every=2, coordinator_log=log_path,
                                         timeout_s=20)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, prefetch_factor=2,
                        persistent_workers=True)
    model = DDP(torch.nn.Sequential(EmulatedSpeed([1.0, 4.0][rank], per_sample_s=0.004,
                                                  overhead_s=0.002), _model()))
    sampler.attach(model, weighting=weighting)
    steps = []
    for epoch in range(2):  # 24 steps: enough measurements for the fit to beat the noise
        sampler.set_epoch(epoch)
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            entry = sampler.last_trained
            assert entry.batch_size == len(y)
            steps.append((epoch, entry.step, entry.digest, len(y)))
            model.zero_grad()
    del model
    dist.barrier()
    sampler.close()
    return steps


@pytest.mark.parametrize("weighting", ["hook", "output"])
def test_windowed_plans_switch_at_the_same_step_on_every_rank_despite_prefetch(tmp_path,
                                                                                 weighting):
    steps0, steps1 = run_ranks(_train_windows, 2, str(tmp_path / "c.jsonl"), weighting,
                               timeout_s=120)
    assert [s[:3] for s in steps0] == [s[:3] for s in steps1]
    assert all(a[3] + b[3] == 16 for a, b in zip(steps0, steps1))
    # A plan changes only at a window boundary (every 2 steps), and it did change mid-epoch.
    changes = [(cur[0], cur[1]) for prev, cur in zip(steps0, steps0[1:]) if prev[2] != cur[2]]
    assert all(step % 2 == 0 for _, step in changes)
    assert any(step > 0 for _, step in changes)
    sizes = {s[3] for s in steps1}
    assert max(sizes) > 8  # the fast rank ended up with more than the equal share


def _busy_times(rank, world):
    """Each weighting on the same two ranks: rank 0 sleeps 100 ms per step, rank 1 5 ms."""
    data = _data()
    busy = {}
    for weighting in ("hook", "output"):
        sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="equal", seed=4)
        model = DDP(torch.nn.Sequential(
            EmulatedSpeed(1.0, per_sample_s=0.0, overhead_s=[0.1, 0.005][rank]), _model()))
        sampler.attach(model, weighting=weighting)
        for x, y in DataLoader(data, batch_sampler=sampler):
            F.cross_entropy(model(x), y).backward()
            model.zero_grad()
        busy[weighting] = [rec[3] for rec in sampler.recent_busy]
        del model
    dist.barrier()
    return busy


def test_busy_time_counts_the_rank_own_work_not_the_wait_for_its_peers():
    slow, fast = run_ranks(_busy_times, 2)
    for weighting in ("hook", "output"):
        # 4 steps: the first has no previous all-reduce to start from.
        assert len(slow[weighting]) == len(fast[weighting]) == 3, weighting
        slow_s, fast_s = np.median(slow[weighting]), np.median(fast[weighting])
        # Both ranks take >= 100 ms a step (they meet at every all-reduce); the fast rank's
        # busy time leaves out the ~95 ms it waits for the slow one, before and after.
        assert slow_s >= 0.1, (weighting, slow_s)
        assert fast_s < 0.5 * slow_s, (weighting, fast_s, slow_s)


class _WithLoss(torch.nn.Module):
    """Returns a dict with the logits and, given labels, the loss computed from them inside
    the model (as many model libraries do): a gradient reaches the logits both ways."""

    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, x, y=None):
        logits = self.net(x)
        out = {"logits": logits, "extra": [logits[:1].detach()]}
        if y is not None:
            out["loss"] = F.cross_entropy(logits, y)
        return out


class _Opaque:
    def __init__(self, tensor):
        self.tensor = tensor


def _output_weighting_cases(rank, world):
    data = _data()
    # Accumulation in micro-batches of 4, a dict output, and a probe on the attached model
    # first: the probe's steps are no training steps (its plan replaces [4, 12]).
    sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                         initial_weights=[1, 3], seed=3, micro_batch_size=4)
    loader = DataLoader(data, batch_sampler=sampler)
    model = DDP(_WithLoss())
    sampler.attach(model, weighting="output")

    def step_fn(b, net=model):
        import time

        time.sleep((0.002 + 0.002 * b) / (1 + 3 * rank))  # rank 1 is 4x faster
        net(torch.randn(b, DIM))["logits"].sum().backward()

    sampler.probe(step_fn, sizes=(4, 8), repeats=1, model=model)
    probe_steps = sampler.trained_steps
    refused_mid_step, micro_batches = None, 0
    for micro, scale, last in sampler.accumulate(loader, model):
        micro_batches += 1
        x, y = micro
        out = model(x, y)
        # Half the loss through the returned loss, half through the returned logits.
        ((out["loss"] + F.cross_entropy(out["logits"], y)) * scale / 2).backward()
        if not last:
            try:
                sampler.set_step_weight(1.0)
            except ValueError as exc:
                refused_mid_step = str(exc)
        if last:
            break
    grads = [p.grad.clone() for p in model.parameters()]
    steps = sampler.trained_steps
    # An output torch cannot look into is refused rather than left unweighted.
    opaque = DDP(torch.nn.Sequential(_model()))
    opaque.register_forward_hook(lambda module, args, out: _Opaque(out))
    other = WeightedDistributedSampler(data, global_batch_size=16, policy="equal", seed=3)
    other.attach(opaque, weighting="output")
    x, _ = next(iter(DataLoader(data, batch_sampler=other)))
    try:
        opaque(x)
        refused_opaque = None
    except ValueError as exc:
        refused_opaque = str(exc)
    try:
        WeightedDistributedSampler(data, global_batch_size=16, policy="equal", seed=3).attach(
            DDP(_model()), weighting="bucket")
        refused_name = None
    except ValueError as exc:
        refused_name = str(exc)
    del model, opaque
    dist.barrier()
    return (grads, probe_steps, steps, refused_mid_step, refused_opaque, refused_name,
            micro_batches, sampler.batch_sizes)


def test_output_weighting_is_exact_with_accumulation_and_skips_the_probe():
    results = run_ranks(_output_weighting_cases, 2)
    x_all, y_all = _data().tensors
    idx = torch.from_numpy(EpochOrder(N, seed=3, epoch=0).indices_range(0, 16))
    reference = _model()
    F.cross_entropy(reference(x_all[idx]), y_all[idx]).backward()
    assert_same_tensors([r[0] for r in results], [p.grad for p in reference.parameters()])
    assert all(r[1] == 0 and r[2] == 1 for r in results)
    assert sum(r[6] for r in results) == 4
    # The probe's plan is uneven, so a weight applied twice (or not at all) would show.
    assert results[0][7] == results[1][7] and results[0][7][1] > results[0][7][0]
    for result in results:
        if result[6] > 1:  # set_step_weight() after a micro-batch's backward is refused
            assert "before the step's first backward" in result[3]
        else:
            assert result[3] is None
    assert all("_Opaque" in r[4] for r in results)
    assert all("'bucket'" in r[5] for r in results)


class _FailOnce(torch.autograd.Function):
    """Identity whose backward raises while ``armed`` (a failed backward, e.g. out of memory)."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if _FailOnce.armed:
            raise RuntimeError("simulated failure in backward")
        return grad


class _Fragile(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, x):
        return _FailOnce.apply(self.net(x))


@dataclasses.dataclass(slots=True)
class _Slotted:
    logits: torch.Tensor


def _output_weighting_edges(rank, world):
    data = _data()
    x_all, y_all = data.tensors
    sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                         initial_weights=[1, 3], seed=3)
    model = DDP(_Fragile())
    sampler.attach(model, weighting="output")
    batches = iter(DataLoader(data, batch_sampler=sampler))
    # Step 0's backward fails after the output node ran; the run skips that batch.
    x, y = next(batches)
    _FailOnce.armed = True
    try:
        F.cross_entropy(model(x), y).backward()
        failed = False
    except RuntimeError:
        failed = True
    _FailOnce.armed = False
    model.zero_grad()
    # Step 1: a gradient penalty through the outputs (torch.autograd.grad), then backward.
    x, y = next(batches)
    x = x.clone().requires_grad_(True)
    out = model(x)
    (penalty_grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    steps_after_grad = sampler.trained_steps
    F.cross_entropy(out, y).backward()
    step1 = (sampler.last_trained.step, sampler.step_weight, len(y), sampler.trained_steps,
             len(sampler.ledger))
    grads = [p.grad.clone() for p in model.parameters()]
    # The penalty's gradient is the plain one: not scaled by the step's weight.
    plain = model.module.net
    x2 = x.detach().clone().requires_grad_(True)
    (want_penalty,) = torch.autograd.grad(plain(x2).sum(), x2)
    penalty_exact = torch.allclose(penalty_grad, want_penalty, rtol=1e-5, atol=1e-7)
    idx1 = _indices_of(x.detach())
    # A wrong set_step_weight on one rank: every rank raises, none waits.
    try:
        sampler.set_step_weight([-1.0, 5.0][rank])
        weight_error = None
    except ValueError as exc:
        weight_error = str(exc)
    # An output dataclass with __slots__ that torch cannot flatten is refused.
    slotted = DDP(_model())
    slotted.register_forward_hook(lambda module, args, out: [_Slotted(out)])
    equal = WeightedDistributedSampler(data, global_batch_size=16, policy="equal", seed=3)
    equal.attach(slotted, weighting="output")
    x_equal, _ = next(iter(DataLoader(data, batch_sampler=equal)))
    try:
        slotted(x_equal)
        slotted_error = None
    except ValueError as exc:
        slotted_error = str(exc)
    # max_batch_size="auto" with the static policy keeps the user's weights (CPU: no caps).
    kept = WeightedDistributedSampler(data, global_batch_size=16, policy="static",
                                      initial_weights=[1, 3], max_batch_size="auto", seed=3)
    kept.probe(lambda b: _model()(torch.randn(b, DIM)).sum().backward(), sizes=(2, 4),
               repeats=1)
    del model, slotted
    dist.barrier()
    return (failed, steps_after_grad, step1, grads, idx1, penalty_exact, weight_error,
            slotted_error, kept.batch_sizes)


def test_output_weighting_survives_a_failed_backward_and_ignores_autograd_grad():
    results = run_ranks(_output_weighting_edges, 2)
    x_all, y_all = _data().tensors
    for rank, r in enumerate(results):
        failed, steps_after_grad, (step, weight, size, steps, queued), *_ = r
        assert failed
        # Neither the failed backward of step 0 nor torch.autograd.grad is a trained step;
        # the next backward trained step 1 with its own weight b_i/B.
        assert steps_after_grad == 0 and steps == 1
        assert step == 1 and weight == size / 16 and size == [4, 12][rank]
        assert r[5], "the gradient penalty must not carry the step's weight"
        assert r[8] == (4, 12)
        assert "_Slotted" in r[7]
    assert "Invalid step weight -1.0" in results[0][6]
    assert "on 1 other rank" in results[1][6]
    # Step 1's gradient is the global-batch mean over both ranks' samples.
    idx = torch.cat([results[0][4], results[1][4]])
    reference = _model()
    F.cross_entropy(reference(x_all[idx]), y_all[idx]).backward()
    assert_same_tensors([r[3] for r in results], [p.grad for p in reference.parameters()])


def _first_epoch_without_probe(rank, world, group, options):
    data = TensorDataset(torch.randn(384, DIM), torch.randint(0, CLASSES, (384,)),
                         torch.arange(384))
    sampler = WeightedDistributedSampler(data, global_batch_size=16, seed=5, timeout_s=30,
                                         accumulation_steps=group, options=options)
    model = DDP(torch.nn.Sequential(EmulatedSpeed([1.0, 3.0][rank], per_sample_s=0.002,
                                                  overhead_s=0.002), _model()))
    # Compute-only busy time: the emulated speeds, not the loader's waits on a loaded machine.
    sampler.attach(model, busy="compute")
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    sizes, seen = [], []
    for i, (x, y, idx) in enumerate(loader):
        # With group=2: Lightning-style accumulation under no_sync(), the comm hook weighting.
        with contextlib.nullcontext() if (i + 1) % group == 0 else model.no_sync():
            F.cross_entropy(model(x), y).backward()
        if (i + 1) % group == 0:
            model.zero_grad(set_to_none=True)
        sizes.append(sampler.last_trained.plan.batch_sizes)
        seen.append(idx)
    del model
    dist.barrier()
    rounds = list(sampler.planner.history)
    sampler.close()
    return sizes, torch.cat(seen), rounds, list(sampler.recent_busy)


@pytest.mark.parametrize("group,warmup_steps", [(1, None), (2, None), (1, 5)])
def test_the_first_epoch_is_rebalanced_early_without_a_probe(group, warmup_steps):
    options = None if warmup_steps is None else {"shape_warmup_steps": warmup_steps}
    (sizes0, seen0, rounds, busy0), (sizes1, seen1, _, busy1) = run_ranks(
        _first_epoch_without_probe, 2, group, options, timeout_s=150)
    assert sizes0 == sizes1 and len(sizes0) == 24
    # The first early re-plan waits until every rank measured the steps up to its first clean
    # one on the equal split (the new-shape steps the policy leaves out, plus one), trained
    # however far the loader prefetched, and switches after the steps already prefetched.
    measured = (2 if warmup_steps is None else warmup_steps) + 1
    replans = [r for r in rounds if r[1] == "early" and r[4] == "plan"]
    assert replans, (rounds, sizes0)
    epoch, kind, trigger, target, status, switch, lead, depth = replans[0]
    for busy in (busy0, busy1):
        assert sum(1 for (e, step, b, _) in busy if step < trigger and b == 8) >= \
            measured * group, (rounds, busy)
    assert trigger >= (measured + 1) * group and switch > trigger, rounds
    # Per-epoch plans, no probe: the epoch starts on the equal split and re-plans twice once
    # every rank has measured a few steps, however far its loader prefetched (here 4 batches).
    changes = [s for s in range(1, 24) if sizes0[s] != sizes0[s - 1]]
    # The re-plan is agreed in the background once every rank measured three groups on the
    # plan, and lands at the first group boundary past every rank's prefetched steps.
    assert sizes0[0] == (8, 8) and 1 <= len(changes) <= 2, sizes0
    assert changes[0] == switch, (sizes0, rounds)
    assert sizes0[-1][1] > sizes0[-1][0], sizes0  # toward the 3x faster rank
    assert all(s % group == 0 for s in changes)  # between accumulation groups
    assert sorted(torch.cat([seen0, seen1]).tolist()) == list(range(384))
