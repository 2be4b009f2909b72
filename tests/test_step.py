"""The full-batch step: exact accumulated gradients, norms, BatchNorm statistics at theta_n."""

import math

import pytest
import torch
from torch import nn

from models import build_model
from pipeline.engine.step import accumulate_gradient, bn_layers, evaluate, grad_norms, partition, start_bn_gathering


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("mb", [25, 30, 7, 100, 1000])  # divides N=100 or not; one chunk; > N
def test_accumulated_gradient_equals_whole_batch(name, mb):
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    cfg = OmegaConf.create(dict(name=name, norm="none", width=8, depth=2, activation="tanh"))
    model = build_model(cfg, 10, (3, 8, 8)).double()
    x = torch.randn(100, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (100,))
    nn.functional.cross_entropy(model(x), y).backward()  # reference: the whole set at once
    ref = _flat_grad(model).clone()
    model.zero_grad()
    parts = partition(100, mb)
    assert sum(len(range(100)[p]) for p in parts) == 100  # nothing dropped
    loss, _ = accumulate_gradient(model, x, y, "classification", parts)
    g = _flat_grad(model)
    assert (g - ref).norm() / ref.norm() < 1e-12  # float64: exact up to rounding
    assert math.isclose(loss.item(), nn.functional.cross_entropy(model(x), y).item(), rel_tol=1e-12)


def test_accumulated_gradient_float32_within_1e5():
    torch.manual_seed(1)
    from omegaconf import OmegaConf

    model = build_model(OmegaConf.create(dict(name="cnn", norm="none", width=8)), 10, (3, 16, 16))
    x, y = torch.randn(90, 3, 16, 16), torch.randint(0, 10, (90,))
    nn.functional.cross_entropy(model(x), y).backward()
    ref = _flat_grad(model).clone()
    model.zero_grad()
    accumulate_gradient(model, x, y, "classification", partition(90, 32))
    assert ((_flat_grad(model) - ref).norm() / ref.norm()).item() < 1e-5


def test_reshuffled_partition_covers_everything_once():
    g = torch.Generator().manual_seed(0)
    parts = partition(103, 10, g)
    idx = torch.cat(parts).sort().values
    assert torch.equal(idx, torch.arange(103))
    assert not torch.equal(torch.cat(parts), torch.arange(103))


def test_grad_norms_match_definition():
    g = [torch.randn(3, 4), torch.randn(5)]
    eps = 1e-3
    flat = torch.cat([t.flatten() for t in g]).double()
    pert, l1, l2 = grad_norms(g, eps).tolist()
    assert math.isclose(pert, sum(math.sqrt(v * v + eps) for v in flat.tolist()), rel_tol=1e-14)
    assert math.isclose(l1, flat.abs().sum().item(), rel_tol=1e-14)
    assert math.isclose(l2, flat.norm().item(), rel_tol=1e-14)


def test_bn_eval_uses_statistics_of_theta_n():
    """After a gradient pass, eval-mode BN normalises with the population statistics of this
    pass (the micro-batch average), not with stale running averages."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, affine=False)
    model = nn.Sequential(bn)
    x = torch.randn(64, 3) * 5 + 2
    bn.running_mean.fill_(100.0)  # stale
    start_bn_gathering(bn_layers(model))
    parts = partition(64, 16)
    for idx in parts:
        model(x[idx])
    mb_means = torch.stack([x[idx].mean(0) for idx in parts]).mean(0)
    assert torch.allclose(bn.running_mean, mb_means, atol=1e-6)
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)  # equal-size parts


def test_ghost_bn_normalises_per_micro_batch():
    """BN in the full-batch step normalises over each micro-batch (ghost batch norm): the
    accumulated gradient differs from the one-batch gradient, and equals the sum of the
    per-micro-batch gradients."""
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = build_model(OmegaConf.create(dict(name="cnn", norm="bn", width=4)), 10, (3, 8, 8))
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    accumulate_gradient(model, x, y, "classification", partition(64, 16))
    ghost = _flat_grad(model).clone()
    model.zero_grad()
    per = torch.zeros_like(ghost)
    for i in range(0, 64, 16):
        model.zero_grad()
        (nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16], reduction="sum") / 64).backward()
        per += _flat_grad(model)
    assert torch.allclose(ghost, per, atol=1e-6)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert (_flat_grad(model) - ghost).norm() > 1e-4


def test_evaluate_accuracy():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    loss, acc = evaluate(model, x, y, "classification", micro_batch=3)
    assert acc == 0.75
    assert math.isclose(loss, nn.functional.cross_entropy(model(x), y).item(), rel_tol=1e-6)
