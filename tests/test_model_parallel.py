"""Data parallelism with model-parallel peers, on 4 gloo ranks as 2 data-parallel x 2 model-parallel.

The mesh is ``[[0, 1], [2, 3]]`` with dimensions ("dp", "tp"): ranks 0 and 1 are replica 0,
ranks 2 and 3 replica 1; the data-parallel groups are {0, 2} and {1, 3}. The model-parallel
pair is emulated by a replicated model (each member computes the whole model), so the members'
busy times differ only by the emulated delays. One launch checks:

- the members of a replica get identical batches at every step, on every plan (device mesh, and
  process_group with replica_group), and the replicas split each global batch;
- the data-parallel gradient (DDP over the data-parallel group) equals a one-process reference
  over the global batch, also with ``set_step_weight`` (a sum over replicas, not over ranks);
- the adaptive plan and the probe's first plan follow the slower member of each replica;
- a sampler held by some ranks only (one "pipeline stage") neither hangs nor needs the others,
  starts its coordinator on its own lowest rank, and does not throw later samplers of the
  whole job out of step;
- a process_group whose size disagrees with num_replicas, or an unknown mesh dimension, is
  refused with an error naming the values.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from distributed import run_ranks
from shardbalance import WeightedDistributedSampler
from shardbalance._exceptions import ConfigError
from shardbalance.coordinator import RunState
from shardbalance.emulate import EmulatedSpeed
from shardbalance.protocol import RunConfig

# The data and model of the loop tests (one-process references of the same shape).
from test_loops import B, N, _data, _model  # noqa: E402
#: Plans injected at successive windows (the same on every rank): every step differs.
PLANS = [(4, 12), (12, 4), (6, 10), (10, 6)]
#: The slow member (replica 1, model-parallel rank 1) and its relative speed.
SLOW_RANK, SLOW_SPEED = 3, 0.25



def _inject_plans(sampler: WeightedDistributedSampler) -> None:
    # One scripted plan per window, checked step by step: the synchronous agreement (the
    # background planner's own test runs the model-parallel layout below, adaptively).
    sampler.plan_in_background = False
    real = sampler.plan_source.fetch
    count = {"n": 0}

    def fetch(epoch, window):
        sizes = PLANS[count["n"] % len(PLANS)]
        count["n"] += 1
        return dataclasses.replace(real(epoch, window), batch_sizes=sizes)

    sampler.plan_source.fetch = fetch


def _exact_epoch(mesh, journal):
    """One epoch on plans that change every step; odd steps weighted by set_step_weight."""
    data = _data()
    sampler = WeightedDistributedSampler(data, B, device_mesh=mesh, mesh_dim="dp",
                                         policy="affine", rebalance_every=1, seed=3,
                                         coordinator_log=journal, timeout_s=30)
    _inject_plans(sampler)
    model = DDP(_model(), process_group=mesh.get_group("dp"))
    sampler.attach(model)
    batches, grads = [], []
    for step, (x, y, index) in enumerate(DataLoader(data, batch_sampler=sampler)):
        if step % 2:
            sampler.set_step_weight(3.0 * len(y))  # the same weights, through the sum
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        batches.append(index.tolist())
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    result = (sampler.rank, sampler.num_replicas, len(sampler), batches, grads)
    sampler.close()
    del model
    return result


def _slow_member_epochs(rank, mesh, journal):
    """Four epochs of the affine policy, two-step windows; one member of replica 1 is slow."""
    data = _data()
    sampler = WeightedDistributedSampler(data, B, device_mesh=mesh, mesh_dim="dp",
                                         policy="affine", rebalance_every=2, seed=1,
                                         coordinator_log=journal, timeout_s=30)
    speed = SLOW_SPEED if rank == SLOW_RANK else 1.0
    model = DDP(torch.nn.Sequential(EmulatedSpeed(speed, per_sample_s=0.01, overhead_s=0.005),
                                    _model()), process_group=mesh.get_group("dp"))
    sampler.attach(model)
    loader = DataLoader(data, batch_sampler=sampler)
    batches, plans = [], []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for x, y, index in loader:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            batches.append(index.tolist())
            plans.append(sampler.batch_sizes)
    installed = sampler.planner.stats["plans"]  # agreed in the background, over all 4 ranks
    sampler.close()
    del model
    return batches, plans, installed


def _probe_weights(rank, mesh):
    """The probe's first-plan weights: replica 1 timed by its slow member."""
    import time

    sampler = WeightedDistributedSampler(_data(), B, device_mesh=mesh, mesh_dim="dp",
                                         policy="static", initial_weights="probe")
    speed = SLOW_SPEED if rank == SLOW_RANK else 1.0
    return sampler.probe(lambda b: time.sleep((0.002 + 0.002 * b) / speed), sizes=(4, 8),
                         repeats=1)


