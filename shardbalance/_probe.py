"""The probe: time a training step at two batch sizes on every rank before the first epoch.

It gives the first plan's weights (epoch 0 balanced from its first step) and, with
``max_batch_size="auto"``, each rank's memory cap from the peak CUDA memory at the two sizes.
The figures are gathered over the sampler's peers (a model replica's: its slowest member's
times, its tightest member's cap); the weights are computed on the first rank and broadcast, so
every rank holds the same numbers bit for bit.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ._exceptions import ConfigError
from ._peers import PeerGroup
from ._settings import SamplerSettings, check_int
from .plan import memory_cap
from .policies import fit_cost_model

__all__ = ["probe_settings", "probe_sizes"]


def probe_sizes(settings: SamplerSettings, sizes: Sequence[int] | None) -> tuple[int, int]:
    """The two batch sizes to time: the same on every rank (the bounds are)."""
    if sizes is None:
        per_rank = settings.global_batch_size // settings.num_replicas
        floor = max(settings.min_sizes)
        sizes = (max(floor, per_rank // 2), max(per_rank, floor + 1))
    small, large = (int(b) for b in sizes)
    if not 1 <= small < large:
        raise ConfigError(f"Invalid probe sizes {tuple(sizes)}: need two sizes 1 <= a < b")
    return small, large


def probe_settings(settings: SamplerSettings, peers: PeerGroup, step_fn: Callable[[int], Any],
                   sizes: Sequence[int] | None, repeats: int, model: torch.nn.Module | None,
                   memory_fraction: float) -> SamplerSettings:
    """Run the probe on this rank, exchange the figures, return the measured settings."""
    small, large = probe_sizes(settings, sizes)
    repeats = check_int("repeats", repeats, 1)
    if peers.group is None and settings.num_replicas > 1:
        raise ConfigError(f"probe() needs torch.distributed initialized over the "
                          f"num_replicas={settings.num_replicas} ranks: every rank probes and "
                          "the ranks exchange their figures")
    fraction = float(memory_fraction)
    if not 0 < fraction <= 1:
        raise ConfigError(f"Invalid memory_fraction {memory_fraction!r}, it should be in (0, 1]")
    device = _device(model) if settings.memory_caps_pending else torch.device("cpu")
    seconds, peaks = _time_steps(step_fn, (small, large), repeats, model, device)
    cap = float(settings.global_batch_size)
    if peaks is not None:
        free, _ = torch.cuda.mem_get_info(device)
        budget = fraction * (free + torch.cuda.memory_reserved(device))
        cap = float(memory_cap((small, large), peaks, budget, settings.global_batch_size))
    # A model replica (tensor or pipeline parallel peers) is as slow as its slowest member and
    # holds what its tightest member's memory allows.
    rows = [[max(m[0] for m in members), max(m[1] for m in members),
             min(m[2] for m in members)] for members in peers.gather_replicas([*seconds, cap])]
    caps = [int(r[2]) for r in rows] if settings.memory_caps_pending else None
    measured = settings.with_probe(caps, None)
    weights = None
    if settings.probe_weights or (settings.initial_weights is None and settings.adaptive):
        history = tuple(np.array([[small, r[0]], [large, r[1]]]) for r in rows)
        targets, _ = fit_cost_model(history).equal_finish(
            measured.min_sizes, measured.max_sizes, settings.global_batch_size)
        weights = peers.broadcast_from_first([max(float(t), 1e-9) for t in targets])
    # Otherwise the weights the user chose (or the policy defines) stay; the bounds moved.
    return settings.with_probe(caps, weights)


def _device(model: torch.nn.Module | None) -> torch.device:
    """Where the probe's steps allocate: the model's device, else the current CUDA device."""
    if model is not None:
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _time_steps(step_fn, sizes, repeats: int, model, device: torch.device
                ) -> tuple[list[float], list[int] | None]:
    """Median seconds of ``step_fn(b)`` per size, and on CUDA the peak bytes allocated per size;
    leaves RNG states and gradients as found."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    context = model.no_sync if model is not None and hasattr(model, "no_sync") \
        else contextlib.nullcontext
    cuda = device.type == "cuda"
    medians, peaks = [], []
    try:
        with context():
            for b in sizes:
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                step_fn(b)  # warm-up: allocations, autotuning
                sync()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    step_fn(b)
                    sync()
                    times.append(time.perf_counter() - start)
                medians.append(float(np.median(times)))
                if cuda:
                    peaks.append(int(torch.cuda.max_memory_allocated(device)))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        if model is not None:
            model.zero_grad(set_to_none=True)
    return medians, (peaks if cuda else None)
