"""RankHistory keeps the coordinator's per-rank history rules, in arrays."""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardbalance._history import RankHistory, Records


class DictHistory:
    """The rules as the coordinator wrote them with one OrderedDict per rank."""

    def __init__(self, world: int, generation: int, capacity: int) -> None:
        self.generation, self.capacity = generation, capacity
        self.hist = [OrderedDict() for _ in range(world)]

    def add(self, rank: int, records) -> list[bool]:
        hist = self.hist[rank]
        new = []
        for epoch, step, batch, busy in records:
            seen = hist.get((self.generation, epoch, step))
            new.append(seen is None)  # a key twice in one request counts once
            if seen is None or seen[0] != batch or seen[1] < busy:
                hist[(self.generation, epoch, step)] = (batch, busy)
        # Rows in key order: a late record takes its place by step, not the newest's.
        hist = self.hist[rank] = OrderedDict(sorted(hist.items()))
        while len(hist) > self.capacity:
            hist.popitem(last=False)
        return new

    def carry(self, rank: int, old: OrderedDict) -> None:
        hist = OrderedDict(old)
        hist.update(self.hist[rank])
        while len(hist) > self.capacity:
            hist.popitem(last=False)
        self.hist[rank] = hist


def as_table(history: RankHistory, rank: int) -> list:
    obs, keys = history.rows(rank)
    return [(tuple(k), (int(b), s)) for k, (b, s) in zip(keys.tolist(), obs.tolist())]


record = st.tuples(st.integers(0, 2), st.integers(0, 12), st.sampled_from([4, 8]),
                   st.sampled_from([0.01, 0.02, 0.03]))
# A request: records of several ranks, mostly in step order per rank, with resends.
request = st.lists(st.tuples(st.integers(0, 2), record), max_size=14)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 9), requests=st.lists(request, max_size=8),
       carried=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 20), st.integers(1, 20)),
                        max_size=3, unique_by=lambda c: c[0]),  # once per rank
       sort_some=st.booleans())
def test_rank_history_follows_the_dict_rules(capacity, requests, carried, sort_some):
    world, generation = 3, 5
    ring = RankHistory(world, generation, capacity)
    reference = DictHistory(world, generation, capacity)
    for i, req in enumerate(requests):
        if sort_some:  # the common case: each rank's records in step order
            req = sorted(req, key=lambda r: (r[0], r[1][:2]))
        if i == 1:
            for rank, n, start in carried:  # an earlier generation's rows come first
                old = OrderedDict(((generation - 1, 0, start + j), (8, 0.01 * (j + 1)))
                                  for j in range(n))
                keys = np.array([k for k in old], dtype=np.int64)
                obs = np.array([v for v in old.values()], dtype=np.float64)
                ring.carry(rank, obs, keys)
                reference.carry(rank, old)
        records = Records.of_rows([(rank, *rec) for rank, rec in req])
        new = ring.add(records)
        expected = np.zeros(len(req), dtype=bool)
        for rank in range(world):
            index = [j for j, (r, _) in enumerate(req) if r == rank]
            expected[index] = reference.add(rank, [req[j][1] for j in index])
        assert new.tolist() == expected.tolist()
        for rank in range(world):
            assert as_table(ring, rank) == list(reference.hist[rank].items())
    views = ring.observations()
    for rank, view in enumerate(views):
        assert view.tolist() == [list(v) for v in reference.hist[rank].values()]
        assert not view.flags.writeable


def test_in_order_records_cycle_through_the_buffer():
    ring = RankHistory(2, 0, capacity=4)
    for step in range(20):
        ring.add(Records([0, 1], [0, 0], [step, step], [8, 16], [0.1 * step + 0.1, 0.2]))
    assert [k for k in ring[0]] == [(0, 16), (0, 17), (0, 18), (0, 19)]
    assert ring.tail(2).tolist() == [[pytest.approx(1.9), pytest.approx(2.0)], [0.2, 0.2]]
    wide = ring.tail(6)[0]  # more than a rank holds: NaN first
    assert np.isnan(wide[:2]).all() and wide[2:] == pytest.approx([1.7, 1.8, 1.9, 2.0])
    assert dict(ring[1])[(0, 19)] == (16, 0.2)


def test_a_resend_with_a_larger_busy_time_wins_and_is_not_new():
    ring = RankHistory(1, 0, capacity=8)
    assert ring.add(Records.of_rank(0, [(0, 0, 8, 0.05), (0, 1, 8, 0.01)])).all()
    new = ring.add(Records.of_rank(0, [(0, 1, 8, 0.04), (0, 0, 8, 0.01), (0, 2, 8, 0.02)]))
    assert new.tolist() == [False, False, True]
    assert dict(ring[0]) == {(0, 0): (8, 0.05), (0, 1): (8, 0.04), (0, 2): (8, 0.02)}


def test_a_record_held_back_takes_its_place_by_step_and_a_repeat_counts_once():
    """Steps 4..7 arrive before 0..3 (a refused records message, delivered a round later):
    the rows stay in step order, so the newest rows are the newest steps."""
    ring = RankHistory(1, 0, capacity=6)
    assert ring.add(Records.of_rank(0, [(0, s, 8, 0.01 * s + 0.01) for s in range(4, 8)])).all()
    new = ring.add(Records.of_rank(0, [(0, s, 8, 0.01 * s + 0.01) for s in range(4)]))
    assert new.all()
    assert list(ring[0]) == [(0, s) for s in range(2, 8)]
    assert ring.tail(1).tolist() == [[pytest.approx(0.08)]]
    new = ring.add(Records.of_rank(0, [(0, 9, 8, 0.1), (0, 9, 8, 0.2), (0, 8, 8, 0.1)]))
    assert new.tolist() == [True, False, True]
    assert list(ring[0])[-2:] == [(0, 8), (0, 9)] and ring[0][(0, 9)] == (8, 0.2)


