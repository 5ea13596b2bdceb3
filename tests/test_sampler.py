"""The sampler in-process: exact coverage for any plan, equal step counts, bad arguments."""

import json
import warnings
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from shardbalance import WeightedDistributedSampler
from shardbalance._exceptions import ConfigError
from shardbalance.order import EpochOrder
from shardbalance.plan import Plan, apportion


def scripted_sampler(*args, plan_weights, **kwargs):
    """A sampler whose plans come from a script, the same on every rank (as the coordinator's
    are), injected through its plan source: ``plan_weights(epoch, window)`` -> weights."""
    sampler = WeightedDistributedSampler(*args, policy="static", **kwargs)
    settings, source = sampler.settings, sampler.plan_source

    def plan_for(epoch, window, checks):
        sizes = apportion(plan_weights(epoch, window), settings.global_batch_size,
                          settings.min_sizes, settings.max_sizes, settings.batch_size_multiple)
        source.agreed = Plan("scripted", 0, epoch, window, sizes, settings.global_batch_size,
                             "static")
        return source.agreed

    source.plan_for = plan_for
    return sampler


@st.composite
def setups(draw):
    k = draw(st.integers(1, 5))
    q = draw(st.sampled_from([1, 1, 2, 3]))
    B = q * draw(st.integers(k, max(k, 48 // q)))
    cap = draw(st.one_of(st.none(), st.integers(-(-B // k), B)))
    if cap is not None and cap // q * k * q < B:
        cap = None
    N = draw(st.integers(1, 260))
    seed = draw(st.integers(0, 2**16))
    table = draw(st.lists(st.lists(st.floats(0.05, 20.0), min_size=k, max_size=k),
                          min_size=1, max_size=6))
    return dict(k=k, B=B, N=N, seed=seed, table=table, q=q, cap=cap,
                micro=draw(st.booleans()),
                window=draw(st.one_of(st.none(), st.integers(1, 5))),
                drop_last=draw(st.booleans()), pad=draw(st.booleans()),
                epoch=draw(st.integers(0, 3)),
                start=draw(st.integers(0, N)))


def run_epoch(setup):
    """Every rank's batches of one epoch, and the per-step plan each used."""
    table = setup["table"]

    def weights(epoch, window):
        return table[(window + epoch) % len(table)]

    per_rank, lengths = [], []
    for rank in range(setup["k"]):
        quantum = ({"micro_batch_size": setup["q"]} if setup["micro"]
                   else {"batch_size_multiple": setup["q"]})
        sampler = scripted_sampler(range(setup["N"]), setup["B"], num_replicas=setup["k"],
                                   rank=rank, seed=setup["seed"], drop_last=setup["drop_last"],
                                   pad=setup["pad"], rebalance_every=setup["window"],
                                   plan_weights=weights, max_batch_size=setup["cap"], **quantum)
        sampler.set_epoch(setup["epoch"])
        if setup["start"]:
            sampler.load_state_dict({**sampler.state_dict(), "position": setup["start"]})
        lengths.append(len(sampler))
        per_rank.append(list(sampler))
    return per_rank, lengths


@settings(max_examples=300, deadline=None)
@given(setups())
def test_each_epoch_covers_the_dataset_exactly_once_for_any_plan(setup):
    per_rank, lengths = run_epoch(setup)
    N, B, start = setup["N"], setup["B"], setup["start"]
    if not setup["pad"] and not setup["drop_last"]:
        return check_unpadded(setup, per_rank)
    # Every rank runs the same number of steps, and that number is len(sampler).
    assert len(set(lengths)) == 1
    assert all(len(batches) == lengths[0] for batches in per_rank)
    steps = lengths[0]
    remaining = N - start
    assert steps == (remaining // B if setup["drop_last"] else -(-remaining // B))
    # Each step's slices add up to one global batch of B, within the caps, in multiples of q.
    cap = setup["cap"] or B
    for s in range(steps):
        assert sum(len(batches[s]) for batches in per_rank) == B
        assert all(1 <= len(batches[s]) <= cap for batches in per_rank)
        assert all(len(batches[s]) % setup["q"] == 0 for batches in per_rank)
    # Together the ranks read positions [start, start + steps*B) of the epoch order, once each.
    got = Counter(i for batches in per_rank for batch in batches for i in batch)
    order = EpochOrder(N, setup["seed"], setup["epoch"])
    want = Counter(order.indices_range(start, start + steps * B).tolist())
    assert got == want
    if not setup["drop_last"]:
        # Nothing left out: every sample not trained before the resume point is read.
        assert set(range(N)) - set(order.indices_range(0, start).tolist()) <= set(got)
    else:
        assert max(got.values(), default=1) == 1


def check_unpadded(setup, per_rank):
    """pad=False: every sample not trained before the resume point exactly once, no empty
    batch; all steps but the last are whole global batches, the last is the remainder."""
    N, B, start = setup["N"], setup["B"], setup["start"]
    steps = -(-(N - start) // B)
    if steps == 0:
        assert all(not batches for batches in per_rank)
        return
    assert all(steps - 1 <= len(batches) <= steps for batches in per_rank)
    assert all(batch for batches in per_rank for batch in batches)
    got = Counter(i for batches in per_rank for batch in batches for i in batch)
    order = EpochOrder(N, setup["seed"], setup["epoch"])
    assert got == Counter(order.indices_range(start, N).tolist())
    assert max(got.values(), default=1) == 1
    for s in range(steps - 1):
        assert sum(len(batches[s]) for batches in per_rank) == B
    last = [batches[steps - 1] for batches in per_rank if len(batches) == steps]
    assert sum(len(batch) for batch in last) == N - start - (steps - 1) * B


def test_unpadded_evaluation_counts_each_rank_and_refuses_training():
    samplers = [WeightedDistributedSampler(range(10), 8, num_replicas=3, rank=r,
                                           policy="static", initial_weights=[1, 1, 2], pad=False,
                                           seed=1) for r in range(3)]
    batches = [list(s) for s in samplers]
    # Plan (2, 2, 4): the second step has positions 8 and 9 only, both in rank 0's slice.
    assert [len(b) for b in batches] == [len(s) for s in samplers] == [2, 1, 1]
    assert sorted(i for b in batches for batch in b for i in batch) == list(range(10))
    # The epoch is complete on every rank, also on those without a batch in the last step.
    assert all(s.state_dict() == {**samplers[0].state_dict(), "epoch": 1, "position": 0}
               for s in samplers)
    import torch

    with pytest.raises(ConfigError, match="pad=False is for evaluation"):
        samplers[0].attach(torch.nn.Linear(2, 2))


@settings(max_examples=100, deadline=None)
@given(setups())
def test_rank_slices_follow_the_plan_in_rank_order(setup):
    per_rank, lengths = run_epoch(setup)
    if not setup["pad"]:
        setup = {**setup, "pad": True}
        per_rank, lengths = run_epoch(setup)
    order = EpochOrder(setup["N"], setup["seed"], setup["epoch"])
    B, start = setup["B"], setup["start"]
    for s in range(lengths[0]):
        step = [i for batches in per_rank for i in batches[s]]
        assert step == order.indices_range(start + s * B, start + (s + 1) * B).tolist()


def test_padding_wraps_positions_onto_the_start_of_the_order():
    sampler = WeightedDistributedSampler(range(10), 4, num_replicas=2, rank=1, policy="equal",
                                         shuffle=False)
    assert list(sampler) == [[2, 3], [6, 7], [0, 1]]  # positions 10, 11 wrap to 0, 1


def test_equal_policy_is_the_distributed_sampler_split_and_starts_no_coordinator():
    samplers = [WeightedDistributedSampler(range(100), 30, num_replicas=4, rank=r,
                                           policy="equal") for r in range(4)]
    assert all(s.batch_sizes == (8, 8, 7, 7) for s in samplers)
    assert all(s.coordinator_address is None and s.session is None for s in samplers)
    assert len(samplers[0]) == 4


def test_static_weights_set_the_split():
    sampler = WeightedDistributedSampler(range(100), 70, num_replicas=3, rank=0,
                                         policy="static", initial_weights=[1, 2, 4])
    assert sampler.batch_sizes == (10, 20, 40)
    assert [len(b) for b in sampler] == [10, 10]


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=2, num_replicas=3, rank=0), "global_batch_size=2 is smaller"),
    (dict(global_batch_size=8, num_replicas=3, rank=3), r"Invalid rank 3, rank should be in "
                                                        r"the interval \[0, 2\]"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, initial_weights=[1, 2, 3]),
     "initial_weights has 3 entries"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, initial_weights=[1, 0]),
     r"initial_weights\[1\] = 0.0"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, initial_weights=[1, float("nan")]),
     r"initial_weights\[1\] = nan"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, policy="fastest"), "'fastest'"),
    (dict(global_batch_size=0, num_replicas=2, rank=0), "global_batch_size 0"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, max_batch_size=3), "larger than the sum"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, min_batch_size=[1, 0]),
     "min_batch_size 0 for rank 1"),
    (dict(global_batch_size=9, num_replicas=2, rank=0, batch_size_multiple=2),
     "not a multiple of batch_size_multiple=2"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, rebalance_every=0), "rebalance_every 0"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, options={"bandwidth": 1}),
     "'bandwidth'"),
    (dict(global_batch_size=8), "torch.distributed is not initialized"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, max_batch_size="memory"), "'memory'"),
    (dict(global_batch_size=8, num_replicas=2, rank=0, initial_weights="measure"), "'measure'"),
])
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, match):
    kwargs.setdefault("policy", "equal")
    with pytest.raises(ValueError, match=match):
        WeightedDistributedSampler(range(50), **kwargs)


