"""The paper's figures from a summary and a curves frame (matplotlib, PNG and PDF).

- `threshold_figure`: a metric at a loss-threshold crossing vs a hyperparameter
  (Figure 4: perturbed one-norm and test accuracy vs rho; Figure 5: vs beta;
  Figure 6 bottom: test accuracy at the crossing vs beta).
- `curves_figure`: training loss and perturbed one-norm per step, coloured by a
  hyperparameter, one row of panels per combination of the others (Figures 6 and 7).

Each figure's data is written beside it as a CSV with the same stem.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.cm  # noqa: E402
import matplotlib.colors  # noqa: E402
import matplotlib.font_manager  # noqa: E402
import matplotlib.lines  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.runs.rundir import FINISHED  # noqa: E402

from .outputs import output_folder, save_figure, write_csv  # noqa: E402

SYMBOL = {"beta": r"$\beta$", "rho": r"$\rho$", "h": r"$h$", "eps": r"$\varepsilon$"}
LABEL = {"pert_norm": r"$\|\nabla E(\theta)\|_{1,\varepsilon}$", "loss": "training loss",
         "test_acc": "test accuracy", "acc": "training accuracy", "l1_norm": r"$\|\nabla E\|_1$",
         "l2_norm": r"$\|\nabla E\|_2$", "bias_norm": "norm of the bias term (3)",
         "max_test_acc": "max test accuracy", "limit_one_norm": r"$|\theta_1| + |\theta_2|$ at the end",
         "hill_height": r"hill of $\|\nabla E\|_{1,\varepsilon}$ after the start-up",
         "eos_ratio": r"$\lambda_1(P^{-1}H)$ / stability threshold",
         "eos_ratio_max": r"largest $\lambda_1(P^{-1}H)$ / threshold",
         "rise_max": r"largest rise of $\|\nabla E\|_{1,\varepsilon}$"}


TEST_METRICS = ("test_acc", "test_loss", "max_test_acc")


def axis_label(metric: str, frame: pd.DataFrame) -> str:
    """LABEL of `metric`; a test metric of runs evaluated as the authors did (train.eval_mode=
    running_stats in every run) says so."""
    label = LABEL.get(metric, metric)
    modes = set(frame["eval_mode"].dropna()) if "eval_mode" in frame else set()
    if metric in TEST_METRICS and modes == {"running_stats"}:
        label += "\n(BatchNorm running averages)"
    return label


HYPER = ("beta", "rho", "h", "eps")
STYLES = Path(__file__).parent / "styles"
LOG_SPAN = 20.0  # a positive metric whose values span more than this factor is drawn on a log axis
LOSS_FLOOR = 1e-16  # a loss axis stops here (fp64 runs reach 1e-33: nothing to see below)
ACC_SPAN = 0.02  # an accuracy axis spans at least 2 points: a few test images are not a trend


SCALE = {"paper": 1.0, "talk": 1.6}  # figure sizes per style (the fonts are the style file's)
_scale = [1.0]


def use_style(name: str = "paper") -> None:
    """Every figure's look, from analysis/styles/<name>.mplstyle (paper: single-column sizes and
    fonts, a colour-blind-safe palette; talk: larger)."""
    path = STYLES / f"{name}.mplstyle"
    if not path.is_file():
        raise SystemExit(f"error: --style {name}: allowed values are "
                         f"{', '.join(sorted(s.stem for s in STYLES.glob('*.mplstyle')))}")
    plt.style.use(str(path))
    _scale[0] = SCALE.get(name, 1.0)


def _size(width: float, height: float) -> tuple[float, float]:
    return width * _scale[0], height * _scale[0]


def _save(fig, out: Path, name: str, data: pd.DataFrame) -> list[Path]:
    """`name`.png and .pdf, and the figure's data as `name`.csv beside them (to redraw it)."""
    output_folder(out)
    paths = [out / f"{name}.png", out / f"{name}.pdf", out / f"{name}.csv"]
    for p in paths[:2]:
        save_figure(fig, p, bbox_inches="tight")
    plt.close(fig)
    write_csv(data, paths[2], float_format="%.7g")  # what a figure can show, and summary.csv's digits
    return paths


def _others(frame: pd.DataFrame, param: str) -> list[str]:
    """The swept hyperparameters other than `param` (more than one value among the runs), and
    `setting` when the runs differ in a key no axis draws (analysis.runs.label_settings): each
    combination is a series of its own, never joined to another."""
    out = [c for c in HYPER if c != param and c in frame and frame[c].nunique(dropna=True) > 1]
    if "setting" in frame and frame["setting"].astype(object).fillna("").nunique() > 1:
        out.append("setting")
    return out


def _key(values) -> tuple:
    return tuple(values) if isinstance(values, (tuple, list)) else (values,)


def _combo_label(names, values) -> str:
    return ", ".join((str(v) or "(default)") if o == "setting" else f"{SYMBOL.get(o, o)}={v:g}"
                     for o, v in zip(names, _key(values)))


