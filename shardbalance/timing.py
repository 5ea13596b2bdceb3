"""Per-step bookkeeping on the training side: the step ledger, busy time, gradient weighting.

The sampler runs ahead of training (DataLoader prefetch), so each batch it yields is written to
a :class:`StepLedger`, and the gradient weighting takes one entry per optimizer step: the
gradient weight, the busy-time record and the resume position all come from the step actually
being trained. Two ways to weight: :class:`WeightedCommHook` (a DDP comm hook, the default,
exact for any loss) and :class:`OutputWeighting` (a hook on the model's outputs, no comm hook).

Busy time of step s is the time from the moment step s−1's all-reduce completed to the moment
step s's last gradient bucket is ready: wall time minus waiting for peers. On CUDA it is taken
with CUDA events that are read a step or more later (never a synchronize); on CPU with a
monotonic clock. The hooks run on the autograd thread: they only append to buffers.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._exceptions import ConfigError, PlanError

__all__ = ["LedgerEntry", "StepLedger", "BusyClock", "WeightedCommHook", "OutputWeighting",
           "weighted_comm_hook", "attach_hook", "attach_output_weighting"]


class LedgerEntry(NamedTuple):
    """One batch the sampler yielded: which iterator, which step, how many samples, which plan.

    (A NamedTuple: one is made per step on the sampler's hot path.)
    """

    serial: int
    epoch: int
    step: int
    batch_size: int
    digest: str
    #: The epoch's sample position once this step is trained (the resume point).
    position_after: int


class StepLedger:
    """FIFO of yielded-but-not-yet-trained steps (append on the sampler, pop in the hook).

    Without a hook to consume entries (``tracking`` off) nothing is queued: the sampler only
    notes the newest yielded step of the current window, and :attr:`last_yielded` is built
    from that on demand, which keeps the sampler's per-step cost to one attribute store.
    """

    def __init__(self) -> None:
        self._entries: collections.deque[LedgerEntry] = collections.deque()
        self._last: LedgerEntry | None = None
        self.last_trained: LedgerEntry | None = None
        #: Whether a comm hook consumes entries.
        self.tracking = False
        #: ``(serial, epoch, batch_size, digest, start, global_batch_size)`` of the window being
        #: yielded, and the newest step yielded from it (untracked mode).
        self.window: tuple | None = None
        self.step = -1

    def append(self, entry: LedgerEntry) -> None:
        self._entries.append(entry)
        self._last = entry

    @property
    def last_yielded(self) -> LedgerEntry | None:
        if self.tracking or self.window is None or self.step < 0:
            return self._last
        serial, epoch, batch_size, digest, start, global_batch = self.window
        return LedgerEntry(serial, epoch, self.step, batch_size, digest,
                           start + (self.step + 1) * global_batch)

    def pop(self) -> LedgerEntry:
        try:
            entry = self._entries.popleft()
        except IndexError:
            raise PlanError(
                "the step ledger is empty: a backward pass ran for a batch the sampler did not "
                "yield. Every optimizer step of an attached model must train one batch from "
                "this sampler's DataLoader") from None
        self.last_trained = entry
        return entry

    def drop_untrained(self) -> None:
        """Forget prefetched steps that will never be trained (a new iterator started)."""
        self._entries.clear()
        self.window, self.step = None, -1

    def __len__(self) -> int:
        return len(self._entries)


class BusyClock:
    """Marks of 'last bucket ready' and 'all-reduce done'; turns them into busy seconds.

    CPU: ``time.monotonic``. CUDA: events recorded on the current stream, resolved later with
    ``Event.query()`` so the training loop never waits for the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: collections.deque = collections.deque()

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.monotonic()

    def measure(self, start: Any, end: Any, payload: Any) -> None:
        self._pending.append((start, end, payload))

    def ready(self) -> list[tuple[Any, float]]:
        """``(payload, busy_seconds)`` for every measurement whose marks are resolved."""
        out = []
        while self._pending:
            start, end, payload = self._pending[0]
            if self.cuda:
                if not end.query():
                    break
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = end - start
            self._pending.popleft()
            if seconds > 0:
                out.append((payload, seconds))
        return out


HookFn = Callable[[Any, dist.GradBucket], torch.futures.Future]


class _WeightedSteps:
    """What both weighting modes share: one ledger entry per optimizer step, its gradient
    weight ``b_i/B`` (or ``count/total`` from ``set_step_weight``), and the busy-time marks."""

    #: Whether the all-reduce after us sums (the weight is ``b_i/B``) or averages (``k·b_i/B``).
    sums = False

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device) -> None:
        self.ledger = ledger
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.on_busy = on_busy
        self.clock = BusyClock(device)
        self.entry: LedgerEntry | None = None
        self.weight = 1.0 / world_size
        self.scale = 1.0
        #: ``(count, global total)`` for the next step, set by ``set_step_weight``.
        self.next_weight: tuple[float, float] | None = None
        self.steps = 0
        #: Set while ``probe()`` runs its untimed-by-us steps: they are no training steps.
        self.paused = False
        self._previous: LedgerEntry | None = None
        self._previous_done: Any = None

    @property
    def mid_step(self) -> bool:
        """A step's first backward has run and its synchronised one has not finished."""
        return False

    def reset(self) -> None:
        """Forget a step left open (a new iterator started). The comm hook has none: it
        takes each step whole, in one synchronised backward."""

    def _begin_step(self) -> None:
        self.entry = self.ledger.pop()
        if self.next_weight is not None:
            count, total = self.next_weight
            self.next_weight = None
            share = count / total
        else:
            share = self.entry.batch_size / self.global_batch_size
        #: This step's gradient weight: b_i/B (or count/total).
        self.weight = share
        self.scale = share if self.sums else self.world_size * share
        self.steps += 1

    def _mark_ready(self) -> None:
        entry, previous = self.entry, self._previous
        ready = self.clock.now()
        # Discarded: DDP's first iteration, an iterator's first step, a step after a shape change.
        if (previous is not None and self._previous_done is not None and self.steps > 1
                and previous.serial == entry.serial and previous.batch_size == entry.batch_size):
            self.clock.measure(self._previous_done, ready, entry)
        for done_entry, seconds in self.clock.ready():
            self.on_busy(done_entry, seconds)
        self._previous, self._previous_done = entry, None

    def _mark_done(self) -> None:
        self._previous_done = self.clock.now()


