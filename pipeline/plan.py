"""The sweep planner: a preset and overrides -> every grid point composed with Hydra's compose
API and override grammar, validated, given its run id, and decided (store.decide: launch, or
skip as completed, live, diverged or failed) -- in this process, before anything is created or
submitted. A run is live when its lease is held or the Slurm job that a sweep submitted for it
is queued or running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from . import lease, slurm
from .compose import Composer
from .store import Decision, RunDir, atomic_write_text, decide, run_id
from .validate import ConfigError, check_dir_writable, validate

# overrides that every point carries: not shown as the point's own
COMMON = ("sweep=", "paths.", "retry=", "hydra.")


@dataclass
class Point:
    overrides: list[str]  # the point's own overrides (grid values and given ones)
    cfg: DictConfig
    run: RunDir
    decision: Decision = None
    job: dict | None = None  # the handle of the job a sweep submitted for the run
    slurm_state: str | None = None

    @property
    def shown(self) -> str:
        return " ".join(o for o in self.overrides if not o.startswith(COMMON))


@dataclass
class Plan:
    name: str
    folder: Path
    points: list[Point]
    slurm_error: str | None = None
    duplicates: list[str] = field(default_factory=list)

    @property
    def todo(self) -> list[Point]:
        return [p for p in self.points if p.decision.launch]


def live_job(job: dict | None, state: str | None) -> str | None:
    """'Slurm job 12_3 PENDING' while the job a sweep submitted for a run is queued or running."""
    if job and job.get("backend") == "slurm" and state in slurm.QUEUED | slurm.RUNNING:
        return f"Slurm job {job['job_id']} {state}"
    return None


def make_plan(preset: str | None, extra=(), retry=False) -> Plan:
    """Every point of `sweep=<preset>` x `extra` (Hydra overrides, grids included), decided.
    Raises ConfigError (one line naming the key and the grid point) before touching anything."""
    overrides = ([f"sweep={preset}"] if preset else []) + list(extra) + [f"retry={str(retry).lower()}"]
    points = []
    with Composer() as c:
        for ov in c.grid(overrides):
            cfg = c.compose(ov)
            point = Point(ov, cfg, RunDir(cfg.paths.runs, run_id(cfg)))
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"{e} (grid point: {point.shown})") from None
            points.append(point)
    if not points:
        raise ConfigError(f"{' '.join(overrides)}: the grid is empty")
    first = points[0].cfg
    check_dir_writable("paths.runs", first.paths.runs)
    check_dir_writable("paths.sweeps", first.paths.sweeps)
    name = first.sweep.name or preset or "adhoc"
    plan = Plan(name, Path(first.paths.sweeps) / name, [])
    seen = {}
    for p in points:  # points that differ only in non-semantic keys are one run
        if p.run.id in seen:
            plan.duplicates.append(f"{p.shown} is the same run as {seen[p.run.id]}")
            continue
        seen[p.run.id] = p.shown
        plan.points.append(p)
    for p in plan.points:
        p.job = p.run.job()
    states, plan.slurm_error = slurm.job_states(
        [p.job["job_id"] for p in plan.points if p.job and p.job.get("backend") == "slurm"])
    for p in plan.points:
        if p.job and p.job.get("backend") == "slurm":
            p.slurm_state = states.get(p.job["job_id"])
        owner = lease.holder(p.run.path)
        live = lease.describe(owner) if owner else live_job(p.job, p.slurm_state)
        if live is None and plan.slurm_error and p.job and p.job.get("backend") == "slurm" \
                and p.run.status().get("state") in (None, "pending", "running"):
            live = f"Slurm job {p.job['job_id']}, state unknown ({plan.slurm_error})"  # do not submit twice
        p.decision = decide(p.run.status(), bool(p.cfg.retry), live)
    return plan


def register(plan: Plan) -> None:
    """Create the sweep folder, a pending run directory (config, status) for each new run, the
    link `<sweep folder>/<run_id> -> <run directory>` for every run of the sweep, and
    `plan.json`: the points with their overrides and what was decided."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.folder / "plan.json", json.dumps(dict(
        sweep=plan.name, points=[dict(run_id=p.run.id, overrides=p.overrides, action=p.decision.action,
                                      reason=p.decision.reason) for p in plan.points]), indent=1) + "\n")
    for p in plan.points:
        p.run.create(p.cfg)
        link = plan.folder / p.run.id
        target = os.path.relpath(p.run.path.resolve(), plan.folder.resolve())
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)


def table(plan: Plan) -> list[list[str]]:
    """Rows of the plan as printed: run id, the point's overrides, what will happen."""
    rows = [["run_id", "point", "action"]]
    for p in plan.points:
        act = {"start": "launch", "resume": "launch (resume)", "restart": "launch (from step 0)",
               "skip": "skip"}[p.decision.action]
        rows.append([p.run.id, p.shown or "(defaults)", f"{act}: {p.decision.reason}"
                     if p.decision.action in ("skip", "restart") else act])
    return rows

