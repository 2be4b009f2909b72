"""The modified ODEs of Theorems 3.1 / 4.2: checked against independent closed forms
(Remarks 3.2, 4.3, built here from full Hessians) and by their convergence orders in h."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from analysis import theory as th

HS = (8e-3, 4e-3, 2e-3, 1e-3)
BILINEAR = ([th.bilinear_loss()], torch.tensor([2.8, 3.5], dtype=torch.float64))


@pytest.mark.parametrize("algo", ["adam", "rmsprop"])
def test_orders_on_the_bilinear_model(algo):
    """Theorem 3.1 / 4.2: first-order flow O(h), modified ODE O(h^2) (beta=0.5, rho=0.6, T=0.5)."""
    losses, theta0 = BILINEAR
    errs = th.verify_problem(losses, theta0, algo, 0.5, 0.6, 1e-8, 0.5, HS, forms=("first", "modified"))
    first, modified = th.fitted_order(HS, errs["first"]), th.fitted_order(HS, errs["modified"])
    assert 0.85 < first < 1.15, errs
    assert 1.8 < modified < 2.2, errs
    assert all(m < f / 10 for m, f in zip(errs["modified"], errs["first"]))


def test_large_n_form():
    """(2)-(3) keeps Adam's order 2 (its leading term is exact for full batch thanks to bias
    correction); RMSProp's R^(n) carries (1 - rho^(n+1)) for the first steps, an O(h) error."""
    losses, theta0 = BILINEAR
    hs = HS[:3]
    adam = th.verify_problem(losses, theta0, "adam", 0.5, 0.6, 1e-8, 0.5, hs, forms=("large_n",))
    rms = th.verify_problem(losses, theta0, "rmsprop", 0.5, 0.6, 1e-8, 0.5, hs, forms=("large_n",))
    assert 1.8 < th.fitted_order(hs, adam["large_n"]) < 2.2
    assert 0.85 < th.fitted_order(hs, rms["large_n"]) < 1.15


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


def test_theory_figures_are_written(tmp_path):
    made = th.figures(tmp_path, steps=30)
    names = {p.name for p in made}
    assert {"fig1_penalty.png", "fig2_trajectories_beta_rho.png", "fig3_trajectories_h.pdf"} <= names
    assert all(p.stat().st_size > 2000 for p in made)


def test_verify_cli_prints_orders(capsys):
    th.main(["verify", "--hs", "8e-3", "4e-3", "--T", "0.1"])
    out = capsys.readouterr().out
    assert out.count("order") == 4 and "adam on bilinear" in out and "rmsprop on tanh net (p=13" in out


def _bias_reference(g, H, h, beta, rho, eps):
    """Eq. (3), written out: h/2 {(1+b)/(1-b) - (1+r)/(1-r) + (1+r)/(1-r) eps/(g^2+eps)} (H u)_j."""
    u = g / np.sqrt(g**2 + eps)
    brace = (1 + beta) / (1 - beta) - (1 + rho) / (1 - rho) + (1 + rho) / (1 - rho) * eps / (g**2 + eps)
    return h / 2 * brace * (H @ u)


def test_bias_term_metric_of_the_engine_bilinear(cfg_factory):
    import pandas as pd

    from pipeline.store import RunDir, run_id
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
    from pipeline.data import load_dataset
    from pipeline.optim import build_optimizer
    from pipeline.step import accumulate_gradient, partition
    from pipeline.theory_metrics import bias_term_norm

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
