"""Heterogeneity emulation: make a CPU rank behave like a slower or faster GPU.

The one place where shardbalance fakes speed. A rank of relative ``speed`` s sleeps

    overhead_s + tiles(max(batch_size, flat_below)) * per_sample_s / s

inside its forward pass, where ``tiles(b)`` rounds b up to a multiple of ``step_multiple``. That
is the shape of a real GPU's step time: a fixed cost plus a per-sample cost (the default), made
richer by two optional features real devices have:

* ``flat_below``: a large GPU that is not yet full is no faster below the batch that fills it,
  so its step time is flat up to ``flat_below`` samples and grows linearly after
  (flat-then-linear).
* ``step_multiple``: compute runs in tiles, so time steps up at multiples of the tile and is
  flat in between (stepped).

Two more make exploring a new batch size cost what it costs on a GPU:

* ``new_shape_s``: a one-off cost (cudnn autotuning, a torch.compile recompile, CUDA-graph
  capture) added to each of the first ``new_shape_steps`` steps at every batch size the rank
  has not run before.
* ``max_batch_size``: a memory cap; a larger batch raises :class:`torch.OutOfMemoryError`
  before sleeping, as a GPU would fail its allocation.

Sleeping releases the CPU, so several emulated ranks share a small machine without disturbing
each other, and the emulated delays should be much larger than the real compute they sit
beside.
"""

from __future__ import annotations

import math
import time

import torch

__all__ = ["emulate_speed", "EmulatedSpeed", "parse_speeds", "curve_seconds"]


def _check_curve(speed, per_sample_s, overhead_s, flat_below, step_multiple) -> None:
    if not speed > 0:
        raise ValueError(f"Invalid speed {speed!r}, it should be > 0")
    if not per_sample_s >= 0 or not overhead_s >= 0:
        raise ValueError(f"Invalid per_sample_s {per_sample_s!r} / overhead_s {overhead_s!r}: "
                         "both should be >= 0")
    if isinstance(flat_below, bool) or not isinstance(flat_below, int) or flat_below < 0:
        raise ValueError(f"Invalid flat_below {flat_below!r}, it should be an integer >= 0")
    if isinstance(step_multiple, bool) or not isinstance(step_multiple, int) or step_multiple < 1:
        raise ValueError(f"Invalid step_multiple {step_multiple!r}, it should be an integer >= 1")


def curve_seconds(batch_size: int, speed: float, per_sample_s: float, overhead_s: float = 0.0,
                  *, flat_below: int = 0, step_multiple: int = 1) -> float:
    """Steady-state busy seconds of a rank for ``batch_size`` samples (see module docstring)."""
    _check_curve(speed, per_sample_s, overhead_s, flat_below, step_multiple)
    tiles = math.ceil(batch_size / step_multiple) * step_multiple
    return overhead_s + max(tiles, flat_below) * per_sample_s / speed


def emulate_speed(batch_size: int, speed: float, per_sample_s: float, overhead_s: float = 0.0,
                  *, flat_below: int = 0, step_multiple: int = 1) -> float:
    """Sleep as a rank of relative ``speed`` would take for ``batch_size`` samples; return seconds."""
    seconds = curve_seconds(batch_size, speed, per_sample_s, overhead_s, flat_below=flat_below,
                            step_multiple=step_multiple)
    time.sleep(seconds)
    return seconds


class EmulatedSpeed(torch.nn.Module):
    """An identity layer that sleeps like a rank of relative ``speed`` (see module docstring).

    Put it first in a model; change ``speed`` at any time to emulate throttling or a neighbour.

    Args:
        speed: relative speed (> 0).
        per_sample_s: busy seconds per sample at speed 1. Default: ``0.002``.
        overhead_s: fixed busy seconds per step. Default: ``0.005``.
        flat_below: step time is flat below this many samples. Default: ``0`` (affine).
        step_multiple: samples per compute tile. Default: ``1`` (no steps).
        new_shape_s: extra seconds of each of the first ``new_shape_steps`` steps at a batch
            size this layer has not run before. Default: ``0``.
        new_shape_steps: see ``new_shape_s``. Default: ``1``.
        max_batch_size: a larger batch raises :class:`torch.OutOfMemoryError`. Default: no cap.
    """

    #: Its sleep is this rank's compute: timed by compute-only busy time (``_compute.py``).
    shardbalance_compute = True

    def __init__(self, speed: float, per_sample_s: float = 0.002, overhead_s: float = 0.005, *,
                 flat_below: int = 0, step_multiple: int = 1, new_shape_s: float = 0.0,
                 new_shape_steps: int = 1, max_batch_size: int | None = None) -> None:
        super().__init__()
        _check_curve(speed, per_sample_s, overhead_s, flat_below, step_multiple)
        if not new_shape_s >= 0:
            raise ValueError(f"Invalid new_shape_s {new_shape_s!r}, it should be >= 0")
        if isinstance(new_shape_steps, bool) or not isinstance(new_shape_steps, int) or \
                new_shape_steps < 0:
            raise ValueError(f"Invalid new_shape_steps {new_shape_steps!r}, it should be an "
                             "integer >= 0")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or
                                           not isinstance(max_batch_size, int) or
                                           max_batch_size < 1):
            raise ValueError(f"Invalid max_batch_size {max_batch_size!r}, it should be an "
                             "integer >= 1 or None")
        self.speed = float(speed)
        self.per_sample_s = per_sample_s
        self.overhead_s = overhead_s
        self.flat_below = flat_below
        self.step_multiple = step_multiple
        self.new_shape_s = new_shape_s
        self.new_shape_steps = new_shape_steps
        self.max_batch_size = max_batch_size
        #: Steps run so far at each batch size (for the one-off cost of a new shape).
        self.steps_at: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = int(x.shape[0])
        if self.max_batch_size is not None and b > self.max_batch_size:
            raise torch.OutOfMemoryError(f"emulated out of memory: batch of {b} samples, the "
                                         f"emulated memory holds {self.max_batch_size}")
        seen = self.steps_at.get(b, 0)
        self.steps_at[b] = seen + 1
        extra = self.new_shape_s if seen < self.new_shape_steps else 0.0
        emulate_speed(b, self.speed, self.per_sample_s, self.overhead_s + extra,
                      flat_below=self.flat_below, step_multiple=self.step_multiple)
        return x

    def extra_repr(self) -> str:
        text = f"speed={self.speed:g}, per_sample_s={self.per_sample_s:g}, " \
               f"overhead_s={self.overhead_s:g}"
        if self.flat_below:
            text += f", flat_below={self.flat_below}"
        if self.step_multiple > 1:
            text += f", step_multiple={self.step_multiple}"
        if self.new_shape_s:
            text += f", new_shape_s={self.new_shape_s:g} x {self.new_shape_steps}"
        if self.max_batch_size is not None:
            text += f", max_batch_size={self.max_batch_size}"
        return text


def parse_speeds(text: str, world_size: int) -> list[float]:
    """``"1,2,4"`` -> [1.0, 2.0, 4.0], checked against the world size."""
    try:
        speeds = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"Invalid speeds {text!r}: expected comma-separated numbers") from None
    if len(speeds) != world_size or any(s <= 0 for s in speeds):
        raise ValueError(f"Invalid speeds {text!r}: expected {world_size} numbers > 0, one per rank")
    return speeds
