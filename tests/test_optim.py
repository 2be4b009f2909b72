"""Optimizers against independent references: torch.optim.Adam and float64 implementations of
Eq. (1) (Definition 2.1) and Eq. (11) (Definition 4.1) written here from the paper."""

import numpy as np
import pytest
import torch

from pipeline.engine.optim import GD, Adam, Momentum, RMSProp


def quartic_grad(theta, A):
    """Gradient of E(theta) = 1/4 sum (A theta)^4 + 1/2 |theta|^2 (numpy, float64)."""
    return A.T @ (A @ theta) ** 3 + theta


def torch_run(opt_cls, theta0, A, steps, dtype, **kw):
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=dtype))
    At = torch.tensor(A, dtype=dtype)
    opt = opt_cls([p], **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.25 * ((At @ p) ** 4).sum() + 0.5 * (p * p).sum()
        loss.backward()
        opt.step()
        out.append(p.detach().clone().numpy())
    return np.array(out)


def ref_adam(theta, A, steps, h, beta, rho, eps, inside=True, bias=True):
    """Eq. (1) literally, in float64."""
    nu = np.zeros_like(theta)
    m = np.zeros_like(theta)
    out = []
    for n in range(steps):
        g = quartic_grad(theta, A)
        nu = rho * nu + (1 - rho) * g**2
        m = beta * m + (1 - beta) * g
        mh = m / (1 - beta ** (n + 1)) if bias else m
        nh = nu / (1 - rho ** (n + 1)) if bias else nu
        theta = theta - h * mh / (np.sqrt(nh + eps) if inside else np.sqrt(nh) + eps)
        out.append(theta.copy())
    return np.array(out)


def ref_rmsprop(theta, A, steps, h, rho, eps):
    """Eq. (11) literally, in float64."""
    nu = np.zeros_like(theta)
    out = []
    for _ in range(steps):
        g = quartic_grad(theta, A)
        nu = rho * nu + (1 - rho) * g**2
        theta = theta - h * g / np.sqrt(nu + eps)
        out.append(theta.copy())
    return np.array(out)


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    return rng.normal(size=7), rng.normal(size=(5, 7)) / 3


def rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_adam_eps_outside_matches_torch_adam(problem):
    theta0, A = problem
    ours = torch_run(Adam, theta0, A, 100, torch.float32, h=1e-2, beta=0.9, rho=0.999,
                     eps=1e-8, eps_inside=False)
    theirs = torch_run(torch.optim.Adam, theta0, A, 100, torch.float32, lr=1e-2,
                       betas=(0.9, 0.999), eps=1e-8, foreach=False)
    assert rel(ours, theirs) < 1e-6


@pytest.mark.parametrize("beta,rho,eps", [(0.9, 0.999, 1e-8), (0.99, 0.9, 1e-3), (0.0, 0.5, 1e-1)])
def test_adam_eps_inside_matches_eq1_float64(problem, beta, rho, eps):
    theta0, A = problem
    ref = ref_adam(theta0, A, 100, 1e-2, beta, rho, eps)
    assert rel(torch_run(Adam, theta0, A, 100, torch.float64, h=1e-2, beta=beta, rho=rho,
                         eps=eps), ref) < 1e-12
    assert rel(torch_run(Adam, theta0, A, 100, torch.float32, h=1e-2, beta=beta, rho=rho,
                         eps=eps), ref) < 1e-5


def test_adam_switches_match_reference(problem):
    theta0, A = problem
    for inside in (True, False):
        for bias in (True, False):
            ref = ref_adam(theta0, A, 50, 1e-2, 0.9, 0.99, 1e-6, inside, bias)
            ours = torch_run(Adam, theta0, A, 50, torch.float64, h=1e-2, beta=0.9, rho=0.99,
                             eps=1e-6, eps_inside=inside, bias_correction=bias)
            assert rel(ours, ref) < 1e-12, (inside, bias)
    # the switches do change the trajectory (the test above would catch a no-op switch)
    a = ref_adam(theta0, A, 50, 1e-2, 0.9, 0.99, 1e-6, True, True)
    b = ref_adam(theta0, A, 50, 1e-2, 0.9, 0.99, 1e-6, True, False)
    assert rel(a, b) > 1e-4


def test_rmsprop_matches_eq11_float64(problem):
    # eps and h keep the run out of the sign-like oscillation around zero, where rounding
    # differences of 1e-16 grow chaotically and no two implementations agree.
    theta0, A = problem
    ref = ref_rmsprop(theta0, A, 100, 5e-3, 0.9, 1e-4)
    assert rel(torch_run(RMSProp, theta0, A, 100, torch.float64, h=5e-3, rho=0.9, eps=1e-4),
               ref) < 1e-12
    assert rel(torch_run(RMSProp, theta0, A, 100, torch.float32, h=5e-3, rho=0.9, eps=1e-4),
               ref) < 1e-5


def test_gd_and_heavy_ball(problem):
    theta0, A = problem
    h, beta = 1e-2, 0.8
    th, prev, out_m, out_g, tg = theta0.copy(), theta0.copy(), [], [], theta0.copy()
    for _ in range(60):  # Example 2.3: theta+ = theta - h g + beta (theta - theta_prev)
        th, prev = th - h * quartic_grad(th, A) + beta * (th - prev), th
        out_m.append(th)
        tg = tg - h * quartic_grad(tg, A)
        out_g.append(tg)
    assert rel(torch_run(Momentum, theta0, A, 60, torch.float64, h=h, beta=beta),
               np.array(out_m)) < 1e-12
    assert rel(torch_run(GD, theta0, A, 60, torch.float64, h=h), np.array(out_g)) < 1e-12


def test_state_dict_roundtrip_continues_identically(problem):
    theta0, A = problem
    full = torch_run(Adam, theta0, A, 20, torch.float64, h=1e-2)
    p = torch.nn.Parameter(torch.tensor(theta0))
    At = torch.tensor(A)
    opt = Adam([p], h=1e-2)

    def step(o, q):
        o.zero_grad()
        (0.25 * ((At @ q) ** 4).sum() + 0.5 * (q * q).sum()).backward()
        o.step()

    for _ in range(10):
        step(opt, p)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = Adam([q], h=1e-2)
    opt2.load_state_dict(opt.state_dict())
    for _ in range(10):
        step(opt2, q)
    np.testing.assert_array_equal(q.detach().numpy(), full[-1])
