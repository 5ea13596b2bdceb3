"""The report: a journal from a real coordinator (ZeroMQ on loopback, ranks as in-process
clients) read back as a table, a summary, a figure and a followed journal; sampler.metrics()
on real gloo ranks."""

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from distributed import ROOT, read_line, run_ranks, stop_process
from shardbalance import protocol
from shardbalance._exceptions import ProtocolError
from shardbalance.client import CoordinatorClient
from distributed import ThreadedCoordinator
from shardbalance.report import figure, read_journal, summarize

SECRET = b"report-test-secret-0123456789abcdef"
WORLD, BATCH, STEPS, WINDOW = 3, 96, 24, 6
ALPHA_MS, PER_SAMPLE_MS = 2.0, (4.0, 2.0, 1.0)
#: Rank 2 runs this much slower from this window on.
SLOW_FROM, SLOWDOWN = (1, 6), 3.0
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def busy_s(rank, b, epoch, step):
    slow = SLOWDOWN if rank == 2 and (epoch, step) >= SLOW_FROM else 1.0
    jitter = 1 + 0.01 * ((7 * step + 3 * rank) % 5 - 2)  # deterministic noise of +-2 %
    return (ALPHA_MS + b * PER_SAMPLE_MS[rank] * slow) * jitter / 1e3


def plan_fields(rank, epoch, window, world=WORLD, run="run-report"):
    return dict(run=run, generation=0, rank=rank, world_size=world, epoch=epoch,
                window=window, global_batch_size=BATCH, policy="affine",
                min_sizes=[1] * world, max_sizes=[BATCH] * world, quantum=1,
                initial_weights=None, options={})


class Served(ThreadedCoordinator):
    def __init__(self, journal):
        super().__init__(journal, SECRET)


def send_stats(client, rank, records, world=WORLD, run="run-report"):
    reply = client.request({"type": "stats", "run": run, "generation": 0, "rank": rank,
                            "world_size": world, "records": records})
    assert reply["accepted"] == len(records)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """Two epochs of four 6-step windows on three ranks; every rank asks for every plan and
    sends the busy times of the steps it trained (the first step of the run discarded, as a
    rank does). Returns the journal, what each rank sent, and what each rank was told."""
    journal = str(tmp_path_factory.mktemp("report") / "journal.jsonl")
    served = Served(journal)
    clients = [CoordinatorClient(served.coordinator.endpoint, SECRET, timeout_s=5)
               for _ in range(WORLD)]
    sent, plans, told = {}, {}, {}
    try:
        for epoch in range(2):
            for window in range(0, STEPS, WINDOW):
                key = (epoch, window)
                got = [c.plan(**plan_fields(r, epoch, window)) for r, c in enumerate(clients)]
                plans[key] = got[0]
                told[key] = [c.reported.get(p.digest) for c, p in zip(clients, got)]
                sent[key] = []
                for rank, client in enumerate(clients):
                    b = got[rank].batch_sizes[rank]
                    records = [[epoch, s, b, busy_s(rank, b, epoch, s)]
                               for s in range(window, window + WINDOW) if (epoch, s) != (0, 0)]
                    send_stats(client, rank, records)
                    sent[key].append(records)
    finally:
        for c in clients:
            c.close()
        served.stop()  # journals the last window
    return {"journal": journal, "sent": sent, "plans": plans, "told": told}


def window_records(journal):
    """The last ``window`` record of each window (a later one supersedes an earlier one)."""
    out = {}
    for rec in read_journal(journal):
        if rec.get("event") == "window":
            out[(rec["epoch"], rec["window"])] = rec
    return out


def test_window_aggregates_are_what_the_ranks_sent(short_run):
    windows = window_records(short_run["journal"])
    assert sorted(windows) == sorted(short_run["sent"])
    for key, per_rank in short_run["sent"].items():
        rec = windows[key]
        assert rec["steps"] == [len(r) for r in per_rank]
        assert rec["samples"] == [sum(x[2] for x in r) for r in per_rank]
        assert rec["busy_ms"] == [round(statistics.median(x[3] for x in r) * 1e3, 3)
                                  for r in per_rank]
        assert rec["last_step"] == key[1] + WINDOW - 1


