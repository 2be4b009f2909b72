"""Every run records the code, software, machine and command line that made it; the analysis
says which code made which row, and warns when a figure mixes them."""

from __future__ import annotations

import json
import logging
import subprocess

import pandas as pd
import pytest
import torch

from pipeline.runs.ids import run_id
from pipeline.runs.provenance import code_state, code_version, code_versions, command_line
from pipeline.runs.rundir import RunDir

from .conftest import ROOT


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(repo)})


def test_code_state_of_a_clean_a_dirty_and_a_missing_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("h = 1e-3\n")
    (repo / ".gitignore").write_text("runs/\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "runs").mkdir()
    (repo / "runs" / "x.csv").write_text("ignored\n")  # ignored files are not code
    code, diff = code_state(repo)
    assert code == dict(commit=head, dirty=False, untracked=[]) and diff is None
    assert code_version(code) == head[:12]
    (repo / "train.py").write_text("h = 3e-3\n")
    (repo / "new_model.py").write_text("class Net: ...\n")
    code, diff = code_state(repo)
    assert code["dirty"] and code["untracked"] == ["new_model.py"]
    assert "-h = 1e-3" in diff and "+h = 3e-3" in diff
    assert code_version(code) == head[:12] + "+dirty"
    code, diff = code_state(tmp_path / "elsewhere")
    assert code["commit"] is None and diff is None and code_version(code) == "unknown"


def test_credentials_never_reach_the_record():
    argv = ["pipeline/train.py", "optim.h=1e-3", "logger.api_key=abc123", "WANDB_TOKEN=xyz", "db.password=p"]
    assert command_line(argv) == ["pipeline/train.py", "optim.h=1e-3", "logger.api_key=***", "WANDB_TOKEN=***",
                                  "db.password=***"]


def test_code_versions_of_a_resumed_run():
    a, b = dict(commit="a" * 40, dirty=False), dict(commit="b" * 40, dirty=True)
    assert code_versions([a, a]) == "a" * 12
    assert code_versions([a, b]) == f"{'a' * 12} then {'b' * 12}+dirty"
    assert code_versions([]) == "unknown"


@pytest.mark.slow
def test_each_attempt_records_its_provenance(cfg_factory, monkeypatch):
    """A run interrupted and resumed has two records; the software fields are this process's;
    the summary's code_version is the commit (and +dirty) of its attempts."""
    from analysis.runs import read_run
    from analysis.summary import summarize_run
    from pipeline import faults
    from pipeline.train import train

    cfg = cfg_factory("train.max_steps=8", "train.checkpoint_every=4")

    def interrupt(name, step=None):
        if name == "step" and step == 6:
            raise KeyboardInterrupt  # as Ctrl-C would: the run stays pending, resumable
    monkeypatch.setattr(faults, "point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    records = run.provenance()
    assert [r["attempt"] for r in records] == [1, 2]
    r = records[-1]
    assert r["torch"] == torch.__version__ and r["cuda"] == torch.version.cuda
    assert r["gpus"] == torch.cuda.device_count()
    assert isinstance(r["argv"], list) and r["host"]
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD"], capture_output=True, text=True).stdout
    assert r["commit"] == subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()
    if diff:  # this checkout has uncommitted changes: they are kept beside the record
        assert r["dirty"] and (run.path / r["diff_file"]).read_text() == diff
    else:
        assert "diff_file" not in r
    row = summarize_run(read_run(run.path))
    assert row["code_version"] == code_versions(records)


def test_a_damaged_provenance_file_costs_the_record_not_the_run(tmp_path):
    run = RunDir(tmp_path, "abc")
    run.path.mkdir()
    for junk in (b"{not json", b"[1, 2]", b'{"attempts": 3}', b"\xff\xfe"):
        run.provenance_file.write_bytes(junk)
        assert run.provenance() == []
    run.record_provenance(1, dict(commit="c" * 40, dirty=False), None)
    assert json.loads(run.provenance_file.read_text())["attempts"][0]["commit"] == "c" * 40


def test_the_analysis_warns_when_a_figure_mixes_code_versions(caplog):
    from analysis.__main__ import warn_mixed_code

    same = pd.DataFrame(dict(code_version=["a" * 12] * 3))
    with caplog.at_level(logging.WARNING):
        assert warn_mixed_code(same) is None
        line = warn_mixed_code(pd.DataFrame(dict(code_version=["a" * 12, "a" * 12, "b" * 12])))
        assert "different code versions" in line and f"{'a' * 12} (2 runs)" in line and f"{'b' * 12} (1 run)" in line
        dirty = warn_mixed_code(pd.DataFrame(dict(code_version=["a" * 12 + "+dirty"])))
        assert "a dirty tree" in dirty
    assert caplog.text.count("the figures' runs come from") == 2


@pytest.mark.slow
def test_a_sweep_job_records_the_sweeps_command_line_and_old_pickles_still_run(cfg_factory):
    import pickle

    from pipeline.train import TrainJob

    cfg = cfg_factory("train.max_steps=2")
    job = TrainJob(None, ["-m", "pipeline.dispatch.sweep", "run", "toy", "logger.api_key=s3cret"])
    assert pickle.loads(pickle.dumps(job))(cfg) == "completed"
    rec = RunDir(cfg.paths.runs, run_id(cfg)).provenance()[-1]
    assert rec["launched_by"] == ["-m", "pipeline.dispatch.sweep", "run", "toy", "logger.api_key=***"]
    old = TrainJob.__new__(TrainJob)  # as a job pickled before launched_by (and outcome) existed unpickles
    other = cfg_factory("train.max_steps=3")
    assert old(other) == "completed"
    assert "launched_by" not in RunDir(other.paths.runs, run_id(other)).provenance()[-1]


@pytest.mark.slow
def test_a_job_pickled_before_the_package_layout_still_runs(tmp_path, monkeypatch):
    """tests/data/job-pickled-before-the-layout.pkl is what submitit wrote for a sweep's job at
    commit 989f61a, when every module sat directly under pipeline/ (a `DelayedSubmission` of
    `pipeline.train.TrainJob(outcome="outcome.json", ...)` and the TINY config with 3 steps,
    relative paths). A job queued then unpickles and runs under today's layout: the same run id,
    completed, its outcome written, and the same numbers as the run composed today."""
    import shutil

    from submitit.core.utils import DelayedSubmission

    from pipeline.train import TrainJob, train

    from .conftest import TINY, make_cfg

    shutil.copy(ROOT / "tests" / "data" / "job-pickled-before-the-layout.pkl", tmp_path / "job.pkl")
    monkeypatch.chdir(tmp_path)
    job = DelayedSubmission.load(tmp_path / "job.pkl")
    assert type(job.function) is TrainJob and job.function.launched_by[:2] == ["-m", "pipeline.sweep"]
    assert job.result() == "completed"
    assert json.loads((tmp_path / "outcome.json").read_text())["result"] == "completed"
    today = make_cfg(TINY + ["train.max_steps=3"], runs=tmp_path / "today")
    assert run_id(today) == "2cde0d448cce" and run_id(job.args[0]) == run_id(today)
    old = RunDir(tmp_path / "runs", "2cde0d448cce")
    assert old.status()["state"] == "completed" and old.provenance()[-1]["launched_by"][1] == "pipeline.sweep"
    assert train(today) == "completed"
    new = RunDir(today.paths.runs, run_id(today))
    tables = [pd.read_csv(r.metrics).drop(columns="time_s") for r in (old, new)]
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