def _with_setting(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(setting=frame["setting"].astype(object).fillna("").astype(str)) if "setting" in frame else frame


def _xscale(ax, param, values):
    """beta and rho on the paper's axis, 1 - x on a log scale (0.9, 0.99, 0.999 equally apart;
    0.5 too), h and eps on a log axis; a labelled tick at each swept value, none other. Where two
    labels would touch (0.8 and 0.85 on the 1 - x axis of a narrow panel), the left one has no tick
    (fewer ticks: never a tick without its label); more than 4 labels stand upright."""
    values = np.unique(np.asarray(values, float)[np.isfinite(values)])
    if param in ("h", "eps"):
        ax.set_xscale("log")
    elif param in ("beta", "rho") and len(values) and values.min() >= 0 and values.max() < 1:
        ax.set_xscale("function", functions=(lambda x: -np.log10(np.clip(1 - x, 1e-12, None)),
                                             lambda y: 1 - 10.0 ** (-y)))
    if len(values):  # a margin in the axis' own scale, so the end points are not on the frame
        ax.set_xlim(*_padded(ax, values.min(), values.max()))
    if 0 < len(values) <= 16:
        upright = len(values) > 4
        size = matplotlib.font_manager.FontProperties(size=plt.rcParams["xtick.labelsize"]).get_size_in_points()
        # points each label takes along the axis: its height standing, ~0.6 em a character lying
        extent = np.array([1.2 * size if upright else 0.6 * size * len(f"{v:g}") for v in values])
        panel = 0.85 * ax.get_position().width * ax.get_figure().get_figwidth() * 72  # points, after the layout
        shown = values[_spaced(ax, values, extent / panel, (0.15 if upright else 0.6) * size / panel)]
        ax.set_xticks(shown, [f"{v:g}" for v in shown], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if upright:
            ax.tick_params(axis="x", labelrotation=90)


def _spaced(ax, values: np.ndarray, extent: np.ndarray, pad: float) -> np.ndarray:
    """Which swept values get a labelled tick: from the right (where the 1 - x axis puts 0.99, 0.999
    far apart), each value whose label (`extent`, a share of the axis' width, centred on it) keeps
    `pad` from the last label kept. Labels that would print over each other are left out with their
    tick, never squeezed."""
    fwd = ax.xaxis.get_transform()
    lo, hi = fwd.transform(list(ax.get_xlim()))
    at = (fwd.transform(values) - lo) / ((hi - lo) or 1.0)
    keep, last = [False] * len(values), None
    for i in range(len(values) - 1, -1, -1):
        if last is None or at[last] - at[i] >= (extent[i] + extent[last]) / 2 + pad:
            keep[i], last = True, i
    return np.array(keep, bool)


def _padded(ax, lo, hi):
    """(lo, hi) widened by 6% of their distance in the x axis' scale."""
    fwd = ax.xaxis.get_transform()
    a, b = fwd.transform([lo, hi]) if hi > lo else fwd.transform([lo, lo]) + np.array([-0.5, 0.5])
    pad = 0.06 * (b - a)
    return tuple(fwd.inverted().transform([a - pad, b + pad]))


def _yscale(ax, metric: str, y: np.ndarray) -> None:
    y = y[np.isfinite(y)]
    if not len(y):
        return
    if "acc" in metric:
        mid, span = (y.min() + y.max()) / 2, max(y.max() - y.min(), ACC_SPAN)
        ax.set_ylim(max(0.0, mid - 0.6 * span), min(1.0, mid + 0.6 * span))
    elif y.min() >= 0 and (y > 0).any() and y.max() / y[y > 0].min() > LOG_SPAN:
        if y.min() > 0:
            ax.set_yscale("log")
        else:  # exact zeros (a hill of height 0): linear up to the smallest positive value, log above
            low, high = int(np.floor(np.log10(y[y > 0].min()))), int(np.ceil(np.log10(y.max())))
            ax.set_yscale("symlog", linthresh=10.0**low, linscale=0.5)
            ax.set_ylim(-0.1 * 10.0**low, 1.5 * y.max())
            decades = [10.0**k for k in range(low + 1, high + 1)]
            ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.0, *decades]))
            ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _finished(frame: pd.DataFrame) -> pd.Series:
    return frame["state"].isin(FINISHED) if "state" in frame else pd.Series(True, index=frame.index)


MAX_SERIES = 6  # a series of more values is coloured by a colour map and named by a colour bar, not a legend
WIDTH = 6.8  # inches: two columns of a paper less the saved margin, the widest a figure is drawn (analysis/look.py)


def _fixed(frame: pd.DataFrame, param: str) -> str | None:
    """The title of one file of a split figure: the swept keys that take one value in its rows
    (`_files`), e.g. "h=0.01"; None when there are none. A figure is drawn from the rows it saves,
    so that a redraw from its CSV titles it the same."""
    keys = [c for c in (*HYPER, "setting") if c != param and c in frame and frame[c].nunique(dropna=True) == 1
            and not (c == "setting" and str(frame[c].dropna().iloc[0]) == "")]
    return _combo_label(keys, [frame[c].dropna().iloc[0] for c in keys]) if keys else None


def _files(frame: pd.DataFrame, keys: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(name suffix, rows) per combination of `keys`: "_h0.01_rho0.9", a setting by its number
    ("_setting2", in sorted order); [("", frame)] without keys."""
    if not keys:
        return [("", frame)]
    settings = sorted(frame["setting"].astype(str).unique()) if "setting" in keys else []
    out = []
    for key, g in frame.groupby(keys, dropna=False, sort=True):
        out.append(("_" + "_".join(f"setting{settings.index(str(v)) + 1}" if k == "setting" else f"{k}{v:g}"
                                   for k, v in zip(keys, _key(key))), g))
    return out


def _split(frame: pd.DataFrame, others: list[str], limit: int = MAX_SERIES) -> tuple[list[str], list[str]]:
    """(keys drawn one file each, keys drawn as series in one figure): the series keep at most `limit`
    combinations, or one key of any number of values (drawn with a colour bar); `setting` is the
    first to go to files, then the keys of fewest values."""
    series = sorted(others, key=lambda k: (k != "setting", frame[k].nunique(dropna=False)))
    files = []
    while len(series) > 1 and len(frame[series].drop_duplicates()) > limit:
        files.append(series.pop(0))
    return files, series


def _colours(values, qualitative: bool) -> tuple[dict, bool]:
    """A colour per value, and whether a colour bar must name them (more than MAX_SERIES values):
    the style's palette for a few unordered series, else viridis up to 0.85 (its last yellows
    vanish on white) in the values' order."""
    values = list(values)
    if len(values) > MAX_SERIES or not qualitative:
        cmap = plt.get_cmap("viridis")
        return {v: cmap(0.85 * i / max(len(values) - 1, 1)) for i, v in enumerate(values)}, len(values) > MAX_SERIES
    return {v: f"C{i}" for i, v in enumerate(values)}, False


def _colour_bar(fig, axes, values, colour: dict, name: str) -> None:
    """A colour bar of the series' values, one equal step each, labelled with the key's symbol; where
    its labels would be closer than 1.5 of their font size, every k-th value keeps its tick (and
    its label: none is left blank)."""
    values = list(values)
    cmap = matplotlib.colors.ListedColormap([colour[v] for v in values])
    norm = matplotlib.colors.BoundaryNorm(np.arange(len(values) + 1) - 0.5, len(values))
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), fraction=0.05, pad=0.02,
                       aspect=25)
    height = fig.get_figheight() * 0.7 * 72  # points the bar has, roughly
    every = max(1, int(np.ceil(1.5 * plt.rcParams["ytick.labelsize"] * len(values) / height))) \
        if isinstance(plt.rcParams["ytick.labelsize"], (int, float)) else 1
    ticks = list(range(len(values) - 1, -1, -every))[::-1]
    bar.set_ticks(ticks, labels=[_value_label(values[i]) for i in ticks])
    bar.ax.minorticks_off()
    bar.set_label(SYMBOL.get(name, name))


