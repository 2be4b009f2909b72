"""The paper's figures from a summary and a curves frame (matplotlib, PNG and PDF).

- `threshold_figure`: a metric at a loss-threshold crossing vs a hyperparameter
  (Figure 4: perturbed one-norm and test accuracy vs rho; Figure 5: vs beta;
  Figure 6 bottom: test accuracy at the crossing vs beta).
- `curves_figure`: training loss and perturbed one-norm per step, coloured by a
  hyperparameter (Figures 6 and 7).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SYMBOL = {"beta": r"$\beta$", "rho": r"$\rho$", "h": r"$h$", "eps": r"$\varepsilon$"}
LABEL = {"pert_norm": r"$\|\nabla E(\theta)\|_{1,\varepsilon}$", "loss": "training loss",
         "test_acc": "test accuracy", "acc": "training accuracy", "l1_norm": r"$\|\nabla E\|_1$",
         "l2_norm": r"$\|\nabla E\|_2$", "bias_norm": "norm of the bias term (3)",
         "max_test_acc": "max test accuracy", "limit_one_norm": r"$|\theta_1| + |\theta_2|$ at the end",
         "hill_height": r"hill height of $\|\nabla E\|_{1,\varepsilon}$"}


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _xscale(ax, param, values):
    if param in ("h", "eps"):
        ax.set_xscale("log")
    elif param in ("beta", "rho") and len(values) and np.nanmax(values) > 0.99:
        # 0.9, 0.99, 0.999 ... spread out as the paper's axes do: 1 - x on a log scale
        ax.set_xscale("function", functions=(lambda x: -np.log10(np.clip(1 - x, 1e-12, None)),
                                             lambda y: 1 - 10.0 ** (-y)))


def threshold_figure(summary: pd.DataFrame, param: str, threshold: float | None, out: Path,
                     metrics=("pert_norm", "test_acc"), name: str | None = None) -> list[Path]:
    """One panel per metric: value at the first step with loss < threshold vs `param`
    (threshold None: `max_test_acc` and the like, taken over the whole run)."""
    cols = [f"at_loss_{threshold:g}_{m}" if threshold is not None else m for m in metrics]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4), squeeze=False)
    others = [c for c in ("beta", "rho", "h") if c != param and c in summary
              and summary[c].nunique() > 1]
    groups = summary.groupby(others, dropna=False) if others else [(None, summary)]
    for ax, col, metric in zip(axes[0], cols, metrics):
        for key, g in groups:
            g = g.dropna(subset=[param]).sort_values(param)
            y = g[col] if col in g else pd.Series(np.nan, index=g.index)
            label = None if key is None else ", ".join(
                f"{SYMBOL.get(o, o)}={v:g}" for o, v in zip(others, np.atleast_1d(key)))
            ax.plot(g[param], y, "o-", label=label)
        _xscale(ax, param, summary[param].to_numpy(float))
        ax.set_xlabel(SYMBOL.get(param, param))
        ax.set_ylabel(LABEL.get(metric, metric))
        if threshold is not None:
            ax.set_title(f"first step with loss < {threshold:g}", fontsize=9)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, name or f"at_loss_{threshold:g}_vs_{param}")


def curves_figure(curves: pd.DataFrame, param: str, out: Path,
                  metrics=("loss", "pert_norm"), name: str | None = None) -> list[Path]:
    """Per-step curves, one line per run, coloured by `param` (log y as in Figures 6-7)."""
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6.5, 3.0 * len(metrics)), squeeze=False,
                             sharex=True)
    values = np.sort(curves[param].dropna().unique()) if param in curves else np.array([])
    cmap = plt.get_cmap("viridis")
    color = {v: cmap(i / max(len(values) - 1, 1)) for i, v in enumerate(values)}
    for ax, metric in zip(axes[:, 0], metrics):
        sub = curves[curves["metric"] == metric]
        for (_rid, v), g in sub.groupby(["run_id", param], dropna=False):
            ax.plot(g["step"], g["value"], color=color.get(v, "gray"), lw=1,
                    label=f"{SYMBOL.get(param, param)}={v:g}")
        if metric in ("loss", "pert_norm", "l1_norm", "l2_norm") and (sub["value"] > 0).any():  # zeros are dropped
            ax.set_yscale("log")
        ax.set_ylabel(LABEL.get(metric, metric))
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(sorted(zip(labels, handles), key=lambda lh: float(lh[0].rsplit("=", 1)[1])))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step (full-batch epoch)")
    fig.tight_layout()
    return _save(fig, out, name or f"curves_by_{param}")


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
                                     name=f"limit_one_norm_vs_{param}")
    return made
