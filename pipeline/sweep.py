"""`make sweep` / `make status`: plan a sweep and submit it, in one process (as Dora's shep.py).

    python -m pipeline.sweep run toy [--launcher local|basic|slurm] [--jobs 2] [--profile default]
                                     [--retry] [--dry] [-- <hydra overrides>]
    python -m pipeline.sweep status toy [-- <hydra overrides>]

`run` plans (pipeline/plan.py: every grid point composed, validated and decided), prints what it
will do, registers the runs in the sweep folder `<paths.sweeps>/<name>/`, then launches:
  slurm  one job array through submitit's SlurmExecutor with the site profile's settings
         (slurm/profiles/<profile>.yaml), named after the sweep; returns once Slurm has accepted
         it, printing the array id. Nothing keeps running on the login node.
  local  submitit's LocalExecutor, JOBS runs at a time; waits, with a progress bar of runs done.
  basic  in this process, one run after another (for debugging).
Each run's job handle goes into its run directory (job.json). `--dry` prints the plan and
creates nothing. `status` prints every run of the sweep: its state as the run store, its lease
and Slurm see it ("queued", "running", "pending (no job)", "job lost (CANCELLED)", ...).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import submitit
import yaml

from . import lease, slurm
from .compose import CONF_DIR, Composer
from .plan import Plan, make_plan, register, table
from .store import RunDir, read_metrics_table, run_holes
from .train import TrainJob
from .validate import ConfigError

LAUNCHERS = ("local", "basic", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


def presets() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))


def _fail(msg, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# -- make sweep -----------------------------------------------------------------------------------
def summary_line(plan: Plan) -> str:
    skipped = Counter(p.decision.reason.split(";")[0].split(":")[0].split(" (")[0]
                      for p in plan.points if not p.decision.launch)
    why = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    hint = "; RETRY=1 reruns diverged/failed" if set(skipped) & {"diverged", "failed", "completed with holes"} else ""
    return (f"sweep {plan.name}: {len(plan.points)} runs, {len(plan.todo)} to launch, "
            f"{len(plan.points) - len(plan.todo)} skipped{f' ({why}{hint})' if why else ''} -> {plan.folder}")


def tasks_of(prof: dict, gpus: int | None, tasks: int | None) -> dict:
    """The profile with `GPUS=n` (n GPUs per node and one task per GPU) or `TASKS=n` (n tasks
    per node, e.g. CPU ranks) applied. A run of several tasks is one distributed run
    (pipeline/dist.py); a rank that fails ends the job step."""
    prof = dict(prof)
    if gpus:
        prof.update(gpus_per_node=gpus, ntasks_per_node=gpus)
    if tasks:
        prof["ntasks_per_node"] = tasks
    if prof.get("ntasks_per_node", 1) * prof.get("nodes", 1) > 1:
        prof["srun_args"] = [*prof.get("srun_args", []), "--kill-on-bad-exit=1"]
    return prof


def submit_slurm(plan: Plan, profile: str, gpus=None, tasks=None) -> int:
    prof = tasks_of(slurm.load_profile(profile), gpus, tasks)
    extra = dict(prof.pop("additional_parameters", None) or {})
    if prof.pop("requeue", True):
        extra["requeue"] = True  # where JobRequeue=0, a preempted or timed-out job could not come back
    ex = submitit.SlurmExecutor(folder=plan.folder / ".submitit" / "%j",
                                max_num_timeout=prof.pop("max_num_timeout", 3))
    ex.update_parameters(job_name=plan.name, additional_parameters=extra, **prof)
    todo = plan.todo
    try:
        with ex.batch():
            jobs = [ex.submit(TrainJob(), p.cfg) for p in todo]
    except Exception as e:  # sbatch refused: the runs stay "pending (no job)"
        _fail(f"Slurm refused the submission ({type(e).__name__}: "
              f"{(str(e).strip().splitlines() or [''])[0][:300]}); nothing was submitted", 1)
    for p, job in zip(todo, jobs):
        p.run.write_job(dict(backend="slurm", job_id=job.job_id, sweep=plan.name, profile=profile,
                             submitted_at=time.time(), log=str(job.paths.stderr)))
    array = jobs[0].job_id.split("_")[0]
    print(f"submitted {len(todo)} runs as Slurm {'array' if len(jobs) > 1 else 'job'} {array} "
          f"(job name {plan.name}); `make status SWEEP={plan.name}` to follow")
    return 0


def _outcome(run: RunDir, result, error: str | None) -> str:
    """What became of a run that a job of this sweep ran."""
    if result == "live":
        return "live (run by another process)"
    state = run.status().get("state") or "pending"
    return f"{state} ({error})" if error and state not in ("completed", "diverged") else state


def run_local(plan: Plan, jobs: int, gpus=None, tasks=None) -> int:
    """JOBS runs at a time with submitit's LocalExecutor (each of `GPUS`/`TASKS` processes when
    given); a progress bar (or a line per run when not on a terminal) of runs done. Ctrl-C
    stops them: they are pending and resume next time."""
    from tqdm import tqdm

    ex = submitit.LocalExecutor(folder=plan.folder / ".submitit" / "%j")
    ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=gpus or tasks or 1,
                         **({"gpus_per_node": gpus} if gpus else {}))
    pending, running, outcomes = list(plan.todo), [], Counter()
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(pending), desc=f"sweep {plan.name}", unit="run", disable=not tty)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                p = pending.pop(0)
                job = ex.submit(TrainJob(), p.cfg)
                p.run.write_job(dict(backend="local", job_id=job.job_id, host=socket.gethostname(),
                                     sweep=plan.name, submitted_at=time.time(), log=str(job.paths.stderr)))
                running.append((p, job))
            time.sleep(0.2)
            for p, job in [r for r in running if r[1].done()]:
                running.remove((p, job))
                exc = job.exception()
                err = (str(exc).strip().splitlines() or [""])[-1][:200] if exc else None
                out = _outcome(p.run, None if exc else job.results()[0], err)  # task 0: rank 0
                outcomes[out.split(" (")[0]] += 1
                bar.update(1)
                if not tty:
                    print(f"  {p.run.id} {p.shown}: {out}", flush=True)
    except KeyboardInterrupt:
        for _, job in running:
            job.cancel()
        bar.close()
        print(f"interrupted: {len(running)} running runs stopped; they resume at the next `make sweep`",
              file=sys.stderr)
        return 130
    bar.close()
    print(f"sweep {plan.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    return 1 if set(outcomes) - {"completed", "diverged", "live"} else 0


def run_basic(plan: Plan) -> int:
    outcomes = Counter()
    for p in plan.todo:
        result, err = None, None
        try:
            result = TrainJob()(p.cfg)
        except Exception as e:  # one run's failure does not stop the sweep
            err = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            print(f"  {p.run.id} {p.shown}: {err}", file=sys.stderr)
        outcomes[_outcome(p.run, result, err).split(" (")[0]] += 1
    print(f"sweep {plan.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    return 1 if set(outcomes) - {"completed", "diverged", "live"} else 0


def run(preset, launcher="local", jobs=2, profile="default", retry=False, dry=False, extra=(),
        gpus=None, tasks=None) -> int:
    if preset not in presets():
        _fail(f"SWEEP={preset}: unknown preset; available: {', '.join(presets())}")
    if launcher not in LAUNCHERS:
        _fail(f"LAUNCHER={launcher}: allowed values are {', '.join(LAUNCHERS)}")
    if jobs < 1:
        _fail(f"JOBS={jobs}: allowed values are integers >= 1")
    for key, v in (("GPUS", gpus), ("TASKS", tasks)):
        if v is not None and v < 1:
            _fail(f"{key}={v}: allowed values are integers >= 1")
    if launcher == "basic" and (gpus or tasks):
        _fail("LAUNCHER=basic runs in this process: GPUS/TASKS need LAUNCHER=local or slurm")
    try:
        if launcher == "slurm":
            slurm.load_profile(profile)  # a bad profile is bad input too: before anything
            if not shutil.which("sbatch"):
                raise ConfigError("LAUNCHER=slurm: sbatch not found on PATH (run on a Slurm login "
                                  "node, or use LAUNCHER=local)")
        plan = make_plan(preset, extra, retry)
    except ConfigError as e:
        _fail(e)
    print(summary_line(plan))
    for note in plan.duplicates:
        print(f"  note: {note}")
    for p in plan.points:
        if p.decision.reason.startswith("live"):
            print(f"  {p.run.id} {p.shown}: {p.decision.reason}")
    if plan.slurm_error:
        print(f"warning: {plan.slurm_error}: runs with a Slurm job in an unknown state are not "
              "submitted again", file=sys.stderr)
    if dry:
        _print_table(table(plan))
        print("dry run: nothing created, nothing submitted")
        return 0
    register(plan)
    if not plan.todo:
        return 0
    if launcher == "slurm":
        return submit_slurm(plan, profile, gpus, tasks)
    return run_local(plan, jobs, gpus, tasks) if launcher == "local" else run_basic(plan)


# -- make status ----------------------------------------------------------------------------------
def view(st: dict, holes: str, job: dict | None, sstate: str | None, owner: dict | None, slurm_error) -> str:
    """A run's state as the store, its lease and Slurm see it together."""
    state = st.get("state")
    if st.get("unreadable"):
        return "unreadable status.json"
    if owner:
        return "running"
    if state in ("completed", "diverged", "failed"):
        return f"{state} (holes: {holes})" if holes else state
    if job and job.get("backend") == "slurm":
        if sstate in slurm.QUEUED:
            return "queued"
        if sstate in slurm.RUNNING:
            return "starting"  # the job runs; the run has not taken its lease yet
        if sstate is None and slurm_error:
            return f"{state or 'pending'} (Slurm unreachable)"
        return f"job lost ({sstate or 'unknown to Slurm'})"
    if state in (None, "pending"):
        return "pending (no job)"
    return "interrupted"  # was running, no owner, no job: the next `make sweep` resumes it


