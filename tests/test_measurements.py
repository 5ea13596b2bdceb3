"""Measurements reaching the coordinator at scale: columnar records, ``records`` messages ahead
of a plan request, late records counted, and the leader's overflow path on real gloo ranks."""

import json
import time
from types import SimpleNamespace

import pytest
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import distributed
from distributed import free_port, run_ranks, stop_process
from shardbalance import WeightedDistributedSampler
from shardbalance._exceptions import CoordinatorError
from shardbalance._plans import RecordRows, _columns
from shardbalance.client import CoordinatorClient
from shardbalance.emulate import EmulatedSpeed
from test_coordinator import SECRET, Running, plan_fields, running  # noqa: F401 (fixture)

#: Rank 2 four times as fast as rank 0, steps 1..7 of epoch 0, as rows.
ROWS = [[rank, 0, s, 32, 0.001 + 32 * per_sample]
        for rank, per_sample in enumerate([0.004, 0.002, 0.001]) for s in range(1, 8)]


def columns(rows):
    return {name: [r[i] for r in rows]
            for i, name in enumerate(["rank", "epoch", "step", "batch_size", "busy_s"])}


def records_msg(rows=None, cols=None, run="run-a", world=3, generation=0):
    msg = {"type": "records", "run": run, "generation": generation, "rank": 0,
           "world_size": world}
    if rows is not None:
        msg["records"] = rows
    if cols is not None:
        msg["record_columns"] = cols
    return msg


def state_of(running, run="run-a"):
    state = running.coordinator.runs[run]
    return ([dict(h) for h in state.history],
            [(w.key, w.steps.tolist(), w.samples.tolist(), w.late.tolist())
             for w in state.windows])


@pytest.fixture
def two(tmp_path):
    """Two coordinators: one is fed rows, the other the same records otherwise."""
    a, b = Running(str(tmp_path / "a.jsonl")), Running(str(tmp_path / "b.jsonl"))
    clients = [CoordinatorClient(r.endpoint, SECRET, timeout_s=3) for r in (a, b)]
    yield (a, b), clients
    for c in clients:
        c.close()
    for r in (a, b):
        r.stop()


def test_columns_and_records_messages_count_as_rows_do(two):
    (a, b), (ca, cb) = two
    for c in (ca, cb):
        c.plan(**plan_fields())
    plan_a = ca.plan(**plan_fields(epoch=1, records=ROWS))
    # The same records: half in a records message first, the rest as columns in the request.
    assert cb.request(records_msg(cols=columns(ROWS[:10])))["accepted"] == 10
    plan_b = cb.plan(**plan_fields(epoch=1, records=ROWS[10:12],
                                   record_columns=columns(ROWS[12:])))
    assert plan_a.batch_sizes == plan_b.batch_sizes
    assert plan_a.batch_sizes[2] > plan_a.batch_sizes[0]
    assert state_of(a) == state_of(b)
    assert ca.reported[plan_a.digest].busy_ms == cb.reported[plan_b.digest].busy_ms


@pytest.mark.parametrize("bad, named", [
    (("rank", 3, 3), "record_columns['rank'][3] = 3"),
    (("rank", 3, True), "record_columns['rank'][3] = True"),
    (("epoch", 0, -1), "record_columns['epoch'][0] = -1"),
    (("step", 5, 1.5), "record_columns['step'][5] = 1.5"),
    (("batch_size", 2, 0), "record_columns['batch_size'][2] = 0"),
    (("busy_s", 4, 0.0), "record_columns['busy_s'][4] = 0.0"),
    (("busy_s", 6, "0.1"), "record_columns['busy_s'][6] = '0.1'"),
    (("busy_s", 1, 10 ** 400), "record_columns['busy_s'][1]"),
])
def test_a_bad_column_value_is_named_and_changes_nothing(running, bad, named):
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    try:
        client.plan(**plan_fields())
        assert client.request(records_msg(rows=ROWS[:3]))["accepted"] == 3
        before = state_of(running)
        name, at, value = bad
        cols = columns(ROWS)
        cols[name][at] = value
        with pytest.raises(CoordinatorError, match=r"bad record_columns\[") as caught:
            client.request(records_msg(cols=cols))
        assert named in str(caught.value)
        with pytest.raises(CoordinatorError, match="bad record_columns"):
            client.plan(**plan_fields(epoch=1, record_columns=cols))
        assert state_of(running) == before
    finally:
        client.close()


