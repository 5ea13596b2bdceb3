"""The simulator: the real policies against modelled ranks, at scales and conditions we cannot run.

This module owns the *model* of a cluster and the loop that drives the real decision code
through it; it decides nothing itself. Each window it builds the same :class:`PolicyInput` the
coordinator builds (plan in force, bounds from :func:`normalize_bounds`, per rank the newest
:data:`HISTORY_PER_RANK` ``(batch_size, busy_s)`` rows, oldest first), calls
:func:`policies.decide` and trains the window on the plan it returns.

The model. Rank i of relative speed ``s_i`` is busy ``t_i(b) = α_i + β_i·b`` seconds for a batch
of b samples, with ``β_i = per_sample_s / s_i`` and ``α_i = overhead_s / s_i`` (overhead
``"speed"``: fixed costs run on the same slow device) or ``α_i = overhead_s`` (overhead
``"fixed"``: host-side costs, the shape of :mod:`shardbalance.emulate`). Every (step, rank) busy
time is multiplied by ``1 + noise·N(0,1)`` (floored at 0.01 so it stays positive). A step lasts
``max_i busy_i + allreduce_s``. A slowdown ``(step, rank, factor)`` multiplies that rank's α and
β by ``factor`` from ``step`` on.

Curves (``--curve``, the shapes of :mod:`shardbalance.emulate`): ``flat:F`` makes rank i flat
below ``F·s_i`` samples (a GPU of speed s needs more samples to fill: it is no faster below
them) and linear above; ``step:Q`` makes compute run in tiles of Q samples (time steps up at
multiples of Q); ``flat:F,step:Q`` both. Busy time is then ``α_i + β_i·max(tiles(b), F·s_i)``.
``new_shape_s`` adds a one-off cost to each of the first ``new_shape_steps`` steps of a rank at
a batch size it has not run before (the oracle's fixed plan pays it once, at the start).

The lag. DataLoader prefetch means the plan for the window starting at step S is decided while
the newest steps are not yet trained: the decision sees step s only if ``s < S − lag`` (it
finished at least ``lag`` steps before S). Default lag = one window.

The yardsticks, per window, all with the *true* current model:

* ``optimum_s``: the continuous equal-finish step, ``T* = (B + Σ α_i/β_i) / Σ 1/β_i``
  water-filled into the bounds, plus the all-reduce; noiseless.
* ``oracle_s``: that optimum apportioned into integers and run on the *same* noise draws as the
  policy. This is the fair reference: with k noisy ranks every plan pays ``E[max]`` of k
  noise draws (about ``1 + noise·sqrt(2 ln k)`` at 4096 ranks), which no policy can avoid.
* ``equal_s``: the equal (DistributedSampler) split on the same noise draws.

    shardbalance simulate --ranks 4096 --speeds lognormal:0.5 --noise 0.1 --steps 400
    shardbalance simulate --paper-example
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from ._exceptions import ConfigError
from .plan import apportion, normalize_bounds
from .policies import (HISTORY_PER_RANK, POLICIES, CostModel, PolicyInput, check_options,
                       check_policy, decide)

__all__ = ["SimulationConfig", "SimulationResult", "WindowRow", "Summary", "Slowdown",
           "simulate", "format_table", "paper_example", "format_paper_example",
           "parse_speeds", "parse_slowdown", "parse_curve", "add_arguments", "run"]

#: The multiplicative noise factor is floored here so a busy time stays positive.
_NOISE_FLOOR = 0.01
#: A window "has converged" when its step is within this factor of the oracle's.
CONVERGED_WITHIN = 0.05
#: Per-window rows printed by :func:`format_table` before it starts skipping rows.
MAX_PRINTED_ROWS = 24

#: The seed paper's 5-node example (section 3.3): computing capacities of the nodes.
PAPER_CAPACITIES = (100, 100, 200, 200, 300)
#: The paper's adjustment coefficient β in W(t+1) = W(t) + β(R − L).
PAPER_BETA = 0.1


@dataclass(frozen=True)
class Slowdown:
    """From ``step`` on, rank ``rank``'s α and β are multiplied by ``factor``."""

    step: int
    rank: int
    factor: float


def parse_slowdown(text: str) -> Slowdown:
    """``"200:3:2"`` -> Slowdown(step=200, rank=3, factor=2.0)."""
    parts = str(text).split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        step, rank, factor = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        raise ConfigError(f"Invalid slowdown {text!r}: expected STEP:RANK:FACTOR, "
                          "e.g. 200:3:2") from None
    return Slowdown(step, rank, factor)


