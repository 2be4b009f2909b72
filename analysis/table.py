"""Tables for papers from a sweep's summary.csv: one value per (row, column) of two
hyperparameters, as LaTeX (booktabs), Markdown or CSV.

    python -m analysis.table analysis/digits --rows beta --cols rho --value at_loss_0.01_pert_norm
    python -m analysis.table analysis/digits/summary.csv --rows beta --cols rho --value hill_height \\
        --fmt .3g --latex --out table.tex
    python -m analysis.table analysis/toy --rows beta --cols rho --value final_loss --where h=0.01

The input is a summary.csv (`make analyze` writes one per sweep) or the folder holding it. Every
cell is one grid point. The repeats of a point (REPEATS=K: runs that differ only in the seed or
train.perturb_theta0) are one cell, printed as mean ± spread (`--spread std` by default, `sem`,
`ci95`: a bootstrap interval of the mean, scipy.stats.bootstrap, or `minmax`), n in the caption;
diverged repeats are left out and counted. Points that share (row, column) but differ elsewhere
(another h, another setting) must be told apart with `--where key=value`, or averaged with
`--agg mean` (the table says so).
A cell without a value (a threshold never crossed, a run not finished) is an em dash. Numbers
are printed to `--fmt` (a Python format spec, default `.4g`; integers such as steps exactly);
in LaTeX powers of ten as `1.2\\times10^{-5}` and every name escaped.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from pipeline.runs.rundir import FINISHED

from .outputs import read_csv

LATEX_NAMES = {"beta": r"$\beta$", "rho": r"$\rho$", "h": r"$h$", "eps": r"$\varepsilon$", "seed": "seed"}
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
DASH = {"latex": "---", "markdown": "—", "csv": ""}


class TableError(ValueError):
    """A bad argument or input file: one line naming it and what is allowed."""


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def read_summary(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        path = path / "summary.csv"
    if not path.is_file():
        raise TableError(f"{path}: no such file; give a summary.csv or its folder (make analyze SWEEP=... writes it)")
    try:
        return read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a readable CSV ({str(e).splitlines()[0][:100]})") from None


def _where(df: pd.DataFrame, conditions: list[str]) -> pd.DataFrame:
    for cond in conditions:
        key, sep, value = cond.partition("=")
        if not sep or key not in df:
            raise TableError(f"--where {cond}: expected key=value with a column of the summary as key")
        column = df[key]
        try:
            hit = (column.astype(float) - float(value)).abs() <= 1e-12 * max(1.0, abs(float(value)))
        except ValueError:
            hit = column.astype(str) == value
        if not hit.any():
            shown = ", ".join(map(str, sorted(column.dropna().unique())[:12]))
            raise TableError(f"--where {cond}: no run has {key}={value}; {key} takes {shown}")
        df = df[hit]
    return df


SPREADS = ("std", "sem", "ci95", "minmax")
ONE_WAY = "_value"  # the column of a one-way table (no --cols): its header is the value's name


def spread(values, kind: str) -> tuple[float, float, float]:
    """(mean, lo, hi) of the finite `values`: lo/hi the mean -/+ one std or sem, the bootstrap
    95 % interval of the mean (scipy.stats.bootstrap, percentile, a fixed seed) or min/max."""
    import numpy as np

    from .groups import stats as summary_stats

    st = summary_stats(values)  # n, mean, std (ddof 1), min, max of the finite values: groups.csv's rule
    m = st["mean"]
    if not st["n"]:
        return (math.nan, math.nan, math.nan)
    if kind == "minmax":
        return m, st["min"], st["max"]
    if st["n"] < 2:
        return m, math.nan, math.nan
    if kind == "ci95":
        if st["max"] == st["min"]:
            return m, m, m
        from scipy import stats

        x = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
        ci = stats.bootstrap((x[np.isfinite(x)],), np.mean, confidence_level=0.95, n_resamples=9999,
                             method="percentile", random_state=0).confidence_interval
        return m, float(ci.low), float(ci.high)
    d = st["std"] / (math.sqrt(st["n"]) if kind == "sem" else 1.0)
    return m, m - d, m + d


def pivot(df: pd.DataFrame, rows: str, cols: str, value: str, where=(), agg: str | None = None,
          kind: str = "std"):
    """(the rows x cols table of `value`, one point per cell or `agg` over the runs of a cell; which
    cells hold a run that has not finished: running, pending, failed; the repeats' spread: None
    without repeats, else {(row, col): (mean, lo, hi)} and a caption)."""
    if cols in (None, ONE_WAY):  # a one-way table: one column, the value
        df, cols = df.assign(**{ONE_WAY: value}), ONE_WAY
    for name, col in (("--rows", rows), ("--cols", cols), ("--value", value)):
        if col not in df:
            raise TableError(f"{name} {col}: not a column of the summary (a column empty for every run is left "
                             f"out: columns.md names them); columns: {', '.join(df.columns)}")
    if len({rows, cols, value}) < 3:
        raise TableError(f"--rows {rows} --cols {cols} --value {value}: three different columns are needed")
    df = _where(df, list(where))
    if "damaged" in df:
        df = df[df["damaged"].isna()]
    counts = df.groupby([rows, cols]).size()
    repeats = agg is None and (counts > 1).any() and "point_id" in df and df["point_id"].notna().all() and \
        bool((df.groupby([rows, cols])["point_id"].nunique() == 1).all())
    if agg is None and (counts > 1).any() and not repeats:
        (r, c), n = next((k, v) for k, v in counts.items() if v > 1)
        at = f"{rows}={r}" if cols == ONE_WAY else f"{rows}={r}, {cols}={c}"
        varying = [k for k in ("h", "beta", "rho", "eps", "setting", "model", "data", "optim")
                   if k in df and k not in (rows, cols) and df[k].nunique() > 1]
        raise TableError(f"{n} runs have {at} (they differ in {', '.join(varying) or 'other keys'}): "
                         "choose them with --where key=value, or average them with --agg mean")
    values = pd.to_numeric(df[value], errors="coerce")
    if values.isna().all() and df[value].notna().any():
        raise TableError(f"--value {value}: not a numeric column")
    unfinished = ~df["state"].isin(FINISHED) if "state" in df else pd.Series(False, index=df.index)
    df = df.assign(**{value: values, "_unfinished": unfinished.astype(float)})
    shape = dict(index=rows, columns=cols, dropna=False)
    if not repeats:
        table = df.pivot_table(values=value, aggfunc=agg or "first", **shape).sort_index().sort_index(axis=1)
        marks = df.pivot_table(values="_unfinished", aggfunc="max", **shape).reindex_like(table).fillna(0) > 0
        return table, marks, None
    from .groups import diverged

    gone = diverged(df)
    kept = df[~gone]
    cells = {k: spread(g[value], kind) for k, g in kept.groupby([rows, cols])}
    n = kept.groupby([rows, cols])[value].apply(lambda v: int(pd.to_numeric(v, errors="coerce").notna().sum()))
    table = df.pivot_table(values=value, aggfunc="first", **shape).sort_index().sort_index(axis=1) * math.nan
    for (r, c), (m, _, _) in cells.items():
        table.at[r, c] = m
    marks = df.pivot_table(values="_unfinished", aggfunc="max", **shape).reindex_like(table).fillna(0) > 0
    what = {"std": "mean ± std", "sem": "mean ± standard error", "ci95": "mean [95 % bootstrap interval of the mean]",
            "minmax": "mean [min, max]"}[kind]
    ns = f"{n.min()}" if n.min() == n.max() else f"{n.min()} to {n.max()}"
    caption = f"{what} over n = {ns} repeats per cell"
    if gone.any():
        caption += f"; {int(gone.sum())} diverged repeat(s) left out"
    return table, marks, (cells, caption)


def number(v, fmt: str, integral: bool, style: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v) and math.isnan(v)):
        return DASH[style]
    if integral:
        return str(int(round(v)))
    if v == 0:
        return "0"
    text = format(float(v), fmt)
    if style == "latex" and "e" in text:
        mant, _, exp = text.partition("e")
        if int(exp) == 0:
            return mant
        text = (f"{mant}\\times" if mant not in ("1", "1.0") else "") + f"10^{{{int(exp)}}}"
        return f"${text}$"
    return text


def _latex_name(key: str) -> str:
    return LATEX_NAMES.get(key, latex_escape(key))


def label(v) -> str:
    """A hyperparameter's value as written in a config: 0.999, 0.0001, cnn."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cell(table, spreads, r, c, fmt: str, integral: bool, style: str) -> str:
    """A cell's number, with its repeats' spread when there is one: `a ± b` (LaTeX `$a \\pm b$`)
    for std and sem, `a [lo, hi]` for an interval; a CSV cell gets the mean only (the spread
    goes into a column of its own)."""
    text = number(table.at[r, c], fmt, integral, style)
    if spreads is None or style == "csv" or (r, c) not in spreads[0]:
        return text
    m, lo, hi = spreads[0][(r, c)]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return text
    kind = spreads[2]

    def num(v):
        return number(v, fmt, False, style).strip("$")
    if kind in ("std", "sem"):
        return f"${num(m)} \\pm {num(hi - m)}$" if style == "latex" else f"{num(m)} ± {num(hi - m)}"
    return f"${num(m)}\\ [{num(lo)}, {num(hi)}]$" if style == "latex" else f"{num(m)} [{num(lo)}, {num(hi)}]"


