"""Analysis stages on histories with known answers, on broken inputs, and on a real run."""

import csv
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from analysis.__main__ import analyze, main
from analysis.runs import find_runs, read_metrics
from analysis.summary import hill, regime
from pipeline.runs.history import METRIC_COLUMNS
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.train import train

ID = {}  # label of a hand-written run -> its run id (the hash of its config, as the integrity rule wants)


def write_run(root, label, loss, pert=None, state="completed", test_acc=None, beta=0.9, rho=0.999,
              floor=0.5, extra=None, data=None):
    """A run directory written by hand, named by the hash of its config (`label` sets its seed, so
    runs with equal hyperparameters are distinct runs: repeats of one point); ID[label] is its run id."""
    n = len(loss)
    seed = int(hashlib.sha1(label.encode()).hexdigest()[:6], 16)
    cfg = dict(optim=dict(name="adam", h=1e-4, beta=beta, rho=rho, eps=1e-8), model=dict(name="cnn"),
               data=data or dict(name="synthetic"), seed=seed, train=dict(max_steps=n - 1))
    rid = ID[label] = run_id(OmegaConf.create(cfg))
    d = root / rid
    d.mkdir(parents=True)
    cols = dict(step=range(n), loss=loss, acc=np.full(n, 0.5),
                pert_norm=pert if pert is not None else np.linspace(10, 1, n),
                l1_norm=np.full(n, 1.0), l2_norm=np.full(n, 1.0), pert_norm_floor=np.full(n, floor),
                test_loss=np.full(n, np.nan),
                test_acc=test_acc if test_acc is not None else np.full(n, np.nan), time_s=np.arange(n) * 0.1)
    cols.update(extra or {})
    pd.DataFrame(cols).to_csv(d / "metrics.csv", index=False)
    (d / "status.json").write_text(json.dumps(dict(state=state, step=n - 1, run_id=rid, attempts=1)))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def axes_drawn_by(draw):
    """The axes of the figure that `draw()` makes (plt.subplots watched while it runs)."""
    import matplotlib.pyplot as plt

    seen, real = {}, plt.subplots

    def spy(*a, **k):
        fig, axes = real(*a, **k)
        seen["axes"] = axes
        return fig, axes

    plt.subplots = spy
    try:
        draw()
    finally:
        plt.subplots = real
    return seen["axes"]


def test_hill_of_known_height_and_position():
    steps = pd.Series(range(100))
    p = 10 * np.exp(-np.arange(100) / 5.0)  # decline ...
    p[30:60] += np.concatenate([np.linspace(0, 4, 15), np.linspace(4, 0, 15)])  # ... a hill of 4 ...
    p = pd.Series(p)
    loss = pd.Series(np.exp(-np.arange(100) / 5.0))  # 5 % of its start from step 15 on
    out = hill(p, steps, floor=0.5, loss=loss)
    trough = int(np.argmin(p[:45].to_numpy()))
    assert out["hill_trough_step"] == trough and out["hill_peak_step"] == 44
    assert out["hill_height"] == pytest.approx(p[44] - p[trough], rel=1e-12)
    # by hand: the trough is step 30 (the hill starts there at 0), the peak step 44 (the hill at 4)
    assert trough == 30 and out["hill_height"] == pytest.approx(4 + 10 * (np.exp(-44 / 5) - np.exp(-30 / 5)),
                                                                 rel=1e-12)
    assert out["hill_height_rel_trough"] == pytest.approx(out["hill_height"] / p[trough])
    assert out["hill_height_rel_floor"] == pytest.approx(out["hill_height"] / 0.5)


def test_hill_monotone_curve_has_no_hill_an_empty_cell():
    out = hill(pd.Series(np.linspace(5, 1, 20)), pd.Series(range(20)), loss=pd.Series(np.geomspace(1, 1e-3, 20)))
    assert np.isnan(out["hill_height"]) and np.isnan(out["hill_peak_step"]) and out["rise_max"] == 0.0