def _value_label(v) -> str:
    return f"{v:g}" if isinstance(v, (int, float, np.number)) else (str(v) or "(default)")


def _legend(fig, handles, labels) -> None:
    """One legend under the panels (a split figure's title is above them), in as many columns
    (at most 4) as fit the figure's width, measured."""
    if not labels:
        return
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(labels), 4), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=ncol)
        if ncol == 1 or legend.get_window_extent(renderer).width <= (fig.get_figwidth() - 0.1) * fig.dpi:
            return
        legend.remove()


def threshold_figure(summary: pd.DataFrame, param: str, threshold: float | None, out: Path,
                     metrics=("pert_norm", "test_acc"), name: str | None = None,
                     without_diverged: bool = False, reference: tuple[float, str] | None = None,
                     keep=()) -> list[Path]:
    """One panel per metric that some run has: its value at the first step with loss <
    threshold vs `param` (threshold None: `max_test_acc` and the like, over the whole run), one
    series per combination of the other swept hyperparameters; at most MAX_SERIES series in a
    figure or one key of more values (coloured by a colour bar), the others one file each
    (`_split`, `_files`: `<name>_h0.01`). `without_diverged`: diverged runs are left out and
    listed under the figure (limit points: a diverged run has none). `reference`: (value, label)
    of a horizontal line (the minimum one-norm of the toy's limit points). `keep`: keys of one
    value kept in the figure's CSV and title (a redrawn file of a split figure). No panel: no figure."""
    pairs = [(f"at_loss_{threshold:g}_{m}" if threshold is not None else m, m) for m in metrics]
    pairs = [(c, m) for c, m in pairs if c in summary and np.isfinite(pd.to_numeric(summary[c], errors="coerce")).any()]
    if not pairs:
        return []
    summary = _with_setting(summary)
    others = _others(summary, param)
    files, _ = _split(summary, others)
    data = summary[[c for c in ("run_id", "point_id", *others, *keep, param, "seed", "perturb_theta0", "state",
                                "regime", "eval_mode", *[c for c, _ in pairs]) if c in summary]]
    if reference is not None:  # analysis.redraw draws it again from the CSV
        data = data.assign(reference_one_norm=reference[0])
    name = name or f"at_loss_{threshold:g}_vs_{param}"
    made = []
    for suffix, rows in _files(data, files):
        made += _threshold_file(rows, param, pairs, threshold, out, name + suffix, without_diverged, reference)
    return made


def _threshold_file(data: pd.DataFrame, param: str, pairs, threshold, out: Path, name: str,
                    without_diverged: bool, reference) -> list[Path]:
    """One file of `threshold_figure`: one row of panels, the series and their legend or colour bar."""
    series = _others(data, param)
    shown, dropped = data, data.iloc[0:0]
    if without_diverged:
        gone = (data.get("state") == "diverged") | (data.get("regime") == "diverged")
        shown, dropped = data[~gone], data[gone]
    groups = list(shown.groupby(series if len(series) > 1 else series[0], dropna=False)) if series else [(None, shown)]
    one = len(series) == 1 and series[0] != "setting"
    colour, bar = _colours([k for k, _ in groups], qualitative=not one)
    fig, axes = plt.subplots(1, len(pairs), figsize=_size(min(3.3 * len(pairs), WIDTH), 2.7), squeeze=False,
                             layout="constrained")
    handles, notes = {}, set()
    for ax, (col, metric) in zip(axes[0], pairs):
        for key, g in groups:
            label = "all runs" if key is None else _combo_label(series, key)
            notes |= _series_points(ax, g.dropna(subset=[param]).sort_values(param), col, param, colour[key], label)
            handles.setdefault(label, matplotlib.lines.Line2D([], [], color=colour[key], marker="o"))
        if reference is not None:
            ax.axhline(reference[0], color="0.4", ls="--", lw=0.8)
            handles.setdefault(reference[1], matplotlib.lines.Line2D([], [], color="0.4", ls="--", lw=0.8))
        _xscale(ax, param, data[param].to_numpy(float))
        _yscale(ax, metric, pd.to_numeric(shown[col], errors="coerce").to_numpy(float))
        ax.set_xlabel(SYMBOL.get(param, param))
        ax.set_ylabel(axis_label(metric, shown))
        if threshold is not None:
            ax.set_title(f"at the first step with loss < {threshold:g}")
    if bar:
        _colour_bar(fig, axes[0], [k for k, _ in groups], colour, series[0])
        handles = {k: v for k, v in handles.items() if not any(k == _combo_label(series, g) for g, _ in groups)}
    handles.update(_threshold_notes(notes))
    if len(handles) > 1 or (series and not bar):
        _legend(fig, list(handles.values()), list(handles))
    title = _fixed(data, param)
    if title:
        fig.suptitle(title)
    if len(dropped):
        listed = "; ".join(_combo_label([param, *series], [r[param], *[r[o] for o in series]])
                           for _, r in dropped.iterrows())
        fig.text(0.01, -0.02, f"left out, diverged (no limit point): {listed}", fontsize=7, va="top", wrap=True)
    return _save(fig, out, name, shown)


def _series_points(ax, g: pd.DataFrame, col: str, param: str, colour, label: str) -> set:
    """One series of a threshold panel: its points joined by a line (repeats: their mean and spread,
    `_spread`), runs not finished as open markers. What the legend must explain ("repeats n",
    "unfinished")."""
    y = pd.to_numeric(g[col], errors="coerce")
    if not np.isfinite(y).any():
        return set()
    notes, done = set(), _finished(g).to_numpy()
    gid = f"series {label}"
    if g.groupby(param).size().max() > 1:  # repeats: one mean and its bar per x, never a line through runs
        notes |= {f"repeats {n}" for n in _spread(ax, g, y, param, colour, gid)}
    else:
        ax.plot(g[param], y, "-", color=colour, gid=gid)
        ax.plot(g[param][done], y[done], "o", color=colour, ls="")
    if (~done).any():
        notes.add("unfinished")
        ax.plot(g[param][~done], y[~done], "o", mfc="white", color=colour, ls="", zorder=4)
    return notes


