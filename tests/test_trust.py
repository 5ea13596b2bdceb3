"""The trust model and the bounds of issue 12, attacked over real sockets.

A run is bound at creation to its job's run key; the token only authorises creating runs.
Every attack here is made by a party that holds the token (another job) or nothing at all, and
each is shown to change nothing: the run's state, history and plans are compared before and
after, and the real job keeps getting the same plans.
"""

import json
import os
import subprocess
import sys
import threading

import pytest
import zmq

from _launch import free_port, read_line, stop_process
from shardbalance import protocol
from shardbalance._exceptions import ConfigError, CoordinatorError, CoordinatorUnavailable
from shardbalance.client import CoordinatorClient
from shardbalance.coordinator import Coordinator, Limits
from shardbalance.report import JournalReader, summarize
from distributed import ThreadedCoordinator
from test_coordinator import plan_fields

TOKEN = b"trust-test-token-0123456789abcdef"
KEY = b"job-a-run-key-0123456789abcdef0123456789"
OTHER = b"job-b-run-key-0123456789abcdef0123456789"
TIMEOUT_MS = 3000


class Running(ThreadedCoordinator):
    def __init__(self, journal=None, token=TOKEN, limits=None):
        super().__init__(journal, token, limits)


@pytest.fixture
def running(tmp_path):
    r = Running(str(tmp_path / "journal.jsonl"))
    yield r
    r.stop()



def sized(run, world):
    """A run of ``world`` ranks, one sample each."""
    return plan_fields(run=run, world=world, global_batch_size=world, max_sizes=[1] * world)


def stats_msg(rank, records, world=3, run="run-a", generation=0):
    return {"type": "stats", "run": run, "generation": generation, "rank": rank,
            "world_size": world, "records": records}


def measured(client, run="run-a", world=3):
    """Rank 2 four times as fast as rank 0, steps 1..7 of epoch 0."""
    for rank, per_sample in enumerate([0.004, 0.002, 0.001]):
        ack = client.request(stats_msg(rank, [[0, s, 32, 0.001 + 32 * per_sample]
                                              for s in range(1, 8)], world, run))
        assert ack["accepted"] == 7


class Raw:
    """A DEALER socket speaking the wire format by hand (CURVE to ``token``'s coordinator)."""

    def __init__(self, endpoint, token=TOKEN):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if token:
            protocol.curve_client(self.sock, token)
        self.sock.connect(endpoint)

    def exchange(self, frames, key):
        self.sock.send_multipart(frames)
        assert self.sock.poll(TIMEOUT_MS), "no reply"
        return protocol.decode(self.sock.recv_multipart(), key)

    def close(self):
        self.sock.close()
        self.ctx.term()


def snapshot(coordinator, run="run-a"):
    state = coordinator.runs[run]
    return (state.generation, state.config, [dict(h) for h in state.history],
            dict(state.plans))


def test_a_generation_bump_from_outside_the_run_changes_nothing(running):
    job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    other_job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=OTHER)
    stranger = CoordinatorClient(running.endpoint, b"not-the-token-0123456789abcdef00",
                                 timeout_s=0.5, retries=1, run_key=OTHER)
    try:
        first = job.plan(**plan_fields())
        measured(job)
        before = snapshot(running.coordinator)
        # A token holder of another job: signed, encrypted, authorised to create runs, but not
        # with this run's key.
        for generation in (1, 7):
            with pytest.raises(CoordinatorError, match="not signed with the run's key"):
                other_job.plan(**plan_fields(generation=generation))
        with pytest.raises(CoordinatorError, match="not signed with the run's key"):
            other_job.request(stats_msg(0, [[0, 9, 32, 9.0]]))
        # Without the token the connection itself fails (CURVE): nothing arrives.
        with pytest.raises(CoordinatorUnavailable):
            stranger.plan(**plan_fields(generation=3))
        # A message presenting no key, signed with the token, or unsigned.
        raw = Raw(running.endpoint)
        try:
            for key in (TOKEN, None):
                body = {"type": "plan", "id": 1, "nonce": protocol.new_nonce(),
                        **plan_fields(generation=5)}
                reply = raw.exchange(protocol.encode(body, key), TOKEN)
                assert reply["type"] == "error" and "run's key" in reply["error"]
        finally:
            raw.close()
        assert snapshot(running.coordinator) == before
        # The real job carries on: same generation, same plan, and it may move on itself.
        assert job.plan(**plan_fields(rank=1)) == first
        moved = job.plan(**plan_fields(generation=1))
        assert moved.generation == 1 and running.coordinator.runs["run-a"].generation == 1
    finally:
        for c in (job, other_job, stranger):
            c.close()


