"""The paper's theory, executable: the piecewise modified ODEs of Theorem 3.1 (Adam, Eq. 9) and
Theorem 4.2 (RMSProp, Eq. 12) for full-batch and mini-batch losses, the first-order flow (the
same without the O(h) term), the large-n form (2)-(3), and their numerical verification.

    python -m analysis.theory verify [--beta 0.5 --rho 0.6 --T 0.5 --hs 8e-3 4e-3 2e-3 1e-3]
    python -m analysis.theory figures --out figures/theory

A loss is a list of PyTorch functions E_k(theta) of a flat float64 parameter vector; step n
uses E_{n mod m} (m = 1: full batch). Hessian-vector products come from autograd. The ODE is
integrated with an adaptive Dormand-Prince 8(5,3) method (scipy, rtol 1e-11) on each
[nh, (n+1)h] in turn, as the theorems' piecewise definition requires.

Implementation of (9): with G_k = grad E_k(theta), the averages M^(l), R^(l) for l <= n are
exponential filters of G_k and G_k^2; S_k = sum_{l=k}^{n-1} M^(l)/R^(l); and because the
Hessian of step k depends only on its batch b, every Hessian sum of Theorem 3.1 is a sum over
batches of H_b times a weighted sum of the S_k: three Hessian-vector products per batch.
RMSProp (12) is the same with beta = 0 and no bias correction (Remark 4.3).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.signal import lfilter

from pipeline.optim import Adam, RMSProp
from pipeline.theory_metrics import bias_coefficient

Loss = Callable[[torch.Tensor], torch.Tensor]
RTOL, ATOL = 1e-11, 1e-13


@dataclass
class Setting:
    """An optimizer of the paper: `algo` adam (Definition 2.1) or rmsprop (Definition 4.1)."""

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
def iterates(losses: list[Loss], theta0: torch.Tensor, s: Setting, steps: int) -> np.ndarray:
    """theta^(0..steps) of the optimizer itself (pipeline.optim), in float64."""
    t = torch.nn.Parameter(theta0.clone().double())
    opt = (Adam([t], h=s.h, beta=s.beta, rho=s.rho, eps=s.eps) if s.algo == "adam"
           else RMSProp([t], h=s.h, rho=s.rho, eps=s.eps))
    out = [t.detach().numpy().copy()]
    for n in range(steps):
        opt.zero_grad()
        losses[n % len(losses)](t).backward()
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
        if form == "large_n":
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


# --- verification -------------------------------------------------------------------------
FORMS = ("first", "modified", "large_n")


def fitted_order(hs, errs) -> float:
    """Least-squares slope of log(error) against log(h)."""
    hs, errs = np.asarray(hs, float), np.asarray(errs, float)
    ok = errs > 0
    return float(np.polyfit(np.log(hs[ok]), np.log(errs[ok]), 1)[0]) if ok.sum() >= 2 else math.nan


def verify_problem(losses, theta0, algo, beta, rho, eps, T, hs, forms=FORMS) -> dict:
    """{form: [max_n ||theta^(n) - theta~(nh)||, one per h]} over n = 0..floor(T/h)."""
    errs = {f: [] for f in forms}
    for h in hs:
        s = Setting(algo, h, beta, rho, eps)
        steps = int(math.floor(T / h + 1e-9))
        it = iterates(losses, theta0, s, steps)
        for f in forms:
            if f == "large_n" and len(losses) > 1:
                errs[f].append(math.nan)
                continue
            ode = solve_piecewise(losses, theta0.numpy(), s, steps, f)
            errs[f].append(float(np.max(np.linalg.norm(it - ode, axis=1))))
    return errs


def verify(beta=0.5, rho=0.6, eps=1e-8, net_eps=1e-2, T=0.5, hs=(8e-3, 4e-3, 2e-3, 1e-3), batches=1,
           out=None):
    """Print, for Adam and RMSProp on the bilinear model and on a 13-parameter tanh network,
    the max distance between iterates and each ODE's solution and the fitted order in h.

    The network runs with `net_eps`: with eps = 1e-8 several of its gradient components pass
    within 1e-6 of zero on this horizon, where 1/sqrt(g^2 + eps) has derivatives of order
    eps^(-1/2), the theorem's constant C blows up (Section 8) and no h in reach shows the
    asymptotic orders."""
    out = out or sys.stdout
    problems = [("bilinear (p=2)", [bilinear_loss()], torch.tensor([2.8, 3.5], dtype=torch.float64), eps)]
    net, theta0 = tanh_net_losses(batches=batches)
    problems.append((f"tanh net (p={theta0.numel()}, {batches} batch{'es' if batches > 1 else ''})", net, theta0,
                     net_eps))
    results = []
    print(f"beta={beta} rho={rho} T={T}; error = max_n ||theta^(n) - theta~(nh)||", file=out)
    for pname, losses, th0, e in problems:
        for algo in ("adam", "rmsprop"):
            errs = verify_problem(losses, th0, algo, beta, rho, e, T, hs)
            print(f"\n{algo} on {pname}, eps={e:g}", file=out)
            print("  h         " + "  ".join(f"{f:>12s}" for f in errs), file=out)
            for i, h in enumerate(hs):
                print(f"  {h:<9.3g} " + "  ".join(f"{errs[f][i]:12.4e}" for f in errs), file=out)
            orders = {f: fitted_order(hs, e) for f, e in errs.items()}
            print("  order     " + "  ".join(f"{orders[f]:12.2f}" for f in errs), file=out)
            results.append(dict(problem=pname, algo=algo, errors=errs, orders=orders))
    return results


# --- figures 1-3 --------------------------------------------------------------------------
def penalty_1d(x, beta, rho, eps):
    """Figure 1: int_0^x {(1+b)/(1-b) - (1+r)/(1-r) + (1+r)/(1-r) eps/(y^2+eps)} d sqrt(eps+y^2),
    in closed form."""
    a = (1 + beta) / (1 - beta) - (1 + rho) / (1 - rho)
    c = (1 + rho) / (1 - rho)
    x = np.asarray(x, float)
    return a * (np.sqrt(eps + x**2) - np.sqrt(eps)) + c * eps * (1 / np.sqrt(eps) - 1 / np.sqrt(eps + x**2))


def figures(out="figures/theory", eps=1e-8, steps=400):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name):
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", dpi=150, bbox_inches="tight")
            made.append(out / f"{name}.{ext}")
        plt.close(fig)

    # Figure 1
    fig, ax = plt.subplots(figsize=(5, 3.6))
    x = np.linspace(-1, 1, 401)
    for b, r in [(0.9, 0.5), (0.9, 0.9), (0.5, 0.9), (0.95, 0.99), (0.99, 0.95)]:
        ax.plot(x, penalty_1d(x, b, r, 0.01), label=rf"$\beta$={b}, $\rho$={r}")
    ax.set_xlabel("x")
    ax.set_title(r"penalised function of one variable ($\varepsilon$ = 0.01)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "fig1_penalty")

    loss = [bilinear_loss()]
    th0 = torch.tensor([2.8, 3.5], dtype=torch.float64)
    xs = np.linspace(0.3, 3.2, 300)

    def panel(ax, settings, labels, title):
        ax.plot(xs, 0.75 / xs, color="violet", lw=2, label=r"minima $\theta_1\theta_2 = y/x$")
        ax.plot([math.sqrt(0.75)], [math.sqrt(0.75)], "kx", ms=9, label="minimal one-norm of the gradient")
        for s, lab in zip(settings, labels):
            it = iterates(loss, th0, s, steps)
            # the ODE over the approach to the minima; near them the gradient is ~0 and, with a
            # small eps, (9) is so stiff that no integrator keeps up (Section 8)
            E = np.array([loss[0](torch.tensor(x)).item() for x in it])
            k = int(np.argmax(E < 1e-2)) if (E < 1e-2).any() else steps
            ode = solve_piecewise(loss, th0.numpy(), s, k, "modified", budget_s=20)
            line, = ax.plot(it[:, 0], it[:, 1], ".", ms=2, label=lab)
            ax.plot(ode[:, 0], ode[:, 1], "-", lw=0.8, color=line.get_color())
        ax.set_xlim(0.3, 3.0)
        ax.set_ylim(0.2, 3.6)
        ax.set_xlabel(r"$\theta_1$")
        ax.set_ylabel(r"$\theta_2$")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)

    # Figure 2: several beta, several rho (h = 1e-2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    betas, rhos = (0.5, 0.9, 0.95), (0.5, 0.9, 0.99)
    panel(axes[0], [Setting("adam", 1e-2, b, 0.9, eps) for b in betas], [rf"$\beta$={b}" for b in betas],
          r"Adam, $\rho$ = 0.9, h = 0.01: iterates (dots) and modified ODE (9) (lines)")
    panel(axes[1], [Setting("adam", 1e-2, 0.9, r, eps) for r in rhos], [rf"$\rho$={r}" for r in rhos],
          r"Adam, $\beta$ = 0.9, h = 0.01")
    save(fig, "fig2_trajectories_beta_rho")

    # Figure 3: several step sizes, beta >> rho and rho > beta
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    hs = (3e-3, 1e-2, 2e-2)
    for ax, (b, r) in zip(axes, [(0.95, 0.5), (0.5, 0.99)]):
        panel(ax, [Setting("adam", h, b, r, eps) for h in hs], [f"h={h:g}" for h in hs],
              rf"Adam, $\beta$ = {b}, $\rho$ = {r}")
    save(fig, "fig3_trajectories_h")
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.theory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--beta", type=float, default=0.5)
    v.add_argument("--rho", type=float, default=0.6)
    v.add_argument("--eps", type=float, default=1e-8, help="eps of the bilinear runs")
    v.add_argument("--net-eps", type=float, default=1e-2, help="eps of the network runs (see verify())")
    v.add_argument("--T", type=float, default=0.5)
    v.add_argument("--hs", type=float, nargs="+", default=[8e-3, 4e-3, 2e-3, 1e-3])
    v.add_argument("--batches", type=int, default=1, help="mini-batches of the tanh network (cycled)")
    f = sub.add_parser("figures")
    f.add_argument("--out", default="figures/theory")
    a = ap.parse_args(argv)
    if a.cmd == "verify":
        verify(a.beta, a.rho, a.eps, a.net_eps, a.T, a.hs, a.batches)
    else:
        made = figures(a.out)
        print(f"wrote {len(made)} files under {a.out}")


if __name__ == "__main__":
    main()
