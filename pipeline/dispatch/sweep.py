"""`make sweep` / `make status`: plan a sweep and submit it, in one process (as Dora's shep.py).

    python -m pipeline.dispatch.sweep run toy [--launcher local|basic|slurm] [--jobs 2] [--profile default]
                                     [--retry] [--dry] [-- <hydra overrides>]
    python -m pipeline.dispatch.sweep status toy [-- <hydra overrides>]

`run` plans (pipeline/dispatch/plan.py: every grid point composed, validated and decided), prints what it
will do, registers the runs in the sweep folder `<paths.sweeps>/<name>/`, then launches:
  slurm  one job array through submitit's SlurmExecutor with the site profile's settings
         (slurm/profiles/<profile>.yaml), named after the sweep; returns once Slurm has accepted
         it, printing the array id. Nothing keeps running on the login node.
  local  submitit's LocalExecutor, JOBS runs at a time (each job's controller in a session of its
         own, so Ctrl-C reaches only this process, which stops the runs and leaves them pending);
         waits, printing a line per run as it starts and ends (its state or its one-line reason).
  basic  in this process, one run after another (for debugging).
Each run's job handle goes into its run directory (job.json). `--dry` prints the plan and
creates nothing. `status` prints every run of the sweep: its state as the run store, its lease
and Slurm see it ("queued", "running", "pending (no job)", "job lost (CANCELLED)", ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import submitit

from .. import faults, threads
from ..config.compose import CONF_DIR, Composer
from ..errors import ConfigError, DataError
from ..runs import lease, owners, redact
from ..runs.files import private_folder, read_json_object
from ..runs.ids import REPEAT_KEYS, differing, flat_semantic, folder_name, variant
from ..runs.integrity import check
from ..runs.rundir import FINISHED, RunDir
from ..threads import child_env
from ..train import PackJob, TrainJob
from . import orphans, slurm
from .cost import cost_lines
from .plan import Plan, make_plan, register, sweep_runs, table

LAUNCHERS = ("local", "basic", "slurm")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
YES, NO = ("1", "true", "yes"), ("", "0", "false", "no")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STOP_GRACE_S = 30  # how long Ctrl-C waits for the running runs to mark themselves pending
PROGRESS_S = 20.0  # a local sweep says where each running job is this often


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
    hint = "; RETRY=1 reruns diverged/failed/damaged" if set(skipped) & {
        "diverged", "failed", "completed with holes", "diverged with holes", "damaged"} else ""
    return (f"sweep {plan.name}: {len(plan.points)} runs, {len(plan.todo)} to launch, "
            f"{len(plan.points) - len(plan.todo)} skipped{f' ({why}{hint})' if why else ''} -> {plan.folder}")


def tasks_of(prof: dict, gpus: int | None, tasks: int | None) -> dict:
    """The profile with `GPUS=n` (n GPUs per node and one task per GPU) or `TASKS=n` (n tasks
    per node, e.g. CPU ranks) applied. A run of several tasks is one distributed run
    (pipeline/engine/dist.py); a rank that fails ends the job step."""
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
    # the job pickles a compute node unpickles: in a folder of this user's only (0700: nobody else can
    # open, swap or read them whatever their own modes; a umask of 077 here would reach the jobs via sbatch)
    ex = submitit.SlurmExecutor(folder=private_folder(plan.folder / ".submitit") / "%j",
                                max_num_timeout=prof.pop("max_num_timeout", 3))
    units = plan.units
    # -- no orphans: the intent (array task i: the i-th run, or pack of runs; a marker in the jobs'
    # comment) is on disk before sbatch and resolved once every job.json is written; a crash in
    # between is adopted later --
    intent = orphans.write_intent(plan.folder, [[p.run for p in u] if len(u) > 1 else u[0].run for u in units],
                                  profile, plan.name)
    comment = " ".join(filter(None, (str(prof.pop("comment", "") or ""), orphans.marker(intent["token"]))))
    ex.update_parameters(job_name=plan.name, additional_parameters=extra, comment=comment, **prof)
    try:
        with ex.batch():  # one array task per run, or per pack of runs
            jobs = [ex.submit(*_job(plan, u, outcomes=False)) for u in units]
    except Exception as e:  # sbatch refused (it said so): nothing submitted, the runs stay "pending (no job)"
        orphans.resolve(plan.folder, intent)
        _fail(f"Slurm refused the submission ({type(e).__name__}: "
              f"{(str(e).strip().splitlines() or [''])[0][:300]}); nothing was submitted", 1)
    faults.point("sbatch.done")
    for u, job in zip(units, jobs):
        for p in u:
            p.run.write_job(dict(backend="slurm", job_id=job.job_id, sweep=plan.name, profile=profile,
                                 submitted_at=time.time(), log=str(job.paths.stderr),
                                 pack=len(u) if len(u) > 1 else None))
    orphans.resolve(plan.folder, intent)
    array = jobs[0].job_id.split("_")[0]
    packed = f" in {_n(len(units), 'pack')}" if len(units) < len(plan.todo) else ""
    print(f"submitted {len(plan.todo)} runs{packed} as Slurm {'array' if len(jobs) > 1 else 'job'} {array} "
          f"(job name {plan.name}); `make status SWEEP={plan.name}` to follow")
    return 0


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'s' * (k != 1)}"


def _job(plan: Plan, unit: list, outcomes: bool = True) -> tuple:
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


# -- what became of a run: its run directory's status.json, and the job's own outcome.json ----------
def outcome_path(plan: Plan, run: RunDir) -> Path:
    """Where a job of this sweep writes the outcome of its run (JSON, in the sweep's own folder,
    which only its user can write: pipeline.dispatch.sweep never unpickles submitit's result files)."""
    return plan.folder / ".submitit" / "outcomes" / f"{run.id}.json"


def _outcome(run: RunDir, path: Path | None, started: float = 0.0) -> tuple[str, float | None]:
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


def _params(p) -> str:
    """The point as the progress lines show it: plan.label_points's label (h, beta, rho and every
    other key that varies, the seed of repeats included), else h, beta, rho."""
    if getattr(p, "label", ""):
        return p.label
    o = p.cfg.optim
    return " ".join(f"{k}={o[k]}" for k in ("h", "beta", "rho") if k in o) or p.shown


class _Detached:
    """Stands in for the `subprocess` module inside submitit's local executor while it starts a
    job: the job's controller runs in a session of its own (Ctrl-C at the terminal reaches only
    this process, which then stops the runs itself) with its output in the sweep's folder."""

    def __init__(self, log_path: Path, threads: int):
        self.log_path, self.threads = log_path, threads

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def Popen(self, *args, env=None, **kw):  # noqa: N802 (the name submitit calls)
        env = {**(os.environ if env is None else env), **child_env(self.threads)}  # its share, before torch loads
        with open(self.log_path, "ab") as f:
            return subprocess.Popen(*args, start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=f, env=env, **kw)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def stop_local(jobs) -> None:
    """Ctrl-C: SIGINT to every run's process (it marks its run pending, resumable), then wait for
    them (at most STOP_GRACE_S), then kill what is left of their controllers' sessions."""
    for job in jobs:
        for pid in _children(int(job.job_id)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
    deadline = time.time() + STOP_GRACE_S
    while time.time() < deadline and not all(j.done() for j in jobs):
        time.sleep(0.1)
    for job in jobs:
        if not job.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(job.job_id), signal.SIGKILL)


def run_local(plan: Plan, jobs: int, gpus=None, tasks=None) -> int:
    """JOBS jobs at a time with submitit's LocalExecutor -- a job is one run, or a pack of runs
    in one process (`PACK=`); each of `GPUS`/`TASKS` processes when given: a line per run as it
    starts and as it ends (its state, or its one-line reason), and a progress bar on a terminal.
    Ctrl-C stops them: they are pending and resume next time."""
    from tqdm import tqdm

    folder = private_folder(plan.folder / ".submitit")
    private_folder(folder / "outcomes")
    ex = submitit.LocalExecutor(folder=folder / "%j")
    ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=gpus or tasks or 1,
                         **({"gpus_per_node": gpus} if gpus else {}))
    me = dict(backend="local", host=socket.gethostname(), pid=os.getpid(), start=lease._proc_start(os.getpid()),
              sweep=plan.name)
    for p in plan.todo:  # waiting for a slot: `make status` says "queued (local)"
        p.run.write_job(dict(me, submitted_at=time.time(), queued=True))
    pending, running, outcomes = list(plan.units), [], Counter()
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(plan.todo), desc=f"sweep {plan.name}", unit="run", disable=not tty)
    say = bar.write if tty else (lambda line: print(line, flush=True))
    procs = min(jobs, len(pending)) * (gpus or tasks or 1)
    share = threads.share(procs)  # pipeline/threads.py: never more threads than cores
    packed = f" ({len(plan.todo)} runs in {_n(len(pending), 'pack')})" if len(pending) < len(plan.todo) else ""
    say(f"  {min(jobs, len(pending))} {'jobs' if packed else 'runs'} at a time{packed}, {share} "
        f"thread{'s' * (share > 1)} per process ({threads.cores()} cores)")
    shown = time.time()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                unit = pending.pop(0)
                t0 = time.time()
                detached = _Detached(folder / "controllers.log", share)
                with mock.patch.object(submitit.local.local, "subprocess", detached):
                    job = ex.submit(*_job(plan, unit))
                for p in unit:
                    p.run.write_job(dict(me, job_id=job.job_id, submitted_at=t0, log=str(job.paths.stderr),
                                         pack=len(unit) if len(unit) > 1 else None))
                    say(f"  start {p.run.id} {_params(p)}{f' (pack of {len(unit)})' if len(unit) > 1 else ''}")
                running.append((unit, job, t0))
            time.sleep(0.2)
            if time.time() - shown >= PROGRESS_S:  # between a run's start and end: where it is
                for unit, _, t0 in running:
                    say(progress_line(unit, t0))
                shown = time.time()
            for item in [r for r in running if r[1].done()]:
                running.remove(item)
                _ended(plan, *item, outcomes, bar, say)
    except KeyboardInterrupt:
        bar.close()
        return _interrupted(running, pending, me)
    bar.close()
    print(f"sweep {plan.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    return 1 if set(outcomes) - {*FINISHED, "live"} else 0


def _ended(plan: Plan, unit: list, job, t0: float, outcomes: Counter, bar, say) -> None:
    """The end line of each run of a finished job, its outcome counted."""
    for p in unit:
        result, last = _outcome(p.run, outcome_path(plan, p.run), t0)
        outcomes[result.split(" (")[0]] += 1
        bar.update(1)
        say(f"  end   {p.run.id} {_params(p)}: {result}"
            f"{f', loss {last:.4g}' if last is not None else ''}, {time.time() - t0:.0f} s")


def _interrupted(running: list, pending: list, me: dict) -> int:
    """Ctrl-C: the running jobs stopped (their runs pending, resumed by the next `make sweep`); 130."""
    stopped = [p for unit, _, _ in running for p in unit]
    print(f"interrupted: stopping {len(stopped)} running runs ...", file=sys.stderr, flush=True)
    stop_local([job for _, job, _ in running])
    for p in stopped:
        p.run.write_job(dict(me, job_id=None, submitted_at=time.time(), stopped=True))
    print(f"interrupted: {len(stopped)} runs stopped, {sum(len(u) for u in pending)} not started; they are "
          "pending and resume at the next `make sweep`", file=sys.stderr)
    return 130


def progress_line(unit: list, t0: float) -> str:
    """`  ...   <run id> h=.. beta=.. rho=..: step n/N, loss L, ~S s left` for a running job (its
    first run, from the last row of its metrics.csv and the time of its step 0)."""
    p = unit[0]
    last = _last_row(p.run.metrics)
    pack = f" (pack of {len(unit)})" if len(unit) > 1 else ""
    if last is None:
        return f"  ...   {p.run.id} {_params(p)}{pack}: starting ({time.time() - t0:.0f} s)"
    n, loss, total = last[0], last[1], int(p.cfg.train.max_steps)
    first = p.run.status().get("first_step_at")
    left = (time.time() - first) / max(n, 1) * (total - n) if isinstance(first, (int, float)) and n else None
    eta = f", ~{left:.0f} s left" if left is not None else ""
    return f"  ...   {p.run.id} {_params(p)}{pack}: step {n}/{total}, loss {loss:.4g}{eta}"


def _last_row(path: Path) -> tuple[int, float] | None:
    """(step, loss) of the last complete row of a metrics.csv (its columns begin step, loss), read
    from its end; None before the first row."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").split("\n")[:-1]  # the last piece may be torn
    except OSError:
        return None
    for line in reversed(lines):
        cells = line.split(",")
        try:
            return int(cells[0]), float(cells[1])
        except (ValueError, IndexError):
            continue
    return None


def run_basic(plan: Plan) -> int:
    outcomes = Counter()
    private_folder(private_folder(plan.folder / ".submitit") / "outcomes")
    for unit in plan.units:
        t0 = time.time()
        job, arg = _job(plan, unit)
        with contextlib.suppress(Exception):  # one run's failure does not stop the sweep; its reason is in its outcome
            job(arg)
        for p in unit:
            result, _ = _outcome(p.run, outcome_path(plan, p.run), t0)
            print(f"  {p.run.id} {p.shown}: {result}", file=sys.stderr if " (" in result else sys.stdout)
            outcomes[result.split(" (")[0]] += 1
    print(f"sweep {plan.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    return 1 if set(outcomes) - {*FINISHED, "live"} else 0


def _check_arguments(preset, launcher, jobs, gpus, tasks) -> None:
    """The launcher's own arguments: one line and exit 2 for a bad one."""
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


def _planned(preset, launcher, profile, retry, dry, extra) -> Plan:
    """The profile and sbatch checked (bad input too), the plan made; the jobs of an earlier
    sweep that died between sbatch and recording them adopted first (pipeline/dispatch/orphans.py)."""
    try:
        if launcher == "slurm" or profile:
            slurm.load_profile(profile or "default")  # a bad profile is bad input too: before anything
        if launcher == "slurm" and not shutil.which("sbatch"):
            raise ConfigError("LAUNCHER=slurm: sbatch not found on PATH (run on a Slurm login "
                              "node, or use LAUNCHER=local)")
        plan = make_plan(preset, extra, retry)
        if orphans.intents(plan.folder):
            if dry:
                print(f"warning: an interrupted Slurm submission of {plan.name} is not resolved yet; `make sweep` "
                      "(without DRY) or `make status` adopts its jobs", file=sys.stderr)
            else:
                for line in orphans.adopt(plan.folder):
                    print(line, file=sys.stderr)
                plan = make_plan(preset, extra, retry)  # adopted runs are live now
    except ConfigError as e:
        _fail(e)
    _fetch_data(plan, dry)
    return plan


def _fetch_data(plan: Plan, dry: bool) -> None:
    """Every dataset the runs will read is there before anything is created or submitted: with
    data.download=true it is fetched here, once (compute nodes are often offline); otherwise, or
    when the download fails, one line with the command that fetches it and exit 2. DRY=1 warns."""
    for name, root, download, why in plan.missing_data():
        if dry:
            print(f"warning: {f'{name} is not in {root} yet: make sweep downloads it first (data.download=true)'}"
                  if download else f"warning: {why}", file=sys.stderr)
            continue
        if download:
            from ..engine.data import fetch  # torch: only when there is something to fetch

            print(f"downloading {name} into {root} (data.download=true) ...", flush=True)
            try:
                fetch(name, root)
                continue
            except DataError as e:
                why = str(e)
        _fail(f"{why} (no run was created, nothing submitted)")


def _tell(plan: Plan) -> None:
    """What the plan found: its summary, duplicates, damaged files read around, live and
    damaged runs, an unreachable Slurm."""
    print(summary_line(plan))
    for note in plan.duplicates:
        print(f"  note: {note}")
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in plan.points:
        if p.decision.reason.startswith(("live", "damaged")) or " with holes (" in p.decision.reason:
            print(f"  {p.run.id} {p.shown}: {p.decision.reason}")
    if plan.slurm_error:
        print(f"warning: {plan.slurm_error}: runs with a Slurm job in an unknown state are not "
              "submitted again", file=sys.stderr)


def run(preset, launcher="local", jobs=2, profile=None, retry=False, dry=False, extra=(),
        gpus=None, tasks=None, pack=1) -> int:
    """`make sweep`: every input checked first (one line each, exit 2), then plan, register, launch.
    `profile` None: the default site profile for Slurm, none otherwise. `pack`: at most this many
    runs per job, trained together in one process (pipeline/config/pack.py), or 'auto'."""
    faults.arm()  # the crash tests' failpoints (sbatch.done), from $ADAM_FAULTS
    _check_arguments(preset, launcher, jobs, gpus, tasks)
    if (gpus or tasks) and pack not in (1, "auto"):
        _fail(f"PACK={pack}: a pack is one process, a run with GPUS/TASKS is several; use PACK=1")
    plan = _planned(preset, launcher, profile, retry, dry, extra)
    try:
        plan.pack(1 if gpus or tasks else pack, jobs if launcher == "local" else 1)
    except ConfigError as e:
        _fail(e)
    if profile and launcher != "slurm":
        print(f"note: PROFILE={profile} is ignored with LAUNCHER={launcher}: a site profile holds sbatch "
              "options (partition, time, memory, ...); GPUS=/TASKS=/JOBS= set what applies here", file=sys.stderr)
    _tell(plan)
    if len(plan.units) < len(plan.todo):
        print(f"  PACK={pack}: {len(plan.todo)} runs in {_n(len(plan.units), 'pack')} of "
              f"{'/'.join(str(n) for n in sorted({len(u) for u in plan.units}, reverse=True))} "
              "(each pack trains its runs together in one process; each run is still its own)")
    if dry:
        _print_table(table(plan))
        for line in cost_lines([p.cfg for p in plan.todo]):
            print(line)
        print("dry run: nothing created, nothing submitted")
        return 0
    for line in register(plan):
        print(f"warning: {line}", file=sys.stderr)
    if not plan.todo:
        return 0
    if launcher == "slurm":
        return submit_slurm(plan, profile or "default", gpus, tasks)
    return run_local(plan, jobs, gpus, tasks) if launcher == "local" else run_basic(plan)


# -- make status ----------------------------------------------------------------------------------
def _local_sweep_alive(job: dict) -> bool:
    """Whether the local sweep process that wrote this job handle still runs (on this host)."""
    if job.get("host") != socket.gethostname() or not isinstance(job.get("pid"), int):
        return False
    return lease._alive(job["pid"], job.get("start"))


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
        _fail(e)
    if not folder.is_dir():
        others = sorted(p.name for p in folder.parent.glob(f"{preset}*") if p.is_dir()) \
            if folder.parent.is_dir() else []
        hint = f"; folders of this preset: {', '.join(others)} (NAME=<folder> picks one)" if others else ""
        _fail(f"SWEEP={preset}: no sweep folder {folder} (run `make sweep SWEEP={preset}` with the same EXTRA "
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
    _print_table([["run_id", *(_short(k, keys) for k in keys), "state", "step", "last_loss", "pert_norm", "test_acc",
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other mistake
        _fail(f"{self.prog}: {message}")


def seconds(name: str, value) -> float | None:
    """WATCH=: a number of seconds > 0, empty or 0 for none; anything else is refused."""
    v = str(value or "").strip()
    try:
        x = float(v) if v else 0.0
    except ValueError:
        x = -1.0
    if x < 0 or x != x or x == float("inf"):
        _fail(f"{name}={value}: allowed values are a finite number of seconds > 0, or 0 for once")
    return x or None


def flag(name: str, value) -> bool:
    """RETRY=/DRY=: 0/1/true/false/yes/no (any case), empty for no; anything else is refused."""
    v = str(value if value is not None else "").strip().lower()
    if v in YES or v in NO:
        return v in YES
    _fail(f"{name}={value}: allowed values are 1, 0, true, false, yes, no")


def count(name: str, value, empty=None) -> int | None:
    """JOBS=/GPUS=/TASKS=: a whole number >= 1 (empty: `empty`)."""
    v = str(value if value is not None else "").strip()
    if v == "":
        return empty
    if not v.isdigit() or int(v) < 1:
        _fail(f"{name}={value}: allowed values are whole numbers >= 1")
    return int(v)


def pack_size(value) -> int | str:
    """PACK=: a whole number >= 1, or auto (empty: 1)."""
    v = str(value if value is not None else "").strip().lower()
    if v in ("auto", ""):
        return v or 1
    if not v.isdigit() or int(v) < 1:
        _fail(f"PACK={value}: allowed values are whole numbers >= 1 (runs per process) or auto")
    return int(v)


def sweep_name(value: str) -> str:
    if not NAME.fullmatch(value or ""):
        _fail(f"SWEEP={value!r}: a sweep name is one word of letters, digits, '_', '.' and '-' "
              f"(presets: {', '.join(presets())})")
    return value


def main(argv=None):
    ap = _Parser(prog="python -m pipeline.dispatch.sweep", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run")
    r.add_argument("preset")
    r.add_argument("--launcher", default="local")
    r.add_argument("--jobs", default="2", help="runs at a time (local launcher)")
    r.add_argument("--profile", default="", help="site profile of slurm/profiles/ (Slurm only)")
    r.add_argument("--retry", default="0", help="1/true/yes: rerun diverged, failed and damaged runs")
    r.add_argument("--dry", default="0", help="1/true/yes: print the plan; create and submit nothing")
    r.add_argument("--gpus", default="", help="GPUs per run (one task each): distributed runs")
    r.add_argument("--tasks", default="", help="processes per run (e.g. CPU ranks, gloo)")
    r.add_argument("--pack", default="1", help="runs per process (trained together), or auto")
    s = sub.add_parser("status")
    s.add_argument("preset")
    s.add_argument("--watch", default="", help="seconds: print the table again until no run is live")
    w = sub.add_parser("where", help="print the sweep folder (or with --runs the runs root)")
    w.add_argument("preset")
    w.add_argument("--runs", action="store_true")
    w.add_argument("--wandb", action="store_true", help="the offline wandb runs of the sweep's own runs (make sync)")
    w.add_argument("--store", action="store_true",
                   help="store.trust and store.group as arguments of python -m analysis")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # Hydra overrides
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if len(argv) >= 2 and argv[0] in ("run", "status", "where"):
        sweep_name(argv[1])  # before argparse: `SWEEP='a b'` is one clear line, not a usage text
    a = ap.parse_args(argv)
    extra = [x for x in extra if x]
    if a.cmd == "run":
        return run(a.preset, a.launcher, count("JOBS", a.jobs, 2), a.profile or None, flag("RETRY", a.retry),
                   flag("DRY", a.dry), extra, count("GPUS", a.gpus), count("TASKS", a.tasks), pack_size(a.pack))
    if a.cmd == "where":
        try:
            folder, root = where(a.preset, extra)
        except ConfigError as e:
            _fail(e)
        if a.wandb:  # only the runs of the sweep's plan: an offline run planted elsewhere in a shared root is not sent
            for r in sweep_runs(folder)[0]:
                if r.path.is_dir() and not r.path.is_symlink() and (r.path / "wandb").is_dir():
                    for d in sorted((r.path / "wandb").glob("offline-run-*")):
                        print(d)
            return 0
        if a.store:  # make analyze: the analysis trusts whom the sweep trusts
            p = owners.policy()
            print(" ".join(([f"--trust={','.join(p.trust)}"] if p.trust else []) +
                           ([f"--group={p.group_name}"] if p.group_name else [])))
            return 0
        print(root if a.runs else folder)
        return 0
    return status(a.preset, extra, seconds("WATCH", a.watch) if a.cmd == "status" else None)


if __name__ == "__main__":
    from pipeline.errors import command

    command(main)
