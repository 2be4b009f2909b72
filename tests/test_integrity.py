"""Trust at scale: one owner per run, kills at any moment (failpoints), damaged checkpoints,
holes in the history, a full disk, and states that mean what they say."""

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import time

import pandas as pd
import pytest
import torch

from pipeline.runs import lease as lease_mod
from pipeline.runs.ids import run_id
from pipeline.runs.integrity import check, decide
from pipeline.runs.lease import Lease, LeaseHeld
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, TINY, crash_at_step, make_cfg, run_cli, start_stopped_at

LONG = [*TINY, "train.max_steps=30", "train.checkpoint_every=3", "train.reshuffle=true"]


def args_in(runs, extra=()):
    return [*LONG, *extra, f"paths.runs={runs}"]


def reference(tmp_path, extra=()):
    """metrics.csv of the same run, uninterrupted, in this process (time_s dropped)."""
    cfg = make_cfg(args_in(tmp_path / "reference", extra))
    if RunDir(cfg.paths.runs, run_id(cfg)).status().get("state") != "completed":
        assert train(cfg) == "completed"
    return pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics).drop(columns="time_s")


def same_as_reference(tmp_path, run, extra=()):
    ours = pd.read_csv(run.metrics).drop(columns="time_s")
    ref = reference(tmp_path, extra)
    assert ours.step.tolist() == list(range(len(ref)))
    pd.testing.assert_frame_equal(ours, ref, check_exact=True)


def files_of(path):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()}


# -- one owner per run --------------------------------------------------------------------------
@pytest.mark.slow
def test_second_process_on_a_live_run_is_refused_and_changes_nothing(tmp_path):
    args = args_in(tmp_path / "runs")
    run = RunDir(tmp_path / "runs", run_id(make_cfg(args)))
    a = start_stopped_at(tmp_path, args, 12)  # A owns the run, stopped after writing row 12
    try:
        before = files_of(run.path)
        t0 = time.time()
        r = run_cli(["pipeline.train", *args], cwd=tmp_path)
        took = time.time() - t0
        assert r.returncode == 3
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            f"error: run {run.id} is live: held by {socket.gethostname()}:{a.pid}, heartbeat "), lines
        assert lines[0].endswith("; nothing was changed")
        assert files_of(run.path) == before  # not a byte, not a timestamp
        print(f"\nrefused in {took:.1f} s (interpreter and imports included)")
        a.send_signal(signal.SIGCONT)  # A goes on and finishes: its history is whole
        assert a.wait(timeout=600) == 0
    finally:
        a.kill()
    same_as_reference(tmp_path, run)
    assert run.status()["attempts"] == 1 and not (run.path / "lease.json").exists()


