"""The paper's theory, executable: the piecewise modified ODEs of Theorem 3.1 (Adam, Eq. 9) and
Theorem 4.2 (RMSProp, Eq. 12) for full-batch and mini-batch losses, the first-order flow (the
same without the O(h) term), the large-n form (2)-(3), and their numerical verification.

A loss is a list of PyTorch functions E_k(theta) of a flat float64 parameter vector; step n
uses E_{n mod m} (m = 1: full batch). Hessian-vector products come from autograd. The ODE is
integrated with an adaptive Dormand-Prince 8(5,3) method (scipy, rtol 1e-11) on each
[nh, (n+1)h] in turn, as the theorems' piecewise definition requires.

Implementation of (9): with G_k = grad E_k(theta), the averages M^(l), R^(l) for l <= n are
exponential filters of G_k and G_k^2; S_k = sum_{l=k}^{n-1} M^(l)/R^(l); and because the
Hessian of step k depends only on its batch b, every Hessian sum of Theorem 3.1 is a sum over
batches of H_b times a weighted sum of the S_k: three Hessian-vector products per batch.
RMSProp (12) is the same with beta = 0 and no bias correction (Remark 4.3). Heavy-ball momentum
GD (`momentum`) has the piecewise modified equation of [8] (Theorem 4.1 there, Section 1 here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.signal import lfilter

from pipeline.engine.optim import Adam, Momentum, RMSProp
from pipeline.engine.theory_metrics import bias_coefficient

Loss = Callable[[torch.Tensor], torch.Tensor]
RTOL, ATOL = 1e-11, 1e-13


@dataclass
class Setting:
    """An optimizer of the paper: `algo` adam (Definition 2.1), rmsprop (Definition 4.1) or
    momentum (heavy-ball GD of [8]; rho and eps unused)."""

    algo: str
    h: float
    beta: float
    rho: float
    eps: float

    @property
    def beta_eff(self):  # RMSProp is Adam with beta = 0 ...
        return self.beta if self.algo == "adam" else 0.0

    @property
    def bias_correction(self):  # ... and no bias correction
        return self.algo == "adam"


# --- problems -----------------------------------------------------------------------------
def bilinear_loss(x: float = 2.0, y: float = 1.5) -> Loss:
    """Section 6: E(theta) = 1/2 (y - theta_1 theta_2 x)^2."""
    return lambda t: 0.5 * (y - t[0] * t[1] * x) ** 2


def tanh_net_losses(batches: int = 1, n: int = 12, hidden: int = 3, seed: int = 0):
    """A smooth 2-`hidden`-1 tanh network on `n` fixed points (p = 4*hidden + 1 = 13 for
    hidden=3), split into `batches` equal mini-batches; returns (losses, theta0)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=torch.float64)
    Y = torch.sin(X[:, :1] * 1.5) + 0.5 * X[:, 1:]
    p = 4 * hidden + 1
    theta0 = 0.5 * torch.randn(p, generator=g, dtype=torch.float64)

    def make(idx):
        Xb, Yb = X[idx], Y[idx]

        def E(t):
            W1 = t[: 2 * hidden].view(hidden, 2)
            b1 = t[2 * hidden: 3 * hidden]
            w2 = t[3 * hidden: 4 * hidden]
            out = torch.tanh(Xb @ W1.T + b1) @ w2 + t[4 * hidden]
            return 0.5 * ((out - Yb[:, 0]) ** 2).mean()

        return E

    parts = torch.arange(n).chunk(batches)
    return [make(idx) for idx in parts], theta0


# --- iterates -----------------------------------------------------------------------------
def optimizer(t: torch.nn.Parameter, s: Setting, bias_correction: bool = True):
    """The optimizer of `s` from pipeline.optim (the engine's own code)."""
    if s.algo == "adam":
        return Adam([t], h=s.h, beta=s.beta, rho=s.rho, eps=s.eps, bias_correction=bias_correction)
    if s.algo == "rmsprop":
        return RMSProp([t], h=s.h, rho=s.rho, eps=s.eps)
    return Momentum([t], h=s.h, beta=s.beta)


def iterates(losses: list[Loss], theta0: torch.Tensor, s: Setting, steps: int, gtol: float = 0.0,
             bias_correction: bool = True) -> np.ndarray:
    """theta^(0..steps) of the optimizer itself (pipeline.optim), in float64. With `gtol` > 0
    it stops early at the first theta^(n) whose gradient one-norm is below `gtol` (full batch)."""
    t = torch.nn.Parameter(theta0.clone().double())
    opt = optimizer(t, s, bias_correction)
    out = [t.detach().numpy().copy()]
    for n in range(steps):
        opt.zero_grad()
        losses[n % len(losses)](t).backward()
        if gtol > 0 and float(t.grad.abs().sum()) < gtol:
            break
        opt.step()
        out.append(t.detach().numpy().copy())
    return np.array(out)


# --- the modified ODEs --------------------------------------------------------------------
def _grads(losses, theta_np, create_graph):
    t = torch.tensor(theta_np, dtype=torch.float64, requires_grad=True)
    gs = [torch.autograd.grad(E(t), t, create_graph=create_graph)[0] for E in losses]
    return t, gs