def test_the_hill_is_the_mid_training_one_not_the_start_up_bump():
    """Adam's start-up: P rises from 60 to 84 in the first 5 steps and jitters on its way down (a
    rise of 20 % at step 12), falls to ~3 by step 40, then a mid-training hill of 2 at steps 60-100
    (the paper's Figure 6). The hill is the last; the bump is `rise_max`. The trough search starts
    where the loss is first <= 5 % of its start (step 15 here)."""
    n = np.arange(200)
    p = 3 + 81 * np.exp(-np.maximum(n - 5, 0) / 6.0)
    p[:6] = np.linspace(60, 84, 6)  # the start-up bump
    p[12] *= 1.2  # jitter of the descent
    p[60:101] += 2 * np.sin(np.linspace(0, np.pi, 41))  # the hill
    loss = pd.Series(2.3 * np.exp(-n / 5.0))
    out = hill(pd.Series(p), pd.Series(n), loss=loss)
    assert 60 <= out["hill_trough_step"] <= 61 and out["hill_peak_step"] == 80
    assert out["hill_height"] == pytest.approx(p[80] - p[int(out["hill_trough_step"])], rel=1e-12)
    assert out["rise_max"] == pytest.approx(24.0)
    # a loss that never falls to 5 % of its start has not finished its start-up: no hill; no loss: none
    assert np.isnan(hill(pd.Series(p), pd.Series(n), loss=pd.Series(np.linspace(2.3, 1.0, 200)))["hill_height"])
    assert np.isnan(hill(pd.Series(p), pd.Series(n))["hill_height"])
    # a rise of less than 5 % of its trough (rounding along the floor) is no hill
    flat = pd.Series(np.r_[10.0, 4.0, 3.0, 3.0 * 1.04, 3.0])
    assert np.isnan(hill(flat, pd.Series(range(5)), loss=pd.Series([1.0, 0.5, 0.01, 0.01, 0.01]))["hill_height"])


def test_hill_smoothing_removes_oscillation():
    p = pd.Series(np.linspace(5, 1, 40) + 0.3 * (-1) ** np.arange(40))
    loss = pd.Series(np.geomspace(1, 1e-4, 40))
    assert hill(p, pd.Series(range(40)), loss=loss)["hill_height"] > 0.3
    assert np.isnan(hill(p, pd.Series(range(40)), smooth=2, loss=loss)["hill_height"])


def test_regimes():
    decline = np.exp(-np.arange(50) / 5)
    spiky = decline.copy()
    spiky[30] = 50 * spiky[29]
    assert regime(pd.Series(decline), "completed") == "stable"
    assert regime(pd.Series(spiky), "completed") == "spiky"
    assert regime(pd.Series(spiky), "completed", spike_factor=100) == "stable"
    assert regime(pd.Series([1.0, 0.5, np.nan]), "diverged") == "diverged"
    # the training loop's rule: above diverge_factor x the initial loss for diverge_patience steps
    climb = pd.Series([1.0, 0.5] + [11.0] * 49 + [0.5])
    assert regime(climb, "completed") == "spiky"  # 49 steps above 10x: a spike, not yet diverged
    assert regime(pd.Series([1.0, 0.5] + [11.0] * 50), "completed") == "diverged"
    assert regime(climb, "completed", diverge_factor=10, diverge_patience=49) == "diverged"
    assert regime(pd.Series([1.0] + [1e6] * 60), "completed", diverge_factor=None) == "stable"
    noise = np.concatenate([decline, [1e-14, 1e-12, 1e-15, 1e-11]])  # rounding noise at ~0
    assert regime(pd.Series(noise), "completed") == "stable"


