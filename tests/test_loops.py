"""The training loops people write, on real gloo ranks with real DDP, against one process.

Each case is an invariant of README's "Training loops" contract:

- gradient accumulation across loader batches under ``no_sync()`` (a fixed K and a short last
  group) gives the gradient of the mean loss over every sample the group trained, with plans
  that change inside the group (``weighting="output"``) or only between groups
  (``weighting="hook"`` with ``accumulation_steps=K``); the hook refuses a change inside a group;
- ``state_dict()`` counts every trained batch, and after ``load_state_dict()`` with a prefetching
  worker loader it stays at the resume point until a step trains;
- a batch skipped after its forward (a non-finite loss) or a ``break`` leaves the following
  steps their own weights; a batch skipped before its forward is detected at a plan change;
- ``torch.autograd.grad`` with respect to the parameters is not a step and does not crash;
- ranks that resumed at different positions, or whose local policies' settings differ, are
  refused; the probe's first-plan weights are the same on every rank even when the ranks'
  arithmetic differs.
"""

import contextlib
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from distributed import run_ranks
from shardbalance import WeightedDistributedSampler
from shardbalance._exceptions import ConfigError, PlanError, ShardBalanceError

N, B, DIM, CLASSES = 64, 16, 8, 3
#: The plans injected at successive windows (through the plan source): every step differs.
PLANS = [(4, 12), (12, 4), (8, 8), (6, 10), (10, 6), (2, 14)]


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, DIM, generator=gen),
                         torch.randint(0, CLASSES, (N,), generator=gen), torch.arange(N))


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, CLASSES))


