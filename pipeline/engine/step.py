"""One full-batch step: the exact gradient of E(theta) = (1/N) sum_i l_i over ALL N training
examples, accumulated over a partition into micro-batches, and the metrics at theta_n.

The step itself never synchronises with the host: losses, counts and norms stay on the device as
tensors, and the caller reads them all with one labelled `.tolist()` per step
(`to_host`, below); `evaluate` has the test pass's own, labelled. With W ranks
(pipeline/engine/dist.py) each takes its share of the micro-batches and the sums are added across
ranks in one call: the gradients with the BatchNorm statistics in one all-reduce, the scalars
(loss, count, and the loop's stop flags) in the other (float64).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .dist import Ranks
from .losses import objective

ONE = Ranks()  # the one-process run


def partition(n: int, micro_batch: int, generator: torch.Generator | None = None,
              device="cpu"):
    """Index slices of a partition of range(n) into micro-batches of `micro_batch` (the last
    may be smaller). With a generator the order is redrawn (the `reshuffle` option)."""
    if generator is None:
        return [slice(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]
    perm = torch.randperm(n, generator=generator).to(device)
    return [perm[i:i + micro_batch] for i in range(0, n, micro_batch)]


def bn_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def start_bn_gathering(bns) -> None:
    """Make BatchNorm's running statistics the average of this pass's group statistics
    (momentum=None is a cumulative average), so evaluation at theta_n uses statistics of
    theta_n rather than stale running averages."""
    for m in bns:
        m.reset_running_stats()
        m.momentum = None


def bn_state(bns) -> list[torch.Tensor]:
    """Copies of every BatchNorm layer's running mean, variance and count (on the device)."""
    return [t.clone() for m in bns for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def bn_load(bns, saved: list[torch.Tensor]) -> None:
    """Put `bn_state`'s copies back."""
    for i, m in enumerate(bns):
        for t, s in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved[3 * i:3 * i + 3]):
            t.copy_(s)


@contextlib.contextmanager
def bn_swapped(bns, saved: list[torch.Tensor]):
    """BatchNorm's running averages as in `saved` for the block, then as they were."""
    now = bn_state(bns)
    bn_load(bns, saved)
    try:
        yield
    finally:
        bn_load(bns, now)


def bn_weighted(bns) -> list[torch.Tensor]:
    """This rank's BatchNorm statistics weighted by its group counts, to be summed across ranks
    (in the step's one all-reduce) and divided by `bn_average`."""
    weighted = []
    for m in bns:
        k = m.num_batches_tracked.to(m.running_mean.dtype)
        weighted += [m.running_mean.mul_(k), m.running_var.mul_(k), k.reshape(1)]
    return weighted


def bn_average(bns, weighted: list[torch.Tensor]) -> None:
    """The cumulative averages of all ranks' groups: sum_r k_r m_r / sum_r k_r (k_r: groups
    that rank r normalised), for the running mean and variance alike."""
    for i, m in enumerate(bns):  # on the device: no host sync per layer
        k = weighted[3 * i + 2]
        m.running_mean.div_(k.clamp_min(1))
        m.running_var.div_(k.clamp_min(1))
        m.num_batches_tracked.copy_(k.round().reshape(()))


def accumulate_gradient(model, x, y, task, parts, autocast=contextlib.nullcontext, graphs=None):
    """Backward of sum_mb (sum_{i in mb} l_i) / N into `.grad`; returns on-device
    (loss at theta_n, number correct). On a sharpness record's step `graphs`
    (sharpness.StepGraphs) does each part's backward and keeps its graph for the record."""
    n, task = x.shape[0], objective(task)
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for idx in parts:
        xb, yb = x[idx], y[idx]
        with graphs.counting() if graphs is not None else contextlib.nullcontext():
            with autocast():
                out = model(xb)
            ls = task(out, yb)
            (ls / n).backward() if graphs is None else graphs.backward(ls / n)
        total += ls.detach()
        if task.classification:
            correct += (out.argmax(1) == yb).sum()
    return total / n, correct