@pytest.mark.slow
def test_two_identical_sweeps_at_once_run_every_run_once(tmp_path):
    paths = [f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps"]
    extra = "EXTRA=train.max_steps=40 data.n_train=64 data.n_test=32"
    cmd = ["make", "-s", "-C", str(ROOT), "sweep", "SWEEP=synthetic", "NAME=synthetic", "LAUNCHER=local", "JOBS=2",
           *paths, extra]
    env = dict(os.environ, WANDB_MODE="offline")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 4
    for r in runs:
        st = json.loads((r / "status.json").read_text())
        assert st["state"] == "completed" and st["attempts"] == 1, st  # each run trained once
        m = pd.read_csv(r / "metrics.csv")
        assert m.step.tolist() == list(range(41))


def test_lease_takeover_rules(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    with Lease(run, timeout_s=60, heartbeat_s=30), \
            pytest.raises(LeaseHeld, match=f"held by {socket.gethostname()}:{os.getpid()}"):
        Lease(run).acquire()  # the same host: flock
    assert not (run / "lease.json").exists()  # released

    def record(**kw):
        (run / "lease.json").write_text(json.dumps(dict(timeout_s=60, **kw)))

    # another node, heartbeat fresh: live (whatever flock says on this node)
    record(host="node-b", pid=1, slurm_job="9")
    with pytest.raises(LeaseHeld, match=r"held by node-b:1 \(Slurm job 9\), heartbeat 0 s ago"):
        Lease(run).acquire()
    assert lease_mod.holder(run)["host"] == "node-b"
    # ... its heartbeat older than its timeout: gone, taken over with one log line
    old = time.time() - 61
    os.utime(run / "lease.json", (old, old))
    assert lease_mod.holder(run) is None
    with Lease(run, timeout_s=60) as mine:  # the taker-over's own lease.timeout_s decides, not the file's
        assert json.loads((run / "lease.json").read_text())["pid"] == os.getpid()
    assert re.search(r"taking over the lease of node-b:1 \(Slurm job 9\), heartbeat 6\d s ago \(heartbeat "
                     r"6\d s old, older than 60 s\)", caplog.text), caplog.text
    # this host, a pid that is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    record(host=socket.gethostname(), pid=dead.pid, start="1")
    with Lease(run):
        pass
    assert f"process {dead.pid} is gone" in caplog.text
    # this host, a live pid but another process's start time: a reused pid, gone
    record(host=socket.gethostname(), pid=os.getppid(), start="1")
    assert lease_mod.holder(run) is None
    # a requeued Slurm job takes over from its own earlier incarnation on another node
    record(host="node-c", pid=7, slurm_job="1234_5")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    with Lease(run):
        pass
    assert "Slurm job 1234_5 was requeued" in caplog.text
    assert mine.lost is False
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    # a planted record whose timeout_s is 1e308 is not live forever: the asker's timeout decides
    (run / "lease.json").write_text(json.dumps(dict(host="node-d", pid=8, timeout_s=1e308)))
    os.utime(run / "lease.json", (old, old))
    assert lease_mod.holder(run, timeout_s=60) is None
    os.utime(run / "lease.json", (old - 86400, old - 86400))
    assert lease_mod.holder(run) is None  # without the asker's timeout: the file's, capped at a day
    with Lease(run, timeout_s=60):
        pass


@pytest.mark.parametrize("text", ["", "{", "[1]", '{"host": 3, "pid": 1}', '{"host": "a\\nb"}',
                                  '{"host": "n", "pid": "1"}', "x" * 5000])
def test_a_damaged_lease_record_holds_nothing_and_is_flagged(tmp_path, text):
    """A lease.json that is not a well-formed record (garbage, wrong types, too big) is no live
    holder: status and sweep see the run as damaged with the reason (not 'running', not 'held by
    ?:?'), and the next owner takes it over."""
    run = RunDir(tmp_path, "0123456789ab")
    run.path.mkdir()
    (run.path / "lease.json").write_text(text)
    assert lease_mod.holder(run.path) is None
    assert lease_mod.lease_problem(run).startswith("lease.json: ")
    assert any(p.startswith("lease.json: ") for p in check(run).damaged)
    with Lease(run.path, timeout_s=60):
        assert json.loads((run.path / "lease.json").read_text())["pid"] == os.getpid()
    assert lease_mod.lease_problem(run) == ""


def test_a_holder_notices_when_its_lease_was_taken_over(tmp_path):
    run = tmp_path / "run"
    with Lease(run, heartbeat_s=0.05) as mine:
        beat = (run / "lease.json").stat().st_mtime_ns
        deadline = time.time() + 60
        while (run / "lease.json").stat().st_mtime_ns == beat and time.time() < deadline:
            time.sleep(0.02)
        assert (run / "lease.json").stat().st_mtime_ns > beat  # the heartbeat touches it
        (run / "lease.json").write_text(json.dumps(dict(host="node-b", pid=3)))  # taken over
        while not mine.lost and time.time() < deadline:
            time.sleep(0.02)
        assert mine.lost
    assert json.loads((run / "lease.json").read_text())["host"] == "node-b"  # not ours to remove


# -- kills at any moment ----------------------------------------------------------------------------
def kill_plan(n_kills=20, seed=2026, max_steps=60, every=3):
    """Failpoints (name, step) in the order a run meets them across restarts: a checkpoint
    point only at a checkpoint step beyond the last kill (a resumed run does not write the
    checkpoint it resumed from), a row point at or beyond it."""
    rng = random.Random(seed)
    points, last = [], 0
    ckpt_points = ("ckpt.tmp", "ckpt.prev", "ckpt.done")
    while len(points) < n_kills:
        if rng.random() < 0.45:
            step = rng.choice([s for s in range(every, max_steps, every) if s > last][:2] or [None])
            if step is None:
                break
            points.append((rng.choice(ckpt_points), step))
        else:
            step = rng.randint(last, min(last + 2, max_steps - 1))
            points.append((rng.choice(("row", "row.torn", "step")), step))
        last = points[-1][1]
    return points


@pytest.mark.slow
def test_killed_at_20_random_moments_ends_identical(tmp_path):
    """SIGKILL at 20 random points of the run's writes (several inside checkpoint writes, some
    halfway through a metrics row), restarting after each: the run ends as if never killed."""
    plan = kill_plan()
    assert len(plan) == 20 and sum(name.startswith("ckpt") for name, _ in plan) >= 6
    extra = ["train.max_steps=60"]
    args = args_in(tmp_path / "runs", extra)
    run = RunDir(tmp_path / "runs", run_id(make_cfg(args)))
    for name, step in plan:
        r = run_cli(["pipeline.train", *args], cwd=tmp_path, env=dict(ADAM_FAULTS=f"{name}@{step}"))
        assert r.returncode == -signal.SIGKILL, (name, step, r.returncode, r.stderr[-2000:])
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    same_as_reference(tmp_path, run, extra)
    st = run.status()
    assert st["state"] == "completed" and st["attempts"] == 21 and "holes" not in st
    assert not list(run.path.glob(".*.tmp"))  # what the kills left was cleaned up
    log = run.log_file.read_text()
    if any(name == "ckpt.prev" for name, _ in plan):
        assert "checkpoint.pt missing (killed while replacing it): trying checkpoint.prev.pt" in log


# -- checkpoints that cannot strand a run -----------------------------------------------------------
def interrupted(cfg):
    """A completed run turned into one interrupted after its last checkpoint (as after a kill)."""
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    run.write_status(state="running")
    return run


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    cfg = make_cfg(args_in(tmp_path / "runs"))
    run = interrupted(cfg)
    raw = run.checkpoint.read_bytes()
    run.checkpoint.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else b"")
    assert torch.load(run.prev_checkpoint, weights_only=True)["step"] == 27
    assert train(cfg) == "completed"
    assert "checkpoint.pt cannot be loaded" in caplog.text and "falling back to checkpoint.prev.pt" in caplog.text
    assert "resuming at step 27" in caplog.text
    same_as_reference(tmp_path, run)


def test_both_checkpoints_damaged_fall_back_to_step_0(tmp_path, caplog):
    cfg = make_cfg(args_in(tmp_path / "runs"))
    run = interrupted(cfg)
    run.checkpoint.write_bytes(b"")
    run.prev_checkpoint.write_bytes(b"not a zip file at all")
    assert train(cfg) == "completed"
    assert "checkpoint.prev.pt cannot be loaded" in caplog.text and "falling back to step 0" in caplog.text
    same_as_reference(tmp_path, run)
    assert run.status()["attempts"] == 2


# -- no silent holes ----------------------------------------------------------------------------------
def drop_rows(run, steps, torn=False):
    lines = run.metrics.read_text().splitlines(keepends=True)
    out = [lines[0]]
    for ln in lines[1:]:
        s = int(ln.split(",")[0])
        if s in steps:
            if torn:
                out.append(ln[: len(ln) // 2] + "\n")  # a row cut short in the middle of the file
            continue
        out.append(ln)
    run.metrics.write_text("".join(out))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["hole", "torn rows", "deleted file"])
def test_hole_is_flagged_everywhere_and_retry_makes_it_whole(tmp_path, damage):
    args = args_in(tmp_path / "runs")
    cfg = make_cfg(args)
    run = interrupted(cfg)
    if damage == "deleted file":
        run.metrics.unlink()
        missing = "missing 0-29"
    else:
        drop_rows(run, {4, 5, 6}, torn=damage == "torn rows")
        missing = "missing 4-6"
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0 and f"is not whole ({missing})" in r.stderr, r.stderr
    st = run.status()
    assert st["state"] == "completed" and st["holes"] == missing  # flagged, not passed off as whole
    assert decide(check(run), retry=False).action == "skip" and "retry" in decide(check(run), retry=False).reason
    # make status and summary.csv say so; what depends on the missing rows stays empty
    from analysis.__main__ import analyze
    from pipeline.dispatch.status import view

    shown = view(check(run), None, None, None, None)
    assert shown.startswith(f"completed (metrics.csv: {missing})"), shown
    if damage != "deleted file":  # the file the resume could not continue is kept beside it, and said
        (kept,) = run.path.glob("metrics.csv.*.kept")
        assert f"[kept {kept.name}: metrics.csv before the resume at step 30 ({missing})]" in shown, shown
        from pipeline.runs.history import read_history

        steps = set(read_history(kept).steps)  # the file as the damage left it: 0-3 there, 4-6 not
        assert {0, 1, 2, 3, 7} <= steps and not steps & {4, 5, 6}, sorted(steps)
    summary = analyze(tmp_path / "runs", figures=False, thresholds=(2.0, 1e-9))["summary"]
    s = pd.read_csv(summary).iloc[0]
    assert s["holes"] == missing
    for col in ("hill_height", "max_test_acc", "regime", "at_loss_1e-09_step"):
        assert pd.isna(s[col]), col  # unknown: maybe in the missing rows
    full = pd.read_parquet(summary.with_suffix(".parquet")).iloc[0]  # every digit (summary.csv has 7)
    assert full["final_loss"] == pd.read_csv(run.metrics).loss.iloc[-1]  # the last row is there
    assert s["steps"] == 30
    # retry=true recomputes it from step 0: whole, and the same as an uninterrupted run
    r = run_cli(["pipeline.train", *args, "retry=true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    st = run.status()
    assert st["state"] == "completed" and "holes" not in st and st["attempts"] == 3
    same_as_reference(tmp_path, run)


def test_completed_run_truncated_afterwards_is_not_summarised_as_whole(tmp_path):
    cfg = make_cfg(args_in(tmp_path / "runs"))
    assert train(cfg) == "completed"
    run = RunDir(cfg.paths.runs, run_id(cfg))
    lines = run.metrics.read_text().splitlines(keepends=True)
    run.metrics.write_text("".join(lines[:12]))  # steps 0..10 survive
    from analysis.__main__ import analyze

    s = pd.read_csv(analyze(tmp_path / "runs", figures=False)["summary"]).iloc[0]
    assert s["holes"] == "missing 11-30" and pd.isna(s["final_loss"]) and pd.isna(s["hill_height"])
    assert s["steps"] == 10


# -- a full disk ----------------------------------------------------------------------------------------
def _mount_tmpfs(path, size_bytes):
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024 + 1}k", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _disk_full_then_resume(tmp_path, runs, args, free, extra):
    """Train into a disk too small for the third checkpoint: one line naming the path, state
    pending, the previous checkpoint intact; after `free()` the rerun completes identically."""
    run = RunDir(runs, run_id(make_cfg(args)))
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: no space left on the device writing {run.checkpoint}; the run is pending")
    assert run.status()["state"] == "pending"
    ck = torch.load(run.checkpoint, weights_only=True)  # the previous checkpoint is intact
    assert ck["step"] == 6 and run.status()["step"] == 6
    assert not list(run.path.glob(".*.tmp"))
    free()
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0 and "resuming at step 6" in r.stderr, r.stderr[-3000:]
    same_as_reference(tmp_path, run, extra)


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(tmp_path):
    extra = ["model=mlp", "model.width=256", "train.max_steps=12", "train.checkpoint_every=3", "train.reshuffle=false"]
    probe = make_cfg(args_in(tmp_path / "probe", extra))
    assert train(probe) == "completed"
    c = RunDir(probe.paths.runs, run_id(probe)).checkpoint.stat().st_size
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, 6 * c):
        pytest.skip("mounting a tmpfs needs root (the injected ENOSPC test below covers the code path)")
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (6 * c - int(2.5 * c)))  # room for two checkpoints, not three
        runs = disk / "runs"
        _disk_full_then_resume(tmp_path, runs, args_in(runs, extra), filler.unlink, extra)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
def test_disk_full_injected(tmp_path):
    extra = ["train.max_steps=12", "train.checkpoint_every=3", "train.reshuffle=false"]
    runs = tmp_path / "runs"
    args = args_in(runs, extra)
    run = RunDir(runs, run_id(make_cfg(args)))
    r = run_cli(["pipeline.train", *args], cwd=tmp_path, env=dict(ADAM_FAULTS="ckpt.tmp@9:enospc"))
    assert r.returncode == 1 and "error: no space left on the device writing" in r.stderr
    assert run.status()["state"] == "pending" and torch.load(run.checkpoint, weights_only=True)["step"] == 6
    r = run_cli(["pipeline.train", *args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    same_as_reference(tmp_path, run, extra)


# -- states that mean what they say -------------------------------------------------------------
def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path):
    cfg = make_cfg(args_in(tmp_path / "runs"))
    run = interrupted(cfg)
    for name in (".checkpoint.pt.123.ab.tmp", ".status.json.9.cd.tmp"):
        (run.path / name).write_bytes(b"x" * 1000)
    assert train(cfg) == "completed"
    assert not list(run.path.glob(".*.tmp"))
    assert "removed 2 temporary files of interrupted writes" in run.log_file.read_text()


@pytest.mark.slow
def test_missing_data_creates_nothing_and_the_fixed_root_runs(tmp_path):
    from pipeline.engine.data import write_fake_cifar

    base = ["model=cnn", "model.width=4", "data=cifar10", "data.download=false", "train.max_steps=2",
            "train.micro_batch=64", "device=cpu", "train.progress=none", f"paths.runs={tmp_path}/runs"]
    r = run_cli(["pipeline.train", *base, f"data.root={tmp_path}/empty"], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: data.root={tmp_path}/empty: ")
    assert not (tmp_path / "runs").exists()  # no run directory, no `failed` state
    write_fake_cifar(tmp_path / "cifar", n_train=100, n_test=20)
    r = run_cli(["pipeline.train", *base, f"data.root={tmp_path}/cifar"], cwd=tmp_path)
    assert r.returncode == 0 and "completed at step 2" in r.stderr, r.stderr


def test_failed_means_crashed_and_retry_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, caplog):
    cfg = make_cfg(args_in(tmp_path / "runs"))
    with crash_at_step(monkeypatch, 8, "CUDA error: an illegal memory access was encountered"), \
            pytest.raises(RuntimeError):
        train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    st = run.status()
    assert st["state"] == "failed" and st["error"].startswith("RuntimeError: CUDA error") and st["step"] == 6
    assert train(cfg) == "failed" and run.status()["attempts"] == 1  # not rerun without retry
    cfg.retry = True
    assert train(cfg) == "completed" and "resuming at step 6" in caplog.text
    assert "error" not in run.status()
    same_as_reference(tmp_path, run)


def test_status_json_stays_valid_json_when_the_loss_overflows(tmp_path):
    cfg = make_cfg(args_in(tmp_path / "runs", ["optim=gd", "optim.h=1e6"]))
    assert train(cfg) == "diverged"
    text = RunDir(cfg.paths.runs, run_id(cfg)).status_file.read_text()
    st = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert st["final_loss"] in ("inf", "nan")


@pytest.mark.parametrize("group", [None, "mine"])
def test_files_get_the_store_policys_modes_whatever_the_umask(tmp_path, group):
    """Private by default (folders 0700, files 0600); with store.group, folders 2770 and files
    0660 in that group (runs/owners.py). A umask of 002 (a group-shared cluster account) or 077
    changes neither: the modes are explicit."""
    import grp

    name = grp.getgrgid(os.getgid()).gr_name if group else None
    for umask in (0o002, 0o077):
        old = os.umask(umask)
        try:
            cfg = make_cfg(args_in(tmp_path / f"runs{umask}", ["train.max_steps=4", f"store.group={name or 'null'}"]))
            assert train(cfg) == "completed"
        finally:
            os.umask(old)
        run = RunDir(cfg.paths.runs, run_id(cfg))
        assert stat.S_IMODE(run.path.stat().st_mode) == (0o2770 if group else 0o700)
        for f in ("config.yaml", "status.json", "metrics.csv", "checkpoint.pt", "train.log", "provenance.json"):
            assert stat.S_IMODE((run.path / f).stat().st_mode) == (0o660 if group else 0o600), f
            assert (run.path / f).stat().st_gid == os.getgid()
        # the lock file is its owner's alone: another user's read-only handle cannot hold the flock
        assert stat.S_IMODE((run.path / f"lease.{socket.gethostname()}.lock").stat().st_mode) == 0o600


def test_metrics_rows_reach_the_file_within_flush_s_before_a_checkpoint_and_at_close(tmp_path):
    """MetricsWriter holds rows in memory (a fenced write and flush per row was a third of a
    small model's step) and writes them out once FLUSH_S has passed since the last write, at
    `sync` (before every checkpoint: the rows it counts on are on disk) and at `close`."""
    from pipeline.runs.history import MetricsWriter

    path = tmp_path / "metrics.csv"
    w = MetricsWriter(path, ["step", "loss"])
    w.write(dict(step=0, loss=1.0))
    w.write(dict(step=1, loss=0.5))
    assert path.read_text() == ""  # held
    w.sync()
    assert path.read_text() == "0,1.0\n1,0.5\n"
    w.write(dict(step=2, loss=0.25))
    w.flushed_at -= w.flush_s  # FLUSH_S later
    w.write(dict(step=3, loss=0.125))
    assert path.read_text().splitlines()[-2:] == ["2,0.25", "3,0.125"]
    w.write(dict(step=4, loss=0.0625))
    w.close()
    assert path.read_text().splitlines()[-1] == "4,0.0625" and len(path.read_text().splitlines()) == 5