def test_malformed_columns_and_records_of_an_unknown_run_are_refused(running):
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    try:
        with pytest.raises(CoordinatorError, match="unknown run 'run-a'"):
            client.request(records_msg(rows=ROWS))
        client.plan(**plan_fields())
        before = state_of(running)
        short = columns(ROWS)
        short["step"] = short["step"][:-1]
        with pytest.raises(CoordinatorError, match="lists of one length"):
            client.request(records_msg(cols=short))
        missing = columns(ROWS)
        del missing["busy_s"]
        with pytest.raises(CoordinatorError, match="busy_s"):
            client.request(records_msg(cols=missing))
        big = columns(ROWS)
        big["batch_size"][0] = 500
        with pytest.raises(CoordinatorError, match="batch size 500 exceeds the global batch"):
            client.request(records_msg(cols=big))
        with pytest.raises(CoordinatorError, match="world_size 4 differs"):
            client.request(records_msg(rows=[[3, 0, 1, 8, 0.1]], world=4))
        assert state_of(running) == before
    finally:
        client.close()


def test_records_of_a_closed_window_are_counted_late(tmp_path):
    journal = tmp_path / "journal.jsonl"
    running = Running(str(journal))
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    try:
        for window in (0, 2, 4):  # two windows stay open: (0, 2) and (0, 4)
            client.plan(**plan_fields(window=window))
        state = running.coordinator.runs["run-a"]
        assert [w.key for w in state.windows] == [(0, 2), (0, 4)]
        # Step 1 belongs to the closed window (0, 0); steps 2 and 5 to open ones.
        rows = [[1, 0, 1, 8, 0.1], [2, 0, 1, 8, 0.1], [1, 0, 2, 8, 0.1], [1, 0, 5, 8, 0.1]]
        assert client.request(records_msg(rows=rows))["accepted"] == 4
        # A resend is neither counted again nor late.
        assert client.request(records_msg(rows=rows))["accepted"] == 4
        (w2, w4) = state.windows
        assert w2.steps.tolist() == [0, 1, 0] and w4.steps.tolist() == [0, 1, 0]
        assert w4.late.tolist() == [0, 1, 1] and not w2.late.any()
    finally:
        client.close()
        running.stop()
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    newest = [r for r in records if r["event"] == "window" and r["window"] == 4][-1]
    assert newest["late"] == [0, 1, 1] and newest["steps"] == [0, 1, 0]


N, B, DIM = 192, 16, 6  # 12 steps an epoch


def _train_with_small_requests(rank, world, address):
    """The per-request cap patched down to one record: the leader sends the rest of every
    round's records in ``records`` messages ahead of its plan request."""
    import torch

    import shardbalance._planner as planner
    import shardbalance.protocol as protocol

    protocol.MAX_RECORDS_PER_PLAN = 1
    planner._RECORDS_PER_ROUND = (planner.RECORD_MESSAGES + 1) * 1
    measured, record = set(), planner.BackgroundPlanner.record

    def counted_record(self, rec):
        measured.add(tuple(rec[:2]))
        record(self, rec)

    planner.BackgroundPlanner.record = counted_record
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(N, DIM, generator=gen),
                                          torch.randint(0, 3, (N,), generator=gen))
    sampler = WeightedDistributedSampler(data, B, coordinator=address, rebalance_every=2,
                                         timeout_s=5, seed=1)
    loader = DataLoader(data, batch_sampler=sampler)
    model = DDP(torch.nn.Sequential(EmulatedSpeed(1.0 + rank, per_sample_s=0.0002,
                                                  overhead_s=0.002),
                                    torch.nn.Linear(DIM, 3)))
    sampler.attach(model)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            model.zero_grad()
    stats = dict(sampler.planner.stats)
    messages = sampler.plan_source.record_messages
    torch.distributed.barrier()
    sampler.close()
    return len(measured), stats, messages


