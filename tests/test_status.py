"""``shardbalance status`` against real coordinator processes fed by real clients."""

import os
import subprocess
import sys

import pytest

from distributed import ROOT, free_port, run_ranks, start_coordinator, stop_process
from shardbalance import protocol
from shardbalance._exceptions import CoordinatorError
from shardbalance.client import CoordinatorClient, StatsSender

SECRET = "status-test-secret-0123456789abcdef"


def plan_fields(rank, world=2, window=0, run="run-s"):
    return dict(run=run, generation=0, rank=rank, world_size=world, epoch=0, window=window,
                global_batch_size=64, policy="affine", min_sizes=[1] * world,
                max_sizes=[64] * world, quantum=1, initial_weights=None, options={})


def cli(*args, env=None, timeout_s=60):
    return subprocess.run([sys.executable, "-m", "shardbalance", "status", *args],
                          capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def coordinator(tmp_path):
    port = free_port()
    proc = start_coordinator(port, str(tmp_path / "journal.jsonl"), SECRET)
    yield f"tcp://127.0.0.1:{port}"
    stop_process(proc)


def feed(address, busy_s=(0.02, 0.06), steps=12):
    """Two ranks report steps at 32 samples each (rank 1 three times slower), then ask for the
    plan of the next window; returns that plan."""
    for rank, busy in enumerate(busy_s):
        sender = StatsSender(address, SECRET.encode(), {
            "run": "run-s", "generation": 0, "rank": rank, "world_size": 2,
            "member": f"host{rank}/0/cpu"})
        try:
            if rank == 0:  # the run exists once a rank asked for a plan
                client = CoordinatorClient(address, SECRET.encode(), timeout_s=5.0)
                client.plan(**plan_fields(0))
                client.close()
            for step in range(steps):
                sender.push((0, step, 32, busy))
            assert sender.flush(10.0)
        finally:
            sender.close()
    client = CoordinatorClient(address, SECRET.encode(), timeout_s=5.0)
    try:
        return client.plan(**plan_fields(0, window=steps))
    finally:
        client.close()


def test_status_shows_each_ranks_measurements_and_the_plan_in_force(coordinator, tmp_path):
    plan = feed(coordinator)
    client = CoordinatorClient(coordinator, SECRET.encode(), timeout_s=5.0)
    try:
        reply = client.status()
    finally:
        client.close()
    (run,) = reply["runs"]
    assert run["run"] == "run-s" and run["world_size"] == 2 and not reply["truncated"]
    assert run["plan"]["window"] == 12 and run["plan"]["batch_sizes"] == list(plan.batch_sizes)
    # The faster rank got the larger share, and the plan came with a predicted step time.
    assert plan.batch_sizes[0] > plan.batch_sizes[1]
    assert run["plan"]["predicted_step_ms"] == pytest.approx(plan.predicted_step_s * 1e3,
                                                             abs=1e-3)
    fast, slow = run["ranks"]
    assert (fast["member"], slow["member"]) == ("host0/0/cpu", "host1/0/cpu")
    assert fast["batch_size"] == slow["batch_size"] == 32
    assert fast["busy_ms"] == pytest.approx(20.0) and slow["busy_ms"] == pytest.approx(60.0)
    assert fast["samples_per_s"] == pytest.approx(1600.0)
    assert slow["samples_per_s"] == pytest.approx(32 / 0.06, rel=1e-3)

    token = tmp_path / "token"
    token.write_text(SECRET)
    done = cli("--coordinator", coordinator, "--token-file", str(token))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"coordinator {coordinator}: 1 run(s), 0 pull run(s)"
    assert any(line.startswith("run run-s  generation 0  2 ranks  global batch 64")
               for line in lines)
    assert f"plan: epoch 0 step 12: {list(plan.batch_sizes)}" in done.stdout
    rows = [line.split() for line in lines if line.strip().startswith(("0 ", "1 "))]
    assert [r[:6] for r in rows] == [
        ["0", "host0/0/cpu", str(plan.batch_sizes[0]), "32", "20.0", "1600.0"],
        ["1", "host1/0/cpu", str(plan.batch_sizes[1]), "32", "60.0", "533.3"]]


def test_watch_refreshes_count_times_and_sees_new_measurements(coordinator, tmp_path):
    feed(coordinator)
    done = cli("--coordinator", coordinator, "--watch", "--interval", "0.05", "--count", "3",
               env={"SHARDBALANCE_TOKEN": SECRET})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"coordinator {coordinator}: 1 run(s)") == 3


def test_a_wrong_token_or_no_coordinator_is_an_error_not_a_hang(coordinator, tmp_path):
    feed(coordinator)
    wrong = tmp_path / "wrong"
    wrong.write_text("another-secret-0123456789abcdef")
    # A reply the client cannot verify is ignored: no reply within the bound.
    done = cli("--coordinator", coordinator, "--token-file", str(wrong), "--timeout", "1")
    assert done.returncode == 2 and "no reply from the coordinator" in done.stderr
    assert "its secret is not the one given" in done.stderr
    done = cli("--coordinator", coordinator, "--token-file", str(wrong), "--interval", "0")
    assert done.returncode == 2 and "Invalid --interval 0.0" in done.stderr
    done = cli("--coordinator", "127.0.0.1:5555")
    assert done.returncode == 2 and "Invalid --coordinator '127.0.0.1:5555'" in done.stderr
    client = CoordinatorClient(coordinator, SECRET.encode(), timeout_s=5.0)
    try:
        with pytest.raises(CoordinatorError, match="unknown run 'nope'"):
            client.status("nope")
        assert client.status("run-s")["runs"][0]["run"] == "run-s"
    finally:
        client.close()


