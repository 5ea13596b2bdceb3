"""The wire format between ranks and the coordinator. Nothing else builds or parses frames.

A message is two ZeroMQ frames: a UTF-8 JSON object and its HMAC-SHA256 (hex) (an empty frame
when unsigned). Every JSON object carries the protocol version ``v``, a ``type`` and a request
``id`` that the reply echoes. Requests are validated field by field here, before any of them can
touch coordinator state.

Trust (DESIGN §10; README "Threat model"). The *token* of a standalone coordinator only
authorises creating runs; each run is bound at creation to a random *run key* that only its job
holds. The envelope of a request that names a ``run`` carries:
    nonce   the sending process's random sender id (32 hex digits: 16 of its creation time in
            ms, 16 random), new for every client object, so two sender threads or an elastic
            restart are different senders; ``id`` is that sender's sequence number
    key     the run key (hex); the transport is CURVE-encrypted whenever a token is configured
    grant   HMAC(token, "create" run key-digest): proves the token, needed to create the run
and is signed with the run key. Requests without a ``run`` (ping) are signed with the token.
Replies are signed with the key their request was verified with. An error reply may carry a
``code``: ``sender`` (this sender id is older than what the coordinator remembers: start a new
one with a creation time after ``horizon``).

Requests (rank -> coordinator):
    plan   {run, generation, rank, world_size, epoch, window, global_batch_size, policy,
            min_sizes, max_sizes, quantum, initial_weights, options,
            records (optional): [[rank, epoch, step, batch_size, busy_s], ...]: every rank's
            new measurements, gathered by the leader's background planner (counted before the
            plan is decided, exactly as the same records in a stats message would be)}
            record_columns (optional): the same as columns, {rank: [...], epoch: [...],
            step: [...], batch_size: [...], busy_s: [...]} (equal lengths; counted after
            ``records``; both together at most MAX_RECORDS_PER_PLAN)}
    stats  {run, generation, rank, world_size, records: [[epoch, step, batch_size, busy_s], ...],
            member (optional): "host/local_rank/device", what the rank runs on}
    records {run, generation, rank, world_size, records (optional), record_columns (optional):
            as in a plan request: the leader's measurements beyond what one plan request
            carries, sent before it (the run must exist); answered with ``ack``}
    pull   {run, generation, rank, world_size, client, epoch, op, want, done: [[start, stop], ...],
            held: [start, ...], ranges: [[start, stop], ...], num_samples, chunk_size,
            min_chunk_size, lease_s, max_leases}            (pull mode, see _leases.py)
    status {run (optional): only this run}                 (read-only, see StatusReply)
    ping   {}
Replies (coordinator -> rank):
    plan   {plan: Plan.to_dict(), stats: PlanStats.to_dict() (optional: what the coordinator
            measured when it decided this plan, the same for every rank that asks)}
    ack    {accepted: n}                                    (stats, records)
    chunk  {kind, lease: [start, stop] | null, complete, stale: [start, ...], remaining,
            completed: [[start, stop], ...] (op "status"), restored (op "restore")}
    status {runs: [...], pull_runs: [...], truncated}      (see StatusReply)
    pong   {}
    error  {error: "what was wrong"}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math

import numpy as np
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import AuthenticationError, ProtocolError

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "MAX_WORLD_SIZE", "MAX_RECORDS_PER_MESSAGE",
    "encode", "encode_fields", "encode_reply", "decode", "parse_request", "RunConfig",
    "PlanRequest", "StatsReport", "RecordsReport", "RECORD_COLUMNS", "MAX_RECORDS_PER_PLAN",
    "Ping", "PlanStats", "MAX_STATS_RANKS",
    "PullRequest", "PULL_OPS", "MAX_PULL_RANGES", "Sender", "open_envelope", "verify",
    "StatusRequest", "MAX_STATUS_RANKS", "parse_status_reply",
    "key_digest", "grant", "new_nonce", "nonce_time", "curve_server_keys", "curve_server",
    "curve_client", "uses_curve",
]

PROTOCOL_VERSION = 1
#: Larger messages are refused by the socket itself (ZMQ_MAXMSGSIZE).
MAX_MESSAGE_BYTES = 1 << 20
MAX_WORLD_SIZE = 65536
MAX_RECORDS_PER_MESSAGE = 4096
#: Records one plan request may carry (every rank's, about 40 bytes each in JSON).
MAX_RECORDS_PER_PLAN = 16384
MAX_BATCH_SIZE = 1 << 31
#: Longest believable busy time of one step; anything longer is a broken clock.
MAX_BUSY_SECONDS = 86400.0
_MAX_COUNTER = 1 << 53
#: Pull mode: what one request may complete, renew or restore.
MAX_PULL_RANGES = 16384
MAX_LEASE_SECONDS = 86400.0
MAX_LEASES_PER_CHUNK = 16
PULL_OPS = ("lease", "status", "restore")
_CLIENT_ID = re.compile(r"^[0-9a-f]{8,64}$")
#: Per-rank figures ride on a plan reply up to this world size (about 300 KB of JSON there);
#: beyond it only the run-wide ones do, so a reply stays well under MAX_MESSAGE_BYTES.
MAX_STATS_RANKS = 16384
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
#: A rank's ``host/local_rank/device``: printable ASCII.
_MEMBER = re.compile(r"^[ -~]{1,128}$")
#: Per-rank rows in one status reply (at most ~250 bytes of JSON each); runs beyond it are summarized.
MAX_STATUS_RANKS = 2048
_POLICY = re.compile(r"^[a-z_]{1,32}$")


def configure_socket(sock):
    """Both ends' socket options: drop unsent messages on close, refuse oversized ones."""
    import zmq

    sock.setsockopt(zmq.LINGER, 0)
    # The frame envelope (routing id, signature) on top of the JSON body.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    return sock


