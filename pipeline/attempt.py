"""What a run does, each time a process is given it (one attempt, counted in status.json):
checked before any data is loaded, its lease taken, decided again as its owner (start, resume,
restart or skip: runs/integrity.py), its directory prepared, then trained to its end by the loop
(engine/single.py; a pack of runs: engine/packed.py, each run still its own), and marked pending,
failed or fenced when something ends it early. pipeline/train.py is the job and the command line
around it.
"""

from __future__ import annotations

import contextlib
import logging
import time

from omegaconf import DictConfig

from . import faults
from .config.user_outputs import check_user_code
from .config.validate import check_dir_writable, validate
from .errors import ConfigError, DiskFull, LeaseHeld, LeaseLost, StoreError, one_line
from .runs import owners, provenance
from .runs.ids import run_id, with_added_keys
from .runs.integrity import check, decide
from .runs.lease import Lease, holder, slurm_job_id
from .runs.rundir import RunDir
from .runs.train_log import run_log

log = logging.getLogger("pipeline.train")


def train(cfg: DictConfig, launched_by: list[str] | None = None) -> str:
    """Run (or resume, or skip) the run of `cfg`; returns its state. Raises ConfigError or
    DataError on bad input (nothing is created), LeaseHeld when another process owns the run
    (nothing is changed), DiskFull (the run is left pending, its last checkpoint intact).
    Under torchrun or a multi-task Slurm job every rank calls it (pipeline/engine/dist.py)."""
    faults.arm()  # the crash tests' failpoints, from $ADAM_FAULTS (none in normal runs)
    validate(with_added_keys(cfg))  # a job pickled before a key existed gets that key's old value
    owners.configure(cfg.get("store"))  # whose folders count, the modes of what is created
    check_dir_writable("paths.runs", cfg.paths.runs)
    from .engine import dist  # torch: only once the config is known to be good (a quick bad-input line)
    from .engine.data import load_dataset
    from .engine.numerics import numerics
    from .engine.single import train_loop

    run = RunDir(cfg.paths.runs, run_id(cfg))
    with numerics(cfg) as (device, autocast), dist.group(device) as (ranks, device):
        if ranks.world > 1 and cfg.train.eval_mode == "running_stats":
            raise ConfigError("train.eval_mode=running_stats: BatchNorm's running averages follow one process's "
                              "sequence of groups; allowed with one process (not torchrun or a multi-task job)")
        # -- rank 0 decides, every rank follows: live elsewhere, nothing to do, or go --
        skipped = ranks.share(lambda: _precheck(run, cfg))
        if skipped:
            return skipped
        data = load_dataset(cfg.data, device)  # missing or damaged data: before any directory
        check_user_code(cfg, data)  # what a model, data or loss of your own returns: before it too
        with contextlib.ExitStack() as held:
            owner = Lease(run.path, cfg.lease.timeout_s, cfg.lease.heartbeat_s,
                          cfg.lease.get("host")) if ranks.main else None
            hosts = ranks.hosts()  # every rank's node, for provenance.json
            skipped = ranks.share(lambda: _begin(run, cfg, owner, held, launched_by, hosts))
            if skipped:
                return skipped
            try:
                return train_loop(cfg, run, data, device, autocast, owner, ranks)
            except LeaseLost:
                raise  # the run is someone else's now: write nothing (every write is fenced too)
            except DiskFull:
                if ranks.main:
                    _mark_pending(run)
                raise
            except Exception as e:
                if ranks.main:
                    run.write_status(state="failed", error=f"{type(e).__name__}: {e}")
                raise
            except BaseException:  # preemption, Ctrl-C, kill: resumable from the last checkpoint
                if ranks.main:
                    _mark_pending(run)
                raise


def _precheck(run: RunDir, cfg) -> str | None:
    """Before loading any data: LeaseHeld if the run is live elsewhere; its state if there is
    nothing to do (completed, or diverged/failed without retry); None to go on."""
    live = holder(run.path, cfg.lease.get("host"), cfg.lease.timeout_s)
    if live:
        raise LeaseHeld(run.path, live)
    health = check(run)
    decision = decide(health, cfg.retry)
    if decision.launch:
        return None
    log.info("run %s: skipped (%s)", run.id, decision.reason, extra={"run_id": run.id})
    return health.state or "damaged"


