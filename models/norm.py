"""Normalisation layers selectable from config: `bn` | `gn` | `none`.

`bn` is plain BatchNorm applied to each micro-batch of the full-batch step, i.e. ghost batch
norm over the micro-batch partition (as in the paper's runs); see `pipeline.step` for how its
population statistics at theta_n are gathered for evaluation.
"""

from torch import nn

NORMS = ("bn", "gn", "none")


def norm2d(kind: str, channels: int, groups: int = 32) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm={kind!r}: allowed values are {NORMS}")
