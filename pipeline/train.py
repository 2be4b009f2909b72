"""One full-batch training run: `python -m pipeline.train model=... optim.h=... optim.beta=...`.

Each iteration n: accumulate grad E(theta_n) over ALL training examples -> metrics at theta_n
(one host sync) -> optional test evaluation at theta_n -> optimizer update -> theta_{n+1}.
Rows are written for theta_0 .. theta_{max_steps}. The run directory is keyed by a hash of the
semantic config and written by one process at a time (its lease); a completed run is skipped,
a checkpointed one resumed.

Exit status (the one table: pipeline/errors.py): 0 done or skipped; 1 a crash, or a full disk
(the run stays pending); 2 bad input (one line `error: key=value: why`, nothing created); 3 the
run is live in another process (one line naming it, nothing changed); 4 fenced off: this
process was stopped for longer than the lease timeout and another process took the run over
(one line; this process wrote nothing more to the run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import faults
from .config.compose import CONF_DIR, Composer
from .config.user_outputs import check_user_code
from .config.validate import check_dir_writable, validate, validate_grid
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_FENCED,
    EXIT_LIVE,
    ConfigError,
    DataError,
    DiskFull,
    LeaseHeld,
    LeaseLost,
    StoreError,
    one_line,
)
from .runs import owners, provenance, redact
from .runs.files import atomic_write_text, open_append
from .runs.ids import run_id, with_added_keys
from .runs.integrity import check, decide
from .runs.lease import Lease, holder, slurm_job_id
from .runs.rundir import RunDir

log = logging.getLogger("pipeline.train")


class NoFollowFileHandler(logging.FileHandler):
    """A FileHandler that appends to its file but never through a link planted at its name."""

    def _open(self):
        return os.fdopen(open_append(self.baseFilename), "a", encoding=self.encoding or "utf-8", errors=self.errors)


@contextlib.contextmanager
def run_log(run: RunDir):
    """Log lines also into the run's own folder (every attempt appends to train.log; the file is
    opened at the first line, so a process that is refused writes nothing, and none once this
    process has lost the run's lease)."""
    handler = NoFollowFileHandler(run.log_file, delay=True)
    handler.addFilter(lambda record: not run.lost and getattr(record, "run_id", run.id) == run.id)  # a pack: its lines
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    top = logging.getLogger("pipeline")
    level = top.level
    top.setLevel(logging.INFO)
    top.addHandler(handler)
    try:
        yield
    finally:
        top.removeHandler(handler)
        top.setLevel(level)
        handler.close()

def _mark_pending(run: RunDir) -> None:
    """Resumable: the last checkpoint is where the next attempt starts (best effort on a full disk)."""
    with contextlib.suppress(OSError, DiskFull):
        run.write_status(state="pending")


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
    from .engine.loop import train_loop
    from .engine.numerics import numerics

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
    from .engine.pack_loop import pack_loop

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