def _reference_grads(indices: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the mean loss over ``indices`` in one process."""
    x, y, _ = _data().tensors
    model = _model()
    F.cross_entropy(model(x[indices]), y[indices]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _inject_plans(sampler: WeightedDistributedSampler) -> None:
    """Plans from PLANS, one per window in order of request: the same on every rank."""
    real = sampler.plan_source.fetch
    count = {"n": 0}

    def fetch(epoch, window):
        sizes = PLANS[count["n"] % len(PLANS)]
        count["n"] += 1
        return dataclasses.replace(real(epoch, window), batch_sizes=sizes)

    sampler.plan_source.fetch = fetch


def _sampler(**kwargs) -> WeightedDistributedSampler:
    args = dict(policy="affine", rebalance_every=1, seed=3, timeout_s=30)
    args.update(kwargs)
    sampler = WeightedDistributedSampler(_data(), B, **args)
    if args["policy"] == "affine":
        sampler.plan_in_background = False  # one scripted plan per window, at that window
        _inject_plans(sampler)
    return sampler


def _accumulate_epoch(weighting: str, group: int, **sampler_args):
    """One epoch, ``group`` loader batches per optimizer step (the last group may be short),
    Lightning/Accelerate style: every batch but a group's last under no_sync(), each loss
    divided by the group's batch count. Returns per group: (gradients, indices trained)."""
    sampler = _sampler(**sampler_args)
    loader = DataLoader(_data(), batch_sampler=sampler)
    model = DDP(_model())
    sampler.attach(model, weighting=weighting)
    steps = len(loader)
    groups, indices, states, sizes = [], [], [], []
    for i, (x, y, idx) in enumerate(loader):
        first = i - i % group
        in_group = min(group, steps - first)
        last = i == first + in_group - 1
        with contextlib.nullcontext() if last else model.no_sync():
            (F.cross_entropy(model(x), y) / in_group).backward()
        indices.append(idx)
        sizes.append(len(idx))
        if last:
            groups.append(([p.grad.clone() for p in model.parameters()], torch.cat(indices)))
            states.append(sampler.state_dict())
            model.zero_grad(set_to_none=True)
            indices = []
    result = (groups, states, sizes, sampler.trained_steps)
    del model
    dist.barrier()
    sampler.close()
    return result


def _accumulation_cases(rank, world):
    output = _accumulate_epoch("output", 3)
    hook = _accumulate_epoch("hook", 3, accumulation_steps=3, rebalance_every=3)
    # The hook without accumulation_steps: the plan changes at the group's second batch.
    sampler = _sampler()
    model = DDP(_model())
    sampler.attach(model, weighting="hook")
    refused = None
    try:
        for x, y, _ in DataLoader(_data(), batch_sampler=sampler):
            with model.no_sync():
                (F.cross_entropy(model(x), y) / 2).backward()
    except ShardBalanceError as exc:
        refused = (type(exc).__name__, str(exc))
    del model
    dist.barrier()
    sampler.close()
    return output, hook, refused


def test_accumulation_across_loader_batches_is_exact_and_counted():
    results = run_ranks(_accumulation_cases, 2, timeout_s=120)
    for case in (0, 1):  # weighting="output", weighting="hook" with accumulation_steps=3
        (groups0, states, _, trained), (groups1, *_) = results[0][case], results[1][case]
        assert len(groups0) == 2 and trained == 2  # groups of 3 batches and 1 (short)
        for (grads0, idx0), (grads1, idx1) in zip(groups0, groups1):
            trained_idx = torch.cat([idx0, idx1])
            assert len(set(trained_idx.tolist())) == len(trained_idx)
            want = _reference_grads(trained_idx)
            for got in (grads0, grads1):
                for g, w in zip(got, want):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        # state_dict() counts every trained batch: 3 steps of B, then the epoch is complete.
        assert states == [{**states[0], "epoch": 0, "position": 3 * B},
                          {**states[0], "epoch": 1, "position": 0}]
    # With the output weighting, every batch of the first group had another plan.
    assert results[0][0][2][:3] == [p[0] for p in PLANS[:3]]
    # With the hook, plans changed only between the groups.
    assert len(set(results[0][1][2][:3])) == 1 and results[0][1][2][3] != results[0][1][2][0]
    for _, _, refused in results:
        assert refused is not None and refused[0] == "PlanError"
        assert "inside a gradient accumulation group" in refused[1]
        assert "accumulation_steps" in refused[1]


def _skip_and_resume_cases(rank, world):
    data = _data()
    out = {}
    # A batch skipped after its forward (as on a non-finite loss, on every rank), then a
    # break out of the loop; the next epoch's first step still has its own weight. (With the
    # comm hook: a skipped batch taken for part of the next step would be refused, its plan
    # differs.)
    sampler = _sampler()
    model = DDP(_model())
    sampler.attach(model, weighting="hook")
    grads = []
    for step, (x, y, idx) in enumerate(DataLoader(data, batch_sampler=sampler)):
        loss = F.cross_entropy(model(x), y)
        if step == 1:
            continue  # skipped after the forward: no backward
        loss.backward()
        grads.append(([p.grad.clone() for p in model.parameters()], idx, sampler.step_weight))
        model.zero_grad(set_to_none=True)
        if step == 2:
            break
    sampler.set_epoch(1)
    x, y, idx = next(iter(DataLoader(data, batch_sampler=sampler)))
    F.cross_entropy(model(x), y).backward()
    grads.append(([p.grad.clone() for p in model.parameters()], idx, sampler.step_weight))
    del model
    dist.barrier()
    sampler.close()
    # A gradient penalty with respect to the parameters (torch.autograd.grad): not a step.
    sampler = _sampler()
    model = DDP(_model())
    sampler.attach(model, weighting="output")
    x, y, idx = next(iter(DataLoader(data, batch_sampler=sampler)))
    before = sampler.trained_steps
    out_ = model(x)
    penalty = torch.autograd.grad(out_.pow(2).sum(), list(model.parameters()),
                                  create_graph=True)
    penalty_steps = sampler.trained_steps - before
    F.cross_entropy(out_, y).backward()
    grads.append(([p.grad.clone() for p in model.parameters()], idx, sampler.step_weight))
    out["penalty"] = (penalty_steps, len(penalty), sampler.trained_steps - before)
    out["grads"] = grads
    model.zero_grad(set_to_none=True)
    # A batch skipped before its forward: the next forward's batch has the following batch's
    # size, not the skipped one's, so it is refused (the plan changes every step).
    batches = iter(DataLoader(data, batch_sampler=sampler))
    next(batches)
    x, y, _ = next(batches)
    try:
        model(x)
        out["skipped_before"] = None
    except PlanError as exc:
        out["skipped_before"] = str(exc)
    del model
    dist.barrier()
    sampler.close()

    # Checkpoint after load_state_dict() while a worker DataLoader prefetches.
    sampler = WeightedDistributedSampler(data, B, policy="static", initial_weights=[1, 3],
                                         seed=3)
    model = DDP(_model())
    sampler.attach(model)
    sampler.load_state_dict({**sampler.state_dict(), "epoch": 2, "position": 2 * B})
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, prefetch_factor=2)
    batches = iter(loader)
    x, y, idx = next(batches)  # the workers have been handed every remaining batch
    prefetched = (sampler.state_dict(), len(sampler), len(sampler.ledger))
    F.cross_entropy(model(x), y).backward()
    trained = sampler.state_dict()
    del batches, model
    out["checkpoint"] = (prefetched, trained)

    # Ranks that resumed at different positions: only rank 0 loaded the state.
    sampler = WeightedDistributedSampler(data, B, policy="static", initial_weights=[1, 3],
                                         seed=3)
    if rank == 0:
        sampler.load_state_dict({**sampler.state_dict(), "position": B})
    try:
        next(iter(sampler))
        out["positions"] = None
    except ConfigError as exc:
        out["positions"] = str(exc)
    dist.barrier()
    return out


