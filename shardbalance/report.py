"""Read a coordinator journal back: a table of decisions with what each window measured, a
summary per run, a three-panel figure, and a view that follows a journal being written.

    shardbalance report coordinator.jsonl [--run RUN] [--plot out.png] [--follow]

The journal's records are described in :mod:`shardbalance.coordinator`. Figures per window
come from its ``window`` records (per rank: steps, samples, median busy ms); the plans and the
fitted model's predictions from its ``plan`` records. Global steps number the steps of a run
across epochs (an epoch's length is the last step any window of it measured, plus one).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from ._exceptions import ConfigError, ShardBalanceError
from ._leases import summarize_pull

__all__ = ["read_journal", "JournalReader", "RunView", "runs", "summarize", "summarize_records",
           "summarize_pull", "figure", "plot", "follow", "MissingDependency"]

#: Up to this many ranks the table lists each rank and the figure draws a line per rank;
#: beyond it the table gives min / median / max and the figure quantile bands.
PER_RANK_UP_TO = 8
#: A rank whose measured busy time is this far (as a ratio) off the fitted model's prediction
#: for its batch size in a window has changed speed.
SPEED_CHANGE_RATIO = 1.25
#: Windows whose slowest-rank busy time makes the run's measured step time (a median).
STEADY_WINDOWS = 3


class MissingDependency(ShardBalanceError, ImportError):
    """An optional dependency (an extra) is not installed."""


def read_journal(path: str) -> list[dict[str, Any]]:
    """The journal's records; a torn last line (a crash mid-write) is skipped."""
    reader = JournalReader(path)
    reader.poll()
    return reader.records


class JournalReader:
    """Reads a journal incrementally: each :meth:`poll` adds the complete lines written since.

    A line without its newline yet (the writer is mid-line) waits for the next poll; a line
    that is not a JSON object is skipped. A journal that shrank or was replaced (another
    inode: the coordinator compacted it) is read afresh.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def poll(self) -> bool:
        """Read what was appended; True if any record was added."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        size = stat.st_size
        if size < self._offset or (self._inode is not None and stat.st_ino != self._inode):
            self.records, self._offset, self._partial = [], 0, b""
        self._inode = stat.st_ino
        if size == self._offset:
            return False
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = self._partial + fh.read(size - self._offset)
        self._offset = size
        lines = data.split(b"\n")
        self._partial = lines.pop()
        added = 0
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                self.records.append(rec)
                added += 1
        return added > 0


# -- the model of a run --------------------------------------------------------------------

@dataclass
class RunView:
    """One run's decisions and window measurements, keyed by ``(generation, epoch, window)``."""

    run: str
    configs: dict[int, dict] = field(default_factory=dict)
    plans: dict[tuple[int, int, int], dict] = field(default_factory=dict)
    windows: dict[tuple[int, int, int], dict] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        if self.configs:
            return int(next(iter(self.configs.values()))["world_size"])
        if self.plans:
            return len(next(iter(self.plans.values()))["batch_sizes"])
        return len(next(iter(self.windows.values()))["steps"])

    def keys(self) -> list[tuple[int, int, int]]:
        """Every window, in training order."""
        return sorted(set(self.plans) | set(self.windows))

    def epoch_starts(self) -> dict[tuple[int, int], int]:
        """The global step each ``(generation, epoch)`` starts at."""
        length: dict[tuple[int, int], int] = {}
        for g, e, w in self.keys():
            last = self.windows.get((g, e, w), {}).get("last_step", -1)
            length[(g, e)] = max(length.get((g, e), 0), w + 1, last + 1)
        starts, at = {}, 0
        for key in sorted(length):
            starts[key] = at
            at += length[key]
        return starts

    def spans(self) -> list[tuple[tuple[int, int, int], int, int]]:
        """Each window with its first global step and the global step after its last."""
        starts = self.epoch_starts()
        keys = self.keys()
        out = []
        for i, (g, e, w) in enumerate(keys):
            begin = starts[(g, e)] + w
            if i + 1 < len(keys) and keys[i + 1][:2] == (g, e):
                end = starts[(g, e)] + keys[i + 1][2]
            else:
                last = self.windows.get((g, e, w), {}).get("last_step", w)
                end = starts[(g, e)] + max(last, w) + 1
            out.append(((g, e, w), begin, max(end, begin + 1)))
        return out


