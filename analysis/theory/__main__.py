"""`python -m analysis.theory verify | example23 | figures` (usage: analysis/theory/__init__.py)."""

from __future__ import annotations

import argparse

from analysis import theory

from .figures import figures
from .verify import ALGOS, FORMS, MODELS, example_2_3, verify


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m analysis.theory", description=theory.__doc__,
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
    f.add_argument("--style", default="paper", help="paper (single-column sizes) or talk (larger)")
    a = ap.parse_args(argv)
    if a.cmd == "verify":
        results = verify(a.beta, a.rho, a.eps, a.net_eps, a.T, a.hs, a.batches, a.algos, a.models, a.forms)
        return 0 if all(r["passed"] for r in results) else 1
    elif a.cmd == "example23":
        return 0 if example_2_3(a.beta, a.rho, T=a.T)["passed"] else 1
    else:
        made = figures(a.out, a.eps, a.T, a.gtol, a.h, a.betas, a.rhos, a.hs, a.max_steps, a.ode_budget, a.style)
        print(f"wrote {len(made)} files under {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
