"""Balancing policies: pure functions from measured busy times to batch sizes.

The ranks here are simulated exactly: rank i takes ``t_i(b) = α_i + β_i·b`` busy seconds for a
batch of b samples, optionally with multiplicative noise from a seeded numpy Generator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shardbalance._exceptions import ConfigError
from shardbalance.plan import apportion, normalize_bounds
from shardbalance.policies import (
    ADAPTIVE_POLICIES,
    DEFAULT_OPTIONS,
    POLICIES,
    SEGMENT_STEPS,
    SLOPE_SIGNIFICANCE,
    CostModel,
    PolicyInput,
    check_options,
    decide,
    fit_cost_model,
)

STEPS_PER_ROUND = 10


class Cluster:
    """Ranks with affine busy times, and the measurement history a coordinator would keep."""

    def __init__(self, alphas, betas, global_batch_size, min_batch_size=1, max_batch_size=None,
                 quantum=1, policy="affine", options=None, rng=None):
        self.alphas = np.asarray(alphas, dtype=np.float64)
        self.betas = np.asarray(betas, dtype=np.float64)
        self.k = len(self.alphas)
        self.B = global_batch_size
        self.lo, self.hi = normalize_bounds(self.k, global_batch_size, min_batch_size,
                                            max_batch_size, quantum)
        self.quantum = quantum
        self.policy = policy
        self.options = check_options(options)
        self.rng = rng
        self.current = apportion([1.0] * self.k, self.B, self.lo, self.hi, quantum)
        self.history = [np.zeros((0, 2)) for _ in range(self.k)]

    def __repr__(self) -> str:
        return (f"Cluster(alphas={self.alphas.tolist()}, betas={self.betas.tolist()}, "
                f"B={self.B}, lo={self.lo}, hi={self.hi}, current={self.current})")

    def busy(self, sizes) -> np.ndarray:
        return self.alphas + self.betas * np.asarray(sizes, dtype=np.float64)

    def step_seconds(self, sizes) -> float:
        return float(self.busy(sizes).max())

    def optimum(self) -> float:
        """The continuous equal-finish step time T = (B + Σ α/β) / Σ 1/β."""
        return float((self.B + (self.alphas / self.betas).sum()) / (1 / self.betas).sum())

    def measure(self, noise: float = 0.0, steps: int = STEPS_PER_ROUND) -> None:
        for i, b in enumerate(self.current):
            t = np.full(steps, self.alphas[i] + self.betas[i] * b)
            if noise:
                t = t * (1.0 + noise * self.rng.standard_normal(steps))
            rows = np.column_stack([np.full(steps, float(b)), t])
            self.history[i] = np.vstack([self.history[i], rows])[-512:]

    def inp(self) -> PolicyInput:
        return PolicyInput(global_batch_size=self.B, current=self.current, min_sizes=self.lo,
                           max_sizes=self.hi, quantum=self.quantum, history=tuple(self.history),
                           options=self.options)

    def decide(self):
        sizes, decision = decide(self.policy, self.inp())
        self.current = sizes
        return sizes, decision

    def round(self, noise: float = 0.0):
        """Train one window at the plan in force, then ask for the next plan."""
        self.measure(noise)
        return self.decide()


def assert_valid(sizes, inp: PolicyInput):
    assert isinstance(sizes, tuple) and all(type(b) is int for b in sizes)
    assert len(sizes) == inp.world_size
    assert sum(sizes) == inp.global_batch_size
    assert all(lo <= b <= hi for b, lo, hi in zip(sizes, inp.min_sizes, inp.max_sizes))
    assert all(b % inp.quantum == 0 for b in sizes)


# --------------------------------------------------------------------------------------------
# Every policy keeps the plan invariants, whatever the history


@st.composite
def policy_inputs(draw):
    k = draw(st.integers(1, 8))
    q = draw(st.sampled_from([1, 1, 2, 4]))
    min_units = draw(st.lists(st.integers(1, 3), min_size=k, max_size=k))
    span = draw(st.lists(st.one_of(st.none(), st.integers(0, 30)), min_size=k, max_size=k))
    max_units = [None if s is None else m + s for m, s in zip(min_units, span)]
    hi_total = sum(min_units) + 40 * k if None in max_units else sum(max_units)
    units = draw(st.integers(sum(min_units), hi_total))
    B = units * q
    maxs = [B if m is None else m * q for m in max_units]
    lo, hi = normalize_bounds(k, B, [m * q for m in min_units], maxs, q)
    current_w = draw(st.lists(st.floats(0.01, 100), min_size=k, max_size=k))
    current = apportion(current_w, B, lo, hi, q)
    history = []
    for _ in range(k):
        n = draw(st.sampled_from([0, 1, 3, 10, 25]))
        sizes = draw(st.lists(st.integers(1, 4 * B), min_size=1, max_size=4))
        rows = [(float(draw(st.sampled_from(sizes))),
                 draw(st.floats(1e-4, 100.0, allow_nan=False))) for _ in range(n)]
        history.append(np.array(rows, dtype=np.float64).reshape(-1, 2))
    static_weights = draw(st.one_of(st.none(), st.lists(st.floats(0.01, 100.0), min_size=k,
                                                        max_size=k).map(tuple)))
    options = check_options({
        "band": draw(st.floats(0.0, 0.5)),
        "drift_tolerance": draw(st.floats(0.0, 2.0)),
        "half_life_segments": draw(st.floats(0.1, 10.0)),
        "seed_beta": draw(st.floats(0.0, 2.0)),
    })
    return PolicyInput(global_batch_size=B, current=current, min_sizes=lo, max_sizes=hi,
                       quantum=q, history=tuple(history), static_weights=static_weights,
                       options=options)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@settings(max_examples=40, deadline=None)
@given(inp=policy_inputs())
def test_every_policy_gives_batch_sizes_that_sum_to_B_within_bounds(policy, inp):
    sizes, decision = decide(policy, inp)
    assert_valid(sizes, inp)
    assert len(decision.weights) == inp.world_size
    assert decision.reason
    if policy in ADAPTIVE_POLICIES and any(len(h) == 0 for h in inp.history):
        assert sizes == inp.current  # no measurements from some rank: keep the plan in force


def test_decide_rejects_an_unknown_policy():
    inp = Cluster([0.0, 0.0], [1.0, 1.0], 8).inp()
    with pytest.raises(ConfigError, match="'fastest'"):
        decide("fastest", inp)


# --------------------------------------------------------------------------------------------
# affine: the equal-finish split


@st.composite
def affine_clusters(draw):
    """Heterogeneous ranks whose equal-finish optimum leaves every bound slack.

    One sample of any rank costs at most 0.5% of the optimal step, so an integer plan can come
    within 3% of the continuous optimum T even after the 2% no-change band.
    """
    k = draw(st.integers(2, 8))
    B = k * draw(st.sampled_from([256, 512, 1024]))
    alphas = draw(st.lists(st.floats(0.0, 0.1), min_size=k, max_size=k))
    betas = draw(st.lists(st.floats(0.25e-3, 4e-3), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**32 - 1))
    cluster = Cluster(alphas, betas, B, rng=np.random.default_rng(seed))
    T = cluster.optimum()
    b_star = (T - cluster.alphas) / cluster.betas
    assume(b_star.min() >= 2)
    assume(cluster.betas.max() <= 0.005 * T)
    return cluster


@settings(max_examples=30, deadline=None)
@given(affine_clusters())
def test_affine_reaches_the_equal_finish_optimum_in_three_rounds_and_stays(cluster):
    T = cluster.optimum()
    for _ in range(3):
        cluster.round()
    converged = cluster.current
    step = cluster.step_seconds(converged)
    assert T * (1 - 1e-9) <= step <= 1.03 * T, (converged, step / T)
    # With 3% noise on every measurement the plan does not oscillate: the no-change band
    # allows at most one more move (noise can reveal a gain just over the band), never back,
    # and every plan stays within 3% of the optimum.
    plans = [converged]
    for _ in range(8):
        sizes, decision = cluster.round(noise=0.03)
        assert cluster.step_seconds(sizes) <= 1.03 * T, (sizes, decision.reason)
        if sizes != plans[-1]:
            plans.append(sizes)
    assert len(plans) <= 2, plans


def test_affine_with_one_batch_size_per_rank_splits_by_throughput():
    """Only the equal split measured: α is unidentified, so weights ∝ samples per second."""
    cluster = Cluster([0.01, 0.01, 0.01], [1e-3, 2e-3, 4e-3], 210)
    assert cluster.current == (70, 70, 70)
    cluster.measure()
    model = fit_cost_model(tuple(cluster.history))
    assert np.allclose(model.alphas, 0.0)
    throughput = 70 / cluster.busy(cluster.current)
    assert np.allclose(model.betas, 1 / throughput)
    sizes, decision = cluster.decide()
    assert sizes == apportion(throughput, 210, cluster.lo, cluster.hi)
    assert sizes[0] > sizes[1] > sizes[2]
    assert cluster.step_seconds(sizes) < cluster.step_seconds((70, 70, 70))


def test_affine_borrows_alpha_for_a_rank_with_one_batch_size():
    a = 0.05
    lines = {0: (1e-3, [20, 30, 40]), 1: (2e-3, [20, 30, 40]), 2: (3e-3, [30])}
    history = tuple(
        np.array([(b, a + beta * b) for b in sizes for _ in range(5)])
        for beta, sizes in lines.values()
    )
    model = fit_cost_model(history)
    assert model.alphas == pytest.approx([a, a, a])
    assert model.betas == pytest.approx([1e-3, 2e-3, 3e-3])


def test_affine_rebalances_a_rank_that_becomes_twice_as_slow_within_two_rounds():
    cluster = Cluster([0.02] * 4, [1e-3, 1e-3, 2e-3, 2e-3], 256)
    for _ in range(6):  # converge, then train a few windows on the settled plan
        cluster.round()
    settled = cluster.current
    assert cluster.round()[0] == settled
    old_beta = fit_cost_model(tuple(cluster.history)).betas[0]
    # Rank 0 throttles: every step now takes twice as long at any batch size.
    cluster.alphas[0] *= 2
    cluster.betas[0] *= 2
    for _ in range(2):
        cluster.round()
    assert cluster.current[0] <= 0.8 * settled[0], (settled, cluster.current)
    assert all(b >= s for b, s in zip(cluster.current[1:], settled[1:]))
    # Older measurements of rank 0 are forgotten: its fitted slope reflects the new speed.
    new_beta = fit_cost_model(tuple(cluster.history)).betas[0]
    assert new_beta >= 1.6 * old_beta


def test_affine_forgets_old_measurements_when_a_rank_changes_speed():
    # Rank 0 measured at 40, 60, 80 (α=0.02, β=1e-3), then at 50 it is twice as slow.
    old = [(b, 0.02 + 1e-3 * b) for b in (40, 60, 80) for _ in range(5)]
    new = [(50, 2 * (0.02 + 1e-3 * 50))] * 5
    steady = [(b, 0.02 + 1e-3 * b) for b in (40, 60, 80, 50) for _ in range(5)]
    model = fit_cost_model((np.array(old + new), np.array(steady)))
    assert model.busy_seconds([50, 50])[0] == pytest.approx(2 * (0.02 + 1e-3 * 50))
    assert model.betas[0] > 1.8e-3
    assert model.betas[1] == pytest.approx(1e-3)


def test_affine_keeps_forgetting_a_slowed_rank_s_old_measurements_at_later_plans():
    # Rank 0 is fast at 40, 60, 80, then twice as slow at 50 and, on the next plan, at 70. The
    # cut at the first slow segment stays: the fit is the slow line, not a mix with stale data.
    fast = [(b, 0.02 + 1e-3 * b) for b in (40, 60, 80) for _ in range(5)]
    slow = [(b, 2 * (0.02 + 1e-3 * b)) for b in (50, 70) for _ in range(5)]
    steady = [(b, 0.02 + 1e-3 * b) for b in (40, 60, 80, 50, 70) for _ in range(5)]
    model = fit_cost_model((np.array(fast + slow), np.array(steady)))
    assert model.alphas == pytest.approx([0.04, 0.02])
    assert model.betas == pytest.approx([2e-3, 1e-3])


def test_affine_stays_at_the_new_optimum_after_a_slowdown():
    """The simulator's scenario (tests/test_simulate.py) at the policy level: 8 ranks, no
    noise, windows of 20 steps decided one window late (DataLoader prefetch), and the fastest
    rank twice as slow from window 10 on. Once the plan is back within 5% of the new optimum
    it must stay there: stale fast measurements of that rank must not re-enter its fit."""
    speeds = np.array([1, 2, 4, 1, 3, 2, 1.5, 0.5])
    cluster = Cluster(0.005 / speeds, 0.002 / speeds, 512)
    steps = 20
    ratios = []
    for window in range(20):
        if window == 10:
            cluster.alphas[2] *= 2
            cluster.betas[2] *= 2
        trained = cluster.history
        cluster.history = [h[:-steps] if len(h) else h for h in trained]  # lag: one window
        sizes, _ = cluster.decide()
        cluster.history = trained
        cluster.measure(steps=steps)
        ratios.append(cluster.step_seconds(sizes) / cluster.optimum())
    assert max(ratios[6:10]) <= 1.05  # converged before the slowdown
    assert min(ratios[10:12]) > 1.05  # the slowdown hurts until the policy can see it
    back = next(w for w in range(10, 20) if ratios[w] <= 1.05)
    assert back <= 13, ratios
    assert all(r <= 1.05 for r in ratios[back:]), ratios


def test_affine_does_not_trust_a_slope_that_noise_could_have_made():
    # Rank 0 was measured at two batch sizes only 3% apart, with 10% noise per step: the line
    # through them is nearly flat (α ≈ all of the busy time), which would hand rank 0 a huge
    # batch. The slope is well within noise of 0, so busy time ∝ batch size is used instead.
    jitter = np.resize([0.9, 1.1, 1.0, 0.95, 1.05], 32)
    noisy = [(64, 0.1 * f) for f in jitter] + [(66, 0.1 * f + 1e-5) for f in jitter]
    steady = [(b, 0.02 + 1e-3 * b) for b in (40, 60, 80) for _ in range(5)]
    model = fit_cost_model((np.array(noisy, dtype=float), np.array(steady, dtype=float)))
    assert model.alphas[0] == 0.0
    assert model.betas[0] == pytest.approx(0.1 / 65, rel=0.02)
    assert model.alphas[1] == pytest.approx(0.02) and model.betas[1] == pytest.approx(1e-3)
    lo, hi = normalize_bounds(2, 160)
    inp = PolicyInput(global_batch_size=160, current=(80, 80), min_sizes=lo, max_sizes=hi,
                      history=(np.array(noisy, dtype=float), np.array(steady, dtype=float)))
    sizes, _ = decide("affine", inp)
    assert sizes[0] < 120, sizes


def test_affine_water_fills_the_rest_equally_finished_when_a_cap_binds():
    # Rank 0 is so fast it would take ~185 of 256; its max_batch_size caps it at 80.
    cluster = Cluster([0.02] * 4, [0.25e-3, 1e-3, 2e-3, 2e-3], 256,
                      max_batch_size=[80, 256, 256, 256])
    for _ in range(3):
        cluster.round()
    sizes = cluster.current
    assert sizes[0] == 80
    finish = cluster.busy(sizes)
    assert finish[0] < finish[1:].min()  # the capped rank waits for the others
    # The others finish together, up to one sample of the slowest rank's slope.
    assert finish[1:].max() - finish[1:].min() <= cluster.betas.max() + 1e-12
    rest = Cluster(cluster.alphas[1:], cluster.betas[1:], 256 - 80)
    assert cluster.step_seconds(sizes) <= 1.03 * rest.optimum()


def test_affine_keeps_the_plan_while_measurements_are_missing():
    cluster = Cluster([0.0, 0.0], [1e-3, 3e-3], 64)
    cluster.history[0] = np.array([[32.0, 0.032]])
    sizes, decision = cluster.decide()
    assert sizes == (32, 32) and decision.model is None


# --------------------------------------------------------------------------------------------
# proportional and seed


def _history_with_old_and_newest_segments(rng):
    """Per rank: older measurements at other batch sizes, then a noisy newest segment."""
    history, newest = [], []
    for i, (b_new, speed) in enumerate([(30, 1.0), (30, 2.0), (40, 3.0)]):
        old = [(b, b / (500 * speed) + 0.01) for b in (10, 20) for _ in range(4)]
        t_new = b_new / (1000 * speed) * (1 + 0.05 * rng.standard_normal(7))
        history.append(np.array(old + [(b_new, t) for t in t_new]))
        newest.append(b_new / np.median(t_new))
    return tuple(history), np.array(newest)


def test_proportional_weights_are_the_throughput_of_the_newest_measurements():
    history, throughput = _history_with_old_and_newest_segments(np.random.default_rng(7))
    lo, hi = normalize_bounds(3, 120)
    inp = PolicyInput(global_batch_size=120, current=(40, 40, 40), min_sizes=lo, max_sizes=hi,
                      history=history)
    sizes, decision = decide("proportional", inp)
    assert np.allclose(decision.weights, throughput)
    assert sizes == apportion(throughput, 120, lo, hi)


def _seed_input(history, current, beta):
    B = sum(current)
    lo, hi = normalize_bounds(len(current), B)
    return PolicyInput(global_batch_size=B, current=tuple(current), min_sizes=lo, max_sizes=hi,
                       history=history, options=check_options({"seed_beta": beta}))


def test_seed_with_beta_one_is_the_capacity_share():
    history, throughput = _history_with_old_and_newest_segments(np.random.default_rng(3))
    inp = _seed_input(history, (50, 40, 30), 1.0)
    _, seed_decision = decide("seed", inp)
    _, prop_decision = decide("proportional", inp)
    capacity = throughput / throughput.sum()
    assert np.allclose(seed_decision.weights, capacity)
    prop = np.asarray(prop_decision.weights)
    assert np.allclose(seed_decision.weights, prop / prop.sum())


def test_seed_with_beta_half_moves_halfway_from_the_load_share():
    history, throughput = _history_with_old_and_newest_segments(np.random.default_rng(5))
    current = (50, 40, 30)
    _, decision = decide("seed", _seed_input(history, current, 0.5))
    load = np.array(current) / 120
    capacity = throughput / throughput.sum()
    assert np.allclose(decision.weights, load + 0.5 * (capacity - load))


def test_seed_reproduces_the_paper_five_node_example_direction():
    """Capacities 100, 100, 200, 200, 300 and the paper's initial loads 50, 60, 80, 90, 40:
    W(t+1) = W(t) + β·(R − L) moves node 5's share up toward 300/900."""
    capacity = np.array([100.0, 100.0, 200.0, 200.0, 300.0])  # samples per busy second
    current = (50, 60, 80, 90, 40)
    B = sum(current)
    shares = [current[4] / B]
    for _ in range(25):
        history = tuple(np.array([[b, b / c]] * 3) for b, c in zip(current, capacity))
        current, _ = decide("seed", _seed_input(history, current, 0.5))
        assert sum(current) == B
        shares.append(current[4] / B)
    assert all(later >= earlier for earlier, later in zip(shares, shares[1:]))
    assert shares[1] > shares[0]
    assert max(shares) <= 300 / 900 + 1 / B
    assert shares[-1] == pytest.approx(300 / 900, abs=2 / B)
    # Equal-capacity nodes end up with equal loads (up to one sample).
    assert abs(current[0] - current[1]) <= 1 and abs(current[2] - current[3]) <= 1


