"""Model architectures: CIFAR ResNet layout and parameter counts, norm choices."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from models import build_model
from models.resnet import Bottleneck


def build(name, norm="bn", classes=10, **kw):
    return build_model(OmegaConf.create(dict(name=name, norm=norm, width=64, **kw)), classes, (3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("resnet18", 11_173_962), ("resnet50", 23_520_842),
                                         ("resnet101", 42_512_970)])
def test_cifar_resnet_parameter_counts(name, params):
    # known counts of the CIFAR ResNets (3x3 stem, 10 classes)
    assert sum(p.numel() for p in build(name).parameters()) == params


@pytest.mark.slow
def test_resnet_stem_and_bottleneck_stride():
    m = build("resnet50")
    conv = m.stem[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    down = [b for b in m.modules() if isinstance(b, Bottleneck) and b.conv2.stride == (2, 2)]
    assert len(down) == 3 and all(b.conv1.stride == (1, 1) for b in down)
    out = build("resnet18")(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    conv = build("resnet18").layers[4].conv1  # 128 -> 256 channels, 3x3
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.05


@pytest.mark.parametrize("norm,cls", [("bn", nn.BatchNorm2d), ("gn", nn.GroupNorm)])
def test_norm_choice(norm, cls):
    m = build("resnet18", norm=norm)
    assert any(isinstance(x, cls) for x in m.modules())
    none = build("resnet18", norm="none")
    assert not any(isinstance(x, (nn.BatchNorm2d, nn.GroupNorm)) for x in none.modules())


def test_bilinear_model_is_the_paper_loss():
    m = build_model(OmegaConf.create(dict(name="bilinear", theta0=[2.8, 3.5])), 0, (1,))
    x, y = torch.tensor([[2.0]]), torch.tensor([[1.5]])
    loss = 0.5 * (y - m(x)).pow(2).sum()
    loss.backward()
    t1, t2 = 2.8, 3.5
    r = 1.5 - t1 * t2 * 2
    assert abs(loss.item() - 0.5 * r * r) < 1e-4
    assert torch.allclose(m.theta.grad, torch.tensor([-r * t2 * 2, -r * t1 * 2]), rtol=1e-5)