def test_the_leader_overflow_reaches_the_coordinator_over_gloo(tmp_path):
    port, journal = free_port(), str(tmp_path / "coordinator.jsonl")
    secret = "measurements-test-secret-0123456789"
    proc = distributed.start_coordinator(port, journal, secret)
    try:
        (measured0, stats0, messages), (measured1, *_) = run_ranks(
            _train_with_small_requests, 2, f"tcp://127.0.0.1:{port}",
            env={"SHARDBALANCE_TOKEN": secret}, timeout_s=150)
    finally:
        stop_process(proc)  # the coordinator journals its open windows as it stops
    assert messages > stats0["requests"], (messages, stats0)
    assert stats0.get("records_dropped", 0) == 0
    newest = {}
    for line in open(journal):
        rec = json.loads(line)
        if rec["event"] == "window":
            newest[(rec["generation"], rec["epoch"], rec["window"])] = rec
    counted = [sum(rec["steps"][r] + rec.get("late", [0, 0])[r] for rec in newest.values())
               for r in range(2)]
    # 24 steps trained; a step whose busy time cannot be attributed (an epoch's first, one
    # that spans a plan switch under load) is not measured, so ask only for most of them.
    assert counted == [measured0, measured1] and measured0 >= 12


def leader_plans(client):
    """The leader's CoordinatedPlans of run-a (3 ranks) asking through ``client``."""
    from types import SimpleNamespace

    from shardbalance._plans import CoordinatedPlans

    config = {k: v for k, v in plan_fields().items()
              if k not in ("run", "generation", "rank", "epoch", "window")}
    plans = CoordinatedPlans.__new__(CoordinatedPlans)
    plans.run_id, plans.generation, plans.rank = "run-a", 0, 0
    plans.session = SimpleNamespace(client=client)
    plans.settings = SimpleNamespace(run_config=lambda: SimpleNamespace(
        world_size=3, to_dict=lambda: config), min_sizes=config["min_sizes"],
        max_sizes=config["max_sizes"], batch_size_multiple=config["quantum"])
    plans.record_messages, plans.undelivered, plans.outgoing, plans.delivered = 0, [], [], 0
    plans.timeout_s = 3.0
    plans.fetch = plans._request
    return plans


def test_refused_records_messages_are_kept_and_the_plan_request_still_goes(running,
                                                                          monkeypatch):
    """A coordinator that does not know the run (restarted without it) refuses the records
    messages; the plan request creates the run, and the refused records go with the next."""
    from shardbalance import protocol

    monkeypatch.setattr(protocol, "MAX_RECORDS_PER_PLAN", 2)
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    plans = leader_plans(client)
    plans.outgoing = list(ROWS)
    try:
        plans._request(0, 0)
        assert plans.undelivered == ROWS[:-2] and plans.record_messages == 0
        plans.outgoing, plans.undelivered = plans.undelivered, []
        plans._request(0, 2)
        # 19 rows: 17 ahead of the request, two a message, and 2 with it.
        assert plans.undelivered == [] and plans.record_messages == 9
        history = running.coordinator.runs["run-a"].history
        assert sorted((r, *k) for r in range(3) for k in history[r]) == \
            sorted((r[0], r[1], r[2]) for r in ROWS)
        # The refused (older) records take their places by step: each rank's rows stay in step
        # order, so its newest rows are its newest steps.
        for rank in range(3):
            assert list(history[rank]) == [(r[1], r[2]) for r in ROWS if r[0] == rank]
    finally:
        client.close()


def kept_events(running):
    """The journal's records but the count of refused messages."""
    with open(running.coordinator.journal_path) as fh:
        return [line for line in fh if json.loads(line)["event"] != "rejected"]


def test_a_new_generation_with_a_bad_record_is_refused_before_it_replaces_the_run(running):
    """The batch-size check against the run's global batch comes before the request creates a
    generation: a refused request leaves the run, its history and its journal as they were."""
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    try:
        client.plan(**plan_fields(records=ROWS))
        before = state_of(running)
        journal = kept_events(running)
        bad = columns(ROWS[:2])
        bad["batch_size"][1] = 500
        for extra in ({"record_columns": bad}, {"records": [[0, 0, 9, 500, 0.1]]}):
            with pytest.raises(CoordinatorError, match="batch size 500 exceeds the global"):
                client.plan(**plan_fields(generation=1, **extra))
            state = running.coordinator.runs["run-a"]
            assert state.generation == 0
            assert state_of(running) == before
            assert kept_events(running) == journal  # no new run, generation or plan
    finally:
        client.close()