# --------------------------------------------------------------------------------------------
# equal and static


@settings(max_examples=30, deadline=None)
@given(policy_inputs())
def test_equal_ignores_history(inp):
    sizes, _ = decide("equal", inp)
    expected = apportion([1.0] * inp.world_size, inp.global_batch_size, inp.min_sizes,
                         inp.max_sizes, inp.quantum)
    assert sizes == expected
    no_history = PolicyInput(global_batch_size=inp.global_batch_size, current=inp.current,
                             min_sizes=inp.min_sizes, max_sizes=inp.max_sizes,
                             quantum=inp.quantum)
    assert decide("equal", no_history)[0] == expected


def test_static_uses_static_weights_and_ignores_history():
    lo, hi = normalize_bounds(3, 60)
    history = tuple(np.array([[20.0, t]]) for t in (0.1, 1.0, 10.0))
    inp = PolicyInput(global_batch_size=60, current=(20, 20, 20), min_sizes=lo, max_sizes=hi,
                      history=history, static_weights=(1.0, 2.0, 3.0))
    assert decide("static", inp)[0] == (10, 20, 30)
    unweighted = PolicyInput(global_batch_size=60, current=(30, 20, 10), min_sizes=lo,
                             max_sizes=hi, history=history)
    assert decide("static", unweighted)[0] == (20, 20, 20)


