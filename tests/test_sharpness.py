"""Sharpness and preconditioned sharpness (pipeline/engine/sharpness.py) against independent
references: the bilinear model's analytic Hessian and a float64 transcription of Adam's
preconditioner along the run's own recorded theta_n; the dense Hessian of small MLPs
(torch.autograd.functional.hessian, numpy.linalg.eigvalsh) with P from torch.optim.Adam's state;
each stability threshold shown on a quadratic; bad input; what recording leaves unchanged."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import functional_call

from pipeline.engine.data import load_dataset
from pipeline.engine.dist import Ranks
from pipeline.engine.optim import GD, Adam, Momentum, RMSProp
from pipeline.engine.setup import build
from pipeline.engine.sharpness import Sharpness, lanczos_top
from pipeline.engine.step import full_batch_step, partition
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.thresholds import eos_threshold
from pipeline.train import train

from .conftest import ROOT, make_cfg

BILINEAR = ["model=bilinear", "data=bilinear", "precision=fp64", "device=cpu", "train.progress=none",
            "optim.h=0.05", "optim.beta=0.9", "optim.rho=0.99", "train.max_steps=60", "train.sharpness_every=5",
            "train.sharpness_tol=1e-10", "train.record_params=16"]


def rows(cfg) -> pd.DataFrame:
    assert train(cfg) == "completed"
    return pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics)


def test_the_bilinear_run_records_the_analytic_eigenvalues(tmp_path):
    """E = (y - t1 t2 x)^2 / 2: H = [[x^2 t2^2, 2 x^2 t1 t2 - x y], [., x^2 t1^2]] at each recorded
    theta_n; P = sqrt(nu_{n+1} / (1 - rho^{n+1}) + eps) with nu from the analytic gradients of
    theta_0 .. theta_n (Definition 2.1), transcribed here in float64."""
    cfg = make_cfg(BILINEAR, runs=tmp_path / "runs")
    m = rows(cfg)
    x, y, rho, eps = 2.0, 1.5, 0.99, float(cfg.optim.eps)
    nu = np.zeros(2)
    checked = 0
    for n, r in m.iterrows():
        t1, t2 = r["theta_0"], r["theta_1"]
        res = y - t1 * t2 * x
        g = np.array([-res * t2 * x, -res * t1 * x])
        nu = rho * nu + (1 - rho) * g * g
        if n % 5:
            assert math.isnan(r["sharpness"]) and math.isnan(r["pre_sharpness"])  # not a record step: empty
            continue
        off = 2 * x * x * t1 * t2 - x * y
        hess = np.array([[x * x * t2 * t2, off], [off, x * x * t1 * t1]])
        d = 1 / np.sqrt(np.sqrt(nu / (1 - rho ** (n + 1)) + eps))
        assert r["sharpness"] == pytest.approx(np.linalg.eigvalsh(hess)[-1], rel=1e-8)
        assert r["pre_sharpness"] == pytest.approx(np.linalg.eigvalsh(d[:, None] * hess * d[None, :])[-1], rel=1e-8)
        assert r["sharpness_resid"] <= 1e-10 and 1 <= r["sharpness_iters"] <= 2
        checked += 1
    assert checked == 13


def small(overrides, activation):
    cfg = make_cfg(["model=mlp", "model.width=6", "model.depth=1", f"model.activation={activation}", "data=synthetic",
                    "data.n_train=48", "data.n_test=8", "data.image_size=3", "precision=fp64", "device=cpu",
                    "train.micro_batch=16", *overrides])
    data = load_dataset(cfg.data, torch.device("cpu"))
    model, _, opt = build(cfg, data, torch.device("cpu"))
    return cfg, data, model, opt


def dense_hessian(model, data) -> np.ndarray:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        ps, i = {}, 0
        for name, shape in zip(names, shapes):
            ps[name] = theta[i:i + shape.numel()].view(shape)
            i += shape.numel()
        return data.objective(functional_call(model, ps, (data.x_train,)), data.y_train) / data.x_train.shape[0]

    return torch.autograd.functional.hessian(loss, flat).numpy()


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_an_mlp_against_its_dense_hessian_and_torch_adam(activation):
    """After 4 steps of the pipeline's Adam (eps outside the root, as torch.optim.Adam) beside
    torch.optim.Adam from the same theta_0: lambda_1(H) and lambda_1(P^-1 H) at theta_4 equal
    eigvalsh of the dense Hessian, and of D H D with D from torch.optim.Adam's own state after
    its fifth step (exp_avg_sq = nu_5), to 1e-8."""
    cfg, data, model, opt = small(["optim.eps_inside=false", "optim.h=0.01"], activation)
    params = [p for p in model.parameters()]
    twin = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.Adam(twin, lr=0.01, betas=(float(cfg.optim.beta), float(cfg.optim.rho)), eps=float(cfg.optim.eps))
    parts = partition(data.x_train.shape[0], 16)
    for step in range(5):
        full_batch_step(model, data.x_train, data.y_train, data.objective, parts, params, float(cfg.optim.eps))
        for p, q in zip(params, twin):
            q.grad = p.grad.clone()
        if step == 4:
            break
        opt.step()
        ref.step()
    got = Sharpness(1, 400, 1e-12, 0).measure(model, data, parts, params, opt, contextlib.nullcontext, Ranks())
    hess = dense_hessian(model, data)
    ref.step()  # torch's fifth step: its state now holds nu_5 and step 5
    d = torch.cat([1 / (ref.state[q]["exp_avg_sq"] / (1 - float(cfg.optim.rho) ** 5)).sqrt().add(float(cfg.optim.eps))
                   .sqrt().reshape(-1) for q in twin]).numpy()
    assert got["sharpness"] == pytest.approx(np.linalg.eigvalsh(hess)[-1], rel=1e-8)
    assert got["pre_sharpness"] == pytest.approx(np.linalg.eigvalsh(d[:, None] * hess * d[None, :])[-1], rel=1e-8)


def test_lanczos_warm_start_and_an_unconverged_value():
    """From the previous top vector a nearby operator converges in fewer products; a budget too
    small leaves the value flagged: its residual above the tolerance."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    evals = torch.linspace(0.1, 10.0, 60, dtype=torch.float64)
    a = q @ torch.diag(evals) @ q.T
    cold, vec, used_cold, resid = lanczos_top(lambda v: a @ v, torch.randn(60, generator=gen, dtype=torch.float64),
                                             60, 1e-10)
    assert cold == pytest.approx(10.0, rel=1e-10) and resid <= 1e-10
    b = a + 1e-4 * torch.eye(60, dtype=torch.float64)
    warm, _, used_warm, _ = lanczos_top(lambda v: b @ v, vec, 60, 1e-10)
    assert warm == pytest.approx(10.0001, rel=1e-10) and used_warm < used_cold
    s = Sharpness(1, 2, 1e-10, 0)
    out = s._one("sharpness", lambda v: a @ v, 60, "cpu")
    assert out["sharpness"] is None and out["sharpness_resid"] > 1e-10 and out["sharpness_iters"] == 2


