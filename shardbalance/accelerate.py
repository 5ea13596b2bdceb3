"""Hugging Face Accelerate: a shardbalance loader with Accelerate's bookkeeping, not re-sharded.

``accelerator.prepare(loader)`` wraps a loader's batch sampler in ``BatchSamplerShard``, which
keeps every k-th batch on each rank: right for a batch sampler that yields the whole dataset,
wrong for :class:`~shardbalance.WeightedDistributedSampler`, which already yields this rank's
share (each rank would train 1/k of it, silently; shardbalance refuses that loader at its first
iterator). :func:`prepare_dataloader` builds Accelerate's own loader type around the sampler as
it is: batches moved to ``accelerator.device``, ``end_of_dataloader`` and the loader's
registration with the gradient state (so ``accelerator.accumulate()`` syncs at the end of the
epoch), the loader listed on the accelerator, and the sampler registered for checkpointing (so
``accelerator.save_state()`` / ``load_state()`` carry its position).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from ._exceptions import ConfigError
from .sampler import WeightedDistributedSampler

try:
    from accelerate.data_loader import DataLoaderShard
except ImportError as exc:  # pragma: no cover - the [hf] extra is not installed
    raise ImportError("shardbalance.accelerate needs Hugging Face Accelerate: "
                      'pip install "shardbalance[hf]"') from exc

__all__ = ["prepare_dataloader"]

#: DataLoader arguments carried over from the user's loader (the sampler replaces the rest).
_LOADER_KWARGS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                  "multiprocessing_context", "generator", "prefetch_factor",
                  "persistent_workers", "pin_memory_device")


class _ShardBalanceLoader(DataLoaderShard):
    """Accelerate's ``DataLoaderShard`` over a :class:`WeightedDistributedSampler`, unsharded.

    Two differences from the loader ``accelerator.prepare()`` makes: the epoch is the
    sampler's when it was set on the sampler (``set_epoch`` or ``load_state_dict``, which
    ``DataLoaderShard`` would overwrite with its own count of passes), and the global batch
    is the sampler's ``B``, so ``gather_for_metrics`` drops exactly the padded samples of the
    last global batch.
    """

    def __init__(self, dataset, sampler: WeightedDistributedSampler, accumulation_steps: int,
                 **kwargs: Any) -> None:
        super().__init__(dataset, batch_sampler=sampler, _drop_last=sampler.drop_last, **kwargs)
        self.shardbalance_sampler = sampler
        self._accumulation_steps = accumulation_steps
        self._epoch_seen = sampler.epoch
        #: ``accelerator.prepare()`` returns a loader marked so unchanged.
        self._is_accelerate_prepared = True

    @property
    def total_batch_size(self) -> int:
        return self.shardbalance_sampler.global_batch_size

    @property
    def total_dataset_length(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_seen = self.shardbalance_sampler.epoch

    def __iter__(self):
        sampler = self.shardbalance_sampler
        steps = self._accumulation_steps
        if steps > 1 and sampler.accumulation_steps != steps \
                and sampler.attached:
            # Checked here, not at prepare time: evaluation loaders need no such setting.
            raise ConfigError(
                f"the accelerator accumulates gradients over {steps} batches but the attached "
                f"sampler has accumulation_steps={sampler.accumulation_steps}: build it with "
                f"accumulation_steps={steps}, so its plans change only between optimizer steps")
        if sampler.epoch != self._epoch_seen:
            # Set on the sampler since our last pass (its set_epoch, or a resume through
            # load_state_dict): that epoch wins over our count of passes.
            self.iteration = sampler.epoch
        yield from super().__iter__()

    def __reduce__(self):
        raise TypeError("a shardbalance loader cannot be pickled: it holds the sampler's "
                        "coordinator connection")


def prepare_dataloader(accelerator: Any, loader: DataLoader,
                       device_placement: bool | None = None) -> DataLoader:
    """The Accelerate loader for ``DataLoader(dataset, batch_sampler=sampler)``, not re-sharded.

    Use it instead of ``accelerator.prepare(loader)`` for a loader whose ``batch_sampler`` is
    a :class:`~shardbalance.WeightedDistributedSampler` (``prepare()`` would keep only every
    k-th of its batches on each rank; such a loader is refused at its first iterator). Prepare
    the model, optimizer and scheduler with ``accelerator.prepare`` as usual, then
    ``sampler.attach(model)`` on the prepared (DDP) model.

    The returned loader moves batches to ``accelerator.device`` (unless ``device_placement``
    is ``False``; default: the accelerator's setting), sets ``end_of_dataloader`` and
    registers with the gradient state, so ``accelerator.accumulate(model)`` synchronises every
    ``gradient_accumulation_steps`` batches and at the end of each epoch (build the sampler
    with ``accumulation_steps=`` that number). It is listed on the accelerator, and the
    sampler is registered for checkpointing: ``accelerator.save_state()`` saves its position
    and ``accelerator.load_state()`` resumes it mid-epoch (iterate the loader as it is: do not
    ``skip_first_batches``, which is refused). ``gather_for_metrics`` over uneven batches:
    pass ``use_gather_object=True`` (rows are gathered whatever each rank's batch size, and the
    padded samples of the last global batch are dropped); plain tensor gathering needs equal
    shapes on every rank.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        loader: a ``DataLoader`` built with ``batch_sampler=`` a WeightedDistributedSampler.
        device_placement (bool, optional): move batches to the accelerator's device.
            Default: ``accelerator.device_placement``.

    Example::

        >>> sampler = WeightedDistributedSampler(ds, 256, accumulation_steps=4)
        >>> loader = prepare_dataloader(accelerator, DataLoader(ds, batch_sampler=sampler))
        >>> model, opt = accelerator.prepare(model, opt)
        >>> sampler.attach(model)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         with accelerator.accumulate(model):
        ...             accelerator.backward(loss_fn(model(x), y))
        ...             opt.step(); opt.zero_grad()
    """
    if isinstance(loader, _ShardBalanceLoader):
        return loader
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"prepare_dataloader() needs a torch DataLoader, got "
                          f"{type(loader).__name__}")
    sampler = loader.batch_sampler
    if not isinstance(sampler, WeightedDistributedSampler):
        inner = getattr(sampler, "sampler", None)
        hint = (" (it is the loader's sampler=: pass it as batch_sampler= instead)"
                if isinstance(inner, WeightedDistributedSampler) else "")
        raise ConfigError(f"prepare_dataloader() needs DataLoader(dataset, batch_sampler="
                          f"WeightedDistributedSampler(...)); this loader's batch_sampler is "
                          f"{type(sampler).__name__}{hint}. Prepare other loaders with "
                          "accelerator.prepare()")
    if (sampler.num_replicas, sampler.rank) != (accelerator.num_processes,
                                                accelerator.process_index):
        raise ConfigError(f"the sampler has num_replicas={sampler.num_replicas}, "
                          f"rank={sampler.rank} but the accelerator runs "
                          f"{accelerator.num_processes} processes and this is process "
                          f"{accelerator.process_index}")
    if not getattr(loader, "in_order", True):
        raise ConfigError("DataLoader(in_order=False) reorders batches, and shardbalance must "
                          "train them in the order the sampler yielded them: use in_order=True")
    if device_placement is None:
        device_placement = accelerator.device_placement
    kwargs = {name: getattr(loader, name) for name in _LOADER_KWARGS if hasattr(loader, name)}
    if not kwargs.get("num_workers"):
        kwargs.pop("prefetch_factor", None)  # DataLoader refuses it without workers
    prepared = _ShardBalanceLoader(
        loader.dataset, sampler, accelerator.gradient_accumulation_steps,
        device=accelerator.device if device_placement else None,
        _non_blocking=accelerator.non_blocking, **kwargs)
    accelerator._dataloaders.append(prepared)
    if not any(obj is sampler for obj in accelerator._custom_objects):
        accelerator.register_for_checkpointing(sampler)
    return prepared
