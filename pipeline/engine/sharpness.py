"""Where the theory holds: the sharpness of the full-batch loss at theta_n, plain and
preconditioned, against the stability threshold of the update (Cohen et al. 2021, 2022).

    sharpness     = lambda_1(H),                    H = grad^2 E(theta_n)
    pre_sharpness = lambda_1(P^-1 H) = lambda_1(P^-1/2 H P^-1/2)

P is the optimizer's own diagonal preconditioner of the update from theta_n (the one that
divides m_{n+1} in Definition 2.1, g_n in Definition 4.1), built from its state and g_n without
changing either:

    Adam     P = sqrt(nu_{n+1} / c + eps)  (eps inside the root)   or  sqrt(nu_{n+1} / c) + eps,
             nu_{n+1} = rho nu_n + (1 - rho) g_n^2,  c = 1 - rho^{n+1} (1 with bias_correction=false)
    RMSProp  the same with c = 1
    GD, heavy-ball momentum   P = I (pre_sharpness = sharpness)

Each is the largest Ritz value of Lanczos with full reorthogonalisation on Hessian-vector
products of the full-batch loss, accumulated over the step's own micro-batches (its BatchNorm
ghost groups, the model in training mode, each rank its share, the products summed over the
ranks as the gradient is; the gradient's graph built once per record and kept for all its
products when the parts' graphs fit in memory, `graphs_fit`); warm-started from the last two
records' top Ritz vectors, extrapolated (`Sharpness.start`). Stopping
rule: the top Ritz pair's residual ||A y - theta y|| = |beta_k s_k| (exact for Lanczos) at most
`tol` |theta|, or `iters` products; the count and the relative residual are recorded, and a
value that did not converge is left empty (flagged), never reported.

The stability threshold (`eos_threshold`): on E = theta^T A theta / 2 with P frozen, the update
is linear in the eigen-coordinates of P^-1/2 A P^-1/2 and, for an eigenvalue lambda, stable iff
    GD, RMSProp:  |1 - h lambda| < 1                         <=>  lambda < 2 / h
    heavy ball (b = beta b + g, pipeline's `momentum`): the roots of x^2 - (1 + beta - h lambda) x
                  + beta lie in the unit disc                <=>  lambda < (2 + 2 beta) / h
    Adam (m = beta m + (1 - beta) g): heavy ball with step h (1 - beta)
                                                             <=>  lambda < (2 + 2 beta) / ((1 - beta) h)
(Adam's 1 / (1 - beta^{n+1}) is 1 after the first few hundred steps; the rule is
pipeline.thresholds.eos_threshold, and tests/test_sharpness.py shows each on a quadratic.)
"""

from __future__ import annotations

import contextlib
import math

import torch

from .optim import Adam, RMSProp
from .step import bn_layers, bn_load, bn_state

COLUMNS = ["sharpness", "sharpness_iters", "sharpness_resid", "pre_sharpness", "pre_sharpness_iters",
           "pre_sharpness_resid"]


class StepGraphs:
    """The gradient graphs of a record's own step (step.accumulate_gradient): each part's
    gradient taken with its graph and added into `.grad` as backward() adds it, the graphs kept
    for the record's products while all of this rank's `parts` fit (`graphs_fit`, decided on the
    tensors the first part's forward and backward saved); after that a plain backward."""

    def __init__(self, params, parts: int):
        self.params, self.parts = params, parts
        self.kept: list = []  # the parts' gradients with their graphs
        self.fits: bool | None = None  # decided after the first part

    @contextlib.contextmanager
    def counting(self):
        """Around a part's forward and backward: the first one's saved tensors counted."""
        if self.fits is not None:
            yield
            return
        saved: list[int] = []
        with saved_bytes(saved):
            yield
        self.fits = graphs_fit(sum(saved), self.parts, self.params[0].device)
        if not self.fits:
            self.kept.clear()

    def backward(self, loss: torch.Tensor) -> None:
        if self.fits is False:
            loss.backward()
            return
        g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        with torch.no_grad():
            for p, gi in zip(self.params, g):
                if gi is not None:
                    p.grad = gi.detach().clone() if p.grad is None else p.grad.add_(gi)
        self.kept.append(g)


