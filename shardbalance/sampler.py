"""The drop-in sampler: each rank's share of every global batch, from a plan all ranks agree on."""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import secrets
import uuid
import warnings
import weakref
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ._env import read_environment
from ._exceptions import ConfigError, CoordinatorError, PlanError
from .client import (CoordinatorClient, EmbeddedCoordinator, StatsSender, external_address,
                     routable_address)
from .order import _CHUNK, EpochOrder
from .plan import Plan, apportion, check_weights, memory_cap, normalize_bounds
from .policies import ADAPTIVE_POLICIES, check_options, check_policy, fit_cost_model
from .timing import (LedgerEntry, OutputWeighting, StepLedger, WeightedCommHook,
                     attach_hook, attach_output_weighting)

__all__ = ["WeightedDistributedSampler"]

log = logging.getLogger("shardbalance")

#: Plans remembered by digest, for ``batch_sizes`` of steps still in flight.
_PLANS_KEPT = 64
_instances = itertools.count()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"Invalid {name} {value!r}, it should be an integer >= {minimum}")
    return int(value)


class WeightedDistributedSampler(Sampler[list[int]]):
    r"""Batch sampler that splits a fixed global batch unevenly, by measured rank speed.

    Every step consumes ``global_batch_size`` (B) consecutive positions of one epoch-wide
    pseudo-random order of the dataset; rank ``i`` takes its slice of ``b_i`` of them, with
    ``Σ b_i = B``. The split (the *plan*) comes from a coordinator that measures how long each
    rank is busy per step, so fast GPUs take more samples and all ranks finish together. Each
    epoch covers the dataset exactly once on every plan, and every rank runs ``len(sampler)``
    steps. Pass it as ``batch_sampler`` to a :class:`~torch.utils.data.DataLoader`, and call
    :meth:`attach` on the DDP model so gradients are weighted by each rank's share.

    Args:
        dataset: any Sized; N = ``len(dataset)``.
        global_batch_size (int): B, samples per optimizer step summed over all ranks.
        num_replicas (int, optional): number of ranks. Default: the torch.distributed world size.
        rank (int, optional): this rank. Default: the torch.distributed rank.
        shuffle (bool, optional): shuffle the order each epoch. Default: ``True``.
        seed (int, optional): seed of the order; must be the same on every rank. Default: ``0``.
        drop_last (bool, optional): drop the last incomplete global batch. If ``False`` it is
            padded to B with samples from the start of the order. Default: ``False``.
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
        coordinator_log (str, optional): journal path of the embedded coordinator. Default:
            ``$SHARDBALANCE_LOG``, else ``shardbalance_logs/<run id>.jsonl``.
        options (dict, optional): policy tunables, see ``policies.DEFAULT_OPTIONS``.
        timeout_s (float, optional): bound on every wait for the coordinator or the peers.
            Default: ``$SHARDBALANCE_TIMEOUT`` or 30.

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
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        coordinator: str | None = None,
        policy: str = "affine",
        initial_weights: Sequence[float] | None = None,
        min_batch_size: int | Sequence[int] = 1,
        max_batch_size: int | Sequence[int] | str | None = None,
        *,
        rebalance_every: int | None = None,
        batch_size_multiple: int = 1,
        micro_batch_size: int | None = None,
        coordinator_log: str | None = None,
        options: dict[str, float] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        try:
            num_samples = len(dataset)
        except TypeError:
            raise ConfigError(f"dataset must have a length, got {type(dataset).__name__}") from None
        self.num_samples = _check_int("dataset length", num_samples, 1)
        self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            if not distributed:
                raise ConfigError("num_replicas is None and torch.distributed is not initialized; "
                                  "call init_process_group() first or pass num_replicas and rank")
            num_replicas = dist.get_world_size()
        if rank is None:
            if not distributed:
                raise ConfigError("rank is None and torch.distributed is not initialized; "
                                  "call init_process_group() first or pass num_replicas and rank")
            rank = dist.get_rank()
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or \
                not 0 <= rank < self.num_replicas:
            raise ConfigError(f"Invalid rank {rank}, rank should be in the interval "
                              f"[0, {self.num_replicas - 1}]")
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = _check_int("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.policy = check_policy(policy)
        self.quantum = _check_int("batch_size_multiple", batch_size_multiple, 1)
        self.micro_batch_size = None
        if micro_batch_size is not None:
            self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size, 1)
            self.quantum = math.lcm(self.quantum, self.micro_batch_size)
        self._memory_caps_pending = isinstance(max_batch_size, str)
        if self._memory_caps_pending:
            if max_batch_size != "auto":
                raise ConfigError(f"Invalid max_batch_size {max_batch_size!r}: expected an "
                                  "integer, one per rank, or 'auto'")
            max_batch_size = None
        self._min_batch_size = min_batch_size
        self.min_sizes, self.max_sizes = normalize_bounds(
            self.num_replicas, self.global_batch_size, min_batch_size, max_batch_size, self.quantum)
        if isinstance(initial_weights, str) and initial_weights != "probe":
            raise ConfigError(f"Invalid initial_weights {initial_weights!r}: expected per-rank "
                              "numbers or 'probe'")
        #: The first plan's weights are to be measured by probe().
        self._probe_weights = isinstance(initial_weights, str)
        self.initial_weights = (None if initial_weights is None or isinstance(initial_weights, str)
                                else check_weights(initial_weights, self.num_replicas))
        if rebalance_every is not None:
            rebalance_every = _check_int("rebalance_every", rebalance_every, 1)
        self.rebalance_every = rebalance_every
        check_options(options)
        self._user_options = dict(options or {})
        env = read_environment()
        self.timeout_s = float(env.timeout_s if timeout_s is None else timeout_s)
        if not self.timeout_s > 0:
            raise ConfigError(f"Invalid timeout_s {timeout_s!r}, it should be > 0")
        #: Bound on waits for peers (plan agreement): much longer than a coordinator request.
        self.peer_timeout_s = max(env.peer_timeout_s, self.timeout_s)
        self.generation = env.restart_count
        self.epoch = 0
        self.ledger = StepLedger()
        self.recent_busy: list[tuple[int, int, int, float]] = []
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._serial = 0
        self._iterated_epoch: int | None = None
        self._resume: tuple[int, int] | None = None
        self._hook: WeightedCommHook | OutputWeighting | None = None
        self._client: CoordinatorClient | None = None
        self._sender: StatsSender | None = None
        self._embedded: EmbeddedCoordinator | None = None
        self._group = None
        self.coordinator_address: str | None = None
        self.run_id = "local"
        self._adopt_initial_plan()
        if self.adaptive:
            try:
                self._connect(coordinator or env.coordinator, env, coordinator_log, distributed)
            except BaseException:
                _shutdown(self._sender, self._client, self._embedded)
                raise
        self._finalizer = weakref.finalize(self, _shutdown, self._sender, self._client,
                                           self._embedded)

    # -- setup ---------------------------------------------------------------------------

    @property
    def _probe_pending(self) -> bool:
        """probe() must run before the first epoch (for the weights or the memory caps)."""
        return self._probe_weights or self._memory_caps_pending

    @property
    def _last_step(self) -> LedgerEntry | None:
        """The newest step: trained (with a gradient weighting attached) or yielded."""
        return self.ledger.last_trained if self._hook is not None else self.ledger.last_yielded

    def _adopt_initial_plan(self) -> None:
        """The local first plan: ``initial_weights`` (equal if None) within the bounds."""
        initial = Plan("local", self.generation, 0, 0,
                       apportion(self.initial_weights or (1.0,) * self.num_replicas,
                                 self.global_batch_size, self.min_sizes, self.max_sizes,
                                 self.quantum), self.global_batch_size, self.policy)
        self._agreed = initial
        self._remember(initial)

    @property
    def adaptive(self) -> bool:
        """Whether plans come from a coordinator (False for ``equal`` and ``static``)."""
        return self.policy in ADAPTIVE_POLICIES

    def _connect(self, address: str | None, env, coordinator_log: str | None,
                 distributed: bool) -> None:
        if self.num_replicas > 1 and not distributed:
            raise ConfigError(f"policy {self.policy!r} with {self.num_replicas} ranks needs "
                              "torch.distributed (ranks must agree on every plan); initialize "
                              "the process group first, or use policy='equal' or 'static'")
        instance = next(_instances)
        store = _default_store() if distributed else None
        prefix = f"shardbalance/g{self.generation}/s{instance}/"
        leader = (dist.get_rank() == 0) if distributed else True
        self._peer_group()
        if leader:
            run_id = uuid.uuid4().hex[:12]
            if store is not None:
                # One run id for the whole job: an elastic restart keeps it (the rendezvous
                # store outlives the workers) and only the generation moves on.
                run_id = store.compare_set(f"shardbalance/run/s{instance}", "", run_id).decode()
            secret = env.token
            if address is None:
                secret = secrets.token_hex(32).encode()
                bind = env.bind or f"tcp://{_coordinator_host(env)}:0"
                journal = coordinator_log or env.log_path or f"shardbalance_logs/{run_id}.jsonl"
                _ensure_parent(journal)
                self._embedded = EmbeddedCoordinator(bind, journal, secret, self.timeout_s)
                address = self._embedded.endpoint
                if "0.0.0.0" in address or "*" in address:
                    host = _coordinator_host(env)
                    address = address.replace("0.0.0.0", host).replace("*", host)
                log.info("shardbalance: embedded coordinator at %s (pid %d), journal %s",
                         address, self._embedded.pid, journal)
            if store is not None:
                store.set(prefix + "run", run_id)
                store.set(prefix + "address", address)
                store.set(prefix + "secret", (secret or b"").decode())
        if self._group is not None:
            # Keys of an earlier rendezvous round may still be in the store: read only after
            # rank 0 has written this round's.
            dist.barrier(group=self._group)
        if not leader:
            keys = [prefix + k for k in ("run", "address", "secret")]
            try:
                store.wait(keys, timedelta(seconds=self.timeout_s))
            except Exception as exc:  # the store raises its own timeout types
                raise CoordinatorError(
                    f"rank {self.rank} waited {self.timeout_s:g} s for rank 0 to publish the "
                    f"coordinator address: {exc}") from exc
            run_id, address, secret = (store.get(k).decode() for k in keys)
            secret = secret.encode() or None
        self.run_id = run_id
        self.coordinator_address = address
        self._client = CoordinatorClient(address, secret, timeout_s=min(5.0, self.timeout_s),
                                         retries=max(1, int(self.timeout_s // 5)))
        self._sender = StatsSender(address, secret, {
            "run": run_id, "generation": self.generation, "rank": self.rank,
            "world_size": self.num_replicas})
        self._check_same_config()

    def _check_same_config(self) -> None:
        """Refuse to start when ranks were built with different settings (one all-reduce)."""
        if self._group is None:
            return
        config = [self.num_samples, self.global_batch_size, self.seed, self.shuffle,
                  self.drop_last, self.policy, self.min_sizes, self.max_sizes, self.quantum,
                  self._memory_caps_pending, self.initial_weights, self.rebalance_every, sorted(self._user_options.items()),
                  self.run_id]
        digest = int(hashlib.sha256(repr(config).encode()).hexdigest()[:15], 16)
        if not self._same_on_every_rank(digest):
            raise ConfigError(
                "the ranks built their samplers with different settings (dataset length, "
                "global_batch_size, seed, shuffle, drop_last, policy, bounds, "
                "batch_size_multiple, initial_weights, rebalance_every or options); every "
                "rank must pass the same values")

    # -- DistributedSampler-like API -------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch: the order and the plan key. Call it before each epoch's iterator."""
        self.epoch = _check_int("epoch", epoch, 0)

    def _start_position(self, epoch: int) -> int:
        if self._resume is not None and self._resume[0] == epoch:
            return self._resume[1]
        return 0

    def _steps(self, start: int) -> int:
        remaining = self.num_samples - start
        if remaining <= 0:
            return 0
        if self.drop_last:
            return remaining // self.global_batch_size
        return math.ceil(remaining / self.global_batch_size)

    def __len__(self) -> int:
        """Optimizer steps in the current epoch: the same on every rank, whatever the plan."""
        return self._steps(self._start_position(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        if self._probe_pending:
            raise ConfigError("initial_weights='probe' or max_batch_size='auto': call "
                              "sampler.probe(step_fn) on every rank before the first epoch")
        epoch = self.epoch
        if self._iterated_epoch == epoch:
            warnings.warn(f"iterating epoch {epoch} again without set_epoch(): the order and "
                          "the samples will repeat. Call sampler.set_epoch(epoch) before each "
                          "epoch", UserWarning, stacklevel=2)
        self._serial += 1
        self.ledger.drop_untrained()
        if self._hook is not None:
            self._hook.reset()
        # The resume point is dropped only once a generator of that epoch starts: a
        # multi-worker DataLoader creates an iterator it never uses before the one it does.
        return self._batches(epoch, self._start_position(epoch), self._serial)

    def _batches(self, epoch: int, start: int, serial: int) -> Iterator[list[int]]:
        order = EpochOrder(self.num_samples, self.seed, epoch, self.shuffle)
        steps = self._steps(start)
        window = self.rebalance_every or max(steps, 1)
        big_b = self.global_batch_size
        self._iterated_epoch = epoch
        if self._resume is not None and self._resume[0] == epoch:
            self._resume = None
        for first in range(0, steps, window):
            plan = self._plan_for(epoch, first)
            b = plan.batch_sizes[self.rank]
            offset = plan.offset(self.rank)
            last = min(first + window, steps)
            # Steps per pass of the order: _CHUNK positions bound the sampler's memory.
            per_chunk = max(1, _CHUNK // max(b, 1))
            lane = np.arange(b, dtype=np.int64)
            ledger = self.ledger
            ledger.window = (serial, epoch, b, plan.digest, start, big_b)
            for c0 in range(first, last, per_chunk):
                c1 = min(c0 + per_chunk, last)
                step_ids = np.arange(c0, c1, dtype=np.int64)
                positions = (start + offset + step_ids * big_b)[:, None] + lane[None, :]
                rows = order.indices(positions).tolist()
                for step, row in enumerate(rows, c0):
                    # Checked per step: attach() may come after this iterator started.
                    if ledger.tracking:
                        ledger.append(LedgerEntry(serial, epoch, step, b, plan.digest,
                                                  start + (step + 1) * big_b))
                    else:
                        ledger.step = step
                    yield row

    # -- plans -----------------------------------------------------------------------------

    def _remember(self, plan: Plan) -> None:
        self._plans[plan.digest] = plan
        self._plans.move_to_end(plan.digest)
        while len(self._plans) > _PLANS_KEPT:
            self._plans.popitem(last=False)

    def _plan_for(self, epoch: int, window: int) -> Plan:
        """The plan of ``(epoch, window)``: fetched, then adopted only if every rank holds it."""
        if not self.adaptive:
            plan = self._agreed.moved_to(epoch, window)
            self._remember(plan)
            return plan
        if self._sender is not None:
            self._sender.flush(min(1.0, self.timeout_s))
        if self._group is not None:
            # Every rank's measurements so far are in before anyone asks for the next plan.
            dist.barrier(group=self._group)
        candidate: Plan | None = None
        try:
            candidate = self._client.plan(
                run=self.run_id, generation=self.generation, rank=self.rank,
                world_size=self.num_replicas, epoch=epoch, window=window,
                global_batch_size=self.global_batch_size, policy=self.policy,
                min_sizes=list(self.min_sizes), max_sizes=list(self.max_sizes),
                quantum=self.quantum,
                initial_weights=None if self.initial_weights is None else list(self.initial_weights),
                options=self._user_options)
            self._check_plan(candidate)
        except (CoordinatorError, PlanError) as exc:
            warnings.warn(f"shardbalance: no plan for epoch {epoch} step {window} ({exc}); "
                          "keeping the plan all ranks agreed on last", RuntimeWarning)
            candidate = None
        if self._agree(candidate):
            self._agreed = candidate
            plan = candidate
        else:
            if candidate is not None:
                warnings.warn(f"shardbalance: ranks disagree on the plan for epoch {epoch} step "
                              f"{window}; keeping the last agreed plan", RuntimeWarning)
            plan = self._agreed.moved_to(epoch, window)
        self._remember(plan)
        return plan

    def _check_plan(self, plan: Plan) -> None:
        for rank, (b, lo, hi) in enumerate(zip(plan.batch_sizes, self.min_sizes, self.max_sizes)):
            if not lo <= b <= hi or b % self.quantum:
                raise PlanError(f"plan {list(plan.batch_sizes)} gives rank {rank} {b} samples, "
                                f"outside [{lo}, {hi}] or not a multiple of {self.quantum}")

    def _agree(self, candidate: Plan | None) -> bool:
        """True iff every rank holds ``candidate`` (one all-reduce of its digest)."""
        digest = candidate.digest_int if candidate is not None else 0
        if self._group is None:
            return candidate is not None
        # Every rank joins the all-reduce, also one without a candidate: skipping it would
        # leave the others waiting in it (and the ranks' collectives out of step).
        same = self._same_on_every_rank(digest)
        return digest != 0 and same

    def _peer_group(self):
        """The dedicated gloo group for agreement among ranks (created on first use; None
        without torch.distributed or with one rank). Every rank must ask at the same point.

        Peers may legitimately be minutes apart (a checkpoint, an evaluation on one rank):
        waits on this group get the peer timeout, not the coordinator's.
        """
        if self._group is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo",
                                         timeout=timedelta(seconds=self.peer_timeout_s))
        return self._group

    def _same_on_every_rank(self, value: int) -> bool:
        """One all-reduce (max of value and of -value) tells whether every rank passed it."""
        both = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self._group)
        return int(both[0]) == value and -int(both[1]) == value

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The plan of the last trained step (of the newest plan before any step trained).

        Identical on every rank; sums to ``global_batch_size``.
        """
        entry = self._last_step
        if entry is not None and entry.digest in self._plans:
            return self._plans[entry.digest].batch_sizes
        return self._agreed.batch_sizes

    @property
    def plan(self) -> Plan:
        """The newest plan all ranks agreed on."""
        return self._agreed

    # -- training side ------------------------------------------------------------------

    def attach(self, model: torch.nn.Module, comm_hook=None, comm_state: Any = None,
               weighting: str = "hook") -> None:
        """Weight each rank's gradient by ``b_i/B`` and measure this rank's busy time per step.

        ``weighting="hook"`` (default) registers a DDP comm hook that pre-scales each gradient
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

        Either way the averaged gradient is that of the mean loss over the global batch.
        """
        if self._hook is not None:
            raise ConfigError("attach() was already called on this sampler")
        if weighting not in ("hook", "output"):
            raise ConfigError(f"Invalid weighting {weighting!r}, it should be 'hook' or 'output'")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        world = model.process_group.size() if hasattr(model, "process_group") \
            else self.num_replicas
        if world != self.num_replicas:
            raise ConfigError(f"the DDP model spans {world} ranks but the sampler "
                              f"num_replicas={self.num_replicas}")
        hook: WeightedCommHook | OutputWeighting
        if weighting == "output":
            hook = OutputWeighting(self.ledger, self.global_batch_size, self.num_replicas,
                                   self._on_busy, device, list(model.parameters()))
            attach_output_weighting(model, hook, comm_hook, comm_state)
        else:
            if comm_hook is None and comm_state is None:
                comm_state = getattr(model, "process_group", None)
            hook = WeightedCommHook(self.ledger, self.global_batch_size, self.num_replicas,
                                    self._on_busy, device, comm_hook, comm_state)
            attach_hook(model, hook)
        self.ledger.drop_untrained()
        self.ledger.tracking = True
        self._hook = hook

    def _on_busy(self, entry: LedgerEntry, busy_s: float) -> None:
        record = (entry.epoch, entry.step, entry.batch_size, busy_s)
        self.recent_busy.append(record)
        if len(self.recent_busy) > 4096:
            del self.recent_busy[:2048]
        if self._sender is not None:
            self._sender.push(record)

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
        (set as ``initial_weights``), or, when ``initial_weights`` were given as numbers or the
        policy is ``equal`` or ``static``, those weights, kept.

        With ``max_batch_size="auto"`` it also sets each rank's cap: on CUDA, the peak memory
        allocated at the two sizes gives a fixed and a per-sample cost, and the cap is the
        largest batch whose peak fits ``memory_fraction`` of the memory this process can use
        (its cached blocks plus the device's free memory, which counts other processes). State
        created later (e.g. Adam's moments at the first ``opt.step()``) is not in the fixed
        cost when the probe runs first: leave room with ``memory_fraction``. A CPU rank is not
        capped.
        """
        per_rank = self.global_batch_size // self.num_replicas
        if sizes is None:
            # The same on every rank (the bounds are), so all ranks time the same two sizes.
            sizes = (max(max(self.min_sizes), per_rank // 2),
                     max(per_rank, max(self.min_sizes) + 1))
        small, large = (int(b) for b in sizes)
        if not 1 <= small < large:
            raise ConfigError(f"Invalid probe sizes {tuple(sizes)}: need two sizes 1 <= a < b")
        repeats = _check_int("repeats", repeats, 1)
        group = self._peer_group()
        if group is None and self.num_replicas > 1:
            raise ConfigError(f"probe() needs torch.distributed initialized over the "
                              f"num_replicas={self.num_replicas} ranks: every rank probes and "
                              "the ranks exchange their figures")
        fraction = float(memory_fraction)
        if not 0 < fraction <= 1:
            raise ConfigError(f"Invalid memory_fraction {memory_fraction!r}, it should be in "
                              "(0, 1]")
        device = _probe_device(model) if self._memory_caps_pending else torch.device("cpu")
        if self._hook is not None:
            self._hook.paused = True
        try:
            seconds, peaks = _time_steps(step_fn, (small, large), repeats, model, device)
        finally:
            if self._hook is not None:
                self._hook.paused = False
        cap = float(self.global_batch_size)
        if peaks is not None:
            free, _ = torch.cuda.mem_get_info(device)
            budget = fraction * (free + torch.cuda.memory_reserved(device))
            cap = float(memory_cap((small, large), peaks, budget, self.global_batch_size))
        times = torch.tensor([*seconds, cap], dtype=torch.float64)
        if group is not None:
            gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(self.num_replicas)]
            dist.all_gather(gathered, times, group=group)
            times = torch.stack(gathered)
        else:
            times = times.reshape(1, 3)
        if self._memory_caps_pending:
            caps = [int(c) for c in times[:, 2].tolist()]
            try:
                self.min_sizes, self.max_sizes = normalize_bounds(
                    self.num_replicas, self.global_batch_size, self._min_batch_size, caps,
                    self.quantum)
            except ConfigError as exc:
                raise ConfigError(f"max_batch_size='auto': the free memory of the ranks allows "
                                  f"at most {caps} samples per step: {exc}") from None
        if self._probe_weights or (self.initial_weights is None and self.adaptive):
            # Every rank has the same numbers and does the same arithmetic: the same weights.
            history = tuple(np.array([[small, t[0]], [large, t[1]]]) for t in times.tolist())
            targets, _ = fit_cost_model(history).equal_finish(
                self.min_sizes, self.max_sizes, self.global_batch_size)
            self.initial_weights = check_weights([max(float(t), 1e-9) for t in targets],
                                                 self.num_replicas)
        # Otherwise the weights the user chose (or the policy defines) stay; the bounds moved.
        self._probe_weights = self._memory_caps_pending = False
        self._adopt_initial_plan()
        return self.initial_weights or (1.0,) * self.num_replicas

    def accumulate(self, loader: Iterable, model: torch.nn.Module | None = None
                   ) -> Iterator[tuple[Any, float, bool]]:
        """Cut each step's local batch into micro-batches of ``micro_batch_size``.

        Yields ``(micro_batch, loss_scale, is_last_of_step)``. Multiply each micro-batch's mean
        loss by ``loss_scale`` (``micro_batch_size / b_i``) before ``backward()`` and step the
        optimizer when ``is_last_of_step``. With the DDP ``model`` given, every micro-batch but
        the last of a step runs under ``model.no_sync()``, so the comm hook fires once per
        step, on the accumulated gradient, with the step's own ``b_i/B`` weight: the result is
        exactly the global-batch mean gradient. Ranks run different numbers of micro-batches,
        so no collective may run per micro-batch: SyncBatchNorm (an all-reduce in every
        forward) is refused; plain BatchNorm normalises over each micro-batch.
        """
        if self.micro_batch_size is None:
            raise ConfigError("accumulate() needs micro_batch_size set on the sampler")
        if self._hook is not None and model is None:
            raise ConfigError("accumulate() on an attached sampler needs the DDP model, so "
                              "that every micro-batch but a step's last runs under no_sync()")
        if model is not None and any(isinstance(m, torch.nn.SyncBatchNorm)
                                     for m in model.modules()):
            raise ConfigError("accumulate() cannot be used with SyncBatchNorm: ranks run "
                              "different numbers of micro-batches per step, and SyncBatchNorm "
                              "would wait for a peer in every forward")
        m = self.micro_batch_size
        for batch in loader:
            size = _batch_len(batch)
            if size % m:
                raise PlanError(f"a step's batch of {size} samples is not a multiple of "
                                f"micro_batch_size={m}")
            count = size // m
            for j in range(count):
                micro = _slice_batch(batch, j * m, (j + 1) * m)
                last = j == count - 1
                if last or model is None:
                    yield micro, m / size, last
                else:
                    with model.no_sync():
                        yield micro, m / size, last

    def set_step_weight(self, count: float) -> None:
        """Weight this step's gradient by ``count`` instead of the local batch size.

        For losses normalised by something other than the local sample count, e.g. a
        token-mean loss: pass this rank's token count for the step, before its (first)
        ``backward()``. The global total comes from one scalar all-reduce, and the gradient
        weighting then weights this rank's gradient by ``count / total``, so the result is the
        gradient of the loss normalised over all tokens of the global batch. Call it on every
        rank at every step (or at none).
        """
        if self._hook is None:
            raise ConfigError("set_step_weight() needs attach(model) first")
        if self._hook.mid_step:
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
        both = torch.tensor([0.0 if problem else value, 1.0 if problem else 0.0],
                            dtype=torch.float64)
        group = self._peer_group()
        if group is not None:
            dist.all_reduce(both, group=group)
        total, bad = both.tolist()
        if problem:
            raise ConfigError(problem)
        if bad:
            raise ConfigError(f"set_step_weight() was called wrongly on {int(bad)} other "
                              "rank(s) (their error says why); no rank took this step's weight")
        if not total > 0:
            raise ConfigError(f"The step weights sum to {total} over all ranks; at least "
                              "one rank must have a positive weight")
        self._hook.next_weight = (value, total)

    def loss_scale(self, local_batch_size: int) -> float:
        """``k·b/B``: multiply a local mean loss by this when not using :meth:`attach` (no DDP)."""
        return self.num_replicas * local_batch_size / self.global_batch_size

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run's position: the epoch and the samples of it already trained.

        With :meth:`attach` it counts steps actually trained; without, a batch counts as
        trained once the sampler yielded it. Plain JSON-serialisable data.
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
        self._resume = (epoch, position)
        self._iterated_epoch = None

    def close(self) -> None:
        """Flush measurements, then stop the stats sender and the embedded coordinator.

        Call it on every rank at the end of training (it waits for all ranks, so rank 0 does
        not stop the coordinator under the others). Also done, without waiting, at exit.
        """
        if not self._finalizer.alive:
            return
        if self._sender is not None:
            self._sender.flush(min(2.0, self.timeout_s))
        if self._group is not None and dist.is_initialized():
            try:
                # Bounded by the coordinator timeout: a rank that never comes to close()
                # must not hold the others for the peer timeout.
                dist.monitored_barrier(group=self._group,
                                       timeout=timedelta(seconds=self.timeout_s))
            except RuntimeError as exc:
                warnings.warn(f"shardbalance: not every rank reached close() ({exc}); "
                              "stopping anyway", RuntimeWarning)
        self._finalizer()


def _shutdown(sender: StatsSender | None, client: CoordinatorClient | None,
              embedded: EmbeddedCoordinator | None) -> None:
    if sender is not None:
        sender.flush(1.0)
        sender.close()
    if client is not None:
        client.close()
    if embedded is not None:
        embedded.stop()


def _probe_device(model: torch.nn.Module | None) -> torch.device:
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
    import contextlib
    import random
    import time

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


def _batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch and \
            isinstance(batch[0], (torch.Tensor, list, tuple, dict)):
        return _batch_len(batch[0])
    return len(batch)  # e.g. a collated list of strings


def _slice_batch(batch, start: int, stop: int):
    """The same structure as a collated batch (tensors, tuples, lists, dicts), rows sliced."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: _slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_slice_batch(v, start, stop) for v in batch)
    if isinstance(batch, list):
        if batch and isinstance(batch[0], (torch.Tensor, list, tuple, dict)):
            return [_slice_batch(v, start, stop) for v in batch]
        return batch[start:stop]
    return batch[start:stop]


def _coordinator_host(env) -> str:
    """The address the other ranks reach rank 0 by; never loopback when the job spans nodes."""
    host = routable_address(env.master_addr, env.master_port)
    if host.startswith("127.") and env.spans_nodes:
        # MASTER_ADDR is this host's name and /etc/hosts maps it to a loopback address.
        host = external_address()
        if host is None:
            raise ConfigError(
                "the job spans several nodes but rank 0's host name resolves only to a "
                "loopback address; set SHARDBALANCE_BIND=tcp://<this node's IP>:0")
    return host


def _default_store():
    """The store torch.distributed rendezvoused with (no public accessor exists)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _ensure_parent(path: str) -> None:
    import os

    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
