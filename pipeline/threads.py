"""The thread budget, in one place: a training process uses its share of the cores, never all of
them beside other runs. torch's default is every core per process; two such processes on 2 cores,
or one beside any other work, run 10-20x slower (docs/sweeps.md, "Threads").

The share of a run, first that applies:
  train.threads           explicit (non-semantic: it changes the speed, and on a CPU the summation
                          order, not what the run is)
  ADAM_THREADS            set by the local launcher for its children: cores / (JOBS x tasks)
  SLURM_CPUS_PER_TASK     a Slurm job step: the CPUs Slurm gave each task
  LOCAL_WORLD_SIZE        torchrun: the node's cores shared by its ranks
  OMP_NUM_THREADS         the user's (or the test suite's) setting
  the cores this process may run on (its CPU affinity)
"""

from __future__ import annotations

import os

ENV = "ADAM_THREADS"


def cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, cgroups, Slurm's binding)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share(concurrent: int, total: int | None = None) -> int:
    """Each of `concurrent` processes' threads: cores // concurrent, at least 1."""
    return max(1, (total or cores()) // max(1, concurrent))


def _positive(value) -> int | None:
    """The leading positive integer of an environment value ('4', '4,2' for OpenMP's nested
    form), None when there is none."""
    head = str(value or "").split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else None


def budget(explicit: int | None = None, env=None) -> tuple[int, str]:
    """(threads, why) for this process, by the rule of the module doc."""
    env = os.environ if env is None else env
    if explicit:
        return int(explicit), "train.threads"
    n = _positive(env.get(ENV))
    if n:
        return n, f"the launcher's share ({ENV})"
    n = _positive(env.get("SLURM_CPUS_PER_TASK"))
    if n:
        return n, "SLURM_CPUS_PER_TASK"
    ranks = _positive(env.get("LOCAL_WORLD_SIZE"))
    if ranks and ranks > 1:
        return share(ranks), f"{cores()} cores shared by {ranks} torchrun ranks"
    n = _positive(env.get("OMP_NUM_THREADS"))
    if n:
        return n, "OMP_NUM_THREADS"
    return cores(), f"all {cores()} cores"


def child_env(threads: int) -> dict[str, str]:
    """The environment that gives a child process `threads` threads from its first import of torch."""
    n = str(threads)
    return {ENV: n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