@pytest.mark.parametrize("name", ["gd", "momentum", "rmsprop", "adam"])
def test_each_threshold_is_where_a_quadratic_becomes_unstable(name):
    """E = theta^T A theta / 2 with P frozen (rho = 1, nu_0 set, no bias correction): the update
    converges when lambda_1(P^-1 A) is 2% below eos_threshold and diverges 2% above it."""
    h, beta, nu0, eps = 0.1, 0.8, 4.0, 1e-8
    thr = eos_threshold(name, h, beta if name in ("adam", "momentum") else 0.0)
    p_scale = math.sqrt(nu0 + eps) if name in ("adam", "rmsprop") else 1.0
    for factor, stable in ((0.98, True), (1.02, False)):
        lam = factor * thr * p_scale  # an eigenvalue of A: lambda_1(P^-1 A) = factor * thr
        theta = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        a = torch.tensor([lam, 0.5 * lam], dtype=torch.float64)
        opt = {"gd": lambda t: GD([t], h=h), "momentum": lambda t: Momentum([t], h=h, beta=beta),
               "rmsprop": lambda t: RMSProp([t], h=h, rho=1.0, eps=eps),
               "adam": lambda t: Adam([t], h=h, beta=beta, rho=1.0, eps=eps, bias_correction=False)}[name](theta)
        if name in ("adam", "rmsprop"):
            opt.state[theta].update(step=0, nu=torch.full((2,), nu0, dtype=torch.float64),
                                    **({"m": torch.zeros(2, dtype=torch.float64)} if name == "adam" else {}))
        for _ in range(3000):
            theta.grad = (a * theta).detach()
            opt.step()
        size = float(theta.detach().abs().max())
        assert (size < 1e-3) if stable else (size > 1e3), (name, factor, size)


