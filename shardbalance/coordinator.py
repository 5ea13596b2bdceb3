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
              ``samples`` and the median ``busy_ms`` (see :class:`WindowTally`), and ``late``
              (only when any): records of an already closed window that arrived while this
              one was the newest; a later record for the same ``(run, generation, epoch,
              window)`` supersedes an earlier one
    carried   a rank of a new generation runs on the same ``member`` (host/local rank/device)
              as one of the previous generation and took over its measurements (``steps``)
    rejected  a count of refused messages
    compact   the journal was compacted: what follows up to the next non-``snapshot`` record is
              a snapshot of every live run (its ``run`` record, the ``plan`` records of the plans
              kept, its open ``window`` records; a pull run's ``pull_run``, ``pull_restore``,
              ``pull_lease``/``pull_done``/``pull_expire`` and ``pull_complete`` records), each
              marked ``"snapshot": true``, then the tail as usual. A reader reads a compacted
              journal as any other; the file is replaced (os.replace), so a follower re-reads it
              from the start when it shrinks or its inode changes.

Trust (DESIGN §10): a run is bound at creation to its job's run key (the ``run`` record keeps
its ``key_digest`` only); every later request of the run must be signed with that key, so no
one else (another job holding the token included) can move its plans, bump its generation,
replay into it or stop it. Per (run, sender id) the newest sequence number and the reply to it
are kept: an exact resend gets the cached reply, an older sequence number is refused.

