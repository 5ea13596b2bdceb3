"""End to end: examples/train.py under real torchrun, with emulated rank speeds."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from distributed import free_port
from shardbalance.report import summarize

ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc, *args, timeout_s=150):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(ROOT / "examples" / "train.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun hung for {timeout_s} s:\n{out}")
    assert proc.returncode == 0, out
    return out


def test_the_fast_rank_ends_with_the_larger_batch(tmp_path):
    metrics, journal = tmp_path / "metrics.jsonl", tmp_path / "coordinator.jsonl"
    out = torchrun(2, "--emulate-speeds", "1,4", "--epochs", "3", "--samples", "768",
                   "--global-batch-size", "64", "--num-workers", "1",
                   "--metrics-out", str(metrics), "--coordinator-log", str(journal))
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert all(e["steps"] == 12 and sum(e["plan"]) == 64 for e in epochs)
    assert epochs[0]["plan"] == [32, 32]
    final = epochs[-1]["plan"]
    assert final[1] > final[0], out
    # The coordinator logged each decision for a person (stderr) and as JSON (journal).
    assert "plan [" in out and "busy ms/step" in out
    decisions = [json.loads(line) for line in journal.read_text().splitlines()]
    plans = [d for d in decisions if d["event"] == "plan"]
    assert [p["epoch"] for p in plans] == [0, 1, 2]
    assert plans[-1]["batch_sizes"] == final
    assert plans[-1]["speedup_vs_equal"] > 1.2
    summary = summarize(str(journal))
    assert "2 ranks, global batch 64, policy affine" in summary
    assert str(final) in summary
