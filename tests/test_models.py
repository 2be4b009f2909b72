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


def test_the_authors_cnn_has_their_layers_and_parameter_count():
    """Their script's `cnn` (train_on_real_datasets.py): Conv(3,32) Conv(32,32) pool Conv(32,64)
    Conv(64,64) pool Conv(64,128) Conv(128,128) pool Linear(2048,512) Linear(512,10), counted by
    hand; and, built from the same seed in the same layer order, the same theta_0 as theirs."""
    convs = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128)]
    by_hand = sum(a * b * 9 + b for a, b in convs) + (2048 * 512 + 512) + (512 * 10 + 10)
    assert by_hand == 1_341_226
    m = build_model(OmegaConf.create(dict(name="authors_cnn")), 10, (3, 32, 32))
    assert sum(p.numel() for p in m.parameters()) == by_hand
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.manual_seed(0)
    ours = build_model(OmegaConf.create(dict(name="authors_cnn")), 10, (3, 32, 32))
    torch.manual_seed(0)
    theirs = nn.Sequential(  # their listing, transcribed
        nn.Conv2d(3, 32, 3, padding="same"), nn.ReLU(), nn.Conv2d(32, 32, 3, padding="same"), nn.ReLU(),
        nn.MaxPool2d(2, 2), nn.Conv2d(32, 64, 3, padding="same"), nn.ReLU(), nn.Conv2d(64, 64, 3, padding="same"),
        nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(64, 128, 3, padding="same"), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
        nn.Linear(128 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, 10))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x))
    digits = build_model(OmegaConf.create(dict(name="authors_cnn")), 10, (1, 8, 8))  # 8x8 -> 1x1
    assert digits(torch.randn(2, 1, 8, 8)).shape == (2, 10)