def piecewise_rhs(losses: list[Loss], s: Setting, n: int, theta_np: np.ndarray,
                  first_order: bool = False) -> np.ndarray:
    """Right-hand side of Eq. (9) (Adam) or Eq. (12) (RMSProp) on [nh, (n+1)h];
    `first_order` drops the O(h) term."""
    m, beta, rho, eps = len(losses), s.beta_eff, s.rho, s.eps
    t, gs = _grads(losses, theta_np, create_graph=not first_order)
    G = torch.stack([g.detach() for g in gs]).numpy()  # m x p
    b_of_k = np.arange(n + 1) % m
    Gk = G[b_of_k]  # (n+1) x p, row k = grad E_k
    ls = np.arange(n + 1)
    cb = 1 - beta ** (ls + 1) if s.bias_correction else np.ones(n + 1)
    cr = 1 - rho ** (ls + 1) if s.bias_correction else np.ones(n + 1)
    M = lfilter([1 - beta], [1, -beta], Gk, axis=0) / cb[:, None]  # M^(l), l = 0..n
    R = np.sqrt(lfilter([1 - rho], [1, -rho], Gk**2, axis=0) / cr[:, None] + eps)  # R^(l)
    U = M / R
    if first_order:
        return -U[n]
    S = np.zeros_like(U)  # S_k = sum_{l=k}^{n-1} U_l
    S[:n] = np.cumsum(U[:n][::-1], axis=0)[::-1]
    w = beta ** (n - ls) * (1 - beta) / cb[n]  # L weights (1/(1-beta^{n+1}) sum beta^{n-k}(1-beta))
    wr = rho ** (n - ls) * (1 - rho) / cr[n]  # P weights
    L = np.zeros(G.shape[1])
    Lbar, P, Pbar = np.zeros_like(L), np.zeros_like(L), np.zeros_like(L)
    for b in range(m):
        ks = b_of_k == b
        vecs = torch.tensor(np.stack([(w[ks, None] * S[ks]).sum(0), (wr[ks, None] * S[ks]).sum(0), U[n]]))
        Hv = torch.autograd.grad(gs[b], t, grad_outputs=vecs, retain_graph=True, is_grads_batched=True)[0].numpy()
        L += Hv[0]
        P += G[b] * Hv[1]
        Lbar += w[ks].sum() * Hv[2]
        Pbar += wr[ks].sum() * G[b] * Hv[2]
    Mn, Rn = M[n], R[n]
    return -Mn / Rn + s.h * (Mn * (2 * P + Pbar) / (2 * Rn**3) - (2 * L + Lbar) / (2 * Rn))


def heavy_ball_rhs(loss: Loss, s: Setting, n: int, theta_np: np.ndarray, form: str = "modified") -> np.ndarray:
    """The piecewise modified equation of heavy-ball GD ([8], Theorem 4.1; Section 1 here):
    -(1 - beta^(n+1))/(1 - beta) grad E - h gamma_n (1 + beta)/(2 (1 - beta)^3) H grad E on
    [nh, (n+1)h], gamma_n = (1 - beta^(2n+2)) - 4(n+1) beta^(n+1) (1 - beta)/(1 + beta).
    `first` drops the O(h) term; `large_n` takes n -> infinity (gamma = 1)."""
    beta = s.beta
    t, (g,) = _grads([loss], theta_np, create_graph=form != "first")
    gd = g.detach()
    lead = -(1 if form == "large_n" else 1 - beta ** (n + 1)) / (1 - beta) * gd
    if form == "first":
        return lead.numpy()
    gamma = 1.0 if form == "large_n" else \
        (1 - beta ** (2 * n + 2)) - 4 * (n + 1) * beta ** (n + 1) * (1 - beta) / (1 + beta)
    Hg = torch.autograd.grad(g, t, grad_outputs=gd)[0]
    return (lead - s.h * gamma * (1 + beta) / (2 * (1 - beta) ** 3) * Hg).numpy()


def large_n_rhs(loss: Loss, s: Setting, theta_np: np.ndarray) -> np.ndarray:
    """Eq. (2)-(3) (full batch; RMSProp with beta = 0): the autonomous ODE that (9) becomes
    once the beta^n, rho^n terms have died out."""
    t, (g,) = _grads([loss], theta_np, create_graph=True)
    gd = g.detach()
    u = gd / torch.sqrt(gd**2 + s.eps)
    Hu = torch.autograd.grad(g, t, grad_outputs=u)[0]
    bias = bias_coefficient(gd, s.h, s.beta_eff, s.rho, s.eps) * Hu
    return (-(gd + bias) / torch.sqrt(gd**2 + s.eps)).numpy()


def solve_piecewise(losses, theta0, s: Setting, steps: int, form: str = "modified",
                    budget_s: float | None = None) -> np.ndarray:
    """theta~(nh), n = 0..steps, of the piecewise ODE (`modified` or `first`) or of the
    large-n form (`large_n`), integrated interval by interval. With `budget_s`, stops early
    (returning fewer rows) once that many seconds are spent: where a gradient component
    crosses zero with a small eps the ODE is stiff and the adaptive steps become tiny."""
    import time

    start = time.perf_counter()
    y = np.asarray(theta0, dtype=np.float64).copy()
    out = [y.copy()]

    class OutOfTime(Exception):
        pass

    for n in range(steps):
        if s.algo == "momentum":
            def rhs(th, n=n):
                return heavy_ball_rhs(losses[0], s, n, th, form)
        elif form == "large_n":
            def rhs(th):
                return large_n_rhs(losses[0], s, th)
        else:
            def rhs(th, n=n):
                return piecewise_rhs(losses, s, n, th, first_order=form == "first")

        def f(_t, th):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                raise OutOfTime
            return rhs(th)

        t0, t1 = n * s.h, (n + 1) * s.h
        try:
            sol = solve_ivp(f, (t0, t1), y, method="DOP853", rtol=RTOL, atol=ATOL, first_step=t1 - t0)
        except OutOfTime:
            break
        if not sol.success:
            raise RuntimeError(f"ODE integration failed at n={n}: {sol.message}")
        y = sol.y[:, -1]
        out.append(y.copy())
    return np.array(out)
