"""Pull mode: the lease rules in-process, then real coordinators and real processes.

Exactly-once completion per epoch, a rank SIGKILLed mid-chunk, a coordinator restarted
mid-epoch, a prefetching DataLoader with workers, resume from a state_dict, bad input.
"""

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import distributed
from distributed import ROOT, free_port, read_line, stop_process, torchrun
from shardbalance import ConfigError, DynamicShardSampler
from shardbalance._exceptions import CoordinatorError
from shardbalance._leases import LeaseTable, PullConfig, merge_ranges
from shardbalance.client import CoordinatorClient
from shardbalance.coordinator import Coordinator

SECRET = "pull-test-secret-0123456789abcdef"
INFER = str(ROOT / "examples" / "infer.py")


def config(n=1000, world=3, chunk=64, min_chunk=8, lease_s=1.0, max_leases=2):
    return PullConfig(world, n, chunk, min_chunk, lease_s, max_leases)


def counted_ranges(table, epoch=0):
    return [(c.start, c.stop) for c in table.epochs[epoch].chunks.values() if c.done]


# -- the lease table, in-process ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(30))
def test_every_position_is_completed_exactly_once_whatever_dies_or_lags(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 700)
    table = LeaseTable(config(n=n, chunk=rng.randint(1, 64), min_chunk=1,
                              max_leases=rng.randint(1, 3)))
    clients = {f"{r:08x}": r for r in range(3)}
    holding: dict[str, list] = {c: [] for c in clients}
    dead: set = set()
    now, counted = 0.0, 0
    for _ in range(20000):
        if table.epoch(0).complete:
            break
        now += rng.random() * 0.3
        client = rng.choice(list(clients))
        if client in dead:
            continue
        table.expire(now)
        table.renew(0, client, [c.start for c in holding[client]], now)
        action = rng.random()
        if action < 0.02 and len(dead) < 2:
            dead.add(client)  # stops renewing: its leases expire
        elif action < 0.5 and holding[client]:
            chunk = holding[client].pop(rng.randrange(len(holding[client])))
            counted += table.done(0, client, chunk.start, chunk.stop, now)
        else:
            kind, chunk = table.lease(0, clients[client], client, now)
            if chunk is not None:
                holding[client].append(chunk)
    assert table.epoch(0).complete
    done = sorted(counted_ranges(table))
    assert merge_ranges(done) == [(0, n)]
    assert sum(b - a for a, b in done) == n  # disjoint: nothing counted twice
    assert counted == len(done)


def test_chunks_shrink_near_the_end_but_never_below_the_minimum():
    table = LeaseTable(config(n=1000, world=2, chunk=100, min_chunk=10))
    sizes = []
    while True:
        kind, chunk = table.lease(0, 0, "aaaaaaaa", 0.0)
        if kind != "new":
            break
        sizes.append(chunk.stop - chunk.start)
        table.done(0, "aaaaaaaa", chunk.start, chunk.stop, 0.0)
    assert sum(sizes) == 1000
    assert sizes[0] == 100 and max(sizes) == 100
    assert sizes == sorted(sizes, reverse=True)
    assert min(sizes[:-1]) == 10 and sizes[-1] <= 10


def test_an_expired_lease_goes_to_another_rank_and_a_late_completion_counts_once():
    table = LeaseTable(config(n=64, world=2, chunk=64, min_chunk=64, lease_s=1.0))
    _, chunk = table.lease(0, 0, "aaaaaaaa", now=0.0)
    assert table.lease(0, 1, "bbbbbbbb", now=0.5) == ("speculative", chunk)
    table.renew(0, "bbbbbbbb", [0], now=0.9)
    dropped = table.expire(now=1.5)  # rank 0 went silent; rank 1 renewed
    assert dropped == [(0, 0, "aaaaaaaa", 0, 64)]
    assert list(table.epochs[0].open[0].leases) == ["bbbbbbbb"]
    assert table.done(0, "bbbbbbbb", 0, 64, now=2.0) is True
    assert table.done(0, "aaaaaaaa", 0, 64, now=2.5) is False  # the late one
    assert table.epochs[0].completed_items == 64


