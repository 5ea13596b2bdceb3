"""``shardbalance status``: what a running coordinator serves, as a table, once or refreshed.

One ``status`` request (read-only, signed like every message) per refresh; the reply is
described in :func:`shardbalance.protocol.parse_status_reply`. Per rank: what it runs on, the
batch size and busy time of its newest measured step, its samples per busy second over its newest
steps, and how long ago it reported; per run, the plan in force and its predicted step time.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from .client import CoordinatorClient

__all__ = ["format_status", "watch"]


def _number(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def format_status(reply: dict[str, Any], address: str) -> str:
    """The status table of a checked ``status`` reply from the coordinator at ``address``."""
    runs, pulls = reply["runs"], reply["pull_runs"]
    lines = [f"coordinator {address}: {len(runs)} run(s), {len(pulls)} pull run(s)"]
    for run in runs:
        lines.append("")
        lines.append(f"run {run['run']}  generation {run['generation']}  "
                     f"{run['world_size']} ranks  global batch {run['global_batch_size']}  "
                     f"policy {run['policy']}  last request {_number(run['idle_s'], '.1f', ' s')}"
                     " ago")
        plan = run["plan"]
        if plan is None:
            lines.append("  plan: none decided yet")
        else:
            sizes = plan["batch_sizes"]
            lines.append(f"  plan: epoch {plan['epoch']} step {plan['window']}: "
                         f"{'(per-rank sizes left out)' if sizes is None else sizes}  predicted "
                         f"{_number(plan['predicted_step_ms'], '.1f', ' ms/step')}")
        if run["ranks"] is None:
            lines.append("  (per-rank rows left out: too many ranks for one reply; "
                         "ask for this run alone with --run)")
            continue
        width = max([len("member")] + [len(r["member"] or "-") for r in run["ranks"]])
        lines.append(f"  {'rank':>5}  {'member':<{width}}  {'plan':>6}  {'batch':>6}  "
                     f"{'busy ms':>9}  {'samples/s':>10}  {'heard':>11}")
        for row in run["ranks"]:
            sizes = plan["batch_sizes"] if plan is not None else None
            lines.append(
                f"  {row['rank']:>5}  {row['member'] or '-':<{width}}  "
                f"{'-' if sizes is None else sizes[row['rank']]:>6}  "
                f"{_number(row['batch_size'], 'd'):>6}  {_number(row['busy_ms'], '.1f'):>9}  "
                f"{_number(row['samples_per_s'], '.1f'):>10}  "
                f"{_number(row['idle_s'], '.1f', ' s ago'):>11}")
    for pull in pulls:
        lines.append("")
        done = pull["completed_epochs"]
        lines.append(f"pull run {pull['run']}  generation {pull['generation']}  "
                     f"{pull['world_size']} ranks  {pull['num_samples']} samples  completed "
                     f"epochs {done if done else 'none'}  last request "
                     f"{_number(pull['idle_s'], '.1f', ' s')} ago")
    if reply["truncated"]:
        lines.append("")
        lines.append("(some runs summarized: a reply carries per-rank rows for a bounded "
                     "number of ranks)")
    return "\n".join(lines)


def watch(address: str, secret: bytes | None, run: str | None = None, interval_s: float = 2.0,
          count: int | None = 1, timeout_s: float = 5.0, stream=None,
          stop: threading.Event | None = None) -> int:
    """Print the status table ``count`` times (None: until SIGINT / SIGTERM or ``stop``),
    ``interval_s`` apart. Each request waits at most ``timeout_s`` (CoordinatorUnavailable)."""
    stream = stream or sys.stdout
    stop = stop or threading.Event()
    if count != 1 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    clear = "\x1b[H\x1b[2J" if count != 1 and getattr(stream, "isatty", lambda: False)() else ""
    client = CoordinatorClient(address, secret, timeout_s=timeout_s, retries=1)
    try:
        shown = 0
        while not stop.is_set():
            text = format_status(client.status(run), address)
            print(f"{clear}{text}" if clear or not shown else f"\n{text}", file=stream,
                  flush=True)
            shown += 1
            if count is not None and shown >= count:
                break
            stop.wait(interval_s)
    finally:
        client.close()
    return 0