class WeightedCommHook(_WeightedSteps):
    """DDP comm hook: weight each rank's gradient by its share of the global batch.

    Each bucket is pre-scaled by ``b_i/B`` and summed over ranks (one pass over the gradients,
    like DDP's built-in all-reduce), or, with an averaging hook of the user's (e.g. fp16
    compression), pre-scaled by ``k·b_i/B`` (in fp32 for 16-bit buckets) and handed to it.
    Either way the result is ``Σ_i (b_i/B)·g_i``: the gradient of the mean loss over the whole
    global batch, whatever the loss is made of. The step's ``b_i`` comes from the ledger. The
    last bucket of each step also marks the end of the rank's busy time.
    """

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device,
                 inner_hook: HookFn | None = None, inner_state: Any = None) -> None:
        super().__init__(ledger, global_batch_size, world_size, on_busy, device)
        # Without a user hook, the mean's 1/k is folded into the pre-scale and the buckets are
        # summed: one pass over the gradients, as DDP's own all-reduce makes.
        self.sums = inner_hook is None
        self.inner_hook = _allreduce_sum if inner_hook is None else inner_hook
        self.inner_state = inner_state

    def on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if bucket.index() == 0:
            self._begin_step()
        last = bucket.is_last()
        if last:
            self._mark_ready()
        buffer = bucket.buffer()
        if buffer.dtype in (torch.float16, torch.bfloat16):
            buffer.copy_(buffer.float().mul_(self.scale))
        else:
            buffer.mul_(self.scale)
        fut = self.inner_hook(self.inner_state, bucket)
        if last:
            fut = fut.then(self._done)
        return fut

    def _done(self, fut: torch.futures.Future) -> Any:
        self._mark_done()
        return fut.value()


class _ScaleGradient(torch.autograd.Function):
    """Identity on the model's output tensors; multiplies their gradients by the step's scale.

    One node for all outputs, downstream of the model: an output computed inside the model
    from another output (a loss from the logits) is scaled once, on its way out, and the
    gradient it sends to the other one inside the model is not scaled again.
    """

    @staticmethod
    def forward(ctx, weighting: "OutputWeighting", synced: bool, *tensors: torch.Tensor):
        ctx.weighting, ctx.synced = weighting, synced
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        scale = ctx.weighting.on_backward(ctx.synced)
        if scale is None:  # torch.autograd.grad (e.g. a gradient penalty): no training step
            return (None, None, *grads)
        return (None, None, *(None if g is None else _scaled(g, scale) for g in grads))


def _scaled(grad: torch.Tensor, scale: float) -> torch.Tensor:
    # In fp32 for 16-bit gradients, as the comm hook does for 16-bit buckets.
    if grad.dtype in (torch.float16, torch.bfloat16):
        return grad.float().mul_(scale).to(grad.dtype)
    return grad * scale


