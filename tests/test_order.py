"""Tests of shardbalance.order: the per-epoch keyed bijection of [0, N)."""

import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardbalance import order as order_module
from shardbalance.order import EpochOrder

SMALL_SIZES = [1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1023, 1024, 1025, 1009, 4096, 4097, 65537]


def full(n, seed=0, epoch=0, shuffle=True):
    return EpochOrder(n, seed=seed, epoch=epoch, shuffle=shuffle).indices_range(0, n)


@pytest.mark.parametrize("n", SMALL_SIZES)
def test_bijection_on_edge_sizes(n):
    values = full(n, seed=7, epoch=3)
    assert values.dtype == np.int64
    assert np.array_equal(np.sort(values), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=5000),
    seed=st.integers(min_value=0, max_value=2**70),
    epoch=st.integers(min_value=0, max_value=10**6),
)
def test_bijection_random(n, seed, epoch):
    assert np.array_equal(np.sort(full(n, seed, epoch)), np.arange(n))


@pytest.mark.parametrize("n", [2**20, 2**20 + 1, 3 * 10**5 + 7])
def test_bijection_larger(n):
    assert np.array_equal(np.sort(full(n, seed=1, epoch=2)), np.arange(n))


@pytest.mark.parametrize("n", [5, 1000, 70_000, 2**33 + 5])
def test_deterministic_across_instances(n):
    positions = np.arange(0, 3000, dtype=np.int64) * 7919
    a = EpochOrder(n, seed=11, epoch=4).indices(positions)
    b = EpochOrder(n, seed=11, epoch=4).indices(positions)
    assert np.array_equal(a, b)


def test_pinned_values():
    # The order must never change between versions or machines: resumed runs depend on it.
    assert full(10, seed=0, epoch=0).tolist() == PINNED_10
    assert EpochOrder(10**6, seed=3, epoch=1).indices_range(0, 8).tolist() == PINNED_1E6
    assert EpochOrder(10**12 + 39, seed=5, epoch=2).indices_range(0, 4).tolist() == PINNED_1E12


PINNED_10 = [8, 3, 7, 1, 2, 0, 5, 6, 9, 4]
PINNED_1E6 = [56765, 976518, 350281, 698193, 899569, 65448, 323741, 282198]
PINNED_1E12 = [277544991539, 238927403481, 416237114125, 511077602893]


def test_epochs_and_seeds_differ():
    n = 1000
    orders = {
        (seed, epoch): tuple(full(n, seed, epoch)) for seed in range(4) for epoch in range(4)
    }
    assert len(set(orders.values())) == len(orders)
    assert tuple(range(n)) not in set(orders.values())


def test_large_seeds_and_epochs_differ():
    n = 4096
    assert not np.array_equal(full(n, seed=2**64), full(n, seed=0))
    assert not np.array_equal(full(n, seed=2**64 + 1), full(n, seed=1))
    assert not np.array_equal(full(n, epoch=2**63), full(n, epoch=2**63 + 1))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=3000),
    seed=st.integers(min_value=0, max_value=2**32),
    positions=st.lists(st.integers(min_value=0, max_value=2**62), min_size=1, max_size=50),
)
def test_wrap_around(n, seed, positions):
    order = EpochOrder(n, seed=seed, epoch=1)
    p = np.array(positions, dtype=np.int64)
    assert np.array_equal(order.indices(p), order.indices(p % n))


def test_wrap_around_last_batch():
    n = 1000
    order = EpochOrder(n, seed=2, epoch=5)
    assert np.array_equal(order.indices_range(n, n + 24), order.indices_range(0, 24))
    assert np.array_equal(order.indices_range(3 * n + 5, 3 * n + 9), order.indices_range(5, 9))


@pytest.mark.parametrize("n", [1, 7, 1024, 10**12 + 39])
def test_shuffle_false_is_identity_mod_n(n):
    order = EpochOrder(n, seed=9, epoch=9, shuffle=False)
    p = np.array([0, 1, 5, 1023, 1024, 10**6, 2**40 + 3, 2**62], dtype=np.int64)
    assert np.array_equal(order.indices(p), p % n)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=4000),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    seed=st.integers(min_value=0, max_value=100),
)
def test_chunking_invariance(n, cuts, seed):
    order = EpochOrder(n, seed=seed, epoch=2)
    whole = order.indices_range(0, n)
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    pieces = [order.indices_range(a, b) for a, b in zip(bounds, bounds[1:])]
    assert np.array_equal(np.concatenate(pieces), whole)
    pieces = [order.indices(np.arange(a, b)) for a, b in zip(bounds, bounds[1:])]
    assert np.array_equal(np.concatenate(pieces), whole)


