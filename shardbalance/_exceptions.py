"""The exceptions shardbalance raises.

    ShardBalanceError            base of everything below; catch this to catch them all
    ├── ConfigError              also a ValueError: a bad argument or setting, raised before anything runs
    ├── PlanError                no valid plan: bounds that cannot sum to the global batch, ranks
    │                            that disagree on the plan, a ledger that ran dry
    ├── ProtocolError            a message that is not a valid shardbalance message
    │   └── AuthenticationError  a message whose signature does not match the shared secret
    └── CoordinatorError         the coordinator refused a request or could not be reached
        └── CoordinatorUnavailable  no reply within the time bound (the coordinator is down or slow)

Lower-level errors (zmq.ZMQError, json.JSONDecodeError, ...) are translated into these with
``raise ... from exc`` so the cause stays visible.
"""

__all__ = [
    "ShardBalanceError",
    "ConfigError",
    "PlanError",
    "ProtocolError",
    "AuthenticationError",
    "CoordinatorError",
    "CoordinatorUnavailable",
]


class ShardBalanceError(Exception):
    """Base class of every error shardbalance raises."""


class ConfigError(ShardBalanceError, ValueError):
    """A bad argument or setting. Subclasses ValueError, so ``except ValueError`` works too."""


class PlanError(ShardBalanceError):
    """No valid plan can be made or agreed on."""


class ProtocolError(ShardBalanceError):
    """A message that does not follow the wire format of :mod:`shardbalance.protocol`."""


class AuthenticationError(ProtocolError):
    """A message signed with another secret, or not signed at all."""


class CoordinatorError(ShardBalanceError):
    """The coordinator answered with an error, or could not be used."""


class CoordinatorUnavailable(CoordinatorError):
    """The coordinator did not answer within the time bound."""
