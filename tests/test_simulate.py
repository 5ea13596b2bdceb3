"""The simulator: the real policies driven through modelled ranks (see shardbalance/simulate.py)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from shardbalance._exceptions import ConfigError
from shardbalance.policies import POLICIES
from shardbalance.simulate import (
    PAPER_CAPACITIES,
    SimulationConfig,
    Slowdown,
    add_arguments,
    paper_example,
    run,
    simulate,
)

HETERO = "1,2,4,1,3,2,1.5,0.5"


def _comparable(result):
    return [(r.batch_sizes, r.step_s, r.oracle_s, r.equal_s, r.reason) for r in result.rows]


def test_same_seed_same_run_other_seed_other_run():
    cfg = dict(ranks=8, speeds="lognormal:0.5", noise=0.1, steps=120, window=20)
    a = simulate(SimulationConfig(seed=3, **cfg))
    b = simulate(SimulationConfig(seed=3, **cfg))
    c = simulate(SimulationConfig(seed=4, **cfg))
    assert a.speeds == b.speeds and _comparable(a) == _comparable(b)
    assert a.speeds != c.speeds


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_window_plan_sums_to_b_within_bounds(policy):
    result = simulate(SimulationConfig(ranks=6, speeds="uniform:0.3,3", noise=0.1, steps=100,
                                       window=10, global_batch_size=300, min_batch_size=10,
                                       max_batch_size=120, policy=policy, seed=1))
    assert len(result.rows) == 10
    for row in result.rows:
        assert sum(row.batch_sizes) == 300
        assert all(10 <= b <= 120 for b in row.batch_sizes)
        assert row.oracle_s <= row.equal_s * (1 + 1e-9) or policy == "equal"


def test_affine_noiseless_reaches_optimum_and_beats_equal():
    result = simulate(SimulationConfig(ranks=8, speeds=HETERO, noise=0.0, steps=300, window=20))
    s = result.summary
    assert s.efficiency >= 0.97
    assert s.speedup > 1.5
    # Noiseless: the oracle is the integer optimum, within rounding of the continuous T*.
    assert s.steady_oracle_s == pytest.approx(s.steady_optimum_s, rel=0.02)


def test_equal_policy_is_the_equal_yardstick():
    result = simulate(SimulationConfig(ranks=8, speeds=HETERO, noise=0.05, steps=60,
                                       policy="equal"))
    for row in result.rows:
        assert row.step_s == pytest.approx(row.equal_s)
    assert result.summary.speedup == pytest.approx(1.0)


def test_slowdown_is_reconverged_the_window_after_the_lag_lets_the_policy_see_it():
    # Rank 2 is the fastest (speed 4); at step 200 (the start of window 10) it becomes 2x
    # slower. With lag = one window, window 11's decision sees only steps < 200, window 12's
    # sees steps 200-219: window 12 is the first that can react. We assert the run is within
    # 5 % of the new optimum by window 13 at the latest (the reacting window or the next), and
    # that the slowdown did hurt before that (so the check is not vacuous).
    result = simulate(SimulationConfig(ranks=8, speeds=HETERO, noise=0.0, steps=400, window=20,
                                       slowdowns=["200:2:2"]))
    (sd,) = result.summary.slowdowns
    assert (sd.window, sd.visible_window) == (10, 12)
    assert result.rows[10].ratio > 1.05 and result.rows[11].ratio > 1.05
    assert sd.converged_window is not None and sd.converged_window <= sd.visible_window + 1
    assert result.summary.steady_first_window >= sd.visible_window + 3
    # The slowed rank ends up with fewer samples than before the slowdown.
    assert result.rows[-1].batch_sizes[2] < result.rows[9].batch_sizes[2]


def test_slowdown_stays_converged_once_reconverged():
    result = simulate(SimulationConfig(ranks=8, speeds=HETERO, noise=0.0, steps=400, window=20,
                                       slowdowns=["200:2:2"]))
    (sd,) = result.summary.slowdowns
    assert all(r.ratio <= 1.05 for r in result.rows[sd.converged_window:])


def test_lag_zero_lets_the_next_window_react():
    result = simulate(SimulationConfig(ranks=4, speeds="1,1,2,2", noise=0.0, steps=200,
                                       window=20, lag=0, slowdowns=[Slowdown(100, 3, 3.0)]))
    (sd,) = result.summary.slowdowns
    assert (sd.window, sd.visible_window) == (5, 6)


def test_paper_example_seed_moves_node5_toward_a_third_and_affine_gets_there_fast():
    slow_seed, fast_seed, affine = paper_example(SimulationConfig(ranks=5, speeds="1,1,2,2,3",
                                                                  noise=0.0, steps=300))
    B = sum(PAPER_CAPACITIES)
    for result in (slow_seed, fast_seed, affine):
        assert result.config.global_batch_size == B
        assert result.rows[0].batch_sizes == (180,) * 5
    node5 = [r.batch_sizes[4] / B for r in slow_seed.rows]
    # The additive rule only moves node 5 up, never past its capacity share, and slowly.
    assert all(b >= a for a, b in zip(node5, node5[1:]))
    assert 0.2 < node5[-1] < 1 / 3 + 0.01
    assert abs(node5[-1] - 1 / 3) < 0.5 * abs(0.2 - 1 / 3)
    assert abs(fast_seed.rows[-1].batch_sizes[4] / B - 1 / 3) < 0.01
    # affine: within 5 % of the optimum from the first window that has measurements.
    assert all(r.ratio <= 1.05 for r in affine.rows[2:])
    assert slow_seed.rows[5].ratio > affine.rows[5].ratio


@pytest.mark.parametrize("kwargs, match", [
    (dict(speeds="lognormal:x"), "speeds"),
    (dict(speeds="gauss:1"), "gauss"),
    (dict(speeds="uniform:2,1"), "uniform"),
    (dict(speeds="1,2,3"), "3 values for 8 ranks"),
    (dict(speeds="1,0,1,1,1,1,1,1"), "> 0"),
    (dict(slowdowns=["200:3"]), "200:3"),
    (dict(slowdowns=["a:1:2"]), "a:1:2"),
    (dict(slowdowns=["10:8:2"]), "rank 8"),
    (dict(slowdowns=["10:1:0"]), "factor 0"),
    (dict(ranks=0), "ranks 0"),
    (dict(ranks=8, global_batch_size=7), "global_batch_size 7"),
    (dict(window=0), "window 0"),
    (dict(noise=-0.1), "noise -0.1"),
    (dict(policy="fastest"), "fastest"),
    (dict(options={"band": -1}), "band"),
    (dict(early_windows=(7, 0)), "early_windows"),
    (dict(discard_after_change="yes"), "discard_after_change"),
])
def test_bad_config_raises_config_error_naming_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SimulationConfig(**kwargs)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_prints_a_compact_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = run(_parse(["--ranks", "4", "--speeds", "1,1,2,3", "--steps", "600", "--window", "10",
                     "--slowdown", "300:0:2", "--json-out", str(out)]))
    text = capsys.readouterr().out
    assert rc == 0
    assert len(text.splitlines()) < 40
    assert "efficiency" in text and "slowdown x2 of rank 0 at step 300" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 60 and data["config"]["global_batch_size"] == 256


def test_cli_ranks_default_to_the_explicit_speed_list_and_paper_example_runs(capsys):
    assert _parse(["--speeds", "1,2,4"]).ranks is None
    assert run(_parse(["--speeds", "1,2,4", "--steps", "40"])) == 0
    assert "3 ranks" in capsys.readouterr().out
    assert run(_parse(["--paper-example", "--steps", "100", "--noise", "0"])) == 0
    text = capsys.readouterr().out
    assert "seed β=0.1" in text and "affine" in text and len(text.splitlines()) < 40


def test_importing_the_simulator_does_not_import_torch():
    code = "import sys, shardbalance.simulate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- curves (--curve): the shapes of shardbalance.emulate -------------------------------------

def test_parse_curve_reads_flat_and_step_and_names_a_bad_spec():
    from shardbalance.simulate import parse_curve
    assert parse_curve("affine") == (0.0, 1)
    assert parse_curve("flat:48") == (48.0, 1)
    assert parse_curve("flat:48,step:8") == (48.0, 8)
    for bad in ("flat", "flat:-1", "step:0", "wave:3", "step:x"):
        with pytest.raises(ConfigError, match="Invalid curve"):
            parse_curve(bad)
    with pytest.raises(ConfigError, match="new_shape_steps"):
        SimulationConfig(new_shape_steps=-1)


@pytest.mark.parametrize("curve,quantum", [("flat:40", 1), ("step:16", 1), ("flat:40,step:8", 4),
                                           ("step:16", 16)])
def test_the_curve_oracle_is_the_best_integer_plan(curve, quantum):
    import itertools

    import numpy as np

    from shardbalance.simulate import _Cluster
    cfg = SimulationConfig(ranks=3, speeds="1,2,4", curve=curve, global_batch_size=96,
                           batch_size_multiple=quantum)
    cluster = _Cluster(cfg, np.random.default_rng(0))
    alphas, betas = cluster.model_at(0)
    step, plan = cluster.oracle(alphas, betas, (quantum,) * 3, (96,) * 3, 96, quantum)
    assert sum(plan) == 96 and all(b % quantum == 0 for b in plan)
    best = min(float((alphas + betas * cluster.effective(p)).max())
               for p in itertools.product(range(quantum, 97, quantum), repeat=2)
               for p in [(p[0], p[1], 96 - p[0] - p[1])] if p[2] >= quantum)
    assert step == pytest.approx(best)


@pytest.mark.parametrize("lag", [8, 16])
def test_curve_policy_balances_a_fast_rank_flat_below_what_the_optimum_needs(lag):
    # The flat-deep cluster of benchmarks/curves.py: the fastest rank is flat below all the
    # sizes the optimum gives it; decisions see measurements one or two windows late.
    common = dict(ranks=3, speeds="1,2,4", curve="flat:16", global_batch_size=96,
                  per_sample_s=0.006, overhead_s=0.002, overhead="fixed", allreduce_s=0.0,
                  steps=240, window=8, lag=lag, noise=0.05, new_shape_s=0.03)
    curve = simulate(SimulationConfig(policy="curve", **common))
    affine = simulate(SimulationConfig(policy="affine", **common))
    assert curve.summary.efficiency >= 0.97
    assert curve.summary.efficiency > affine.summary.efficiency + 0.05


def test_new_shape_cost_is_charged_at_each_new_batch_size_only():
    common = dict(ranks=3, speeds="1,2,4", steps=48, window=8, noise=0.0, policy="affine")
    plain = simulate(SimulationConfig(**common))
    costly = simulate(SimulationConfig(new_shape_s=0.05, new_shape_steps=2, **common))
    for a, b in zip(plain.rows, costly.rows):
        assert a.batch_sizes == b.batch_sizes
        if b.window == 0 or b.changed:  # two of eight steps pay 50 ms
            assert b.step_s == pytest.approx(a.step_s + 2 * 0.05 / 8)
        else:
            assert b.step_s == pytest.approx(a.step_s)


def test_cli_accepts_curve_flags(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ranks", "3", "--speeds", "1,2,4", "--steps", "40", "--window",
                              "8", "--policy", "curve", "--curve", "flat:40,step:8",
                              "--new-shape-ms", "10", "--batch-size-multiple", "8"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "curve: 3 ranks" in out and "efficiency" in out


def test_early_windows_come_first_then_windows_of_the_window_size():
    result = simulate(SimulationConfig(ranks=3, speeds="1,2,4", steps=72, window=24, lag=3,
                                       early_windows=(7, 7, 10), policy="curve"))
    assert [(r.first_step, r.steps) for r in result.rows] == \
        [(0, 7), (7, 7), (14, 10), (24, 24), (48, 24)]


def test_the_policy_sees_no_step_a_rank_discards(monkeypatch):
    # As the sampler: the run's first step and the first step after a change of a rank's batch
    # size are not measured.
    from shardbalance import simulate as sim

    seen = []
    real_decide = sim.decide

    def decide(policy, inp):
        seen.append(inp)
        return real_decide(policy, inp)

    monkeypatch.setattr(sim, "decide", decide)
    result = simulate(SimulationConfig(ranks=3, speeds="1,2,4", steps=64, window=8, lag=0,
                                       policy="affine"))
    last = seen[-1]
    for i, rows in enumerate(last.history):
        sizes = [r.batch_sizes[i] for r in result.rows[:-1]]
        changes = 1 + sum(a != b for a, b in zip(sizes, sizes[1:]))
        assert len(rows) == 8 * len(sizes) - changes


def test_per_epoch_affine_on_capped_curves_is_not_misled_by_new_shape_costs():
    # The capped cluster of benchmarks/curves.py with per-epoch plans and early re-plans: the
    # one-off cost of each new size once made affine give the slowest rank 1-2 samples
    # ([2, 38, 44, 44] where the optimum is [8, 32, 44, 44]: 0.8 of the oracle in epoch 1).
    for seed in range(3):
        result = simulate(SimulationConfig(
            ranks=4, speeds="1,2,4,4", curve="flat:12,step:8", global_batch_size=128,
            max_batch_size=[128, 128, 44, 44], per_sample_s=0.006, overhead_s=0.002,
            overhead="fixed", allreduce_s=0.0, noise=0.05, new_shape_s=0.04, new_shape_steps=3,
            steps=72, window=24, lag=3, early_windows=(7, 7, 10), policy="affine", seed=seed))
        epoch1 = [r for r in result.rows if 24 <= r.first_step < 48]
        assert all(r.batch_sizes[0] >= 8 for r in epoch1), [r.batch_sizes for r in epoch1]
        oracle = sum(r.oracle_s * r.steps for r in epoch1)
        assert oracle / sum(r.step_s * r.steps for r in epoch1) >= 0.95
