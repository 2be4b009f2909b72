"""Repeats of a grid point and their spread (REPEATS=K): the statistics against independent
transcriptions (numpy, the Welch formula in float64), the figures read back from their artists,
the tables, the sweep folder of an EXTRA, wandb's grouping key, a sweep end to end."""

from __future__ import annotations

import math
import os
import subprocess

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analysis import figures
from analysis.groups import adjacent_welch, group_frame
from analysis.table import pivot, render, spread

from .conftest import ROOT, make_cfg

matplotlib.use("Agg")


def summary_with_repeats(rng=None) -> pd.DataFrame:
    """3 beta values x 4 seeds of a known metric: means 1, 2, 2.05 and spread 0.1; beta=0.9's
    seed 3 diverged (its value would be 100), beta=0.99's seed 2 never crossed (empty)."""
    rows = []
    values = {0.5: [0.9, 1.0, 1.1, 1.0], 0.9: [1.9, 2.0, 2.1, 100.0], 0.99: [1.95, 2.05, math.nan, 2.15]}
    for beta, ys in values.items():
        for seed, y in enumerate(ys):
            gone = beta == 0.9 and seed == 3
            rows.append(dict(run_id=f"r{beta}{seed}", point_id=f"p{beta}", setting="", h=1e-3, beta=beta, rho=0.999,
                             seed=seed, state="diverged" if gone else "completed",
                             regime="diverged" if gone else "stable", **{"at_loss_0.01_pert_norm": y}))
    return pd.DataFrame(rows)


def welch_p(a, b) -> float:
    """Welch's t-test from its formula (float64; the t distribution's tail from scipy)."""
    from scipy.stats import t

    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    stat = (a.mean() - b.mean()) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * t.sf(abs(stat), dof))


def test_groups_count_average_and_test_the_repeats():
    s = summary_with_repeats()
    g = group_frame(s).set_index("beta")
    col = "at_loss_0.01_pert_norm"
    assert list(g["n"]) == [4, 4, 4] and list(g["n_diverged"]) == [0, 1, 0]
    assert g.at[0.5, f"{col}_mean"] == pytest.approx(1.0) and g.at[0.5, f"{col}_std"] == pytest.approx(
        np.std([0.9, 1.0, 1.1, 1.0], ddof=1))
    assert g.at[0.9, f"{col}_n"] == 3 and g.at[0.9, f"{col}_max"] == pytest.approx(2.1)  # the diverged 100 left out
    assert g.at[0.99, f"{col}_n"] == 3 and g.at[0.99, f"{col}_missing"] == 1  # never crossed: counted, not averaged
    assert g.at[0.99, f"{col}_mean"] == pytest.approx(2.05)
    assert g.at[0.9, "repeats"] == "seed=0 seed=1 seed=2 seed=3"
    p = g[f"{col}_p_vs_prev_beta"]
    assert math.isnan(p[0.5])  # no smaller beta
    assert p[0.9] == pytest.approx(welch_p([0.9, 1.0, 1.1, 1.0], [1.9, 2.0, 2.1]), rel=1e-10)
    assert p[0.99] == pytest.approx(welch_p([1.9, 2.0, 2.1], [1.95, 2.05, 2.15]), rel=1e-10)
    resolved = g[f"{col}_resolved_vs_prev_beta"]
    assert bool(resolved[0.9]) and not bool(resolved[0.99]) and pd.isna(resolved[0.5])
    assert adjacent_welch(s, col, "beta")["p0.9"] == pytest.approx(p[0.9])


def _drawn(monkeypatch, draw):
    """The figure `draw()` makes, before it is saved and closed."""
    seen = []
    save = figures._save

    def keep(fig, out, name, data):
        seen.append(fig)
        return save(fig, out, name, data)
    monkeypatch.setattr(figures, "_save", keep)
    monkeypatch.setattr(figures.plt, "close", lambda fig=None: None)
    draw()
    return seen[0]