def test_summary_with_known_answers(tmp_path):
    loss = np.concatenate([np.linspace(2.0, 0.11, 10), np.linspace(0.09, 0.011, 10),
                           np.linspace(0.009, 0.001, 5)])
    acc = np.full(25, np.nan)
    acc[[0, 10, 20, 24]] = [0.1, 0.7, 0.8, 0.85]
    pert = np.linspace(10, 1, 25)
    write_run(tmp_path, "aaa", loss, pert=pert, test_acc=acc)
    write_run(tmp_path, "bbb", np.linspace(2, 1, 5), state="running", beta=0.95)
    paths = analyze(tmp_path, thresholds=(0.1, 0.01, 1e-5), steps_at=(20,), figures=False)
    s = pd.read_parquet(paths["summary"].with_suffix(".parquet")).set_index("run_id")  # every digit
    a = s.loc[ID["aaa"]]
    assert a["at_loss_0.1_step"] == 10 and a["at_loss_0.01_step"] == 20
    assert a["at_loss_0.1_pert_norm"] == pert[10] and a["at_loss_0.1_test_acc"] == 0.7
    assert a["at_loss_0.01_test_acc"] == 0.8 and a["at_step_20_pert_norm"] == pert[20]
    assert pd.isna(a["at_loss_1e-05_step"])  # never reached: an empty cell
    assert a["max_test_acc"] == 0.85 and a["final_loss"] == loss[-1] and a["steps"] == 24
    assert a["regime"] == "stable" and a["state"] == "completed"
    assert a["h"] == 1e-4 and a["beta"] == 0.9 and a["rho"] == 0.999
    b = s.loc[ID["bbb"]]
    assert b["state"] == "running" and pd.isna(b["final_loss"]) and pd.isna(b["at_loss_0.1_step"])
    assert b["last_loss"] == 1.0
    with open(tmp_path / "analysis" / "summary.csv", newline="") as f:  # empty cells, not invented numbers
        raw = {r["run_id"]: r for r in csv.DictReader(f)}
    assert raw[ID["aaa"]]["at_loss_1e-05_step"] == raw[ID["aaa"]]["at_loss_1e-05_pert_norm"] == ""  # never crossed
    # a setting no run has is left out (and named in columns.md); test columns stay: "aaa" was tested
    for gone in ("norm", "subset"):
        assert gone not in raw[ID["aaa"]], gone
    assert "`norm`" in (tmp_path / "analysis" / "columns.md").read_text().split("Left out")[1]
    assert raw[ID["aaa"]]["holes"] == "" and raw[ID["aaa"]]["at_loss_0.1_step"] == "10"
    for col in ("final_loss", "at_loss_0.1_step", "at_loss_0.1_pert_norm", "at_loss_0.01_test_acc", "max_test_acc"):
        assert raw[ID["bbb"]][col] == "", col
    assert raw[ID["bbb"]]["last_loss"] == "1" and raw[ID["bbb"]]["state"] == "running"
    c = pd.read_parquet(paths["curves"])
    assert set(c.columns) >= {"run_id", "h", "beta", "rho", "step", "metric", "value"}
    assert len(c[(c.run_id == ID["aaa"]) & (c.metric == "test_acc")]) == 4
    assert (tmp_path / "analysis" / "summary.parquet").exists()


def test_summary_csv_has_the_digits_the_data_supports_and_parquet_every_digit(tmp_path):
    """summary.csv: 7 significant digits (float32's), an integer step as an integer; the same
    table in summary.parquet to the last bit."""
    loss = 1 / 3 + np.geomspace(2, 1e-9, 30)
    pert = np.pi * np.linspace(1, 3, 30)
    write_run(tmp_path, "aaa", loss, pert=pert)
    paths = analyze(tmp_path, thresholds=(0.5,), figures=False)
    with open(paths["summary"], newline="") as f:
        raw = next(csv.DictReader(f))
    full = pd.read_parquet(tmp_path / "analysis" / "summary.parquet").iloc[0]
    assert full["last_loss"] == loss[-1] and raw["last_loss"] == f"{loss[-1]:.7g}"
    for col in ("last_loss", "final_loss", "at_loss_0.5_pert_norm", "rise_max"):
        digits = raw[col].split("e")[0].replace("-", "").replace(".", "").lstrip("0")
        assert 0 < len(digits) <= 7, (col, raw[col])
        assert float(raw[col]) == pytest.approx(full[col], rel=5e-7), col
    assert raw["steps"] == "29" and raw["at_loss_0.5_step"] == str(int(full["at_loss_0.5_step"]))
    # no test set: no test columns (a metric no run recorded); the crossing's other values stay
    assert not [c for c in raw if "test" in c] and "at_loss_0.5_acc" in raw


def test_broken_inputs_give_messages_not_tracebacks(tmp_path, capsys):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="no run directories"):
        main([str(tmp_path)])
    d = write_run(tmp_path, "torn", np.linspace(2, 1, 6))
    text = (d / "metrics.csv").read_text()
    (d / "metrics.csv").write_text(text[: len(text) - 7])  # a torn last row
    write_run(tmp_path, "nans", np.array([2.0, np.nan, np.nan]), state="diverged")
    e = write_run(tmp_path, "empty", np.array([1.0]))
    (e / "metrics.csv").unlink()
    main([str(tmp_path), "--no-figures"])
    s = pd.read_csv(tmp_path / "analysis" / "summary.csv").set_index("run_id")
    assert s.loc[ID["torn"], "steps"] == 4
    assert s.loc[ID["nans"], "regime"] == "diverged" and s.loc[ID["nans"], "state"] == "diverged"
    assert s.loc[ID["empty"], "steps"] == 0
    assert len(read_metrics(d / "metrics.csv")) == 5


