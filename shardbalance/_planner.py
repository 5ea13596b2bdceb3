"""Planning off the training path: a background thread per rank agrees each window's plan.

A *round* is triggered by training progress, not by the sampler's generator: when this rank has
*trained* (a ledger entry taken by the attached weighting, or ``report_busy``) the round's
trigger step of the current iterator. Training is lockstep across ranks, so every rank reaches
the same trigger whatever its DataLoader's prefetch depth, and the generator (which runs at
prefetch time, inside ``next(loader)``) never joins a collective. The training thread only
notes its progress; every collective of a round runs in the planner thread, on the planner's
own gloo group (used by no other thread).

With a model attached (``gated``), a rank starts its part of a round once the *next* step's
forward has begun, not as soon as the trigger step's forward returned: between the two lie the
step's backward (the gradient all-reduce every rank waits on), the optimizer and the loader's
fetch, the busiest stretch of a training thread and the one the whole job waits on, while the
forward that follows is device (or emulated) compute. The round's Python work, its collectives
and the coordinator's decision then overlap compute instead of lengthening the step boundary
(on a 2-core machine the difference was 0.96 → 0.995 of the oracle at K = 3). Only the start
moves: every rank still runs the same rounds in the same order, and a trigger at an iterator's
last step (no next forward in it) or one being drained starts at once.

a. one all-reduce (MAX) of small per-rank figures: the prefetch depth (steps yielded but not
   yet trained), the last round's duration in steps, whether this rank has measured enough
   steps on the current plan (early re-plans) and how many new measurements it holds; then one
   gather of those measurements (fixed-size rows) at the leader;
b. the leader (planner-group rank 0) alone asks the coordinator (``CoordinatedPlans.fetch``,
   the seam tests replace), its request carrying every rank's new measurements (per rank:
   the coordinator counts them as it would stats messages; kept and resent with the next
   request if this one fails; beyond what one request may carry, up to RECORD_MESSAGES
   ``records`` messages go first), and checks the plan;
c. the leader broadcasts the plan's batch sizes and what the coordinator measured with it
   (its stats, for ``metrics()`` on every rank), or an explicit marker: no plan (the request
   failed: everyone keeps the agreed plan and the leader backs off), skipped (backing off) or
   not ready; a gloo timeout is never the way to say "no plan";
d. only then each rank snapshots how far its generator has decided (its *claim*: the last step
   whose plan is fixed) and one all-reduce (MAX) gives the switch step ``s*``, the first switch
   point after every rank's claim (for a window round, and not before its target). From its
   snapshot until ``s*`` is installed a generator that reaches a switch point waits (bounded);
   that wait is one tiny collective, never the coordinator. Every rank installs the same plan
   at the same ``s*``.

Triggers are chosen so the plan lands at its boundary: ``trigger = boundary - L`` with ``L``
the largest prefetch depth plus the plan phase's duration in steps, plus one, both agreed in
the previous round. A boundary the generator has already passed when the round can first fire
(an iterator's first windows when the loader prefetches more than a window) is not asked for:
the round asks for the first one after it, and a window's plan never starts before the window
it was asked for, so the window each request names is the step its plan starts at (unless the
round runs late). Every round's descriptor (its trigger, target and kind) is computed on
every rank from agreed figures only, so all ranks run the same rounds in the same order.
"""

from __future__ import annotations

import collections
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ._exceptions import CoordinatorError, PlanError
from ._ledger import LedgerEntry, StepLedger
from ._peers import PeerGroup
from ._plans import RecordRows
from .plan import Plan
from .protocol import MAX_RECORDS_PER_PLAN, PlanStats

__all__ = ["BackgroundPlanner", "EARLY_MAX_STEPS"]

#: Installed plans whose coordinator figures are kept: this many beyond those the lead may hold
#: ahead of the step being trained, and never more than the maximum.
_STATS_KEPT, _STATS_KEPT_MAX = 8, 256