def parse_curve(text: str) -> tuple[float, int]:
    """``"flat:96,step:8"`` -> (96.0, 8): flat below F·speed samples, tiles of Q samples.

    ``"affine"`` (or ``""``) -> (0.0, 1). ConfigError names a bad spec.
    """
    flat, tile = 0.0, 1
    text = str(text).strip()
    if text in ("", "affine"):
        return flat, tile
    for part in text.split(","):
        kind, sep, value = part.strip().partition(":")
        try:
            if not sep or kind not in ("flat", "step"):
                raise ValueError
            if kind == "flat":
                flat = float(value)
                if not math.isfinite(flat) or flat < 0:
                    raise ValueError
            else:
                tile = int(value)
                if tile < 1:
                    raise ValueError
        except ValueError:
            raise ConfigError(f"Invalid curve {text!r}: expected affine, flat:F (F >= 0 samples "
                              "at speed 1), step:Q (Q >= 1 samples) or flat:F,step:Q") from None
    return flat, tile


def parse_speeds(spec: str | Sequence[float], ranks: int, rng: np.random.Generator) -> np.ndarray:
    """Relative speeds of ``ranks`` ranks from a spec; ConfigError names a bad spec.

    ``lognormal:σ`` (``exp(σ·N(0,1))``), ``uniform:lo,hi``, or explicit ``1,2,4`` (one per rank;
    a sequence of numbers works too).
    """
    if not isinstance(spec, str):
        values = list(spec)
        text = ",".join(str(v) for v in values)
    else:
        text = spec.strip()
        kind, sep, rest = text.partition(":")
        if sep:
            try:
                params = [float(p) for p in rest.split(",")]
            except ValueError:
                raise ConfigError(f"Invalid speeds {spec!r}: parameters must be numbers") from None
            if kind == "lognormal":
                if len(params) != 1 or not math.isfinite(params[0]) or params[0] < 0:
                    raise ConfigError(f"Invalid speeds {spec!r}: expected lognormal:σ with "
                                      "σ >= 0")
                return np.exp(params[0] * rng.standard_normal(ranks))
            if kind == "uniform":
                if len(params) != 2 or not all(map(math.isfinite, params)) or \
                        not 0 < params[0] <= params[1]:
                    raise ConfigError(f"Invalid speeds {spec!r}: expected uniform:lo,hi with "
                                      "0 < lo <= hi")
                return rng.uniform(params[0], params[1], ranks)
            raise ConfigError(f"Invalid speeds {spec!r}: unknown distribution {kind!r}; use "
                              "lognormal:σ, uniform:lo,hi or a list like 1,2,4")
        values = [v for v in text.split(",") if v.strip()]
    try:
        speeds = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"Invalid speeds {text!r}: expected lognormal:σ, uniform:lo,hi or "
                          "comma-separated numbers") from None
    if len(speeds) != ranks:
        raise ConfigError(f"Invalid speeds {text!r}: {len(speeds)} values for {ranks} ranks")
    if not np.all(np.isfinite(speeds)) or np.any(speeds <= 0):
        raise ConfigError(f"Invalid speeds {text!r}: every speed must be finite and > 0")
    return speeds


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value)


