"""Pull mode's bookkeeping: which chunks of an epoch are handed out, to whom, until when, done.

The coordinator hands out chunks of positions ``[start, stop)`` of an epoch's order (the rank
maps positions to dataset indices itself, with :class:`shardbalance.order.EpochOrder`). This
module is pure: no sockets, no torch, time passed in, so every rule is tested in-process.

Rules:

* **Least outstanding work.** A chunk goes to whoever asks: fast ranks ask more often and take
  more.
* **Guided self-scheduling.** A new chunk has ``ceil(unissued / (SHRINK * ranks))`` positions,
  clamped to ``[min_chunk_size, chunk_size]``: full chunks while much is left, smaller ones
  near the end, so no rank is left alone with a big last chunk.
* **Leases.** Each hand-out is a lease of one chunk to one client (a sampler instance) with a
  deadline that the client's heartbeats move on. An expired lease (a dead or silent rank) puts
  the chunk back at the head of the queue. A new client on a rank (a restarted process)
  releases the previous client's leases at once.
* **Speculation.** When nothing is left to hand out, an idle client (one holding no lease) gets
  a copy of the oldest outstanding chunk that has fewer than ``max_leases`` leases; the first
  completion wins and a later one is recognised and not counted.
* **Replay.** :meth:`LeaseTable.replay` rebuilds the table from the journal's ``pull_*``
  records, so a restarted coordinator never re-issues a completed chunk.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["PullConfig", "LeaseTable", "summarize_pull", "SHRINK", "merge_ranges"]

#: Guided self-scheduling divisor: a new chunk is at most 1/(SHRINK·ranks) of what is unissued.
SHRINK = 2
#: Epochs kept per run; older ones are forgotten (their records stay in the journal).
EPOCHS_KEPT = 4


@dataclass(frozen=True)
class PullConfig:
    """What every rank of a pull run must agree on; fixed when the run starts."""

    world_size: int
    num_samples: int
    chunk_size: int
    min_chunk_size: int
    lease_s: float
    max_leases: int

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "num_samples": self.num_samples,
                "chunk_size": self.chunk_size, "min_chunk_size": self.min_chunk_size,
                "lease_s": self.lease_s, "max_leases": self.max_leases}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PullConfig":
        return cls(int(data["world_size"]), int(data["num_samples"]), int(data["chunk_size"]),
                   int(data["min_chunk_size"]), float(data["lease_s"]), int(data["max_leases"]))


class Chunk:
    __slots__ = ("start", "stop", "leases", "done", "issued_at")

    def __init__(self, start: int, stop: int, now: float) -> None:
        self.start = start
        self.stop = stop
        #: client -> (rank, deadline)
        self.leases: dict[str, tuple[int, float]] = {}
        self.done = False
        self.issued_at = now


class EpochState:
    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.next_pos = 0
        self.chunks: dict[int, Chunk] = {}
        #: Chunks handed out and not done, by start (insertion order: oldest first).
        self.open: dict[int, Chunk] = {}
        #: Chunks whose every lease expired: handed out again before anything new.
        self.requeued: deque[int] = deque()
        #: Position ranges completed before this table saw them (a restored state_dict).
        self.skip: list[tuple[int, int]] = []
        self.completed_items = 0
        self.completed_at: float | None = None

    @property
    def complete(self) -> bool:
        return self.completed_items >= self.num_samples

    def unissued(self) -> int:
        left = self.num_samples - self.next_pos
        return left - sum(min(b, self.num_samples) - max(a, self.next_pos)
                          for a, b in self.skip if b > self.next_pos)

    def completed_ranges(self) -> list[tuple[int, int]]:
        return merge_ranges([(c.start, c.stop) for c in self.chunks.values() if c.done]
                            + list(self.skip))


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ``[start, stop)`` ranges covering the same positions."""
    merged: list[list[int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


class LeaseTable:
    """The chunks of every epoch of one pull run. Methods take ``now`` (monotonic seconds)."""

    def __init__(self, config: PullConfig) -> None:
        self.config = config
        self.epochs: dict[int, EpochState] = {}
        #: rank -> the client currently speaking for it.
        self.clients: dict[int, str] = {}

    def epoch(self, epoch: int) -> EpochState:
        state = self.epochs.get(epoch)
        if state is None:
            state = self.epochs[epoch] = EpochState(self.config.num_samples)
            while len(self.epochs) > EPOCHS_KEPT:
                del self.epochs[min(self.epochs)]
        return state

    # -- clients -------------------------------------------------------------------------

    def register(self, rank: int, client: str) -> list[tuple[int, int, str, int, int]]:
        """Note that ``client`` speaks for ``rank``; drop an earlier client's leases.

        Returns the dropped leases as ``(epoch, rank, client, start, stop)``.
        """
        previous = self.clients.get(rank)
        self.clients[rank] = client
        if previous is None or previous == client:
            return []
        return self._drop(lambda holder, r, deadline: holder == previous)

    def expire(self, now: float) -> list[tuple[int, int, str, int, int]]:
        """Drop every lease past its deadline; ``(epoch, rank, client, start, stop)`` of each."""
        return self._drop(lambda holder, rank, deadline: deadline < now)

    def _drop(self, predicate) -> list[tuple[int, int, str, int, int]]:
        dropped = []
        for epoch, state in self.epochs.items():
            for chunk in list(state.open.values()):
                gone = [h for h, (r, d) in chunk.leases.items() if predicate(h, r, d)]
                for holder in gone:
                    rank, _ = chunk.leases.pop(holder)
                    dropped.append((epoch, rank, holder, chunk.start, chunk.stop))
                if gone and not chunk.leases and chunk.start not in state.requeued:
                    state.requeued.append(chunk.start)
        return dropped

    def renew(self, epoch: int, client: str, starts: Iterable[int], now: float) -> list[int]:
        """Move the deadlines of ``client``'s leases on; the starts it no longer needs to work
        on (done by someone, or its lease lost)."""
        state = self.epochs.get(epoch)
        stale = []
        for start in starts:
            chunk = None if state is None else state.chunks.get(start)
            if chunk is None or chunk.done or client not in chunk.leases:
                stale.append(start)
                continue
            rank, _ = chunk.leases[client]
            chunk.leases[client] = (rank, now + self.config.lease_s)
        return stale

    def held(self, epoch: int, client: str) -> int:
        state = self.epochs.get(epoch)
        if state is None:
            return 0
        return sum(1 for c in state.open.values() if client in c.leases)

    # -- hand-out and completion ---------------------------------------------------------

    def chunk_size_now(self, state: EpochState) -> int:
        cfg = self.config
        guided = math.ceil(state.unissued() / (SHRINK * cfg.world_size))
        return max(cfg.min_chunk_size, min(cfg.chunk_size, guided))

    def lease(self, epoch: int, rank: int, client: str, now: float
              ) -> tuple[str, Chunk | None]:
        """The next chunk for ``client``: ``(kind, chunk)`` with kind ``new``, ``reissue`` or
        ``speculative``, or ``("wait", None)`` / ``("complete", None)``."""
        state = self.epoch(epoch)
        if state.complete:
            return "complete", None
        while state.requeued:
            chunk = state.chunks[state.requeued.popleft()]
            if not chunk.done and not chunk.leases:
                self._grant(chunk, rank, client, now)
                return "reissue", chunk
        start = self._skip_completed(state)
        if start < state.num_samples:
            stop = min(start + self.chunk_size_now(state), state.num_samples)
            for a, _ in state.skip:
                if start < a < stop:
                    stop = a
            chunk = Chunk(start, stop, now)
            state.chunks[start] = state.open[start] = chunk
            state.next_pos = stop
            self._grant(chunk, rank, client, now)
            return "new", chunk
        if self.held(epoch, client) == 0:
            for chunk in state.open.values():  # oldest first: the likeliest straggler
                if client not in chunk.leases and len(chunk.leases) < self.config.max_leases:
                    self._grant(chunk, rank, client, now)
                    return "speculative", chunk
        return "wait", None

    def _skip_completed(self, state: EpochState) -> int:
        for a, b in state.skip:
            if a <= state.next_pos < b:
                state.next_pos = b
        return state.next_pos

    def _grant(self, chunk: Chunk, rank: int, client: str, now: float) -> None:
        chunk.leases[client] = (rank, now + self.config.lease_s)

    def check_done(self, epoch: int, ranges: Iterable[tuple[int, int]]) -> None:
        """ValueError naming the first of ``ranges`` that is not a chunk handed out in
        ``epoch`` (checked before any completion is applied, so bad input changes nothing)."""
        state = self.epochs.get(epoch)
        for start, stop in ranges:
            chunk = None if state is None else state.chunks.get(start)
            if chunk is None or chunk.stop != stop:
                raise ValueError(f"chunk [{start}, {stop}) of epoch {epoch} was never handed out")

    def done(self, epoch: int, client: str, start: int, stop: int, now: float) -> bool:
        """Record that ``client`` completed ``[start, stop)``; True if this completion counts
        (the first), False for a late duplicate. ValueError for a chunk never handed out."""
        state = self.epochs.get(epoch)
        chunk = None if state is None else state.chunks.get(start)
        if chunk is None or chunk.stop != stop:
            raise ValueError(f"chunk [{start}, {stop}) of epoch {epoch} was never handed out")
        chunk.leases.pop(client, None)
        if chunk.done:
            return False
        chunk.done = True
        state.open.pop(start, None)
        state.completed_items += stop - start
        if state.complete and state.completed_at is None:
            state.completed_at = now
        return True

    def restore(self, epoch: int, ranges: list[tuple[int, int]]) -> bool:
        """Mark ``ranges`` of a fresh epoch completed (a restored ``state_dict``). Refused
        (False) once anything of the epoch was handed out: the ranges then come too late."""
        state = self.epoch(epoch)
        if state.chunks or state.skip:
            return merge_ranges(ranges) == merge_ranges(state.skip) or not ranges
        n = state.num_samples
        for a, b in ranges:
            if not (0 <= a < b <= n):
                raise ValueError(f"completed range [{a}, {b}) is outside [0, {n})")
        state.skip = merge_ranges(ranges)
        state.completed_items = sum(b - a for a, b in state.skip)
        return True

    # -- journal replay ------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Records (without ``run``) that :meth:`replay` rebuilds this table from: each kept
        epoch's restored ranges, its chunks (done, leased, or waiting to be reissued)."""
        out: list[dict[str, Any]] = []
        for epoch, state in sorted(self.epochs.items()):
            if state.skip:
                out.append({"event": "pull_restore", "epoch": epoch, "rank": -1,
                            "ranges": [list(r) for r in state.skip]})
            for chunk in state.chunks.values():
                span = {"epoch": epoch, "start": chunk.start, "stop": chunk.stop}
                if chunk.done or not chunk.leases:
                    out.append({"event": "pull_lease", "rank": -1, "client": "snapshot",
                                "kind": "snapshot", **span})
                    out.append({"event": "pull_done" if chunk.done else "pull_expire",
                                "rank": -1, "client": "snapshot", "counted": chunk.done,
                                **span})
                    continue
                for client, (rank, _) in chunk.leases.items():
                    out.append({"event": "pull_lease", "rank": rank, "client": client,
                                "kind": "snapshot", **span})
        return out

    def replay(self, rec: dict[str, Any], now: float) -> None:
        """Apply one journal record of this run (``pull_lease``, ``pull_done``,
        ``pull_restore``). Leases come back with a fresh deadline: a live rank's heartbeat
        renews its lease, a dead rank's expires as it would have."""
        event, epoch = rec["event"], int(rec["epoch"])
        if event == "pull_restore":
            self.restore(epoch, [tuple(r) for r in rec["ranges"]])
            return
        start, stop = int(rec["start"]), int(rec["stop"])
        if event in ("pull_lease", "pull_done"):
            # Who speaks for each rank: a restarted worker (a new client) then releases its
            # predecessor's leases at once instead of after lease_s.
            self.clients[int(rec["rank"])] = str(rec["client"])
        state = self.epoch(epoch)
        chunk = state.chunks.get(start)
        if event == "pull_lease":
            if chunk is None:
                chunk = Chunk(start, stop, now)
                state.chunks[start] = state.open[start] = chunk
                state.next_pos = max(state.next_pos, stop)
            if not chunk.done:
                chunk.leases[str(rec["client"])] = (int(rec["rank"]), now + self.config.lease_s)
                if chunk.start in state.requeued:
                    state.requeued.remove(chunk.start)
        elif event == "pull_done" and chunk is not None:
            self.done(epoch, str(rec["client"]), start, stop, now)
        elif event == "pull_expire" and chunk is not None:
            chunk.leases.pop(str(rec["client"]), None)
            if not chunk.done and not chunk.leases and start not in state.requeued:
                state.requeued.append(start)


# -- report ------------------------------------------------------------------------------


def summarize_pull(records: list[dict[str, Any]], run: str | None = None,
                   intervals: int = 5) -> list[str]:
    """Lines for ``shardbalance report``: per pull run and epoch, chunks and items per rank,
    throughput per rank over time, re-leases, speculative copies and late duplicates."""
    lines: list[str] = []
    runs: dict[str, dict[int, list[dict]]] = {}
    configs: dict[str, dict] = {}
    for rec in records:
        event = rec.get("event", "")
        if not isinstance(event, str) or not event.startswith("pull_") or \
                (run is not None and rec.get("run") != run):
            continue
        if event == "pull_run":
            configs[rec["run"]] = rec.get("config", {})
            runs.setdefault(rec["run"], {})
        elif "epoch" in rec:
            runs.setdefault(rec["run"], {}).setdefault(int(rec["epoch"]), []).append(rec)
    for run_id, epochs in runs.items():
        cfg = configs.get(run_id, {})
        world = int(cfg.get("world_size", 0)) or 1 + max(
            (int(r.get("rank", 0)) for recs in epochs.values() for r in recs), default=0)
        lines.append(f"pull run {run_id}: {world} ranks, {cfg.get('num_samples', '?')} samples, "
                     f"chunk {cfg.get('chunk_size', '?')} (min {cfg.get('min_chunk_size', '?')}),"
                     f" lease {cfg.get('lease_s', '?')} s")
        for epoch, recs in sorted(epochs.items()):
            lines.extend(_summarize_epoch(epoch, recs, world, intervals))
        lines.append("")
    return lines


def _summarize_epoch(epoch: int, recs: list[dict], world: int, intervals: int) -> list[str]:
    done = [r for r in recs if r["event"] == "pull_done"]
    leases = [r for r in recs if r["event"] == "pull_lease"]
    counted = [r for r in done if r.get("counted", True)]
    times = [r["time"] for r in leases + done if "time" in r]
    t0, t1 = (min(times), max(times)) if times else (0.0, 0.0)
    span = max(t1 - t0, 1e-9)
    complete = any(r["event"] == "pull_complete" for r in recs)
    lines = [f"  epoch {epoch}: {'complete' if complete else 'INCOMPLETE'}, "
             f"{sum(r['stop'] - r['start'] for r in counted)} items in {len(counted)} chunks "
             f"over {t1 - t0:.2f} s; re-leased {sum(r.get('kind') == 'reissue' for r in leases)}"
             f", speculative {sum(r.get('kind') == 'speculative' for r in leases)}, expired "
             f"{sum(r['event'] == 'pull_expire' for r in recs)}, late duplicates "
             f"{len(done) - len(counted)}"]
    edges = [t0 + span * i / intervals for i in range(intervals + 1)]
    header = " ".join(f"{f'{e - t0:.1f}s':>8}" for e in edges[:-1])
    lines.append(f"  {'rank':>4} {'chunks':>6} {'items':>7} {'items/s':>8}   items/s from {header}")
    for rank in range(world):
        mine = [r for r in counted if int(r.get("rank", -1)) == rank]
        items = sum(r["stop"] - r["start"] for r in mine)
        buckets = [0] * intervals
        for r in mine:
            i = min(intervals - 1, int((r.get("time", t0) - t0) / span * intervals))
            buckets[i] += r["stop"] - r["start"]
        rates = " ".join(f"{b / (span / intervals):>8.1f}" for b in buckets)
        lines.append(f"  {rank:>4} {len(mine):>6} {items:>7} {items / span:>8.1f}"
                     f"                {rates}")
    return lines
