"""What a record of the sharpness costs (`train.sharpness_every`, docs/edge_of_stability.md) in
real runs of the pipeline, in units of a training step, at a relative residual <= 1e-4.

Each case is trained once, one thread, in a fresh store, with records every k steps and a test
pass more often (k is a multiple of eval_every). From the rows' `time_s` (a row's duration: its
step's gradient, metrics, record, test pass), a record costs the median duration of a warm
record's step (step > 0; the first record, cold, is printed apart) less the median duration of
a test step without a record (a record step is also a test step), divided by the median duration
of its plain steps: all three from the same run, so that the machine's drift between runs (up to
30 % here) does not enter. Also printed: the products per record (both eigenvalues).

    python -m bench.sharpness_bench [--cases digits cnn bn_cnn] [--against /path/to/other/checkout]

`--against` trains each case in the other checkout too (its own `pipeline`, this interpreter),
alternating, and prints the ratio of the two costs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd

from analysis.runs import read_metrics
from bench.fresh import fresh_run

CASES = {  # name -> (overrides, records every k steps)
    "digits": (["sweep=digits", "optim.beta=0.9", "optim.rho=0.999"], 50),
    "cnn": (["model=cnn", "model.width=8", "data.n_train=256", "data.image_size=16", "train.micro_batch=256",
             "train.max_steps=300", "train.eval_every=5"], 25),
    "bn_cnn": (["model=cnn", "model.norm=bn", "data.n_train=2000", "train.micro_batch=500", "train.max_steps=40",
                "train.eval_every=5"], 10),
}


def trained(tree: Path, over: list[str], every: int) -> pd.DataFrame:
    """The metrics.csv of one run of `tree`'s pipeline (one thread, a fresh store)."""
    args = over + ["train.threads=1", "logger=none", f"train.sharpness_every={every}"]
    with fresh_run(tree, args, OMP_NUM_THREADS="1", WANDB_MODE="disabled") as (run, _, _):
        return read_metrics(run / "metrics.csv").set_index("step")


def record_cost(tree: Path, over: list[str], every: int) -> dict:
    on = trained(tree, over, every)
    took, recorded, is_test = on["time_s"].diff(), on["sharpness_iters"].notna(), on["test_loss"].notna()
    recs = on.index[recorded]
    plain = statistics.median(took[~is_test].dropna())
    tested = statistics.median(took[is_test & ~recorded].dropna())  # a record step is also a test step
    warm = statistics.median(took[s] for s in recs if s > 0)
    used = on.loc[recs, "sharpness_iters"] + on.loc[recs, "pre_sharpness_iters"]
    return dict(steps=(warm - tested) / plain, products=statistics.median(used.iloc[1:]), cold_products=used.iloc[0],
                records=len(recs), plain_ms=plain * 1e3)


def fmt(name: str, r: dict) -> str:
    return (f"{name:7s} a record = {r['steps']:5.1f} steps ({r['products']:4.1f} products; median of "
            f"{r['records'] - 1} warm records; the cold one {r['cold_products']:.0f} products; a step "
            f"{r['plain_ms']:.1f} ms)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--against", type=Path, default=None, help="another checkout, timed alternately")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    print("sharpness record, in training steps (one thread, relative residual <= 1e-4):")
    for name in args.cases:
        over, every = CASES[name]
        mine = record_cost(here, over, every)
        print(fmt(name, mine), flush=True)
        if args.against:
            other = record_cost(args.against.resolve(), over, every)
            print(fmt("against", other) + f"  this/against {mine['steps'] / other['steps']:.2f}", flush=True)


if __name__ == "__main__":
    main()
