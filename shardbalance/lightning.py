"""PyTorch Lightning: one callback that plugs a :class:`WeightedDistributedSampler` into a Trainer.

::

    trainer = Trainer(strategy="ddp", use_distributed_sampler=False,
                      callbacks=[ShardBalanceCallback()])

with the LightningModule's (or the DataModule's) ``train_dataloader()`` building the sampler
(the process group exists by then) and returning ``DataLoader(ds, batch_sampler=sampler)``.

What Lightning alone gets wrong, and where the callback fixes it:

- Lightning would inject a ``DistributedSampler`` (``use_distributed_sampler=True``, its
  default): refused in ``setup``, before any data is loaded.
- Lightning calls ``set_epoch`` on ``dataloader.sampler`` and ``batch_sampler.sampler`` only:
  the callback sets the sampler's epoch in ``on_train_epoch_start``, before Lightning starts
  that epoch's iterator.
- Nobody weights the gradients: in ``on_train_start`` (the strategy has wrapped the model in
  DDP; the loader's iterator has already started, which the sampler's ledger follows) the
  callback attaches the sampler to ``trainer.strategy.model``.
- A plain DataLoader has no state, so Lightning cannot resume it mid-epoch: the callback
  wraps ``train_dataloader()`` so that the loader Lightning receives is the same loader with
  ``state_dict()``/``load_state_dict()`` (the sampler's position) and a length that counts the
  batches Lightning already trained in a resumed epoch. Lightning saves that state in its own
  checkpoint and restores it through its own loader-state path, after reading the loader's
  length and before starting its iterator.
"""

from __future__ import annotations

import functools
from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("shardbalance.lightning needs PyTorch Lightning: "
                      "pip install 'shardbalance[lightning]'") from exc

from torch.utils.data import DataLoader

from ._exceptions import ConfigError
from .sampler import WeightedDistributedSampler

__all__ = ["ShardBalanceCallback"]

_WEIGHTINGS = ("hook", "output", "none")