@pytest.mark.parametrize("bad,says", [
    ("train.sharpness_every=0", "train.sharpness_every=0: allowed values are integers >= 1 or null"),
    ("train.sharpness_every=-3", "train.sharpness_every=-3: allowed values are integers >= 1 or null"),
    ("train.sharpness_every=2.5", "train.sharpness_every=2.5: allowed values are integers >= 1 or null"),
    ("train.sharpness_every=often", "train.sharpness_every=often: allowed values are integers >= 1 or null"),
    ("train.sharpness_iters=0", "train.sharpness_iters=0: allowed values are integers >= 1"),
    ("train.sharpness_tol=0", "train.sharpness_tol=0: allowed range (0, 1)"),
])
def test_bad_sharpness_input_is_one_line_and_no_run_directory(tmp_path, bad, says):
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "model=bilinear", "data=bilinear", bad,
                        f"paths.runs={tmp_path}/runs"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()


FROZEN = '''
import torch


class Half(torch.nn.Module):
    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.body = torch.nn.Linear(int(torch.tensor(input_shape).prod()), 8)
        self.head = torch.nn.Linear(8, num_classes)
        self.body.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.flatten(1))))
'''


def test_a_model_with_frozen_parameters_is_refused_before_any_run_directory(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "frozen.py").write_text(FROZEN)
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "model=custom", "model._target_=frozen.Half",
                        "data.n_train=32", "data.n_test=8", "data.image_size=4", "train.sharpness_every=2",
                        "device=cpu", f"paths.runs={tmp_path}/runs"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": f"{ROOT}:{tmp_path / 'code'}", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "train.sharpness_every=2: model=custom has parameters that do not require " \
        "gradients (body.weight, body.bias)" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_pack_is_refused_in_one_line(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.train import train_pack

    cfgs = [make_cfg(["model=mlp", "data=digits", "train.sharpness_every=5", f"optim.h={h}"], runs=tmp_path / "runs")
            for h in (0.01, 0.02)]
    with pytest.raises(ConfigError, match="train.sharpness_every=5: the Lanczos iterations"):
        train_pack(cfgs)
    assert not (tmp_path / "runs").exists()


TINY_BN = ["model=cnn", "model.width=4", "model.norm=bn", "data=synthetic", "data.n_train=64", "data.n_test=16",
           "data.image_size=8", "train.micro_batch=16", "train.max_steps=12", "train.eval_every=3",
           "train.checkpoint_every=4", "train.progress=none", "device=cpu", "precision=fp64"]


