"""Preemption and time limits: on Slurm's warning signal (SIGUSR2, as submitit asks for with
`--signal=USR2@<grace>`) the run finishes its current step, writes a checkpoint, and then hands
the signal on: to submitit's handler when there is one (which requeues the job and exits), else
it requeues the Slurm job itself. The requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)
SIGNAL = signal.SIGUSR2


class Requeue(SystemExit):
    """Raised after the checkpoint is written; the process exits and the job is requeued."""


_received: list = []  # (signum, frame) of the signals seen inside guard()
_previous = None  # the handler guard() replaced: submitit's, under submitit


def _record(signum, frame):
    log.warning("received %s: checkpointing after this step", signal.Signals(signum).name)
    _received.append((signum, frame))


@contextlib.contextmanager
def guard():
    """Inside the block SIGUSR2 only sets a flag; `signalled()` tells the loop to stop."""
    _received.clear()
    try:
        previous = signal.signal(SIGNAL, _record)
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    global _previous
    _previous = previous
    try:
        yield lambda: bool(_received)
    finally:
        signal.signal(SIGNAL, previous)


def hand_over(step: int, main: bool = True) -> None:
    """Call after the checkpoint of `step` is on disk. Never returns. Ranks other than 0 of a
    distributed run only exit: rank 0 requeues the job."""
    if not main:
        raise Requeue(f"preempted at step {step}")
    if callable(_previous) and _received:
        _previous(*_received[-1])  # submitit: requeue, then sys.exit
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        subprocess.run(["scontrol", "requeue", job], check=False)
    raise Requeue(f"preempted at step {step}: checkpoint written, job requeued")
