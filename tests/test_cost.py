"""DRY=1's expected cost of a paper preset (pipeline/dispatch/cost.py): FLOPs against a count by
hand, GPU-hours against the formula, the line in the dry run."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from pipeline.dispatch.cost import MFU, PEAK_TFLOPS, flops_per_example, run_cost

from .conftest import make_cfg
from .test_sweep import make


def test_flops_of_an_mlp_are_those_counted_by_hand():
    """A Linear(a, b) costs 2ab a forward (per example), 2ab for its weight's gradient and 2ab
    for its input's, except the first layer's input (the data: no gradient)."""
    fb, f = flops_per_example(OmegaConf.to_yaml(OmegaConf.create(dict(name="mlp", width=128, depth=2,
                                                                      activation="tanh"))), 10, (64,))
    layers = [(64, 128), (128, 128), (128, 10)]
    forward = sum(2 * a * b for a, b in layers)
    assert f == forward
    assert fb == 3 * forward - 2 * 64 * 128


def test_a_paper_preset_costs_steps_times_flops_at_the_assumed_mfu():
    cfg = make_cfg(["sweep=fig4"])
    c = run_cost(cfg)
    fb, f = flops_per_example(OmegaConf.to_yaml(cfg.model), 10, (3, 32, 32))
    assert c["n"] == 50_000 and c["steps"] == 4001
    assert c["flops_per_step"] == 50_000 * fb + 10_000 * f / 50
    assert c["gpu_hours"] == pytest.approx(4001 * c["flops_per_step"] / (MFU * PEAK_TFLOPS["fp32"] * 1e12) / 3600)
    assert 0.3e15 < c["flops_per_step"] < 0.5e15  # ResNet-50 on CIFAR: ~7.8 GFLOP an image, forward and backward
    small = run_cost(make_cfg(["sweep=fig4", "data.subset=1000", "precision=bf16"]))
    assert small["n"] == 1000 and small["gpu_hours"] < c["gpu_hours"] / 50 / 10
    assert run_cost(make_cfg(["sweep=fig7", "data.per_class=10"]))["n"] == 1000  # CIFAR-100: 10 x 100 classes
    assert run_cost(make_cfg(["sweep=digits"])) is None  # a CPU preset: no GPU cost


def test_a_dry_run_of_a_paper_preset_states_its_cost(tmp_path):
    r = make("sweep", tmp_path, "fig4", "local", f"data.root={tmp_path}/nodata", 0, 600, "DRY=1")
    assert r.returncode == 0, r.stderr
    m = re.search(r"expected cost: ([\d.]+) GPU-hours in all", r.stdout)
    per = re.search(r"6 runs of resnet50 on N = 50,000 in fp32: [\d.]+ PFLOP a step x 4,000 steps \(at most\) = "
                    r"([\d.]+) GPU-h a run", r.stdout)
    assert m and per, r.stdout
    assert float(m.group(1)) == pytest.approx(6 * float(per.group(1)), rel=1e-2)
    assert "assumed: 40% of an H100/H200" in r.stdout and "warning: cifar10 is not in" in r.stderr
    toy = make("sweep", tmp_path, "toy", "local", "", 0, 600, "DRY=1")
    assert toy.returncode == 0 and "expected cost" not in toy.stdout


def test_the_sharpness_is_counted_at_its_budget():
    """train.sharpness_every=k adds, per step, one forward-and-backward pass (the kept graph) and
    two eigenvalues (Adam) x sharpness_iters products x HVP_COST passes of the N examples / k;
    one eigenvalue for GD."""
    from pipeline.dispatch.cost import HVP_COST

    base = run_cost(make_cfg(["sweep=fig4"]))
    fb, _ = flops_per_example(OmegaConf.to_yaml(make_cfg(["sweep=fig4"]).model), 10, (3, 32, 32))
    on = run_cost(make_cfg(["sweep=fig4", "train.sharpness_every=50", "train.sharpness_iters=10"]))
    assert on["flops_per_step"] - base["flops_per_step"] == pytest.approx((1 + 2 * 10 * HVP_COST) * base["n"] * fb / 50)
    gd = run_cost(make_cfg(["sweep=fig4", "optim=gd", "train.sharpness_every=50", "train.sharpness_iters=10"]))
    assert gd["flops_per_step"] - base["flops_per_step"] == pytest.approx((1 + 10 * HVP_COST) * base["n"] * fb / 50)
