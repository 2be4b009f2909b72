"""A sweep's submission to Slurm (`LAUNCHER=slurm`): one job array through submitit's
SlurmExecutor with the site profile's settings (slurm/profiles/<profile>.yaml), named after the
sweep, each array task one run or one pack; the intent is on disk before sbatch, so that a crash
between sbatch and recording the jobs leaves no orphan (pipeline/dispatch/orphans.py).
Nothing keeps running on the login node."""

from __future__ import annotations

import time

import submitit

from .. import faults
from ..runs.files import private_folder
from . import orphans, slurm
from .cli import fail, plural
from .jobs import job_for
from .plan import Plan


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
            jobs = [ex.submit(*job_for(plan, u, outcomes=False)) for u in units]
    except Exception as e:  # sbatch refused (it said so): nothing submitted, the runs stay "pending (no job)"
        orphans.resolve(plan.folder, intent)
        fail(f"Slurm refused the submission ({type(e).__name__}: "
              f"{(str(e).strip().splitlines() or [''])[0][:300]}); nothing was submitted", 1)
    faults.point("sbatch.done")
    for u, job in zip(units, jobs):
        for p in u:
            p.run.write_job(dict(backend="slurm", job_id=job.job_id, sweep=plan.name, profile=profile,
                                 submitted_at=time.time(), log=str(job.paths.stderr),
                                 pack=len(u) if len(u) > 1 else None))
    orphans.resolve(plan.folder, intent)
    array = jobs[0].job_id.split("_")[0]
    packed = f" in {plural(len(units), 'pack')}" if len(units) < len(plan.todo) else ""
    print(f"submitted {len(plan.todo)} runs{packed} as Slurm {'array' if len(jobs) > 1 else 'job'} {array} "
          f"(job name {plan.name}); `make status SWEEP={plan.name}` to follow")
    return 0