def test_skipped_batches_breaks_penalties_and_checkpoints_follow_the_contract():
    results = run_ranks(_skip_and_resume_cases, 2, timeout_s=120)
    r0, r1 = results
    # Steps trained: epoch 0 steps 0 and 2 (1 was skipped after its forward), epoch 1 step 0
    # after the break; then, on another sampler, step 0 after a gradient penalty.
    for k, want_plan in enumerate([PLANS[0], PLANS[2], PLANS[3], PLANS[0]]):
        (g0, idx0, w0), (g1, idx1, w1) = r0["grads"][k], r1["grads"][k]
        assert (len(idx0), len(idx1)) == want_plan, k
        assert (w0, w1) == (want_plan[0] / B, want_plan[1] / B), k
        want = _reference_grads(torch.cat([idx0, idx1]))
        for got in (g0, g1):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    for r in results:
        assert r["penalty"] == (0, 4, 1)
        assert "batch of" in r["skipped_before"] and "skipped" in r["skipped_before"]
        (state, length, queued), trained = r["checkpoint"]
        # Until a step trains, the checkpoint is the resume point, however far the loader
        # prefetched; then it counts the trained step.
        assert (state["epoch"], state["position"], length) == (2, 2 * B, 2) and queued >= 1
        assert (trained["epoch"], trained["position"]) == (2, 3 * B)
        assert "resume at different positions" in r["positions"]


def _local_settings_cases(rank, world):
    data = _data()
    refused = {}
    for name, kwargs in {
        "global_batch_size": dict(policy="equal", global_batch_size=[16, 24][rank]),
        "seed": dict(policy="equal", global_batch_size=16, seed=[1, 2][rank]),
        "drop_last": dict(policy="equal", global_batch_size=16, drop_last=bool(rank)),
        "initial_weights": dict(policy="static", global_batch_size=16,
                                initial_weights=[[1, 3], [3, 1]][rank]),
    }.items():
        try:
            WeightedDistributedSampler(data, **kwargs)
            refused[name] = None
        except ConfigError as exc:
            refused[name] = str(exc)
    # The probe's weights: this rank's arithmetic differs from its peer's in the last bits
    # (as np.power does on different CPUs); the first plan is still the same on every rank.
    import shardbalance._probe as probe_module

    real_fit = probe_module.fit_cost_model

    class Skewed:
        def __init__(self, model):
            self.model = model

        def equal_finish(self, *args):
            targets, rest = self.model.equal_finish(*args)
            return [t * (1 + 1e-12 * (rank + 1)) for t in targets], rest

    probe_module.fit_cost_model = lambda history: Skewed(real_fit(history))
    try:
        sampler = WeightedDistributedSampler(data, B, policy="affine", initial_weights="probe",
                                             seed=3)
        model = _model()

        def step_fn(b):
            model(torch.randn(b, DIM)).sum().backward()

        weights = sampler.probe(step_fn, sizes=(2, 6), repeats=1)
        first = (tuple(weights), sampler.batch_sizes)
        sampler.close()
    finally:
        probe_module.fit_cost_model = real_fit
    return refused, first


def test_local_policies_check_settings_and_probe_weights_are_the_same_everywhere():
    (refused0, first0), (refused1, first1) = run_ranks(_local_settings_cases, 2)
    for refused in (refused0, refused1):
        for name, message in refused.items():
            assert message is not None and "different settings" in message, name
    assert first0 == first1 and sum(first0[1]) == B


def _subgroup_sampler(rank, world):
    # Three processes, two data-parallel replicas: the third would be a model-parallel peer.
    try:
        WeightedDistributedSampler(_data(), B, num_replicas=2, rank=rank % 2, policy="equal")
        return None
    except ConfigError as exc:
        return str(exc)


def test_a_sampler_over_a_data_parallel_subgroup_is_refused_on_every_rank():
    # Its step-weight sums and probe gathers would include the extra ranks: refused, not
    # silently off by their count.
    for message in run_ranks(_subgroup_sampler, 3):
        assert message is not None and "num_replicas=2 but torch.distributed has 3" in message