def _groups_epoch(mesh):
    """process_group (data-parallel) with replica_group (the model-parallel pair)."""
    data = _data()
    sampler = WeightedDistributedSampler(data, B, process_group=mesh.get_group("dp"),
                                         replica_group=mesh.get_group("tp"), policy="static",
                                         initial_weights=[1, 3], seed=5)
    return sampler.rank, [batch for batch in sampler]


def _stage_zero_only(rank, mesh, journal):
    """Only model-parallel rank 1 of each replica holds a sampler (say, a pipeline's first
    stage): it runs over the data-parallel group {1, 3} without ranks 0 and 2."""
    if rank % 2 == 0:
        return None
    data = _data()
    sampler = WeightedDistributedSampler(data, B, process_group=mesh.get_group("dp"),
                                         policy="affine", seed=2, coordinator_log=journal,
                                         timeout_s=30)
    model = DDP(_model(), process_group=mesh.get_group("dp"))
    sampler.attach(model)
    sizes = []
    for x, y, _ in DataLoader(data, batch_sampler=sampler):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sizes.append(len(y))
    result = (sampler.rank, sampler.coordinator_address is not None,
              sampler.session.embedded is not None, sizes, sampler.batch_sizes)
    sampler.close()
    del model
    return result


def _refusals(mesh):
    data = _data()
    refused = {}
    for name, kwargs in {"size": dict(process_group=mesh.get_group("dp"), num_replicas=3),
                         "rank": dict(device_mesh=mesh, mesh_dim="dp", rank=5),
                         "dim": dict(device_mesh=mesh, mesh_dim="pp")}.items():
        try:
            WeightedDistributedSampler(data, B, policy="equal", **kwargs)
            refused[name] = None
        except ConfigError as exc:
            refused[name] = str(exc)
    return refused


def _replicas(rank, world, tmp):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    # In this order: samplers over all four ranks still find each other's coordinator after
    # one that only ranks 1 and 3 built.
    return {"exact": _exact_epoch(mesh, f"{tmp}/exact.jsonl"),
            "stage": _stage_zero_only(rank, mesh, f"{tmp}/stage.jsonl"),
            "slow": _slow_member_epochs(rank, mesh, f"{tmp}/slow.jsonl"),
            "probe": _probe_weights(rank, mesh),
            "groups": _groups_epoch(mesh),
            "refused": _refusals(mesh)}


def _reference_grads(indices: list[int]) -> list[torch.Tensor]:
    x, y, _ = _data().tensors
    model = _model()
    F.cross_entropy(model(x[indices]), y[indices]).backward()
    return [p.grad for p in model.parameters()]


