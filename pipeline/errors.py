"""Every expected failure of a run, and the exit status that `python -m pipeline.train` (and
every rank of a distributed run) gives it: the one table.

| status | name           | failure                                                         |
| ------ | -------------- | --------------------------------------------------------------- |
| 0      |                | done, or nothing to do (the run was skipped)                    |
| 1      | EXIT_CRASH     | an unexpected error; `DiskFull` (the run stays pending)         |
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


class DiskFull(Exception):
    """A write failed for lack of space (ENOSPC, EDQUOT); `path` is the file being written."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(f"no space left on the device writing {self.path}")


def describe_holder(rec: dict) -> str:
    """Who holds a run's lease, from its record (pipeline/runs/lease.py): host, pid, Slurm job, heartbeat."""
    if not rec:
        return "held by another process (its lease record is not written yet)"
    who = f"held by {rec.get('host', '?')}:{rec.get('pid', '?')}"
    if rec.get("slurm_job"):
        who += f" (Slurm job {rec['slurm_job']})"
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
                                LeaseLost: EXIT_FENCED, DiskFull: EXIT_CRASH}


def exit_status(e: BaseException) -> int:
    """The exit status of a failure (EXIT_CRASH for anything unexpected)."""
    return next((code for cls, code in EXIT_STATUS.items() if isinstance(e, cls)), EXIT_CRASH)
