"""The training run end to end: run directory contract, validation, skipping, divergence,
threshold evaluations, and bit-exact resume after SIGKILL."""

import json
import math
import signal

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config.validate import ConfigError, validate
from pipeline.runs.history import METRIC_COLUMNS
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.thresholds import divergence_step
from pipeline.train import train

from .conftest import TINY, crash_at_step, make_cfg, run_cli, start_stopped_at


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
    assert not math.isfinite(df.loss.iloc[-1])  # 50 steps < the patience: it stopped on a non-finite loss
    assert train(cfg) == "diverged"  # not rerun without retry
    assert run.status()["attempts"] == 1


BOUNDED_BLOWUP = ["model=bilinear", "data=bilinear", "optim=adam", "optim.h=1e-2", "optim.beta=0.999",
                  "optim.rho=0.9", "precision=fp64", "train.micro_batch=1", "train.max_steps=3000",
                  "train.checkpoint_every=10", "train.diverge_factor=2", "train.diverge_patience=30"]


@pytest.mark.slow
def test_bounded_step_blowup_ends_diverged_by_the_one_rule(cfg_factory, monkeypatch):
    """Adam's step is bounded: beta = 0.999 > sqrt(rho) climbs from a loss of 164 to ~700 and
    never reaches inf. The loop stops it as `diverged` (exit 0) where the rule of
    pipeline.thresholds says, also across a crash and resume in the middle of the count."""
    ref = cfg_factory(*BOUNDED_BLOWUP, tiny=False)
    assert train(ref) == "diverged"
    df = read_metrics(RunDir(ref.paths.runs, run_id(ref)).metrics)
    losses = df.loss.tolist()
    k = divergence_step(losses, 2, 30)
    assert k is not None and k == len(losses) - 1 < 3000
    assert all(v > 2 * losses[0] for v in losses[k - 29:k + 1]) and losses[k - 30] <= 2 * losses[0]
    # killed 10 steps into the count of 30 and resumed from the checkpoint before it
    crash = k - 19
    cfg = make_cfg(BOUNDED_BLOWUP, runs=f"{ref.paths.runs}/again")
    with crash_at_step(monkeypatch, crash, "node failure"), pytest.raises(RuntimeError):
        train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    assert run.status()["state"] == "failed"
    assert train(make_cfg(BOUNDED_BLOWUP + ["retry=true"], runs=cfg.paths.runs)) == "diverged"
    again = read_metrics(run.metrics)
    assert again.loss.tolist() == losses and run.status()["step"] == k
    # diverge_factor=null: only a non-finite loss diverges, the climb runs to max_steps
    off = cfg_factory(*BOUNDED_BLOWUP, "train.diverge_factor=null", "train.max_steps=400",
                      "optim.h=5e-2", tiny=False)
    assert train(off) == "completed"


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_progress_log_lines_when_not_on_a_terminal(tmp_path):
    r = run_cli(["pipeline.train", *TINY, "train.progress=auto", "train.log_every=4",
                 f"paths.runs={tmp_path}/runs"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for n in (0, 4, 8, 12):
        assert f"step {n}/12 loss=" in out
    assert "eta=" in out and "pert_norm=" in out and "step 5/12" not in out


SWITCHES = {  # switch -> largest relative difference of the loss from fp32 after 3 steps
    "precision=fp64": 1e-5, "precision=bf16": 5e-2, "precision=tf32": 1e-6, "precision=torch_default": 1e-6,
    "channels_last=true": 1e-5, "deterministic=true": 1e-6}


@pytest.mark.parametrize("switch", [*SWITCHES, "compile=true"])
def test_numerics_switch_is_in_effect(cfg_factory, switch):
    """Each switch changes what runs (dtype, autocast, memory format, algorithms, compiled
    module), and the flags it sets are restored afterwards."""
    from pipeline.engine.data import load_dataset
    from pipeline.engine.numerics import numerics
    from pipeline.engine.setup import build

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
        assert torch.backends.cuda.matmul.allow_tf32 == (switch == "precision=tf32")
        assert torch.backends.cudnn.allow_tf32 == (switch in ("precision=tf32", "precision=torch_default"))
        assert torch.backends.cudnn.benchmark == (switch == "precision=torch_default")
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cuda.matmul.allow_tf32


CLOSE = {  # switch -> largest relative difference of the loss from fp32 over 6 steps, and why
    "precision=fp64": 1e-5,      # fp32 rounds at 6e-8 per operation; a few thousand operations
    "precision=bf16": 5e-2,      # bf16 keeps 8 bits of mantissa: 4e-3 per rounding
    "precision=tf32": 1e-6,      # no TF32 on a CPU: the fp32 kernels themselves
    "precision=torch_default": 1e-6,  # the same on a CPU
    "channels_last=true": 1e-5,  # other kernels, other summation order: fp32 rounding
    "deterministic=true": 1e-6,  # the CPU kernels are deterministic already
    "compile=true": 1e-5,        # fused kernels, other summation order: fp32 rounding
}


def _compiler_missing() -> str | None:
    import shutil

    return None if shutil.which("g++") or shutil.which("c++") else "torch.compile on CPU needs a C++ compiler"


@pytest.mark.slow
@pytest.mark.parametrize("switch", list(CLOSE))
def test_numerics_switch_runs_close_to_fp32_and_resumes(cfg_factory, switch, monkeypatch, tmp_path):
    """A small CNN with BatchNorm under each switch: finite metrics within the switch's
    tolerance of fp32, and a crash after a checkpoint resumes to the same metrics as an
    uninterrupted run under that switch."""
    if switch == "compile=true" and _compiler_missing():
        pytest.skip(_compiler_missing())
    steps = ["train.max_steps=6", "model.norm=bn", "train.checkpoint_every=2"]
    base = cfg_factory(*steps)
    cfg = cfg_factory(*steps, switch)
    assert run_id(cfg) != run_id(base)
    assert train(base) == train(cfg) == "completed"
    a = read_metrics(RunDir(base.paths.runs, run_id(base)).metrics)
    b = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    assert np.isfinite(b.drop(columns=["test_loss", "test_acc"]).to_numpy()).all()
    rel = (abs(a.loss - b.loss) / a.loss).max()
    assert rel < CLOSE[switch], rel
    if switch in ("precision=fp64", "precision=bf16"):  # another dtype must show in the numbers
        assert (a.loss != b.loss).any()
    # crash at step 5, after the checkpoint of step 4; retry resumes from it
    again = make_cfg([*TINY, *steps, switch], runs=tmp_path / "again")
    with crash_at_step(monkeypatch, 5, "node failure"), pytest.raises(RuntimeError):
        train(again)
    assert train(make_cfg([*TINY, *steps, switch, "retry=true"], runs=tmp_path / "again")) == "completed"
    c = read_metrics(RunDir(again.paths.runs, run_id(again)).metrics)
    cols = [col for col in b.columns if col != "time_s"]
    pd.testing.assert_frame_equal(b[cols], c[cols])


@pytest.mark.slow
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
