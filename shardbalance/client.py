"""The rank side of the wire: plan requests, the background stats sender, the embedded coordinator.

Requests follow zguide's Lazy Pirate pattern: a DEALER socket, a bounded wait for the reply
(matched by request id), and on timeout the socket is closed (linger 0), reopened and the
request resent, a bounded number of times. A client that gives up raises
:class:`CoordinatorUnavailable`; it never decides alone (the sampler falls back to the plan every
rank already agreed on).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import select
import socket
import subprocess
import sys
import threading
import time

import zmq

from . import protocol
from ._exceptions import CoordinatorError, CoordinatorUnavailable, ProtocolError
from .plan import Plan

__all__ = ["CoordinatorClient", "StatsSender", "EmbeddedCoordinator", "routable_address",
           "external_address", "running_interfaces"]

log = logging.getLogger("shardbalance")

#: Plans whose coordinator stats a client keeps (metrics() reads the one in force).
_REPORTED_KEPT = 8
#: Intervals a stats sender tries to name its rank's hardware (the coordinator unreachable).
_ANNOUNCE_TRIES = 10


class CoordinatorClient:
    """Request/reply with a coordinator, bounded in time. Not thread-safe: one per thread.

    Each client is one sender: it has its own random sender id, and its request ids are that
    sender's sequence numbers (a resend after a timeout is the same message, answered from the
    coordinator's cache).

    Args:
        address: the coordinator's endpoint, ``tcp://host:port``.
        secret: the coordinator's token (None: unsigned mode, loopback only); with a token the
            connection is CURVE-encrypted to the key pair derived from it.
        timeout_s: how long to wait for each reply.
        retries: how many times to send a request before giving up.
        run_key: the run's key, which signs every request naming a run (default: ``secret``).
    """

    def __init__(self, address: str, secret: bytes | None = None, timeout_s: float = 5.0,
                 retries: int = 3, *, run_key: bytes | None = None) -> None:
        self.address = address
        self.secret = secret
        self.timeout_s = timeout_s
        self.retries = max(1, retries)
        self.sender = protocol.Sender(secret, run_key)
        self.run_key = self.sender.run_key
        self._ids = itertools.count(1)
        #: What the coordinator measured with each plan it served, by plan digest (newest few).
        self.reported: collections.OrderedDict[str, protocol.PlanStats] = \
            collections.OrderedDict()
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None

    def _open(self) -> zmq.Socket:
        if self._socket is None:
            sock = protocol.configure_socket(self._context.socket(zmq.DEALER))
            try:
                if protocol.uses_curve(self.address, self.secret):
                    protocol.curve_client(sock, self.secret)
                if self.address.startswith("tcp://["):
                    sock.setsockopt(zmq.IPV6, 1)
                sock.connect(self.address)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise CoordinatorError(f"Invalid coordinator address {self.address!r}: {exc}") \
                    from exc
            self._socket = sock
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def request(self, message: dict) -> dict:
        """Send ``message`` and return the matching reply; CoordinatorError on an error reply."""
        try:
            return self._request(message)
        except _StaleSender as exc:
            # The coordinator forgot this sender (it restarted, or evicted it): a new one.
            self.sender.roll(exc.horizon)
            return self._request(message)

    def _request(self, message: dict) -> dict:
        msg_id = next(self._ids)
        frames = self.sender.encode({**message, "id": msg_id})
        for _ in range(self.retries):
            sock = self._open()
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                self._reset()
                continue
            deadline = time.monotonic() + self.timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                    break
                try:
                    reply = self.sender.decode(sock.recv_multipart(zmq.NOBLOCK), message)
                except zmq.Again:
                    continue
                except ProtocolError as exc:
                    log.warning("ignoring an invalid reply from %s: %s", self.address, exc)
                    continue
                if reply["id"] != msg_id:
                    continue  # a late reply to an earlier, abandoned attempt
                if reply["type"] == "error":
                    if reply.get("code") == "sender" and isinstance(reply.get("horizon"), int):
                        raise _StaleSender(reply["horizon"])
                    raise CoordinatorError(f"coordinator {self.address} refused "
                                           f"{message.get('type')}: {reply.get('error')}")
                return reply
            self._reset()
        raise CoordinatorUnavailable(
            f"no reply from the coordinator at {self.address} after {self.retries} tries of "
            f"{self.timeout_s:g} s; is it running and reachable from this host?")

    def ping(self) -> None:
        self.request({"type": "ping"})

    def plan(self, **fields) -> Plan:
        """Ask for the plan of ``(run, generation, epoch, window)``; see protocol.PlanRequest."""
        reply = self.request({"type": "plan", **fields})
        if reply.get("type") != "plan" or not isinstance(reply.get("plan"), dict):
            raise CoordinatorError(f"unexpected reply to a plan request: {reply!r}")
        plan = Plan.from_dict(reply["plan"])
        expected = (fields["run"], fields["generation"], fields["epoch"], fields["window"],
                    fields["world_size"], fields["global_batch_size"])
        got = (plan.run_id, plan.generation, plan.epoch, plan.window, plan.world_size,
               plan.global_batch_size)
        if got != expected:
            raise CoordinatorError(f"coordinator answered with plan {got}, asked for {expected}")
        if reply.get("stats") is not None:
            try:
                self.remember(plan.digest, protocol.PlanStats.from_dict(reply["stats"],
                                                                        plan.world_size))
            except ProtocolError as exc:
                # The figures only inform metrics(); the plan itself is still good.
                log.warning("ignoring the stats sent with plan %s: %s", plan.digest, exc)
        return plan

    def records(self, **fields) -> int:
        """Deliver ranked measurements apart from a plan request (see
        protocol.RecordsReport); how many the coordinator accepted."""
        reply = self.request({"type": "records", **fields})
        if reply.get("type") != "ack" or not isinstance(reply.get("accepted"), int):
            raise CoordinatorError(f"unexpected reply to a records message: {reply!r}")
        return reply["accepted"]

    def remember(self, digest: str, stats: protocol.PlanStats) -> None:
        """Keep ``stats`` as what the coordinator measured with plan ``digest`` (also for a
        plan this client did not ask for: the background planner's leader asks, and every
        rank files the figures it broadcasts)."""
        self.reported[digest] = stats
        self.reported.move_to_end(digest)
        while len(self.reported) > _REPORTED_KEPT:
            self.reported.popitem(last=False)

    def pull(self, **fields) -> dict:
        """One pull-mode exchange (see protocol.PullRequest); the ``chunk`` reply."""
        reply = self.request({"type": "pull", **fields})
        if reply.get("type") != "chunk" or not isinstance(reply.get("complete"), bool):
            raise CoordinatorError(f"unexpected reply to a pull request: {reply!r}")
        return reply

    def status(self, run: str | None = None) -> dict:
        """What the coordinator serves now (every run, or only ``run``): the ``status`` reply,
        checked by :func:`protocol.parse_status_reply`. Read-only."""
        reply = self.request({"type": "status", **({} if run is None else {"run": run})})
        if reply.get("type") != "status":
            raise CoordinatorError(f"unexpected reply to a status request: {reply!r}")
        try:
            return protocol.parse_status_reply(reply)
        except ProtocolError as exc:
            raise CoordinatorError(f"invalid status reply from {self.address}: {exc}") from exc

    def close(self) -> None:
        self._reset()
        self._context.term()


class _StaleSender(CoordinatorError):
    """The coordinator forgot this sender id (code ``sender``); a new one is needed."""

    def __init__(self, horizon: int) -> None:
        super().__init__(f"the coordinator refused this sender id as older than {horizon} ms "
                         "(it restarted or forgot it) twice in a row")
        self.horizon = horizon


class StatsSender:
    """Pushes busy-time records to the coordinator from a background thread.

    :meth:`push` only appends to a deque, so it is safe to call from the autograd thread. The
    thread sends batches every ``interval_s``; a batch the coordinator did not acknowledge is
    kept and resent (records are keyed by step, so resending is harmless), up to
    ``max_buffered`` records, beyond which the oldest are dropped and counted.
    """

    def __init__(self, address: str, secret: bytes | None, identity: dict, interval_s: float = 0.2,
                 timeout_s: float = 2.0, max_buffered: int = 65536, *,
                 run_key: bytes | None = None) -> None:
        self.identity = identity
        self.interval_s = interval_s
        self.max_buffered = max_buffered
        self.sent = 0
        self.dropped = 0
        self._queue: collections.deque = collections.deque()
        self._client_args = (address, secret, timeout_s, 1)
        self._run_key = run_key
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stop_deadline = math.inf
        self._idle = threading.Event()
        self._idle.set()
        self._warned = False
        self._announce = 0
        self._thread = threading.Thread(target=self._run, name="shardbalance-stats", daemon=True)
        self._thread.start()

    def announce(self) -> None:
        """Send this rank's identity (its ``member``: the hardware it runs on) once, records or
        not. With the background planner a rank's measurements travel with the leader's plan
        requests, not from here; the coordinator keeps a new round's history by member. Call it
        once the run exists (a plan was agreed), so the coordinator does not refuse it."""
        if "member" in self.identity:
            self._announce = _ANNOUNCE_TRIES
            self._wake.set()

    def push(self, record: tuple[int, int, int, float]) -> None:
        # Queued before idle is cleared: the sender can never mark idle with a record waiting.
        self._queue.append(record)
        self._idle.clear()

    def _run(self) -> None:
        client = CoordinatorClient(*self._client_args, run_key=self._run_key)
        pending: list = []
        try:
            while True:
                self._wake.wait(self.interval_s)
                self._wake.clear()
                while self._queue and len(pending) < protocol.MAX_RECORDS_PER_MESSAGE:
                    pending.append(self._queue.popleft())
                if self._announce and not pending and not self._stop.is_set():
                    self._announce -= 1
                    try:
                        client.request({"type": "stats", **self.identity, "records": []})
                        self._announce = 0
                    except CoordinatorError:
                        pass  # unreachable: the next interval tries again
                if pending:
                    try:
                        client.request({"type": "stats", **self.identity,
                                        "records": pending})
                        self.sent += len(pending)
                        pending = []
                        self._announce = 0
                        self._warned = False
                    except CoordinatorUnavailable as exc:
                        if not self._warned and not self._stop.is_set():
                            log.warning("shardbalance: stats not delivered, will retry: %s", exc)
                            self._warned = True
                        overflow = len(pending) + len(self._queue) - self.max_buffered
                        if overflow > 0:
                            del pending[:overflow]
                            self.dropped += overflow
                    except CoordinatorError as exc:
                        log.warning("shardbalance: coordinator refused %d stats records: %s",
                                    len(pending), exc)
                        self.dropped += len(pending)
                        pending = []
                if not pending and not self._queue:
                    self._idle.set()
                    if self._stop.is_set():
                        return
                elif self._stop.is_set() and self._stop_deadline < time.monotonic():
                    self.dropped += len(pending) + len(self._queue)
                    return
        finally:
            client.close()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every pushed record was acknowledged; False on timeout."""
        self._wake.set()
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop_deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s + 1.0)