_NONCE = re.compile(r"^[0-9a-f]{32}$")
_HEX_KEY = re.compile(r"^[0-9a-f]{32,512}$")
#: The label the CURVE server key pair is derived from the token under (HMAC-SHA256).
_CURVE_LABEL = b"shardbalance curve server key v1"


def uses_curve(endpoint: str, token: bytes | None) -> bool:
    """Whether a connection to or from ``endpoint`` is CURVE-encrypted: whenever a token is
    configured, on every transport but inproc (which carries no ZeroMQ security)."""
    return bool(token) and not endpoint.startswith("inproc://")


def curve_server_keys(token: bytes) -> tuple[bytes, bytes]:
    """The coordinator's CURVE ``(public, secret)`` key pair (Z85), derived from the token, so
    every token holder knows the server's public key without further configuration."""
    import zmq
    from zmq.utils import z85

    raw = hmac.new(token, _CURVE_LABEL, hashlib.sha256).digest()
    secret = z85.encode(raw)
    return zmq.curve_public(secret), secret


def curve_server(sock, token: bytes) -> None:
    """Make ``sock`` (the coordinator's ROUTER) a CURVE server under the token's key pair."""
    import zmq

    public, secret = curve_server_keys(token)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)


def curve_client(sock, token: bytes) -> None:
    """Make ``sock`` a CURVE client of the token's coordinator (a fresh client key pair: the
    client is authenticated per message, by its run key or the token, not by its CURVE key)."""
    import zmq

    public, secret = zmq.curve_keypair()
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve_server_keys(token)[0])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def key_digest(key: bytes) -> str:
    """What the journal keeps of a run key: enough to recognise it, not to use it."""
    return hashlib.sha256(b"shardbalance run key\0" + key).hexdigest()


def grant(token: bytes, run: str, key: bytes) -> str:
    """Proof that the creator of ``run`` (bound to ``key``) holds the coordinator's token."""
    return hmac.new(token, f"create\0{run}\0{key_digest(key)}".encode(),
                    hashlib.sha256).hexdigest()


def new_nonce(after_ms: int = 0) -> str:
    """A new sender id: its creation time (ms, at least ``after_ms`` + 1) and 64 random bits."""
    created = max(int(time.time() * 1000), after_ms + 1)
    return f"{created:016x}{os.urandom(8).hex()}"


def nonce_time(nonce: str) -> int:
    """The creation time (ms) of sender id ``nonce``."""
    return int(nonce[:16], 16)


