"""Every environment variable shardbalance reads, read here and nowhere else.

    SHARDBALANCE_COORDINATOR   address of a standalone coordinator, e.g. tcp://10.0.0.5:5555
    SHARDBALANCE_TOKEN         a standalone coordinator's token: authorises creating runs and
                               derives its CURVE key pair (or ...)
    SHARDBALANCE_TOKEN_FILE    ... a file holding it
    SHARDBALANCE_BIND          endpoint the embedded coordinator binds (default: the interface
                               that routes to MASTER_ADDR, on a free port)
    SHARDBALANCE_LOG           journal path of the embedded coordinator
    SHARDBALANCE_TIMEOUT       seconds to wait for the coordinator (default 30)
    SHARDBALANCE_PEER_TIMEOUT  seconds to wait for the other ranks at a plan boundary (default 1800)
    TORCHELASTIC_RESTART_COUNT torchrun's restart count: where the plan generation starts
                               (a membership change restarts the workers without counting;
                               the session then moves it on through the rendezvous store)
    LOCAL_RANK                 torchrun's rank on this node: part of a rank's identity (host,
                               local rank, device) that lets a new generation keep its history
    MASTER_ADDR, MASTER_PORT   torchrun's rendezvous address
    WORLD_SIZE, LOCAL_WORLD_SIZE  torchrun's rank counts (does the job span nodes?)
    GLOO_SOCKET_IFNAME         gloo's interfaces (comma-separated): where the embedded
                               coordinator binds when rank 0's host name maps to loopback
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._exceptions import ConfigError

__all__ = ["Environment", "read_environment", "read_token"]


@dataclass(frozen=True, kw_only=True)
class Environment:
    coordinator: str | None
    token: bytes | None
    bind: str | None
    log_path: str | None
    timeout_s: float
    peer_timeout_s: float
    restart_count: int
    master_addr: str | None
    master_port: int | None
    world_size: int | None
    local_world_size: int | None
    # GLOO_SOCKET_IFNAME: the interfaces the job's gloo traffic goes through, so the other
    # nodes reach this one there; used where this node's own name maps to loopback.
    socket_interfaces: tuple[str, ...] = ()
    #: LOCAL_RANK (None outside torchrun).
    local_rank: int | None = None

    @property
    def spans_nodes(self) -> bool:
        return (self.world_size is not None and self.local_world_size is not None
                and self.world_size > self.local_world_size)


def read_token(path: str) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped); ConfigError if unusable."""
    try:
        with open(path, "rb") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"Cannot read token file {path!r}: {exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"Token in {path!r} is {len(token)} bytes; use at least 16 random bytes "
                          "(e.g. `openssl rand -hex 32 > token`)")
    return token


def _number(name: str, default: float, cast=float):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ConfigError(f"Invalid {name}={raw!r}: expected a number") from None
    if value < 0:
        raise ConfigError(f"Invalid {name}={raw!r}: expected a number >= 0")
    return value


def read_environment() -> Environment:
    token = os.environ.get("SHARDBALANCE_TOKEN") or None
    token_file = os.environ.get("SHARDBALANCE_TOKEN_FILE")
    port = _number("MASTER_PORT", None, int)
    return Environment(
        coordinator=os.environ.get("SHARDBALANCE_COORDINATOR") or None,
        token=token.encode() if token else (read_token(token_file) if token_file else None),
        bind=os.environ.get("SHARDBALANCE_BIND") or None,
        log_path=os.environ.get("SHARDBALANCE_LOG") or None,
        timeout_s=_number("SHARDBALANCE_TIMEOUT", 30.0),
        peer_timeout_s=_number("SHARDBALANCE_PEER_TIMEOUT", 1800.0),
        restart_count=_number("TORCHELASTIC_RESTART_COUNT", 0, int),
        master_addr=os.environ.get("MASTER_ADDR") or None,
        master_port=port,
        world_size=_number("WORLD_SIZE", None, int),
        local_world_size=_number("LOCAL_WORLD_SIZE", None, int),
        socket_interfaces=tuple(name.strip() for name in
                                os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")
                                if name.strip()),
        local_rank=_number("LOCAL_RANK", None, int),
    )