Bounds (:class:`Limits`, the ``coordinator`` command's flags): ranks over all live runs, runs,
plans kept per run, senders tracked per run, per-peer ZeroMQ queues (in bytes, through the
high-water marks), the journal's size (compaction). The excess is refused with an error reply.
A request that needs a new decision (whose cost grows with the run's world size) is answered
after the cheap requests received with it, one decision at a time, so a large run's decision
never holds up other runs' stats, pings and cached plans for more than one decision.

A run's generation moves on with each rendezvous round of its job (an elastic restart or a
membership change): the new generation starts with fresh state, keeping the measurements of the
ranks that run on the same hardware as before (each rank names its host, local rank and device
in its stats), so a node joining does not cost the others their history.

A ``status`` request is answered read-only with what every run looks like now (see
:meth:`Coordinator.status`; ``shardbalance status`` prints it).

Runs are isolated by run id, bounded in number, and forgotten when idle. The loop is a
``poll(timeout)`` with housekeeping after every poll; replies are sent without blocking, so a
dead or stalled rank can never stall the others.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from . import protocol
from ._leases import LeaseTable, PullConfig
from ._exceptions import (AuthenticationError, ConfigError, PlanError, ProtocolError,
                          ShardBalanceError)
from ._history import RankHistory, Records
from .plan import Plan, apportion, initial_plan
from .policies import PolicyInput, check_options, check_policy, decide, fit_cost_model

__all__ = ["Coordinator", "serve"]

log = logging.getLogger("shardbalance.coordinator")

#: Decided plans kept per run (requests for older windows are refused); the default of
#: Limits.plans_kept.
PLANS_PER_RUN = 256
MAX_RUNS = 256
#: A run that sent nothing for this long is forgotten (its journal lines stay).
RUN_IDLE_S = 6 * 3600.0
#: At most one log line per this many seconds about rejected messages.
REJECT_LOG_INTERVAL_S = 10.0
#: Per-window aggregates: the newest windows of a run that still collect measurements (a
#: measurement of an older one arrives too late: counted as ``late``), the newest busy times
#: per rank a window's median is taken over, and how often a window that changed is journaled
#: between decisions (so a journal being followed shows the window in progress). Memory:
#: OPEN_WINDOWS x world_size x WINDOW_BUSY_KEPT floats per run.
OPEN_WINDOWS = 2
WINDOW_BUSY_KEPT = 64
WINDOW_REFRESH_S = 30.0
#: Plans whose stats (PlanStats) and encoded reply are kept: all ranks ask within seconds,
#: and a reply encoded once serves them all (per-rank floats cost ~3 us each to encode).
STATS_PER_RUN = 8
#: Requests waiting for a decision while cheap ones are answered first; beyond this many a
#: request is answered in arrival order.
MAX_DEFERRED = 4096
#: The largest reply kept per sender for an exact resend (a plan reply is one object shared by
#: every rank of the window and always kept); a larger one (a pull ``status``) is not.
MAX_CACHED_REPLY = 64 << 10


@dataclass(frozen=True)
class Limits:
    """What requests can make a coordinator hold or compute; the excess is refused.

    Memory is then bounded by about ``max_ranks`` x (HISTORY_PER_RANK x 1.5 x 5 numbers of
    history (see _history.py) + plans_kept plan entries + OPEN_WINDOWS x WINDOW_BUSY_KEPT
    floats + senders_per_rank sender records of at most MAX_CACHED_REPLY bytes), plus per
    connected peer ``queue_bytes`` each way.
    """

    #: World sizes summed over all live runs (plan and pull runs).
    max_ranks: int = 16384
    #: Live runs (plan and pull runs); an idle run is forgotten after RUN_IDLE_S.
    max_runs: int = MAX_RUNS
    #: Decided plans kept per run.
    plans_kept: int = PLANS_PER_RUN
    #: Per connected peer, each way: the ZeroMQ high-water marks are this over the largest
    #: message (MAX_MESSAGE_BYTES), at least 2.
    queue_bytes: int = 16 << 20
    #: The journal is compacted (a snapshot of the live runs, then the tail) when it grows
    #: past this; 0: never.
    journal_max_bytes: int = 256 << 20
    #: Senders (sender ids) tracked per run: this x its world size, at least 64.
    senders_per_rank: int = 4

    def __post_init__(self) -> None:
        for name in ("max_ranks", "max_runs", "plans_kept", "queue_bytes", "senders_per_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Invalid {name}={value!r}: expected an integer >= 1")
        if not isinstance(self.journal_max_bytes, int) or self.journal_max_bytes < 0:
            raise ConfigError(f"Invalid journal_max_bytes={self.journal_max_bytes!r}: expected "
                              "an integer >= 0")

    @property
    def high_water_mark(self) -> int:
        return max(2, self.queue_bytes // protocol.MAX_MESSAGE_BYTES)


class StaleSender(ProtocolError):
    """A sender id older than the coordinator remembers: the sender must start a new one."""

    def __init__(self, message: str, horizon: int) -> None:
        super().__init__(message)
        self.horizon = horizon


@dataclass
class Binding:
    """A run's trust binding: its key, and per sender id the newest sequence number seen and
    the reply to it (for an exact resend). Shared by a plan run and a pull run of one id."""

    run_id: str
    #: The run key; None while only its digest is known (resumed from the journal, not yet
    #: presented again) or for a run created unsigned (no key: unsigned mode only).
    key: bytes | None
    digest: str | None
    #: Sender ids created at or before this time (ms) are refused: a forgotten sender's
    #: messages cannot come back as a replay.
    horizon: int = 0
    #: sender id -> [sequence, request signature, reply kind, reply fields (JSON)], LRU order.
    senders: OrderedDict = field(default_factory=OrderedDict)

    @property
    def keyed(self) -> bool:
        return self.digest is not None


def _loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` can only be reached from this host (or is no ZeroMQ network
    transport at all: binding it then fails with its own error)."""
    scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ""
    if scheme not in ("tcp", "udp", "pgm", "epgm", "ws", "wss", "tipc", "norm", "vmci"):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if ";" in host:  # tcp://source;destination
        host = host.split(";", 1)[1]
    return host in ("localhost", "::1") or host.startswith("127.")


def _before(epochs: np.ndarray, steps: np.ndarray, epoch: int, step: int) -> np.ndarray:
    """Elementwise ``(epochs, steps) < (epoch, step)``."""
    return (epochs < epoch) | ((epochs == epoch) & (steps < step))


#: A log line lists per-rank figures in full up to this many ranks (the journal always does).
_LOG_RANKS = 16


def _brief(values) -> str:
    """Per-rank figures for a log line: all of them for a small world; for a large one the
    first and last four and their spread, so a decision at 4096 ranks stays one readable line."""
    values = list(values)
    if len(values) <= _LOG_RANKS:
        return str(values)
    ordered = sorted(values)
    head = ", ".join(str(v) for v in values[:4])
    tail = ", ".join(str(v) for v in values[-4:])
    return (f"[{head}, ..., {tail}] ({len(values)} ranks: min {ordered[0]}, "
            f"median {ordered[len(ordered) // 2]}, max {ordered[-1]})")


def _row_medians(table: np.ndarray) -> np.ndarray:
    """Each row's median over its non-NaN values (NaN for a row without any), by one sort."""
    ordered = np.sort(table, axis=1)  # NaNs sort last
    n = np.count_nonzero(~np.isnan(table), axis=1)
    rows = np.arange(len(table))
    lo, hi = np.maximum(n - 1, 0) // 2, n // 2
    medians = (ordered[rows, lo] + ordered[rows, np.minimum(hi, table.shape[1] - 1)]) / 2
    return np.where(n > 0, medians, np.nan)


def _rounded(values: np.ndarray, digits: int) -> list:
    """``values`` rounded to ``digits`` decimals as a list, None for NaN (one pass in numpy)."""
    out = np.round(values, digits).tolist()
    if np.isnan(values).any():
        out = [None if v != v else v for v in out]
    return out


class WindowTally:
    """What the ranks measured while one plan window trained: per rank, the steps, the samples
    and a ring of the newest busy times. Journaled as a ``window`` record."""

    def __init__(self, key: tuple[int, int], world_size: int) -> None:
        self.key = key
        self.steps = np.zeros(world_size, dtype=np.int64)
        self.samples = np.zeros(world_size, dtype=np.int64)
        #: Records of older windows (closed before they arrived), counted here, not dropped.
        self.late = np.zeros(world_size, dtype=np.int64)
        self.busy = np.full((world_size, WINDOW_BUSY_KEPT), np.nan)
        self.last_step = -1
        #: Changed since it was last journaled.
        self.dirty = False

    def add(self, records: Records) -> None:
        """Count records (any ranks, each rank's in step order), all of this window."""
        ranks = records.rank
        counts = np.bincount(ranks, minlength=len(self.steps))
        order = np.argsort(ranks, kind="stable")
        sorted_ranks = ranks[order]
        # Each record's place in its rank's ring: the rank's count so far plus its position
        # among the rank's records here; only the newest WINDOW_BUSY_KEPT of them are written.
        first = np.searchsorted(sorted_ranks, sorted_ranks)
        position = np.arange(len(order)) - first
        kept = position >= counts[sorted_ranks] - WINDOW_BUSY_KEPT
        slot = (self.steps[sorted_ranks] + position) % WINDOW_BUSY_KEPT
        self.busy[sorted_ranks[kept], slot[kept]] = records.busy[order][kept]
        self.steps += counts
        self.samples += np.bincount(ranks, weights=records.batch,
                                    minlength=len(self.steps)).astype(np.int64)
        # As counted per rank: the step of each rank's last record.
        last = np.flatnonzero(np.append(sorted_ranks[1:] != sorted_ranks[:-1], True))
        self.last_step = max(self.last_step, int(records.step[order][last].max()))
        self.dirty = True

    def count_late(self, ranks: np.ndarray) -> None:
        """Count records that arrived after the window they belong to was closed."""
        self.late += np.bincount(ranks, minlength=len(self.late))
        self.dirty = True

    def record(self, run: str, generation: int) -> dict[str, Any]:
        medians = _row_medians(self.busy)
        record = {"event": "window", "run": run, "generation": generation,
                  "epoch": self.key[0], "window": self.key[1], "last_step": self.last_step,
                  "steps": self.steps.tolist(), "samples": self.samples.tolist(),
                  "busy_ms": _rounded(medians * 1e3, 3)}
        if self.late.any():
            record["late"] = self.late.tolist()
        return record


@dataclass
class RunState:
    run_id: str
    generation: int
    config: protocol.RunConfig
    last_seen: float = field(default_factory=time.monotonic)
    history: RankHistory = field(init=False)
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
    #: What each rank runs on (``host/local_rank/device``), as its stats said.
    members: list = field(init=False)
    #: When each rank was last heard (monotonic clock; None: not yet).
    heard: list = field(init=False)
    #: The previous generation's history by member, for the ranks of this one that run on
    #: the same hardware (taken over at a rank's first stats, then dropped).
    carried: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = check_options(dict(self.config.options))
        self.history = RankHistory(self.config.world_size, self.generation)
        self._equal: tuple[int, ...] | None = None
        self.members = [None] * self.config.world_size
        self.heard = [None] * self.config.world_size

    def carry_from(self, old: "RunState") -> None:
        """Offer ``old``'s history (an earlier generation of this run) to the ranks of this one
        that name the same member; only members that are unique in ``old``."""
        seen = collections.Counter(m for m in old.members if m is not None)
        lengths = old.history.lengths()
        self.carried = {m: tuple(a.copy() for a in old.history.rows(rank))
                        for rank, m in enumerate(old.members)
                        if m is not None and seen[m] == 1 and lengths[rank]}

    def name(self, rank: int, member: str) -> bool:
        """Record what ``rank`` runs on; take over its earlier history. True if it did."""
        self.members[rank] = member
        found = self.carried.pop(member, None)
        if found is None:
            return False
        # Earlier measurements first: the policy reads history oldest first.
        self.history.carry(rank, *found)
        return True

    def add(self, rank: int, records) -> None:
        """Count one rank's ``(epoch, step, batch_size, busy_s)`` records."""
        self.ingest(Records.of_rank(rank, records))

    def ingest(self, records: Records) -> None:
        """Count records of any ranks (see :class:`RankHistory` for resends and order); the new
        ones also go to the open window each belongs to."""
        new = self.history.add(records)
        self._tally(records if new.all() else records.take(new))

    def _tally(self, records: Records) -> None:
        """Add new records to the open windows they belong to (each to the newest window
        starting at or before its step); those of an older window count as ``late`` in the
        newest one."""
        if not len(records) or not self.windows:
            return
        at = np.zeros(len(records), dtype=np.int64)
        for w in self.windows:
            at += ~_before(records.epoch, records.step, *w.key)
        for index, w in enumerate(self.windows, start=1):
            mine = at == index
            if mine.all():
                w.add(records)
            elif mine.any():
                w.add(records.take(mine))
        late = at == 0
        if late.any():
            self.windows[-1].count_late(records.rank[late])

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
        """Each rank's ``(batch_size, busy_s)`` rows, oldest first (read-only views)."""
        return self.history.observations()

    def equal_split(self) -> tuple[int, ...]:
        """The equal split of the global batch within the bounds (computed once per run)."""
        if self._equal is None:
            cfg = self.config
            self._equal = tuple(apportion([1.0] * cfg.world_size, cfg.global_batch_size,
                                          cfg.min_sizes, cfg.max_sizes, cfg.quantum))
        return self._equal

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
        secret: the token: it authorises creating runs and derives the CURVE key pair the
            transport is encrypted with. ``None``: unsigned mode, refused unless ``bind`` is a
            loopback (or ipc/inproc) address.
        parent_pid: exit when this process is gone (the embedded coordinator's rank 0).
        limits: the bounds (default :class:`Limits`).
    """

    def __init__(self, bind: str, journal_path: str | None = None, secret: bytes | None = None,
                 parent_pid: int | None = None, limits: Limits | None = None) -> None:
        self.secret = secret or None
        self.limits = limits or Limits()
        if self.secret is None and not _loopback(bind):
            raise ConfigError(
                f"Refusing to bind {bind!r} without a token: anyone who can reach it could "
                f"drive every run. Give a token (--token-file, SHARDBALANCE_TOKEN) or bind a "
                f"loopback address (tcp://127.0.0.1:PORT)")
        self.parent_pid = parent_pid
        self._parent_is_ppid = parent_pid == os.getppid()
        self.runs: OrderedDict[str, RunState] = OrderedDict()
        self.pull_runs: OrderedDict[str, PullRun] = OrderedDict()
        self.bindings: dict[str, Binding] = {}
        #: The decision a request :meth:`handle` deferred waits for, and that request opened.
        self.deferred_key: tuple | None = None
        self.deferred_opened: tuple | None = None
        self.rejected = 0
        self._rejected_logged = 0
        self._last_reject_log = 0.0
        self._stop = False
        self.journal_path = journal_path
        #: The journal's size right after the last compaction (a snapshot larger than the
        #: limit is compacted again only once it doubled).
        self._compacted_bytes = 0
        if journal_path:
            self._resume(journal_path)
        self._journal = open(journal_path, "a", encoding="utf-8") if journal_path else None
        self.context = zmq.Context()
        self.socket = protocol.configure_socket(self.context.socket(zmq.ROUTER))
        self.socket.setsockopt(zmq.SNDHWM, self.limits.high_water_mark)
        self.socket.setsockopt(zmq.RCVHWM, self.limits.high_water_mark)
        bind = bind[:-2] + ":*" if bind.endswith(":0") else bind
        if protocol.uses_curve(bind, self.secret):
            protocol.curve_server(self.socket, self.secret)
        if bind.startswith("tcp://[") or bind.startswith("tcp://::"):
            self.socket.setsockopt(zmq.IPV6, 1)
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"Cannot bind the coordinator to {bind!r}: {exc}") from exc
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.secret is None:
            log.warning("no token: unsigned mode on %s; any local user can create runs (a run "
                        "created with a key is still bound to it)", self.endpoint)
        self._write({"event": "start", "endpoint": self.endpoint, "pid": os.getpid(),
                     "authenticated": self.secret is not None,
                     "encrypted": protocol.uses_curve(bind, self.secret)})

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

    def compact(self) -> None:
        """Rewrite the journal as a snapshot of the live runs (see the module docstring), then
        go on appending to it; the old file is replaced atomically."""
        if self._journal is None:
            return
        for state in self.runs.values():
            self._write_windows(state)
        before = self._journal.tell()
        tmp = f"{self.journal_path}.compact"
        now = round(time.time(), 3)
        with open(tmp, "w", encoding="utf-8") as fh:
            def put(record: dict[str, Any]) -> None:
                fh.write(json.dumps({"time": now, **record, "snapshot": True}) + "\n")

            fh.write(json.dumps({"time": now, "event": "compact", "endpoint": self.endpoint,
                                 "replaced_bytes": before}) + "\n")
            for state in self.runs.values():
                put(self._run_record(state))
                for key, plan in state.plans.items():
                    record = {"event": "plan", "run": state.run_id,
                              "generation": state.generation, "epoch": plan.epoch,
                              "window": plan.window, "batch_sizes": list(plan.batch_sizes),
                              "policy": plan.policy, "reason": "(snapshot)",
                              "plan": plan.to_dict()}
                    if plan.predicted_step_s is not None:
                        record["predicted_step_ms"] = round(plan.predicted_step_s * 1e3, 3)
                    record.update(state.stats.get(key, {}))
                    put(record)
                for tally in state.windows:
                    put(tally.record(state.run_id, state.generation))
            for pull in self.pull_runs.values():
                put(self._run_record(pull, "pull_run"))
                for record in pull.table.snapshot():
                    put({**record, "run": pull.run_id})
                for epoch in sorted(pull.completed):
                    put({"event": "pull_complete", "run": pull.run_id, "epoch": epoch,
                         "num_samples": pull.config.num_samples})
            fh.flush()
            os.fsync(fh.fileno())
        self._journal.close()
        os.replace(tmp, self.journal_path)
        self._journal = open(self.journal_path, "a", encoding="utf-8")
        self._compacted_bytes = self._journal.tell()
        log.info("journal compacted: %d bytes -> %d", before, self._compacted_bytes)

    def _resume(self, path: str) -> None:
        """Rebuild runs and their decided plans from an existing journal."""
        if not os.path.exists(path):
            return
        resumed = 0
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    if rec.get("event") in ("run", "pull_run"):
                        self._resume_binding(rec)
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
        while len(self.runs) + len(self.pull_runs) > self.limits.max_runs:
            (self.runs if self.runs else self.pull_runs).popitem(last=False)
        for run in [r for r in self.bindings if r not in self.runs and r not in self.pull_runs]:
            del self.bindings[run]
        if resumed:
            log.info("resumed %d plans of %d runs from %s", resumed, len(self.runs), path)

    def _resume_binding(self, rec: dict[str, Any]) -> None:
        """A journaled run's binding: its key digest only, and every sender id created before
        now refused (the sequence numbers seen before the restart are not journaled), so
        each sender starts a new id and presents the key again."""
        digest = rec.get("key_digest")
        if isinstance(digest, str):
            self.bindings[rec["run"]] = Binding(rec["run"], None, digest,
                                                horizon=int(time.time() * 1000))
        elif not self.secret:
            # Created unsigned (unsigned mode, loopback only): it stays unsigned.
            self.bindings[rec["run"]] = Binding(rec["run"], None, None,
                                                horizon=int(time.time() * 1000))

    # -- requests ------------------------------------------------------------------------

    def handle(self, frames: list[bytes], defer: bool = False,
               opened: tuple | None = None) -> list[bytes] | None:
        """Answer one request (without its routing frame): a reply, or an error reply.

        With ``defer``, a request that needs a new decision returns None untouched (the loop
        answers it after the cheap requests received with it), leaving its opened envelope and
        parsed request in :attr:`deferred_opened`: pass them back as ``opened`` with the same
        frames to answer it without decoding them again (signature and sequence are checked
        again).
        """
        msg_id, key, binding, created = 0, self.secret, None, False
        try:
            msg, body, mac, req = opened or (*protocol.open_envelope(frames), None)
            msg_id = msg["id"]
            if msg.get("type") == "status" or not isinstance(msg.get("run"), str):
                # Read-only requests (ping, status: what an operator holding the token may
                # see) are checked against the token, never against a run's key.
                if not protocol.verify(body, mac, self.secret):
                    raise AuthenticationError("bad or missing signature: the sender does not "
                                              "hold this coordinator's token")
                req = protocol.parse_request(msg)
                kind, fields = self._dispatch(req)
                return protocol.encode_reply(kind, msg_id, fields, key)
            binding, created = self._authorise(msg, body, mac)
            key = binding.key
            sender = self._sequence(binding, msg, _digest(body, mac))
            if sender is not None and sender[0] == msg_id:  # an exact resend
                if sender[3] is None:
                    raise ProtocolError(f"the reply to request {msg_id} was too large to keep "
                                        "for a resend; send it again as a new request")
                return protocol.encode_reply(sender[2], msg_id, sender[3], key)
            if req is None:
                req = protocol.parse_request(msg)
            if defer and self._needs_decision(req):
                if created:
                    del self.bindings[binding.run_id]
                self.deferred_key = (req.run, req.generation, req.epoch, req.window)
                self.deferred_opened = (msg, body, mac, req)
                return None
            try:
                kind, fields = self._dispatch(req)
            except ShardBalanceError as exc:
                self._reject(exc)
                kind, fields = "error", protocol.encode_fields({"error": str(exc)})
            if created and not (binding.run_id in self.runs or binding.run_id in self.pull_runs):
                del self.bindings[binding.run_id]  # the request that would create it failed
            else:
                self._remember_sender(binding, msg, _digest(body, mac), kind, fields)
            return protocol.encode_reply(kind, msg_id, fields, key)
        except StaleSender as exc:
            self._reject(exc)
            return protocol.encode({"type": "error", "id": msg_id, "error": str(exc),
                                    "code": "sender", "horizon": exc.horizon}, key)
        except ShardBalanceError as exc:
            if created:
                self.bindings.pop(binding.run_id, None)
            self._reject(exc)
            return protocol.encode({"type": "error", "id": msg_id, "error": str(exc)}, key)
        except Exception as exc:  # a bug must cost one request, never the service
            log.exception("internal error while handling a request")
            self._reject(exc)
            return protocol.encode({"type": "error", "id": msg_id,
                                    "error": f"internal error: {type(exc).__name__}"}, key)

    def _dispatch(self, req) -> tuple[str, str]:
        """The reply's kind and its fields (JSON, see protocol.encode_fields) for a request."""
        if isinstance(req, protocol.Ping):
            return "pong", "{}"
        if isinstance(req, protocol.PullRequest):
            return "chunk", protocol.encode_fields(self._pull(req))
        if isinstance(req, protocol.PlanRequest):
            return "plan", self._plan_reply(req)
        if isinstance(req, protocol.StatusRequest):
            return "status", protocol.encode_fields(self.status(req.run))
        if isinstance(req, protocol.RecordsReport):
            return "ack", protocol.encode_fields({"accepted": self._ranked(req)})
        return "ack", protocol.encode_fields({"accepted": self._stats(req)})

    def _ranked(self, report: protocol.RecordsReport) -> int:
        """A ``records`` message: the leader's measurements beyond one plan request."""
        state = self._state(report.run, report.generation, None)
        if report.world_size != state.config.world_size:
            raise ProtocolError(f"world_size {report.world_size} differs from the run's "
                                f"{state.config.world_size}")
        records = self._records(state.config.global_batch_size, report)
        state.ingest(records)
        return len(records)

    def _needs_decision(self, req) -> bool:
        if not isinstance(req, protocol.PlanRequest):
            return False
        state = self.runs.get(req.run)
        return state is None or state.generation != req.generation or \
            (req.epoch, req.window) not in state.plans

    def _authorise(self, msg: dict[str, Any], body: bytes, mac: bytes) -> tuple[Binding, bool]:
        """The binding of the message's run, the signature checked against its key; a new
        binding (True) if the message may create the run."""
        run = msg["run"]
        presented = bytes.fromhex(msg["key"]) if isinstance(msg.get("key"), str) else None
        binding = self.bindings.get(run)
        if binding is not None and binding.key is not None:
            if not protocol.verify(body, mac, binding.key):
                raise AuthenticationError(f"run {run!r} refuses this message: it is not signed "
                                          f"with the run's key (only the run's own job holds it)")
            return binding, False
        if binding is not None and binding.keyed:
            # Resumed from the journal: the job presents its key again.
            if presented is None or not hmac.compare_digest(protocol.key_digest(presented),
                                                            binding.digest) \
                    or not protocol.verify(body, mac, presented):
                raise AuthenticationError(f"run {run!r} refuses this message: it is not signed "
                                          f"with the run's key (only the run's own job holds it)")
            binding.key = presented
            return binding, False
        if binding is not None:  # created unsigned (unsigned mode): anyone local may use it
            if not protocol.verify(body, mac, None):
                raise AuthenticationError(f"run {run!r} was created unsigned; this message is "
                                          "signed")
            return binding, False
        if run in self.runs or run in self.pull_runs:
            raise AuthenticationError(f"run {run!r} has no binding")  # not reached: kept in step
        if self.secret is not None:
            if presented is None or not isinstance(msg.get("grant"), str) or \
                    not hmac.compare_digest(protocol.grant(self.secret, run, presented),
                                            msg["grant"]):
                raise AuthenticationError(
                    f"cannot create run {run!r}: the request does not prove the coordinator's "
                    f"token (check SHARDBALANCE_TOKEN / --token-file)")
        if presented is not None and not protocol.verify(body, mac, presented):
            raise AuthenticationError(f"cannot create run {run!r}: the request is not signed "
                                      "with the key it presents")
        if presented is None and not protocol.verify(body, mac, None):
            raise AuthenticationError(f"cannot create run {run!r}: a signed request must "
                                      "present its run key")
        binding = Binding(run, presented,
                          None if presented is None else protocol.key_digest(presented))
        self.bindings[run] = binding
        return binding, True

    def _sequence(self, binding: Binding, msg: dict[str, Any], digest: bytes):
        """Replay check: the sender's record if this is an exact resend, None if new; raises
        for an older sequence number or a forgotten sender."""
        nonce = msg.get("nonce")
        if nonce is None:
            if binding.keyed:
                raise ProtocolError(f"a request of run {binding.run_id!r} must carry a sender "
                                    "id ('nonce') and sequence number")
            return None
        sender = binding.senders.get(nonce)
        if sender is None:
            if protocol.nonce_time(nonce) <= binding.horizon:
                raise StaleSender(f"sender {nonce} of run {binding.run_id!r} is older than what "
                                  f"the coordinator remembers: start a new sender",
                                  binding.horizon)
            return None
        seq = msg["id"]
        if seq < sender[0]:
            raise ProtocolError(f"replayed or reordered request: sequence {seq} of sender "
                                f"{nonce} is older than {sender[0]}")
        if seq == sender[0]:
            if not hmac.compare_digest(bytes(sender[1]), bytes(digest)):
                raise ProtocolError(f"sequence {seq} of sender {nonce} was already used for "
                                    "another request")
            binding.senders.move_to_end(nonce)
            return sender
        return None

    def _remember_sender(self, binding: Binding, msg: dict[str, Any], digest: bytes, kind: str,
                         fields: str) -> None:
        nonce = msg.get("nonce")
        if nonce is None:
            return
        if kind != "plan" and len(fields) > MAX_CACHED_REPLY:
            fields = None  # plan replies are shared by every rank; others are per sender
        binding.senders[nonce] = [msg["id"], bytes(digest), kind, fields]
        binding.senders.move_to_end(nonce)
        world = max([s.config.world_size for s in (self.runs.get(binding.run_id),
                                                    self.pull_runs.get(binding.run_id))
                     if s is not None] or [1])
        cap = max(64, self.limits.senders_per_rank * world)
        while len(binding.senders) > cap:
            old, _ = binding.senders.popitem(last=False)
            binding.horizon = max(binding.horizon, protocol.nonce_time(old))

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
            previous = state
            self._admit(run, req.config.world_size, replacing=self.runs.get(run))
            state = RunState(req.run, req.generation, req.config)
            state.initial_plan(0, 0)  # raises if the bounds cannot hold the batch
            if previous is not None:
                self._write_windows(previous)
                state.carry_from(previous)
            self.runs[run] = state
            self._write(self._run_record(state))
            log.info("run %s generation %d: %d ranks, global batch %d, policy %s", run,
                     generation, state.config.world_size, state.config.global_batch_size,
                     state.config.policy)
        elif req is not None and req.config != state.config:
            raise ConfigError(f"rank {req.rank} of run {run} asks with a configuration that "
                              f"differs from the one the run started with: "
                              f"{state.config.to_dict()}")
        state.last_seen = time.monotonic()
        self.runs.move_to_end(run)
        return state

    def _admit(self, run: str, world_size: int, replacing=None) -> None:
        """Refuse a new run (or generation) the configured bounds cannot hold."""
        states = [*self.runs.values(), *self.pull_runs.values()]
        others = [s for s in states if s is not replacing]
        in_use = sum(s.config.world_size for s in others)
        if in_use + world_size > self.limits.max_ranks:
            raise ConfigError(
                f"run {run!r} declares {world_size} ranks; this coordinator serves at most "
                f"{self.limits.max_ranks} ranks over all live runs and {in_use} are in use "
                f"(coordinator --max-ranks)")
        if replacing is None and len(others) >= self.limits.max_runs:
            raise ConfigError(f"run {run!r} refused: this coordinator serves at most "
                              f"{self.limits.max_runs} live runs (coordinator --max-runs)")

    def _run_record(self, state: RunState | PullRun, event: str = "run") -> dict[str, Any]:
        """A run's journal record (``run`` or ``pull_run``): its config and key digest."""
        binding = self.bindings.get(state.run_id)
        record = {"event": event, "run": state.run_id, "generation": state.generation,
                  "config": state.config.to_dict()}
        if binding is not None and binding.digest is not None:
            record["key_digest"] = binding.digest
        return record

    def _stats(self, report: protocol.StatsReport) -> int:
        state = self._state(report.run, report.generation, None)
        if report.world_size != state.config.world_size:
            raise ProtocolError(f"world_size {report.world_size} differs from the run's "
                                f"{state.config.world_size}")
        for rec in report.records:
            if rec[2] > state.config.global_batch_size:
                raise ProtocolError(f"batch size {rec[2]} exceeds the global batch "
                                    f"{state.config.global_batch_size}")
        if report.member is not None and state.members[report.rank] != report.member:
            if state.name(report.rank, report.member):
                steps = len(state.history[report.rank])
                self._write({"event": "carried", "run": state.run_id,
                             "generation": state.generation, "rank": report.rank,
                             "member": report.member, "steps": steps})
                log.info("run %s generation %d: rank %d (%s) keeps its %d measurements of the "
                         "earlier generation", state.run_id, state.generation, report.rank,
                         report.member, steps)
        state.heard[report.rank] = time.monotonic()
        state.add(report.rank, report.records)
        return len(report.records)

    @staticmethod
    def _records(global_batch_size: int, req) -> Records:
        """A request's ranked measurements (rows and columns) as columns, checked against the
        run's global batch."""
        columns = req.record_columns
        records = Records.concat([
            Records.of_rows(req.records),
            Records.empty() if columns is None else
            Records(*(columns[name] for name in protocol.RECORD_COLUMNS))])
        if len(records):
            big = records.batch > global_batch_size
            if big.any():
                raise ProtocolError(f"batch size {int(records.batch[big][0])} exceeds the "
                                    f"global batch {global_batch_size}")
        return records

    def _remember(self, state: RunState, plan: Plan,
                  stats: protocol.PlanStats | None = None) -> None:
        key = (plan.epoch, plan.window)
        state.plans[key] = plan
        while len(state.plans) > self.limits.plans_kept:
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
        # Checked against the request's configuration (the run's, or _state refuses it) before
        # _state may create a generation: a refused request changes nothing.
        records = self._records(req.config.global_batch_size, req)
        state = self._state(req.run, req.generation, req)
        if len(records):
            # Every rank's measurements, gathered by the job's leader: counted per rank,
            # before the decision, as stats messages would be.
            state.ingest(records)
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
        # Each rank's median of its newest 32 busy times, from one padded table.
        medians = _row_medians(state.history.tail(32))
        busy_ms = _rounded(medians * 1e3, 2)
        last_batch = state.history.tail(1, column=0)[:, 0]
        missing = np.isnan(last_batch)
        busy_batch = np.where(missing, 0, last_batch).astype(np.int64).tolist()
        if missing.any():
            busy_batch = [None if m else b for b, m in zip(busy_batch, missing.tolist())]
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
                f"step {plan.window}: plan {_brief(plan.batch_sizes)} ({state.config.policy}: {reason})")
        if imbalance is not None:
            line += f" | busy ms/step {_brief(busy_ms)} | imbalance {imbalance:.2f}"
        if model is not None:
            equal = state.equal_split()
            predicted_ms = plan.predicted_step_s * 1e3
            equal_ms = model.step_seconds(equal) * 1e3
            record.update(predicted_step_ms=round(predicted_ms, 3), equal_step_ms=round(equal_ms, 3),
                          speedup_vs_equal=(round(equal_ms / predicted_ms, 4) if predicted_ms > 0
                                            else None),
                          alpha_ms=_rounded(np.asarray(model.alphas) * 1e3, 3),
                          beta_ms=_rounded(np.asarray(model.betas) * 1e3, 5))
            speedup = equal_ms / predicted_ms if predicted_ms > 0 else float("nan")
            line += f" | predicted {predicted_ms:.1f} ms/step, {speedup:.2f}x vs equal split"
        self._write(record)
        log.info("%s", line)
        return _stats_of(record, len(busy_ms))

    # -- status --------------------------------------------------------------------------

    def status(self, run: str | None = None) -> dict[str, Any]:
        """What every run (or only ``run``) looks like now; read-only. See
        protocol.parse_status_reply. Per-rank rows (and plan sizes) for at most
        protocol.MAX_STATUS_RANKS ranks in all, newest runs first; the rest is summarized."""
        if run is not None and run not in self.runs and run not in self.pull_runs:
            raise ConfigError(f"unknown run {run!r}: this coordinator serves "
                              f"{len(self.runs) + len(self.pull_runs)} runs")
        now = time.monotonic()
        rows_left, truncated, runs = protocol.MAX_STATUS_RANKS, False, []
        for state in reversed(self.runs.values()):
            if run is not None and state.run_id != run:
                continue
            world = state.config.world_size
            detail = world <= rows_left
            rows_left -= world if detail else 0
            truncated |= not detail
            plan = None
            if state.current is not None:
                predicted = state.current.predicted_step_s
                plan = {"epoch": state.current.epoch, "window": state.current.window,
                        "batch_sizes": list(state.current.batch_sizes) if detail else None,
                        "predicted_step_ms": (None if predicted is None
                                              else round(predicted * 1e3, 3))}
            runs.append({"run": state.run_id, "generation": state.generation,
                         "world_size": world, "global_batch_size": state.config.global_batch_size,
                         "policy": state.config.policy, "idle_s": round(now - state.last_seen, 3),
                         "plan": plan, "ranks": _rank_rows(state, now) if detail else None})
        runs.reverse()
        pulls = [{"run": p.run_id, "generation": p.generation,
                  "world_size": p.config.world_size, "num_samples": p.config.num_samples,
                  "completed_epochs": sorted(p.completed)[-16:],
                  "idle_s": round(now - p.last_seen, 3)}
                 for p in self.pull_runs.values() if run is None or p.run_id == run]
        return {"runs": runs, "pull_runs": pulls, "truncated": truncated}

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
            self._admit(req.run, config.world_size)
            state = PullRun(req.run, req.generation, config)
            self.pull_runs[req.run] = state
            self._write(self._run_record(state, "pull_run"))
            log.info("pull run %s: %d ranks, %d samples, chunks of %d", req.run,
                     config.world_size, config.num_samples, config.chunk_size)
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
        for run in [r for r in self.bindings if r not in self.runs and r not in self.pull_runs]:
            del self.bindings[run]
        for state in self.pull_runs.values():
            self._pull_dropped(state, state.table.expire(now), "expired")
        for state in self.runs.values():
            if now - state.windows_written > WINDOW_REFRESH_S:
                self._write_windows(state)
        if self._journal is not None and self.limits.journal_max_bytes and \
                self._journal.tell() > max(self.limits.journal_max_bytes,
                                           2 * self._compacted_bytes):
            try:
                self.compact()
            except OSError as exc:
                log.warning("journal compaction failed, appending on: %s", exc)
                if self._journal.closed:
                    self._journal = open(self.journal_path, "a", encoding="utf-8")
        if self.parent_pid is not None and not _alive(self.parent_pid, self._parent_is_ppid):
            log.info("parent process %d is gone; stopping", self.parent_pid)
            self._stop = True

    def serve_forever(self, poll_ms: int = 200, max_seconds: float | None = None) -> None:
        """Serve until :meth:`stop`, a signal, the parent's death, or ``max_seconds``.

        Each turn answers every cheap request received (a bounded burst) and then at most one
        request that needs a new decision, so a long decision delays other runs' cheap
        requests by at most itself.
        """
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        # Requests waiting for a decision, grouped by the decision (run, generation, epoch,
        # window) they wait for, oldest group first.
        deferred: OrderedDict[tuple, list] = OrderedDict()
        waiting = 0
        while not self._stop and (deadline is None or time.monotonic() < deadline):
            if poller.poll(0 if deferred else poll_ms):
                for _ in range(1000):  # bounded burst, then a decision and housekeeping
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError:
                        continue
                    if len(frames) < 2:
                        continue
                    reply = self.handle(frames[1:], defer=waiting < MAX_DEFERRED)
                    if reply is None:
                        deferred.setdefault(self.deferred_key, []).append(
                            (frames, self.deferred_opened))
                        waiting += 1
                    else:
                        self._send(frames[0], reply)
            if deferred:
                # One decision, then every request that waited for it (now a cached plan).
                _, group = deferred.popitem(last=False)
                waiting -= len(group)
                for frames, opened in group:
                    self._send(frames[0], self.handle(frames[1:], opened=opened))
            self._housekeeping()

    def _send(self, peer: bytes, reply: list[bytes]) -> None:
        try:
            self.socket.send_multipart([peer, *reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone or not reading: never block on it

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


def _digest(body: bytes, mac: bytes) -> bytes:
    """What identifies a request for the resend check: its signature, or a hash if unsigned."""
    return mac or hashlib.blake2b(body, digest_size=16).digest()


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


#: Samples per busy second are taken over each rank's newest this many steps.
STATUS_STEPS = 8


def _rank_rows(state: RunState, now: float) -> list[dict[str, Any]]:
    """Per rank: what it runs on, its newest step's batch size and busy time, its samples per
    busy second over its newest STATUS_STEPS steps, and how long ago it was heard."""
    rows = []
    busy = state.history.tail(STATUS_STEPS)
    sizes = state.history.tail(STATUS_STEPS, column=0)
    for rank in range(state.config.world_size):
        heard = state.heard[rank]
        measured = ~np.isnan(busy[rank])
        total = float(busy[rank][measured].sum())
        rows.append({"rank": rank, "member": state.members[rank],
                     "batch_size": int(sizes[rank, -1]) if measured.any() else None,
                     "busy_ms": round(float(busy[rank, -1]) * 1e3, 3) if measured.any()
                     else None,
                     "samples_per_s": (round(float(sizes[rank][measured].sum()) / total, 3)
                                       if total > 0 else None),
                     "idle_s": None if heard is None else round(now - heard, 3)})
    return rows


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
          parent_pid: int | None = None, ready_file=None, limits: Limits | None = None) -> int:
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
    coordinator = Coordinator(bind, journal_path, secret, parent_pid, limits)

    def _on_signal(signum, frame):
        coordinator.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    out = ready_file or sys.stdout
    print(f"READY {coordinator.endpoint}", file=out, flush=True)
    log.info("listening on %s%s (journal: %s)", coordinator.endpoint,
             ", CURVE-encrypted, runs bound to their keys" if coordinator.secret else "",
             journal_path or "none")
    try:
        coordinator.serve_forever()
    finally:
        coordinator.close()
    return 0