def render(table: pd.DataFrame, marks: pd.DataFrame, rows: str, cols: str, value: str, style: str, fmt: str,
           agg: str | None, spreads=None) -> str:
    finite = table.to_numpy(float)[~pd.isna(table.to_numpy(float))]
    integral = fmt == ".4g" and finite.size > 0 and bool((finite == finite.round()).all()) and abs(finite).max() < 1e15
    integral = integral and spreads is None  # a mean of integers is not one
    star = {"latex": "$^{*}$", "markdown": "\\*", "csv": ""}[style]  # a CSV keeps plain numbers
    cells = [[_cell(table, spreads, r, c, fmt, integral, style) + (star if marks.at[r, c] else "")
              for c in table.columns] for r in table.index]
    what = f"{value}{f' ({agg} over runs)' if agg else ''}"
    if spreads is not None:
        what += f": {spreads[1]}"
    if marks.to_numpy().any():
        what += "; * a run that has not finished (running, pending or failed): not its final value"
    corner, names = _headers(table, rows, cols, style)
    if style == "csv":
        head = [corner, *names]
        body = [[label(r), *row] for r, row in zip(table.index, cells)]
        if spreads is not None:  # the spread beside each mean: <col>_lo, <col>_hi
            head = [head[0]] + [f"{h}{s}" for h in head[1:] for s in ("", "_lo", "_hi")]
            body = [[label(r)] + [x for c, v in zip(table.columns, row) for x in
                                  (v, *(number(b, fmt, False, style) for b in spreads[0].get((r, c), (0, math.nan,
                                                                                                    math.nan))[1:]))]
                    for r, row in zip(table.index, cells)]
        return "\n".join(",".join(x) for x in [head, *body]) + "\n"
    if style == "markdown":
        head = [corner, *names]
        out = [f"| {' | '.join(head)} |", "| " + " | ".join(["---"] * len(head)) + " |"]
        out += [f"| {label(r)} | {' | '.join(row)} |" for r, row in zip(table.index, cells)]
        return f"<!-- {what} -->\n" + "\n".join(out) + "\n"
    corner = _latex_name(rows) if cols == ONE_WAY else f"{_latex_name(rows)} \\textbackslash{{}} {_latex_name(cols)}"
    head = [corner, *(latex_escape(n) for n in names)]
    out = [f"% {latex_escape(what)}", r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
           " & ".join(head) + r" \\", r"\midrule"]
    out += [f"{latex_escape(label(r))} & " + " & ".join(row) + r" \\" for r, row in zip(table.index, cells)]
    return "\n".join([*out, r"\bottomrule", r"\end{tabular}"]) + "\n"


