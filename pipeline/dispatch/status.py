"""`make status`: every run of a sweep, sorted by its hyperparameters, with its state as the run
store, its lease and Slurm see it (`view`), its step, last loss, perturbed norm and test accuracy,
and its job; `where` finds a sweep's folder and runs root as `make sweep` made them."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from ..config.compose import Composer
from ..errors import ConfigError
from ..runs import lease, owners
from ..runs.ids import REPEAT_KEYS, differing, flat_semantic, folder_name, variant
from ..runs.integrity import check
from ..runs.rundir import FINISHED
from . import orphans, slurm
from .cli import fail, presets, print_table
from .plan import sweep_runs


def _local_sweep_alive(job: dict) -> bool:
    """Whether the local sweep process that wrote this job handle still runs (on this host)."""
    if job.get("host") != socket.gethostname() or not isinstance(job.get("pid"), int):
        return False
    return lease.alive(job["pid"], job.get("start"))


def view(health, job: dict | None, sstate: str | None, owner: dict | None, slurm_error) -> str:
    """A run's state as the store (the integrity rule's answer), its lease and Slurm see it, with
    what a resume kept beside metrics.csv (status.json `kept`)."""
    text = _view(health, job, sstate, owner, slurm_error)
    kept = health.status.get("kept")
    return f"{text} [kept {kept}]" if kept and not health.damaged else text


def _view(health, job: dict | None, sstate: str | None, owner: dict | None, slurm_error) -> str:
    state, holes = health.state, health.holes
    if health.damaged:
        return f"damaged ({health.summary()})"
    if owner:
        return "running"
    if state in (*FINISHED, "failed"):
        return f"{state} (metrics.csv: {holes})" if holes else state
    if job and job.get("backend") == "slurm":
        if sstate in slurm.QUEUED:
            return "queued"
        if sstate in slurm.RUNNING:
            return "starting"  # the job runs; the run has not taken its lease yet
        if sstate is None and slurm_error:
            return f"{state or 'pending'} (Slurm unreachable)"
        return f"job lost ({sstate or 'unknown to Slurm'})"
    if job and job.get("backend") == "local" and _local_sweep_alive(job):
        return "starting" if job.get("job_id") else "queued (local)"
    if state in (None, "pending"):
        return "pending (no job)"
    return "interrupted"  # was running, no owner, no job: the next `make sweep` resumes it


def where(name: str, extra=()) -> tuple[Path, Path]:
    """(the sweep folder `<paths.sweeps>/<sweep.name>[.<variant>]`, the runs root `paths.runs`) as
    the config of the preset `name` (or of an ad-hoc sweep of that name) and the overrides set
    them (the same EXTRA as `make sweep`'s finds its folder): the one place that knows the
    default folders is conf/train.yaml."""
    first = [f"sweep={name}"] if name in presets() else [f"sweep.name={name}"]
    v = variant(extra)  # the folder of a sweep run with this EXTRA (make sweep's rule)
    with Composer() as c:
        plain = [o.input_line for o in c.parse(first + list(extra)) if not o.is_sweep_override()]
        cfg = c.compose(plain + ([f"sweep.variant='{v}'"] if v else []))
    owners.configure(cfg.get("store"))
    return Path(cfg.paths.sweeps) / folder_name(cfg, name), Path(cfg.paths.runs)


def status(preset, extra=(), watch: float | None = None) -> int:
    """`make status`: every run of the sweep, sorted by its hyperparameters: its state as the run
    store, its lease and Slurm see it, step, last loss, perturbed norm and test accuracy, job. With
    `watch` (seconds, `make status WATCH=10`): again every `watch` seconds until no run is live."""
    try:
        folder, _ = where(preset, extra)
    except ConfigError as e:
        fail(e)
    if not folder.is_dir():
        others = sorted(p.name for p in folder.parent.glob(f"{preset}*") if p.is_dir()) \
            if folder.parent.is_dir() else []
        hint = f"; folders of this preset: {', '.join(others)} (NAME=<folder> picks one)" if others else ""
        fail(f"SWEEP={preset}: no sweep folder {folder} (run `make sweep SWEEP={preset}` with the same EXTRA "
              f"first{hint})")
    while True:
        counts = _status_table(folder)
        if not watch or not set(counts) & {"running", "starting", "queued", "queued (local)"}:
            return 0
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0
        print(f"\n-- {time.strftime('%H:%M:%S')} --")


def _last(h, column: str) -> str:
    """The last value of `column` in a history's rows (test columns: the last evaluated step)."""
    if column not in h.header:
        return ""
    i = h.header.index(column)
    cell = next((r[i] for r in reversed(h.rows) if r[i] != ""), "")
    return f"{float(cell):.6g}" if cell else ""


def _status_table(folder: Path) -> Counter:
    for line in orphans.adopt(folder):  # jobs of a sweep that died between sbatch and recording them
        print(line, file=sys.stderr)
    runs, warnings = sweep_runs(folder)
    handles = {r.id: r.read_job() for r in runs}
    warnings += [f"run {rid}: {why}; read as no job" for rid, (_, why) in handles.items() if why]
    jobs = {rid: job for rid, (job, _) in handles.items()}
    states, error = slurm.job_states([j["job_id"] for j in jobs.values() if j and j.get("backend") == "slurm"])
    healths = {r.id: check(r) for r in runs}
    flats = {rid: flat_semantic(h.config) if not h.damaged else None for rid, h in healths.items()}
    # every key in which the runs differ (the seed of repeats included, last: a point's repeats side by side)
    keys = [k for k in ("optim.h", "optim.beta", "optim.rho") if k not in differing(flats.values())]
    keys += differing(flats.values())
    rows = []
    for r in runs:
        health, job, flat = healths[r.id], jobs[r.id], flats[r.id] or {}
        sstate = states.get(job["job_id"]) if job and job.get("backend") == "slurm" else None
        rows.append([r.id, *(_cell(flat.get(k)) for k in keys),
                     view(health, job, sstate, lease.holder(r.path), error), str(health.status.get("step", "")),
                     *(_last(health.history, c) for c in ("loss", "pert_norm", "test_acc")),
                     str(job.get("job_id") or "") if job else "", sstate or ""])
    rows.sort(key=lambda row: [(0, float(x)) if _is_number(x) else (1, x) for x in row[1:1 + len(keys)]])
    print_table([["run_id", *(_short(k, keys) for k in keys), "state", "step", "last_loss", "pert_norm", "test_acc",
                   "job", "slurm_state"], *rows])
    at = 1 + len(keys)
    counts = Counter(r[at].split(" (")[0].split(" [")[0] if not r[at].startswith("queued (local)") else r[at]
                     for r in rows)
    points = {point_key(flats[r.id]) for r in runs if flats[r.id] is not None}
    grouped = f" ({len(points)} points x their repeats)" if len(points) < sum(f is not None for f in flats.values()) \
        else ""
    print(f"\n{len(runs)} runs{grouped}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if error and any(j and j.get("backend") == "slurm" for j in jobs.values()):
        print(f"warning: {error}: the Slurm columns are incomplete", file=sys.stderr)
    return counts


def _cell(v) -> str:
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _short(key: str, keys: list[str]) -> str:
    """A column's name: the key's last word (beta, seed), or more of it where two keys share one."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def point_key(flat: dict) -> str:
    """The grid point of a flat semantic config: it without the repeat keys (runs.ids.REPEAT_KEYS)."""
    return json.dumps({k: v for k, v in flat.items() if k not in REPEAT_KEYS}, sort_keys=True, default=str)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
