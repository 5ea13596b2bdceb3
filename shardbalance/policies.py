"""Balancing policies: pure functions from measured busy times to per-rank weights.

Every policy takes a :class:`PolicyInput` (the plan in force, the bounds, and each rank's recent
``(batch_size, busy_seconds)`` observations) and returns a :class:`Decision` (real-valued
weights plus the cost model it believed). :func:`decide` apportions the weights into integer
batch sizes. Policies keep no state of their own: everything they need is in their input, so
the coordinator, the simulator and the tests all run exactly the same code.

    equal         the DistributedSampler split (round robin)
    static        fixed user weights (weighted round robin)
    proportional  weights ∝ measured throughput (samples per busy second)
    seed          the seed paper's additive rule  W(t+1) = W(t) + β·(R − L)
    affine        (default) fit t_i(b) = α_i + β_i·b and split for an equal finish
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ._exceptions import ConfigError
from .plan import apportion, water_fill

__all__ = ["PolicyInput", "Decision", "CostModel", "POLICIES", "ADAPTIVE_POLICIES",
           "DEFAULT_OPTIONS", "decide", "fit_cost_model", "check_options"]

#: Tunables and their defaults. Any of them can be passed as ``options``.
DEFAULT_OPTIONS: Mapping[str, float] = {
    # affine: keep the current plan unless the new one is predicted this much faster.
    "band": 0.02,
    # affine: a rank whose newest measurements are this far off its fitted model has changed
    # speed; older measurements of that rank are forgotten.
    "drift_tolerance": 0.25,
    # affine: weight of a segment of measurements halves every this many newer segments.
    "half_life_segments": 2.0,
    # seed: the step size β of W(t+1) = W(t) + β·(R − L).
    "seed_beta": 0.5,
}


#: Options that must be strictly positive (the others may be 0).
_POSITIVE_OPTIONS = frozenset({"half_life_segments"})
#: Measurements of one batch size are split into segments of at most this many steps, so a
#: rank that slows down at an unchanged plan shows up as a new segment that disagrees.
SEGMENT_STEPS = 16


def check_options(options: Mapping[str, float] | None) -> dict[str, float]:
    """Defaults overlaid with ``options``; ConfigError names an unknown or bad option."""
    merged = dict(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise ConfigError(f"Unknown policy option {key!r}; known: {sorted(DEFAULT_OPTIONS)}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not math.isfinite(value) or value < 0 or (key in _POSITIVE_OPTIONS and value == 0):
            bound = "> 0" if key in _POSITIVE_OPTIONS else ">= 0"
            raise ConfigError(f"Invalid policy option {key}={value!r}: expected a finite number "
                              f"{bound}")
        merged[key] = float(value)
    return merged


def _options(options: Mapping[str, float] | None) -> dict[str, float]:
    return {**DEFAULT_OPTIONS, **(options or {})}


@dataclass(frozen=True, kw_only=True)
class PolicyInput:
    """What a policy may look at."""

    #: B, samples per optimizer step over all ranks.
    global_batch_size: int
    #: The batch sizes of the plan in force.
    current: tuple[int, ...]
    #: Per-rank bounds (already multiples of ``quantum``).
    min_sizes: tuple[int, ...]
    max_sizes: tuple[int, ...]
    quantum: int = 1
    #: Per rank, a float array of shape (n, 2): columns batch size and busy seconds, oldest first.
    history: tuple[np.ndarray, ...] = ()
    #: Weights for the ``static`` policy.
    static_weights: tuple[float, ...] | None = None
    options: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_OPTIONS))

    @property
    def world_size(self) -> int:
        return len(self.current)


@dataclass(frozen=True)
class CostModel:
    """Busy seconds per step of each rank as ``alpha + beta * batch_size``."""

    alphas: np.ndarray
    betas: np.ndarray
    #: Relative standard error of each rank's newest busy-time estimate (0 if unknown).
    noise: np.ndarray | None = None

    def busy_seconds(self, batch_sizes) -> np.ndarray:
        return self.alphas + self.betas * np.asarray(batch_sizes, dtype=np.float64)

    def step_seconds(self, batch_sizes) -> float:
        """A synchronous step lasts as long as its slowest rank."""
        return float(self.busy_seconds(batch_sizes).max())


@dataclass(frozen=True)
class Decision:
    weights: tuple[float, ...]
    model: CostModel | None
    reason: str


def _segments(obs: np.ndarray) -> list[tuple[float, float, int]]:
    """Consecutive runs of one batch size as ``(batch_size, median busy s, count)``, oldest first.

    Long runs are cut into segments of at most :data:`SEGMENT_STEPS` steps (the newest segment
    ends at the newest step), so a change of speed at an unchanged batch size is visible.
    """
    if len(obs) == 0:
        return []
    cuts = np.flatnonzero(np.diff(obs[:, 0])) + 1
    segments = []
    for run in np.split(obs, cuts):
        for end in range(len(run), 0, -SEGMENT_STEPS)[::-1]:
            part = run[max(0, end - SEGMENT_STEPS):end]
            segments.append((float(part[0, 0]), float(np.median(part[:, 1])), len(part)))
    return segments


def _fit_line(segs, half_life: float) -> tuple[float, float] | None:
    """Weighted least squares of busy time on batch size (None without two distinct sizes).

    Segments are pooled by batch size first (each size's newest segments, count-weighted), and
    a size's weight halves every ``half_life`` newer sizes: old plans fade, but a long stay at
    one plan does not erase what the earlier plans taught about α.
    """
    groups: dict[float, list] = {}
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
    if beta <= 0 or alpha < 0:
        # Noise swamped the slope: fall back to busy time proportional to batch size.
        return 0.0, float(np.average(t / b, weights=w))
    return float(alpha), float(beta)


def fit_cost_model(history: tuple[np.ndarray, ...], options: Mapping[str, float] | None = None
                   ) -> CostModel | None:
    """Fit ``t_i(b) = α_i + β_i·b`` per rank; None until every rank has measurements.

    Robust to noise (segment medians), forgets a rank's old measurements when its newest ones
    disagree with them (a throttling or newly shared GPU), and when a rank has only one batch
    size to go on (α unidentified) borrows α from its own older fit or the other ranks' fits.
    """
    opts = _options(options)
    if not history or any(len(h) == 0 for h in history):
        return None
    fits: list[tuple[float, float] | None] = []
    latest: list[tuple[float, float]] = []
    priors: list[float | None] = []
    noise: list[float] = []
    for obs in history:
        obs = np.asarray(obs, dtype=np.float64)
        noise.append(_relative_error(obs))
        segs = _segments(obs)
        newest = segs[-1]
        older_fit = _fit_line(segs[:-1], opts["half_life_segments"])
        prior = older_fit[0] if older_fit else None
        if older_fit is not None:
            predicted = older_fit[0] + older_fit[1] * newest[0]
            if abs(predicted - newest[1]) > opts["drift_tolerance"] * newest[1]:
                segs = [newest]
        elif len(segs) > 1:
            # One older batch size only: compare throughputs, the best we can do without α
            # (exact when the size did not change).
            old = segs[-2]
            if abs(old[1] / old[0] * newest[0] - newest[1]) > opts["drift_tolerance"] * newest[1]:
                segs = [newest]
        fits.append(_fit_line(segs, opts["half_life_segments"]))
        latest.append((newest[0], newest[1]))
        priors.append(prior)
    pooled = [f[0] for f in fits if f is not None]
    pooled_alpha = float(np.median(pooled)) if pooled else 0.0
    alphas, betas = [], []
    for fit, (b, t), prior in zip(fits, latest, priors):
        if fit is None:
            alpha = min(prior if prior is not None else pooled_alpha, 0.5 * t)
            fit = (alpha, (t - alpha) / b)
        alphas.append(fit[0])
        betas.append(max(fit[1], 1e-12))
    return CostModel(np.array(alphas), np.array(betas), np.array(noise))


def _relative_error(obs: np.ndarray) -> float:
    """Standard error of the newest batch size's median busy time, relative (robust, MAD)."""
    recent = obs[-4 * SEGMENT_STEPS:]
    t = recent[recent[:, 0] == obs[-1, 0], 1]
    if len(t) < 3:
        return 0.0
    median = float(np.median(t))
    mad = float(np.median(np.abs(t - median)))
    return 1.4826 * mad / np.sqrt(len(t)) / median


def _throughputs(history: tuple[np.ndarray, ...]) -> np.ndarray:
    """Samples per busy second of each rank over its newest batch size."""
    out = []
    for obs in history:
        b, t, _ = _segments(np.asarray(obs, dtype=np.float64))[-1]
        out.append(b / t)
    return np.array(out)


def _keep(inp: PolicyInput, model: CostModel | None, reason: str) -> Decision:
    return Decision(tuple(float(b) for b in inp.current), model, reason)


def equal(inp: PolicyInput) -> Decision:
    return Decision((1.0,) * inp.world_size, None, "equal split")


def static(inp: PolicyInput) -> Decision:
    if inp.static_weights is None:
        return equal(inp)
    return Decision(tuple(inp.static_weights), None, "static weights")


def proportional(inp: PolicyInput) -> Decision:
    model = fit_cost_model(inp.history, inp.options)
    if model is None:
        return _keep(inp, None, "waiting for measurements from every rank")
    return Decision(tuple(_throughputs(inp.history)), model, "weights ∝ measured throughput")


def seed(inp: PolicyInput) -> Decision:
    """The seed paper's rule: move each rank's load share L toward its capacity share R."""
    model = fit_cost_model(inp.history, inp.options)
    if model is None:
        return _keep(inp, None, "waiting for measurements from every rank")
    thr = _throughputs(inp.history)
    capacity = thr / thr.sum()
    load = np.asarray(inp.current, dtype=np.float64) / inp.global_batch_size
    beta = _options(inp.options)["seed_beta"]
    weights = np.maximum(load + beta * (capacity - load), 1e-9)
    return Decision(tuple(weights), model, f"W += {beta:g}·(R − L)")


def affine(inp: PolicyInput) -> Decision:
    """Equal finish under ``t_i(b) = α_i + β_i·b``: ``b_i = (T − α_i)/β_i`` water-filled into bounds."""
    model = fit_cost_model(inp.history, inp.options)
    if model is None:
        return _keep(inp, None, "waiting for measurements from every rank")
    targets, finish = water_fill(1.0 / model.betas, -model.alphas / model.betas,
                                 inp.min_sizes, inp.max_sizes, inp.global_batch_size)
    sizes = apportion(targets, inp.global_batch_size, inp.min_sizes, inp.max_sizes, inp.quantum)
    band = _options(inp.options)["band"]
    if model.noise is not None and len(model.noise):
        # The slowest of k noisy estimates overstates the current step by about
        # sqrt(2 ln k) standard errors: a gain smaller than that is noise, not imbalance.
        band += (1.0 + np.sqrt(2.0 * np.log(max(inp.world_size, 2)))) * float(model.noise.max())
    current_s, new_s = model.step_seconds(inp.current), model.step_seconds(sizes)
    if current_s <= new_s * (1.0 + band):
        return _keep(inp, model, f"within the {band:.1%} no-change band")
    return Decision(tuple(float(b) for b in sizes), model,
                    f"equal finish at {finish * 1e3:.1f} ms")


PolicyFn = Callable[[PolicyInput], Decision]

#: The policy registry: name -> pure function.
POLICIES: dict[str, PolicyFn] = {
    "equal": equal,
    "static": static,
    "proportional": proportional,
    "seed": seed,
    "affine": affine,
}

#: Policies that need measurements, and therefore a coordinator.
ADAPTIVE_POLICIES = frozenset({"proportional", "seed", "affine"})


def decide(policy: str, inp: PolicyInput) -> tuple[tuple[int, ...], Decision]:
    """Run ``policy`` and apportion its weights into batch sizes that sum to B within bounds."""
    try:
        fn = POLICIES[policy]
    except KeyError:
        raise ConfigError(f"Unknown policy {policy!r}; choose one of {sorted(POLICIES)}") from None
    decision = fn(inp)
    sizes = apportion(decision.weights, inp.global_batch_size, inp.min_sizes, inp.max_sizes,
                      inp.quantum)
    return sizes, decision
