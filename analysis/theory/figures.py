"""Figures 1-3 of the paper: the implicit penalty (Figure 1) and the trajectories of Adam and
RMSProp on the bilinear loss with their modified ODEs (Figures 2-3)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .odes import Setting, bilinear_loss, iterates, solve_piecewise


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