def routable_address(peer_host: str | None, peer_port: int | None = None) -> str:
    """The local IP address this host uses to reach ``peer_host`` (loopback if none)."""
    if not peer_host:
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(peer_host, peer_port or 29500, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        return "127.0.0.1"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(sockaddr)  # UDP connect sends nothing; it only picks the route
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def _interface_ioctl(name: str, request: int) -> bytes | None:
    """``ioctl(request)`` on a ``struct ifreq`` for interface ``name`` (Linux); None on error."""
    import fcntl
    import struct

    if not name or len(name.encode()) > 15:  # IFNAMSIZ - 1: no interface has a longer name
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            return fcntl.ioctl(probe.fileno(), request, struct.pack("256s", name.encode()))
        except OSError:  # no such interface, or (SIOCGIFADDR) no IPv4 address on it
            return None


def _interface_address(name: str) -> str | None:
    """The IPv4 address of network interface ``name``, or None."""
    reply = _interface_ioctl(name, 0x8915)  # SIOCGIFADDR
    # struct ifreq: the name (16 bytes), then a sockaddr_in whose address is at offset 4.
    return socket.inet_ntoa(reply[20:24]) if reply else None


def running_interfaces() -> dict[str, str]:
    """Interface name -> IPv4 address, for every interface up, running and not loopback
    (Linux; elsewhere none)."""
    found: dict[str, str] = {}
    if not sys.platform.startswith("linux"):
        return found
    for _, name in socket.if_nameindex():
        reply = _interface_ioctl(name, 0x8913)  # SIOCGIFFLAGS
        flags = int.from_bytes(reply[16:18], sys.byteorder) if reply else 0
        # IFF_UP and IFF_RUNNING (a bridge without ports, like an idle docker0, is not
        # running), not IFF_LOOPBACK.
        if flags & 0x1 and flags & 0x40 and not flags & 0x8:
            address = _interface_address(name)
            if address is not None and not address.startswith("127."):
                found[name] = address
    return found


def external_address(interfaces: tuple[str, ...] = ()) -> str | None:
    """A non-loopback IPv4 address of this host that other hosts can reach, or None.

    For a host whose own name maps to loopback ("127.0.1.1 node0" in /etc/hosts, the Debian
    and Ubuntu default), where torchrun still works: the address of the first of
    ``interfaces`` (GLOO_SOCKET_IFNAME) that has one; else one of the host name's addresses
    that is not loopback; else the address of the only interface that is up and running
    (None when there are several: which one the other hosts reach is then unknown).
    """
    if not sys.platform.startswith("linux"):
        interfaces = ()
    for name in interfaces:
        address = _interface_address(name)
        if address is not None and not address.startswith("127."):
            return address
    try:
        _, _, addresses = socket.gethostbyname_ex(socket.gethostname())
    except OSError:
        addresses = []
    for address in addresses:
        if not address.startswith("127."):
            return address
    running = running_interfaces()
    return next(iter(running.values())) if len(running) == 1 else None


class EmbeddedCoordinator:
    """A coordinator in a child process of global rank 0.

    A process, not a thread, so a busy training loop cannot starve it through the GIL. It is
    started before DataLoader workers fork, gets the secret through its environment (never the
    command line), exits when this process dies, and is stopped by :meth:`stop` or at exit.
    """

    def __init__(self, bind: str, journal_path: str | None, secret: bytes | None,
                 timeout_s: float = 30.0) -> None:
        cmd = [sys.executable, "-m", "shardbalance", "coordinator", "--bind", bind,
               "--parent-pid", str(os.getpid())]
        if journal_path:
            cmd += ["--log", journal_path]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDBALANCE_TOKEN")}
        if secret:
            env["SHARDBALANCE_TOKEN"] = secret.decode()
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        env=env)
        self.endpoint = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
            elif self.process.poll() is not None:
                break
        text = line.decode(errors="replace").strip()
        if not text.startswith("READY "):
            self.stop()
            raise CoordinatorUnavailable(
                f"the embedded coordinator did not start within {timeout_s:g} s "
                f"(exit code {self.process.returncode}, said {text!r}); see its stderr above")
        return text.split(" ", 1)[1]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self.process.stdout is not None:
            self.process.stdout.close()