#: Early re-plans (per-epoch plans, first iterator) only while the switch falls before this.
EARLY_MAX_STEPS = 64
#: Round results broadcast by the leader.
_PLAN, _FAILED, _SKIPPED, _NOT_READY = 1.0, 2.0, 3.0, 4.0
_STATUS = {_PLAN: "plan", _FAILED: "failed", _SKIPPED: "skipped", _NOT_READY: "not ready"}
#: The most rounds a leader skips the coordinator after failures (doubling from one).
_BACKOFF_MAX = 8
#: ``L`` before any round measured it.
_INITIAL_LEAD = 3
#: A round's duration in steps until one was measured: a round's result only reaches the
#: next round's lead, so a run's first round must not count its own duration as nothing (its
#: lead then lacked a step, and the rounds it set late landed their plans a window late).
_INITIAL_PHASE_STEPS = 1.0
#: ``records`` messages the leader may send ahead of one plan request, each as many records
#: as a plan request carries: a round delivers at most this plus one requests' worth.
RECORD_MESSAGES = 16
_RECORDS_PER_ROUND = (RECORD_MESSAGES + 1) * MAX_RECORDS_PER_PLAN


@dataclass(frozen=True)
class _Round:
    """One planning round of an iterator: fired once this rank trained ``trigger``."""

    kind: str  # "window" (switch inside the iterator), "early" (ditto) or "next" (next iterator)
    trigger: int
    #: The window the plan is requested for (the intended switch step).
    target: int


class PlannerError(PlanError):
    """The planner's peers failed (a collective timed out): its group is unusable."""