class Sender:
    """One sending process's (or thread's) credentials and sender id; builds request frames.

    ``token`` authorises creating runs (and signs requests without a run); ``run_key`` signs
    every request of a run (default: the token, for a caller that has only one secret).
    """

    def __init__(self, token: bytes | None = None, run_key: bytes | None = None) -> None:
        self.token = token or None
        self.run_key = run_key or self.token
        self.nonce = new_nonce()
        self._grants: dict[str, str] = {}

    def roll(self, after_ms: int) -> None:
        """Become a new sender created after ``after_ms`` (the coordinator forgot older ones)."""
        self.nonce = new_nonce(after_ms)

    def key_for(self, message: dict[str, Any]) -> bytes | None:
        # A status request (read-only, every run or one) is the token's, with or without
        # a run named; every other request naming a run is the run key's.
        return self.run_key if "run" in message and message.get("type") != "status" \
            else self.token

    def encode(self, message: dict[str, Any]) -> list[bytes]:
        """Frames of ``message`` (which has its ``id``) with this sender's envelope."""
        envelope: dict[str, Any] = {"nonce": self.nonce}
        run = message.get("run")
        if run is not None and self.run_key and message.get("type") != "status":
            envelope["key"] = self.run_key.hex()
            if self.token:
                if run not in self._grants:
                    self._grants[run] = grant(self.token, str(run), self.run_key)
                envelope["grant"] = self._grants[run]
        return encode({**message, **envelope}, self.key_for(message))

    def decode(self, frames: list[bytes], message: dict[str, Any]) -> dict[str, Any]:
        """A reply to ``message``: signed with the key the request was signed with, or (an
        error about that key) with the token (unsigned in unsigned mode)."""
        try:
            return decode(frames, self.key_for(message))
        except AuthenticationError:
            if self.key_for(message) == self.token:
                raise
            return decode(frames, self.token)


def _mac(secret: bytes | None, body: bytes) -> bytes:
    if not secret:
        return b""
    return hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


def encode(message: dict[str, Any], secret: bytes | None) -> list[bytes]:
    """Frames for ``message`` (the version is added), signed with ``secret``."""
    body = json.dumps({"v": PROTOCOL_VERSION, **message}, separators=(",", ":"),
                      allow_nan=False).encode()
    return [body, _mac(secret, body)]


def encode_fields(fields: dict[str, Any]) -> str:
    """A reply's fields (all but ``v``, ``type`` and ``id``) as JSON text, for
    :func:`encode_reply`: a reply that many ranks get (a plan) is encoded once."""
    return json.dumps(fields, separators=(",", ":"), allow_nan=False)


def encode_reply(kind: str, msg_id: int, fields_json: str, secret: bytes | None) -> list[bytes]:
    """Frames of a ``kind`` reply to request ``msg_id`` whose other fields are
    ``fields_json`` (from :func:`encode_fields`): the same message :func:`encode` makes."""
    head = json.dumps({"v": PROTOCOL_VERSION, "type": kind, "id": msg_id},
                      separators=(",", ":"))
    body = (head[:-1] + ("," + fields_json[1:] if fields_json != "{}" else "}")).encode()
    return [body, _mac(secret, body)]


def verify(body: bytes, mac: bytes, secret: bytes | None) -> bool:
    """Whether ``mac`` is ``body``'s signature under ``secret`` (empty when unsigned)."""
    return hmac.compare_digest(_mac(secret, body), bytes(mac))


def decode(frames: list[bytes], secret: bytes | None) -> dict[str, Any]:
    """Check the signature and the envelope of a message; return its JSON object."""
    msg, body, mac = open_envelope(frames)
    if not verify(body, mac, secret):
        raise AuthenticationError("bad or missing signature: the sender does not hold this "
                                  "run's secret (check SHARDBALANCE_TOKEN / --token-file)")
    return msg


