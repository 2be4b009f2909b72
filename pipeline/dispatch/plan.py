"""The sweep planner: a preset and overrides -> every grid point composed with Hydra's compose
API and override grammar, validated, given its run id, and decided (integrity.decide: launch, or
skip as completed, live, diverged or failed) -- in this process, before anything is created or
submitted. A run is live when its lease is held or the Slurm job that a sweep submitted for it
is queued or running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..catalog import missing_data
from ..config.compose import Composer
from ..config.pack import packs, refusal
from ..config.validate import check_dir_writable, validate_grid
from ..errors import ConfigError, StoreError, shown
from ..runs import lease, owners, redact
from ..runs.files import atomic_write_text, read_json_object, real_folder
from ..runs.ids import folder_name, run_id, variant
from ..runs.integrity import Decision, Health, check, decide
from ..runs.rundir import RunDir
from . import slurm

# overrides that every point carries: not shown as the point's own
COMMON = ("sweep=", "sweep.", "paths.", "retry=", "hydra.", "store.")


@dataclass
class Point:
    overrides: list[str]  # the point's own overrides (grid values and given ones)
    cfg: DictConfig
    run: RunDir
    decision: Decision = None
    job: dict | None = None  # the handle of the job a sweep submitted for the run
    slurm_state: str | None = None
    health: Health | None = None
    label: str = ""  # h, beta, rho and every other key whose value differs among the plan's points

    @property
    def shown(self) -> str:
        return " ".join(o for o in self.overrides if not o.startswith(COMMON))


def label_points(points: list[Point]) -> None:
    """Each point's `label` for the progress lines: `h=.. beta=.. rho=..` and every other
    override whose value differs among the points (the seed of REPEATS=K, a grid over
    train.max_steps), so that no two runs of a sweep print the same line."""
    values: dict[str, set] = {}
    for p in points:
        for o in p.overrides:
            k, _, v = o.partition("=")
            values.setdefault(k, set()).add(v)
    drawn = ("optim.h", "optim.beta", "optim.rho")
    varying = [k for k, vs in values.items() if len(vs) > 1 and k not in drawn and not k.startswith(COMMON)]
    for p in points:
        o = p.cfg.optim
        mine = dict(x.partition("=")[::2] for x in p.overrides)
        p.label = " ".join([f"{k}={o[k]}" for k in ("h", "beta", "rho") if k in o] +
                           [f"{k}={mine[k]}" for k in varying if k in mine]) or p.shown


@dataclass
class Plan:
    name: str
    folder: Path
    points: list[Point]
    slurm_error: str | None = None
    duplicates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # damaged files that were read around
    earlier: list[dict] = field(default_factory=list)  # the points of the sweep's plan.json before this plan

    grouped: list[list[Point]] | None = None  # set by `pack`

    @property
    def todo(self) -> list[Point]:
        return [p for p in self.points if p.decision.launch]

    @property
    def units(self) -> list[list[Point]]:
        """What each job runs: one run, or a pack of runs trained in one process."""
        return self.grouped if self.grouped is not None else [[p] for p in self.todo]

    def pack(self, size: int | str, slots: int = 1) -> None:
        """Group the runs to launch into packs of at most `size` (an integer, or 'auto' spread
        over `slots` jobs at a time): pipeline/config/pack.py. A run that cannot pack with an
        integer size > 1 is ConfigError, one line naming it and why."""
        todo = self.todo
        for p in todo if size not in (1, "auto") else ():
            why = refusal(p.cfg)
            if why:
                raise ConfigError(f"PACK={size}: run {p.run.id} ({p.shown}): {why}")
        self.grouped = [[todo[i] for i in g] for g in packs([p.cfg for p in todo], size, slots)]

    def missing_data(self) -> list[tuple[str, str, bool, str]]:
        """(dataset, root, data.download, why) for each dataset of the runs to launch that cannot
        be read (`why`: one line with the command that fetches it); [] when every one can."""
        seen = {}
        for p in self.todo:
            d = p.cfg.data
            key = (d.name, str(d.get("root") or "."))
            if key not in seen:
                why = missing_data(*key)
                seen[key] = (*key, bool(d.get("download")), why) if why else None
        return [m for m in seen.values() if m]


def live_job(job: dict | None, state: str | None) -> str | None:
    """'Slurm job 12_3 PENDING' while the job a sweep submitted for a run is queued or running."""
    if job and job.get("backend") == "slurm" and state in slurm.QUEUED | slurm.RUNNING:
        return f"Slurm job {job['job_id']} {state}"
    return None


def with_repeats(composer, overrides: list[str], grid: list) -> list:
    """The grid with each point `sweep.repeats` times (REPEATS=K): the repeat key of
    `sweep.repeat_by` (seed: seed..seed+K-1; perturb_theta0: 1..K, theta_0 moved by one ulp) added
    as one more grid axis, so each repeat is a run of its own. ConfigError when the grid already
    varies that key (a preset or EXTRA that sweeps the seed)."""
    cfg = grid[0][1] if grid else None
    k = int(OmegaConf.select(cfg, "sweep.repeats") or 1) if cfg is not None else 1
    if k == 1:
        return grid
    by = OmegaConf.select(cfg, "sweep.repeat_by")
    key = "seed" if by == "seed" else "train.perturb_theta0"
    values = sorted({str(OmegaConf.select(c, key)) for _, c in grid})
    if len(values) > 1:
        raise ConfigError(f"REPEATS={k}: the grid already sweeps {key} ({', '.join(values)}); repeats vary it "
                          "themselves: drop one or the other")
    first = OmegaConf.select(cfg, key)
    start = int(first) if first is not None else (0 if key == "seed" else 1)
    return validate_grid(composer, overrides + [f"{key}={','.join(str(start + r) for r in range(k))}"])


def make_plan(preset: str | None, extra=(), retry=False) -> Plan:
    """Every point of `sweep=<preset>` x `extra` (Hydra overrides, grids included), decided.
    Raises ConfigError (one line naming the key and the grid point) before touching anything."""
    v = variant(extra)  # a sweep with settings of its own: its own folder
    overrides = ([f"sweep={preset}"] if preset else []) + list(extra) + ([f"sweep.variant='{v}'"] if v else []) + \
        [f"retry={str(retry).lower()}"]
    with Composer() as c:
        grid = with_repeats(c, overrides, validate_grid(c, overrides))
        points = [Point(ov, cfg, RunDir(cfg.paths.runs, run_id(cfg))) for ov, cfg in grid]
    if not points:
        raise ConfigError(f"{' '.join(overrides)}: the grid is empty")
    first = points[0].cfg
    owners.configure(first.get("store"))  # whose folders count, the modes of what is created
    check_dir_writable("paths.runs", first.paths.runs)
    check_dir_writable("paths.sweeps", first.paths.sweeps)
    name = folder_name(first, preset or "adhoc")
    plan = Plan(name, Path(first.paths.sweeps) / name, [])
    earlier, why = read_plan(plan.folder, name)
    plan.earlier = (earlier or {}).get("points", [])
    if why:
        plan.warnings.append(f"{plan.folder}/{why}; it is written anew from this plan (the runs it named "
                             "keep their directories)")
    label_points(points)
    seen = {}
    for p in points:  # points that differ only in non-semantic keys are one run
        if p.run.id in seen:
            plan.duplicates.append(f"{p.shown} is the same run as {seen[p.run.id]}")
            continue
        seen[p.run.id] = p.shown
        plan.points.append(p)
    for p in plan.points:
        p.health = check(p.run)
        p.job, why = p.run.read_job() if not p.health.foreign else (None, "")
        if why:
            plan.warnings.append(f"run {p.run.id}: {why}; read as no job")
    states, plan.slurm_error = slurm.job_states(
        [p.job["job_id"] for p in plan.points if p.job and p.job.get("backend") == "slurm"])
    for p in plan.points:
        if p.job and p.job.get("backend") == "slurm":
            p.slurm_state = states.get(p.job["job_id"])
        owner = lease.holder(p.run.path, timeout_s=p.cfg.lease.timeout_s)  # this sweep's timeout, not the file's
        live = lease.describe(owner) if owner else live_job(p.job, p.slurm_state)
        if live is None and plan.slurm_error and p.job and p.job.get("backend") == "slurm" \
                and p.health.state in (None, "pending", "running"):
            live = f"Slurm job {p.job['job_id']}, state unknown ({plan.slurm_error})"  # do not submit twice
        p.decision = decide(p.health, bool(p.cfg.retry), live)
    return plan


def register(plan: Plan) -> list[str]:
    """Create the sweep folder, a pending run directory (config, status) for each new run, the
    link `<sweep folder>/<run_id> -> <run directory>` for every run of the sweep, and
    `plan.json`: the points with their overrides and what was decided."""
    said = []  # what registering found, one line each
    real_folder(plan.folder, "a sweep folder", create=True)
    root = str(Path(plan.points[0].cfg.paths.runs).resolve())
    with plan_lock(plan.folder):  # two sweeps into one folder at once: each adds its points to the other's
        earlier, _ = read_plan(plan.folder, plan.name)
        points = {p["run_id"]: p for p in (earlier or {}).get("points", plan.earlier)}  # earlier points stay
        points.update({p.run.id: dict(run_id=p.run.id, overrides=redact.argv(p.overrides), reason=p.decision.reason,
                                      action=p.decision.action) for p in plan.points})
        atomic_write_text(plan.folder / "plan.json", json.dumps(dict(
            sweep=plan.name, runs_root=root, points=list(points.values())), indent=1) + "\n")
    for p in plan.points:
        if p.health is not None and p.health.foreign:  # a link or a file where the run folder must be
            continue
        p.run.create(p.cfg)
        link = plan.folder / p.run.id
        target = os.path.relpath(p.run.path.resolve(), plan.folder.resolve())
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.exists() and not link.is_symlink():
            said.append(f"{link}: a {'folder' if link.is_dir() else 'file'} where the sweep's link to "
                        f"run {p.run.id} goes; left as it is (the run is counted through plan.json)")
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return said


@contextlib.contextmanager
def plan_lock(folder: Path):
    """flock(2) on `<folder>/.plan.lock` while plan.json is read and rewritten."""
    try:
        fd = os.open(folder / ".plan.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise StoreError(f"{folder / '.plan.lock'}: cannot be opened as the sweep's lock file "
                         f"({e.strerror or e}); remove it") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def table(plan: Plan) -> list[list[str]]:
    """Rows of the plan as printed: run id, the point's overrides, what will happen."""
    rows = [["run_id", "point", "action"]]
    for p in plan.points:
        act = {"start": "launch", "resume": "launch (resume)", "restart": "launch (from step 0)",
               "skip": "skip"}[p.decision.action]
        rows.append([p.run.id, p.shown or "(defaults)", f"{act}: {p.decision.reason}"
                     if p.decision.action in ("skip", "restart") else act])
    return rows