def hvp_operator(model, x, y, objective, parts, params, autocast, ranks, graphs: StepGraphs | None = None):
    """v -> H v for the full-batch loss sum_mb (sum_{i in mb} l_i) / N (flat float64 vectors),
    each rank its share of `parts`, the products summed over the ranks. The gradient's graph of
    each of this rank's parts is built once and kept for every product of the record when they
    all fit (`graphs_fit`), or taken from the step's own `graphs`; else it is rebuilt for each
    product, as the step rebuilds it."""
    n, mine = x.shape[0], ranks.shard(parts)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    kept: list = graphs.kept if graphs is not None else []  # the parts' gradients with their graphs, while they fit
    keep = graphs.fits if graphs is not None else None  # whether they do: decided on the first part's graph

    def gradient(i: int):
        nonlocal keep
        if i < len(kept):
            return kept[i]
        saved: list[int] = []  # the first graph's saved tensors, their bytes
        with saved_bytes(saved) if keep is None else contextlib.nullcontext():
            with autocast():
                logits = model(x[mine[i]])
            g = torch.autograd.grad(objective(logits, y[mine[i]]) / n, params, create_graph=True, allow_unused=True)
        if keep is None:
            keep = graphs_fit(sum(saved), len(mine), params[0].device)
        if keep:
            kept.append(g)
        return g

    def hvp(v: torch.Tensor) -> torch.Tensor:
        vs = [t.view(s).to(p.dtype) for t, s, p in zip(v.split(sizes), shapes, params)]
        out = [torch.zeros_like(p) for p in params]
        for i in range(len(mine)):
            dot = sum((g * vi).sum() for g, vi in zip(gradient(i), vs) if g is not None)  # None: a parameter unused
            if torch.is_tensor(dot) and dot.requires_grad:  # else the gradient is constant here: H v = 0
                torch._foreach_add_(out, torch.autograd.grad(dot, params, retain_graph=keep, allow_unused=True,
                                                             materialize_grads=True))
        ranks.sum_(out)
        return torch.cat([t.reshape(-1).double() for t in out])

    return hvp


@contextlib.contextmanager
def saved_bytes(into: list):
    """The bytes of each tensor autograd saves for backward inside the block, appended to `into`."""

    def count(t):
        into.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        yield


def graphs_fit(part_bytes: int, parts: int, device) -> bool:
    """Whether the gradient graphs of all `parts` (each about `part_bytes`, the tensors the
    first one saved) fit in half the memory still free on `device`. One part always does: the
    step holds as much."""
    return parts <= 1 or part_bytes * (parts - 1) <= free_bytes(device) // 2


