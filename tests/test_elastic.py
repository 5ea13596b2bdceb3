"""Elastic membership: a node joining restarts every worker with a new world size and the same
``TORCHELASTIC_RESTART_COUNT``; the run must move on to a new generation that plans again.

Two rendezvous set-ups, as torchrun has them:
- the agent's shared store (torch's default): the store outlives the workers, so the run id is
  kept and the generation counts the worker groups; shown with real gloo ranks in two rounds
  whose store the test hosts, as the agent does;
- a store per round (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which a join needs on this
  torch): nothing of the earlier round reaches the new one, so it is a new run; shown with a
  real torchrun elastic rendezvous that a second agent joins.
"""

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from _launch import kill_group
from distributed import ROOT, free_port, run_ranks, start_coordinator, stop_process

SECRET = "elastic-test-secret-0123456789abcdef"
SHARED_STORE = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}


def _train(rank, world, coordinator, journal, speeds):
    """One worker of a round: windows of 2 steps on emulated speeds, then what it saw."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from shardbalance import WeightedDistributedSampler
    from shardbalance.emulate import EmulatedSpeed

    data = TensorDataset(torch.randn(384, 8), torch.randint(0, 2, (384,)))
    sampler = WeightedDistributedSampler(data, global_batch_size=32, rebalance_every=2,
                                         coordinator=coordinator, coordinator_log=journal,
                                         timeout_s=20)
    model = DDP(torch.nn.Sequential(EmulatedSpeed(speeds[rank], per_sample_s=0.02,
                                                  overhead_s=0.001), torch.nn.Linear(8, 2)))
    sampler.attach(model)
    plans = []
    for x, y in DataLoader(data, batch_sampler=sampler):
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        plans.append(list(sampler.plan.batch_sizes))
    del model
    dist.barrier()
    sampler.close()
    return sampler.session.run_id, sampler.generation, plans


def journal_records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("where", ["standalone", "embedded"])
def test_a_node_joining_is_a_new_generation_of_the_same_run(tmp_path, where):
    journal = str(tmp_path / "coordinator.jsonl")
    store_port = free_port()
    store = dist.TCPStore("127.0.0.1", store_port, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    env = dict(SHARED_STORE, SHARDBALANCE_TOKEN=SECRET)
    coordinator, proc = None, None
    if where == "standalone":
        port = free_port()
        proc = start_coordinator(port, journal, SECRET)
        coordinator = f"tcp://127.0.0.1:{port}"
    try:
        # Round 0: one node. Round 1: a second, 4x faster node joined; torchrun restarted
        # every worker with the same restart count.
        (alone,) = run_ranks(_train, 1, coordinator, journal, [1.0], env=env, port=store_port,
                             timeout_s=120)
        # torch 2.13 keeps its process group's keys under the same names in every round of a
        # shared store, so a new round now and then connects to a dead rank's stale address
        # (the README's "A rank dies"); clear them, as a store per round would, keeping ours.
        for key in store.list_keys():
            if "shardbalance/" not in key:
                store.delete_key(key)
        joined = run_ranks(_train, 2, coordinator, journal, [1.0, 4.0], env=env,
                           port=store_port, timeout_s=120)
    finally:
        if proc is not None:
            stop_process(proc)
        del store
    run_id = alone[0]
    assert [r[:2] for r in joined] == [(run_id, 1), (run_id, 1)] and alone[1] == 0
    records = journal_records(journal)
    runs = [(r["run"], r["generation"], r["config"]["world_size"])
            for r in records if r["event"] == "run"]
    assert runs == [(run_id, 0, 1), (run_id, 1, 2)]
    # Generation 1 is planned: the two ranks' plans agree, change, and end with the faster
    # rank taking the larger share; nothing was refused.
    plans = [r["batch_sizes"] for r in records if r["event"] == "plan" and r["generation"] == 1]
    assert plans and joined[0][2] == joined[1][2]
    assert joined[0][2][-1][1] > joined[0][2][-1][0] and joined[0][2][-1] in plans
    assert not [r for r in records if r["event"] == "rejected"]
    carried = [r for r in records if r["event"] == "carried"]
    if where == "standalone":
        # The coordinator lived through the join: rank 0 (same host, local rank and device)
        # kept its measurements of round 0; the new rank started fresh.
        assert [(r["generation"], r["rank"]) for r in carried] == [(1, 0)]
        assert carried[0]["member"].endswith("/0/cpu") and carried[0]["steps"] >= 8
    else:
        # A new embedded coordinator resumed the journal: decided plans, no measurements.
        assert carried == []


def _agent(out_dir, rdzv_port, speed, local_addr, env, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rdzv_port}",
           "--rdzv-id=elastic-test", "--rdzv-conf=last_call_timeout=1", "--max-restarts=0",
           "--monitor-interval=0.2",
           # Ranks follow the sorted node names: the first agent stays rank 0.
           f"--local-addr={local_addr}", str(ROOT / "tests" / "_elastic_worker.py"),
           str(out_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**env, "ELASTIC_SPEED": str(speed)}, start_new_session=True)


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)


def test_a_real_torchrun_join_trains_the_new_world_on_balanced_plans(tmp_path):
    journal = str(tmp_path / "coordinator.jsonl")
    port = free_port()
    coordinator = start_coordinator(port, journal, SECRET)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SHARDBALANCE_TOKEN=SECRET,
               SHARDBALANCE_COORDINATOR=f"tcp://127.0.0.1:{port}",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", LOGLEVEL="INFO")
    rdzv_port = free_port()
    logs = [open(tmp_path / f"agent{i}.log", "w+") for i in range(2)]
    agents = []
    try:
        agents.append(_agent(tmp_path, rdzv_port, 1.0, "127.0.0.1", env, logs[0]))
        _wait_for(lambda: (tmp_path / "alone").exists(), 90, "the first node to train alone")
        agents.append(_agent(tmp_path, rdzv_port, 4.0, "127.0.0.2", env, logs[1]))
        for agent in agents:
            agent.wait(120)
    finally:
        for agent in agents:
            kill_group(agent)
        stop_process(coordinator)
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read())
        log.close()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in output)
    assert "Detected 1 new nodes" in output[0]
    assert "WARNING " not in "".join(output), "\n".join(output)
    alone = [json.loads(line) for line in (tmp_path / "rank0-world1.jsonl").read_text()
             .splitlines()]
    pair = [[json.loads(line) for line in (tmp_path / f"rank{r}-world2.jsonl").read_text()
             .splitlines()] for r in range(2)]
    # Both ranks of the new world trained every epoch on the same plans, the 4x faster rank
    # (the joining node, rank 1) with the larger share.
    assert [e["epoch"] for e in pair[0]] == [e["epoch"] for e in pair[1]] == [0, 1]
    assert [e["plan"] for e in pair[0]] == [e["plan"] for e in pair[1]]
    assert pair[1][0]["speed"] == 4.0 and pair[0][-1]["plan"][1] > pair[0][-1]["plan"][0]
    assert all(e["restart_count"] == 0 for e in alone + pair[0])
    # The coordinator served the new world as a new run: its rounds' stores share nothing.
    records = journal_records(journal)
    runs = [(r["run"], r["config"]["world_size"]) for r in records if r["event"] == "run"]
    assert runs == [(alone[0]["run"], 1), (pair[0][0]["run"], 2)]
    assert pair[0][-1]["plan"] in [r["batch_sizes"] for r in records if r["event"] == "plan"
                                   and r["run"] == pair[0][0]["run"]]
    assert not [r for r in records if r["event"] == "rejected"]