def runs(records: Iterable[dict[str, Any]], run: str | None = None) -> dict[str, RunView]:
    """The runs in ``records`` (only ``run`` if given), in the order they first appear."""
    views: dict[str, RunView] = {}
    for rec in records:
        rid = rec.get("run")
        if rec.get("event") not in ("run", "plan", "window") or not isinstance(rid, str) or \
                (run is not None and rid != run):
            continue
        view = views.setdefault(rid, RunView(rid))
        try:
            if rec["event"] == "run":
                view.configs[int(rec["generation"])] = rec["config"]
            else:
                key = (int(rec["generation"]), int(rec["epoch"]), int(rec["window"]))
                (view.plans if rec["event"] == "plan" else view.windows)[key] = rec
        except (KeyError, TypeError, ValueError):
            continue  # a foreign or damaged record
    return views


# -- figures per window ----------------------------------------------------------------------

def _heard(values) -> list[float]:
    return [float(v) for v in values or () if v is not None]


def _step_ms(window: dict | None) -> float | None:
    """The slowest rank's median busy ms in a window (None unless every rank was heard)."""
    busy = (window or {}).get("busy_ms") or []
    heard = _heard(busy)
    return max(heard) if busy and len(heard) == len(busy) else None


def _imbalance(window: dict | None) -> float | None:
    busy = (window or {}).get("busy_ms") or []
    heard = _heard(busy)
    if not busy or len(heard) != len(busy) or sum(heard) <= 0:
        return None
    return max(heard) / (sum(heard) / len(heard))


def _samples_per_s(window: dict) -> list[float | None]:
    out = []
    for steps, samples, busy in zip(window["steps"], window["samples"], window["busy_ms"]):
        out.append(samples / steps / busy * 1e3 if steps and busy else None)
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ranks(values, digits: int = 1) -> str:
    """Per-rank figures: a list up to PER_RANK_UP_TO ranks, else min / median / max."""
    if not values:
        return "-"
    fmt = (lambda v: "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float)
                                            else str(v)))
    if len(values) <= PER_RANK_UP_TO:
        return "[" + ", ".join(fmt(v) for v in values) + "]"
    heard = _heard(values)
    if not heard:
        return "-"
    kind = float if any(isinstance(v, float) for v in values) else int
    return "min {} med {} max {}".format(*(fmt(kind(v)) for v in
                                           (min(heard), _median(heard), max(heard))))


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.rjust(widths[c]) if c in right else cell.ljust(widths[c])
                      for c, cell in enumerate(row)).rstrip() for row in rows]


def _speed_changes(view: RunView, spans) -> list[str]:
    """Ranks whose measured busy time left the fitted model's prediction, and where."""
    found, flagged = [], set()
    for (key, begin, _end) in spans:
        plan, window = view.plans.get(key), view.windows.get(key)
        if not plan or not window or not plan.get("alpha_ms") or not plan.get("beta_ms"):
            continue
        for rank, (alpha, beta, steps, samples, busy) in enumerate(zip(
                plan["alpha_ms"], plan["beta_ms"], window["steps"], window["samples"],
                window["busy_ms"])):
            if not steps or busy is None:
                continue
            predicted = alpha + beta * samples / steps
            ratio = busy / predicted if predicted > 0 else math.nan
            changed = ratio > SPEED_CHANGE_RATIO or ratio < 1 / SPEED_CHANGE_RATIO
            if changed and rank not in flagged:
                how = f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"
                found.append(f"rank {rank} {how} than fitted, from generation {key[0]} epoch "
                             f"{key[1]} step {key[2]} (global step {begin})")
            flagged = flagged | {rank} if changed else flagged - {rank}
    return found


def _run_lines(view: RunView) -> list[str]:
    lines = []
    for generation, cfg in sorted(view.configs.items()):
        lines.append(f"run {view.run} generation {generation}: {cfg['world_size']} ranks, "
                     f"global batch {cfg['global_batch_size']}, policy {cfg['policy']}")
    spans = view.spans()
    header = ["gen", "epoch", "step", "global", "plan", "busy ms/step", "samples/s",
              "imbalance", "pred ms", "meas ms", "vs equal", "reason"]
    rows = [header]
    for key, begin, _end in spans:
        plan, window = view.plans.get(key, {}), view.windows.get(key)
        imbalance, step_ms = _imbalance(window), _step_ms(window)
        pred, speedup = plan.get("predicted_step_ms"), plan.get("speedup_vs_equal")
        rows.append([
            str(key[0]), str(key[1]), str(key[2]), str(begin),
            _ranks(plan.get("batch_sizes")),
            _ranks(window["busy_ms"]) if window else "-",
            _ranks(_samples_per_s(window), 0) if window else "-",
            "-" if imbalance is None else f"{imbalance:.2f}",
            "-" if pred is None else f"{pred:.1f}",
            "-" if step_ms is None else f"{step_ms:.1f}",
            "-" if speedup is None else f"{speedup:.2f}x",
            plan.get("reason", "(no decision record)")])
    lines += _table(rows, right={0, 1, 2, 3, 7, 8, 9, 10})
    lines.append("  busy ms/step, samples/s, imbalance, meas ms: measured while the window "
                 "trained (per rank: median busy time; meas ms: the slowest rank's)")
    lines += ["  " + line for line in _run_summary(view, spans)]
    return lines


