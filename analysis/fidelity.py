"""Which precision can a paper trust? `python -m analysis.fidelity [CASE ...] [-- overrides]`.

For one configuration, trains (through the pipeline and its run store, so a second call reuses
the finished runs):

- the reference: `precision=fp64`;
- the rounding-level ensemble: K runs in fp32 whose theta_0 is moved by one ulp per coordinate,
  up or down with the signs of seed k (`train.perturb_theta0=k`, pipeline.engine.setup.perturb_one_ulp).
  A perturbation of theta_0 rather than of the summation order: it is defined for every model,
  device and number of ranks, its size is exactly the rounding of storing theta_0 in fp32, and
  it is in the run id (the micro-batch, which orders the sums, is not: two orders would be one
  run);
- each precision under test, unperturbed: fp32, bf16 (autocast) and, on a GPU, tf32 and
  torch_default (PyTorch's defaults, TF32 convolutions: what the authors' runs used). On a CPU
  those two are fp32 itself, so they are left out there.

Then, for each summary metric the paper uses (analysis.summary: the step, perturbed one-norm
and test accuracy at the first step below each loss threshold, the hill's height, trough and
peak, the max test accuracy, the regime), the precision's deviation from fp64 is set beside
the ensemble's spread, `max_k |E_k - fp64|`: how far trajectories that differ from the fp32
run only at the level of rounding land from the reference. A deviation of at most twice the
spread (TOLERANCE) is `within`: at that precision the metric is as trustworthy as fp32
arithmetic allows; else `outside`; either way with the ratio deviation / spread. An empty value
(a threshold never crossed) is a value too: within when the reference or a member is empty too.

Writes into `<out>/<case>/`: `fidelity.csv` and `fidelity.md` (the table), `deviation.csv` and
`deviation.png`/`.pdf` (per step: each run's deviation from fp64; the ensemble as a band); and
`<out>/fidelity.md`, the tables of every case of the call.

    python -m analysis.fidelity mlp-oscillation mlp-spike --ensemble 4   # default: every case, K = 8
    python -m analysis.fidelity --name mine --precisions fp32,bf16 -- model=cnn data=digits optim.beta=0.9
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .runs import read_run
from .summary import summarize_run, tkey

log = logging.getLogger("analysis.fidelity")

# -- the cases of docs/speed.md's "Which precision" table ------------------------------------------
# Regimes as in Ma et al. (the paper's Section 7): oscillation when rho is close to beta, spikes
# when rho is much larger than beta (the MLP spikes at steps 103-107; the BatchNorm CNN does not
# spike at these hyperparameters, nor at h up to 3e-2, within 400 steps). Every case passes the
# 0.01 threshold by step 183 and goes through its hill.
DIGITS_MLP = ["model=mlp", "data=digits", "train.micro_batch=1437"]
DIGITS_CNN_BN = ["model=cnn", "model.norm=bn", "model.width=8", "model.bn_group=479", "data=digits",
                 "train.micro_batch=1437"]
CASES: dict[str, tuple[str, list[str]]] = {
    "mlp-oscillation": ("digits MLP (26,122 parameters, tanh), oscillation regime (h = 1e-3, β = ρ = 0.9)",
                        DIGITS_MLP + ["optim.h=1e-3", "optim.beta=0.9", "optim.rho=0.9", "train.max_steps=400"]),
    "mlp-spike": ("digits MLP (26,122 parameters, tanh), spike regime (h = 3e-3, β = 0, ρ = 0.999)",
                  DIGITS_MLP + ["optim.h=3e-3", "optim.beta=0.0", "optim.rho=0.999", "train.max_steps=400"]),
    "cnn-bn-oscillation": ("digits CNN with ghost BatchNorm (3 groups of 479), oscillation regime "
                           "(h = 1e-3, β = ρ = 0.9)",
                           DIGITS_CNN_BN + ["optim.h=1e-3", "optim.beta=0.9", "optim.rho=0.9", "train.max_steps=400"]),
    "cnn-bn-spike": ("digits CNN with ghost BatchNorm (3 groups of 479), spike-regime hyperparameters "
                     "(h = 3e-3, β = 0, ρ = 0.999)",
                     DIGITS_CNN_BN + ["optim.h=3e-3", "optim.beta=0.0", "optim.rho=0.999", "train.max_steps=400"]),
}
COMMON = ["train.eval_every=10", "train.progress=none", "logger=none", "sweep.name=null"]
ENSEMBLE = 8
REFERENCE = "fp64"
BAND = "fp32 + 1 ulp"  # the ensemble's label in tables and figures
COLOURS = {"fp32": "#0072B2", "bf16": "#D55E00", "tf32": "#009E73", "torch_default": "#CC79A7"}  # Okabe-Ito
# K draws bound one more draw only with probability K / (K + 1): an unperturbed fp32 run, itself
# one more draw, lands just beyond the largest of 4 one time in 5. Within twice the spread it is
# alike; a precision whose error is of another order of magnitude is not.
TOLERANCE = 2.0
FLOOR = 1e-16  # deviations below this are drawn at it (the figure says so)


# -- the verdict (pure: tested on inputs with a known answer) ---------------------------------
def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


@dataclass(frozen=True)
class Verdict:
    deviation: float  # |value - reference| (NaN for a categorical metric or an empty value)
    spread: float     # max_k |member_k - reference| over the members with a value
    within: bool
    why: str          # what the table shows

    @property
    def ratio(self) -> float:
        if math.isnan(self.deviation) or math.isnan(self.spread):
            return math.nan
        if self.spread == 0:
            return 0.0 if self.deviation == 0 else math.inf
        return self.deviation / self.spread


def spread_of(reference, members) -> float:
    """max_k |member_k - reference| over the members with a value (0 when none has one); NaN for
    a category (the regime) or an empty reference."""
    if isinstance(reference, str) or _missing(reference):
        return math.nan
    return max((abs(float(m) - float(reference)) for m in members if not _missing(m) and not isinstance(m, str)),
               default=0.0)


def judge(reference, members, value) -> Verdict:
    """Is `value` (a precision's metric) within the spread of the ensemble `members` around the
    fp64 `reference`? Numbers: within iff |value - reference| <= TOLERANCE * spread, spread =
    max_k |member_k - reference| (with a spread of 0: iff equal), and the ratio is shown.
    Strings (the regime): within iff equal to the reference or to some member. Empty values
    (None/NaN) are their own outcome: within iff the reference or a member is empty too."""
    members = list(members)
    if isinstance(reference, str) or isinstance(value, str):
        ok = value == reference or value in members
        return Verdict(math.nan, math.nan, ok, "within" if ok else f"outside: {value} vs {reference}")
    spread = spread_of(reference, members)
    if _missing(value) or _missing(reference):
        ok = _missing(value) == _missing(reference) or any(_missing(m) == _missing(value) for m in members)
        return Verdict(math.nan, spread, ok, "within, empty as well" if ok else
                       ("outside, empty; the reference has a value" if _missing(value) else
                        "outside, a value; the reference is empty"))
    dev = abs(float(value) - float(reference))
    if spread == 0:
        return Verdict(dev, spread, dev == 0, "within, equal" if dev == 0 else "outside, spread 0")
    ok = dev <= TOLERANCE * spread * (1 + 1e-9)  # accuracies are multiples of 1/n: 2/n is twice 1/n
    return Verdict(dev, spread, ok, f"{'within' if ok else 'outside'}, {dev / spread:.2g}×")


# -- the metrics the paper uses -----------------------------------------------------------------
def paper_metrics(thresholds) -> list[str]:
    cols = []
    for t in sorted(thresholds, reverse=True):
        cols += [f"at_loss_{tkey(t)}_{c}" for c in ("step", "pert_norm", "test_acc")]
    return cols + ["hill_height", "hill_trough_step", "hill_peak_step", "max_test_acc", "regime"]


def _value(row: dict, metric: str):
    v = row.get(metric, math.nan)
    if v is None or (isinstance(v, str) and v == ""):
        return math.nan
    if isinstance(v, str):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def compare(reference: dict, members: list[dict], tested: dict[str, dict], metrics) -> pd.DataFrame:
    """One row per metric: the fp64 value, the ensemble's range and spread, and per precision
    its value, deviation, deviation / spread and verdict."""
    rows = []
    for metric in metrics:
        ref = _value(reference, metric)
        ens = [_value(m, metric) for m in members]
        nums = [e for e in ens if isinstance(e, float) and not math.isnan(e)]
        row = dict(metric=metric, fp64=ref,
                   ensemble_min=min(nums) if nums else math.nan, ensemble_max=max(nums) if nums else math.nan,
                   ensemble_values=" ".join(sorted(set(e for e in ens if isinstance(e, str)))) or None)
        row["spread"] = spread_of(ref, ens)
        for name, summary in tested.items():
            v = _value(summary, metric)
            verdict = judge(ref, ens, v)
            row.update({name: v, f"{name}_deviation": verdict.deviation, f"{name}_ratio": verdict.ratio,
                        f"{name}_verdict": verdict.why})
        rows.append(row)
    df = pd.DataFrame(rows)
    first = ["metric", "fp64", "ensemble_min", "ensemble_max", "ensemble_values", "spread"]
    return df[first + [c for c in df.columns if c not in first]]


# -- per-step deviations from the reference -------------------------------------------------------
DEVIATIONS = {  # column -> (how the deviation is measured, panel label, log axis)
    "loss": ("relative", "training loss\n|x − x_fp64| / x_fp64", True),
    "pert_norm": ("relative", "$\\|\\nabla E\\|_{1,\\varepsilon}$\n|x − x_fp64| / x_fp64", True),
    "test_acc": ("absolute", "test accuracy\n|x − x_fp64| (points)", False),
}


def deviation_frame(reference: pd.DataFrame, runs: dict[str, tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """Long format: variant, kind (ensemble | precision), step, metric, value (the deviation of
    the run's metric from the reference's at the same step; steps either lacks are left out)."""
    ref = reference.set_index("step")
    frames = []
    for label, (kind, m) in runs.items():
        if m.empty:
            continue
        joined = m.set_index("step").join(ref.add_suffix("_ref"), how="inner")
        for col, (how, _, _) in DEVIATIONS.items():
            if col not in joined or f"{col}_ref" not in joined:
                continue
            d = (joined[col] - joined[f"{col}_ref"]).abs()
            if how == "relative":
                d = d / joined[f"{col}_ref"].abs()
            d = d.dropna()
            frames.append(pd.DataFrame(dict(variant=label, kind=kind, step=d.index.astype(int), metric=col,
                                            value=d.to_numpy())))
    cols = ["variant", "kind", "step", "metric", "value"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def deviation_figure(dev: pd.DataFrame, title: str, marks: dict[str, float], out: Path) -> list[Path]:
    """A panel per metric on a shared step axis: in grey, the region up to the largest deviation
    of the ensemble's members (inside it a precision is as good as fp32 rounding), each precision
    as a coloured line; the relative deviations on a log axis (clipped at FLOOR), the test
    accuracy's in percentage points; dotted lines at the reference's crossings and hill peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in DEVIATIONS if m in set(dev["metric"])]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6.4, 1.8 * len(metrics) + 0.9), sharex=True,
                             squeeze=False, layout="constrained")
    for ax, metric in zip(axes[:, 0], metrics):
        _, label, logy = DEVIATIONS[metric]
        d = dev[dev["metric"] == metric]
        scale = 1.0 if logy else 100.0  # accuracy in percentage points
        floor = FLOOR if logy else 0.0
        values = (d["value"] * scale).clip(lower=floor)
        bottom = max(FLOOR, values[values > 0].min() / 3) if logy and (values > 0).any() else floor
        ens = d[d["kind"] == "ensemble"].pivot_table(index="step", columns="variant", values="value") * scale
        if not ens.empty:
            ax.fill_between(ens.index, bottom, ens.max(axis=1).clip(lower=bottom), color="0.82", lw=0,
                            step="mid", label=f"up to the largest deviation of {BAND} (K={ens.shape[1]})")
        for variant, g in d[d["kind"] == "precision"].groupby("variant", sort=False):
            g = g.sort_values("step")
            ax.plot(g["step"], (g["value"] * scale).clip(lower=bottom), color=COLOURS.get(variant, "k"), lw=1.0,
                    label=variant, marker="." if metric == "test_acc" else None, ms=3)
        for i, (name, step) in enumerate(marks.items()):
            if not math.isnan(step):
                ax.axvline(step, color="0.3", ls=":", lw=0.8)
                if ax is axes[0, 0]:  # named once, at staggered heights: neighbouring marks never collide
                    ax.annotate(name, (step, 1), xycoords=("data", "axes fraction"), xytext=(2, -2 - 9 * i),
                                textcoords="offset points", va="top", fontsize=7, color="0.3",
                                bbox=dict(fc="white", ec="none", pad=0.5, alpha=0.8))
        if logy:
            ax.set_yscale("log")
            ax.set_ylim(bottom=bottom)
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", color="0.92", lw=0.6)
    axes[-1, 0].set_xlabel("step", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(f"{title}: deviation from fp64", 95)), fontsize=9)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "deviation.png", out / "deviation.pdf"]
    for p in paths:
        fig.savefig(p, dpi=200)
    plt.close(fig)
    return paths


