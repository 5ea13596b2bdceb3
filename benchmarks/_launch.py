"""Launching torchrun from a benchmark: free loopback ports, a time bound, no ranks left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """Stop torchrun and its ranks (they share the session it was started in)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


class LaunchError(RuntimeError):
    """A torchrun that failed or timed out; the message carries the tail of its output."""


def torchrun(nproc: int, script: str | Path, script_args: list[str], timeout_s: float,
             name: str = "torchrun", before_attempt=None) -> tuple[str, str]:
    """torchrun ``script`` on 127.0.0.1 with a free port (retried if taken), bounded in time.

    ``before_attempt()`` runs before each try (e.g. to remove a previous try's output files).
    Returns (stdout, stderr); raises LaunchError on failure or timeout.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for attempt in range(3):
        if before_attempt is not None:
            before_attempt()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--nnodes", "1",
               "--nproc_per_node", str(nproc), str(script), *script_args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise LaunchError(f"{name} timed out after {timeout_s:.0f} s\n"
                              f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}")
        except BaseException:  # Ctrl-C: do not leave the ranks behind
            kill_group(proc)
            raise
        if proc.returncode == 0:
            return out, err
        # Another process may have taken the port between our probe and torchrun's bind.
        if "address already in use" not in (out + err).lower() or attempt == 2:
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