# --------------------------------------------------------------------------------------------
# options and the cost model


@pytest.mark.parametrize("key", ["bandwidth", "seed-beta", ""])
def test_check_options_names_an_unknown_key(key):
    with pytest.raises(ConfigError, match=repr(key)) as info:
        check_options({key: 0.1})
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [-0.1, -1, math.nan, math.inf, -math.inf, "0.1", None, True])
@pytest.mark.parametrize("key", sorted(DEFAULT_OPTIONS))
def test_check_options_names_a_bad_value(key, value):
    with pytest.raises(ConfigError) as info:
        check_options({key: value})
    assert key in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("key", ["payback_steps", "shape_warmup_steps"])
def test_check_options_wants_whole_steps(key):
    with pytest.raises(ConfigError) as info:
        check_options({key: 2.5})
    assert key in str(info.value) and "2.5" in str(info.value)
    assert check_options({key: 3})[key] == 3.0


def test_check_options_overlays_the_defaults():
    merged = check_options({"band": 0, "seed_beta": 1})
    assert merged == {**DEFAULT_OPTIONS, "band": 0.0, "seed_beta": 1.0}
    assert check_options(None) == dict(DEFAULT_OPTIONS)
    assert DEFAULT_OPTIONS["band"] == 0.02  # the defaults themselves are untouched


