"""Dispatch on a real Slurm: the private single-node cluster of slurm/local_cluster.sh, which
refuses to requeue a job that did not ask for it (JobRequeue=0, as strict sites do).

The session fixture uses a running cluster (SLURM_CONF, as .ci/run starts it) or brings one up
itself when the Debian packages are installed, and takes it down by PID afterwards. Waits are
bounded by progress (rows written, states reached) with generous limits, never by a tight
wall-clock guess: the machine may be loaded."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, make_cfg

pytestmark = pytest.mark.slurm
PROFILE = "localtest"
SLOW = 900  # seconds: a bound for a loaded 2-core machine, not an expectation


def _ping():
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.environ.get("SLURM_CONF") and shutil.which("scontrol") and _ping():
        yield os.environ["SLURM_CONF"]
        return
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")):
        pytest.skip("Slurm/munge/MariaDB not installed (bash slurm/local_cluster.sh install; .ci/run does)")
    d = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURM_LOCAL_DIR=str(d))
    up = subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "up"], capture_output=True, text=True,
                        env=env, timeout=180)
    assert up.returncode == 0, up.stderr
    os.environ["SLURM_CONF"] = str(d / "etc/slurm.conf")
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "down"], env=env, timeout=60)
        del os.environ["SLURM_CONF"]


def make(tmp_path, target="sweep", extra="", sweep="synthetic", env=None, timeout=SLOW, more=(), pack="1", **kw):
    """`make <target>` on the cluster; one job (array task) per run unless `pack` says otherwise."""
    return subprocess.run(["make", "-s", "-C", str(ROOT), target, f"SWEEP={sweep}", "LAUNCHER=slurm",
                           f"PROFILE={PROFILE}", f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps",
                           f"EXTRA={extra}", f"PACK={pack}", f"NAME={sweep}", *more], capture_output=True, text=True,
                          timeout=timeout,
                          cwd=tmp_path, env=dict(os.environ, **(env or {})), **kw)


def handles(tmp_path, name="synthetic"):
    """{run id: job id} from the handles that the sweep keeps in the run directories."""
    folder = tmp_path / "sweeps" / name
    out = {}
    for link in folder.iterdir():
        if link.is_symlink() and (link / "job.json").exists():
            out[link.name] = json.loads((link / "job.json").read_text())["job_id"]
    return out


def wait_states(tmp_path, rids, want, timeout=SLOW):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = {r: RunDir(tmp_path / "runs", r).status().get("state") for r in rids}
        if all(s in want for s in st.values()):
            return st
        time.sleep(1)
    raise AssertionError(f"runs did not reach {want}: {st}")


def wait_rows(run, n, timeout=SLOW):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.metrics.exists() and len(run.metrics.read_text().splitlines()) > n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run.path}: fewer than {n} rows after {timeout}s")


def submissions() -> set:
    """Ids of the submissions the controller knows (an array once, however many tasks started);
    unlike sacct's, this view is up to date the moment sbatch returns."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    return {(re.search(r"ArrayJobId=(\d+)", ln) or re.search(r"JobId=(\d+)", ln)).group(1)
            for ln in out.splitlines() if "JobId=" in ln}


def status_rows(tmp_path, env=None):
    r = make(tmp_path, "status", env=env)
    assert r.returncode == 0, r.stderr
    rows = {}
    for ln in r.stdout.splitlines():
        if re.match(r"[0-9a-f]{12}  ", ln):
            rows[ln.split()[0]] = ln
    return rows, r


def reference_metrics(tmp_path, overrides):
    """The same run, uninterrupted, in this process."""
    cfg = make_cfg(["sweep=synthetic", *overrides], runs=tmp_path / "reference")
    assert train(cfg) == "completed"
    return pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics).drop(columns="time_s")


