"""Multi-host for real: each "host" is a network namespace, the launchers run on each.

A host here has its own network stack (one address on a veth link, its own loopback), its own
host name (a UTS namespace inside the network namespace) and its own ``/etc/hosts`` (``ip netns
exec`` mounts ``/etc/netns/<ns>/hosts`` over it). So the rendezvous, gloo and the coordinator
see what they see on separate machines: a peer's name resolves to its routable address, and
loopback reaches only the host itself, so an address that works only on one node fails.

Needs root (CAP_NET_ADMIN) for ``ip netns``; skipped with the reason where that is missing,
except where ``SHARDBALANCE_TEST_NETNS=required`` (CI sets it): there a missing ``ip netns``
fails the test. Every namespace, link and ``/etc/netns`` entry is made with a name unique to the
test run and removed afterwards, failure or not; every process is stopped by PID, those left
inside a namespace too (``ip netns pids``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from distributed import ROOT, read_line, stop_process

#: One launch of two nodes took 60-80 s on a 2-core machine shared with other jobs (most of it
#: importing torch); this bounds a hang, not a speed.
LAUNCH_TIMEOUT_S = 240
SUBNET = "10.231.7"  # exists only inside this test's namespaces
SECOND_SUBNET = "10.231.8"
RDZV_PORT = 29400
COORDINATOR_PORT = 5555
# Speeds 1:3 over two ranks; 12 steps per epoch, N divisible by B, so every sample exactly once.
TRAIN_ARGS = ["--emulate-speeds", "1,3", "--epochs", "3", "--samples", "768",
              "--global-batch-size", "64", "--num-workers", "0", "--check-coverage"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _netns_unavailable() -> str | None:
    """Why this machine cannot make network namespaces, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "`ip netns` needs root (CAP_NET_ADMIN)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"sbprobe{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Network namespaces as hosts, each with a name, an address and its own /etc/hosts."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]  # unique per test run: names of namespaces and links
        self.namespaces: dict[str, str] = {}  # host name -> namespace
        self.addresses: dict[str, str] = {}  # host name -> IPv4 address
        self.processes: list[subprocess.Popen] = []
        self._links = 0
        self._logs: list = []

    def add(self, name: str) -> str:
        """A new host named ``name`` (its address: the next one in SUBNET); returns it."""
        namespace = f"sbmh-{self.tag}-{len(self.namespaces)}"
        self.namespaces[name] = namespace  # before it exists: close() removes what was made
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        self.addresses[name] = f"{SUBNET}.{len(self.addresses) + 1}"
        return self.addresses[name]

    def _veth(self, a: str, b: str) -> tuple[str, str]:
        """A veth pair between hosts a and b, made inside their namespaces; its two ends."""
        self._links += 1
        end_a, end_b = f"sb{self.tag}{self._links}a", f"sb{self.tag}{self._links}b"
        _ip("link", "add", end_a, "netns", self.namespaces[a], "type", "veth",
            "peer", "name", end_b, "netns", self.namespaces[b])
        return end_a, end_b

    def _address(self, name: str, device: str, address: str | None = None) -> None:
        namespace = self.namespaces[name]
        _ip("-n", namespace, "addr", "add", f"{address or self.addresses[name]}/24",
            "dev", device)
        _ip("-n", namespace, "link", "set", device, "up")

    def cable(self, a: str, b: str, addresses: tuple[str, str] | None = None) -> str:
        """Two hosts joined by one veth pair (with their own addresses, or ``addresses``);
        returns the name of a's end."""
        end_a, end_b = self._veth(a, b)
        self._address(a, end_a, addresses and addresses[0])
        self._address(b, end_b, addresses and addresses[1])
        return end_a

    def switch(self, hub: str, *spokes: str) -> None:
        """A bridge in ``hub`` (which takes its address on it) with a veth to each spoke."""
        namespace = self.namespaces[hub]
        _ip("-n", namespace, "link", "add", "sbbr", "type", "bridge")
        for spoke in spokes:
            end_spoke, end_hub = self._veth(spoke, hub)
            _ip("-n", namespace, "link", "set", end_hub, "master", "sbbr")
            _ip("-n", namespace, "link", "set", end_hub, "up")
            self._address(spoke, end_spoke)
        self._address(hub, "sbbr")

    def write_hosts_files(self, own_name_on_loopback: tuple[str, ...] = ()) -> None:
        """Each host's /etc/hosts, as on a cluster: every host's name -> its routable address;
        except that a host in ``own_name_on_loopback`` maps its own name to 127.0.1.1 (the
        Debian and Ubuntu default), as torchrun tolerates."""
        for name, namespace in self.namespaces.items():
            lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
            lines += [f"{'127.0.1.1' if host == name and name in own_name_on_loopback else address}"
                      f" {host}" for host, address in self.addresses.items()]
            directory = Path("/etc/netns") / namespace
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("\n".join(lines) + "\n")

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path,
              stdout_pipe: bool = False, stdin_pipe: bool = False) -> subprocess.Popen:
        """Run ``argv`` on host ``name`` (host name set in a UTS namespace of its own), from the
        repository root, output to ``log`` (stdout piped instead with ``stdout_pipe``; stdin
        piped with ``stdin_pipe``)."""
        out = open(log, "w", encoding="utf-8")
        self._logs.append(out)
        cmd = ["ip", "netns", "exec", self.namespaces[name], "unshare", "--uts",
               "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env,
                                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                stdout=subprocess.PIPE if stdout_pipe else out,
                                stderr=out, start_new_session=True)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        """Stop every process (by PID), then remove the namespaces and their /etc/netns dirs."""
        errors = []
        for proc in self.processes:
            try:
                stop_process(proc, group=True)
            except Exception as exc:  # keep cleaning up; report at the end
                errors.append(f"stopping PID {proc.pid}: {exc}")
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for out in self._logs:
            out.close()
        for namespace in self.namespaces.values():
            try:
                _stop_namespace_processes(namespace)
                if _ip("netns", "list").stdout.split().count(namespace):
                    _ip("netns", "del", namespace)
            except Exception as exc:
                errors.append(f"removing namespace {namespace}: {exc}")
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        if errors:
            raise RuntimeError("cleanup failed: " + "; ".join(errors))


