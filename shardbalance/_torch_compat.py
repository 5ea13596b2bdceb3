"""Every private torch API shardbalance uses, behind one shim each.

torch exposes no public way to do these things; each shim says what it is for, what happens
when a torch release drops the API, and has a test (``tests/test_torch_compat.py``) that fails
on a torch where it no longer works. Where correctness depends on a shim, the feature that
needs it refuses to start without it (:func:`missing_for_output_weighting`); where only
convenience does, the shim degrades and warns once.

Tested with torch 2.13 and 2.14 (``pyproject.toml`` declares the range).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

__all__ = ["default_store", "tree_flatten", "tree_unflatten", "will_engine_execute_node",
           "gradient_edge_node", "current_graph_task_id", "queue_callback", "has_comm_hook",
           "missing_for_output_weighting", "fsdp_module_type", "fsdp_param_groups",
           "fsdp_reduces_gradients", "fsdp_data_parallel_degree", "fsdp_unsharded_parameters",
           "fsdp_divide_factor"]

try:  # the store torch.distributed rendezvoused with: the address exchange (DESIGN §8)
    from torch.distributed.distributed_c10d import _get_default_store as _store_getter
except ImportError:  # pragma: no cover - depends on the torch release
    _store_getter = None

try:  # output weighting walks the model's outputs
    from torch.utils._pytree import tree_flatten, tree_unflatten
except ImportError:  # pragma: no cover
    tree_flatten = tree_unflatten = None  # type: ignore[assignment]

#: Whether the running backward pass will execute an autograd node: tells a training
#: ``backward()`` (which reaches the parameters' gradient accumulators) from
#: ``torch.autograd.grad`` (which does not).
will_engine_execute_node: Callable[[Any], bool] | None = getattr(
    torch._C, "_will_engine_execute_node", None)

#: The running backward pass's id: tells a new backward from the one a step opened.
current_graph_task_id: Callable[[], int] | None = getattr(
    torch._C, "_current_graph_task_id", None)

_get_gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
_engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
_warned: set[str] = set()


def default_store():
    """The torch.distributed store of the default process group (no public accessor exists).

    Raises ``RuntimeError`` where this torch does not offer it: the embedded coordinator's
    address cannot then be shared (use a standalone coordinator instead).
    """
    if _store_getter is None:
        raise RuntimeError("this torch release has no torch.distributed default store accessor; "
                           "start a standalone coordinator and set SHARDBALANCE_COORDINATOR")
    return _store_getter()


def gradient_edge_node(parameter: torch.Tensor) -> Any:
    """The autograd node that accumulates ``parameter``'s gradient (public since torch 2.2)."""
    return _get_gradient_edge(parameter).node


def queue_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the running backward pass finishes (after every gradient)."""
    _engine.queue_callback(callback)


def has_comm_hook(model: torch.nn.Module) -> bool:
    """Whether a DDP model already has a comm hook. Convenience only: where torch does not
    tell, this warns once and answers False (DDP itself then refuses a second hook)."""
    hooks = getattr(model, "_comm_hooks", None)
    if hooks is None:
        _warn_once("comm_hooks", "shardbalance cannot see whether this DDP model already has a "
                   "comm hook on this torch release; it relies on DDP to refuse a second one")
        return False
    return bool(hooks)


def missing_for_output_weighting() -> list[str]:
    """The shims ``weighting='output'`` needs for exact steps that this torch lacks."""
    needed = {"torch.utils._pytree.tree_flatten": tree_flatten,
              "torch._C._will_engine_execute_node": will_engine_execute_node,
              "torch._C._current_graph_task_id": current_graph_task_id,
              "torch.autograd.graph.get_gradient_edge": _get_gradient_edge,
              "Variable._execution_engine.queue_callback": _engine}
    return [name for name, value in needed.items() if value is None]


def fsdp_module_type() -> type | None:
    """FSDP2's ``FSDPModule`` (what ``fully_shard`` turns a module into), or None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - depends on the torch release
        return None
    return FSDPModule


def fsdp_param_groups(model: torch.nn.Module) -> list[Any]:
    """The FSDP2 parameter groups of every ``fully_shard``ed module in ``model`` (private:
    ``_get_fsdp_state()._fsdp_param_group``; empty where this torch hides them)."""
    kind = fsdp_module_type()
    groups = []
    for module in model.modules():
        if kind is not None and isinstance(module, kind):
            state = getattr(module, "_get_fsdp_state", lambda: None)()
            several = getattr(state, "_fsdp_param_groups", None)
            if several is not None:
                groups.extend(g for g in several if g is not None)
                continue
            group = getattr(state, "_fsdp_param_group", None)
            if group is not None:
                groups.append(group)
    return groups


def fsdp_reduces_gradients(groups: list[Any]) -> bool:
    """Whether the next backward reduce-scatters (False inside gradient accumulation:
    ``set_requires_gradient_sync(False)``)."""
    # HSDP: set_requires_all_reduce(False) also keeps a step open (no all-reduce across the
    # replicas yet).
    return any(getattr(g, "reduce_grads", True) and getattr(g, "all_reduce_grads", True)
               for g in groups) if groups else True


def fsdp_divide_factor(groups: list[Any]) -> float | None:
    """The custom factor FSDP2 divides each reduced gradient by (``set_gradient_divide_factor``;
    None: the default, the data-parallel degree). Raises ValueError if the groups differ."""
    factors = {getattr(g, "gradient_divide_factor", None) for g in groups}
    if len(factors) > 1:
        raise ValueError(f"the FSDP2 modules divide their gradients by different factors "
                         f"{sorted(map(str, factors))}")
    return factors.pop() if factors else None


def fsdp_data_parallel_degree(groups: list[Any]) -> int | None:
    """The number of ranks FSDP2 averages each gradient over: the shard mesh size, times the
    replicate mesh size under HSDP. None if it cannot be read or differs between groups."""
    sizes = set()
    for group in groups:
        info = getattr(group, "mesh_info", None)
        shard = getattr(info, "shard_mesh_size", None)
        if shard is None:
            return None
        sizes.add(int(shard) * int(getattr(info, "replicate_mesh_size", 1) or 1))
    return sizes.pop() if len(sizes) == 1 else None


def fsdp_unsharded_parameters(groups: list[Any]) -> list[torch.Tensor]:
    """The unsharded parameters FSDP2's forward computes with (created at its first forward,
    then kept): their gradient accumulators are in a training backward's graph, the sharded
    parameters' are not. Empty where this torch hides them."""
    params = []
    for group in groups:
        for fsdp_param in getattr(group, "fsdp_params", ()):
            param = getattr(fsdp_param, "_unsharded_param", None)
            if isinstance(param, torch.Tensor) and param.requires_grad:
                params.append(param)
    return params


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