def open_envelope(frames: list[bytes]) -> tuple[dict[str, Any], bytes, bytes]:
    """``(message, body, signature)`` with the envelope checked but the signature NOT yet
    verified: the coordinator picks the key by the message's run, then calls :func:`verify`."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (body, signature), got {len(frames)}")
    body, mac = frames
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"message is not valid JSON: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a JSON object, got {type(msg).__name__}")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {msg.get('v')!r}, this side speaks "
                            f"{PROTOCOL_VERSION}; upgrade shardbalance on both sides")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("message has no string 'type'")
    if not _is_int(msg.get("id"), 0, _MAX_COUNTER):
        raise ProtocolError(f"message id must be an integer in [0, 2^53], got {msg.get('id')!r}")
    for name, pattern in (("nonce", _NONCE), ("key", _HEX_KEY), ("grant", _HEX_KEY)):
        value = msg.get(name)
        if value is not None and not (isinstance(value, str) and pattern.match(value)):
            raise ProtocolError(f"envelope field {name!r} must match {pattern.pattern}, "
                                f"got {value!r:.80}")
    return msg, bytes(body), bytes(mac)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _is_int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _int(msg: dict, key: str, lo: int, hi: int) -> int:
    value = msg.get(key)
    if not _is_int(value, lo, hi):
        raise ProtocolError(f"field {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str(msg: dict, key: str, pattern: re.Pattern) -> str:
    value = msg.get(key)
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(f"field {key!r} must match {pattern.pattern}, got {value!r}")
    return value


def _int_list(msg: dict, key: str, length: int, lo: int, hi: int) -> tuple[int, ...]:
    value = msg.get(key)
    if not isinstance(value, list) or len(value) != length or not _ints_within(value, lo, hi):
        raise ProtocolError(f"field {key!r} must be a list of {length} integers in [{lo}, {hi}]")
    return tuple(value)


def _ints_within(values: list, lo: int, hi: int) -> bool:
    """Whether every element is an integer (not a bool) in [lo, hi].

    Per-rank lists are long (one element per rank) and arrive once per rank and window, so the
    common case is checked in C: when every element's type is exactly ``int`` (all json.loads
    makes), ``min`` and ``max`` settle the range. Anything else (bools, int subclasses, other
    types) gets the element-by-element check.
    """
    if set(map(type, values)) <= {int}:
        return not values or (lo <= min(values) and max(values) <= hi)
    return all(_is_int(v, lo, hi) for v in values)


def _number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _numbers_or_nulls_within(values: list, lo: float, hi: float) -> bool:
    """Whether every element is null or a finite number (no bool) in [lo, hi]; fast path as in
    :func:`_positive_numbers` (a NaN or inf makes the sum non-finite)."""
    types = set(map(type, values))
    if types <= {int, float, type(None)}:
        present = [v for v in values if v is not None] if type(None) in types else values
        try:
            if not present or (lo <= min(present) and max(present) <= hi
                               and math.isfinite(sum(present))):
                return True
        except OverflowError:
            pass
    return all(v is None or (_number(v) and lo <= v <= hi) for v in values)


def _positive_numbers(values: list) -> bool:
    """Whether every element is a finite number > 0 (and no bool), as :func:`_number` says.

    Fast path as in :func:`_ints_within`: when every element is exactly an int or a float, the
    values are all positive and finite exactly when the smallest is > 0 and their sum is finite
    (an inf or NaN makes the sum inf or NaN; an int too large for a float raises OverflowError).
    Whatever the fast path does not accept gets the element-by-element check.
    """
    if set(map(type, values)) <= {int, float}:
        try:
            if not values or (min(values) > 0 and math.isfinite(sum(values))):
                return True
        except OverflowError:
            pass
    return all(_number(v) and v > 0 for v in values)


@dataclass(frozen=True)
class Ping:
    id: int


@dataclass(frozen=True)
class RunConfig:
    """What every rank of one (run, generation) must agree on; fixed when the run starts."""

    world_size: int
    global_batch_size: int
    policy: str
    min_sizes: tuple[int, ...]
    max_sizes: tuple[int, ...]
    quantum: int
    initial_weights: tuple[float, ...] | None
    #: Sorted ``(name, value)`` pairs.
    options: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "global_batch_size": self.global_batch_size,
                "policy": self.policy, "min_sizes": list(self.min_sizes),
                "max_sizes": list(self.max_sizes), "quantum": self.quantum,
                "initial_weights": (None if self.initial_weights is None
                                    else list(self.initial_weights)),
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Rebuild from :meth:`to_dict` (the coordinator's journal)."""
        weights = data["initial_weights"]
        return cls(int(data["world_size"]), int(data["global_batch_size"]), str(data["policy"]),
                   tuple(int(b) for b in data["min_sizes"]),
                   tuple(int(b) for b in data["max_sizes"]), int(data["quantum"]),
                   None if weights is None else tuple(float(w) for w in weights),
                   tuple(sorted((str(k), float(v)) for k, v in data["options"].items())))