class Recorder:
    """A man in the middle holding the token (so it can pose as the coordinator): it forwards
    each request and keeps a copy of its frames."""

    def __init__(self, upstream):
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        protocol.curve_server(self.front, TOKEN)
        self.front.bind("tcp://127.0.0.1:0")
        self.endpoint = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        protocol.curve_client(self.back, TOKEN)
        self.back.connect(upstream)
        self.captured = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        peer = None
        while not self.stop.is_set():
            for sock, _ in poller.poll(20):
                if sock is self.front:
                    peer, *frames = self.front.recv_multipart()
                    self.captured.append(frames)
                    self.back.send_multipart(frames)
                else:
                    self.front.send_multipart([peer, *self.back.recv_multipart()])

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.front.close()
        self.back.close()
        self.ctx.term()


def test_a_replayed_signed_stats_message_does_not_move_the_plan(tmp_path):
    journal = str(tmp_path / "j.jsonl")
    first = Running(journal)
    recorder = Recorder(first.endpoint)
    job = CoordinatorClient(recorder.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    raw = None
    try:
        job.plan(**plan_fields())
        # Rank 0 reports itself slow, then (newer steps) fast: the plan follows the newer.
        job.request(stats_msg(0, [[0, s, 32, 0.5] for s in range(1, 4)]))
        old = recorder.captured[-1]
        job.request(stats_msg(0, [[0, s, 32, 0.01] for s in range(4, 7)]))
        newest = recorder.captured[-1]
        before = snapshot(first.coordinator)
        raw = Raw(first.endpoint)
        reply = raw.exchange(old, KEY)
        assert reply["type"] == "error" and "older" in reply["error"]
        # The newest one, resent exactly, is answered from the cache and counted once.
        assert raw.exchange(newest, KEY) == {"v": 1, "type": "ack", "id": reply["id"] + 1,
                                             "accepted": 3}
        assert snapshot(first.coordinator) == before
        decided = job.plan(**plan_fields(epoch=1))
        raw.close()
        raw = None
        first.stop()
        first = None
        # After a restart the sequence numbers are gone: a sender created before it is refused
        # (the client starts a new one and carries on).
        second = Running(journal)
        raw = Raw(second.endpoint)
        try:
            for frames in (old, newest):
                reply = raw.exchange(frames, KEY)
                assert reply["type"] == "error" and reply.get("code") == "sender"
            job2 = CoordinatorClient(second.endpoint, TOKEN, timeout_s=2, run_key=KEY)
            job2.sender.nonce = job.sender.nonce  # the same process, as after a restart
            try:
                assert job2.plan(**plan_fields(rank=2, epoch=1)) == decided
            finally:
                job2.close()
            assert second.coordinator.runs["run-a"].history[0] == {}
        finally:
            second.stop()
    finally:
        job.close()
        recorder.close()
        if raw is not None:
            raw.close()
        if first is not None:
            first.stop()


def test_another_job_cannot_take_read_or_stop_a_run(tmp_path):
    running = Running(str(tmp_path / "j.jsonl"), limits=Limits(max_runs=3))
    job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    other = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=OTHER)
    try:
        plan = job.plan(**plan_fields())
        pull = dict(run="pull-a", generation=0, rank=0, world_size=2, client="ab" * 8, epoch=0,
                    num_samples=100, chunk_size=10, min_chunk_size=2, lease_s=30.0,
                    max_leases=2, done=[], held=[], ranges=[])
        chunk = job.pull(**pull, op="lease", want=True)
        before = snapshot(running.coordinator)
        # The same run id, as a new run, to read its plan, or its pull status.
        for attempt in (lambda: other.plan(**plan_fields()),
                        lambda: other.plan(**plan_fields(world=4, global_batch_size=64)),
                        lambda: other.pull(**pull, op="status"),
                        lambda: other.pull(**{**pull, "client": "cd" * 8}, op="lease",
                                           want=True)):
            with pytest.raises(CoordinatorError, match="not signed with the run's key"):
                attempt()
        # Stop it by crowding it out: new runs beyond the bound are refused, never evict it.
        other.plan(**plan_fields(run="b-1"))
        with pytest.raises(CoordinatorError, match="at most 3 live runs"):
            other.plan(**plan_fields(run="b-2"))
        assert snapshot(running.coordinator) == before
        assert job.plan(**plan_fields(rank=2)) == plan
        status = job.pull(**pull, op="status")
        assert status["remaining"] == 100 and chunk["lease"] == [0, 10]
    finally:
        job.close()
        other.close()
        running.stop()


