"""What a job is, and the command line of one run: `python -m pipeline.train model=... optim.h=...`.

`TrainJob` (one run) and `PackJob` (a pack of runs) are what a sweep submits: submitit pickles
them by this module's path, and calls them in the job's process, where they run the attempt of
pipeline/attempt.py (`train`, `train_pack`: checked, leased, decided, trained by the loop, a
completed run skipped, a checkpointed one resumed) and say in a JSON outcome file how each run
ended. Rows are written for theta_0 .. theta_{max_steps}.

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

from .attempt import train, train_pack
from .config.compose import CONF_DIR, Composer
from .config.validate import validate, validate_grid
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
from .runs import redact
from .runs.files import atomic_write_text
from .runs.ids import run_id

log = logging.getLogger("pipeline.train")


















def interruptible() -> None:
    """A sweep stops its local runs with SIGINT (dispatch/local.py: stop_local), and a job's
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