def test_a_chunk_whose_every_lease_expired_is_reissued_first():
    table = LeaseTable(config(n=640, world=2, chunk=64, max_leases=1))
    _, lost = table.lease(0, 0, "aaaaaaaa", now=0.0)
    table.expire(now=5.0)
    kind, chunk = table.lease(0, 1, "bbbbbbbb", now=5.0)
    assert (kind, chunk) == ("reissue", lost)


def test_idle_ranks_get_speculative_copies_busy_ones_do_not():
    table = LeaseTable(config(n=128, world=3, chunk=64, min_chunk=64, max_leases=2))
    _, first = table.lease(0, 0, "aaaaaaaa", 0.0)
    _, second = table.lease(0, 1, "bbbbbbbb", 0.0)
    # Rank 1 still holds a chunk (it is prefetching): no copy for it.
    assert table.lease(0, 1, "bbbbbbbb", 0.1) == ("wait", None)
    # Rank 2 is idle: a copy of the oldest outstanding chunk, then nothing (max_leases 2).
    assert table.lease(0, 2, "cccccccc", 0.1) == ("speculative", first)
    table.done(0, "cccccccc", first.start, first.stop, 0.2)
    assert table.lease(0, 2, "cccccccc", 0.2) == ("speculative", second)
    assert table.lease(0, 0, "aaaaaaaa", 0.2) == ("wait", None)  # it still holds `first`


def test_a_new_process_on_a_rank_releases_the_previous_ones_leases():
    table = LeaseTable(config(n=640, world=2))
    table.register(0, "aaaaaaaa")
    _, chunk = table.lease(0, 0, "aaaaaaaa", 0.0)
    assert table.register(0, "dddddddd") == [(0, 0, "aaaaaaaa", chunk.start, chunk.stop)]
    assert table.lease(0, 1, "bbbbbbbb", 0.1) == ("reissue", chunk)


def test_replay_rebuilds_the_table_so_a_restarted_worker_releases_its_old_lease_at_once():
    cfg = config(n=200, world=2, chunk=50, min_chunk=50, lease_s=30.0)
    records = [{"event": "pull_lease", "epoch": 0, "rank": 0, "client": "aaaaaaaa",
                "start": 0, "stop": 50},
               {"event": "pull_lease", "epoch": 0, "rank": 1, "client": "bbbbbbbb",
                "start": 50, "stop": 100},
               {"event": "pull_done", "epoch": 0, "rank": 1, "client": "bbbbbbbb",
                "start": 50, "stop": 100}]
    table = LeaseTable(cfg)
    for rec in records:
        table.replay(rec, now=0.0)
    assert table.epochs[0].completed_items == 50 and table.epochs[0].next_pos == 100
    # Rank 0 came back as a new process (elastic restart): its old lease goes at once.
    assert table.register(0, "cccccccc") == [(0, 0, "aaaaaaaa", 0, 50)]
    assert table.lease(0, 0, "cccccccc", now=0.1)[1].start == 0
    assert table.lease(0, 1, "bbbbbbbb", now=0.1)[1].start == 100


# -- the coordinator on a real socket ----------------------------------------------------


class Running:
    def __init__(self, journal=None):
        self.coordinator = Coordinator("tcp://127.0.0.1:0", journal, SECRET.encode())
        self.thread = threading.Thread(target=self.coordinator.serve_forever,
                                       kwargs={"poll_ms": 20, "max_seconds": 120}, daemon=True)
        self.thread.start()
        self.client = CoordinatorClient(self.coordinator.endpoint, SECRET.encode(), 2.0, 1)

    def pull(self, **extra):
        fields = dict(run="pull-a", generation=0, rank=0, world_size=2, client="aaaaaaaa",
                      epoch=0, op="lease", want=True, done=[], held=[], ranges=[],
                      num_samples=200, chunk_size=50, min_chunk_size=10, lease_s=5.0,
                      max_leases=2)
        fields.update(extra)
        return self.client.pull(**fields)

    def stop(self):
        self.client.close()
        self.coordinator.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.coordinator.close()


