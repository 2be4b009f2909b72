"""Per-run summaries: threshold crossings, values at a fixed step, the "hill" of the perturbed
one-norm (Section 7, Figures 6-7) and the training regime (Ma et al.: stable / spiky /
diverged). Every function takes one run's metrics frame; missing data gives NaN, never an
invented number.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pipeline.runs.provenance import code_versions
from pipeline.runs.rundir import FINISHED
from pipeline.thresholds import DIVERGE_FACTOR, DIVERGE_PATIENCE, divergence_step, eos_threshold
from pipeline.thresholds import first_crossing as first_crossing_index

from .outputs import write_csv, write_parquet
from .runs import SETTING_BEFORE, hyperparameters

NAN = float("nan")
CROSSING_METRICS = ("pert_norm", "test_acc", "test_loss", "acc", "l1_norm", "l2_norm", "bias_norm")


def tkey(t: float) -> str:
    """Column infix of a threshold or step: 0.1 -> '0.1', 1e-05 -> '1e-05'."""
    return f"{t:g}"


def first_crossing(m: pd.DataFrame, threshold: float, known_until: float = float("inf")) -> dict:
    """Values at the first step whose training loss is below `threshold` (the rule of
    pipeline.thresholds). `known_until`: the last step of the whole prefix of a history with
    holes; a crossing after it may not be the first, and is left empty."""
    out = {f"at_loss_{tkey(threshold)}_step": NAN}
    out.update({f"at_loss_{tkey(threshold)}_{c}": NAN for c in CROSSING_METRICS if c in m})
    if m.empty or "loss" not in m:
        return out
    i = first_crossing_index(m["loss"].tolist(), threshold)
    if i is None or m["step"].iloc[i] > known_until:
        return out
    row = m.iloc[i]
    out[f"at_loss_{tkey(threshold)}_step"] = int(row["step"])
    out.update({f"at_loss_{tkey(threshold)}_{c}": row[c] for c in CROSSING_METRICS if c in m})
    return out


def at_step(m: pd.DataFrame, step: int, metrics=("pert_norm", "test_acc", "loss")) -> dict:
    hit = m[m["step"] == step] if "step" in m else m
    return {f"at_step_{step}_{c}": (hit[c].iloc[0] if len(hit) and c in m else NAN)
            for c in metrics}


HILL_LOSS = 0.05  # the paper's hill comes after the start-up: its trough is searched from the first step whose
#                  training loss is at most HILL_LOSS times the initial loss (95 % of the loss gone)
HILL_MIN_REL = 0.05  # a rise of less than 5 % of its trough is no hill (jitter of the descent, a flat floor)


def startup_end(loss: np.ndarray) -> int | None:
    """The index of the first step whose training loss is at most HILL_LOSS times the initial
    loss: where Adam's start-up ends for the hill and the edge-of-stability columns alike; None
    when the loss never falls that far (or starts non-finite)."""
    if not len(loss) or not np.isfinite(loss[0]):
        return None
    with np.errstate(invalid="ignore"):
        down = np.nonzero(loss <= HILL_LOSS * loss[0])[0]
    return int(down[0]) if len(down) else None


def _largest_rise(p: np.ndarray) -> tuple[float, int | None, int | None]:
    """(max over s < t of p_t - p_s, s, t); (0.0, None, None) when p never rises."""
    if len(p) < 2:
        return 0.0, None, None
    run_min = np.minimum.accumulate(p)
    arg_min = np.zeros(len(p), dtype=int)  # index of the running minimum
    for i in range(1, len(p)):
        arg_min[i] = i if p[i] < run_min[i - 1] else arg_min[i - 1]
    rise = p[1:] - run_min[:-1]  # P_t - min_{s<t} P_s
    t = int(np.argmax(rise)) + 1
    height = float(rise[t - 1])
    return (height, int(arg_min[t - 1]), t) if height > 0 else (0.0, None, None)


def hill(p: pd.Series, steps: pd.Series, floor: float = NAN, smooth: int = 1, loss: pd.Series | None = None) -> dict:
    """The paper's hill of the perturbed norm P (Section 7, Figures 6-7: P falls steeply, rises
    again mid-training, then falls further): the largest rise max over t0 <= s < t of (P_t - P_s)
    after the start-up, t0 being the first step whose training `loss` is at most HILL_LOSS x the
    initial loss; its trough step s and peak step t; the height relative to P_s and to the floor
    p sqrt(eps). No hill (empty cells) without a loss that falls that far, or when P rises after
    t0 by less than HILL_MIN_REL of its trough (a monotone curve, the jitter of a descent).
    `rise_max`: the largest rise anywhere, the start-up bump of Adam's first steps included (0
    for a curve that never rises): the hill of the rule before 2026-12-06. `smooth` > 1 applies a
    trailing moving average to P first."""
    ok = p.notna() & np.isfinite(p)
    loss = loss[ok].to_numpy(float) if loss is not None else None
    p, steps = p[ok].to_numpy(float), steps[ok].to_numpy()
    out = dict(hill_height=NAN, hill_trough_step=NAN, hill_peak_step=NAN,
               hill_height_rel_trough=NAN, hill_height_rel_floor=NAN, rise_max=NAN)
    if len(p) < 2:
        return out
    if smooth > 1:
        p = pd.Series(p).rolling(smooth, min_periods=1).mean().to_numpy()
    out["rise_max"] = _largest_rise(p)[0]
    t0 = startup_end(loss) if loss is not None else None
    if t0 is None:
        return out
    height, s, t = _largest_rise(p[t0:])
    if s is None or height <= HILL_MIN_REL * abs(p[t0 + s]):
        return out
    s, t = s + t0, t + t0
    out.update(hill_height=height, hill_trough_step=int(steps[s]), hill_peak_step=int(steps[t]),
               hill_height_rel_trough=height / p[s],
               hill_height_rel_floor=height / floor if floor and floor > 0 else NAN)
    return out


EOS_LEVELS = (0.9, 1.0)  # fractions of the stability threshold whose first crossing a summary names


def edge_of_stability(m: pd.DataFrame, optim: dict) -> dict:
    """The run against the stability threshold of its update (pipeline.thresholds.eos_threshold):
    `eos_threshold`; over the recorded steps of `pre_sharpness` (its converged values) after the
    start-up, the ratio r = pre_sharpness / eos_threshold: its largest value `eos_ratio_max`, the
    first step it exceeds 0.9 and 1 (`eos_0.9_step`, `eos_1_step`) and the fraction of recorded
    steps above 0.9 (`eos_frac_0.9`); the same for plain GD's ratio sharpness * h / 2 (`gd_...`).
    The start-up is the hill's (HILL_LOSS): until the loss is at most 5 % of its initial value,
    Adam's P averages a few gradients (at step 0 P = |g_0|: the sign-like first step) and the
    threshold, which assumes P frozen, does not describe the update; a run whose loss never falls
    that far has no values."""
    name, h = optim.get("name"), optim.get("h")
    if "pre_sharpness" not in m or h is None:
        return {}
    thr = eos_threshold(name, float(h), float(optim.get("beta", 0.0) or 0.0))
    out = {"eos_threshold": thr}
    t0 = startup_end(m["loss"].to_numpy(float))
    after = m["step"] >= (m["step"].iloc[t0] if t0 is not None else np.inf)
    for prefix, ratio in (("eos", m["pre_sharpness"] / thr), ("gd", m["sharpness"] * float(h) / 2)):
        ok = ratio.notna() & np.isfinite(ratio) & after
        r, steps = ratio[ok].to_numpy(float), m["step"][ok].to_numpy()
        out[f"{prefix}_ratio_max"] = float(r.max()) if len(r) else NAN
        for level in EOS_LEVELS:
            above = np.nonzero(r > level)[0]
            out[f"{prefix}_{tkey(level)}_step"] = int(steps[above[0]]) if len(above) else NAN
        out[f"{prefix}_frac_0.9"] = float((r > 0.9).mean()) if len(r) else NAN
    return out


def regime(loss: pd.Series, state: str | None, spike_factor: float = 10.0,
           spike_min_rise: float = 1e-3, diverge_factor: float | None = DIVERGE_FACTOR,
           diverge_patience: int = DIVERGE_PATIENCE) -> str:
    """`diverged`: the run ended diverged, or its losses meet the training loop's divergence
    rule (pipeline.thresholds.diverging: non-finite, or above `diverge_factor` times the
    initial loss at `diverge_patience` consecutive steps); `spiky`: after the first decline
    the loss jumps above `spike_factor` times its running minimum, by more than
    `spike_min_rise` times the initial loss (so rounding noise around a loss of 1e-12 is no
    spike); else `stable`. Empty string when there is no loss at all."""
    values = loss.to_numpy(float)
    if state == "diverged" or (len(values) and divergence_step(values, diverge_factor, diverge_patience) is not None):
        return "diverged"
    if len(values) == 0:
        return ""
    declined = np.nonzero(values < values[0])[0]
    if len(declined):
        tail = values[declined[0]:]
        low = np.minimum.accumulate(tail)
        if ((tail > spike_factor * low) & (tail - low > spike_min_rise * values[0])).any():
            return "spiky"
    return "stable"


def summarize_run(run: dict, thresholds=(0.1, 0.01), steps_at=(), smooth: int = 1,
                  spike_factor: float = 10.0) -> dict:
    """One summary row. A run whose history has holes (`run['holes']`) gets only the values
    that do not depend on its missing rows; the rest stays empty."""
    m, st, holes = run["metrics"], run["status"], run.get("holes", "")
    if run.get("damaged"):  # not the run it claims to be, or its status unreadable: no values at all
        return dict(run_id=run["run_id"], point_id=None, setting="", **dict.fromkeys(hyperparameters({})),
                    state=st.get("state") or "damaged",
                    holes=holes, damaged=run["damaged"])
    state = st.get("state", "unknown" if m.empty else "running")
    row = dict(run_id=run["run_id"], point_id=run.get("point_id"), setting=run.get("setting", ""),
               **hyperparameters(run["config"]), state=state,
               steps=int(m["step"].max()) if "step" in m and len(m) else 0,  # last step reached
               holes=holes)
    has_loss = "loss" in m and len(m)
    whole = has_loss and not holes
    ends_at_last = has_loss and (state not in FINISHED or int(m["step"].iloc[-1]) == st.get("step"))
    row["last_loss"] = float(m["loss"].iloc[-1]) if has_loss else NAN
    row["final_loss"] = row["last_loss"] if state in FINISHED and ends_at_last else NAN
    known_until = run.get("whole_until", -1) if has_loss and holes else float("inf")  # read_run: the one rule
    for t in thresholds:
        row.update(first_crossing(m, t, known_until))
    for s in steps_at:
        row.update(at_step(m, s))
    row["max_test_acc"] = float(m["test_acc"].max()) if whole and "test_acc" in m and \
        m["test_acc"].notna().any() else NAN
    floor = float(m["pert_norm_floor"].iloc[0]) if "pert_norm_floor" in m and len(m) else NAN
    if "pert_norm" in m and whole:
        row.update(hill(m["pert_norm"], m["step"], floor, smooth, loss=m["loss"]))
    else:
        row.update(hill(pd.Series(dtype=float), pd.Series(dtype=float)))
    tc = (run["config"].get("train") or {}) if isinstance(run["config"], dict) else {}
    row["regime"] = regime(m["loss"], state, spike_factor,
                           diverge_factor=tc.get("diverge_factor", DIVERGE_FACTOR),
                           diverge_patience=tc.get("diverge_patience", DIVERGE_PATIENCE)) if whole else ""
    if whole:
        row.update(edge_of_stability(m, (run["config"].get("optim") or {}) if isinstance(run["config"], dict) else {}))
    thetas = sorted((c for c in m.columns if c.startswith("theta_")), key=lambda c: int(c[6:]))
    # few-parameter models: the limit point and its one-norm (Figures 2-3); a diverged run has none
    if thetas and len(m) and ends_at_last and state != "diverged" and row["regime"] != "diverged":
        last = m[thetas].iloc[-1]
        row.update({f"limit_{c}": float(last[c]) for c in thetas})
        row["limit_one_norm"] = float(last.abs().sum())
        if "l1_norm" in m:
            row["limit_grad_one_norm"] = float(m["l1_norm"].iloc[-1])
    row["code_version"] = code_versions(run.get("provenance") or [])  # commit[+dirty] of each attempt
    return row


def summary_frame(runs, **kw) -> pd.DataFrame:
    rows = [summarize_run(r, **kw) for r in runs]
    df = pd.DataFrame(rows)
    for c in df.columns:  # steps are integers, empty where unknown (not 10.0 and NaN)
        if c == "steps" or c.endswith("_step"):
            df[c] = df[c].astype("Int64")
    if not df.empty:
        df = df.sort_values([c for c in ("model", "data", "optim", "h", "beta", "rho", "eps", "seed")
                             if c in df and df[c].notna().any()], na_position="last", kind="stable")
    return df.reset_index(drop=True)


CSV_DIGITS = 7  # summary.csv's significant digits (float32's); summary.parquet keeps every digit
# only some runs have them
OPTIONAL_SETTINGS = ("norm", "subset", "micro_batch", "eps_inside", "bias_correction", "bn_group")
# settings that matter only where a run changed them: left out when every run has the default
DEFAULT_SETTINGS = {**SETTING_BEFORE, "reshuffle": False}


def needs(column: str) -> str | None:
    """The metric (a metrics.csv column) a summary column is made from, or None."""
    crossing = rf"at_(?:loss|step)_.+?_({'|'.join((*CROSSING_METRICS, 'loss'))})"  # first_crossing's, at_step's
    for pattern, metric in ((crossing, None), (r"max_test_acc", "test_acc"),
                            (r"hill_height_rel_floor", "pert_norm_floor"), (r"hill_.+", "pert_norm"),
                            (r"rise_max", "pert_norm"), (r"eos_.+", "pre_sharpness"), (r"gd_.+", "sharpness"),
                            (r"limit_grad_one_norm", "l1_norm"), (r"limit_.+", "theta_0")):
        m = re.fullmatch(pattern, column)
        if m:
            return metric or m.group(1)
    return None


def without_empty(df: pd.DataFrame, metrics: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """The summary less the columns that cannot have a value for any run, and their names: an
    optional setting no run has (an MLP's `norm`, `subset` when no run took one), a setting every run
    has at its default (DEFAULT_SETTINGS: `eval_mode` when all are exact) and the values of a
    metric no run recorded (`metrics`: the metrics.csv columns with a value in some run; a model
    without a test set has no test columns). An empty cell of any other column is a finding (a
    threshold never crossed, a history with holes, a run not finished) and stays."""
    empty = [c for c in df.columns if (df[c].isna().all()
             and (c in OPTIONAL_SETTINGS or (needs(c) is not None and needs(c) not in metrics)))
             or (c in DEFAULT_SETTINGS and df[c].dropna().eq(DEFAULT_SETTINGS[c]).all())]
    return df.drop(columns=empty), empty


def write_summary(df: pd.DataFrame, csv_path, parquet_path=None) -> None:
    """summary.csv with CSV_DIGITS significant digits (what a float32 run supports, and what a
    table needs); summary.parquet beside it, when asked, with every digit."""
    write_csv(df, csv_path, float_format=f"%.{CSV_DIGITS}g")
    if parquet_path is not None:
        write_parquet(df, parquet_path)


def varying(df: pd.DataFrame, candidates=("beta", "rho", "h", "eps")) -> list[str]:
    """Hyperparameters that take more than one value across the runs."""
    return [c for c in candidates if c in df and df[c].nunique(dropna=True) > 1]