def test_runs_beyond_the_row_budget_are_summarized_not_cut(coordinator, monkeypatch):
    """Per-rank rows are bounded per reply; a run that does not fit is summarized."""
    world = protocol.MAX_STATUS_RANKS + 1
    client = CoordinatorClient(coordinator, SECRET.encode(), timeout_s=10.0)
    try:
        client.plan(**{**plan_fields(0, world=world, run="big"), "global_batch_size": world,
                       "max_sizes": [world] * world})
        feed(coordinator)
        reply = client.status()
    finally:
        client.close()
    big, small = sorted(reply["runs"], key=lambda r: r["world_size"], reverse=True)
    assert reply["truncated"] and big["ranks"] is None and big["plan"]["batch_sizes"] is None
    assert len(small["ranks"]) == 2


def _embedded_rank(rank, world, journal):
    """A rank of a job with an embedded coordinator (rank 1 four times slower); after a few
    windows rank 0 runs `shardbalance status` with the key file its session wrote."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from shardbalance import WeightedDistributedSampler
    from shardbalance.emulate import EmulatedSpeed

    data = TensorDataset(torch.randn(256, 8), torch.randint(0, 2, (256,)))
    sampler = WeightedDistributedSampler(data, global_batch_size=16, policy="affine",
                                         rebalance_every=2, coordinator_log=journal,
                                         timeout_s=20)
    model = DDP(torch.nn.Sequential(EmulatedSpeed([4.0, 1.0][rank], per_sample_s=0.02,
                                                  overhead_s=0.001), torch.nn.Linear(8, 2)))
    sampler.attach(model)
    for step, (x, y) in enumerate(DataLoader(data, batch_sampler=sampler)):
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        if step == 9:
            break
    sampler.session.flush(5.0)
    dist.barrier()
    result = None
    if rank == 0:
        key = sampler.session.key_file
        assert key == journal + ".token" and os.stat(key).st_mode & 0o777 == 0o600
        done = cli("--coordinator", sampler.session.address, "--token-file", key)
        # The key file lets its reader watch, never steer: it is not the run's key.
        from shardbalance._exceptions import CoordinatorError
        from shardbalance.client import CoordinatorClient

        token = open(key, "rb").read().strip()
        watcher = CoordinatorClient(sampler.session.address, token, timeout_s=2)
        try:
            watcher.plan(run=sampler.session.run_id, generation=5, rank=0, epoch=0, window=0,
                         **sampler.settings.run_config().to_dict())
            steered = True
        except CoordinatorError as exc:
            steered = "run's key" not in str(exc)
        finally:
            watcher.close()
        assert not steered
        result = (done.returncode, done.stdout, done.stderr, sampler.session.run_id)
    dist.barrier()
    del model
    sampler.close()
    if rank == 0:
        assert not os.path.exists(journal + ".token")  # useless once the job ends: removed
    return result


def test_status_of_an_embedded_coordinator_with_the_key_file_its_job_wrote(tmp_path):
    journal = str(tmp_path / "coordinator.jsonl")
    code, out, err, run_id = run_ranks(_embedded_rank, 2, journal, timeout_s=120)[0]
    assert code == 0, err
    assert f"run {run_id}  generation 0  2 ranks  global batch 16  policy affine" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[1].endswith("/cpu") for r in rows)
    # Both ranks reported: a batch size, a busy time and a throughput each; the fast rank
    # (rank 0) trains more samples per busy second.
    assert all(r[3] != "-" and r[4] != "-" for r in rows)
    assert float(rows[0][5]) > float(rows[1][5])


def test_bad_status_requests_and_bad_members_are_refused_and_change_nothing(coordinator):
    feed(coordinator)
    client = CoordinatorClient(coordinator, SECRET.encode(), timeout_s=5.0)
    try:
        before = client.status()
        with pytest.raises(CoordinatorError, match="field 'run' must match"):
            client.request({"type": "status", "run": 5})
        with pytest.raises(CoordinatorError, match="field 'member' must match"):
            client.request({"type": "stats", "run": "run-s", "generation": 0, "rank": 1,
                            "world_size": 2, "member": "x" * 129,
                            "records": [[0, 99, 32, 9.0]]})
        after = client.status()
    finally:
        client.close()
    for reply in (before, after):  # request ids and idle times move on; nothing else does
        reply.pop("id")
        for row in reply["runs"][0]["ranks"]:
            row.pop("idle_s")
        reply["runs"][0].pop("idle_s")
    assert after == before and after["runs"][0]["ranks"][1]["busy_ms"] == pytest.approx(60.0)