def test_figures_are_written(tmp_path):
    for i, b in enumerate((0.9, 0.95, 0.99)):
        write_run(tmp_path, f"r{i}", np.geomspace(2, 0.001, 30), beta=b,
                  test_acc=np.linspace(0.1, 0.8 + i / 100, 30))
    paths = analyze(tmp_path)
    names = {p.name for p in paths["figures"]}
    assert {"at_loss_0.01_vs_beta.png", "at_loss_0.01_vs_beta.pdf", "curves_by_beta.png",
            "max_test_acc_vs_beta.pdf"} <= names  # a monotone norm has no hill: the figure is named by what it holds
    assert all(p.stat().st_size > 1000 for p in paths["figures"] if p.suffix != ".csv")
    # every figure's data beside it, same stem: the values that were drawn
    assert {p.stem for p in paths["figures"] if p.suffix == ".csv"} == \
        {p.stem for p in paths["figures"] if p.suffix == ".png"}
    drawn = pd.read_csv(tmp_path / "analysis" / "at_loss_0.01_vs_beta.csv").set_index("run_id")
    s = pd.read_csv(paths["summary"]).set_index("run_id")
    assert (drawn["at_loss_0.01_test_acc"] == s.loc[drawn.index, "at_loss_0.01_test_acc"]).all()


@pytest.mark.slow
def test_curves_are_one_file_per_combination_and_diverged_runs_have_no_limit_point(tmp_path):
    """A beta x rho grid coloured by beta: one file per rho (one row of panels, titled by it), the
    data of each in the CSV beside the figure; a run that climbs (the loop's divergence rule) gets no limit
    point and is listed, not drawn, in the limit figure."""
    theta = dict(theta_0=np.full(60, 1.0), theta_1=np.full(60, 0.5))
    for i, b in enumerate((0.5, 0.9)):
        for j, r in enumerate((0.5, 0.99)):
            write_run(tmp_path, f"b{i}r{j}", np.geomspace(2, 0.001, 60), beta=b, rho=r, extra=theta)
    write_run(tmp_path, "climb", np.concatenate([[2.0], np.full(59, 30.0)]), beta=0.999, rho=0.99,
              extra=dict(theta_0=np.full(60, 9.0), theta_1=np.full(60, 9.0)))
    paths = analyze(tmp_path)
    s = pd.read_csv(paths["summary"]).set_index("run_id")
    assert s.loc[ID["climb"], "regime"] == "diverged" and np.isnan(s.loc[ID["climb"], "limit_one_norm"])
    assert s.loc[ID["b1r1"], "limit_one_norm"] == 1.5
    limit = pd.read_csv(tmp_path / "analysis" / "limit_one_norm_vs_beta.csv")
    assert "climb" not in set(limit.run_id) and len(limit) == 4
    curves = pd.concat([pd.read_csv(tmp_path / "analysis" / f"curves_by_beta_rho{r}.csv") for r in (0.5, 0.99)])
    assert set(curves.columns) == {"run_id", "rho", "beta", "step", "metric", "value", "lo", "hi"}
    assert set(curves.metric) == {"loss", "pert_norm", "pert_norm_floor"}
    assert sorted(curves.groupby("rho").run_id.nunique()) == [2, 3]  # rho=0.5: 2 runs, 0.99: 3
    from analysis.figures import curves_figure

    made = curves_figure(pd.read_parquet(paths["curves"]), "beta", tmp_path / "again")
    assert [p.name for p in made if p.suffix == ".png"] == ["curves_by_beta_rho0.5.png", "curves_by_beta_rho0.99.png"]
    from analysis.redraw import redraw

    axes = axes_drawn_by(lambda: redraw(tmp_path / "again" / "curves_by_beta_rho0.99.csv", tmp_path / "redrawn"))
    assert axes.shape == (1, 2)  # one row: loss, perturbed norm; rho = 0.99 alone
    assert len(axes[0, 0].lines) == 3 and axes[0, 0].get_figure().get_suptitle() == r"$\rho$=0.99"
    assert any(ln.get_linestyle() == ":" for ln in axes[0, 1].lines)  # the floor p sqrt(eps)