@pytest.mark.parametrize("policy", sorted(ADAPTIVE_POLICIES))
@pytest.mark.parametrize("key", sorted(DEFAULT_OPTIONS))
@pytest.mark.parametrize("value", [0.0, 1e6])
def test_every_option_value_check_options_accepts_gives_a_valid_plan(policy, key, value):
    """An accepted option must never make a policy crash on ordinary measurements."""
    try:
        options = check_options({key: value})
    except ConfigError:
        return  # rejecting the value up front is fine too
    cluster = Cluster([0.01, 0.01, 0.01], [1e-3, 2e-3, 3e-3], 96, policy=policy,
                      options=options)
    # Three batch sizes per rank, so every rank has an older fit to compare against.
    cluster.history = [
        np.array([(b, 0.01 + beta * b) for b in sizes for _ in range(3)])
        for beta, sizes in zip(cluster.betas, ([24, 32, 40], [40, 32, 24], [32, 40, 24]))
    ]
    sizes, _ = cluster.decide()
    assert_valid(sizes, cluster.inp())


def test_fit_cost_model_waits_for_every_rank():
    full = (np.array([[10.0, 0.1], [20.0, 0.2]]), np.array([[10.0, 0.3]]))
    assert fit_cost_model(()) is None
    assert fit_cost_model((full[0], np.zeros((0, 2)))) is None
    assert fit_cost_model((np.zeros((0, 2)), np.zeros((0, 2)))) is None
    model = fit_cost_model(full)
    assert isinstance(model, CostModel)
    assert model.alphas.shape == model.betas.shape == (2,)
    assert np.all(model.betas > 0) and np.all(model.alphas >= 0)