def test_bad_pull_requests_get_an_error_and_change_nothing(tmp_path):
    journal = tmp_path / "c.jsonl"
    running = Running(str(journal))
    try:
        bad = [dict(chunk_size=0), dict(min_chunk_size=60), dict(lease_s=-1.0),
               dict(lease_s=float("1e9")), dict(op="steal"), dict(client="XYZ"),
               dict(want="yes"), dict(done=[[5, 3]]), dict(done=[[0, 500]]),
               dict(held=[200]), dict(max_leases=100), dict(rank=2)]
        for fields in bad:
            with pytest.raises(CoordinatorError) as err:
                running.pull(**fields)
            key = next(iter(fields))
            assert repr(key) in str(err.value) or key in str(err.value), (fields, err.value)
        # Completing a chunk never handed out is refused before anything is applied.
        with pytest.raises(CoordinatorError, match=r"chunk \[0, 50\) of epoch 0 was never"):
            running.pull(done=[[0, 50]], want=True)
        assert running.pull()["lease"] == [0, 50]  # the first lease: nothing moved before
        with pytest.raises(CoordinatorError, match="asks with"):
            running.pull(rank=1, client="bbbbbbbb", num_samples=300)
    finally:
        running.stop()
    events = [json.loads(line)["event"] for line in journal.read_text().splitlines()]
    assert events.count("pull_lease") == 1 and "pull_done" not in events


def test_a_restarted_coordinator_resumes_the_epoch_from_its_journal(tmp_path):
    journal = str(tmp_path / "c.jsonl")
    first = Running(journal)
    try:
        a = first.pull()["lease"]
        b = first.pull(rank=1, client="bbbbbbbb")["lease"]
        first.pull(done=[a], want=False)
    finally:
        first.stop()
    second = Running(journal)
    try:
        # b is still leased to rank 1 (its heartbeat renews it); a is not handed out again.
        assert second.pull(rank=1, client="bbbbbbbb", held=[b[0]], want=False)["stale"] == []
        leased, kinds = [], {}
        while (reply := second.pull(done=leased[-1:]))["lease"] is not None:
            leased.append(reply["lease"])
            kinds[tuple(reply["lease"])] = reply["kind"]
        assert a not in leased
        assert kinds.get(tuple(b), "speculative") == "speculative"  # only as an idle copy
        assert set(kinds.values()) <= {"new", "speculative"}
        reply = second.pull(rank=1, client="bbbbbbbb", done=[b], want=True)
        assert reply["complete"] and reply["remaining"] == 0
    finally:
        second.stop()


# -- real processes ----------------------------------------------------------------------


def start_coordinator(port, journal):
    return distributed.start_coordinator(port, journal, SECRET)