def where(name: str, extra=()) -> tuple[Path, Path]:
    """(the sweep folder `<paths.sweeps>/<sweep.name>`, the runs root `paths.runs`) as the config
    of the preset `name` (or of an ad-hoc sweep of that name) and the overrides set them: the
    one place that knows the default folders is conf/train.yaml."""
    first = [f"sweep={name}"] if name in presets() else [f"sweep.name={name}"]
    with Composer() as c:
        plain = [o.input_line for o in c.parse(first + list(extra)) if not o.is_sweep_override()]
        cfg = c.compose(plain)
    return Path(cfg.paths.sweeps) / (cfg.sweep.name or name), Path(cfg.paths.runs)


def status(preset, extra=()) -> int:
    try:
        folder, _ = where(preset, extra)
    except ConfigError as e:
        _fail(e)
    if not folder.is_dir():
        _fail(f"SWEEP={preset}: no sweep folder {folder} (run `make sweep SWEEP={preset}` first)")
    runs = [RunDir(p.resolve().parent, p.resolve().name) for p in sorted(folder.iterdir())
            if p.is_symlink() or (p / "status.json").exists()]
    jobs = {r.id: r.job() for r in runs}
    states, error = slurm.job_states([j["job_id"] for j in jobs.values() if j and j.get("backend") == "slurm"])
    rows = [["run_id", "h", "beta", "rho", "state", "step", "last_loss", "job", "slurm_state"]]
    for r in runs:
        st, job = r.status(), jobs[r.id]
        try:
            o = (yaml.safe_load(r.config.read_text()) or {}).get("optim", {})
        except (OSError, yaml.YAMLError):
            o = {}
        sstate = states.get(job["job_id"]) if job and job.get("backend") == "slurm" else None
        header, table_rows = read_metrics_table(r.metrics)
        holes = run_holes(st, [int(x[0]) for x in table_rows])
        loss = f"{float(table_rows[-1][header.index('loss')]):.6g}" if table_rows and "loss" in header else ""
        rows.append([r.id, str(o.get("h", "")), str(o.get("beta", "")), str(o.get("rho", "")),
                     view(st, holes, job, sstate, lease.holder(r.path), error), str(st.get("step", "")),
                     loss, job["job_id"] if job else "", sstate or ""])
    _print_table(rows)
    counts = Counter(r[4].split(" (")[0] for r in rows[1:])
    print(f"\n{len(runs)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if error and any(j and j.get("backend") == "slurm" for j in jobs.values()):
        print(f"warning: {error}: the Slurm columns are incomplete", file=sys.stderr)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("preset")
    r.add_argument("--launcher", default="local")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--profile", default="default")
    r.add_argument("--retry", action="store_true", help="rerun diverged and failed runs")
    r.add_argument("--dry", action="store_true", help="print the plan; create and submit nothing")
    r.add_argument("--gpus", type=int, default=None, help="GPUs per run (one task each): distributed runs")
    r.add_argument("--tasks", type=int, default=None, help="processes per run (e.g. CPU ranks, gloo)")
    s = sub.add_parser("status")
    s.add_argument("preset")
    w = sub.add_parser("where", help="print the sweep folder (or with --runs the runs root)")
    w.add_argument("preset")
    w.add_argument("--runs", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # Hydra overrides
    argv = argv[:argv.index("--")] if "--" in argv else argv
    a = ap.parse_args(argv)
    extra = [x for x in extra if x]
    if a.cmd == "run":
        return run(a.preset, a.launcher, a.jobs, a.profile, a.retry, a.dry, extra, a.gpus, a.tasks)
    if a.cmd == "where":
        try:
            print(where(a.preset, extra)[1 if a.runs else 0])
        except ConfigError as e:
            _fail(e)
        return 0
    return status(a.preset, extra)


if __name__ == "__main__":
    sys.exit(main())
