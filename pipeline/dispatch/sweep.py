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
import shutil
import sys
from collections import Counter

from .. import faults
from ..errors import ConfigError, DataError
from ..runs import owners
from . import orphans, slurm
from .cli import Parser, check_arguments, count, fail, flag, pack_size, plural, print_table, seconds, sweep_name
from .cost import cost_lines
from .local import run_basic, run_local
from .plan import Plan, make_plan, register, sweep_runs, table
from .status import status, where
from .submission import submit_slurm


def summary_line(plan: Plan) -> str:
    skipped = Counter(p.decision.reason.split(";")[0].split(":")[0].split(" (")[0]
                      for p in plan.points if not p.decision.launch)
    why = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    hint = "; RETRY=1 reruns diverged/failed/damaged" if set(skipped) & {
        "diverged", "failed", "completed with holes", "diverged with holes", "damaged"} else ""
    return (f"sweep {plan.name}: {len(plan.points)} runs, {len(plan.todo)} to launch, "
            f"{len(plan.points) - len(plan.todo)} skipped{f' ({why}{hint})' if why else ''} -> {plan.folder}")


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
        fail(e)
    fetch_data(plan, dry)
    return plan


def fetch_data(plan: Plan, dry: bool) -> None:
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
        fail(f"{why} (no run was created, nothing submitted)")


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
    check_arguments(preset, launcher, jobs, gpus, tasks)
    if (gpus or tasks) and pack not in (1, "auto"):
        fail(f"PACK={pack}: a pack is one process, a run with GPUS/TASKS is several; use PACK=1")
    plan = _planned(preset, launcher, profile, retry, dry, extra)
    try:
        plan.pack(1 if gpus or tasks else pack, jobs if launcher == "local" else 1)
    except ConfigError as e:
        fail(e)
    if profile and launcher != "slurm":
        print(f"note: PROFILE={profile} is ignored with LAUNCHER={launcher}: a site profile holds sbatch "
              "options (partition, time, memory, ...); GPUS=/TASKS=/JOBS= set what applies here", file=sys.stderr)
    _tell(plan)
    if len(plan.units) < len(plan.todo):
        print(f"  PACK={pack}: {len(plan.todo)} runs in {plural(len(plan.units), 'pack')} of "
              f"{'/'.join(str(n) for n in sorted({len(u) for u in plan.units}, reverse=True))} "
              "(each pack trains its runs together in one process; each run is still its own)")
    if dry:
        print_table(table(plan))
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


def main(argv=None):
    ap = Parser(prog="python -m pipeline.dispatch.sweep", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
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
            fail(e)
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
