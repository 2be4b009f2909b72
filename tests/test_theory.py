"""The modified ODEs of Theorems 3.1 / 4.2: checked against independent closed forms
(Remarks 3.2, 4.3, built here from full Hessians) and by their convergence orders in h."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import quad

from analysis import theory as th

HS = (8e-3, 4e-3, 2e-3, 1e-3)
BILINEAR = ([th.bilinear_loss()], torch.tensor([2.8, 3.5], dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["adam", "rmsprop"])
def test_orders_on_the_bilinear_model(algo):
    """Theorem 3.1 / 4.2: first-order flow O(h), modified ODE O(h^2) (beta=0.5, rho=0.6, T=0.5)."""
    losses, theta0 = BILINEAR
    errs = th.verify_problem(losses, theta0, algo, 0.5, 0.6, 1e-8, 0.5, HS, forms=("first", "modified"))
    first, modified = th.fitted_order(HS, errs["first"]), th.fitted_order(HS, errs["modified"])
    assert 0.85 < first < 1.15, errs
    assert 1.8 < modified < 2.2, errs
    assert all(m < f / 10 for m, f in zip(errs["modified"], errs["first"]))


@pytest.mark.slow
def test_large_n_form():
    """(2)-(3) keeps Adam's order 2 (its leading term is exact for full batch thanks to bias
    correction); RMSProp's R^(n) carries (1 - rho^(n+1)) for the first steps, an O(h) error."""
    losses, theta0 = BILINEAR
    hs = HS[:3]
    adam = th.verify_problem(losses, theta0, "adam", 0.5, 0.6, 1e-8, 0.5, hs, forms=("large_n",))
    rms = th.verify_problem(losses, theta0, "rmsprop", 0.5, 0.6, 1e-8, 0.5, hs, forms=("large_n",))
    assert 1.8 < th.fitted_order(hs, adam["large_n"]) < 2.2
    assert 0.85 < th.fitted_order(hs, rms["large_n"]) < 1.15


@pytest.mark.slow
def test_orders_for_a_13_parameter_network_in_mini_batches():
    losses, theta0 = th.tanh_net_losses(batches=2)
    hs = HS[:3]
    errs = th.verify_problem(losses, theta0, "adam", 0.5, 0.6, 1e-2, 0.5, hs, forms=("first", "modified"))
    assert theta0.numel() >= 10
    assert 0.85 < th.fitted_order(hs, errs["first"]) < 1.15
    assert 1.75 < th.fitted_order(hs, errs["modified"]) < 2.25


def _full_batch_terms(E, theta, eps):
    t = torch.tensor(theta, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(E, t)
    H = torch.autograd.functional.hessian(E, t)
    return g.numpy(), H.numpy()


@pytest.mark.parametrize("n", [0, 1, 5, 30])
def test_adam_rhs_equals_remark_3_2(n):
    """Full batch: (9) with the simplified terms of Remark 3.2, from a full Hessian."""
    losses, _ = th.tanh_net_losses()
    theta = 0.3 * np.random.default_rng(n).normal(size=13)
    h, beta, rho, eps = 1e-2, 0.7, 0.9, 1e-3
    g, H = _full_batch_terms(losses[0], theta, eps)
    R = np.sqrt(g**2 + eps)
    grad_pert = H @ (g / R)  # grad of ||grad E||_{1,eps}
    L = (beta / (1 - beta) - (n + 1) * beta ** (n + 1) / (1 - beta ** (n + 1))) * grad_pert
    Lbar = grad_pert
    P = (rho / (1 - rho) - (n + 1) * rho ** (n + 1) / (1 - rho ** (n + 1))) * g * grad_pert
    Pbar = g * grad_pert
    expected = -g / R + h * (g * (2 * P + Pbar) / (2 * R**3) - (2 * L + Lbar) / (2 * R))
    got = th.piecewise_rhs(losses, th.Setting("adam", h, beta, rho, eps), n, theta)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("n", [0, 3, 20])
def test_rmsprop_rhs_equals_remark_4_3(n):
    losses, _ = th.tanh_net_losses()
    theta = 0.3 * np.random.default_rng(10 + n).normal(size=13)
    h, rho, eps = 1e-2, 0.8, 1e-3
    g, H = _full_batch_terms(losses[0], theta, eps)

    def Rl(l):
        return np.sqrt(g**2 * (1 - rho ** (l + 1)) + eps)

    P = sum(rho ** (n - k) * (1 - rho) * g * (H @ sum(g / Rl(l) for l in range(k, n)))
            for k in range(n + 1) if k < n) if n > 0 else np.zeros_like(g)
    Pbar = (1 - rho ** (n + 1)) * g * (H @ (g / Rl(n)))
    R = Rl(n)
    expected = -g / R + h * (g * (2 * P + Pbar) / (2 * R**3) - (H @ (g / R)) / (2 * R))
    got = th.piecewise_rhs(losses, th.Setting("rmsprop", h, 0.0, rho, eps), n, theta)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)