@dataclass(kw_only=True)
class SimulationConfig:
    """One simulated run. Invalid values raise ConfigError naming the value."""

    #: Number of ranks k.
    ranks: int = 8
    #: ``lognormal:σ``, ``uniform:lo,hi``, or explicit speeds (``"1,2,4"`` or a sequence).
    speeds: str | Sequence[float] = "lognormal:0.5"
    #: Relative standard deviation of each (step, rank) busy time.
    noise: float = 0.05
    #: Optimizer steps to simulate.
    steps: int = 400
    #: Steps per plan window (``rebalance_every``).
    window: int = 20
    #: B, samples per step over all ranks. Default: 64 per rank.
    global_batch_size: int | None = None
    #: A name in :data:`policies.POLICIES`.
    policy: str = "affine"
    #: Busy seconds per sample on a rank of speed 1.
    per_sample_s: float = 0.002
    #: Fixed busy seconds per step on a rank of speed 1 (see ``overhead``).
    overhead_s: float = 0.005
    #: ``"speed"``: α_i = overhead_s / s_i (runs on the device); ``"fixed"``: α_i = overhead_s.
    overhead: str = "speed"
    #: All-reduce seconds added to every step (the same for every plan).
    allreduce_s: float = 0.005
    #: Speed changes: Slowdown records or ``"STEP:RANK:FACTOR"`` strings.
    slowdowns: Sequence[Slowdown | str] = ()
    #: Steps a measurement must be old before the policy sees it. Default: one window.
    lag: int | None = None
    #: Seeds the numpy Generator that draws speeds and noise.
    seed: int = 0
    #: Per-rank bounds, as for the sampler (an int or one per rank).
    min_batch_size: int | Sequence[int] = 1
    max_batch_size: int | Sequence[int] | None = None
    #: Policy options (see :data:`policies.DEFAULT_OPTIONS`).
    options: Mapping[str, float] = field(default_factory=dict)
    #: Short name for tables (default: the policy).
    label: str | None = None
    #: ``affine``, ``flat:F``, ``step:Q`` or ``flat:F,step:Q`` (see the module docstring).
    curve: str = "affine"
    #: One-off seconds added to each of a rank's first ``new_shape_steps`` steps at a new size.
    new_shape_s: float = 0.0
    new_shape_steps: int = 2
    #: Every batch size is a multiple of this (the sampler's ``batch_size_multiple``).
    batch_size_multiple: int = 1
    #: Steps of the first windows, before windows of ``window`` steps: per-epoch plans
    #: (``window`` = steps per epoch) with the sampler's early re-plans of epoch 0 are
    #: ``early_windows=(7, 7)``, ``lag`` the loader's prefetch (a few steps).
    early_windows: Sequence[int] = ()
    #: The rank's own discards, as the sampler does: the first step of the run and the first
    #: step after a change of a rank's batch size are not measured (a new shape's one-off cost).
    discard_after_change: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.ranks) or self.ranks < 1:
            raise ConfigError(f"Invalid ranks {self.ranks!r}, it should be an integer >= 1")
        if self.global_batch_size is None:
            self.global_batch_size = 64 * self.ranks
        if not _is_int(self.global_batch_size) or self.global_batch_size < self.ranks:
            raise ConfigError(f"Invalid global_batch_size {self.global_batch_size!r}: it should "
                              f"be an integer >= ranks ({self.ranks}), one sample per rank")
        for name in ("steps", "window"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"Invalid {name} {getattr(self, name)!r}, it should be an "
                                  "integer >= 1")
        if self.lag is None:
            self.lag = self.window
        if not isinstance(self.discard_after_change, bool):
            raise ConfigError(f"Invalid discard_after_change {self.discard_after_change!r}, "
                              "it should be True or False")
        self.early_windows = tuple(self.early_windows)
        for n in self.early_windows:
            if not _is_int(n) or n < 1:
                raise ConfigError(f"Invalid early_windows {self.early_windows!r}: every window "
                                  "should be an integer >= 1 steps")
        if not _is_int(self.lag) or self.lag < 0:
            raise ConfigError(f"Invalid lag {self.lag!r}, it should be an integer >= 0")
        parse_curve(self.curve)
        if not _is_int(self.new_shape_steps) or self.new_shape_steps < 0:
            raise ConfigError(f"Invalid new_shape_steps {self.new_shape_steps!r}, it should be "
                              "an integer >= 0")
        for name in ("noise", "overhead_s", "allreduce_s", "new_shape_s"):
            if not _is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"Invalid {name} {getattr(self, name)!r}, it should be a "
                                  "finite number >= 0")
        if not _is_real(self.per_sample_s) or self.per_sample_s <= 0:
            raise ConfigError(f"Invalid per_sample_s {self.per_sample_s!r}, it should be > 0")
        if self.overhead not in ("speed", "fixed"):
            raise ConfigError(f"Invalid overhead {self.overhead!r}: use 'speed' or 'fixed'")
        check_policy(self.policy)
        if not _is_int(self.seed):
            raise ConfigError(f"Invalid seed {self.seed!r}, it should be an integer")
        slowdowns = []
        for s in self.slowdowns:
            s = s if isinstance(s, Slowdown) else parse_slowdown(s)
            if not _is_int(s.step) or s.step < 0:
                raise ConfigError(f"Invalid slowdown step {s.step!r}, it should be >= 0")
            if not _is_int(s.rank) or not 0 <= s.rank < self.ranks:
                raise ConfigError(f"Invalid slowdown rank {s.rank!r}, rank should be in the "
                                  f"interval [0, {self.ranks - 1}]")
            if not _is_real(s.factor) or s.factor <= 0:
                raise ConfigError(f"Invalid slowdown factor {s.factor!r}, it should be > 0")
            slowdowns.append(s)
        self.slowdowns = tuple(sorted(slowdowns, key=lambda s: s.step))
        self.options = check_options(self.options)
        # Raise now, not mid-run: bad speeds and infeasible bounds are configuration errors.
        parse_speeds(self.speeds, self.ranks, np.random.default_rng(0))
        normalize_bounds(self.ranks, self.global_batch_size, self.min_batch_size,
                         self.max_batch_size, self.batch_size_multiple)