def _headers(table: pd.DataFrame, rows: str, cols: str, style: str) -> tuple[str, list[str]]:
    """(the corner, the column headers): `rows \\ cols` and the values of cols; a one-way table's
    corner is its rows' name and its one header the value's name."""
    if cols == ONE_WAY:
        return rows, [str(c) for c in table.columns]
    return {"csv": f"{rows}\\{cols}", "markdown": f"{rows} \\ {cols}"}.get(style, ""), [label(c) for c in table.columns]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", help="a summary.csv, or the folder that holds it")
    ap.add_argument("--rows", required=True)
    ap.add_argument("--cols", default=None, help="(default: none: a one-way table of --rows)")
    ap.add_argument("--value", required=True)
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--agg", choices=("mean", "median", "min", "max"), default=None)
    ap.add_argument("--fmt", default=".4g", help="a Python format spec for the numbers (default .4g)")
    ap.add_argument("--spread", choices=SPREADS, default="std",
                    help="the repeats' spread beside each mean: std (default), sem, ci95 (bootstrap), minmax")
    style = ap.add_mutually_exclusive_group()
    for s in ("latex", "markdown", "csv"):
        style.add_argument(f"--{s}", dest="style", action="store_const", const=s)
    ap.add_argument("--out", default=None, help="write here instead of standard output")
    a = ap.parse_args(argv)
    try:
        format(1.5, a.fmt)
    except ValueError:
        print(f"error: --fmt {a.fmt}: not a Python format spec for a number (e.g. .3g, .2e, .4f)", file=sys.stderr)
        return 2
    try:
        table, marks, spreads = pivot(read_summary(a.summary), a.rows, a.cols, a.value, a.where, a.agg, a.spread)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spreads = (*spreads, a.spread) if spreads is not None else None
    text = render(table, marks, a.rows, a.cols or ONE_WAY, a.value, a.style or "latex", a.fmt, a.agg, spreads)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    from pipeline.errors import command

    command(main)