def test_auto_memory_caps_need_the_probe_which_leaves_a_cpu_rank_uncapped():
    import torch

    sampler = WeightedDistributedSampler(range(64), 16, num_replicas=1, rank=0, policy="equal",
                                         max_batch_size="auto", batch_size_multiple=4)
    with pytest.raises(ConfigError, match="max_batch_size='auto': call sampler.probe"):
        iter(sampler).__next__()
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="memory_fraction 1.5"):
        sampler.probe(lambda b: model(torch.randn(b, 3)).sum().backward(), memory_fraction=1.5)
    sampler.probe(lambda b: model(torch.randn(b, 3)).sum().backward(), model=model)
    assert sampler.max_sizes == (16,)
    assert len(next(iter(sampler))) == 16
    # Two replicas without torch.distributed cannot exchange their figures.
    pair = WeightedDistributedSampler(range(64), 16, num_replicas=2, rank=0, policy="equal",
                                      max_batch_size="auto")
    with pytest.raises(ConfigError, match="num_replicas=2"):
        pair.probe(lambda b: None)


def test_empty_dataset_is_refused():
    with pytest.raises(ConfigError, match="dataset length 0"):
        WeightedDistributedSampler([], 4, num_replicas=1, rank=0, policy="equal")


def test_adaptive_policy_across_processes_needs_torch_distributed():
    with pytest.raises(ConfigError, match="needs torch.distributed"):
        WeightedDistributedSampler(range(50), 8, num_replicas=2, rank=0, policy="affine")


