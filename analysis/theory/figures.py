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


def horizon(T: float, h: float, max_steps: int) -> int:
    """The steps of a trajectory run to the horizon T: T/h, at most max_steps."""
    return min(int(math.ceil(T / h - 1e-9)), max_steps)


def trajectory(loss, theta0, s: Setting, T: float, gtol: float, max_steps: int = 200_000, budget_s: float = 15):
    """Iterates until the horizon T (T/h steps) or a gradient one-norm below `gtol`, and the
    modified ODE (9) over the approach to the minima (until E < 1e-2: near the minima the
    gradient is ~0 and, with a small eps, (9) is so stiff that no integrator keeps up,
    Section 8). Returns (iterates, ode, index from which the ODE is outside its regime: kappa
    >= REGIME_KAPPA (all of it), or from where it is REGIME_DIST away from the iterates)."""
    steps = horizon(T, s.h, max_steps)
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
            fig.savefig(out / f"{name}.{ext}", bbox_inches="tight")
            made.append(out / f"{name}.{ext}")
        plt.close(fig)
        if rows is not None:
            pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False, float_format="%.10g")
            made.append(out / f"{name}.csv")
    return save


CASES_FIG1 = [(0.9, 0.5), (0.9, 0.9), (0.5, 0.9), (0.95, 0.99), (0.99, 0.95)]


