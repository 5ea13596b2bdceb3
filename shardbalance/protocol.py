"""The wire format between ranks and the coordinator. Nothing else builds or parses frames.

A message is two ZeroMQ frames: a UTF-8 JSON object and its HMAC-SHA256 (hex) under the run's
shared secret (an empty frame when no secret is configured). Every JSON object carries the
protocol version ``v``, a ``type`` and a request ``id`` that the reply echoes. Requests are
validated field by field here, before any of them can touch coordinator state.

Requests (rank -> coordinator):
    plan   {run, generation, rank, world_size, epoch, window, global_batch_size, policy,
            min_sizes, max_sizes, quantum, initial_weights, options,
            records (optional): [[rank, epoch, step, batch_size, busy_s], ...]: every rank's
            new measurements, gathered by the leader's background planner (counted before the
            plan is decided, exactly as the same records in a stats message would be)}
    stats  {run, generation, rank, world_size, records: [[epoch, step, batch_size, busy_s], ...]}
    pull   {run, generation, rank, world_size, client, epoch, op, want, done: [[start, stop], ...],
            held: [start, ...], ranges: [[start, stop], ...], num_samples, chunk_size,
            min_chunk_size, lease_s, max_leases}            (pull mode, see _leases.py)
    ping   {}
Replies (coordinator -> rank):
    plan   {plan: Plan.to_dict(), stats: PlanStats.to_dict() (optional: what the coordinator
            measured when it decided this plan, the same for every rank that asks)}
    ack    {accepted: n}
    chunk  {kind, lease: [start, stop] | null, complete, stale: [start, ...], remaining,
            completed: [[start, stop], ...] (op "status"), restored (op "restore")}
    pong   {}
    error  {error: "what was wrong"}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from ._exceptions import AuthenticationError, ProtocolError

__all__ = [
    "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "MAX_WORLD_SIZE", "MAX_RECORDS_PER_MESSAGE",
    "encode", "encode_fields", "encode_reply", "decode", "parse_request", "RunConfig",
    "PlanRequest", "StatsReport", "Ping", "PlanStats", "MAX_STATS_RANKS",
    "PullRequest", "PULL_OPS", "MAX_PULL_RANGES",
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
_POLICY = re.compile(r"^[a-z_]{1,32}$")


def configure_socket(sock):
    """Both ends' socket options: drop unsent messages on close, refuse oversized ones."""
    import zmq

    sock.setsockopt(zmq.LINGER, 0)
    # The frame envelope (routing id, signature) on top of the JSON body.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
    return sock


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


def decode(frames: list[bytes], secret: bytes | None) -> dict[str, Any]:
    """Check the signature and the envelope of a message; return its JSON object."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (body, signature), got {len(frames)}")
    body, mac = frames
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if not hmac.compare_digest(_mac(secret, body), bytes(mac)):
        raise AuthenticationError("bad or missing signature: the sender does not hold this "
                                  "run's secret (check SHARDBALANCE_TOKEN / --token-file)")
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
    return msg


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
                and all(b is None or (_number(b) and 0 <= b <= MAX_BUSY_SECONDS * 1e3)
                        for b in busy)):
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


@dataclass(frozen=True)
class StatsReport:
    id: int
    run: str
    generation: int
    rank: int
    world_size: int
    #: (epoch, step, batch_size, busy_seconds) per trained step.
    records: tuple[tuple[int, int, int, float], ...]


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
        return PlanRequest(
            id=msg["id"], run=run, generation=generation, rank=rank,
            epoch=_int(msg, "epoch", 0, _MAX_COUNTER), window=_int(msg, "window", 0, _MAX_COUNTER),
            config=config, records=_ranked_records(msg, world))
    if kind == "stats":
        run, generation, rank, world = _common(msg)
        records = msg.get("records")
        if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_MESSAGE:
            raise ProtocolError(f"field 'records' must be a list of at most "
                                f"{MAX_RECORDS_PER_MESSAGE} records")
        clean = []
        for rec in records:
            if not (isinstance(rec, list) and len(rec) == 4
                    and _is_int(rec[0], 0, _MAX_COUNTER) and _is_int(rec[1], 0, _MAX_COUNTER)
                    and _is_int(rec[2], 1, MAX_BATCH_SIZE)
                    and _number(rec[3]) and 0 < rec[3] <= MAX_BUSY_SECONDS):
                raise ProtocolError(f"bad stats record {rec!r}: expected [epoch, step, "
                                    f"batch_size >= 1, 0 < busy_s <= {MAX_BUSY_SECONDS:g}]")
            clean.append((rec[0], rec[1], rec[2], float(rec[3])))
        return StatsReport(msg["id"], run, generation, rank, world, tuple(clean))
    if kind == "pull":
        return _parse_pull(msg)
    raise ProtocolError(f"unknown message type {kind!r}; expected plan, stats, pull or ping")
