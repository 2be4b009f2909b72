"""One home per rule: the exit statuses, the divergence rule's defaults, the finished states."""

from __future__ import annotations

import pytest

from pipeline import errors
from pipeline.thresholds import DIVERGE_FACTOR, DIVERGE_PATIENCE

from .conftest import make_cfg


@pytest.mark.parametrize("exc, status", [
    (errors.ConfigError("optim.h=-1: allowed ..."), 2), (errors.DataError("data.root=x: missing"), 2),
    (errors.LeaseHeld("runs/abc", {"host": "n1", "pid": 7}), 3), (errors.LeaseLost("taken over"), 4),
    (errors.DiskFull("runs/abc/metrics.csv"), 1), (RuntimeError("a bug"), 1), (KeyError("x"), 1),
])
def test_every_expected_failure_has_its_exit_status(exc, status):
    assert errors.exit_status(exc) == status


def test_every_expected_failure_is_defined_in_errors_only():
    """One table: a class that a caller is meant to catch (an exit status of its own) is defined
    in pipeline/errors.py and nowhere else; the layers import it from there."""
    import ast
    from pathlib import Path

    root = Path(errors.__file__).parent
    expected = {"ConfigError", "DataError", "DiskFull", "LeaseHeld", "LeaseLost"}
    for path in root.rglob("*.py"):
        classes = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
        where = classes & expected
        assert not where or path.name == "errors.py", f"{path.relative_to(root)} defines {where}"
    from pipeline.config import validate
    from pipeline.engine import data
    from pipeline.runs import files, lease

    assert validate.ConfigError is errors.ConfigError and data.DataError is errors.DataError
    assert lease.LeaseHeld is errors.LeaseHeld and files.DiskFull is errors.DiskFull


def test_the_divergence_defaults_are_the_configs():
    cfg = make_cfg()
    assert cfg.train.diverge_factor == DIVERGE_FACTOR and cfg.train.diverge_patience == DIVERGE_PATIENCE