@pytest.mark.parametrize("mode", ["exact", "running_stats"])
def test_recording_changes_no_other_column(tmp_path, mode, monkeypatch):
    """A BatchNorm CNN with and without train.sharpness_every=4: every other column, test
    columns included, is the same to the last digit (the HVP passes leave BatchNorm's statistics
    as they were; the record steps keep their graphs for the record, and each record takes them)."""
    from pipeline.engine import sharpness

    base = [*TINY_BN, f"train.eval_mode={mode}"]
    off = rows(make_cfg(base, runs=tmp_path / "off")).drop(columns="time_s")
    measure, taken = sharpness.Sharpness.measure, []

    def spy(self, *args):
        taken.append(len(args[-1].kept) if isinstance(args[-1], sharpness.StepGraphs) else None)
        return measure(self, *args)

    monkeypatch.setattr(sharpness.Sharpness, "measure", spy)
    on = rows(make_cfg([*base, "train.sharpness_every=4", "train.sharpness_iters=8"], runs=tmp_path / "on"))
    assert taken == [64 // 16] * 4, taken  # records at steps 0, 4, 8, 12, each on its step's 4 parts
    assert on["sharpness"].notna().tolist() == [n % 4 == 0 for n in range(13)] or \
        on["sharpness_resid"].notna().tolist() == [n % 4 == 0 for n in range(13)]
    pd.testing.assert_frame_equal(on[off.columns], off, check_exact=True)


def test_a_run_killed_between_two_records_resumes_with_the_same_columns(tmp_path):
    from .conftest import run_cli

    args = [*BILINEAR, f"paths.runs={tmp_path}/runs"]
    r = run_cli(["pipeline.train", *args, "train.checkpoint_every=7"], cwd=tmp_path, env=dict(ADAM_FAULTS="row@17"))
    assert r.returncode != 0
    r = run_cli(["pipeline.train", *args, "train.checkpoint_every=7"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = make_cfg([*BILINEAR, "train.checkpoint_every=7"], runs=tmp_path / "runs")
    resumed = pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    clean = rows(make_cfg([*BILINEAR, "train.checkpoint_every=7"], runs=tmp_path / "clean"))
    assert list(resumed.columns) == list(clean.columns) and resumed.step.tolist() == list(range(61))
    for col in ("sharpness", "pre_sharpness"):
        np.testing.assert_allclose(resumed[col], clean[col], rtol=1e-9)  # converged to 1e-10 either way


@pytest.mark.slow
def test_two_processes_record_what_one_does(tmp_path):
    """fp64, an MLP over 3 micro-batches: each rank's share of the Hessian-vector products summed
    over the ranks gives the one-process values (Lanczos runs alike on every rank)."""
    from .test_dist import torchrun

    args = ["model=mlp", "model.width=8", "model.depth=1", "data=synthetic", "data.n_train=48", "data.n_test=8",
            "data.image_size=4", "train.micro_batch=16", "precision=fp64", "device=cpu", "train.progress=none",
            "train.max_steps=20", "train.sharpness_every=5", "train.sharpness_tol=1e-9", "train.sharpness_iters=60"]
    one = make_cfg(args, runs=tmp_path / "one")
    a = rows(one)
    p = torchrun(2, [*args, f"paths.runs={tmp_path}/two"], tmp_path)
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    b = pd.read_csv(RunDir(tmp_path / "two", run_id(one)).metrics)
    assert a["sharpness"].notna().sum() == 5
    for col in ("loss", "sharpness", "pre_sharpness"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-8)


def test_the_summary_columns_of_a_run_against_its_threshold():
    """Adam h = 0.01, beta = 0.9: threshold 38 / 0.01 = 3800; pre_sharpness recorded every 10
    steps (an unconverged record empty) crosses 0.9 x 3800 at step 30 and 3800 at step 40; the
    record of step 0, in the start-up (loss above 5 % of its initial value until step 5), counts
    for nothing, however large."""
    from analysis.summary import edge_of_stability

    steps = list(range(0, 61))
    pre = {0: 9e4, 10: 2000.0, 20: 3000.0, 30: 3500.0, 40: 3900.0, 50: None, 60: 3700.0}
    sharp = {k: (v / 40 if v else None) for k, v in pre.items()}
    m = pd.DataFrame(dict(step=steps, pre_sharpness=[pre.get(n) for n in steps], loss=[0.5 ** n for n in steps],
                          sharpness=[sharp.get(n) for n in steps]), dtype=float)
    out = edge_of_stability(m, {"name": "adam", "h": 0.01, "beta": 0.9})
    assert out["eos_threshold"] == pytest.approx(3800.0)
    assert out["eos_ratio_max"] == pytest.approx(3900 / 3800)
    assert out["eos_0.9_step"] == 30 and out["eos_1_step"] == 40
    assert out["eos_frac_0.9"] == pytest.approx(3 / 5)  # 3500, 3900, 3700 of five converged records after it
    assert out["gd_ratio_max"] == pytest.approx(3900 / 40 * 0.01 / 2) and math.isnan(out["gd_0.9_step"])
    assert edge_of_stability(m.drop(columns=["pre_sharpness", "sharpness"]), {"name": "adam", "h": 0.01}) == {}
    flat = edge_of_stability(m.assign(loss=1.0), {"name": "adam", "h": 0.01, "beta": 0.9})  # never past the start-up
    assert math.isnan(flat["eos_ratio_max"]) and math.isnan(flat["eos_1_step"])


def test_ghost_batchnorm_against_the_dense_hessian_of_the_group_wise_loss():
    """A BatchNorm CNN (fp64) over two micro-batches, each its own BatchNorm group: lambda_1 of
    the Hessian of sum over groups of their summed loss / N, the model in training mode (each
    group normalised by its own statistics), equals eigvalsh of that loss's dense Hessian; the
    running statistics are as they were."""
    cfg = make_cfg(["model=cnn", "model.width=2", "model.norm=bn", "data=synthetic", "data.n_train=16",
                    "data.n_test=8", "data.image_size=8", "train.micro_batch=8", "precision=fp64", "device=cpu",
                    "optim=gd"])
    data = load_dataset(cfg.data, torch.device("cpu"))
    model, _, opt = build(cfg, data, torch.device("cpu"))
    params = list(model.parameters())
    parts = partition(16, 8)
    full_batch_step(model, data.x_train, data.y_train, data.objective, parts, params, float(cfg.optim.eps))
    before = [b.clone() for b in model.buffers()]
    got = Sharpness(1, 400, 1e-12, 0).measure(model, data, parts, params, opt, contextlib.nullcontext, Ranks())
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]

    def loss(theta):
        ps, i = {}, 0
        for name, shape in zip(names, shapes):
            ps[name] = theta[i:i + shape.numel()].view(shape)
            i += shape.numel()
        return sum(data.objective(functional_call(model, ps, (data.x_train[idx],)), data.y_train[idx])
                   for idx in parts) / 16

    hess = torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in params])).numpy()
    assert got["sharpness"] == pytest.approx(np.linalg.eigvalsh(hess)[-1], rel=1e-8)
    assert got["pre_sharpness"] == got["sharpness"]  # GD: P = I


