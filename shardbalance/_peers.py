"""The sampler's peers: the ranks that must agree, and every collective the sampler runs.

One dedicated gloo group (created on first use, so a sampler without peers opens nothing)
carries the agreement payload (settings, resume position, plan digest: one all-reduce for all
of them), the step-weight sum and the probe's gather. Peers may legitimately be minutes apart (a
checkpoint, an evaluation on one rank), so waits get the peer timeout, not the coordinator's.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ._exceptions import ConfigError

__all__ = ["PeerGroup"]


class PeerGroup:
    """The sampler's ranks and their collectives (all no-ops for a single rank).

    Args:
        size: the number of ranks that agree (the sampler's ``num_replicas``).
        peer_timeout_s: bound on every wait for the other ranks.
    """

    def __init__(self, size: int, peer_timeout_s: float) -> None:
        self.size = size
        self.peer_timeout_s = peer_timeout_s
        self._group = None

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def group(self):
        """The gloo group (None with one rank or without torch.distributed). Every rank must
        touch it at the same point the first time: creating it is itself a collective."""
        if self._group is None and self.size > 1 and self.distributed \
                and dist.get_world_size() > 1:
            if dist.get_world_size() != self.size:
                # Ranks outside the sampler's num_replicas (tensor or pipeline parallel peers)
                # would join every sum and gather: step weights and probe figures silently
                # off by their count. Refused on every rank alike, before any collective.
                raise ConfigError(
                    f"num_replicas={self.size} but torch.distributed has "
                    f"{dist.get_world_size()} ranks: a sampler over a data-parallel subgroup "
                    "(model-parallel peers) is not supported yet; every rank of the job must "
                    "be one data-parallel replica")
            self._group = dist.new_group(backend="gloo",
                                         timeout=timedelta(seconds=self.peer_timeout_s))
        return self._group

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
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self._group)
        n = len(names)
        return {name: int(both[i]) == v and -int(both[n + i]) == v
                for i, (name, v) in enumerate(zip(names, mine))}

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(tensor, group=self._group)
        return tensor.tolist()

    def gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values``, in rank order (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is None:
            return [tensor.tolist()]
        rows = [torch.zeros_like(tensor) for _ in range(self.size)]
        dist.all_gather(rows, tensor, group=self._group)
        return [r.tolist() for r in rows]

    def broadcast_from_first(self, values: list[float]) -> list[float]:
        """The first rank's ``values`` on every rank: numbers that must be identical bit for
        bit are computed once (floating-point libraries differ between CPUs)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.group is not None:
            dist.broadcast(tensor, src=dist.get_global_rank(self._group, 0), group=self._group)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self._group)

    def wait_all(self, timeout_s: float) -> None:
        """A barrier bounded by ``timeout_s`` (warns instead of raising when a rank is late)."""
        if self._group is None or not self.distributed:
            return
        try:
            dist.monitored_barrier(group=self._group, timeout=timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            warnings.warn(f"shardbalance: not every rank reached close() ({exc}); "
                          "stopping anyway", RuntimeWarning)


def new_gloo_group(size: int, peer_timeout_s: float):
    """A gloo group of every rank for one thread's own collectives (None without peers).

    Every rank must call it at the same point (creating a group is itself a collective). Gloo
    connects every pair of ranks when a group is created unless ``TORCH_GLOO_LAZY_INIT=1`` is
    set in the launch environment (torch reads it): then a pair connects on its first
    message, which is what a job of thousands of ranks wants (a ring all-reduce and a broadcast
    touch a few peers each, not all of them).
    """
    if size <= 1 or not (dist.is_available() and dist.is_initialized()) or \
            dist.get_world_size() <= 1:
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=peer_timeout_s))
