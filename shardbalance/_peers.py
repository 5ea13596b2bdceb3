"""The sampler's peers: the ranks that must agree, and every collective the sampler runs.

One dedicated gloo group (created on first use, so a sampler without peers opens nothing)
carries the agreement payload (settings, resume position, plan digest: one all-reduce for all
of them), the step-weight sum and the probe's gather. Peers may legitimately be minutes apart (a
checkpoint, an evaluation on one rank), so waits get the peer timeout, not the coordinator's.

With model parallelism (a :class:`Layout`: ``process_group=`` or ``device_mesh=`` on the
sampler) the group spans every rank that holds the sampler, the members of each model replica
included, and only them (created by them alone: ranks outside never take part). Plan
agreement over all of them keeps a replica's members on one plan; sums count each replica once
(divided by its member count) and the probe's figures are gathered per replica.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ._exceptions import ConfigError

__all__ = ["Layout", "PeerGroup", "data_parallel_layout"]


class PeerGroup:
    """The sampler's ranks and their collectives (all no-ops for a single rank).

    Args:
        size: the number of data-parallel replicas (the sampler's ``num_replicas``).
        peer_timeout_s: bound on every wait for the other ranks.
        layout: the ranks that hold the sampler and their replicas; None: every
            torch.distributed rank is one replica.
    """

    def __init__(self, size: int, peer_timeout_s: float, layout: Layout | None = None) -> None:
        self.size = size
        self.peer_timeout_s = peer_timeout_s
        self.layout = layout
        self._group = None

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def group(self):
        """The gloo group (None with one rank or without torch.distributed). Every rank must
        touch it at the same point the first time: creating it is itself a collective."""
        if self.layout is not None:
            if self._group is None and len(self.layout.ranks) > 1:
                key = ("group", self.layout.ranks)
                self._group = self.layout.new_group(self.peer_timeout_s, _built[key])
                _built[key] += 1
            return self._group
        if self._group is None and self.size > 1 and self.distributed \
                and dist.get_world_size() > 1:
            if dist.get_world_size() != self.size:
                # Ranks outside the sampler's num_replicas (tensor or pipeline parallel peers)
                # would join every sum and gather: step weights and probe figures silently
                # off by their count. Refused on every rank alike, before any collective.
                raise ConfigError(
                    f"num_replicas={self.size} but torch.distributed has "
                    f"{dist.get_world_size()} ranks: for data parallelism over a subgroup "
                    "(tensor or pipeline parallel peers) pass the data-parallel group as "
                    "process_group= (or device_mesh= and mesh_dim=)")
            self._group = dist.new_group(backend="gloo",
                                         timeout=timedelta(seconds=self.peer_timeout_s))
        return self._group

    def new_thread_group(self):
        """A second gloo group over the same ranks, for one thread's own collectives (the
        background planner's): None without peers. Every rank holding the sampler must call it
        at the same point (creating a group is itself a collective). Use the group's own
        methods (``allreduce``, ``broadcast``, ``gather``): a group of some ranks only is not
        registered with torch.distributed.

        Gloo connects every pair of ranks when a group is created unless
        ``TORCH_GLOO_LAZY_INIT=1`` is set in the launch environment (torch reads it): then a
        pair connects on its first message, which is what a job of thousands of ranks wants (a
        ring all-reduce and a broadcast touch a few peers each, not all of them).
        """
        if self.group is None:
            return None
        if self.layout is not None:
            key = ("group", self.layout.ranks)
            group = self.layout.new_group(self.peer_timeout_s, _built[key])
            _built[key] += 1
            return group
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=self.peer_timeout_s))

    def replica_of(self, index: int) -> int:
        """The data-parallel index of the group's ``index``-th rank."""
        return index if self.layout is None else self.layout.replica[index]

    def agree(self, values: Mapping[str, int]) -> dict[str, bool]:
        """Whether every rank passed the same value, per name: one all-reduce for all names.

        Values are int64s; every rank must pass the same names in the same order (the
        payload's shape is part of the protocol between ranks). Without peers: all True.
        """
        names = list(values)
        if self.group is None:
            return {name: True for name in names}
        mine = [int(values[n]) for n in names]
        both = torch.tensor(mine + [-v for v in mine], dtype=torch.int64)
        _all_reduce(both, self._group, dist.ReduceOp.MAX)
        n = len(names)
        return {name: int(both[i]) == v and -int(both[n + i]) == v
                for i, (name, v) in enumerate(zip(names, mine))}

    def next_instance(self) -> str:
        """A name for a new session's store keys, the same on every rank holding the sampler:
        how many were built before it over the same ranks (those build theirs in one order;
        ranks outside, which build fewer, do not shift it)."""
        key = None if self.layout is None else self.layout.ranks
        count = _built[key]
        _built[key] += 1
        return str(count) if key is None else f"{count}r{self.layout.digest:x}"

    @property
    def leader(self) -> bool:
        """Whether this rank starts the embedded coordinator: global rank 0, or the lowest
        rank holding the sampler when only some ranks do."""
        if not self.distributed:
            return True
        return dist.get_rank() == (self.layout.ranks[0] if self.layout is not None else 0)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the replicas (float64): each replica counted once, which takes
        every member of a replica passing the same values (the same on every rank)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            _all_reduce(tensor, self._group)
            if self.layout is not None and self.layout.members > 1:
                tensor /= self.layout.members
        return tensor.tolist()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values``, in rank order (float64); with model-parallel peers every
        rank holding the sampler, by global rank (see :meth:`gather_replicas`)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is None:
            return [tensor.tolist()]
        rows = [torch.zeros_like(tensor) for _ in range(self._group.size())]
        self._group.allgather([rows], [tensor]).wait()
        return [r.tolist() for r in rows]

    def gather_replicas(self, values: list[float]) -> list[list[list[float]]]:
        """Each replica's members' ``values``, by data-parallel index (one collective)."""
        rows = self.gather(values)
        if self.layout is None:
            return [[row] for row in rows]
        replicas: list[list[list[float]]] = [[] for _ in range(self.size)]
        for index, row in zip(self.layout.replica if self._group is not None else [0], rows):
            replicas[index].append(row)
        return replicas

    def broadcast_from_first(self, values: list[float]) -> list[float]:
        """The first rank's ``values`` on every rank: numbers that must be identical bit for
        bit are computed once (floating-point libraries differ between CPUs)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            options = dist.BroadcastOptions()
            options.rootRank, options.rootTensor = 0, 0
            self._group.broadcast([tensor], options).wait()
        return tensor.tolist()

    def barrier(self) -> None:
        if self.group is not None:
            self._group.barrier().wait()

    def wait_all(self, timeout_s: float) -> None:
        """A barrier bounded by ``timeout_s`` (warns instead of raising when a rank is late)."""
        if self._group is None or not self.distributed:
            return
        try:
            self._group.monitored_barrier(timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            warnings.warn(f"shardbalance: not every rank reached close() ({exc}); "
                          "stopping anyway", RuntimeWarning)


#: Samplers (sessions, groups, replica-group exchanges) built so far, per set of ranks that
#: build them.
_built: Counter = Counter()


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    # The group's own methods: a group of some ranks only is not registered with
    # torch.distributed (see Layout.new_group), so its module-level collectives do not know it.
    options = dist.AllreduceOptions()
    options.reduceOp = op
    group.allreduce([tensor], options).wait()


@dataclass(frozen=True)
class Layout:
    """Which ranks hold the sampler, and the data-parallel replica of each.

    Args:
        ranks: global ranks, ascending.
        replica: the data-parallel index of each of ``ranks``.
    """

    ranks: tuple[int, ...]
    replica: tuple[int, ...]
    #: The restart round (store keys of earlier rounds may still be there).
    generation: int = 0

    @property
    def members(self) -> int:
        """Ranks per replica (the same for every replica)."""
        return len(self.ranks) // (max(self.replica) + 1)

    @property
    def digest(self) -> int:
        return _digest([self.ranks, self.replica])

    def new_group(self, timeout_s: float, instance: int):
        """The gloo group of :attr:`ranks`, created by them alone (the ``instance``-th over
        these ranks); refuses, on every rank, a layout that its ranks see differently (their
        process groups do not fit together).

        Not ``dist.new_group(ranks, use_local_synchronization=True)``: torch names such a group
        after the number of groups each rank holds, which differs once some ranks built a
        sampler that others did not, and the creation then waits out the timeout. A gloo group
        of its own, rendezvousing under a store prefix of this sampler's, needs only its ranks
        and leaves torch's group registry (and the user's later groups) as it was.
        """
        from . import _torch_compat as compat

        try:
            base = compat.default_store()
        except RuntimeError as exc:
            raise ConfigError(str(exc)) from None
        # Named by the ranks alone, so that ranks that see the replicas differently still meet
        # and are refused below, instead of each waiting for a group of its own.
        store = dist.PrefixStore(f"shardbalance/g{self.generation}/group{instance}r"
                                 f"{_digest(self.ranks):x}/", base)
        group = dist.ProcessGroupGloo(store, self.ranks.index(dist.get_rank()),
                                      len(self.ranks), timedelta(seconds=timeout_s))
        mine = self.digest
        both = torch.tensor([mine, -mine], dtype=torch.int64)
        _all_reduce(both, group, dist.ReduceOp.MAX)
        if int(both[0]) != mine or -int(both[1]) != mine:
            raise ConfigError(
                f"the ranks holding this sampler see different data-parallel layouts (this "
                f"rank: ranks {list(self.ranks)} in replicas {list(self.replica)}): every "
                "rank must pass matching process_group/replica_group (or the same device_mesh)")
        return group


def _digest(value) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(value).encode()).digest()[:8], "big") >> 1


def _check_layout(ranks: list[int], replica: list[int], size: int, generation: int) -> Layout:
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    layout = Layout(tuple(ranks[i] for i in order), tuple(replica[i] for i in order),
                    generation)
    counts = np.bincount(np.asarray(layout.replica), minlength=size)
    if len(set(layout.ranks)) != len(ranks) or len(counts) != size or \
            len(set(counts.tolist())) != 1:
        raise ConfigError(
            f"the replicas' member ranks overlap or differ in number: ranks {list(layout.ranks)} "
            f"in replicas {list(layout.replica)}; every data-parallel replica must hold the "
            "sampler on the same number of distinct ranks")
    return layout


def data_parallel_layout(process_group: Any = None, device_mesh: Any = None,
                         mesh_dim: str | int | None = None, replica_group: Any = None,
                         generation: int = 0, timeout_s: float = 1800.0
                         ) -> tuple[int, int, Layout]:
    """``(num_replicas, rank, layout)`` of a sampler over a data-parallel group.

    ``process_group``: the data-parallel group; the sampler is held by its ranks, and with
    ``replica_group`` (this rank's model-parallel peers that hold the sampler too) by theirs
    as well, exchanged through the rendezvous store. ``device_mesh`` and ``mesh_dim``: the mesh
    dimension that is data-parallel; every rank of the mesh holds the sampler.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("process_group=/device_mesh= need torch.distributed initialized: "
                          "call init_process_group() first")
    me = dist.get_rank()
    if device_mesh is not None:
        if process_group is not None or replica_group is not None:
            raise ConfigError("pass either device_mesh= (with mesh_dim=) or process_group= "
                              "(with replica_group=), not both")
        names = tuple(device_mesh.mesh_dim_names or ())
        if mesh_dim is None and device_mesh.ndim == 1:
            axis = 0
        elif isinstance(mesh_dim, str) and mesh_dim in names:
            axis = names.index(mesh_dim)
        elif isinstance(mesh_dim, int) and not isinstance(mesh_dim, bool) and \
                0 <= mesh_dim < device_mesh.ndim:
            axis = mesh_dim
        else:
            raise ConfigError(f"Invalid mesh_dim {mesh_dim!r}: the device mesh has dimensions "
                              f"{names or tuple(range(device_mesh.ndim))}; name the "
                              "data-parallel one")
        grid = device_mesh.mesh.cpu().numpy()
        if me not in grid:
            raise ConfigError(f"rank {me} is not in the device mesh {grid.tolist()}")
        coords = np.indices(grid.shape)[axis]
        layout = _check_layout(grid.ravel().tolist(), coords.ravel().tolist(),
                               grid.shape[axis], generation)
        return grid.shape[axis], int(coords[grid == me][0]), layout
    if mesh_dim is not None:
        raise ConfigError(f"mesh_dim={mesh_dim!r} needs device_mesh=")
    if process_group is None:
        raise ConfigError("replica_group= needs process_group= (the data-parallel group)")
    data_ranks = dist.get_process_group_ranks(process_group)
    if me not in data_ranks:
        raise ConfigError(f"rank {me} is not in the process_group (ranks {data_ranks})")
    # Group rank order is the data-parallel index.
    data_ranks = sorted(data_ranks, key=lambda r: dist.get_group_rank(process_group, r))
    size = len(data_ranks)
    if replica_group is None:
        layout = _check_layout(list(data_ranks), list(range(size)), size, generation)
        return size, data_ranks.index(me), layout
    peers = sorted(dist.get_process_group_ranks(replica_group))
    if me not in peers:
        raise ConfigError(f"rank {me} is not in the replica_group (ranks {peers})")
    # The replicas' members reach this rank through the store (a collective over the
    # data-parallel group would need a group the caller may not have on a CPU backend).
    from . import _torch_compat as compat

    try:
        store = compat.default_store()
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    # Counted per data-parallel group: its ranks are the ones that read each other's keys.
    exchange = ("exchange", tuple(data_ranks))
    group = "_".join(map(str, data_ranks))
    prefix = f"shardbalance/g{generation}/layout{_built[exchange]}r{group}/"
    _built[exchange] += 1
    store.set(prefix + str(me), json.dumps(peers))
    keys = [prefix + str(r) for r in data_ranks]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as exc:  # the store raises its own timeout types
        raise ConfigError(f"rank {me} waited {timeout_s:g} s for the data-parallel ranks "
                          f"{data_ranks} to build the sampler: {exc}") from exc
    ranks, replica = [], []
    for index, key in enumerate(keys):
        members = json.loads(store.get(key).decode())
        if data_ranks[index] not in members:
            raise ConfigError(f"rank {data_ranks[index]}'s replica_group {members} does not "
                              "contain it")
        ranks += members
        replica += [index] * len(members)
    layout = _check_layout(ranks, replica, size, generation)
    return size, layout.replica[layout.ranks.index(me)], layout
