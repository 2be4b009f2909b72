"""The thread budget (pipeline/threads.py): every training process uses its share of the cores,
from the first that applies of train.threads, the local launcher's share, Slurm's CPUs per task,
torchrun's ranks, OMP_NUM_THREADS, the cores it may run on. These tests are about threads: they
set their own."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline import threads
from pipeline.config.validate import ConfigError, validate
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir

from .conftest import ROOT, run_cli


@pytest.mark.parametrize("explicit, env, n, why", [
    (3, {"ADAM_THREADS": "2", "SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "5"}, 3, "train.threads"),
    (None, {"ADAM_THREADS": "2", "SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "5"}, 2, "ADAM_THREADS"),
    (None, {"SLURM_CPUS_PER_TASK": "4", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "5"}, 4, "SLURM_CPUS_PER_TASK"),
    (None, {"OMP_NUM_THREADS": "5,2"}, 5, "OMP_NUM_THREADS"),  # OpenMP's nested form: its first level
    (None, {"ADAM_THREADS": "two", "SLURM_CPUS_PER_TASK": "0", "OMP_NUM_THREADS": "6"}, 6, "OMP_NUM_THREADS"),
])
def test_the_first_rule_that_applies_decides(explicit, env, n, why):
    got, reason = threads.budget(explicit, env)
    assert got == n and why in reason


def test_torchrun_ranks_share_the_cores_and_the_default_is_every_core(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 16)
    assert threads.budget(None, {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}) == (
        4, "16 cores shared by 4 torchrun ranks")
    assert threads.budget(None, {"LOCAL_WORLD_SIZE": "1"}) == (16, "all 16 cores")
    assert threads.budget(None, {}) == (16, "all 16 cores")
    assert threads.share(3) == 5 and threads.share(32) == 1 and threads.share(0) == 16
    assert threads.child_env(2) == {"ADAM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_cores_is_this_process_affinity():
    assert threads.cores() == len(os.sched_getaffinity(0))


def test_train_threads_is_checked_and_not_in_the_run_id(cfg_factory):
    with pytest.raises(ConfigError, match=r"^train.threads=0: allowed values are integers >= 1 or null$"):
        validate(cfg_factory("train.threads=0"))
    assert run_id(cfg_factory("train.threads=3")) == run_id(cfg_factory())


def test_a_run_uses_its_budget_records_it_and_gives_the_caller_its_threads_back(cfg_factory, monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    from pipeline.train import train

    cfg = cfg_factory("train.max_steps=2", "train.threads=2")
    with caplog.at_level("INFO", logger="pipeline"):
        assert train(cfg) == "completed"
    rec = RunDir(cfg.paths.runs, run_id(cfg)).provenance()[-1]
    assert rec["threads"] == 2 and rec["cores"] == threads.cores()
    assert f"run {run_id(cfg)}: 2 CPU threads per process (train.threads)" in caplog.text
    assert torch.get_num_threads() == before
    monkeypatch.setenv("ADAM_THREADS", "1")
    other = cfg_factory("train.max_steps=3")
    assert train(other) == "completed"
    assert RunDir(other.paths.runs, run_id(other)).provenance()[-1]["threads"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_the_local_launcher_gives_each_run_its_share(tmp_path, jobs):
    """JOBS runs at a time on the cores there are: each gets cores // JOBS threads (at least 1),
    set in its environment before torch loads; the sweep says so."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ADAM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline.dispatch.sweep", "run", "synthetic", "--jobs", str(jobs),
                        "--", f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps", "sweep.name=synthetic",
                        "train.max_steps=3", "data.n_train=64", "data.n_test=32"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    share = max(1, threads.cores() // jobs)
    assert f"{jobs} runs at a time, {share} thread{'s' * (share > 1)} per process" in r.stdout
    recs = [RunDir(d.parent, d.name).provenance()[-1] for d in (tmp_path / "runs").iterdir()]
    assert len(recs) >= 2 and {rec["threads"] for rec in recs} == {share}


def test_bad_threads_on_the_command_line_is_one_line(tmp_path):
    r = run_cli(["pipeline.train", "train.threads=-2", f"paths.runs={tmp_path}/runs"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: train.threads=-2: allowed values are integers >= 1 or null"), r.stderr