def _run_summary(view: RunView, spans) -> list[str]:
    out = []
    measured = [(key, _step_ms(view.windows.get(key))) for key, _b, _e in spans]
    measured = [(key, ms) for key, ms in measured if ms is not None]
    if not measured:
        return ["no window measurements yet"]
    tail = [ms for _key, ms in measured[-STEADY_WINDOWS:]]
    step_ms = _median(tail)
    out.append(f"measured step time: {step_ms:.1f} ms (slowest rank's median busy ms/step, "
               f"median of the last {len(tail)} window(s))")
    modelled = [p for k, p in sorted(view.plans.items()) if p.get("equal_step_ms")]
    if modelled:
        last = modelled[-1]
        equal = last["equal_step_ms"]
        out.append(f"equal split, predicted: {equal:.1f} ms (the fitted model at the last "
                   f"decision, epoch {last['epoch']} step {last['window']}): "
                   f"{equal / step_ms:.2f}x the measured step time")
    equal_windows = [(key, ms) for key, ms in measured
                     if _is_equal(view.plans.get(key, {}).get("batch_sizes"))]
    if equal_windows:
        key, ms = equal_windows[-1]
        steps = max(view.windows[key]["steps"])
        warm = (" (the run's first window: includes warm-up, not a fair baseline)"
                if key == measured[0][0] else "")
        out.append(f"equal split, measured: {ms:.1f} ms in window generation {key[0]} epoch "
                   f"{key[1]} step {key[2]}, {steps} steps{warm}")
    trend = [i for i in (_imbalance(view.windows.get(k)) for k, _b, _e in spans) if i]
    if trend:
        shown = trend if len(trend) <= 8 else \
            [trend[round(i * (len(trend) - 1) / 7)] for i in range(8)]
        out.append("imbalance by window (slowest busy over the mean, first to last): "
                   + " ".join(f"{i:.2f}" for i in shown))
    changes = _speed_changes(view, spans)
    out.append("speed changes: " + ("; ".join(changes) if changes else "none detected"))
    return out


def _is_equal(sizes) -> bool:
    return bool(sizes) and max(sizes) - min(sizes) <= 1


def summarize_records(records: list[dict[str, Any]], run: str | None = None,
                      source: str = "the journal") -> str:
    """The text report of ``records``: per run, a table of decisions and a summary."""
    lines = []
    for view in runs(records, run).values():
        lines += _run_lines(view)
        lines.append("")
    lines.extend(summarize_pull(records, run))  # pull-mode runs (DynamicShardSampler)
    rejected = sum(r.get("count", 0) for r in records if r.get("event") == "rejected")
    if rejected:
        lines.append(f"{rejected} message(s) rejected (see 'rejected' records)")
    return "\n".join(lines).rstrip() if lines else f"no plan decisions in {source}"


def summarize(path: str, run: str | None = None) -> str:
    """The text report of the journal at ``path`` (only run ``run`` if given)."""
    return summarize_records(read_journal(path), run, source=path)


# -- the figure ----------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("plotting needs matplotlib, which is not installed: "
                                "pip install 'shardbalance[plot]'") from None
    return plt


def _per_rank(ax, xs, table, color_of) -> None:
    """One step line per rank, or quantile bands when there are many ranks."""
    import warnings

    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in table], float)
    if values.shape[1] <= PER_RANK_UP_TO:
        for rank in range(values.shape[1]):
            ax.step(xs, values[:, rank], where="post", color=color_of(rank),
                    label=f"rank {rank}")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a window no rank was heard in
        q = np.nanquantile(values, [0.0, 0.1, 0.5, 0.9, 1.0], axis=1)
    ax.fill_between(xs, q[0], q[4], step="post", alpha=0.15, color="C0", label="min-max")
    ax.fill_between(xs, q[1], q[3], step="post", alpha=0.35, color="C0", label="10-90 %")
    ax.step(xs, q[2], where="post", color="C0", label=f"median of {values.shape[1]} ranks")


