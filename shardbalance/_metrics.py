"""``sampler.metrics()``: the plan in force and what the coordinator measured with it, as one
flat dict of numbers that any tracker logs as it is (TensorBoard, W&B, Lightning's ``log_dict``).

Built only from the plan all ranks agreed on and the :class:`~shardbalance.protocol.PlanStats`
the coordinator sent with it (fixed at the decision, the same reply for every rank), so the
dict is the same on every rank and a tracker that logs from rank 0 alone still sees all ranks.
Cached per plan: calling it every step costs a dict copy.
"""

from __future__ import annotations

import functools

from .plan import Plan
from .protocol import PlanStats

__all__ = ["plan_metrics"]


def plan_metrics(plan: Plan, stats: PlanStats | None = None) -> dict[str, float]:
    """The metrics of ``plan``, with the coordinator's ``stats`` when it sent some.

    Keys (a figure that is not known is left out, never logged as a placeholder):
        ``generation``, ``epoch``, ``window``: which plan (``window``: its first step).
        ``global_batch_size``; ``batch_size/rank{i}``: the plan's ``b_i``.
        ``predicted_step_ms``: the fitted model's step time for this plan.
        ``equal_step_ms``: the same model's step time for the equal split;
        ``speedup_vs_equal``: their ratio.
        ``imbalance``: slowest busy time over the mean when the plan was decided (1.0: balanced).
        ``busy_ms/rank{i}``: rank i's median busy ms per step when the plan was decided,
        measured at ``busy_batch_size/rank{i}`` samples; ``samples_per_s/rank{i}``: the two
        together.
    """
    return dict(_cached(plan, stats))


@functools.lru_cache(maxsize=8)
def _cached(plan: Plan, stats: PlanStats | None) -> dict[str, float]:
    out: dict[str, float] = {"generation": plan.generation, "epoch": plan.epoch,
                             "window": plan.window, "global_batch_size": plan.global_batch_size}
    for rank, b in enumerate(plan.batch_sizes):
        out[f"batch_size/rank{rank}"] = b
    predicted_ms = None
    if plan.predicted_step_s is not None:
        predicted_ms = plan.predicted_step_s * 1e3
        out["predicted_step_ms"] = round(predicted_ms, 3)
    if stats is None:
        return out
    if stats.equal_step_ms is not None:
        out["equal_step_ms"] = stats.equal_step_ms
        if predicted_ms:
            out["speedup_vs_equal"] = round(stats.equal_step_ms / predicted_ms, 4)
    if stats.imbalance is not None:
        out["imbalance"] = stats.imbalance
    for rank, busy in enumerate(stats.busy_ms or ()):
        if busy is not None:
            out[f"busy_ms/rank{rank}"] = busy
    for rank, b in enumerate(stats.busy_batch_sizes or ()):
        if b is not None:
            out[f"busy_batch_size/rank{rank}"] = b
            busy = stats.busy_ms[rank] if stats.busy_ms else None
            if busy:
                out[f"samples_per_s/rank{rank}"] = round(b / busy * 1e3, 2)
    return out
