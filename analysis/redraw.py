"""Draw a sweep figure again from the CSV saved beside it, in seconds, without the runs:

    make redraw FIG=sweeps/digits/analysis/at_loss_0.01_vs_beta.csv STYLE=talk
    .venv/bin/python -m analysis.redraw sweeps/toy/analysis/curves_by_rho.csv --out slides/

The figure is known by the CSV's name (`at_loss_<T>_vs_<param>`, `max_test_acc_hill_vs_<param>` or
`hill_vs_<param>`, `limit_one_norm_vs_<param>`, `curves_by_<param>`, `trajectories_by_<param>`,
`regime_map`, each maybe with the combination of a split figure, `_h0.01_rho0.9`), as
`python -m analysis` wrote it; the PNG and PDF are written beside the CSV (or into `--out`), named
`<figure>_<style>` for a style other than paper: a talk version never replaces the paper's.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from . import figures
from .outputs import TEXT, read_csv

SPLIT = r"(?:_[a-z]+[^_]*)*"  # one file of a split figure: _h0.01_rho0.9, _setting2
KINDS = (rf"at_loss_(?P<t>[^_]+)_vs_(?P<param>[a-z0-9]+){SPLIT}",
         rf"(?:max_test_acc_hill|max_test_acc|hill)_vs_(?P<param>[a-z0-9]+){SPLIT}",
         rf"limit_one_norm_vs_(?P<param>[a-z0-9]+){SPLIT}", rf"curves_by_(?P<param>[a-z0-9]+){SPLIT}",
         rf"trajectories_by_(?P<param>[a-z0-9]+){SPLIT}", rf"regime_map(?P<param>){SPLIT}")
STYLED = re.compile(r"(?P<stem>.+)_(?P<style>paper|talk)")  # a redrawn figure's own CSV names its style


class RedrawError(ValueError):
    """A file that is not a figure's CSV: one line naming it."""


def redraw(csv: Path, out: Path | None = None, style: str = "paper") -> list[Path]:
    csv = Path(csv)
    styled = STYLED.fullmatch(csv.stem)
    base = styled.group("stem") if styled else csv.stem  # the figure it is, whatever style drew it last
    name = base if style == "paper" else f"{base}_{style}"
    match = next(((i, m) for i, k in enumerate(KINDS) if (m := re.fullmatch(k, base))), None)
    if match is None:
        raise RedrawError(f"{csv}: not a figure's CSV of python -m analysis (names: at_loss_<T>_vs_<param>, "
                         "max_test_acc_hill_vs_<param>, hill_vs_<param>, limit_one_norm_vs_<param>, "
                         "curves_by_<param>, trajectories_by_<param>, regime_map; each maybe _<key><value>...)")
    try:
        data = read_csv(csv)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RedrawError(f"{csv}: not a readable CSV ({str(e).splitlines()[0][:100]})") from None
    kind, m = match
    param = m.group("param") or "beta"  # the regime map: beta x rho
    if param not in data:
        raise RedrawError(f"{csv}: no column {param}, the figure's x axis")
    if data.empty:
        raise RedrawError(f"{csv}: a header and no rows: nothing to draw")
    for col in (c for c in data.columns if c not in TEXT):  # a column of numbers with a word in it: one line
        numbers = pd.to_numeric(data[col], errors="coerce")
        odd = data[col][numbers.isna() & data[col].notna()]
        if numbers.notna().any() and len(odd):
            raise RedrawError(f"{csv}: column {col} holds {str(odd.iloc[0])[:40]!r}, not a number")
    figures.use_style(style)
    out = Path(out) if out else csv.parent
    try:
        made = _draw(kind, m, data, param, out, name)
    except (KeyError, ValueError, TypeError, IndexError) as e:  # a CSV edited or cut: one line naming it
        what = f"no column {e}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [""])[0][:100]
        raise RedrawError(f"{csv}: cannot be drawn from it ({what})") from None
    if not made:
        raise RedrawError(f"{csv}: nothing could be drawn from it")
    return made


def _draw(kind: int, m, data: pd.DataFrame, param: str, out: Path, name: str) -> list[Path]:
    keep = [c for c in (*figures.HYPER, "setting") if c != param and c in data and data[c].nunique() == 1]
    if kind == 0:  # keep: the keys of one file of a split figure, its title, kept in its CSV
        return figures.threshold_figure(data, param, float(m.group("t")), out, name=name, keep=keep)
    if kind == 1:
        return figures.threshold_figure(data, param, None, out, metrics=("max_test_acc", "hill_height"), name=name,
                                        keep=keep)
    if kind == 2:
        ref = data["reference_one_norm"].dropna() if "reference_one_norm" in data else pd.Series(dtype=float)
        reference = (float(ref.iloc[0]), f"smallest one-norm of a minimum: {float(ref.iloc[0]):.4g}") if len(ref) \
            else None
        return figures.threshold_figure(data, param, None, out, metrics=("limit_one_norm",), name=name,
                                        reference=reference, keep=keep)
    if kind == 3:  # the panels the CSV holds (a run with train.sharpness_every has eos_ratio too)
        metrics = tuple(m for m in ("loss", "pert_norm", "eos_ratio") if (data["metric"] == m).any())
        return figures.curves_figure(data, param, out, metrics=metrics, name=name, keep=keep)
    if kind == 5:
        t = [m.group(1) for c in data if (m := re.fullmatch(r"at_loss_(.+)_pert_norm", c))]
        threshold = float(t[0]) if t else 0.01
        return figures.regime_map(data, threshold, out, name)
    minima = data["minima"].dropna() if "minima" in data else pd.Series(dtype=float)
    return figures.trajectories_figure(data, param, out, float(minima.iloc[0]) if len(minima) else None, name=name,
                                       keep=keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.redraw", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="figure CSVs written by python -m analysis")
    ap.add_argument("--style", default="paper", help="paper or talk")
    ap.add_argument("--out", default=None, help="folder for the PNG and PDF (default: beside the CSV)")
    a = ap.parse_args(argv)
    for csv in a.csv:
        try:
            made = redraw(Path(csv), a.out, a.style)
        except RedrawError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {', '.join(str(p) for p in made if p.suffix != '.csv')}")
    return 0


if __name__ == "__main__":
    from pipeline.errors import command

    command(main)