def figure(records: list[dict[str, Any]], run: str | None = None):
    """The run's figure (the last run in ``records`` unless ``run``): x = global step, epoch
    boundaries dotted; batch size per rank; busy ms/step per rank; the step time against the
    equal split's predicted one. Returns the matplotlib Figure."""
    plt = _pyplot()
    views = runs(records, run)
    if not views:
        raise ConfigError(f"no plan decisions to plot{'' if run is None else f' for run {run}'}")
    view = list(views.values())[-1]
    spans = view.spans()
    fig, (ax_b, ax_t, ax_s) = plt.subplots(3, 1, sharex=True, figsize=(8, 7.5))
    keys = [key for key, _b, _e in spans]
    xs = [b for _k, b, _e in spans] + [spans[-1][2]]
    colors = plt.get_cmap("tab10")

    def extend(rows):  # a step plot's last value, repeated at the end of the last window
        return rows + rows[-1:]

    sizes, last = [], None
    for key in keys:
        last = view.plans.get(key, {}).get("batch_sizes", last)
        sizes.append(last or [math.nan] * view.world_size)
    _per_rank(ax_b, xs, extend(sizes), colors)
    ax_b.set_ylabel("batch size (samples)")
    busy = [view.windows.get(k, {}).get("busy_ms") or [None] * view.world_size for k in keys]
    _per_rank(ax_t, xs, extend(busy), colors)
    ax_t.set_ylabel("busy ms / step")
    step = [_step_ms(view.windows.get(k)) for k in keys]
    equal = [view.plans.get(k, {}).get("equal_step_ms") for k in keys]
    predicted = [view.plans.get(k, {}).get("predicted_step_ms") for k in keys]
    nan = (lambda v: math.nan if v is None else v)
    ax_s.step(xs, [nan(v) for v in extend(step)], where="post", color="black",
              label="measured (slowest rank's busy)")
    ax_s.step(xs, [nan(v) for v in extend(predicted)], where="post", color="C2", ls=":",
              label="plan's predicted")
    ax_s.step(xs, [nan(v) for v in extend(equal)], where="post", color="C3", ls="--",
              label="equal split's predicted")
    ax_s.set_ylabel("step time (ms)")
    ax_s.set_xlabel("global step")
    for g_e, start in view.epoch_starts().items():
        for ax in (ax_b, ax_t, ax_s):
            ax.axvline(start, color="grey", ls=":", lw=0.8)
        ax_b.annotate(f"epoch {g_e[1]}", (start, 1.0), xycoords=("data", "axes fraction"),
                      fontsize=7, color="grey", va="bottom")
    for ax, where in ((ax_b, "upper right"), (ax_t, "lower right"), (ax_s, "lower right")):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc=where, ncol=2)
    cfg = view.configs.get(max(view.configs)) if view.configs else {}
    fig.suptitle(f"shardbalance run {view.run}: {view.world_size} ranks, global batch "
                 f"{cfg.get('global_batch_size', '?')}, policy {cfg.get('policy', '?')}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot(path: str, out: str, run: str | None = None,
         records: list[dict[str, Any]] | None = None) -> None:
    """Write the figure of the journal at ``path`` (or of ``records``) to ``out`` (PNG)."""
    plt = _pyplot()
    fig = figure(read_journal(path) if records is None else records, run)
    fig.savefig(out, dpi=80)
    plt.close(fig)


# -- following a journal being written -----------------------------------------------------

def follow(path: str, run: str | None = None, out_png: str | None = None,
           interval_s: float = 2.0, stream=None, stop: threading.Event | None = None) -> int:
    """Re-read ``path`` every ``interval_s`` and print the report (and rewrite ``out_png``)
    whenever records were added, until SIGINT / SIGTERM or ``stop`` is set."""
    stream = stream or sys.stdout
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    if out_png:
        _pyplot()
    reader = JournalReader(path)
    clear = "\x1b[H\x1b[2J" if getattr(stream, "isatty", lambda: False)() else ""
    print(f"following {path} (every {interval_s:g} s; Ctrl-C to stop)", file=stream, flush=True)
    while not stop.is_set():
        if reader.poll():
            text = summarize_records(reader.records, run, source=path)
            print(f"{clear}--- {path}: {len(reader.records)} records ---\n{text}", file=stream,
                  flush=True)
            if out_png and runs(reader.records, run):
                plot(path, out_png, run, records=reader.records)
                print(f"plot written to {out_png}", file=stream, flush=True)
        stop.wait(interval_s)
    return 0
