"""Repeats of a grid point (`make sweep REPEATS=K`) and their spread: `groups.csv`, one row per
point, and the statistics the figures and tables draw from the same rules.

A *point* is a run's semantic config without the repeat keys (seed, train.perturb_theta0):
summary.csv's `point_id`. Only the repeat keys are aggregated over; runs that differ in any other
key are different points (and, when that key is not drawn, a different `setting`).

Per point and metric: `n` values, their mean, standard deviation (ddof 1), min and max, and
`missing`: repeats without a value (a threshold never crossed is counted there, never averaged
away). Diverged repeats are counted (`n_diverged`) and left out of every statistic.

Is an effect resolved? For each metric at a threshold or a step and each swept hyperparameter,
each point is compared with the point of the next smaller value of that hyperparameter (all else
equal) by Welch's t-test (scipy.stats.ttest_ind, equal_var=False): `<metric>_p_vs_prev_<param>`,
and `<metric>_resolved_vs_prev_<param>` true when p < ALPHA. Fewer than 2 values on a side: empty.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from pipeline.runs.rundir import FINISHED

REPEAT_COLUMNS = ("seed", "perturb_theta0")  # summary.csv's columns of pipeline.runs.ids.REPEAT_KEYS
SWEPT = ("beta", "rho", "h", "eps")
ALPHA = 0.05  # Welch's t-test: a difference of means is resolved when p < ALPHA
NOT_METRICS = {"run_id", "point_id", "setting", "state", "steps", "holes", "damaged", "regime", "code_version"}
NAN = float("nan")


def stats(values) -> dict:
    """n, mean, std (ddof 1; empty for n < 2), min, max of the finite `values`."""
    x = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
    x = x[np.isfinite(x)]
    return dict(n=len(x), mean=float(x.mean()) if len(x) else NAN, std=float(x.std(ddof=1)) if len(x) > 1 else NAN,
                min=float(x.min()) if len(x) else NAN, max=float(x.max()) if len(x) else NAN)


def welch(a, b) -> float:
    """Welch's t-test p-value of the two samples' means (NaN with fewer than 2 values on a side;
    1.0 when both are constant and equal, 0.0 when constant and different)."""
    from scipy import stats as st

    a = pd.to_numeric(pd.Series(a), errors="coerce").to_numpy(float)
    b = pd.to_numeric(pd.Series(b), errors="coerce").to_numpy(float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return NAN
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():  # nearly equal repeats: scipy warns of precision loss, the p-value stands
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(st.ttest_ind(a, b, equal_var=False).pvalue)


def diverged(frame: pd.DataFrame) -> pd.Series:
    out = pd.Series(False, index=frame.index)
    for c in ("state", "regime"):
        if c in frame:
            out |= frame[c].eq("diverged")
    return out


def usable(summary: pd.DataFrame) -> pd.DataFrame:
    """The runs that count: not damaged, with a point id."""
    s = summary
    if "damaged" in s:
        s = s[s["damaged"].isna()]
    return s[s["point_id"].notna()] if "point_id" in s else s.iloc[0:0]


def metric_columns(summary: pd.DataFrame) -> list[str]:
    hyper = _hyper_columns(summary)
    return [c for c in summary.columns if c not in NOT_METRICS and c not in hyper
            and pd.api.types.is_numeric_dtype(summary[c]) and not pd.api.types.is_bool_dtype(summary[c])]


def effect_columns(metrics) -> list[str]:
    """The metrics whose adjacent differences are tested: at a threshold, at a step, the hill,
    the best test accuracy."""
    return [c for c in metrics if c.startswith(("at_loss_", "at_step_")) or c in ("hill_height", "max_test_acc")]


def _hyper_columns(summary: pd.DataFrame) -> list[str]:
    from .runs import HYPER

    return [c for c in HYPER if c in summary]


def identity_columns(summary: pd.DataFrame) -> list[str]:
    """What names a point in groups.csv: point_id, setting and the hyperparameters, less the
    repeat keys."""
    return ["point_id", "setting"] + [c for c in _hyper_columns(summary) if c not in REPEAT_COLUMNS]


def group_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """groups.csv: one row per point (see the module doc)."""
    s = usable(summary)
    ids = [c for c in identity_columns(summary) if c in s]
    metrics = metric_columns(s)
    rows = []
    for _, g in s.groupby("point_id", sort=False):
        gone = diverged(g)
        kept = g[~gone]
        row = {c: g[c].iloc[0] for c in ids}
        row.update(n=len(g), n_finished=int(g["state"].isin(FINISHED).sum()) if "state" in g else len(g),
                   n_diverged=int(gone.sum()), repeats=" ".join(_repeat_label(r) for _, r in g.iterrows()))
        for c in metrics:
            st = stats(kept[c])
            row.update({f"{c}_{k}": v for k, v in st.items()})
            row[f"{c}_missing"] = len(kept) - st["n"]
        rows.append(row)
    groups = pd.DataFrame(rows)
    if groups.empty:  # no run counts (all damaged): the header alone
        return pd.DataFrame(columns=[*ids, "n", "n_finished", "n_diverged", "repeats"])
    for c in effect_columns(metrics):
        for param in [p for p in SWEPT if p in groups and groups[p].nunique(dropna=True) > 1]:
            p_values = adjacent_welch(s, c, param)
            groups[f"{c}_p_vs_prev_{param}"] = groups["point_id"].map(p_values)
            groups[f"{c}_resolved_vs_prev_{param}"] = groups[f"{c}_p_vs_prev_{param}"].map(
                lambda p: (p < ALPHA) if np.isfinite(p) else pd.NA).astype("boolean")
    return groups


def _repeat_label(row) -> str:
    parts = [f"{c}={row[c]:g}" for c in REPEAT_COLUMNS if c in row and pd.notna(row[c])]
    return "/".join(parts) or "-"


def adjacent_welch(summary: pd.DataFrame, metric: str, param: str) -> dict:
    """{point_id: Welch p-value of `metric` between that point and the point of the next smaller
    `param` value with every other key equal}; diverged repeats left out."""
    s = usable(summary)
    s = s[~diverged(s)]
    others = [c for c in identity_columns(s) if c not in ("point_id", param) and c in s]
    out = {}
    for _, series in (s.groupby(others, dropna=False) if others else [(None, s)]):
        by_x = sorted(series.groupby(param), key=lambda kv: kv[0])
        for (_, lo), (_, hi) in zip(by_x, by_x[1:]):
            if lo["point_id"].nunique() == 1 and hi["point_id"].nunique() == 1:
                out[hi["point_id"].iloc[0]] = welch(lo[metric], hi[metric])
    return out


def group_warnings(groups: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """One line each: points with diverged repeats (left out of the statistics), and the settings
    the sweep mixes (drawn as separate series, never averaged together)."""
    lines = []
    if len(groups) and "n_diverged" in groups and (groups["n_diverged"] > 0).any():
        hit = groups[groups["n_diverged"] > 0]
        lines.append(f"{len(hit)} point(s) with diverged repeats ({int(hit['n_diverged'].sum())} runs): counted in "
                     "groups.csv's n_diverged and left out of its means and spreads")
    settings = sorted(set(usable(summary).get("setting", pd.Series(dtype=object)).dropna()) - {""})
    if settings:
        lines.append(f"the runs differ in settings that no axis draws ({'; '.join(settings)}): each is its own "
                     "series (summary.csv's setting column), never averaged with another")
    return lines