def _begin(run: RunDir, cfg, owner: Lease, held: contextlib.ExitStack, launched_by=None, hosts=None) -> str | None:
    """Take the run's lease (held until `held` closes), decide again as its owner (another
    process may have ended the run meanwhile) and prepare the directory; the state to return
    when there is nothing to do, else None."""
    run.usable()  # a folder where a file of the run must be: this run alone is refused, in one line
    held.enter_context(run_log(run))
    held.enter_context(owner)
    run.owner = owner  # from here on every write to the run checks that this process still owns it
    health = check(run)
    st = health.status
    decision = decide(health, cfg.retry)
    tag = {"run_id": run.id}  # in a pack, the line goes to this run's train.log only
    if not decision.launch:
        log.info("run %s: skipped (%s)", run.id, decision.reason, extra=tag)
        return health.state or "damaged"
    if health.problems:
        log.warning("run %s: %s", run.id, decision.reason, extra=tag)
    stale = run.remove_stale_temps()
    if stale:
        log.info("run %s: removed %d temporary files of interrupted writes", run.id, len(stale), extra=tag)
    if decision.action == "restart":
        run.remove_checkpoints()
    run.write_config(cfg)
    run.record_provenance(st.get("attempts", 0) + 1, *provenance.collect(launched_by=launched_by, hosts=hosts))
    run.write_status(state="running", attempts=st.get("attempts", 0) + 1, slurm_job=slurm_job_id(),
                     started_at=time.time(), error=None,
                     **(dict(step=0, holes=None, final_loss=None) if decision.action == "restart" else {}))
    return None


def train_pack(cfgs: list[DictConfig], launched_by: list[str] | None = None, outcomes: dict | None = None) -> dict:
    """Train the runs of `cfgs` as one pack (pipeline/config/pack.py says which may; one line
    and ConfigError otherwise): each is checked, leased, resumed and written as its own run;
    `outcomes[i]` = (state, one-line error or None) of each run as it ends, also when an
    exception ends the pack (then the runs still going are marked failed, or pending)."""
    from .config.pack import problem

    faults.arm()
    outcomes = {} if outcomes is None else outcomes
    for c in cfgs:
        validate(with_added_keys(c))
    why = problem(cfgs)
    if why:
        raise ConfigError(f"PACK: {why}")
    owners.configure(cfgs[0].get("store"))
    check_dir_writable("paths.runs", cfgs[0].paths.runs)
    from .engine.data import load_dataset  # torch: only once the configs are known to be good
    from .engine.numerics import numerics
    from .engine.packed import pack_loop

    runs = [RunDir(c.paths.runs, run_id(c)) for c in cfgs]
    with numerics(cfgs[0]) as (device, autocast):
        go = [i for i in range(len(cfgs)) if not _skip(i, runs[i], cfgs[i], outcomes, _precheck)]
        if not go:
            return outcomes
        data = load_dataset(cfgs[0].data, device)  # missing or damaged data: before any directory
        check_user_code(cfgs[0], data)
        with contextlib.ExitStack() as held:
            leases = {}
            for i in go:
                leases[i] = Lease(runs[i].path, cfgs[i].lease.timeout_s, cfgs[i].lease.heartbeat_s,
                                  cfgs[i].lease.get("host"))
                _skip(i, runs[i], cfgs[i], outcomes, lambda r, c, i=i: _begin(r, c, leases[i], held, launched_by))
            go = [i for i in go if i not in outcomes]
            if not go:
                return outcomes
            mine: dict = {}
            try:
                pack_loop([cfgs[i] for i in go], [runs[i] for i in go], data, device, autocast,
                          [leases[i] for i in go], mine)
            except BaseException as e:
                _mark_unfinished(e, [(runs[i], mine.get(j)) for j, i in enumerate(go)])
                raise
            finally:
                outcomes.update({go[j]: v for j, v in mine.items()})
    return outcomes


def _skip(i: int, run: RunDir, cfg, outcomes: dict, decide_fn) -> bool:
    """`decide_fn(run, cfg)` (precheck or begin) for run i of a pack; its state into outcomes
    when there is nothing to do (another process holds it: `live`)."""
    try:
        skipped = decide_fn(run, cfg)
    except LeaseHeld as e:
        log.warning("%s", e)
        outcomes[i] = ("live", None)
        return True
    except (StoreError, OSError) as e:  # this run's folder or a file of it cannot be used: it alone is left out
        log.error("run %s: %s", run.id, one_line(e))
        outcomes[i] = ("damaged", one_line(e))
        return True
    if skipped:
        outcomes[i] = (skipped, None)
    return bool(skipped)


def _mark_unfinished(e: BaseException, runs) -> None:
    """An exception ended the pack: the runs it had not finished are failed (a crash), pending
    (a full disk, preemption, Ctrl-C, kill) or untouched (fenced: another process's)."""
    for run, ended in runs:
        if ended is not None or run.lost:
            continue
        if isinstance(e, Exception) and not isinstance(e, (DiskFull, LeaseLost)):
            with contextlib.suppress(Exception):
                run.write_status(state="failed", error=f"{type(e).__name__}: {e}")
        else:
            _mark_pending(run)


def _mark_pending(run: RunDir) -> None:
    """Resumable: the last checkpoint is where the next attempt starts (best effort on a full disk)."""
    with contextlib.suppress(OSError, DiskFull):
        run.write_status(state="pending")