def test_iterating_an_epoch_twice_without_set_epoch_warns():
    sampler = WeightedDistributedSampler(range(20), 4, num_replicas=1, rank=0, policy="equal")
    first = list(sampler)
    with pytest.warns(UserWarning, match="without set_epoch"):
        second = list(sampler)
    assert first == second
    sampler.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = list(sampler)
    assert third != first


def test_state_dict_is_json_and_resumes_where_yielding_stopped():
    sampler = WeightedDistributedSampler(range(50), 8, num_replicas=1, rank=0, policy="equal",
                                         seed=5)
    sampler.set_epoch(2)
    it = iter(sampler)
    seen = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["epoch"] == 2 and state["position"] == 24
    fresh = WeightedDistributedSampler(range(50), 8, num_replicas=1, rank=0, policy="equal",
                                       seed=5)
    fresh.load_state_dict(state)
    assert len(fresh) == 4  # ceil((50 - 24) / 8) steps left in epoch 2
    rest = list(fresh)
    assert len(rest) == 4
    everything = [i for b in seen + rest for i in b]
    assert sorted(set(everything)) == list(range(50))
    assert len(everything) == 56  # 7 steps of 8, the last padded with 6 wrapped samples


def test_state_of_another_dataset_or_seed_is_refused():
    a = WeightedDistributedSampler(range(50), 8, num_replicas=1, rank=0, policy="equal", seed=1)
    b = WeightedDistributedSampler(range(50), 8, num_replicas=1, rank=0, policy="equal", seed=2)
    with pytest.raises(ConfigError, match="seed, shuffle, num_samples"):
        b.load_state_dict(a.state_dict())