def test_fit_cost_model_recovers_exact_lines():
    truth = [(0.05, 1e-3), (0.0, 2e-3), (0.2, 5e-4)]
    history = tuple(np.array([(b, a + c * b) for b in (16, 32, 48, 64) for _ in range(3)])
                    for a, c in truth)
    model = fit_cost_model(history)
    assert model.alphas == pytest.approx([a for a, _ in truth], abs=1e-9)
    assert model.betas == pytest.approx([c for _, c in truth])
    assert model.step_seconds([64, 64, 64]) == pytest.approx(max(a + c * 64 for a, c in truth))


@pytest.mark.parametrize("policy", sorted(ADAPTIVE_POLICIES))
def test_adaptive_policies_keep_the_plan_until_every_rank_reported(policy):
    lo, hi = normalize_bounds(2, 64)
    inp = PolicyInput(global_batch_size=64, current=(40, 24), min_sizes=lo, max_sizes=hi,
                      history=(np.array([[40.0, 0.4]]), np.zeros((0, 2))))
    sizes, decision = decide(policy, inp)
    assert sizes == (40, 24)
    assert decision.model is None


# --------------------------------------------------------------------------------------------
# fit_cost_model against a plain, per-rank reference implementation of its rules
#
# fit_cost_model is vectorised over ranks and segments for speed; this is the same model
# written the obvious way, one rank and one segment at a time.


