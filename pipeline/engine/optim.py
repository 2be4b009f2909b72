"""Optimizers of the paper, as multi-tensor (foreach) `torch.optim.Optimizer`s.

Hyperparameter names follow the paper: step size `h`, gradient momentum `beta`,
squared-gradient momentum `rho`, numerical stability `eps`.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def _grads(group):
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]


class Adam(Optimizer):
    """Adam exactly as Definition 2.1, Eq. (1):

        nu_{n+1} = rho nu_n + (1 - rho) g_n^2
        m_{n+1}  = beta m_n + (1 - beta) g_n
        theta_{n+1} = theta_n - h (m_{n+1} / (1 - beta^{n+1})) / sqrt(nu_{n+1} / (1 - rho^{n+1}) + eps)

    `eps_inside=False` puts eps outside the root (Kingma & Ba, `torch.optim.Adam`);
    `bias_correction=False` drops both (1 - beta^{n+1}) and (1 - rho^{n+1}).
    """

    def __init__(self, params, h=1e-3, beta=0.9, rho=0.999, eps=1e-8,
                 eps_inside=True, bias_correction=True):
        super().__init__(params, dict(h=h, beta=beta, rho=rho, eps=eps,
                                      eps_inside=eps_inside, bias_correction=bias_correction))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads = _grads(group)
            if not params:
                continue
            h, beta, rho, eps = group["h"], group["beta"], group["rho"], group["eps"]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=0, m=torch.zeros_like(p), nu=torch.zeros_like(p))
            n = self.state[params[0]]["step"]  # all params of a group share n
            m = [self.state[p]["m"] for p in params]
            nu = [self.state[p]["nu"] for p in params]
            torch._foreach_mul_(m, beta)
            torch._foreach_add_(m, grads, alpha=1 - beta)
            torch._foreach_mul_(nu, rho)
            torch._foreach_addcmul_(nu, grads, grads, value=1 - rho)
            bc1 = 1 - beta ** (n + 1) if group["bias_correction"] else 1.0
            bc2 = 1 - rho ** (n + 1) if group["bias_correction"] else 1.0
            denom = torch._foreach_div(nu, bc2)
            if group["eps_inside"]:
                torch._foreach_add_(denom, eps)
                torch._foreach_sqrt_(denom)
            else:
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, value=-h / bc1)
            for p in params:
                self.state[p]["step"] = n + 1


class RMSProp(Optimizer):
    """RMSProp exactly as Definition 4.1, Eq. (11) (no bias correction):

        nu_{n+1} = rho nu_n + (1 - rho) g_n^2
        theta_{n+1} = theta_n - h g_n / sqrt(nu_{n+1} + eps)

    `eps_inside=False` uses sqrt(nu_{n+1}) + eps instead.
    """

    def __init__(self, params, h=1e-3, rho=0.99, eps=1e-8, eps_inside=True):
        super().__init__(params, dict(h=h, rho=rho, eps=eps, eps_inside=eps_inside))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads = _grads(group)
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=0, nu=torch.zeros_like(p))
            nu = [self.state[p]["nu"] for p in params]
            torch._foreach_mul_(nu, group["rho"])
            torch._foreach_addcmul_(nu, grads, grads, value=1 - group["rho"])
            if group["eps_inside"]:
                denom = torch._foreach_add(nu, group["eps"])
                torch._foreach_sqrt_(denom)
            else:
                denom = torch._foreach_sqrt(nu)
                torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, grads, denom, value=-group["h"])
            for p in params:
                self.state[p]["step"] += 1


class GD(Optimizer):
    """Plain gradient descent: theta_{n+1} = theta_n - h g_n."""

    def __init__(self, params, h=1e-2):
        super().__init__(params, dict(h=h))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads = _grads(group)
            if params:
                torch._foreach_add_(params, grads, alpha=-group["h"])


class Momentum(Optimizer):
    """Heavy-ball momentum GD (Example 2.3):
    theta_{n+1} = theta_n - h g_n + beta (theta_n - theta_{n-1}),
    implemented as b_n = beta b_{n-1} + g_n, theta_{n+1} = theta_n - h b_n (b_{-1} = 0).
    """

    def __init__(self, params, h=1e-2, beta=0.9):
        super().__init__(params, dict(h=h, beta=beta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads = _grads(group)
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["b"] = torch.zeros_like(p)
            b = [self.state[p]["b"] for p in params]
            torch._foreach_mul_(b, group["beta"])
            torch._foreach_add_(b, grads)
            torch._foreach_add_(params, b, alpha=-group["h"])


OPTIMIZERS = {"adam": Adam, "rmsprop": RMSProp, "gd": GD, "momentum": Momentum}


def _no_dynamo_import_at_first_use() -> None:
    """Start-up: torch.optim.Optimizer's `add_param_group`, `state_dict`, `load_state_dict` and
    `zero_grad` are wrapped by `torch._disable_dynamo`, which imports torch._dynamo -- about 2 s,
    most of a small run's start-up -- at their first call, only to keep torch.compile from
    tracing them. Nothing here traces an optimizer (train.compile compiles the model, never the
    update), so each is given, up front, the dynamo-disabled form that torch would cache at that
    first call: itself (torch/_compile.py). Where torch's wrapper is not the one this expects, nothing
    is changed: the slow start, never a different computation."""
    import torch._compile

    probe = torch._compile._disable_dynamo(lambda: None).__code__
    for method in vars(Optimizer).values():
        inner = getattr(method, "__wrapped__", None)
        if inner is not None and getattr(method, "__code__", None) is probe:
            setattr(inner, "__dynamo_disable", inner)


_no_dynamo_import_at_first_use()  # once, at import


def build_optimizer(params, cfg) -> Optimizer:
    """Build from the `optim` config group (name plus the keys each class takes)."""
    cls = OPTIMIZERS[cfg.name]
    keys = cls.__init__.__code__.co_varnames[2:cls.__init__.__code__.co_argcount]
    return cls(params, **{k: cfg[k] for k in keys if k in cfg})
