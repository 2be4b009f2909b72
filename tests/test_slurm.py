"""Dispatch on a real Slurm: the private single-node cluster of slurm/local_cluster.sh.

The session fixture uses a running cluster (SLURM_CONF, as .ci/run starts it) or brings one up
itself when the Debian packages are installed, and takes it down by PID afterwards."""

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.store import RunDir, run_id
from pipeline.train import train

from .conftest import ROOT, make_cfg

pytestmark = pytest.mark.slurm
PROFILE = "localtest"


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


def sweep(tmp_path, extra="", target="sweep", sweep="synthetic", timeout=300):
    paths = f"paths.runs={tmp_path}/runs paths.sweeps={tmp_path}/sweeps"
    return subprocess.run(["make", "-s", "-C", str(ROOT), target, f"SWEEP={sweep}", "LAUNCHER=slurm",
                           f"PROFILE={PROFILE}", f"EXTRA={paths} {extra}"],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def jobs_of(tmp_path, name="synthetic"):
    return json.loads((tmp_path / "sweeps" / name / "jobs.json").read_text())


def wait_states(tmp_path, rids, want, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = {r: RunDir(tmp_path / "runs", r).status().get("state") for r in rids}
        if all(s in want for s in st.values()):
            return st
        time.sleep(1)
    raise AssertionError(f"runs did not reach {want}: {st}")


def wait_rows(run, n, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run.metrics.exists() and len(run.metrics.read_text().splitlines()) > n:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run.path}: fewer than {n} rows after {timeout}s")


def job_count():
    out = subprocess.run(["sacct", "-n", "-X", "-a", "-o", "JobID"], capture_output=True, text=True).stdout
    return len(out.split())


def reference_metrics(tmp_path, overrides):
    """The same run, uninterrupted, in this process."""
    cfg = make_cfg(["sweep=synthetic", *overrides], runs=tmp_path / "reference")
    assert train(cfg) == "completed"
    return pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics).drop(columns="time_s")


def test_2x2_sweep_on_slurm(slurm, tmp_path):
    t0 = time.time()
    r = sweep(tmp_path)
    submit_s = time.time() - t0
    assert r.returncode == 0, r.stderr + r.stdout
    assert "4 runs, 4 to launch" in r.stdout and "submitted 4 runs as Slurm array" in r.stdout
    jobs = jobs_of(tmp_path)
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array
    states = wait_states(tmp_path, list(jobs), {"completed"})
    total_s = time.time() - t0
    overhead = [RunDir(tmp_path / "runs", rid).status()["first_step_at"] - t0 for rid in jobs]
    print(f"\n2x2 slurm sweep: make sweep returned after {submit_s:.1f}s, all done after {total_s:.1f}s, "
          f"submission->first step per run: {', '.join(f'{o:.1f}s' for o in sorted(overhead))}")
    assert set(states.values()) == {"completed"}
    # every run equals the same run done here
    for rid in jobs:
        cfg_overrides = [o for o in json.loads((tmp_path / "sweeps/synthetic/plan.json").read_text())["points"]
                         if o["run_id"] == rid][0]["overrides"]
        ours = pd.read_csv(RunDir(tmp_path / "runs", rid).metrics).drop(columns="time_s")
        pd.testing.assert_frame_equal(ours, reference_metrics(tmp_path, [o for o in cfg_overrides
                                                                         if o.startswith("optim.")]),
                                      check_exact=True)
    st = sweep(tmp_path, target="status")
    assert "4 runs: 4 completed" in st.stdout and "COMPLETED" in st.stdout
    n = job_count()
    again = sweep(tmp_path)
    assert again.returncode == 0 and "0 to launch, 4 skipped" in again.stdout
    assert job_count() == n  # nothing submitted


LONG = "optim.beta=0.9 optim.rho=0.99 train.max_steps=400 train.checkpoint_every=1000"


def _one_run(tmp_path, extra):
    r = sweep(tmp_path, extra=extra)
    assert r.returncode == 0, r.stderr + r.stdout
    (rid, job), = jobs_of(tmp_path).items()
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
    wait_states(tmp_path, [run.id], {"pending", "completed"}, timeout=60)
    assert run.status()["step"] > 60  # checkpointed at the signal, not at a periodic checkpoint
    assert_second_attempt_matches_uninterrupted(tmp_path, run, LONG, 400)


def test_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    # long enough to outlive KillWait: submitit ignores the SIGTERM that precedes the SIGKILL
    extra = LONG.replace("checkpoint_every=1000", "checkpoint_every=25").replace("max_steps=400", "max_steps=1200")
    run, job = _one_run(tmp_path, extra)
    wait_rows(run, 80)
    subprocess.run(["scontrol", "requeue", job], check=True)  # killed, back in the queue
    assert_second_attempt_matches_uninterrupted(tmp_path, run, extra, 1200)


def test_cancelled_job_is_reported_not_hanging(slurm, tmp_path):
    run, job = _one_run(tmp_path, LONG.replace("max_steps=400", "max_steps=100000"))
    wait_rows(run, 5)
    pid = int((tmp_path / "sweeps/synthetic/launcher.pid").read_text())
    subprocess.run(["scancel", job], check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        st = sweep(tmp_path, target="status")
        if "cancelled" in st.stdout:
            break
        time.sleep(1)
    assert "running/cancelled" in st.stdout or "pending/cancelled" in st.stdout, st.stdout
    deadline = time.time() + 120  # the detached launcher learns it from sacct and exits
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(1)
    else:
        raise AssertionError("the launcher still waits on a cancelled job")
    assert "CANCELLED" in (tmp_path / "sweeps/synthetic/launcher.log").read_text()


@pytest.mark.parametrize("extra,key", [("optim.beta=1.2", "optim.beta"), ("optim.h=0", "optim.h"),
                                       ("optim.rho=0.9,-0.1", "optim.rho"), ("model=unknown", "model")])
def test_bad_grid_never_reaches_slurm(slurm, tmp_path, extra, key):
    n = job_count()
    r = sweep(tmp_path, extra=extra)
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and (key in err[0]), r.stderr
    assert job_count() == n
    print(err[0], file=sys.stderr)
