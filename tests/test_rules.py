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


def test_the_old_import_paths_name_the_same_classes():
    """Pickles and user code that name pipeline.validate.ConfigError and friends keep working."""
    from pipeline import data, lease, store, validate

    assert validate.ConfigError is errors.ConfigError and data.DataError is errors.DataError
    assert lease.LeaseHeld is errors.LeaseHeld and lease.LeaseLost is errors.LeaseLost
    assert store.DiskFull is errors.DiskFull


def test_the_divergence_defaults_are_the_configs():
    cfg = make_cfg()
    assert cfg.train.diverge_factor == DIVERGE_FACTOR and cfg.train.diverge_patience == DIVERGE_PATIENCE