def test_long_curves_are_drawn_and_saved_as_envelopes_and_paths_thinned(tmp_path):
    """A run of 4,000 steps whose loss oscillates: its curve is saved (and drawn) as at most
    CURVE_POINTS windows whose band [lo, hi] holds every value of the window (the extremes of
    the whole curve exactly), a short curve as it is; the θ-path keeps its first and last point
    and far fewer rows; the figures' CSVs together are a fraction of curves.csv; redrawn from
    its CSV, the curves figure saves the same CSV again."""
    from analysis import figures
    from analysis.redraw import redraw

    n = 4000
    k = np.arange(n)
    loss = np.geomspace(2, 1e-6, n) * (1 + 0.9 * np.sin(k * 2.1))  # an oscillation: a solid block as a line
    theta = dict(theta_0=2.8 - 2 * k / n + 0.001 * np.sin(k), theta_1=3.5 - 2.5 * k / n)  # a sub-pixel wiggle
    for i, b in enumerate((0.5, 0.9)):
        write_run(tmp_path, f"o{i}", loss * (1 + i), extra=theta, data=dict(name="bilinear", x=2.0, y=1.5), beta=b)
    write_run(tmp_path, "short", np.geomspace(2, 1e-3, 50), beta=0.95)
    paths = analyze(tmp_path, csv=True)
    out = tmp_path / "analysis"
    files = sorted(out.glob("curves_by_beta_setting*.csv"))  # the short run has other max_steps: a file each
    assert len(files) == 2
    drawn = pd.concat([pd.read_csv(f) for f in files])
    per = drawn.groupby(["run_id", "metric"]).size()
    assert per.max() <= figures.CURVE_POINTS and per[(ID["short"], "loss")] == 50
    o0 = drawn[(drawn.run_id == ID["o0"]) & (drawn.metric == "loss")]
    assert (o0.lo <= o0.value).all() and (o0.value <= o0.hi).all()
    assert o0.lo.min() == pytest.approx(loss.min(), rel=1e-6) and o0.hi.max() == pytest.approx(loss.max(), rel=1e-6)
    assert (o0.hi / o0.lo).max() > 5  # the band is there to be drawn
    assert figures._visible_band(o0, log=True)
    steep = figures.envelope(pd.DataFrame(dict(run_id="s", step=k, metric="loss", value=np.geomspace(2, 1e-12, n))),
                             ["run_id"])
    assert not figures._visible_band(steep, log=True)  # a steady descent spans a range per window: no band
    short = drawn[(drawn.run_id == ID["short"]) & (drawn.metric == "loss")]
    assert (short.lo == short.value).all() and (short.hi == short.value).all()
    path = pd.read_csv(out / "trajectories_by_beta.csv")
    p0 = path[(path.run_id == ID["o0"]) & (path.metric == "theta_0")].sort_values("step")
    assert len(p0) < n / 3 and p0.step.iloc[0] == 0 and p0.step.iloc[-1] == n - 1
    assert p0.value.iloc[-1] == pytest.approx(theta["theta_0"][-1], rel=1e-6)
    figure_csvs = sum(p.stat().st_size for p in paths["figures"] if p.suffix == ".csv")
    assert figure_csvs < paths["curves_csv"].stat().st_size / 2
    for f in files:
        again = redraw(f, tmp_path / "again")
        assert again[2].read_text() == f.read_text()


