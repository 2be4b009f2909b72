"""Dispatch on a real Slurm of two nodes: `slurm/local_cluster.sh up --nodes 2` (node1, node2, each
slurmd in its own network and UTS namespace, the file system shared as a cluster's). Root only;
the module brings its own cluster up and down (beside the one-node cluster of test_slurm.py).
Waits are bounded by progress with generous limits; assertions are on files, never on timing."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, make_cfg
from .test_slurm import SLOW, handles, make, reference_metrics, wait_rows, wait_states

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """{"SLURM_CONF": ...} of a private two-node cluster, taken down by PID afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("two nodes need root (network namespaces) and iproute2")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")):
        pytest.skip("Slurm/munge/MariaDB not installed (bash slurm/local_cluster.sh install; .ci/run does)")
    d = tmp_path_factory.mktemp("slurm2")
    env = dict(os.environ, SLURM_LOCAL_DIR=str(d))
    env.pop("SLURM_CONF", None)
    up = subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "up", "--nodes", "2"], capture_output=True,
                        text=True, env=env, timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        yield {"SLURM_CONF": str(d / "etc/slurm.conf"), "SLURM_LOCAL_DIR": str(d)}
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "down"], env=env, timeout=60)


def hosts(run: RunDir) -> list[str]:
    """The hosts of the run's last attempt: every rank's (`hosts`), else rank 0's (`host`)."""
    last = run.provenance()[-1]
    return last.get("hosts") or [last["host"]]


def test_a_sweeps_array_spreads_over_both_nodes_and_equals_the_runs_done_here(two_nodes, tmp_path):
    r = make(tmp_path, env=two_nodes)
    assert r.returncode == 0, r.stderr + r.stdout
    jobs = handles(tmp_path)
    assert len(jobs) == 4
    states = wait_states(tmp_path, list(jobs), {"completed", "failed", "diverged"})
    assert set(states.values()) == {"completed"}, states
    runs = {rid: RunDir(tmp_path / "runs", rid) for rid in jobs}
    assert {h for run in runs.values() for h in hosts(run)} == {"node1", "node2"}  # both nodes ran runs
    plan = json.loads((tmp_path / "sweeps/synthetic/plan.json").read_text())["points"]
    for rid, run in runs.items():  # every run equals the same run done here, in this process
        overrides = [p for p in plan if p["run_id"] == rid][0]["overrides"]
        ours = pd.read_csv(run.metrics).drop(columns="time_s")
        pd.testing.assert_frame_equal(ours, reference_metrics(tmp_path, [o for o in overrides
                                                                         if o.startswith("optim.")]),
                                      check_exact=True)


