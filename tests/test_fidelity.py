"""analysis.fidelity: the verdict on inputs with a known answer, the one-ulp perturbation of
theta_0 against numpy's nextafter, and the report end to end on a tiny configuration."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import fidelity
from analysis.fidelity import compare, judge
from pipeline.runs.ids import run_id

TINY = ["model=mlp", "model.width=16", "model.depth=1", "data=digits", "train.micro_batch=1437",
        "train.max_steps=30", "optim.h=1e-2", "train.loss_thresholds=[0.5,0.1]"]


# -- the verdict --------------------------------------------------------------------------------------
def test_a_deviation_inside_the_spread_is_within_and_one_outside_is_not():
    members = [1.0 + 1e-6, 1.0 - 3e-6, 1.0 + 2e-6]  # spread around the reference 1.0: 3e-6
    inside = judge(1.0, members, 1.0 + 2.5e-6)
    assert inside.within and inside.why == "within, 0.83×"
    assert inside.spread == pytest.approx(3e-6, rel=1e-9) and inside.deviation == pytest.approx(2.5e-6, rel=1e-6)
    outside = judge(1.0, members, 1.0 - 3e-5)
    assert not outside.within and outside.ratio == pytest.approx(10.0, rel=1e-6)
    assert outside.why == "outside, 10×"
    assert judge(1.0, members, 1.0 + 6e-6).within          # twice the spread: one more draw may land there
    assert not judge(1.0, members, 1.0 + 6.1e-6).within
    n = 360  # two test images against one: twice the spread, whatever the rounding of 2/360 - 0
    assert judge(0.975, [0.975 + 1 / n, 0.975], 0.975 - 2 / n).within


def test_with_no_spread_only_the_exact_value_is_within():
    assert judge(412.0, [412.0, 412.0], 412.0).why == "within, equal"
    v = judge(412.0, [412.0, 412.0], 413.0)
    assert not v.within and v.why == "outside, spread 0" and v.ratio == math.inf


def test_empty_values_are_an_outcome_of_their_own():
    nan = float("nan")
    assert judge(nan, [nan, nan], nan).within                   # nobody crossed the threshold
    assert not judge(120.0, [121.0, 119.0], nan).within         # the precision never crosses; fp64 does
    assert not judge(nan, [nan], 300.0).within                   # the precision crosses; nobody else does
    assert judge(120.0, [nan, 121.0], nan).within               # a member did not cross either
    assert "empty" in judge(120.0, [121.0], nan).why


def test_the_regime_is_judged_as_a_category():
    assert judge("stable", ["stable", "spiky"], "spiky").within  # a perturbed member spiked too
    v = judge("stable", ["stable", "stable"], "diverged")
    assert not v.within and "diverged" in v.why and math.isnan(v.ratio)


def test_compare_builds_one_row_per_metric_with_the_verdict_of_each_precision():
    ref = {"hill_height": 2.0, "at_loss_0.01_step": 120, "regime": "stable"}
    members = [{"hill_height": 2.0 + 1e-4, "at_loss_0.01_step": 121, "regime": "stable"},
               {"hill_height": 2.0 - 2e-4, "at_loss_0.01_step": 120, "regime": "stable"}]
    tested = {"fp32": {"hill_height": 2.0 + 5e-5, "at_loss_0.01_step": 121, "regime": "stable"},
              "bf16": {"hill_height": 2.01, "at_loss_0.01_step": 125, "regime": "spiky"}}
    t = compare(ref, members, tested, ["hill_height", "at_loss_0.01_step", "regime"]).set_index("metric")
    assert list(t["fp32_verdict"]) == ["within, 0.25×", "within, 1×", "within"]
    assert t.loc["hill_height", "bf16_verdict"] == "outside, 50×"
    assert t.loc["at_loss_0.01_step", "bf16_verdict"] == "outside, 5×"
    assert t.loc["regime", "bf16_verdict"] == "outside: spiky vs stable"
    assert t.loc["hill_height", "spread"] == pytest.approx(2e-4, rel=1e-6)
    assert t.loc["hill_height", "ensemble_min"] == pytest.approx(2.0 - 2e-4)


# -- the perturbation ---------------------------------------------------------------------------------
def test_perturb_one_ulp_moves_each_coordinate_to_its_float32_neighbour():
    from pipeline.engine.setup import perturb_one_ulp

    x = torch.randn(4096) * torch.logspace(-6, 6, 4096)
    p = torch.nn.Parameter(x.clone())
    perturb_one_ulp([p], 7)
    got, x64 = p.detach().numpy(), x.numpy()
    up, down = np.nextafter(x64, np.float32(np.inf)), np.nextafter(x64, np.float32(-np.inf))
    assert ((got == up) | (got == down)).all() and (got != x64).all()
    assert 0.45 < (got == up).mean() < 0.55  # signs drawn with probability 1/2
    q = torch.nn.Parameter(x.clone())
    perturb_one_ulp([q], 7)
    assert torch.equal(p, q)  # the seed decides
    r = torch.nn.Parameter(x.clone())
    perturb_one_ulp([r], 8)
    assert not torch.equal(p, r)


def test_the_perturbation_reaches_theta_0_of_a_run_and_its_id(cfg_factory):
    """The bilinear toy records theta_n: row 0 of a perturbed run is theta_0 moved by one ulp of
    float32 per coordinate; the key at its default (null) leaves the run id as it was."""
    from analysis.runs import read_metrics
    from pipeline.runs.rundir import RunDir
    from pipeline.train import train

    over = ["model=bilinear", "data=bilinear", "train.max_steps=3", "precision=fp32", "optim.h=1e-2"]
    plain, jittered = cfg_factory(*over, tiny=False), cfg_factory(*over, "train.perturb_theta0=3", tiny=False)
    assert run_id(plain) != run_id(jittered)
    for c in (plain, jittered):
        train(c)
    rows = [read_metrics(RunDir(c.paths.runs, run_id(c)).metrics) for c in (plain, jittered)]
    t0 = rows[0][["theta_0", "theta_1"]].iloc[0].to_numpy(np.float32)
    t1 = rows[1][["theta_0", "theta_1"]].iloc[0].to_numpy(np.float32)
    up, down = np.nextafter(t0, np.float32(np.inf)), np.nextafter(t0, np.float32(-np.inf))
    assert ((t1 == up) | (t1 == down)).all() and (t1 != t0).all()


def test_perturb_theta0_is_validated(cfg_factory):
    from pipeline.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=r"train.perturb_theta0=-1: allowed values are integers >= 0 or null"):
        validate(cfg_factory("train.perturb_theta0=-1"))


# -- the report end to end ------------------------------------------------------------------------------
def _report(tmp_path, runs, out):
    return fidelity.main(["--name", "tiny", "--ensemble", "2", "--precisions", "fp32,bf16", "--runs", str(runs),
                          "--out", str(out), "--", *TINY])


@pytest.mark.slow
def test_the_report_runs_is_reproducible_and_reuses_its_runs(tmp_path):
    assert _report(tmp_path, tmp_path / "runs_a", tmp_path / "out_a") == 0
    assert _report(tmp_path, tmp_path / "runs_b", tmp_path / "out_b") == 0
    a = pd.read_csv(tmp_path / "out_a" / "tiny" / "fidelity.csv")
    b = pd.read_csv(tmp_path / "out_b" / "tiny" / "fidelity.csv")
    pd.testing.assert_frame_equal(a, b)  # the same numbers from fresh runs
    assert list(a["metric"]) == fidelity.paper_metrics([0.5, 0.1])
    assert set(a.columns) >= {"fp64", "spread", "fp32", "fp32_verdict", "bf16", "bf16_verdict"}
    # five runs: fp64, two perturbed fp32, fp32, bf16; a second call trains none of them again
    runs = sorted(p for p in (tmp_path / "runs_a").iterdir() if p.is_dir())
    assert len(runs) == 5
    before = {p.name: (p / "metrics.csv").stat().st_mtime_ns for p in runs}
    assert _report(tmp_path, tmp_path / "runs_a", tmp_path / "out_c") == 0
    assert before == {p.name: (p / "metrics.csv").stat().st_mtime_ns for p in runs}
    dev = pd.read_csv(tmp_path / "out_a" / "tiny" / "deviation.csv")
    assert set(dev["variant"]) == {"ulp seed 1", "ulp seed 2", "fp32", "bf16"}
    loss0 = dev[(dev["step"] == 0) & (dev["metric"] == "loss")].set_index("variant")["value"]
    assert (loss0[["ulp seed 1", "ulp seed 2", "fp32"]] < 1e-6).all()  # fp32 at theta_0: rounding only
    assert loss0["bf16"] > 10 * loss0["fp32"]                             # 8 bits of mantissa
    assert (tmp_path / "out_a" / "tiny" / "deviation.png").stat().st_size > 10_000
    md = (tmp_path / "out_a" / "fidelity.md").read_text()
    assert "| `hill_height` |" in md and "spread of fp32 + 1 ulp (K=2)" in md


def test_bad_input_is_one_line_before_any_run(tmp_path, capsys):
    assert fidelity.main(["no-such-case"]) == 2
    assert "unknown case no-such-case; allowed: mlp-oscillation" in capsys.readouterr().err
    code = fidelity.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--", *TINY,
                          "optim.beta=1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: optim.beta=1.5: allowed range [0, 1)"]
    assert not (tmp_path / "runs").exists()
    assert fidelity.main(["--precisions", "fp16"]) == 2
    assert "allowed values are comma-separated fp32, bf16, tf32, torch_default" in capsys.readouterr().err


def test_the_report_leaves_the_callers_thread_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fidelity.main(["--threads", "1", "--runs", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--",
                              *TINY, "optim.beta=1.5"]) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("args, message", [
    (["--ensemble", "0"], "--ensemble=0: allowed values are integers >= 1"),
    (["--threads", "0"], "--threads=0: allowed values are integers >= 1"),
    (["--precisions", "fp32,fp64"], "--precisions=fp32,fp64: allowed values are comma-separated"),
])
def test_bad_arguments_are_one_line(args, message, capsys, tmp_path):
    assert fidelity.main([*args, "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not (tmp_path / "runs").exists()
