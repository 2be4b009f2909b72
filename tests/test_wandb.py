"""wandb mirror: offline runs read back from their run files."""

import json
import math
import os
import socket
import subprocess
import sys
import threading

import pandas as pd
import pytest

from analysis.wandb_read import find_run_files, read_finished_run, records
from pipeline.engine.loggers import wandb_mode
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, TINY, crash_at_step


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


def summaries(path) -> dict:
    """The run summary as the offline file has it at the end (last update of each key wins)."""
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[item.key] = json.loads(item.value_json)
    return out


def test_a_resumed_run_holds_each_step_once_and_keeps_its_first_crossings(cfg_factory, monkeypatch):
    """A run crashes at step 9 after its checkpoint of step 8, and resumes there with
    retry=true: rows 8 and 9 are computed again but mirrored once, and the summary's crossing
    stays the first one (decided by the loop, kept in the checkpoint) instead of becoming the
    resume step."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    probe = cfg_factory("train.max_steps=16", "optim.h=3e-3")
    train(probe)
    loss = pd.read_csv(RunDir(probe.paths.runs, run_id(probe)).metrics).loss
    t = float(loss.iloc[3:5].mean())  # crossed first near step 4, well before the crash
    first = int((loss < t).idxmax())
    cfg = cfg_factory("train.max_steps=16", "optim.h=3e-3", "logger=wandb", "train.checkpoint_every=4",
                      f"train.loss_thresholds=[{t}]")
    with crash_at_step(monkeypatch, 10, "node failure"), pytest.raises(RuntimeError):
        train(cfg)
    cfg.retry = True
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    files = find_run_files(run.path)
    assert len(files) == 2 and {read_finished_run(f)["id"] for f in files} == {run.id}
    steps = [h["_step"] for f in files for h in read_finished_run(f)["history"]]
    assert sorted(steps) == list(range(17))  # every step once, across both attempts
    m = pd.read_csv(run.metrics)
    assert int(m.step[m.loss < t].iloc[0]) == first
    key = f"at_loss_{t:g}_step"
    before, after = summaries(files[0]), summaries(files[1])  # offline: one file per attempt
    assert int(before[key]) == first and before[f"at_loss_{t:g}_pert_norm"] == m.pert_norm[first]
    assert key not in after  # the resumed attempt does not overwrite it with its own step


class Blackhole:
    """A loopback TCP server that accepts connections and never answers: a wandb server that
    cannot be reached, without any network."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port, self.conns = self.sock.getsockname()[1], []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def first_step_after_start(tmp_path, logger, env):
    runs = tmp_path / logger
    args = ["pipeline.train", *TINY, "train.max_steps=20", f"paths.runs={runs}", f"logger={logger}",
            "logger.init_timeout=20", "logger.finish_timeout=120"] if logger == "wandb" else \
        ["pipeline.train", *TINY, "train.max_steps=20", f"paths.runs={runs}"]
    e = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(e, PYTHONPATH=str(ROOT), **env), timeout=600)
    assert r.returncode == 0, r.stderr
    st = next(runs.iterdir()) / "status.json"
    d = json.loads(st.read_text())
    return d["first_step_at"] - d["started_at"], next(runs.iterdir()), r.stderr


@pytest.mark.slow
def test_an_unreachable_wandb_server_does_not_delay_training(tmp_path):
    """Online mode against a server that never answers: wandb's init waits its 20 s timeout in
    its own thread; the first step comes as soon as with logger=none (bound: +2 s, on a loaded
    machine +8 s), and the rows go to an offline run for `make sync`."""
    server = Blackhole()
    try:
        env = dict(WANDB_API_KEY="f" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{server.port}", WANDB_SILENT="true")
        slow, run_dir, err = first_step_after_start(tmp_path, "wandb", env)
    finally:
        server.close()
    fast, _, _ = first_step_after_start(tmp_path, "none", {})
    print(f"\nfirst step after the run started: logger=none {fast:.2f} s, wandb unreachable {slow:.2f} s")
    assert slow < fast + 8, (slow, fast)
    assert "wandb unreachable" in err and "mirroring into an offline run" in err
    offline = [f for f in find_run_files(run_dir) if "offline-run" in str(f)]
    assert len(offline) == 1
    assert [h["_step"] for h in read_finished_run(offline[0])["history"]] == list(range(21))


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
    assert grids[0].runsets[0].groupby == ["config.point_id"]  # the repeats of a point: one line and its band
    assert all(p.groupby_rangefunc == "minmax" for p in grids[0].panels)


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


def test_each_point_of_a_pack_is_its_own_wandb_run(tmp_path, monkeypatch):
    """Three points trained together in one process: three wandb runs, each with its run id,
    config and every row of its own metrics.csv (wandb.init(reinit='create_new'))."""
    from pipeline.train import train_pack
    from tests.conftest import make_cfg

    monkeypatch.setenv("WANDB_MODE", "offline")
    base = ["sweep=toy", "train.max_steps=40", "train.progress=none", "logger=wandb"]
    cfgs = [make_cfg(base + [f"optim.beta={b}"], runs=tmp_path) for b in (0.5, 0.9, 0.95)]
    assert all(v[0] == "completed" for v in train_pack(cfgs).values())
    for c in cfgs:
        run = RunDir(c.paths.runs, run_id(c))
        files = find_run_files(run.path)
        assert len(files) == 1
        wb = read_finished_run(files[0])
        assert wb["finished"] and wb["id"] == run.id and wb["config"]["optim"]["beta"] == c.optim.beta
        m = pd.read_csv(run.metrics)
        assert [h["_step"] for h in wb["history"]] == m.step.tolist()
        assert [h["loss"] for h in wb["history"]] == m.loss.tolist()
