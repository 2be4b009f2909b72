"""Every figure the analysis and the theory draw, looked at as a reader would (analysis/look.py):
the paper's size limits, no text over text or across a panel's frame or off the image, no two
series of a panel in one colour. Rendered for the grids of the toy (3 beta x 3 rho x 2 h, limit
points), digits (4 x 3, three repeats each) and regime (12 x 12) presets, and Figures 1-3; and the
rules themselves against figures known to break them."""

from __future__ import annotations

import itertools

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from analysis import figures, look

REGIME = [0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]


@pytest.fixture
def looked(monkeypatch):
    """{figure name: its problems} of every PNG the analysis would save (nothing is saved)."""
    found = {}

    def check(fig, path, **kw):
        if path.suffix == ".png":
            found[path.name] = look.problems(fig)
        return path

    monkeypatch.setattr(figures, "save_figure", check)
    figures.use_style("paper")
    monkeypatch.setitem(plt.rcParams, "figure.dpi", 72)  # the same layout in inches, drawn faster
    return found


def grid(h, betas, rhos, repeats=1, steps=40, toy=False, test_set=True, sharpness=False):
    """A summary and a curves frame shaped as the analysis makes them for a sweep of this grid:
    a descent with a mid-training hill, spiky runs where beta > rho + 0.05; with `sharpness`,
    pre_sharpness every 5 steps rising to the edge of stability (train.sharpness_every)."""
    rng = np.random.default_rng(0)
    rows, curves = [], []
    for i, (hh, b, r, seed) in enumerate(itertools.product(h, betas, rhos, range(repeats))):
        run, point = f"run{i:03d}", f"p{hh}{b}{r}"
        spiky = b > r + 0.05
        k = np.arange(steps)
        loss = 2.0 * np.exp(-k / 6) + 1e-3 + (0.05 * rng.random(steps) if spiky else 0)
        norm = 30 * np.exp(-k / 4) + 0.5 + 2 * np.exp(-((k - steps / 2) / 4) ** 2) * (1 + b)
        row = dict(run_id=run, point_id=point, h=hh, beta=b, rho=r, eps=1e-8, seed=seed, state="completed",
                   regime="spiky" if spiky else "stable", steps=steps, code_version="abc",
                   hill_height=2 * (1 + b) + rng.random(), hill_trough_step=steps // 3, hill_peak_step=steps // 2,
                   **{"at_loss_0.01_pert_norm": 1 + b + 0.1 * rng.random(), "at_loss_0.01_step": 20})
        if test_set:
            row.update({"at_loss_0.01_test_acc": 0.9 + 0.05 * r + 0.01 * rng.random(), "max_test_acc": 0.97})
        if toy:
            row["limit_one_norm"] = 1.8 + 0.1 * b + 0.05 * rng.random()
        thr = (2 + 2 * b) / ((1 - b) * hh)
        if sharpness:
            row.update(eos_threshold=thr, eos_ratio_max=0.5 + 0.6 * b * r)
        rows.append(row)
        keys = dict(run_id=run, point_id=point, h=hh, beta=b, rho=r, eps=1e-8, seed=seed)
        series = dict(loss=loss, pert_norm=norm)
        if toy:
            series.update(theta_0=np.linspace(2.8, 0.8 + 0.1 * b, steps),
                          theta_1=np.linspace(3.5, 0.9 + 0.1 * r, steps))
        for metric, v in series.items():
            curves.append(pd.DataFrame(dict(keys, metric=metric, step=k, value=v)))
        if sharpness:
            every = k[::5]
            curves.append(pd.DataFrame(dict(keys, metric="pre_sharpness", step=every,
                                            value=thr * (0.2 + 0.8 * b * r * (1 - np.exp(-every / 8))))))
        curves.append(pd.DataFrame(dict(keys, metric="pert_norm_floor", step=[0], value=[0.35])))
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True)