def test_every_rank_is_told_the_same_stats_with_the_plan(short_run):
    history = [[] for _ in range(WORLD)]
    for key in sorted(short_run["sent"]):
        told = short_run["told"][key]
        assert all(t == told[0] for t in told)
        stats = told[0]
        if key == (0, 0):
            assert stats.busy_ms == (None,) * WORLD  # nothing measured before the first plan
            assert stats.busy_batch_sizes == (None,) * WORLD
        else:
            # Each rank's median of its newest 32 busy times, at the batch of its newest step.
            assert stats.busy_ms == tuple(round(statistics.median(x[3] for x in h[-32:]) * 1e3, 2)
                                          for h in history)
            assert stats.busy_batch_sizes == tuple(h[-1][2] for h in history)
        for rank, records in enumerate(short_run["sent"][key]):
            history[rank] += records


def test_report_table_has_the_measured_columns_and_values(short_run):
    text = summarize(short_run["journal"])
    lines = text.splitlines()
    assert lines[0] == f"run run-report generation 0: {WORLD} ranks, global batch {BATCH}, " \
                       "policy affine"
    header = lines[1].split()
    assert header[:4] == ["gen", "epoch", "step", "global"]
    for column in ("plan", "busy", "samples/s", "imbalance", "pred", "meas", "equal", "reason"):
        assert column in header
    rows = lines[2:2 + len(short_run["sent"])]
    windows = window_records(short_run["journal"])
    for row, key in zip(rows, sorted(short_run["sent"])):
        plan, rec = short_run["plans"][key], windows[key]
        assert row.split()[:4] == ["0", str(key[0]), str(key[1]), str(key[0] * STEPS + key[1])]
        assert str(list(plan.batch_sizes)) in row
        # busy ms/step and samples/s per rank, as the ranks measured them in this window.
        assert "[" + ", ".join(f"{b:.1f}" for b in rec["busy_ms"]) + "]" in row
        rates = [s / n / b * 1e3 for s, n, b in zip(rec["samples"], rec["steps"], rec["busy_ms"])]
        assert "[" + ", ".join(f"{r:.0f}" for r in rates) + "]" in row
        imbalance = max(rec["busy_ms"]) / statistics.mean(rec["busy_ms"])
        assert f"  {imbalance:.2f}  " in row
        assert f"  {max(rec['busy_ms']):.1f}  " in row  # the step time: the slowest rank's


def test_report_summary_compares_with_the_equal_split_and_finds_the_slowdown(short_run):
    text = summarize(short_run["journal"])
    assert "measured step time:" in text
    equal = [r for r in read_journal(short_run["journal"])
             if r.get("event") == "plan" and r.get("equal_step_ms")][-1]["equal_step_ms"]
    assert f"equal split, predicted: {equal:.1f} ms (the fitted model at the last decision" in text
    # The first window trained the equal split, and the report says it is not a fair baseline.
    assert "equal split, measured:" in text and "includes warm-up" in text
    assert "imbalance by window" in text
    changes = [line for line in text.splitlines() if "speed changes:" in line]
    assert len(changes) == 1
    assert "rank 2 " in changes[0] and "slower than fitted, from generation 0 epoch 1 step 6 " \
                                       "(global step 30)" in changes[0]
    assert "rank 0" not in changes[0] and "rank 1" not in changes[0]


