"""Per-step bookkeeping on the training side: the step ledger, busy time, and the comm hook.

The sampler runs ahead of training (DataLoader prefetch), so each batch it yields is written to
a :class:`StepLedger` and the comm hook takes one entry per optimizer step: the gradient weight,
the busy-time record and the resume position all come from the step actually being trained.

Busy time of step s is the time from the moment step s−1's all-reduce completed to the moment
step s's last gradient bucket is ready: wall time minus waiting for peers. On CUDA it is taken
with CUDA events that are read a step or more later (never a synchronize); on CPU with a
monotonic clock. The hook runs on the autograd thread: it only appends to buffers.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist

from ._exceptions import ConfigError, PlanError

__all__ = ["LedgerEntry", "StepLedger", "BusyClock", "WeightedCommHook", "weighted_comm_hook",
           "attach_hook"]


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


class WeightedCommHook:
    """DDP comm hook: weight each rank's gradient by its share of the global batch.

    Each bucket is pre-scaled by ``b_i/B`` and summed over ranks (one pass over the gradients,
    like DDP's built-in all-reduce), or, with an averaging hook of the user's (e.g. fp16
    compression), pre-scaled by ``k·b_i/B`` (in fp32 for 16-bit buckets) and handed to it.
    Either way the result is ``Σ_i (b_i/B)·g_i``: the gradient of the mean loss over the whole
    global batch. The step's ``b_i`` comes from the ledger. The last
    bucket of each step also marks the end of the rank's busy time.
    """

    def __init__(self, ledger: StepLedger, global_batch_size: int, world_size: int,
                 on_busy: Callable[[LedgerEntry, float], None], device: torch.device,
                 inner_hook: HookFn | None = None, inner_state: Any = None) -> None:
        # Without a user hook, the mean's 1/k is folded into the pre-scale and the buckets are
        # summed: one pass over the gradients, as DDP's own all-reduce makes.
        self.fused = inner_hook is None
        if inner_hook is None:
            inner_hook = _allreduce_sum
        self.ledger = ledger
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.on_busy = on_busy
        self.inner_hook = inner_hook
        self.inner_state = inner_state
        self.clock = BusyClock(device)
        self.entry: LedgerEntry | None = None
        self.weight = 1.0 / world_size
        self.scale = 1.0
        #: ``(count, global total)`` for the next step, set by ``set_step_weight``.
        self.next_weight: tuple[float, float] | None = None
        self.steps = 0
        self._previous: LedgerEntry | None = None
        self._previous_done: Any = None

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
            fut = fut.then(self._mark_done)
        return fut

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
        # An averaging hook divides by k after us; a summing one does not.
        self.scale = share if self.fused else self.world_size * share
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

    def _mark_done(self, fut: torch.futures.Future) -> Any:
        self._previous_done = self.clock.now()
        return fut.value()


def _allreduce_sum(process_group, bucket: dist.GradBucket) -> torch.futures.Future:
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def weighted_comm_hook(state, bucket):
    """The function DDP calls; ``state`` is the :class:`WeightedCommHook`.

    (DDP wants a plain function with parameters named ``state`` and ``bucket``.)
    """
    return state.on_bucket(bucket)


def attach_hook(model: torch.nn.Module, hook: WeightedCommHook) -> None:
    """Register ``hook`` on a DDP model, refusing one that already has a comm hook."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise ConfigError(
            f"attach() needs a DistributedDataParallel model, got {type(model).__name__}. "
            "Without DDP, multiply the mean loss by sampler.loss_scale(len(batch)) instead")
    if getattr(model, "_comm_hooks", None):
        raise ConfigError("this DDP model already has a comm hook; pass it to "
                          "attach(model, comm_hook=...) instead so shardbalance can wrap it")
    try:
        model.register_comm_hook(hook, weighted_comm_hook)
    except RuntimeError as exc:
        raise ConfigError(f"cannot register the shardbalance comm hook: {exc}") from exc
