"""K grid points of one model trained together: their parameters stacked along a new first
dimension, the forward and loss vmapped over it (`torch.func.functional_call` + `vmap`), and the
optimizers of Definitions 2.1 and 4.1 applied to the stacks with each point's own h, beta, rho,
eps and step count n. Point k's numbers are those of its own unpacked run: the same model, data,
partition and formulas, only batched (summation order may differ: exact to rounding in fp64,
tests/test_pack.py). Which points may pack: pipeline/config/pack.py.

A point that stops (diverged, stop_loss, max_steps, its lease lost) is removed from the stacks
(`keep`) while the others go on. A point's state converts to and from the unpacked run's
checkpoint (`into_slot`, `out_of_slot`): a packed run resumes unpacked and the other way round.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call, vmap

from .losses import objective
from .optim import build_optimizer
from .step import partition

STATE = {"adam": ("m", "nu"), "rmsprop": ("nu",), "momentum": ("b",), "gd": ()}  # per-parameter state
COUNTS_STEPS = ("adam", "rmsprop")  # optimizers whose state holds n (torch.optim's `step`)


def _col(values, like: torch.Tensor) -> torch.Tensor:
    """Per-point numbers (float64 on the host) as a [K, 1, ..., 1] tensor of `like`'s dtype."""
    return torch.tensor(values, dtype=torch.float64).to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