def free_bytes(device) -> int:
    """Memory still free for tensors on `device`: CUDA's free memory and its cache's unused
    share; elsewhere the host's MemAvailable (0, keep nothing, where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def inverse_root_preconditioner(opt, params) -> torch.Tensor | None:
    """P^-1/2 (flat float64) of the update from theta_n, from the optimizer's state and the
    gradient in `.grad` (the module doc); None for P = I."""
    group = opt.param_groups[0]
    if not isinstance(opt, (Adam, RMSProp)):
        return None
    rho, eps = group["rho"], group["eps"]
    parts = []
    for p in params:
        st, g = opt.state.get(p) or {}, p.grad.double()
        nu = rho * st["nu"].double() + (1 - rho) * g * g if "nu" in st else (1 - rho) * g * g
        n = st.get("step", 0)
        if isinstance(opt, Adam) and group["bias_correction"]:
            nu = nu / (1 - rho ** (n + 1))
        denom = (nu + eps).sqrt() if group["eps_inside"] else nu.sqrt() + eps
        parts.append(denom.rsqrt().reshape(-1))
    return torch.cat(parts)


def lanczos_top(op, v0: torch.Tensor, iters: int, tol: float) -> tuple[float, torch.Tensor, int, float]:
    """(lambda_1, its Ritz vector, products used, relative residual) of the symmetric operator
    `op` on flat float64 vectors: Lanczos from v0 with full reorthogonalisation, stopped when the
    top Ritz pair's residual is at most tol |lambda_1| or after `iters` products."""
    basis = torch.empty(iters, v0.numel(), dtype=torch.float64, device=v0.device)  # q_1 .. q_k, one row each
    basis[0] = v0 / v0.norm()
    alphas, betas = [], []
    for k in range(1, iters + 1):  # k vectors q_1 .. q_k in the basis
        q = basis[k - 1]
        w = op(q)
        alphas.append(float(w @ q))
        w = torch.sub(w, q, alpha=alphas[-1])  # the three-term recurrence (a copy: op's result may be its input)
        if betas:
            w.add_(basis[k - 2], alpha=-betas[-1])
        norm = float(w.norm())
        for _ in range(2):  # reorthogonalise against q_1 .. q_k; again only if that cancelled (DGKS, 1/sqrt 2)
            w.addmv_(basis[:k].T, basis[:k] @ w, alpha=-1)
            beta = float(w.norm())
            if beta > norm / math.sqrt(2):
                break
            norm = beta
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        theta, s = float(evals[-1]), evecs[:, -1]
        resid = abs(beta * float(s[-1])) / max(abs(theta), 1e-300)
        if resid <= tol or beta <= 1e-14 * max(abs(theta), 1e-300) or k == iters:  # converged, invariant, budget
            break
        betas.append(beta)
        basis[k] = w / beta
    y = torch.mv(basis[:k].T, s.to(v0.device))
    return theta, y / y.norm(), k, resid


class Sharpness:
    """The two metrics of one run, every `every` steps, each warm-started from the last records'
    top Ritz vectors (`start`)."""

    def __init__(self, every: int, iters: int, tol: float, seed: int):
        self.every, self.iters, self.tol, self.seed = every, iters, tol, seed
        self.top: dict = {}  # name -> the last two records' top Ritz vectors, the older first

    def due(self, n: int) -> bool:
        return n % self.every == 0

    def start(self, name: str, dim: int, device) -> torch.Tensor:
        """Lanczos' first vector: the eigenvector's drift between the last two records continued
        one record on (2 y_new - y_old, y_old's arbitrary sign taken nearer y_new); the last
        record's vector after one record; a fixed random vector at the first."""
        seen = [v for v in self.top.get(name, []) if v.numel() == dim]
        if len(seen) == 2:
            old, new = seen
            return 2 * new - (old if float(old @ new) >= 0 else -old)
        if seen:
            return seen[-1]
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(dim, generator=gen, dtype=torch.float64).to(device)

    def measure(self, model, data, parts, params, opt, autocast, ranks, graphs: StepGraphs | None = None) -> dict:
        """The columns of this record (module doc), on the step's `graphs` where it kept them;
        BatchNorm's running statistics as they were."""
        bns = bn_layers(model)
        saved = bn_state(bns)
        try:
            hvp = hvp_operator(model, data.x_train, data.y_train, data.objective, parts, params, autocast, ranks,
                               graphs)
            dim, device = sum(p.numel() for p in params), params[0].device
            out = self._one("sharpness", hvp, dim, device)
            d = inverse_root_preconditioner(opt, params)
            if d is None:
                out.update({f"pre_{k}": v for k, v in out.items()})
            else:
                out.update(self._one("pre_sharpness", lambda v: d * hvp(d * v), dim, device))
        finally:
            bn_load(bns, saved)
        return out

    def _one(self, name: str, op, dim: int, device) -> dict:
        theta, y, used, resid = lanczos_top(op, self.start(name, dim, device), self.iters, self.tol)
        self.top[name] = self.top.get(name, [])[-1:] + [y]
        value = theta if resid <= self.tol else None  # not converged: flagged by its residual, no value
        return {name: value, f"{name}_iters": used, f"{name}_resid": resid}
