"""The paper's theory, executable: the piecewise modified ODEs of Theorem 3.1 (Adam, Eq. 9) and
Theorem 4.2 (RMSProp, Eq. 12) for full-batch and mini-batch losses, the first-order flow (the
same without the O(h) term), the large-n form (2)-(3), and their numerical verification.

    python -m analysis.theory verify [--algos adam rmsprop momentum] [--models bilinear net]
                                     [--forms first modified large_n] [--hs 8e-3 4e-3 2e-3]
    python -m analysis.theory example23      # Example 2.3: Adam with a large eps = heavy ball
    python -m analysis.theory figures --out figures/theory [--T 15 --gtol 1e-6 --betas ...]

odes.py       the problems, the optimizers' iterates and the modified ODEs (how (9) is computed)
verify.py     the orders of the forms in h, and Example 2.3
figures.py    Figures 1-3
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