def test_a_threshold_figure_draws_one_mean_and_bar_per_x_and_each_repeat_faint(tmp_path, monkeypatch):
    from matplotlib.container import ErrorbarContainer

    s = summary_with_repeats()
    fig = _drawn(monkeypatch, lambda: figures.threshold_figure(s, "beta", 0.01, tmp_path, metrics=("pert_norm",)))
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1  # one series
    line, _, (segments,) = bars[0].lines[0], bars[0].lines[1], bars[0].lines[2]
    assert list(line.get_xdata()) == [0.5, 0.9, 0.99]  # one mean marker per x
    assert list(line.get_ydata()) == pytest.approx([1.0, 2.0, 2.05])
    assert len(segments.get_segments()) == 3  # one error bar per x
    spans = [seg[1][1] - seg[0][1] for seg in segments.get_segments()]
    assert spans[0] == pytest.approx(2 * np.std([0.9, 1.0, 1.1, 1.0], ddof=1))
    faint = [ln for ln in ax.lines if ln.get_alpha() == 0.3]
    assert len(faint) == 1 and len(faint[0].get_xdata()) == 12  # every repeat, the diverged and empty ones included
    joins = [ln for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_alpha() is None]
    assert [ln.get_linestyle() for ln in joins] == ["-", ":"]  # resolved, then within the spread
    assert not [ln for ln in ax.lines if len(ln.get_xdata()) > 3 and ln.get_alpha() is None]  # no line through runs
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "mean ± std over the repeats (n = 3 to 4)" in legend and "Welch" in legend


def test_runs_of_different_settings_are_separate_series(tmp_path, monkeypatch):
    s = summary_with_repeats()
    other = s.assign(setting="train.max_steps=400", point_id=s.point_id + "b",
                     **{"at_loss_0.01_pert_norm": s["at_loss_0.01_pert_norm"] + 5})
    both = pd.concat([s.assign(setting="train.max_steps=1000"), other], ignore_index=True)
    fig = _drawn(monkeypatch, lambda: figures.threshold_figure(both, "beta", 0.01, tmp_path, metrics=("pert_norm",)))
    from matplotlib.container import ErrorbarContainer

    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and sorted(len(b.lines[0].get_xdata()) for b in bars) == [3, 3]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "train.max_steps=1000" in legend and "train.max_steps=400" in legend
    g = group_frame(both)
    assert len(g) == 6 and set(g["setting"]) == {"train.max_steps=1000", "train.max_steps=400"}


def test_curves_with_repeats_are_one_median_line_and_a_band_per_point(tmp_path, monkeypatch):
    rows = []
    for beta in (0.5, 0.9):
        for seed in range(3):
            for step in range(20):
                v = (1 + beta) * math.exp(-step / 10) * (1 + 0.1 * seed)
                for metric in ("loss", "pert_norm"):
                    rows.append(dict(run_id=f"r{beta}{seed}", point_id=f"p{beta}", setting="", h=1e-3, beta=beta,
                                     rho=0.999, eps=1e-8, seed=seed, step=step, metric=metric, value=v))
    curves = pd.DataFrame(rows)
    fig = _drawn(monkeypatch, lambda: figures.curves_figure(curves, "beta", tmp_path))
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # a line and a band per point, not one per run
    mid = ax.lines[0].get_ydata()
    assert mid[0] == pytest.approx(1.5 * 1.1)  # the median of the three repeats at step 0
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "median of 3 repeats" in legend


def test_a_regime_map_cell_of_repeats_is_their_mean_and_mixed_regimes_say_so(tmp_path, monkeypatch):
    rows = []
    for b in (0.5, 0.9, 0.99):
        for r in (0.9, 0.99, 0.999):
            for seed in range(2):
                regime = "spiky" if (b, r, seed) == (0.99, 0.999, 1) else "stable"
                rows.append(dict(run_id=f"{b}{r}{seed}", point_id=f"{b}{r}", beta=b, rho=r, h=1e-3, seed=seed,
                                 state="completed", regime=regime, hill_height=1.0 + seed))
    fig = _drawn(monkeypatch, lambda: figures.regime_map_figure(pd.DataFrame(rows), 0.01, tmp_path))
    regime, hill = fig.axes[0], fig.axes[1]
    cells = regime.collections[0].get_array().reshape(3, 3)
    assert cells[2, 2] == list(figures.REGIMES).index("mixed") and cells[0, 0] == list(figures.REGIMES).index("stable")
    assert np.allclose(hill.collections[0].get_array().reshape(3, 3), 1.5)  # the mean of 1 and 2
    assert "mean of 2 repeats per cell" in fig._suptitle.get_text()