def test_minibatch_rhs_against_theorem_3_1_literal():
    """Mini-batch (9) against a literal transcription of Theorem 3.1's sums with full
    Hessians (O(n^2) loops, no grouping by batch)."""
    losses, _ = th.tanh_net_losses(batches=3)
    theta = 0.3 * np.random.default_rng(7).normal(size=13)
    h, beta, rho, eps, n = 1e-2, 0.6, 0.8, 1e-3, 6
    gH = [_full_batch_terms(E, theta, eps) for E in losses]
    g = [gH[k % 3][0] for k in range(n + 1)]
    H = [gH[k % 3][1] for k in range(n + 1)]

    def R(l):
        return np.sqrt(sum(rho ** (l - k) * (1 - rho) * g[k] ** 2 for k in range(l + 1)) / (1 - rho ** (l + 1)) + eps)

    def M(l):
        return sum(beta ** (l - k) * (1 - beta) * g[k] for k in range(l + 1)) / (1 - beta ** (l + 1))

    def S(k):
        return sum((M(l) / R(l) for l in range(k, n)), np.zeros(13))

    cb, cr = 1 / (1 - beta ** (n + 1)), 1 / (1 - rho ** (n + 1))
    L = cb * sum(beta ** (n - k) * (1 - beta) * H[k] @ S(k) for k in range(n + 1))
    Lbar = cb * sum(beta ** (n - k) * (1 - beta) * H[k] @ (M(n) / R(n)) for k in range(n + 1))
    P = cr * sum(rho ** (n - k) * (1 - rho) * g[k] * (H[k] @ S(k)) for k in range(n + 1))
    Pbar = cr * sum(rho ** (n - k) * (1 - rho) * g[k] * (H[k] @ (M(n) / R(n))) for k in range(n + 1))
    expected = -M(n) / R(n) + h * (M(n) * (2 * P + Pbar) / (2 * R(n) ** 3) - (2 * L + Lbar) / (2 * R(n)))
    got = th.piecewise_rhs(losses, th.Setting("adam", h, beta, rho, eps), n, theta)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)


def test_figure1_closed_form_matches_quadrature():
    beta, rho, eps = 0.9, 0.5, 0.01
    a = (1 + beta) / (1 - beta) - (1 + rho) / (1 - rho)
    c = (1 + rho) / (1 - rho)
    for x in (-0.7, 0.05, 0.4, 1.0):
        num, _ = quad(lambda y: (a + c * eps / (y * y + eps)) * y / math.sqrt(eps + y * y), 0, x)
        assert th.penalty_1d(x, beta, rho, eps) == pytest.approx(num, rel=1e-9)