@dataclass
class WindowRow:
    window: int
    first_step: int
    steps: int
    #: The plan trained in this window.
    batch_sizes: tuple[int, ...]
    #: Mean step seconds over the window (noise and all-reduce included).
    step_s: float
    #: Continuous equal-finish optimum of the true model, noiseless, plus all-reduce.
    optimum_s: float
    #: The integer optimum plan on the same noise draws.
    oracle_s: float
    #: The equal split on the same noise draws.
    equal_s: float
    #: step_s / oracle_s.
    ratio: float
    #: Wall milliseconds of the decide() call that made this window's plan.
    decision_ms: float
    reason: str
    changed: bool


@dataclass
class SlowdownSummary:
    step: int
    rank: int
    factor: float
    #: First window trained entirely after the slowdown.
    window: int
    #: First window whose decision could see a slowed step (the lag allows).
    visible_window: int
    #: First window (>= ``window``) within 5 % of the oracle; None if none.
    converged_window: int | None


@dataclass
class Summary:
    steady_first_window: int
    steady_step_s: float
    steady_oracle_s: float
    steady_optimum_s: float
    steady_equal_s: float
    #: oracle / step over the steady windows (1.0 is the best achievable).
    efficiency: float
    #: equal split / step over the steady windows.
    speedup: float
    slowdowns: list[SlowdownSummary]
    decision_ms_median: float
    decision_ms_max: float


@dataclass
class SimulationResult:
    config: SimulationConfig
    speeds: tuple[float, ...]
    min_sizes: tuple[int, ...]
    max_sizes: tuple[int, ...]
    rows: list[WindowRow]
    summary: Summary

    def to_dict(self) -> dict:
        out = asdict(self)
        out["config"]["slowdowns"] = [asdict(s) for s in self.config.slowdowns]
        return out


