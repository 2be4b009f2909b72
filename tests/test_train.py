"""The training run end to end: run directory contract, validation, skipping, divergence,
threshold evaluations, and bit-exact resume after SIGKILL."""

import json
import signal

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.store import METRIC_COLUMNS, RunDir, run_id
from pipeline.train import train
from pipeline.validate import ConfigError, validate

from .conftest import TINY, make_cfg, run_cli, start_stopped_at


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


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    ref_runs, runs = tmp_path / "ref", tmp_path / "killed"
    args = [*TINY, "train.max_steps=40", "train.checkpoint_every=5", f"paths.runs={runs}",
            "train.reshuffle=true"]
    cfg = make_cfg(args)
    p = start_stopped_at(tmp_path, args, 13)
    p.kill()
    p.wait()
    run = RunDir(runs, run_id(cfg))
    assert run.status()["state"] == "running"  # killed: nothing could update it
    assert torch.load(run.checkpoint, weights_only=True)["step"] == 10
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 10" in r.stdout + r.stderr
    assert "taking over the lease" in r.stderr and "is gone" in r.stderr
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


SWITCHES = {  # switch -> largest relative difference of the loss from fp32 after 3 steps
    "precision=fp64": 1e-5, "precision=bf16": 5e-2, "precision=tf32": 1e-6,
    "channels_last=true": 1e-5, "deterministic=true": 1e-6}


@pytest.mark.parametrize("switch", [*SWITCHES, "compile=true"])
def test_numerics_switch_is_in_effect(cfg_factory, switch):
    """Each switch changes what runs (dtype, autocast, memory format, algorithms, compiled
    module), and the flags it sets are restored afterwards."""
    from pipeline.data import load_dataset
    from pipeline.train import build, numerics

    cfg = cfg_factory(switch, "model.norm=bn")
    with numerics(cfg) as (device, autocast):
        data = load_dataset(cfg.data, device)
        model, fwd, _ = build(cfg, data, device)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert (fwd is not model) == (switch == "compile=true")
        if switch == "compile=true":
            assert isinstance(fwd, torch._dynamo.eval_frame.OptimizedModule) and fwd._orig_mod is model
            return  # compiling needs a C++ compiler: its run is in `make bench --all-precisions`
        with autocast():
            out = fwd(data.x_train[:8])
        expected = {"precision=bf16": torch.bfloat16, "precision=fp64": torch.float64}.get(switch, torch.float32)
        assert out.dtype == expected
        fp64 = switch == "precision=fp64"
        assert (conv.weight.dtype == torch.float64) == (data.x_train.dtype == torch.float64) == fp64
        cl = torch.channels_last
        assert conv.weight.is_contiguous(memory_format=cl) == data.x_train.is_contiguous(memory_format=cl) \
            == (switch == "channels_last=true")
        assert torch.are_deterministic_algorithms_enabled() == (switch == "deterministic=true")
        assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == (switch == "precision=tf32")
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_numerics_switch_runs_close_to_fp32(cfg_factory, switch):
    base = cfg_factory("train.max_steps=3", "model.norm=bn")
    cfg = cfg_factory("train.max_steps=3", "model.norm=bn", switch)
    assert run_id(cfg) != run_id(base)
    assert train(base) == train(cfg) == "completed"
    a = read_metrics(RunDir(base.paths.runs, run_id(base)).metrics)
    b = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    assert np.isfinite(b.drop(columns=["test_loss", "test_acc"]).to_numpy()).all()
    rel = (abs(a.loss - b.loss) / a.loss).max()
    assert rel < SWITCHES[switch], rel


def test_sigusr2_checkpoints_now_and_resume_is_identical(tmp_path):
    """Slurm's warning signal without Slurm or submitit: the run checkpoints after the current
    step, marks itself pending and exits; a rerun resumes there and ends like an uninterrupted
    run."""
    runs = tmp_path / "runs"
    args = [*TINY, "train.max_steps=300", "train.checkpoint_every=1000", f"paths.runs={runs}"]
    cfg = make_cfg(args)
    run = RunDir(runs, run_id(cfg))
    p = start_stopped_at(tmp_path, args, 30, env=dict(SLURM_JOB_ID=""))
    p.send_signal(signal.SIGUSR2)
    p.send_signal(signal.SIGCONT)
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0 and "preempted at step 31" in err
    st = run.status()
    assert st["state"] == "pending" and st["step"] > 30
    assert torch.load(run.checkpoint, weights_only=True)["step"] == st["step"]
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0 and f"resuming at step {st['step']}" in r.stdout + r.stderr
    ref = tmp_path / "ref"
    r = run_cli(["pipeline.train", *[a if not a.startswith("paths.runs") else f"paths.runs={ref}" for a in args]],
                cwd=tmp_path)
    a = read_metrics(run.metrics).drop(columns="time_s")
    b = read_metrics(RunDir(ref, run_id(cfg)).metrics).drop(columns="time_s")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