def test_internal_chunk_size_does_not_matter(monkeypatch):
    n = 5000
    reference = full(n, seed=4, epoch=1)
    monkeypatch.setattr(order_module, "_CHUNK", 7)
    assert np.array_equal(full(n, seed=4, epoch=1), reference)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 65537, 300_001])
def test_table_and_arithmetic_paths_agree(monkeypatch, n):
    tabled = full(n, seed=12, epoch=3)
    monkeypatch.setattr(order_module, "_TABLE_MAX_HALF_BITS", 0)
    order = EpochOrder(n, seed=12, epoch=3)
    assert order._tables is None
    assert np.array_equal(order.indices_range(0, n), tabled)


def test_any_shape_and_dtype():
    order = EpochOrder(1000, seed=1)
    p = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    out = order.indices(p)
    assert out.shape == (2, 3, 4) and out.dtype == np.int64
    assert np.array_equal(out.ravel(), order.indices_range(0, 24))
    assert np.array_equal(order.indices(p.astype(np.uint32)), out)
    assert np.array_equal(order.indices(p[:, ::2, 1:]), out[:, ::2, 1:])
    assert order.indices(np.empty((0, 3), dtype=np.int64)).shape == (0, 3)
    assert order.indices_range(5, 5).shape == (0,)


@pytest.mark.parametrize("n", [10**12 + 39, 2**40, 2**40 + 1, 2**62 + 3])
def test_huge_n_spot_check(n):
    order = EpochOrder(n, seed=123, epoch=7)
    rng = np.random.default_rng(0)
    positions = np.concatenate([
        np.arange(2000, dtype=np.int64),
        np.arange(n - 1000, n, dtype=np.int64),
        rng.integers(0, n, 2000, dtype=np.int64),
    ])
    positions = np.unique(positions)
    start = time.perf_counter()
    values = order.indices(positions)
    assert time.perf_counter() - start < 2.0
    assert values.min() >= 0 and values.max() < n
    assert np.unique(values).size == positions.size
    fits = positions <= np.iinfo(np.int64).max - n
    assert np.array_equal(order.indices(positions[fits] + n), values[fits])


def test_consecutive_positions_look_shuffled():
    n = 10**6
    values = EpochOrder(n, seed=0, epoch=0).indices_range(0, 100_000).astype(np.float64)
    assert abs(np.corrcoef(np.arange(values.size), values)[0, 1]) < 0.02
    # Adjacent positions should land about n/3 apart, as for a random permutation.
    gaps = np.abs(np.diff(values))
    assert abs(gaps.mean() / n - 1 / 3) < 0.01
    # Each position's index is uniform across seeds.
    first = np.array([EpochOrder(64, seed=s).indices_range(0, 1)[0] for s in range(6400)])
    counts = np.bincount(first, minlength=64)
    chi2 = ((counts - 100) ** 2 / 100).sum()
    assert chi2 < 130  # 63 degrees of freedom: p < 1e-5 to fail by chance


def test_does_not_touch_global_rng_state():
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    py_state = random.getstate()
    for n in (10, 10**6, 10**12 + 39):
        EpochOrder(n, seed=5, epoch=1).indices_range(0, 1000)
    after = np.random.get_state()
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1])
    assert np_state[2:] == after[2:]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert py_state == random.getstate()


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_samples": 0}, "num_samples.*0"),
        ({"num_samples": -5}, "num_samples.*-5"),
        ({"num_samples": 2.5}, "num_samples.*2.5"),
        ({"num_samples": "10"}, "num_samples.*'10'"),
        ({"num_samples": True}, "num_samples.*True"),
        ({"num_samples": 2**63}, "num_samples.*9223372036854775808"),
        ({"num_samples": 10, "seed": -1}, "seed.*-1"),
        ({"num_samples": 10, "seed": 1.0}, "seed.*1.0"),
        ({"num_samples": 10, "epoch": -3}, "epoch.*-3"),
        ({"num_samples": 10, "epoch": None}, "epoch.*None"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        EpochOrder(**kwargs)


def test_numpy_integers_accepted():
    a = EpochOrder(np.int64(100), seed=np.uint32(3), epoch=np.int32(2))
    b = EpochOrder(100, seed=3, epoch=2)
    assert (a.num_samples, a.seed, a.epoch) == (100, 3, 2)
    assert np.array_equal(a.indices_range(0, 100), b.indices_range(0, 100))


def test_bad_positions():
    order = EpochOrder(100)
    with pytest.raises(ValueError, match="-4"):
        order.indices(np.array([1, -4, 3]))
    with pytest.raises(ValueError, match="float"):
        order.indices(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="stop.*3"):
        order.indices_range(5, 3)