class ShardBalanceCallback(pl.Callback):
    r"""Keeps a :class:`WeightedDistributedSampler` in step with a Lightning ``Trainer``.

    Finds the sampler in the train dataloader (or takes the one given), attaches it to the
    strategy's DDP model (gradient weight ``b_i/B`` and busy-time measurement), sets its epoch
    at every epoch start, makes the train loader resumable mid-epoch through Lightning's own
    checkpoints, refuses a Trainer that would replace the sampler, and closes the sampler when
    ``fit`` ends (build a new one in each ``train_dataloader()`` call).

    Mid-epoch resume needs the loader to come from ``train_dataloader()`` (of the module or the
    DataModule), not from ``fit(train_dataloaders=...)``, and more than one process: on one
    device there is no DDP model to attach to, so the sampler's position counts the batches
    it yielded, which Lightning's prefetch puts a batch ahead (resume at an epoch boundary
    works there too).

    Args:
        sampler (WeightedDistributedSampler, optional): the sampler, if built before the
            Trainer runs; it must be the train dataloader's ``batch_sampler``. Default: found
            in the train dataloader.
        weighting (str, optional): passed to :meth:`WeightedDistributedSampler.attach`:
            ``"hook"``, ``"output"`` or ``"none"``. With ``accumulate_grad_batches=K > 1`` and
            ``"hook"``, build the sampler with ``accumulation_steps=K``. Default: ``"hook"``.
        comm_hook, comm_state: an averaging DDP comm hook of yours, passed to ``attach``.
            Default: none.
        check_batch_size (bool, optional): passed to ``attach``. Default: ``True``.
        busy (str, optional): passed to ``attach``; ``"auto"`` also picks compute-only busy
            time under ``accumulate_grad_batches > 1`` (Lightning meets the other ranks before
            every batch, so the step clock would see the slowest rank). Default: ``"auto"``.

    Example::

        >>> class Module(LightningModule):
        ...     def train_dataloader(self):
        ...         sampler = WeightedDistributedSampler(self.dataset, global_batch_size=256)
        ...         return DataLoader(self.dataset, batch_sampler=sampler, num_workers=2)
        >>> trainer = Trainer(strategy="ddp", use_distributed_sampler=False,
        ...                   callbacks=[ShardBalanceCallback()])
    """

    def __init__(self, sampler: WeightedDistributedSampler | None = None, *,
                 weighting: str = "hook", comm_hook: Any = None, comm_state: Any = None,
                 check_batch_size: bool = True, busy: str = "auto") -> None:
        if sampler is not None and not isinstance(sampler, WeightedDistributedSampler):
            raise ConfigError(f"ShardBalanceCallback(sampler) needs a WeightedDistributedSampler, "
                              f"got {type(sampler).__name__}")
        if weighting not in _WEIGHTINGS:
            raise ConfigError(f"Invalid weighting {weighting!r}, it should be one of "
                              f"{', '.join(map(repr, _WEIGHTINGS))}")
        self.sampler = sampler
        self._given = sampler is not None
        self.weighting = weighting
        self.busy = busy
        self._attach_args = dict(comm_hook=comm_hook, comm_state=comm_state,
                                 check_batch_size=check_batch_size)
        self._attached = False
        #: ``(owner, name)`` of the ``train_dataloader`` method this callback wrapped.
        self._wrapped: tuple[Any, str] | None = None
        #: Batches of the current epoch Lightning has trained (its ``batch_idx + 1``).
        self._epoch_batches = 0
        #: ``(epoch, batches)`` restored from a mid-epoch checkpoint: Lightning counts those
        #: batches as done, the resumed sampler yields only the rest.
        self._resumed: tuple[int, int] | None = None
        #: The sampler state of a checkpoint saved at an epoch boundary, applied when the new
        #: sampler is built (Lightning restores no loader state for those).
        self._pending: dict[str, Any] | None = None

    # -- setup: refuse what would go wrong, then hook into the loader's creation ------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise ConfigError(
                "ShardBalanceCallback needs Trainer(use_distributed_sampler=False): with True "
                "(Lightning's default) Lightning replaces the loader's sampler with a "
                "DistributedSampler on more than one device, which would split every batch "
                "equally and break the WeightedDistributedSampler's plan")
        self._wrap_train_dataloader(trainer, pl_module)

    def _wrap_train_dataloader(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
        datamodule = getattr(trainer, "datamodule", None)
        owner = None
        if datamodule is not None and is_overridden("train_dataloader", datamodule):
            owner = datamodule
        elif is_overridden("train_dataloader", pl_module):
            owner = pl_module
        if owner is None:
            return  # a loader passed to fit(): found in on_train_start, not resumable mid-epoch
        original = owner.train_dataloader

        @functools.wraps(original)
        def train_dataloader(*args: Any, **kwargs: Any) -> Any:
            return self._adopt(original(*args, **kwargs))

        # An instance attribute: Lightning looks the method up with getattr(), and
        # functools.wraps keeps is_overridden() true.
        owner.train_dataloader = train_dataloader
        self._wrapped = (owner, "train_dataloader")

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            owner, name = self._wrapped
            if name in vars(owner):
                delattr(owner, name)
            self._wrapped = None

    def _adopt(self, loaders: Any) -> Any:
        """Replace the loader that holds the sampler by a resumable copy of it."""
        if isinstance(loaders, DataLoader):
            if isinstance(loaders.batch_sampler, WeightedDistributedSampler):
                self._use(loaders.batch_sampler)
                if self._pending is not None:
                    # Before Lightning starts the loader's iterator: the right epoch's order.
                    self.sampler.load_state_dict(self._pending)
                    self._pending = None
                return _resumable(loaders, self)
            return loaders
        if isinstance(loaders, dict):
            return {key: self._adopt(value) for key, value in loaders.items()}
        if isinstance(loaders, (list, tuple)):
            return type(loaders)(self._adopt(value) for value in loaders)
        return loaders

    def _use(self, sampler: WeightedDistributedSampler) -> None:
        if self.sampler is None or (self.sampler is sampler and not self._attached):
            self.sampler = sampler
        elif self.sampler is not sampler:
            raise ConfigError(
                "the train dataloader's WeightedDistributedSampler is not the one this "
                "ShardBalanceCallback holds (one given to ShardBalanceCallback(sampler), or "
                "one attached earlier: with reload_dataloaders_every_n_epochs, return the same "
                "sampler). Use one sampler per fit")

    # -- training ---------------------------------------------------------------------------

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        found = _find_samplers(trainer.train_dataloader)
        if len(found) > 1:
            raise ConfigError(f"the train dataloaders hold {len(found)} "
                              "WeightedDistributedSamplers; ShardBalanceCallback supports one")
        if not found:
            raise ConfigError(
                "ShardBalanceCallback found no WeightedDistributedSampler in the train "
                "dataloader: return DataLoader(dataset, batch_sampler=sampler) from "
                "train_dataloader() (batch_sampler=, not sampler=)")
        self._use(found[0])
        self._check_accumulation(trainer)
        if self._attached:
            return
        if self.sampler.num_replicas != trainer.world_size:
            raise ConfigError(f"the sampler has num_replicas={self.sampler.num_replicas} but the "
                              f"Trainer runs on {trainer.world_size} processes")
        if trainer.world_size > 1:
            # The DDP wrapper the strategy built in its setup; the loader's iterator has already
            # started, which is fine: the sampler's ledger tracks every batch it yielded.
            # Lightning broadcasts a flag before every batch: under accumulation the fast
            # ranks wait inside a group, so the step clock would understate the imbalance.
            busy = self.busy
            if busy == "auto" and trainer.accumulate_grad_batches > 1:
                busy = "compute"
            self.sampler.attach(trainer.strategy.model, weighting=self.weighting, busy=busy,
                                **self._attach_args)
        self._attached = True

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
        # Lightning starts each later epoch's iterator after this hook. The first epoch's (and
        # a resumed one's) started before it, with the sampler already at that epoch (0, or
        # the checkpoint's), so setting the same epoch again changes nothing.
        self._check_accumulation(trainer)
        if self.sampler is not None:
            self.sampler.set_epoch(trainer.current_epoch)
        self._epoch_batches = 0
        self._resumed = None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._epoch_batches = batch_idx + 1

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"):
        # sampler.metrics() is the same on every rank (what the coordinator reported with
        # the plan): logged without a sync, so every logger sees every rank's figures.
        if self.sampler is not None:
            metrics = {f"shardbalance/{k}": float(v) for k, v in self.sampler.metrics().items()}
            if metrics:
                pl_module.log_dict(metrics, on_epoch=True, sync_dist=False)

    def _check_accumulation(self, trainer: "pl.Trainer") -> None:
        steps = trainer.accumulate_grad_batches
        if self.weighting == "hook" and steps > 1 and self.sampler is not None \
                and self.sampler.accumulation_steps != steps:
            raise ConfigError(
                f"Trainer(accumulate_grad_batches={steps}) with weighting='hook' needs the "
                f"sampler built with accumulation_steps={steps} (it has "
                f"{self.sampler.accumulation_steps}), so that plans change only between "
                "accumulation groups; or use ShardBalanceCallback(weighting='output')")

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str):
        if stage != "fit":
            return
        self._unwrap()
        if self.sampler is not None:
            self.sampler.close()
        if not self._given:
            # The next fit's train_dataloader() builds a new sampler for the new DDP model.
            self.sampler, self._attached = None, False

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sampler is None else {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("sampler")
        # Mid-epoch positions come back through the loader's state (Lightning restores it
        # after reading the loader's length); an epoch boundary has no loader state to restore.
        self._pending = state if state is not None and state.get("position") == 0 else None

    # -- the loader's state (called by Lightning through the resumable loader) ----------------

    def _loader_state(self) -> dict[str, Any]:
        state = self.sampler.state_dict()
        batches = self._epoch_batches if state["position"] > 0 else 0
        return {"sampler": state, "batches": batches}

    def _load_loader_state(self, state: dict[str, Any]) -> None:
        try:
            sampler_state, batches = state["sampler"], int(state["batches"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Invalid train loader state {state!r}: expected the "
                              "'sampler' and 'batches' a ShardBalanceCallback saved") from exc
        self.sampler.load_state_dict(sampler_state)
        self._epoch_batches = batches
        self._resumed = (self.sampler.epoch, batches) if batches else None

    def _loader_length(self, remaining: int) -> int:
        """Batches of the epoch as Lightning counts them: those trained before a mid-epoch
        resume (it keeps counting from there) plus the ones the sampler still yields."""
        resumed = self._resumed
        if resumed is None or resumed[0] != self.sampler.epoch or \
                remaining >= _full_steps(self.sampler):
            return remaining
        return resumed[1] + remaining


def _full_steps(sampler: WeightedDistributedSampler) -> int:
    whole, rest = divmod(sampler.num_samples, sampler.global_batch_size)
    return whole + (1 if rest and not sampler.drop_last else 0)


class _ResumableLoader:
    """Mixed into the user's DataLoader class: Lightning's ``_Stateful`` protocol and a length
    that stays right in a resumed epoch. State lives with the callback."""

    _shardbalance_callback: ShardBalanceCallback

    def __len__(self) -> int:
        return self._shardbalance_callback._loader_length(super().__len__())

    def state_dict(self) -> dict[str, Any]:
        return self._shardbalance_callback._loader_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._shardbalance_callback._load_loader_state(state)


@functools.lru_cache(maxsize=None)
def _resumable_class(cls: type) -> type:
    return type(f"Resumable{cls.__name__}", (_ResumableLoader, cls), {})


def _resumable(loader: DataLoader, callback: ShardBalanceCallback) -> DataLoader:
    """The same loader (same settings, same sampler) as an instance of a resumable subclass.

    A shallow copy, so the user's own loader object stays as it was.
    """
    copy = object.__new__(_resumable_class(type(loader)))
    copy.__dict__.update(loader.__dict__)
    copy.__dict__["_shardbalance_callback"] = callback
    return copy


def _find_samplers(loaders: Any) -> list[WeightedDistributedSampler]:
    if isinstance(loaders, DataLoader):
        found = loaders.batch_sampler
        return [found] if isinstance(found, WeightedDistributedSampler) else []
    values = loaders.values() if isinstance(loaders, dict) else \
        loaders if isinstance(loaders, (list, tuple)) else ()
    return [s for value in values for s in _find_samplers(value)]
