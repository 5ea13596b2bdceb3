"""A job's session with its coordinator: start-up, the address exchange, the clients, shutdown.

Global rank 0 starts the embedded coordinator (a child process) unless a standalone one is
given; the address, the run id, the token and the run key reach the other ranks through the
torch.distributed rendezvous store (DESIGN §8), never through a collective. The run key is the
job's own (DESIGN §10): made once per job (an elastic restart keeps it, as it keeps the run id),
it signs every request of the run; the embedded coordinator takes it as its token too, so only
this job can create runs on it. The session holds
the request client and the background stats sender, and stops all of it at close or exit.

The generation follows the rendezvous round. torchrun counts a restart after a failure
(``TORCHELASTIC_RESTART_COUNT``) but not after a membership change (a node joining or leaving
restarts every worker with a new world size and the same count). So rank 0 keeps each round's
generation in the rendezvous store (which torchrun's agents keep across rounds by default): a
round's generation is the restart count, or one more than the previous round's where that is
larger, and every rank reads it from the store. Where the store is made anew each round
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) nothing of the earlier round is there: the round is
then a new run (a new run id), its generation the restart count. Each rank also names itself
(host, local rank, device) so that a coordinator that lives across rounds can keep the history
of the ranks whose hardware did not change.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
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

__all__ = ["CoordinatorSession", "member_identity"]

log = logging.getLogger("shardbalance")


class CoordinatorSession:
    """Connects one sampler's ranks to a coordinator; every rank builds one at the same point.

    Args:
        address: a standalone coordinator's ``tcp://host:port``, or None to embed one.
        env: the environment (token, bind address, journal path, rendezvous address).
        peers: the sampler's ranks (the barrier that orders the store exchange).
        rank, world_size: this rank's identity in the run.
        generation: torchrun's restart count; the session's :attr:`generation` also moves on
            with rounds that torchrun does not count (see the module docstring).
        journal: the embedded coordinator's journal path (None: the environment's or default).
        timeout_s: bound on each wait for the coordinator or for rank 0's published address.
    """

    def __init__(self, address: str | None, env: Environment, peers: PeerGroup, rank: int,
                 world_size: int, generation: int, journal: str | None,
                 timeout_s: float) -> None:
        self.embedded: EmbeddedCoordinator | None = None
        self.client: CoordinatorClient | None = None
        self.sender: StatsSender | None = None
        #: The plan generation every rank of this worker group uses (see the module docstring).
        self.generation: int = generation
        #: The embedded coordinator's secret, for ``shardbalance status`` (rank 0 only).
        self.key_file: str | None = None
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
            run_key = secrets.token_hex(32)
            if store is not None:
                run_key = store.compare_set(f"shardbalance/key/s{instance}", "",
                                            run_key).decode()
            run_key = run_key.encode()
            secret = env.token
            if address is None:
                # The embedded coordinator's token (what `shardbalance status` is given through
                # the key file below) is not the run key: its holder can watch the job and
                # create runs of its own, never steer this job's run.
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
                self.key_file = _write_key_file(journal + ".token", secret)
                if self.key_file is not None:
                    self._parts.append(_KeyFile(self.key_file))
                log.info("shardbalance: embedded coordinator at %s (pid %d), journal %s; "
                         "watch it with: shardbalance status --coordinator %s --token-file %s",
                         address, self.embedded.pid, journal, address, self.key_file)
            if store is not None:
                # Once per worker group (its rank 0's session number `instance`): a membership
                # change is then a new generation although torchrun's count stays.
                last = f"shardbalance/generation/s{instance}"
                if store.check([last]):
                    generation = max(generation, int(store.get(last)) + 1)
                store.set(last, str(generation))
                store.set(prefix + "generation", str(generation))
                store.set(prefix + "run", run_id)
                store.set(prefix + "address", address)
                store.set(prefix + "secret", (secret or b"").decode())
                store.set(prefix + "key", run_key.decode())
        # Keys of an earlier rendezvous round may still be in the store: read only after
        # rank 0 has written this round's.
        peers.barrier()
        if not leader:
            keys = [prefix + k for k in ("run", "address", "secret", "key", "generation")]
            try:
                store.wait(keys, timedelta(seconds=timeout_s))
            except Exception as exc:  # the store raises its own timeout types
                raise CoordinatorError(
                    f"rank {rank} waited {timeout_s:g} s for rank 0 to publish the "
                    f"coordinator address: {exc}") from exc
            run_id, address, secret, run_key, generation = (store.get(k).decode()
                                                            for k in keys)
            secret = secret.encode() or None
            run_key = run_key.encode()
            generation = int(generation)
        self.generation = generation
        self.run_id: str = run_id
        self.address: str = address
        self.client = CoordinatorClient(address, secret, timeout_s=min(5.0, timeout_s),
                                        retries=max(1, int(timeout_s // 5)), run_key=run_key)
        self._parts.insert(0, self.client)
        self.sender = StatsSender(address, secret, {
            "run": run_id, "generation": generation, "rank": rank, "world_size": world_size,
            "member": member_identity(env, rank)}, run_key=run_key)
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


def member_identity(env: Environment, rank: int) -> str:
    """``host/local rank/device``: what a rank runs on, the same across rendezvous rounds as
    long as its hardware is. The device is named only where CUDA is already initialised (this
    never initialises it)."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = "cuda"
        if torch.cuda.is_initialized():
            index = torch.cuda.current_device()
            device = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    local = env.local_rank if env.local_rank is not None else rank
    text = f"{socket.gethostname()}/{local}/{device}"
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:128]


def _write_key_file(path: str, secret: bytes) -> str | None:
    """Write the embedded coordinator's secret to ``path``, readable by this user only (who can
    read it from the coordinator's environment anyway); None if it cannot be written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
            os.write(fd, secret + b"\n")
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("shardbalance: cannot write the coordinator key to %s (%s); "
                    "`shardbalance status` cannot reach this coordinator", path, exc)
        return None
    return path


class _KeyFile:
    """Removes the key file when the session stops (the key is useless afterwards)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def stop(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


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