def full_batch_step(model, x, y, task, parts, params, eps, bns=(), autocast=contextlib.nullcontext,
                    ranks=ONE, flags=(), graphs=None) -> dict[str, torch.Tensor]:
    """grad E(theta_n) into `.grad` and the on-device metrics at theta_n, by name: `loss`,
    `correct` (examples classified right), `pert_norm`, `l1_norm`, `l2_norm`. `parts` is the
    common partition; this rank computes its share of it. With W ranks the gradients, the
    BatchNorm statistics and the scalars are summed in one call (one all-reduce per dtype), and
    `flags` (this rank's stop flags) ride with the scalars: `stop_flags` is their sum. `graphs`:
    accumulate_gradient's."""
    for p in params:
        p.grad = (torch.zeros_like(p) if ranks.world > 1 else None) if p.grad is None else p.grad.zero_()
    start_bn_gathering(bns)
    loss, correct = accumulate_gradient(model, x, y, task, ranks.shard(parts), autocast, graphs)
    out = {}
    if ranks.world > 1:
        scalars = torch.cat([torch.stack([loss, correct.double()]),
                             torch.tensor([float(f) for f in flags], dtype=torch.float64, device=loss.device)])
        weighted = bn_weighted(bns)
        ranks.sum_([p.grad for p in params] + weighted + [scalars])
        bn_average(bns, weighted)
        loss, correct = scalars[0], scalars[1].long()
        if flags:
            out["stop_flags"] = scalars[2:]
    norms = grad_norms([p.grad for p in params], eps)
    return dict(loss=loss, correct=correct, pert_norm=norms[0], l1_norm=norms[1], l2_norm=norms[2], **out)


def to_host(metrics: dict) -> dict:
    """The one host synchronisation of a step: every named on-device metric (0-d, or 1-d for
    theta and the stop flags) copied in one transfer; floats, lists for the 1-d ones."""
    flat = torch.cat([t.reshape(-1).double() for t in metrics.values()]).tolist()  # host sync: the step's metrics
    out, i = {}, 0
    for name, t in metrics.items():
        out[name] = flat[i] if t.dim() == 0 else flat[i:i + t.numel()]
        i += t.numel()
    return out


@torch.no_grad()
def grad_norms(grads: list[torch.Tensor], eps: float) -> torch.Tensor:
    """[perturbed one-norm, one-norm, two-norm] of the gradient, in float64.

    Perturbed one-norm (Section 1, Notation): ||g||_{1,eps} = sum_i sqrt(g_i^2 + eps)."""
    g = [t.double() for t in grads]
    l1 = torch.stack(torch._foreach_norm(g, 1)).sum()
    l2 = torch.stack(torch._foreach_norm(g, 2)).square().sum().sqrt()
    sq = torch._foreach_mul(g, g)
    torch._foreach_add_(sq, eps)
    torch._foreach_sqrt_(sq)
    pert = torch.stack([s.sum() for s in sq]).sum()
    return torch.stack([pert, l1, l2])


@torch.no_grad()
def evaluate(model, x, y, task, micro_batch, autocast=contextlib.nullcontext, ranks=ONE):
    """(mean loss, accuracy) on a held-out set, in eval mode, each rank on its share of the
    micro-batches; returns host floats."""
    was_training, task = model.training, objective(task)
    model.eval()
    total = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for idx in ranks.shard(partition(x.shape[0], micro_batch)):
        with autocast():
            out = model(x[idx])
        total += task(out, y[idx])
        if task.classification:
            correct += (out.argmax(1) == y[idx]).sum()
    model.train(was_training)
    n = x.shape[0]
    sums = torch.stack([total, correct.double()])
    ranks.sum_([sums])
    loss, corr = sums.tolist()  # host sync: the test pass's loss and count (every eval_every steps)
    return loss / n, (corr / n if task.classification else float("nan"))