class Stack:
    """The parameters of K points of `model` (the template: its structure and buffers; its own
    parameters are not used by the forward) and their optimizer state, stacked."""

    def __init__(self, model, optim_cfgs: list, task):
        loss = objective(task)
        self.model, self.classification, self.name = model, loss.classification, optim_cfgs[0].name
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        theta = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
        k = len(optim_cfgs)
        self.params = [t.unsqueeze(0).repeat(k, *[1] * t.dim()).requires_grad_() for t in theta]
        self.state = {s: [torch.zeros_like(p) for p in self.params] for s in STATE[self.name]}
        self.hyper = [dict(c) for c in optim_cfgs]
        self.n = [0] * k  # optimizer steps taken (n of Definition 2.1)
        self._columns: dict = {}
        buffers = dict(model.named_buffers())

        def point(ps, xb, yb):  # one point's summed loss and number correct on a micro-batch
            out = functional_call(model, ({**dict(zip(self.names, ps)), **buffers}), (xb,))
            if not loss.classification:
                return loss(out, yb), torch.zeros((), dtype=torch.int64, device=xb.device)
            return loss(out, yb), (out.argmax(1) == yb).sum()

        self._point = vmap(point, in_dims=(0, None, None))

    @property
    def k(self) -> int:
        return len(self.n)

    # -- the step: grad E(theta_n) of every point, the metrics at theta_n ---------------------
    def gradients(self, x, y, parts, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of sum_mb (sum_{i in mb} l_i) / N for every point into `.grad` (as
        step.accumulate_gradient); on-device ([K] loss at theta_n in float64, [K] correct)."""
        for p in self.params:
            p.grad = None
        n = x.shape[0]
        total = torch.zeros(self.k, device=x.device, dtype=torch.float64)
        correct = torch.zeros(self.k, device=x.device, dtype=torch.int64)
        for idx in parts:
            with autocast():
                ls, c = self._point(self.params, x[idx], y[idx])
            (ls / n).sum().backward()  # the points are independent: slot k gets point k's gradient
            total += ls.detach()
            correct += c
        return total / n, correct

    @torch.no_grad()
    def grad_norms(self) -> torch.Tensor:
        """[K, 3]: each point's [perturbed one-norm (its own eps), one-norm, two-norm] of its
        gradient in float64, as step.grad_norms: ||g||_{1,eps} = sum_i sqrt(g_i^2 + eps)."""
        g = [p.grad.double().flatten(1) for p in self.params]
        e = self._cols(g[0])["eps"]  # [K, 1] float64
        pert = torch.stack([(t * t + e).sqrt().sum(1) for t in g]).sum(0)
        l1 = torch.stack([t.abs().sum(1) for t in g]).sum(0)
        l2 = torch.stack([t.square().sum(1) for t in g]).sum(0).sqrt()
        return torch.stack([pert, l1, l2], 1)

    def theta(self) -> torch.Tensor:
        """[K, P]: every point's theta_n flattened (few-parameter models record it)."""
        return torch.cat([p.detach().flatten(1) for p in self.params], 1)

    @torch.no_grad()
    def evaluate(self, x, y, micro_batch, autocast=contextlib.nullcontext) -> tuple[list, list]:
        """Every point's (mean loss, accuracy) on a held-out set in eval mode; host lists."""
        was = self.model.training
        self.model.eval()
        total = torch.zeros(self.k, device=x.device, dtype=torch.float64)
        correct = torch.zeros(self.k, device=x.device, dtype=torch.int64)
        for idx in partition(x.shape[0], micro_batch):
            with autocast():
                ls, c = self._point(self.params, x[idx], y[idx])
            total += ls
            correct += c
        self.model.train(was)
        n = x.shape[0]
        loss, corr = torch.stack([total, correct.double()]).tolist()  # host sync: the test pass (every eval_every)
        acc = [c / n if self.classification else float("nan") for c in corr]
        return [v / n for v in loss], acc

    # -- the update theta_n -> theta_{n+1}, each point with its own numbers ----------------------
    def _cols(self, p: torch.Tensor) -> dict:
        """The per-point numbers as [K, 1, ..] columns shaped for `p` (cached until `keep`)."""
        key = (p.dim(), p.dtype, p.device)
        if key not in self._columns:
            hy = self.hyper
            get = {name: [float(c.get(name, 0.0)) for c in hy] for name in ("h", "beta", "rho", "eps")}
            self._columns[key] = dict(
                neg_h=_col([-v for v in get["h"]], p),
                beta=_col(get["beta"], p), one_beta=_col([1 - b for b in get["beta"]], p),
                rho=_col(get["rho"], p), one_rho=_col([1 - r for r in get["rho"]], p), eps=_col(get["eps"], p))
        return self._columns[key]

    @torch.no_grad()
    def step(self) -> None:
        """Definition 2.1 (Adam, Eq. (1)), 4.1 (RMSProp, Eq. (11)), momentum GD or GD, as
        pipeline/engine/optim.py, on the stacks; n is each point's own."""
        hy, name, n = self.hyper, self.name, self.n
        if name == "adam":  # the bias corrections 1 - beta^(n+1), 1 - rho^(n+1) of each point (float64)
            on = [c.get("bias_correction", True) for c in hy]
            bc1 = [1 - c["beta"] ** (k + 1) if b else 1.0 for c, k, b in zip(hy, n, on)]
            bc2 = _col([1 - c["rho"] ** (k + 1) if b else 1.0 for c, k, b in zip(hy, n, on)], self.params[0])
            step_size = _col([-c["h"] / b1 for c, b1 in zip(hy, bc1)], self.params[0])
        for i, (p, g) in enumerate(zip(self.params, (q.grad for q in self.params))):
            c = self._cols(p)
            if name == "gd":  # theta + (-h) g, as torch._foreach_add_(alpha=-h)
                p.addcmul_(g, c["neg_h"])
                continue
            if name == "momentum":
                b = self.state["b"][i]
                b.mul_(c["beta"]).add_(g)
                p.addcmul_(b, c["neg_h"])
                continue
            nu = self.state["nu"][i]
            nu.mul_(c["rho"]).addcmul_(g * c["one_rho"], g)
            if name == "adam":
                m = self.state["m"][i]
                m.mul_(c["beta"]).add_(g * c["one_beta"])
                shape = (-1, *[1] * (p.dim() - 1))
                denom, num = nu / bc2.view(shape), m * step_size.view(shape)
            else:
                denom, num = nu.clone(), g * c["neg_h"]
            denom = (denom + c["eps"]).sqrt_() if hy[0].get("eps_inside", True) else denom.sqrt_().add_(c["eps"])
            p.add_(num / denom)
        self.n = [k + 1 for k in n]

    def keep(self, slots: list[int]) -> None:
        """Only the points in `slots` go on (the others stopped): every stack narrowed to them."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.params[0].device)
        kept = []
        for p in self.params:  # with their gradients: the update of this step follows
            q = p.detach().index_select(0, idx).requires_grad_()
            q.grad = p.grad.index_select(0, idx) if p.grad is not None else None
            kept.append(q)
        self.params = kept
        self.state = {s: [t.index_select(0, idx) for t in ts] for s, ts in self.state.items()}
        self.hyper, self.n = [self.hyper[k] for k in slots], [self.n[k] for k in slots]
        self._columns = {}

    # -- a point's state as its own unpacked run's model and optimizer -----------------------------
    @torch.no_grad()
    def into_slot(self, k: int, model, opt, step: int) -> None:
        """Point k takes the parameters of `model` and the state of `opt` (a torch.optim
        optimizer of pipeline/engine/optim.py over model's parameters, e.g. just loaded from a
        checkpoint of `step`: n updates were made, an empty state is zeros)."""
        params = [p for p in model.parameters() if p.requires_grad]
        for stacked, p in zip(self.params, params):
            stacked[k].copy_(p)
        for i, p in enumerate(params):
            st = opt.state.get(p) or {}
            for s in STATE[self.name]:
                self.state[s][i][k].copy_(st[s] if s in st else torch.zeros_like(p))
        self.n[k] = step

    @torch.no_grad()
    def out_of_slot(self, k: int, model, optim_cfg):
        """Point k's parameters copied into `model`, and an optimizer (its own hyperparameters)
        over them holding point k's state: what its unpacked run would checkpoint."""
        params = [p for p in model.parameters() if p.requires_grad]
        for stacked, p in zip(self.params, params):
            p.copy_(stacked[k])
        opt = build_optimizer(model.parameters(), optim_cfg)
        if self.n[k] > 0:
            for i, p in enumerate(params):
                opt.state[p] = {s: self.state[s][i][k].clone() for s in STATE[self.name]}
                if self.name in COUNTS_STEPS:
                    opt.state[p]["step"] = self.n[k]
        return opt
