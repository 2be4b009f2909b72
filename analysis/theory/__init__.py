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

from .figures import REGIME_KAPPA, figures, kappa, penalty_1d, trajectory
from .odes import (
    Setting,
    bilinear_loss,
    heavy_ball_rhs,
    iterates,
    large_n_rhs,
    piecewise_rhs,
    solve_piecewise,
    tanh_net_losses,
)
from .verify import example_2_3, fitted_order, successive_orders, verify, verify_problem

__all__ = ["REGIME_KAPPA", "Setting", "bilinear_loss", "example_2_3", "figures", "fitted_order", "heavy_ball_rhs",
           "iterates", "kappa", "large_n_rhs", "penalty_1d", "piecewise_rhs", "solve_piecewise",
           "successive_orders", "tanh_net_losses", "trajectory", "verify", "verify_problem"]