def test_a_table_of_repeats_prints_mean_and_spread():
    s = summary_with_repeats()
    table, marks, spreads = pivot(s, "beta", "rho", "at_loss_0.01_pert_norm", kind="std")
    m, lo, hi = spreads[0][(0.5, 0.999)]
    assert m == pytest.approx(1.0) and hi - m == pytest.approx(np.std([0.9, 1.0, 1.1, 1.0], ddof=1))
    assert "n = 3 to 4 repeats" in spreads[1] and "1 diverged repeat(s) left out" in spreads[1]
    tex = render(table, marks, "beta", "rho", "at_loss_0.01_pert_norm", "latex", ".3g", None, (*spreads, "std"))
    assert r"$1 \pm 0.0816$" in tex and r"\toprule" in tex
    m, lo, hi = spread([0.9, 1.0, 1.1, 1.0], "ci95")
    assert 0.9 <= lo < m < hi <= 1.1
    assert spread([1.0, 3.0], "minmax") == (2.0, 1.0, 3.0)
    assert spread([1.0, 3.0], "sem")[2] == pytest.approx(2.0 + np.std([1.0, 3.0], ddof=1) / math.sqrt(2))
    mixed = pd.concat([s, s.assign(point_id="other", h=1e-2)], ignore_index=True)
    with pytest.raises(ValueError, match="they differ in h"):
        pivot(mixed, "beta", "rho", "at_loss_0.01_pert_norm")


def test_the_point_id_of_the_analysis_is_the_pipelines(tmp_path):
    from omegaconf import OmegaConf

    from analysis.runs import config_point
    from pipeline.runs.ids import point_id, run_id

    a, b = make_cfg(["sweep=toy", "seed=0"]), make_cfg(["sweep=toy", "seed=3", "train.perturb_theta0=2"])
    assert point_id(a) == point_id(b) and run_id(a) != run_id(b)
    assert point_id(make_cfg(["sweep=toy", "optim.beta=0.5"])) != point_id(a)
    assert config_point(OmegaConf.to_container(b, resolve=True)) == point_id(b)