def test_one_run_across_two_nodes_equals_one_process(two_nodes, tmp_path):
    """PROFILE=localtest2 (nodes: 2, ntasks_per_node: 1): one run of 2 gloo ranks, one per node,
    the rendezvous on Slurm's first node (not localhost); fp64, equal to one process to 1e-12."""
    extra = "optim.beta=0.9 optim.rho=0.99 optim.h=0.01 train.max_steps=300"
    r = make(tmp_path, extra=extra, sweep="toy", env=two_nodes, more=["PROFILE=localtest2"])
    assert r.returncode == 0, r.stderr + r.stdout
    (rid, job), = handles(tmp_path, "toy").items()
    script = next((tmp_path / "sweeps/toy/.submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert wait_states(tmp_path, [rid], {"completed", "failed", "diverged"}) == {rid: "completed"}
    run = RunDir(tmp_path / "runs", rid)
    assert sorted(hosts(run)) == ["node1", "node2"]
    cfg = make_cfg(["sweep=toy", *extra.split()], runs=tmp_path / "one")
    assert run_id(cfg) == rid and train(cfg) == "completed"
    one = pd.read_csv(RunDir(cfg.paths.runs, rid).metrics).drop(columns="time_s")
    two = pd.read_csv(run.metrics).drop(columns="time_s")
    assert two.step.tolist() == list(range(301))
    pd.testing.assert_frame_equal(two, one, check_exact=False, rtol=1e-12, atol=0)


def _scontrol(cluster, *args):
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                          env=dict(os.environ, **cluster)).stdout


def _one_process(extra: str, tmp_path, rid: str) -> pd.DataFrame:
    cfg = make_cfg(["sweep=toy", *extra.split()], runs=tmp_path / "one")
    assert run_id(cfg) == rid and train(cfg) == "completed"
    return pd.read_csv(RunDir(cfg.paths.runs, rid).metrics).drop(columns="time_s")


def test_scontrol_requeue_of_the_two_node_run_resumes_and_ends_identical(two_nodes, tmp_path):
    extra = "optim.beta=0.9 optim.rho=0.99 optim.h=0.01 train.max_steps=10000 train.checkpoint_every=500"
    r = make(tmp_path, extra=extra, sweep="toy", env=two_nodes, more=["PROFILE=localtest2"])
    assert r.returncode == 0, r.stderr + r.stdout
    (rid, job), = handles(tmp_path, "toy").items()
    run = RunDir(tmp_path / "runs", rid)
    wait_rows(run, 600)
    assert run.status().get("state") == "running"  # requeued mid-run, not after its end
    _scontrol(two_nodes, "requeue", job)
    assert wait_states(tmp_path, [rid], {"completed", "failed", "diverged"}) == {rid: "completed"}
    assert run.status()["attempts"] == 2 and sorted(hosts(run)) == ["node1", "node2"]
    ours = pd.read_csv(run.metrics).drop(columns="time_s")
    assert ours.step.tolist() == list(range(10001))
    pd.testing.assert_frame_equal(ours, _one_process(extra, tmp_path, rid), check_exact=False, rtol=1e-12, atol=0)


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_node_lost_mid_run_its_run_is_taken_over_on_the_other_node_and_ends_identical(two_nodes, tmp_path, how):
    """The node holding a run is lost: its slurmd and the run's processes SIGKILLed (nothing
    flushed), or only frozen (SIGSTOP), and the node set DOWN. Slurm requeues the job onto the
    other node; the lease of the lost host is taken over once its heartbeat is older than
    lease.timeout_s (a requeued attempt that comes earlier exits as live elsewhere, and the next
    `make sweep` relaunches it); the run ends identical to an uninterrupted one. Frozen processes
    thawed after the takeover write nothing (fenced) and exit."""
    extra = ("optim.beta=0.9 optim.rho=0.99 optim.h=0.01 train.max_steps=12000 train.checkpoint_every=200 "
             "lease.timeout_s=10 lease.heartbeat_s=1")
    r = make(tmp_path, extra=extra, sweep="toy", env=two_nodes)
    assert r.returncode == 0, r.stderr + r.stdout
    (rid, job), = handles(tmp_path, "toy").items()
    run = RunDir(tmp_path / "runs", rid)
    wait_rows(run, 1000)
    node = hosts(run)[0]
    lost = _node_pids(two_nodes, node)  # the node's slurmd, its step daemons and the run: all at once
    for pid in lost:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    _scontrol(two_nodes, "update", f"nodename={node}", "state=down", "reason=lost")
    other, thawed = ({"node1", "node2"} - {node}).pop(), {}
    try:
        deadline = time.time() + SLOW
        while time.time() < deadline and run.status().get("state") != "completed":
            if how == "frozen" and lost and hosts(run) == [other]:
                _thaw(lost)  # after the takeover: the old processes wake, find the run another's, exit
                lost, thawed = [], run.status()
            time.sleep(2)
            if run.status().get("state") != "completed" and not _queued(two_nodes):
                make(tmp_path, extra=extra, sweep="toy", env=two_nodes)  # what a user types: the run goes on
        assert run.status().get("state") == "completed", run.status()
        assert hosts(run) == [other]  # the last attempt ran on the node that lived
        if how == "frozen":  # thawed while the new owner was still training
            assert not lost and thawed.get("state") == "running", thawed
        ours = pd.read_csv(run.metrics).drop(columns="time_s")
        assert ours.step.tolist() == list(range(12001))  # nothing written twice, nothing lost
        pd.testing.assert_frame_equal(ours, _one_process(extra, tmp_path, rid), check_exact=False, rtol=1e-12,
                                      atol=0)
    finally:
        _thaw(lost)
        for pid in _node_pids(two_nodes, node):  # what is left of the lost node, before it comes back
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "restart-node", node[-1]], timeout=180,
                       env=dict(os.environ, **two_nodes))


def _node_pids(cluster, node: str) -> list[int]:
    tag = (Path(cluster["SLURM_LOCAL_DIR"]) / "net").read_text().split()[0]
    out = subprocess.run(["ip", "netns", "pids", f"adam-{tag}-{node}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _thaw(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _queued(cluster) -> bool:
    """Whether the controller still holds a job of ours (pending, running or requeued)."""
    out = subprocess.run(["squeue", "-h", "-o", "%T"], capture_output=True, text=True, env=dict(os.environ, **cluster))
    return bool(out.stdout.strip())


def test_a_sweep_killed_between_sbatch_and_recording_its_jobs_is_adopted_with_tasks_on_both_nodes(two_nodes,
                                                                                                   tmp_path):
    """Failpoint sbatch.done: the sweep dies right after sbatch, before any job.json; its array's
    tasks start on both nodes. The next `make status` adopts the whole array: every run's job.json
    names the task that trains it, wherever it runs."""
    extra = "train.max_steps=100000"  # running or queued for the whole test
    killed = make(tmp_path, extra=extra, env=dict(two_nodes, ADAM_FAULTS="sbatch.done"))
    assert killed.returncode != 0 and "submitted" not in killed.stdout
    jobs = set(_squeue(two_nodes, "%i"))
    try:
        assert handles(tmp_path) == {} and jobs
        runs = [RunDir(tmp_path / "runs", d.name) for d in (tmp_path / "runs").iterdir() if d.is_dir()]
        deadline = time.time() + SLOW  # until a task trains on each node (a CPU each: two at a time)
        while time.time() < deadline and {h for r in runs if r.provenance() for h in hosts(r)} != {"node1", "node2"}:
            time.sleep(0.5)
        assert {h for r in runs if r.provenance() for h in hosts(r)} == {"node1", "node2"}
        st = make(tmp_path, "status", extra=extra, env=two_nodes)
        assert st.returncode == 0 and "adopted Slurm array" in st.stderr, st.stderr
        assert "(4 queued or running)" in st.stderr, st.stderr
        adopted = handles(tmp_path)
        assert len(adopted) == 4
        for r in runs:  # a task that started says which job runs it: the one adopted
            if r.status().get("slurm_job"):
                assert adopted[r.id] == r.status()["slurm_job"]
    finally:
        subprocess.run(["scancel", *{j.split("_")[0] for j in jobs}], env=dict(os.environ, **two_nodes))


def _squeue(cluster, fmt: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", fmt], capture_output=True, text=True,
                         env=dict(os.environ, **cluster))
    return out.stdout.split()
