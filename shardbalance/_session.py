"""A job's session with its coordinator: start-up, the address exchange, the clients, shutdown.

Global rank 0 starts the embedded coordinator (a child process) unless a standalone one is
given; the address, the run id and the run's secret reach the other ranks through the
torch.distributed rendezvous store (DESIGN §8), never through a collective. The session holds
the request client and the background stats sender, and stops all of it at close or exit.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
import weakref
from datetime import timedelta

import torch.distributed as dist

from . import _torch_compat as compat
from ._env import Environment
from ._exceptions import ConfigError, CoordinatorError
from ._peers import PeerGroup
from .client import (CoordinatorClient, EmbeddedCoordinator, StatsSender, external_address,
                     routable_address, running_interfaces)

__all__ = ["CoordinatorSession"]

log = logging.getLogger("shardbalance")


class CoordinatorSession:
    """Connects one sampler's ranks to a coordinator; every rank builds one at the same point.

    Args:
        address: a standalone coordinator's ``tcp://host:port``, or None to embed one.
        env: the environment (token, bind address, journal path, rendezvous address).
        peers: the sampler's ranks (the barrier that orders the store exchange).
        rank, world_size, generation: this rank's identity in the run.
        journal: the embedded coordinator's journal path (None: the environment's or default).
        timeout_s: bound on each wait for the coordinator or for rank 0's published address.
    """

    def __init__(self, address: str | None, env: Environment, peers: PeerGroup, rank: int,
                 world_size: int, generation: int, journal: str | None,
                 timeout_s: float) -> None:
        self.embedded: EmbeddedCoordinator | None = None
        self.client: CoordinatorClient | None = None
        self.sender: StatsSender | None = None
        # What the finalizer stops, held apart from self so that it cannot keep self alive.
        self._parts: list = []
        self._finalizer = weakref.finalize(self, _shutdown, self._parts)
        try:
            self._connect(address, env, peers, rank, world_size, generation, journal, timeout_s)
        except BaseException:
            self._finalizer()
            raise

    def _connect(self, address, env, peers, rank, world_size, generation, journal,
                 timeout_s) -> None:
        instance = peers.next_instance()
        store = _store() if peers.distributed else None
        prefix = f"shardbalance/g{generation}/s{instance}/"
        leader = peers.leader
        peers.group  # created here, at the same point on every rank
        if leader:
            run_id = uuid.uuid4().hex[:12]
            if store is not None:
                # One run id for the whole job: an elastic restart keeps it (the rendezvous
                # store outlives the workers) and only the generation moves on.
                run_id = store.compare_set(f"shardbalance/run/s{instance}", "", run_id).decode()
            secret = env.token
            if address is None:
                secret = secrets.token_hex(32).encode()
                bind = env.bind or f"tcp://{coordinator_host(env)}:0"
                journal = journal or env.log_path or f"shardbalance_logs/{run_id}.jsonl"
                parent = os.path.dirname(journal)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                self.embedded = EmbeddedCoordinator(bind, journal, secret, timeout_s)
                self._parts.append(self.embedded)
                address = self.embedded.endpoint
                if "0.0.0.0" in address or "*" in address:
                    host = coordinator_host(env)
                    address = address.replace("0.0.0.0", host).replace("*", host)
                log.info("shardbalance: embedded coordinator at %s (pid %d), journal %s",
                         address, self.embedded.pid, journal)
            if store is not None:
                store.set(prefix + "run", run_id)
                store.set(prefix + "address", address)
                store.set(prefix + "secret", (secret or b"").decode())
        # Keys of an earlier rendezvous round may still be in the store: read only after
        # rank 0 has written this round's.
        peers.barrier()
        if not leader:
            keys = [prefix + k for k in ("run", "address", "secret")]
            try:
                store.wait(keys, timedelta(seconds=timeout_s))
            except Exception as exc:  # the store raises its own timeout types
                raise CoordinatorError(
                    f"rank {rank} waited {timeout_s:g} s for rank 0 to publish the "
                    f"coordinator address: {exc}") from exc
            run_id, address, secret = (store.get(k).decode() for k in keys)
            secret = secret.encode() or None
        self.run_id: str = run_id
        self.address: str = address
        self.client = CoordinatorClient(address, secret, timeout_s=min(5.0, timeout_s),
                                        retries=max(1, int(timeout_s // 5)))
        self._parts.insert(0, self.client)
        self.sender = StatsSender(address, secret, {
            "run": run_id, "generation": generation, "rank": rank, "world_size": world_size})
        self._parts.insert(0, self.sender)

    def flush(self, timeout_s: float) -> None:
        """Wait (bounded) until every measurement pushed so far has reached the coordinator."""
        if self.sender is not None:
            self.sender.flush(timeout_s)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Flush, then stop the sender, the client and the embedded coordinator."""
        self._finalizer()


def _shutdown(parts: list) -> None:
    """Stop the sender (after a last flush), then the client, then the embedded coordinator."""
    for part in parts:
        if isinstance(part, StatsSender):
            part.flush(1.0)
            part.close()
        elif isinstance(part, CoordinatorClient):
            part.close()
        else:
            part.stop()


def coordinator_host(env: Environment) -> str:
    """The address the other ranks reach rank 0 by; never loopback when the job spans nodes."""
    host = routable_address(env.master_addr, env.master_port)
    if host.startswith("127.") and env.spans_nodes:
        # MASTER_ADDR is this host's name and /etc/hosts maps it to a loopback address (the
        # Debian default); torchrun and gloo still work there, so find the address otherwise.
        host = external_address(env.socket_interfaces)
        if host is None:
            named = (f"GLOO_SOCKET_IFNAME={','.join(env.socket_interfaces)} has no IPv4 "
                     f"address; " if env.socket_interfaces else "")
            running = ", ".join(f"{name} {address}"
                                for name, address in running_interfaces().items())
            raise ConfigError(
                f"the job spans several nodes but rank 0's host name resolves only to a "
                f"loopback address ({named}interfaces up: {running or 'none'}); "
                f"set GLOO_SOCKET_IFNAME=<the interface the other nodes reach> or "
                f"SHARDBALANCE_BIND=tcp://<this node's IP>:0")
    return host


def _store():
    try:
        return compat.default_store()
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from exc
