"""Failpoints for the crash tests: the process dies (or stops, or sees a full disk) at an exact
point of its writes, so a test can kill a run *during* a checkpoint write without racing it.

    ADAM_FAULTS="ckpt.prev@20,row@13:stop"   # name@step[:action], comma-separated

Actions: `kill` (SIGKILL itself, the default: nothing is flushed, no handler runs), `stop`
(SIGSTOP itself: a test then kills it, or signals it and sends SIGCONT), `enospc` (raise
OSError(ENOSPC) as a full disk would). Unset in normal runs, where `point()` is one test of an
empty dict. Armed explicitly by `arm()`, which the entry points call.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = {
    "step": "start of step n, before its gradient",
    "row": "metrics row of step n written and flushed",
    "row.torn": "half of the metrics row of step n written, then the action",
    "ckpt.tmp": "checkpoint of step n fully in its temporary file, not yet renamed",
    "ckpt.prev": "old checkpoint renamed to checkpoint.prev.pt, new one not yet in place",
    "ckpt.done": "checkpoint of step n in place",
    "sbatch.done": "a sweep's jobs submitted to Slurm, their job ids not yet in the runs' job.json",
}


def _parse(spec: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, action = item.partition(":")
        name, _, step = where.partition("@")
        if name not in POINTS or action not in ("", "kill", "stop", "enospc"):
            raise ValueError(f"ADAM_FAULTS={spec!r}: unknown point or action in {item!r}; "
                             f"points: {', '.join(POINTS)}; actions: kill, stop, enospc")
        out[(name, int(step) if step else None)] = action or "kill"
    return out


_armed: dict = {}  # set by arm() only


def arm(spec: str | None = None) -> None:
    """Arm the failpoints of `spec` (default: $ADAM_FAULTS; empty: none). The entry points call
    it (pipeline.train.train, the sweep CLI): a failpoint is armed where a process starts its
    work, never as a side effect of an import."""
    global _armed
    _armed = _parse(os.environ.get("ADAM_FAULTS", "") if spec is None else spec)


def armed(name: str, step: int | None = None) -> str | None:
    """The action armed at this point, if any."""
    return _armed and (_armed.get((name, step)) or _armed.get((name, None)))


def point(name: str, step: int | None = None) -> None:
    action = armed(name, step)
    if not action:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