def test_real_run_through_analysis(cfg_factory, tmp_path):
    cfg = cfg_factory("train.max_steps=25", "optim.h=3e-3", "train.loss_thresholds=[1.9]")
    train(cfg)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    assert find_runs(cfg.paths.runs) == [run.path]
    paths = analyze(cfg.paths.runs, out=tmp_path / "out", thresholds=(1.9,))
    s = pd.read_parquet(paths["summary"].with_suffix(".parquet")).iloc[0]  # every digit
    m = pd.read_csv(run.metrics)
    first = int(m.step[m.loss < 1.9].iloc[0])
    assert s["at_loss_1.9_step"] == first
    assert s["at_loss_1.9_test_acc"] == m.test_acc[first]  # the engine evaluated there
    assert s["run_id"] == run.id and s["state"] == "completed"
    assert list(m.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS


def _summary_grid(test_set: bool) -> pd.DataFrame:
    rows = []
    for b in (0.5, 0.9, 0.95):
        for r in (0.9, 0.99):
            rows.append(dict(run_id=f"{b}-{r}", beta=b, rho=r, h=1e-3, state="completed",
                             **{"at_loss_0.01_pert_norm": b * r * 10 ** (3 * b), "hill_height": b + r,
                                "at_loss_0.01_test_acc": 0.95 + b / 100 if test_set else np.nan,
                                "max_test_acc": 0.96 if test_set else np.nan}))
    s = pd.DataFrame(rows)
    s.loc[s.run_id == "0.9-0.99", "state"] = "running"
    return s


@pytest.mark.parametrize("test_set", [True, False])
def test_sweep_figures_have_a_panel_per_metric_that_exists_and_mark_unfinished_runs(tmp_path, test_set, monkeypatch):
    """No empty panels (a model without a test set has no test-accuracy panel), 0.5 in a beta grid
    on the 1 - x axis with a label at each value, a run still running drawn with an open marker and
    said in the legend, a metric spanning decades on a log axis; and no warning on the way."""
    import warnings

    import matplotlib.pyplot as plt

    from analysis import figures

    made = {}
    real = plt.subplots

    def spy(*a, **k):
        made["fig"], made["axes"] = real(*a, **k)
        return made["fig"], made["axes"]

    monkeypatch.setattr(plt, "subplots", spy)
    figures.use_style("paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = figures.threshold_figure(_summary_grid(test_set), "beta", 0.01, tmp_path)
    axes = made["axes"][0]
    assert len(axes) == (2 if test_set else 1) and paths[0].stat().st_size > 1000
    ax = axes[0]
    assert ax.get_xscale() == "function" and [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.9", "0.95"]
    assert ax.get_yscale() == "log"  # 10^1.5 .. 10^2.85: decades
    assert any(ln.get_markerfacecolor() == "white" for ln in ax.lines)
    legend = [t.get_text() for t in made["fig"].legends[0].get_texts()]
    assert "open marker: run not finished" in legend and r"$\rho$=0.9" in legend
    if test_set:
        lo, hi = axes[1].get_ylim()
        assert hi - lo >= figures.ACC_SPAN  # 0.955-0.9595 alone would fill the axis
    none = _summary_grid(False).drop(columns=["hill_height"])
    assert figures.threshold_figure(none, "beta", None, tmp_path, metrics=("max_test_acc", "hill_height"),
                                    name="nothing") == []  # no metric with data: no figure
    with pytest.raises(SystemExit, match="--style poster: allowed values are paper, talk"):
        figures.use_style("poster")


def test_a_two_parameter_sweep_gets_its_theta_plane(tmp_path):
    """The toy's picture (Figures 2-3): each run's path in the θ-plane, the hyperbola of minima
    and its point of smallest one-norm inside the paths' box (not a hyperbola that runs off to
    θ_2 = 750 and flattens the paths)."""
    theta = dict(theta_0=np.linspace(2.8, 0.8, 40), theta_1=np.linspace(3.5, 0.95, 40))
    for i, b in enumerate((0.5, 0.9)):
        write_run(tmp_path, f"t{i}", np.geomspace(2, 1e-6, 40), beta=b, extra=theta)
    paths = analyze(tmp_path, figures=False)
    from analysis import figures

    figures.use_style("paper")
    made = figures.trajectories_figure(pd.read_parquet(paths["curves"]), "beta", tmp_path / "fig", minima=0.75)
    assert [p.suffix for p in made] == [".png", ".pdf", ".csv"] and made[0].stat().st_size > 1000
    drawn = pd.read_csv(made[2])
    assert set(drawn.metric) == {"theta_0", "theta_1"} and drawn.run_id.nunique() == 2
    assert figures.trajectories_figure(pd.read_parquet(paths["curves"]).query("metric == 'loss'"), "beta",
                                       tmp_path / "none") == []  # no θ recorded: no figure


def test_redraw_draws_every_figure_again_from_its_csv(tmp_path, capsys):
    """`python -m analysis.redraw <figure>.csv`: each figure again from the CSV beside it, without
    the runs (the CSV itself unchanged), in another style, from exactly the data it was drawn
    from (the redrawn figure's CSV equals the original's, the files of a split figure included);
    anything else is one line, exit 2."""
    from analysis.redraw import main as redraw_main

    theta = dict(theta_0=np.linspace(2.8, 0.8, 30), theta_1=np.linspace(3.5, 0.95, 30))
    for i, (b, r) in enumerate((b, r) for b in (0.5, 0.9, 0.95) for r in (0.5, 0.999)):
        write_run(tmp_path / "runs", f"r{i}", np.geomspace(2, 1e-5, 30), beta=b, rho=r, extra=theta,
                  data=dict(name="bilinear", x=2.0, y=1.5))
    paths = analyze(tmp_path / "runs", tmp_path / "a")
    csvs = sorted(p for p in paths["figures"] if p.suffix == ".csv")
    kinds = {p.stem.split("_by_")[0].split("_vs_")[0] for p in csvs}
    assert kinds >= {"at_loss_0.01", "curves", "trajectories", "limit_one_norm"}
    assert {"curves_by_beta_rho0.5", "curves_by_beta_rho0.999"} <= {p.stem for p in csvs}
    before = {p: p.read_text() for p in csvs}
    assert redraw_main([*map(str, csvs), "--style", "talk", "--out", str(tmp_path / "again")]) == 0
    for p in csvs:
        assert (tmp_path / "again" / f"{p.stem}_talk.png").stat().st_size > 1000
        assert p.read_text() == before[p]
        assert (tmp_path / "again" / f"{p.stem}_talk.csv").read_text() == before[p], p.name
    assert redraw_main([str(paths["summary"])]) == 2
    assert "not a figure's CSV" in capsys.readouterr().err
    # beside the original, never over it: <figure>_talk.png; the paper's PNG and PDF unchanged
    png = csvs[0].with_suffix(".png")
    paper = png.read_bytes()
    assert redraw_main([str(csvs[0]), "--style", "talk"]) == 0
    assert png.read_bytes() == paper and csvs[0].with_name(f"{csvs[0].stem}_talk.png").stat().st_size > 1000


def test_the_regime_map_redraws_from_its_csv(tmp_path):
    """... with ids that read as numbers (12 hex digits can be 000000000001 or 1e0000000002: the
    redraw once took such a column for numbers with a word in it, and refused the figure)."""
    from analysis.figures import regime_map_figure
    from analysis.redraw import redraw

    def ids(i, k):  # a number, a float's spelling, a word: the three kinds of id in one column
        return [f"{i:012d}", f"1e{i:010d}", f"{i:011d}f"][(i + k) % 3]

    rows = [dict(run_id=ids(i, 0), point_id=ids(i, 1), h=0.1, beta=b, rho=r, state="completed", regime="stable",
                 hill_height=1.0 + i,
                 **{"at_loss_0.01_pert_norm": 0.1 * (1 + i), "at_loss_0.01_test_acc": 0.9})
            for i, (b, r) in enumerate((b, r) for b in (0.5, 0.9, 0.99) for r in (0.5, 0.9, 0.99))]
    paths = regime_map_figure(pd.DataFrame(rows), 0.01, tmp_path)
    csv = next(p for p in paths if p.suffix == ".csv")
    again = redraw(csv, tmp_path / "again")
    assert {p.name for p in again} == {"regime_map.png", "regime_map.pdf", "regime_map.csv"}
    assert (tmp_path / "again" / "regime_map.csv").read_text() == csv.read_text()


def test_a_dense_beta_rho_grid_gets_its_phase_diagram(tmp_path):
    """regime_map: one cell per run over beta x rho, its regime, hill height and the metrics at
    the threshold; the CSV holds exactly the runs' values; a grid of fewer than 3 x 3 gets none."""
    from analysis.figures import regime_map_figure

    vals = [0.5, 0.9, 0.99]
    rows = [dict(run_id=f"{i:012x}", h=0.1, beta=b, rho=r, state="diverged" if (b, r) == (0.99, 0.5) else "completed",
                 regime="diverged" if (b, r) == (0.99, 0.5) else "spiky" if r < b else "stable",
                 hill_height=10.0 * (1 + i), **{"at_loss_0.01_pert_norm": float("nan") if r < b else 0.1 * (1 + i),
                                                "at_loss_0.01_test_acc": 0.9 + 0.001 * i})
            for i, (b, r) in enumerate((b, r) for b in vals for r in vals)]
    summary = pd.DataFrame(rows)
    paths = regime_map_figure(summary, 0.01, tmp_path)
    assert [p.name for p in paths] == ["regime_map.png", "regime_map.pdf", "regime_map.csv"]
    assert paths[0].stat().st_size > 10_000
    data = pd.read_csv(paths[2])
    assert len(data) == 9 and list(data[["beta", "rho"]].itertuples(index=False, name=None)) == \
        [(b, r) for b in vals for r in vals]
    assert data.set_index(["beta", "rho"]).loc[(0.99, 0.5), "regime"] == "diverged"
    assert (data["regime"] == "spiky").sum() == 2 and data["at_loss_0.01_pert_norm"].isna().sum() == 3
    assert regime_map_figure(summary[summary.rho < 0.99], 0.01, tmp_path / "small") == []
    two_h = pd.concat([summary, summary.assign(h=0.01, run_id=summary.run_id + "x")])
    assert sorted(p.name for p in regime_map_figure(two_h, 0.01, tmp_path / "h") if p.suffix == ".png") == \
        ["regime_map_h0.01.png", "regime_map_h0.1.png"]


def test_a_metric_over_decades_with_zeros_gets_a_symlog_axis(tmp_path):
    """Hill heights from 0 to 6 across six decades (the toy's): not a linear axis where all but
    two lines lie on zero; a log axis above the smallest positive value, 0 itself still drawn."""
    from analysis import figures

    figures.use_style("paper")
    heights = [0.0, 8e-6, 0.005, 0.03, 0.5, 6.4]
    s = pd.DataFrame(dict(run_id=[f"r{i}" for i in range(6)], h=[0.003, 0.01] * 3,
                          beta=[0.5, 0.5, 0.9, 0.9, 0.95, 0.95], state="completed", hill_height=heights))
    ax = axes_drawn_by(lambda: figures.threshold_figure(s, "h", None, tmp_path, metrics=("hill_height",),
                                                        name="hill"))[0, 0]
    assert ax.get_yscale() == "symlog" and ax.get_ylim()[0] < 0 < 1e-5 < ax.get_ylim()[1]
    ticks = list(ax.get_yticks())
    assert ticks[0] == 0 and 1e-5 in ticks and 1.0 in ticks and 1e-6 not in ticks  # no label crowding 0


def test_tick_labels_of_a_dense_grid_never_print_over_each_other(tmp_path):
    """The regime preset's twelve beta values (0.5 ... 0.999) on the 1 - x axis: every tick has its
    label (a value whose label would touch its neighbour's has no tick, never a blank label), the
    last one always, the labels stand upright and no two drawn texts overlap (analysis/look.py)."""
    import matplotlib.pyplot as plt

    from analysis import figures, look

    figures.use_style("paper")
    betas = [0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
    s = pd.DataFrame(dict(run_id=[f"r{i}" for i in range(12)], beta=betas, state="completed",
                          **{"at_loss_0.01_pert_norm": np.linspace(1, 2, 12)}))
    close, plt.close = plt.close, lambda fig=None: None
    try:
        ax = axes_drawn_by(lambda: figures.threshold_figure(s, "beta", 0.01, tmp_path, metrics=("pert_norm",)))[0, 0]
    finally:
        plt.close = close
    ticks, labels = list(ax.get_xticks()), [t.get_text() for t in ax.get_xticklabels()]
    assert set(ticks) <= set(betas) and ticks[-1] == 0.999 and len(ticks) >= 6
    assert labels == [f"{b:g}" for b in ticks] and all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    assert look.problems(ax.get_figure()) == []
    plt.close(ax.get_figure())


def test_make_analyze_prints_the_folder_the_counts_and_the_files_not_every_run(tmp_path, capsys):
    for i, b in enumerate((0.5, 0.9, 0.99)):
        write_run(tmp_path, f"r{i}", np.geomspace(2, 0.001, 30), beta=b, state="running" if i == 2 else "completed")
    main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"analysis of {tmp_path}: 3 runs: 2 completed, 1 running"
    assert out[1].startswith(f"wrote into {tmp_path / 'analysis'}/: columns.md, curves.parquet")
    assert "summary.csv" in out[1] and "curves.csv" not in out[1]  # the CSV copy only with --csv
    assert out[2].startswith("  figures (PNG, PDF and the CSV they are drawn from): at_loss_0.01_vs_beta")
    assert not any(ID["r0"] in line for line in out)  # the per-run table only with --verbose
    main([str(tmp_path), "--no-figures", "--verbose"])
    out = capsys.readouterr().out
    assert ID["r0"] in out and "figures (PNG" not in out


def test_a_folder_of_damaged_runs_gets_a_header_only_groups_csv_and_its_counts(tmp_path, capsys):
    d = write_run(tmp_path, "only", np.geomspace(2, 0.001, 10))
    (d / "status.json").write_text("garbage")
    main([str(tmp_path), "--no-figures"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"analysis of {tmp_path}: 1 runs: 1 damaged"
    g = pd.read_csv(tmp_path / "analysis" / "groups.csv")
    assert g.empty and {"point_id", "n", "n_diverged"} <= set(g.columns)
