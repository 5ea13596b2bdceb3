"""Pull mode: ranks take the next chunk of the epoch from the coordinator whenever they are free.

For work whose ranks do not synchronise every step (batch inference, embedding, evaluation,
preprocessing): a fixed split waits for the slowest rank, a measured split is still a guess;
here the fastest rank simply asks more often. The coordinator's side (leases, guided
self-scheduling, speculation, journal) is in :mod:`shardbalance._leases`; see docs/pull.md for
the delivery contract (at-least-once chunks + index-keyed outputs = exactly-once results).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sys
import threading
import time
import uuid
import warnings
from datetime import timedelta
from typing import Any, Iterator, Sized

import numpy as np

from ._env import read_environment
from ._exceptions import ConfigError, CoordinatorError
from .client import CoordinatorClient, EmbeddedCoordinator
from .order import EpochOrder

__all__ = ["DynamicShardSampler"]

log = logging.getLogger("shardbalance")

_ACKS = ("next", "explicit")


class DynamicShardSampler:
    """Hands each rank the next chunk of the epoch's order when it asks: fast ranks take more.

    A batch sampler: each item it yields is a list of dataset indices (one chunk). Every chunk
    is leased from the coordinator; a rank that dies or stops heartbeating loses its lease and
    the chunk goes to another rank. Iteration ends on every rank once every chunk of the epoch
    is *completed*, not merely handed out. Delivery is at-least-once (a chunk can be processed
    twice: a re-leased or speculative chunk); write outputs keyed by index and deduplicate them
    when merging for exactly-once results.

    Args:
        dataset: anything with ``len()``; its length is the number of samples ``N``.
        chunk_size (int): the largest chunk. Default: ``64``.
        num_replicas (int, optional): the number of ranks. Default: the process group's world
            size, or 1 without one.
        rank (int, optional): this rank. Default: the process group's rank, or 0.
        coordinator (str, optional): a standalone coordinator's ``tcp://host:port``. Default:
            ``SHARDBALANCE_COORDINATOR``, else an embedded one (started by global rank 0 under
            torchrun, or by this process when it is the only rank).
        shuffle (bool): visit the samples in a seeded pseudo-random order. Default: ``False``.
        seed (int): the order's seed, the same on every rank. Default: ``0``.
        min_chunk_size (int): the smallest chunk near the end of an epoch (guided
            self-scheduling). Default: ``max(1, chunk_size // 8)``.
        ack (str): ``"next"``: asking for the next chunk acknowledges the previous one (a plain
            loop, or a DataLoader with ``num_workers=0``). ``"explicit"``: the loop calls
            :meth:`done` once a chunk is processed, so a DataLoader with workers may lease ahead
            for prefetch. Default: ``"next"``.
        lease_s (float): how long a lease lasts without a heartbeat (a background thread renews
            held leases every ``lease_s / 4``). Default: ``30``.
        max_leases (int): how many ranks may hold one chunk at once (speculative copies near
            the end). Default: ``2``.
        run_id (str, optional): names the run on the coordinator; required for independent
            processes sharing a standalone coordinator (all of them pass the same id). A run
            keeps its completed chunks: reusing an id on the same coordinator resumes it.
        coordinator_log (str, optional): the embedded coordinator's journal.
        timeout_s (float, optional): bound on each coordinator request. Default:
            ``SHARDBALANCE_TIMEOUT`` (30 s).

    .. warning::
        Not for DDP training: ranks run different numbers of iterations, so any collective per
        step (DDP's all-reduce, FSDP, SyncBatchNorm, a per-step ``gather_for_metrics``) would
        deadlock. Under a non-elastic torchrun a rank's death takes its node's workers down;
        an elastic job (``--max-restarts``) resumes from the coordinator's journal.

    Example::

        >>> sampler = DynamicShardSampler(dataset, chunk_size=64)
        >>> sampler.set_epoch(0)
        >>> for indices in sampler:      # asking for the next chunk acknowledges this one
        ...     save(indices, model(batch_of(indices)))
        >>> sampler.close()
    """

    def __init__(self, dataset: Sized, chunk_size: int = 64, num_replicas: int | None = None,
                 rank: int | None = None, coordinator: str | None = None, shuffle: bool = False,
                 seed: int = 0, *, min_chunk_size: int | None = None, ack: str = "next",
                 lease_s: float = 30.0, max_leases: int = 2, run_id: str | None = None,
                 coordinator_log: str | None = None, timeout_s: float | None = None) -> None:
        self._closed = True  # until fully built: close() is then safe
        try:
            num_samples = len(dataset)
        except TypeError:
            raise ConfigError(f"Invalid dataset {type(dataset).__name__}: it has no len()") \
                from None
        if num_samples < 1:
            raise ConfigError(f"Invalid dataset of {num_samples} samples, it should have >= 1")
        _check_int("chunk_size", chunk_size, 1)
        if min_chunk_size is None:
            min_chunk_size = max(1, chunk_size // 8)
        _check_int("min_chunk_size", min_chunk_size, 1)
        if min_chunk_size > chunk_size:
            raise ConfigError(f"Invalid min_chunk_size {min_chunk_size}, it should be in "
                              f"[1, chunk_size={chunk_size}]")
        if ack not in _ACKS:
            raise ConfigError(f"Invalid ack {ack!r}, it should be one of {_ACKS}")
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or \
                not 0 < lease_s <= 86400:
            raise ConfigError(f"Invalid lease_s {lease_s!r}, it should be in (0, 86400]")
        _check_int("max_leases", max_leases, 1)
        if max_leases > 16:
            raise ConfigError(f"Invalid max_leases {max_leases}, it should be in [1, 16]")
        _check_int("seed", seed, 0)
        env = read_environment()
        # torch only if the program loaded it: a process group needs it, pull mode does not.
        dist = sys.modules.get("torch.distributed")
        distributed = dist is not None and dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        _check_int("num_replicas", num_replicas, 1)
        if not isinstance(rank, int) or isinstance(rank, bool) or \
                not 0 <= rank < num_replicas:
            raise ConfigError(f"Invalid rank {rank}, rank should be in the interval "
                              f"[0, {num_replicas - 1}]")
        timeout_s = env.timeout_s if timeout_s is None else timeout_s
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or \
                timeout_s <= 0:
            raise ConfigError(f"Invalid timeout_s {timeout_s!r}, it should be > 0")
        if run_id is not None and (not isinstance(run_id, str) or not run_id
                                   or len(run_id) > 128):
            raise ConfigError(f"Invalid run_id {run_id!r}, it should be 1-128 characters of "
                              "[A-Za-z0-9_.:-]")

        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.min_chunk_size = min_chunk_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.ack = ack
        self.lease_s = float(lease_s)
        self.max_leases = max_leases
        self.timeout_s = float(timeout_s)
        self.epoch = 0
        self.generation = env.restart_count
        self.client_id = secrets.token_hex(8)
        self._session = None
        self._embedded: EmbeddedCoordinator | None = None
        self._restore: dict[int, list[list[int]]] = {}
        #: (epoch, start) -> (stop, indices) of every chunk leased and not yet acknowledged.
        self._held: dict[tuple[int, int], tuple[int, list[int]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

        self._pid = os.getpid()
        #: The run key (None: the token, the only secret independent processes share).
        self._run_key = None
        address = coordinator or env.coordinator
        # Pull requests are tiny and answered at once: a short wait per try, resent until
        # timeout_s, so a restarted coordinator is found again within a couple of seconds.
        per_try = min(2.0, self.timeout_s)
        retries = max(1, math.ceil(self.timeout_s / per_try))
        if distributed and dist.get_world_size() == num_replicas:
            from ._peers import PeerGroup
            from ._session import CoordinatorSession

            # A one-member peer group: the session then runs no collective (pull mode runs
            # none), only the rendezvous store exchange of the address, run id and secret.
            self._session = CoordinatorSession(address, env, PeerGroup(1, env.peer_timeout_s),
                                               rank, num_replicas, self.generation,
                                               coordinator_log, self.timeout_s)
            self.run_id = run_id or f"pull-{self._session.run_id}"
            self.address = self._session.address
            self._secret = self._session.client.secret
            self._run_key = self._session.client.run_key
        elif address is not None:
            if run_id is None and num_replicas > 1:
                raise ConfigError(
                    f"Invalid run_id None for {num_replicas} independent processes: give every "
                    "process the same run_id so the coordinator knows they share one run")
            self.run_id = run_id or f"pull-{uuid.uuid4().hex[:12]}"
            self.address = address
            self._secret = env.token
        elif num_replicas == 1:
            self.run_id = run_id or f"pull-{uuid.uuid4().hex[:12]}"
            self._secret = secrets.token_hex(32).encode()
            self._embedded = EmbeddedCoordinator(env.bind or "tcp://127.0.0.1:0",
                                                 coordinator_log or env.log_path, self._secret,
                                                 self.timeout_s)
            self.address = self._embedded.endpoint
        else:
            raise ConfigError(
                f"Invalid coordinator None for {num_replicas} independent processes without a "
                "process group: start `shardbalance coordinator --bind tcp://HOST:PORT` and pass "
                "coordinator='tcp://HOST:PORT' (or SHARDBALANCE_COORDINATOR) and a run_id")
        self._client = CoordinatorClient(self.address, self._secret, per_try, retries,
                                         run_key=self._run_key)
        self._closed = False
        self._heartbeat = threading.Thread(target=self._renew_leases, daemon=True,
                                           name="shardbalance-pull-heartbeat")
        self._heartbeat.start()

    # -- the coordinator ------------------------------------------------------------------

    def _fields(self, epoch: int) -> dict[str, Any]:
        return {"run": self.run_id, "generation": self.generation, "rank": self.rank,
                "world_size": self.num_replicas, "client": self.client_id, "epoch": epoch,
                "num_samples": self.num_samples, "chunk_size": self.chunk_size,
                "min_chunk_size": self.min_chunk_size, "lease_s": self.lease_s,
                "max_leases": self.max_leases}

    def _request(self, epoch: int, op: str = "lease", want: bool = False,
                 done: list[tuple[int, int]] = (), ranges=()) -> dict:
        if self._closed:
            raise ConfigError("Invalid use of a closed DynamicShardSampler")
        with self._lock:
            held = [start for (e, start) in self._held if e == epoch]
            return self._client.pull(**self._fields(epoch), op=op, want=want,
                                     done=[list(r) for r in done], held=held,
                                     ranges=[list(r) for r in ranges])

    def _renew_leases(self) -> None:
        client = CoordinatorClient(self.address, self._secret, min(2.0, self.timeout_s), 1,
                                   run_key=self._run_key)
        try:
            while not self._stop.wait(self.lease_s / 4):
                with self._lock:
                    epochs = {e for (e, _) in self._held}
                    held = {e: [s for (f, s) in self._held if f == e] for e in epochs}
                for epoch, starts in held.items():
                    try:
                        client.pull(**self._fields(epoch), op="lease", want=False, done=[],
                                    held=starts, ranges=[])
                    except CoordinatorError as exc:
                        log.warning("shardbalance: lease heartbeat failed, will retry: %s", exc)
        finally:
            client.close()

    # -- the sampler ----------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Which epoch the next iteration covers (each epoch is its own set of chunks)."""
        _check_int("epoch", epoch, 0)
        self.epoch = epoch

    def __len__(self) -> int:
        raise TypeError("DynamicShardSampler has no length: each rank takes as many chunks as "
                        "it can process; iterate until it stops")

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        order = EpochOrder(self.num_samples, self.seed, epoch, self.shuffle)
        ranges = self._restore.pop(epoch, None)
        if ranges is not None:
            reply = self._request(epoch, op="restore", ranges=ranges)
            if not reply.get("restored"):
                warnings.warn(f"shardbalance: epoch {epoch} was already under way on the "
                              "coordinator; the loaded state_dict's completed chunks were not "
                              "applied (the coordinator's own record is kept)", RuntimeWarning)
        previous: tuple[int, int] | None = None
        try:
            while True:
                done = [previous] if previous is not None else []
                reply = self._request(epoch, want=True, done=done)
                if previous is not None:
                    with self._lock:
                        self._held.pop((epoch, previous[0]), None)
                    previous = None
                if reply["lease"] is not None:
                    start, stop = reply["lease"]
                    indices = order.indices_range(start, stop).tolist()
                    with self._lock:
                        self._held[(epoch, start)] = (stop, indices)
                    if self.ack == "next":
                        previous = (start, stop)
                    yield indices
                    continue
                if reply["complete"]:
                    return
                if self.ack == "explicit" and self._pending(epoch):
                    # The loop must finish (and done()) what it holds before anything else can
                    # be handed to it; waiting here would block the loop that calls done().
                    return
                time.sleep(min(0.01, self.lease_s / 8))
        finally:
            if previous is not None:
                # Left unacknowledged (the loop broke off): stop renewing it, so it expires and
                # goes to another rank.
                with self._lock:
                    self._held.pop((epoch, previous[0]), None)

    def _pending(self, epoch: int) -> bool:
        with self._lock:
            return any(e == epoch for (e, _) in self._held)

    def done(self, indices) -> None:
        """Acknowledge a processed chunk (``ack="explicit"``): ``indices`` as yielded, in order
        (a list, a tensor or an array, e.g. the index column of a collated batch)."""
        if self.ack != "explicit":
            raise ConfigError(f"Invalid call of done() with ack={self.ack!r}: asking for the "
                              "next chunk acknowledges the previous one; use ack='explicit'")
        values = indices.tolist() if hasattr(indices, "tolist") else list(indices)
        with self._lock:
            match = next(((e, s) for (e, s), (_, idx) in self._held.items() if idx == values),
                         None)
        if match is None:
            shown = values if len(values) <= 8 else f"{values[:8]}... ({len(values)} indices)"
            raise ConfigError(f"Invalid indices {shown}: not a chunk this sampler handed out and "
                              "not yet acknowledged")
        epoch, start = match
        stop = self._held[match][0]
        self._request(epoch, done=[(start, stop)])
        with self._lock:
            self._held.pop(match, None)

    @property
    def pending(self) -> list[list[int]]:
        """The chunks handed out and not yet acknowledged (their indices), oldest first."""
        with self._lock:
            return [list(idx) for (_, idx) in self._held.values()]

    def epoch_complete(self) -> bool:
        """Whether every chunk of the current epoch is completed (by any rank).

        With ``ack="explicit"`` iteration also ends when this rank holds unacknowledged chunks
        and nothing is left to hand out; loop ``while not sampler.epoch_complete()`` to take
        over chunks that another rank loses later.
        """
        return bool(self._request(self.epoch)["complete"])

    # -- checkpoint -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The epoch and its completed position ranges (a plain JSON-able dict)."""
        reply = self._request(self.epoch, op="status")
        return {"epoch": self.epoch, "num_samples": self.num_samples, "seed": self.seed,
                "shuffle": self.shuffle, "completed": reply.get("completed", [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration of ``state["epoch"]`` hands out only what was not
        completed. Load the same state on every rank, before iterating."""
        if not isinstance(state, dict):
            raise ConfigError(f"Invalid state {state!r}: expected the dict of state_dict()")
        for key, mine in (("num_samples", self.num_samples), ("seed", self.seed),
                          ("shuffle", self.shuffle)):
            if state.get(key) != mine:
                raise ConfigError(f"Invalid state: {key}={state.get(key)!r}, this sampler has "
                                  f"{mine!r}")
        epoch, completed = state.get("epoch"), state.get("completed")
        _check_int("epoch", epoch, 0)
        if not isinstance(completed, list) or not all(
                isinstance(r, (list, tuple)) and len(r) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                and 0 <= r[0] < r[1] <= self.num_samples for r in completed):
            raise ConfigError(f"Invalid state: completed must be [start, stop] pairs within "
                              f"[0, {self.num_samples}], got {completed!r:.200}")
        self.epoch = epoch
        self._restore[epoch] = [list(r) for r in completed]

    def close(self) -> None:
        """Stop the heartbeat, the client and an embedded coordinator (idempotent)."""
        if self._closed or os.getpid() != self._pid:
            return  # a forked DataLoader worker's copy owns nothing
        self._closed = True
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(self.timeout_s + 1.0)
        self._client.close()
        if self._session is not None:
            self._wait_for_peers_to_close()
            self._session.close()
        if self._embedded is not None:
            self._embedded.stop()

    def _wait_for_peers_to_close(self) -> None:
        """Rank 0 hosts the embedded coordinator: it stops it only once every rank closed (each
        says so in the rendezvous store: no collective), or after ``timeout_s``, so that no
        rank's last request finds the coordinator gone."""
        import torch.distributed as dist

        from . import _torch_compat as compat

        if not dist.is_initialized():
            return
        try:
            store = compat.default_store()
            prefix = f"shardbalance/pull/{self.run_id}/g{self.generation}/closed/"
            me = dist.get_rank()
            if self._session.embedded is None:
                store.set(prefix + str(me), "1")
                return
            others = [prefix + str(r) for r in range(dist.get_world_size()) if r != me]
            if others:
                store.wait(others, timedelta(seconds=self.timeout_s))
        except Exception as exc:  # the store raises its own timeout types
            warnings.warn(f"shardbalance: not every rank closed its DynamicShardSampler within "
                          f"{self.timeout_s:g} s ({exc}); stopping the coordinator anyway",
                          RuntimeWarning)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"Invalid {name} {value!r}, it should be an integer >= {minimum}")
