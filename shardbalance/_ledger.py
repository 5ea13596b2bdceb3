"""The step ledger: which batch, of which plan, each step actually trains.

The sampler runs ahead of training (a DataLoader prefetches, and frameworks start the loader's
iterator before any callback can attach), so every batch it yields is written here from the
sampler's construction on, and the gradient weighting takes one entry per trained batch: the
gradient weight, the busy-time record and the resume position all come from the batch being
trained, never from the sampler's newest plan.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple

from ._exceptions import PlanError
from .plan import Plan

__all__ = ["LedgerEntry", "StepLedger"]

#: Entries kept while no weighting consumes them (a prefetch depth far beyond any loader's).
UNCONSUMED_KEPT = 4096


class LedgerEntry(NamedTuple):
    """One batch the sampler yielded: which iterator, which step, how many samples, which plan.

    (A NamedTuple: one is made per step on the sampler's hot path.)
    """

    #: Which iterator of the sampler yielded it (a new iterator drops the old one's entries).
    serial: int
    epoch: int
    step: int
    batch_size: int
    plan: Plan
    #: The epoch's sample position once this step is trained (the resume point).
    position_after: int

    @property
    def digest(self) -> str:
        return self.plan.digest


class StepLedger:
    """FIFO of yielded-but-not-yet-trained batches: appended by the sampler, popped by the
    gradient weighting (one entry per trained batch)."""

    def __init__(self) -> None:
        self._entries: collections.deque[LedgerEntry] = collections.deque()
        self.last_yielded: LedgerEntry | None = None
        self.last_trained: LedgerEntry | None = None
        #: Whether a gradient weighting consumes entries (without one, old ones are dropped).
        self.consumed = False
        #: Called with each entry as it is trained (the background planner's trigger).
        self.on_trained: Callable[[LedgerEntry], None] | None = None

    def append(self, entry: LedgerEntry) -> None:
        self._entries.append(entry)
        self.last_yielded = entry
        if not self.consumed and len(self._entries) > UNCONSUMED_KEPT:
            self._entries.popleft()

    def peek(self) -> LedgerEntry | None:
        """The entry the next trained batch will take, if any."""
        return self._entries[0] if self._entries else None

    def pop(self) -> LedgerEntry:
        try:
            entry = self._entries.popleft()
        except IndexError:
            raise PlanError(
                "the step ledger is empty: the attached model trained a batch the sampler did not "
                "yield. Every batch trained with an attached model must come from this "
                "sampler's DataLoader") from None
        self.last_trained = entry
        if self.on_trained is not None:
            self.on_trained(entry)
        return entry

    def drop_untrained(self) -> None:
        """Forget prefetched batches that will never be trained (a new iterator started)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