def _threshold_notes(notes: set) -> dict:
    """The legend entries that explain a threshold panel's marks."""
    out = {}
    repeats = sorted(int(n.split()[1]) for n in notes if n.startswith("repeats"))
    if repeats:
        n = f"n = {repeats[0]}" if len(repeats) == 1 else f"n = {repeats[0]} to {repeats[-1]}"
        out[f"mean ± std over the repeats ({n})"] = matplotlib.lines.Line2D([], [], color="0.3", marker="o", ls="")
        out["faint: each repeat"] = matplotlib.lines.Line2D([], [], color="0.3", marker="o", ls="", alpha=0.3, ms=3)
        out["solid: adjacent means differ (Welch, p < 0.05)"] = matplotlib.lines.Line2D([], [], color="0.3")
        out["dotted: within the repeats' spread"] = matplotlib.lines.Line2D([], [], color="0.3", ls=":")
    if "unfinished" in notes:
        out["open marker: run not finished"] = matplotlib.lines.Line2D([], [], color="0.3", marker="o", mfc="white",
                                                                       ls="")
    return out


def _spread(ax, g: pd.DataFrame, y: pd.Series, param: str, colour, gid: str) -> set:
    """The repeats of one series: each repeat a faint point; per x one marker at the mean of the
    repeats that did not diverge and a bar of one standard deviation (analysis.groups.stats); the
    means joined by a solid line where Welch's t-test resolves the difference (p < ALPHA), a dotted
    one where it does not. The numbers of repeats drawn."""
    from .groups import ALPHA, diverged, stats, welch

    ax.plot(g[param], y, "o", color=colour, ls="", alpha=0.3, ms=3, zorder=1)
    kept = ~diverged(g).to_numpy()
    per_x = [(x, y[(g[param] == x).to_numpy() & kept]) for x in np.sort(g[param].unique())]
    per_x = [(x, v, stats(v)) for x, v in per_x if stats(v)["n"]]
    if not per_x:
        return set()
    xs = [x for x, _, _ in per_x]
    means = [s["mean"] for _, _, s in per_x]
    sds = [s["std"] if np.isfinite(s["std"]) else 0.0 for _, _, s in per_x]
    for (x0, v0, s0), (x1, v1, s1) in zip(per_x, per_x[1:]):
        p = welch(v0, v1)
        ax.plot([x0, x1], [s0["mean"], s1["mean"]], color=colour, lw=1, zorder=2, gid=gid,
                ls="-" if np.isfinite(p) and p < ALPHA else ":")
    ax.errorbar(xs, means, yerr=sds, fmt="o", color=colour, ms=4.5, capsize=2.5, elinewidth=1, zorder=3)
    return {s["n"] for _, _, s in per_x}


def curves_figure(curves: pd.DataFrame, param: str, out: Path,
                  metrics=("loss", "pert_norm"), name: str | None = None, keep=()) -> list[Path]:
    """Per-step curves (Figures 6-7): one row of panels, one per metric, one line per run coloured
    by `param` (a colour bar for more than MAX_SERIES values); log y; the perturbed-norm panel
    draws the floor p sqrt(eps) and each run's hill. One file per combination of the other swept
    hyperparameters (`_files`: curves_by_beta_rho0.9), titled by it. With repeats (runs of one
    point_id), one line per point: the median over its repeats at each step, and a band from
    their min to their max. `keep`: as threshold_figure's."""
    curves = _with_setting(curves)
    others = _others(curves, param)
    repeats = _repeat_counts(curves)
    line = "point_id" if repeats or "run_id" not in curves else "run_id"  # a redrawn CSV of repeats: point_id
    keys = [c for c in (line, *others, *keep, param) if c in curves]
    drawn = curves[curves["metric"].isin(metrics)]
    if repeats:  # the repeats of a point: their median per step, their min and max the band
        drawn = drawn.groupby([*keys, "metric", "step"], dropna=False)["value"].agg(
            value="median", lo="min", hi="max").reset_index()
    marks = curves[curves["metric"].isin(HILL_MARKS)] if not repeats else curves.iloc[0:0]
    shown = pd.concat([envelope(drawn, keys),
                       curves[curves["metric"] == "pert_norm_floor"].drop_duplicates(keys), marks], ignore_index=True)
    shown = shown[[c for c in (*keys, "metric", "step", "value", "lo", "hi") if c in shown]]
    made = []
    for suffix, rows in _files(shown, others):
        made += _curves_file(rows, param, out, (name or f"curves_by_{param}") + suffix, metrics, line, repeats)
    return made


def _curves_file(shown: pd.DataFrame, param: str, out: Path, name: str, metrics, line: str, repeats: set):
    """One file of `curves_figure`: a row of panels (one per metric) over the same steps."""
    values = np.sort(shown[param].dropna().unique()) if param in shown else np.array([])
    color, bar = _colours(values, qualitative=False)
    fig, axes = plt.subplots(1, len(metrics), figsize=_size(min(3.3 * len(metrics), WIDTH), 2.7), squeeze=False,
                             sharex=True, layout="constrained")
    clipped = banded = False
    for ax, metric in zip(axes[0], metrics):
        sub = shown[shown["metric"] == metric]
        for (_rid, v), g in sub.groupby([line, param], dropna=False):
            c = color.get(v, "gray")
            if repeats or _visible_band(g, metric in LOG_METRICS):
                ax.fill_between(g["step"], g["lo"], g["hi"], color=c, alpha=0.22, lw=0)
                banded = True
            ax.plot(g["step"], g["value"], color=c, lw=0.8, gid=f"series {param}={v}")
        if metric == "pert_norm":
            _floor_and_hills(ax, shown, param, color)
        if metric == "eos_ratio":  # the edge of stability (pipeline.thresholds.eos_threshold)
            ax.axhline(1.0, color="gray", ls="--", lw=1)
        clipped |= _curve_yscale(ax, metric, sub["value"])
        ax.set_xlabel("step (full-batch epoch)")
        ax.set_ylabel(LABEL.get(metric, metric))
    if bar:
        _colour_bar(fig, axes[0], values, color, param)
    handles, labels = _curves_legend(shown, param, [] if bar else values, color, metrics, repeats, banded, clipped)
    _legend(fig, handles, labels)
    title = _fixed(shown, param)
    if title:
        fig.suptitle(title)
    return _save(fig, out, name, shown)


