"""Networks and the bilinear toy model, built from the `model` config group."""

import math

from torch import nn

from pipeline.catalog import MODELS

from .bilinear import Bilinear
from .custom import instantiate_model
from .norm import set_bn_group
from .resnet import DEPTHS, resnet
from .small import CNN, MLP, AuthorsCNN
from .vit import SimpleViT


def build_model(cfg, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """`cfg` is the `model` config group; `input_shape` excludes the batch dimension."""
    name = cfg.name
    if name in DEPTHS:
        model = resnet(name, num_classes=num_classes, norm=cfg.norm, width=cfg.width,
                       in_channels=input_shape[0])
        set_bn_group(model, cfg.get("bn_group"))
        return model
    if name == "cnn":
        model = CNN(num_classes, norm=cfg.norm, width=cfg.width, in_channels=input_shape[0])
        set_bn_group(model, cfg.get("bn_group"))
        return model
    if name == "authors_cnn":
        return AuthorsCNN(num_classes, in_channels=input_shape[0], image_size=tuple(input_shape[1:]))
    if name == "vit":
        return SimpleViT(num_classes, tuple(input_shape[1:]), patch_size=cfg.patch_size, dim=cfg.dim, depth=cfg.depth,
                         heads=cfg.heads, mlp_dim=cfg.mlp_dim, dim_head=cfg.dim_head, channels=input_shape[0])
    if name == "custom":  # your own (docs/custom.md): model._target_ and its keyword arguments
        return instantiate_model(cfg, num_classes, input_shape)
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, width=cfg.width, depth=cfg.depth,
                   activation=cfg.activation)
    if name == "bilinear":
        return Bilinear(tuple(cfg.theta0))
    raise ValueError(f"model={name!r}: allowed values are {MODELS}")
