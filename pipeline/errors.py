"""Every expected failure of a run, and the exit status that `python -m pipeline.train` (and
every rank of a distributed run) gives it: the one table.

| status | name           | failure                                                         |
| ------ | -------------- | --------------------------------------------------------------- |
| 0      |                | done, or nothing to do (the run was skipped)                    |
| 1      | EXIT_CRASH     | an unexpected error; `DiskFull` (the run stays pending);        |
|        |                | `StoreError` (a file of the store that cannot be used, named)   |
| 2      | EXIT_BAD_INPUT | `ConfigError`, `DataError`: one line, nothing created           |
| 3      | EXIT_LIVE      | `LeaseHeld`: the run is live in another process, nothing changed |
| 4      | EXIT_FENCED    | `LeaseLost`: this process was stopped past the lease timeout and |
|        |                | another one took the run over; it wrote nothing more             |

The classes live here, with nothing heavy imported, so that composing a config or reading a
Slurm profile does not load the engine; the modules that raise them import them from here.
"""

from __future__ import annotations

from pathlib import Path

EXIT_CRASH, EXIT_BAD_INPUT, EXIT_LIVE, EXIT_FENCED = 1, 2, 3, 4


class ConfigError(ValueError):
    """Bad input in a config or an argument. One line: `key=value: why`."""


class DataError(RuntimeError):
    """A dataset that cannot be found or read: one line `key=value: why`, saying what to do."""


class StoreError(Exception):
    """A file or folder of the run store that cannot be used as it is (a link where a run folder
    must be, a directory where a file must be, no permission): one line naming it and what is
    allowed; exit status 1, nothing else touched."""


class DiskFull(Exception):
    """A write failed for lack of space (ENOSPC, EDQUOT); `path` is the file being written."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(f"no space left on the device writing {self.path}")


def shown(value, limit: int = 60) -> str:
    """A value read from a file, safe to print or log: control characters escaped (a newline in a
    planted field cannot forge a line), cut to `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_holder(rec: dict) -> str:
    """Who holds a run's lease, from its record (pipeline/runs/lease.py): host, pid, Slurm job, heartbeat."""
    if not rec:
        return "held by another process (its lease record is not written yet)"
    who = f"held by {shown(rec.get('host', '?'))}:{shown(rec.get('pid', '?'))}"
    if rec.get("slurm_job"):
        who += f" (Slurm job {shown(rec['slurm_job'])})"
    if "age_s" in rec:
        who += f", heartbeat {rec['age_s']:.0f} s ago"
    return who


class LeaseHeld(Exception):
    """The run is live: another process holds its lease."""

    def __init__(self, run_path, record: dict | None):
        self.record = record or {}
        super().__init__(f"run {Path(run_path).name} is live: {describe_holder(self.record)}; nothing was changed")


class LeaseLost(Exception):
    """Another process took the lease over (this one was stopped for longer than the timeout):
    this process must stop writing at once."""


EXIT_STATUS: dict[type, int] = {ConfigError: EXIT_BAD_INPUT, DataError: EXIT_BAD_INPUT, LeaseHeld: EXIT_LIVE,
                                LeaseLost: EXIT_FENCED, DiskFull: EXIT_CRASH, StoreError: EXIT_CRASH}


def exit_status(e: BaseException) -> int:
    """The exit status of a failure (EXIT_CRASH for anything unexpected)."""
    return next((code for cls, code in EXIT_STATUS.items() if isinstance(e, cls)), EXIT_CRASH)


def one_line(e: BaseException) -> str:
    """An expected failure as one line: an OSError names its file and the system's reason."""
    if isinstance(e, OSError) and not isinstance(e, (DiskFull,)) and e.filename is not None:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        return f"{where}: {e.strerror or e}"
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if isinstance(e, (ConfigError, DataError, StoreError, DiskFull, LeaseHeld, LeaseLost, OSError)) \
        else f"{type(e).__name__}: {text}"


def command(main) -> None:
    """Run a command's `main()` and exit with its status; an expected failure -- bad input, a
    damaged or unusable file of the store, a full disk, any OSError -- is one line `error: ...`
    on stderr and exit 2 (bad input) or 1, never a traceback. Anything else is a bug and keeps
    its traceback."""
    import sys

    try:
        code = main()
    except BrokenPipeError:  # `make status | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except (ConfigError, DataError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except (StoreError, DiskFull, LeaseHeld, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = exit_status(e)
    sys.exit(code if isinstance(code, int) else 0)