PRESETS = {  # (grid, thresholds, params, limit_reference)
    "toy": (dict(h=[3e-3, 1e-2], betas=[0.5, 0.9, 0.95], rhos=[0.5, 0.9, 0.99], toy=True, test_set=False),
            [0.01], ["beta", "rho", "h"], 2 * np.sqrt(0.75)),
    "digits": (dict(h=[1e-3], betas=[0.5, 0.9, 0.95, 0.99], rhos=[0.9, 0.99, 0.999], repeats=3), [0.01],
               ["beta", "rho"], None),
    "regime": (dict(h=[0.1], betas=REGIME, rhos=REGIME, steps=30), [0.01], ["beta", "rho"], None),
    "regime-sharpness": (dict(h=[0.1], betas=REGIME, rhos=REGIME, steps=30, sharpness=True), [0.01],
                         ["beta", "rho"], None),
    "digits-sharpness": (dict(h=[1e-3], betas=[0.5, 0.9, 0.95, 0.99], rhos=[0.9, 0.99, 0.999], repeats=3,
                              sharpness=True), [0.01], ["beta", "rho"], None),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_figure_of_a_preset_keeps_the_rules(preset, looked, tmp_path):
    spec, thresholds, params, reference = PRESETS[preset]
    summary, curves = grid(**spec)
    figures.all_figures(summary, curves, tmp_path, thresholds, params, "paper", reference)
    assert len(looked) >= {"toy": 20, "digits": 8, "regime": 20}[preset.split("-")[0]]
    assert {name: p for name, p in looked.items() if p} == {}
    if preset == "regime":  # twelve values of a series: a colour bar, one file per value of the other key
        assert "curves_by_beta_rho0.9.png" in looked and "curves_by_beta.png" not in looked
    if preset.endswith("sharpness"):  # the eos panel beside loss and norm, the map's fifth panel
        assert "regime_map.png" in looked if preset.startswith("regime") else "curves_by_beta_rho0.99.png" in looked
    if preset == "toy":  # no test set: the whole-run figure holds the hill alone, and is named so
        assert "hill_vs_beta.png" in looked and not any(n.startswith("max_test_acc") for n in looked)


def test_figures_1_to_3_of_the_theory_keep_the_rules(monkeypatch, tmp_path):
    from analysis.theory.figures import figures as theory_figures

    found = {}

    def check(fig, fname, *a, **kw):
        if str(fname).endswith(".png"):
            found[str(fname).rsplit("/", 1)[-1]] = look.problems(fig)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", check)
    theory_figures(out=tmp_path, T=1.5, budget_s=1.0, max_steps=2000)
    assert set(found) == {"fig1_penalty.png", "fig2_trajectories_beta_rho.png", "fig3_trajectories_h.png"}
    assert {name: p for name, p in found.items() if p} == {}


def _figure(height=2.5):
    fig, ax = plt.subplots(figsize=(3.0, height))
    ax.plot([0, 1], [0, 1], color="C0")
    return fig, ax


@pytest.mark.parametrize("case", ["tall", "wide", "overlap", "legend_on_title", "inset_on_ticks", "inset_on_axis",
                                  "same_colour"])
def test_the_rules_fail_on_figures_that_break_them(case):
    """The kinds of fault the old figures had: a 9-row stack (11 in tall), a row too wide for a
    page, labels printed over each other, a legend over a panel's title, an inset whose tick
    labels sit on its parent's axis line, a palette of 7 colours for 12 lines."""
    figures.use_style("paper")
    fig, ax = _figure(11.0 if case == "tall" else 2.5)
    if case == "wide":
        fig.set_figwidth(9.0)
    if case == "overlap":
        ax.text(0.5, 0.5, "one label", transform=ax.transAxes)
        ax.text(0.52, 0.5, "another label", transform=ax.transAxes)
    if case == "legend_on_title":
        ax.set_title("a panel's title")
        fig.legend([matplotlib.lines.Line2D([], [])], ["a legend entry"], loc="upper center")
    if case.startswith("inset"):  # Figure 2's inset before: its tick labels on the parent's axis
        inset = ax.inset_axes([0.5, 0.02 if case == "inset_on_ticks" else 0.07, 0.45, 0.45])
        inset.plot([0, 1], [0, 1])
    if case == "same_colour":
        for i in range(8):
            ax.plot([0, 1], [i, i + 1], color=f"C{i % 7}")
    problems = look.problems(fig)
    plt.close(fig)
    expected = {"tall": "size", "wide": "size", "overlap": "overlaps", "legend_on_title": "overlaps",
                "inset_on_ticks": "overlaps", "inset_on_axis": "across the frame",
                "same_colour": "share the colour"}[case]
    assert any(expected in p for p in problems), problems


def test_a_figure_that_keeps_the_rules_has_no_problem():
    figures.use_style("paper")
    fig, ax = _figure()
    ax.set_title("a title")
    ax.set_xlabel("x")
    ax.plot([0, 1], [1, 0], color="C1")
    ax.axhline(0.5, color="0.5")  # a grey reference line is no series
    assert look.problems(fig) == []
    plt.close(fig)
