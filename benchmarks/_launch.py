"""Starting and stopping processes for the tests and the benchmarks: free loopback ports,
bounded waits, torchrun on 127.0.0.1, no process left behind.

The one home of these helpers: ``tests/distributed.py`` and every benchmark import them from
here (``tests/conftest.py`` puts this directory on the import path).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry if it was taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0, group: bool = False) -> int:
    """SIGTERM ``proc`` (its whole process group with ``group=True``, for a launch started with
    ``start_new_session=True``), SIGKILL it if it has not exited within ``timeout_s``; return
    its exit code."""
    def send(sig):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    if proc.poll() is None or group:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(timeout_s)
    return proc.returncode


def kill_group(proc: subprocess.Popen) -> None:
    """Stop torchrun and its ranks (they share the session it was started in)."""
    stop_process(proc, group=True)


class LaunchError(RuntimeError):
    """A torchrun that failed or timed out; the message carries the tail of its output."""


def read_line(proc: subprocess.Popen, timeout_s: float = 30.0) -> str:
    """The next line ``proc`` prints on its piped stdout, waiting at most ``timeout_s``.

    Reads the pipe's descriptor directly (one line is all a caller ever needs); on a timeout
    or an early exit the process is stopped and LaunchError says what it printed.
    """
    fd, data = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    while not data.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 1)
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    if not data.endswith(b"\n"):
        stop_process(proc)
        raise LaunchError(f"no line from PID {proc.pid} within {timeout_s:g} s "
                             f"(said {data!r}, exit {proc.returncode})")
    return data.decode()


def torchrun(nproc: int, script: str | Path, script_args: list[str], timeout_s: float,
             name: str = "torchrun", before_attempt: Callable[[], None] | None = None,
             launcher_args: list[str] | None = None, env: dict[str, str] | None = None,
             merge_output: bool = False) -> tuple[str, str]:
    """torchrun ``script`` on 127.0.0.1 with a free port (retried if taken), bounded in time.

    ``launcher_args`` replace the rendezvous arguments (``--master_addr``/``--master_port``;
    then there is no retry). ``before_attempt()`` runs before each try (e.g. to remove a
    previous try's output files). ``merge_output``: stderr goes into stdout (in order).
    Returns (stdout, stderr); raises LaunchError on failure or timeout, the whole launch
    (torchrun and every rank) stopped.
    """
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    attempts = 1 if launcher_args else 3
    for attempt in range(attempts):
        if before_attempt is not None:
            before_attempt()
        rendezvous = launcher_args or ["--master_addr", "127.0.0.1", "--master_port",
                                       str(free_port()), "--nnodes", "1"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
               "--nproc_per_node", str(nproc), str(script), *script_args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise LaunchError(f"{name} timed out after {timeout_s:.0f} s\n"
                              f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{(err or '')[-3000:]}")
        except BaseException:  # Ctrl-C: do not leave the ranks behind
            kill_group(proc)
            raise
        err = err or ""
        if proc.returncode == 0:
            return out, err
        # Another process may have taken the port between our probe and torchrun's bind.
        if "address already in use" not in (out + err).lower() or attempt == attempts - 1:
            raise LaunchError(f"{name} failed (exit {proc.returncode})\n--- stdout ---\n"
                              f"{out[-3000:]}\n--- stderr ---\n{err[-3000:]}")
    raise AssertionError("unreachable")


def torchrun_or_exit(nproc: int, script: str | Path, script_args: list[str],
                     timeout_s: float) -> tuple[str, str]:
    """:func:`torchrun`, where a failed launch ends the benchmark with its message."""
    try:
        return torchrun(nproc, script, script_args, timeout_s)
    except LaunchError as exc:
        raise SystemExit(str(exc)) from None
