"""Read a coordinator journal back: a text summary per run, and an optional plot of the plans.

    shardbalance report coordinator.jsonl [--run RUN] [--plot plans.png]
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

__all__ = ["read_journal", "summarize", "plot"]


def read_journal(path: str) -> list[dict[str, Any]]:
    """The journal's records; a torn last line (a crash mid-write) is skipped."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _by_run(records, run: str | None) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list] = defaultdict(list)
    for rec in records:
        if rec.get("event") in ("run", "plan") and (run is None or rec.get("run") == run):
            runs[rec["run"]].append(rec)
    return runs


def summarize(path: str, run: str | None = None) -> str:
    """One block per run: its configuration and a table of its plan decisions."""
    records = read_journal(path)
    lines = []
    for run_id, recs in _by_run(records, run).items():
        for rec in recs:
            if rec["event"] == "run":
                cfg = rec["config"]
                lines.append(f"run {run_id} generation {rec['generation']}: "
                             f"{cfg['world_size']} ranks, global batch {cfg['global_batch_size']}, "
                             f"policy {cfg['policy']}")
                lines.append(f"{'epoch':>5} {'step':>6}  {'plan':<28} {'imbalance':>9} "
                             f"{'predicted ms':>12} {'vs equal':>8}  reason")
            else:
                pred = rec.get("predicted_step_ms")
                speedup = rec.get("speedup_vs_equal")
                imbalance = rec.get("imbalance")
                lines.append(
                    f"{rec['epoch']:>5} {rec['window']:>6}  {str(rec['batch_sizes']):<28} "
                    f"{'' if imbalance is None else f'{imbalance:.2f}':>9} "
                    f"{'' if pred is None else f'{pred:.1f}':>12} "
                    f"{'' if speedup is None else f'{speedup:.2f}x':>8}  {rec['reason']}")
        lines.append("")
    from ._leases import summarize_pull

    lines.extend(summarize_pull(records, run))  # pull-mode runs (DynamicShardSampler)
    rejected = sum(r.get("count", 0) for r in records if r.get("event") == "rejected")
    if rejected:
        lines.append(f"{rejected} message(s) rejected (see 'rejected' records)")
    return "\n".join(lines) if lines else f"no plan decisions in {path}"


def plot(path: str, out: str, run: str | None = None) -> None:
    """Each rank's batch size per decision, one figure per journal (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'shardbalance[plot]'") from exc
    fig, ax = plt.subplots(figsize=(8, 4))
    for run_id, recs in _by_run(read_journal(path), run).items():
        plans = [r for r in recs if r["event"] == "plan"]
        if not plans:
            continue
        for rank in range(len(plans[0]["batch_sizes"])):
            ax.step(range(len(plans)), [p["batch_sizes"][rank] for p in plans], where="post",
                    label=f"{run_id} rank {rank}")
    ax.set_xlabel("decision")
    ax.set_ylabel("batch size")
    ax.set_title("shardbalance plans")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