def test_resent_records_of_every_rank_take_the_vectorised_path(monkeypatch):
    """A request retried after a timeout resends what the coordinator holds, for every rank:
    found by one batched search, not the per-record rules (seconds at 4096 ranks)."""
    world = 64
    ring = RankHistory(world, 0, capacity=8)
    ranks = np.repeat(np.arange(world), 4)

    def batch(first, busy):
        steps = np.tile(np.arange(first, first + 4), world)
        return Records(ranks, np.zeros_like(ranks), steps, np.full_like(ranks, 8),
                       np.full(len(ranks), busy))

    for first in (0, 4, 8):
        assert ring.add(batch(first, 0.01)).all()

    def slowly(*args):
        raise AssertionError("the per-record rules ran for a resend")

    monkeypatch.setattr(RankHistory, "_add_slowly", slowly)
    assert not ring.add(batch(8, 0.01)).any()
    assert not ring.add(batch(8, 0.03)).any()  # larger: wins, still not new
    # Half resent, half new, in one request (the tail a failed plan request carried).
    resent_and_new = Records.concat([batch(10, 0.01)])
    new = ring.add(resent_and_new).reshape(world, 4)
    assert not new[:, :2].any() and new[:, 2:].all()
    for rank in range(world):
        assert list(ring[rank]) == [(0, s) for s in range(6, 14)]
        assert ring[rank][(0, 8)] == (8, 0.03) and ring[rank][(0, 10)] == (8, 0.03)
        assert ring[rank][(0, 12)] == (8, 0.01)
    # Two members of each model replica report its rank, gathered into one request (member
    # 0's steps, then member 1's): the slowest kept, each step new once.
    members = Records.concat([batch(14, 0.01), batch(14, 0.05)])
    new = ring.add(members)
    assert new.sum() == world * 4 and new[:world * 4].all()
    for rank in range(world):
        assert list(ring[rank])[-4:] == [(0, s) for s in range(14, 18)]
        assert ring[rank][(0, 15)] == (8, 0.05)


def test_held_back_records_of_every_rank_are_merged_by_key_without_the_fallback(monkeypatch):
    """A restarted coordinator gets the plan request's newest records first, then the older
    ones refused records messages held back: merged into every rank's rows by key."""
    world = 32
    ring = RankHistory(world, 1, capacity=6)
    ring.carry(3, np.array([[8.0, 0.5]]), np.array([[0, 0, 99]]))  # an earlier generation's

    def steps(*numbers, busy=0.01):
        ranks = np.repeat(np.arange(world), len(numbers))
        return Records(ranks, np.zeros_like(ranks), np.tile(numbers, world),
                       np.full_like(ranks, 8), np.full(len(ranks), busy))

    def slowly(*args):
        raise AssertionError("the per-record rules ran")

    monkeypatch.setattr(RankHistory, "_add_slowly", slowly)
    assert ring.add(steps(8, 9)).all()
    new = ring.add(steps(2, 3, 9, 5, busy=0.02)).reshape(world, 4)  # 9: held, resent
    assert new.tolist() == [[True, True, False, True]] * world
    for rank in range(world):
        assert list(ring[rank]) == ([(0, 0, 99)] if rank == 3 else []) + \
            [(0, 2), (0, 3), (0, 5), (0, 8), (0, 9)]
        assert ring[rank][(0, 9)] == (8, 0.02)
    assert ring.add(steps(0, 1, 4)).all()  # beyond capacity: the oldest keys go
    assert [list(ring[r]) for r in (0, 3)] == [[(0, s) for s in (1, 2, 3, 4, 5, 8, 9)][-6:]] * 2
    assert ring.add(steps(10)).all() and list(ring[0])[-1] == (0, 10)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity 0"):
        RankHistory(2, 0, capacity=0)


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([4, 8]),
                                           st.floats(0.001, 1.0)), max_size=90), max_size=4))
def test_a_window_tally_counts_as_the_per_record_loop_did(batches):
    from shardbalance.coordinator import WINDOW_BUSY_KEPT, WindowTally

    tally, step = WindowTally((0, 0), 3), 0
    steps, samples = [0] * 3, [0] * 3
    rings = [[np.nan] * WINDOW_BUSY_KEPT for _ in range(3)]
    last = -1
    for batch in batches:
        rows = []
        for rank, size, busy in batch:
            rows.append((rank, 0, step, size, busy))
            step += 1
        if not rows:
            continue
        tally.add(Records.of_rows(rows))
        for rank in range(3):  # each rank's records in order, as the coordinator counted them
            mine = [r for r in rows if r[0] == rank]
            for _, _, s, size, busy in mine:
                rings[rank][steps[rank] % WINDOW_BUSY_KEPT] = busy
                steps[rank] += 1
                samples[rank] += size
            if mine:
                last = max(last, mine[-1][2])
    assert tally.steps.tolist() == steps and tally.samples.tolist() == samples
    assert tally.last_step == last
    np.testing.assert_array_equal(tally.busy, np.array(rings))
