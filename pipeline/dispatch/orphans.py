"""No orphan jobs (as Dora's `_orphans`). Before `sbatch` a sweep writes its intent — the runs it
is about to submit, in order, and a marker that goes into the jobs' Slurm comment — and it
removes the intent once every run's job.json names its job. An intent left behind means the
sweep died between the two (a crash, a kill, a lost login node): the next `make sweep` or `make
status` of that sweep asks Slurm for the jobs carrying the marker and adopts them, writing each
run's job.json (array task i is the i-th run of the intent, as submitit submits them); when no
such job is queued or running any more, the intent is dropped (nothing live is unknown).

    <sweep>/.submitit/intents/<token>.json
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from ..runs.files import atomic_write_text, private_folder, read_json_object
from ..runs.rundir import RunDir
from . import slurm

FOLDER = Path(".submitit") / "intents"
FIELDS = {"token": (str,), "runs": (list,), "profile": (str,), "job_name": (str,)}


def marker(token: str) -> str:
    return f"adam-intent:{token}"


def intents(sweep: Path) -> list[Path]:
    return sorted((Path(sweep) / FOLDER).glob("*.json"))


def write_intent(sweep: Path, runs: list, profile: str, job_name: str) -> dict:
    """Record, durably, what is about to be submitted (array task i: runs[i], a RunDir or the
    list of a pack's); the intent (with its marker's token)."""
    folder = private_folder(Path(sweep) / FOLDER)
    paths = [[str(r.path.absolute()) for r in u] if isinstance(u, list) else str(u.path.absolute()) for u in runs]
    intent = dict(token=secrets.token_hex(6), runs=paths, profile=profile,
                  job_name=job_name, created_at=time.time(), host=socket.gethostname(), pid=os.getpid())
    atomic_write_text(folder / f"{intent['token']}.json", json.dumps(intent, indent=1) + "\n")
    return intent


def resolve(sweep: Path, intent: dict) -> None:
    """Every job of the intent is recorded in its run's job.json: the intent is done."""
    (Path(sweep) / FOLDER / f"{intent['token']}.json").unlink(missing_ok=True)


def handle(job_id: str, intent: dict, sweep: Path) -> dict:
    """The job.json of a run submitted under `intent` (as pipeline.dispatch.sweep.submit_slurm writes it)."""
    from submitit.core.utils import JobPaths

    log = JobPaths(Path(sweep) / ".submitit" / "%j", job_id=job_id, task_id=0).stderr
    return dict(backend="slurm", job_id=job_id, sweep=intent.get("job_name"), profile=intent.get("profile"),
                submitted_at=intent.get("created_at"), log=str(log), adopted=True)


def _under_runs_root(sweep: Path, units: list) -> bool:
    """Whether every run folder an intent names is `<the sweep's runs root>/<run id>`: a path taken
    from a file is never written unless it is one of this sweep's run folders."""
    from .plan import RUN_ID, read_plan

    plan, _ = read_plan(Path(sweep), Path(sweep).name)
    root = Path(plan["runs_root"]) if plan and plan.get("runs_root") else None
    runs = [Path(r) for u in units for r in (u if isinstance(u, list) else [u])]
    return root is not None and all(r.resolve().parent == root.resolve() and RUN_ID.fullmatch(r.name) for r in runs)


def adopt(sweep: Path) -> list[str]:
    """Resolve every intent left in `sweep`; one line for each, saying what was done."""
    lines = []
    for path in intents(sweep):
        intent, why = read_json_object(path, FIELDS)
        if intent is not None and not (intent.get("token") and intent.get("runs") is not None
                                       and all(isinstance(r, str) or isinstance(r, list)
                                               and all(isinstance(x, str) for x in r) for r in intent["runs"])):
            intent, why = None, (f"{path.name}: fields token and runs (a list of run folders, or of lists of them "
                                 "for packs) are required")
        if intent is not None and not _under_runs_root(sweep, intent["runs"]):
            intent, why = None, (f"{path.name}: names a run folder that is not <runs root>/<12 hex digits> of this "
                                 "sweep's plan.json; nothing is written there")
        if intent is None:
            lines.append(f"warning: {path}: {why or 'empty'}; an interrupted submission's record cannot be read "
                         f"(check `squeue --me` for jobs of {Path(sweep).name} that no run knows; then remove it)")
            continue
        jobs, err = slurm.jobs_with_comment(marker(intent["token"]))
        if err:
            lines.append(f"warning: an interrupted submission of this sweep (intent {intent['token']}) could not be "
                         f"checked ({err}); it is checked again next time")
            continue
        if not jobs:
            path.unlink(missing_ok=True)
            lines.append(f"note: an interrupted submission (intent {intent['token']}) has no job queued or running; "
                         "its runs are planned as usual")
            continue
        for job_id in jobs:
            i = int(job_id.split("_")[1]) if "_" in job_id else 0  # array task i trains the i-th run (or pack)
            if i < len(intent["runs"]):
                unit = intent["runs"][i]
                for run in map(Path, unit if isinstance(unit, list) else [unit]):
                    RunDir(run.parent, run.name).write_job(handle(job_id, intent, sweep))
        path.unlink(missing_ok=True)
        array = sorted(jobs)[0].split("_")[0]
        lines.append(f"note: adopted Slurm {'array' if len(jobs) > 1 else 'job'} {array} ({len(jobs)} queued or "
                     f"running), submitted by a sweep that stopped before recording it (intent {intent['token']})")
    return lines
