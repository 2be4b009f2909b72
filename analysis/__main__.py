"""`python -m analysis DIR`: summary.csv (+ Parquet), curves.parquet (curves.csv with --csv) and figures for every run
directory under DIR (a runs root or a sweep folder).

    python -m analysis sweeps/fig5 --thresholds 0.1 0.01 --at-step 900 --smooth 5
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from pipeline.errors import ConfigError

from .columns import write_columns
from .figures import all_figures
from .groups import group_frame, group_warnings
from .outputs import output_folder, read_csv, write_csv, write_parquet
from .runs import curves_frame, load_runs
from .summary import summary_frame, varying, without_empty, write_summary


def configured_thresholds(runs) -> list[float]:
    """The loss thresholds the runs were trained with (`train.loss_thresholds`)."""
    ts = set()
    for r in runs:
        train = (r["config"] or {}).get("train") if isinstance(r["config"], dict) else None
        given = train.get("loss_thresholds") if isinstance(train, dict) else None
        for t in given if isinstance(given, list) else []:
            try:
                ts.add(float(t))
            except (TypeError, ValueError):
                continue
    return sorted(t for t in ts if math.isfinite(t) and t > 0)[::-1] or [0.1, 0.01]


def limit_reference(runs) -> float | None:
    """The smallest one-norm of a minimum of the bilinear toy, 2 sqrt(y / x) (theta_1 theta_2 =
    y / x, reached at theta_1 = theta_2), when every run is of one such problem; else None."""
    data = {(d.get("x"), d.get("y")) for r in runs for d in [(r["config"].get("data") or {})]
            if d.get("name") == "bilinear"}
    if len(data) != 1 or len(runs) != sum((r["config"].get("data") or {}).get("name") == "bilinear" for r in runs):
        return None
    x, y = next(iter(data))
    return 2 * math.sqrt(abs(float(y) / float(x))) if x else None


def analyze(root, out=None, thresholds=None, steps_at=(), smooth=1, spike_factor=10.0,
            figures=True, style="paper", csv=False) -> dict:
    """Write the analysis of `root` into `out` (default `<root>/analysis`); returns paths.
    `thresholds` None: those the runs were trained with. The per-step curves go into
    curves.parquet (paths["curves"]); `csv`: into curves.csv too (the same rows, ~10x larger)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    runs = load_runs(root)
    if not runs:
        raise ConfigError(f"no run directories (folders with status.json or metrics.csv) under {root}")
    thresholds = list(thresholds) if thresholds else configured_thresholds(runs)
    out = Path(out) if out else root / "analysis"
    output_folder(out)
    summary = summary_frame(runs, thresholds=thresholds, steps_at=steps_at, smooth=smooth,
                            spike_factor=spike_factor)
    curves = curves_frame(runs)
    paths = dict(summary=out / "summary.csv", curves=out / "curves.parquet", columns=out / "columns.md")
    recorded = {c for r in runs if not r.get("damaged") for c in r["metrics"].columns if r["metrics"][c].notna().any()}
    summary, empty = without_empty(summary, recorded)
    write_summary(summary, paths["summary"], out / "summary.parquet")
    groups = group_frame(summary)
    paths["groups"] = out / "groups.csv"
    write_summary(groups, paths["groups"], out / "groups.parquet")
    for line in group_warnings(groups, summary):
        logging.getLogger("analysis").warning("%s", line)
    write_columns(summary.columns, paths["columns"], empty)
    write_parquet(curves, paths["curves"])
    if csv:
        paths["curves_csv"] = write_csv(curves, out / "curves.csv")
    elif (out / "curves.csv").is_file() and not (out / "curves.csv").is_symlink():
        (out / "curves.csv").unlink()  # an earlier --csv's copy would now disagree with curves.parquet
    shown = summary[summary["damaged"].isna()] if "damaged" in summary else summary  # damaged runs: no values
    if "steps" in shown:  # a run without a row (pending, empty metrics.csv) has nothing to draw
        shown = shown[shown["steps"].fillna(0) > 0]
    if figures and len(shown):
        warn_mixed_code(shown)
    if figures and len(shown):
        params = varying(shown) or [p for p in ("beta", "rho", "h") if p in shown and shown[p].notna().any()][:1]
        paths["figures"] = all_figures(shown, curves, out, thresholds, params, style, limit_reference(runs))
    return paths


def positive(name: str, integer: bool = False, minimum: float = 0.0, strict: bool = True):
    """An argparse type: a finite number (an integer with `integer`) > `minimum` (>= with strict=False)."""
    def parse(text: str):
        try:
            v = int(text) if integer else float(text)
        except ValueError:
            v = None
        ok = v is not None and math.isfinite(v) and (v > minimum if strict else v >= minimum)
        if not ok:
            raise argparse.ArgumentTypeError(f"{name} {text}: allowed values are finite "
                                             f"{'whole numbers' if integer else 'numbers'} "
                                             f"{'>' if strict else '>='} {minimum:g}")
        return v
    return parse