def test_2x2_sweep_on_slurm(slurm, tmp_path):
    t0 = time.time()
    r = make(tmp_path, start_new_session=True)
    submit_s = time.time() - t0
    assert r.returncode == 0, r.stderr + r.stdout
    assert "4 runs, 4 to launch" in r.stdout and "submitted 4 runs as Slurm array" in r.stdout
    array = r.stdout.split("Slurm array ")[1].split()[0]
    jobs = handles(tmp_path)
    assert len(jobs) == 4 and {j.split("_")[0] for j in jobs.values()} == {array}  # one array, its id printed
    shown = subprocess.run(["scontrol", "show", "job", array], capture_output=True, text=True).stdout
    assert set(re.findall(r"JobName=(\S+)", shown)) == {"synthetic"}  # jobs named after the sweep
    script = next((tmp_path / "sweeps/synthetic/.submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --job-name=synthetic" in script
    states = wait_states(tmp_path, list(jobs), {"completed"})
    total_s = time.time() - t0
    overhead = [RunDir(tmp_path / "runs", rid).status()["first_step_at"] - t0 for rid in jobs]
    print(f"\n2x2 slurm sweep: make sweep returned after {submit_s:.1f}s, all done after {total_s:.1f}s, "
          f"submission->first step per run: {', '.join(f'{o:.1f}s' for o in sorted(overhead))}")
    assert set(states.values()) == {"completed"}
    plan = json.loads((tmp_path / "sweeps/synthetic/plan.json").read_text())["points"]
    for rid in jobs:  # every run equals the same run done here
        overrides = [p for p in plan if p["run_id"] == rid][0]["overrides"]
        ours = pd.read_csv(RunDir(tmp_path / "runs", rid).metrics).drop(columns="time_s")
        pd.testing.assert_frame_equal(ours, reference_metrics(tmp_path, [o for o in overrides
                                                                         if o.startswith("optim.")]),
                                      check_exact=True)
    rows, st = status_rows(tmp_path)
    assert "4 runs: 4 completed" in st.stdout and all("COMPLETED" in row for row in rows.values())
    before = submissions()
    again = make(tmp_path)
    assert again.returncode == 0 and "0 to launch, 4 skipped" in again.stdout
    assert submissions() <= before  # nothing submitted


def test_a_packed_sweep_is_one_array_task_per_pack(slurm, tmp_path):
    """PACK=2: the 2x2 grid is two array tasks of two runs each; every run is its own (job.json,
    status, metrics) and equals the same run done alone here (fp64: to 1e-12)."""
    r = make(tmp_path, extra="precision=fp64", pack="2")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "submitted 4 runs in 2 packs as Slurm array" in r.stdout, r.stdout
    jobs = handles(tmp_path)
    assert len(jobs) == 4 and len(set(jobs.values())) == 2 and len({j.split("_")[0] for j in jobs.values()}) == 1
    states = wait_states(tmp_path, list(jobs), {"completed"})
    assert set(states.values()) == {"completed"}
    plan = json.loads((tmp_path / "sweeps/synthetic/plan.json").read_text())["points"]
    for rid in jobs:
        overrides = [p for p in plan if p["run_id"] == rid][0]["overrides"]
        ours = pd.read_csv(RunDir(tmp_path / "runs", rid).metrics).drop(columns="time_s")
        ref = reference_metrics(tmp_path, ["precision=fp64", *[o for o in overrides if o.startswith("optim.")]])
        pd.testing.assert_frame_equal(ours, ref, check_exact=False, rtol=1e-12)
        assert RunDir(tmp_path / "runs", rid).status()["slurm_job"] == jobs[rid]


LONG = "optim.beta=0.9 optim.rho=0.99 train.max_steps=400 train.checkpoint_every=1000"


def test_sweep_typed_again_while_its_array_runs_submits_nothing(slurm, tmp_path):
    extra = "train.max_steps=100000"  # long enough to be queued or running for the whole test
    first = make(tmp_path, extra=extra)
    assert first.returncode == 0, first.stderr
    jobs = handles(tmp_path)
    try:
        before = submissions()
        again = make(tmp_path, extra=extra)
        assert again.returncode == 0, again.stderr
        assert "4 runs, 0 to launch, 4 skipped (4 live)" in again.stdout, again.stdout
        for rid, job in jobs.items():  # each reported as live: its job queued/running, or its lease
            line = [ln for ln in again.stdout.splitlines() if ln.strip().startswith(rid)][0]
            assert f"Slurm job {job}" in line or "held by" in line, line
        assert submissions() <= before
        deadline = time.time() + SLOW  # until one of them runs (two tasks fit on the node at once)
        while not any(RunDir(tmp_path / "runs", rid).metrics.exists() for rid in jobs) and time.time() < deadline:
            time.sleep(0.5)
        third = make(tmp_path, extra=extra)  # running ones: their leases say so; the rest are queued
        assert "0 to launch, 4 skipped (4 live)" in third.stdout and submissions() <= before
    finally:
        subprocess.run(["scancel", *jobs.values()])


def test_a_sweep_killed_between_sbatch_and_recording_its_jobs_leaves_no_orphan(slurm, tmp_path):
    """Failpoint sbatch.done: the sweep dies (SIGKILL) right after sbatch returned, before any
    job.json is written. Its intent names the runs and the marker in the jobs' comment, so the
    next `make status` adopts the array: every run's job.json names the task that trains it (as
    the task itself records in status.json), and the sweep typed again submits nothing."""
    extra = "train.max_steps=100000"  # queued or running for the whole test
    before = submissions()
    killed = make(tmp_path, extra=extra, env={"ADAM_FAULTS": "sbatch.done"})
    assert killed.returncode != 0 and "submitted" not in killed.stdout
    new = submissions() - before
    try:
        assert len(new) == 1, new  # the array went to Slurm ...
        assert handles(tmp_path) == {}  # ... and no run knows it: without the intent, an orphan
        intents = list((tmp_path / "sweeps" / "synthetic" / ".submitit" / "intents").glob("*.json"))
        assert len(intents) == 1
        _, st = status_rows(tmp_path)
        assert f"adopted Slurm array {next(iter(new))} (4 queued or running)" in st.stderr, st.stderr
        jobs = handles(tmp_path)
        assert len(jobs) == 4 and {j.split("_")[0] for j in jobs.values()} == new
        assert not intents[0].exists()
        again = make(tmp_path, extra=extra)
        assert again.returncode == 0 and "4 runs, 0 to launch, 4 skipped (4 live)" in again.stdout, again.stdout
        assert submissions() - before == new
        deadline = time.time() + SLOW  # the tasks that start say which job runs which run
        started = {}
        while not started and time.time() < deadline:
            started = {rid: RunDir(tmp_path / "runs", rid).status().get("slurm_job") for rid in jobs}
            started = {rid: j for rid, j in started.items() if j}
            time.sleep(0.5)
        assert started and all(jobs[rid] == j for rid, j in started.items()), (started, jobs)
    finally:
        subprocess.run(["scancel", *new])


def _one_run(tmp_path, extra):
    r = make(tmp_path, extra=extra)
    assert r.returncode == 0, r.stderr + r.stdout
    (rid, job), = handles(tmp_path).items()
    return RunDir(tmp_path / "runs", rid), job


def assert_second_attempt_matches_uninterrupted(tmp_path, run, extra, max_steps):
    wait_states(tmp_path, [run.id], {"completed"})
    assert run.status()["attempts"] == 2
    ours = pd.read_csv(run.metrics).drop(columns="time_s")
    assert ours.step.tolist() == list(range(max_steps + 1))  # no duplicated or missing step
    pd.testing.assert_frame_equal(ours, reference_metrics(tmp_path, extra.split()), check_exact=True)


def test_preempted_job_checkpoints_requeues_and_matches_uninterrupted(slurm, tmp_path):
    run, job = _one_run(tmp_path, LONG)
    wait_rows(run, 60)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # Slurm's warning signal
    wait_states(tmp_path, [run.id], {"pending", "completed"})
    assert run.status()["step"] > 60  # checkpointed at the signal, not at a periodic checkpoint
    assert_second_attempt_matches_uninterrupted(tmp_path, run, LONG, 400)


def test_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    # long enough to outlive KillWait: submitit ignores the SIGTERM that precedes the SIGKILL
    extra = LONG.replace("checkpoint_every=1000", "checkpoint_every=25").replace("max_steps=400", "max_steps=1200")
    run, job = _one_run(tmp_path, extra)
    wait_rows(run, 80)
    subprocess.run(["scontrol", "requeue", job], check=True)  # killed, back in the queue
    assert_second_attempt_matches_uninterrupted(tmp_path, run, extra, 1200)
    assert "taking over the lease" in run.log_file.read_text()  # from its killed first incarnation


def test_status_tells_queued_lost_unsubmitted_and_unreachable_apart(slurm, tmp_path):
    """Jobs waiting for a busy node are queued; a cancelled one is lost; a run whose job handle
    is gone is pending without a job; when squeue and sacct cannot reach Slurm, the table says so
    and a sweep submits nothing for runs whose job state it cannot learn."""
    node_cpus = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%c"], capture_output=True, text=True,
                               check=True).stdout.split()[0]  # every CPU of the node: the sweep's jobs must wait
    blocker = subprocess.run(["sbatch", "--parsable", "-p", "debug", f"--cpus-per-task={node_cpus}",
                              "-o", "/dev/null", "--wrap", "sleep 3600"], capture_output=True, text=True,
                             check=True).stdout.strip()
    jobs = {}
    try:
        deadline = time.time() + SLOW
        while "RUNNING" not in subprocess.run(["squeue", "-h", "-j", blocker, "-o", "%T"], capture_output=True,
                                              text=True).stdout:
            assert time.time() < deadline, "the blocking job never started"
            time.sleep(0.5)
        r = make(tmp_path, extra=LONG.replace("optim.beta=0.9 optim.rho=0.99 ", ""))
        assert r.returncode == 0, r.stderr
        jobs = handles(tmp_path)
        a, b, c, d = sorted(jobs)
        rows, _ = status_rows(tmp_path)
        assert all(rows[rid].split()[4] == "queued" for rid in jobs), rows
        subprocess.run(["scancel", jobs[a]], check=True)
        (tmp_path / "runs" / b / "job.json").unlink()
        deadline = time.time() + SLOW
        while "job lost (" not in rows[a] and time.time() < deadline:
            time.sleep(1)
            rows, _ = status_rows(tmp_path)
        # a cancelled pending array task is CANCELLED in sacct or, on some versions, forgotten
        assert re.search(r"job lost \((CANCELLED|unknown to Slurm)\)", rows[a]), rows
        assert "pending (no job)" in rows[b], rows
        away = dict(SLURM_CONF=str(tmp_path / "no-such-slurm.conf"))  # squeue and sacct cannot reach it
        rows, r = status_rows(tmp_path, env=away)
        assert "pending (Slurm unreachable)" in rows[c] and "Slurm cannot be reached" in r.stderr, r.stderr
        # a sweep does not resubmit runs whose job state it cannot learn (b has no job: it would go)
        plan = make(tmp_path, extra=LONG.replace("optim.beta=0.9 optim.rho=0.99 ", ""), env=away, more=["DRY=1"])
        assert "4 runs, 1 to launch, 3 skipped (3 live)" in plan.stdout, plan.stdout + plan.stderr
        assert "Slurm cannot be reached" in plan.stderr
        actions = {ln.split()[0]: ln for ln in plan.stdout.splitlines() if re.match(r"[0-9a-f]{12}  ", ln)}
        for rid in (a, c, d):
            assert f"skip: live: Slurm job {jobs[rid]}, state unknown" in actions[rid], actions[rid]
        assert actions[b].endswith("launch (resume)")
    finally:
        subprocess.run(["scancel", blocker, *jobs.values()])


def test_refused_submission_leaves_runs_pending_without_a_job(slurm, tmp_path):
    r = make(tmp_path, env=dict(SBATCH_PARTITION="nosuchpartition"))
    assert r.returncode != 0 and "] Error 1" in r.stderr  # the sweep's own status: 1, not bad input
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: Slurm refused the submission"), r.stderr
    rows, st = status_rows(tmp_path)
    assert len(rows) == 4 and all("pending (no job)" in row for row in rows.values()), st.stdout
    ok = make(tmp_path)  # the next sweep submits them
    assert ok.returncode == 0 and "4 to launch" in ok.stdout and len(handles(tmp_path)) == 4
    subprocess.run(["scancel", *handles(tmp_path).values()])


def test_nothing_keeps_running_on_the_login_node(slurm, tmp_path):
    p = subprocess.Popen(["make", "-s", "-C", str(ROOT), "sweep", "SWEEP=synthetic", "NAME=synthetic", "LAUNCHER=slurm",
                          f"PROFILE={PROFILE}", f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps",
                          f"EXTRA={LONG}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    out, err = p.communicate(timeout=SLOW)
    assert p.returncode == 0, err
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)  # no process is left in the command's process group
    subprocess.run(["scancel", *handles(tmp_path).values()])


@pytest.mark.parametrize("extra,key", [("optim.beta=1.2", "optim.beta"), ("optim.h=0", "optim.h"),
                                       ("optim.rho=0.9,-0.1", "optim.rho"), ("model=unknown", "model")])
def test_bad_grid_never_reaches_slurm(slurm, tmp_path, extra, key):
    before = submissions()
    r = make(tmp_path, extra=extra)
    assert r.returncode != 0 and "] Error 2" in r.stderr  # bad input
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {key}="), r.stderr
    assert submissions() <= before and not (tmp_path / "runs").exists()
    print(err[0], file=sys.stderr)


def test_a_2_task_job_is_one_distributed_run_and_resumes_after_requeue(slurm, tmp_path):
    """TASKS=2: each grid point is one job of 2 tasks, one run over 2 gloo ranks; killed by
    `scontrol requeue`, it resumes and ends identical to the same 2-task job uninterrupted."""
    extra = "optim.beta=0.9 optim.rho=0.99 model.norm=bn train.max_steps=500 train.checkpoint_every=25"
    r = make(tmp_path, extra=extra, more=["TASKS=2"])
    assert r.returncode == 0, r.stderr + r.stdout
    (rid, job), = handles(tmp_path).items()
    script = next((tmp_path / "sweeps/synthetic/.submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--kill-on-bad-exit=1" in script
    run = RunDir(tmp_path / "runs", rid)
    wait_rows(run, 80)
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_states(tmp_path, [rid], {"completed"})
    assert run.status()["attempts"] == 2
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert make(ref_dir, extra=extra, more=["TASKS=2"]).returncode == 0  # the same job, uninterrupted
    wait_states(ref_dir, [rid], {"completed"})
    ours = pd.read_csv(run.metrics).drop(columns="time_s")
    assert ours.step.tolist() == list(range(501))
    ref = pd.read_csv(RunDir(ref_dir / "runs", rid).metrics).drop(columns="time_s")
    pd.testing.assert_frame_equal(ours, ref, check_exact=True)
