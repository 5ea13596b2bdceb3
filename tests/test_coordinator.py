"""The coordinator on a real ZeroMQ socket: round trips, one plan per window, hostile input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from distributed import read_line, stop_process
from shardbalance import protocol
from shardbalance._exceptions import CoordinatorError, CoordinatorUnavailable
from shardbalance.client import CoordinatorClient, EmbeddedCoordinator
from distributed import ThreadedCoordinator

SECRET = b"0123456789abcdef0123456789abcdef"


class Running(ThreadedCoordinator):
    def __init__(self, journal=None, secret=SECRET):
        super().__init__(journal, secret)


@pytest.fixture
def running(tmp_path):
    r = Running(str(tmp_path / "journal.jsonl"))
    yield r
    r.stop()


def plan_fields(rank=0, world=3, epoch=0, window=0, run="run-a", generation=0, **extra):
    fields = dict(run=run, generation=generation, rank=rank, world_size=world, epoch=epoch,
                  window=window, global_batch_size=96, policy="affine",
                  min_sizes=[1] * world, max_sizes=[96] * world, quantum=1,
                  initial_weights=None, options={})
    fields.update(extra)
    return fields


def stats(client, rank, records, world=3, run="run-a", generation=0):
    return client.request({"type": "stats", "run": run, "generation": generation, "rank": rank,
                           "world_size": world, "records": records})


def test_every_rank_gets_the_same_plan_decided_once(running):
    clients = [CoordinatorClient(running.endpoint, SECRET, timeout_s=2) for _ in range(3)]
    try:
        first = [c.plan(**plan_fields(rank=r)) for r, c in enumerate(clients)]
        assert len({p.digest for p in first}) == 1
        assert first[0].batch_sizes == (32, 32, 32)
        # Measurements: rank 2 is four times as fast as rank 0.
        for rank, per_sample in enumerate([0.004, 0.002, 0.001]):
            ack = stats(clients[rank], rank, [[0, s, 32, 0.001 + 32 * per_sample]
                                              for s in range(1, 8)])
            assert ack["accepted"] == 7
        second = clients[1].plan(**plan_fields(rank=1, epoch=1))
        assert second.batch_sizes[2] > second.batch_sizes[1] > second.batch_sizes[0]
        assert sum(second.batch_sizes) == 96
        # More measurements do not change a plan already decided.
        stats(clients[0], 0, [[1, s, 10, 5.0] for s in range(1, 8)])
        again = [c.plan(**plan_fields(rank=r, epoch=1)) for r, c in enumerate(clients)]
        assert {p.digest for p in again} == {second.digest}
    finally:
        for c in clients:
            c.close()


def raw_request(endpoint, frames, timeout_ms=2000):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    protocol.curve_client(sock, SECRET)  # the transport; what is tested is the message
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return protocol.decode(sock.recv_multipart(), SECRET)
    finally:
        sock.close()


def signed(body: bytes):
    if b'"run"' in body:  # a fresh sender, so what is refused is the message's own fault
        body = b'{"nonce":"%s",' % protocol.new_nonce().encode() + body[1:]
    return protocol.encode({}, SECRET)[:0] + [body, protocol._mac(SECRET, body)]


BAD_MESSAGES = {
    "one frame": [b"hello"],
    "three frames": [b"{}", b"", b""],
    "not json": signed(b"not json"),
    "json array": signed(b"[1, 2]"),
    "wrong version": signed(b'{"v": 99, "type": "ping", "id": 1}'),
    "no id": signed(b'{"v": 1, "type": "ping"}'),
    "unknown type": signed(b'{"v": 1, "type": "drop_tables", "id": 1}'),
    "NaN busy": signed(b'{"v":1,"type":"stats","id":1,"run":"run-a","generation":0,"rank":0,'
                       b'"world_size":3,"records":[[0,1,32,NaN]]}'),
    "negative busy": signed(b'{"v":1,"type":"stats","id":1,"run":"run-a","generation":0,'
                            b'"rank":0,"world_size":3,"records":[[0,1,32,-1.0]]}'),
    "rank out of range": signed(b'{"v":1,"type":"stats","id":1,"run":"run-a","generation":0,'
                                b'"rank":7,"world_size":3,"records":[]}'),
    "absurd world": signed(json.dumps({"v": 1, "type": "plan", "id": 1,
                                       **plan_fields(), "world_size": 10**9}).encode()),
    "wrong secret": [b'{"v":1,"type":"ping","id":1}', b"00" * 32],
    "unsigned": [b'{"v":1,"type":"ping","id":1}', b""],
    "batch above B": signed(b'{"v":1,"type":"stats","id":1,"run":"run-a","generation":0,'
                            b'"rank":0,"world_size":3,"records":[[0,1,97,0.1]]}'),
    "config mismatch": signed(json.dumps({"v": 1, "type": "plan", "id": 1,
                                          **plan_fields(global_batch_size=64)}).encode()),
    "huge integer": signed(b'{"v":1,"type":"stats","id":1,"run":"run-a","generation":0,'
                           b'"rank":0,"world_size":3,"records":[[0,1,8,1' + b"0" * 400 + b']]}'),
    "huge weight": signed(json.dumps({"v": 1, "type": "plan", "id": 1, **plan_fields(),
                                      "initial_weights": [1, 1, 10**400]}).encode()),
    "stale generation": signed(json.dumps({"v": 1, "type": "plan", "id": 1,
                                           **plan_fields(generation=0, run="run-b")}).encode()),
}


def test_bad_messages_get_an_error_reply_and_change_nothing(running):
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=2)
    try:
        client.plan(**plan_fields(run="run-b", generation=2))
        before = client.plan(**plan_fields())
        stats(client, 0, [[0, 1, 32, 0.1]])
        state = running.coordinator.runs["run-a"]
        history_before = [dict(h) for h in state.history]
        for name, frames in BAD_MESSAGES.items():
            reply = raw_request(running.endpoint, frames)
            if reply is not None:
                assert reply["type"] == "error", name
        assert running.coordinator.rejected >= len(BAD_MESSAGES) - 2  # 1 and 3 frames: dropped
        assert [dict(h) for h in state.history] == history_before
        assert client.plan(**plan_fields()).digest == before.digest
        assert running.coordinator.runs["run-b"].generation == 2
    finally:
        client.close()


def test_oversized_message_is_refused_by_the_socket(running):
    huge = b"x" * (protocol.MAX_MESSAGE_BYTES + 10_000)
    assert raw_request(running.endpoint, [huge, b""], timeout_ms=500) is None
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=2)
    try:
        client.ping()
    finally:
        client.close()


def test_error_reply_raises_coordinator_error_and_wrong_secret_is_rejected(running):
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=2)
    try:
        with pytest.raises(CoordinatorError, match="unknown run"):
            stats(client, 0, [[0, 1, 1, 0.1]], run="nobody")
    finally:
        client.close()
    intruder = CoordinatorClient(running.endpoint, b"not-the-secret-at-all-0000000000",
                                 timeout_s=0.5, retries=1)
    try:
        # The reply is signed with the real secret, which the intruder cannot verify.
        with pytest.raises(CoordinatorUnavailable):
            intruder.ping()
    finally:
        intruder.close()
    assert "run-nobody" not in running.coordinator.runs


def test_unreachable_coordinator_times_out_quickly():
    client = CoordinatorClient("tcp://127.0.0.1:1", SECRET, timeout_s=0.2, retries=2)
    start = time.monotonic()
    try:
        with pytest.raises(CoordinatorUnavailable, match="no reply"):
            client.ping()
    finally:
        client.close()
    assert time.monotonic() - start < 5


def test_restarted_coordinator_serves_the_same_plans_from_its_journal(tmp_path):
    journal = str(tmp_path / "j.jsonl")
    first = Running(journal)
    client = CoordinatorClient(first.endpoint, SECRET, timeout_s=2)
    client.plan(**plan_fields())
    for rank, per_sample in enumerate([0.004, 0.002, 0.001]):
        stats(client, rank, [[0, s, 32, 32 * per_sample] for s in range(1, 6)])
    decided = client.plan(**plan_fields(epoch=1))
    client.close()
    first.stop()
    second = Running(journal)
    client = CoordinatorClient(second.endpoint, SECRET, timeout_s=2)
    try:
        assert client.plan(**plan_fields(rank=2, epoch=1)) == decided
    finally:
        client.close()
        second.stop()
    lines = [json.loads(line) for line in open(journal)]
    plans = [r for r in lines if r["event"] == "plan" and r["epoch"] == 1]
    assert len(plans) == 1 and plans[0]["batch_sizes"] == list(decided.batch_sizes)


def test_cli_coordinator_runs_and_stops_on_sigterm(tmp_path):
    token = tmp_path / "token"
    token.write_text(SECRET.decode())
    proc = subprocess.Popen([sys.executable, "-m", "shardbalance", "coordinator", "--bind",
                             "tcp://127.0.0.1:0", "--log", str(tmp_path / "c.jsonl"),
                             "--token-file", str(token)], stdout=subprocess.PIPE, text=True)
    try:
        line = read_line(proc)
        assert line.startswith("READY tcp://127.0.0.1:")
        client = CoordinatorClient(line.split()[1], SECRET, timeout_s=5)
        client.ping()
        client.close()
    finally:
        assert stop_process(proc) == 0


def test_embedded_coordinator_exits_when_its_parent_dies(tmp_path):
    script = ("import sys, time\n"
              "from shardbalance.client import EmbeddedCoordinator\n"
              "c = EmbeddedCoordinator('tcp://127.0.0.1:0', None, b'x' * 32)\n"
              "print(c.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(read_line(parent))
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the embedded coordinator outlived its parent")


def test_runs_sharing_a_coordinator_are_isolated(running):
    client = CoordinatorClient(running.endpoint, SECRET, timeout_s=2)
    try:
        a0 = client.plan(**plan_fields(run="job-a"))
        b0 = client.plan(**plan_fields(run="job-b", world=2, min_sizes=[1, 1],
                                       max_sizes=[96, 96]))
        assert a0.batch_sizes == (32, 32, 32) and b0.batch_sizes == (48, 48)
        # Only job-b reports that its rank 1 is much faster.
        stats(client, 0, [[0, s, 48, 0.4] for s in range(1, 9)], world=2, run="job-b")
        stats(client, 1, [[0, s, 48, 0.1] for s in range(1, 9)], world=2, run="job-b")
        b1 = client.plan(**plan_fields(run="job-b", world=2, epoch=1, min_sizes=[1, 1],
                                       max_sizes=[96, 96]))
        a1 = client.plan(**plan_fields(run="job-a", epoch=1))
        assert b1.batch_sizes[1] > b1.batch_sizes[0]
        assert a1.batch_sizes == (32, 32, 32)
        assert all(len(h) == 0 for h in running.coordinator.runs["job-a"].history)
    finally:
        client.close()


def test_embedded_coordinator_binds_the_interface_that_routes_to_the_master():
    from shardbalance.client import routable_address

    assert routable_address("127.0.0.1", 29500) == "127.0.0.1"
    assert routable_address(None) == "127.0.0.1"
    coordinator = EmbeddedCoordinator(f"tcp://{routable_address('127.0.0.1')}:0", None,
                                      SECRET)
    try:
        assert coordinator.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        coordinator.stop()
        assert coordinator.process.poll() is not None


def test_a_decision_log_line_stays_one_readable_line_at_thousands_of_ranks():
    from shardbalance.coordinator import _LOG_RANKS, _brief

    small = [28, 54, 110]
    assert _brief(small) == str(small)
    assert _brief(list(range(_LOG_RANKS))) == str(list(range(_LOG_RANKS)))
    large = [7] * 4095 + [3]
    line = _brief(large)
    assert line.startswith("[7, 7, 7, 7, ..., 7, 7, 7, 3]") and "4096 ranks" in line
    assert "min 3" in line and "median 7" in line and "max 7" in line
    assert len(line) < 120


def test_a_deferred_plan_request_is_answered_from_its_opened_envelope_once_decided(tmp_path):
    from shardbalance.coordinator import Coordinator

    coordinator = Coordinator("tcp://127.0.0.1:0", str(tmp_path / "journal.jsonl"), SECRET)
    try:
        sender = protocol.Sender(SECRET)
        frames = sender.encode({"type": "plan", "id": 1, **plan_fields()})
        # Deferred: nothing decided yet, the opened request kept for the answer.
        assert coordinator.handle(frames, defer=True) is None
        assert coordinator.deferred_key == ("run-a", 0, 0, 0)
        opened = coordinator.deferred_opened
        assert opened[0]["id"] == 1 and opened[3].window == 0
        assert not coordinator.runs
        reply = sender.decode(coordinator.handle(frames, opened=opened), {"type": "plan"})
        assert reply["plan"]["batch_sizes"] == [32, 32, 32]
        # The same request again is an exact resend: the same plan, not a second decision.
        again = sender.decode(coordinator.handle(frames), {"type": "plan"})
        assert again["plan"] == reply["plan"]
        plans = [json.loads(line) for line in open(tmp_path / "journal.jsonl")]
        assert sum(1 for r in plans if r.get("event") == "plan") == 1
        # The sequence is still checked on the answer: once the sender moved on, the old
        # request (opened or not) is refused as a replay.
        newer = sender.decode(coordinator.handle(
            sender.encode({"type": "plan", "id": 2, **plan_fields()})), {"type": "plan"})
        assert newer["plan"] == reply["plan"]
        refused = sender.decode(coordinator.handle(frames, opened=opened), {"type": "plan"})
        assert refused["type"] == "error" and "replayed" in refused["error"], refused
    finally:
        coordinator.close()
