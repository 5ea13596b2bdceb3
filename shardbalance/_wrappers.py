"""Batch-sampler wrappers that would silently undo the sampler's split, refused at ``__iter__``.

Accelerate's ``accelerator.prepare(loader)`` wraps a loader's batch sampler in
``BatchSamplerShard``, which keeps every k-th batch on each rank (each rank then trains 1/k of
its share of every epoch, without a warning), and ``skip_first_batches`` wraps it in
``SkipBatchSampler``, which drops batches the sampler already resumed past (a second skip).
Neither tells the batch sampler, so the sampler looks at who is iterating it: the frames that
call its ``__iter__`` (a few, once per epoch) hold the wrapper as ``self``.
"""

from __future__ import annotations

from types import FrameType

from ._exceptions import ConfigError

__all__ = ["refuse_rewrapping"]

#: How many calling frames to look at: a DataLoader (with workers) reaches the batch sampler's
#: ``__iter__`` within about eight frames of the wrapper that started it.
_FRAMES_SEEN = 12

_ACCELERATE_HINT = (
    "Build the loader with shardbalance.accelerate.prepare_dataloader(accelerator, "
    "DataLoader(dataset, batch_sampler=sampler)) instead of accelerator.prepare(loader): it "
    "places batches on the device and keeps Accelerate's bookkeeping without re-sharding")

_REFUSED = {
    ("accelerate.data_loader", "BatchSamplerShard"): (
        "accelerator.prepare() wrapped this WeightedDistributedSampler in Accelerate's "
        "BatchSamplerShard, which keeps only every k-th of its batches on each rank (each rank "
        "would train 1/k of its share of the epoch). " + _ACCELERATE_HINT),
    ("accelerate.data_loader", "DataLoaderDispatcher"): (
        "accelerator.prepare() turned this loader into Accelerate's DataLoaderDispatcher, "
        "which iterates the WeightedDistributedSampler on one rank and splits its batches "
        "evenly. " + _ACCELERATE_HINT),
    ("accelerate.data_loader", "DataLoaderShard"): (
        "accelerator.prepare() wrapped a loader of this WeightedDistributedSampler. "
        + _ACCELERATE_HINT),
    ("accelerate.data_loader", "SkipBatchSampler"): (
        "skip_first_batches() would drop batches of a WeightedDistributedSampler, which "
        "resumes at its own position: restore it with sampler.load_state_dict() (with "
        "prepare_dataloader, accelerator.load_state() does it) and iterate the loader "
        "without skipping, or the skipped samples are never trained in this epoch"),
}


def refuse_rewrapping(frame: FrameType | None) -> None:
    """Raise :class:`ConfigError` if one of the frames from ``frame`` up belongs to a wrapper
    that re-shards or skips the sampler's batches (see the module docstring)."""
    for _ in range(_FRAMES_SEEN):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if owner is not None:
            cls = type(owner)  # not owner.__class__: Accelerate's loaders report DataLoader there
            message = _REFUSED.get((cls.__module__, cls.__name__))
            if message is not None:
                raise ConfigError(message)
        frame = frame.f_back
