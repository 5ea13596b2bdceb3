"""The public surface: exported names, the console script, the exception tree."""

import importlib
import subprocess
import sys
import types

import pytest

import shardbalance
from shardbalance import _exceptions as exc


def test_all_lists_exactly_the_public_names():
    # Resolving every listed name imports its module; afterwards the package's real public
    # attributes (its own globals, submodules aside) are exactly __all__: nothing listed is
    # missing, nothing public leaks unlisted.
    for name in shardbalance.__all__:
        assert getattr(shardbalance, name) is not None, name
    public = {name for name, value in vars(shardbalance).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(shardbalance.__all__) - {"__version__"}
    assert "WeightedDistributedSampler" in shardbalance.__all__
    # Each export is the object its module defines, and that module lists it as public.
    for name, module in shardbalance._EXPORTS.items():
        defining = importlib.import_module(f"shardbalance.{module}")
        assert getattr(defining, name) is getattr(shardbalance, name), name
        assert name in getattr(defining, "__all__", [name]), (name, module)


def test_positional_arguments_after_the_global_batch_size_are_refused():
    # DistributedSampler(ds, num_replicas, rank) ported as is would otherwise set B = 2.
    with pytest.raises(TypeError, match="keyword") as info:
        shardbalance.WeightedDistributedSampler(range(8), 2, 0)
    assert "num_replicas" in str(info.value) and "rank" in str(info.value)


def test_exception_tree():
    assert issubclass(exc.ConfigError, ValueError)
    for name in ("ConfigError", "PlanError", "ProtocolError", "CoordinatorError"):
        assert issubclass(getattr(exc, name), exc.ShardBalanceError)
    assert issubclass(exc.AuthenticationError, exc.ProtocolError)
    assert issubclass(exc.CoordinatorUnavailable, exc.CoordinatorError)


def test_coordinator_cli_starts_without_importing_torch():
    code = ("import sys, shardbalance.cli, shardbalance.coordinator; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"


def test_cli_reports_a_bad_bind_address_clearly():
    proc = subprocess.run([sys.executable, "-m", "shardbalance", "coordinator", "--bind",
                           "nonsense://x"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Cannot bind the coordinator to 'nonsense://x'" in proc.stderr


def test_launchers_are_valid_bash_and_pass_arguments_through():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    scripts = sorted((root / "launch").iterdir())
    assert {p.name for p in scripts} >= {"single_node.sh", "multi_node.sh", "coordinator.sh",
                                         "slurm.sbatch"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
        text = script.read_text()
        assert "set -euo pipefail" in text
        if script.name != "coordinator.sh":
            assert '"$@"' in text
