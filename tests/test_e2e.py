"""End to end: examples/train.py under real torchrun, with emulated rank speeds."""

import json

from distributed import free_port, torchrun
from shardbalance.report import summarize


def test_the_fast_rank_ends_with_the_larger_batch(tmp_path):
    metrics, journal = tmp_path / "metrics.jsonl", tmp_path / "coordinator.jsonl"
    out = torchrun(2, "--emulate-speeds", "1,4", "--epochs", "3", "--samples", "768",
                   "--global-batch-size", "64", "--num-workers", "1",
                   "--metrics-out", str(metrics), "--coordinator-log", str(journal))
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert all(e["steps"] == 12 and sum(e["plan"]) == 64 for e in epochs)
    # No probe: epoch 0 starts on the equal split and re-plans early, so it already ends
    # with the fast rank holding the larger batch.
    assert epochs[0]["plan"][1] > epochs[0]["plan"][0], out
    final = epochs[-1]["plan"]
    assert final[1] > final[0], out
    # The coordinator logged each decision for a person (stderr) and as JSON (journal).
    assert "plan [" in out and "busy ms/step" in out
    decisions = [json.loads(line) for line in journal.read_text().splitlines()]
    # (The plan of an epoch is decided in the background near the end of the one before, so
    # one for the epoch after the last is decided too.)
    plans = [d for d in decisions if d["event"] == "plan" and d["epoch"] <= 2]
    assert plans[0]["batch_sizes"] == [32, 32] and plans[0]["window"] == 0
    epoch0 = [p for p in plans if p["epoch"] == 0]
    assert 2 <= len(epoch0) <= 3 and [p["epoch"] for p in plans[len(epoch0):]] == [1, 2]
    assert plans[-1]["batch_sizes"] == final
    assert plans[-1]["speedup_vs_equal"] > 1.2
    summary = summarize(str(journal))
    assert "2 ranks, global batch 64, policy affine" in summary
    assert str(final) in summary
    # Rank 0 printed sampler.metrics() each epoch; the last one names the final plan's figures.
    assert [e["shardbalance"]["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["shardbalance"]["batch_size/rank1"] == final[1]
    assert "epoch 2 | metrics imbalance" in out


def test_elastic_restart_resumes_from_the_checkpoint_as_a_new_generation(tmp_path):
    metrics, journal = tmp_path / "metrics.jsonl", tmp_path / "coordinator.jsonl"
    out = torchrun(2, "--emulate-speeds", "1,3", "--epochs", "3",
                   "--samples", "512", "--global-batch-size", "64", "--num-workers", "0",
                   "--checkpoint", str(tmp_path / "ckpt.pt"), "--checkpoint-every", "4",
                   "--simulate-failure", "14", "--metrics-out", str(metrics),
                   "--coordinator-log", str(journal),
                   # The other gradient weighting, and each life starts from a probe.
                   "--weighting", "output", "--initial-weights", "probe",
                   "--max-batch-size", "auto",
                   # Restarts need a rendezvous that knows rounds (the static one reuses keys).
                   launcher_args=["--max-restarts=1", "--rdzv-backend=c10d",
                                  f"--rdzv-endpoint=127.0.0.1:{free_port()}"],
                   # With the agent's shared store, a restarted gloo group on this torch now
                   # and then connects to a dead peer's stale address; a store per attempt
                   # (hosted by rank 0) does not.
                   env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert "simulated failure at step 14" in out
    assert "resumed from" in out and "at epoch 1 (restart 1)" in out
    # Both lives probed first; the 3x faster rank got the larger share from the start (on
    # CPU the memory caps stay at the global batch).
    probes = [line for line in out.splitlines() if "probe: initial weights" in line]
    assert len(probes) == 2 and all("caps [64, 64]" in line for line in probes), out
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    # 8 steps an epoch. Epoch 0 completed before the crash at step 14 (epoch 1, step 6);
    # after the restart epoch 1 resumed mid-way, from the checkpoint of step 12 (its step 4),
    # so it trained its last 4 steps, and epoch 2 ran whole.
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert [e["steps"] for e in epochs] == [8, 4, 8]
    runs = [json.loads(line) for line in journal.read_text().splitlines()]
    generations = [r["generation"] for r in runs if r["event"] == "run"]
    assert generations == [0, 1]
    # Plans of the second life belong to generation 1: nothing of the first can change them.
    late = [r for r in runs if r["event"] == "plan" and r["epoch"] <= 2][-1]
    assert late["generation"] == 1 and late["epoch"] == 2
    assert all(e["plan"][1] > e["plan"][0] for e in epochs), epochs