@dataclass(frozen=True)
class PlanStats:
    """What the coordinator measured when it decided a plan, sent with it to every rank.

    Fixed at the decision, so every rank that asks for the plan gets the same figures.
    """

    #: Each rank's median busy ms per step over its newest measurements (None: not heard yet).
    busy_ms: tuple[float | None, ...] | None
    #: The batch size of each rank's newest measured step (what ``busy_ms`` was measured at).
    busy_batch_sizes: tuple[int | None, ...] | None
    #: Slowest busy time over the mean (1.0: balanced); None until every rank was heard.
    imbalance: float | None
    #: The fitted model's step time for the equal split (None without a model).
    equal_step_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"busy_ms": None if self.busy_ms is None else list(self.busy_ms),
                "busy_batch_sizes": (None if self.busy_batch_sizes is None
                                     else list(self.busy_batch_sizes)),
                "imbalance": self.imbalance, "equal_step_ms": self.equal_step_ms}

    @classmethod
    def from_dict(cls, data: Any, world_size: int) -> "PlanStats":
        """Validate a reply's (or the journal's) ``stats`` for a run of ``world_size`` ranks."""
        if not isinstance(data, dict):
            raise ProtocolError(f"plan stats must be an object, got {type(data).__name__}")
        busy, sizes = data.get("busy_ms"), data.get("busy_batch_sizes")
        if busy is not None and not (
                isinstance(busy, list) and len(busy) == world_size <= MAX_STATS_RANKS
                and _numbers_or_nulls_within(busy, 0, MAX_BUSY_SECONDS * 1e3)):
            raise ProtocolError(f"plan stats 'busy_ms' must be null or {world_size} numbers "
                                f"in [0, {MAX_BUSY_SECONDS * 1e3:g}] or nulls")
        if sizes is not None and not (
                isinstance(sizes, list) and len(sizes) == world_size <= MAX_STATS_RANKS
                and all(b is None or _is_int(b, 1, MAX_BATCH_SIZE) for b in sizes)):
            raise ProtocolError(f"plan stats 'busy_batch_sizes' must be null or {world_size} "
                                f"integers in [1, {MAX_BATCH_SIZE}] or nulls")
        scalars = []
        for key in ("imbalance", "equal_step_ms"):
            value = data.get(key)
            if value is not None and not (_number(value) and 0 <= value <= MAX_BUSY_SECONDS * 1e3):
                raise ProtocolError(f"plan stats {key!r} must be null or a number in "
                                    f"[0, {MAX_BUSY_SECONDS * 1e3:g}], got {value!r}")
            scalars.append(None if value is None else float(value))
        return cls(None if busy is None else tuple(None if b is None else float(b) for b in busy),
                   None if sizes is None else tuple(sizes), *scalars)


@dataclass(frozen=True)
class PlanRequest:
    id: int
    run: str
    generation: int
    rank: int
    epoch: int
    window: int
    config: RunConfig
    #: ``(rank, epoch, step, batch_size, busy_seconds)``: measurements the request carries.
    records: tuple[tuple[int, int, int, int, float], ...] = ()
    #: More of them as columns (``record_columns``): RECORD_COLUMNS name -> numpy array.
    record_columns: dict | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RecordsReport:
    """The leader's measurements beyond what one plan request carries (``records``)."""

    id: int
    run: str
    generation: int
    rank: int
    world_size: int
    records: tuple[tuple[int, int, int, int, float], ...] = ()
    record_columns: dict | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StatsReport:
    id: int
    run: str
    generation: int
    rank: int
    world_size: int
    #: (epoch, step, batch_size, busy_seconds) per trained step.
    records: tuple[tuple[int, int, int, float], ...]
    #: What the rank runs on (``host/local_rank/device``), if it said.
    member: str | None = None


@dataclass(frozen=True)
class StatusRequest:
    """A read-only look at what the coordinator serves (``shardbalance status``)."""

    id: int
    #: Only this run (None: every run).
    run: str | None = None


@dataclass(frozen=True)
class PullRequest:
    """One pull-mode exchange: complete ``done``, renew ``held``, and (``want``) lease a chunk.

    ``op`` ``status`` also returns the epoch's completed ranges; ``restore`` marks ``ranges``
    completed in an epoch nothing was handed out of yet (a restored ``state_dict``).
    """

    id: int
    run: str
    generation: int
    rank: int
    client: str
    epoch: int
    op: str
    want: bool
    done: tuple[tuple[int, int], ...]
    held: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    #: A ``_leases.PullConfig`` as a dict (kept plain: this module imports nothing else).
    config: tuple[tuple[str, Any], ...]


def _ranges(msg: dict, key: str, num_samples: int) -> tuple[tuple[int, int], ...]:
    value = msg.get(key, [])
    if not isinstance(value, list) or len(value) > MAX_PULL_RANGES or not all(
            isinstance(r, list) and len(r) == 2 and _is_int(r[0], 0, num_samples - 1)
            and _is_int(r[1], r[0] + 1, num_samples) for r in value):
        raise ProtocolError(f"field {key!r} must be a list of at most {MAX_PULL_RANGES} "
                            f"[start, stop] pairs with 0 <= start < stop <= {num_samples}")
    return tuple((a, b) for a, b in value)


