"""The paper's theory, executable: the piecewise modified ODEs of Theorem 3.1 (Adam, Eq. 9) and
Theorem 4.2 (RMSProp, Eq. 12) for full-batch and mini-batch losses, the first-order flow (the
same without the O(h) term), the large-n form (2)-(3), and their numerical verification.

    python -m analysis.theory verify [--algos adam rmsprop momentum] [--models bilinear net]
                                     [--forms first modified large_n] [--hs 8e-3 4e-3 2e-3]
    python -m analysis.theory example23      # Example 2.3: Adam with a large eps = heavy ball
    python -m analysis.theory figures --out figures/theory [--T 15 --gtol 1e-6 --betas ...]

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

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.signal import lfilter

from pipeline.optim import Adam, Momentum, RMSProp
from pipeline.theory_metrics import bias_coefficient

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


# --- verification -------------------------------------------------------------------------
FORMS = ("first", "modified", "large_n")
ALGOS = ("adam", "rmsprop", "momentum")
MODELS = ("bilinear", "net")


def fitted_order(hs, errs) -> float:
    """Least-squares slope of log(error) against log(h)."""
    hs, errs = np.asarray(hs, float), np.asarray(errs, float)
    ok = errs > 0
    return float(np.polyfit(np.log(hs[ok]), np.log(errs[ok]), 1)[0]) if ok.sum() >= 2 else math.nan


def successive_orders(hs, errs) -> list[float]:
    """log(e_i / e_{i+1}) / log(h_i / h_{i+1}) for neighbouring step sizes: they approach the
    asymptotic order as h shrinks (a fit over all h hides that)."""
    return [math.log(errs[i] / errs[i + 1]) / math.log(hs[i] / hs[i + 1])
            if errs[i] > 0 and errs[i + 1] > 0 else math.nan for i in range(len(hs) - 1)]


def verify_problem(losses, theta0, algo, beta, rho, eps, T, hs, forms=FORMS) -> dict:
    """{form: [max_n ||theta^(n) - theta~(nh)||, one per h]} over n = 0..floor(T/h)."""
    errs = {f: [] for f in forms}
    for h in hs:
        s = Setting(algo, h, beta, rho, eps)
        steps = int(math.floor(T / h + 1e-9))
        it = iterates(losses, theta0, s, steps)
        for f in forms:
            if len(losses) > 1 and (f == "large_n" or algo == "momentum"):  # full-batch forms only
                errs[f].append(math.nan)
                continue
            ode = solve_piecewise(losses, theta0.numpy(), s, steps, f)
            errs[f].append(float(np.max(np.linalg.norm(it - ode, axis=1))))
    return errs


def _problem(model, eps, net_eps, batches):
    if model == "bilinear":
        return "bilinear (p=2)", [bilinear_loss()], torch.tensor([2.8, 3.5], dtype=torch.float64), eps
    net, theta0 = tanh_net_losses(batches=batches)
    return (f"tanh net (p={theta0.numel()}, {batches} batch{'es' if batches > 1 else ''})", net, theta0, net_eps)


def _print_table(title, hs, errs, out, hname="h"):
    print(f"\n{title}", file=out)
    print(f"  {hname:<9} " + "  ".join(f"{f:>12s}" for f in errs), file=out)
    for i, h in enumerate(hs):
        print(f"  {h:<9.3g} " + "  ".join(f"{errs[f][i]:12.4e}" for f in errs), file=out)
    slopes = {f: successive_orders(hs, e) for f, e in errs.items()}
    for i in range(len(hs) - 1):
        print(f"  slope {i + 1:<3d} " + "  ".join(f"{slopes[f][i]:12.2f}" for f in errs), file=out)
    orders = {f: fitted_order(hs, e) for f, e in errs.items()}
    print("  order     " + "  ".join(f"{orders[f]:12.2f}" for f in errs) + "   (least-squares fit)", file=out)
    return orders, slopes


def verify(beta=0.5, rho=0.6, eps=1e-8, net_eps=1e-2, T=0.5, hs=(8e-3, 4e-3, 2e-3), batches=1,
           algos=("adam", "rmsprop"), models=MODELS, forms=("first", "modified"), out=None):
    """Print, for each optimizer and model, the max distance between iterates and each ODE's
    solution, the successive slopes between neighbouring h and the fitted order in h.

    The network runs with `net_eps`: with eps = 1e-8 several of its gradient components pass
    within 1e-6 of zero on this horizon, where 1/sqrt(g^2 + eps) has derivatives of order
    eps^(-1/2), the theorem's constant C blows up (Section 8) and no h in reach shows the
    asymptotic orders."""
    out = out or sys.stdout
    results = []
    print(f"beta={beta} rho={rho} T={T}; error = max_n ||theta^(n) - theta~(nh)||", file=out)
    for model in models:
        pname, losses, th0, e = _problem(model, eps, net_eps, batches)
        for algo in algos:
            errs = verify_problem(losses, th0, algo, beta, rho, e, T, hs, forms)
            extra = "" if algo == "momentum" else f", eps={e:g}"
            orders, slopes = _print_table(f"{algo} on {pname}{extra}", hs, errs, out)
            results.append(dict(problem=pname, algo=algo, errors=errs, orders=orders, slopes=slopes))
    return results


def example_2_3(beta=0.5, rho=0.6, h=4e-3, T=0.5, epss=(1e6, 1e7, 1e8, 1e9),
                hs=(8e-3, 4e-3, 2e-3, 1e-3), out=None) -> dict:
    """Example 2.3. (a) Adam with eps large (no bias correction: the example's "after a certain
    number of iterations") and step h sqrt(eps)/(1 - beta) against heavy-ball GD with step h:
    the distance falls as 1/eps (order 1 in 1/eps: sqrt(v + eps) = sqrt(eps) (1 + O(g^2/eps))).
    (b) Heavy-ball GD against its first-order flow (order 1 in h) and its modified equation of
    [8] (order 2), on the bilinear model from near its minima (theta = (1, 0.9))."""
    out = out or sys.stdout
    loss, th0 = [bilinear_loss()], torch.tensor([2.8, 3.5], dtype=torch.float64)
    steps = int(math.floor(T / h + 1e-9))
    hb = iterates(loss, th0, Setting("momentum", h, beta, rho, 0.0), steps)
    dist = {"adam - heavy ball": []}
    for eps in epss:
        s = Setting("adam", h * math.sqrt(eps) / (1 - beta), beta, rho, eps)
        ad = iterates(loss, th0, s, steps, bias_correction=False)
        dist["adam - heavy ball"].append(float(np.max(np.linalg.norm(ad - hb, axis=1))))
    inv = [1 / e for e in epss]
    print(f"Example 2.3 (a): Adam(h sqrt(eps)/(1-beta), beta={beta}, rho={rho}, eps) vs heavy-ball GD "
          f"(h={h:g}, beta={beta}), T={T}, from (2.8, 3.5)", file=out)
    order_eps, slopes_eps = _print_table("  distance against 1/eps", inv, dist, out, hname="1/eps")
    near = torch.tensor([1.0, 0.9], dtype=torch.float64)
    errs = verify_problem(loss, near, "momentum", beta, rho, 0.0, T, hs, forms=("first", "modified"))
    print(f"\nExample 2.3 (b): heavy-ball GD (beta={beta}) vs the flows of [8], T={T}, from (1, 0.9)",
          file=out)
    orders, slopes = _print_table("  momentum on bilinear (p=2)", hs, errs, out)
    return dict(order_in_inv_eps=order_eps["adam - heavy ball"], slopes_in_inv_eps=slopes_eps["adam - heavy ball"],
                distances=dist["adam - heavy ball"], errors=errs, orders=orders, slopes=slopes)


# --- figures 1-3 --------------------------------------------------------------------------
def penalty_1d(x, beta, rho, eps):
    """Figure 1: int_0^x {(1+b)/(1-b) - (1+r)/(1-r) + (1+r)/(1-r) eps/(y^2+eps)} d sqrt(eps+y^2),
    in closed form."""
    a = (1 + beta) / (1 - beta) - (1 + rho) / (1 - rho)
    c = (1 + rho) / (1 - rho)
    x = np.asarray(x, float)
    return a * (np.sqrt(eps + x**2) - np.sqrt(eps)) + c * eps * (1 / np.sqrt(eps) - 1 / np.sqrt(eps + x**2))


REGIME_KAPPA, REGIME_DIST = 0.25, 0.05


def kappa(s: Setting) -> float:
    """Size of the O(h) term of (9) against the leading one: h/2 max((1+beta)/(1-beta),
    (1+rho)/(1-rho)) (the coefficients of Eq. (3)). The expansion needs it small."""
    return s.h / 2 * max((1 + s.beta) / (1 - s.beta), (1 + s.rho) / (1 - s.rho))


def trajectory(loss, theta0, s: Setting, T: float, gtol: float, max_steps: int = 200_000, budget_s: float = 15):
    """Iterates until the horizon T (T/h steps) or a gradient one-norm below `gtol`, and the
    modified ODE (9) over the approach to the minima (until E < 1e-2: near the minima the
    gradient is ~0 and, with a small eps, (9) is so stiff that no integrator keeps up,
    Section 8). Returns (iterates, ode, index from which the ODE is outside its regime: kappa
    >= REGIME_KAPPA (all of it), or from where it is REGIME_DIST away from the iterates)."""
    steps = min(int(math.ceil(T / s.h - 1e-9)), max_steps)
    it = iterates(loss, theta0, s, steps, gtol=gtol)
    E = np.array([loss[0](torch.tensor(x)).item() for x in it])
    k = int(np.argmax(E < 1e-2)) if (E < 1e-2).any() else len(it) - 1
    ode = solve_piecewise(loss, theta0.numpy(), s, k, "modified", budget_s=budget_s)
    far = np.linalg.norm(it[: len(ode)] - ode, axis=1) > REGIME_DIST
    outside = 0 if kappa(s) >= REGIME_KAPPA else (int(np.argmax(far)) if far.any() else len(ode))
    return it, ode, outside


def _saver(out: Path, made: list):
    """save(fig, name, rows): PNG and PDF of the figure, and its data as CSV beside them."""
    import matplotlib.pyplot as plt
    import pandas as pd

    def save(fig, name, rows=None):
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", dpi=150, bbox_inches="tight")
            made.append(out / f"{name}.{ext}")
        plt.close(fig)
        if rows is not None:
            pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)
            made.append(out / f"{name}.csv")
    return save


def _figure1(save) -> None:
    """Figure 1: the function of one variable that the modified loss penalises."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    x = np.linspace(-1, 1, 401)
    rows = []
    for b, r in [(0.9, 0.5), (0.9, 0.9), (0.5, 0.9), (0.95, 0.99), (0.99, 0.95)]:
        y = penalty_1d(x, b, r, 0.01)
        ax.plot(x, y, label=rf"$\beta$={b}, $\rho$={r}")
        rows += [dict(beta=b, rho=r, x=xi, penalty=yi) for xi, yi in zip(x, y)]
    ax.set_xlabel("x")
    ax.set_ylabel(r"$\int_0^x \{\ldots\}\, d\sqrt{\varepsilon + y^2}$ (penalty)")
    ax.set_title(r"penalised function of one variable ($\varepsilon$ = 0.01)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "fig1_penalty", rows)


def _trajectory_panel(ax, settings, labels, title, rows, T, gtol, max_steps, budget_s) -> None:
    """One panel of Figures 2-3: the iterates of each setting from (2.8, 3.5), its modified ODE
    (9) (dashed where outside its regime), the hyperbola of minima; the data into `rows`."""
    loss = [bilinear_loss()]
    th0 = torch.tensor([2.8, 3.5], dtype=torch.float64)
    xs = np.linspace(0.3, 3.2, 300)
    ax.plot(xs, 0.75 / xs, color="violet", lw=2, label=r"minima $\theta_1\theta_2 = y/x$")
    ax.plot([math.sqrt(0.75)], [math.sqrt(0.75)], "kx", ms=9, label="minimal one-norm of the gradient")
    any_outside = False
    for s, lab in zip(settings, labels):
        it, ode, outside = trajectory(loss, th0, s, T, gtol, max_steps, budget_s)
        lim = np.abs(it[-1]).sum()
        line, = ax.plot(it[:, 0], it[:, 1], ".", ms=1.5,
                        label=f"{lab}: {len(it) - 1} steps, " + r"$|\theta|_1$" + f" = {lim:.3f}")
        c = line.get_color()
        if outside > 0:
            ax.plot(ode[: outside + 1, 0], ode[: outside + 1, 1], "-", lw=0.9, color=c)
        if outside < len(ode) - 1:
            any_outside = True
            ax.plot(ode[outside:, 0], ode[outside:, 1], "--", lw=0.9, color=c)
        ax.plot(*it[-1], "o", ms=5, mfc="none", color=c)
        rows += [dict(h=s.h, beta=s.beta, rho=s.rho, eps=s.eps, kind="iterate", n=n, theta_1=p[0], theta_2=p[1])
                 for n, p in enumerate(it)]
        rows += [dict(h=s.h, beta=s.beta, rho=s.rho, eps=s.eps, kind="ode" if n < outside else "ode_outside",
                      n=n, theta_1=p[0], theta_2=p[1]) for n, p in enumerate(ode)]
    ax.plot([], [], "k-", lw=0.9, label="modified ODE (9)")
    if any_outside:
        ax.plot([], [], "k--", lw=0.9, label=rf"ODE outside its regime ($\kappa \geq$ {REGIME_KAPPA} "
                                              f"or > {REGIME_DIST} from the iterates)")
    ax.plot([], [], "ko", ms=5, mfc="none", label="last iterate")
    ax.set_xlim(0.3, 3.0)
    ax.set_ylim(0.2, 3.6)
    ax.set_xlabel(r"$\theta_1$")
    ax.set_ylabel(r"$\theta_2$")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=5.5, loc="upper left")


def figures(out="figures/theory", eps=1e-8, T=15.0, gtol=1e-6, h=1e-2, betas=(0.5, 0.9, 0.95),
            rhos=(0.5, 0.9, 0.99), hs=(3e-3, 1e-2, 2e-2), max_steps=200_000, budget_s=15.0):
    """Figures 1-3 of the paper. Figures 2-3 run every trajectory until the horizon `T` (T/h
    steps) or until its gradient one-norm is below `gtol`, so that they end at their limit
    points; the data of every panel is written beside it as CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    save = _saver(out, made)
    _figure1(save)
    run = dict(T=T, gtol=gtol, max_steps=max_steps, budget_s=budget_s)

    # Figure 2: several beta, several rho
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    rows = []
    _trajectory_panel(axes[0], [Setting("adam", h, b, 0.9, eps) for b in betas], [rf"$\beta$={b}" for b in betas],
                      rf"Adam, $\rho$ = 0.9, h = {h:g}: iterates (dots), modified ODE (9) (lines)", rows, **run)
    _trajectory_panel(axes[1], [Setting("adam", h, 0.9, r, eps) for r in rhos], [rf"$\rho$={r}" for r in rhos],
                      rf"Adam, $\beta$ = 0.9, h = {h:g}", rows, **run)
    save(fig, "fig2_trajectories_beta_rho", rows)

    # Figure 3: several step sizes, beta >> rho and rho > beta
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    rows = []
    for ax, (b, r) in zip(axes, [(0.95, 0.5), (0.5, 0.99)]):
        _trajectory_panel(ax, [Setting("adam", hh, b, r, eps) for hh in hs], [f"h={hh:g}" for hh in hs],
                          rf"Adam, $\beta$ = {b}, $\rho$ = {r}", rows, **run)
    save(fig, "fig3_trajectories_h", rows)
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.theory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="orders of the modified ODEs (about a minute by default)")
    v.add_argument("--algos", nargs="+", choices=ALGOS, default=["adam", "rmsprop"])
    v.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    v.add_argument("--forms", nargs="+", choices=FORMS, default=["first", "modified"])
    v.add_argument("--beta", type=float, default=0.5)
    v.add_argument("--rho", type=float, default=0.6)
    v.add_argument("--eps", type=float, default=1e-8, help="eps of the bilinear runs")
    v.add_argument("--net-eps", type=float, default=1e-2, help="eps of the network runs (see verify())")
    v.add_argument("--T", type=float, default=0.5)
    v.add_argument("--hs", type=float, nargs="+", default=[8e-3, 4e-3, 2e-3])
    v.add_argument("--batches", type=int, default=1, help="mini-batches of the tanh network (cycled)")
    e = sub.add_parser("example23", help="Example 2.3: Adam with a large eps vs heavy-ball GD and [8]'s ODE")
    e.add_argument("--beta", type=float, default=0.5)
    e.add_argument("--rho", type=float, default=0.6)
    e.add_argument("--T", type=float, default=0.5)
    f = sub.add_parser("figures", help="Figures 1-3 (trajectories to their limits)")
    f.add_argument("--out", default="figures/theory")
    f.add_argument("--T", type=float, default=15.0, help="horizon: T/h steps at most")
    f.add_argument("--gtol", type=float, default=1e-6, help="stop once the gradient one-norm is below this")
    f.add_argument("--max-steps", type=int, default=200_000)
    f.add_argument("--h", type=float, default=1e-2, help="step size of Figure 2")
    f.add_argument("--betas", type=float, nargs="+", default=[0.5, 0.9, 0.95], help="Figure 2, left")
    f.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.9, 0.99], help="Figure 2, right")
    f.add_argument("--hs", type=float, nargs="+", default=[3e-3, 1e-2, 2e-2], help="Figure 3")
    f.add_argument("--eps", type=float, default=1e-8)
    f.add_argument("--ode-budget", type=float, default=15.0, help="seconds of ODE integration per trajectory")
    a = ap.parse_args(argv)
    if a.cmd == "verify":
        verify(a.beta, a.rho, a.eps, a.net_eps, a.T, a.hs, a.batches, a.algos, a.models, a.forms)
    elif a.cmd == "example23":
        example_2_3(a.beta, a.rho, T=a.T)
    else:
        made = figures(a.out, a.eps, a.T, a.gtol, a.h, a.betas, a.rhos, a.hs, a.max_steps, a.ode_budget)
        print(f"wrote {len(made)} files under {a.out}")


if __name__ == "__main__":
    main()
