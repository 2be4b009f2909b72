"""The intent a sweep writes before sbatch, resolved without a cluster (Slurm's answer stubbed);
the real crash between sbatch and the job handles is tests/test_slurm.py's."""

from __future__ import annotations

import json

from pipeline.dispatch import orphans, slurm
from pipeline.runs.rundir import RunDir


def _runs(tmp_path, n):
    """n run folders and the plan.json of the sweep `grid` that names their runs root (as
    `register` writes it before any submission)."""
    out = []
    for i in range(n):
        r = RunDir(tmp_path / "runs", f"{i:012x}")
        r.path.mkdir(parents=True)
        out.append(r)
    sweep = tmp_path / "sweeps" / "grid"
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "plan.json").write_text(json.dumps(dict(sweep="grid", runs_root=str((tmp_path / "runs").resolve()),
                                                     points=[])))
    return out


def test_an_intent_naming_a_folder_outside_the_runs_root_writes_nothing(tmp_path, monkeypatch):
    """A planted intent naming ~/.ssh or ../victim: no job.json is written there; one warning."""
    sweep = tmp_path / "sweeps" / "grid"
    runs = _runs(tmp_path, 1)
    victim = tmp_path / "victim" / "0123456789ab"
    victim.mkdir(parents=True)
    orphans.write_intent(sweep, runs, "default", "grid")
    (intent,) = orphans.intents(sweep)
    rec = json.loads(intent.read_text())
    intent.write_text(json.dumps(dict(rec, runs=[str(victim)])))
    monkeypatch.setattr(slurm, "jobs_with_comment", lambda marker: ({"77_0": "RUNNING"}, None))
    lines = orphans.adopt(sweep)
    assert len(lines) == 1 and "not <runs root>/<12 hex digits>" in lines[0]
    assert not (victim / "job.json").exists()


def test_jobs_of_an_interrupted_submission_are_adopted_in_submission_order(tmp_path, monkeypatch):
    sweep = tmp_path / "sweeps" / "grid"
    runs = _runs(tmp_path, 3)
    intent = orphans.write_intent(sweep, runs, "default", "grid")
    assert (sweep / ".submitit" / "intents").stat().st_mode & 0o777 == 0o700
    asked = []

    def squeue(marker):
        asked.append(marker)
        return {"77_2": "PENDING", "77_0": "RUNNING", "77_1": "PENDING"}, None
    monkeypatch.setattr(slurm, "jobs_with_comment", squeue)
    lines = orphans.adopt(sweep)
    assert asked == [f"adam-intent:{intent['token']}"]
    assert lines == [f"note: adopted Slurm array 77 (3 queued or running), submitted by a sweep that stopped "
                     f"before recording it (intent {intent['token']})"]
    assert [r.job()["job_id"] for r in runs] == ["77_0", "77_1", "77_2"]
    assert all(r.job()["adopted"] and r.job()["sweep"] == "grid" for r in runs)
    assert str(runs[1].job()["log"]).endswith("77_1/77_1_0_log.err")
    assert orphans.intents(sweep) == []


def test_an_intent_without_live_jobs_is_dropped_and_one_slurm_cannot_answer_is_kept(tmp_path, monkeypatch):
    sweep = tmp_path / "sweeps" / "grid"
    runs = _runs(tmp_path, 2)
    orphans.write_intent(sweep, runs, "default", "grid")
    monkeypatch.setattr(slurm, "jobs_with_comment", lambda m: ({}, "squeue did not answer within 60 s"))
    assert "could not be checked (squeue did not answer" in orphans.adopt(sweep)[0]
    assert len(orphans.intents(sweep)) == 1 and all(r.job() is None for r in runs)
    monkeypatch.setattr(slurm, "jobs_with_comment", lambda m: ({}, None))
    assert "has no job queued or running" in orphans.adopt(sweep)[0]
    assert orphans.intents(sweep) == [] and all(r.job() is None for r in runs)


def test_a_damaged_intent_is_one_warning_and_stays(tmp_path, monkeypatch):
    sweep = tmp_path / "sweeps" / "grid"
    folder = sweep / ".submitit" / "intents"
    folder.mkdir(parents=True)
    monkeypatch.setattr(slurm, "jobs_with_comment", lambda m: (_ for _ in ()).throw(AssertionError("asked")))
    for i, junk in enumerate(("{not json", json.dumps({"token": "ab"}), json.dumps({"token": "ab", "runs": [1]}))):
        (folder / f"x{i}.json").write_text(junk)
    lines = orphans.adopt(sweep)
    assert len(lines) == 3 and all(ln.startswith("warning: ") and "squeue --me" in ln for ln in lines)
    assert len(orphans.intents(sweep)) == 3


def test_jobs_are_found_by_the_marker_in_their_comment(monkeypatch):
    class R:
        returncode, stderr = 0, ""
        stdout = ("12_[3-4]|PENDING|adam-intent:aaa\n12_1|RUNNING|site-tag adam-intent:aaa\n"
                  "13|RUNNING|adam-intent:aaab\n14|RUNNING|\n")
    monkeypatch.setattr(slurm.shutil, "which", lambda b: "/usr/bin/" + b)
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: R())
    jobs, err = slurm.jobs_with_comment("adam-intent:aaa")
    assert err is None and jobs == {"12_3": "PENDING", "12_4": "PENDING", "12_1": "RUNNING"}


def test_the_jobs_of_an_interrupted_packed_submission_are_adopted_by_every_run_of_their_pack(tmp_path, monkeypatch):
    """PACK=: array task i trains the i-th pack; each run of it gets the task's job."""
    sweep = tmp_path / "sweeps" / "grid"
    runs = _runs(tmp_path, 5)
    orphans.write_intent(sweep, [[runs[0], runs[1], runs[2]], runs[3], [runs[4]]], "default", "grid")
    monkeypatch.setattr(slurm, "jobs_with_comment", lambda marker: ({"78_0": "RUNNING", "78_1": "PENDING",
                                                                     "78_2": "PENDING"}, None))
    orphans.adopt(sweep)
    assert [r.job()["job_id"] for r in runs] == ["78_0", "78_0", "78_0", "78_1", "78_2"]
    assert orphans.intents(sweep) == []