class _Cluster:
    """The true model: α, β per rank at any step, and noisy busy times."""

    def __init__(self, config: SimulationConfig, rng: np.random.Generator) -> None:
        self.speeds = parse_speeds(config.speeds, config.ranks, rng)
        self.betas = config.per_sample_s / self.speeds
        self.alphas = (config.overhead_s / self.speeds if config.overhead == "speed"
                       else np.full(config.ranks, config.overhead_s))
        self.slowdowns = config.slowdowns
        flat, self.tile = parse_curve(config.curve)
        self.flat_below = flat * self.speeds
        self.affine = flat == 0 and self.tile == 1

    def effective(self, sizes) -> np.ndarray:
        """The batch sizes the curve charges for: tiles rounded up, at least the flat part."""
        b = np.asarray(sizes, dtype=np.float64)
        return np.maximum(np.ceil(b / self.tile) * self.tile, self.flat_below)

    def oracle(self, alphas, betas, lo, hi, total: int, quantum: int = 1
               ) -> tuple[float, tuple[int, ...]]:
        """The integer plan with the least noiseless step under the curve, and that step.

        A bisection on the step T: rank i can take at most the largest multiple of the tile
        whose busy time fits T; the least T whose sizes reach ``total`` is the optimum, and any
        excess is taken back (which never lengthens a step) from the ranks that jumped last.
        """
        lo_, hi_ = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)

        def sizes_at(T):
            room = (T - alphas) / betas
            tiles = np.floor(room / self.tile + 1e-9) * self.tile
            b = np.floor(tiles / quantum + 1e-9) * quantum
            fits = (room >= self.flat_below) & (b >= quantum)
            b = np.where(fits, b, -1)
            return np.clip(b, lo_, hi_).astype(np.int64)

        low, high = 0.0, float((alphas + betas * self.effective(hi_)).max())
        for _ in range(200):
            mid = 0.5 * (low + high)
            if sizes_at(mid).sum() >= total:
                high = mid
            else:
                low = mid
            if high - low <= 1e-12 * high:
                break
        b, before = sizes_at(high), sizes_at(low)
        excess = int(b.sum() - total)
        for i in np.argsort(-(b - before), kind="stable"):
            if excess <= 0:
                break
            take = min(excess, int(b[i] - lo_[i]) // quantum * quantum)
            b[i] -= take
            excess -= take
        sizes = tuple(int(x) for x in b)
        return float((alphas + betas * self.effective(sizes)).max()), sizes

    def model_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        alphas, betas = self.alphas.copy(), self.betas.copy()
        for s in self.slowdowns:
            if s.step <= step:
                alphas[s.rank] *= s.factor
                betas[s.rank] *= s.factor
        return alphas, betas


def _step_seconds(alphas, betas, sizes, noise_factors, cluster: "_Cluster | None" = None
                  ) -> np.ndarray:
    """Busy seconds (steps, ranks) of one plan under per-(step, rank) noise factors."""
    b = cluster.effective(sizes) if cluster is not None else np.asarray(sizes, dtype=np.float64)
    return (alphas + betas * b) * noise_factors


def simulate(config: SimulationConfig) -> SimulationResult:
    """Run ``config.policy`` for ``config.steps`` steps on the modelled cluster."""
    rng = np.random.default_rng(config.seed)
    cluster = _Cluster(config, rng)
    k, B, K = config.ranks, config.global_batch_size, config.window
    q = config.batch_size_multiple
    lo, hi = normalize_bounds(k, B, config.min_batch_size, config.max_batch_size, q)
    equal_sizes = apportion([1.0] * k, B, lo, hi, q)
    current = equal_sizes  # the coordinator's initial plan without initial weights
    # Trained steps, one (steps, ranks) block per window; only the newest ones are kept.
    done_sizes: list[np.ndarray] = []
    done_busy: list[np.ndarray] = []
    done_first = 0  # first step held in done_*
    rows: list[WindowRow] = []
    # Steps each rank has run at each batch size (for the one-off cost of a new shape).
    runs_at: list[dict[int, int]] = [dict() for _ in range(k)]
    for w, (S, n) in enumerate(_windows(config)):
        visible_end = max(0, S - config.lag)
        visible_start = max(0, visible_end - HISTORY_PER_RANK)
        # Drop windows nothing will look at again.
        while done_sizes and done_first + len(done_sizes[0]) <= visible_start:
            done_first += len(done_sizes.pop(0))
            done_busy.pop(0)
        if visible_end > visible_start:
            sizes_hist = np.concatenate(done_sizes)[visible_start - done_first:
                                                    visible_end - done_first]
            busy_hist = np.concatenate(done_busy)[visible_start - done_first:
                                                  visible_end - done_first]
            stacked = np.stack([sizes_hist.T, busy_hist.T], axis=2)  # (ranks, n, 2)
            measured = ~np.isnan(busy_hist.T)  # the ranks' own discards (see below)
            history = tuple(stacked[i][measured[i]] for i in range(k))
        else:
            history = tuple(np.empty((0, 2)) for _ in range(k))
        inp = PolicyInput(global_batch_size=B, current=tuple(current), min_sizes=lo,
                          max_sizes=hi, quantum=q, history=history, static_weights=None,
                          options=dict(config.options))
        t0 = time.perf_counter()
        sizes, decision = decide(config.policy, inp)
        decision_ms = (time.perf_counter() - t0) * 1e3

        factors = np.maximum(1.0 + config.noise * rng.standard_normal((n, k)), _NOISE_FLOOR)
        step_s, oracle_s, equal_s, optimum_s = [], [], [], []
        oracle_cache: dict[int, tuple] = {}
        new_shape = None
        if config.new_shape_s > 0 and config.new_shape_steps > 0:
            fresh = np.array([runs_at[i].get(int(b), 0) == 0 for i, b in enumerate(sizes)])
            new_shape = np.where(fresh, config.new_shape_s, 0.0)
            for i, b in enumerate(sizes):
                runs_at[i][int(b)] = runs_at[i].get(int(b), 0) + n
        for j in range(n):
            alphas, betas = cluster.model_at(S + j)
            key = sum(1 for s in config.slowdowns if s.step <= S + j)
            if key not in oracle_cache:
                if cluster.affine:
                    targets, _ = CostModel(alphas, betas).equal_finish(lo, hi, B)
                    oracle_cache[key] = (float((alphas + betas * targets).max()),
                                         apportion(targets, B, lo, hi, q))
                else:
                    oracle_cache[key] = cluster.oracle(alphas, betas, lo, hi, B, q)
            optimum, oracle_sizes = oracle_cache[key]
            f = factors[j:j + 1]
            busy = _step_seconds(alphas, betas, sizes, f, cluster)[0]
            if new_shape is not None:
                busy = busy + new_shape
                new_shape = np.where(j + 1 < config.new_shape_steps, new_shape, 0.0)
            step_s.append(busy.max())
            oracle_busy = _step_seconds(alphas, betas, oracle_sizes, f, cluster)
            if S + j < config.new_shape_steps:
                oracle_busy = oracle_busy + config.new_shape_s
            oracle_s.append(oracle_busy.max())
            equal_s.append(_step_seconds(alphas, betas, equal_sizes, f, cluster).max())
            optimum_s.append(optimum)
            factors[j] = busy  # reuse the row as this step's busy record
        if config.discard_after_change:
            # A rank measures no step after a change of its batch size, nor the run's first.
            changed = np.asarray(sizes) != np.asarray(current) if S else np.ones(k, dtype=bool)
            factors[0, changed] = np.nan
        done_sizes.append(np.tile(np.asarray(sizes, dtype=np.float64), (n, 1)))
        done_busy.append(factors)
        a = config.allreduce_s
        row = WindowRow(window=w, first_step=S, steps=n, batch_sizes=tuple(sizes),
                        step_s=float(np.mean(step_s)) + a, optimum_s=float(np.mean(optimum_s)) + a,
                        oracle_s=float(np.mean(oracle_s)) + a, equal_s=float(np.mean(equal_s)) + a,
                        ratio=0.0, decision_ms=decision_ms, reason=decision.reason,
                        changed=tuple(sizes) != tuple(current))
        row.ratio = row.step_s / row.oracle_s
        rows.append(row)
        current = sizes
    return SimulationResult(config=config, speeds=tuple(float(s) for s in cluster.speeds),
                            min_sizes=lo, max_sizes=hi, rows=rows,
                            summary=_summarize(config, rows))


def _windows(config: SimulationConfig) -> list[tuple[int, int]]:
    """(first step, steps) of every window: ``early_windows`` first, then ``window`` each."""
    out, S = [], 0
    for n in config.early_windows:
        if S >= config.steps:
            break
        out.append((S, min(n, config.steps - S)))
        S += n
    while S < config.steps:
        out.append((S, min(config.window, config.steps - S)))
        S += config.window
    return out


def _summarize(config: SimulationConfig, rows: list[WindowRow]) -> Summary:
    n = len(rows)
    slow = []
    for s in config.slowdowns:
        window = next((r.window for r in rows if r.first_step >= s.step), n)
        visible = next((r.window for r in rows if r.first_step > s.step + config.lag), n)
        converged = next((r.window for r in rows[window:]
                          if r.step_s <= (1 + CONVERGED_WITHIN) * r.oracle_s), None)
        slow.append(SlowdownSummary(s.step, s.rank, s.factor, window, visible, converged))
    # Steady state: the second half, and not before 3 windows after the policy could see the
    # last slowdown.
    first = n // 2
    if slow:
        first = max(first, slow[-1].visible_window + 3)
    first = min(first, n - 1)
    steady = rows[first:]
    step = float(np.mean([r.step_s for r in steady]))
    oracle = float(np.mean([r.oracle_s for r in steady]))
    equal = float(np.mean([r.equal_s for r in steady]))
    ms = [r.decision_ms for r in rows]
    return Summary(steady_first_window=first, steady_step_s=step, steady_oracle_s=oracle,
                   steady_optimum_s=float(np.mean([r.optimum_s for r in steady])),
                   steady_equal_s=equal, efficiency=oracle / step, speedup=equal / step,
                   slowdowns=slow, decision_ms_median=float(statistics.median(ms)),
                   decision_ms_max=float(max(ms)))


def _plan_text(sizes: Sequence[int], width: int = 8) -> str:
    if len(sizes) <= width:
        return " ".join(str(b) for b in sizes)
    return f"min {min(sizes)} med {int(np.median(sizes))} max {max(sizes)}"


def format_table(result: SimulationResult) -> str:
    """Per-window rows (every n-th one for long runs) and the summary, as text."""
    cfg, s = result.config, result.summary
    rows = result.rows
    every = max(1, -(-len(rows) // MAX_PRINTED_ROWS))
    shown = [r for r in rows if r.window % every == 0 or r.window == rows[-1].window]
    lines = [f"{cfg.label or cfg.policy}: {cfg.ranks} ranks, speeds {cfg.speeds} "
             f"(min {min(result.speeds):.2f}, max {max(result.speeds):.2f}), noise {cfg.noise:g}, "
             f"B={cfg.global_batch_size}, window {cfg.window}, lag {cfg.lag} steps, "
             f"seed {cfg.seed}" + (f"  [every {every}th window shown]" if every > 1 else "")]
    head = f"{'win':>4} {'step':>5}  {'plan':<28} {'step_ms':>8} {'oracle':>8} {'T*':>8} " \
           f"{'equal':>8} {'/oracle':>7} {'dec_ms':>7}"
    lines.append(head)
    for r in shown:
        lines.append(f"{r.window:>4} {r.first_step:>5}  {_plan_text(r.batch_sizes):<28.28} "
                     f"{r.step_s * 1e3:>8.2f} {r.oracle_s * 1e3:>8.2f} {r.optimum_s * 1e3:>8.2f} "
                     f"{r.equal_s * 1e3:>8.2f} {r.ratio:>7.3f} {r.decision_ms:>7.2f}"
                     + ("" if r.changed else "  ="))
    lines.append("(step_ms: mean over the window; oracle: the optimum plan on the same noise; "
                 "T*: noiseless equal-finish optimum; '=' plan unchanged)")
    lines.append(
        f"steady state (windows {s.steady_first_window}-{rows[-1].window}): step "
        f"{s.steady_step_s * 1e3:.2f} ms, oracle {s.steady_oracle_s * 1e3:.2f} ms, "
        f"T* {s.steady_optimum_s * 1e3:.2f} ms, equal {s.steady_equal_s * 1e3:.2f} ms | "
        f"efficiency {s.efficiency:.1%} of optimum, speedup x{s.speedup:.2f} vs equal")
    for sd in s.slowdowns:
        conv = ("not within the run" if sd.converged_window is None else
                f"window {sd.converged_window} ({sd.converged_window - sd.window} windows after, "
                f"{sd.converged_window - sd.visible_window:+d} vs first visible)")
        lines.append(f"slowdown x{sd.factor:g} of rank {sd.rank} at step {sd.step}: first full "
                     f"window {sd.window}, visible to the policy from window {sd.visible_window}, "
                     f"within {CONVERGED_WITHIN:.0%} of optimum at {conv}")
    lines.append(f"decide(): median {s.decision_ms_median:.2f} ms, max {s.decision_ms_max:.2f} ms")
    return "\n".join(lines)


def paper_example(base: SimulationConfig | None = None) -> list[SimulationResult]:
    """The seed paper's 5-node example (capacities 100, 100, 200, 200, 300, B = 900).

    Three runs on the same cluster and noise: the ``seed`` rule with the paper's β = 0.1, the
    ``seed`` rule with shardbalance's default β, and ``affine``.
    """
    base = base or SimulationConfig(ranks=5, speeds=(1, 1, 2, 2, 3))
    common = dict(ranks=5, speeds=tuple(c / 100 for c in PAPER_CAPACITIES),
                  global_batch_size=sum(PAPER_CAPACITIES), noise=base.noise, steps=base.steps,
                  window=base.window, per_sample_s=base.per_sample_s, overhead_s=base.overhead_s,
                  overhead=base.overhead, allreduce_s=base.allreduce_s, lag=base.lag,
                  seed=base.seed, slowdowns=base.slowdowns)
    default_beta = check_options(None)["seed_beta"]
    return [
        simulate(SimulationConfig(policy="seed", options={"seed_beta": PAPER_BETA},
                                  label=f"seed β={PAPER_BETA:g}", **common)),
        simulate(SimulationConfig(policy="seed", options={"seed_beta": default_beta},
                                  label=f"seed β={default_beta:g}", **common)),
        simulate(SimulationConfig(policy="affine", label="affine", **common)),
    ]


def _first_within(result: SimulationResult, tolerance: float) -> int | None:
    return next((r.window for r in result.rows if r.step_s <= (1 + tolerance) * r.oracle_s), None)


def format_paper_example(results: list[SimulationResult]) -> str:
    """The paper example side by side: per window each node's batch size and step/optimum."""
    cfg = results[0].config
    B = cfg.global_batch_size
    lines = [f"Seed paper example (section 3.3): 5 nodes, capacities "
             f"{', '.join(map(str, PAPER_CAPACITIES))}, B={B}, noise {cfg.noise:g}, "
             f"window {cfg.window}, lag {cfg.lag}; cells: batch per node | step/optimum",
             f"{'win':>4}  " + "  ".join(f"{r.config.label:<26}" for r in results)]
    n = len(results[0].rows)
    every = max(1, -(-n // MAX_PRINTED_ROWS))
    for w in range(n):
        if w % every and w != n - 1:
            continue
        cells = [f"{' '.join(f'{b:>3}' for b in r.rows[w].batch_sizes)} |{r.rows[w].ratio:>5.3f}"
                 for r in results]
        lines.append(f"{w:>4}  " + "  ".join(f"{c:<26}" for c in cells))
    cap = np.array(PAPER_CAPACITIES, dtype=float) / sum(PAPER_CAPACITIES)
    alphas = (cfg.overhead_s / np.asarray(results[0].speeds) if cfg.overhead == "speed"
              else np.full(5, cfg.overhead_s))
    betas = cfg.per_sample_s / np.asarray(results[0].speeds)
    opt, _ = CostModel(alphas, betas).equal_finish(results[0].min_sizes, results[0].max_sizes, B)
    lines.append("shares (node 1..5): capacity " + " ".join(f"{c:.3f}" for c in cap)
                 + " | equal-finish " + " ".join(f"{b / B:.3f}" for b in opt))
    for r in results:
        last = r.rows[-1].batch_sizes
        w5, w1 = _first_within(r, 0.05), _first_within(r, 0.01)
        lines.append(f"{r.config.label:<11} final shares " + " ".join(f"{b / B:.3f}" for b in last)
                     + f" | within 5% of optimum from window {w5}, within 1% from window {w1}"
                     f" | steady efficiency {r.summary.efficiency:.1%}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``shardbalance simulate`` flags to ``parser``."""
    d = SimulationConfig.__dataclass_fields__
    parser.add_argument("--ranks", type=int, default=None,
                        help="number of ranks (default 8, or the length of an explicit --speeds)")
    parser.add_argument("--speeds", default=d["speeds"].default,
                        help="lognormal:σ, uniform:lo,hi or explicit 1,2,4 (default %(default)s)")
    parser.add_argument("--noise", type=float, default=d["noise"].default,
                        help="relative std of each busy time (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d["steps"].default)
    parser.add_argument("--window", type=int, default=d["window"].default,
                        help="steps per plan window (default %(default)s)")
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="B (default 64 per rank)")
    parser.add_argument("--policy", default=d["policy"].default, choices=sorted(POLICIES))
    parser.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a policy option, e.g. band=0.05 (repeatable)")
    parser.add_argument("--per-sample-ms", type=float, default=2.0,
                        help="busy ms per sample at speed 1 (default %(default)s)")
    parser.add_argument("--overhead-ms", type=float, default=5.0,
                        help="busy ms per step at speed 1 (default %(default)s)")
    parser.add_argument("--overhead", choices=("speed", "fixed"), default="speed",
                        help="speed: overhead scales with 1/speed (device work); fixed: the same "
                             "on every rank (host work) (default %(default)s)")
    parser.add_argument("--allreduce-ms", type=float, default=5.0,
                        help="all-reduce ms added to every step (default %(default)s)")
    parser.add_argument("--slowdown", action="append", default=[], metavar="STEP:RANK:FACTOR",
                        help="from STEP on, RANK is FACTOR times slower (repeatable)")
    parser.add_argument("--lag", type=int, default=None,
                        help="steps a measurement must be old to be seen (default: one window)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-batch-size", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--curve", default="affine",
                        help="busy-time curve: affine, flat:F (flat below F·speed samples), "
                             "step:Q (tiles of Q samples) or flat:F,step:Q (default %(default)s)")
    parser.add_argument("--new-shape-ms", type=float, default=0.0,
                        help="one-off ms of each of a rank's first --new-shape-steps steps at a "
                             "new batch size (default %(default)s)")
    parser.add_argument("--new-shape-steps", type=int, default=2)
    parser.add_argument("--batch-size-multiple", type=int, default=1,
                        help="every batch size a multiple of this (default %(default)s)")
    parser.add_argument("--early-windows", default="",
                        help="steps of the first windows before --window ones, e.g. 7,7 (the "
                             "sampler's early re-plans in epoch 0 with per-epoch plans)")
    parser.add_argument("--paper-example", action="store_true",
                        help="the seed paper's 5-node example: seed rule vs affine")
    parser.add_argument("--json-out", default=None, help="write every window and the summary here")


def _config_from_args(args: argparse.Namespace) -> SimulationConfig:
    options = {}
    for item in args.policy_option:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            options[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"Invalid --policy-option {item!r}: expected KEY=NUMBER") from None
    ranks = args.ranks
    if ranks is None:
        explicit = ":" not in args.speeds
        ranks = len([v for v in args.speeds.split(",") if v.strip()]) if explicit else 8
    return SimulationConfig(
        ranks=ranks, speeds=args.speeds, noise=args.noise, steps=args.steps, window=args.window,
        global_batch_size=args.global_batch_size, policy=args.policy,
        per_sample_s=args.per_sample_ms / 1e3, overhead_s=args.overhead_ms / 1e3,
        overhead=args.overhead, allreduce_s=args.allreduce_ms / 1e3, slowdowns=args.slowdown,
        lag=args.lag, seed=args.seed, min_batch_size=args.min_batch_size,
        max_batch_size=args.max_batch_size, options=options, curve=args.curve,
        new_shape_s=args.new_shape_ms / 1e3, new_shape_steps=args.new_shape_steps,
        batch_size_multiple=args.batch_size_multiple,
        early_windows=_early_windows(args.early_windows))


def _early_windows(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"Invalid --early-windows {text!r}: expected steps like 7,7") from None


def run(args: argparse.Namespace) -> int:
    """``shardbalance simulate``: print the table and summary; 0 on success."""
    if args.paper_example:
        args.speeds, args.ranks = ",".join(str(c / 100) for c in PAPER_CAPACITIES), 5
        results = paper_example(_config_from_args(args))
        print(format_paper_example(results))
        payload = {"paper_example": [r.to_dict() for r in results]}
    else:
        result = simulate(_config_from_args(args))
        print(format_table(result))
        payload = result.to_dict()
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(payload, fh, indent=1)
        print(f"written to {args.json_out}")
    return 0