def _floor_and_hills(ax, sel: pd.DataFrame, param: str, color: dict) -> None:
    """A perturbed-norm panel's floor p sqrt(eps) (dotted) and each run's hill (analysis.summary.hill):
    its trough and its peak as open triangles in the run's colour."""
    floor = sel.loc[sel["metric"] == "pert_norm_floor", "value"]
    if len(floor):
        ax.axhline(float(floor.iloc[0]), color="gray", ls=":", lw=1)
    for kind, m in HILL_MARKS.items():
        pts = sel[sel["metric"] == kind]
        if len(pts):
            ax.scatter(pts["step"], pts["value"], marker=m, s=14, zorder=3, linewidths=0.6,
                       facecolors="white", edgecolors=[color.get(v, "gray") for v in pts[param]])


def _curves_legend(shown, param, values, color, metrics, repeats, banded, clipped) -> tuple[list, list]:
    handles = [matplotlib.lines.Line2D([], [], color=color[v], lw=1.5) for v in values]
    labels = [f"{SYMBOL.get(param, param)}={v:g}" for v in values]
    if "pert_norm" in metrics and (shown["metric"] == "pert_norm_floor").any():
        handles.append(matplotlib.lines.Line2D([], [], color="gray", ls=":", lw=1))
        labels.append(r"floor $p\sqrt{\varepsilon}$")
    if "eos_ratio" in metrics:
        handles.append(matplotlib.lines.Line2D([], [], color="gray", ls="--", lw=1))
        labels.append("stability threshold (eos_threshold)")
    if shown["metric"].isin(HILL_MARKS).any():
        handles.append(matplotlib.lines.Line2D([], [], color="0.3", marker="v", mfc="white", ls="", ms=4))
        labels.append("hill's trough ▽ and peak △ (after loss ≤ 5 % of its start)")
    if repeats:
        n = f"{min(repeats)}" if len(repeats) == 1 else f"{min(repeats)} to {max(repeats)}"
        handles.append(matplotlib.patches.Patch(color="0.5", alpha=0.3, lw=0))
        labels.append(f"line: median of {n} repeats; band: their min to max")
    elif banded:
        handles.append(matplotlib.patches.Patch(color="0.5", alpha=0.3, lw=0))
        labels.append(f"band: min to max over each of ≤{CURVE_POINTS} windows of steps")
    if clipped:
        handles.append(matplotlib.lines.Line2D([], [], ls=""))
        labels.append(f"loss axis cut at {LOSS_FLOOR:g}")
    return handles, labels


HILL_MARKS = {"hill_trough": "v", "hill_peak": "^"}  # rows of a curves figure's data: where each run's hill is


def eos_curves(summary: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Rows in the curves frame's shape (metric eos_ratio): each recorded pre_sharpness divided by
    its run's stability threshold (summary.csv's eos_threshold): 1 is the edge of stability of
    every run alike, whatever its h and beta."""
    if "eos_threshold" not in summary or curves.empty:
        return curves.iloc[0:0]
    thr = summary.set_index("run_id")["eos_threshold"]
    pre = curves[curves["metric"] == "pre_sharpness"]
    ratio = pre["value"] / pre["run_id"].map(thr)
    return pre.assign(metric="eos_ratio", value=ratio).dropna(subset=["value"])


def hill_marks(summary: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Rows in the curves frame's shape (metric hill_trough / hill_peak, the step, the perturbed
    norm there) for every run with a hill (summary.csv's hill_trough_step, hill_peak_step)."""
    if "hill_trough_step" not in summary or curves.empty:
        return curves.iloc[0:0]
    norm = curves[curves["metric"] == "pert_norm"]
    out = []
    for _, r in summary.dropna(subset=["hill_trough_step", "hill_peak_step"]).iterrows():
        run = norm[norm["run_id"] == r["run_id"]]
        for kind, col in (("hill_trough", "hill_trough_step"), ("hill_peak", "hill_peak_step")):
            at = run[run["step"] == r[col]]
            if len(at):
                out.append(at.iloc[:1].assign(metric=kind))
    return pd.concat(out, ignore_index=True) if out else curves.iloc[0:0]


def _repeat_counts(curves: pd.DataFrame) -> set:
    """The numbers of runs per point_id when some point has more than one (repeats), else empty."""
    if "point_id" not in curves or "run_id" not in curves or curves["point_id"].isna().all():
        return set()
    counts = curves.dropna(subset=["point_id"]).groupby("point_id")["run_id"].nunique()
    return set(counts.tolist()) if counts.max() > 1 else set()


CURVE_POINTS = 500  # a curve of more steps is drawn (and saved) as this many windows: median, min, max
LOG_METRICS = ("loss", "pert_norm", "l1_norm", "l2_norm")


