"""Plans and apportionment: the invariants every plan keeps.

``Σ b_i = B``, ``min_i ≤ b_i ≤ max_i``, multiples of the quantum, deterministic, and a digest
that every rank computes identically.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardbalance import plan as plan_module
from shardbalance._exceptions import ConfigError, PlanError
from shardbalance.plan import (Plan, apportion, equal_plan, memory_cap, normalize_bounds,
                               static_plan, water_fill)

FAST = settings(max_examples=60, deadline=None)

# Weights as policies and users produce them: zeros, ordinary values and extreme ratios.
positive_weight = st.one_of(
    st.sampled_from([1e-9, 1.0, 1e9]),
    st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False),
)
weight = st.one_of(st.just(0.0), positive_weight)


@st.composite
def bounded_case(draw, zero_weights=True):
    """A feasible apportionment problem with bounds that went through normalize_bounds.

    Raw bounds are drawn off the quantum grid on purpose: normalize_bounds must round the
    minimum up and the maximum down.
    """
    k = draw(st.integers(1, 64))
    q = draw(st.sampled_from([1, 1, 2, 3, 8]))
    weights = draw(st.lists(weight if zero_weights else positive_weight, min_size=k, max_size=k))
    assume(sum(weights) > 0)
    min_units = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    span = draw(st.lists(st.one_of(st.none(), st.integers(0, 40)), min_size=k, max_size=k))
    max_units = [None if s is None else m + s for m, s in zip(min_units, span)]
    lo_total = sum(min_units)
    hi_total = lo_total + 60 * k if None in max_units else sum(max_units)
    units = draw(st.integers(lo_total, hi_total))
    total = units * q
    off_grid = draw(st.lists(st.integers(0, q - 1), min_size=2 * k, max_size=2 * k))
    raw_min = [(m - 1) * q + 1 + d for m, d in zip(min_units, off_grid[:k])]
    raw_max = [total if m is None else m * q + d for m, d in zip(max_units, off_grid[k:])]
    lo, hi = normalize_bounds(k, total, raw_min, raw_max, q)
    assert lo == tuple(m * q for m in min_units)
    assert hi == tuple(min(total, total if m is None else m * q) for m in max_units)
    return weights, total, lo, hi, q


def _water_filled_units(weights, total, lo, hi, q):
    """The real-valued shares (in quanta) that apportion rounds."""
    w = np.asarray(weights, dtype=np.float64)
    shares, _ = water_fill(w / w.sum(), np.zeros(len(w)), np.asarray(lo) // q,
                           np.asarray(hi) // q, total // q)
    return shares


# --------------------------------------------------------------------------------------------
# apportion


@FAST
@given(bounded_case())
def test_apportion_sums_to_total_within_bounds_on_the_quantum_grid(case):
    weights, total, lo, hi, q = case
    sizes = apportion(weights, total, lo, hi, q)
    assert isinstance(sizes, tuple)
    assert all(type(b) is int for b in sizes)
    assert len(sizes) == len(weights)
    assert sum(sizes) == total
    assert all(l <= b <= h for b, l, h in zip(sizes, lo, hi))
    assert all(b % q == 0 for b in sizes)


@FAST
@given(bounded_case())
def test_apportion_is_deterministic(case):
    weights, total, lo, hi, q = case
    first = apportion(weights, total, lo, hi, q)
    assert apportion(list(weights), total, list(lo), list(hi), q) == first
    assert apportion(np.array(weights), total, np.array(lo), np.array(hi), q) == first


@FAST
@given(bounded_case(zero_weights=False))
def test_apportion_is_within_one_quantum_of_the_water_filled_share(case):
    """Largest remainder: floor every share, hand the leftover quanta out one each.

    (Positive weights only: a zero weight has slope 0 in water_fill, see
    test_water_fill_with_a_zero_slope_still_meets_the_total_or_raises.)
    """
    weights, total, lo, hi, q = case
    sizes = apportion(weights, total, lo, hi, q)
    shares = _water_filled_units(weights, total, lo, hi, q)
    assert shares.sum() == pytest.approx(total // q)
    for b, s in zip(sizes, shares):
        assert abs(b / q - s) < 1 + 1e-9


@st.composite
def unbound_case(draw):
    """Positive weights, a total large enough and bounds loose enough that none binds."""
    k = draw(st.integers(1, 64))
    q = draw(st.sampled_from([1, 2, 8]))
    scale = draw(st.sampled_from([1e-9, 1.0, 1e9]))
    weights = [scale * w for w in draw(st.lists(st.floats(1.0, 1e4), min_size=k, max_size=k))]
    units = draw(st.integers(k, 10**7))
    w = np.asarray(weights)
    exact_units = units * w / w.sum()
    assume(exact_units.min() > 1)
    slack = draw(st.lists(st.one_of(st.none(), st.integers(1, 5)), min_size=k, max_size=k))
    maxs = [None if s is None else (math.ceil(e) + s) * q for e, s in zip(exact_units, slack)]
    maxs = [units * q if m is None else min(m, units * q) for m in maxs]
    lo, hi = normalize_bounds(k, units * q, 1, maxs, q)
    return weights, units * q, lo, hi, q


@FAST
@given(unbound_case())
def test_apportion_is_close_to_proportional_when_no_bound_binds(case):
    """Each rank is within one quantum of its exact share total·w_i/Σw."""
    weights, total, lo, hi, q = case
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    assert all(l < e <= h * (1 + 1e-12) for e, l, h in zip(exact, lo, hi))
    sizes = apportion(weights, total, lo, hi, q)
    assert sum(sizes) == total
    for b, e in zip(sizes, exact):
        assert abs(b - e) < q * (1 + 1e-9)


@FAST
@given(bounded_case())
def test_apportion_is_monotone_in_weight_for_equal_bounds(case):
    weights, total, lo, hi, q = case
    sizes = apportion(weights, total, lo, hi, q)
    k = len(weights)
    for i in range(k):
        for j in range(k):
            # Weights one float step apart (1e9 and 999999999.9999999) can round to the
            # same quota, which ties are then broken by rank: monotone beyond that resolution.
            if weights[i] > weights[j] * (1 + 1e-9) and lo[i] == lo[j] and hi[i] == hi[j]:
                assert sizes[i] >= sizes[j], (i, j, weights[i], weights[j], sizes)


@FAST
@given(st.integers(1, 64), st.sampled_from([1, 2, 4, 8]), st.data())
def test_equal_weights_without_bounds_give_the_distributed_sampler_split(k, q, data):
    units = data.draw(st.integers(k, 40 * k))
    total = units * q
    lo, hi = normalize_bounds(k, total, 1, None, q)
    scale = data.draw(st.sampled_from([1.0, 3.0, 1e-6, 1e6]))
    sizes = apportion([scale] * k, total, lo, hi, q)
    expected = tuple((units // k + (1 if rank < units % k else 0)) * q for rank in range(k))
    assert sizes == expected
    assert max(sizes) - min(sizes) <= q
    assert equal_plan(k, total, lo, hi, q).batch_sizes == expected


@FAST
@given(st.integers(1, 12), st.sampled_from([1, 2, 4, 8]), st.data())
def test_weights_that_are_a_valid_split_come_back_unchanged_as_the_water_fill_gives(k, q, data):
    # A policy's decision is a split already (decide() apportions it again): the shortcut for
    # such weights returns exactly what the water fill returns for them.
    units = data.draw(st.lists(st.integers(1, 60), min_size=k, max_size=k))
    sizes = [u * q for u in units]
    lo = [q * data.draw(st.integers(1, u)) for u in units]
    hi = [q * (u + data.draw(st.integers(0, 20))) for u in units]
    weights = [float(s) for s in sizes] if data.draw(st.booleans()) else sizes
    total = sum(sizes)
    assert plan_module._whole_split(weights, total, lo, hi, q)
    shortcut = apportion(weights, total, lo, hi, q)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plan_module, "_whole_split", lambda *args: False)
        filled = apportion(weights, total, lo, hi, q)
    assert shortcut == filled == tuple(sizes)
    # Not a split (a fraction, a size off by one, out of bounds): the water fill decides.
    assert not plan_module._whole_split([w + 0.5 for w in weights], total, lo, hi, q)
    assert not plan_module._whole_split(sizes[:-1] + [sizes[-1] + q], total, lo, hi, q)
    assert not plan_module._whole_split(sizes, total, [h + q for h in hi], [h + q for h in hi], q)


def test_apportion_handles_extreme_weight_ratios():
    lo, hi = normalize_bounds(3, 1000)
    assert apportion([1e-9, 1e9, 0.0], 1000, lo, hi) == (1, 998, 1)
    assert apportion([1e9, 1e9, 1e-9], 1000, lo, hi) == (500, 499, 1)


def test_apportion_remainder_goes_to_largest_fraction_then_lowest_rank():
    lo, hi = normalize_bounds(3, 10)
    # Shares 10/3 each: the one leftover sample goes to rank 0.
    assert apportion([1, 1, 1], 10, lo, hi) == (4, 3, 3)
    # Shares 2.5, 2.5, 5 -> floors 2, 2, 5 -> leftover 1 to the lower of the tied ranks.
    assert apportion([1, 1, 2], 10, lo, hi) == (3, 2, 5)


def test_apportion_clamps_to_bounds_and_shares_the_rest():
    lo, hi = normalize_bounds(3, 30, 2, [4, 30, 30])
    assert apportion([10, 1, 1], 30, lo, hi) == (4, 13, 13)
    assert apportion([0, 1, 1], 30, lo, hi) == (2, 14, 14)


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [1, math.nan], [1, math.inf], []])
def test_apportion_rejects_bad_weights(weights):
    with pytest.raises(PlanError):
        apportion(weights, 4, [1] * len(weights), [4] * len(weights))


def test_apportion_rejects_wrong_lengths_and_off_grid_totals():
    with pytest.raises(PlanError):
        apportion([1, 1], 4, [1], [4, 4])
    with pytest.raises(PlanError):
        apportion([1, 1], 5, [2, 2], [4, 4], quantum=2)


# --------------------------------------------------------------------------------------------
# water_fill


@st.composite
def water_case(draw, intercept_range=(-1e3, 1e3)):
    k = draw(st.integers(1, 24))
    floats = lambda a, b: st.floats(a, b, allow_nan=False, allow_infinity=False)  # noqa: E731
    slopes = draw(st.lists(floats(1e-3, 1e3), min_size=k, max_size=k))
    intercepts = draw(st.lists(floats(*intercept_range), min_size=k, max_size=k))
    lo = draw(st.lists(floats(0, 100), min_size=k, max_size=k))
    hi = [l + draw(floats(0, 100)) for l in lo]
    frac = draw(floats(0, 1))
    total = sum(lo) + frac * (sum(hi) - sum(lo))
    return slopes, intercepts, lo, hi, total


def _tol(*values):
    return 1e-9 * max(1.0, *(abs(float(v)) for v in values))


@FAST
@given(water_case())
def test_water_fill_meets_the_total_within_bounds(case):
    slopes, intercepts, lo, hi, total = case
    shares, _ = water_fill(slopes, intercepts, lo, hi, total)
    assert abs(shares.sum() - total) <= 1e-6 * max(1.0, total)
    for s, l, h in zip(shares, lo, hi):
        assert l <= s <= h


@FAST
@given(water_case())
def test_water_fill_ranks_off_their_bounds_share_one_level(case):
    slopes, intercepts, lo, hi, total = case
    shares, level = water_fill(slopes, intercepts, lo, hi, total)
    for a, c, s, l, h in zip(slopes, intercepts, shares, lo, hi):
        line = a * level + c
        tol = _tol(a * level, c, total) * 1e3
        at_lo, at_hi = s <= l + tol, s >= h - tol
        if not (at_lo or at_hi):
            assert abs(line - s) <= tol
        else:
            # Held at a bound: the common level would put it beyond that bound.
            assert (at_lo and line <= l + tol) or (at_hi and line >= h - tol)


@FAST
@given(water_case(intercept_range=(-1e3, 0.0)), st.data())
def test_water_fill_is_monotone_in_slope(case, data):
    """In the regime the policies use (intercepts -α/β ≤ 0, bounds ≥ 0): steeper, more."""
    slopes, intercepts, lo, hi, total = case
    k = len(slopes)
    assume(k >= 2)
    # Give ranks 0 and 1 the same intercept and bounds, rank 0 the steeper slope.
    intercepts[1], lo[1], hi[1] = intercepts[0], lo[0], hi[0]
    slopes[0] = slopes[1] * data.draw(st.floats(1.0, 10.0))
    total = min(max(total, sum(lo)), sum(hi))
    shares, _ = water_fill(slopes, intercepts, lo, hi, total)
    assert shares[0] >= shares[1] - _tol(total) * 1e3
    # Raising one rank's slope never lowers its own share.
    steeper = list(slopes)
    steeper[1] *= data.draw(st.floats(1.0, 10.0))
    raised, _ = water_fill(steeper, intercepts, lo, hi, total)
    assert raised[1] >= shares[1] - _tol(total) * 1e3


def test_water_fill_equal_finish_example():
    # t_i(b) = α_i + β_i·b with α = (0.1, 0.1), β = (1e-3, 3e-3), B = 400:
    # b_i = (T − α_i)/β_i, T = (B + Σ α/β) / Σ 1/β.
    alpha, beta = np.array([0.1, 0.1]), np.array([1e-3, 3e-3])
    shares, level = water_fill(1 / beta, -alpha / beta, [1, 1], [400, 400], 400)
    T = (400 + (alpha / beta).sum()) / (1 / beta).sum()
    assert level == pytest.approx(T)
    assert shares == pytest.approx((T - alpha) / beta)


@pytest.mark.parametrize("total", [1.9, 20.1, -1.0])
def test_water_fill_rejects_infeasible_totals(total):
    with pytest.raises(PlanError):
        water_fill([1.0, 2.0], [0.0, 0.0], [1.0, 1.0], [10.0, 10.0], total)


@pytest.mark.parametrize("slopes", [[1.0, -1.0], [1.0, math.nan], [math.inf, 1.0]])
def test_water_fill_rejects_bad_slopes(slopes):
    with pytest.raises(PlanError):
        water_fill(slopes, [0.0, 0.0], [1.0, 1.0], [10.0, 10.0], 5.0)


def test_water_fill_with_a_zero_slope_still_meets_the_total_or_raises():
    """A rank with slope 0 is frozen at clamp(intercept); if the others cannot absorb the
    rest there is no level that solves Σ shares = total, and that must not pass silently."""
    try:
        shares, _ = water_fill([0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [10.0, 10.0], 15.0)
    except PlanError:
        return
    assert shares.sum() == pytest.approx(15.0)


# --------------------------------------------------------------------------------------------
# normalize_bounds


def _raises_config(match, *args, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        normalize_bounds(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_normalize_bounds_names_a_global_batch_below_the_minimums():
    msg = _raises_config(r"global_batch_size=10", 4, 10, 3)
    assert "12" in msg


def test_normalize_bounds_names_a_global_batch_above_the_maximums():
    msg = _raises_config(r"global_batch_size=100", 4, 100, 1, 20)
    assert "80" in msg and "max_batch_size" in msg


def test_normalize_bounds_names_a_max_below_the_min():
    msg = _raises_config(r"max_batch_size 4", 2, 10, 5, [10, 4])
    assert "rank 1" in msg and "min_batch_size 5" in msg


@pytest.mark.parametrize("bad", [0, -3])
def test_normalize_bounds_names_a_min_below_one(bad):
    _raises_config(rf"min_batch_size {bad}", 2, 10, [1, bad])


def test_normalize_bounds_names_a_quantum_that_does_not_divide_the_batch():
    msg = _raises_config(r"global_batch_size=10", 2, 10, quantum=4)
    assert "batch_size_multiple=4" in msg


@pytest.mark.parametrize("quantum", [0, -2, True, 1.5])
def test_normalize_bounds_names_an_invalid_quantum(quantum):
    _raises_config(re.escape(f"batch_size_multiple {quantum!r}"), 2, 8, quantum=quantum)


def test_normalize_bounds_names_a_rank_with_no_multiple_of_the_quantum():
    msg = _raises_config(r"batch_size_multiple=4", 2, 16, [4, 5], [8, 7], quantum=4)
    assert "Rank 1" in msg and "[5, 7]" in msg


@pytest.mark.parametrize("field,kwargs", [
    ("min_batch_size", {"min_batch_size": [1, 1]}),
    ("max_batch_size", {"max_batch_size": [4, 4, 4, 4]}),
])
def test_normalize_bounds_names_a_per_rank_list_of_the_wrong_length(field, kwargs):
    msg = _raises_config(field, 3, 12, **kwargs)
    assert "entries" in msg and "3" in msg


@pytest.mark.parametrize("value", [[1.5, 1], [True, 1], ["2", 1]])
def test_normalize_bounds_rejects_non_integer_entries(value):
    _raises_config(r"min_batch_size entries must be integers", 2, 8, value)


@FAST
@given(st.integers(1, 16), st.sampled_from([1, 2, 4]), st.data())
def test_normalize_bounds_output_is_feasible_and_on_the_grid(k, q, data):
    total = data.draw(st.integers(k, 50 * k)) * q
    mins = data.draw(st.lists(st.integers(1, 3 * q), min_size=k, max_size=k))
    maxs = data.draw(st.one_of(st.none(), st.lists(st.integers(1, 100 * q), min_size=k,
                                                    max_size=k)))
    try:
        lo, hi = normalize_bounds(k, total, mins, maxs, q)
    except ConfigError:
        return
    assert all(l % q == 0 and h % q == 0 and 1 <= l <= h <= total for l, h in zip(lo, hi))
    assert all(l >= m for l, m in zip(lo, mins))
    assert maxs is None or all(h <= m for h, m in zip(hi, maxs))
    assert sum(lo) <= total <= sum(hi)


def test_normalize_bounds_defaults_and_scalars():
    assert normalize_bounds(3, 12) == ((1, 1, 1), (12, 12, 12))
    assert normalize_bounds(2, 12, 3, 100, 2) == ((4, 4), (12, 12))
    assert normalize_bounds(2, 12, np.int64(2), np.int64(8)) == ((2, 2), (8, 8))


# --------------------------------------------------------------------------------------------
# Memory caps (max_batch_size="auto")

@FAST
@given(st.integers(0, 1 << 34), st.integers(1, 1 << 24), st.integers(1, 4096),
       st.integers(1, 4096), st.integers(0, 1 << 40), st.integers(1, 1 << 20))
def test_memory_cap_is_the_largest_batch_whose_modelled_peak_fits(fixed, per_sample, b0, gap,
                                                                   budget, total):
    sizes = (b0, b0 + gap)
    peaks = [fixed + per_sample * b for b in sizes]
    cap = memory_cap(sizes, peaks, budget, total)
    assert 0 <= cap <= total
    if cap > 0:
        assert fixed + per_sample * cap <= budget * (1 + 1e-12)
    if cap < total:
        assert fixed + per_sample * (cap + 1) > budget * (1 - 1e-12)


def test_memory_cap_examples():
    # 2 GiB fixed, 50 MiB per sample, 40 GiB budget: (40 - 2) GiB / 50 MiB = 778.24 -> 778.
    gib, mib = 1 << 30, 1 << 20
    assert memory_cap((32, 64), [2 * gib + 32 * 50 * mib, 2 * gib + 64 * 50 * mib],
                      40 * gib, 4096) == 778
    assert memory_cap((32, 64), [5 * gib, 5 * gib], 1 * gib, 4096) == 4096  # does not grow
    assert memory_cap((32, 64), [5 * gib, 6 * gib], 1 * gib, 4096) == 0  # fixed cost too big


@pytest.mark.parametrize("sizes, peaks, budget, match", [
    ((64, 32), (1, 2), 10, r"probe sizes \(64, 32\)"),
    ((0, 32), (1, 2), 10, r"probe sizes \(0, 32\)"),
    ((16, 32), (float("nan"), 2), 10, r"peak memory at batch 16: nan"),
    ((16, 32), (1, -2), 10, r"peak memory at batch 32: -2"),
    ((16, 32), (1, 2), float("inf"), r"memory budget: inf"),
    ((16, "many"), (1, 2), 10, r"sizes \(16, 'many'\)"),
    ((16,), (1, 2), 10, r"sizes \(16,\)"),
])
def test_memory_cap_names_bad_input(sizes, peaks, budget, match):
    with pytest.raises(ConfigError, match=match):
        memory_cap(sizes, peaks, budget, 128)


# --------------------------------------------------------------------------------------------
# Plan

identity_text = st.text(st.characters(codec="utf-8"), max_size=12)


@st.composite
def plans(draw):
    sizes = tuple(draw(st.lists(st.integers(0, 1000), min_size=1, max_size=8)))
    return Plan(
        run_id=draw(identity_text), generation=draw(st.integers(0, 100)),
        epoch=draw(st.integers(0, 10_000)), window=draw(st.integers(0, 10_000)),
        batch_sizes=sizes, global_batch_size=sum(sizes),
        policy=draw(st.sampled_from(["equal", "static", "proportional", "seed", "affine"])),
        predicted_step_s=draw(st.one_of(st.none(), st.floats(0, 1e3, allow_nan=False))),
    )


def _fields(plan: Plan) -> dict:
    return dict(run_id=plan.run_id, generation=plan.generation, epoch=plan.epoch,
                window=plan.window, batch_sizes=plan.batch_sizes,
                global_batch_size=plan.global_batch_size, policy=plan.policy,
                predicted_step_s=plan.predicted_step_s)


@FAST
@given(plans())
def test_plan_digest_is_stable(plan):
    again = Plan(**_fields(plan))
    assert again.digest == plan.digest
    assert again == plan
    assert len(plan.digest) == 16 and int(plan.digest, 16) >= 0


def test_plan_digest_is_pinned():
    # Ranks running different builds must agree on a digest; this catches format changes.
    plan = Plan("run-1", 0, 2, 100, (3, 5), 8, "affine", 0.25)
    assert plan.digest == Plan("run-1", 0, 2, 100, [3, 5], 8, "affine").digest
    assert plan.digest == "c4bb6094d5dfb5f3"


@FAST
@given(plans(), st.data())
def test_plan_digest_differs_when_any_identity_field_differs(plan, data):
    fields = _fields(plan)
    name = data.draw(st.sampled_from(["run_id", "generation", "epoch", "window",
                                      "batch_sizes", "policy"]))
    if name == "run_id":
        fields["run_id"] = plan.run_id + "x"
    elif name == "policy":
        fields["policy"] = plan.policy + "-2"
    elif name == "batch_sizes":
        sizes = list(plan.batch_sizes)
        if len(sizes) >= 2 and data.draw(st.booleans()):
            # Same B, moved between ranks.
            i = sizes.index(max(sizes))
            j = (i + 1) % len(sizes)
            assume(sizes[i] > 0)
            sizes[i] -= 1
            sizes[j] += 1
        else:
            sizes.append(0)  # one more rank, same B
        fields["batch_sizes"] = tuple(sizes)
    else:
        fields[name] = getattr(plan, name) + data.draw(st.integers(1, 5))
    other = Plan(**fields)
    assert other.digest != plan.digest
    assert other.digest_int != plan.digest_int


def test_plan_digest_covers_the_global_batch_size():
    # B is only free to change together with the sizes; both change the digest.
    assert Plan("r", 0, 0, 0, (2, 2), 4, "equal").digest != Plan("r", 0, 0, 0, (2, 3), 5,
                                                                  "equal").digest


def test_plan_digest_ignores_the_prediction():
    a = Plan("r", 0, 0, 0, (2, 2), 4, "affine", None)
    b = Plan("r", 0, 0, 0, (2, 2), 4, "affine", 1.5)
    assert a.digest == b.digest


@FAST
@given(plans())
def test_plan_round_trips_through_dict_and_json(plan):
    data = plan.to_dict()
    assert data["digest"] == plan.digest
    back = Plan.from_dict(data)
    assert back == plan and back.digest == plan.digest
    over_wire = Plan.from_dict(json.loads(json.dumps(data)))
    assert over_wire == plan and over_wire.digest == plan.digest
    assert over_wire.predicted_step_s == plan.predicted_step_s


@FAST
@given(plans(), st.text("0123456789abcdef", min_size=16, max_size=16))
def test_plan_from_dict_rejects_a_tampered_digest(plan, fake):
    assume(fake != plan.digest)
    data = plan.to_dict()
    data["digest"] = fake
    with pytest.raises(PlanError, match="digest"):
        Plan.from_dict(data)


def test_plan_from_dict_rejects_tampered_fields_under_the_old_digest():
    data = Plan("r", 0, 0, 0, (2, 2), 4, "affine").to_dict()
    data["batch_sizes"] = [1, 3]
    with pytest.raises(PlanError, match="digest"):
        Plan.from_dict(data)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("epoch"),
    lambda d: d.update(generation="zero"),
    lambda d: d.update(batch_sizes=None),
    lambda d: d.update(batch_sizes=[2, 3]),
])
def test_plan_from_dict_rejects_malformed_records(mutate):
    data = Plan("r", 0, 0, 0, (2, 2), 4, "affine").to_dict()
    mutate(data)
    with pytest.raises(PlanError):
        Plan.from_dict(data)


@pytest.mark.parametrize("sizes,total", [((2, 2), 5), ((2, 2), 3), ((5, -1), 4), ((), 1)])
def test_plan_rejects_batch_sizes_not_summing_to_the_global_batch(sizes, total):
    with pytest.raises(PlanError):
        Plan("r", 0, 0, 0, sizes, total, "equal")


@FAST
@given(plans())
def test_plan_digest_int_is_a_positive_int64(plan):
    value = plan.digest_int
    assert type(value) is int
    assert 0 < value < 2 ** 63


def test_plan_is_immutable_and_knows_offsets():
    plan = Plan("r", 0, 1, 8, (3, 0, 5), 8, "static")
    with pytest.raises(AttributeError):
        plan.epoch = 2  # type: ignore[misc]
    assert plan.world_size == 3
    assert [plan.offset(r) for r in range(3)] == [0, 3, 3]
    moved = plan.moved_to(2, 0)
    assert moved.batch_sizes == plan.batch_sizes and (moved.epoch, moved.window) == (2, 0)
    assert moved.digest != plan.digest


def test_static_plan_follows_the_weights():
    lo, hi = normalize_bounds(3, 12)
    plan = static_plan([1, 2, 3], 12, lo, hi)
    assert plan.batch_sizes == (2, 4, 6) and plan.policy == "static"