def make(tmp_path, target, extra="", *more, sweep="synthetic"):
    return subprocess.run(["make", "-s", "-C", str(ROOT), target, f"SWEEP={sweep}", "LAUNCHER=basic",
                           f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps", f"EXTRA={extra}", *more],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=dict(os.environ, WANDB_MODE="offline"))


@pytest.mark.parametrize("more,says", [
    (["REPEATS=0"], "sweep.repeats=0 (REPEATS=): allowed values are whole numbers >= 1"),
    (["REPEATS=x"], "sweep.repeats=x (REPEATS=): allowed values are whole numbers >= 1"),
    (["REPEATS=2", "EXTRA=seed=0,1"], "REPEATS=2: the grid already sweeps seed (0, 1)"),
    (["REPEATS=2", "EXTRA=sweep.repeat_by=theta"], "sweep.repeat_by=theta: allowed values are seed, perturb_theta0"),
])
def test_bad_repeats_are_one_line_and_nothing_is_created(tmp_path, more, says):
    r = make(tmp_path, "sweep", "", *more)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


def test_a_dry_run_counts_the_repeats_and_an_extra_gets_its_own_folder(tmp_path):
    r = make(tmp_path, "sweep", "", "REPEATS=3", "DRY=1")
    assert r.returncode == 0 and "sweep synthetic: 12 runs, 12 to launch" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("seed=2") == 4
    r = make(tmp_path, "sweep", "train.max_steps=50", "DRY=1")
    folder = next(ln for ln in r.stdout.splitlines() if ln.startswith("sweep synthetic."))
    assert "-> " + str(tmp_path / "sweeps" / "synthetic.") in folder
    r = make(tmp_path, "sweep", "train.max_steps=50 logger=none", "DRY=1")
    assert folder.split(":")[0] in r.stdout  # a non-semantic key changes no folder
    r = make(tmp_path, "sweep", "train.max_steps=50", "DRY=1", "NAME=mine")
    assert "sweep mine: 4 runs" in r.stdout
    r = make(tmp_path, "sweep", "train.max_steps=50 seed=5", "DRY=1", "REPEATS=2")
    assert folder.split(":")[0] + ": 8 runs" in r.stdout and "seed=6" in r.stdout  # a repeat key changes no folder


@pytest.mark.slow
def test_a_sweep_with_repeats_end_to_end_killed_and_resumed(tmp_path):
    """REPEATS=2 (one-ulp perturbations) on the toy: the sweep killed at row 5 (failpoint), its
    runs resumed, equal an uninterrupted sweep's; status shows the repeat key; groups.csv has n = 2 per
    point; wandb's offline files carry point_id and the repeat."""
    extra = "train.max_steps=60 optim.beta=0.5,0.9 optim.rho=0.9,0.99 sweep.repeat_by=perturb_theta0 logger=wandb"
    ref = tmp_path / "ref"
    ref.mkdir()
    assert make(ref, "sweep", extra, "REPEATS=2", sweep="toy").returncode == 0
    env = dict(os.environ, WANDB_MODE="offline", ADAM_FAULTS="row@5:kill")  # SIGKILL at row 5: nothing flushed
    cut = subprocess.run(["make", "-s", "-C", str(ROOT), "sweep", "SWEEP=toy", "LAUNCHER=basic", "REPEATS=2",
                          f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps", f"EXTRA={extra}"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert cut.returncode != 0 and "Traceback" not in cut.stderr
    assert any((d / "metrics.csv").exists() for d in (tmp_path / "runs").iterdir())  # killed mid-way
    again = make(tmp_path, "sweep", extra, "REPEATS=2", sweep="toy")
    assert again.returncode == 0 and "16 completed" in again.stdout, again.stdout + again.stderr
    for d in (tmp_path / "runs").iterdir():
        a = pd.read_csv(d / "metrics.csv").drop(columns="time_s")
        b = pd.read_csv(ref / "runs" / d.name / "metrics.csv").drop(columns="time_s")
        pd.testing.assert_frame_equal(a, b, rtol=0, atol=0)
    st = make(tmp_path, "status", extra, "REPEATS=2", sweep="toy")
    head = st.stdout.splitlines()[0].split()
    assert "perturb_theta0" in head and "16 runs (8 points x their repeats)" in st.stdout, st.stdout
    a = make(tmp_path, "analyze", extra, "ARGS=--no-figures", sweep="toy")
    assert a.returncode == 0, a.stderr
    folder = next((tmp_path / "sweeps").iterdir())
    g = pd.read_csv(folder / "analysis" / "groups.csv")
    assert len(g) == 8 and set(g["n"]) == {2}
    assert set(g["repeats"]) == {"seed=0/perturb_theta0=1 seed=0/perturb_theta0=2"}
    from analysis.wandb_read import find_run_files, read_run

    summary = pd.read_csv(folder / "analysis" / "summary.csv").set_index("run_id")
    for run in (tmp_path / "runs").iterdir():  # wandb groups the repeats by the analysis' point_id
        wb = read_run(find_run_files(run)[0])
        assert wb["config"]["point_id"] == summary.at[run.name, "point_id"]
        assert wb["config"]["repeat"] == f"seed=0 perturb_theta0={summary.at[run.name, 'perturb_theta0']:g}"
        assert wb["name"] == f"{run.name} {wb['config']['repeat']}"


def test_the_progress_lines_tell_every_run_of_a_sweep_apart(tmp_path):
    from pipeline.dispatch.jobs import point_label
    from pipeline.dispatch.plan import make_plan

    plan = make_plan("synthetic", [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps", "sweep.repeats=2",
                                   "train.max_steps=4,8"])
    labels = [point_label(p) for p in plan.points]
    assert len(set(labels)) == len(labels) == 16
    assert labels[0].startswith("h=0.003 beta=0.9 rho=0.99 ")
    assert "seed=" in labels[0] and "train.max_steps=" in labels[0]
