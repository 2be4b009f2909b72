"""End-to-end cost of a run: `python -m pipeline.train` (metrics row every step, test evaluation
every `--eval-every` steps and at threshold crossings, checkpoints, wandb offline) against the
bare loop doing the same number of steps in this process, alternating.

Prints the run's in-loop time (the `time_s` of its last row: everything from its first step
to its last) over the bare loop's time (target <= 1.05 at the presets' cadence: evaluation
every 50 steps, checkpoint every 100), and the process's start-up (interpreter, imports,
Hydra, data) separately.

    python -m bench.run_bench [--model cnn] [--n 1000] [--steps 100] [--reps 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from analysis.runs import read_metrics
from bench.fresh import fresh_run
from bench.step_bench import bare_step_fn, compose, setup, timed

ROOT = Path(__file__).resolve().parents[1]


def overrides(a):
    return [f"model={a.model}", "model.norm=bn", "data=synthetic", f"data.n_train={a.n}",
            f"data.n_test={max(a.n // 5, 1)}", f"train.micro_batch={a.micro_batch}", f"train.max_steps={a.steps}",
            f"train.eval_every={a.eval_every}", f"train.checkpoint_every={a.checkpoint_every}",
            "train.progress=none", f"device={'cuda' if torch.cuda.is_available() else 'cpu'}",
            f"seed={a.seed}",
            *(["logger=wandb", "logger.mode=offline"] if a.logger == "wandb" else ["logger=none"])]


def run_once(a) -> tuple[float, float]:
    """(seconds in the loop, seconds of the whole process) of one fresh run."""
    with fresh_run(ROOT, overrides(a), WANDB_MODE="offline", WANDB_SILENT="true") as (run, _, wall):
        return float(read_metrics(run / "metrics.csv")["time_s"].iloc[-1]), wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--micro-batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logger", choices=("wandb", "none"), default="wandb", help="wandb: offline mode")
    a = ap.parse_args(argv)
    cfg = compose(a.model, a.n, None, micro_batch=a.micro_batch)
    with setup(cfg) as (device, autocast, data, model, fwd, opt):
        bare_step = bare_step_fn(data, fwd, [p for p in model.parameters() if p.requires_grad], a.micro_batch)

        def bare_run():  # rows 0..steps: steps + 1 gradients (and one update more than the run)
            for _ in range(a.steps + 1):
                bare_step()

        loop, wall, bare = [], [], []
        for _ in range(a.reps):
            t_loop, t_wall = run_once(a)
            loop.append(t_loop)
            wall.append(t_wall)
            bare.append(timed(bare_run, device))
    ratios = [x / y for x, y in zip(loop, bare)]
    print(f"end to end: {a.model} N={a.n} mb={a.micro_batch} {a.steps} steps, eval every {a.eval_every}, "
          f"checkpoint every {a.checkpoint_every}, logger {a.logger}: run loop {statistics.median(loop):.2f} s, "
          f"bare loop {statistics.median(bare):.2f} s, overhead ratio {statistics.median(ratios):.3f} "
          f"(target <= 1.05); process start-up and finish {statistics.median(wall) - statistics.median(loop):.1f} s",
          flush=True)


if __name__ == "__main__":
    main()
