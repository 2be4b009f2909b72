"""The thread budget (pipeline/threads.py), measured: JOBS runs of the `digits` preset's MLP (26 k
parameters, 1,437 examples, one forward/backward per step) at a time beside a CPU-bound process
(what a laptop or a shared login node has), each run with torch's default of every core (as
before the budget) and with its share, cores // JOBS; the two alternate, `--reps` times.

Prints the median time per step of each and the ratio default/budget (the budget's speed-up).

    python -m bench.threads_bench [--jobs 2] [--steps 150] [--reps 2] [--no-busy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"  # one core's worth of other work


def worker(threads: int, steps: int) -> None:
    """One run's steps (the loop's own step: full_batch_step + Adam, one host sync), timed after a
    warm-up; prints the median seconds per step as JSON."""
    import torch  # noqa: F401 -- after the environment is set

    from bench.step_bench import pipeline_step_fn, setup
    from pipeline.config.compose import Composer

    with Composer() as c:
        cfg = c.compose(["sweep=digits", "optim.beta=0.9", "optim.rho=0.999", f"train.threads={threads}"])
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        step, _, _, _ = pipeline_step_fn(cfg, data, model, fwd, opt, autocast)
        times = []
        for i in range(steps + 10):
            t = time.perf_counter()
            step()
            if i >= 10:
                times.append(time.perf_counter() - t)
        print(json.dumps(dict(threads=torch.get_num_threads(), step_s=statistics.median(times))))


def side_by_side(jobs: int, threads: int, steps: int) -> list[dict]:
    """`jobs` workers at once, each with `threads` threads from its first import of torch."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("ADAM_THREADS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.threads_bench", "--worker", str(threads), "--steps",
                               str(steps)], env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    out = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (make sweep's JOBS)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-busy", action="store_true", help="no CPU-bound process beside the runs")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker is not None:
        return worker(a.worker, a.steps)
    from pipeline import threads

    cores = threads.cores()
    share = threads.share(a.jobs)
    busy = None if a.no_busy else subprocess.Popen([sys.executable, "-c", SPIN])
    got = {cores: [], share: []}
    try:
        for _ in range(a.reps):
            for n in dict.fromkeys([cores, share]):  # alternate: the same load for both
                got[n] += [r["step_s"] for r in side_by_side(a.jobs, n, a.steps)]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    default, budget = statistics.median(got[cores]), statistics.median(got[share])
    beside = "beside a CPU-bound process" if busy is not None else "alone"
    print(f"digits MLP, {a.jobs} runs at a time {beside}, {cores} cores: ms per step "
          f"(median of {len(got[share])} runs)")
    print(f"  torch's default ({cores} threads per run): {default * 1e3:8.2f}")
    print(f"  the budget ({share} thread{'s' * (share > 1)} per run):   {budget * 1e3:8.2f}")
    print(f"  default / budget: {default / budget:.2f}x" if cores != share else
          "  (the budget is every core here: nothing to compare)")


if __name__ == "__main__":
    main()
