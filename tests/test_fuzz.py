"""The run-store fuzzer in the suite (issue 31): 50 cases of random damage to a tiny sweep's
files, then every command a user runs (tests/fuzz.py says what is damaged and what is asserted).
The seeds are fixed (1..50, or from FUZZ_SEED) so that the suite gives the same answer on every
machine; `make fuzz CASES=2000` explores new seeds from the clock, and a failing seed replays with
`python -m tests.fuzz --seed S --cases 1`."""

from __future__ import annotations

import os

import pytest

from tests import fuzz

CASES = 50


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fuzz.build_base(tmp_path_factory.mktemp("fuzz"))


def test_random_damage_never_gives_a_traceback_loses_a_row_or_passes_unflagged(base, tmp_path):
    first = int(os.environ.get("FUZZ_SEED", "1"))
    root, ref = base
    failures = []
    for seed in range(first, first + CASES):
        case, bad = fuzz.run_case(seed, root, ref, tmp_path / f"case-{seed}", figures=seed % 5 == 0)
        if bad:
            failures.append(f"seed {seed} ({'; '.join(case.ops)}):\n  " + "\n  ".join(bad))
    assert not failures, "\n".join(failures)


def test_the_catalogue_is_documented():
    """docs/runs.md lists every operator of the fuzzer's catalogue."""
    text = (fuzz.ROOT / "docs" / "runs.md").read_text()
    missing = [op for op in fuzz.CATALOGUE if f"`{op}`" not in text]
    assert not missing, missing