# -- the table as Markdown ------------------------------------------------------------------------
def _fmt(v, digits: int = 6) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if float(v).is_integer() and abs(v) < 1e6:
        return f"{int(v)}"
    if abs(v) >= 10 ** digits:
        return f"{v:.0f}"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 else f"{v:.2g}"


def markdown(table: pd.DataFrame, precisions: list[str], title: str, ensemble: int) -> str:
    """The table of one case: the fp64 value, the ensemble's spread, and each precision's
    deviation from fp64 with its verdict (the values themselves are in fidelity.csv)."""
    head = ["metric", "fp64", f"spread of {BAND} (K={ensemble})"]
    head += [f"{p}: deviation (verdict)" for p in precisions]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, r in table.iterrows():
        spread = r["ensemble_values"] if isinstance(r["ensemble_values"], str) else _fmt(r["spread"], 2)
        cells = [f"`{r['metric']}`", _fmt(r["fp64"]), spread]
        for p in precisions:
            dev = r[p] if isinstance(r[p], str) else _fmt(r[f"{p}_deviation"], 2)
            cells.append(f"{dev} ({r[f'{p}_verdict']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- running the variants -------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    kind: str  # reference | ensemble | precision
    overrides: list[str]


def variants(ensemble: int, precisions: list[str]) -> list[Variant]:
    out = [Variant(REFERENCE, "reference", [f"precision={REFERENCE}"])]
    out += [Variant(f"ulp seed {k}", "ensemble", ["precision=fp32", f"train.perturb_theta0={k}"])
            for k in range(1, ensemble + 1)]
    out += [Variant(p, "precision", [f"precision={p}"]) for p in precisions]
    return out


def run_case(name: str, title: str, overrides: list[str], out: Path, runs_root: Path, ensemble: int,
             precisions: list[str]) -> tuple[pd.DataFrame, str]:
    """Train (or reuse) every variant of one case, then write its table, deviations and figure.
    Every variant's config is composed and validated before the first one trains."""
    from pipeline.config.compose import Composer
    from pipeline.config.validate import validate
    from pipeline.runs.ids import run_id
    from pipeline.runs.rundir import FINISHED, RunDir
    from pipeline.train import train

    with Composer() as c:
        cfgs = []
        for v in variants(ensemble, precisions):
            cfg = c.compose([*COMMON, *overrides, *v.overrides, f"paths.runs={runs_root}"])
            validate(cfg)
            cfgs.append((v, cfg))
    summaries, histories = {}, {}
    thresholds = [float(t) for t in cfgs[0][1].train.loss_thresholds]
    for v, cfg in cfgs:
        started = time.perf_counter()
        state = train(cfg)
        run = read_run(RunDir(cfg.paths.runs, run_id(cfg)).path)
        trouble = run["damaged"] or run["holes"]
        if state not in FINISHED or trouble:
            raise RuntimeError(f"{name}: the {v.label} run {run['run_id']} ended {state}"
                               f"{f' ({trouble})' if trouble else ''}")
        summaries[v.label], histories[v.label] = summarize_run(run, thresholds=thresholds), (v.kind, run["metrics"])
        log.info("%s: %-12s run %s %s at step %s (%.1f s)", name, v.label, run["run_id"], state,
                 summaries[v.label]["steps"], time.perf_counter() - started)
    members = [summaries[v.label] for v, _ in cfgs if v.kind == "ensemble"]
    table = compare(summaries[REFERENCE], members, {p: summaries[p] for p in precisions},
                    paper_metrics(thresholds))
    case_out = out / name
    case_out.mkdir(parents=True, exist_ok=True)
    table.to_csv(case_out / "fidelity.csv", index=False, float_format="%.17g")
    reference = histories.pop(REFERENCE)[1]
    dev = deviation_frame(reference, histories)
    dev.to_csv(case_out / "deviation.csv", index=False, float_format="%.6g")
    ref = summaries[REFERENCE]
    marks = {f"loss < {tkey(t)}": _value(ref, f"at_loss_{tkey(t)}_step") for t in thresholds}
    marks["hill peak"] = _value(ref, "hill_peak_step")
    deviation_figure(dev, title, marks, case_out)
    text = markdown(table, precisions, f"{name}: {title}", ensemble)
    (case_out / "fidelity.md").write_text(text)
    return table, text


def default_precisions(device: str) -> list[str]:
    import torch

    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return ["fp32", "bf16"] + (["tf32", "torch_default"] if gpu else [])


PRECISIONS = ("fp32", "bf16", "tf32", "torch_default")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m analysis.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", help=f"cases to run ({', '.join(CASES)}); none with overrides after "
                                             "--: one case of those overrides (--name); none at all: every case")
    ap.add_argument("--name", default="custom", help="the name of the case given by overrides after --")
    ap.add_argument("--ensemble", type=int, default=ENSEMBLE, help="fp32 runs perturbed by one ulp (K)")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated, default fp32,bf16 (and tf32,torch_default on a GPU)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch's CPU threads: the order of the CPU's sums depends on it (default 1: the "
                         "same numbers on every machine)")
    ap.add_argument("--runs", default="fidelity/runs", help="the run store of the variants (reused when run again)")
    ap.add_argument("--out", default="fidelity", help="where the tables and figures go")
    return ap


