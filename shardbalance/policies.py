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
    curve         fit a monotone piecewise-linear t_i(b) (flat-then-linear, steps) through the
                  sizes trained, split for an equal finish, and explore where a curve is flat
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._exceptions import ConfigError, PlanError
from .plan import apportion, water_fill

__all__ = ["PolicyInput", "Decision", "CostModel", "POLICIES", "ADAPTIVE_POLICIES",
           "DEFAULT_OPTIONS", "HISTORY_PER_RANK", "decide", "fit_cost_model", "check_options",
           "check_policy", "CurveModel", "fit_curve_model", "measured_steps_to_first_clean"]

#: Measurements the coordinator keeps per rank; older ones only slow a policy down.
HISTORY_PER_RANK = 512

#: Tunables and their defaults. Any of them can be passed as ``options``.
DEFAULT_OPTIONS: Mapping[str, float] = {
    # affine: keep the current plan unless the new one is predicted this much faster.
    "band": 0.02,
    # affine: a segment of a rank's measurements this far off what its measurements since the
    # last change of speed predict marks a new change of speed; everything older is forgotten.
    "drift_tolerance": 0.25,
    # affine: weight of a segment of measurements halves every this many newer segments.
    "half_life_segments": 2.0,
    # seed: the step size β of W(t+1) = W(t) + β·(R − L).
    "seed_beta": 0.5,
    # affine, curve: steps dropped at the start of the first run of each new batch size of a
    # rank (a new shape pays one-off costs: cudnn autotuning, recompiles, CUDA-graph capture).
    "shape_warmup_steps": 2.0,
    # curve: an exploration step (and any move the fit extrapolates optimistically) grows a
    # rank's largest measured batch size by at most this fraction.
    "explore_step": 0.5,
    # curve: a move (not an exploration step) must repay, within this many steps, the one-off
    # cost measured at new batch sizes of the ranks it gives a size they never ran; 0: off.
    "payback_steps": 24.0,
}


#: Options that must be strictly positive (the others may be 0).
_POSITIVE_OPTIONS = frozenset({"half_life_segments"})
#: Options that count steps (whole numbers).
_STEP_OPTIONS = frozenset({"shape_warmup_steps", "payback_steps"})
#: Measurements of one batch size are split into segments of at most this many steps, so a
#: rank that slows down at an unchanged plan shows up as a new segment that disagrees. Short,
#: because the segment that straddles a change of speed is half stale: at 16 steps and plans
#: of 8-step windows it held a re-balance 3-5 % off the optimum for several windows.
SEGMENT_STEPS = 8
#: A fitted slope less than this many standard errors above 0 is noise, not a slope.
SLOPE_SIGNIFICANCE = 2.0
#: curve: a slope at either end of a rank's points is measured over sizes at least this
#: ratio apart.
SLOPE_SPAN = 1.25
#: Standard deviation of the median of n samples over that of their mean (sqrt(π/2), large n).
_MEDIAN_SPREAD = math.sqrt(math.pi / 2)


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
        if key in _STEP_OPTIONS and value != int(value):
            raise ConfigError(f"Invalid policy option {key}={value!r}: expected a whole number "
                              "of steps >= 0")
        merged[key] = float(value)
    return merged


def _options(options: Mapping[str, float] | None) -> dict[str, float]:
    return {**DEFAULT_OPTIONS, **(options or {})}


def measured_steps_to_first_clean(options: Mapping[str, float] | None = None) -> int:
    """Measured steps at a new batch size up to and including its first clean one: the
    ``shape_warmup_steps`` the fits leave out, plus one. (The step at which a rank's size
    changes is not measured at all: its busy time spans the change.)"""
    return int(_options(options)["shape_warmup_steps"]) + 1


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

    def equal_finish(self, lo, hi, total: float) -> tuple[np.ndarray, float]:
        """Real batch sizes ``(T − α_i)/β_i`` summing to ``total`` within ``[lo, hi]``, and T."""
        return water_fill(1.0 / self.betas, -self.alphas / self.betas, lo, hi, total)


@dataclass(frozen=True)
class Decision:
    weights: tuple[float, ...]
    model: CostModel | None
    reason: str


# --------------------------------------------------------------------------------------------
# The affine cost model.
#
# Per rank, the history is cut into *segments*: consecutive runs of one batch size, long runs cut
# into pieces of at most SEGMENT_STEPS steps (the newest piece of a run ends at the run's newest
# step), each summarised by its median busy time. Scanning a rank's segments oldest to newest, a
# segment that disagrees (beyond ``drift_tolerance``) with what the segments since the last cut
# predict starts a new cut: the rank changed speed, and everything before the cut is forgotten.
# The rank's line is fitted to the segments since its last cut; the line the cut broke still lends
# its α when the new data has one batch size only.
#
# Everything is vectorised over all ranks at once: the coordinator decides inside its request
# loop, and at 4096 ranks × 512 rows per-segment Python (one np.median per segment) took seconds.
# ``tests/test_policies.py`` keeps a plain per-rank reference implementation of the same rules
# and checks this one against it.


@dataclass(frozen=True)
class _Rows:
    """Every rank's history stacked: rank r's rows are ``size[first[r]:first[r + 1]]``."""

    size: np.ndarray  # float64 batch size per row
    busy: np.ndarray  # float64 busy seconds per row
    #: ``busy`` followed by SEGMENT_STEPS times +inf, so that a window of SEGMENT_STEPS values
    #: may start at any row.
    padded_busy: np.ndarray
    first: np.ndarray  # int64, k + 1 offsets

    @classmethod
    def stack(cls, history) -> "_Rows":
        arrays = [np.asarray(h, dtype=np.float64).reshape(-1, 2) for h in history]
        rows = np.concatenate(arrays + [np.full((SEGMENT_STEPS, 2), np.inf)])
        first = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=first[1:])
        n = first[-1]
        return cls(rows[:n, 0], rows[:n, 1], rows[:, 1], first)


@dataclass(frozen=True)
class _Segments:
    """Every rank's segments, oldest first, as flat arrays; rank r's are ``[first[r], first[r+1])``.
    """

    rank: np.ndarray  # int64
    size: np.ndarray  # float64 batch size
    median: np.ndarray  # float64 median busy seconds
    count: np.ndarray  # float64 number of steps
    first: np.ndarray  # int64, k + 1 offsets

    def newest(self) -> tuple[np.ndarray, np.ndarray]:
        """Batch size and median busy seconds of each rank's newest segment (ranks with rows)."""
        last = self.first[1:] - 1
        return self.size[last], self.median[last]


def _starts(length: int, first: np.ndarray) -> np.ndarray:
    """Boolean mask of length ``length``, True at the first element of every group ``first``."""
    mask = np.zeros(length, dtype=bool)
    mask[first[:-1][first[:-1] < first[1:]]] = True
    return mask