def test_a_record_builds_each_parts_graph_once_when_they_fit_and_per_product_when_not(monkeypatch):
    """Both eigenvalues of a record (Adam: two Lanczos runs) share one forward per part while the
    parts' gradient graphs fit in memory; with no memory to spare each product rebuilds them, as
    the step does. Both give the same values, bit for bit."""
    from pipeline.engine import sharpness

    cfg = make_cfg(["model=cnn", "model.width=2", "model.norm=bn", "data=synthetic", "data.n_train=16",
                    "data.n_test=8", "data.image_size=8", "train.micro_batch=8", "precision=fp64", "device=cpu"])
    data = load_dataset(cfg.data, torch.device("cpu"))
    model, _, opt = build(cfg, data, torch.device("cpu"))
    params, parts = list(model.parameters()), partition(16, 8)
    full_batch_step(model, data.x_train, data.y_train, data.objective, parts, params, float(cfg.optim.eps))
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))

    def record():
        forwards.clear()
        out = Sharpness(1, 30, 1e-6, 0).measure(model, data, parts, params, opt, contextlib.nullcontext, Ranks())
        return out, len(forwards)

    kept, n_kept = record()
    monkeypatch.setattr(sharpness, "free_bytes", lambda device: 0)
    rebuilt, n_rebuilt = record()
    assert kept == rebuilt and kept["pre_sharpness"] != kept["sharpness"]
    assert n_kept == len(parts)
    assert n_rebuilt == len(parts) * (kept["sharpness_iters"] + kept["pre_sharpness_iters"])


