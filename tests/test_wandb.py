"""wandb mirror: offline runs read back from their run files."""

import math

import pandas as pd
import pytest

from analysis.wandb_read import find_run_files, read_finished_run
from pipeline.loggers import wandb_mode
from pipeline.store import RunDir, run_id
from pipeline.train import train


def test_rows_config_group_and_tags_reach_wandb(cfg_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_factory("logger=wandb", "sweep.name=mysweep", "train.max_steps=6")
    train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    files = find_run_files(run.path)
    assert len(files) == 1
    wb = read_finished_run(files[0])
    assert wb["finished"]
    assert wb["id"] == run.id and wb["group"] == "mysweep"
    assert set(wb["tags"]) >= {"cnn", "synthetic", "adam"}
    assert wb["config"]["optim"]["h"] == cfg.optim.h
    hist = pd.DataFrame(wb["history"])
    m = pd.read_csv(run.metrics)
    assert hist["_step"].tolist() == m.step.tolist()
    assert hist["loss"].tolist() == m.loss.tolist()  # exact, not rounded
    assert hist["pert_norm"].tolist() == m.pert_norm.tolist()
    evaluated = m.test_acc.notna()
    assert hist["test_acc"][evaluated.values].tolist() == m.test_acc[evaluated].tolist()
    assert all(math.isnan(v) for v in hist["test_acc"][~evaluated.values])  # not logged there


def test_resumed_run_continues_the_same_wandb_run(cfg_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_factory("logger=wandb", "train.max_steps=8", "train.checkpoint_every=4")
    train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    run.write_status(state="pending")  # as after a preemption
    import torch

    ck = torch.load(run.checkpoint, weights_only=True)
    assert ck["step"] == 8
    train(cfg)
    ids = {read_finished_run(f)["id"] for f in find_run_files(run.path)}
    assert ids == {run.id}


def test_training_survives_a_broken_wandb(cfg_factory, monkeypatch, caplog):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = cfg_factory("logger=wandb", "train.max_steps=3")
    assert train(cfg) == "completed"
    assert "wandb unavailable" in caplog.text
    assert len(pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics)) == 4


@pytest.mark.parametrize("env,netrc,expected", [
    ({"WANDB_API_KEY": "x"}, False, "online"), ({}, False, "offline"), ({}, True, "online"),
    ({"WANDB_MODE": "disabled"}, True, "disabled")])
def test_mode_from_credentials(monkeypatch, tmp_path, env, netrc, expected):
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    if netrc:
        (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
        (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == expected


def test_no_credentials_in_config_or_exports(cfg_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    cfg = cfg_factory("logger=wandb", "train.max_steps=2")
    train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    for p in run.path.rglob("*"):
        if p.is_file() and p.suffix in (".yaml", ".json", ".csv", ".log", ".txt"):
            assert "secret-key-123" not in p.read_text(errors="ignore"), p


def test_report_builds_without_saving():
    pytest.importorskip("wandb_workspaces", reason="the optional `report` extra is not installed")
    from analysis.report import build_report

    r = build_report("fig5", project="p", entity="e", thresholds=(0.1,))
    grids = [b for b in r.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 2 and len(grids[0].panels) == 3 and len(grids[1].panels) == 6
    assert grids[0].runsets[0].project == "p"


def test_threshold_summary_in_wandb(cfg_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_factory("logger=wandb", "train.max_steps=25", "optim.h=3e-3", "train.loss_thresholds=[1.9]")
    train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    m = pd.read_csv(run.metrics)
    first = int(m.step[m.loss < 1.9].iloc[0])
    from analysis.wandb_read import records

    read_finished_run(find_run_files(run.path)[0])
    summary = {}
    for rec in records(find_run_files(run.path)[0]):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                summary[item.key] = item.value_json
    assert int(summary["at_loss_1.9_step"]) == first
    assert float(summary["at_loss_1.9_pert_norm"]) == m.pert_norm[first]