def _segment_table(rows: _Rows) -> _Segments:
    """Cut every rank's rows into segments (see above) without a loop over ranks or segments.

    A run starts at a rank's first row and wherever the batch size changes. A run of L rows
    holds ceil(L / SEGMENT_STEPS) segments; counted from its newest, segment j ends
    j·SEGMENT_STEPS rows before the run's end, and the oldest one takes the remainder. Only the
    run boundaries need a pass over the rows; the segments follow by index arithmetic per run.
    """
    n, steps = len(rows.size), SEGMENT_STEPS
    run_start = _starts(n, rows.first)
    run_start[1:] |= rows.size[1:] != rows.size[:-1]
    run_begin = np.flatnonzero(run_start)
    run_end = np.append(run_begin[1:], n)
    pieces = -(-(run_end - run_begin) // steps)
    run_of_seg = np.repeat(np.arange(len(run_begin)), pieces)
    from_newest = np.cumsum(pieces)[run_of_seg] - 1 - np.arange(len(run_of_seg))
    end = run_end[run_of_seg] - steps * from_newest
    begin = np.maximum(run_begin[run_of_seg], end - steps)
    rank = np.searchsorted(rows.first, begin, side="right") - 1
    first = np.searchsorted(rank, np.arange(len(rows.first)))
    medians = _segment_medians(rows.padded_busy, begin, end - begin)
    return _Segments(rank, rows.size[begin], medians, (end - begin).astype(np.float64), first)


def _segment_medians(padded_values: np.ndarray, begin: np.ndarray,
                     length: np.ndarray) -> np.ndarray:
    """``np.median`` of every segment ``values[begin[i]:begin[i] + length[i]]`` in one sort.

    Segments hold at most SEGMENT_STEPS values, so they fit the rows of a (segments,
    SEGMENT_STEPS) matrix: the windows of SEGMENT_STEPS values starting at each segment (a
    sliding-window view of the values, indexed by the segment starts), with +inf past a short
    segment's end. Sorting each row puts a segment's values first, in order, and its median is
    the mean of the two middle ones (the same one twice if odd).
    """
    windows = sliding_window_view(padded_values, SEGMENT_STEPS)[begin]
    short = np.flatnonzero(length < SEGMENT_STEPS)
    windows[short] = np.where(np.arange(SEGMENT_STEPS) < length[short, None], windows[short],
                              np.inf)
    return _sorted_medians(windows, length)


def _sorted_medians(padded: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median of each row's ``count`` finite values, the rest of the row being +inf."""
    padded.sort(axis=1)
    rows = np.arange(len(padded))
    low = padded[rows, np.maximum(count - 1, 0) // 2]
    high = padded[rows, np.minimum(count // 2, padded.shape[1] - 1)]
    return (low + high) / 2


def _relative_errors(rows: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, the relative standard deviation of one step's busy time, and the relative
    standard error of the newest batch size's median busy time.

    Robust (MAD) over the newest 4·SEGMENT_STEPS rows at the newest batch size; 0 with fewer than
    three such rows. All ranks at once: their newest rows are gathered into a (k, 4·SEGMENT_STEPS)
    matrix, the other rows padded with +inf, and medians taken as in :func:`_sorted_medians`.
    """
    window = 4 * SEGMENT_STEPS
    end = rows.first[1:]
    index = end[:, None] - window + np.arange(window)  # the newest `window` rows of each rank
    inside = index >= rows.first[:-1, None]
    index = np.where(inside, index, end[:, None] - 1)
    newest_size = rows.size[end - 1]
    keep = inside & (rows.size[index] == newest_size[:, None])
    count = keep.sum(axis=1)
    busy = np.where(keep, rows.busy[index], np.inf)
    median = _sorted_medians(busy.copy(), count)
    deviation = np.where(keep, np.abs(busy - median[:, None]), np.inf)
    mad = _sorted_medians(deviation, count)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(count >= 3, 1.4826 * mad / median, 0.0)
    return spread, spread / np.sqrt(count)


@dataclass(frozen=True)
class _PrefixFits:
    """For each segment i of a scan: the line fitted to its rank's scanned segments up to i."""

    alpha: np.ndarray
    beta: np.ndarray
    #: True where two batch sizes or more were seen (else alpha and beta are meaningless).
    fitted: np.ndarray
    #: The pooled busy seconds of segment i's own batch size (its newest four segments).
    pooled: np.ndarray


@dataclass(frozen=True)
class _Runs:
    """The runs of one batch size among scanned segments (flat, grouped by rank, oldest first)."""

    of_segment: np.ndarray  # the run of each segment
    first: np.ndarray  # the first segment of each run
    last: np.ndarray  # the last segment of each run
    size: np.ndarray  # the batch size of each run
    #: The previous and the next run of the same rank and batch size (-1 / number of runs: none).
    previous_same: np.ndarray
    next_same: np.ndarray
    #: How many batch sizes other than its own each run's rank had in earlier runs.
    older_sizes: np.ndarray

    @classmethod
    def of(cls, rank: np.ndarray, size: np.ndarray) -> "_Runs":
        m = len(size)
        start = np.ones(m, dtype=bool)
        start[1:] = (rank[1:] != rank[:-1]) | (size[1:] != size[:-1])
        first = np.flatnonzero(start)
        count = len(first)
        run_rank, run_size = rank[first], size[first]
        # Sorting the runs by (rank, batch size, age) puts the runs of one size next to each
        # other, oldest first; neighbours in that order are a size's previous and next runs.
        order = np.lexsort((np.arange(count), run_size, run_rank))
        same = (run_rank[order[1:]] == run_rank[order[:-1]]) & \
            (run_size[order[1:]] == run_size[order[:-1]])
        previous_same, next_same = np.full(count, -1), np.full(count, count)
        previous_same[order[1:][same]] = order[:-1][same]
        next_same[order[:-1][same]] = order[1:][same]
        # Sizes seen up to each run = first appearances of a size so far in the rank.
        seen = np.cumsum(previous_same < 0)
        rank_first = np.searchsorted(run_rank, run_rank)
        seen_before_rank = np.where(rank_first > 0, seen[rank_first - 1], 0)
        older_sizes = seen - seen_before_rank - 1
        return cls(np.cumsum(start) - 1, first, np.append(first[1:], m) - 1, run_size,
                   previous_same, next_same, older_sizes)


def _pool_newest_four(runs: _Runs, median, count) -> tuple[np.ndarray, np.ndarray]:
    """Per segment: total count and count-weighted mean busy time of the newest four segments of
    its batch size (itself included) among its rank's segments up to it.

    A segment's previous segment of the same size is the one before it in its run, or for the
    first of a run the last of the previous run of that size (-1: none). Following that link
    three times gives the older segments to pool with it.
    """
    m = len(median)
    segment = np.arange(m)
    run = runs.of_segment
    previous_run = runs.previous_same[run]
    link = np.where(segment > runs.first[run], segment - 1,
                    np.where(previous_run >= 0, runs.last[previous_run], -1))
    one = link
    two = np.where(one >= 0, link[one], -1)
    three = np.where(two >= 0, link[two], -1)
    weighted = median * count
    total_tn, total_n = np.zeros(m), np.zeros(m)
    for older in (three, two, one):  # oldest first, the order np.average sums in
        total_tn += np.where(older >= 0, weighted[older], 0.0)
        total_n += np.where(older >= 0, count[older], 0.0)
    total_tn += weighted
    total_n += count
    return total_n, total_tn / total_n


def _prefix_fits(rank, size, median, count, spread, half_life: float) -> _PrefixFits:
    """The line fitted to every prefix of every rank's segments, with no loop over segments.

    The fit: segments are pooled by batch size (each size's newest four, count-weighted), and
    a weighted least squares of busy time on batch size weights a size by its steps times
    ``0.5 ** (recency / half_life)``, recency 0 for the newest size, 1 for the size before...:
    old plans fade, but a long stay at one plan does not erase what earlier plans taught
    about α. Where noise swamped the slope (an α < 0, or a slope not significantly above 0
    given the rank's relative step-to-step ``spread``: batch sizes too close together to tell
    α from β), busy time proportional to batch size instead. One batch size: no line
    (``fitted`` False).

    The trick: within a run of one batch size the older sizes, their pooled values and their
    recencies stay the same; only the run's own size (recency 0) changes from segment to
    segment. So the older sizes' weighted sums are computed once per run (see
    :func:`_older_sizes`), and each segment adds its own size's term. Sums are taken about the
    run's own size ``b0`` (whose term then drops out of the b-moments), which keeps them well
    conditioned.
    """
    runs = _Runs.of(rank, size)
    pooled_n, pooled_t = _pool_newest_four(runs, median, count)
    # What later runs see of a run's size: its pooled count and busy time at the run's end.
    end_n, end_t = pooled_n[runs.last], pooled_t[runs.last]
    run_size = runs.size

    # Each run's older sizes, summed about the run's own size b0 (np.bincount adds up the
    # pairs of each run).
    run, older, recency = _older_sizes(runs)
    w = end_n[older] * 0.5 ** (recency / half_life)
    d = run_size[older] - run_size[run]
    t = end_t[older]

    def per_run(values):
        return np.bincount(run, values, minlength=len(run_size))

    w_sum, d_sum, dd_sum = per_run(w), per_run(w * d), per_run(w * d * d)
    dt_sum, t_sum = per_run(w * d * t), per_run(w * t)
    q_sum = per_run(w * (t / run_size[older]))  # for the proportional fallback

    # Each segment: its own size's pooled term (weight = its count, recency 0) plus its run's.
    r = runs.of_segment
    w_total = pooled_n + w_sum[r]
    offset = d_sum[r] / w_total  # weighted mean batch size minus b0
    t_mean = (pooled_n * pooled_t + t_sum[r]) / w_total
    var = dd_sum[r] / w_total - offset ** 2
    fitted = (runs.older_sizes[r] > 0) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = (dt_sum[r] / w_total - offset * t_mean) / var
        alpha = t_mean - beta * (size + offset)
        proportional = (pooled_n * (pooled_t / size) + q_sum[r]) / w_total
    # Noise swamped the slope: busy time proportional to batch size instead. Medians of n steps
    # of relative spread s have a standard error of about _MEDIAN_SPREAD·s/sqrt(n), so the
    # slope's is at most _MEDIAN_SPREAD·s·t/sqrt(Σ w·(b − mean b)²) (weights count ≤ n steps).
    with np.errstate(divide="ignore", invalid="ignore"):
        slope_error = _MEDIAN_SPREAD * spread * t_mean / np.sqrt(w_total * var)
    flat = ~((beta > SLOPE_SIGNIFICANCE * slope_error) & (alpha >= 0))
    alpha = np.where(flat, 0.0, alpha)
    beta = np.where(flat, proportional, beta)
    return _PrefixFits(alpha, beta, fitted, pooled_t)


def _older_sizes(runs: _Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every run's older batch sizes as pairs (run, older run, recency), recency 1, 2, ...

    The older run of a size is the newest run of that size before ``run`` (not of ``run``'s own
    size). A walk back from all runs at once: at step ``back``, run ``r - back`` is such a run
    exactly when the next run of its size comes after ``r``, and it is one more recent than
    those met before. A run stops walking once it has met all its older sizes.
    """
    found_run, found_older, found_recency = [], [], []
    recency = np.zeros(len(runs.size), dtype=np.int64)
    walking, back = np.flatnonzero(runs.older_sizes > 0), 0
    while len(walking):
        back += 1
        older = walking - back
        newest = runs.next_same[older] > walking
        run = walking[newest]
        recency[run] += 1
        found_run.append(run)
        found_older.append(older[newest])
        found_recency.append(recency[run])
        walking = walking[recency[walking] < runs.older_sizes[walking]]
    if not found_run:
        return (np.zeros(0, dtype=np.int64),) * 3
    return np.concatenate(found_run), np.concatenate(found_older), np.concatenate(found_recency)


def _disagreements(segs: _Segments, fits: _PrefixFits, index: np.ndarray,
                   tolerance: float) -> np.ndarray:
    """Which scanned segments disagree with the prefix before them (a rank's first never does).

    With a fitted line, the prediction is the line at the segment's batch size. With one batch
    size so far, α is unknown: any busy time between the pooled one scaled by 1 (α = all of it)
    and by the ratio of batch sizes (α = 0) is consistent; the same batch size pins it exactly.
    """
    prev = np.maximum(np.arange(len(index)) - 1, 0)
    size, busy = segs.size[index], segs.median[index]
    ratio = size / size[prev]
    line = fits.alpha[prev] + fits.beta[prev] * size
    low = np.where(fits.fitted[prev], line, fits.pooled[prev] * np.minimum(1.0, ratio))
    high = np.where(fits.fitted[prev], line, fits.pooled[prev] * np.maximum(1.0, ratio))
    bad = np.maximum(low - busy, busy - high) > tolerance * busy
    bad[_starts(len(index), np.searchsorted(segs.rank[index],
                                            np.arange(len(segs.first))))] = False
    return bad


def _ranges(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(begin[i], end[i])`` over i."""
    length = end - begin
    offset = np.repeat(begin - np.cumsum(length) + length, length)
    return offset + np.arange(int(length.sum()))


def _scan(segs: _Segments, spread: np.ndarray, tolerance: float, half_life: float):
    """Find every rank's last cut and fit its line to the segments since.

    Pass 1 fits every prefix of every rank's segments and finds each rank's first segment that
    disagrees with the prefix before it: that is the rank's first cut. The ranks that have one
    go round again with their segments from the cut on, and so on, until no rank finds a new
    cut; most ranks finish in pass 1. Returns per rank: alpha, beta, fitted, and the α prior
    (NaN if none), that is the α of the newest line a cut broke.
    """
    k = len(segs.first) - 1
    alpha, beta = np.zeros(k), np.zeros(k)
    fitted = np.zeros(k, dtype=bool)
    prior = np.full(k, np.nan)
    start = segs.first[:-1].copy()
    ranks = np.arange(k)
    while len(ranks):
        index = _ranges(start[ranks], segs.first[ranks + 1])
        rank = segs.rank[index]
        fits = _prefix_fits(rank, segs.size[index], segs.median[index], segs.count[index],
                            spread[rank], half_life)
        bad = np.flatnonzero(_disagreements(segs, fits, index, tolerance))
        # Each rank's first disagreeing segment (ranks come in order, so np.unique's first).
        cut_ranks, first_bad = np.unique(segs.rank[index[bad]], return_index=True)
        cut_at = bad[first_bad]
        broke = fits.fitted[cut_at - 1]
        prior[cut_ranks[broke]] = fits.alpha[cut_at - 1][broke]
        start[cut_ranks] = index[cut_at]
        done = np.setdiff1d(ranks, cut_ranks, assume_unique=True)
        last = np.searchsorted(index, segs.first[done + 1] - 1)
        alpha[done], beta[done] = fits.alpha[last], fits.beta[last]
        fitted[done] = fits.fitted[last]
        ranks = cut_ranks
    return alpha, beta, fitted, prior


def fit_cost_model(history: tuple[np.ndarray, ...], options: Mapping[str, float] | None = None
                   ) -> CostModel | None:
    """Fit ``t_i(b) = α_i + β_i·b`` per rank; None until every rank has measurements.

    Robust to noise (segment medians), forgets a rank's measurements from before a change of
    speed (a throttling or newly shared GPU: the first segment that disagrees with the data
    before it starts a cut, and only data after the newest cut is fitted), and when a rank has
    only one batch size to go on (α unidentified) borrows α from the line its cut broke or the
    other ranks' fits.
    """
    if not history or any(len(h) == 0 for h in history):
        return None
    return _fit_affine(_Rows.stack(history), _options(options))[0]


def _fit_affine(rows: _Rows, opts: Mapping[str, float]
                ) -> tuple[CostModel, _Segments, np.ndarray, np.ndarray]:
    """:func:`fit_cost_model` of stacked rows (every rank has some), with the segment table
    and the relative errors it computed on the way (the curve fit reuses them)."""
    segs = _segment_table(rows)
    spread, noise = _relative_errors(rows)
    alpha, beta, fitted, prior = _scan(segs, spread, opts["drift_tolerance"],
                                       opts["half_life_segments"])
    pooled_alpha = float(np.median(alpha[fitted])) if fitted.any() else 0.0
    size, busy = segs.newest()
    borrowed = np.minimum(np.where(np.isnan(prior), pooled_alpha, prior), 0.5 * busy)
    alphas = np.where(fitted, alpha, borrowed)
    betas = np.maximum(np.where(fitted, beta, (busy - borrowed) / size), 1e-12)
    return CostModel(alphas, betas, noise), segs, spread, noise


def _throughputs(history: tuple[np.ndarray, ...]) -> np.ndarray:
    """Samples per busy second of each rank over its newest segment."""
    size, busy = _segment_table(_Rows.stack(history)).newest()
    return size / busy


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
    """Equal finish under ``t_i(b) = α_i + β_i·b``: ``b_i = (T − α_i)/β_i`` water-filled into bounds.

    The first ``shape_warmup_steps`` steps at each new batch size are left out of the fit: a
    one-off cost there (cudnn autotuning, a recompile) read as a fixed cost per step gave the
    slowest rank almost nothing (``[2, 38, 44, 44]`` where the optimum is ``[8, 32, 44, 44]``).
    """
    opts = _options(inp.options)
    if not inp.history or any(len(h) == 0 for h in inp.history):
        return _keep(inp, None, "waiting for measurements from every rank")
    rows = _drop_new_shape_steps(_Rows.stack(inp.history), int(opts["shape_warmup_steps"]))
    model = _fit_affine(rows, opts)[0]
    targets, finish = model.equal_finish(inp.min_sizes, inp.max_sizes, inp.global_batch_size)
    sizes = apportion(targets, inp.global_batch_size, inp.min_sizes, inp.max_sizes, inp.quantum)
    band = opts["band"]
    if model.noise is not None and len(model.noise):
        # The slowest of k noisy estimates overstates the current step by about
        # sqrt(2 ln k) standard errors: a gain smaller than that is noise, not imbalance.
        band += (1.0 + np.sqrt(2.0 * np.log(max(inp.world_size, 2)))) * float(model.noise.max())
    current_s, new_s = model.step_seconds(inp.current), model.step_seconds(sizes)
    if current_s <= new_s * (1.0 + band):
        return _keep(inp, model, f"within the {band:.1%} no-change band")
    return Decision(tuple(float(b) for b in sizes), model,
                    f"equal finish at {finish * 1e3:.1f} ms")


# --------------------------------------------------------------------------------------------
# The curve cost model.
#
# Real step times are not lines: a large GPU is flat up to the batch that fills it, time steps
# at tile multiples, and the first steps at a new shape pay one-off costs. The curve model keeps
# each rank's measured points (batch size, pooled median busy time) since its last change of
# speed, made monotone, and interpolates linearly between them. Outside the measured sizes it
# extrapolates only as far as the data supports:
#
# * below the smallest size, along the first piece when it has a clear slope (intercept >= 0),
#   flat when the points span a wide range at one time, else along the affine fit's line;
# * above the largest size, along the last piece when it has a clear slope, but only for one
#   bounded step (``explore_step`` of that size); beyond it, and wherever the top is flat or
#   unknown, at the pessimistic rate of busy time proportional to batch size (for a curve
#   ``max(c, α + β·b)`` with α >= 0 that is an upper bound).
#
# Exploration: where a rank's top is flat (the largest sizes measured at about one time, and
# clearly below busy time proportional to batch size: flat, not merely noisy), the model
# cannot tell whether more samples are free. If assuming them free for one bounded step
# predicts a plan faster than the believed optimum by more than the no-change band, that plan
# is tried, filled so that the other ranks run a band below the step (see _fill_tries). Its
# measurement then decides: a cheap step makes the next plan keep it (and explore
# further), a costly one gives the top a slope, so that region is never explored again and the
# fitted points steer away from it. Decisions see measurements a window or two late, so a plan
# that puts a rank above every size it was measured at is held until that size is measured.
# A rank's points are forgotten only when its speed changes (a segment that disagrees with the
# previous segment of the same batch size by more than ``drift_tolerance``, or a larger batch
# measured clearly faster than the batch before it).
#
# Payback: every batch size a rank never ran costs it one-off seconds (autotuning, a
# recompile), measured from the steps before its first clean step at each new size. A move
# (not a try: its measurement is the point) is taken only if its predicted gain per step
# repays, within ``payback_steps`` steps, the largest such cost among the ranks it gives a new
# size; else plans that flip between near-ties paid that cost again and again.


@dataclass(frozen=True)
class CurveModel:
    """Busy seconds per step of each rank as a monotone piecewise-linear curve.

    Rank i's knots are ``sizes[i, :counts[i]]`` (ascending) with busy seconds ``times[i, ...]``
    (non-decreasing); the rows are padded with +inf. Below the first knot the curve falls at
    ``low_slopes[i]`` (floored at 0), above the last it grows at ``high_slopes[i]``.
    """

    sizes: np.ndarray
    times: np.ndarray
    counts: np.ndarray
    low_slopes: np.ndarray
    high_slopes: np.ndarray
    #: Relative standard error of each rank's newest busy-time estimate (0 if unknown).
    noise: np.ndarray | None = None

    @functools.cached_property
    def _end_knots(self):
        rows = np.arange(len(self.counts))
        last = self.counts - 1
        return (self.sizes[:, 0], self.times[:, 0], self.sizes[rows, last],
                self.times[rows, last])

    @property
    def betas(self) -> np.ndarray:
        """Seconds per sample of each rank around its largest measured batch (for logs)."""
        return self.high_slopes

    @property
    def alphas(self) -> np.ndarray:
        """Intercept of the line of slope :attr:`betas` through the largest knot (for logs)."""
        _, _, s_hi, t_hi = self._end_knots
        return t_hi - self.high_slopes * s_hi

    def busy_seconds(self, batch_sizes, ranks=None) -> np.ndarray:
        """Busy seconds of every rank at ``batch_sizes``, or of the ranks ``ranks`` (an index
        array) at ``batch_sizes`` (one per rank given)."""
        b = np.asarray(batch_sizes, dtype=np.float64)
        rows = np.arange(len(b)) if ranks is None else np.asarray(ranks)
        counts = self.counts[rows]
        last = counts - 1
        sizes, times = self.sizes[rows], self.times[rows]
        local = np.arange(len(rows))
        s_lo, t_lo = sizes[:, 0], times[:, 0]
        s_hi, t_hi = sizes[local, last], times[local, last]
        j = np.clip((sizes <= b[:, None]).sum(axis=1) - 1, 0, np.maximum(counts - 2, 0))
        nxt = np.minimum(j + 1, last)
        s0, s1 = sizes[local, j], sizes[local, nxt]
        t0, t1 = times[local, j], times[local, nxt]
        with np.errstate(divide="ignore", invalid="ignore"):
            inside = np.where(s1 > s0, t0 + (t1 - t0) * (b - s0) / (s1 - s0), t0)
        below = np.maximum(t_lo - self.low_slopes[rows] * (s_lo - b), 0.0)
        above = t_hi + self.high_slopes[rows] * (b - s_hi)
        return np.where(b <= s_lo, below, np.where(b >= s_hi, above, inside))

    def step_seconds(self, batch_sizes) -> float:
        """A synchronous step lasts as long as its slowest rank."""
        return float(self.busy_seconds(batch_sizes).max())

    def largest_within(self, seconds: float) -> np.ndarray:
        """Per rank, the largest real batch size whose busy time is at most ``seconds``
        (-inf where even the smallest is slower, +inf where the curve never gets there)."""
        T = float(seconds)
        s_lo, t_lo, s_hi, t_hi = self._end_knots
        rows = np.arange(len(self.counts))
        j = np.minimum((self.times <= T).sum(axis=1) - 1, self.counts - 1)
        jj = np.maximum(j, 0)
        nxt = np.minimum(jj + 1, self.counts - 1)
        s0, s1 = self.sizes[rows, jj], self.sizes[rows, nxt]
        t0, t1 = self.times[rows, jj], self.times[rows, nxt]
        with np.errstate(divide="ignore", invalid="ignore"):
            inside = s0 + (T - t0) * (s1 - s0) / (t1 - t0)
            above = np.where(self.high_slopes > 0, s_hi + (T - t_hi) / self.high_slopes, np.inf)
            below = np.where(self.low_slopes > 0, s_lo - (t_lo - T) / self.low_slopes, -np.inf)
        below = np.where((T >= 0) & (self.low_slopes > 0), below, -np.inf)
        return np.where(j < 0, below, np.where(j >= self.counts - 1, above, inside))

    def equal_finish(self, lo, hi, total: float) -> tuple[np.ndarray, float]:
        """Real batch sizes summing to ``total`` within ``[lo, hi]`` that finish by the least
        common time T, and T (a search on T; flat pieces are filled to their right end)."""
        lo_, hi_ = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        if lo_.sum() > total + 1e-9 or hi_.sum() < total - 1e-9:
            raise PlanError(f"Cannot split {total} within bounds summing to "
                            f"[{lo_.sum()}, {hi_.sum()}]")

        def sizes_at(T):
            return np.clip(self.largest_within(T), lo_, hi_)

        low, high = 0.0, float(self.busy_seconds(hi_).max())
        sum_low, sum_high = sizes_at(low).sum(), total
        if sum_low >= total:
            high = low
        else:
            sum_high = sizes_at(high).sum()
        # Safeguarded false position: the sizes are piecewise linear in T, so interpolating
        # lands on (or next to) T in a few steps, where a bisection took ~50 at 4096 ranks.
        # Each guess is probed a hair either side so that the bracket closes on both sides; a
        # step that fails to halve the bracket (a jump at a flat piece) is followed by a halving.
        halve = False
        for _ in range(100):
            width = high - low
            # A relative 1e-9 of the step is far below one sample's worth of time.
            if width <= 1e-9 * max(high, 1e-9):
                break
            if halve or sum_high <= sum_low:
                probes = (0.5 * (low + high),)
            else:
                guess = low + width * (total - sum_low) / (sum_high - sum_low)
                hair = 2e-10 * max(high, 1e-9)
                probes = (max(guess - hair, low + 1e-3 * width),
                          min(guess + hair, high - 1e-3 * width))
            for T in probes:
                reached = sizes_at(T).sum()
                if reached >= total:
                    if T < high:
                        high, sum_high = T, reached
                elif T > low:
                    low, sum_low = T, reached
            halve = high - low > 0.5 * width
        b_low, b_high = sizes_at(low), sizes_at(high)
        gap = b_high.sum() - b_low.sum()
        share = 1.0 if gap <= 0 else (total - b_low.sum()) / gap
        targets = b_low + share * (b_high - b_low)
        return targets, high


@dataclass(frozen=True)
class _FirstRuns:
    """The runs of one batch size in stacked rows, and which is each (rank, size)'s first."""

    begin: np.ndarray  # first row of each run
    end: np.ndarray  # one past its last row
    rank: np.ndarray  # the rank of each run
    first: np.ndarray  # bool: the rank's first run at that size


def _first_runs(rows: _Rows) -> _FirstRuns:
    """Every run of one batch size, per rank, found without a loop over rows or ranks: the
    first run of each (rank, size) by sorting the runs (a rank's history holds a few runs and
    hundreds of rows)."""
    n = len(rows.size)
    run_start = _starts(n, rows.first)
    run_start[1:] |= rows.size[1:] != rows.size[:-1]
    begin = np.flatnonzero(run_start)
    end = np.append(begin[1:], n)
    run_rank = np.searchsorted(rows.first, begin, side="right") - 1
    run_size = rows.size[begin]
    order = np.lexsort((begin, run_size, run_rank))
    first_of_size = np.ones(len(begin), dtype=bool)
    first_of_size[1:] = (run_rank[order[1:]] != run_rank[order[:-1]]) | \
        (run_size[order[1:]] != run_size[order[:-1]])
    first = np.zeros(len(begin), dtype=bool)
    first[order[first_of_size]] = True
    return _FirstRuns(begin, end, run_rank, first)


def _drop_new_shape_steps(rows: _Rows, steps: int) -> _Rows:
    """The rows without each rank's first ``steps`` rows of the first run at each batch size
    (a rank left with no rows keeps them all)."""
    n = len(rows.size)
    if steps <= 0 or n == 0:
        return rows
    k = len(rows.first) - 1
    runs = _first_runs(rows)
    begin, end, run_rank = runs.begin, runs.end, runs.rank
    dropped = np.where(runs.first, np.minimum(end - begin, steps), 0)
    length = end - begin
    # A rank that would keep nothing keeps everything.
    kept = np.bincount(run_rank, length - dropped, minlength=k)
    dropped = np.where(kept[run_rank] > 0, dropped, 0)
    if not dropped.any():
        return rows
    keep = np.ones(n, dtype=bool)
    drop_index = _ranges(begin, begin + dropped)
    keep[drop_index] = False
    size, busy = rows.size[keep], rows.busy[keep]
    first = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(run_rank, length - dropped, minlength=k), out=first[1:])
    padded = np.concatenate([busy, np.full(SEGMENT_STEPS, np.inf)])
    return _Rows(size, busy, padded, first)


def _one_off_seconds(rows: _Rows, steps: int) -> np.ndarray:
    """Per rank, the one-off seconds a new batch size costs it, measured (0 where unknown).

    In each first run of a size with a clean step (one after its first ``steps``), the
    ``steps`` rows before the first clean one are compared with the median of the clean ones
    (SEGMENT_STEPS at most): their excess, plus once more the largest of it for the step at
    which the size changed (the rank does not measure that one, and a new shape pays first
    there). A rank's figure is the median over its first runs.
    """
    k = len(rows.first) - 1
    if steps <= 0 or len(rows.size) == 0:
        return np.zeros(k)
    runs = _first_runs(rows)
    usable = np.flatnonzero(runs.first & (runs.end - runs.begin > steps))
    if not len(usable):
        return np.zeros(k)
    begin, end, rank = runs.begin[usable], runs.end[usable], runs.rank[usable]
    clean_begin = begin + steps
    clean_length = np.minimum(end - clean_begin, SEGMENT_STEPS)
    clean = _segment_medians(rows.padded_busy, clean_begin, clean_length)
    warm = _ranges(begin, clean_begin)  # `steps` rows per run, in run order
    excess = np.maximum(rows.busy[warm] - np.repeat(clean, steps), 0.0).reshape(-1, steps)
    cost = excess.sum(axis=1) + excess.max(axis=1)
    # The median per rank: sorted by (rank, cost), the middle one(s) of each rank's group.
    order = np.lexsort((cost, rank))
    rank, cost = rank[order], cost[order]
    start = np.searchsorted(rank, np.arange(k))
    count = np.bincount(rank, minlength=k)
    low = start + np.maximum(count - 1, 0) // 2
    high = start + count // 2
    has = count > 0
    out = np.zeros(k)
    out[has] = 0.5 * (cost[np.minimum(low, len(cost) - 1)] +
                      cost[np.minimum(high, len(cost) - 1)])[has]
    return out


def _since_last_change(segs: _Segments, tolerance: float) -> np.ndarray:
    """Per rank, its first segment after its newest change of speed (see the section comment).
    """
    m = len(segs.rank)
    if m == 0:
        return segs.first[:-1].copy()
    runs = _Runs.of(segs.rank, segs.size)
    segment = np.arange(m)
    run = runs.of_segment
    previous_run = runs.previous_same[run]
    same = np.where(segment > runs.first[run], segment - 1,
                    np.where(previous_run >= 0, runs.last[previous_run], -1))
    median = segs.median
    bad = (same >= 0) & (np.abs(median - median[np.maximum(same, 0)]) > tolerance * median)
    prev = np.maximum(segment - 1, 0)
    same_rank = (segment > 0) & (segs.rank[prev] == segs.rank)
    grew = segs.size > segs.size[prev]
    shrank = segs.size < segs.size[prev]
    bad |= same_rank & grew & (median < (1.0 - tolerance) * median[prev])
    bad |= same_rank & shrank & (median > (1.0 + tolerance) * median[prev])
    start = segs.first[:-1].copy()
    idx = np.flatnonzero(bad)
    # The newest bad segment of each rank (np.maximum.at keeps the largest index).
    np.maximum.at(start, segs.rank[idx], idx)
    return start


def _monotone(times: np.ndarray) -> np.ndarray:
    """Rows made non-decreasing: the midpoint of the running maximum from the left and the
    running minimum from the right (exact on a row that already is; +inf padding stays)."""
    upper = np.maximum.accumulate(times, axis=1)
    lower = np.minimum.accumulate(times[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore"):
        mid = 0.5 * (upper + lower)
    return np.where(np.isinf(times), np.inf, mid)


@dataclass(frozen=True)
class _CurveFit:
    model: CurveModel
    #: Ranks whose largest measured sizes ran at about one time (the top is unidentified).
    flat_top: np.ndarray
    #: Seconds per sample the model assumes beyond its bounded optimistic step (pessimistic).
    far_slopes: np.ndarray
    #: Ranks whose batch size in force lies above every size they were measured at: a try
    #: (or a move) into unknown ground whose measurements have not arrived yet (all False
    #: when the fit was not given the plan in force).
    untried_current: np.ndarray


def _fit_curves(inp_history: tuple[np.ndarray, ...], opts: Mapping[str, float],
                current=None) -> _CurveFit | None:
    if not inp_history or any(len(h) == 0 for h in inp_history):
        return None
    rows = _drop_new_shape_steps(_Rows.stack(inp_history), int(opts["shape_warmup_steps"]))
    k = len(inp_history)
    untried_current = np.zeros(k, dtype=bool)
    if current is not None:
        # The newest rows' largest size per rank (np.maximum.reduceat over each rank's rows).
        largest = np.maximum.reduceat(rows.size, rows.first[:-1])
        untried_current = np.asarray(current, dtype=np.float64) > largest
    base, segs, spread, noise = _fit_affine(rows, opts)
    start = _since_last_change(segs, opts["drift_tolerance"])
    index = _ranges(start, segs.first[1:])
    rank, size = segs.rank[index], segs.size[index]
    runs = _Runs.of(rank, size)
    pooled_n, pooled_t = _pool_newest_four(runs, segs.median[index], segs.count[index])
    # The newest segment of each (rank, size) carries that size's pooled value; sort those by
    # (rank, size) to get each rank's knots in ascending order.
    newest = runs.last[np.flatnonzero(runs.next_same >= len(runs.size))]
    order = np.lexsort((size[newest], rank[newest]))
    knot = newest[order]
    k_rank, k_size, k_time, k_n = rank[knot], size[knot], pooled_t[knot], pooled_n[knot]
    k = len(inp_history)
    counts = np.bincount(k_rank, minlength=k)
    width = int(counts.max())
    col = np.arange(len(knot)) - np.searchsorted(k_rank, k_rank)
    sizes = np.full((k, width), np.inf)
    times = np.full((k, width), np.inf)
    steps = np.zeros((k, width))
    sizes[k_rank, col], times[k_rank, col], steps[k_rank, col] = k_size, k_time, k_n
    times = _monotone(times)
    rows_ = np.arange(k)
    last = counts - 1
    s_lo, t_lo = sizes[:, 0], times[:, 0]
    s_hi, t_hi = sizes[rows_, last], times[rows_, last]
    # Standard error of a knot's time: _MEDIAN_SPREAD·spread/sqrt(steps), relative.
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_se = _MEDIAN_SPREAD * spread[:, None] / np.sqrt(np.maximum(steps, 1.0))

    def piece(a, b):
        """Slope between knots a and b of each rank, and whether it is clearly positive."""
        ds = sizes[rows_, b] - sizes[rows_, a]
        dt = times[rows_, b] - times[rows_, a]
        se = (rel_se[rows_, a] + rel_se[rows_, b]) * times[rows_, b]
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(ds > 0, dt / ds, 0.0)
            # Clear: above the noise, and an elasticity of 0.1 or more (a few per cent of busy
            # time over a doubling is a flat curve with jitter, not a slope to extrapolate).
            clear = (ds > 0) & (dt > SLOPE_SIGNIFICANCE * se) & \
                (dt / times[rows_, b] >= 0.1 * ds / sizes[rows_, b])
        return slope, clear

    several = counts >= 2
    # The end slopes are taken over a span of at least SLOPE_SPAN where the knots allow (not
    # between two close knots, whose slope is mostly noise): from the largest knot to the
    # largest knot at least that much smaller (else the smallest), and from the smallest to
    # the smallest at least that much larger.
    finite = np.isfinite(sizes)
    below_top = (sizes * SLOPE_SPAN <= s_hi[:, None]) & finite
    top_ref = np.maximum(below_top.sum(axis=1) - 1, 0)
    has_top = below_top.any(axis=1)
    above_bottom = (sizes >= SLOPE_SPAN * s_lo[:, None]) & finite
    bottom_ref = np.argmax(above_bottom, axis=1)
    has_bottom = above_bottom.any(axis=1)
    first_slope, first_clear = piece(np.zeros(k, dtype=np.int64), bottom_ref)
    last_slope, last_clear = piece(top_ref, last)
    last_clear &= several
    proportional_hi = t_hi / s_hi
    proportional_lo = t_lo / s_lo
    # Below: the first span's slope when clear (intercept >= 0), flat when it is not, else
    # (the knots too close together, or one) the affine fit's slope.
    low = np.where(has_bottom & first_clear, np.minimum(first_slope, proportional_lo),
                   np.where(has_bottom, 0.0, np.minimum(base.betas, proportional_lo)))
    # Above: the last span's slope when clear (the affine fit's when the span is short), for
    # one bounded step, then the pessimistic proportional rate. A flat last span leaves the top
    # unidentified: pessimistic, and a candidate for exploration. One knot: the affine slope.
    # Flat, not merely noisy: the largest knot also runs clearly faster than busy time
    # proportional to batch size from the reference knot predicts. (Under heavy noise a
    # sloped top is often not clearly sloped; exploring it measured worse, again and again.)
    ref_size, ref_time = sizes[rows_, top_ref], times[rows_, top_ref]
    with np.errstate(divide="ignore", invalid="ignore"):
        below_proportional = ref_time * s_hi / ref_size - t_hi > SLOPE_SIGNIFICANCE * \
            (rel_se[rows_, top_ref] + rel_se[rows_, last]) * t_hi
    flat_top = several & ~last_clear & below_proportional
    near = np.where(last_clear, np.where(has_top, last_slope, np.maximum(base.betas, 0.0)),
                    np.where(several, proportional_hi, np.maximum(base.betas, 0.0)))
    far = np.maximum(near, proportional_hi)
    step = opts["explore_step"] * s_hi
    # The bounded optimistic step becomes one more knot (where it is more optimistic).
    extra = near < far
    width2 = width + 1
    sizes2 = np.full((k, width2), np.inf)
    times2 = np.full((k, width2), np.inf)
    sizes2[:, :width], times2[:, :width] = sizes, times
    sizes2[rows_[extra], counts[extra]] = s_hi[extra] + step[extra]
    times2[rows_[extra], counts[extra]] = t_hi[extra] + near[extra] * step[extra]
    counts2 = counts + extra
    high = np.where(extra, far, near)
    model = CurveModel(sizes2, times2, counts2, low, np.maximum(high, 1e-12), noise)
    return _CurveFit(model, flat_top, far, untried_current)


def fit_curve_model(history: tuple[np.ndarray, ...], options: Mapping[str, float] | None = None
                    ) -> CurveModel | None:
    """Fit a monotone piecewise-linear busy-time curve per rank; None until every rank has
    measurements (see the section comment for the extrapolation rules)."""
    fit = _fit_curves(history, _options(options))
    return None if fit is None else fit.model


def _explore_model(fit: _CurveFit, max_sizes, opts) -> CurveModel | None:
    """The fit, with each flat-topped rank assumed flat for one bounded step above its largest
    measured size (None if no rank can take one)."""
    m = fit.model
    k = len(m.counts)
    rows = np.arange(k)
    last = m.counts - 1
    s_hi, t_hi = m.sizes[rows, last], m.times[rows, last]
    hi = np.asarray(max_sizes, dtype=np.float64)
    ranks = np.flatnonzero(fit.flat_top & (s_hi < hi))
    if not len(ranks):
        return None
    step = np.minimum(opts["explore_step"] * s_hi, hi - s_hi)
    sizes = np.concatenate([m.sizes, np.full((k, 1), np.inf)], axis=1)
    times = np.concatenate([m.times, np.full((k, 1), np.inf)], axis=1)
    counts = m.counts.copy()
    sizes[ranks, counts[ranks]] = s_hi[ranks] + step[ranks]
    times[ranks, counts[ranks]] = t_hi[ranks]
    counts[ranks] += 1
    high = m.high_slopes.copy()
    high[ranks] = fit.far_slopes[ranks]
    return CurveModel(sizes, times, counts, m.low_slopes, high, m.noise)


def _band(inp: PolicyInput, noise) -> float:
    """The no-change band of the curve policy: ``band`` plus two standard errors of the
    difference of two busy-time estimates of a typical rank. Unlike the affine fit's band it
    does not add the overstatement of the slowest of k noisy estimates: the curve predicts the
    current and the new plan from the same measured points, so that overstatement is in both."""
    band = _options(inp.options)["band"]
    if noise is not None and len(noise):
        band += CURVE_BAND_SES * math.sqrt(2.0) * float(np.median(noise))
    return band


#: curve: the no-change band's noise term, in standard errors of a difference.
CURVE_BAND_SES = 2.0
#: Moves of one quantum tried by :func:`_refine` after rounding.
REFINE_MOVES = 16


def _refine(model: CurveModel, sizes, inp: PolicyInput) -> tuple[tuple[int, ...], float]:
    """Rounding to whole quanta can miss the best integer plan when curves step or the quantum
    is coarse: move one quantum at a time from the slowest rank to the rank that stays fastest
    with it, while that shortens the predicted step."""
    b = np.asarray(sizes, dtype=np.int64)
    q = inp.quantum
    lo, hi = np.asarray(inp.min_sizes), np.asarray(inp.max_sizes)
    busy = model.busy_seconds(b)
    # Each move changes two ranks: only their busy times (now and one quantum up) are redone.
    grown = np.where(b + q <= hi, model.busy_seconds(b + q), np.inf)
    for _ in range(REFINE_MOVES):
        slow = int(np.argmax(busy))
        if b[slow] - q < lo[slow]:
            break
        slow_grown, grown[slow] = grown[slow], np.inf
        to = int(np.argmin(grown))
        grown[slow] = slow_grown
        if to == slow or not np.isfinite(grown[to]):
            break  # no other rank can take a quantum more
        pair = np.array([slow, to])
        moved = b[pair] + np.array([-q, q])
        rest = busy.copy()
        rest[pair] = model.busy_seconds(moved, pair)
        if not rest.max() < busy[slow] * (1.0 - 1e-9):
            break
        b[pair], busy = moved, rest
        grown[pair] = np.where(moved + q <= hi[pair], model.busy_seconds(moved + q, pair),
                               np.inf)
    return tuple(int(x) for x in b), float(busy.max())


def _fill_tries(model: CurveModel, sizes, limits: np.ndarray, inp: PolicyInput,
                margin: float) -> tuple[int, ...]:
    """A try, filled: move one quantum at a time from the slowest rank that gets faster
    without it onto a tried rank (up to its ``limits``, where the try assumes it flat), while
    the predicted step does not grow and until every other rank runs ``margin`` (relative)
    faster than the step.

    The equal finish stops a try where the tried rank's assumed flat time (its measured one,
    noise included) meets the others': on near-ties that left a sloped rank just past its own
    knee (flat-deep: [16, 33, 47] measured 3 % slower than [16, 32, 48]). Curves are monotone,
    so the ranks that give samples away are no slower for it; only the tried ranks take a
    risk, and the try's measurement judges it. A margin of the no-change band: no more than
    noise can tell apart (filling tries to their limits tried past the knee of ``flat``).
    """
    b = np.asarray(sizes, dtype=np.int64)
    q = inp.quantum
    lo = np.asarray(inp.min_sizes)
    room = np.maximum(limits - b, 0.0)
    tried = room >= q
    busy = model.busy_seconds(b)
    top = float(busy.max())
    for _ in range(FILL_MOVES):
        to = int(np.argmax(room))
        if room[to] < q:
            break
        donor_busy = np.where(~tried & (b - q >= lo) & (busy > top * (1.0 - margin)), busy,
                              -np.inf)
        give = int(np.argmax(donor_busy))
        if not np.isfinite(donor_busy[give]):
            break
        shrunk = float(model.busy_seconds([b[give] - q], [give])[0])
        grown = float(model.busy_seconds([b[to] + q], [to])[0])
        if not shrunk < busy[give] * (1.0 - 1e-9) or grown > top * (1.0 + 1e-9):
            break
        b[give] -= q
        b[to] += q
        busy[give], busy[to] = shrunk, grown
        room[to] -= q
    return tuple(int(x) for x in b)


#: Quanta :func:`_fill_tries` moves at most.
FILL_MOVES = 64


def curve(inp: PolicyInput) -> Decision:
    """Equal finish under monotone piecewise-linear curves, exploring flat tops (see above)."""
    opts = _options(inp.options)
    fit = _fit_curves(inp.history, opts, inp.current)
    if fit is None:
        return _keep(inp, None, "waiting for measurements from every rank")
    # Decisions see measurements a window or two late (planning runs ahead of training). A
    # plan that put a rank above every size it was measured at (a try into unknown ground)
    # is kept until that size is measured: else the policy took the try back on the old data
    # and tried it again a window later (at a lag of 2 windows on the flat-deep cluster: 0.961
    # -> 0.988 of the oracle). Holding every plan with any unmeasured size held every small
    # move too, which at 4096 ranks (some rank always just moved) slowed convergence.
    untried = np.flatnonzero(fit.untried_current)
    if len(untried):
        return _keep(inp, fit.model, f"waiting for rank(s) {untried[:8].tolist()} to be "
                                     "measured above their largest measured size")
    model = fit.model
    B = inp.global_batch_size

    def best(m: CurveModel):
        targets, _ = m.equal_finish(inp.min_sizes, inp.max_sizes, B)
        sizes = apportion(targets, B, inp.min_sizes, inp.max_sizes, inp.quantum)
        return _refine(m, sizes, inp)

    sizes, new_s = best(model)
    band = _band(inp, model.noise)
    current_s = model.step_seconds(inp.current)
    reason = f"equal finish at {new_s * 1e3:.1f} ms"
    explore = _explore_model(fit, inp.max_sizes, opts)
    if explore is not None:
        trial, trial_s = best(explore)
        last = model.counts - 1
        s_hi = model.sizes[np.arange(len(last)), last]
        tried = np.asarray(trial) > s_hi
        limits = np.where(tried, explore.sizes[np.arange(len(last)), explore.counts - 1], 0.0)
        trial = _fill_tries(explore, trial, limits, inp, opts["band"])
        grows = np.asarray(trial) > s_hi
        # The plain band, without the noise term: a try costs one window at most, and its
        # measurement, not the prediction, decides whether it stays.
        if grows.any() and trial_s * (1.0 + opts["band"]) < min(new_s, current_s) and \
                tuple(trial) != tuple(inp.current):
            ranks = np.flatnonzero(grows).tolist()
            return Decision(tuple(float(b) for b in trial), model,
                            f"exploring rank(s) {ranks[:8]} above their measured sizes "
                            f"(if flat: {trial_s * 1e3:.1f} ms)")
    if current_s <= new_s * (1.0 + band):
        return _keep(inp, model, f"within the {band:.1%} no-change band")
    payback = int(opts["payback_steps"])
    if payback > 0:
        one_off_s = _new_shape_seconds(inp, sizes, int(opts["shape_warmup_steps"]))
        if (current_s - new_s) * payback < one_off_s:
            return _keep(inp, model, f"a gain of {(current_s - new_s) * 1e3:.2f} ms a step "
                                     f"does not repay the {one_off_s * 1e3:.0f} ms its new "
                                     f"batch sizes cost within {payback} steps")
    return Decision(tuple(float(b) for b in sizes), model, reason)


def _new_shape_seconds(inp: PolicyInput, sizes, warmup_steps: int) -> float:
    """The one-off seconds a move to ``sizes`` costs the job: the largest measured one-off
    cost (:func:`_one_off_seconds`) among the ranks it gives a batch size they never ran (they
    pay it in the same steps, so the job waits for the largest)."""
    rows = _Rows.stack(inp.history)
    k = len(rows.first) - 1
    row_rank = np.repeat(np.arange(k), np.diff(rows.first))
    new = np.asarray(sizes, dtype=np.float64)
    ran = np.bincount(row_rank, rows.size == new[row_rank], minlength=k) > 0
    fresh = ~ran & (new != np.asarray(inp.current, dtype=np.float64))
    if not fresh.any():
        return 0.0
    return float(_one_off_seconds(rows, warmup_steps)[fresh].max())


PolicyFn = Callable[[PolicyInput], Decision]

#: The policy registry: name -> pure function.
POLICIES: dict[str, PolicyFn] = {
    "equal": equal,
    "static": static,
    "proportional": proportional,
    "seed": seed,
    "affine": affine,
    "curve": curve,
}

#: Policies that need measurements, and therefore a coordinator.
ADAPTIVE_POLICIES = frozenset({"proportional", "seed", "affine", "curve"})


def check_policy(name: str) -> str:
    """``name`` if it is a registered policy, else a ConfigError naming it."""
    if name not in POLICIES:
        raise ConfigError(f"Invalid policy {name!r}, choose one of {sorted(POLICIES)}")
    return name


def decide(policy: str, inp: PolicyInput) -> tuple[tuple[int, ...], Decision]:
    """Run ``policy`` and apportion its weights into batch sizes that sum to B within bounds."""
    decision = POLICIES[check_policy(policy)](inp)
    sizes = apportion(decision.weights, inp.global_batch_size, inp.min_sizes, inp.max_sizes,
                      inp.quantum)
    return sizes, decision
