"""Start-up of a run: from launching `python -m pipeline.train` to its first step (interpreter,
imports, Hydra, validation, the lease, provenance, data, model, optimizer), and the whole
process, for one point of the `toy` preset (2 parameters, 4,000 steps) and of `digits` (the MLP,
100 steps here). With `--against REV` the same for a checkout of that git revision, alternating.

    python -m bench.startup_bench [--reps 3] [--against HEAD~1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.fresh import fresh_run

ROOT = Path(__file__).resolve().parents[1]
POINTS = {
    "toy": ["sweep=toy", "optim.h=1e-2", "optim.beta=0.9", "optim.rho=0.99"],
    "digits": ["sweep=digits", "optim.beta=0.9", "optim.rho=0.999", "train.max_steps=100"],
}


def once(root: Path, point: str) -> tuple[float, float]:
    """(seconds from launch to the first step, seconds of the whole process) of one fresh run."""
    with fresh_run(root, [*POINTS[point], "train.progress=none"], WANDB_MODE="disabled", OMP_NUM_THREADS="1") as (
            run, start, wall):
        return json.loads((run / "status.json").read_text())["first_step_at"] - start, wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--against", default=None, help="a git revision to measure beside this checkout")
    a = ap.parse_args(argv)
    roots = {"this checkout": ROOT}
    with tempfile.TemporaryDirectory() as other:
        if a.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", other, a.against], check=True,
                           capture_output=True)
            roots[a.against] = Path(other)
        try:
            got = {(name, p): [] for name in roots for p in POINTS}
            for _ in range(a.reps):
                for p in POINTS:
                    for name, root in roots.items():
                        got[name, p].append(once(root, p))
        finally:
            if a.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", other], capture_output=True)
    print(f"start-up, one thread per process, median of {a.reps}: launch -> first step / whole process (s)")
    for p in POINTS:
        for name in roots:
            first = statistics.median(t[0] for t in got[name, p])
            whole = statistics.median(t[1] for t in got[name, p])
            print(f"  {p:7s} {name:15s} {first:6.2f} / {whole:6.2f}")
        if a.against:
            ratio = statistics.median(t[0] for t in got[a.against, p]) / statistics.median(
                t[0] for t in got["this checkout", p])
            print(f"  {p:7s} start-up {a.against} / this checkout: {ratio:.2f}x")


if __name__ == "__main__":
    main()