def _bad_args(args, precisions: list[str]) -> str | None:
    """The one-line error for bad arguments, or None."""
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        return f"unknown case {unknown[0]}; allowed: {', '.join(CASES)} (or overrides after --)"
    for key in ("threads", "ensemble"):
        if getattr(args, key) < 1:
            return f"--{key}={getattr(args, key)}: allowed values are integers >= 1"
    if not precisions or any(p not in PRECISIONS for p in precisions):
        return f"--precisions={args.precisions}: allowed values are comma-separated {', '.join(PRECISIONS)}"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not log.handlers:  # this module's lines on stderr; the runs' own go to their train.log
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    precisions = args.precisions.split(",") if args.precisions else default_precisions(args.device)
    error = _bad_args(args, precisions)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    todo = [(c, *CASES[c]) for c in args.cases] or ([(args.name, "custom configuration", [])] if overrides
                                                    else [(c, *CASES[c]) for c in CASES])
    import torch

    from pipeline.errors import ConfigError

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the CPU's summation order, hence the chaotic runs' numbers
    out, texts = Path(args.out), []
    try:
        for name, title, case_overrides in todo:
            _, text = run_case(name, title, [*case_overrides, f"device={args.device}", *overrides], out,
                               Path(args.runs), args.ensemble, precisions)
            texts.append(text)
            print(text)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # a caller in this process (a test, gpucheck) keeps its own
    (out / "fidelity.md").write_text("\n".join(texts))
    log.info("wrote %s and %s/<case>/ (fidelity.csv, deviation.csv, deviation.png)", out / "fidelity.md", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