def _figure1(save, eps: float = 0.01) -> None:
    """Figure 1: the function of one variable that the modified loss penalises, one panel per
    (beta, rho) (their scales differ by 100x: one shared axis flattens three of them), and a
    last panel near 0, where eps smooths |x| into a parabola of width ~sqrt(eps)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(6.6, 3.9))
    x = np.linspace(-1, 1, 801)
    near = np.linspace(-3 * math.sqrt(eps), 3 * math.sqrt(eps), 401)
    rows = []
    zoom = axes.flat[-1]
    for i, ((b, r), ax) in enumerate(zip(CASES_FIG1, axes.flat)):
        y = penalty_1d(x, b, r, eps)
        ax.plot(x, y, color=f"C{i}")
        ax.axhline(0, color="0.6", lw=0.5)
        ax.set_title(rf"$\beta$ = {b}, $\rho$ = {r}")
        ax.set_xticks([-1, -0.5, 0, 0.5, 1])
        if i % 3 == 0:
            ax.set_ylabel(r"penalty $P(x)$")
        if i >= 3:
            ax.set_xlabel(r"$x$")
        yz = penalty_1d(near, b, r, eps)
        zoom.plot(near / math.sqrt(eps), yz / np.abs(yz).max(), color=f"C{i}", label=rf"$\beta$={b}, $\rho$={r}")
        rows += [dict(beta=b, rho=r, eps=eps, x=xi, penalty=yi, panel="case") for xi, yi in zip(x, y)]
        rows += [dict(beta=b, rho=r, eps=eps, x=xi, penalty=yi, panel="near_zero") for xi, yi in zip(near, yz)]
    zoom.set_title(r"near 0: $|x| \leq 3\sqrt{\varepsilon}$, each scaled to 1")
    zoom.set_xlabel(r"$x / \sqrt{\varepsilon}$")
    zoom.set_ylabel(r"$P(x) / \max |P|$")
    zoom.axhline(0, color="0.6", lw=0.5)
    fig.suptitle(rf"Figure 1: what the modified loss penalises, in one dimension (Section 3), $\varepsilon$ = {eps:g}"
                 "\n" + r"$P(x) = \int_0^x \{\frac{1+\beta}{1-\beta} - \frac{1+\rho}{1-\rho} + "
                 r"\frac{1+\rho}{1-\rho}\frac{\varepsilon}{y^2+\varepsilon}\}\, d\sqrt{\varepsilon+y^2}$")
    fig.tight_layout()
    save(fig, "fig1_penalty", rows)


def _trajectory_panel(ax, settings, labels, title, rows, T, gtol, max_steps, budget_s) -> None:
    """One panel of Figures 2-3: the iterates of each setting from (2.8, 3.5) (dots), its
    modified ODE (9) above them (a line; dashed where outside its regime), the hyperbola of
    minima and its point of smallest one-norm; an inset zoomed on the end points; a run that
    reached the horizon before its gradient vanished marked as not converged. Data into `rows`."""
    loss = [bilinear_loss()]
    th0 = torch.tensor([2.8, 3.5], dtype=torch.float64)
    xs = np.geomspace(0.05, 12, 600)
    inset = ax.inset_axes([0.56, 0.16, 0.41, 0.41])  # its tick labels inside the panel, off its frame
    paths, series = [], []
    for k, (s, lab) in enumerate(zip(settings, labels)):
        c = f"C{k}"
        it, ode, outside = trajectory(loss, th0, s, T, gtol, max_steps, budget_s)
        converged = len(it) - 1 < horizon(T, s.h, max_steps)  # stopped by gtol before the horizon
        gid = f"series {lab}"  # one series: the ODE's two parts carry one gid (analysis/look.py)
        for a in (ax, inset):
            a.plot(it[:, 0], it[:, 1], ".", ms=1.2, color=c, alpha=0.45, zorder=2)
            if outside > 0:
                a.plot(ode[: outside + 1, 0], ode[: outside + 1, 1], "-", lw=1.0, color=c, zorder=3, gid=gid)
            if outside < len(ode) - 1:
                a.plot(ode[outside:, 0], ode[outside:, 1], "--", lw=1.0, color=c, zorder=3, gid=gid)
            a.plot(*it[-1], "o" if converged else "^", ms=5, mfc="white", color=c, zorder=4)
        paths.append(it)
        lim = np.abs(it[-1]).sum()
        series.append((_line(c), f"{lab}: {len(it) - 1} steps, " + r"$|\theta|_1$" + f" = {lim:.3f}"
                       + ("" if converged else " (not converged)")))
        rows += [dict(h=s.h, beta=s.beta, rho=s.rho, eps=s.eps, kind="iterate", n=n, theta_1=p[0], theta_2=p[1],
                      converged=converged) for n, p in enumerate(it)]
        rows += [dict(h=s.h, beta=s.beta, rho=s.rho, eps=s.eps, kind="ode" if n < outside else "ode_outside",
                      n=n, theta_1=p[0], theta_2=p[1], converged=converged) for n, p in enumerate(ode)]
    # the panel: every iterate (a run may cross to the branch theta_1, theta_2 < 0) and the minima near them
    every = np.concatenate(paths)
    box_lo, box_hi = np.minimum(every.min(0), 0.2), np.maximum(every.max(0), [3.1, 3.7])
    margin = 0.03 * (box_hi - box_lo)
    ends = np.array([p[-1] for p in paths] + [[math.sqrt(0.75)] * 2])
    lo, hi = ends.min(0), ends.max(0)
    pad = np.maximum(0.15 * (hi - lo).max(), 0.05)
    for a in (ax, inset):
        for branch in (xs, -xs[::-1]):  # theta_1 theta_2 = 0.75: both branches, where the panel shows them
            a.plot(branch, 0.75 / branch, color="0.45", lw=1.2, ls=(0, (4, 2)), zorder=1)
        a.plot([math.sqrt(0.75)], [math.sqrt(0.75)], "kx", ms=6, mew=1.2, zorder=5)
    ax.set_xlim(box_lo[0] - margin[0], box_hi[0] + margin[0])
    ax.set_ylim(box_lo[1] - margin[1], box_hi[1] + margin[1])
    if ((hi - lo + 2 * pad) < 0.4 * (box_hi - box_lo)).all():  # a zoom only where the end points lie close
        inset.set_xlim(lo[0] - pad, hi[0] + pad)
        inset.set_ylim(lo[1] - pad, hi[1] + pad)
        inset.tick_params(labelsize=6, length=2)
        inset.grid(False)
        ax.indicate_inset_zoom(inset, edgecolor="0.5")
    else:
        inset.remove()
    ax.set_xlabel(r"$\theta_1$")
    ax.set_ylabel(r"$\theta_2$")
    ax.set_title(title)
    ax.legend(*zip(*series), loc="upper center", bbox_to_anchor=(0.5, -0.2), handlelength=1.2)


def _line(colour, **kw):
    import matplotlib.lines

    return matplotlib.lines.Line2D([], [], color=colour, **kw)


def _common_legend(fig, any_outside: bool) -> None:
    """The elements both panels share, once, under the figure."""
    h = [(_line("0.3", marker=".", ls="", ms=4), "iterates of Adam"),
         (_line("0.3", lw=1.0), "modified ODE (9)"),
         (_line("0.3", marker="o", mfc="white", ls=""), "last iterate"),
         (_line("0.3", marker="^", mfc="white", ls=""), "last iterate, not converged by the horizon"),
         (_line("0.45", lw=1.2, ls=(0, (4, 2))), r"minima $\theta_1\theta_2 = y/x = 0.75$"),
         (_line("k", marker="x", ls=""),
          r"smallest $|\theta|_1$ among the minima, $(\sqrt{.75}, \sqrt{.75})$")]
    if any_outside:
        h.insert(2, (_line("0.3", lw=1.0, ls="--"),
                     rf"ODE outside its regime ($\kappa \geq$ {REGIME_KAPPA} or > {REGIME_DIST} from the iterates)"))
    fig.legend(*zip(*h), loc="outside lower center", ncol=2)


def _trajectory_figure(save, name, title, panels, T, gtol, max_steps, budget_s) -> None:
    """Figures 2 and 3: the figure's title, two panels (settings, labels, title), one legend of
    what they share under them."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6.8, 5.2), layout="constrained")
    rows = []
    for ax, (settings, labels, panel) in zip(axes, panels):
        _trajectory_panel(ax, settings, labels, panel, rows, T, gtol, max_steps, budget_s)
    fig.suptitle(title)
    _common_legend(fig, any(r["kind"] == "ode_outside" for r in rows))
    save(fig, name, rows)


