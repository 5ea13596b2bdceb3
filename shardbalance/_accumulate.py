"""Micro-batch accumulation with fixed shapes: one step's local batch cut into equal pieces.

``sampler.accumulate(loader, model)`` yields each batch's micro-batches of ``micro_batch_size``
with the loss scale that makes their sum the batch's mean loss, runs all but a batch's last
under ``model.no_sync()``, and tells the gradient weighting that those forwards train one
batch (one ledger entry).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from ._compute import lockstep_cause
from ._exceptions import ConfigError, PlanError

__all__ = ["accumulate", "batch_len", "slice_batch"]


def accumulate(loader: Iterable, micro_batch_size: int, model: torch.nn.Module | None,
               weighting) -> Iterator[tuple[Any, float, bool]]:
    _check_model(model)
    m = micro_batch_size
    for batch in loader:
        size = batch_len(batch)
        if size % m:
            raise PlanError(f"a step's batch of {size} samples is not a multiple of "
                            f"micro_batch_size={m}")
        count = size // m
        if weighting is not None:
            weighting.expect_micro_batches(count, m)
        for j in range(count):
            micro = slice_batch(batch, j * m, (j + 1) * m)
            last = j == count - 1
            if last or model is None:
                yield micro, m / size, last
            else:
                with model.no_sync():
                    yield micro, m / size, last


def _check_model(model: torch.nn.Module | None) -> None:
    # Raised before the loop, on every rank alike (a rank with a single micro-batch would
    # otherwise go on into the step's collectives while the others fail).
    cause = lockstep_cause(model) if model is not None else None
    if cause:
        raise ConfigError(f"accumulate() cannot be used with {cause}: ranks run different "
                          "numbers of micro-batches per step, and every forward would wait for "
                          "the other ranks. Accumulate whole loader batches instead (every rank "
                          "runs the same number of them)")
    if model is None or hasattr(model, "no_sync"):
        return
    raise ConfigError(f"accumulate() needs a DDP model (to skip the gradient sync of all but a "
                      f"step's last micro-batch), got {type(model).__name__}")


def batch_len(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch and \
            isinstance(batch[0], (torch.Tensor, list, tuple, dict)):
        return batch_len(batch[0])
    return len(batch)  # e.g. a collated list of strings


def slice_batch(batch, start: int, stop: int):
    """The same structure as a collated batch (tensors, tuples, lists, dicts), rows sliced."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(slice_batch(v, start, stop) for v in batch)
    if isinstance(batch, list):
        if batch and isinstance(batch[0], (torch.Tensor, list, tuple, dict)):
            return [slice_batch(v, start, stop) for v in batch]
        return batch[start:stop]
    return batch[start:stop]
