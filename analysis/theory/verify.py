"""Numerical verification of the modified ODEs: the global error of each form against the
iterates, the fitted orders in h (first order O(h), the modified ODEs O(h^2)), and Example 2.3."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from .odes import Setting, bilinear_loss, iterates, solve_piecewise, tanh_net_losses

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


TOLERANCE = 0.25  # a measured order passes within this of the theorem's


def expected_order(algo: str, form: str) -> int:
    """The order in h the theorems give: the first-order flow 1, the modified ODEs 2 (Theorems 3.1,
    4.2; [8] for heavy-ball GD); the large-n form (2)-(3) 2 for Adam (bias correction makes its
    leading term exact in full batch), 1 for RMSProp (its R^(n) carries 1 - rho^(n+1))."""
    if form == "large_n":
        return 2 if algo == "adam" else 1
    return 1 if form == "first" else 2


def verdict(what: str, measured: float, expected: float, out) -> bool:
    """One line: the measured order against the expected one, pass or FAIL."""
    ok = math.isfinite(measured) and abs(measured - expected) <= TOLERANCE
    print(f"verdict: {what}: order {measured:.2f}, expected {expected:g} ± {TOLERANCE:g}: "
          f"{'pass' if ok else 'FAIL'}", file=out)
    return ok


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
    print("", file=out)
    for r in results:
        r["passed"] = all([verdict(f"{r['algo']} on {r['problem']}, {form} form", order,
                                   expected_order(r["algo"], form), out) for form, order in r["orders"].items()])
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
    print("", file=out)
    passed = all([verdict("Example 2.3 (a), Adam to heavy-ball GD in 1/eps", order_eps["adam - heavy ball"], 1, out),
                  verdict("Example 2.3 (b), heavy-ball GD, first-order flow", orders["first"], 1, out),
                  verdict("Example 2.3 (b), heavy-ball GD, modified equation of [8] (last slope)",
                          slopes["modified"][-1], 2, out)])
    return dict(passed=passed, order_in_inv_eps=order_eps["adam - heavy ball"],
                slopes_in_inv_eps=slopes_eps["adam - heavy ball"],
                distances=dist["adam - heavy ball"], errors=errs, orders=orders, slopes=slopes)
