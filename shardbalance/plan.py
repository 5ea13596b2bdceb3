"""Plans and apportionment: how a global batch is split into per-rank batch sizes.

A :class:`Plan` is the immutable record every rank trains on for a window of steps. Its digest
is what ranks compare before adopting it. :func:`apportion` turns real-valued weights into
integer batch sizes that sum exactly to the global batch, respect per-rank bounds and (when
asked) a quantum; :func:`water_fill` is the continuous version used by the policies.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ._exceptions import ConfigError, PlanError

__all__ = ["Plan", "apportion", "water_fill", "initial_plan", "equal_plan", "static_plan",
           "normalize_bounds", "memory_cap"]


@dataclass(frozen=True)
class Plan:
    """The batch sizes all ranks use from step ``window`` of ``epoch`` on.

    Args:
        run_id: the training run this plan belongs to ("local" for plans made without a coordinator).
        generation: the elastic restart generation (``TORCHELASTIC_RESTART_COUNT``).
        epoch: the epoch the plan applies to.
        window: the first step (within the epoch) the plan applies to.
        batch_sizes: samples per step for each rank; sums to ``global_batch_size``.
        global_batch_size: B, samples per optimizer step over all ranks.
        policy: the policy that decided it.
        predicted_step_s: the coordinator's predicted step time for this plan, if it had a model.
    """

    run_id: str
    generation: int
    epoch: int
    window: int
    batch_sizes: tuple[int, ...]
    global_batch_size: int
    policy: str
    predicted_step_s: float | None = None
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        sizes = tuple(int(b) for b in self.batch_sizes)
        object.__setattr__(self, "batch_sizes", sizes)
        if sum(sizes) != self.global_batch_size or min(sizes, default=0) < 0:
            raise PlanError(
                f"Invalid plan {list(sizes)}: batch sizes must be non-negative and sum to "
                f"global_batch_size={self.global_batch_size}"
            )
        identity = [self.run_id, self.generation, self.epoch, self.window, list(sizes),
                    self.global_batch_size, self.policy]
        digest = hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()
        object.__setattr__(self, "digest", digest[:16])

    @property
    def digest_int(self) -> int:
        """The digest as a non-negative int64, for comparing plans with one all-reduce."""
        return int(self.digest[:15], 16) + 1

    @property
    def world_size(self) -> int:
        return len(self.batch_sizes)

    def offset(self, rank: int) -> int:
        """First position of ``rank``'s slice within each global batch."""
        return sum(self.batch_sizes[:rank])

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id, "generation": self.generation, "epoch": self.epoch,
            "window": self.window, "batch_sizes": list(self.batch_sizes),
            "global_batch_size": self.global_batch_size, "policy": self.policy,
            "predicted_step_s": self.predicted_step_s, "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Rebuild a plan from :meth:`to_dict` output, checking the digest survived the trip."""
        try:
            plan = cls(
                run_id=str(data["run_id"]), generation=int(data["generation"]),
                epoch=int(data["epoch"]), window=int(data["window"]),
                batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
                global_batch_size=int(data["global_batch_size"]), policy=str(data["policy"]),
                predicted_step_s=(None if data.get("predicted_step_s") is None
                                  else float(data["predicted_step_s"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"Malformed plan record {data!r}: {exc}") from exc
        if "digest" in data and data["digest"] != plan.digest:
            raise PlanError(f"Plan digest mismatch: got {data['digest']!r}, computed {plan.digest!r}")
        return plan

    def moved_to(self, epoch: int, window: int) -> "Plan":
        """The same batch sizes, re-issued for another window (used when a new plan is refused)."""
        return Plan(self.run_id, self.generation, epoch, window, self.batch_sizes,
                    self.global_batch_size, self.policy, self.predicted_step_s)


def _per_rank(value, world_size: int, name: str, default: int) -> list[int]:
    if value is None:
        return [default] * world_size
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)] * world_size
    values = list(value)
    if len(values) != world_size:
        raise ConfigError(f"{name} has {len(values)} entries, expected one per rank ({world_size})")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{name} entries must be integers, got {v!r}")
    return [int(v) for v in values]


def normalize_bounds(world_size: int, global_batch_size: int, min_batch_size=1,
                     max_batch_size=None, quantum: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-rank ``(min_sizes, max_sizes)`` rounded to the quantum, checked for feasibility.

    Raises ConfigError naming the bad value when no split of ``global_batch_size`` fits.
    """
    if isinstance(quantum, bool) or not isinstance(quantum, (int, np.integer)) or quantum < 1:
        raise ConfigError(f"Invalid batch_size_multiple {quantum!r}, it should be an integer >= 1")
    if global_batch_size % quantum:
        raise ConfigError(f"global_batch_size={global_batch_size} is not a multiple of "
                          f"batch_size_multiple={quantum}")
    mins = _per_rank(min_batch_size, world_size, "min_batch_size", 1)
    maxs = _per_rank(max_batch_size, world_size, "max_batch_size", global_batch_size)
    lo, hi = [], []
    for rank, (mn, mx) in enumerate(zip(mins, maxs)):
        if mn < 1:
            raise ConfigError(f"Invalid min_batch_size {mn} for rank {rank}: every rank needs at "
                              "least one sample per step (DDP needs a gradient from each rank)")
        if mx < mn:
            raise ConfigError(f"Invalid max_batch_size {mx} for rank {rank}: it is below "
                              f"min_batch_size {mn}")
        l, h = -(-mn // quantum) * quantum, min(mx, global_batch_size) // quantum * quantum
        if h < l:
            raise ConfigError(f"Rank {rank} has no multiple of batch_size_multiple={quantum} in "
                              f"[{mn}, {mx}]")
        lo.append(l)
        hi.append(h)
    if sum(lo) > global_batch_size:
        raise ConfigError(f"global_batch_size={global_batch_size} is smaller than the sum of the "
                          f"per-rank minimums {sum(lo)} ({world_size} ranks x min_batch_size)")
    if sum(hi) < global_batch_size:
        raise ConfigError(f"global_batch_size={global_batch_size} is larger than the sum of the "
                          f"per-rank maximums {sum(hi)}; raise max_batch_size")
    return tuple(lo), tuple(hi)


def memory_cap(sizes: Sequence[int], peak_bytes: Sequence[float], budget_bytes: float,
               global_batch_size: int) -> int:
    """Largest batch whose peak memory fits ``budget_bytes``, from peaks measured at two sizes.

    Peak memory is modelled as ``fixed + per_sample·b`` through the two measurements. Memory
    that does not grow with the batch (``per_sample <= 0``, e.g. allocator rounding) gives no
    cap (``global_batch_size``); a budget below the fixed cost gives 0.
    """
    try:
        (b0, b1), (p0, p1) = (int(b) for b in sizes), (float(p) for p in peak_bytes)
        budget_bytes = float(budget_bytes)
    except (TypeError, ValueError):
        raise ConfigError(f"Invalid memory figures: sizes {sizes!r}, peaks {peak_bytes!r}, "
                          f"budget {budget_bytes!r}: expected two sizes, two peaks in bytes "
                          "and a budget in bytes") from None
    if not 1 <= b0 < b1:
        raise ConfigError(f"Invalid probe sizes {tuple(sizes)}: need two sizes 1 <= a < b")
    for name, value in ((f"peak memory at batch {b0}", p0), (f"peak memory at batch {b1}", p1),
                        ("memory budget", budget_bytes)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"Invalid {name}: {value!r} bytes, it should be finite and >= 0")
    per_sample = (p1 - p0) / (b1 - b0)
    if per_sample <= 0:
        return int(global_batch_size)
    fixed = p1 - per_sample * b1
    cap = math.floor((budget_bytes - fixed) / per_sample)
    return int(min(max(cap, 0), global_batch_size))


def water_fill(slopes: Sequence[float], intercepts: Sequence[float], lo: Sequence[float],
               hi: Sequence[float], total: float) -> tuple[np.ndarray, float]:
    """Solve ``Σ clamp(slope_i·level + intercept_i, lo_i, hi_i) = total`` for the level.

    Each rank's share is linear in a common level (a weight times a scale, or the time at which
    an affine cost model finishes); ranks that hit a bound are held there and the rest share
    what is left. Exact (piecewise-linear), O(k log k). Returns ``(shares, level)``.
    """
    a = np.asarray(slopes, dtype=np.float64)
    c = np.asarray(intercepts, dtype=np.float64)
    lo_ = np.asarray(lo, dtype=np.float64)
    hi_ = np.asarray(hi, dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(c)) and np.all(a >= 0)):
        raise PlanError(f"water_fill needs finite non-negative slopes, got {a.tolist()}")
    live = a > 0
    # A rank with slope 0 is pinned at its clamped intercept whatever the level.
    pinned = np.clip(c, lo_, hi_)
    floor_sum = np.where(live, lo_, pinned).sum()
    ceil_sum = np.where(live, hi_, pinned).sum()
    if floor_sum > total + 1e-9 or ceil_sum < total - 1e-9:
        raise PlanError(f"Cannot split {total} within bounds summing to [{floor_sum}, {ceil_sum}]")

    def shares(level: float) -> np.ndarray:
        return np.clip(a * level + c, lo_, hi_)

    if not live.any():
        return pinned, 0.0
    breaks = np.unique(np.concatenate([(lo_[live] - c[live]) / a[live],
                                       (hi_[live] - c[live]) / a[live]]))
    # S(level) is non-decreasing and piecewise linear with kinks only at `breaks`.
    lo_i, hi_i = 0, len(breaks) - 1
    if shares(breaks[0]).sum() >= total:
        level = breaks[0]
        return shares(level), float(level)
    if shares(breaks[-1]).sum() <= total:
        level = breaks[-1]
        return shares(level), float(level)
    while hi_i - lo_i > 1:
        mid = (lo_i + hi_i) // 2
        sums = shares(breaks[mid]).sum()
        if sums < total:
            lo_i = mid
        else:
            hi_i = mid
    left, right = breaks[lo_i], breaks[hi_i]
    probe = a * (0.5 * (left + right)) + c
    free = live & (probe > lo_) & (probe < hi_)
    fixed = np.where(probe <= lo_, lo_, hi_)
    fixed_sum = fixed[~free].sum()
    slope = a[free].sum()
    level = left if slope == 0 else (total - fixed_sum - c[free].sum()) / slope
    level = min(max(level, left), right)
    return shares(level), float(level)


def apportion(weights: Sequence[float], total: int, min_sizes: Sequence[int],
              max_sizes: Sequence[int], quantum: int = 1) -> tuple[int, ...]:
    """Integers proportional to ``weights`` that sum exactly to ``total``.

    Each result lies in ``[min_sizes[i], max_sizes[i]]`` and is a multiple of ``quantum``
    (bounds must already be multiples, see :func:`normalize_bounds`). Shares are water-filled
    into the bounds, floored, and the remainder goes to the largest fractional parts, ties to
    the lower rank, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    k = len(w)
    if k == 0 or len(min_sizes) != k or len(max_sizes) != k:
        raise PlanError(f"apportion needs one weight and one bound per rank, got {k} weights, "
                        f"{len(min_sizes)} minimums, {len(max_sizes)} maximums")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise PlanError(f"Weights must be finite, non-negative and not all zero, got {w.tolist()}")
    if total % quantum:
        raise PlanError(f"total={total} is not a multiple of quantum={quantum}")
    if _whole_split(w, total, min_sizes, max_sizes, quantum):
        # Weights that already are such integers (a policy keeping or moving to a plan of
        # batch sizes): proportional to themselves, so they are the answer (the path below
        # returns them too, at the cost of a water fill).
        return tuple(int(x) for x in weights)
    lo = np.asarray(min_sizes, dtype=np.int64) // quantum
    hi = np.asarray(max_sizes, dtype=np.int64) // quantum
    units = total // quantum
    share = w / w.sum()
    # A zero weight still takes what capped ranks cannot (the total must be met), and less
    # than any positive weight (so the split stays monotone in the weights).
    share[share == 0] = share[share > 0].min() * 1e-6
    shares, _ = water_fill(share, np.zeros(k), lo, hi, units)
    base = np.clip(np.floor(shares + 1e-9).astype(np.int64), lo, hi)
    frac = shares - base
    remainder = int(units - base.sum())
    # Stable sort on -frac keeps ties in rank order.
    order = np.argsort(-frac, kind="stable")
    while remainder > 0:
        moved = False
        for i in order:
            if remainder == 0:
                break
            if base[i] < hi[i]:
                base[i] += 1
                remainder -= 1
                moved = True
        if not moved:
            raise PlanError(f"Cannot apportion {total}: every rank is at its maximum")
    while remainder < 0:
        moved = False
        for i in order[::-1]:
            if remainder == 0:
                break
            if base[i] > lo[i]:
                base[i] -= 1
                remainder += 1
                moved = True
        if not moved:
            raise PlanError(f"Cannot apportion {total}: every rank is at its minimum")
    return tuple(int(b) * quantum for b in base)


def _whole_split(weights, total: int, min_sizes, max_sizes, quantum: int) -> bool:
    """Whether ``weights`` are positive whole multiples of ``quantum`` within the bounds that
    sum to ``total`` (whole numbers below 2**53 add up exactly in float64)."""
    w = np.asarray(weights, dtype=np.float64)
    return bool(np.all(w > 0) and np.all(w == np.floor(w)) and np.all(w % quantum == 0)
                and np.all(w >= np.asarray(min_sizes)) and np.all(w <= np.asarray(max_sizes))
                and w.sum() == total)


def initial_plan(config, run_id: str = "local", generation: int = 0, epoch: int = 0,
                 window: int = 0) -> Plan:
    """A run's first plan: its ``initial_weights`` (equal if None) within its bounds.

    The one place that builds it, for the sampler (local plans, the plan before any
    coordinator answered) and the coordinator alike. ``config`` is a ``protocol.RunConfig``
    (or anything with its fields).
    """
    weights = config.initial_weights or (1.0,) * config.world_size
    sizes = apportion(weights, config.global_batch_size, config.min_sizes, config.max_sizes,
                      config.quantum)
    return Plan(run_id, generation, epoch, window, sizes, config.global_batch_size, config.policy)


def equal_plan(world_size: int, global_batch_size: int, min_sizes, max_sizes, quantum: int = 1,
               epoch: int = 0, window: int = 0) -> Plan:
    """The DistributedSampler split: equal shares, the remainder to the lowest ranks."""
    sizes = apportion([1.0] * world_size, global_batch_size, min_sizes, max_sizes, quantum)
    return Plan("local", 0, epoch, window, sizes, global_batch_size, "equal")


def static_plan(weights: Sequence[float], global_batch_size: int, min_sizes, max_sizes,
                quantum: int = 1, epoch: int = 0, window: int = 0) -> Plan:
    """Fixed user weights (weighted round robin), computed locally with exact arithmetic."""
    sizes = apportion(weights, global_batch_size, min_sizes, max_sizes, quantum)
    return Plan("local", 0, epoch, window, sizes, global_batch_size, "static")


def check_weights(weights, world_size: int, name: str = "initial_weights") -> tuple[float, ...]:
    """Validate user weights: one finite positive number per rank."""
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a sequence of numbers, got {weights!r}") from exc
    if len(values) != world_size:
        raise ConfigError(f"{name} has {len(values)} entries, expected one per rank ({world_size})")
    for rank, w in enumerate(values):
        if not math.isfinite(w) or w <= 0:
            raise ConfigError(f"Invalid {name}[{rank}] = {w!r}: weights must be finite and > 0")
    return tuple(values)
