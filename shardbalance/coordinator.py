"""The coordinator: one ZeroMQ ROUTER socket that decides and serves plans.

Ranks push busy-time measurements and ask for the plan of each window. The first request for a
``(run, generation, epoch, window)`` decides that plan from whatever measurements have arrived
(it never waits for more) and every later request gets the very same plan. Every decision is
appended to a JSONL journal, which is both the log a person reads and what a restarted
coordinator resumes from; a one-line summary of each decision goes to stderr.

Journal records (one JSON object a line, each with ``time`` and ``event``):
    start     the coordinator bound ``endpoint``
    run       a run (generation) began, with its ``config``
    plan      a decision: ``batch_sizes``, ``reason``, each rank's recent ``busy_ms`` and the
              ``busy_batch_sizes`` they were measured at, ``imbalance``, and with a fitted model
              ``predicted_step_ms``, ``equal_step_ms``, ``alpha_ms``, ``beta_ms``
    window    what the ranks measured while one plan window trained, per rank: ``steps``,
              ``samples`` and the median ``busy_ms`` (see :class:`WindowTally`); a later record
              for the same ``(run, generation, epoch, window)`` supersedes an earlier one
    rejected  a count of refused messages

Runs are isolated by run id, bounded in number, and forgotten when idle. The loop is a
``poll(timeout)`` with housekeeping after every poll; replies are sent without blocking, so a
dead or stalled rank can never stall the others.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from . import protocol
from ._leases import LeaseTable, PullConfig
from ._exceptions import ConfigError, PlanError, ProtocolError, ShardBalanceError
from .plan import Plan, apportion, initial_plan
from .policies import (HISTORY_PER_RANK, PolicyInput, check_options, check_policy, decide,
                       fit_cost_model)

__all__ = ["Coordinator", "serve"]

log = logging.getLogger("shardbalance.coordinator")

#: Decided plans kept per run (requests for older windows are refused).
PLANS_PER_RUN = 256
MAX_RUNS = 256
#: A run that sent nothing for this long is forgotten (its journal lines stay).
RUN_IDLE_S = 6 * 3600.0
#: At most one log line per this many seconds about rejected messages.
REJECT_LOG_INTERVAL_S = 10.0
#: Per-window aggregates: the newest windows of a run that still collect measurements (a
#: measurement of an older one arrives too late and is left out), the newest busy times per
#: rank a window's median is taken over, and how often a window that changed is journaled
#: between decisions (so a journal being followed shows the window in progress). Memory:
#: OPEN_WINDOWS x world_size x WINDOW_BUSY_KEPT floats per run.
OPEN_WINDOWS = 2
WINDOW_BUSY_KEPT = 64
WINDOW_REFRESH_S = 30.0
#: Plans whose stats (PlanStats) and encoded reply are kept: all ranks ask within seconds,
#: and a reply encoded once serves them all (per-rank floats cost ~3 us each to encode).
STATS_PER_RUN = 8


class WindowTally:
    """What the ranks measured while one plan window trained: per rank, the steps, the samples
    and a ring of the newest busy times. Journaled as a ``window`` record."""

    def __init__(self, key: tuple[int, int], world_size: int) -> None:
        self.key = key
        self.steps = [0] * world_size
        self.samples = [0] * world_size
        self.busy = np.full((world_size, WINDOW_BUSY_KEPT), np.nan)
        self.last_step = -1
        #: Changed since it was last journaled.
        self.dirty = False

    def add(self, rank: int, records) -> None:
        """Count a rank's ``(epoch, step, batch, busy_s)`` records, all of this window."""
        row, count = self.busy[rank], self.steps[rank]
        for _, step, batch, busy in records:
            row[count % WINDOW_BUSY_KEPT] = busy
            count += 1
            self.samples[rank] += batch
        self.steps[rank] = count
        self.last_step = max(self.last_step, records[-1][1])
        self.dirty = True

    def record(self, run: str, generation: int) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a rank not heard in this window
            medians = np.nanmedian(self.busy, axis=1)
        return {"event": "window", "run": run, "generation": generation, "epoch": self.key[0],
                "window": self.key[1], "last_step": self.last_step,
                "steps": list(self.steps), "samples": list(self.samples),
                "busy_ms": [None if np.isnan(m) else round(float(m) * 1e3, 3) for m in medians]}


