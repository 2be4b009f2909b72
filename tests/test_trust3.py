"""Trust, third pass (issue 31): each case the hostile try found, as a test -- rows never lost,
nothing adopted that is not the run's, one line instead of a traceback -- and full disks and two
sweeps into one folder at once. The fuzzer (tests/test_fuzz.py) covers the classes at random."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.dispatch import sweep as sweep_mod
from pipeline.dispatch.plan import make_plan, read_plan, register
from pipeline.errors import StoreError
from pipeline.runs.history import read_history
from pipeline.runs.ids import run_id
from pipeline.runs.integrity import check, decide
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, TINY, make_cfg, run_cli
from .test_trust import one_line

SMALL = [*TINY, "train.max_steps=20", "train.checkpoint_every=5"]
ENV1 = dict(OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def interrupted(runs: Path, extra=(), at: int = 13) -> RunDir:
    """A run killed at step `at` (SIGKILL, failpoint): its checkpoint is the one before."""
    args = [*SMALL, *extra, f"paths.runs={runs}"]
    r = run_cli(["pipeline.train", *args], cwd=runs.parent, env=dict(ENV1, ADAM_FAULTS=f"step@{at}"))
    assert r.returncode == -9, r.stderr[-2000:]
    return RunDir(runs, run_id(make_cfg(args)))


def rows(path) -> pd.DataFrame:
    h = read_history(path)
    return pd.DataFrame(h.rows, columns=h.header).drop(columns="time_s")


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- rows lost -------------------------------------------------------------------------------------
def test_a_run_folder_that_links_to_another_run_is_never_written_even_with_retry(tmp_path):
    a_cfg, b_cfg = (make_cfg([*SMALL, f"optim.beta={b}"], runs=tmp_path / "runs") for b in (0.5, 0.9))
    assert train(b_cfg) == "completed"
    a, b = RunDir(tmp_path / "runs", run_id(a_cfg)), RunDir(tmp_path / "runs", run_id(b_cfg))
    a.path.symlink_to(b.path)
    before = digest(b.path)
    health = check(a)
    assert health.foreign and "a link to" in health.summary()
    assert decide(health, retry=True).action == "skip"
    with open_dict_retry(a_cfg):
        assert train(a_cfg) == "damaged"
    assert digest(b.path) == before  # run B untouched, byte for byte
    with pytest.raises(StoreError, match="a link"):
        a.create(a_cfg)


@contextlib.contextmanager
def open_dict_retry(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.retry = True
    yield cfg


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["crlf", "extra column", "columns reordered", "missing column"])
def test_a_resume_keeps_every_row_whatever_the_header(tmp_path, edit):
    """An interrupted run whose metrics.csv has CR LF lines, one more column, its columns in another
    order, or one column less: resumed, it keeps its rows (by name), the original file is kept
    beside it as metrics.csv.<time>.kept and status.json says so; what a missing column leaves
    empty is a flagged hole."""
    run = interrupted(tmp_path / "runs")
    original = run.metrics.read_text()
    df = pd.read_csv(run.metrics)
    if edit == "crlf":
        run.metrics.write_bytes(original.replace("\n", "\r\n").encode())
    elif edit == "extra column":
        df.insert(3, "note", 1)
        df.to_csv(run.metrics, index=False)
    elif edit == "columns reordered":
        df[list(reversed(df.columns))].to_csv(run.metrics, index=False)
    else:
        df.drop(columns="pert_norm").to_csv(run.metrics, index=False)
    cfg = make_cfg([*SMALL, f"paths.runs={run.path.parent}"])
    assert train(cfg) == "completed"
    kept = sorted(run.path.glob("metrics.csv.*.kept"))
    assert len(kept) == 1 and "kept" in run.status() and kept[0].name in run.status()["kept"]
    ref = make_cfg(SMALL, runs=tmp_path / "ref")
    train(ref)
    ours, whole = rows(run.metrics), rows(RunDir(ref.paths.runs, run_id(ref)).metrics)
    if edit == "missing column":
        assert "no column pert_norm" in run.status()["holes"]
        assert (ours.pert_norm.iloc[:10] == "").all()
        pd.testing.assert_frame_equal(ours.drop(columns="pert_norm"), whole.drop(columns="pert_norm"))
    else:
        pd.testing.assert_frame_equal(ours, whole)  # every row, every digit
        assert not run.status().get("holes")


# -- silently wrong --------------------------------------------------------------------------------
@pytest.mark.slow
def test_another_runs_checkpoint_is_refused_and_the_run_ends_as_its_own(tmp_path, caplog):
    run = interrupted(tmp_path / "runs")
    other = interrupted(tmp_path / "runs", ["optim.beta=0.5"])
    shutil.copyfile(other.checkpoint, run.checkpoint)
    shutil.copyfile(other.prev_checkpoint, run.prev_checkpoint)
    cfg = make_cfg([*SMALL, f"paths.runs={run.path.parent}"])
    assert train(cfg) == "completed"
    assert f"it is run {other.id}'s, not this run's" in caplog.text
    ref = make_cfg(SMALL, runs=tmp_path / "ref")
    train(ref)
    pd.testing.assert_frame_equal(rows(run.metrics), rows(RunDir(ref.paths.runs, run_id(ref)).metrics))


def test_a_checkpoint_names_its_run_config_and_step(tmp_path):
    import torch

    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    ck = torch.load(run.checkpoint, weights_only=True)
    assert ck["identity"]["run_id"] == run.id and ck["identity"]["step"] == ck["step"]
    assert ck["identity"]["config_sha"].startswith(run.id)
    ck["identity"]["step"] = 3  # a checkpoint whose step is not the one it names
    torch.save(ck, run.checkpoint)
    assert run.load_checkpoint() is None or run.load_checkpoint()["step"] != ck["step"]


@pytest.mark.parametrize("damage,flag", [
    ("no loss column", "no column loss"), ("no test_acc column", "no column test_acc"),
    ("nan loss", "empty loss at step 4 of a completed run"), ("inf loss", "non-finite loss inf at step 4"),
    ("absurd row step", "beyond the last step"), ("absurd status step", "beyond train.max_steps"),
])
def test_a_completed_run_whose_file_breaks_the_schema_is_flagged_not_completed(tmp_path, damage, flag):
    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    df = pd.read_csv(run.metrics)
    if damage.startswith("no "):
        df.drop(columns=damage.split()[1]).to_csv(run.metrics, index=False)
    elif damage in ("nan loss", "inf loss"):  # pandas writes nan as an empty cell
        df.loc[4, "loss"] = float(damage.split()[0])
        df.to_csv(run.metrics, index=False)
    elif damage == "absurd row step":
        df.loc[7, "step"] = 99999999999
        df.to_csv(run.metrics, index=False)
    else:
        st = json.loads(run.status_file.read_text())
        run.status_file.write_text(json.dumps(dict(st, step=99999999999)))
    health = check(run)
    assert flag in health.summary(), health.summary()
    assert decide(health, retry=False).action == "skip" and decide(health, retry=True).action == "restart"


def test_another_presets_plan_is_not_adopted(tmp_path):
    folder = tmp_path / "sweeps" / "synthetic"
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps(dict(sweep="toy", runs_root=str(tmp_path / "runs"), points=[
        dict(run_id="0123456789ab", overrides=[], action="start", reason="new")])))
    plan, why = read_plan(folder, "synthetic")
    assert plan is None and "the plan of sweep toy, not of synthetic" in why
    p = make_plan("synthetic", [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps",
                                "sweep.name=synthetic", *SMALL[:3]])
    assert any("not adopted" in w for w in p.warnings)
    register(p)
    ids = [q["run_id"] for q in json.loads((folder / "plan.json").read_text())["points"]]
    assert "0123456789ab" not in ids and len(ids) == 4


def _register(args):
    extra, barrier = args
    plan = make_plan("synthetic", extra)
    barrier.wait()
    register(plan)


@pytest.mark.slow
def test_two_sweeps_with_different_grids_into_one_folder_at_once_keep_every_point(tmp_path):
    """20 times: two processes register different grids (4 + 4 points) into one sweep folder at
    the same instant; plan.json keeps all 8 every time (it is merged under a lock)."""
    ctx = multiprocessing.get_context("fork")
    for i in range(20):
        paths = [f"paths.runs={tmp_path}/runs{i}", f"paths.sweeps={tmp_path}/sweeps{i}", "sweep.name=synthetic",
                 *SMALL[:3]]
        barrier = ctx.Barrier(2)
        grids = [[*paths, "optim.h=1e-3"], [*paths, "optim.h=2e-3"]]
        procs = [ctx.Process(target=_register, args=((g, barrier),)) for g in grids]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        plan = json.loads((tmp_path / f"sweeps{i}" / "synthetic" / "plan.json").read_text())
        assert len({q["run_id"] for q in plan["points"]}) == 8, i


# -- tracebacks become one line --------------------------------------------------------------------
def test_analysis_of_folders_without_files_or_rows_is_one_line_or_a_table(tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    (tmp_path / "runs" / "0123456789ab").mkdir(parents=True)  # a full disk: mkdir done, config not written
    (tmp_path / "runs" / "0123456789ab" / "status.json").write_text(json.dumps(dict(state="pending", step=0,
                                                                                   attempts=0)))
    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    RunDir(cfg.paths.runs, run_id(cfg)).create(cfg)  # pending: no rows
    analysis_main([str(tmp_path / "runs")])  # figures on, nothing to draw: no matplotlib error
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [
    (["--thresholds", "nan"], "--thresholds nan: allowed values are finite numbers > 0"),
    (["--smooth", "-3"], "--smooth -3: allowed values are finite whole numbers >= 1"),
    (["--at-step", "-5"], "--at-step -5: allowed values are finite whole numbers >= 0"),
    (["--spike-factor", "inf"], "--spike-factor inf"),
])
def test_analysis_arguments_are_range_checked(tmp_path, args, says):
    r = run_cli(["analysis", str(tmp_path), *args], cwd=tmp_path)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_analysis_out_that_is_a_file_or_a_link_is_one_line(tmp_path):
    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    train(cfg)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "victim").mkdir()
    (tmp_path / "alink").symlink_to(tmp_path / "victim")
    for out, says in (("afile", "a file, not a folder"), ("alink", "a link")):
        r = run_cli(["analysis", str(tmp_path / "runs"), "--out", str(tmp_path / out), "--no-figures"], cwd=tmp_path)
        assert r.returncode == 1 and one_line(r.stderr).startswith(f"error: {tmp_path / out}: {says}"), r.stderr
    assert not any((tmp_path / "victim").iterdir())


def test_registering_over_a_file_or_a_folder_entry_is_one_line_per_run(tmp_path, capsys):
    paths = ["--", f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps", "sweep.name=synthetic", *SMALL[:3],
             "train.max_steps=2",
             "logger=none"]
    plan = make_plan("synthetic", paths[1:])
    ids = [p.run.id for p in plan.points]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / ids[0]).write_text("a file where the run folder goes")
    (tmp_path / "sweeps" / "synthetic" / ids[1]).mkdir(parents=True)  # a folder where the sweep's link goes
    code = sweep_mod.main(["run", "synthetic", "--launcher", "basic", *paths])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and code == 0, out
    assert f"{ids[0]}: a file, not a run folder" in out.out + out.err
    assert f"{ids[1]}: a folder where the sweep's link" in out.err
    assert (tmp_path / "runs" / ids[0]).read_text() == "a file where the run folder goes"
    assert RunDir(tmp_path / "runs", ids[1]).status()["state"] == "completed"


@pytest.mark.parametrize("name,csv,says", [
    ("max_test_acc_hill_vs_beta", "beta,max_test_acc\n", "a header and no rows"),
    ("curves_by_beta", "beta,step,metric\n0.9,1,loss\n", "cannot be drawn from it"),
    ("max_test_acc_hill_vs_beta", "beta,max_test_acc,hill_height\n0.9,abc,1\n1,1,1\n",
     "column max_test_acc holds 'abc', not a number"),
    ("max_test_acc_hill_vs_beta", "rho,max_test_acc\n0.9,1\n", "no column beta"),
])
def test_redraw_of_a_damaged_figure_csv_is_one_line(tmp_path, name, csv, says):
    (tmp_path / f"{name}.csv").write_text(csv)
    r = run_cli(["analysis.redraw", str(tmp_path / f"{name}.csv")], cwd=tmp_path)
    assert r.returncode == 2 and says in one_line(r.stderr) and "wrote" not in r.stdout, r.stderr


def test_table_with_one_column_twice_and_status_watch_inf_are_one_line(tmp_path):
    (tmp_path / "summary.csv").write_text("run_id,beta,rho,final_loss\na,0.9,0.99,1\n")
    r = run_cli(["analysis.table", str(tmp_path / "summary.csv"), "--rows", "beta", "--cols", "beta",
                 "--value", "final_loss", "--agg", "mean"], cwd=tmp_path)
    assert r.returncode == 2 and "three different columns" in one_line(r.stderr)
    r = run_cli(["pipeline.dispatch.sweep", "status", "synthetic", "--watch", "inf"], cwd=tmp_path)
    assert r.returncode == 2 and "allowed values are a finite number of seconds" in one_line(r.stderr)


def test_a_lock_file_replaced_by_a_folder_is_one_line(tmp_path):
    import socket

    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    run = RunDir(cfg.paths.runs, run_id(cfg))
    run.path.mkdir(parents=True)
    (run.path / f"lease.{socket.gethostname()}.lock").mkdir()
    r = run_cli(["pipeline.train", *SMALL, f"paths.runs={tmp_path}/runs"], cwd=tmp_path, env=ENV1)
    assert r.returncode == 1 and "cannot be opened as the run's lock file" in one_line(r.stderr), r.stderr


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "a/b", ".hidden"])
def test_sweep_name_and_mode_are_names_not_paths(tmp_path, name):
    for key in ("sweep.name", "sweep.mode"):
        r = run_cli(["pipeline.dispatch.sweep", "run", "synthetic", "--dry", "1", "--", f"{key}={name}",
                     f"paths.sweeps={tmp_path}/sweeps"], cwd=tmp_path)
        assert r.returncode == 2 and f"{key}=" in one_line(r.stderr) and "allowed values are names" in r.stderr
    assert not (tmp_path / "escape").exists()


def test_a_lazily_shaped_user_model_trains(tmp_path):
    pkg = tmp_path / "lazy_pkg"
    pkg.mkdir()
    (pkg / "lazynet.py").write_text(
        "from torch import nn\n"
        "def net(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(num_classes))\n")
    r = run_cli(["pipeline.train", "model=custom", "+model._target_=lazynet.net", "data=digits",
                 "train.max_steps=3", "logger=none", f"paths.runs={tmp_path}/runs"], cwd=tmp_path,
                env=dict(ENV1, PYTHONPATH=f"{ROOT}{os.pathsep}{pkg}"))
    assert r.returncode == 0 and "completed at step 3" in r.stderr, r.stderr[-2000:]


# -- the Makefile passes values, never shell text -------------------------------------------------
def test_make_passes_hydra_grammar_and_spaces_and_runs_no_shell_text(tmp_path):
    marker = tmp_path / "PWNED"
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "sweep", "SWEEP=synthetic", "DRY=1",
                        f"RUNS={tmp_path}/runs with space", f"SWEEPS={tmp_path}/sweeps",
                        f"EXTRA=seed=range(2) train.max_steps=$(touch {marker}) `touch {marker}`"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV1))
    assert not marker.exists() and "Traceback" not in r.stderr
    assert r.returncode == 2 and "not a valid override" in r.stderr or "train.max_steps=" in r.stderr, r.stderr
    ok = subprocess.run(["make", "-s", "-C", str(ROOT), "sweep", "SWEEP=synthetic", "DRY=1",
                         f"RUNS={tmp_path}/runs with space", f"SWEEPS={tmp_path}/sweeps", "EXTRA=seed=range(2)"],
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV1))
    assert ok.returncode == 0 and ok.stdout.count("seed=1") == 4, ok.stdout + ok.stderr
    assert "dry run: nothing created" in ok.stdout and not (tmp_path / "runs with space").exists()


# -- full disks ------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here ({r.stderr.decode().strip()[:100]}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


FULL = ["--launcher", "basic", "--pack", "auto", "--", *[a for a in SMALL if not a.startswith("model=")],
        "logger=none", "precision=fp64"]


@pytest.mark.slow
@pytest.mark.parametrize("where,size", [("runs", "4k"), ("runs", "24k"), ("runs", "160k"), ("runs", "400k"),
                                        ("sweeps", "4k")])
def test_a_full_disk_is_one_line_per_run_a_true_tally_and_a_rerun_ends_identical(tmp_path, where, size):
    """A tiny tmpfs as the runs root (full at registration, at the first write, mid-run, inside a
    pack) or as the sweeps root: no traceback, each error line names a file under the full
    folder, the tally counts what the runs' files say, no run folder is left without its
    status.json; once there is room the same command ends every run identical to a sweep made
    on a roomy disk."""
    ref = tmp_path / "ref"
    ref.mkdir()
    r = run_cli(["pipeline.dispatch.sweep", "run", "synthetic", *FULL, f"paths.runs={ref}/runs",
                 f"paths.sweeps={ref}/sweeps"], cwd=tmp_path, env=ENV1, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps"]
    with tmpfs(tmp_path / where, size) as full:
        r = run_cli(["pipeline.dispatch.sweep", "run", "synthetic", *FULL, *paths], cwd=tmp_path, env=ENV1,
                    timeout=900)
        out = r.stdout + r.stderr
        assert "Traceback" not in out and r.returncode in (0, 1), out[-3000:]
        for line in (ln for ln in out.splitlines() if "no space left" in ln):
            assert str(full) in line, line
            rid = line.split()[0]
            if line.startswith("  ") and f"{full}/{rid}/" not in line:  # a run's line names its own file,
                assert "another run of the pack" in line, line  # or says that another run's write filled it
        runs = [d for d in (tmp_path / "runs").iterdir() if not d.name.startswith(".")] \
            if (tmp_path / "runs").is_dir() else []
        for d in runs:
            assert (d / "status.json").exists() or not any(d.iterdir()), d  # nothing half-created
        tally = next((ln for ln in r.stdout.splitlines() if ln.startswith("sweep synthetic: ")
                      and "runs" not in ln.split(":", 1)[1][:8]), "")
        states = [RunDir(d.parent, d.name).status().get("state") for d in runs]
        if tally:
            assert f"{states.count('completed')} completed" in tally or states.count("completed") == 0, (tally, states)
            assert "running" not in tally, tally
        grow(full, "64m")
        again = run_cli(["pipeline.dispatch.sweep", "run", "synthetic", *FULL, *paths], cwd=tmp_path, env=ENV1,
                        timeout=900)
        assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
        for d in (ref / "runs").iterdir():
            mine = RunDir(tmp_path / "runs", d.name)
            assert mine.status()["state"] == "completed", mine.status()
            a, b = (rows(p).replace("", "nan").astype(float) for p in (mine.metrics, d / "metrics.csv"))
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)  # fp64: packed or not


def test_analysis_into_a_read_only_folder_is_one_line(tmp_path):
    cfg = make_cfg(SMALL, runs=tmp_path / "runs")
    train(cfg)
    with tmpfs(tmp_path / "ro", "64k"):
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
        r = run_cli(["analysis", str(tmp_path / "runs"), "--out", str(tmp_path / "ro" / "out"), "--no-figures"],
                    cwd=tmp_path)
    assert r.returncode == 1 and one_line(r.stderr).startswith(f"error: {tmp_path / 'ro' / 'out'}: "), r.stderr


def test_pending_runs_are_not_counted_as_another_code_version(tmp_path, caplog):
    """A sweep with runs not started yet (no provenance, no rows) draws its figures from the
    finished runs without a warning about 'different code versions: ... unknown'."""
    from analysis.__main__ import analyze

    done = make_cfg(SMALL, runs=tmp_path / "runs")
    train(done)
    pending = make_cfg([*SMALL, "optim.beta=0.5"], runs=tmp_path / "runs")
    RunDir(pending.paths.runs, run_id(pending)).create(pending)
    analyze(tmp_path / "runs")
    assert "unknown" not in caplog.text, caplog.text
