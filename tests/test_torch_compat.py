"""Each private torch API behind ``shardbalance._torch_compat`` still does what we rely on.

One test per shim: on a torch release where a shim breaks, its test fails here instead of a
training run going silently wrong. Where correctness depends on a shim, its absence makes
``attach(weighting="output")`` refuse.
"""

import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed import free_port
from shardbalance import WeightedDistributedSampler
from shardbalance import _torch_compat as compat
from shardbalance._exceptions import ConfigError


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_default_store_is_the_rendezvous_store(one_rank_group):
    store = compat.default_store()
    store.set("shardbalance/test", "address")
    assert store.get("shardbalance/test") == b"address"


def test_tree_flatten_round_trips_nested_outputs():
    out = {"logits": torch.ones(2), "aux": [torch.zeros(1), (torch.full((3,), 2.0), 7)]}
    leaves, spec = compat.tree_flatten(out)
    assert sum(isinstance(leaf, torch.Tensor) for leaf in leaves) == 3
    assert [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)] == [7]
    back = compat.tree_unflatten([x * 2 if isinstance(x, torch.Tensor) else x for x in leaves],
                                 spec)
    assert torch.equal(back["aux"][1][0], torch.full((3,), 4.0)) and back["aux"][1][1] == 7


def test_will_engine_execute_node_tells_backward_from_autograd_grad():
    w = torch.nn.Parameter(torch.ones(3))
    node = compat.gradient_edge_node(w)
    x = torch.ones(3, requires_grad=True)
    seen = []
    y = (w * x).sum()
    y.register_hook(lambda g: seen.append(compat.will_engine_execute_node(node)) or g)
    torch.autograd.grad(y, x, retain_graph=True)  # not the parameter's accumulator
    y.backward()  # accumulates into w.grad
    assert seen == [False, True]


def test_gradient_edge_node_is_the_parameters_accumulator():
    w = torch.nn.Parameter(torch.ones(2))
    assert type(compat.gradient_edge_node(w)).__name__ == "AccumulateGrad"


def test_current_graph_task_id_differs_per_backward_and_is_negative_outside():
    ids = []
    for _ in range(2):
        w = torch.ones(2, requires_grad=True)
        y = (w * 3).sum()
        y.register_hook(lambda g: ids.append(compat.current_graph_task_id()) or g)
        y.backward()
    assert compat.current_graph_task_id() == -1
    assert len(ids) == 2 and ids[0] != ids[1] and all(i >= 0 for i in ids)


def test_queue_callback_runs_once_after_every_gradient():
    w = torch.nn.Parameter(torch.ones(2))
    ran = []
    y = (w * 2).sum()
    y.register_hook(lambda g: compat.queue_callback(
        lambda: ran.append(None if w.grad is None else w.grad.clone())) or g)
    y.backward()
    assert len(ran) == 1
    # Queued from inside the pass, it ran at its end: w's gradient was already there.
    assert ran[0] is not None and torch.equal(ran[0], torch.full((2,), 2.0))


def test_has_comm_hook_sees_a_registered_hook_and_degrades_with_one_warning(one_rank_group):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = DDP(torch.nn.Linear(2, 2))
    assert not compat.has_comm_hook(model)
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    assert compat.has_comm_hook(model)

    compat._warned.discard("comm_hooks")
    opaque = torch.nn.Linear(2, 2)  # no _comm_hooks attribute: as a torch that hides it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.has_comm_hook(opaque) is False
        assert compat.has_comm_hook(opaque) is False
    assert len([w for w in caught if "comm hook" in str(w.message)]) == 1


def test_output_weighting_refuses_to_attach_without_a_shim_it_needs(one_rank_group,
                                                                     monkeypatch):
    assert compat.missing_for_output_weighting() == []
    monkeypatch.setattr(compat, "current_graph_task_id", None)
    assert compat.missing_for_output_weighting() == ["torch._C._current_graph_task_id"]
    for weighting in ("output", "none"):
        sampler = WeightedDistributedSampler(range(8), 4, num_replicas=1, rank=0,
                                             policy="equal")
        with pytest.raises(ConfigError, match="_current_graph_task_id"):
            sampler.attach(DDP(torch.nn.Linear(2, 2)), weighting=weighting)
    # The comm-hook weighting does not need it.
    sampler = WeightedDistributedSampler(range(8), 4, num_replicas=1, rank=0, policy="equal")
    sampler.attach(DDP(torch.nn.Linear(2, 2)), weighting="hook")
