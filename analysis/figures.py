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
import matplotlib.lines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SYMBOL = {"beta": r"$\beta$", "rho": r"$\rho$", "h": r"$h$", "eps": r"$\varepsilon$"}
LABEL = {"pert_norm": r"$\|\nabla E(\theta)\|_{1,\varepsilon}$", "loss": "training loss",
         "test_acc": "test accuracy", "acc": "training accuracy", "l1_norm": r"$\|\nabla E\|_1$",
         "l2_norm": r"$\|\nabla E\|_2$", "bias_norm": "norm of the bias term (3)",
         "max_test_acc": "max test accuracy", "limit_one_norm": r"$|\theta_1| + |\theta_2|$ at the end",
         "hill_height": r"hill height of $\|\nabla E\|_{1,\varepsilon}$"}


HYPER = ("beta", "rho", "h", "eps")


def _save(fig, out: Path, name: str, data: pd.DataFrame) -> list[Path]:
    """`name`.png and .pdf, and the figure's data as `name`.csv beside them (to redraw it)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf", out / f"{name}.csv"]
    for p in paths[:2]:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    data.to_csv(paths[2], index=False)
    return paths


def _others(frame: pd.DataFrame, param: str) -> list[str]:
    """The swept hyperparameters other than `param` (more than one value among the runs)."""
    return [c for c in HYPER if c != param and c in frame and frame[c].nunique(dropna=True) > 1]


def _combo_label(names, values) -> str:
    return ", ".join(f"{SYMBOL.get(o, o)}={v:g}" for o, v in zip(names, np.atleast_1d(values)))


def _xscale(ax, param, values):
    values = np.unique(np.asarray(values, float)[np.isfinite(values)])
    if param in ("h", "eps"):
        ax.set_xscale("log")
    elif param in ("beta", "rho") and len(values) and np.nanmax(values) > 0.99:
        # 0.9, 0.99, 0.999 ... spread out as the paper's axes do: 1 - x on a log scale
        ax.set_xscale("function", functions=(lambda x: -np.log10(np.clip(1 - x, 1e-12, None)),
                                             lambda y: 1 - 10.0 ** (-y)))
    if param in ("beta", "rho") and 0 < len(values) <= 12:  # a tick at each value, never overlapping
        ax.set_xticks(values, [f"{v:g}" for v in values], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if len(values) > 4:
            ax.tick_params(axis="x", labelrotation=45)
            for lab in ax.get_xticklabels():
                lab.set_horizontalalignment("right")


def threshold_figure(summary: pd.DataFrame, param: str, threshold: float | None, out: Path,
                     metrics=("pert_norm", "test_acc"), name: str | None = None,
                     without_diverged: bool = False) -> list[Path]:
    """One panel per metric: value at the first step with loss < threshold vs `param`, one
    line per combination of the other swept hyperparameters (threshold None: `max_test_acc`
    and the like, taken over the whole run). `without_diverged`: diverged runs are left out
    and listed under the figure (limit points: a diverged run has none)."""
    cols = [f"at_loss_{threshold:g}_{m}" if threshold is not None else m for m in metrics]
    others = _others(summary, param)
    shown = summary
    dropped = pd.DataFrame()
    if without_diverged:
        gone = (summary.get("state") == "diverged") | (summary.get("regime") == "diverged")
        shown, dropped = summary[~gone], summary[gone]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
    groups = shown.groupby(others, dropna=False) if others else [(None, shown)]
    for ax, col, metric in zip(axes[0], cols, metrics):
        for key, g in groups:
            g = g.dropna(subset=[param]).sort_values(param)
            y = g[col] if col in g else pd.Series(np.nan, index=g.index)
            ax.plot(g[param], y, "o-", label=None if key is None else _combo_label(others, key))
        _xscale(ax, param, summary[param].to_numpy(float))
        ax.set_xlabel(SYMBOL.get(param, param))
        ax.set_ylabel(LABEL.get(metric, metric))
        if threshold is not None:
            ax.set_title(f"first step with loss < {threshold:g}", fontsize=9)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if len(dropped):
        listed = "; ".join(_combo_label([param, *others], [r[param], *[r[o] for o in others]])
                           for _, r in dropped.iterrows())
        fig.text(0.01, -0.02, f"left out, diverged (no limit point): {listed}", fontsize=7,
                 va="top", wrap=True)
    data = shown[[c for c in ("run_id", *others, param, *cols) if c in shown]]
    return _save(fig, out, name or f"at_loss_{threshold:g}_vs_{param}", data)


def curves_figure(curves: pd.DataFrame, param: str, out: Path,
                  metrics=("loss", "pert_norm"), name: str | None = None) -> list[Path]:
    """Per-step curves as small multiples (Figures 6-7): one row of panels per combination of
    the other swept hyperparameters, one column per metric (shared axes), one line per run
    coloured by `param`; log y; the perturbed-norm panels draw the floor p sqrt(eps)."""
    others = _others(curves, param)
    combos = (list(curves[others].drop_duplicates().sort_values(others).itertuples(index=False, name=None))
              if others else [None])
    values = np.sort(curves[param].dropna().unique()) if param in curves else np.array([])
    cmap = plt.get_cmap("viridis")
    color = {v: cmap(i / max(len(values) - 1, 1)) for i, v in enumerate(values)}
    fig, axes = plt.subplots(len(combos), len(metrics), figsize=(4.4 * len(metrics), 2.5 * len(combos) + 0.8),
                             squeeze=False, sharex=True, sharey="col")
    shown = curves[curves["metric"].isin([*metrics, "pert_norm_floor"])]
    for i, key in enumerate(combos):
        sel = shown
        for o, v in zip(others, np.atleast_1d(key) if key is not None else []):
            sel = sel[sel[o] == v]
        for ax, metric in zip(axes[i], metrics):
            sub = sel[sel["metric"] == metric]
            for (_rid, v), g in sub.groupby(["run_id", param], dropna=False):
                ax.plot(g["step"], g["value"], color=color.get(v, "gray"), lw=1)
            floor = sel.loc[sel["metric"] == "pert_norm_floor", "value"]
            if metric == "pert_norm" and len(floor):
                ax.axhline(float(floor.iloc[0]), color="gray", ls=":", lw=1)
            if metric in ("loss", "pert_norm", "l1_norm", "l2_norm") and (sub["value"] > 0).any():
                ax.set_yscale("log")  # zeros are dropped
            if i == 0 or key is not None:
                ax.set_title(_combo_label(others, key) if key is not None else "", fontsize=8)
            if i == len(combos) - 1:
                ax.set_xlabel("step (full-batch epoch)")
        axes[i, 0].set_ylabel(LABEL.get(metrics[0], metrics[0]))
        if len(metrics) > 1:
            axes[i, 1].set_ylabel(LABEL.get(metrics[1], metrics[1]))
    handles = [matplotlib.lines.Line2D([], [], color=color[v], lw=1.5) for v in values]
    labels = [f"{SYMBOL.get(param, param)}={v:g}" for v in values]
    if "pert_norm" in metrics and (shown["metric"] == "pert_norm_floor").any():
        handles.append(matplotlib.lines.Line2D([], [], color="gray", ls=":", lw=1))
        labels.append(r"floor $p\sqrt{\varepsilon}$")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    cols = [c for c in ("run_id", *others, param, "step", "metric", "value") if c in shown]
    return _save(fig, out, name or f"curves_by_{param}", shown[cols])


def all_figures(summary: pd.DataFrame, curves: pd.DataFrame, out: Path, thresholds,
                params: list[str]) -> list[Path]:
    made = []
    for param in params:
        for t in thresholds:
            made += threshold_figure(summary, param, t, out)
        made += threshold_figure(summary, param, None, out, metrics=("max_test_acc", "hill_height"),
                                 name=f"max_test_acc_hill_vs_{param}")
        made += curves_figure(curves, param, out)
        if "limit_one_norm" in summary:  # few-parameter models (Figures 2-3): where the runs end
            made += threshold_figure(summary, param, None, out, metrics=("limit_one_norm",),
                                     name=f"limit_one_norm_vs_{param}", without_diverged=True)
    return made
