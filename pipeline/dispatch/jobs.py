"""What a job of a sweep runs (TrainJob for one run, PackJob for a pack: pipeline/train.py), where
it writes its outcome, and what became of each of its runs, as the launchers' lines say it."""

from __future__ import annotations

import sys
from pathlib import Path

from ..runs import redact
from ..runs.files import read_json_object
from ..runs.integrity import check
from ..runs.rundir import FINISHED, RunDir
from ..train import PackJob, TrainJob
from .plan import Plan


def job_for(plan: Plan, unit: list, outcomes: bool = True) -> tuple:
    """(the callable, its argument) that a job runs: TrainJob for one run, PackJob for a pack."""
    paths = [str(outcome_path(plan, p.run)) if outcomes else None for p in unit]
    # no credential in a pickle: they travel in the environment
    cfgs, names = zip(*(redact.for_job(p.cfg) for p in unit))
    if len(unit) == 1:
        job = TrainJob(paths[0], redact.argv(sys.argv))
        job.credentials = names[0]
        return job, cfgs[0]
    job = PackJob(paths, redact.argv(sys.argv))
    job.credentials = list(names)
    return job, list(cfgs)


def outcome_path(plan: Plan, run: RunDir) -> Path:
    """Where a job of this sweep writes the outcome of its run (JSON, in the sweep's own folder,
    which only its user can write: pipeline.dispatch.sweep never unpickles submitit's result files)."""
    return plan.folder / ".submitit" / "outcomes" / f"{run.id}.json"


def outcome_of(run: RunDir, path: Path | None, started: float = 0.0) -> tuple[str, float | None]:
    """What became of a run that a job of this sweep ran: its state (the integrity rule on its
    run directory), with the one-line reason when it did not end by itself (the job's
    outcome.json, written by TrainJob); and its last loss."""
    out, _ = read_json_object(path, {"result": (str,), "error": (str,)}) if path else (None, "")
    if out is not None and out.get("written_at", 0) < started:
        out = None  # an earlier job's
    if out and out.get("result") == "live":
        return "live (run by another process)", None
    health = check(run)
    h = health.history
    cell = h.rows[-1][h.header.index("loss")] if h.rows and "loss" in h.header else ""
    last = float(cell) if cell else None
    state = health.state or "pending"
    err = (out or {}).get("error")
    if health.damaged:
        text = f"damaged ({health.summary()})"
    elif state in FINISHED and not err:
        text = f"{state} (metrics.csv: {health.holes})" if health.holes else state
    elif err:
        text = f"{state} ({err})"
    elif out is None:
        text = f"{state} (the job ended without a word: killed? see {run.log_file})"
    else:
        text = state
    return text, last


def point_label(p) -> str:
    """The point as the progress lines show it: plan.label_points's label (h, beta, rho and every
    other key that varies, the seed of repeats included), else h, beta, rho."""
    if getattr(p, "label", ""):
        return p.label
    o = p.cfg.optim
    return " ".join(f"{k}={o[k]}" for k in ("h", "beta", "rho") if k in o) or p.shown