class OutputWeighting(_WeightedSteps):
    """Weight each rank's gradient at the model's output; DDP's own all-reduce averages.

    A forward hook on the DDP model passes the output tensors that require grad through one
    autograd node (:class:`_ScaleGradient`) whose backward multiplies their gradients by
    ``k·b_i/B``: every parameter gradient that flows through the outputs arrives scaled, and
    DDP's built-in (or the user's averaging) all-reduce yields ``Σ_i (b_i/B)·g_i``. No comm
    hook, so no extra pass over the gradient buckets: per step it costs a few Python calls and
    one multiply of the outputs' gradients. Exact when the loss reaches the parameters only
    through the model's outputs (plus terms that are the same on every rank, such as weight
    decay); a term computed inside the model but not returned (an auxiliary loss kept on a
    module) is averaged over ranks unweighted. The outputs become views (in-place changes to
    them are refused by autograd).

    Busy time: the end of the backward pass (an autograd final callback, queued before DDP's
    own, so before it waits for the all-reduce) to the end of the previous step's all-reduce
    (a callback queued from that one, so after DDP's).
    """

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device,
                 parameters: Sequence[torch.nn.Parameter] = ()) -> None:
        super().__init__(ledger, global_batch_size, world_size, on_busy, device)
        self._open = False
        #: The graph task whose end closes the open step (None: no synchronised pass yet).
        self._queued_task: int | None = None
        # The parameters' gradient accumulators tell a training backward (which accumulates
        # into .grad) from torch.autograd.grad through the outputs (which does not).
        edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
        self._accumulators = [edge(p).node for p in parameters if p.requires_grad] \
            if edge is not None and hasattr(torch._C, "_will_engine_execute_node") else []

    @property
    def mid_step(self) -> bool:
        return self._open

    def on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if self.paused or not torch.is_grad_enabled():
            return output
        synced = bool(getattr(module, "require_backward_grad_sync", True))
        if isinstance(output, torch.Tensor):  # the common case, without the tree walk
            if not output.requires_grad:
                return output
            return _ScaleGradient.apply(self, synced, output)[0]
        leaves, spec = tree_flatten(output)
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
        scaled = _ScaleGradient.apply(self, synced, *(leaves[i] for i in slots))
        for i, tensor in zip(slots, scaled):
            leaves[i] = tensor
        return tree_unflatten(leaves, spec)

    def on_backward(self, synced: bool) -> float | None:
        """The step's scale (None for a pass that trains nothing); the first backward of a
        step takes its ledger entry."""
        if self._accumulators and not any(
                torch._C._will_engine_execute_node(node) for node in self._accumulators):
            return None
        task = _graph_task_id()
        if self._queued_task is not None and task != self._queued_task:
            # The synchronised backward that should have closed the open step never finished
            # (it raised, e.g. out of memory): that step is abandoned, this is the next one.
            self.reset()
        if not self._open:
            self._begin_step()
            self._open = True
        if synced and self._queued_task is None:
            self._queued_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        return self.scale

    def reset(self) -> None:
        """Forget a step left open (a failed backward, an iterator abandoned mid-step)."""
        self._open, self._queued_task = False, None
        self._previous = self._previous_done = None

    def _end_of_backward(self) -> None:
        # Every gradient is computed and DDP has launched its last bucket; DDP's own final
        # callback (queued after this one) waits for the all-reduce, ours below runs after it.
        self._mark_ready()
        self._open, self._queued_task = False, None
        torch.autograd.Variable._execution_engine.queue_callback(self._mark_done)


#: The running backward pass's id (-2 where torch does not tell: every pass looks alike).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -2)


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
    """Register ``hook`` on a DDP model, refusing one that already has a comm hook."""
    _require_ddp(model)
    if getattr(model, "_comm_hooks", None):
        raise ConfigError("this DDP model already has a comm hook; pass it to "
                          "attach(model, comm_hook=...) instead so shardbalance can wrap it")
    try:
        model.register_comm_hook(hook, weighted_comm_hook)
    except RuntimeError as exc:
        raise ConfigError(f"cannot register the shardbalance comm hook: {exc}") from exc


def attach_output_weighting(model: torch.nn.Module, weighting: OutputWeighting,
                            comm_hook: HookFn | None = None, comm_state: Any = None) -> None:
    """Put ``weighting`` on a DDP model's outputs, after registering ``comm_hook`` (which, as
    any comm hook the model already has, must average)."""
    _require_ddp(model)
    if comm_hook is not None:
        try:
            model.register_comm_hook(comm_state, comm_hook)
        except RuntimeError as exc:
            raise ConfigError(f"cannot register the comm hook {comm_hook!r}: {exc}") from exc
    model.register_forward_hook(weighting.on_forward)
