"""Run a function on real gloo ranks (forked processes on 127.0.0.1, a free port each time).

Every launch has a hang timeout; a rank that does not finish in time is killed by PID and the
test fails with what each rank said. Ranks delete their DDP objects and ``barrier()`` before
``destroy_process_group()``, which keeps gloo teardown from aborting now and then.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import signal
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import _launch
from _launch import free_port, read_line, stop_process  # noqa: F401 (tests import them here)

ROOT = Path(__file__).resolve().parent.parent


def _context():
    # Not plain fork: once this process has run torch ops, OpenMP's thread pool does not
    # survive a fork and a child can hang in its first parallel op. A fork server that has
    # imported torch (and run nothing) forks fast and safely.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "shardbalance.sampler"])
    return ctx


def _entry(fn, rank, world_size, port, env, queue, args):
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        # Plain pickle bytes: tensors would otherwise travel as shared-memory handles that die
        # with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 90.0,
              env: dict[str, str] | None = None, port: int | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each result.

    ``port``: the rendezvous store's port (default: a free one, the store hosted by rank 0;
    with ``TORCHELASTIC_USE_AGENT_STORE=True`` in ``env``, a store the caller hosts there, as
    torchrun's agent does, which outlives the ranks)."""
    ctx = _context()
    queue = ctx.Queue()
    port = port or free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, env or {}, queue, args),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    try:
        import queue as queue_mod

        deadline = time.monotonic() + timeout_s
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # let the others report what they saw
                    while not queue.empty():
                        rank, status, value = queue.get_nowait()
                        results[rank] = (status, value)
                    break
                continue
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    missing = [r for r in range(world_size) if r not in results]
    if errors or missing:
        detail = "\n".join(f"--- rank {r} ---\n{v}" for r, v in sorted(errors.items()))
        raise AssertionError(f"ranks failed: {sorted(errors)}, no answer (hung or died): "
                             f"{missing} within {timeout_s:g} s\n{detail}")
    return [pickle.loads(results[r][1]) for r in range(world_size)]


def start_coordinator(port: int, journal: str, secret: str) -> "subprocess.Popen":
    """A standalone coordinator (``python -m shardbalance coordinator``) on 127.0.0.1:``port``
    with token ``secret``, once it printed READY."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardbalance", "coordinator", "--bind",
         f"tcp://127.0.0.1:{port}", "--log", journal], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "SHARDBALANCE_TOKEN": secret})
    assert read_line(proc).startswith("READY")
    return proc


def torchrun(nproc, *args, timeout_s=150, launcher_args=None, env=None, script="train.py"):
    """``torchrun`` examples/<script> on 127.0.0.1 and a free port; its output (stdout and
    stderr in order). The launch is stopped whole if it fails or runs past ``timeout_s``."""
    try:
        out, _ = _launch.torchrun(nproc, ROOT / "examples" / script, list(args), timeout_s,
                                  launcher_args=launcher_args, env=env, merge_output=True)
    except _launch.LaunchError as exc:
        raise AssertionError(str(exc)) from None
    return out


class ThreadedCoordinator:
    """A real coordinator on a free loopback port, served from a thread of this process (its
    socket is real; only the process is shared): ``endpoint``, ``coordinator``, ``stop()``."""

    def __init__(self, journal: str | None = None, secret: bytes | None = None,
                 limits=None) -> None:
        import threading

        from shardbalance.coordinator import Coordinator

        kwargs = {} if limits is None else {"limits": limits}
        self.coordinator = Coordinator("tcp://127.0.0.1:0", journal, secret, **kwargs)
        self.endpoint = self.coordinator.endpoint
        self.thread = threading.Thread(target=self.coordinator.serve_forever,
                                       kwargs={"poll_ms": 20, "max_seconds": 120}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.coordinator.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.coordinator.close()