def test_records_acknowledged_before_a_timeout_midway_are_not_sent_again(running, monkeypatch):
    """The coordinator stops answering at the third of a round's records messages: the two it
    acknowledged are delivered (counted once), the rest and the request's own go next round."""
    from shardbalance import protocol
    from shardbalance._exceptions import CoordinatorUnavailable
    from shardbalance._planner import BackgroundPlanner

    monkeypatch.setattr(protocol, "MAX_RECORDS_PER_PLAN", 2)
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    client.plan(**plan_fields())
    sent, real = [], client.records

    def records(**fields):
        if len(sent) == 2 and not sent[-1] == "timeout":
            sent.append("timeout")
            raise CoordinatorUnavailable("no answer in time (test)")
        sent.append(list(zip(*fields["record_columns"].values())))
        return real(**fields)

    client.records = records
    leader = BackgroundPlanner.__new__(BackgroundPlanner)
    leader.source, leader.pending, leader.epoch = leader_plans(client), list(ROWS), 0
    leader._skip = leader._streak = 0
    leader.stats = {"requests": 0, "records_sent": 0, "failed": 0}
    try:
        rnd = SimpleNamespace(kind="window", target=2)
        assert leader._ask(rnd)[0] != 1.0  # failed
        assert leader.pending == ROWS[4:] and leader.stats["records_sent"] == 4
        leader._skip = 0
        assert leader._ask(SimpleNamespace(kind="window", target=4))[0] == 1.0
        assert leader.pending == [] and leader.stats["records_sent"] == len(ROWS)
        delivered = [tuple(r) for batch in sent if batch != "timeout" for r in batch]
        assert len(delivered) == len(set(delivered)) == len(ROWS) - 2  # 2 with the request
        state = running.coordinator.runs["run-a"]
        assert sum(w.steps.sum() for w in state.windows) == len(ROWS)
        assert sum(len(h) for h in state.history) == len(ROWS)
    finally:
        client.close()


def test_records_messages_stop_at_their_share_of_the_time_and_the_request_still_goes(
        running, monkeypatch):
    """A coordinator that answers every records message slowly: the leader stops sending them
    after half of one request's time (the other ranks wait in the broadcast meanwhile), asks
    for the plan, and keeps the rest for the next round."""
    from shardbalance import protocol

    monkeypatch.setattr(protocol, "MAX_RECORDS_PER_PLAN", 2)
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=3)
    client.plan(**plan_fields())
    real = client.records

    def slow_records(**fields):
        time.sleep(0.25)
        return real(**fields)

    client.records = slow_records
    plans = leader_plans(client)
    plans.timeout_s = 0.8  # records messages get 0.4 s: two of them, not all eight
    plans.outgoing = list(ROWS)
    try:
        plan = plans._request(0, 2)
        assert plan.batch_sizes and plans.record_messages == 2
        assert plans.undelivered == ROWS[4:-2]
        state = running.coordinator.runs["run-a"]
        assert sum(len(h) for h in state.history) == 4 + 2  # two messages and the request's
    finally:
        client.close()


_ROW = st.tuples(st.integers(0, 4095), st.integers(0, 10**6), st.integers(0, 2**40),
                 st.integers(1, 10**6), st.floats(1e-9, 1e5)).map(list)


@settings(max_examples=60, deadline=None)
@given(st.lists(_ROW, max_size=40), st.lists(_ROW, max_size=10), st.integers(-45, 45),
       st.integers(-45, 45))
def test_record_rows_are_the_rows_the_leader_gathered(rows, more, a, b):
    """The leader's array of records sends, slices and extends exactly as the list of rows it
    replaces: the same columns (integers stay integers, busy times bit for bit)."""
    held = RecordRows.of(rows)
    assert held == rows and held.tolist() == rows and len(held) == len(rows)
    assert _columns(held) == (_columns(rows) if rows else {name: [] for name in _columns(
        [[0, 0, 0, 1, 1.0]])})
    assert all(type(v) is int for name, col in _columns(held).items() if name != "busy_s"
               for v in col)
    assert held[a:b] == rows[a:b] and held[-5:] == rows[-5:]
    assert held + more == rows + more and RecordRows.of(held) is held
