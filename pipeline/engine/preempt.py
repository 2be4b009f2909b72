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


class Guard:
    """The preemption state of one training loop: the signals seen (signum, frame) and the
    handler the guard replaced (submitit's, under submitit)."""

    def __init__(self):
        self.received: list = []
        self.previous = None

    def _record(self, signum, frame):
        log.warning("received %s: checkpointing after this step", signal.Signals(signum).name)
        self.received.append((signum, frame))

    def signalled(self) -> bool:
        return bool(self.received)

    def hand_over(self, step: int, main: bool = True) -> None:
        """Call after the checkpoint of `step` is on disk. Never returns. Ranks other than 0 of
        a distributed run only exit: rank 0 requeues the job."""
        if not main:
            raise Requeue(f"preempted at step {step}")
        if callable(self.previous) and self.received:
            self.previous(*self.received[-1])  # submitit: requeue, then sys.exit
        job = os.environ.get("SLURM_JOB_ID")
        if job:
            subprocess.run(["scontrol", "requeue", job], check=False)
        raise Requeue(f"preempted at step {step}: checkpoint written, job requeued")


@contextlib.contextmanager
def guard():
    """Inside the block SIGUSR2 only sets a flag (`Guard.signalled()` tells the loop to stop);
    the previous handler is restored on exit. Off the main thread signals are left alone."""
    g = Guard()
    try:
        g.previous = signal.signal(SIGNAL, g._record)
    except ValueError:  # not the main thread: leave signals alone
        yield g
        return
    try:
        yield g
    finally:
        signal.signal(SIGNAL, g.previous)