def test_a_resend_gets_the_cached_reply_and_an_older_sequence_is_refused(running):
    job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    raw = Raw(running.endpoint)
    try:
        job.plan(**plan_fields())
        sender = protocol.Sender(TOKEN, KEY)
        msg5 = {**stats_msg(1, [[0, 1, 32, 0.1], [0, 2, 32, 0.1]]), "id": 5}
        first = raw.exchange(sender.encode(msg5), KEY)
        assert first["accepted"] == 2
        rejected = running.coordinator.rejected
        again = raw.exchange(sender.encode(msg5), KEY)
        assert again == first and running.coordinator.rejected == rejected
        # The same sequence number with another message, and an older one: refused.
        other5 = {**stats_msg(1, [[0, 3, 32, 0.1]]), "id": 5}
        reply = raw.exchange(sender.encode(other5), KEY)
        assert reply["type"] == "error" and "already used" in reply["error"]
        reply = raw.exchange(sender.encode({**stats_msg(1, [[0, 4, 32, 0.1]]), "id": 4}), KEY)
        assert reply["type"] == "error" and "older than 5" in reply["error"]
        assert set(running.coordinator.runs["run-a"].history[1]) == {(0, 1), (0, 2)}
        # Two senders in one process (the plan client and the stats thread) are independent.
        other_sender = protocol.Sender(TOKEN, KEY)
        reply = raw.exchange(other_sender.encode({**stats_msg(1, [[0, 3, 32, 0.1]]), "id": 1}),
                             KEY)
        assert reply["accepted"] == 1
    finally:
        raw.close()
        job.close()


def test_senders_beyond_the_bound_are_forgotten_and_cannot_come_back(tmp_path):
    running = Running(limits=Limits(senders_per_rank=1))
    raw = Raw(running.endpoint)
    job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    try:
        job.plan(**plan_fields())
        first = protocol.Sender(TOKEN, KEY)
        captured = first.encode({**stats_msg(0, [[0, 1, 32, 0.1]]), "id": 1})
        assert raw.exchange(captured, KEY)["accepted"] == 1
        for _ in range(70):  # 64 senders at least are kept; these push the first one out
            s = protocol.Sender(TOKEN, KEY)
            raw.exchange(s.encode({**stats_msg(1, [[0, 1, 32, 0.1]]), "id": 1}), KEY)
        reply = raw.exchange(captured, KEY)
        assert reply["type"] == "error" and reply["code"] == "sender"
        # The client of a forgotten sender starts a new one by itself.
        job.sender.nonce = first.nonce
        assert job.request(stats_msg(0, [[0, 2, 32, 0.1]]))["accepted"] == 1
        assert job.sender.nonce != first.nonce
    finally:
        raw.close()
        job.close()
        running.stop()