@pytest.mark.slow
def test_theory_figures_are_written(tmp_path):
    made = th.figures(tmp_path, T=0.4, hs=(1e-2, 2e-2), betas=(0.5, 0.9), rhos=(0.5, 0.99), budget_s=5)
    names = {p.name for p in made}
    assert {"fig1_penalty.png", "fig2_trajectories_beta_rho.png", "fig3_trajectories_h.pdf",
            "fig2_trajectories_beta_rho.csv"} <= names
    assert all(p.stat().st_size > 2000 for p in made)
    rows = pd.read_csv(tmp_path / "fig3_trajectories_h.csv")
    its = rows[rows.kind == "iterate"]
    assert its.groupby("h").n.max().to_dict() == {0.01: 40, 0.02: 20}  # T/h steps
    # rho = 0.99 at h = 0.02: kappa = 1.99, the whole ODE is drawn as outside its regime
    far = rows[(rows.h == 0.02) & (rows.rho == 0.99)]
    assert set(far.kind) == {"iterate", "ode_outside"}
    # at T = 0.4 no run reaches its limit: each is marked as not converged, in the CSV and the legend
    assert not its.converged.any()
    one = pd.read_csv(tmp_path / "fig1_penalty.csv")  # Figure 1: five cases, each also near 0 (|x| <= 3 sqrt(eps))
    assert one.groupby("panel")[["beta", "rho"]].apply(lambda g: len(g.drop_duplicates())).to_dict() == \
        {"case": 5, "near_zero": 5}
    assert one[one.panel == "near_zero"].x.abs().max() == pytest.approx(3 * math.sqrt(0.01))


def test_trajectories_run_to_their_limits():
    """Horizon or gradient tolerance, per h: rho = 0.99 at h = 0.01 reaches a gradient one-norm
    below 1e-6 (and stops there), with |theta|_1 at its limit 2.007; kappa decides the regime."""
    loss, theta0 = BILINEAR
    s = th.Setting("adam", 1e-2, 0.9, 0.99, 1e-8)
    it = th.iterates(loss, theta0, s, 5000, gtol=1e-6)
    assert 500 < len(it) - 1 < 5000
    t = torch.tensor(it[-1], requires_grad=True)
    assert float(torch.autograd.grad(loss[0](t), t)[0].abs().sum()) < 1e-6
    assert np.abs(it[-1]).sum() == pytest.approx(2.0066, abs=1e-3)
    assert th.kappa(s) == pytest.approx(0.01 / 2 * 1.99 / 0.01)
    assert th.kappa(th.Setting("adam", 3e-3, 0.95, 0.5, 1e-8)) < th.REGIME_KAPPA


def test_successive_orders():
    hs = [8e-3, 4e-3, 2e-3]
    assert th.successive_orders(hs, [4.0, 1.0, 0.25]) == pytest.approx([2.0, 2.0])
    assert th.successive_orders(hs, [1.0, 0.5, 0.0])[1] != th.successive_orders(hs, [1.0, 0.5, 0.0])[1]  # nan


def test_verify_cli_prints_orders_and_slopes(capsys):
    from analysis.theory.__main__ import main

    code = main(["verify", "--hs", "8e-3", "4e-3", "2e-3", "--T", "0.1", "--algos", "adam", "momentum",
                 "--models", "bilinear", "--forms", "first", "modified"])
    out = capsys.readouterr().out
    verdicts = [ln for ln in out.splitlines() if ln.startswith("verdict: ")]
    assert len(verdicts) == 4 and all(ln.endswith((": pass", ": FAIL")) for ln in verdicts)
    assert "adam on bilinear (p=2), modified form: order " in out and "expected 2 ± 0.25" in out
    assert code == (0 if all(ln.endswith(": pass") for ln in verdicts) else 1)
    out = "\n".join(ln for ln in out.splitlines() if not ln.startswith("verdict: "))
    assert out.count("order") == 2 and "adam on bilinear" in out and "momentum on bilinear" in out
    assert out.count("slope 1") == 2 and out.count("slope 2") == 2 and "tanh" not in out and "rmsprop" not in out


@pytest.mark.slow
def test_example_2_3_adam_with_large_eps_is_heavy_ball(capsys):
    """Example 2.3: Adam (step h sqrt(eps)/(1-beta), no bias correction) approaches heavy-ball GD
    with step h at order 1 in 1/eps; heavy-ball GD follows the first-order flow of [8] at order
    1 in h and its modified equation at order 2 (successive slopes rising towards 2)."""
    r = th.example_2_3(T=0.5, epss=(1e6, 1e7, 1e8), hs=(8e-3, 4e-3, 2e-3, 1e-3))
    assert 0.95 < r["order_in_inv_eps"] < 1.05
    assert all(0.95 < x < 1.05 for x in r["slopes_in_inv_eps"])
    assert 0.95 < r["orders"]["first"] < 1.05
    assert 1.75 < r["slopes"]["modified"][0] < r["slopes"]["modified"][-1] < 2.05
    assert r["slopes"]["modified"][-1] > 1.9
    out = capsys.readouterr().out
    assert "Example 2.3 (a)" in out and r["passed"] and out.count(": pass") == 3