def _reference_segments(obs):
    """Runs of one batch size cut into pieces of at most SEGMENT_STEPS steps (the newest piece
    ending at the run's newest step) as (batch size, median busy s, steps), oldest first."""
    segments = []
    cuts = np.flatnonzero(np.diff(obs[:, 0])) + 1
    for run in np.split(obs, cuts):
        for end in range(len(run), 0, -SEGMENT_STEPS)[::-1]:
            part = run[max(0, end - SEGMENT_STEPS):end]
            segments.append((float(part[0, 0]), float(np.median(part[:, 1])), len(part)))
    return segments


def _reference_line(segs, half_life, spread):
    """Weighted least squares over batch sizes (each size's newest four segments pooled, the
    i-th newest size weighted by its steps × 0.5 ** (i / half_life)); None with one size.
    Proportional instead where α < 0 or the slope is within SLOPE_SIGNIFICANCE standard errors
    of 0 (each step's busy time having relative standard deviation ``spread``)."""
    groups = {}
    for b, t, n in segs:
        groups.setdefault(b, []).append((t, n))
        groups[b] = groups[b][-4:]
    if len(groups) < 2:
        return None
    newest_first = sorted(groups, key=lambda size: max(
        i for i, seg in enumerate(segs) if seg[0] == size), reverse=True)
    b = np.array(newest_first)
    t = np.array([np.average([x for x, _ in groups[size]], weights=[n for _, n in groups[size]])
                  for size in newest_first])
    counts = np.array([sum(n for _, n in groups[size]) for size in newest_first], dtype=float)
    w = counts * 0.5 ** (np.arange(len(b)) / half_life)
    bm, tm = np.average(b, weights=w), np.average(t, weights=w)
    var = np.average((b - bm) ** 2, weights=w)
    beta = np.average((b - bm) * (t - tm), weights=w) / var
    alpha = tm - beta * bm
    slope_error = math.sqrt(math.pi / 2) * spread * tm / math.sqrt(w.sum() * var)
    if beta <= SLOPE_SIGNIFICANCE * slope_error or alpha < 0:
        return 0.0, float(np.average(t / b, weights=w))
    return float(alpha), float(beta)