@dataclass
class RunState:
    run_id: str
    generation: int
    config: protocol.RunConfig
    last_seen: float = field(default_factory=time.monotonic)
    history: list[OrderedDict] = field(default_factory=list)
    plans: OrderedDict = field(default_factory=OrderedDict)
    current: Plan | None = None
    #: The policy's tunables: the run's options over the defaults (checked once, here).
    options: dict = field(init=False)
    #: The newest OPEN_WINDOWS windows' aggregates, oldest first.
    windows: list[WindowTally] = field(default_factory=list)
    #: When the windows were last journaled (monotonic clock).
    windows_written: float = field(default_factory=time.monotonic)
    #: PlanStats (as dicts) of the newest STATS_PER_RUN decisions, sent with their plans.
    stats: OrderedDict = field(default_factory=OrderedDict)
    #: The encoded fields of the newest plan replies (protocol.encode_fields).
    replies: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.options = check_options(dict(self.config.options))
        if not self.history:
            self.history = [OrderedDict() for _ in range(self.config.world_size)]

    def add(self, rank: int, records) -> None:
        hist = self.history[rank]
        self._tally(rank, [r for r in records if (r[0], r[1]) not in hist])
        for epoch, step, batch, busy in records:
            # Keyed by step, so a resent report overwrites in place instead of counting twice;
            # one sender thread reports in step order, so insertion order is step order.
            # The members of one model replica (tensor or pipeline parallel peers) all report
            # its data-parallel rank: the replica is as busy as its slowest member.
            seen = hist.get((epoch, step))
            if seen is None or seen[0] != batch or seen[1] < busy:
                hist[(epoch, step)] = (batch, busy)
        while len(hist) > HISTORY_PER_RANK:
            hist.popitem(last=False)

    def _tally(self, rank: int, records) -> None:
        """Add new records to the open windows they belong to (each to the newest window
        starting at or before its step; those of a closed window are left out)."""
        keys = [w.key for w in self.windows]
        begin = 0
        while begin < len(records):
            at = bisect.bisect_right(keys, tuple(records[begin][:2]))
            end = begin + 1
            if at < len(keys):  # the records up to the next window's first step
                while end < len(records) and tuple(records[end][:2]) < keys[at]:
                    end += 1
            else:
                end = len(records)
            if at:
                self.windows[at - 1].add(rank, records[begin:end])
            begin = end

    def open_window(self, key: tuple[int, int]) -> WindowTally | None:
        """Start collecting a new plan window; returns an evicted window that still changed."""
        if any(w.key == key for w in self.windows):
            return None
        self.windows.append(WindowTally(key, self.config.world_size))
        self.windows.sort(key=lambda w: w.key)
        if len(self.windows) > OPEN_WINDOWS:
            oldest = self.windows.pop(0)
            return oldest if oldest.dirty else None
        return None

    def observations(self) -> tuple[np.ndarray, ...]:
        """Each rank's ``(batch_size, busy_s)`` rows, oldest first."""
        return tuple(np.fromiter(itertools.chain.from_iterable(hist.values()), np.float64,
                                 2 * len(hist)).reshape(-1, 2) for hist in self.history)

    def initial_plan(self, epoch: int, window: int) -> Plan:
        return initial_plan(self.config, self.run_id, self.generation, epoch, window)


@dataclass
class PullRun:
    """A pull-mode run (DynamicShardSampler): its configuration and its lease table."""

    run_id: str
    generation: int
    config: PullConfig
    table: LeaseTable = field(init=False)
    completed: set = field(default_factory=set)
    last_seen: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.table = LeaseTable(self.config)