def envelope(curves: pd.DataFrame, keys: list[str], points: int = CURVE_POINTS) -> pd.DataFrame:
    """Each (run, metric) curve in at most `points` windows of consecutive steps: the window's
    middle step, its median value and its min and max (`lo`, `hi`: the band an oscillation fills,
    which a line at print resolution would render as a solid block). A curve of `points` steps or
    fewer is kept as it is (lo = hi = value); `lo`/`hi` already there (a figure's own CSV) are kept."""
    out = []
    for _, g in curves.groupby([*keys, "metric"], dropna=False, sort=False):
        g = g.sort_values("step")
        lo = g["lo"] if "lo" in g else g["value"]
        hi = g["hi"] if "hi" in g else g["value"]
        if len(g) <= points:
            out.append(g.assign(lo=lo.to_numpy(), hi=hi.to_numpy()))
            continue
        window = np.arange(len(g)) * points // len(g)
        w = pd.DataFrame(dict(step=g["step"].to_numpy(), value=g["value"].to_numpy(), lo=lo.to_numpy(),
                              hi=hi.to_numpy(), window=window)).groupby("window")
        binned = pd.DataFrame(dict(step=w["step"].median(), value=w["value"].median(), lo=w["lo"].min(),
                                   hi=w["hi"].max()))
        first = g.iloc[0]
        out.append(binned.assign(**{k: first[k] for k in (*keys, "metric")}).reset_index(drop=True))
    cols = [*keys, "metric", "step", "value", "lo", "hi"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def _visible_band(g: pd.DataFrame, log: bool) -> bool:
    """Whether a curve oscillates within its windows: in some window the min-max band is wider
    than its line (10% of the value on a log axis, 1% of the curve's range on a linear one) and
    more than twice the change of the median to the neighbouring windows (a steep but steady
    descent also spans a range within a window; that is the line's own slope, not a band)."""
    if "lo" not in g or len(g) < 3:
        return False
    f = (lambda v: np.log10(np.clip(v.to_numpy(float), 1e-300, None))) if log else (lambda v: v.to_numpy(float))
    lo, hi, mid = f(g["lo"]), f(g["hi"]), f(g["value"])
    width = hi - lo
    trend = np.abs(np.diff(mid))
    slope = np.maximum(np.r_[trend, 0.0], np.r_[0.0, trend])  # the larger step to a neighbour
    floor = 0.04 if log else 0.01 * (float(np.ptp(mid)) or 1.0)
    return bool(((width > floor) & (width > 2 * slope)).any())


def _curve_yscale(ax, metric: str, values: pd.Series) -> bool:
    """A log axis for the norms and the loss (zeros dropped), the loss cut at LOSS_FLOOR; whether
    it was cut."""
    if metric not in LOG_METRICS or not (values > 0).any():
        return False
    ax.set_yscale("log")
    positive = values[values > 0]
    if metric != "loss" or positive.max() / positive.min() < 100:  # a loss over many decades: 10^k labels
        _plain_log_labels(ax)
    if metric != "loss":
        return False
    if (values < LOSS_FLOOR).any():
        ax.set_ylim(bottom=LOSS_FLOOR)
        return True
    return False


def _plain_log_labels(ax) -> None:
    """A log y axis labelled 0.01, 3, 20 rather than 10^-2, 3x10^0, 2x10^1; where it spans less
    than two decades its 2s and 5s labelled too, less than one its 3s, less than half of one every
    minor tick."""
    lo, hi = ax.get_ylim()
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if 1e-4 <= v < 1e5 else f"$10^{{{np.log10(v):.0f}}}$")
    ax.yaxis.set_major_formatter(plain)
    span = hi / lo if lo > 0 else np.inf  # labels at least ~0.05 of a decade apart in the narrowest case
    digits = "23456789" if span < 3.2 else "235" if span < 10 else "25" if span < 100 else ""
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in digits and 1e-4 <= v < 1e5 else ""))


def trajectories_figure(curves: pd.DataFrame, param: str, out: Path, minima: float | None = None,
                        name: str | None = None, keep=()) -> list[Path]:
    """The θ-plane of a two-parameter model (Figures 2-3): each run's path (θ_1, θ_2) from θ_0,
    coloured by `param`, one panel per combination of the other swept hyperparameters (at most
    MAX_SERIES in a figure of up to three columns; more: one file per value of the first keys,
    `_files`), its end point marked; with `minima` = c the hyperbola θ_1 θ_2 = c of the minima and
    its point of smallest one-norm (√c, √c). `keep`: as threshold_figure's."""
    sel = curves[curves["metric"].isin(["theta_0", "theta_1"])]
    if sel.empty:
        return []
    sel = _with_setting(_thinned(sel))
    others = _others(sel, param)
    panels, files = list(others), []
    while panels and len(sel[panels].drop_duplicates()) > MAX_SERIES:
        files.append(panels.pop(0))
    cols = [c for c in ("run_id", *others, *keep, param, "step", "metric", "value") if c in sel]
    made = []
    for suffix, rows in _files(sel[cols].assign(minima=minima), files):
        made += _trajectories_file(rows, param, out, (name or f"trajectories_by_{param}") + suffix, minima)
    return made


