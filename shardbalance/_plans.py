"""Where a window's plan comes from, and the ranks' agreement on it.

:class:`LocalPlans` (``equal``, ``static``) computes every plan locally from the settings;
:class:`CoordinatedPlans` (the adaptive policies) asks the coordinator and adopts a plan only if
every rank holds it. Both run the agreement payload at the windows the sampler asks them to
check (the settings digest, the epoch and resume position): ranks that would otherwise train
overlapping or missing slices are refused together, on every rank.

Tests inject plans by replacing :attr:`CoordinatedPlans.fetch`.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Mapping

import numpy as np

from . import protocol
from ._exceptions import ConfigError, CoordinatorError, CoordinatorUnavailable, PlanError
from ._peers import PeerGroup
from ._session import CoordinatorSession
from ._settings import SamplerSettings
from .plan import Plan

__all__ = ["LocalPlans", "CoordinatedPlans"]

#: What a disagreeing check means, by payload name.
_CHECKS = {
    "settings": "the ranks built their samplers with different settings (dataset length, "
                "global_batch_size, seed, shuffle, drop_last, policy, bounds, "
                "batch_size_multiple, initial_weights, rebalance_every, accumulation_steps or "
                "options); every rank must pass the same values",
    "epoch": "the ranks iterate different epochs: call set_epoch(epoch) on every rank",
    "position": "the ranks resume at different positions: call load_state_dict() with the same "
                "state on every rank before iterating",
    "background": "some ranks have a training signal (attach() or report_busy()) and others "
                  "not: attach the model (or report busy time) on every rank alike",
}


class LocalPlans:
    """Plans computed locally: the first plan of the settings, re-issued for every window."""

    def __init__(self, settings: SamplerSettings, peers: PeerGroup, run_id: str,
                 generation: int) -> None:
        self.peers = peers
        self.run_id = run_id
        self.generation = generation
        #: The newest plan every rank holds.
        self.agreed: Plan = settings.first_plan(run_id, generation)

    def restart(self, settings: SamplerSettings) -> None:
        """New settings (after ``probe()``): a new first plan."""
        self.agreed = settings.first_plan(self.run_id, self.generation)

    def plan_for(self, epoch: int, window: int, checks: Mapping[str, int]) -> Plan:
        """The plan of ``(epoch, window)``; ``checks`` are agreed on first (none: no collective)."""
        if checks:
            self.agree(checks)
        return self.agreed.moved_to(epoch, window)

    def agree(self, checks: Mapping[str, int], plan: Plan | None = None) -> bool:
        """One all-reduce of ``checks`` and the plan's digest: raises ConfigError on every rank
        if a check differs; True iff every rank holds ``plan``."""
        agreed = self.peers.agree({**checks, "plan": 0 if plan is None else plan.digest_int})
        for name, same in agreed.items():
            if not same and name in _CHECKS:
                raise ConfigError(_CHECKS[name])
        return plan is not None and agreed["plan"]


class CoordinatedPlans(LocalPlans):
    """Plans decided by the coordinator, adopted only when every rank holds the same one."""

    def __init__(self, settings: SamplerSettings, peers: PeerGroup, session: CoordinatorSession,
                 rank: int, generation: int, timeout_s: float) -> None:
        super().__init__(settings, peers, session.run_id, generation)
        self.settings = settings
        self.session = session
        self.rank = rank
        self.timeout_s = timeout_s
        #: ``fetch(epoch, window) -> Plan``: one request to the coordinator (tests wrap it).
        self.fetch: Callable[[int, int], Plan] = self._request
        #: ``[rank, epoch, step, batch_size, busy_s]`` records the next request carries (the
        #: background planner's leader sets them: every rank's new measurements).
        self.outgoing: list[list] = []
        #: ``records`` messages sent ahead of plan requests (tests and benchmarks read it).
        self.record_messages = 0
        #: Of ``outgoing``, what the last request could not deliver (kept for the next).
        self.undelivered: list[list] | RecordRows = []
        #: Of ``outgoing``, how many leading records the last request's ``records`` messages
        #: delivered (acknowledged) before it failed, if it did: not to be sent again.
        self.delivered = 0

    def restart(self, settings: SamplerSettings) -> None:
        super().restart(settings)
        self.settings = settings

    def _request(self, epoch: int, window: int) -> Plan:
        extra = {}
        if self.outgoing:
            # The newest records ride with the plan request; older ones beyond what it may
            # carry go first, in ``records`` messages (the planner keeps at most 16 requests'
            # worth: _planner.RECORD_MESSAGES).
            cap = protocol.MAX_RECORDS_PER_PLAN
            head, tail = self.outgoing[:-cap], self.outgoing[-cap:]
            world = self.settings.run_config().world_size
            self.delivered = 0
            # The other ranks wait in the plan's broadcast meanwhile: the records messages get
            # half of one request's time in all, so a coordinator answering each one slowly
            # cannot stretch a round towards the peer timeout (the rest go next round).
            deadline = time.monotonic() + self.timeout_s / 2
            for begin in range(0, len(head), cap):
                if begin and time.monotonic() > deadline:
                    self.undelivered = head[begin:]
                    break
                try:
                    self.session.client.records(
                        run=self.run_id, generation=self.generation, rank=self.rank,
                        world_size=world, record_columns=_columns(head[begin:begin + cap]))
                except CoordinatorUnavailable:
                    raise
                except CoordinatorError:
                    # Refused (a restarted coordinator that lost the run): the plan request
                    # creates the run again; these go with the next one.
                    self.undelivered = head[begin:]
                    break
                self.record_messages += 1
                self.delivered = min(begin + cap, len(head))
            extra = {"record_columns": _columns(tail)}
        return self.session.client.plan(
            run=self.run_id, generation=self.generation, rank=self.rank, epoch=epoch,
            window=window, **self.settings.run_config().to_dict(), **extra)

    def plan_for(self, epoch: int, window: int, checks: Mapping[str, int]) -> Plan:
        self.session.flush(min(1.0, self.timeout_s))
        # Every rank's measurements so far are in before anyone asks for the next plan.
        self.peers.barrier()
        candidate: Plan | None = None
        try:
            candidate = self.fetch(epoch, window)
            self._check(candidate)
        except (CoordinatorError, PlanError) as exc:
            warnings.warn(f"shardbalance: no plan for epoch {epoch} step {window} ({exc}); "
                          "keeping the plan all ranks agreed on last", RuntimeWarning)
            candidate = None
        # Every rank joins the all-reduce, also one without a candidate: skipping it would
        # leave the others waiting in it (and the ranks' collectives out of step).
        if self.agree(checks, candidate):
            self.agreed = candidate
            return candidate
        if candidate is not None:
            warnings.warn(f"shardbalance: ranks disagree on the plan for epoch {epoch} step "
                          f"{window}; keeping the last agreed plan", RuntimeWarning)
        return self.agreed.moved_to(epoch, window)

    def _check(self, plan: Plan) -> None:
        s = self.settings
        for rank, (b, lo, hi) in enumerate(zip(plan.batch_sizes, s.min_sizes, s.max_sizes)):
            if not lo <= b <= hi or b % s.batch_size_multiple:
                raise PlanError(f"plan {list(plan.batch_sizes)} gives rank {rank} {b} samples, "
                                f"outside [{lo}, {hi}] or not a multiple of "
                                f"{s.batch_size_multiple}")


class RecordRows:
    """Records ``[rank, epoch, step, batch_size, busy_s]`` held as one ``(n, 5)`` float64 array.

    The leader gathers every rank's records each round (12,288 at 4096 ranks): a Python list per
    record cost more CPU than the request itself and fed the garbage collector enough young
    objects for a full collection in the leader's (a training process's) heap every few rounds.
    Slices like a list of rows (:meth:`tolist` gives one) and compares equal to one; integers
    up to 2**53 are exact in float64.
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = np.empty((0, 5)) if array is None else array

    @classmethod
    def of(cls, rows) -> "RecordRows":
        """``rows`` (a list of rows, or RecordRows) as RecordRows."""
        if isinstance(rows, RecordRows):
            return rows
        return cls(np.asarray(rows, dtype=np.float64).reshape(-1, 5))

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: slice) -> "RecordRows":
        if not isinstance(index, slice):
            raise TypeError(f"RecordRows take slices, got {index!r}")
        return RecordRows(self.array[index])

    def __add__(self, other) -> "RecordRows":
        return RecordRows(np.concatenate([self.array, RecordRows.of(other).array]))

    def __eq__(self, other) -> bool:
        return self.tolist() == [list(r) for r in other]

    def __iter__(self):
        return iter(self.tolist())

    def columns(self) -> dict[str, list]:
        """As a request's ``record_columns`` (integers for all but the busy time)."""
        ints = self.array[:, :4].astype(np.int64)
        out = {name: ints[:, i].tolist() for i, name in enumerate(protocol.RECORD_COLUMNS[:4])}
        out[protocol.RECORD_COLUMNS[4]] = self.array[:, 4].tolist()
        return out

    def tolist(self) -> list[list]:
        return [[*map(int, r[:4]), r[4]] for r in self.array.tolist()]


def _columns(rows) -> dict[str, list]:
    """``[rank, epoch, step, batch_size, busy_s]`` rows as a request's ``record_columns``."""
    if isinstance(rows, RecordRows):
        return rows.columns()
    return dict(zip(protocol.RECORD_COLUMNS, map(list, zip(*rows))))