def test_loss_scale_is_the_share_times_world_size():
    sampler = WeightedDistributedSampler(range(50), 16, num_replicas=2, rank=0, policy="equal")
    assert sampler.loss_scale(4) == pytest.approx(0.5)
    assert sampler.loss_scale(12) == pytest.approx(1.5)


def test_two_ranks_checkpoint_at_step_7_and_three_ranks_resume_with_another_batch():
    N, seed, epoch = 300, 11, 1
    old = [scripted_sampler(range(N), 24, num_replicas=2, rank=r, seed=seed,
                         plan_weights=lambda e, w: [1, 3]) for r in range(2)]
    trained = []
    for sampler in old:
        sampler.set_epoch(epoch)
        batches = iter(sampler)
        trained += [i for _ in range(7) for i in next(batches)]
    states = [s.state_dict() for s in old]
    assert states[0] == states[1] and states[0]["position"] == 7 * 24
    state = json.loads(json.dumps(states[0]))
    new = [scripted_sampler(range(N), 30, num_replicas=3, rank=r, seed=seed, rebalance_every=2,
                         plan_weights=lambda e, w: [1 + w, 2, 3]) for r in range(3)]
    rest = []
    for sampler in new:
        sampler.load_state_dict(state)
        assert sampler.epoch == epoch and len(sampler) == -(-(N - 7 * 24) // 30)
        rest += [i for batch in sampler for i in batch]
    # Exactly the samples not yet trained, plus the padding of the last global batch.
    assert sorted(set(trained + rest)) == list(range(N))
    assert len(trained) + len(rest) == 7 * 24 + 5 * 30
    assert len(set(trained) & set(rest)) == len(trained) + len(rest) - N


def test_resume_survives_a_dataloader_that_creates_an_unused_iterator_first():
    from torch.utils.data import DataLoader

    sampler = WeightedDistributedSampler(range(100), 10, num_replicas=1, rank=0,
                                         policy="equal", seed=3)
    state = {**sampler.state_dict(), "position": 50}
    sampler.load_state_dict(state)
    # A multi-worker DataLoader calls iter(batch_sampler) twice before the first batch.
    loader = DataLoader(range(100), batch_sampler=sampler, num_workers=1,
                        multiprocessing_context="forkserver")
    assert len(sampler) == 5 and len(loader) == 5
    seen = [i for batch in loader for i in batch.tolist()]
    order = EpochOrder(100, seed=3, epoch=0)
    assert seen == order.indices_range(50, 100).tolist()
    assert len(sampler) == 10  # the resumed epoch is done; a new iterator starts it over


def test_accumulate_cuts_tensors_tuples_dicts_and_string_lists_into_micro_batches():
    import torch

    sampler = WeightedDistributedSampler(range(40), 8, num_replicas=1, rank=0,
                                         policy="equal", micro_batch_size=4)
    batches = [["a", "b", "c", "d", "e", "f", "g", "h"],
               {"x": torch.arange(8), "y": (torch.arange(8), torch.ones(8))}]
    out = list(sampler.accumulate(batches))
    assert [m for m, _, _ in out[:2]] == [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    assert [(s, last) for _, s, last in out] == [(0.5, False), (0.5, True)] * 2
    assert out[3][0]["x"].tolist() == [4, 5, 6, 7] and out[3][0]["y"][0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="micro_batch_size"):
        list(WeightedDistributedSampler(range(40), 8, num_replicas=1, rank=0,
                                        policy="equal").accumulate(batches))
