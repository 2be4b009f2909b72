"""A quick start: a plain run imports only what it needs. Not wandb without logger=wandb, not
submitit outside a sweep's job, nothing of the analysis, and not torch._dynamo / torch._inductor
(2 s) unless the run compiles or asks for determinism. Timings: `python -m bench.startup_bench`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

HEAVY = ("wandb", "submitit", "matplotlib", "pandas", "scipy", "torch._dynamo", "torch._inductor")
PROBE = """
import json, sys
from pipeline.train import cli
try:
    cli(sys.argv[1:])
except SystemExit:
    pass
print("LOADED=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def loaded_by_a_run(tmp_path, *overrides) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true")
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), "sweep=toy", "train.max_steps=30",
                        f"paths.runs={tmp_path}/runs", "train.progress=none", *overrides],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("LOADED=")]
    assert r.returncode == 0 and line, r.stdout + r.stderr
    assert list((tmp_path / "runs").glob("*/metrics.csv")), "the run did not run"
    return json.loads(line[0][len("LOADED="):])


def test_a_plain_run_imports_nothing_heavy_it_does_not_use(tmp_path):
    assert loaded_by_a_run(tmp_path) == []


@pytest.mark.slow
def test_the_probe_sees_what_a_run_does_use(tmp_path):
    """The same probe, on runs that need them: wandb for logger=wandb, torch._inductor for
    deterministic=true (torch imports it to set the switch)."""
    got = loaded_by_a_run(tmp_path, "logger=wandb", "logger.mode=offline", "deterministic=true")
    assert "wandb" in got and "torch._inductor" in got


def test_a_requeued_job_is_the_same_call_again(cfg_factory):
    """submitit requeues what `checkpoint` returns (it asks only that the callable has one)."""
    from submitit.helpers import DelayedSubmission

    from pipeline.train import TrainJob

    cfg = cfg_factory()
    job = TrainJob("outcome.json", ["-m", "pipeline.dispatch.sweep"])
    again = job.checkpoint(cfg)
    assert isinstance(again, DelayedSubmission) and again.function is job and again.args == (cfg,)


def test_bad_input_is_one_line_before_torch_loads(tmp_path):
    """Validation needs no torch (pipeline/catalog.py holds the names it checks): a bad value is
    reported at once, and neither torch nor anything of the engine has been imported."""
    probe = ("import sys\nfrom pipeline.train import cli\ntry:\n    cli(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    print('EXIT', e.code, 'torch' in sys.modules, 'pipeline.engine.loop' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for bad, line in [("optim.beta=1.2", "optim.beta=1.2: allowed range [0, 1)"),
                      ("model.activation=swish", "model.activation=swish: allowed values are"),
                      ("optim.h=1e39", "not representable in float32")]:
        args = ["model=mlp"] if "activation" in bad else []
        r = subprocess.run([sys.executable, "-c", probe, *args, bad, f"paths.runs={tmp_path}/runs"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert "EXIT 2 False False" in r.stdout and line in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "runs").exists()


def test_the_catalog_names_what_the_engine_implements():
    import torch

    from models.small import ACTIVATIONS
    from pipeline import catalog
    from pipeline.engine.optim import OPTIMIZERS

    assert set(ACTIVATIONS) == set(catalog.ACTIVATIONS) and set(OPTIMIZERS) == set(catalog.OPTIMIZERS)
    for name, (largest, tiny) in catalog.FLOATS.items():
        fi = torch.finfo(getattr(torch, name))
        assert (fi.max, fi.tiny) == (largest, tiny)