def test_runs_beyond_the_rank_budget_are_refused_and_others_still_served(tmp_path):
    running = Running(limits=Limits(max_ranks=64))
    job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    big = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=OTHER)
    try:
        assert sum(job.plan(**plan_fields(world=8)).batch_sizes) == 96
        with pytest.raises(CoordinatorError, match=r"declares 65 ranks.*at most 64 ranks"):
            big.plan(**sized("big", 65))
        with pytest.raises(CoordinatorError, match=r"declares 57 ranks.*8 are in use"):
            big.plan(**sized("big", 57))
        with pytest.raises(CoordinatorError, match=r"declares 60 ranks"):
            big.pull(run="bigpull", generation=0, rank=0, world_size=60, client="ab" * 8,
                     epoch=0, num_samples=100, chunk_size=10, min_chunk_size=2, lease_s=30.0,
                     max_leases=2, done=[], held=[], ranges=[], op="lease", want=True)
        assert set(running.coordinator.runs) == {"run-a"} and not running.coordinator.pull_runs
        assert set(running.coordinator.bindings) == {"run-a"}
        # The refused creator may come back within the budget, under its own key.
        assert big.plan(**sized("big", 56)).world_size == 56
        assert job.plan(**plan_fields(world=8, rank=3)).world_size == 8
    finally:
        job.close()
        big.close()
        running.stop()