def warn_mixed_code(summary) -> str | None:
    """One warning when the runs of the figures come from different commits or from a dirty tree
    (summary.csv's code_version says which run is which); the line, or None."""
    counts = summary["code_version"].fillna("unknown").value_counts()
    mixed = len(counts) > 1 or any("dirty" in v for v in counts.index)
    if not mixed:
        return None
    parts = ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in counts.items())
    line = (f"the figures' runs come from {'different code versions' if len(counts) > 1 else 'a dirty tree'}: "
            f"{parts}; summary.csv's code_version says which run is which (a dirty tree's diff is in the run's "
            "folder, code-<attempt>.diff)")
    logging.getLogger("analysis").warning("%s", line)
    return line


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a runs root, a sweep folder or one run directory")
    ap.add_argument("--out", help="output folder (default DIR/analysis)")
    ap.add_argument("--thresholds", type=positive("--thresholds"), nargs="+", default=None,
                    help="loss thresholds (default: those the runs were trained with)")
    ap.add_argument("--at-step", type=positive("--at-step", True, 0, False), nargs="*", default=[],
                    help="values at fixed steps (Figure 4: 900)")
    ap.add_argument("--smooth", type=positive("--smooth", True, 1, False), default=1,
                    help="moving-average window before the hill")
    ap.add_argument("--spike-factor", type=positive("--spike-factor", minimum=1), default=10.0)
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--csv", action="store_true", help="curves.csv beside curves.parquet (the same rows, ~10x larger)")
    ap.add_argument("--verbose", action="store_true", help="also print a table of every run")
    ap.add_argument("--style", default="paper", help="paper (single-column sizes) or talk (larger)")
    ap.add_argument("--trust", default="", help="users and @groups whose run folders count beside yours "
                    "(store.trust; comma-separated)")
    ap.add_argument("--group", default=None, help="the shared store's group (store.group)")
    a = ap.parse_args(argv)
    from pipeline.runs import owners

    owners.configure(dict(trust=[t for t in a.trust.split(",") if t.strip()], group=a.group))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    paths = analyze(a.dir, a.out, a.thresholds, a.at_step, a.smooth, a.spike_factor,
                    figures=not a.no_figures, style=a.style, csv=a.csv)
    s = read_csv(paths["summary"])
    if a.verbose:  # every run: every key in which the runs differ (the setting, the repeat) and its values
        keys = [c for c in ("h", "beta", "rho") if c in s] + [c for c in ("eps", "setting", "seed", "perturb_theta0")
                                                             if c in s and s[c].nunique(dropna=True) > 1]
        cols = [c for c in ("run_id", *keys, "state", "steps", "final_loss", "hill_height",
                            "max_test_acc", "regime", "limit_one_norm") if c in s and s[c].notna().any()]
        print(s[cols].to_string(index=False) + "\n")
    for line in report_lines(a.dir, s, paths):
        print(line)


def report_lines(folder, summary, paths: dict) -> list[str]:
    """What `make analyze` prints: the folder, its runs counted by state (and points x repeats),
    and every file written, the figures by name."""
    import pandas as pd

    states = summary["state"].fillna("damaged").value_counts() if "state" in summary else pd.Series(dtype=int)
    lines = [f"analysis of {folder}: {len(summary)} runs: " + ", ".join(f"{n} {k}" for k, n in states.items())]
    try:
        g = read_csv(paths["groups"])
    except (OSError, ValueError):  # no groups.csv, or an empty one
        g = pd.DataFrame()
    if len(g) and "n" in g and g["n"].max() > 1:
        n = f"{g['n'].min()}" if g["n"].min() == g["n"].max() else f"{g['n'].min()} to {g['n'].max()}"
        lines.append(f"  {len(g)} grid points x {n} repeats: groups.csv has each metric's n, mean, std, min, max "
                     "and the Welch tests")
    out = paths["summary"].parent
    tables = sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".parquet", ".md")
                    and p.stem in ("summary", "groups", "curves", "columns"))
    lines.append(f"wrote into {out}/: {', '.join(tables)} (columns.md explains the tables' columns)")
    figures = sorted({p.stem for p in paths.get("figures", []) if p.suffix == ".png"})
    if figures:
        lines.append(f"  figures (PNG, PDF and the CSV they are drawn from): {', '.join(figures)}")
    return lines


if __name__ == "__main__":
    from pipeline.errors import command

    command(main)