def interruptible() -> None:
    """A sweep stops its local runs with SIGINT (dispatch/sweep.py: stop_local), and a job's
    process is in a session of its own, where no terminal's Ctrl-C reaches it: SIGINT is only ever
    that request. A sweep started in the background inherits SIGINT ignored (a shell does that for
    `cmd &`), and Python then raises no KeyboardInterrupt: the job restores Python's handler."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class TrainJob:
    """What a sweep submits: `train(cfg)` in the job's process. On Slurm's warning signal the
    loop writes a checkpoint first (engine/preempt.py); submitit then calls `checkpoint` (the
    same call again: submitit asks only that the callable has one) and requeues the job, which
    resumes from that checkpoint. Not a subclass of submitit's Checkpointable, so that a plain
    run does not import submitit.

    `outcome`: a JSON file (in the sweep's own folder) where the job says how its run ended,
    with the one-line reason of an expected failure, so that the sweep reads JSON, never
    submitit's result pickles. `launched_by`: the sweep's command line, for the run's provenance.
    `credentials`: {dotted key: environment variable} of the credentials masked in the pickled
    config (runs/redact.py `for_job`), taken back from the job's environment.

    Jobs pickled by older code lack attributes added since: every one is read with a default."""

    def __init__(self, outcome: str | None = None, launched_by: list[str] | None = None):
        self.outcome = outcome
        self.launched_by = launched_by

    def checkpoint(self, *args, **kwargs):
        """The job to requeue: this call again (what submitit.helpers.Checkpointable does)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def _say(self, result: str | None, error: str | None = None, path: str | None = None) -> None:
        """Write the outcome file `path` (default: this job's; jobs pickled before outcomes existed have none)."""
        path = path or getattr(self, "outcome", None)
        if path:
            with contextlib.suppress(OSError):
                atomic_write_text(Path(path), json.dumps(dict(result=result, error=error, written_at=time.time(),
                                                              pid=os.getpid())) + "\n")

    def __call__(self, cfg: DictConfig) -> str:
        interruptible()
        try:
            cfg = redact.restore(cfg, getattr(self, "credentials", None) or {})
            result = train(cfg, getattr(self, "launched_by", None))
        except LeaseHeld as e:  # another process (another sweep, a user) runs it: nothing to do here
            log.warning("%s", e)
            self._say("live", None)
            return "live"
        except LeaseLost as e:
            self._say("fenced", f"{e}; this process stopped without writing to it")
            fenced_exit(e)
        except StoreError as e:
            self._say("damaged", str(e))
            raise
        except (ConfigError, DataError) as e:
            self._say(None, str(e))
            raise
        except DiskFull as e:
            self._say("pending", f"{e}; the run resumes from its last checkpoint once there is room")
            raise
        except Exception as e:
            self._say("failed", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")
            raise
        self._say(result, None)
        return result


class PackJob(TrainJob):
    """What a sweep submits for a pack (`make sweep PACK=K`): `train_pack(cfgs)` in the job's
    process; `outcomes` holds each run's outcome file (in the order of `cfgs`), written as
    TrainJob writes one."""

    def __init__(self, outcomes: list[str], launched_by: list[str] | None = None):
        super().__init__(None, launched_by)
        self.outcomes = outcomes

    def _say_each(self, ended: dict, n: int, result: str | None, error: str | None) -> None:
        """Each run's outcome: how it ended (`ended`), else `result`/`error` (what ended the pack)."""
        for i in range(n):
            self._say(*ended.get(i, (result, error)), path=self.outcomes[i])

    def __call__(self, cfgs: list[DictConfig]) -> dict:
        interruptible()
        ended: dict = {}
        try:
            names = getattr(self, "credentials", None) or [{}] * len(cfgs)
            cfgs = [redact.restore(c, n) for c, n in zip(cfgs, names)]
            train_pack(cfgs, self.launched_by, ended)
        except (ConfigError, DataError) as e:
            self._say_each(ended, len(cfgs), None, str(e))
            raise
        except DiskFull as e:  # each run's line names its own file, or says whose write filled the disk
            for i, c in enumerate(cfgs):
                mine = Path(c.paths.runs) / run_id(c)
                why = str(e) if mine in e.path.parents else \
                    f"the pack stopped: no space left on the device writing {e.path} (another run of the pack)"
                self._say(*ended.get(i, ("pending", f"{why}; the run resumes from its last checkpoint once there "
                                                    "is room")), path=self.outcomes[i])
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self._say_each(ended, len(cfgs), "failed", f"{type(e).__name__}: {first}")
            raise
        self._say_each(ended, len(cfgs), None, None)
        return ended


def _exit(code: int, message) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def train_or_exit(cfg: DictConfig) -> str:
    """`train`, with its expected failures as one line and an exit status (see the module doc)."""
    try:
        return train(cfg)
    except (ConfigError, DataError) as e:
        _exit(EXIT_BAD_INPUT, e)
    except LeaseHeld as e:
        _exit(EXIT_LIVE, e)
    except DiskFull as e:
        _exit(EXIT_CRASH, f"{e}; the run is pending and resumes from its last checkpoint once "
                          "there is room (rerun the same command)")
    except LeaseLost as e:
        fenced_exit(e)
    except (StoreError, OSError) as e:  # a file of the store that cannot be used: one line naming it
        _exit(EXIT_CRASH, one_line(e))


def fenced_exit(e: LeaseLost) -> None:
    """One line and exit status 4, at once: no exit handler (wandb's among them) may write to a
    run that another process owns now."""
    print(f"error: {e}; this process stopped without writing to it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_FENCED)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> str | None:
    return train_or_exit(cfg)


def cli(argv=None) -> None:
    """`python -m pipeline.train [-m] overrides...`: every override (with -m, every grid point)
    is composed and validated here first, so a bad one gives one line and exit status 2, never
    a Hydra traceback; then Hydra runs it as usual (plain Hydra multirun with -m)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = [a for a in argv if a.startswith("-")]
    overrides = [a for a in argv if not a.startswith("-")]
    if all(f in ("-m", "--multirun") for f in flags):  # --cfg, --info, ...: Hydra's own business
        try:
            with Composer() as c:
                if flags:
                    validate_grid(c, overrides)  # the planner's check: every point, named when bad
                else:
                    validate(c.compose(overrides))
        except ConfigError as e:
            _exit(EXIT_BAD_INPUT, e)
    sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    # call the importable module's function, not __main__'s: pickles then refer to pipeline.train
    from pipeline.train import cli as _cli

    _cli()