def test_a_record_takes_its_steps_own_graphs_and_the_step_is_unchanged(monkeypatch):
    """On a record's step (pipeline/engine/single.py) the step keeps each part's gradient graph
    (sharpness.StepGraphs) and the record adds no forward: the step's gradient and metrics equal a
    plain step's bit for bit (fp32, a BatchNorm CNN, Adam, two micro-batches), the record's values
    equal a record on its own graphs bit for bit. With no memory to spare the step keeps nothing
    and the record rebuilds the graphs per product, with the same values."""
    from pipeline.engine import sharpness

    cfg = make_cfg(["model=cnn", "model.width=2", "model.norm=bn", "data=synthetic", "data.n_train=16",
                    "data.n_test=8", "data.image_size=8", "train.micro_batch=8", "device=cpu"])
    data = load_dataset(cfg.data, torch.device("cpu"))
    model, _, opt = build(cfg, data, torch.device("cpu"))
    params, parts = list(model.parameters()), partition(16, 8)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))

    def step_and_record(graphs):
        forwards.clear()
        metrics = full_batch_step(model, data.x_train, data.y_train, data.objective, parts, params,
                                  float(cfg.optim.eps), graphs=graphs)
        grads, n_step = [p.grad.clone() for p in params], len(forwards)
        forwards.clear()
        out = Sharpness(1, 30, 1e-4, 0).measure(model, data, parts, params, opt, contextlib.nullcontext, Ranks(),
                                                graphs)
        return metrics, grads, n_step, out, len(forwards)

    m_plain, g_plain, n_plain, own, n_own = step_and_record(None)
    m_kept, g_kept, n_kept, taken, n_taken = step_and_record(sharpness.StepGraphs(params, len(parts)))
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_kept)) and n_plain == n_kept == len(parts)
    assert all(torch.equal(m_plain[k], m_kept[k]) for k in m_plain)
    assert taken == own and n_own == len(parts) and n_taken == 0
    monkeypatch.setattr(sharpness, "free_bytes", lambda device: 0)
    graphs = sharpness.StepGraphs(params, len(parts))
    _, g_none, _, rebuilt, n_rebuilt = step_and_record(graphs)
    assert graphs.fits is False and graphs.kept == [] and all(torch.equal(a, b) for a, b in zip(g_plain, g_none))
    assert rebuilt == own and n_rebuilt == len(parts) * (own["sharpness_iters"] + own["pre_sharpness_iters"])


def test_graphs_fit_keeps_one_part_always_and_more_only_within_half_the_free_memory(monkeypatch):
    from pipeline.engine import sharpness

    monkeypatch.setattr(sharpness, "free_bytes", lambda device: 1000)
    assert sharpness.graphs_fit(10 ** 9, 1, "cpu")  # one part: the step holds as much
    assert sharpness.graphs_fit(250, 3, "cpu") and not sharpness.graphs_fit(251, 3, "cpu")
    assert sharpness.free_bytes(torch.device("cpu")) == 1000
    monkeypatch.undo()
    assert sharpness.free_bytes(torch.device("cpu")) > 0  # this host's MemAvailable


