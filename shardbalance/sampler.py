"""The drop-in sampler: each rank's share of every global batch, from a plan all ranks agree on.

A facade over the parts that each own one concern (see ``docs/architecture.md``):
``_settings`` (what every rank must agree on), ``_peers`` (the ranks' collectives),
``_session`` (the coordinator connection), ``_plans`` (where each window's plan comes from and
its agreement), ``_ledger`` (which batch each step trains), ``_weighting`` (gradient weight and
busy time), ``_probe`` and ``_accumulate``.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from . import _torch_compat as compat
from ._accumulate import accumulate as _accumulate
from ._compute import ComputeClock, lockstep_cause
from ._env import read_environment
from ._exceptions import ConfigError
from ._ledger import LedgerEntry, StepLedger
from ._peers import PeerGroup, data_parallel_layout
from ._planner import EARLY_MAX_STEPS, BackgroundPlanner
from ._plans import CoordinatedPlans, LocalPlans
from ._probe import probe_settings
from ._session import CoordinatorSession
from ._settings import SamplerSettings, check_int
from ._weighting import (OutputWeighting, WeightedCommHook, attach_hook,
                         attach_output_weighting)
from ._wrappers import refuse_rewrapping
from .order import _CHUNK, EpochOrder
from .plan import Plan
from .policies import measured_steps_to_first_clean

__all__ = ["WeightedDistributedSampler"]

#: Busy-time records kept on the rank (``recent_busy``) for inspection.
_RECENT_BUSY_KEPT = 4096
#: Early re-plans in the first epoch iterated (per-epoch plans, no probe): the first from the
#: equal split's measurements, the second with two batch sizes measured per rank.
_EARLY_REPLANS = 2
#: Early re-plans only in the first steps of that epoch (without a training signal each step
#: until then costs one scalar all-reduce at prefetch time).
_EARLY_MAX_STEPS = EARLY_MAX_STEPS
_KEYWORDS = ("num_replicas", "rank", "shuffle", "seed", "drop_last", "coordinator", "policy",
             "initial_weights", "min_batch_size", "max_batch_size", "rebalance_every",
             "batch_size_multiple", "micro_batch_size", "accumulation_steps", "pad",
             "coordinator_log", "options", "timeout_s", "process_group", "device_mesh",
             "mesh_dim", "replica_group")


class WeightedDistributedSampler(Sampler[list[int]]):
    r"""Batch sampler that splits a fixed global batch unevenly, by measured rank speed.

    Every step consumes ``global_batch_size`` (B) consecutive positions of one epoch-wide
    pseudo-random order of the dataset; rank ``i`` takes its slice of ``b_i`` of them, with
    ``Σ b_i = B``. The split (the *plan*) comes from a coordinator that measures how long each
    rank is busy per step, so fast GPUs take more samples and all ranks finish together. Each
    epoch covers the dataset exactly once on every plan, and every rank runs ``len(sampler)``
    steps. Pass it as ``batch_sampler`` to a :class:`~torch.utils.data.DataLoader`, and call
    :meth:`attach` on the DDP model so gradients are weighted by each rank's share.

    Every argument after ``global_batch_size`` is keyword-only.

    Args:
        dataset: any Sized; N = ``len(dataset)``.
        global_batch_size (int): B, samples per optimizer step summed over all ranks.
        num_replicas (int, optional): number of data-parallel ranks. Default: the
            torch.distributed world size (the size of ``process_group`` when given).
        rank (int, optional): this rank's data-parallel index. Default: the torch.distributed
            rank (the index in ``process_group`` when given).
        shuffle (bool, optional): shuffle the order each epoch. Default: ``True``.
        seed (int, optional): seed of the order; must be the same on every rank. Default: ``0``.
        drop_last (bool, optional): drop the last incomplete global batch. If ``False`` it is
            padded to B with samples from the start of the order. Default: ``False``.
        pad (bool, optional): ``False`` for evaluation without duplicates: the last global
            batch is not padded, so every sample is yielded exactly once; its batches are short
            and a rank with nothing left in it yields no batch for that step (so ranks may run
            different numbers of steps: not for DDP training, which :meth:`attach` refuses; a
            collective per forward, such as SyncBatchNorm, FSDP or a per-step
            ``gather_for_metrics``, would deadlock). Default: ``True``.
        coordinator (str, optional): ``tcp://host:port`` of a standalone coordinator. Default:
            ``$SHARDBALANCE_COORDINATOR``, else global rank 0 starts one as a child process.
        policy (str, optional): ``"equal"``, ``"static"``, ``"proportional"``, ``"seed"`` or
            ``"affine"``. ``equal`` and ``static`` are computed locally, without a coordinator.
            Default: ``"affine"``.
        initial_weights (sequence of float or ``"probe"``, optional): relative per-rank weights
            of the first plan (and the fixed weights of ``static``). ``"probe"``: measured by
            :meth:`probe` before the first epoch, so epoch 0 is already balanced. Default: equal.
        min_batch_size (int or sequence, optional): per-rank lower bound. Default: ``1``.
        max_batch_size (int, sequence or ``"auto"``, optional): per-rank upper bound (memory).
            ``"auto"``: each rank's cap is derived by :meth:`probe` from its free CUDA memory
            and the peak memory measured at two batch sizes (no cap on a CPU rank). Default: B.
        rebalance_every (int, optional): re-plan every this many steps inside an epoch.
            Default: ``None``, one plan per epoch.
        batch_size_multiple (int, optional): every per-rank batch size is a multiple of this
            (fixed shapes for torch.compile, cudnn, CUDA graphs). Default: ``1``.
        micro_batch_size (int, optional): gradient accumulation with fixed shapes: every
            per-rank batch size is a multiple of it, and :meth:`accumulate` cuts each step's
            batch into micro-batches of exactly this size. Default: ``None``.
        accumulation_steps (int, optional): loader batches per optimizer step when the loop
            accumulates gradients across batches under ``no_sync()`` (Lightning's
            ``accumulate_grad_batches``, Accelerate's ``gradient_accumulation_steps``): plan
            windows then hold whole groups, so ``weighting="hook"`` never sees a plan change
            inside one. Default: ``1``.
        coordinator_log (str, optional): journal path of the embedded coordinator. Default:
            ``$SHARDBALANCE_LOG``, else ``shardbalance_logs/<run id>.jsonl``.
        options (dict, optional): policy tunables, see ``policies.DEFAULT_OPTIONS``.
        timeout_s (float, optional): bound on every wait for the coordinator or the peers.
            Default: ``$SHARDBALANCE_TIMEOUT`` or 30.
        process_group (ProcessGroup, optional): the data-parallel group, with tensor or
            pipeline parallelism: ``num_replicas`` and ``rank`` are its size and this rank's
            index in it (given, they must match). Its ranks are the ones holding this sampler,
            plus ``replica_group``'s. Default: every rank is one data-parallel replica.
        replica_group (ProcessGroup, optional): with ``process_group``, this rank's
            model-parallel peers that hold the sampler too (e.g. its tensor-parallel group):
            they get the same batches, and the replica's busy time is its slowest member's.
            Default: none (only the data-parallel group holds the sampler).
        device_mesh (DeviceMesh, optional): instead of the two groups: every rank of the mesh
            holds the sampler, ``mesh_dim`` is the data-parallel dimension and the ranks that
            share a coordinate on it form one replica. Pass a sub-mesh (``mesh["dp", "tp"]``)
            when the other ranks (later pipeline stages) hold no sampler.
        mesh_dim (str or int, optional): the data-parallel dimension of ``device_mesh``.
            Default: its only dimension.

    .. warning::
        Call :meth:`set_epoch` at the start of each epoch, before creating the DataLoader
        iterator, as with DistributedSampler; otherwise every epoch uses the same order.

    Example::

        >>> sampler = WeightedDistributedSampler(dataset, global_batch_size=256)
        >>> loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
        >>> model = DDP(model)
        >>> sampler.attach(model)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         loss = loss_fn(model(x), y)   # mean over the local batch
        ...         loss.backward(); opt.step(); opt.zero_grad()
    """


    def __init__(
        self,
        dataset: Sized,
        global_batch_size: int,
        *args: Any,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
        coordinator: str | None = None,
        policy: str = "affine",
        initial_weights: Sequence[float] | str | None = None,
        min_batch_size: int | Sequence[int] = 1,
        max_batch_size: int | Sequence[int] | str | None = None,
        rebalance_every: int | None = None,
        batch_size_multiple: int = 1,
        micro_batch_size: int | None = None,
        accumulation_steps: int = 1,
        coordinator_log: str | None = None,
        options: dict[str, float] | None = None,
        timeout_s: float | None = None,
        process_group: Any = None,
        device_mesh: Any = None,
        mesh_dim: str | int | None = None,
        replica_group: Any = None,
    ) -> None:
        if args:
            # DistributedSampler(ds, world, rank) ported by renaming the class would otherwise
            # silently train with global_batch_size = world.
            raise TypeError(
                f"WeightedDistributedSampler takes (dataset, global_batch_size) positionally; "
                f"got {len(args)} more positional argument(s) {args!r}. Pass the others by "
                f"keyword: {', '.join(k + '=' for k in _KEYWORDS)}")
        try:
            num_samples = len(dataset)
        except TypeError:
            raise ConfigError(f"dataset must have a length, got {type(dataset).__name__}") from None
        distributed = dist.is_available() and dist.is_initialized()
        env = read_environment()
        layout = None
        if any(a is not None for a in (process_group, device_mesh, mesh_dim, replica_group)):
            size, index, layout = data_parallel_layout(
                process_group, device_mesh, mesh_dim, replica_group, env.restart_count,
                env.peer_timeout_s)
            for name, given, value in (("num_replicas", num_replicas, size),
                                       ("rank", rank, index)):
                if given is not None and given != value:
                    raise ConfigError(f"{name}={given!r} but the data-parallel group gives "
                                      f"{value} (its size is {size}, this rank's index "
                                      f"{index}); omit {name} or pass the group's")
            num_replicas, rank = size, index
        for name, value in (("num_replicas", num_replicas), ("rank", rank)):
            if value is None and not distributed:
                raise ConfigError(f"{name} is None and torch.distributed is not initialized; "
                                  "call init_process_group() first or pass num_replicas and rank")
        num_replicas = check_int("num_replicas",
                                 dist.get_world_size() if num_replicas is None else num_replicas, 1)
        rank = dist.get_rank() if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or \
                not 0 <= rank < num_replicas:
            raise ConfigError(f"Invalid rank {rank}, rank should be in the interval "
                              f"[0, {num_replicas - 1}]")
        self.rank = int(rank)
        self.settings = SamplerSettings.from_arguments(
            num_samples=num_samples, global_batch_size=global_batch_size,
            num_replicas=num_replicas, shuffle=shuffle, seed=seed, drop_last=drop_last,
            pad=pad, policy=policy, initial_weights=initial_weights, min_batch_size=min_batch_size,
            max_batch_size=max_batch_size, rebalance_every=rebalance_every,
            batch_size_multiple=batch_size_multiple, micro_batch_size=micro_batch_size,
            accumulation_steps=accumulation_steps, options=options)
        self.timeout_s = float(env.timeout_s if timeout_s is None else timeout_s)
        if not self.timeout_s > 0:
            raise ConfigError(f"Invalid timeout_s {timeout_s!r}, it should be > 0")
        #: Bound on waits for peers (plan agreement): much longer than a coordinator request.
        self.peer_timeout_s = max(env.peer_timeout_s, self.timeout_s)
        self.generation = env.restart_count
        self.epoch = 0
        #: Every batch yielded, from construction on (frameworks start the loader early).
        self.ledger = StepLedger()
        #: This rank's newest ``(epoch, step, batch_size, busy_s)`` measurements.
        self.recent_busy: list[tuple[int, int, int, float]] = []
        self._serial = 0
        self._iterated_epoch: int | None = None
        #: Re-plans still to make inside the first epoch, once every rank has measured a few
        #: steps: with per-epoch plans and no probe, epoch 0 is balanced long before epoch 1.
        self._early_replans = _EARLY_REPLANS
        #: The first iterator that yields (its epoch is the only one with early re-plans),
        #: the plan of its current window, and the batches measured on that plan.
        self._early_serial: int | None = None
        self._early_plan: Plan | None = None
        self._early_measured = 0
        #: ``(epoch, position)`` after load_state_dict(): where that epoch starts.
        self._resume: tuple[int, int] | None = None
        #: An iterator of the resumed epoch ran to its end: the next one starts the epoch over.
        self._resume_spent = False
        self._weighting: WeightedCommHook | OutputWeighting | None = None
        #: ``report_busy`` was called: a training signal even without ``attach()``.
        self._reported = False
        #: Plans agreed in the background, off the training path (created at the first
        #: iterator with a training signal; see ``_planner.py``).
        self.planner: BackgroundPlanner | None = None
        #: Agree plans in the background when there is a training signal (the default). Set
        #: False (on every rank, before iterating) for the synchronous agreement at each window
        #: at prefetch time, which needs the same ``num_workers`` / ``prefetch_factor`` on
        #: every rank: for tests that script one plan per window and check each step's.
        self.plan_in_background = True
        self.peers = PeerGroup(num_replicas, self.peer_timeout_s, layout)
        self.session: CoordinatorSession | None = None
        if self.settings.adaptive:
            if num_replicas > 1 and not distributed:
                raise ConfigError(f"policy {policy!r} with {num_replicas} ranks needs "
                                  "torch.distributed (ranks must agree on every plan); "
                                  "initialize the process group first, or use policy='equal' "
                                  "or 'static'")
            self.session = CoordinatorSession(
                coordinator or env.coordinator, env, self.peers, self.rank, num_replicas,
                self.generation, coordinator_log, self.timeout_s)
            # A membership change is a new generation too (torchrun does not count it).
            self.generation = self.session.generation
            self.plan_source: LocalPlans = CoordinatedPlans(
                self.settings, self.peers, self.session, self.rank, self.generation,
                self.timeout_s)
        else:
            self.plan_source = LocalPlans(self.settings, self.peers, "local", self.generation)
        try:
            # Ranks built with different settings would train overlapping slices or hang.
            self.plan_source.agree({"settings": self.settings.digest})
        except BaseException:
            self.close(wait=False)
            raise

    # -- what the settings say -----------------------------------------------------------

    num_samples = property(lambda self: self.settings.num_samples)
    global_batch_size = property(lambda self: self.settings.global_batch_size)
    num_replicas = property(lambda self: self.settings.num_replicas)
    shuffle = property(lambda self: self.settings.shuffle)
    seed = property(lambda self: self.settings.seed)
    drop_last = property(lambda self: self.settings.drop_last)
    policy = property(lambda self: self.settings.policy)
    min_sizes = property(lambda self: self.settings.min_sizes)
    max_sizes = property(lambda self: self.settings.max_sizes)
    batch_size_multiple = property(lambda self: self.settings.batch_size_multiple)
    micro_batch_size = property(lambda self: self.settings.micro_batch_size)
    accumulation_steps = property(lambda self: self.settings.accumulation_steps)
    initial_weights = property(lambda self: self.settings.initial_weights)
    rebalance_every = property(lambda self: self.settings.rebalance_every)
    adaptive = property(lambda self: self.settings.adaptive,
                        doc="Whether plans come from a coordinator (not ``equal``/``static``).")

    @property
    def run_id(self) -> str:
        return self.plan_source.run_id

    @property
    def coordinator_address(self) -> str | None:
        return None if self.session is None else self.session.address

    # -- DistributedSampler-like API -------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: the order and the plan key. Call it before each epoch's iterator."""
        self.epoch = check_int("epoch", epoch, 0)

    def _start_position(self, epoch: int) -> int:
        if self._resume is None or self._resume[0] != epoch:
            return 0
        if self._resume_spent:
            entry = self._last_step
            if entry is not None and entry.epoch == epoch and not self._steps(entry.position_after):
                return 0  # the resumed epoch is trained to its end: a new pass starts at 0
        return self._resume[1]

    def _steps(self, start: int) -> int:
        remaining = self.num_samples - start
        if remaining <= 0:
            return 0
        if self.drop_last:
            return remaining // self.global_batch_size
        return math.ceil(remaining / self.global_batch_size)

    def __len__(self) -> int:
        """Optimizer steps in the current epoch: the same on every rank, whatever the plan.

        With ``pad=False`` a rank whose slice of the last, short global batch is empty yields
        one batch fewer: counted exactly for ``equal`` and ``static``; for the adaptive
        policies (whose last plan is decided later) from the newest agreed plan.
        """
        start = self._start_position(self.epoch)
        steps = self._steps(start)
        if not self.settings.pad and steps and not self.drop_last:
            plan = self.plan_source.agreed
            if start + (steps - 1) * self.global_batch_size + plan.offset(self.rank) \
                    >= self.num_samples:
                steps -= 1
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        # A framework wrapper that re-shards or skips batches (Accelerate's prepare()) is
        # refused before any batch is yielded.
        refuse_rewrapping(sys._getframe(1))
        if self.settings.probe_pending:
            raise ConfigError("initial_weights='probe' or max_batch_size='auto': call "
                              "sampler.probe(step_fn) on every rank before the first epoch")
        epoch = self.epoch
        if self._iterated_epoch == epoch:
            warnings.warn(f"iterating epoch {epoch} again without set_epoch(): the order and "
                          "the samples will repeat. Call sampler.set_epoch(epoch) before each "
                          "epoch", UserWarning, stacklevel=2)
        if self._resume_spent:
            self._resume, self._resume_spent = None, False
        self._serial += 1
        self.ledger.drop_untrained()
        if self._weighting is not None:
            self._weighting.reset()
        return self._batches(epoch, self._start_position(epoch), self._serial)

    def _batches(self, epoch: int, start: int, serial: int) -> Iterator[list[int]]:
        order = EpochOrder(self.num_samples, self.seed, epoch, self.shuffle)
        steps = self._steps(start)
        window = self.rebalance_every or max(steps, 1)
        big_b = self.global_batch_size
        self._iterated_epoch = epoch
        if self._early_serial is None:
            self._early_serial = serial  # the first iterator that yields
        append = self.ledger.append
        # With a training signal (attach() or report_busy) plans are agreed by the background
        # planner, triggered by trained steps: no collective at prefetch time after the
        # iterator's first check. Without one, synchronously at each window (equal prefetch
        # settings on every rank needed then).
        background = self.settings.adaptive and self.settings.pad and \
            self.plan_in_background and (self._weighting is not None or self._reported)
        early = self._early_replans > 0 and serial == self._early_serial and \
            self.settings.adaptive and self.rebalance_every is None and \
            self.settings.initial_weights is None and self.settings.pad
        # No training signal yet (report_busy() comes after the first batch): synchronous
        # early re-plans or windows would run collectives at prefetch time, which hangs ranks
        # whose loaders run ahead by different depths. This iterator keeps its first plan;
        # the next one plans in the background.
        waiting = self.settings.adaptive and self.settings.pad and not background and \
            self.plan_in_background
        early = early and not waiting
        plan = None
        first = 0
        while first < steps:
            # The iterator's first window also checks that every rank starts the same epoch
            # at the same position (one all-reduce with the plan's agreement).
            checks = {} if first else {"settings": self.settings.digest, "epoch": epoch,
                                       "position": start}
            last = min(first + window, steps)
            if background and early:
                # Switch points at accumulation-group boundaries while early re-plans may come.
                last = min(first + self.accumulation_steps, steps) \
                    if first < _EARLY_MAX_STEPS else steps
            if background and first:
                # A switch point: the plan the planner installed here, if any; the plan of
                # every step of this window is then fixed.
                plan = self.planner.claim(first, last - 1) or plan
            elif background:
                # The iterator's checks (and that every rank plans in the background) in one
                # all-reduce on the peer group; from here on plans come from the planner.
                self.plan_source.agree({**checks, "background": 1})
                plan = self._background_begin(serial, epoch, steps, early, last - 1)
            elif self.settings.adaptive and not first:
                self.plan_source.agree({**checks, "background": 0})
                plan = self.plan_source.plan_for(epoch, first, {})
            elif waiting:
                # No training signal yet: no collective at prefetch time (see `early`).
                plan = self.plan_source.agreed.moved_to(epoch, first)
            else:
                plan = self.plan_source.plan_for(epoch, first, checks)
            b = plan.batch_sizes[self.rank]
            offset = plan.offset(self.rank)
            # Steps per pass of the order (_CHUNK positions bound the sampler's memory); one
            # at a time while an early re-plan may cut the window.
            if early and plan is not self._early_plan:
                self._early_plan, self._early_measured = plan, 0
            lane = np.arange(b, dtype=np.int64)
            c0 = first
            while c0 < last:
                if early and c0 >= _EARLY_MAX_STEPS and not background:
                    early = False  # (the same step on every rank)
                # Cut only between accumulation groups (as a window boundary is).
                if early and not background and c0 > first and \
                        c0 % self.accumulation_steps == 0 and self._early_plan_due():
                    self._early_replans -= 1
                    last = c0  # the next window starts here
                    break
                c1 = min(c0 + (1 if early and not background
                               else max(1, _CHUNK // max(b, 1))), last)
                step_ids = np.arange(c0, c1, dtype=np.int64)
                positions = (start + offset + step_ids * big_b)[:, None] + lane[None, :]
                rows = order.indices(positions).tolist()
                if not self.settings.pad and c1 == steps:
                    # The last global batch, unpadded: only positions inside the epoch.
                    rows[-1] = [i for i, p in zip(rows[-1], positions[-1].tolist())
                                if p < self.num_samples]
                for step, row in enumerate(rows, c0):
                    append(LedgerEntry(serial, epoch, step, len(row), plan,
                                       min(start + (step + 1) * big_b, self.num_samples)))
                    if row:  # pad=False: nothing left for this rank in the last step
                        yield row
                c0 = c1
            first = last
        if background and early:
            self._early_replans = 0  # early re-plans belong to the first iterator only
        if self._resume is not None and self._resume[0] == epoch:
            # Every batch of the resumed epoch is yielded (maybe into a prefetching loader's
            # queue, not yet trained): len() and state_dict() keep the resume point; the next
            # iterator starts the epoch over.
            self._resume_spent = True

    # -- plans -----------------------------------------------------------------------------

    @property
    def _last_step(self) -> LedgerEntry | None:
        """The newest step: trained (with a gradient weighting attached) or yielded."""
        return self.ledger.last_trained if self._weighting is not None \
            else self.ledger.last_yielded

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The plan of the last trained step (of the newest plan before any step trained).

        Identical on every rank; sums to ``global_batch_size``.
        """
        entry = self._last_step
        return entry.plan.batch_sizes if entry is not None else self.plan.batch_sizes

    @property
    def plan(self) -> Plan:
        """The newest plan all ranks agreed on."""
        return self.plan_source.agreed

    # -- training side ------------------------------------------------------------------

    def attach(self, model: torch.nn.Module, comm_hook=None, comm_state: Any = None,
               weighting: str = "auto", check_batch_size: bool = True,
               busy: str = "auto") -> None:
        """Weight each rank's gradient by ``b_i/B`` and measure this rank's busy time per step.

        Every forward of ``model`` in training mode with gradients enabled trains the next
        batch this sampler yielded (one forward per batch; batches accumulated under
        ``no_sync()`` form one optimizer step), and that batch's own ``b_i`` weights it.

        ``weighting="auto"`` (default): ``"hook"`` for a DDP model, ``"output"`` for an FSDP2
        (``fully_shard``) model, whose reduce-scatter averages over its data-parallel degree
        ``k`` (HSDP: shard × replicate size), which must be ``num_replicas``.

        ``weighting="hook"`` registers a DDP comm hook that pre-scales each gradient
        bucket: by ``b_i/B`` before a summing all-reduce, or by ``k·b_i/B`` before
        ``comm_hook`` (an averaging hook of yours, e.g. ``default_hooks.bf16_compress_hook``
        with ``comm_state=process_group``). Exact for any loss that is a mean over the local
        batch. The model must not have a comm hook of its own (pass it here instead).

        ``weighting="output"`` registers no comm hook: the gradient of the model's outputs is
        scaled by ``k·b_i/B`` in backward and DDP's own all-reduce (or ``comm_hook``, which must
        average) does the rest, which saves the hook's pass over the gradient buckets. Exact
        when the loss reaches the parameters only through the model's outputs (terms that are
        equal on every rank, like weight decay, are fine); an auxiliary loss computed inside
        the model is then averaged over ranks without the ``b_i/B`` weights.

        ``weighting="none"`` measures busy time and changes no gradient: for losses already
        normalised over all ranks (the HF Trainer's ``average_tokens_across_devices``, or a
        loss you divide by a global count yourself).

        ``check_batch_size``: refuse a forward whose first input's leading dimension is not
        the batch's ``b_i`` (a skipped or reordered batch); turn off for inputs that are not
        batch-first.

        ``busy``: what this rank's busy time per step is. ``"step"``: from the end of the
        previous step's all-reduce to this step's gradients. ``"compute"``: the forward time of
        the model's compute leaves only (see ``_compute.py``), for models with collectives
        inside the step, which keep ranks in lockstep and make the step time the slowest
        rank's on every rank. ``"auto"`` (default): ``"compute"`` when the model has
        SyncBatchNorm or is FSDP2, else ``"step"``; pass ``"compute"`` yourself for tensor
        parallelism or collectives of your own inside the forward.
        """
        if self._weighting is not None:
            raise ConfigError("attach() was already called on this sampler")
        if not self.settings.pad:
            raise ConfigError("pad=False is for evaluation: ranks may run different numbers of "
                              "steps, and DDP training would wait forever for the rank without "
                              "a last batch. Train with pad=True (or drop_last=True)")
        if weighting not in ("auto", "hook", "output", "none"):
            raise ConfigError(f"Invalid weighting {weighting!r}, it should be 'auto', 'hook', "
                              "'output' or 'none'")
        if busy not in ("auto", "step", "compute"):
            raise ConfigError(f"Invalid busy {busy!r}, it should be 'auto', 'step' or 'compute'")
        fsdp_type = compat.fsdp_module_type()
        fsdp_groups = compat.fsdp_param_groups(model) \
            if fsdp_type is not None and isinstance(model, fsdp_type) else None
        if weighting == "auto":
            weighting = "hook" if fsdp_groups is None else "output"
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if fsdp_groups is not None:
            if weighting == "hook":
                raise ConfigError("an FSDP2 model has no DDP comm hook: attach it with "
                                  "weighting='output' (the default for FSDP2) or 'none'")
            world = compat.fsdp_data_parallel_degree(fsdp_groups)
            if world is None:
                raise ConfigError("cannot read the data-parallel degree of this FSDP2 model's "
                                  "mesh (a replicate-only mesh, or modules on different meshes): "
                                  "shardbalance supports fully_shard over the data-parallel "
                                  "ranks, and HSDP")
            try:
                divide_factor = compat.fsdp_divide_factor(fsdp_groups)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            what = "the FSDP2 model's mesh averages gradients over"
        else:
            world = model.process_group.size() if hasattr(model, "process_group") \
                else self.num_replicas
            what = "the DDP model spans"
        if world != self.num_replicas:
            raise ConfigError(f"{what} {world} ranks but the sampler "
                              f"num_replicas={self.num_replicas}")
        cause = lockstep_cause(model)
        if busy == "auto":
            busy = "compute" if cause else "step"
        elif busy == "step" and cause:
            warnings.warn(f"shardbalance: the model has {cause}, which keeps ranks in lockstep "
                          "inside each step: busy='step' then measures the slowest rank on every "
                          "rank and the plan will not move. Use busy='compute' (the default)",
                          RuntimeWarning, stacklevel=2)
        parts = (self.ledger, self.global_batch_size, self.num_replicas, self._on_busy, device)
        hook: WeightedCommHook | OutputWeighting
        if weighting == "hook":
            if comm_hook is None and comm_state is None:
                comm_state = getattr(model, "process_group", None)
            hook = WeightedCommHook(*parts, comm_hook, comm_state,
                                    check_batch_size=check_batch_size)
            attach_hook(model, hook)
        else:
            hook = OutputWeighting(*parts, [] if fsdp_groups is not None
                                   else list(model.parameters()),
                                   scale=weighting == "output", check_batch_size=check_batch_size)
            hook.fsdp_groups = fsdp_groups
            if fsdp_groups is not None:
                hook.divide_factor = divide_factor
            attach_output_weighting(model, hook, comm_hook, comm_state)
        if busy == "compute":
            hook.compute = ComputeClock(model, device)
            if not hook.compute.leaves:
                warnings.warn("shardbalance: busy='compute' found no compute leaf in the model "
                              "(a module without children that holds parameters, or marked "
                              "shardbalance_compute = True): no busy time will be measured and "
                              "the plan will not move", RuntimeWarning, stacklevel=2)
        self.ledger.consumed = True
        self._weighting = hook
        # The background planner starts a round's work once the next step's forward began
        # (off the step boundary the whole job waits on).
        model.register_forward_pre_hook(self._forward_started)
        if self.planner is not None:
            self.planner.gated = True

    def _forward_started(self, module: torch.nn.Module, args: tuple) -> None:
        # The forward of the next batch: not one of a batch's later micro-batches
        # (accumulate()), which still belong to the step just trained.
        if self.planner is not None and module.training and torch.is_grad_enabled() and \
                self._weighting.starts_batch:
            self.planner.forward_started()

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` gave this sampler a model to weight and time."""
        return self._weighting is not None

    @property
    def trained_steps(self) -> int:
        """Optimizer steps (synchronised backward passes) weighted since :meth:`attach`."""
        return 0 if self._weighting is None else self._weighting.steps

    @property
    def last_trained(self) -> LedgerEntry | None:
        """The ledger entry of the newest batch a forward trained (None before any)."""
        return self.ledger.last_trained

    @property
    def step_weight(self) -> float | None:
        """The gradient weight (``b_i/B``, or ``count/total``) of the newest optimizer step."""
        return None if self._weighting is None or not self._weighting.steps \
            else self._weighting.weight

    def _background_begin(self, serial: int, epoch: int, steps: int, early: bool,
                          through: int) -> Plan:
        """The planner's start of an iterator (created at the first, on every rank alike)."""
        if self.planner is None:
            self.planner = BackgroundPlanner(
                self.plan_source, self.ledger, self.peers, self.rank,
                self._early_ready, self.policy, self.peer_timeout_s, self._early_warmup)
            self.ledger.on_trained = self.planner.trained
            self.planner.gated = self._weighting is not None
        return self.planner.begin(serial, epoch, steps, self.rebalance_every,
                                  self.accumulation_steps,
                                  self._early_replans if early else 0, through)

    @property
    def _early_warmup(self) -> int:
        """Steps (accumulation groups) measured on a plan before an early re-plan: up to the
        first clean one at a new batch size (the policy leaves the steps before it out)."""
        return measured_steps_to_first_clean(dict(self.settings.options))

    def _early_ready(self) -> bool:
        """Whether this rank measured enough steps trained on the current plan for an early
        re-plan."""
        ready = self._early_measured >= self._early_warmup * self.accumulation_steps
        weighting = self._weighting
        if isinstance(weighting, WeightedCommHook) and self.accumulation_steps == 1 and \
                weighting.largest_group > 1:
            ready = False  # see _early_plan_due
        return ready

    def _early_plan_due(self) -> bool:
        """Whether every rank has measured enough steps trained on the current window's plan
        for an early re-plan (one scalar all-reduce, run at the same step on every rank)."""
        ready = self._early_measured >= self._early_warmup * self.accumulation_steps
        weighting = self._weighting
        if isinstance(weighting, WeightedCommHook) and self.accumulation_steps == 1 and \
                weighting.largest_group > 1:
            # The loop accumulates under no_sync() without accumulation_steps: a plan change
            # could fall inside a group, which the comm hook cannot weight. Keep the plan.
            ready = False
        return self.peers.sum([1.0 if ready else 0.0])[0] >= self.num_replicas

    def _on_busy(self, entry: LedgerEntry, busy_s: float) -> None:
        if entry.plan is self._early_plan:
            self._early_measured += 1
        record = (entry.epoch, entry.step, entry.batch_size, busy_s)
        self.recent_busy.append(record)
        if len(self.recent_busy) > _RECENT_BUSY_KEPT:
            del self.recent_busy[:_RECENT_BUSY_KEPT // 2]
        if self.planner is not None and self.plan_in_background:
            self.planner.record(record)  # gathered by the next round, sent with its request
        elif self.session is not None and self.session.sender is not None:
            self.session.sender.push(record)

    def report_busy(self, busy_s: float, entry: LedgerEntry | None = None) -> None:
        """Report this rank's busy seconds for a batch yourself (loops without :meth:`attach`,
        e.g. a custom collective): ``entry`` defaults to the newest batch yielded."""
        entry = entry or self.ledger.last_yielded
        value = float(busy_s)
        if entry is None or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"Invalid busy time {busy_s!r} for batch {entry!r}: expected a "
                              "finite number of seconds > 0 for a batch this sampler yielded")
        self._reported = True
        self._on_busy(entry, value)
        if self.planner is not None and self._weighting is None:
            self.planner.trained(entry)

    def probe(self, step_fn: Callable[[int], Any], sizes: Sequence[int] | None = None,
              repeats: int = 3, model: torch.nn.Module | None = None,
              memory_fraction: float = 0.9) -> tuple[float, ...]:
        """Time a training step at two batch sizes on every rank; balance the first plan on it.

        ``step_fn(b)`` runs one forward and backward pass on ``b`` samples it makes itself (for
        example random tensors of the right shape). It must not communicate: pass the DDP
        model as ``model`` and the probe runs under ``model.no_sync()`` (no all-reduce, so no
        collective ever sees unequal shapes), or call the underlying module. The probe consumes
        no sample of the dataset, restores every random number generator it may touch
        (Python, numpy, torch, CUDA) and clears the gradients it left. Call it on every rank,
        before the first epoch. Returns the per-rank weights of the first plan: measured ones
        (set as ``initial_weights``, computed on the first rank and broadcast), or, when
        ``initial_weights`` were given as numbers or the policy is ``equal`` or ``static``,
        those weights, kept.

        With ``max_batch_size="auto"`` it also sets each rank's cap: on CUDA, the peak memory
        allocated at the two sizes gives a fixed and a per-sample cost, and the cap is the
        largest batch whose peak fits ``memory_fraction`` of the memory this process can use
        (its cached blocks plus the device's free memory, which counts other processes). State
        created later (e.g. Adam's moments at the first ``opt.step()``) is not in the fixed
        cost when the probe runs first: leave room with ``memory_fraction``. A CPU rank is not
        capped.
        """
        cause = lockstep_cause(model) if model is not None else None
        if cause and (self.settings.probe_weights or self.settings.initial_weights is None):
            warnings.warn(f"shardbalance: the model has {cause}: the probe's steps wait for the "
                          "slowest rank inside each step, so its timings cannot tell the ranks "
                          "apart and the first plan will be about equal. Without a probe, the "
                          "first epoch re-plans early from compute-only busy time",
                          RuntimeWarning, stacklevel=2)
        if self._weighting is not None:
            self._weighting.paused = True
        try:
            self.settings = probe_settings(self.settings, self.peers, step_fn, sizes, repeats,
                                           model, memory_fraction)
        finally:
            if self._weighting is not None:
                self._weighting.paused = False
        self.plan_source.restart(self.settings)
        return self.initial_weights or (1.0,) * self.num_replicas

    def accumulate(self, loader: Iterable, model: torch.nn.Module | None = None
                   ) -> Iterator[tuple[Any, float, bool]]:
        """Cut each step's local batch into micro-batches of ``micro_batch_size``.

        Yields ``(micro_batch, loss_scale, is_last_of_step)``. Multiply each micro-batch's mean
        loss by ``loss_scale`` (``micro_batch_size / b_i``) before ``backward()`` and step the
        optimizer when ``is_last_of_step``. With the DDP ``model`` given, every micro-batch but
        the last of a step runs under ``model.no_sync()``, so the gradient is synchronised once
        per step with the step's own ``b_i/B`` weight: exactly the global-batch mean gradient.
        Ranks run different numbers of micro-batches, so no collective may run per
        micro-batch: SyncBatchNorm (an all-reduce in every forward) is refused; plain BatchNorm
        normalises over each micro-batch.
        """
        if self.micro_batch_size is None:
            raise ConfigError("accumulate() needs micro_batch_size set on the sampler")
        if self._weighting is not None and model is None:
            raise ConfigError("accumulate() on an attached sampler needs the DDP model, so "
                              "that every micro-batch but a step's last runs under no_sync()")
        return _accumulate(loader, self.micro_batch_size, model, self._weighting)

    def set_step_weight(self, count: float) -> None:
        """Weight this optimizer step's gradient by ``count`` instead of the local sample count.

        For losses normalised by something other than the local sample count, e.g. a
        token-mean loss: pass this rank's token count for the step, before its (first)
        ``backward()``. The global total comes from one scalar all-reduce, and the gradient
        weighting then weights this rank's gradient by ``count / total``, so the result is the
        gradient of the loss normalised over all tokens of the global batch. Call it on every
        rank at every step (or at none). Under gradient accumulation across loader batches a
        step is the whole group: pass the token count of all the group's batches, once, before
        the group's first backward, with each batch's loss normalised by that group count.
        """
        weighting = self._weighting
        if weighting is None:
            raise ConfigError("set_step_weight() needs attach(model) first")
        if weighting.mid_step:
            # A programming error on this rank alone (its peers are elsewhere in the step):
            # raised here, before any collective.
            raise ConfigError("with weighting='output', call set_step_weight() before the "
                              "step's first backward()")
        problem = None
        try:
            value = float(count)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value) or value < 0:
            problem = f"Invalid step weight {count!r}, it should be a finite number >= 0"
        # The all-reduce runs even when this rank's call is wrong, so every rank raises
        # together instead of the others waiting for this one.
        total, bad = self.peers.sum([0.0 if problem else value, 1.0 if problem else 0.0])
        if problem:
            raise ConfigError(problem)
        if bad:
            raise ConfigError(f"set_step_weight() was called wrongly on {int(bad)} other "
                              "rank(s) (their error says why); no rank took this step's weight")
        if not total > 0:
            raise ConfigError(f"The step weights sum to {total} over all ranks; at least "
                              "one rank must have a positive weight")
        weighting.next_weight = (value, total)

    def loss_scale(self, local_batch_size: int) -> float:
        """``k·b/B``: multiply a local mean loss by this when not using :meth:`attach` (no DDP)."""
        return self.num_replicas * local_batch_size / self.global_batch_size

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run's position: the epoch and the samples of it already trained.

        With :meth:`attach` it counts batches actually trained (a forward of the attached
        model), however far the loader prefetched; before any trains, it is where the epoch
        started (the resume point after :meth:`load_state_dict`). Without :meth:`attach` a
        batch counts as trained once the sampler yielded it. Plain JSON-serialisable data.
        """
        entry = self._last_step
        epoch = self.epoch
        if entry is not None and entry.epoch == epoch:
            position = entry.position_after
        else:
            position = self._start_position(epoch)
        if position > 0 and self._steps(position) == 0:
            epoch, position = epoch + 1, 0  # the epoch is complete: resume at the next one
        return {"version": 1, "epoch": epoch, "position": int(position),
                "seed": self.seed, "shuffle": self.shuffle, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position from :meth:`state_dict` (world size, plan and B may differ)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            same = (int(state["seed"]), bool(state["shuffle"]), int(state["num_samples"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Invalid sampler state {state!r}: {exc}") from exc
        if same != (self.seed, self.shuffle, self.num_samples):
            raise ConfigError(f"Sampler state was saved with (seed, shuffle, num_samples)={same}, "
                              f"this sampler has {(self.seed, self.shuffle, self.num_samples)}")
        if epoch < 0 or position < 0:
            raise ConfigError(f"Invalid sampler state: epoch {epoch}, position {position}")
        self.epoch = epoch
        self._resume, self._resume_spent = (epoch, position), False
        self._iterated_epoch = None
        # Batches yielded before the resume belong to no step of the resumed run.
        self.ledger.drop_untrained()
        self.ledger.last_trained = self.ledger.last_yielded = None

    def close(self, wait: bool = True) -> None:
        """Flush measurements, then stop the stats sender and the embedded coordinator.

        Call it on every rank at the end of training (it waits, bounded by ``timeout_s``, for
        all ranks, so rank 0 does not stop the coordinator under the others). Also done,
        without waiting, at exit.
        """
        if self.session is None or self.session.closed:
            return
        if self.planner is not None:
            self.planner.close(self.timeout_s, drain=wait)
            if self.session.sender is not None:
                for record in self.planner.take_records():  # after the last round
                    self.session.sender.push(record)
        self.session.flush(min(2.0, self.timeout_s))
        if wait:
            # Bounded by the coordinator timeout: a rank that never comes to close() must not
            # hold the others for the peer timeout.
            self.peers.wait_all(self.timeout_s)
        self.session.close()

    def metrics(self) -> dict[str, float]:
        """The plan in force and what the coordinator measured with it: a flat dict of numbers
        for any tracker, the same on every rank, cheap enough to call every step.

        ``batch_size/rank{i}``, ``busy_ms/rank{i}``, ``samples_per_s/rank{i}``,
        ``predicted_step_ms``, ``equal_step_ms``, ``speedup_vs_equal``, ``imbalance``,
        ``generation``, ``epoch``, ``window``; see :func:`shardbalance._metrics.plan_metrics`.
        With ``equal``/``static`` (no coordinator) only the plan's own figures.
        """
        from ._metrics import plan_metrics

        entry = self._last_step
        plan = entry.plan if entry is not None else self.plan
        stats = None
        if self.planner is not None:
            stats = self.planner.plan_stats.get(plan.digest)
        if stats is None and self.session is not None and self.session.client is not None:
            stats = self.session.client.reported.get(plan.digest)
        return plan_metrics(plan, stats)