def _parse_pull(msg: dict) -> PullRequest:
    run, generation, rank, world = _common(msg)
    num_samples = _int(msg, "num_samples", 1, _MAX_COUNTER)
    chunk = _int(msg, "chunk_size", 1, MAX_BATCH_SIZE)
    min_chunk = _int(msg, "min_chunk_size", 1, chunk)
    lease_s = msg.get("lease_s")
    if not _number(lease_s) or not 0 < lease_s <= MAX_LEASE_SECONDS:
        raise ProtocolError(f"field 'lease_s' must be a number in (0, {MAX_LEASE_SECONDS:g}], "
                            f"got {lease_s!r}")
    max_leases = _int(msg, "max_leases", 1, MAX_LEASES_PER_CHUNK)
    op = msg.get("op")
    if op not in PULL_OPS:
        raise ProtocolError(f"field 'op' must be one of {PULL_OPS}, got {op!r}")
    want = msg.get("want", False)
    if not isinstance(want, bool):
        raise ProtocolError(f"field 'want' must be true or false, got {want!r}")
    held = msg.get("held", [])
    if not isinstance(held, list) or len(held) > MAX_PULL_RANGES or \
            not _ints_within(held, 0, num_samples - 1):
        raise ProtocolError(f"field 'held' must be a list of at most {MAX_PULL_RANGES} "
                            f"positions in [0, {num_samples - 1}]")
    config = {"world_size": world, "num_samples": num_samples, "chunk_size": chunk,
              "min_chunk_size": min_chunk, "lease_s": float(lease_s), "max_leases": max_leases}
    return PullRequest(
        id=msg["id"], run=run, generation=generation, rank=rank,
        client=_str(msg, "client", _CLIENT_ID), epoch=_int(msg, "epoch", 0, _MAX_COUNTER),
        op=op, want=want, done=_ranges(msg, "done", num_samples), held=tuple(held),
        ranges=_ranges(msg, "ranges", num_samples), config=tuple(config.items()))


def _record(rec) -> tuple[int, int, int, float]:
    if not (isinstance(rec, list) and len(rec) == 4
            and _is_int(rec[0], 0, _MAX_COUNTER) and _is_int(rec[1], 0, _MAX_COUNTER)
            and _is_int(rec[2], 1, MAX_BATCH_SIZE)
            and _number(rec[3]) and 0 < rec[3] <= MAX_BUSY_SECONDS):
        raise ProtocolError(f"bad stats record {rec!r}: expected [epoch, step, "
                            f"batch_size >= 1, 0 < busy_s <= {MAX_BUSY_SECONDS:g}]")
    return (rec[0], rec[1], rec[2], float(rec[3]))


def _ranked_records(msg: dict, world: int) -> tuple[tuple[int, int, int, int, float], ...]:
    """A plan request's optional ``records``: ``[rank, epoch, step, batch_size, busy_s]``."""
    records = msg.get("records")
    if records is None:
        return ()
    if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_PLAN:
        raise ProtocolError(f"field 'records' must be a list of at most "
                            f"{MAX_RECORDS_PER_PLAN} records")
    clean = []
    for rec in records:
        if not (isinstance(rec, list) and len(rec) == 5 and _is_int(rec[0], 0, world - 1)):
            raise ProtocolError(f"bad plan record {rec!r}: expected [rank < {world}, epoch, "
                                "step, batch_size, busy_s]")
        clean.append((rec[0], *_record(rec[1:])))
    return tuple(clean)


#: ``record_columns``' names, in the order of a ``records`` row.
RECORD_COLUMNS = ("rank", "epoch", "step", "batch_size", "busy_s")


def _int_column(name: str, values: list, lo: int, hi: int) -> np.ndarray:
    if set(map(type, values)) <= {int}:
        try:
            column = np.array(values, dtype=np.int64)
        except OverflowError:
            column = None
        if column is not None:
            bad = np.flatnonzero((column < lo) | (column > hi))
            if not len(bad):
                return column
            at = int(bad[0])
            raise ProtocolError(f"bad record_columns[{name!r}][{at}] = {values[at]!r}: expected "
                                f"an integer in [{lo}, {hi}]")
    at, value = next((i, v) for i, v in enumerate(values) if not _is_int(v, lo, hi))
    raise ProtocolError(f"bad record_columns[{name!r}][{at}] = {value!r}: expected an integer "
                        f"in [{lo}, {hi}]")


