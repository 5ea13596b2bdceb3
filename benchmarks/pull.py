"""Pull mode against a static equal split and the ideal, side by side in one run.

    python benchmarks/pull.py                       # 3 ranks of speed 1:2:4, 3 repeats
    python benchmarks/pull.py --samples 12000 --repeats 5

Each scenario starts a standalone coordinator and one independent process per rank
(``examples/infer.py``: emulated speeds, index-keyed outputs, merged and checked at the end).
The processes print READY once built; the clock starts when all are ready (process start is
reported separately), and a rank's time ends when its loop ends, so the completion time is
``max(end) - start``. The ideal is ``N · per_sample / Σ speeds`` (every rank busy until the
same instant, no overhead). Scenarios:

* ``pull, chunk C``: DynamicShardSampler with ``chunk_size`` C, for each of ``--chunk-sizes``
  (each chunk costs one coordinator round trip, and on a loaded machine one more oversleep).
* ``static``: rank r processes the r-th equal contiguous share (DistributedSampler's split).
* ``pull, fastest killed``: the fastest rank is SIGKILLed halfway through the ideal time; its
  leases expire after ``--lease-s`` and the others finish its chunks (the largest chunk size).

Figures are medians over ``--repeats`` runs; every run is checked complete (each index once in
the merged output).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _launch import REPO, free_port, read_line
from _launch import stop_process as stop

INFER = REPO / "examples" / "infer.py"
TOKEN = "pull-benchmark-secret-0123456789abcdef"


def scenario(args, speeds: list[float], mode: str, workdir: Path, chunk_size: int) -> dict:
    """One run of ``mode`` (pull, static, killed); its figures."""
    env = {**os.environ, "SHARDBALANCE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    go = workdir / "go"
    procs: list[subprocess.Popen] = []
    coordinator = None
    try:
        common = ["--samples", str(args.samples), "--emulate-speeds", ",".join(map(str, speeds)),
                  "--per-sample-ms", str(args.per_sample_ms), "--chunk-size",
                  str(chunk_size), "--out-dir", str(workdir), "--start-file", str(go),
                  "--no-merge", "--world-size", str(len(speeds))]
        if mode == "static":
            common.append("--static")
        else:
            port = free_port()
            coordinator = subprocess.Popen(
                [sys.executable, "-m", "shardbalance", "coordinator", "--bind",
                 f"tcp://127.0.0.1:{port}", "--log", str(workdir / "coordinator.jsonl")],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            if not read_line(coordinator, 60).startswith("READY"):
                raise SystemExit("the coordinator did not start")
            common += ["--coordinator", f"tcp://127.0.0.1:{port}", "--run-id", "bench",
                       "--lease-s", str(args.lease_s)]
        spawned = time.time()
        procs = [subprocess.Popen([sys.executable, str(INFER), "--rank", str(r), *common,
                                   "--summary", str(workdir / f"summary-{r}.json")],
                                  stdout=subprocess.PIPE, env=env) for r in range(len(speeds))]
        for proc in procs:
            if read_line(proc, 120) != "READY":
                raise SystemExit("a rank did not start")
        start = time.time()
        go.touch()
        fastest = max(range(len(speeds)), key=lambda r: speeds[r])
        if mode == "killed":
            ideal = args.samples * args.per_sample_ms / 1e3 / sum(speeds)
            time.sleep(max(0.0, start + ideal / 2 - time.time()))
            procs[fastest].send_signal(signal.SIGKILL)
        for r, proc in enumerate(procs):
            code = proc.wait(args.timeout_s)
            if code != 0 and not (mode == "killed" and r == fastest):
                raise SystemExit(f"rank {r} of {mode} exited with {code}")
        ends = [json.loads((workdir / f"summary-{r}.json").read_text())["end"]
                for r in range(len(speeds))
                if (workdir / f"summary-{r}.json").exists()]
        merged = subprocess.run([sys.executable, str(INFER), "--merge-only", "--out-dir",
                                 str(workdir), "--samples", str(args.samples)],
                                capture_output=True, text=True, timeout=120, env=env)
        return {"seconds": max(ends) - start, "start_s": start - spawned,
                "complete": merged.returncode == 0, "merge": merged.stdout.strip()}
    finally:
        for proc in procs:
            stop(proc)
        if coordinator is not None:
            stop(coordinator)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=6000)
    p.add_argument("--speeds", default="1,2,4")
    p.add_argument("--per-sample-ms", type=float, default=2.0)
    p.add_argument("--chunk-sizes", default="64,256", help="pull rows, one per chunk size")
    p.add_argument("--lease-s", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=300.0)
    args = p.parse_args()
    speeds = [float(s) for s in args.speeds.split(",")]
    ideal = args.samples * args.per_sample_ms / 1e3 / sum(speeds)
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    # label -> (mode, chunk size); static processes its share in chunks of the largest size.
    modes = {**{f"pull, chunk {c}": ("pull", c) for c in chunks},
             "static equal split": ("static", max(chunks)),
             f"pull, chunk {max(chunks)}, fastest killed": ("killed", max(chunks))}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for label, (mode, chunk) in modes.items():  # interleaved: a slow patch hits every mode
            with tempfile.TemporaryDirectory(prefix="shardbalance-pull-") as tmp:
                runs[label].append(scenario(args, speeds, mode, Path(tmp), chunk))
    print(f"{args.samples} items, speeds {args.speeds}, {args.per_sample_ms:g} ms/item at speed "
          f"1, lease {args.lease_s:g} s; medians of {args.repeats} runs")
    print(f"ideal N/Σspeeds: {ideal:.3f} s; machine load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs (emulated work sleeps, but each chunk's real work and each "
          f"coordinator round trip wait for a CPU)")
    static = statistics.median(r["seconds"] for r in runs["static equal split"])
    print(f"{'scenario':<32} {'seconds':>8} {'ideal/time':>10} {'vs static':>9} "
          f"{'start s':>8}  complete (merge of the last run)")
    for label in modes:
        seconds = statistics.median(r["seconds"] for r in runs[label])
        start_s = statistics.median(r["start_s"] for r in runs[label])
        complete = all(r["complete"] for r in runs[label])
        print(f"{label:<32} {seconds:>8.3f} {ideal / seconds:>10.3f} {static / seconds:>8.2f}x "
              f"{start_s:>8.2f}  {'yes' if complete else 'NO'} ({runs[label][-1]['merge']})")


if __name__ == "__main__":
    main()