def _namespace_pids(namespace: str) -> list[int]:
    listed = _ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in listed.stdout.split()] if listed.returncode == 0 else []


def _stop_namespace_processes(namespace: str, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, whatever still runs in ``namespace``, each by its PID."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s / 2), (signal.SIGKILL, timeout_s / 2)):
        pids = _namespace_pids(namespace)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = _namespace_pids(namespace)
        if not pids:
            return
    raise RuntimeError(f"processes {pids} in {namespace} survived SIGKILL")


@pytest.fixture
def hosts():
    reason = _netns_unavailable()
    if reason is not None:
        if os.environ.get("SHARDBALANCE_TEST_NETNS") == "required":
            pytest.fail(f"SHARDBALANCE_TEST_NETNS=required but {reason}")
        pytest.skip(reason)
    made = Hosts()
    try:
        yield made
    finally:
        made.close()


def _node_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would steer the run from outside,
    this checkout first on the import path, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHARDBALANCE_", "MASTER_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _launch_two_nodes(hosts: Hosts, tmp_path: Path, train_args: list[str],
                      **env: str) -> list[str]:
    """``launch/multi_node.sh`` on node0 and node1, one rank each; their output once both
    exited 0 (the test fails with both outputs otherwise)."""
    base = _node_env(NNODES="2", NPROC="1", RDZV_ENDPOINT=f"node0:{RDZV_PORT}",
                     RDZV_ID=f"multihost-{hosts.tag}", **env)
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [hosts.start(f"node{i}", ["launch/multi_node.sh", *train_args],
                         base, logs[i]) for i in range(2)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(f"still running after {LAUNCH_TIMEOUT_S} s")
    outputs = [log.read_text(errors="replace") for log in logs]
    if codes != [0, 0]:
        detail = "\n".join(f"--- node{i} ({codes[i]}) ---\n{out[-4000:]}"
                           for i, out in enumerate(outputs))
        raise AssertionError(f"the two-node launch failed: {codes}\n{detail}")
    return outputs


def _journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_balanced_with_exact_coverage(metrics: Path, journal: list[dict]) -> None:
    epochs = _journal(metrics)
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    for e in epochs:
        assert e["steps"] == 12 and sum(e["plan"]) == 64, e
        # Every sample of the epoch trained exactly once, across the two hosts.
        assert e["coverage"] == {"distinct": 768, "min": 1, "max": 1}, e
    final = epochs[-1]["plan"]
    assert final[1] > final[0], epochs  # node1's rank is 3x faster
    # The background planner also decides the plan of the epoch after the last (3) while
    # epoch 2 trains; the plans trained are those of epochs 0-2.
    plans = [r for r in journal if r["event"] == "plan" and r["epoch"] <= 2]
    assert {p["epoch"] for p in plans} == {0, 1, 2} and plans[-1]["epoch"] == 2, plans
    assert plans[-1]["batch_sizes"] == final
    assert plans[-1]["speedup_vs_equal"] > 1.2, plans[-1]
    runs = [r for r in journal if r["event"] == "run"]
    assert len(runs) == 1 and runs[0]["config"]["world_size"] == 2, runs


#: Rank 0's choice of the embedded coordinator's address. Each line on stdin: a JSON list of
#: GLOO_SOCKET_IFNAME values (lists of names) to try; each answer a JSON line, errors as
#: "Type: message". One process for all questions: /etc/hosts is read at every lookup, so a
#: rewritten file (the same inode, which ``ip netns exec`` mounted) counts at once.
_ADDRESS_PROBE = """
import dataclasses, json, sys
from shardbalance._env import read_environment
from shardbalance._session import coordinator_host
env = read_environment()
for line in sys.stdin:
    answers = []
    for interfaces in json.loads(line):
        asked = dataclasses.replace(env, socket_interfaces=tuple(interfaces))
        try:
            answers.append(coordinator_host(asked))
        except Exception as exc:
            answers.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps(answers), flush=True)
"""


def _ask(probe: subprocess.Popen, log: Path, *interface_lists: tuple[str, ...]) -> list[str]:
    probe.stdin.write(json.dumps(interface_lists).encode() + b"\n")
    probe.stdin.flush()
    try:
        return json.loads(read_line(probe, timeout_s=60))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from None


def test_rank0_finds_its_routable_address_even_when_its_name_maps_to_loopback(hosts, tmp_path):
    node0 = hosts.add("node0")
    hosts.add("node1")
    hosts.cable("node0", "node1")
    hosts.write_hosts_files()
    # Rank 0 of a two-node job on node0, as torchrun's c10d rendezvous sets it up (MASTER_ADDR:
    # node0's own name).
    env = _node_env(MASTER_ADDR="node0", MASTER_PORT=str(RDZV_PORT), WORLD_SIZE="2",
                    LOCAL_WORLD_SIZE="1")
    log = tmp_path / "probe.log"
    probe = hosts.start("node0", [sys.executable, "-c", _ADDRESS_PROBE], env, log,
                        stdout_pipe=True, stdin_pipe=True)
    # /etc/hosts maps node0 to its address on the link: the route to it.
    assert _ask(probe, log, ()) == [node0]

    # Debian's default "127.0.1.1 node0": torchrun and gloo still run across the hosts, so
    # the coordinator must too. The only interface up and running is the link.
    hosts.write_hosts_files(own_name_on_loopback=("node0",))
    assert _ask(probe, log, ()) == [node0]

    # With a second link, which one node1 reaches is unknown: a clear error naming both,
    # unless GLOO_SOCKET_IFNAME (the interface gloo is told to use) names it.
    second = hosts.cable("node0", "node1", (f"{SECOND_SUBNET}.1", f"{SECOND_SUBNET}.2"))
    ambiguous, named, missing = _ask(probe, log, (), (second,), ("nosuch0",))
    assert ambiguous.startswith("ConfigError") and "loopback" in ambiguous, ambiguous
    assert f"{node0}" in ambiguous and f"{second} {SECOND_SUBNET}.1" in ambiguous, ambiguous
    assert "GLOO_SOCKET_IFNAME" in ambiguous and "SHARDBALANCE_BIND" in ambiguous
    assert named == f"{SECOND_SUBNET}.1"
    assert "GLOO_SOCKET_IFNAME=nosuch0 has no IPv4 address" in missing, missing
    probe.stdin.close()
    assert probe.wait(30) == 0


def test_embedded_coordinator_on_node0_binds_its_routable_address(hosts, tmp_path):
    node0, node1 = hosts.add("node0"), hosts.add("node1")
    hosts.cable("node0", "node1")
    # node0 as a Debian host: its own name on loopback, the harder case for rank 0 (the
    # plain one is in the test above).
    hosts.write_hosts_files(own_name_on_loopback=("node0",))
    metrics, journal = tmp_path / "metrics.jsonl", tmp_path / "coordinator.jsonl"

    outputs = _launch_two_nodes(hosts, tmp_path, [*TRAIN_ARGS, "--metrics-out", str(metrics),
                                                  "--coordinator-log", str(journal)])

    records = _journal(journal)
    # The c10d rendezvous numbers nodes in the order of their host names: global rank 0 is on
    # node0, and it started the coordinator on node0's address on the veth link,
    # the one node1 reaches: not loopback, not a wildcard.
    start = [r for r in records if r["event"] == "start"]
    assert len(start) == 1 and start[0]["endpoint"].startswith(f"tcp://{node0}:"), start
    assert f"listening on tcp://{node0}:" in outputs[0]
    assert "listening on" not in outputs[1]
    assert node1 != node0
    _assert_balanced_with_exact_coverage(metrics, records)


def test_standalone_coordinator_on_a_third_host(hosts, tmp_path):
    hosts.add("node0"), hosts.add("node1")
    coordinator_address = hosts.add("coordhost")
    hosts.switch("coordhost", "node0", "node1")
    hosts.write_hosts_files()
    journal, token = tmp_path / "coordinator.jsonl", tmp_path / "shardbalance.token"
    embedded_journal, metrics = tmp_path / "embedded.jsonl", tmp_path / "metrics.jsonl"

    bind = f"tcp://{coordinator_address}:{COORDINATOR_PORT}"
    coordinator = hosts.start(
        "coordhost", ["launch/coordinator.sh"],
        _node_env(BIND=bind, LOG=str(journal), TOKEN_FILE=str(token)),
        tmp_path / "coordinator.log", stdout_pipe=True)
    assert read_line(coordinator, timeout_s=30).strip() == f"READY {bind}"
    assert token.stat().st_mode & 0o777 == 0o600  # made by the launcher, private

    # The nodes find it by its host name, through their own /etc/hosts.
    _launch_two_nodes(hosts, tmp_path, [*TRAIN_ARGS, "--metrics-out", str(metrics),
                                        "--coordinator-log", str(embedded_journal)],
                      SHARDBALANCE_COORDINATOR=f"tcp://coordhost:{COORDINATOR_PORT}",
                      SHARDBALANCE_TOKEN_FILE=str(token))

    assert not embedded_journal.exists()  # no embedded coordinator was started
    assert stop_process(coordinator) == 0
    records = _journal(journal)
    start = [r for r in records if r["event"] == "start"]
    assert start == [{**start[0], "endpoint": bind, "authenticated": True}], start
    _assert_balanced_with_exact_coverage(metrics, records)