def test_a_parameter_with_a_constant_gradient_or_none_has_zero_hessian_rows():
    """E = mean((x . a)^2) + b: b's gradient is constant, its row and column of H are zero, and so
    are those of a parameter c the loss does not use; the products equal the dense Hessian's
    (torch.autograd.functional.hessian), on the record's own graph and on its step's (whose
    backward leaves c's gradient None, as backward() does)."""
    from pipeline.engine.losses import Objective
    from pipeline.engine.sharpness import StepGraphs, hvp_operator
    from pipeline.engine.step import accumulate_gradient

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
    model.b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    model.c = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    model.forward = lambda inp: ((inp * model.a).sum(1) ** 2)[:, None] + model.b

    objective = Objective("sum", lambda out, _: out.sum(), classification=False)
    params, parts = [model.a, model.b, model.c], [torch.arange(4), torch.arange(4, 8)]
    graphs = StepGraphs(params, len(parts))
    accumulate_gradient(model, x, x, objective, parts, graphs=graphs)
    assert model.c.grad is None and len(graphs.kept) == 2
    hess = torch.zeros(6, 6, dtype=torch.float64)
    hess[:4, :4] = torch.autograd.functional.hessian(
        lambda t: objective(((x * t[:3]).sum(1) ** 2)[:, None] + t[3:], None) / 8,
        torch.cat([p.detach() for p in params[:2]]))
    for step_graphs in (None, graphs):
        hvp = hvp_operator(model, x, x, objective, parts, params, contextlib.nullcontext, Ranks(), step_graphs)
        for v in torch.eye(6, dtype=torch.float64):
            assert torch.allclose(hvp(v), hess @ v, rtol=1e-12, atol=1e-14)


def test_lanczos_reports_the_true_residual_of_its_ritz_pair_on_a_clustered_spectrum():
    """Four eigenvalues within 1e-3 of the top one and a long tail, 2,000 dimensions: the value
    equals eigvalsh's to its bound, and ||A y - theta y|| / theta computed here directly is the
    residual reported (at most the tolerance); the basis stays orthonormal (y of unit norm)."""
    gen = torch.Generator().manual_seed(2)
    dim = 2000
    evals = torch.cat([torch.tensor([10.0, 9.999, 9.9985, 9.998], dtype=torch.float64),
                       torch.rand(dim - 4, generator=gen, dtype=torch.float64) * 9])
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a = (q * evals) @ q.T
    theta, y, used, resid = lanczos_top(lambda v: a @ v, torch.randn(dim, generator=gen, dtype=torch.float64),
                                        200, 1e-6)
    true = float((a @ y - theta * y).norm()) / theta
    assert resid <= 1e-6 and true == pytest.approx(resid, rel=1e-3, abs=1e-9)
    assert abs(theta - 10.0) <= resid * theta and float(y.norm()) == pytest.approx(1.0, abs=1e-12)


def test_the_warm_start_continues_the_eigenvectors_drift_and_saves_products():
    """An operator whose eigenvectors rotate at a constant rate between records: after two
    records Lanczos starts from 2 y_new - y_old (y_old's sign aligned), which needs fewer
    products than a start from the last vector alone; every value equals the operator's own top
    eigenvalue."""
    gen = torch.Generator().manual_seed(3)
    dim = 200
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    evals = torch.cat([torch.tensor([10.0, 9.0], dtype=torch.float64), torch.linspace(0, 8, dim - 2,
                                                                                       dtype=torch.float64)])
    skew = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    skew = 0.002 * (skew - skew.T)

    def operator(t):
        q = torch.linalg.matrix_exp(t * skew) @ basis
        return (q * evals) @ q.T

    ops = [operator(t) for t in range(6)]
    extrapolated, last = Sharpness(1, 100, 1e-8, 0), Sharpness(1, 100, 1e-8, 0)
    first = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    last.start = lambda name, dim, device: (last.top.get(name) or [first])[-1]
    used_x, used_l = [], []
    for a in ops:
        out_x = extrapolated._one("sharpness", a.__matmul__, dim, "cpu")
        out_l = last._one("sharpness", a.__matmul__, dim, "cpu")
        assert out_x["sharpness"] == pytest.approx(10.0, rel=1e-10) == out_l["sharpness"]
        used_x.append(out_x["sharpness_iters"])
        used_l.append(out_l["sharpness_iters"])
    new, old = extrapolated.top["sharpness"][1], extrapolated.top["sharpness"][0]
    start = extrapolated.start("sharpness", dim, "cpu")
    assert torch.allclose(start, 2 * new - (old if float(old @ new) >= 0 else -old))
    assert used_x[:2] == used_l[:2] and sum(used_x[2:]) < sum(used_l[2:]), (used_x, used_l)
