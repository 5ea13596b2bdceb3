"""What every rank of one sampler must agree on: validated once, with one digest.

The same record answers the settings check between ranks (its digest goes into the agreement
all-reduce), the plan request (its :meth:`SamplerSettings.run_config` is what the coordinator
keeps per run and compares later requests with) and the local first plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ._exceptions import ConfigError
from .plan import Plan, check_weights, initial_plan, normalize_bounds
from .policies import ADAPTIVE_POLICIES, check_options, check_policy
from .protocol import RunConfig

__all__ = ["SamplerSettings", "check_int"]


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"Invalid {name} {value!r}, it should be an integer >= {minimum}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """The sampler's arguments, checked; identical on every rank of a run."""

    #: N, the dataset length.
    num_samples: int
    #: B, samples per optimizer step over all ranks.
    global_batch_size: int
    num_replicas: int
    shuffle: bool
    seed: int
    drop_last: bool
    #: Pad the last global batch by wrapping around (False: evaluation, every sample once).
    pad: bool
    policy: str
    #: Per-rank bounds, multiples of ``batch_size_multiple``.
    min_sizes: tuple[int, ...]
    max_sizes: tuple[int, ...]
    #: Every per-rank batch size is a multiple of this (lcm with ``micro_batch_size``).
    batch_size_multiple: int
    micro_batch_size: int | None
    initial_weights: tuple[float, ...] | None
    #: Steps per plan window (None: one plan per epoch).
    rebalance_every: int | None
    #: Loader batches per optimizer step: plan windows are whole groups.
    accumulation_steps: int
    #: The user's policy tunables (over the defaults), sorted ``(name, value)`` pairs.
    options: tuple[tuple[str, float], ...]
    #: ``max_batch_size="auto"``: the caps come from ``probe()``.
    memory_caps_pending: bool
    #: ``initial_weights="probe"``: the first plan's weights come from ``probe()``.
    probe_weights: bool
    #: The user's ``min_batch_size``, kept to recompute the bounds once caps are measured.
    min_batch_size: Any = dataclasses.field(compare=False, repr=False)

    @classmethod
    def from_arguments(cls, *, num_samples, global_batch_size, num_replicas, shuffle, seed,
                       drop_last, policy, pad=True, initial_weights, min_batch_size, max_batch_size,
                       rebalance_every, batch_size_multiple, micro_batch_size,
                       accumulation_steps, options) -> "SamplerSettings":
        num_samples = check_int("dataset length", num_samples, 1)
        batch = check_int("global_batch_size", global_batch_size, 1)
        quantum = check_int("batch_size_multiple", batch_size_multiple, 1)
        if micro_batch_size is not None:
            micro_batch_size = check_int("micro_batch_size", micro_batch_size, 1)
            quantum = math.lcm(quantum, micro_batch_size)
        caps_pending = isinstance(max_batch_size, str)
        if caps_pending:
            if max_batch_size != "auto":
                raise ConfigError(f"Invalid max_batch_size {max_batch_size!r}: expected an "
                                  "integer, one per rank, or 'auto'")
            max_batch_size = None
        lo, hi = normalize_bounds(num_replicas, batch, min_batch_size, max_batch_size, quantum)
        if isinstance(initial_weights, str) and initial_weights != "probe":
            raise ConfigError(f"Invalid initial_weights {initial_weights!r}: expected per-rank "
                              "numbers or 'probe'")
        probe_weights = isinstance(initial_weights, str)
        weights = (None if initial_weights is None or probe_weights
                   else check_weights(initial_weights, num_replicas))
        accumulation = check_int("accumulation_steps", accumulation_steps, 1)
        if rebalance_every is not None:
            rebalance_every = check_int("rebalance_every", rebalance_every, 1)
            if rebalance_every % accumulation:
                raise ConfigError(f"Invalid rebalance_every {rebalance_every}: with "
                                  f"accumulation_steps={accumulation} every plan window must "
                                  "hold whole accumulation groups (use a multiple of "
                                  f"{accumulation})")
        check_options(options)
        return cls(num_samples=num_samples, global_batch_size=batch, num_replicas=num_replicas,
                   shuffle=bool(shuffle), seed=check_int("seed", seed, 0),
                   drop_last=bool(drop_last), pad=bool(pad), policy=check_policy(policy), min_sizes=lo,
                   max_sizes=hi, batch_size_multiple=quantum, micro_batch_size=micro_batch_size,
                   initial_weights=weights, rebalance_every=rebalance_every,
                   accumulation_steps=accumulation,
                   options=tuple(sorted((str(k), float(v)) for k, v in (options or {}).items())),
                   memory_caps_pending=caps_pending, probe_weights=probe_weights,
                   min_batch_size=min_batch_size)

    @property
    def adaptive(self) -> bool:
        """Whether plans come from a coordinator (False for ``equal`` and ``static``)."""
        return self.policy in ADAPTIVE_POLICIES

    @property
    def probe_pending(self) -> bool:
        """``probe()`` must run before the first epoch (for the weights or the caps)."""
        return self.probe_weights or self.memory_caps_pending

    def run_config(self) -> RunConfig:
        """What the coordinator keeps per run (and compares every later request with)."""
        return RunConfig(world_size=self.num_replicas, global_batch_size=self.global_batch_size,
                         policy=self.policy, min_sizes=self.min_sizes, max_sizes=self.max_sizes,
                         quantum=self.batch_size_multiple, initial_weights=self.initial_weights,
                         options=self.options)

    @property
    def digest(self) -> int:
        """A 60-bit digest of every field, for comparing settings with one all-reduce."""
        fields = dataclasses.astuple(self)[:-1]  # all but the user's raw min_batch_size
        return int(hashlib.sha256(repr(fields).encode()).hexdigest()[:15], 16) + 1

    def first_plan(self, run_id: str, generation: int) -> Plan:
        return initial_plan(self.run_config(), run_id, generation)

    def with_probe(self, caps: Sequence[int] | None,
                   weights: Sequence[float] | None) -> "SamplerSettings":
        """The settings once ``probe()`` measured: the memory caps and/or the first weights."""
        changes: dict[str, Any] = {"memory_caps_pending": False, "probe_weights": False}
        if caps is not None:
            try:
                changes["min_sizes"], changes["max_sizes"] = normalize_bounds(
                    self.num_replicas, self.global_batch_size, self.min_batch_size, list(caps),
                    self.batch_size_multiple)
            except ConfigError as exc:
                raise ConfigError(f"max_batch_size='auto': the free memory of the ranks allows "
                                  f"at most {list(caps)} samples per step: {exc}") from None
        if weights is not None:
            changes["initial_weights"] = check_weights(weights, self.num_replicas)
        return dataclasses.replace(self, **changes)