def test_heavy_ball_rhs_against_ghosh_et_al_written_out():
    """The modified equation of [8] at n = 3, from a full Hessian (independent of autograd's HVP)."""
    loss, _ = BILINEAR
    beta, h, n = 0.7, 0.01, 3
    theta = np.array([1.3, 0.4])
    g, H = _full_batch_terms(loss[0], theta, 0.0)
    gamma = (1 - beta ** (2 * n + 2)) - 4 * (n + 1) * beta ** (n + 1) * (1 - beta) / (1 + beta)
    ref = -(1 - beta ** (n + 1)) / (1 - beta) * g - h * gamma * (1 + beta) / (2 * (1 - beta) ** 3) * H @ g
    got = th.heavy_ball_rhs(loss[0], th.Setting("momentum", h, beta, 0.0, 0.0), n, theta)
    assert got == pytest.approx(ref, rel=1e-12)


def _bias_reference(g, H, h, beta, rho, eps):
    """Eq. (3), written out: h/2 {(1+b)/(1-b) - (1+r)/(1-r) + (1+r)/(1-r) eps/(g^2+eps)} (H u)_j."""
    u = g / np.sqrt(g**2 + eps)
    brace = (1 + beta) / (1 - beta) - (1 + rho) / (1 - rho) + (1 + rho) / (1 - rho) * eps / (g**2 + eps)
    return h / 2 * brace * (H @ u)


def test_bias_term_metric_of_the_engine_bilinear(cfg_factory):
    import pandas as pd

    from pipeline.runs.ids import run_id
    from pipeline.runs.rundir import RunDir
    from pipeline.train import train

    cfg = cfg_factory("model=bilinear", "data=bilinear", "precision=fp64", "train.micro_batch=1",
                      "train.bias_term=true", "train.max_steps=20", "optim.h=1e-2", "optim.beta=0.9",
                      "optim.rho=0.99", "optim.eps=1e-4", tiny=False)
    train(cfg)
    m = pd.read_csv(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    E = th.bilinear_loss()
    for _, row in m.iloc[[0, 7, 19]].iterrows():
        g, H = _full_batch_terms(E, np.array([row.theta_0, row.theta_1]), 1e-4)
        ref = np.linalg.norm(_bias_reference(g, H, 1e-2, 0.9, 0.99, 1e-4))
        assert row.bias_norm == pytest.approx(ref, rel=1e-9)


def test_bias_term_metric_accumulated_over_micro_batches(cfg_factory):
    """A tanh MLP in float64 with micro-batches that do not divide N: the engine's
    bias-term norm equals Eq. (3) from the full Hessian of the whole-set loss."""
    from torch.func import functional_call

    from models import build_model
    from pipeline.engine.data import load_dataset
    from pipeline.engine.optim import build_optimizer
    from pipeline.engine.step import accumulate_gradient, partition
    from pipeline.engine.theory_metrics import bias_term_norm

    cfg = cfg_factory("model=mlp", "model.width=4", "model.depth=1", "data.image_size=4", "data.n_train=50",
                      "optim=rmsprop", "optim.h=1e-2", "optim.rho=0.9", "optim.eps=1e-6")
    data = load_dataset(cfg.data)
    data.x_train = data.x_train.double()
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes, data.input_shape).double()
    build_optimizer(model.parameters(), cfg.optim)
    parts = partition(50, 16)
    accumulate_gradient(model, data.x_train, data.y_train, data.task, parts)
    got = bias_term_norm(model, data, cfg, parts, __import__("contextlib").nullcontext).item()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def E(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, ps, (data.x_train,)), data.y_train)

    g, H = _full_batch_terms(E, flat0.numpy(), 1e-6)
    ref = np.linalg.norm(_bias_reference(g, H, 1e-2, 0.0, 0.9, 1e-6))
    assert got == pytest.approx(ref, rel=1e-8)
