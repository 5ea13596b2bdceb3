"""shardbalance: uneven data-parallel batch splits for heterogeneous GPU pools.

The global batch stays fixed; each rank gets a share proportional to its measured speed, and
gradients are weighted by that share, so training is the same as a homogeneous run, only with
less waiting. Start with :class:`WeightedDistributedSampler`.

Public names are imported lazily so ``python -m shardbalance coordinator`` starts without torch.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

_EXPORTS = {
    "WeightedDistributedSampler": "sampler",
    "DynamicShardSampler": "pull",
    "Plan": "plan",
    "apportion": "plan",
    "EpochOrder": "order",
    "POLICIES": "policies",
    "Coordinator": "coordinator",
    "emulate_speed": "emulate",
    "EmulatedSpeed": "emulate",
    "ShardBalanceError": "_exceptions",
    "ConfigError": "_exceptions",
    "PlanError": "_exceptions",
    "ProtocolError": "_exceptions",
    "AuthenticationError": "_exceptions",
    "CoordinatorError": "_exceptions",
    "CoordinatorUnavailable": "_exceptions",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardbalance' has no attribute {name!r}")
    value = getattr(_import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
