"""Trust, second pass: a process that lost its run writes nothing (fencing); the one integrity rule
(holes, repeats, order, unparseable rows, identity) used by every decision and repaired by retry;
a sweep's runs are those of its plan.json; damaged files give one line; inputs that would be
ignored are refused or said; Ctrl-C on a local sweep; outcomes read from JSON, not pickles."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.dispatch import slurm
from pipeline.dispatch import sweep as sweep_mod
from pipeline.runs.ids import run_id
from pipeline.runs.integrity import check, decide
from pipeline.runs.rundir import RunDir

from .conftest import ROOT, make_cfg, proc_state, run_cli, start_stopped_at
from .test_integrity import args_in, files_of, same_as_reference

FAST = ["train.max_steps=50", "data.n_train=64", "data.n_test=32", "optim.beta=0.9", "optim.rho=0.99"]
ENV1 = dict(OMP_NUM_THREADS="1", WANDB_MODE="offline")
SAME_THREADS = dict(WANDB_MODE="offline")  # children compared with a run in this process: its thread count


def sweep_cli(tmp_path, *args, extra=(), timeout=600, env=None):
    """`python -m pipeline.dispatch.sweep <args> -- RUNS SWEEPS <extra>` (what `make sweep` runs)."""
    paths = [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps"]
    if len(args) > 1 and args[0] in ("run", "status", "where"):
        paths.append(f"sweep.name={args[1]}")  # NAME=: the preset's folder whatever the extra settings
    return run_cli(["pipeline.dispatch.sweep", *args, "--", *paths, *extra], cwd=tmp_path, timeout=timeout,
                   env=dict(ENV1, **(env or {})))


def one_line(stderr: str, prefix="error:") -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# -- 1. fencing: a writer frozen inside a write, its run taken over from another host ---------------
@pytest.mark.slow
@pytest.mark.parametrize("point,b_done_first", [("ckpt.tmp", False), ("ckpt.prev", True), ("row", False)])
def test_a_fenced_off_writer_writes_nothing_and_the_new_owner_ends_whole(tmp_path, point, b_done_first):
    """A stops (SIGSTOP) inside a checkpoint write (or after a row); its lease goes stale; B, on
    another host name, takes the run over (and removes A's temporary file); then A continues.
    A writes nothing more (not a byte, not a timestamp), exits with status 4 and one line; B's
    run ends whole, identical to an uninterrupted run, with no trace of A in status.json."""
    runs = tmp_path / "runs"
    a_args = args_in(runs, ["lease.timeout_s=1", "lease.heartbeat_s=0.2"])
    run = RunDir(runs, run_id(make_cfg(a_args)))
    a = start_stopped_at(tmp_path, a_args, 6, faults=f"{point}@6:stop", env=SAME_THREADS)
    b = None
    try:
        time.sleep(1.5)  # A's heartbeat is older than its timeout: stale for another host
        # B has the cluster's one lease config: its own timeout decides whether A is stale
        b_args = args_in(runs, ["lease.host=node-b", "lease.timeout_s=1", "lease.heartbeat_s=0.2"])
        if b_done_first:
            r = run_cli(["pipeline.train", *b_args], cwd=tmp_path, env=SAME_THREADS)
            assert r.returncode == 0, r.stderr[-3000:]
        else:
            b = start_stopped_at(tmp_path, b_args, 15, env=SAME_THREADS)  # B stopped mid-run, owning the run
        log = run.log_file.read_text()
        assert "taking over the lease of" in log, log
        assert ("removed 1 temporary files" in log) == point.startswith("ckpt"), log  # A's, mid-write
        before = files_of(run.path)
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=300) == 4
        line = one_line(a.stderr.read())
        assert line.startswith(f"error: run {run.id}: the lease was taken over by "), line
        assert ("node-b:" in line) != b_done_first, line
        assert files_of(run.path) == before  # A changed nothing, not even a timestamp
        if b is not None:
            b.send_signal(signal.SIGCONT)
            assert b.wait(timeout=300) == 0, b.stderr.read()[-3000:]
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
    same_as_reference(tmp_path, run)
    st = run.status()
    assert st["state"] == "completed" and "error" not in st and "holes" not in st
    assert check(run).whole
    assert "lease lost" not in run.log_file.read_text()  # A's last words went to its stderr only
    rec = json.loads((run.path / "lease.json").read_text()) if (run.path / "lease.json").exists() else None
    assert rec is None  # B released its lease; A did not touch it


def test_a_lease_check_raises_once_the_record_is_another_holders(tmp_path):
    from pipeline.runs.lease import Lease, LeaseLost

    with Lease(tmp_path / "run", heartbeat_s=30) as mine:
        mine.check()  # ours: nothing happens
        rec = json.loads((tmp_path / "run" / "lease.json").read_text())
        assert rec["generation"] == 1 and len(rec["token"]) == 16
        (tmp_path / "run" / "lease.json").write_text(json.dumps(dict(rec, token="0" * 16, host="node-b")))
        with pytest.raises(LeaseLost, match="taken over by node-b"):
            mine.check()
        run = RunDir(tmp_path, "run")
        run.owner = mine
        with pytest.raises(LeaseLost):
            run.write_status(state="failed", error="must not be written")
    assert json.loads((tmp_path / "run" / "lease.json").read_text())["host"] == "node-b"
    assert not (tmp_path / "run" / "status.json").exists()


WRITES = {
    "status": lambda run: run.write_status(state="failed", error="must not be written"),
    "config": lambda run: run.write_config(make_cfg([])),
    "checkpoint": lambda run: run.save_checkpoint(dict(step=3, model={}, optimizer={})),
    "stale temps": lambda run: run.remove_stale_temps(),
    "remove checkpoints": lambda run: run.remove_checkpoints(),
    "open metrics": lambda run: run.open_metrics(["step", "loss"], 2),
}


@pytest.mark.parametrize("write", list(WRITES) + ["metrics row", "metrics sync", "metrics close"])
def test_every_write_path_of_a_run_is_fenced(tmp_path, write):
    """Once the lease record is another holder's, each way a run directory is written raises
    LeaseLost before it touches anything: no file appears, changes or disappears. (A metrics
    row is held in memory until the writer's next flush, at most FLUSH_S later, at a checkpoint's
    sync or at close: each of those is fenced.)"""
    from pipeline.runs.lease import Lease, LeaseLost

    path = tmp_path / "run"
    with Lease(path, heartbeat_s=30) as mine:
        run = RunDir(tmp_path, "run")
        run.owner = mine
        run.status_file.write_text('{"state": "running", "step": 2}')
        run.metrics.write_text("step,loss\n0,1.0\n1,0.5\n")
        for name in ("checkpoint.pt", "checkpoint.prev.pt", ".checkpoint.pt.node-c-9-g1.ab.tmp"):
            (path / name).write_bytes(b"x")
        writer = run.open_metrics(["step", "loss"], 2) if write.startswith("metrics") else None
        rec = json.loads((path / "lease.json").read_text())
        (path / "lease.json").write_text(json.dumps(dict(rec, token="f" * 16, host="node-b", pid=1)))
        before = files_of(path)
        with pytest.raises(LeaseLost, match="taken over by node-b"):
            if write == "metrics row":
                writer.write(dict(step=2, loss=0.25))
                assert files_of(path) == before  # held, not written
                writer.flushed_at -= writer.flush_s  # the row of FLUSH_S later: it goes to the file
                writer.write(dict(step=3, loss=0.125))
            elif write == "metrics sync":
                writer.write(dict(step=2, loss=0.25))
                writer.sync()
            elif write == "metrics close":
                writer.write(dict(step=2, loss=0.25))
                writer.close()
            else:
                WRITES[write](run)
        assert files_of(path) == before


# -- 2. one integrity rule: retry repairs what the tools flag ------------------------------------
@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory):
    """A finished one-run sweep of the synthetic preset (copied by each test that damages it)."""
    base = tmp_path_factory.mktemp("sweep")
    r = sweep_cli(base, "run", "synthetic", "--launcher", "basic", extra=FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    return base


def copy_sweep(done_sweep, tmp_path):
    shutil.copytree(done_sweep / "runs", tmp_path / "runs", symlinks=True)
    shutil.copytree(done_sweep / "sweeps", tmp_path / "sweeps", symlinks=True)
    plan = tmp_path / "sweeps" / "synthetic" / "plan.json"
    p = json.loads(plan.read_text())
    plan.write_text(json.dumps(dict(p, runs_root=str(tmp_path / "runs"))))
    (rid,) = [d.name for d in (tmp_path / "runs").iterdir()]
    return RunDir(tmp_path / "runs", rid)


def metrics_lines(run):
    return run.metrics.read_text().splitlines(keepends=True)


def without_time(path):
    return pd.read_csv(path).drop(columns="time_s")


def swap(run, a, b):
    lines = metrics_lines(run)
    lines[a + 1], lines[b + 1] = lines[b + 1], lines[a + 1]
    run.metrics.write_text("".join(lines))


def drop_lines(run, first, last):  # sed -i "first,last d" metrics.csv
    lines = metrics_lines(run)
    run.metrics.write_text("".join(lines[: first - 1] + lines[last:]))


@pytest.mark.slow
@pytest.mark.parametrize("damage,flag", [
    ("sed 40,45d", "missing 38-43"),
    ("swap 2-24 40-49", "out of order at step"),
    ("repeat 10", "repeated 10"),
    ("non-numeric cell", "unparseable row at line 30"),
    ("non-numeric last row", "unparseable row at line 52"),
])
def test_a_damaged_history_is_flagged_everywhere_and_retry_makes_it_whole(done_sweep, tmp_path, damage, flag):
    run = copy_sweep(done_sweep, tmp_path)
    original = without_time(run.metrics)
    if damage.startswith("sed"):
        drop_lines(run, 40, 45)
    elif damage.startswith("swap"):
        swap(run, 2, 24)
        swap(run, 40, 49)
    elif damage.startswith("repeat"):
        lines = metrics_lines(run)
        run.metrics.write_text("".join(lines[:12] + [lines[11]] + lines[12:]))
    else:
        lines = metrics_lines(run)
        i = 30 if damage == "non-numeric cell" else 52
        cells = lines[i - 1].split(",")
        cells[1] = "0.1x"
        lines[i - 1] = ",".join(cells)
        run.metrics.write_text("".join(lines))
    health = check(run)
    assert flag in health.holes and not health.whole, health.holes
    assert decide(health, retry=False).action == "skip"
    # make status, the analysis and the planner all say so
    st = sweep_cli(tmp_path, "status", "synthetic", extra=FAST)
    assert st.returncode == 0 and "completed (metrics.csv: " in st.stdout and flag in st.stdout, st.stdout
    from analysis.__main__ import analyze

    s = pd.read_csv(analyze(tmp_path / "sweeps" / "synthetic", figures=False)["summary"]).iloc[0]
    assert flag in s["holes"]
    assert pd.isna(s["regime"]) and pd.isna(s["hill_height"]) and pd.isna(s["at_loss_0.01_step"])
    r = sweep_cli(tmp_path, "run", "synthetic", "--launcher", "basic", extra=FAST)
    assert r.returncode == 0 and "0 to launch" in r.stdout and "completed with holes" in r.stdout, r.stdout
    # retry recomputes it from step 0: whole, and the same numbers
    r = sweep_cli(tmp_path, "run", "synthetic", "--launcher", "basic", "--retry", "1", extra=FAST)
    assert r.returncode == 0 and "1 to launch" in r.stdout, r.stdout + r.stderr[-2000:]
    assert check(run).whole and run.status()["state"] == "completed"
    pd.testing.assert_frame_equal(without_time(run.metrics), original, check_exact=True)


@pytest.mark.slow
def test_the_training_cli_with_retry_repairs_what_status_flags(done_sweep, tmp_path):
    run = copy_sweep(done_sweep, tmp_path)
    drop_lines(run, 40, 45)
    cfg_args = ["sweep=synthetic", *FAST, f"paths.runs={tmp_path}/runs"]
    r = run_cli(["pipeline.train", *cfg_args], cwd=tmp_path, env=ENV1)
    assert r.returncode == 0 and "skipped (completed with holes (metrics.csv: missing 38-43)" in r.stderr, r.stderr
    r = run_cli(["pipeline.train", *cfg_args, "retry=true"], cwd=tmp_path, env=ENV1)
    assert r.returncode == 0 and "completed at step 50" in r.stderr, r.stderr[-2000:]
    assert check(run).whole


# -- 3. a run directory proves its identity -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("edit", ["beta edited", "deleted", "another run's"])
def test_a_config_that_does_not_hash_to_the_run_id_is_flagged_and_never_resumed(done_sweep, tmp_path, edit, caplog):
    run = copy_sweep(done_sweep, tmp_path)
    original = without_time(run.metrics)
    if edit == "beta edited":
        run.config.write_text(run.config.read_text().replace("beta: 0.9\n", "beta: 0.5\n"))
        why = "config.yaml: hashes to run id"
    elif edit == "deleted":
        run.config.unlink()
        why = "config.yaml: missing"
    else:
        from omegaconf import OmegaConf

        run.config.write_text(OmegaConf.to_yaml(make_cfg(["optim.beta=0.5"])))  # another run's config
        why = "config.yaml: hashes to run id"
    health = check(run)
    assert health.damaged and health.damaged[0].startswith(why), health.damaged
    st = sweep_cli(tmp_path, "status", "synthetic", extra=FAST)
    assert st.returncode == 0 and f"damaged ({why}" in st.stdout, st.stdout
    assert "0.5" not in st.stdout  # the edited value is not shown as the run's
    from analysis.__main__ import analyze

    s = pd.read_csv(analyze(tmp_path / "sweeps" / "synthetic", figures=False)["summary"]).iloc[0]
    assert s["damaged"].startswith(why) and pd.isna(s["beta"]) and pd.isna(s.get("final_loss"))
    assert "its values are left out of the summary" in caplog.text
    r = sweep_cli(tmp_path, "run", "synthetic", "--launcher", "basic", extra=FAST)
    assert r.returncode == 0 and "0 to launch" in r.stdout and "retry recomputes it from step 0" in r.stdout
    r = sweep_cli(tmp_path, "run", "synthetic", "--launcher", "basic", "--retry", "yes", extra=FAST)
    assert r.returncode == 0 and "1 to launch" in r.stdout, r.stdout + r.stderr[-2000:]
    assert check(run).whole and "beta: 0.9\n" in run.config.read_text()
    pd.testing.assert_frame_equal(without_time(run.metrics), original, check_exact=True)


def test_the_analysis_reads_a_sweeps_runs_from_its_plan(done_sweep, tmp_path, caplog):
    run = copy_sweep(done_sweep, tmp_path)
    folder = tmp_path / "sweeps" / "synthetic"
    copy = tmp_path / "elsewhere" / run.id
    shutil.copytree(run.path, copy)
    (folder / "copy-of-run").symlink_to(copy, target_is_directory=True)  # a link to a copy outside the root
    (folder / "0123456789ab").symlink_to(tmp_path / "runs" / "0123456789ab", target_is_directory=True)  # dangling
    from analysis.__main__ import analyze

    s = pd.read_csv(analyze(folder, figures=False)["summary"])
    assert s.run_id.tolist() == [run.id]  # once
    assert "copy-of-run: not a run of" in caplog.text and "0123456789ab: not a run of" in caplog.text
    st = sweep_cli(tmp_path, "status", "synthetic", extra=FAST)
    assert st.returncode == 0 and "1 runs: 1 completed" in st.stdout and "not a run of" in st.stderr
    # the link of a run of the plan that points at the copy: the plan's run directory is used, and said
    (folder / run.id).unlink()
    (folder / run.id).symlink_to(copy, target_is_directory=True)
    caplog.clear()
    s = pd.read_csv(analyze(folder, figures=False)["summary"])
    assert s.run_id.tolist() == [run.id] and "not to the run directory" in caplog.text


# -- 4. every damaged file: one line, the run flagged, never a traceback, never the sweep blocked --------
DAMAGES = {
    "a JSON list": b"[1]",
    "zero bytes": b"",
    "not UTF-8": b"\xff\xfe\x00\x81garbage",
    "garbage": b"{{{ qwerty: [ \x01",
}
FIELD_DAMAGES = {
    "status.json": [{"state": "completed", "step": "fifty", "attempts": 1},
                    {"state": "finished", "step": 50, "attempts": 1},
                    {"state": "completed", "step": 50, "holes": 7},
                    {"state": "completed", "step": 50, "holes": ["missing 3"]},
                    {"state": "completed", "step": -1}],
    "job.json": [{"backend": "slurm"}, {"backend": "slurm", "job_id": 5}, {"backend": "pbs", "job_id": "1"}],
    "plan.json": [{"sweep": "synthetic", "points": [{"run_id": 7}]}, {"points": "all"}],
}
CASES = [(f, d) for f in ("status.json", "job.json", "config.yaml", "metrics.csv", "plan.json")
         for d in DAMAGES] + [(f, f"fields {i}") for f, v in FIELD_DAMAGES.items() for i in range(len(v))] + [
    ("config.yaml", "a YAML list"), ("metrics.csv", "header only garbage")]


def damage_file(run, folder, name, damage):
    path = folder / "plan.json" if name == "plan.json" else run.path / name
    if damage.startswith("fields"):
        path.write_text(json.dumps(FIELD_DAMAGES[name][int(damage.split()[1])]))
    elif damage == "a YAML list":
        path.write_text("- 1\n- 2\n")
    elif damage == "header only garbage":
        path.write_text("stepp;loss\n1;2\n")
    else:
        path.write_bytes(DAMAGES[damage])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name,damage", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_a_damaged_file_gives_one_line_naming_it(done_sweep, tmp_path, name, damage, capsys, caplog):
    run = copy_sweep(done_sweep, tmp_path)
    folder = tmp_path / "sweeps" / "synthetic"
    run.write_job(dict(backend="local", job_id="1", host="elsewhere", submitted_at=1.0))
    damage_file(run, folder, name, damage)
    paths = ["--", f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps", "sweep.name=synthetic", *FAST]
    # make status
    assert sweep_mod.main(["status", "synthetic", *paths]) == 0
    out = capsys.readouterr()
    assert name in out.out + out.err and "Traceback" not in out.out + out.err, out
    # make analyze (it does not read job.json)
    from analysis.__main__ import main as analysis_main

    caplog.clear()
    analysis_main([str(folder), "--no-figures"])
    out = capsys.readouterr()
    if name != "job.json":
        assert name in caplog.text, caplog.text
    assert "Traceback" not in out.out + out.err
    # make sweep: the run is flagged or read around; the sweep goes on
    assert sweep_mod.main(["run", "synthetic", "--launcher", "basic", *paths]) in (0, None)
    out = capsys.readouterr()
    assert name in out.out + out.err, out
    # python -m pipeline.train: one line about it at most, no traceback, exit 0
    r = run_cli(["pipeline.train", "sweep=synthetic", *FAST, f"paths.runs={tmp_path}/runs"], cwd=tmp_path, env=ENV1)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    if name in ("status.json", "config.yaml", "metrics.csv"):
        assert name in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["zero bytes", "garbage", "a JSON list", "wrong field types"])
def test_a_damaged_checkpoint_of_an_interrupted_run_falls_back_with_one_line(done_sweep, tmp_path, damage):
    import torch

    run = copy_sweep(done_sweep, tmp_path)
    original = without_time(run.metrics)
    run.write_status(state="running")
    for ck in (run.checkpoint, run.prev_checkpoint):
        if damage == "wrong field types":  # a checkpoint dict whose step is text and model a list
            torch.save(dict(model=[1], optimizer={}, step="fifty", crossed=[], rng_cpu=torch.get_rng_state()), ck)
        else:
            ck.write_bytes(DAMAGES[damage])
    r = run_cli(["pipeline.train", "sweep=synthetic", *FAST, f"paths.runs={tmp_path}/runs"], cwd=tmp_path, env=ENV1)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "checkpoint.pt cannot be loaded" in r.stderr and "falling back to step 0" in r.stderr
    pd.testing.assert_frame_equal(without_time(run.metrics), original, check_exact=True)


PROFILE_CASES = {
    "a scalar": (b"gpu\n", "holds a YAML str, not a mapping"),
    "a list of mappings": (b"- partition: gpu\n- time: 10\n", "holds a YAML list, not a mapping"),
    "not UTF-8": (b"partition: \xff\xfe\n", "is not UTF-8 text"),
    "garbage": (b"partition: [unclosed\n", "is not valid YAML"),
    "time a list": (b"time: [1, 2]\n", "time: [1, 2]"),
    "nodes text": (b"nodes: two\n", "nodes: 'two'"),
    "setup a string": (b"setup: export X=1\n", "setup: 'export X=1'"),
    "requeue text": (b"requeue: sometimes\n", "requeue: 'sometimes'"),
    "unknown key": (b"partitions: gpu\n", "unknown key partitions"),
    "nodes zero": (b"nodes: 0\n", "nodes: 0"),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_a_damaged_site_profile_is_one_line_naming_the_file(tmp_path, monkeypatch, case):
    raw, why = PROFILE_CASES[case]
    monkeypatch.setattr(slurm, "PROFILES", tmp_path)
    (tmp_path / "site.yaml").write_bytes(raw)
    with pytest.raises(sweep_mod.ConfigError) as e:
        slurm.load_profile("site")
    msg = str(e.value)
    assert msg.startswith("PROFILE=site: ") and why in msg and "\n" not in msg, msg
    assert (str(tmp_path / "site.yaml") in msg) or "unknown key" in msg
    (tmp_path / "ok.yaml").write_text("time: 1-00:00:00\nmem: 64000\nsetup: [export X=1]\n")
    assert slurm.load_profile("ok") == {"time": "1-00:00:00", "mem": 64000, "setup": ["export X=1"]}


# -- 6. input that would be ignored is refused or said -------------------------------------------
@pytest.mark.parametrize("var,value,says", [
    ("RETRY", "maybe", "error: RETRY=maybe: allowed values are 1, 0, true, false, yes, no"),
    ("DRY", "2", "error: DRY=2: allowed values are 1, 0, true, false, yes, no"),
    ("JOBS", "x", "error: JOBS=x: allowed values are whole numbers >= 1"),
    ("GPUS", "0", "error: GPUS=0: allowed values are whole numbers >= 1"),
    ("SWEEP", "a b", "error: SWEEP='a b': a sweep name is one word"),
    ("PROFILE", "nope", "error: PROFILE=nope: no slurm/profiles/nope.yaml; available: default, localtest"),
])
def test_make_sweep_refuses_what_it_would_ignore(tmp_path, var, value, says):
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "sweep", f"{var}={value}", *(["DRY=1"] if var != "DRY" else []),
                        f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV1))
    assert r.returncode == 2 and one_line(r.stderr).startswith(says), r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_profile_with_the_local_launcher_is_named_as_ignored(tmp_path):
    r = sweep_cli(tmp_path, "run", "synthetic", "--profile", "localtest", "--dry", "1", extra=FAST)
    assert r.returncode == 0
    assert one_line(r.stderr, "note:").startswith("note: PROFILE=localtest is ignored with LAUNCHER=local")


# -- 5. interrupts, reasons and states of a local sweep -------------------------------------------
def terminal_sigint() -> None:
    """A process started from a terminal has SIGINT at its default; one started from a background
    job (`.ci/run &`, nohup) inherits it ignored, and Python then raises no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_on_a_local_sweep_leaves_runs_pending_without_tracebacks(tmp_path):
    """Two runs at a time, each stopped after row 5 (failpoint), two queued: `make status` says
    running / queued (local); Ctrl-C (SIGINT to the sweep's process group, as a terminal sends
    it) gives one line, no traceback; every run is pending and the next sweep completes them all,
    identical to a sweep never interrupted."""
    extra = ["train.max_steps=12", "data.n_train=64", "data.n_test=32"]
    paths = [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps", "sweep.name=synthetic"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), ADAM_FAULTS="row@5:stop", **ENV1)
    p = subprocess.Popen([sys.executable, "-m", "pipeline.dispatch.sweep", "run", "synthetic", "--jobs", "2", "--",
                          *paths,
                          *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=terminal_sigint)
    try:
        deadline = time.time() + 300
        holders = []
        while len(holders) < 2:
            assert p.poll() is None and time.time() < deadline, p.communicate()
            holders = []
            for rec in (tmp_path / "runs").glob("*/lease.json") if (tmp_path / "runs").exists() else []:
                try:
                    pid = json.loads(rec.read_text())["pid"]
                    if proc_state(pid) == "T":
                        holders.append(pid)
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(0.1)
        st = sweep_cli(tmp_path, "status", "synthetic", extra=extra)
        assert "4 runs: 2 queued (local), 2 running" in st.stdout, st.stdout
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C at the terminal
        time.sleep(0.5)
        for pid in holders:
            os.kill(pid, signal.SIGCONT)  # the stopped runs now see the SIGINT the sweep sent them
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted: 2 runs stopped, 2 not started" in err
    states = {RunDir(tmp_path / "runs", d.name).status()["state"] for d in (tmp_path / "runs").iterdir()}
    assert states == {"pending"}
    st = sweep_cli(tmp_path, "status", "synthetic", extra=extra)
    assert "4 runs: 4 pending" in st.stdout, st.stdout
    r = sweep_cli(tmp_path, "run", "synthetic", "--jobs", "2", extra=extra)
    assert r.returncode == 0 and "4 completed" in r.stdout, r.stdout + r.stderr[-2000:]
    ref = tmp_path / "ref"
    r = run_cli(["pipeline.dispatch.sweep", "run", "synthetic", "--launcher", "basic", "--", f"paths.runs={ref}/runs",
                 f"paths.sweeps={ref}/sweeps", "sweep.name=synthetic", *extra], cwd=tmp_path, env=ENV1)
    assert r.returncode == 0
    for d in (tmp_path / "runs").iterdir():
        ours, theirs = without_time(d / "metrics.csv"), without_time(ref / "runs" / d.name / "metrics.csv")
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True)


@pytest.mark.slow
def test_a_sweep_shows_each_runs_real_reason(tmp_path):
    """A run that fails where the planner cannot see it (its CIFAR file is there, readable, but
    damaged: the planner checks presence, the run reads it) ends with its own one-line reason on
    the sweep's screen, not a log path."""
    from pipeline.engine.data import write_fake_cifar

    write_fake_cifar(tmp_path / "cifar", "cifar10")
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])  # torn: present and readable, not a CIFAR batch
    extra = [f"data.root={tmp_path}/cifar", "data.download=false", "train.max_steps=2", "optim.beta=0.9",
             "optim.rho=0.99"]
    for launcher in ("local", "basic"):
        r = sweep_cli(tmp_path, "run", "quick", "--launcher", launcher, extra=extra)
        assert r.returncode == 1, r.stderr
        shown = r.stdout + r.stderr
        assert f"pending (data.root={tmp_path}/cifar: " in shown and "make data" in shown, shown
        assert "_log.out" not in shown  # the reason, not a log path
    folder = tmp_path / "sweeps" / "quick" / ".submitit"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"  # submitit's pickles: this user's alone


@pytest.mark.slow
def test_the_sweep_unpickles_nothing(tmp_path, monkeypatch):
    """A local sweep reads each run's outcome from JSON: submitit's result pickles are never loaded
    by the sweep process (a planted one would run code)."""
    import submitit.core.utils as su

    def refuse(*a, **k):
        raise AssertionError("the sweep process unpickled a file")

    monkeypatch.setattr(su, "pickle_load", refuse)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    rc = sweep_mod.main(["run", "synthetic", "--jobs", "2", "--", f"paths.runs={tmp_path}/runs",
                         f"paths.sweeps={tmp_path}/sweeps", "sweep.name=synthetic", *FAST[:3]])
    assert rc == 0
    assert {RunDir(tmp_path / "runs", d.name).status()["state"] for d in (tmp_path / "runs").iterdir()} == {"completed"}