def _record_columns(msg: dict, world: int, room: int) -> dict | None:
    """A request's optional ``record_columns`` (at most ``room`` records), as numpy arrays,
    checked as rows are (each bad value named)."""
    columns = msg.get("record_columns")
    if columns is None:
        return None
    if not isinstance(columns, dict) or set(columns) != set(RECORD_COLUMNS) or not all(
            isinstance(v, list) for v in columns.values()):
        raise ProtocolError(f"field 'record_columns' must be an object of the lists "
                            f"{', '.join(RECORD_COLUMNS)}")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ProtocolError(f"field 'record_columns' must have lists of one length, got "
                            f"{ {k: len(v) for k, v in columns.items()} }")
    n = lengths.pop()
    if n > room:
        raise ProtocolError(f"field 'record_columns' holds {n} records; at most {room} fit "
                            f"(MAX_RECORDS_PER_PLAN = {MAX_RECORDS_PER_PLAN} with 'records')")
    out = {"rank": _int_column("rank", columns["rank"], 0, world - 1),
           "epoch": _int_column("epoch", columns["epoch"], 0, _MAX_COUNTER),
           "step": _int_column("step", columns["step"], 0, _MAX_COUNTER),
           "batch_size": _int_column("batch_size", columns["batch_size"], 1, MAX_BATCH_SIZE)}
    busy = columns["busy_s"]
    column = None
    if set(map(type, busy)) <= {int, float}:
        try:
            column = np.array(busy, dtype=np.float64)
        except OverflowError:  # an integer too large for a float
            pass
    if column is not None:
        good = (column > 0) & (column <= MAX_BUSY_SECONDS)  # False for NaN
        if good.all():
            out["busy_s"] = column
            return out
        at = int(np.flatnonzero(~good)[0])
    else:
        at = next(i for i, v in enumerate(busy)
                  if not (_number(v) and 0 < v <= MAX_BUSY_SECONDS))
    raise ProtocolError(f"bad record_columns['busy_s'][{at}] = {busy[at]!r}: expected a number "
                        f"with 0 < busy_s <= {MAX_BUSY_SECONDS:g}")


def _measurements(msg: dict, world: int) -> tuple[tuple, dict | None]:
    """A request's ``records`` and ``record_columns``."""
    rows = _ranked_records(msg, world)
    return rows, _record_columns(msg, world, MAX_RECORDS_PER_PLAN - len(rows))


def _common(msg: dict) -> tuple[str, int, int, int]:
    world = _int(msg, "world_size", 1, MAX_WORLD_SIZE)
    return (_str(msg, "run", _RUN_ID), _int(msg, "generation", 0, 1 << 31),
            _int(msg, "rank", 0, world - 1), world)


def parse_request(msg: dict[str, Any]) -> Ping | PlanRequest | StatsReport | PullRequest:
    """Validate a decoded request; ProtocolError says which field is wrong."""
    kind = msg["type"]
    if kind == "ping":
        return Ping(msg["id"])
    if kind == "plan":
        run, generation, rank, world = _common(msg)
        batch = _int(msg, "global_batch_size", 1, MAX_BATCH_SIZE)
        weights = msg.get("initial_weights")
        if weights is not None:
            if not isinstance(weights, list) or len(weights) != world or \
                    not _positive_numbers(weights):
                raise ProtocolError(f"field 'initial_weights' must be null or {world} finite "
                                    "numbers > 0")
            weights = tuple(map(float, weights))
        options = msg.get("options", {})
        if not isinstance(options, dict) or len(options) > 16 or \
                not all(isinstance(k, str) and len(k) <= 64 and _number(v) and v >= 0
                        for k, v in options.items()):
            raise ProtocolError("field 'options' must be an object of at most 16 "
                                "name: non-negative number pairs")
        config = RunConfig(
            world_size=world, global_batch_size=batch, policy=_str(msg, "policy", _POLICY),
            min_sizes=_int_list(msg, "min_sizes", world, 1, batch),
            max_sizes=_int_list(msg, "max_sizes", world, 1, batch),
            quantum=_int(msg, "quantum", 1, batch), initial_weights=weights,
            options=tuple(sorted((k, float(v)) for k, v in options.items())))
        rows, columns = _measurements(msg, world)
        return PlanRequest(
            id=msg["id"], run=run, generation=generation, rank=rank,
            epoch=_int(msg, "epoch", 0, _MAX_COUNTER), window=_int(msg, "window", 0, _MAX_COUNTER),
            config=config, records=rows, record_columns=columns)
    if kind == "stats":
        run, generation, rank, world = _common(msg)
        records = msg.get("records")
        if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_MESSAGE:
            raise ProtocolError(f"field 'records' must be a list of at most "
                                f"{MAX_RECORDS_PER_MESSAGE} records")
        clean = [_record(rec) for rec in records]
        member = msg.get("member")
        if member is not None:
            member = _str(msg, "member", _MEMBER)
        return StatsReport(msg["id"], run, generation, rank, world, tuple(clean), member)
    if kind == "records":
        run, generation, rank, world = _common(msg)
        rows, columns = _measurements(msg, world)
        return RecordsReport(msg["id"], run, generation, rank, world, rows, columns)
    if kind == "status":
        return StatusRequest(msg["id"], None if msg.get("run") is None
                             else _str(msg, "run", _RUN_ID))
    if kind == "pull":
        return _parse_pull(msg)
    raise ProtocolError(f"unknown message type {kind!r}; expected plan, stats, records, pull, "
                        "status or ping")


