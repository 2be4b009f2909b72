"""The local launcher (`LAUNCHER=local`, the default, and `basic`): JOBS jobs at a time with
submitit's LocalExecutor, each job's controller in a session of its own, so that Ctrl-C reaches
only the sweep's process, which stops the runs and leaves them pending; a line per run as it
starts and ends, a progress line for each running job every PROGRESS_S seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import submitit

from .. import threads
from ..runs import lease
from ..runs.files import private_folder
from ..runs.rundir import FINISHED
from ..threads import child_env
from .cli import plural
from .jobs import job_for, outcome_of, outcome_path, point_label
from .plan import Plan

LOCAL_TIMEOUT_MIN = 7 * 24 * 60
STOP_GRACE_S = 30  # how long Ctrl-C waits for the running runs to mark themselves pending
PROGRESS_S = 20.0  # a local sweep says where each running job is this often


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
    me = dict(backend="local", host=socket.gethostname(), pid=os.getpid(), start=lease.proc_start(os.getpid()),
              sweep=plan.name)
    for p in plan.todo:  # waiting for a slot: `make status` says "queued (local)"
        p.run.write_job(dict(me, submitted_at=time.time(), queued=True))
    pending, running, outcomes = list(plan.units), [], Counter()
    tty = sys.stderr.isatty()
    bar = tqdm(total=len(plan.todo), desc=f"sweep {plan.name}", unit="run", disable=not tty)
    say = bar.write if tty else (lambda line: print(line, flush=True))
    procs = min(jobs, len(pending)) * (gpus or tasks or 1)
    share = threads.share(procs)  # pipeline/threads.py: never more threads than cores
    packed = f" ({len(plan.todo)} runs in {plural(len(pending), 'pack')})" if len(pending) < len(plan.todo) else ""
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
                    job = ex.submit(*job_for(plan, unit))
                for p in unit:
                    p.run.write_job(dict(me, job_id=job.job_id, submitted_at=t0, log=str(job.paths.stderr),
                                         pack=len(unit) if len(unit) > 1 else None))
                    say(f"  start {p.run.id} {point_label(p)}{f' (pack of {len(unit)})' if len(unit) > 1 else ''}")
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
        result, last = outcome_of(p.run, outcome_path(plan, p.run), t0)
        outcomes[result.split(" (")[0]] += 1
        bar.update(1)
        say(f"  end   {p.run.id} {point_label(p)}: {result}"
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
        return f"  ...   {p.run.id} {point_label(p)}{pack}: starting ({time.time() - t0:.0f} s)"
    n, loss, total = last[0], last[1], int(p.cfg.train.max_steps)
    first = p.run.status().get("first_step_at")
    left = (time.time() - first) / max(n, 1) * (total - n) if isinstance(first, (int, float)) and n else None
    eta = f", ~{left:.0f} s left" if left is not None else ""
    return f"  ...   {p.run.id} {point_label(p)}{pack}: step {n}/{total}, loss {loss:.4g}{eta}"


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
        job, arg = job_for(plan, unit)
        with contextlib.suppress(Exception):  # one run's failure does not stop the sweep; its reason is in its outcome
            job(arg)
        for p in unit:
            result, _ = outcome_of(p.run, outcome_path(plan, p.run), t0)
            print(f"  {p.run.id} {p.shown}: {result}", file=sys.stderr if " (" in result else sys.stdout)
            outcomes[result.split(" (")[0]] += 1
    print(f"sweep {plan.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    return 1 if set(outcomes) - {*FINISHED, "live"} else 0