def _reference_noise(obs):
    """Relative standard deviation of a step, and relative standard error of the median, of the
    newest batch size's busy times among the newest 4·SEGMENT_STEPS steps (robust: MAD)."""
    recent = obs[-4 * SEGMENT_STEPS:]
    t = recent[recent[:, 0] == obs[-1, 0], 1]
    if len(t) < 3:
        return 0.0, 0.0
    median = float(np.median(t))
    spread = 1.4826 * float(np.median(np.abs(t - median))) / median
    return spread, spread / np.sqrt(len(t))


def _reference_fit(history, options):
    tolerance, half_life = options["drift_tolerance"], options["half_life_segments"]
    fits, priors, newest = [], [], []
    noise = [_reference_noise(obs) for obs in history]
    for obs, (spread, _) in zip(history, noise):
        segs = _reference_segments(obs)
        since, prior = segs[:1], None  # the segments since the last cut
        for b, t, n in segs[1:]:
            line = _reference_line(since, half_life, spread)
            if line is not None:
                low = high = line[0] + line[1] * b
            else:  # one batch size since the cut: any α from 0 to all of its busy time fits
                pooled = np.average([s[1] for s in since[-4:]], weights=[s[2] for s in since[-4:]])
                ratio = b / since[-1][0]
                low, high = pooled * min(1.0, ratio), pooled * max(1.0, ratio)
            if max(low - t, t - high) > tolerance * t:  # disagrees: a cut in time
                prior = line[0] if line is not None else prior
                since = []
            since.append((b, t, n))
        fits.append(_reference_line(since, half_life, spread))
        priors.append(prior)
        newest.append(segs[-1])
    pooled = [f[0] for f in fits if f is not None]
    pooled_alpha = float(np.median(pooled)) if pooled else 0.0
    alphas, betas = [], []
    for fit, prior, (b, t, _) in zip(fits, priors, newest):
        if fit is None:
            alpha = min(prior if prior is not None else pooled_alpha, 0.5 * t)
            fit = (alpha, (t - alpha) / b)
        alphas.append(fit[0])
        betas.append(max(fit[1], 1e-12))
    return np.array(alphas), np.array(betas), np.array([error for _, error in noise])