class Coordinator:
    """A ZeroMQ ROUTER service deciding plans for any number of runs.

    Args:
        bind: the ZeroMQ endpoint to bind, e.g. ``tcp://10.0.0.5:5555``; port ``0`` or ``*``
            picks a free port (see :attr:`endpoint`).
        journal_path: the JSONL journal; an existing one is resumed from. ``None``: no journal.
        secret: shared secret for message signatures; ``None`` accepts unsigned messages.
        parent_pid: exit when this process is gone (the embedded coordinator's rank 0).
    """

    def __init__(self, bind: str, journal_path: str | None = None, secret: bytes | None = None,
                 parent_pid: int | None = None) -> None:
        self.secret = secret or None
        self.parent_pid = parent_pid
        self._parent_is_ppid = parent_pid == os.getppid()
        self.runs: OrderedDict[str, RunState] = OrderedDict()
        self.pull_runs: OrderedDict[str, PullRun] = OrderedDict()
        self.rejected = 0
        self._rejected_logged = 0
        self._last_reject_log = 0.0
        self._stop = False
        self.journal_path = journal_path
        if journal_path:
            self._resume(journal_path)
        self._journal = open(journal_path, "a", encoding="utf-8") if journal_path else None
        self.context = zmq.Context()
        self.socket = protocol.configure_socket(self.context.socket(zmq.ROUTER))
        self.socket.setsockopt(zmq.SNDHWM, 10000)
        self.socket.setsockopt(zmq.RCVHWM, 10000)
        bind = bind[:-2] + ":*" if bind.endswith(":0") else bind
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"Cannot bind the coordinator to {bind!r}: {exc}") from exc
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._write({"event": "start", "endpoint": self.endpoint, "pid": os.getpid(),
                     "authenticated": self.secret is not None})

    # -- journal -------------------------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        if self._journal is not None:
            self._journal.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self._journal.flush()

    def _write_windows(self, state: RunState, tallies=None) -> None:
        """Journal the window aggregates that changed since they were last journaled."""
        for tally in state.windows if tallies is None else tallies:
            if tally.dirty:
                self._write(tally.record(state.run_id, state.generation))
                tally.dirty = False
        state.windows_written = time.monotonic()

    def _resume(self, path: str) -> None:
        """Rebuild runs and their decided plans from an existing journal."""
        if not os.path.exists(path):
            return
        resumed = 0
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    if rec.get("event") == "run":
                        state = RunState(rec["run"], int(rec["generation"]),
                                         protocol.RunConfig.from_dict(rec["config"]))
                        self.runs[state.run_id] = state
                        self.runs.move_to_end(state.run_id)
                    elif rec.get("event") == "plan":
                        plan = Plan.from_dict(rec["plan"])
                        state = self.runs.get(plan.run_id)
                        if state is not None and state.generation == plan.generation:
                            self._remember(state, plan, _stats_of(rec, plan.world_size))
                            resumed += 1
                    elif str(rec.get("event", "")).startswith("pull_"):
                        self._pull_replay(rec)
                except (ValueError, KeyError, TypeError, ShardBalanceError):
                    continue  # a torn last line after a crash, or a foreign line
        while len(self.runs) > MAX_RUNS:
            self.runs.popitem(last=False)
        if resumed:
            log.info("resumed %d plans of %d runs from %s", resumed, len(self.runs), path)

    # -- requests ------------------------------------------------------------------------

    def handle(self, frames: list[bytes]) -> list[bytes]:
        """Answer one request (without its routing frame): a reply, or an error reply."""
        msg_id = 0
        try:
            msg = protocol.decode(frames, self.secret)
            msg_id = msg["id"]
            req = protocol.parse_request(msg)
            if isinstance(req, protocol.Ping):
                return protocol.encode({"type": "pong", "id": msg_id}, self.secret)
            if isinstance(req, protocol.PullRequest):
                return protocol.encode({"type": "chunk", "id": msg_id, **self._pull(req)},
                                       self.secret)
            if isinstance(req, protocol.PlanRequest):
                return protocol.encode_reply("plan", msg_id, self._plan_reply(req), self.secret)
            return protocol.encode({"type": "ack", "id": msg_id,
                                    "accepted": self._stats(req)}, self.secret)
        except ShardBalanceError as exc:
            self._reject(exc)
            return protocol.encode({"type": "error", "id": msg_id, "error": str(exc)}, self.secret)
        except Exception as exc:  # a bug must cost one request, never the service
            log.exception("internal error while handling a request")
            self._reject(exc)
            return protocol.encode({"type": "error", "id": msg_id,
                                    "error": f"internal error: {type(exc).__name__}"}, self.secret)

    def _reject(self, exc: Exception) -> None:
        self.rejected += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_INTERVAL_S:
            count = self.rejected - self._rejected_logged
            log.warning("rejected %d message(s), latest: %s", count, exc)
            self._write({"event": "rejected", "count": count, "latest": str(exc)})
            self._rejected_logged = self.rejected
            self._last_reject_log = now

    def _state(self, run: str, generation: int, req: protocol.PlanRequest | None) -> RunState:
        state = self.runs.get(run)
        if state is not None and generation < state.generation:
            raise ProtocolError(f"run {run} generation {generation} is stale: the run restarted "
                                f"as generation {state.generation}")
        if state is None or generation > state.generation:
            if req is None:
                raise ProtocolError(f"unknown run {run!r} generation {generation}: ask for a "
                                    "plan first")
            check_policy(req.config.policy)
            state = RunState(req.run, req.generation, req.config)
            state.initial_plan(0, 0)  # raises if the bounds cannot hold the batch
            self.runs[run] = state
            self._write({"event": "run", "run": run, "generation": generation,
                         "config": state.config.to_dict()})
            log.info("run %s generation %d: %d ranks, global batch %d, policy %s", run,
                     generation, state.config.world_size, state.config.global_batch_size,
                     state.config.policy)
            while len(self.runs) > MAX_RUNS:
                self.runs.popitem(last=False)
        elif req is not None and req.config != state.config:
            raise ConfigError(f"rank {req.rank} of run {run} asks with a configuration that "
                              f"differs from the one the run started with: "
                              f"{state.config.to_dict()}")
        state.last_seen = time.monotonic()
        self.runs.move_to_end(run)
        return state

    def _stats(self, report: protocol.StatsReport) -> int:
        state = self._state(report.run, report.generation, None)
        if report.world_size != state.config.world_size:
            raise ProtocolError(f"world_size {report.world_size} differs from the run's "
                                f"{state.config.world_size}")
        for rec in report.records:
            if rec[2] > state.config.global_batch_size:
                raise ProtocolError(f"batch size {rec[2]} exceeds the global batch "
                                    f"{state.config.global_batch_size}")
        state.add(report.rank, report.records)
        return len(report.records)

    def _remember(self, state: RunState, plan: Plan,
                  stats: protocol.PlanStats | None = None) -> None:
        key = (plan.epoch, plan.window)
        state.plans[key] = plan
        while len(state.plans) > PLANS_PER_RUN:
            state.plans.popitem(last=False)
        if stats is not None:
            # As the reply's dict: _plan_reply encodes it into the reply once.
            state.stats[key] = stats.to_dict()
            while len(state.stats) > STATS_PER_RUN:
                state.stats.popitem(last=False)
        evicted = state.open_window(key)
        if evicted is not None:
            self._write_windows(state, [evicted])
        if state.current is None or (plan.epoch, plan.window) >= (state.current.epoch,
                                                                   state.current.window):
            state.current = plan

    def _plan_reply(self, req: protocol.PlanRequest) -> str:
        """The encoded plan reply (the plan and its stats), encoded once per window."""
        state, plan = self._plan(req)
        key = (plan.epoch, plan.window)
        reply = state.replies.get(key)
        if reply is None:
            fields: dict[str, Any] = {"plan": plan.to_dict()}
            if key in state.stats:
                fields["stats"] = state.stats[key]
            reply = state.replies[key] = protocol.encode_fields(fields)
            while len(state.replies) > STATS_PER_RUN:
                state.replies.popitem(last=False)
        return reply

    def _plan(self, req: protocol.PlanRequest) -> tuple[RunState, Plan]:
        """The run and the plan of the request's window, decided now if it is new."""
        state = self._state(req.run, req.generation, req)
        key = (req.epoch, req.window)
        if key in state.plans:
            return state, state.plans[key]
        if state.plans and key < next(iter(state.plans)):
            raise PlanError(f"window {key} of run {req.run} is older than every plan kept")
        previous = state.current or state.initial_plan(req.epoch, req.window)
        history = state.observations()
        cfg = state.config
        inp = PolicyInput(global_batch_size=cfg.global_batch_size, current=previous.batch_sizes,
                          min_sizes=cfg.min_sizes, max_sizes=cfg.max_sizes,
                          quantum=cfg.quantum, history=history,
                          static_weights=cfg.initial_weights,
                          options=state.options)
        if state.current is None and cfg.initial_weights is not None:
            sizes, reason, model = previous.batch_sizes, "initial weights", None
        else:
            sizes, decision = decide(cfg.policy, inp)
            reason, model = decision.reason, decision.model
        if model is None:
            model = fit_cost_model(history, inp.options)
        predicted = model.step_seconds(sizes) if model is not None else None
        plan = Plan(state.run_id, state.generation, req.epoch, req.window, sizes,
                    cfg.global_batch_size, cfg.policy, predicted)
        stats = None
        try:
            # The windows trained so far first, so a reader sees each window before the plan
            # decided from it.
            self._write_windows(state)
            stats = self._announce(state, plan, previous, history, model, reason)
        finally:
            # Served to every rank even if logging it failed: ranks must never disagree.
            self._remember(state, plan, stats)
        return state, plan

    def _announce(self, state: RunState, plan: Plan, previous: Plan, history, model,
                  reason: str) -> protocol.PlanStats:
        """Journal and log a decision; the stats sent to the ranks with the plan."""
        # Each rank's median of its newest 32 busy times, in one pass over a padded table.
        recent = np.full((len(history), 32), np.nan)
        for row, h in zip(recent, history):
            tail = h[-32:, 1]
            row[:len(tail)] = tail
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN row: a rank not heard yet
            medians = np.nanmedian(recent, axis=1)
        busy_ms = [None if np.isnan(m) else round(float(m) * 1e3, 2) for m in medians]
        busy_batch = [int(h[-1, 0]) if len(h) else None for h in history]
        measured = [b for b in busy_ms if b is not None]
        imbalance = (max(measured) / (sum(measured) / len(measured))
                     if len(measured) == len(busy_ms) and measured and sum(measured) > 0
                     else None)
        record: dict[str, Any] = {
            "event": "plan", "run": state.run_id, "generation": state.generation,
            "epoch": plan.epoch, "window": plan.window, "batch_sizes": list(plan.batch_sizes),
            "previous": list(previous.batch_sizes), "policy": state.config.policy, "reason": reason,
            "busy_ms": busy_ms, "busy_batch_sizes": busy_batch,
            "imbalance": None if imbalance is None else round(imbalance, 4),
            "plan": plan.to_dict(),
        }
        line = (f"run {state.run_id} gen {state.generation} epoch {plan.epoch} "
                f"step {plan.window}: plan {list(plan.batch_sizes)} ({state.config.policy}: {reason})")
        if imbalance is not None:
            line += f" | busy ms/step {busy_ms} | imbalance {imbalance:.2f}"
        if model is not None:
            cfg = state.config
            equal = apportion([1.0] * cfg.world_size, cfg.global_batch_size, cfg.min_sizes,
                              cfg.max_sizes, cfg.quantum)
            predicted_ms = plan.predicted_step_s * 1e3
            equal_ms = model.step_seconds(equal) * 1e3
            record.update(predicted_step_ms=round(predicted_ms, 3), equal_step_ms=round(equal_ms, 3),
                          speedup_vs_equal=(round(equal_ms / predicted_ms, 4) if predicted_ms > 0
                                            else None),
                          alpha_ms=[round(a * 1e3, 3) for a in model.alphas],
                          beta_ms=[round(b * 1e3, 5) for b in model.betas])
            speedup = equal_ms / predicted_ms if predicted_ms > 0 else float("nan")
            line += f" | predicted {predicted_ms:.1f} ms/step, {speedup:.2f}x vs equal split"
        self._write(record)
        log.info("%s", line)
        return _stats_of(record, len(busy_ms))

    # -- pull mode -----------------------------------------------------------------------

    def _pull_replay(self, rec: dict[str, Any]) -> None:
        if rec["event"] == "pull_run":
            self.pull_runs[rec["run"]] = PullRun(rec["run"], int(rec["generation"]),
                                                 PullConfig.from_dict(rec["config"]))
            self.pull_runs.move_to_end(rec["run"])
            return
        state = self.pull_runs.get(rec.get("run"))
        if state is None:
            return
        if rec["event"] == "pull_complete":
            state.completed.add(int(rec["epoch"]))
        else:
            state.table.replay(rec, time.monotonic())

    def _pull_state(self, req: protocol.PullRequest) -> PullRun:
        config = PullConfig.from_dict(dict(req.config))
        state = self.pull_runs.get(req.run)
        if state is not None and req.generation < state.generation:
            raise ProtocolError(f"pull run {req.run} generation {req.generation} is stale: the "
                                f"run restarted as generation {state.generation}")
        if state is None:
            state = PullRun(req.run, req.generation, config)
            self.pull_runs[req.run] = state
            self._write({"event": "pull_run", "run": req.run, "generation": req.generation,
                         "config": config.to_dict()})
            log.info("pull run %s: %d ranks, %d samples, chunks of %d", req.run,
                     config.world_size, config.num_samples, config.chunk_size)
            while len(self.pull_runs) > MAX_RUNS:
                self.pull_runs.popitem(last=False)
        elif config != state.config:
            raise ConfigError(f"rank {req.rank} of pull run {req.run} asks with "
                              f"{config.to_dict()}, the run started with "
                              f"{state.config.to_dict()}")
        # An elastic restart keeps the run (and its completed chunks) under a new generation.
        state.generation = max(state.generation, req.generation)
        state.last_seen = time.monotonic()
        self.pull_runs.move_to_end(req.run)
        return state

    def _pull_dropped(self, state: PullRun, dropped, why: str) -> None:
        for epoch, rank, client, start, stop in dropped:
            self._write({"event": "pull_expire", "run": state.run_id, "epoch": epoch,
                         "rank": rank, "client": client, "start": start, "stop": stop,
                         "why": why})
            log.info("pull run %s epoch %d: rank %d lost its lease on [%d, %d) (%s)",
                     state.run_id, epoch, rank, start, stop, why)

    def _pull(self, req: protocol.PullRequest) -> dict[str, Any]:
        state = self._pull_state(req)
        table, epoch, now = state.table, req.epoch, time.monotonic()
        try:
            table.check_done(epoch, req.done)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        self._pull_dropped(state, table.register(req.rank, req.client), "replaced")
        self._pull_dropped(state, table.expire(now), "expired")
        for start, stop in req.done:
            counted = table.done(epoch, req.client, start, stop, now)
            self._write({"event": "pull_done", "run": state.run_id, "epoch": epoch,
                         "rank": req.rank, "client": req.client, "start": start, "stop": stop,
                         "counted": counted})
        stale = table.renew(epoch, req.client, req.held, now)
        reply: dict[str, Any] = {"stale": stale}
        if req.op == "restore":
            fresh = epoch not in table.epochs or not table.epochs[epoch].chunks
            reply["restored"] = table.restore(epoch, list(req.ranges))
            if fresh and req.ranges and reply["restored"]:
                self._write({"event": "pull_restore", "run": state.run_id, "epoch": epoch,
                             "rank": req.rank, "ranges": [list(r) for r in req.ranges]})
        kind, chunk = "none", None
        if req.want:
            kind, chunk = table.lease(epoch, req.rank, req.client, now)
            if chunk is not None:
                self._write({"event": "pull_lease", "run": state.run_id, "epoch": epoch,
                             "rank": req.rank, "client": req.client, "start": chunk.start,
                             "stop": chunk.stop, "kind": kind})
        epoch_state = table.epoch(epoch)
        if epoch_state.complete and epoch not in state.completed:
            state.completed.add(epoch)
            self._write({"event": "pull_complete", "run": state.run_id, "epoch": epoch,
                         "num_samples": epoch_state.num_samples})
            log.info("pull run %s epoch %d complete", state.run_id, epoch)
        reply.update(kind=kind, lease=None if chunk is None else [chunk.start, chunk.stop],
                     complete=epoch_state.complete,
                     remaining=epoch_state.num_samples - epoch_state.completed_items)
        if req.op == "status":
            reply["completed"] = [list(r) for r in epoch_state.completed_ranges()]
        return reply

    # -- loop ----------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for run in [r for r, s in self.runs.items() if now - s.last_seen > RUN_IDLE_S]:
            self._write_windows(self.runs[run])
            del self.runs[run]
        for run in [r for r, s in self.pull_runs.items() if now - s.last_seen > RUN_IDLE_S]:
            del self.pull_runs[run]
        for state in self.pull_runs.values():
            self._pull_dropped(state, state.table.expire(now), "expired")
        for state in self.runs.values():
            if now - state.windows_written > WINDOW_REFRESH_S:
                self._write_windows(state)
        if self.parent_pid is not None and not _alive(self.parent_pid, self._parent_is_ppid):
            log.info("parent process %d is gone; stopping", self.parent_pid)
            self._stop = True

    def serve_forever(self, poll_ms: int = 200, max_seconds: float | None = None) -> None:
        """Serve until :meth:`stop`, a signal, the parent's death, or ``max_seconds``."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self._stop and (deadline is None or time.monotonic() < deadline):
            if poller.poll(poll_ms):
                for _ in range(1000):  # bounded burst, then housekeeping
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        continue
                    if len(frames) < 2:
                        continue
                    reply = self.handle(frames[1:])
                    try:
                        self.socket.send_multipart([frames[0], *reply], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass  # the peer is gone or not reading: never block on it
            self._housekeeping()

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close(linger=0)
        if getattr(self, "context", None) is not None:
            self.context.term()
        if getattr(self, "_journal", None) is not None:
            for state in self.runs.values():
                self._write_windows(state)
            self._journal.close()
            self._journal = None


def _stats_of(record: dict[str, Any], world_size: int) -> protocol.PlanStats | None:
    """The PlanStats of a journaled decision (None if it has none or they are not valid)."""
    if world_size > protocol.MAX_STATS_RANKS:
        data = {"imbalance": record.get("imbalance"), "equal_step_ms": record.get("equal_step_ms")}
    else:
        data = {k: record.get(k) for k in ("busy_ms", "busy_batch_sizes", "imbalance",
                                           "equal_step_ms")}
    try:
        return protocol.PlanStats.from_dict(data, world_size)
    except ProtocolError:
        return None


def _alive(pid: int, is_parent: bool) -> bool:
    if is_parent:
        # Once the parent dies we are re-parented; its pid may linger as a zombie for a while.
        return os.getppid() == pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the parent dies (belt and braces with the poll check)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def serve(bind: str, journal_path: str | None = None, secret: bytes | None = None,
          parent_pid: int | None = None, ready_file=None) -> int:
    """Run a coordinator in this process until stopped; the CLI and embedded mode call this.

    Prints ``READY <endpoint>`` on ``ready_file`` (stdout by default) once bound.
    """
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[shardbalance coordinator] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if parent_pid is not None:
        _die_with_parent()
    coordinator = Coordinator(bind, journal_path, secret, parent_pid)

    def _on_signal(signum, frame):
        coordinator.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    out = ready_file or sys.stdout
    print(f"READY {coordinator.endpoint}", file=out, flush=True)
    log.info("listening on %s%s (journal: %s)", coordinator.endpoint,
             ", messages authenticated" if coordinator.secret else "", journal_path or "none")
    try:
        coordinator.serve_forever()
    finally:
        coordinator.close()
    return 0