def start_cli(tmp_path, *flags):
    """``shardbalance coordinator`` in its own process (no GIL shared with the clients)."""
    token = tmp_path / "token"
    token.write_bytes(TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDBALANCE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardbalance", "coordinator", "--token-file", str(token),
         *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = read_line(proc)
    assert line.startswith("READY "), line
    return proc, line.split()[1]


def test_a_new_decision_waits_behind_cheap_requests_of_other_runs(tmp_path):
    world = 4096
    proc, endpoint = start_cli(tmp_path, "--bind", "tcp://127.0.0.1:0", "--max-ranks", "9000")
    raw = Raw(endpoint)
    try:
        small, large = protocol.Sender(TOKEN, KEY), protocol.Sender(TOKEN, OTHER)
        assert raw.exchange(small.encode({"type": "plan", "id": 1, **plan_fields()}),
                            KEY)["type"] == "plan"
        # On one connection, in this order: two new decisions of 4096-rank runs (~0.15 s each
        # here), then a cheap request of another run. ZeroMQ delivers one connection's messages
        # in order; the coordinator answers the cheap one before the second decision.
        for i in range(2):
            raw.sock.send_multipart(large.encode({"type": "plan", "id": 10 + i, **plan_fields(
                run=f"big{i}", world=world, global_batch_size=world, min_sizes=[1] * world,
                max_sizes=[8] * world)}))
        raw.sock.send_multipart(small.encode({"id": 2, **stats_msg(0, [[0, 1, 32, 0.1]])}))
        order = []
        for _ in range(3):
            assert raw.sock.poll(60_000)
            order.append(protocol.open_envelope(raw.sock.recv_multipart())[0]["id"])
        assert sorted(order) == [2, 10, 11]
        assert order.index(2) < 2, order
    finally:
        raw.close()
        stop_process(proc)


def test_journal_compaction_keeps_exact_resume_and_its_readers(tmp_path):
    journal = str(tmp_path / "j.jsonl")
    first = Running(journal, limits=Limits(journal_max_bytes=1))
    job = CoordinatorClient(first.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    reader = JournalReader(journal)
    pull = dict(run="pull-a", generation=0, rank=0, world_size=2, client="ab" * 8, epoch=0,
                num_samples=100, chunk_size=10, min_chunk_size=2, lease_s=30.0, max_leases=2,
                held=[], ranges=[])
    try:
        plans = [job.plan(**plan_fields())]
        for epoch in (1, 2, 3):
            measured(job)
            plans.append(job.plan(**plan_fields(epoch=epoch)))
        a = job.pull(**pull, op="lease", want=True, done=[])
        b = job.pull(**pull, op="lease", want=True, done=[a["lease"]])
        assert reader.poll()
        first.coordinator.stop()
        first.thread.join(10)
        first.coordinator.compact()
        records = [json.loads(line) for line in open(journal)]
        assert records[0]["event"] == "compact"
        assert all(r.get("snapshot") for r in records[1:])
        kinds = [r["event"] for r in records]
        assert kinds.count("plan") == 4 and kinds.count("run") == 1
        assert "key_digest" in records[1] and KEY.hex() not in open(journal).read()
        first.coordinator.close()
        first = None
        # A follower reads the rewritten file afresh; the report reads it as any journal.
        reader.poll()
        assert reader.records[0]["event"] == "compact"
        assert "run-a" in summarize(journal)
        second = Running(journal)
        job2 = CoordinatorClient(second.endpoint, TOKEN, timeout_s=2, run_key=KEY)
        other = CoordinatorClient(second.endpoint, TOKEN, timeout_s=2, run_key=OTHER)
        try:
            assert [job2.plan(**plan_fields(rank=1, epoch=e)) for e in range(4)] == plans
            status = job2.pull(**pull, op="status", done=[])
            assert status["completed"] == [a["lease"]] and status["remaining"] == 90
            # The held chunk is still held: the next lease is a new chunk after it.
            nxt = job2.pull(**{**pull, "client": "cd" * 8, "rank": 1}, op="lease", want=True,
                            done=[])
            assert nxt["lease"][0] >= b["lease"][1]
            # The binding survived compaction and restart.
            with pytest.raises(CoordinatorError, match="run's key"):
                other.plan(**plan_fields(epoch=4))
        finally:
            job2.close()
            other.close()
            second.stop()
    finally:
        job.close()
        if first is not None:
            first.stop()


def test_unsigned_mode_only_on_loopback(tmp_path):
    with pytest.raises(ConfigError, match=r"tcp://0\.0\.0\.0:0.*without a token"):
        Coordinator("tcp://0.0.0.0:0", None, None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDBALANCE_")}
    out = subprocess.run([sys.executable, "-m", "shardbalance", "coordinator", "--bind",
                          "tcp://0.0.0.0:0"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "without a token" in out.stderr
    # On loopback it serves, warns, and a run created with a key is still bound to it.
    running = Running(token=None)
    job = CoordinatorClient(running.endpoint, None, timeout_s=2, run_key=KEY)
    other = CoordinatorClient(running.endpoint, None, timeout_s=2, run_key=OTHER)
    try:
        plan = job.plan(**plan_fields())
        with pytest.raises(CoordinatorError, match="run's key"):
            other.plan(**plan_fields(generation=1))
        assert job.plan(**plan_fields(rank=1)) == plan
    finally:
        job.close()
        other.close()
        running.stop()


def test_cli_bounds_flags_and_ipv6_bind(tmp_path):
    port = free_port()
    proc, endpoint = start_cli(tmp_path, "--bind", f"tcp://[::1]:{port}", "--max-ranks", "4",
                               "--journal-max-mb", "1")
    try:
        assert endpoint.startswith("tcp://[::1]:")
        client = CoordinatorClient(endpoint, TOKEN, timeout_s=5, run_key=KEY)
        try:
            assert client.plan(**plan_fields()).world_size == 3
            with pytest.raises(CoordinatorError, match="at most 4 ranks"):
                client.plan(**plan_fields(run="run-b", world=2))
        finally:
            client.close()
    finally:
        stop_process(proc)


def test_a_run_created_unsigned_is_served_again_after_a_restart(tmp_path):
    journal = str(tmp_path / "journal.jsonl")
    first = Running(journal, token=None)
    client = CoordinatorClient(first.endpoint, None, timeout_s=2)
    try:
        plan = client.plan(**plan_fields())
    finally:
        client.close()
        first.stop()
    second = Running(journal, token=None)
    client = CoordinatorClient(second.endpoint, None, timeout_s=2)
    try:
        assert "run-a" in second.coordinator.runs
        assert client.plan(**plan_fields(rank=1)) == plan
    finally:
        client.close()
        second.stop()


def test_a_job_client_reads_status_with_the_token_not_its_run_key(running):
    job = CoordinatorClient(running.endpoint, TOKEN, timeout_s=2, run_key=KEY)
    try:
        plan = job.plan(**plan_fields())
        status = job.status(run="run-a")
        assert [r["run"] for r in status["runs"]] == ["run-a"], status
        assert list(status["runs"][0]["plan"]["batch_sizes"]) == list(plan.batch_sizes)
    finally:
        job.close()