def _random_history(rng):
    """A few ranks, each with runs of recurring batch sizes, noise, and maybe speed changes."""
    ranks = []
    for _ in range(rng.integers(1, 7)):
        alpha, beta = rng.uniform(0.0, 0.05), rng.uniform(1e-4, 3e-3)
        sizes = rng.choice([8.0, 16.0, 24.0, 40.0, 64.0], size=rng.integers(1, 4), replace=False)
        rows, slowdown = [], 1.0
        for _ in range(rng.integers(1, 12)):
            if rng.random() < 0.15:
                slowdown *= rng.choice([0.5, 2.0, 3.0])
            b = rng.choice(sizes) + rng.integers(0, 2) * rng.integers(1, 9)
            steps = int(rng.choice([1, 2, 5, 10, 16, 20, 40]))
            noise = 1.0 + rng.choice([0.0, 0.03, 0.1, 0.3]) * rng.standard_normal(steps)
            busy = slowdown * (alpha + beta * b) * np.maximum(noise, 0.05)
            rows += [(b, t) for t in busy]
        ranks.append(np.array(rows[-rng.integers(1, 200):]))
    return tuple(ranks)


@pytest.mark.parametrize("seed", range(60))
def test_fit_cost_model_matches_the_reference_implementation(seed):
    rng = np.random.default_rng(seed)
    history = _random_history(rng)
    options = check_options({"drift_tolerance": rng.choice([0.1, 0.25, 0.6]),
                             "half_life_segments": rng.choice([0.5, 2.0, 5.0])})
    model = fit_cost_model(history, options)
    alphas, betas, noise = _reference_fit(history, options)
    assert model.alphas == pytest.approx(alphas, rel=1e-9, abs=1e-12)
    assert model.betas == pytest.approx(betas, rel=1e-9, abs=1e-12)
    assert model.noise == pytest.approx(noise, rel=1e-9, abs=1e-12)