def _trajectories_file(sel: pd.DataFrame, param: str, out: Path, name: str, minima: float | None) -> list[Path]:
    """One file of `trajectories_figure`."""
    others = _others(sel, param)
    combos = (list(sel[others].drop_duplicates().sort_values(others).itertuples(index=False, name=None))
              if others else [None])
    values = np.sort(sel[param].dropna().unique())
    color, bar = _colours(values, qualitative=False)
    ncol = min(3, len(combos))
    nrow = -(-len(combos) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=_size(min(2.3 * ncol + 0.3, WIDTH), 2.2 * nrow + 0.5),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    wide = sel.pivot_table(index=["run_id", "step"], columns="metric", values="value").reset_index()
    keys = sel.drop_duplicates("run_id").set_index("run_id")[[param, *others]]
    box = []
    for c in ("theta_0", "theta_1"):  # the paths' extent (and the minimal point), 5% around it
        lo, hi = np.nanmin([wide[c].min(), np.sqrt(minima or 1)]), np.nanmax([wide[c].max(), np.sqrt(minima or 1)])
        box.append((lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)))
    for ax, key in zip(axes.flat, combos):
        for rid, g in wide.groupby("run_id"):
            k = keys.loc[rid]
            if key is not None and tuple(k[others]) != tuple(np.atleast_1d(key)):
                continue
            c = color.get(k[param], "gray")
            ax.plot(g["theta_0"], g["theta_1"], color=c, lw=0.8, gid=f"series {param}={k[param]}")
            ax.plot(g["theta_0"].iloc[-1], g["theta_1"].iloc[-1], "o", color=c, ms=3)
        if minima:
            _minima(ax, minima, box)
        ax.set_xlim(*box[0])
        ax.set_ylim(*box[1])
        ax.set_title(_combo_label(others, key) if key is not None else "")
    for ax in axes.flat[len(combos):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(r"$\theta_1$")
    for ax in axes[:, 0]:
        ax.set_ylabel(r"$\theta_2$")
    handles = [] if bar else [matplotlib.lines.Line2D([], [], color=color[v]) for v in values]
    labels = [] if bar else [f"{SYMBOL.get(param, param)}={v:g}" for v in values]
    handles.append(matplotlib.lines.Line2D([], [], color="black", marker="o", ls="", ms=3))
    labels.append("last iterate")
    if minima:
        handles += [matplotlib.lines.Line2D([], [], color="0.5", ls="--"),
                    matplotlib.lines.Line2D([], [], color="black", marker="x", ls="")]
        labels += [rf"minima $\theta_1\theta_2={minima:g}$", r"smallest $|\theta|_1$ among them"]
    if bar:
        _colour_bar(fig, axes.flat, values, color, param)
    _legend(fig, handles, labels)
    title = _fixed(sel, param)
    if title:
        fig.suptitle(title)
    return _save(fig, out, name, sel)


def _minima(ax, minima: float, box) -> None:
    """Both branches of the hyperbola θ_1 θ_2 = minima inside the box of the paths, and its point of
    smallest one-norm."""
    x = np.linspace(*box[0], 400)
    with np.errstate(divide="ignore"):
        y = np.where(np.abs(x) > 1e-9, minima / x, np.nan)
    y[(y < box[1][0]) | (y > box[1][1])] = np.nan
    ax.plot(x, y, color="0.5", lw=0.8, ls="--", zorder=0)
    ax.plot([np.sqrt(minima)], [np.sqrt(minima)], "x", color="black", ms=5)


PATH_POINTS = 500  # a path is drawn (and saved) with a point every 1/PATH_POINTS of its box's diagonal


def _thinned(sel: pd.DataFrame, points: int = PATH_POINTS) -> pd.DataFrame:
    """The θ-paths (long: metric theta_0/theta_1) with a point kept each time a path is more than
    1/`points` of the paths' box diagonal (a pixel or two) from the last point kept, and every
    path's first and last point: what a figure can show of 4,000 steps, in a CSV that stays small."""
    wide = sel.pivot_table(index=["run_id", "step"], columns="metric", values="value").sort_index()
    step = float(np.hypot(np.ptp(wide["theta_0"]), np.ptp(wide["theta_1"]))) / points or 1.0
    keep = []
    for rid, g in wide.groupby(level="run_id"):
        xy, steps = g[["theta_0", "theta_1"]].to_numpy(), g.index.get_level_values("step")
        last = 0
        keep.append((rid, steps[0]))
        for i in range(1, len(xy)):
            if i == len(xy) - 1 or np.hypot(*(xy[i] - xy[last])) > step:
                keep.append((rid, steps[i]))
                last = i
    index = pd.MultiIndex.from_tuples(keep, names=["run_id", "step"])
    return sel[pd.MultiIndex.from_frame(sel[["run_id", "step"]]).isin(index)]


# Okabe-Ito: colour-blind safe; "mixed": the repeats of a cell do not share one regime
REGIMES = {"stable": "#009E73", "spiky": "#E69F00", "diverged": "#000000", "mixed": "#CC79A7"}
MAP_MIN = 3  # a beta x rho map needs at least this many values of each
MAP_LOG_SPAN = 5.0  # a heatmap's colours are logarithmic when its positive values span more than this factor
NO_VALUE = "0.85"  # the colour of a cell without a value


def regime_map_figure(summary: pd.DataFrame, threshold: float, out: Path, name: str = "regime_map") -> list[Path]:
    """The phase diagram of a dense beta x rho grid (conf/sweep/regime.yaml): heatmaps over
    beta (rows) and rho (columns), one cell per run, of its regime (stable / spiky / diverged,
    analysis.summary.regime), the hill height of the perturbed one-norm, and the perturbed
    one-norm and test accuracy at the first step with loss < `threshold`; the line beta = rho
    drawn; a grey cell: no value (the loss never went below the threshold, or no run). One
    figure per combination of the other swept hyperparameters; none unless beta and rho each
    take MAP_MIN values or more."""
    if not {"beta", "rho"} <= set(summary) or min(summary["beta"].nunique(), summary["rho"].nunique()) < MAP_MIN:
        return []
    summary = _with_setting(summary)
    others = [c for c in _others(summary, "beta") if c != "rho"]
    made = []
    for suffix, g in _files(summary, others):
        made += regime_map(g, threshold, out, name + suffix)
    return made


def _cells(g: pd.DataFrame, columns) -> pd.DataFrame:
    """One row per (beta, rho) cell: with repeats, each numeric column's mean over the repeats that
    did not diverge (analysis.groups.stats), the regime they share or `mixed`, and `n` runs."""
    from .groups import diverged, stats

    rows = []
    for (b, r), c in g.groupby(["beta", "rho"]):
        kept = c[~diverged(c)]
        row = dict(beta=b, rho=r, n=len(c))
        for col in columns:
            if col == "regime":
                regimes = set(c["regime"].dropna()) - {""}
                row[col] = regimes.pop() if len(regimes) == 1 else "mixed" if regimes else ""
            else:
                row[col] = stats(kept[col])["mean"]
        rows.append(row)
    return pd.DataFrame(rows)


def regime_map(g: pd.DataFrame, threshold: float, out: Path, name: str) -> list[Path]:
    """One file of `regime_map_figure` (and its redraw from the CSV)."""
    title = _fixed(g, "beta")
    betas, rhos = np.sort(g["beta"].dropna().unique()), np.sort(g["rho"].dropna().unique())
    runs = g
    n = g.groupby(["beta", "rho"]).size()
    g = _cells(g, [c for c in ("regime", "hill_height", f"at_loss_{threshold:g}_pert_norm",
                               f"at_loss_{threshold:g}_test_acc", "eos_ratio_max") if c in g])
    if n.max() > 1:  # repeats: each cell is their mean (regime: the one they share, or mixed)
        title = (title + "; " if title else "") + (f"mean of {n.min()} repeats per cell" if n.min() == n.max()
                                                   else f"mean of {n.min()} to {n.max()} repeats per cell")
    where = {(b, r): i for i, (b, r) in enumerate(zip(g["beta"], g["rho"]))}
    panels = [("regime", "regime"), ("hill_height", LABEL["hill_height"]),
              (f"at_loss_{threshold:g}_pert_norm", LABEL["pert_norm"] + f" at loss < {threshold:g}"),
              (f"at_loss_{threshold:g}_test_acc",
               axis_label("test_acc", runs).replace("\n", " ", 1) + f" at loss < {threshold:g}"),
              ("eos_ratio_max", LABEL["eos_ratio_max"])]
    panels = [(c, t) for c, t in panels
              if c in g and (c == "regime" or pd.to_numeric(g[c], errors="coerce").notna().any())]
    rows = 1 if len(panels) < 3 else 2
    cols = -(-len(panels) // rows)  # five or six panels: two rows of three, as wide as a page
    fig, axes = plt.subplots(rows, cols, figsize=_size(min(3.2 * cols, WIDTH), 2.6 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    seen, blank = set(), False
    for ax, (col, label) in zip(axes.flat, panels):
        grid = np.full((len(betas), len(rhos)), np.nan)
        for (b, r), i in where.items():
            v = g[col].iloc[i]
            grid[np.searchsorted(betas, b), np.searchsorted(rhos, r)] = (
                list(REGIMES).index(v) if col == "regime" and v in REGIMES else
                np.nan if col == "regime" else pd.to_numeric(v, errors="coerce"))
        seen |= _map_panel(fig, ax, grid, col, betas, rhos, stride=2 if cols > 2 and len(rhos) > 8 else 1)
        blank |= bool(np.isnan(grid).any())
        ax.set_title(label)
    if title:
        fig.suptitle(title)
    legend = [(matplotlib.patches.Patch(color=c), r) for r, c in REGIMES.items() if r in seen]
    if blank:  # no legend entry without a cell to show it
        legend.append((matplotlib.patches.Patch(color=NO_VALUE),
                       f"no value (loss never < {threshold:g}, no hill, or no run)"))
    legend.append((matplotlib.lines.Line2D([], [], color="0.2", ls="--", lw=0.8), r"$\beta = \rho$"))
    _legend(fig, *map(list, zip(*legend)))
    data = runs[[c for c in ("run_id", "point_id", "setting", "h", "eps", "beta", "rho", "seed", "perturb_theta0",
                             "state",
                             *[c for c, _ in panels]) if c in runs]]
    return _save(fig, out, name, data.sort_values(["beta", "rho"]))


def _map_panel(fig, ax, grid: np.ndarray, col: str, betas, rhos, stride: int = 1) -> set:
    """One heatmap of the regime map: the regimes in their colours, a metric in viridis (log where
    its values span more than MAP_LOG_SPAN) with its colour bar; the line beta = rho; the regimes
    drawn (for the legend). `stride` 2: a tick and label at every other rho (a narrow panel), the
    last one always."""
    seen = set()
    if col == "regime":
        cmap = matplotlib.colors.ListedColormap(list(REGIMES.values()))
        ax.pcolormesh(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(REGIMES) - 0.5)
        seen = {list(REGIMES)[int(v)] for v in grid[np.isfinite(grid)]}
    else:
        finite = grid[np.isfinite(grid)]
        log = "acc" not in col and len(finite) and finite.min() > 0 and finite.max() / finite.min() > MAP_LOG_SPAN
        mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap="viridis",
                             norm=matplotlib.colors.LogNorm() if log else None)
        bar = fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.03)
        if log:  # plain numbers (2, 5, 20), not 2 x 10^0
            _plain_log_labels(bar.ax)
    ax.set_facecolor(NO_VALUE)
    same = [(list(rhos).index(v) + 0.5, list(betas).index(v) + 0.5) for v in betas if v in set(rhos)]
    if len(same) > 1:
        ax.plot(*zip(*same), color="white", lw=1.6)
        ax.plot(*zip(*same), color="0.2", lw=0.8, ls="--")
    at = sorted({*range(len(rhos) - 1, -1, -stride)})
    ax.set_xticks(np.asarray(at) + 0.5, [f"{rhos[i]:g}" for i in at], rotation=90)
    ax.set_yticks(np.arange(len(betas)) + 0.5, [f"{v:g}" for v in betas])
    ax.tick_params(length=0)
    ax.grid(False)
    ax.set_xlabel(SYMBOL["rho"])
    ax.set_ylabel(SYMBOL["beta"])
    ax.set_aspect("equal")
    return seen


WHOLE_RUN = {"max_test_acc": "max_test_acc", "hill_height": "hill"}  # a whole-run figure is named by what it holds


def _whole_run_name(summary: pd.DataFrame) -> str:
    """max_test_acc_hill, max_test_acc or hill: the metrics over the whole run that some run has
    (the toy has no test set: its figure holds the hill alone and is named so)."""
    held = [short for col, short in WHOLE_RUN.items()
            if col in summary and pd.to_numeric(summary[col], errors="coerce").notna().any()]
    return "_".join(held) or "max_test_acc_hill"


def all_figures(summary: pd.DataFrame, curves: pd.DataFrame, out: Path, thresholds,
                params: list[str], style: str = "paper", limit_reference: float | None = None) -> list[Path]:
    """Every figure of a sweep. `limit_reference`: the smallest one-norm a limit point can have
    (the bilinear toy: 2 sqrt(y/x) on the hyperbola of minima), drawn in the limit figures."""
    use_style(style)
    made = regime_map_figure(summary, min(thresholds), out) if thresholds else []
    for param in params:
        for t in thresholds:
            made += threshold_figure(summary, param, t, out)
        made += threshold_figure(summary, param, None, out, metrics=("max_test_acc", "hill_height"),
                                 name=f"{_whole_run_name(summary)}_vs_{param}")
        eos = eos_curves(summary, curves)  # runs with train.sharpness_every: a third panel
        made += curves_figure(pd.concat([curves, hill_marks(summary, curves), eos], ignore_index=True), param, out,
                              metrics=("loss", "pert_norm", "eos_ratio") if len(eos) else ("loss", "pert_norm"))
        if "limit_one_norm" in summary:  # few-parameter models (Figures 2-3): where the runs end
            ref = (limit_reference, f"smallest one-norm of a minimum: {limit_reference:.4g}") if limit_reference \
                else None
            made += threshold_figure(summary, param, None, out, metrics=("limit_one_norm",),
                                     name=f"limit_one_norm_vs_{param}", without_diverged=True, reference=ref)
            made += trajectories_figure(curves, param, out, (limit_reference / 2) ** 2 if limit_reference else None)
    return made
