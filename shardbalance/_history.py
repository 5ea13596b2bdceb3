"""Per-rank measurement history of one run generation, kept in numpy arrays.

Each rank holds at most ``capacity`` rows ``(batch_size, busy_s)``, oldest first, each keyed by
``(generation, epoch, step)``. The rules (the coordinator's since the start):

- a record whose ``(epoch, step)`` this generation already holds overwrites it in place when its
  batch size differs or its busy time is larger (a resent report counts once; the members of
  one model replica all report its data-parallel rank, which is as busy as its slowest member);
- otherwise it is new (a key repeated within one batch counts once) and takes its place in
  key order (``(generation, epoch, step)``: a record that arrives after newer ones, e.g. one
  a refused ``records`` message held back, goes before them); beyond ``capacity`` rows the
  oldest go (after a whole batch of records is in, so records of one batch see each other);
- rows carried over from an earlier generation come first and keep their generation, so they
  never match a record of this one.

A rank's rows live in one contiguous stretch of a buffer ``capacity + slack`` rows long, moved
to the front when it reaches the end, so :meth:`RankHistory.observations` hands out read-only
views without copying. A whole request is ingested in a few numpy operations: records after
everything their rank holds are appended, resends of held rows (a request retried after a
timeout) found by one batched binary search, the members of one model replica reporting the
same step collapsed to the slowest, and records older than a rank's newest that it does not
hold (held back by a refused ``records`` message) merged into its rows by key; only a rank
with one step reported at different batch sizes in one request (whose outcome depends on the
order) goes through the per-record rules.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .policies import HISTORY_PER_RANK

__all__ = ["RankHistory", "Records"]

#: Columns of :attr:`RankHistory.keys`.
_GEN, _EPOCH, _STEP = 0, 1, 2


class Records:
    """Measurements as columns: ``rank, epoch, step, batch, busy`` (equal-length 1-D arrays)."""

    __slots__ = ("rank", "epoch", "step", "batch", "busy")

    def __init__(self, rank, epoch, step, batch, busy) -> None:
        self.rank = np.asarray(rank, dtype=np.int64)
        self.epoch = np.asarray(epoch, dtype=np.int64)
        self.step = np.asarray(step, dtype=np.int64)
        self.batch = np.asarray(batch, dtype=np.int64)
        self.busy = np.asarray(busy, dtype=np.float64)

    @classmethod
    def of_rows(cls, rows) -> "Records":
        """From ``(rank, epoch, step, batch_size, busy_s)`` rows."""
        if not rows:
            return cls.empty()
        ints = np.array([r[:4] for r in rows], dtype=np.int64)
        return cls(ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3], [r[4] for r in rows])

    @classmethod
    def of_rank(cls, rank: int, rows) -> "Records":
        """From one rank's ``(epoch, step, batch_size, busy_s)`` rows."""
        return cls.of_rows([(rank, *r) for r in rows])

    @classmethod
    def empty(cls) -> "Records":
        return cls(*([[]] * 5))

    @classmethod
    def concat(cls, parts) -> "Records":
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, n) for p in parts]) for n in cls.__slots__))

    def take(self, index) -> "Records":
        return Records(*(getattr(self, n)[index] for n in self.__slots__))

    def __len__(self) -> int:
        return len(self.rank)


def _after(e1, s1, e0, s0):
    """Elementwise ``(e1, s1) > (e0, s0)``."""
    return (e1 > e0) | ((e1 == e0) & (s1 > s0))


def _before(e1, s1, e0, s0):
    """Elementwise ``(e1, s1) < (e0, s0)``."""
    return (e1 < e0) | ((e1 == e0) & (s1 < s0))