def test_model_parallel_peers_share_batches_and_replicas_split_the_global_batch(tmp_path):
    results = run_ranks(_replicas, 4, str(tmp_path), timeout_s=150)
    replica = {0: 0, 1: 0, 2: 1, 3: 1}

    # Identical batches within a replica, the global batch split between the replicas, and the
    # data-parallel gradient exact on every rank (rtol 1e-5, as the other loop tests).
    exact = [r["exact"] for r in results]
    assert [(e[0], e[1]) for e in exact] == [(replica[r], 2) for r in range(4)]
    steps = exact[0][2]
    assert steps == N // B and all(len(e[3]) == steps for e in exact)
    for step in range(steps):
        assert exact[0][3][step] == exact[1][3][step] and exact[2][3][step] == exact[3][3][step]
        assert (len(exact[0][3][step]), len(exact[2][3][step])) == PLANS[step % len(PLANS)]
        merged = exact[0][3][step] + exact[2][3][step]
        assert len(set(merged)) == B
        want = _reference_grads(merged)
        for rank in range(4):
            for got, w in zip(exact[rank][4][step], want):
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7, msg=f"rank {rank}")

    # The plan follows replica 1's slow member (rank 3); its peer (rank 2) is as fast as
    # replica 0. Members hold the same batches on every plan.
    slow = [r["slow"] for r in results]
    for step in range(len(slow[0][0])):
        assert slow[0][0][step] == slow[1][0][step] and slow[2][0][step] == slow[3][0][step]
        assert sorted(slow[0][0][step] + slow[2][0][step]) == \
            sorted(set(slow[0][0][step] + slow[2][0][step]))
    assert all(s[1] == slow[0][1] for s in slow)
    assert all(s[2] == slow[0][2] and s[2] > 0 for s in slow), [s[2] for s in slow]
    final = slow[0][1][-1]
    # (Timed by rank 2 alone, the replicas would be equally fast: about [8, 8].)
    assert sum(final) == B and final[0] >= final[1] + 4, slow[0][1]

    # The probe's weights: the same on every rank, replica 1 at its slow member's speed.
    weights = [r["probe"] for r in results]
    assert all(w == weights[0] for w in weights)
    assert weights[0][1] < 0.6 * weights[0][0], weights[0]

    # process_group + replica_group: the same contract without a mesh.
    groups = [r["groups"] for r in results]
    assert [g[0] for g in groups] == [replica[r] for r in range(4)]
    assert groups[0][1] == groups[1][1] and groups[2][1] == groups[3][1]
    assert all(len(a) == 4 and len(b) == 12 for a, b in zip(groups[0][1], groups[2][1]))

    # A sampler on ranks 1 and 3 only: no hang, its coordinator on rank 1 (not global rank 0).
    assert results[0]["stage"] is None and results[2]["stage"] is None
    (index1, reached1, embedded1, sizes1, plan1), (index3, reached3, embedded3, sizes3, plan3) = \
        results[1]["stage"], results[3]["stage"]
    assert (index1, index3) == (0, 1) and reached1 and reached3
    assert embedded1 and not embedded3
    assert len(sizes1) == len(sizes3) == N // B and plan1 == plan3 and sum(plan1) == B

    for r in results:
        refused = r["refused"]
        assert "num_replicas=3" in refused["size"] and "size is 2" in refused["size"]
        assert "rank=5" in refused["rank"]
        assert "'pp'" in refused["dim"] and "('dp', 'tp')" in refused["dim"]


def test_the_coordinator_keeps_the_slowest_member_of_a_replica():
    # Two members of replica 1 report the same step: the larger busy time stays, whichever
    # arrives first; a resend changes nothing.
    config = RunConfig(world_size=2, global_batch_size=B, policy="affine", min_sizes=(1, 1),
                       max_sizes=(B, B), quantum=1, initial_weights=None, options=())
    state = RunState("run", 0, config)
    state.add(1, [(0, 0, 8, 0.050)])
    state.add(1, [(0, 0, 8, 0.010), (0, 1, 8, 0.011)])
    state.add(1, [(0, 1, 8, 0.040)])
    state.add(1, [(0, 1, 8, 0.040)])
    assert dict(state.history[1]) == {(0, 0): (8, 0.050), (0, 1): (8, 0.040)}