# -- which runs a sweep holds: plan.json ----------------------------------------------------------
RUN_ID = re.compile(r"[0-9a-f]{12}")
PLAN_FIELDS = {"sweep": (str,), "runs_root": (str,), "points": (list,)}
SWEEP_FILES = {"plan.json", "analysis", ".submitit", ".hydra"}


def read_plan(folder: Path, sweep: str | None = None) -> tuple[dict | None, str]:
    """(plan.json of a sweep folder, '') or (None, why it is damaged); (None, '') when missing.
    `sweep`: the folder's sweep name, which the plan must carry (another sweep's plan.json copied
    or left there is not adopted)."""
    plan, why = read_json_object(Path(folder) / "plan.json", PLAN_FIELDS)
    if plan is None:
        return None, why
    if sweep is not None and plan.get("sweep") != sweep:
        return None, f"plan.json: the plan of sweep {shown(plan.get('sweep'), 40)}, not of {sweep}; not adopted"
    for i, p in enumerate(plan.get("points") or []):
        if not isinstance(p, dict) or not isinstance(p.get("run_id"), str) or not RUN_ID.fullmatch(p["run_id"]):
            return None, f"plan.json: point {i} has no run_id of 12 hex digits"
    return plan, ""


def sweep_runs(folder: Path) -> tuple[list[RunDir], list[str]]:
    """The run directories of a sweep folder, each once, and one warning per thing read around.

    The runs are those of plan.json, in the runs root it names (`<runs_root>/<run_id>`); the
    folder's links are only a convenience for users: a link that points elsewhere, is missing
    or dangles, and an entry that no plan names, gets a warning and is never counted. Without a
    readable plan.json (sweeps made before it held the runs root) the links are followed, each
    run directory once."""
    folder = Path(folder)
    plan, why = read_plan(folder, folder.name)
    warnings = [f"{folder}/{why}; reading the folder's links instead"] if why else []
    entries = {p.name: p for p in sorted(folder.iterdir()) if p.name not in SWEEP_FILES
               and not p.name.startswith(".")} if folder.is_dir() else {}
    runs, seen = [], set()
    if plan is not None and plan.get("runs_root"):
        root = Path(plan["runs_root"])
        for rid in dict.fromkeys(p["run_id"] for p in plan.get("points", [])):
            run, link = RunDir(root, rid), entries.pop(rid, None)
            if not run.path.is_dir():
                warnings.append(f"run {rid} of {folder}/plan.json: no run directory {run.path}; left out")
                continue
            if link is None:
                warnings.append(f"run {rid}: the link {folder / rid} is missing (plan.json names the run)")
            elif not link.exists():
                warnings.append(f"run {rid}: the link {link} dangles; using {run.path}")
            elif link.resolve() != run.path.resolve():
                warnings.append(f"run {rid}: the link {link} points to {link.resolve()}, not to the run "
                                f"directory {run.path}; using the run directory")
            runs.append(run)
        for p in entries.values():
            warnings.append(f"{p}: not a run of {folder}/plan.json; ignored")
        return runs, warnings
    for name, p in entries.items():
        if not p.exists():
            warnings.append(f"{p}: a dangling link; ignored")
            continue
        if not (p / "status.json").exists() and not (p / "metrics.csv").exists():
            continue
        real = p.resolve()
        if real in seen:
            warnings.append(f"{p}: the same run directory as another entry ({real}); counted once")
            continue
        seen.add(real)
        runs.append(RunDir(real.parent, name) if p.is_symlink() and real.name == name else RunDir(folder, name))
    return runs, warnings