class BackgroundPlanner:
    """The planning rounds of one sampler on one rank.

    Args:
        source: the coordinated plan source (``fetch`` asks the coordinator, ``agreed`` is set
            here when a plan is installed).
        ledger: the sampler's step ledger (how far the generator yielded: the prefetch depth).
        size: the number of ranks; ``rank``: this rank.
        early_ready: whether this rank measured enough steps for an early re-plan.
        early_warmup: steps (accumulation groups) every rank measures on a plan before an
            early re-plan: up to its first clean step at a new batch size (the policy's
            ``shape_warmup_steps`` + 1).
        peer_timeout_s: bound on every collective and on each generator wait.
    """

    def __init__(self, source, ledger: StepLedger, peers: PeerGroup, rank: int,
                 early_ready: Callable[[], bool], policy: str, peer_timeout_s: float,
                 early_warmup: int) -> None:
        self.source = source
        self.ledger = ledger
        self.size = peers.size
        self.peers = peers
        self.rank = rank
        self.early_ready = early_ready
        self.early_warmup = early_warmup
        self.policy = policy
        self.peer_timeout_s = peer_timeout_s
        self.group = peers.new_thread_group()
        self.leader = True if self.group is None else self.group.rank() == 0
        self._cv = threading.Condition()
        # -- the current iterator (set by begin) ----------------------------------------
        self.serial: int | None = None
        self.epoch = 0
        self.steps = 0
        self.window: int | None = None
        self.accumulation = 1
        self.early = 0  # early re-plans still allowed in this iterator
        self._trained = -1
        self._started = False  # a forward began after the newest trained step (gated)
        self._claimed = -1
        self._frozen = False
        #: ``(switch step, plan)`` installed for the current iterator, in order.
        self._installs: list[tuple[int, Plan]] = []
        self._round: _Round | None = None
        self._inflight = False
        self._last_trigger = -1
        self._last_target = 0
        self._last_switch = 0
        self._plan_start = 0  # the step the current plan took over (early re-plans)
        self._ending: int | None = None  # last trained step of an iterator being replaced
        self._next_done = False  # the round for the next iterator ran
        #: The epoch of the leader's first request, still to send (see _register).
        self._registering: int | None = None
        # -- agreed across rounds ------------------------------------------------------
        self.lead = _INITIAL_LEAD
        #: The largest prefetch depth (steps yielded but not trained), agreed in the last round.
        self.depth = 0
        # What the coordinator measured with each installed plan, by digest (metrics()).
        self.plan_stats: collections.OrderedDict[str, PlanStats] = collections.OrderedDict()
        self._phase_steps = _INITIAL_PHASE_STEPS
        self._step_marks: collections.deque[float] = collections.deque(maxlen=16)
        # -- leader backoff ------------------------------------------------------------
        self._streak = 0
        self._skip = 0
        self._warned_streak = False
        #: Start a due round only once the next step's forward began (see the module
        #: docstring); set when a model is attached (its forward pre-hook calls
        #: :meth:`forward_started`).
        self.gated = False
        # -- outcome -------------------------------------------------------------------
        self.error: BaseException | None = None
        #: Counters for tests and benchmarks: rounds run, plans installed, rounds without a
        #: plan, coordinator requests made, and generator waits at a switch point.
        self.stats = collections.Counter()
        #: This rank's measurements not yet gathered (appended by the training side).
        self._records: collections.deque[tuple[int, int, int, float]] = collections.deque()
        #: The leader's gathered ``[rank, epoch, step, batch_size, busy_s]`` not yet delivered.
        self.pending = RecordRows()
        #: Each planner-group rank's data-parallel index (model-parallel peers share one).
        self._replicas: np.ndarray | None = None
        #: Records one rank contributes per round (the rest wait for the next): one round's
        #: requests stay within the protocol's cap whatever the world size.
        self._per_round = max(1, _RECORDS_PER_ROUND // (
            1 if self.group is None else self.group.size()))
        #: The newest rounds: ``(epoch, kind, trigger, target, status, switch, lead, depth)``.
        self.history: collections.deque[tuple] = collections.deque(maxlen=4096)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shardbalance-planner",
                                         daemon=True)
        self._thread.start()

    # -- the main thread: iterators and the generator --------------------------------------

    def begin(self, serial: int, epoch: int, steps: int, window: int | None,
              accumulation: int, early: int, through: int) -> Plan:
        """A new iterator: finish the old one's rounds (every rank runs the same ones), then
        return the plan of its first step (the newest agreed one, the same on every rank);
        steps up to ``through`` take it."""
        with self._cv:
            if self.serial is None and self.leader:
                self._registering = epoch
            self._drain(self.peer_timeout_s)
            self._ending = None
            self.serial, self.epoch, self.steps = serial, epoch, steps
            self.window, self.accumulation, self.early = window, accumulation, early
            self._trained, self._claimed = -1, through
            self._frozen = False
            self._installs = []
            self._last_trigger, self._last_target = -1, 0
            self._last_switch = self._plan_start = 0
            self._next_done = False
            self._step_marks.clear()
            self._round = self._next_round()
            self._cv.notify_all()
            return self.source.agreed.moved_to(epoch, 0)

    def _drain(self, timeout_s: float) -> None:
        """Run the rounds the ending iterator still owes (those every rank triggered)."""
        if self.serial is None:
            return
        self._ending = self._trained
        self._cv.notify_all()
        if not self._cv.wait_for(self._drained, timeout_s):
            raise PlannerError(f"the planner's round did not finish within "
                               f"{timeout_s:g} s (a peer is stuck)")
        self._raise()

    def _register(self, epoch: int) -> None:
        """The leader's one request as the first iterator starts (in this thread: training does
        not wait), so that the coordinator knows the run before any rank's measurements arrive
        (the plan itself is not used: only what every rank holds is)."""
        try:
            self.source.fetch(epoch, 0)
        except (CoordinatorError, PlanError) as exc:
            self._streak, self._skip = 1, 1
            warnings.warn(f"shardbalance: no plan for epoch {epoch} step 0 ({exc}); keeping "
                          "the plan all ranks agreed on last, retrying with backoff",
                          RuntimeWarning)
            self._warned_streak = True

    def _drained(self) -> bool:
        """No round in flight, and the next one will never fire in the ending iterator."""
        if self.error is not None:
            return True
        if self._inflight:
            return False
        return self._round is None or self._round.trigger > self._ending

    def claim(self, step: int, through: int) -> Plan | None:
        """At switch point ``step``: the plan installed there (None: keep the current one);
        the plan of every step up to ``through`` is then fixed."""
        with self._cv:
            if self._frozen:
                self.stats["waits"] += 1
                if not self._cv.wait_for(lambda: not self._frozen or self.error is not None,
                                         self.peer_timeout_s):
                    raise PlannerError(f"no switch step agreed within {self.peer_timeout_s:g} s")
            self._raise()
            self._claimed = through
            found = None
            for switch, plan in self._installs:
                if switch == step:
                    found = plan
            return found

    def trained(self, entry: LedgerEntry) -> None:
        """This rank trained ``entry`` (the training thread; cheap)."""
        if entry.serial != self.serial:
            return
        self._step_marks.append(time.monotonic())
        if entry.step > self._trained:
            with self._cv:
                self._trained, self._started = entry.step, False
                if self._due():
                    self._cv.notify_all()

    def forward_started(self) -> None:
        """A training forward began on this rank (the training thread; cheap): a gated round
        whose trigger is the newest trained step may start."""
        if self._started:  # set and cleared by the training thread alone: no lock to read it
            return
        with self._cv:
            if not self._started:
                self._started = True
                if self._due():
                    self._cv.notify_all()

    def record(self, record: tuple[int, int, int, float]) -> None:
        """A measurement of this rank, for the next round's gather (any thread; cheap)."""
        self._records.append(record)

    def take_records(self) -> list[tuple[int, int, int, float]]:
        """This rank's measurements no round gathered (at close: the stats sender's)."""
        out = []
        while self._records:
            out.append(self._records.popleft())
        return out

    def close(self, timeout_s: float, drain: bool = True) -> None:
        """Run the rounds every rank triggered (``drain``), then stop the thread (bounded)."""
        with self._cv:
            if drain and self.error is None:
                try:
                    self._drain(timeout_s)
                except PlannerError as exc:
                    warnings.warn(f"shardbalance: {exc}; stopping the planner anyway",
                                  RuntimeWarning)
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    def _raise(self) -> None:
        if self.error is not None:
            raise PlannerError(f"the background planner failed: {self.error}") from self.error

    # -- the planner thread ------------------------------------------------------------------

    def _due(self) -> bool:
        r = self._round
        if r is None:
            return False
        if self._ending is not None and r.trigger <= self._ending:
            return True  # drained: every rank trained it, no forward to wait for
        if r.trigger > self._trained:
            return False
        return not self.gated or r.trigger < self._trained or self._started or \
            r.trigger >= self.steps - 1

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._stop or self._due() or
                                      self._registering is not None)
                    if self._stop:
                        return
                    register, self._registering = self._registering, None
                    rnd, self._inflight = self._round, register is None
                if register is not None:
                    self._register(register)
                    continue
                try:
                    self._play(rnd)
                finally:
                    with self._cv:
                        self._inflight = False
                        self._cv.notify_all()
        except BaseException as exc:  # a broken collective: every later wait raises it
            with self._cv:
                self.error = exc
                self._frozen = False
                self._cv.notify_all()

    def _play(self, rnd: _Round) -> None:
        # The phase counts from the round's own start: a gated start waits at most for the
        # rest of a step (the lead's "+ 1" covers that), and a wait for a forward that does
        # not come (a checkpoint, a validation pass, a loop that left the iterator and is
        # drained at the next one's start) is no part of the round.
        started = time.monotonic()
        self.stats["rounds"] += 1
        # (a) prefetch depth, phase steps, readiness and how many new measurements: one
        # all-reduce (MAX; readiness as -min), then the measurements gathered at the leader.
        last = self.ledger.last_yielded
        depth = max(0, last.step - self._trained) if last is not None and \
            last.serial == self.serial else 0
        ready = 1.0 if rnd.kind != "early" or self.early_ready() else 0.0
        mine = []
        while self._records and len(mine) < self._per_round:
            mine.append(self._records.popleft())
        figures = self._all_reduce_max([float(depth), self._phase_steps, -ready,
                                        float(len(mine))])
        depth = int(figures[0])
        lead = depth + int(math.ceil(figures[1])) + 1
        all_ready = -figures[2] >= 1.0
        if figures[3] > 0:
            self._gather(mine, int(figures[3]))
        # (b) the leader asks; (c) it broadcasts the plan or a marker.
        status, plan = _NOT_READY, None
        if self.leader and all_ready:
            status, plan = self._ask(rnd)
        status, plan, stats = self._broadcast(status, plan, rnd)
        # (d) the switch step, from every rank's claim taken now.
        switch = None
        if status == _PLAN and rnd.kind != "next":
            with self._cv:
                self._frozen = True
                claimed = self._claimed
            top = int(self._all_reduce_max([float(claimed)])[0])
            # A window's plan never starts before the window it was asked for (what the
            # coordinator journals and tallies it as); later only when the round ran late.
            switch = self._next_switch(max(top, rnd.target - 1) if rnd.kind == "window"
                                       else top, rnd.kind)
        with self._cv:
            self._settle(rnd, status, plan, switch, lead, stats, depth)
            self._frozen = False
            self._cv.notify_all()
        # The phase's duration in steps (for the next round's lead).
        marks = list(self._step_marks)
        if len(marks) >= 3:
            step_s = (marks[-1] - marks[0]) / (len(marks) - 1)
            if step_s > 0:
                self._phase_steps = min((time.monotonic() - started) / step_s, 1e6)

    def _keep_stats(self, digest: str, stats: PlanStats) -> None:
        """File what the coordinator measured with an installed plan. Every rank installs the
        same plans in the same order, so this store (unlike the client's cache, which the
        leader's own requests also fill) is the same on every rank; it keeps every plan that
        may still be ahead of the step being trained (the lead over the window, plus margin)."""
        self.plan_stats[digest] = stats
        self.plan_stats.move_to_end(digest)
        ahead = math.ceil(max(self.lead, 0) / max(self.window or 1, 1))
        keep = min(_STATS_KEPT_MAX, _STATS_KEPT + ahead)
        while len(self.plan_stats) > keep:
            self.plan_stats.popitem(last=False)

    def _settle(self, rnd: _Round, status: float, plan: Plan | None, switch: int | None,
                lead: int, stats: PlanStats | None = None, depth: int = 0) -> None:
        """Install the round's result and compute the next round (from agreed figures only)."""
        self.lead, self.depth = lead, depth
        self.history.append((self.epoch, rnd.kind, rnd.trigger, rnd.target,
                             _STATUS[status], switch, lead, depth))
        self._last_trigger, self._last_target = rnd.trigger, rnd.target
        self._next_done = self._next_done or rnd.kind == "next"
        if status == _PLAN:
            self.stats["plans"] += 1
            if self.stats["plans"] == 1:
                # The run exists now: each rank names its hardware to the coordinator once.
                sender = getattr(getattr(self.source, "session", None), "sender", None)
                if sender is not None:
                    sender.announce()
            if switch is not None:
                plan = plan.moved_to(self.epoch, switch)
            self.source.agreed = plan  # (switch None: the next iterator's)
            if stats is not None:
                # Under the digest every rank trains it with: metrics() the same on every rank.
                self._keep_stats(plan.digest, stats)
            if switch is not None:
                self._last_switch = switch
                if switch < self.steps:
                    self._installs.append((switch, plan))
                    self._plan_start = switch
                if rnd.kind == "early":
                    self.early -= 1
        else:
            self.stats["no_plan"] += 1
            if status == _FAILED and not self._warned_streak:
                self._warned_streak = True
                warnings.warn(f"shardbalance: no plan for epoch {self.epoch} step {rnd.target} "
                              "(the coordinator did not answer in time or refused); keeping "
                              "the plan all ranks agreed on last, retrying with backoff",
                              RuntimeWarning)
        if status == _PLAN:
            self._warned_streak = False
        self._round = self._next_round(not_ready=status == _NOT_READY and rnd.kind == "early")

    def _next_round(self, not_ready: bool = False) -> _Round | None:
        """The next round of the current iterator (the same on every rank), or None."""
        steps, last = self.steps, self._last_trigger
        if steps <= 0 or last >= steps - 1:
            return None
        if self.window is not None:
            k = self.window
            after = max(self._last_target, self._last_switch)
            target = (after // k + 1) * k
            if target >= steps:
                return None
            earliest = max(last + 1, 0)
            # When this round fires the generator has decided the plan of the window holding
            # step earliest + depth at least: a boundary before it cannot be reached (an
            # iterator's first windows when the loader prefetches more than a window). Ask for
            # the first one after it, so the request (and the coordinator's journal and window
            # tallies) names the step the plan starts at. (None left in this iterator: the
            # round still runs and measures the depth again.)
            reach = ((earliest + self.depth) // k + 1) * k
            if target < reach < steps:
                target = reach
            trigger = max(target - self.lead, earliest)
            return _Round("window", trigger, target) if trigger < steps else None
        group = self.accumulation
        if self.early > 0:
            # ``early_warmup`` groups measured on the current plan: trained, so their busy
            # time is recorded once the next group starts (the step at which the plan starts,
            # an iterator's first or a change of batch size, is not measured).
            trigger = max(self._plan_start + (self.early_warmup + 1) * group, last + 1)
            if not_ready:
                trigger = max(trigger, last + group)
            target = self._next_switch(trigger + self.lead - 1, "early")
            if target is not None and trigger < steps:
                return _Round("early", trigger, target)
            self.early = 0
        if self._next_done:
            return None
        trigger = min(steps - 1, max(steps - self.lead, last + 1))
        return _Round("next", trigger, steps)

    def _next_switch(self, after: int, kind: str) -> int | None:
        """The first switch point of the current iterator after step ``after`` (None: none; the
        plan then starts the next iterator)."""
        if kind == "window":
            k = self.window
            step = (max(after, 0) // k + 1) * k
            return step if step < self.steps else None
        g = self.accumulation
        step = (max(after, 0) // g + 1) * g
        return step if step < min(self.steps, EARLY_MAX_STEPS) else None

    def _ask(self, rnd: _Round) -> tuple[float, Plan | None]:
        """The leader's request, with backoff after failures."""
        if self._skip > 0:
            self._skip -= 1
            return _SKIPPED, None
        epoch, window = (self.epoch + 1, 0) if rnd.kind == "next" else (self.epoch, rnd.target)
        self.stats["requests"] += 1
        self.source.outgoing, self.source.undelivered = self.pending, []
        self.source.delivered, fetched = 0, False
        try:
            plan = self.source.fetch(epoch, window)
            fetched = True
            # Delivered with the request (the coordinator counted them), but for what a
            # refused ``records`` message held.
            kept = RecordRows.of(self.source.undelivered)
            self.stats["records_sent"] += len(self.pending) - len(kept)
            self.pending = kept
            self.source._check(plan)
        except (CoordinatorError, PlanError) as exc:
            # What ``records`` messages delivered before the failure is counted: not resent
            # (a resend of a row the coordinator no longer holds would count twice).
            if not fetched and self.source.delivered:
                self.stats["records_sent"] += self.source.delivered
                self.pending = RecordRows.of(self.pending[self.source.delivered:])
            self._streak += 1
            self._skip = min(2 ** (self._streak - 1), _BACKOFF_MAX)
            self.stats["failed"] += 1
            self.last_failure = str(exc)
            return _FAILED, None
        finally:
            self.source.outgoing = []
        self._streak = self._skip = 0
        return _PLAN, plan

    def _broadcast(self, status: float, plan: Plan | None, rnd: _Round
                   ) -> tuple[float, Plan | None, PlanStats | None]:
        """The leader's result on every rank: ``[status, epoch, window, predicted, sizes...]``
        then the coordinator's stats for the plan ``[present, imbalance, equal_step_ms,
        busy_ms..., busy_batch_sizes...]`` (NaN: a figure not known; 3k + 7 numbers)."""
        k = self.size
        values = [status, 0.0, 0.0, math.nan] + [0.0] * k + [0.0] + [math.nan] * (2 + 2 * k)
        if plan is not None:
            values[1:4] = [plan.epoch, plan.window, _nan(plan.predicted_step_s)]
            values[4:4 + k] = [float(b) for b in plan.batch_sizes]
            client = getattr(getattr(self.source, "session", None), "client", None)
            stats = None if client is None else client.reported.get(plan.digest)
            if stats is not None:
                values[4 + k:7 + k] = [1.0, _nan(stats.imbalance), _nan(stats.equal_step_ms)]
                for at, figures in ((7 + k, stats.busy_ms), (7 + 2 * k, stats.busy_batch_sizes)):
                    if figures is not None and len(figures) == k:
                        values[at:at + k] = [_nan(v) for v in figures]
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            options = dist.BroadcastOptions()
            options.rootRank, options.rootTensor = 0, 0
            self.group.broadcast([tensor], options).wait()
        out = tensor.tolist()
        if out[0] != _PLAN:
            return out[0], None, None
        plan = Plan(self.source.run_id, self.source.generation, int(out[1]), int(out[2]),
                    tuple(int(b) for b in out[4:4 + k]), self.source.settings.global_batch_size,
                    self.policy, _none(out[3]))
        stats = None
        if out[4 + k] == 1.0:
            busy, sizes = out[7 + k:7 + 2 * k], out[7 + 2 * k:7 + 3 * k]
            stats = PlanStats(
                None if all(map(math.isnan, busy)) else tuple(_none(v) for v in busy),
                None if all(map(math.isnan, sizes)) else tuple(
                    None if math.isnan(v) else int(v) for v in sizes),
                _none(out[5 + k]), _none(out[6 + k]))
        return _PLAN, plan, stats

    def _gather(self, mine: list, rows: int) -> None:
        """Every rank's new measurements (``rows`` each at most) into the leader's pending
        records: one gather of fixed-size tensors (a zero busy time pads)."""
        tensor = torch.zeros((rows, 4), dtype=torch.float64)
        if mine:
            tensor[:len(mine)] = torch.tensor(mine, dtype=torch.float64)
        if self.group is None:
            gathered = [tensor]
        else:
            # Every rank holding the sampler: with model-parallel peers several per replica
            # (the coordinator keeps a replica's slowest member per step).
            gathered = [torch.zeros_like(tensor) for _ in range(self.group.size())] \
                if self.leader else []
            options = dist.GatherOptions()
            options.rootRank = 0
            self.group.gather([gathered] if self.leader else [], [tensor], options).wait()
        if not self.leader:
            return
        if self._replicas is None:  # the group's layout is fixed
            self._replicas = np.array([self.peers.replica_of(i) for i in range(len(gathered))],
                                      dtype=np.float64)
        blocks = torch.stack(gathered).numpy().reshape(-1, 4)  # rank-major, each rank's in order
        real = blocks[:, 3] > 0  # a zero busy time pads
        new = np.column_stack([np.repeat(self._replicas, rows)[real], blocks[real]])
        self.pending = RecordRows.of(self.pending) + RecordRows(new)
        overflow = len(self.pending) - _RECORDS_PER_ROUND
        if overflow > 0:  # the coordinator has been unreachable for long: the oldest go
            self.pending = self.pending[overflow:]
            self.stats["records_dropped"] += overflow

    def _all_reduce_max(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            options = dist.AllreduceOptions()
            options.reduceOp = dist.ReduceOp.MAX
            self.group.allreduce([tensor], options).wait()
        return tensor.tolist()


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value