def test_the_figure_has_three_panels_against_global_step(short_run):
    fig = figure(read_journal(short_run["journal"]))
    try:
        axes = fig.get_axes()
        assert len(axes) == 3
        assert axes[2].get_xlabel() == "global step"
        assert [ax.get_ylabel() for ax in axes] == ["batch size (samples)", "busy ms / step",
                                                    "step time (ms)"]
        # One line per rank in the first two panels; the equal split's prediction in the third.
        for ax in axes[:2]:
            assert [ln.get_label() for ln in ax.lines if ln.get_label().startswith("rank")] \
                == [f"rank {r}" for r in range(WORLD)]
        assert "equal split's predicted" in [ln.get_label() for ln in axes[2].lines]
        # The busy panel ends at the last window's per-rank medians.
        last = window_records(short_run["journal"])[(1, STEPS - WINDOW)]["busy_ms"]
        assert [ax_line.get_ydata()[-1] for ax_line in axes[1].lines[:WORLD]] == last
        # Epoch boundaries are marked at global steps 0 and 24 on every panel.
        for ax in axes:
            vertical = {ln.get_xdata()[0] for ln in ax.lines if len(set(ln.get_xdata())) == 1}
            assert {0, STEPS} <= vertical
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_cli_writes_the_plot_as_a_png_image(short_run, tmp_path):
    import matplotlib.image

    out = tmp_path / "run.png"
    proc = subprocess.run([sys.executable, "-m", "shardbalance", "report", short_run["journal"],
                           "--plot", str(out)], capture_output=True, text=True, timeout=120,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"plot written to {out}" in proc.stdout
    image = matplotlib.image.imread(str(out))
    assert image.shape[:2] == (600, 640)  # 8 x 7.5 inches at 80 dpi
    assert image.std() > 0.05  # drawn on, not a blank canvas
    assert out.stat().st_size < 200_000


def test_many_ranks_are_drawn_as_quantile_bands(tmp_path):
    world, journal = 64, str(tmp_path / "wide.jsonl")
    served = Served(journal)
    client = CoordinatorClient(served.coordinator.endpoint, SECRET, timeout_s=5)
    try:
        for window in range(0, 12, 4):
            plan = client.plan(**plan_fields(0, 0, window, world=world, run="wide"))
            for rank in range(world):
                b = plan.batch_sizes[rank]
                send_stats(client, rank, [[0, s, b, (1 + b * (1 + rank % 4)) / 1e3]
                                          for s in range(window + 1, window + 4)],
                           world=world, run="wide")
    finally:
        client.close()
        served.stop()
    records = read_journal(journal)
    fig = figure(records)
    try:
        for ax in fig.get_axes()[:2]:
            labels = [ln.get_label() for ln in ax.lines]
            assert not any(label.startswith("rank") for label in labels)
            assert f"median of {world} ranks" in labels
            assert len(ax.collections) == 2  # min-max and 10-90 % bands
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    table = summarize(journal).splitlines()
    assert table[0].startswith(f"run wide generation 0: {world} ranks")
    assert all("min " in row and " med " in row for row in table[2:5])


def test_missing_matplotlib_is_a_one_line_error_naming_the_extra(short_run, tmp_path):
    out = tmp_path / "never.png"
    code = ("import sys; sys.modules['matplotlib'] = None; from shardbalance.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "report", short_run["journal"],
                           "--plot", str(out)], capture_output=True, text=True, timeout=60,
                          env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "matplotlib" in proc.stderr and "pip install 'shardbalance[plot]'" in proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_follow_prints_a_record_appended_after_it_started(short_run, tmp_path):
    journal, png = tmp_path / "followed.jsonl", tmp_path / "followed.png"
    lines = open(short_run["journal"], encoding="utf-8").read().splitlines(keepends=True)
    journal.write_text("".join(lines))
    proc = subprocess.Popen([sys.executable, "-m", "shardbalance", "report", str(journal),
                             "--follow", "--interval", "0.1", "--plot", str(png)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        assert "following" in read_line(proc, 60)
        wait_for(proc, "plot written to")
        assert png.exists()
        drawn = png.stat().st_mtime_ns
        last = [json.loads(line) for line in lines if '"event": "plan"' in line][-1]
        appended = {**last, "window": STEPS + WINDOW, "reason": "appended while following"}
        with open(journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(appended) + "\n")
        wait_for(proc, "appended while following")
        wait_for(proc, "plot written to")
        assert png.stat().st_mtime_ns >= drawn
    finally:
        assert stop_process(proc) == 0  # SIGTERM ends the follow loop cleanly
        proc.stdout.close()


def wait_for(proc, text, timeout_s=30.0):
    """Read ``proc``'s lines until one contains ``text``, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = read_line(proc, max(0.1, deadline - time.monotonic()))
        if text in line:
            return line
        seen.append(line)
    raise AssertionError(f"{text!r} not printed within {timeout_s:g} s; saw {seen[-20:]}")


def test_cli_refuses_bad_report_arguments(short_run, tmp_path):
    missing = subprocess.run([sys.executable, "-m", "shardbalance", "report",
                              str(tmp_path / "nope.jsonl")], capture_output=True, text=True,
                             timeout=60, env=ENV)
    assert missing.returncode == 2 and "no journal at" in missing.stderr
    interval = subprocess.run([sys.executable, "-m", "shardbalance", "report",
                               short_run["journal"], "--follow", "--interval", "0"],
                              capture_output=True, text=True, timeout=60, env=ENV)
    assert interval.returncode == 2 and "Invalid --interval 0.0" in interval.stderr


def test_plan_stats_are_validated():
    good = {"busy_ms": [10.0, None], "busy_batch_sizes": [3, None], "imbalance": 1.2,
            "equal_step_ms": 12.5}
    stats = protocol.PlanStats.from_dict(good, 2)
    assert stats.busy_ms == (10.0, None) and stats.busy_batch_sizes == (3, None)
    assert protocol.PlanStats.from_dict(stats.to_dict(), 2) == stats
    for bad, field in (({**good, "busy_ms": [10.0]}, "busy_ms"),
                       ({**good, "busy_ms": [-1.0, 2.0]}, "busy_ms"),
                       ({**good, "busy_batch_sizes": [0, 1]}, "busy_batch_sizes"),
                       ({**good, "imbalance": "high"}, "imbalance"),
                       ({**good, "equal_step_ms": float("inf")}, "equal_step_ms")):
        with pytest.raises(ProtocolError, match=field):
            protocol.PlanStats.from_dict(bad, 2)


def test_a_reply_encoded_once_is_the_message_encode_makes():
    fields = {"plan": {"batch_sizes": [1, 2]}, "stats": {"busy_ms": [1.5, None]}}
    once = protocol.encode_fields(fields)
    for msg_id in (1, 2**40):
        assert protocol.encode_reply("plan", msg_id, once, SECRET) == \
            protocol.encode({"type": "plan", "id": msg_id, **fields}, SECRET)
    assert protocol.encode_reply("pong", 3, protocol.encode_fields({}), None) == \
        protocol.encode({"type": "pong", "id": 3}, None)


def test_metrics_of_a_local_policy_are_the_plan():
    from torch.utils.data import TensorDataset
    import torch

    from shardbalance import WeightedDistributedSampler

    sampler = WeightedDistributedSampler(TensorDataset(torch.zeros(40)), 10, policy="static",
                                         initial_weights=[1, 4], num_replicas=2, rank=1)
    metrics = sampler.metrics()
    assert metrics == {"generation": 0, "epoch": 0, "window": 0, "global_batch_size": 10,
                       "batch_size/rank0": 2, "batch_size/rank1": 8}
    metrics["epoch"] = 99  # the caller's copy
    assert sampler.metrics()["epoch"] == 0


def _metrics_on_ranks(rank, world, journal):
    from torch.utils.data import TensorDataset
    import torch

    from shardbalance import WeightedDistributedSampler

    sampler = WeightedDistributedSampler(TensorDataset(torch.zeros(192)), 16, policy="affine",
                                         rebalance_every=4, coordinator_log=journal,
                                         timeout_s=20)
    # Iterated directly (no prefetch) with report_busy() from the first step: each window's
    # plan agreed at its boundary, decided from every step before it.
    sampler.plan_in_background = False
    sent = []
    sampler.set_epoch(0)
    for step, _batch in enumerate(sampler):
        b = sampler.ledger.last_yielded.batch_size
        busy = (1.0 + b * (4.0 if rank == 0 else 1.0)) / 1e3
        sampler.report_busy(busy)
        sent.append((step, b, busy))
        if step == 9:
            break  # in the third window (steps 8-11): its plan was decided from steps 0-7
    metrics = sampler.metrics()
    sampler.close()
    return metrics, sent


def test_metrics_are_the_same_on_every_rank_and_carry_what_the_ranks_sent(tmp_path):
    (m0, sent0), (m1, sent1) = run_ranks(_metrics_on_ranks, 2, str(tmp_path / "c.jsonl"),
                                         timeout_s=120)
    assert m0 == m1
    assert (m0["epoch"], m0["window"]) == (0, 8)
    assert m0["batch_size/rank0"] + m0["batch_size/rank1"] == 16
    for rank, sent in enumerate((sent0, sent1)):
        before = [busy for step, _b, busy in sent if step < 8]
        assert m0[f"busy_ms/rank{rank}"] == round(statistics.median(before) * 1e3, 2)
        assert m0[f"busy_batch_size/rank{rank}"] == sent[7][1]
        assert m0[f"samples_per_s/rank{rank}"] == pytest.approx(
            sent[7][1] / m0[f"busy_ms/rank{rank}"] * 1e3, abs=0.01)
    assert m0["imbalance"] > 1.0
    assert m0["predicted_step_ms"] > 0 and m0["equal_step_ms"] > m0["predicted_step_ms"]
    assert m0["speedup_vs_equal"] == pytest.approx(m0["equal_step_ms"] / m0["predicted_step_ms"],
                                                   rel=1e-3)