class RankHistory:
    """The rows of every rank of one generation (see the module docstring).

    Args:
        world_size: ranks.
        generation: the generation new records belong to.
        capacity: rows kept per rank. Default: ``policies.HISTORY_PER_RANK``.
    """

    def __init__(self, world_size: int, generation: int,
                 capacity: int = HISTORY_PER_RANK) -> None:
        if capacity < 1:
            raise ValueError(f"Invalid capacity {capacity}: expected an integer >= 1")
        self.world_size, self.generation, self.capacity = world_size, generation, capacity
        self.slack = max(1, capacity // 2)
        size = capacity + self.slack
        # np.zeros: pages are only touched (and resident) once rows reach them.
        self.obs = np.zeros((world_size, size, 2))
        self.keys = np.zeros((world_size, size, 3), dtype=np.int64)
        self.start = np.zeros(world_size, dtype=np.int64)
        self.end = np.zeros(world_size, dtype=np.int64)
        #: The newest (epoch, step) of this generation appended per rank (-1: none), an upper
        #: bound on what it holds: a record after it is new.
        self.top = np.full((world_size, 2), -1, dtype=np.int64)

    # -- reading ---------------------------------------------------------------------------

    def lengths(self) -> np.ndarray:
        return self.end - self.start

    def rows(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A rank's ``(batch, busy)`` rows and their ``(generation, epoch, step)`` keys (views)."""
        lo, hi = self.start[rank], self.end[rank]
        return self.obs[rank, lo:hi], self.keys[rank, lo:hi]

    def observations(self) -> tuple[np.ndarray, ...]:
        """Each rank's ``(batch_size, busy_s)`` rows, oldest first, as read-only views."""
        frozen = self.obs.view()
        frozen.flags.writeable = False  # and so is every slice of it
        return tuple(frozen[rank, lo:hi] for rank, lo, hi in
                     zip(range(self.world_size), self.start.tolist(), self.end.tolist()))

    def tail(self, n: int, column: int = 1) -> np.ndarray:
        """``(world_size, n)``: each rank's newest ``n`` values of ``column`` (1: busy, 0:
        batch), oldest first, NaN where a rank has fewer rows."""
        index = self.end[:, None] - n + np.arange(n)
        valid = index >= self.start[:, None]
        rows, width = self.obs.shape[1], self.obs.shape[2]
        flat = (np.arange(self.world_size)[:, None] * rows + np.maximum(index, 0)) * width
        values = np.take(self.obs.reshape(-1), flat + column)
        return np.where(valid, values, np.nan)

    def __len__(self) -> int:
        return self.world_size

    def __getitem__(self, rank: int) -> "RankView":
        if not -self.world_size <= rank < self.world_size:
            raise IndexError(f"rank {rank} out of range for {self.world_size} ranks")
        return RankView(self, rank % self.world_size)

    def __iter__(self):
        return (RankView(self, r) for r in range(self.world_size))

    # -- writing ---------------------------------------------------------------------------

    def add(self, records: Records) -> np.ndarray:
        """Ingest ``records`` (any ranks, each rank's in the order they were measured).

        Returns a mask over ``records``: those whose ``(epoch, step)`` the rank did not hold
        before them (the ones to count as new measurements; a key repeated within ``records``
        counts once).
        """
        n = len(records)
        new = np.ones(n, dtype=bool)
        if not n:
            return new
        # By rank, then key; stable, so a key's records keep their order.
        order = np.lexsort((records.step, records.epoch, records.rank))
        rec = records.take(order)
        ranks = rec.rank
        first = np.ones(n, dtype=bool)
        first[1:] = ranks[1:] != ranks[:-1]
        starts = np.flatnonzero(first)
        group = np.cumsum(first) - 1
        counts = np.diff(np.append(starts, n))
        granks = ranks[starts]
        # A key several times (the members of one model replica report its rank, gathered in
        # one request): one record, the slowest, when they agree on the batch size (what the
        # rules leave); the first of them is the new one.
        lead = first.copy()
        lead[1:] |= (rec.epoch[1:] != rec.epoch[:-1]) | (rec.step[1:] != rec.step[:-1])
        busy, mixed = rec.busy, np.zeros(n, dtype=bool)
        if not lead.all():
            heads = np.flatnonzero(lead)
            per_key = np.cumsum(lead) - 1
            busy = np.maximum.reduceat(rec.busy, heads)[per_key]
            mixed = (np.minimum.reduceat(rec.batch, heads)
                     != np.maximum.reduceat(rec.batch, heads))[per_key]
        # The vectorised path takes a rank's records when each key is either after everything
        # the rank holds (appended) or a key it holds (a resend: overwritten in place, not
        # new); anything else (a record older than the rank's newest that it does not hold,
        # a key repeated with different batch sizes) goes through the per-record rules.
        fresh = _after(rec.epoch, rec.step, self.top[ranks, 0], self.top[ranks, 1])
        at = np.full(n, -1, dtype=np.int64)
        if not fresh.all():
            old = np.flatnonzero(~fresh & lead)
            at[old] = self._find(ranks[old], rec.epoch[old], rec.step[old])
        known = at >= 0
        appended = np.add.reduceat((fresh & lead).astype(np.int64), starts)
        fast = (np.logical_and.reduceat((fresh | known | ~lead) & ~mixed, starts)
                & (appended <= self.slack))
        # The rest: merged with the rank's rows in numpy, but a key repeated with different
        # batch sizes (whose outcome depends on the order): the per-record rules.
        slow = np.logical_or.reduceat(mixed, starts)
        for g in np.flatnonzero(slow).tolist():
            lo = starts[g]
            new[order[lo:lo + counts[g]]] = self._add_slowly(int(granks[g]), rec, lo,
                                                             lo + counts[g])
        merged = (~fast & ~slow)[group]
        if merged.any():
            self._merge(rec, busy, lead, known, at, merged, order, new)
        mine = fast[group]
        if not mine.any():
            return new
        new[order[mine & ~lead]] = False
        resent = np.flatnonzero(known & mine)
        if len(resent):
            self._overwrite(ranks[resent], at[resent], rec.batch[resent], busy[resent])
            new[order[resent]] = False
        rows = np.flatnonzero(fresh & lead & mine)
        if not len(rows):
            return new
        fg, fcounts = np.unique(ranks[rows], return_counts=True)
        # Move a rank's rows to the front of its buffer when the new ones would pass its end.
        full = self.end[fg] + fcounts > self.obs.shape[1]
        if full.any():
            self._compact(fg[full])
        offset = np.arange(len(rows)) - np.repeat(np.cumsum(fcounts) - fcounts, fcounts)
        rank_of = np.repeat(fg, fcounts)
        at = self.end[rank_of] + offset
        self.obs[rank_of, at, 0] = rec.batch[rows]
        self.obs[rank_of, at, 1] = busy[rows]
        self.keys[rank_of, at, _GEN] = self.generation
        self.keys[rank_of, at, _EPOCH] = rec.epoch[rows]
        self.keys[rank_of, at, _STEP] = rec.step[rows]
        last = rows[np.cumsum(fcounts) - 1]
        self.top[fg, 0], self.top[fg, 1] = rec.epoch[last], rec.step[last]
        self.end[fg] += fcounts
        self.start[fg] = np.maximum(self.start[fg], self.end[fg] - self.capacity)
        return new

    def _merge(self, rec: Records, busy, lead, known, at, mine, order, new) -> None:
        """Records ``rec[mine]`` (whole ranks, keys in order, ``busy`` the slowest of a
        repeated key) merged with their ranks' rows by key, the newest ``capacity`` kept."""
        resent = np.flatnonzero(known & mine)
        if len(resent):
            self._overwrite(rec.rank[resent], at[resent], rec.batch[resent], busy[resent])
            new[order[resent]] = False
        new[order[mine & ~lead]] = False
        add = np.flatnonzero(mine & lead & ~known)
        if not len(add):
            return
        ranks = np.unique(rec.rank[add])
        lo, length = self.start[ranks], self.end[ranks] - self.start[ranks]
        held = np.repeat(ranks, length)
        row = np.repeat(lo - (np.cumsum(length) - length), length) + np.arange(length.sum())
        keys = np.concatenate([self.keys[held, row], np.column_stack(
            [np.full(len(add), self.generation), rec.epoch[add], rec.step[add]])])
        obs = np.concatenate([self.obs[held, row],
                              np.column_stack([rec.batch[add], busy[add]])])
        owner = np.concatenate([held, rec.rank[add]])
        by_key = np.lexsort((keys[:, _STEP], keys[:, _EPOCH], keys[:, _GEN], owner))
        keys, obs, owner = keys[by_key], obs[by_key], owner[by_key]
        total = np.bincount(owner, minlength=self.world_size)[ranks]
        kept = np.minimum(total, self.capacity)
        place = np.arange(len(owner)) - np.repeat(np.cumsum(total) - total, total) \
            - np.repeat(total - kept, total)
        keep = place >= 0
        self.obs[owner[keep], place[keep]] = obs[keep]
        self.keys[owner[keep], place[keep]] = keys[keep]
        self.start[ranks], self.end[ranks] = 0, kept
        newest = keys[np.cumsum(total) - 1]
        ours = newest[:, _GEN] == self.generation
        self.top[ranks] = np.where(ours[:, None], newest[:, 1:], -1)

    def _find(self, ranks: np.ndarray, epochs: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Where each rank holds ``(generation, epoch, step)`` in its buffer, -1 where it does
        not: one binary search over every rank's rows at once (they are in key order)."""
        lo, hi = self.start[ranks], self.end[ranks].copy()
        last = self.keys.shape[1] - 1
        gen = self.generation
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = np.minimum((lo + hi) // 2, last)
            k = self.keys[ranks, mid]
            less = (k[:, _GEN] < gen) | ((k[:, _GEN] == gen) & _before(
                k[:, _EPOCH], k[:, _STEP], epochs, steps))
            lo = np.where(active & less, mid + 1, lo)
            hi = np.where(active & ~less, mid, hi)
        k = self.keys[ranks, np.minimum(lo, last)]
        found = ((lo < self.end[ranks]) & (k[:, _GEN] == gen) & (k[:, _EPOCH] == epochs)
                 & (k[:, _STEP] == steps))
        return np.where(found, lo, -1)

    def _overwrite(self, ranks, at, batch, busy) -> None:
        """A resend of rows held at ``at``: it wins if its batch size differs or its busy time
        is larger."""
        held = self.obs[ranks, at]
        wins = (held[:, 0] != batch) | (held[:, 1] < busy)
        if wins.any():
            self.obs[ranks[wins], at[wins], 0] = batch[wins]
            self.obs[ranks[wins], at[wins], 1] = busy[wins]

    def _compact(self, ranks: np.ndarray) -> None:
        """Move the rows of ``ranks`` to the front of their buffers."""
        for rank in ranks.tolist():
            lo, hi = self.start[rank], self.end[rank]
            self.obs[rank, :hi - lo] = self.obs[rank, lo:hi]
            self.keys[rank, :hi - lo] = self.keys[rank, lo:hi]
            self.start[rank], self.end[rank] = 0, hi - lo

    def _add_slowly(self, rank: int, rec: Records, lo: int, hi: int) -> np.ndarray:
        """The per-record rules for one rank's records ``rec[lo:hi]``; their new mask."""
        table = self._table(rank)
        gen = self.generation
        keys = list(zip(rec.epoch[lo:hi].tolist(), rec.step[lo:hi].tolist()))
        new = np.zeros(hi - lo, dtype=bool)
        for i, ((epoch, step), batch, busy) in enumerate(zip(keys, rec.batch[lo:hi].tolist(),
                                                              rec.busy[lo:hi].tolist())):
            seen = table.get((gen, epoch, step))
            new[i] = seen is None  # a key repeated in one request counts once
            if seen is None or seen[0] != batch or seen[1] < busy:
                table[(gen, epoch, step)] = (batch, busy)
        self._store(rank, table)
        return new

    def _table(self, rank: int) -> OrderedDict:
        obs, keys = self.rows(rank)
        return OrderedDict(zip(map(tuple, keys.tolist()),
                               ((int(b), s) for b, s in obs.tolist())))

    def _store(self, rank: int, table: OrderedDict) -> None:
        """Replace a rank's rows with ``table``'s newest ``capacity``, in key order (a record
        that arrives after newer ones, e.g. one a refused message held back, takes its place
        by step, not the newest's)."""
        items = sorted(table.items())[-self.capacity:]
        n = len(items)
        if n:
            self.keys[rank, :n] = [k for k, _ in items]
            self.obs[rank, :n] = [v for _, v in items]
            mine = [k[1:] for k, _ in items if k[0] == self.generation]
            self.top[rank] = max(mine) if mine else (-1, -1)
        else:
            self.top[rank] = (-1, -1)
        self.start[rank], self.end[rank] = 0, n

    def carry(self, rank: int, obs: np.ndarray, keys: np.ndarray) -> None:
        """Put an earlier generation's rows (``obs``/``keys`` as :meth:`rows` gives) before
        ``rank``'s own, keeping the newest ``capacity``."""
        mine_obs, mine_keys = self.rows(rank)
        all_obs, all_keys = np.concatenate([obs, mine_obs]), np.concatenate([keys, mine_keys])
        # In key order (a rank that takes over a second member's rows), as lookups need.
        by_key = np.lexsort(all_keys.T[::-1])
        all_obs, all_keys = all_obs[by_key][-self.capacity:], all_keys[by_key][-self.capacity:]
        n = len(all_obs)
        self.obs[rank, :n], self.keys[rank, :n] = all_obs, all_keys
        self.start[rank], self.end[rank] = 0, n


class RankView(Mapping):
    """One rank's history as a read-only mapping, oldest first: ``(epoch, step)`` (this
    generation) or ``(generation, epoch, step)`` (carried over) -> ``(batch_size, busy_s)``."""

    __slots__ = ("_history", "_rank")

    def __init__(self, history: RankHistory, rank: int) -> None:
        self._history, self._rank = history, rank

    def _items(self):
        obs, keys = self._history.rows(self._rank)
        gen = self._history.generation
        for (g, e, s), (b, busy) in zip(keys.tolist(), obs.tolist()):
            yield ((e, s) if g == gen else (g, e, s)), (int(b), busy)

    def __getitem__(self, key):
        for k, v in self._items():
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._items())

    def __len__(self) -> int:
        return int(self._history.end[self._rank] - self._history.start[self._rank])
