"""Heterogeneity emulation: make a CPU rank behave like a slower or faster GPU.

The one place where shardbalance fakes speed. A rank of relative ``speed`` s sleeps
``overhead_s + batch_size * per_sample_s / s`` inside its forward pass, the shape of a real GPU's
step time (a fixed cost plus a per-sample cost). Sleeping releases the CPU, so several emulated
ranks share a small machine without disturbing each other, and the emulated delays should be
much larger than the real compute they sit beside.
"""

from __future__ import annotations

import time

import torch

__all__ = ["emulate_speed", "EmulatedSpeed", "parse_speeds"]


def emulate_speed(batch_size: int, speed: float, per_sample_s: float, overhead_s: float = 0.0) -> float:
    """Sleep as a rank of relative ``speed`` would take for ``batch_size`` samples; return seconds."""
    if speed <= 0:
        raise ValueError(f"Invalid speed {speed!r}, it should be > 0")
    seconds = overhead_s + batch_size * per_sample_s / speed
    time.sleep(seconds)
    return seconds


class EmulatedSpeed(torch.nn.Module):
    """An identity layer that sleeps like a rank of relative ``speed`` (see module docstring).

    Put it first in a model; change ``speed`` at any time to emulate throttling or a neighbour.
    """

    #: Its sleep is this rank's compute: timed by compute-only busy time (``_compute.py``).
    shardbalance_compute = True

    def __init__(self, speed: float, per_sample_s: float = 0.002, overhead_s: float = 0.005) -> None:
        super().__init__()
        if speed <= 0:
            raise ValueError(f"Invalid speed {speed!r}, it should be > 0")
        self.speed = float(speed)
        self.per_sample_s = per_sample_s
        self.overhead_s = overhead_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emulate_speed(x.shape[0], self.speed, self.per_sample_s, self.overhead_s)
        return x

    def extra_repr(self) -> str:
        return f"speed={self.speed:g}, per_sample_s={self.per_sample_s:g}, overhead_s={self.overhead_s:g}"


def parse_speeds(text: str, world_size: int) -> list[float]:
    """``"1,2,4"`` -> [1.0, 2.0, 4.0], checked against the world size."""
    try:
        speeds = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"Invalid speeds {text!r}: expected comma-separated numbers") from None
    if len(speeds) != world_size or any(s <= 0 for s in speeds):
        raise ValueError(f"Invalid speeds {text!r}: expected {world_size} numbers > 0, one per rank")
    return speeds
