"""Normalisation layers selectable from config: `bn` | `gn` | `none`.

`bn` is plain BatchNorm applied to each micro-batch of the full-batch step, i.e. ghost batch
norm over the micro-batch partition (as in the paper's runs); see `pipeline.step` for how its
population statistics at theta_n are gathered for evaluation.
"""

from torch import nn

NORMS = ("bn", "gn", "none")
GN_GROUPS = 32


def gn_groups_ok(model: str, width: int) -> bool:
    """GroupNorm(min(32, c), c) needs 32 | c wherever c >= 32: c runs over every layer's
    channel count (width * 2^stage, times 4 after a ResNet Bottleneck; the CNN has 3 stages)."""
    expansion = 4 if model in ("resnet50", "resnet101") else 1
    stages = 3 if model == "cnn" else 4
    channels = {width * 2**i * e for i in range(stages) for e in (1, expansion)}
    return all(c < GN_GROUPS or c % GN_GROUPS == 0 for c in channels)


def norm2d(kind: str, channels: int, groups: int = GN_GROUPS) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm={kind!r}: allowed values are {NORMS}")
