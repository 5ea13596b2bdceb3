"""Compute-only busy time: this rank's own computation, without the waits inside collectives.

Collectives inside the step keep ranks in lockstep: SyncBatchNorm all-reduces in every forward,
FSDP2 all-gathers each layer's parameters before its forward and reduce-scatters after its
backward, tensor parallelism exchanges activations. A fast rank then waits for the slow one
*inside* the step, its step-to-step busy time becomes the slow rank's, and a plan computed from
it never moves. :class:`ComputeClock` measures instead the forward of the model's *compute
leaves*: modules without children that hold parameters, or that mark themselves with
``shardbalance_compute = True`` (the emulator's :class:`~shardbalance.emulate.EmulatedSpeed`
does), SyncBatchNorm excepted (its forward is mostly its all-reduce). Its hooks are registered
after FSDP2's own, so the wait for an all-gather (in FSDP2's pre-forward hook) falls outside
the measured span.

Only the forward is timed: backward costs are taken as proportional to forward costs on every
rank (the same model runs everywhere), so the split the policy computes is unchanged; the
absolute figures the coordinator reports are forward time. CPU: ``time.perf_counter``. CUDA:
events on the current stream, read later without waiting (a stream wait FSDP2 inserts for an
all-gather is enqueued before the start event).
"""

from __future__ import annotations

import collections
import time
from typing import Any

import torch

__all__ = ["BusyClock", "ComputeClock", "lockstep_cause"]


def _is_compute_leaf(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.SyncBatchNorm):
        return False
    if getattr(module, "shardbalance_compute", False):
        return True
    return next(module.children(), None) is None and \
        next(module.parameters(recurse=False), None) is not None


def lockstep_cause(model: torch.nn.Module) -> str | None:
    """What in ``model`` keeps ranks in lockstep inside a step (None: nothing known)."""
    from . import _torch_compat as compat

    fsdp = compat.fsdp_module_type()
    for module in model.modules():
        if isinstance(module, torch.nn.SyncBatchNorm):
            return "SyncBatchNorm (an all-reduce in every forward)"
        if fsdp is not None and isinstance(module, fsdp):
            return "FSDP2 (per-layer all-gathers and reduce-scatters)"
    return None


class BusyClock:
    """Time marks turned into seconds later, without waiting: the step clock of
    ``_weighting.py`` (last bucket ready → all-reduce done) and the base of
    :class:`ComputeClock` (spans of many leaf forwards per measurement).

    CPU: ``time.perf_counter``. CUDA: events recorded on the current stream, resolved later
    with ``Event.query()`` so the training loop never waits for the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: collections.deque = collections.deque()

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def measure(self, start: Any, end: Any, payload: Any) -> None:
        """One span from ``start`` to ``end``."""
        self.measure_spans(payload, [(start, end)])

    def measure_spans(self, payload: Any, spans: list[tuple[Any, Any]]) -> None:
        """The summed length of ``spans``."""
        self._pending.append((payload, spans))

    def ready(self) -> list[tuple[Any, float]]:
        """``(payload, seconds)`` for every measurement whose marks are resolved."""
        out = []
        while self._pending:
            payload, spans = self._pending[0]
            if self.cuda:
                if spans and not spans[-1][1].query():
                    break
                seconds = sum(s.elapsed_time(e) for s, e in spans) / 1e3
            else:
                seconds = sum(e - s for s, e in spans)
            self._pending.popleft()
            if seconds > 0:
                out.append((payload, seconds))
        return out


class ComputeClock(BusyClock):
    """Times the forward of ``model``'s compute leaves; one record per training forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__(device)
        self.leaves = [m for m in model.modules() if _is_compute_leaf(m)]
        self._open: dict[int, Any] = {}
        self._spans: list[tuple[Any, Any]] = []
        self._handles = []
        for leaf in self.leaves:
            self._handles.append(leaf.register_forward_pre_hook(self._start))
            self._handles.append(leaf.register_forward_hook(self._stop))

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._open[id(module)] = self.now()

    def _stop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        start = self._open.pop(id(module), None)
        if start is not None:
            self._spans.append((start, self.now()))

    def take(self) -> list[tuple[Any, Any]]:
        """The spans timed since the last call (the forward that just ended)."""
        spans, self._spans = self._spans, []
        self._open.clear()
        return spans

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