def _optional_number(row: dict, key: str) -> None:
    value = row.get(key)
    if value is not None and not (_number(value) and value >= 0):
        raise ProtocolError(f"status field {key!r} must be null or a number >= 0, got {value!r}")


def parse_status_reply(reply: dict[str, Any]) -> dict[str, Any]:
    """Check a ``status`` reply's shape (what a status table prints); return it.

    ``runs``: one object per plan run, ``{run, generation, world_size, global_batch_size,
    policy, idle_s, plan: {epoch, window, batch_sizes, predicted_step_ms} | null, ranks:
    [{rank, member, batch_size, busy_ms, samples_per_s, idle_s}, ...] | null}`` (``ranks`` and
    the plan's ``batch_sizes`` are null where the reply would exceed MAX_STATUS_RANKS per-rank
    rows); ``pull_runs``: ``{run,
    generation, world_size, num_samples, completed_epochs, idle_s}``; ``truncated``: whether
    per-rank rows were left out.
    """
    runs, pulls = reply.get("runs"), reply.get("pull_runs")
    if not isinstance(runs, list) or not isinstance(pulls, list):
        raise ProtocolError("status reply needs lists 'runs' and 'pull_runs'")
    for run in runs:
        if not isinstance(run, dict):
            raise ProtocolError(f"status run must be an object, got {run!r}")
        _str(run, "run", _RUN_ID)
        world = _int(run, "world_size", 1, MAX_WORLD_SIZE)
        _int(run, "generation", 0, 1 << 31)
        _int(run, "global_batch_size", 1, MAX_BATCH_SIZE)
        _str(run, "policy", _POLICY)
        _optional_number(run, "idle_s")
        plan = run.get("plan")
        if plan is not None:
            if not isinstance(plan, dict):
                raise ProtocolError(f"status plan must be an object, got {plan!r}")
            _int(plan, "epoch", 0, _MAX_COUNTER)
            _int(plan, "window", 0, _MAX_COUNTER)
            if plan.get("batch_sizes") is not None:
                _int_list(plan, "batch_sizes", world, 0, MAX_BATCH_SIZE)
            _optional_number(plan, "predicted_step_ms")
        ranks = run.get("ranks")
        if ranks is None:
            continue
        if not isinstance(ranks, list) or len(ranks) != world:
            raise ProtocolError(f"status 'ranks' of run {run['run']} must be null or "
                                f"{world} rows")
        for row in ranks:
            if not isinstance(row, dict):
                raise ProtocolError(f"status rank row must be an object, got {row!r}")
            _int(row, "rank", 0, world - 1)
            if row.get("member") is not None:
                _str(row, "member", _MEMBER)
            if row.get("batch_size") is not None:
                _int(row, "batch_size", 1, MAX_BATCH_SIZE)
            for key in ("busy_ms", "samples_per_s", "idle_s"):
                _optional_number(row, key)
    for pull in pulls:
        if not isinstance(pull, dict):
            raise ProtocolError(f"status pull run must be an object, got {pull!r}")
        _str(pull, "run", _RUN_ID)
        _int(pull, "world_size", 1, MAX_WORLD_SIZE)
        _int(pull, "num_samples", 1, _MAX_COUNTER)
        _optional_number(pull, "idle_s")
        done = pull.get("completed_epochs")
        if not isinstance(done, list) or not _ints_within(done, 0, _MAX_COUNTER):
            raise ProtocolError("status 'completed_epochs' must be a list of epochs")
    if not isinstance(reply.get("truncated"), bool):
        raise ProtocolError("status reply needs a boolean 'truncated'")
    return reply
