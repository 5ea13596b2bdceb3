"""The training side of a step: each trained batch's gradient weight and this rank's busy time.

The contract with the training loop is **one forward per trained batch**: every forward of the
attached model in training mode with gradients enabled trains the next batch the sampler
yielded, and takes that batch's entry from the :class:`~shardbalance._ledger.StepLedger`
(``accumulate()`` feeds one entry's micro-batches as one batch). Batches trained between two
synchronised backward passes (gradient accumulation under ``no_sync()``) form one optimizer
step, a *group*. Three weightings:

- :class:`WeightedCommHook` (``weighting="hook"``, the default): a DDP comm hook scales the
  group's accumulated gradient by ``b_i/B``; exact for any loss that is a mean over the local
  batch; a plan change inside a group is refused (the hook sees only the sum).
- :class:`OutputWeighting` (``weighting="output"``): one autograd node after the model's outputs
  scales each batch's output gradient by its own ``k·b_i/B``; no comm hook.
- ``OutputWeighting(scale=False)`` (``weighting="none"``): measures busy time, changes no
  gradient, for losses already normalised over all ranks.

Busy time of a step: from the end of the previous step's all-reduce to the moment this step's
gradients are ready (the last bucket, or the end of the synchronised backward), split over the
group's batches by their sizes. On CUDA with events read later, on CPU with a monotonic clock.
The hooks run on the autograd thread: they only append to buffers.

"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from . import _torch_compat as compat
from ._compute import BusyClock, ComputeClock
from ._exceptions import ConfigError, PlanError
from ._ledger import LedgerEntry, StepLedger

__all__ = ["BusyClock", "WeightedCommHook", "OutputWeighting", "weighted_comm_hook",
           "attach_hook", "attach_output_weighting"]


HookFn = Callable[[Any, dist.GradBucket], torch.futures.Future]


class _StepWeighting:
    """What every weighting shares: a ledger entry per trained batch (taken in a forward hook),
    batches grouped into optimizer steps, each step's gradient weight ``b_i/B`` (or
    ``count/total`` from ``set_step_weight``), and the busy-time marks."""

    #: Whether the all-reduce after us sums (the weight is ``b_i/B``) or averages (``k·b_i/B``).
    sums = False
    #: Whether a plan change inside a group can be weighted exactly (per batch) or not.
    per_batch = True

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device,
                 check_batch_size: bool = True) -> None:
        #: Compute-only busy time (set by attach() where collectives run inside the step).
        self.compute: ComputeClock | None = None
        #: FSDP2's parameter groups (an FSDP2 model): they tell a synchronised backward.
        self.fsdp_groups: list[Any] | None = None
        #: ``(entry, compute spans)`` of the open step's forwards.
        self._spans: list[tuple[LedgerEntry, list]] = []
        self.ledger = ledger
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.on_busy = on_busy
        self.check_batch_size = check_batch_size
        self.clock = BusyClock(device)
        #: The batches trained since the last synchronised backward: the open optimizer step.
        self.group: list[LedgerEntry] = []
        #: The newest trained batch's entry.
        self.entry: LedgerEntry | None = None
        #: The newest step's gradient weight (``b_i/B`` or ``count/total``).
        self.weight = 1.0 / world_size
        #: ``(count, global total)`` for the open step, set by ``set_step_weight``.
        self.next_weight: tuple[float, float] | None = None
        #: Optimizer steps (synchronised backward passes) weighted so far.
        self.steps = 0
        #: The most loader batches one step has accumulated so far.
        self.largest_group = 0
        #: Set while ``probe()`` runs its steps: they train no batch of the dataset.
        self.paused = False
        #: Set by ``accumulate()``: ``(forwards, rows each)`` of the next batch's micro-batches.
        self._micro: tuple[int, int] | None = None
        #: Forwards still to come that train the newest entry's batch (its micro-batches).
        self._reuse = 0
        self._backward_ran = False
        #: The newest batch's forward ran outside ``no_sync()``: its backward closes a step.
        self._sync_forward = False
        self._previous: LedgerEntry | None = None
        self._previous_done: Any = None

    @property
    def mid_step(self) -> bool:
        """A backward of the open step ran with its weight already applied."""
        return False

    @property
    def starts_batch(self) -> bool:
        """Whether the next training forward takes a new batch (not a micro-batch of the
        newest one, nor a probe's)."""
        return not self.paused and not self._reuse

    def reset(self) -> None:
        """Forget the open step (a new iterator started, the old one's batches are gone)."""
        self.group = []
        self.next_weight, self._micro, self._reuse, self._backward_ran = None, None, 0, False
        self._sync_forward = False
        self._spans = []
        self._previous = self._previous_done = None

    # -- forward: one entry per trained batch ----------------------------------------------

    def on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        spans = self.compute.take() if self.compute is not None else None
        if self.paused or not module.training or not torch.is_grad_enabled():
            return output
        if self._reuse:
            self._reuse -= 1
            entry = self.entry
        else:
            entry = self._take(module, args, kwargs)
        self._sync_forward = self.synced(module)
        if spans is not None:
            self._spans.append((entry, spans))
        return self._wrap(module, output, entry)

    def synced(self, module: torch.nn.Module) -> bool:
        """Whether a backward of this forward synchronises gradients (outside ``no_sync()`` /
        ``set_requires_gradient_sync(False)``)."""
        if self.fsdp_groups is not None:
            return compat.fsdp_reduces_gradients(self.fsdp_groups)
        return bool(getattr(module, "require_backward_grad_sync", False))

    def expect_micro_batches(self, count: int, rows: int) -> None:
        """The next batch is trained in ``count`` forwards of ``rows`` samples each."""
        self._micro = (count, rows)

    def _take(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> LedgerEntry:
        entry = self.ledger.peek()
        if entry is None:
            self.ledger.pop()  # raises: a batch the sampler did not yield
        if self.group and self._sync_forward:
            # The previous batch's forward was a synchronised one (outside no_sync()) and no
            # backward closed its step: the loop skipped it after its forward (a non-finite
            # loss) or its backward failed. It trains nothing; the batches accumulated before
            # it under no_sync() stay in the group.
            dropped = self.group.pop()
            self._spans = [(e, sp) for e, sp in self._spans if e is not dropped]
            self._backward_ran = False
        forwards, expected = self._micro or (1, entry.batch_size)
        self._micro = None
        rows = _leading_rows(args, kwargs) if self.check_batch_size else None
        if rows is not None and rows != expected:
            raise PlanError(
                f"the model is training a batch of {rows} samples but the sampler's next batch "
                f"(epoch {entry.epoch} step {entry.step}) has {entry.batch_size}: a batch was "
                "skipped without a forward, the loader reorders batches (DataLoader(in_order="
                "False)), or the model's input is not batch-first. Every yielded batch must be "
                "trained in order with one forward (attach(..., check_batch_size=False) turns "
                "this check off for inputs that are not batch-first)")
        if self.group and not self.per_batch and \
                entry.plan.batch_sizes != self.group[0].plan.batch_sizes:
            raise PlanError(
                f"the plan changed inside a gradient accumulation group (epoch {entry.epoch} "
                f"step {entry.step}): weighting='hook' weights the accumulated gradient once and "
                "cannot weight its batches differently. Pass accumulation_steps= to the sampler "
                "so plans change only between groups, or attach with weighting='output'")
        self.ledger.pop()
        self.entry = entry
        self.group.append(entry)
        self._reuse = forwards - 1
        return entry

    def _wrap(self, module: torch.nn.Module, output: Any, entry: LedgerEntry) -> Any:
        return output

    def share(self, entry: LedgerEntry) -> float:
        """The gradient weight of one batch of the open step."""
        if self.next_weight is not None:
            count, total = self.next_weight
            return count / total
        return entry.batch_size / self.global_batch_size

    # -- the end of a step -----------------------------------------------------------------

    def _close_step(self) -> list[LedgerEntry]:
        """The open step's batches, now synchronised; the step's busy time ends here."""
        group, self.group = self.group, []
        self.largest_group = max(self.largest_group, len(group))
        self.weight = self.share(group[-1])
        self.next_weight, self._backward_ran = None, False
        self.steps += 1
        previous = self._previous
        # Discarded: DDP's first iteration, an iterator's first step, a step after a shape change.
        steady = (previous is not None and self.steps > 1 and previous.serial == group[0].serial
                  and all(e.batch_size == previous.batch_size for e in group))
        if self.compute is not None:
            spans = [span for _, entry_spans in self._spans for span in entry_spans]
            self._spans = []
            if steady:
                self.compute.measure_spans(tuple(group), spans)
            measured = self.compute.ready()
        else:
            ready = self.clock.now()
            if steady and self._previous_done is not None:
                self.clock.measure(self._previous_done, ready, tuple(group))
            measured = self.clock.ready()
        for entries, seconds in measured:
            rows = sum(e.batch_size for e in entries)
            for e in entries:
                self.on_busy(e, seconds * e.batch_size / rows)
        self._previous, self._previous_done = group[-1], None
        return group

    def _mark_done(self) -> None:
        self._previous_done = self.clock.now()


class WeightedCommHook(_StepWeighting):
    """DDP comm hook: weight each rank's gradient by its share of the global batch.

    Each bucket is pre-scaled by ``b_i/B`` and summed over ranks (one pass over the gradients,
    like DDP's built-in all-reduce), or, with an averaging hook of the user's (e.g. fp16
    compression), pre-scaled by ``k·b_i/B`` (in fp32 for 16-bit buckets) and handed to it.
    Either way the result is ``Σ_i (b_i/B)·g_i``: the gradient of the mean loss over the whole
    global batch, whatever the loss is made of. Under gradient accumulation the hook sees the
    group's sum once, so every batch of a group must have the same ``b_i`` (refused otherwise).
    The last bucket of each step also marks the end of the rank's busy time.
    """

    per_batch = False

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device,
                 inner_hook: HookFn | None = None, inner_state: Any = None,
                 check_batch_size: bool = True) -> None:
        super().__init__(ledger, global_batch_size, world_size, on_busy, device,
                         check_batch_size)
        # Without a user hook, the mean's 1/k is folded into the pre-scale and the buckets are
        # summed: one pass over the gradients, as DDP's own all-reduce makes.
        self.sums = inner_hook is None
        self.inner_hook = _allreduce_sum if inner_hook is None else inner_hook
        self.inner_state = inner_state
        self._scale = 1.0

    def on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if bucket.index() == 0:
            if not self.group:
                raise PlanError("a synchronised backward ran without a training forward of the "
                                "attached model: shardbalance cannot tell which batch it trained")
            share = self.share(self.group[-1])
            self._scale = share if self.sums else self.world_size * share
        last = bucket.is_last()
        if last:
            self._close_step()
        buffer = bucket.buffer()
        if buffer.dtype in (torch.float16, torch.bfloat16):
            buffer.copy_(buffer.float().mul_(self._scale))
        else:
            buffer.mul_(self._scale)
        fut = self.inner_hook(self.inner_state, bucket)
        if last:
            fut = fut.then(self._done)
        return fut

    def _done(self, fut: torch.futures.Future) -> Any:
        self._mark_done()
        return fut.value()


class _ScaleGradient(torch.autograd.Function):
    """Identity on the model's output tensors; multiplies their gradients by their batch's scale.

    One node for all outputs, downstream of the model: an output computed inside the model
    from another output (a loss from the logits) is scaled once, on its way out, and the
    gradient it sends to the other one inside the model is not scaled again.
    """

    @staticmethod
    def forward(ctx, weighting: "OutputWeighting", entry: LedgerEntry, synced: bool,
                *tensors: torch.Tensor):
        ctx.weighting, ctx.entry, ctx.synced = weighting, entry, synced
        ctx.set_materialize_grads(False)
        # Views cost nothing; a scalar (a loss) is copied, so that the loop may scale it in
        # place (the HF Trainer's ``loss *= world_size``) without autograd refusing a view.
        return tuple(t.clone() if t.dim() == 0 else t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        scale = ctx.weighting.on_backward(ctx.entry, ctx.synced)
        if scale is None or scale == 1.0:
            return (None, None, None, *grads)
        return (None, None, None, *(None if g is None else _scaled(g, scale) for g in grads))


def _scaled(grad: torch.Tensor, scale: float) -> torch.Tensor:
    # In fp32 for 16-bit gradients, as the comm hook does for 16-bit buckets.
    if grad.dtype in (torch.float16, torch.bfloat16):
        return grad.float().mul_(scale).to(grad.dtype)
    return grad * scale


class OutputWeighting(_StepWeighting):
    """Weight each batch's gradient at the model's output; DDP's own all-reduce averages.

    The forward hook passes the output tensors that require grad through one autograd node
    (:class:`_ScaleGradient`) whose backward multiplies their gradients by ``k·b_i/B`` of the
    batch that forward trained: every parameter gradient that flows through the outputs arrives
    scaled, and DDP's built-in (or the user's averaging) all-reduce yields ``Σ_i (b_i/B)·g_i``,
    also when the batches of one accumulation group have different plans. No comm hook, so no
    extra pass over the gradient buckets. Exact when the loss reaches the parameters only
    through the model's outputs (plus terms that are the same on every rank, such as weight
    decay); a term computed inside the model but not returned (an auxiliary loss kept on a
    module) is averaged over ranks unweighted. ``scale=False`` (``weighting="none"``) only
    measures. A ``torch.autograd.grad`` pass (a gradient penalty) is neither weighted nor a step.

    Busy time: the end of the synchronised backward (an autograd final callback, queued before
    DDP's own, so before it waits for the all-reduce) to the end of the previous step's
    all-reduce (a callback queued from that one, so after DDP's).
    """

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device,
                 parameters: Sequence[torch.nn.Parameter] = (), scale: bool = True,
                 check_batch_size: bool = True) -> None:
        super().__init__(ledger, global_batch_size, world_size, on_busy, device,
                         check_batch_size)
        self.scales = scale
        #: What the all-reduce after us divides by, where it is not the world size (FSDP2's
        #: ``set_gradient_divide_factor``).
        self.divide_factor: float | None = None
        #: The graph task whose end closes the open step (None: no synchronised pass yet).
        self._queued_task: int | None = None
        # The parameters' gradient accumulators tell a training backward (which accumulates
        # into .grad) from torch.autograd.grad (which does not).
        self._accumulators = [compat.gradient_edge_node(p) for p in parameters
                              if p.requires_grad]

    @property
    def mid_step(self) -> bool:
        return self.scales and self._backward_ran

    def reset(self) -> None:
        super().reset()
        self._queued_task = None

    def _wrap(self, module: torch.nn.Module, output: Any, entry: LedgerEntry) -> Any:
        synced = self._sync_forward
        if isinstance(output, torch.Tensor):  # the common case, without the tree walk
            if not output.requires_grad:
                return output
            return _ScaleGradient.apply(self, entry, synced, output)[0]
        leaves, spec = compat.tree_flatten(output)
        slots, opaque = [], set()
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                if leaf.requires_grad:
                    slots.append(i)
            elif _holds_grad_tensor(leaf):
                opaque.add(type(leaf).__name__)
        if opaque:
            raise ConfigError(
                f"weighting='output' cannot see into the model's output objects of type "
                f"{', '.join(sorted(opaque))}, which hold tensors that require grad: return tensors "
                "in tuples, lists, dicts or containers torch.utils._pytree can flatten, or "
                "attach with the default weighting='hook'")
        if not slots:
            return output
        scaled = _ScaleGradient.apply(self, entry, synced, *(leaves[i] for i in slots))
        for i, tensor in zip(slots, scaled):
            leaves[i] = tensor
        return compat.tree_unflatten(leaves, spec)

    def on_backward(self, entry: LedgerEntry, synced: bool) -> float | None:
        """The batch's scale (None for a pass that trains nothing); a synchronised backward
        closes the step when it ends."""
        if not self._trains_parameters():
            return None
        task = compat.current_graph_task_id()
        if synced and self._queued_task != task:
            # (A different task id also means the synchronised backward queued before never
            # finished, e.g. it raised: this one closes the step instead.)
            self._queued_task = task
            compat.queue_callback(self._end_of_backward)
        self._backward_ran = True
        if not self.scales:
            return None
        share = self.share(entry)
        if self.sums:
            return share
        return (self.divide_factor or self.world_size) * share

    def _trains_parameters(self) -> bool:
        """Whether the running backward accumulates into the parameters' ``.grad`` (a
        training backward) rather than being ``torch.autograd.grad``."""
        if self.fsdp_groups is not None and not self._accumulators:
            # FSDP2 computes with unsharded parameters, created at its first forward.
            self._accumulators = [compat.gradient_edge_node(p) for p in
                                  compat.fsdp_unsharded_parameters(self.fsdp_groups)]
        if not self._accumulators:
            return True
        try:
            return any(compat.will_engine_execute_node(n) for n in self._accumulators)
        except RuntimeError:
            # torch refuses the question during autograd.grad with respect to parameters
            # (a gradient penalty, GradNorm, meta-learning): no training step.
            return False

    def _end_of_backward(self) -> None:
        # Every gradient is computed and DDP has launched its last bucket; DDP's own final
        # callback (queued after this one) waits for the all-reduce, ours below runs after it.
        self._queued_task = None
        if self.group:
            self._close_step()
        compat.queue_callback(self._mark_done)


def _leading_rows(args: tuple, kwargs: dict) -> int | None:
    """The leading dimension of the first tensor in a forward's inputs (None: no tensor)."""
    for value in (*args, *kwargs.values()):
        for item in (value.values() if isinstance(value, dict)
                     else value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(item, torch.Tensor):
                return int(item.shape[0]) if item.dim() > 0 else None
    return None


def _holds_grad_tensor(obj: Any, depth: int = 3) -> bool:
    """Whether ``obj`` (a leaf the tree walk could not open) holds a tensor that requires
    grad in its attributes (``__dict__`` or ``__slots__``), lists, tuples or dicts, looking
    ``depth`` levels deep."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if depth == 0 or isinstance(obj, (int, float, complex, bool, str, bytes, type(None))):
        return False
    if isinstance(obj, dict):
        values = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        values = list(obj)
    else:
        values = list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if isinstance(name, str) and hasattr(obj, name):
                    values.append(getattr(obj, name))
    return any(_holds_grad_tensor(v, depth - 1) for v in values[:1000])


def _allreduce_sum(process_group, bucket: dist.GradBucket) -> torch.futures.Future:
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def weighted_comm_hook(state, bucket):
    """The function DDP calls; ``state`` is the :class:`WeightedCommHook`.

    (DDP wants a plain function with parameters named ``state`` and ``bucket``.)
    """
    return state.on_bucket(bucket)


def _require_ddp(model: torch.nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise ConfigError(
            f"attach() needs a DistributedDataParallel model, got {type(model).__name__}. "
            "Without DDP, multiply the mean loss by sampler.loss_scale(len(batch)) instead")


def attach_hook(model: torch.nn.Module, hook: WeightedCommHook) -> None:
    """Register ``hook`` on a DDP model (and its forward hook), refusing one that already has a
    comm hook."""
    _require_ddp(model)
    if compat.has_comm_hook(model):
        raise ConfigError("this DDP model already has a comm hook; pass it to "
                          "attach(model, comm_hook=...) instead so shardbalance can wrap it")
    try:
        model.register_comm_hook(hook, weighted_comm_hook)
    except RuntimeError as exc:
        raise ConfigError(f"cannot register the shardbalance comm hook: {exc}") from exc
    model.register_forward_hook(hook.on_forward, with_kwargs=True)


def attach_output_weighting(model: torch.nn.Module, weighting: OutputWeighting,
                            comm_hook: HookFn | None = None, comm_state: Any = None) -> None:
    """Put ``weighting`` on a DDP model's outputs, after registering ``comm_hook`` (which, as
    any comm hook the model already has, must average). An FSDP2 model (``weighting`` has its
    parameter groups) takes no comm hook: its reduce-scatter averages over the data-parallel
    degree, which is the ``k`` of the output scale ``k·b_i/B``."""
    if weighting.fsdp_groups is None:
        _require_ddp(model)
    elif comm_hook is not None:
        raise ConfigError("an FSDP2 model has no comm hook: attach it without comm_hook")
    missing = compat.missing_for_output_weighting()
    if missing:
        raise ConfigError(f"weighting='output' and 'none' need {', '.join(missing)}, which this "
                          f"torch {torch.__version__} lacks; attach with weighting='hook'")
    if comm_hook is not None:
        try:
            model.register_comm_hook(comm_state, comm_hook)
        except RuntimeError as exc:
            raise ConfigError(f"cannot register the comm hook {comm_hook!r}: {exc}") from exc
    model.register_forward_hook(weighting.on_forward, with_kwargs=True)
