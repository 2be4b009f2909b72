"""Normalisation layers selectable from config: `bn` | `gn` | `none`.

`bn` is ghost batch norm: BatchNorm over groups of `model.bn_group` consecutive examples of the
full-batch step's partition (the paper's authors normalised over groups of 500), whatever the
micro-batch that carries them (a multiple of the group: memory only); with `bn_group: null`
each micro-batch is one group. See `pipeline.engine.step` for how the population statistics at
theta_n are gathered for evaluation.
"""

import torch
from torch import nn

from pipeline.catalog import GN_GROUPS, NORMS


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over groups of `group` consecutive examples of its input in training mode
    (one group: exactly nn.BatchNorm2d). With momentum=None each group counts once in the
    running averages, as a micro-batch of that size would."""

    group: int | None = None

    def forward(self, x):
        if not self.training or self.group is None or x.shape[0] <= self.group:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm2d, self).forward(c) for c in x.split(self.group)])


def set_bn_group(model: nn.Module, group: int | None) -> None:
    for m in model.modules():
        if isinstance(m, GhostBatchNorm2d):
            m.group = group


def norm2d(kind: str, channels: int, groups: int = GN_GROUPS) -> nn.Module:
    if kind == "bn":
        return GhostBatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"model.norm={kind!r}: allowed values are {NORMS}")