def start_workers(address, run_id, out_dir, speeds, n, start_file, per_sample_ms=4.0):
    env = {**os.environ, "SHARDBALANCE_TOKEN": SECRET, "SHARDBALANCE_TIMEOUT": "20",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return [subprocess.Popen(
        [sys.executable, INFER, "--rank", str(r), "--world-size", str(len(speeds)),
         "--coordinator", address, "--run-id", run_id, "--out-dir", str(out_dir),
         "--samples", str(n), "--emulate-speeds", ",".join(map(str, speeds)),
         "--per-sample-ms", str(per_sample_ms), "--lease-s", "1", "--start-file",
         str(start_file), "--print-chunks", "--no-merge"],
        stdout=subprocess.PIPE, env=env) for r in range(len(speeds))]


def finish(procs, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            stop_process(proc)
            codes.append("hung")
    return codes


def merged(out_dir, n):
    """The example's own merge (in-process): (duplicates dropped, missing, merged indices)."""
    spec = importlib.util.spec_from_file_location("infer_example", INFER)
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    duplicates, missing = infer.merge(str(out_dir), n)
    lines = (out_dir / "merged.tsv").read_text().splitlines()
    return duplicates, missing, [int(line.split("\t")[0]) for line in lines]


def journal_records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_counted_once(records, n):
    counted = sorted((r["start"], r["stop"]) for r in records
                     if r["event"] == "pull_done" and r["counted"])
    assert merge_ranges(counted) == [(0, n)]
    assert sum(b - a for a, b in counted) == n


def test_a_rank_sigkilled_mid_chunk_loses_nothing_and_duplicates_nothing(tmp_path):
    n, port, journal = 1200, free_port(), str(tmp_path / "c.jsonl")
    coordinator = start_coordinator(port, journal)
    procs = []
    try:
        procs = start_workers(f"tcp://127.0.0.1:{port}", "kill-test", tmp_path, [2, 2, 1], n,
                              tmp_path / "go")
        for proc in procs:
            assert read_line(proc, 120).strip() == "READY"
        (tmp_path / "go").touch()
        victim = procs[2]
        assert read_line(victim, 60).startswith("chunk")
        assert read_line(victim, 60).startswith("chunk")  # now inside its second chunk
        victim.send_signal(signal.SIGKILL)
        assert finish(procs[:2]) == [0, 0]
        victim.wait(10)
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(coordinator)
    duplicates, missing, indices = merged(tmp_path, n)
    assert missing == 0 and indices == list(range(n))  # in index order, each once
    records = journal_records(journal)
    assert_counted_once(records, n)
    # The chunk the victim died in was completed by another rank: re-leased after its lease
    # expired, or copied to an idle rank near the end (whichever came first).
    last = [r for r in records if r["event"] == "pull_lease" and r["rank"] == 2][-1]
    (finisher,) = [r for r in records if r["event"] == "pull_done" and r["counted"]
                   and (r["start"], r["stop"]) == (last["start"], last["stop"])]
    assert finisher["rank"] != 2
    taken_over = [r for r in records
                  if (r.get("start"), r.get("stop")) == (last["start"], last["stop"])
                  and (r["event"] == "pull_expire" or r.get("kind") in ("reissue",
                                                                        "speculative"))]
    assert taken_over
    # The report reads the journal back: chunks per rank, re-leases.
    report = subprocess.run([sys.executable, "-m", "shardbalance", "report", journal],
                            capture_output=True, text=True, timeout=60).stdout
    assert "pull run kill-test: 3 ranks, 1200 samples" in report
    assert "epoch 0: complete" in report
    assert re.search(r"^\s+2\s+\d+\s+\d+\s+[\d.]+", report, re.M)  # the killed rank's row


def test_a_coordinator_restarted_mid_epoch_reissues_no_completed_chunk(tmp_path):
    n, port, journal = 800, free_port(), str(tmp_path / "c.jsonl")
    coordinator = start_coordinator(port, journal)
    procs = []
    try:
        procs = start_workers(f"tcp://127.0.0.1:{port}", "restart-test", tmp_path, [1, 2], n,
                              tmp_path / "go")
        for proc in procs:
            assert read_line(proc, 120).strip() == "READY"
        (tmp_path / "go").touch()
        for _ in range(3):
            read_line(procs[1], 60)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(10)
        time.sleep(0.5)
        coordinator = start_coordinator(port, journal)
        assert finish(procs) == [0, 0]
    finally:
        for proc in procs:
            stop_process(proc)
        stop_process(coordinator)
    duplicates, missing, indices = merged(tmp_path, n)
    assert missing == 0 and indices == list(range(n))
    records = journal_records(journal)
    assert_counted_once(records, n)
    restart = max(i for i, r in enumerate(records) if r["event"] == "start")
    assert restart > 0
    done_before = {(r["start"], r["stop"]) for r in records[:restart]
                   if r["event"] == "pull_done"}
    leased_after = {(r["start"], r["stop"]) for r in records[restart:]
                    if r["event"] == "pull_lease"}
    assert done_before and not done_before & leased_after


class Indexed(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, torch.full((2,), float(i))


def test_a_prefetching_dataloader_with_workers_leases_ahead_and_completes_once(tmp_path):
    n = 300
    sampler = DynamicShardSampler(Indexed(n), chunk_size=16, ack="explicit", shuffle=True,
                                  seed=3, coordinator_log=str(tmp_path / "c.jsonl"))
    try:
        loader = DataLoader(Indexed(n), batch_sampler=sampler, num_workers=2, prefetch_factor=2)
        seen, most_pending, rounds = [], 0, 0
        while not sampler.epoch_complete():
            rounds += 1
            for index, x in loader:
                most_pending = max(most_pending, len(sampler.pending))
                assert torch.equal(x[:, 0], index.float())
                seen.extend(index.tolist())
                sampler.done(index)
        assert sorted(seen) == list(range(n))
        assert most_pending > 1  # the loader leased ahead of the loop
        assert sampler.pending == [] and rounds == 1
    finally:
        sampler.close()


def test_state_dict_resumes_with_the_chunks_not_completed(tmp_path):
    n = 500
    first = DynamicShardSampler(range(n), chunk_size=32, ack="explicit", shuffle=True, seed=7)
    try:
        first.set_epoch(2)
        chunks = iter(first)
        completed = []
        for _ in range(3):
            indices = next(chunks)
            first.done(indices)
            completed += indices
        unfinished = next(chunks)  # leased, never acknowledged
        state = json.loads(json.dumps(first.state_dict()))
    finally:
        first.close()
    assert state["epoch"] == 2
    second = DynamicShardSampler(range(n), chunk_size=32, ack="explicit", shuffle=True, seed=7)
    try:
        second.load_state_dict(state)
        rest = []
        for indices in second:
            rest += indices
            second.done(indices)
        assert second.epoch_complete()
    finally:
        second.close()
    assert not set(rest) & set(completed)
    assert set(unfinished) <= set(rest)
    assert sorted(rest + completed) == list(range(n))


def test_bad_arguments_are_refused_with_the_bad_value(tmp_path):
    cases = [(dict(chunk_size=0), "chunk_size 0"),
             (dict(chunk_size=8, min_chunk_size=9), "min_chunk_size 9"),
             (dict(ack="sometimes"), "ack 'sometimes'"),
             (dict(num_replicas=3, rank=3), r"rank 3, rank should be in the interval \[0, 2\]"),
             (dict(lease_s=0), "lease_s 0"),
             (dict(max_leases=0), "max_leases 0"),
             (dict(num_replicas=2, rank=0), "coordinator None"),
             (dict(num_replicas=2, rank=0, coordinator="tcp://127.0.0.1:9"), "run_id None")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            DynamicShardSampler(range(10), **kwargs)
    with pytest.raises(ConfigError, match="no len"):
        DynamicShardSampler(iter(range(10)))
    sampler = DynamicShardSampler(range(10), chunk_size=4, ack="explicit")
    try:
        indices = next(iter(sampler))
        with pytest.raises(ConfigError, match=r"Invalid indices \[99\]"):
            sampler.done([99])
        assert sampler.pending == [indices]  # unchanged
        with pytest.raises(ConfigError, match="num_samples=11"):
            sampler.load_state_dict({**sampler.state_dict(), "num_samples": 11})
        with pytest.raises(TypeError, match="no length"):
            len(sampler)
    finally:
        sampler.close()
    with pytest.raises(ConfigError, match="closed"):
        sampler.epoch_complete()


def test_torchrun_batch_inference_example_is_complete_and_in_index_order(tmp_path):
    out = torchrun(3, "--emulate-speeds", "1,2,4", "--samples", "1500", "--out-dir",
                   str(tmp_path), "--coordinator-log", str(tmp_path / "c.jsonl"),
                   script="infer.py", timeout_s=120)
    assert "merged 1500 outputs in index order" in out and "complete" in out, out
    lines = (tmp_path / "merged.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == list(range(1500))
    items = {int(line.split()[1]): int(line.split()[4]) for line in out.splitlines()
             if line.startswith("rank ") and "items in" in line}
    assert items[2] > items[0]  # the fast rank took more
