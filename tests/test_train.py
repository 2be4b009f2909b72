"""The training run end to end: run directory contract, validation, skipping, divergence,
threshold evaluations, and bit-exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from pipeline.store import METRIC_COLUMNS, RunDir, run_id
from pipeline.train import train
from pipeline.validate import ConfigError, validate

from .conftest import ROOT, TINY, make_cfg, run_cli


def read_metrics(path):
    return pd.read_csv(path)


def test_run_directory_contract(cfg_factory):
    cfg = cfg_factory()
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    assert {p.name for p in run.path.iterdir()} >= {"config.yaml", "metrics.csv", "status.json",
                                                     "checkpoint.pt"}
    st = json.loads(run.status_file.read_text())
    assert st["state"] == "completed" and st["step"] == 12 and st["attempts"] == 1
    df = read_metrics(run.metrics)
    assert list(df.columns)[: len(METRIC_COLUMNS)] == METRIC_COLUMNS
    assert df.step.tolist() == list(range(13))  # theta_0 .. theta_max_steps
    assert df.pert_norm_floor.nunique() == 1
    assert (df.pert_norm > df.pert_norm_floor).all() and (df.l1_norm <= df.pert_norm).all()
    # evaluated every eval_every steps and at the last step; empty elsewhere
    evaluated = df.step[df.test_acc.notna()].tolist()
    assert {0, 5, 10, 12} <= set(evaluated)
    assert df.test_acc[~df.step.isin(evaluated)].isna().all()
    conf = yaml.safe_load(run.config.read_text())
    assert conf["optim"]["h"] == cfg.optim.h and conf["model"]["name"] == "cnn"


def test_training_reduces_loss(cfg_factory):
    cfg = cfg_factory("train.max_steps=30", "optim.h=3e-3")
    train(cfg)
    df = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    assert df.loss.iloc[-1] < 0.8 * df.loss.iloc[0]


def test_floats_round_trip_exactly(cfg_factory):
    cfg = cfg_factory("train.max_steps=2")
    train(cfg)
    text = RunDir(cfg.paths.runs, run_id(cfg)).metrics.read_text().splitlines()
    for cell in text[1].split(",")[1:6]:
        assert repr(float(cell)) == cell


def test_threshold_crossing_triggers_evaluation(cfg_factory):
    # thresholds placed where this run crosses them between eval_every points
    cfg = cfg_factory("train.max_steps=30", "optim.h=3e-3", "train.eval_every=100")
    train(cfg)
    df = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    t = float(df.loss.iloc[7:9].mean())  # a loss value first reached around step 8
    first = int(df.step[df.loss < t].iloc[0])
    cfg2 = cfg_factory("train.max_steps=30", "optim.h=3e-3", "train.eval_every=100",
                       f"train.loss_thresholds=[{t}]")
    train(cfg2)
    df2 = read_metrics(RunDir(cfg2.paths.runs, run_id(cfg2)).metrics)
    assert set(df2.step[df2.test_acc.notna()]) == {0, first, 30}


def test_completed_run_is_skipped(cfg_factory):
    cfg = cfg_factory("train.max_steps=3")
    train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    mtime = run.metrics.stat().st_mtime_ns
    assert train(cfg) == "completed"
    assert run.metrics.stat().st_mtime_ns == mtime and run.status()["attempts"] == 1


def test_run_id_ignores_paths_logging_and_bookkeeping(tmp_path):
    a = make_cfg(TINY)
    b = make_cfg(TINY + ["paths.runs=/elsewhere", "logger=wandb", "train.checkpoint_every=7",
                         "train.progress=log", "sweep.name=x", "retry=true"])
    c = make_cfg(TINY + ["optim.beta=0.95"])
    assert run_id(a) == run_id(b) != run_id(c)
    assert len(run_id(a)) == 12


def test_diverged_run_ends_diverged_and_keeps_metrics(cfg_factory):
    cfg = cfg_factory("optim=gd", "optim.h=1e6", "train.max_steps=50")
    assert train(cfg) == "diverged"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    df = read_metrics(run.metrics)
    assert run.status()["state"] == "diverged" and len(df) < 51
    assert not pd.notna(df.loss.iloc[-1]) or not (abs(df.loss.iloc[-1]) < float("inf"))
    assert train(cfg) == "diverged"  # not rerun without retry
    assert run.status()["attempts"] == 1


def test_stop_loss(cfg_factory):
    cfg = cfg_factory("train.max_steps=200", "optim.h=3e-3", "train.stop_loss=1.5")
    train(cfg)
    df = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    assert df.loss.iloc[-1] < 1.5 and (df.loss.iloc[:-1] >= 1.5).all()


@pytest.mark.parametrize("override,key", [
    ("optim.beta=1.2", "optim.beta"), ("optim.rho=-0.1", "optim.rho"), ("optim.h=0", "optim.h"),
    ("optim.eps=0", "optim.eps"), ("train.micro_batch=0", "train.micro_batch"),
    ("model.name=vgg", "model"), ("data.name=imagenet", "data")])
def test_validation_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(TINY + [override]))
    assert str(e.value).startswith(key)
    assert "allowed" in str(e.value)


def test_cli_rejects_bad_input_before_work(tmp_path):
    r = run_cli(["pipeline.train", *TINY, "optim.beta=1.2", f"paths.runs={tmp_path}/runs"],
                cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["error: optim.beta=1.2: allowed range [0, 1)"]
    assert not (tmp_path / "runs").exists()


def test_cli_unknown_group_option_lists_choices(tmp_path):
    r = run_cli(["pipeline.train", "model=vgg"], cwd=tmp_path)
    assert r.returncode != 0 and "resnet50" in r.stderr


def _kill_mid_run(tmp_path, runs, at_step):
    args = [*TINY, "train.max_steps=40", "train.checkpoint_every=5", f"paths.runs={runs}",
            "train.reshuffle=true"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = make_cfg(args)
    metrics = RunDir(runs, run_id(cfg)).metrics
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > at_step + 1:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return args, cfg


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    ref_runs, runs = tmp_path / "ref", tmp_path / "killed"
    args, cfg = _kill_mid_run(tmp_path, runs, at_step=13)
    run = RunDir(runs, run_id(cfg))
    assert run.status()["state"] == "running"  # killed: nothing could update it
    assert run.checkpoint.exists()
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming at step" in r.stdout + r.stderr
    ref_args = [a if not a.startswith("paths.runs") else f"paths.runs={ref_runs}" for a in args]
    r = run_cli(["pipeline.train", *ref_args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = read_metrics(run.metrics).drop(columns="time_s")
    b = read_metrics(RunDir(ref_runs, run_id(cfg)).metrics).drop(columns="time_s")
    assert a.step.tolist() == list(range(41))  # no duplicated or missing step
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert run.status()["attempts"] == 2 and run.status()["state"] == "completed"


def test_progress_log_lines_when_not_on_a_terminal(tmp_path):
    r = run_cli(["pipeline.train", *TINY, "train.progress=auto", "train.log_every=4",
                 f"paths.runs={tmp_path}/runs"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for n in (0, 4, 8, 12):
        assert f"step {n}/12 loss=" in out
    assert "eta=" in out and "pert_norm=" in out and "step 5/12" not in out


@pytest.mark.parametrize("opt", ["precision=bf16", "channels_last=true", "deterministic=true"])
def test_opt_in_numerics_switches_run_and_stay_close(cfg_factory, opt):
    base = cfg_factory("train.max_steps=3")
    train(base)
    cfg = cfg_factory("train.max_steps=3", opt)
    assert run_id(cfg) != run_id(base)
    assert train(cfg) == "completed"
    a = read_metrics(RunDir(base.paths.runs, run_id(base)).metrics)
    b = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    assert abs(a.loss.iloc[-1] - b.loss.iloc[-1]) < 0.05


def test_sigusr2_checkpoints_now_and_resume_is_identical(tmp_path):
    """Slurm's warning signal without Slurm or submitit: the run checkpoints after the current
    step, marks itself pending and exits; a rerun resumes there and ends like an uninterrupted
    run."""
    runs = tmp_path / "runs"
    args = [*TINY, "train.max_steps=300", "train.checkpoint_every=1000", f"paths.runs={runs}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SLURM_JOB_ID", None)
    p = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cfg = make_cfg(args)
    run = RunDir(runs, run_id(cfg))
    deadline = time.time() + 120
    while time.time() < deadline and not (run.metrics.exists() and len(run.metrics.read_text().splitlines()) > 30):
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR2)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "preempted at step" in err
    st = run.status()
    assert st["state"] == "pending" and st["step"] > 30
    assert __import__("torch").load(run.checkpoint, weights_only=True)["step"] == st["step"]
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0 and f"resuming at step {st['step']}" in r.stdout + r.stderr
    ref = tmp_path / "ref"
    r = run_cli(["pipeline.train", *[a if not a.startswith("paths.runs") else f"paths.runs={ref}" for a in args]],
                cwd=tmp_path)
    a = read_metrics(run.metrics).drop(columns="time_s")
    b = read_metrics(RunDir(ref, run_id(cfg)).metrics).drop(columns="time_s")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
