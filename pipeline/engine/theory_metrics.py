"""Opt-in training metric: the O(h) bias term of Eq. (3) at theta_n.

    bias_j = h/2 { (1+beta)/(1-beta) - (1+rho)/(1-rho) + (1+rho)/(1-rho) eps/(g_j^2+eps) }
             * d_j ||grad E||_{1,eps},
    d_j ||grad E||_{1,eps} = (H u)_j,   u = g / sqrt(g^2 + eps),

so it costs one Hessian-vector product, accumulated over the same micro-batches as the
gradient (double backward, eager mode). RMSProp is the case beta = 0 (Remark 4.3).
"""

from __future__ import annotations

import torch


def bias_coefficient(g: torch.Tensor, h: float, beta: float, rho: float, eps: float):
    """The braces of Eq. (3) times h/2, elementwise in g."""
    a = (1 + beta) / (1 - beta) - (1 + rho) / (1 - rho)
    return 0.5 * h * (a + (1 + rho) / (1 - rho) * eps / (g * g + eps))


def bias_term_norm(model, data, cfg, parts, autocast, ranks=None) -> torch.Tensor:
    """Two-norm of the bias term (Eq. 3) at the current theta; `.grad` must hold grad E. With
    several ranks each adds its share of the micro-batches and the products are summed."""
    params = [p for p in model.parameters() if p.requires_grad]
    eps = float(cfg.optim.eps)
    g = [p.grad.detach().double() for p in params]
    u = [(gi / torch.sqrt(gi * gi + eps)).to(p.dtype) for gi, p in zip(g, params)]
    hvp = [torch.zeros_like(p) for p in params]
    n = data.x_train.shape[0]
    for idx in (ranks.shard(parts) if ranks else parts):
        with autocast():
            out = model(data.x_train[idx])
        grads = torch.autograd.grad(data.objective(out, data.y_train[idx]) / n, params,
                                    create_graph=True)
        dot = sum((gr * ui).sum() for gr, ui in zip(grads, u))
        torch._foreach_add_(hvp, torch.autograd.grad(dot, params))
    if ranks:
        ranks.sum_(hvp)
    beta = float(cfg.optim.get("beta", 0.0)) if cfg.optim.name == "adam" else 0.0
    total = torch.zeros((), dtype=torch.float64, device=g[0].device)
    for gi, hv in zip(g, hvp):
        b = bias_coefficient(gi, float(cfg.optim.h), beta, float(cfg.optim.rho), eps) * hv.double()
        total += b.square().sum()
    return total.sqrt()