def figures(out="figures/theory", eps=1e-8, T=15.0, gtol=1e-6, h=1e-2, betas=(0.5, 0.9, 0.95),
            rhos=(0.5, 0.9, 0.99), hs=(3e-3, 1e-2, 2e-2), max_steps=200_000, budget_s=15.0, style="paper"):
    """Figures 1-3 of the paper. Figures 2-3 run every trajectory until the horizon `T` (T/h
    steps) or until its gradient one-norm is below `gtol`, so that they end at their limit
    points; the data of every panel is written beside it as CSV."""
    from ..figures import use_style  # the sweep figures' style file (Agg backend)

    use_style(style)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    save = _saver(out, made)
    _figure1(save)
    run = dict(T=T, gtol=gtol, max_steps=max_steps, budget_s=budget_s)
    # Figure 2: several beta, several rho
    _trajectory_figure(save, "fig2_trajectories_beta_rho", "Figure 2: Adam's iterates and their modified ODE (9), "
                       "several $\\beta$ and $\\rho$", [
        ([Setting("adam", h, b, 0.9, eps) for b in betas], [rf"$\beta$={b}" for b in betas],
         rf"Adam, $\rho$ = 0.9, h = {h:g}"),
        ([Setting("adam", h, 0.9, r, eps) for r in rhos], [rf"$\rho$={r}" for r in rhos],
         rf"Adam, $\beta$ = 0.9, h = {h:g}")], **run)
    # Figure 3: several step sizes, beta >> rho and rho > beta
    _trajectory_figure(save, "fig3_trajectories_h", "Figure 3: several step sizes h, $\\beta > \\rho$ and "
                       "$\\rho > \\beta$", [
        ([Setting("adam", hh, b, r, eps) for hh in hs], [f"h={hh:g}" for hh in hs],
         rf"Adam, $\beta$ = {b}, $\rho$ = {r}") for b, r in [(0.95, 0.5), (0.5, 0.99)]], **run)
    return made
