"""Hugging Face Transformers: a ``Trainer`` whose training loader is a shardbalance sampler.

:class:`ShardBalanceTrainer` changes three things of the ``Trainer`` and nothing else:

- **The loader.** A :class:`~shardbalance.WeightedDistributedSampler` with the global batch
  ``B = per_device_train_batch_size × world size`` (the plain Trainer's run, split unevenly),
  as the batch sampler of Accelerate's loader (``shardbalance.accelerate.prepare_dataloader``:
  the Trainer's ``accelerator.prepare`` would re-shard it).
- **One gradient weighting.** With ``average_tokens_across_devices`` (the default) and a model
  that takes ``num_items_in_batch`` (or a ``compute_loss_func``), the Trainer already divides
  every rank's loss by the global token count of the step: the gradient is exact for any split
  and shardbalance only measures (``weighting="none"``). With ``num_items_in_batch`` counted
  per rank instead, each rank's gradient is weighted by its share of the step's tokens
  (``set_step_weight``). Otherwise the loss is a local mean and is weighted by ``b_i/B``.
  Never two of these.
- **Resume.** Each checkpoint also holds the sampler's position
  (``shardbalance_sampler.json``); on resume the sampler starts there and the Trainer's own
  ``skip_first_batches`` leaves its loader as it is, so no batch is skipped twice.

``gradient_accumulation_steps`` is exact: plans change only between optimizer steps
(``accumulation_steps`` of the sampler), and a short last group is weighted as the Trainer
normalises it.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import partial
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from ._exceptions import ConfigError
from .accelerate import prepare_dataloader
from .sampler import WeightedDistributedSampler

try:
    import transformers.trainer as _trainer_module
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, seed_worker
except ImportError as exc:  # pragma: no cover - the [hf] extra is not installed
    raise ImportError("shardbalance.transformers needs Hugging Face Transformers: "
                      'pip install "shardbalance[hf]"') from exc

__all__ = ["ShardBalanceTrainer", "SAMPLER_STATE_NAME"]

#: The sampler's position, saved in every checkpoint folder.
SAMPLER_STATE_NAME = "shardbalance_sampler.json"


class ShardBalanceTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a :class:`WeightedDistributedSampler`.

    Takes every argument of ``Trainer``, plus:

    Args:
        sampler_kwargs (dict, optional): keyword arguments for the sampler (``policy``,
            ``rebalance_every``, ``min_batch_size``, ``initial_weights``, ...). Default: the
            sampler's defaults, with ``seed`` from ``data_seed`` or ``seed``, ``drop_last``
            from ``dataloader_drop_last``, ``accumulation_steps`` from
            ``gradient_accumulation_steps``, and ``policy="equal"`` on one process.

    After ``train()`` starts, ``trainer.shardbalance_sampler`` is the sampler and
    ``trainer.shardbalance_weighting`` says how gradients are weighted: ``"none"`` (the
    Trainer's global token average), ``"tokens"`` (each rank's share of the step's tokens) or
    ``"samples"`` (``b_i/B``). Training runs under DDP (one process per device); FSDP and
    DeepSpeed are refused by ``attach`` with the reason.

    Example::

        >>> trainer = ShardBalanceTrainer(model=model, args=TrainingArguments(
        ...     "out", per_device_train_batch_size=16, gradient_accumulation_steps=4),
        ...     train_dataset=ds)
        >>> trainer.train()                      # torchrun --nproc_per_node=4 train.py
    """

    def __init__(self, *args: Any, sampler_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if sampler_kwargs is not None and not isinstance(sampler_kwargs, dict):
            raise ConfigError(f"Invalid sampler_kwargs {sampler_kwargs!r}: expected a dict of "
                              "WeightedDistributedSampler keyword arguments")
        self.sampler_kwargs = dict(sampler_kwargs or {})
        for name in ("num_replicas", "rank"):
            if name in self.sampler_kwargs:
                raise ConfigError(f"sampler_kwargs must not set {name!r}: the Trainer's "
                                  "processes decide it")
        self.shardbalance_sampler: WeightedDistributedSampler | None = None
        self.shardbalance_weighting: str | None = None
        #: The next training_step opens an optimizer step (its group's first batch).
        self._group_open = False
        self.add_callback(_SaveSamplerPosition(self))

    # -- the loader ------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):
            raise ConfigError("ShardBalanceTrainer needs a map-style train_dataset (with a "
                              f"length); got the IterableDataset {type(dataset).__name__}")
        collator = self.data_collator
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        args = self.args
        if self.shardbalance_sampler is not None:  # train() again: a new sampler, a new run
            self.shardbalance_sampler.close()
        world = args.world_size
        options: dict[str, Any] = {
            "num_replicas": world, "rank": args.process_index,
            "seed": args.data_seed if args.data_seed is not None else args.seed,
            "drop_last": args.dataloader_drop_last,
            "accumulation_steps": args.gradient_accumulation_steps}
        if world == 1:
            options["policy"] = "equal"
        options.update(self.sampler_kwargs)
        sampler = WeightedDistributedSampler(dataset, self._train_batch_size * world, **options)
        self.shardbalance_sampler = sampler
        self.shardbalance_weighting = None
        workers = args.dataloader_num_workers
        loader_kwargs: dict[str, Any] = {
            "collate_fn": collator, "num_workers": workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers and workers > 0,
            "worker_init_fn": partial(seed_worker, num_workers=workers, rank=args.process_index)}
        if workers:
            loader_kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
            loader_kwargs["multiprocessing_context"] = args.dataloader_multiprocessing_context
        if not getattr(args, "dataloader_in_order", True):
            raise ConfigError("dataloader_in_order=False reorders batches; shardbalance trains "
                              "them in the order the sampler yielded them")
        return prepare_dataloader(self.accelerator, DataLoader(dataset, batch_sampler=sampler,
                                                               **loader_kwargs))

    # -- the weighting ---------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int,
                          device: torch.device) -> tuple[list, Any]:
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._group_open = True
        return batches, count

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        sampler = self.shardbalance_sampler
        if sampler is not None and self.args.world_size > 1:
            weighting = self._weighting_for(num_items_in_batch)
            if self.shardbalance_weighting is None:
                sampler.attach(model, weighting="none" if weighting == "none" else "hook")
                if weighting == "none":
                    # After shardbalance's forward hook, whose autograd node makes the outputs
                    # views: the Trainer scales the loss in place (loss *= world size).
                    model.register_forward_hook(_loss_not_a_view)
                self.shardbalance_weighting = weighting
            elif weighting != self.shardbalance_weighting:
                raise ConfigError(
                    f"the Trainer's loss normalisation changed during training (gradients were "
                    f"weighted as {self.shardbalance_weighting!r}, this step needs "
                    f"{weighting!r}): num_items_in_batch must be given at every step or at none")
            if weighting == "tokens" and self._group_open:
                # The step's weight is this rank's token count over the global one, given
                # once, before the group's first backward.
                sampler.set_step_weight(float(num_items_in_batch))
            self._group_open = False
        return super().training_step(model, inputs, num_items_in_batch)

    def _weighting_for(self, num_items_in_batch: Any) -> str:
        """How the Trainer normalises this step's loss, hence the one weighting to add."""
        counted = num_items_in_batch is not None and (
            self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
        if counted and self.args.average_tokens_across_devices:
            return "none"     # divided by the global token count already (and × world size)
        if counted:
            return "tokens"   # divided by this rank's own token count
        return "samples"      # a mean over the local batch

    # -- resume ----------------------------------------------------------------------------

    def _run_epoch(self, **kwargs: Any) -> Any:
        checkpoint = kwargs.get("resume_from_checkpoint")
        batches = kwargs.get("steps_trained_in_current_epoch", 0)
        loader = kwargs.get("train_dataloader")
        sampler = self.shardbalance_sampler
        if (checkpoint is None or sampler is None or kwargs.get("epoch") !=
                kwargs.get("epochs_trained") or not batches or self.args.ignore_data_skip):
            return super()._run_epoch(**kwargs)
        epoch = kwargs["epoch"]
        expected = {"epoch": epoch, "position": batches * sampler.global_batch_size}
        path = os.path.join(checkpoint, SAMPLER_STATE_NAME)
        if os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            if (state.get("epoch"), state.get("position")) != tuple(expected.values()):
                raise ConfigError(
                    f"the checkpoint {checkpoint} has the sampler at epoch {state.get('epoch')} "
                    f"position {state.get('position')}, but the Trainer resumes after {batches} "
                    f"batches of epoch {epoch} (position {expected['position']} with the "
                    f"global batch {sampler.global_batch_size}): resume with the world size "
                    "and per_device_train_batch_size the checkpoint was trained with")
        else:  # a checkpoint without the sampler's file: the Trainer's count says where
            state = {**sampler.state_dict(), **expected}
        sampler.load_state_dict(state)
        with _loader_not_skipped(loader):
            return super()._run_epoch(**kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            result = super().train(*args, **kwargs)
        except BaseException:
            if self.shardbalance_sampler is not None:
                self.shardbalance_sampler.close(wait=False)
            raise
        if self.shardbalance_sampler is not None:
            self.shardbalance_sampler.close()
        return result


def _loss_not_a_view(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """The model's loss as a tensor of its own (one scalar copied), so it can change in place."""
    if isinstance(output, dict):
        loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss._is_view():
            output["loss"] = loss.clone()
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) \
            and output[0].dim() == 0 and output[0]._is_view():
        output = (output[0].clone(), *output[1:])
    return output


@contextlib.contextmanager
def _loader_not_skipped(loader: DataLoader) -> Iterator[None]:
    """The Trainer's ``skip_first_batches(loader, n)`` returns ``loader`` itself while the
    resumed epoch starts: the sampler already starts after those ``n`` batches.

    (The Trainer calls the function by its module-level name. Should that change, the sampler
    refuses Accelerate's ``SkipBatchSampler`` with a clear error instead of skipping twice.)
    """
    original = _trainer_module.skip_first_batches

    def skip_first_batches(dataloader, num_batches=0):
        if dataloader is loader:
            return dataloader
        return original(dataloader, num_batches)

    _trainer_module.skip_first_batches = skip_first_batches
    try:
        yield
    finally:
        _trainer_module.skip_first_batches = original


class _SaveSamplerPosition(TrainerCallback):
    """Writes the sampler's position into each checkpoint folder the Trainer saves."""

    def __init__(self, trainer: ShardBalanceTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        sampler = self.trainer.shardbalance_sampler
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if sampler is not None and state.is_world_process_zero and os.path.isdir(folder):
            with open(os.path.join(folder, SAMPLER_STATE_NAME), "w") as f:
                json.dump(sampler.state_dict(), f)
        return control
