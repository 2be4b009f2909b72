"""The per-example loss l_i of E(theta) = (1/N) sum_i l_i, chosen by `train.loss`, in one place.

    ce     cross-entropy of the logits f(x_i) and the label y_i (classification; `auto`'s choice)
    mse    sum over classes of (f(x_i)_c - onehot(y_i)_c)^2: the authors' `--loss_type mse`,
           `nn.MSELoss(reduction='sum')` on one-hot targets, whose sum the script divides by N
    half_sq  1/2 (y_i - f(x_i))^2 (regression: data=bilinear, the single example of Section 6;
           `auto`'s choice there)
    {_target_: pkg.fn, ...}  a user's callable (pipeline/config/user_outputs.py): loss(out, y) returns
           the SUM over the micro-batch of the per-example losses, a 0-d tensor

An `Objective` is called on a micro-batch's output and targets and returns that sum; the step
divides by N (pipeline/engine/step.py). Reduced precision outputs (autocast) are cast to float32
first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..catalog import LOSSES  # noqa: F401 -- the names train.loss accepts, served here
from ..user_code import loss_function


@dataclass(frozen=True)
class Objective:
    name: str  # ce | mse | half_sq | the user's target
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    classification: bool  # labels y_i in [0, C): accuracy is counted

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.dtype in (torch.float16, torch.bfloat16):  # autocast: the loss in float32
            out = out.float()
        return self.fn(out, y)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _mse(out, y):
    """sum_i sum_c (f(x_i)_c - [y_i = c])^2, as MSELoss(reduction='sum')(out, one_hot(y))."""
    return F.mse_loss(out, F.one_hot(y, out.shape[1]).to(out.dtype), reduction="sum")


def _half_sq(out, y):
    return 0.5 * (y - out).pow(2).sum()


CE = Objective("ce", _ce, True)
MSE = Objective("mse", _mse, True)
HALF_SQ = Objective("half_sq", _half_sq, False)
BUILT_IN = (CE, MSE, HALF_SQ)


def objective(task) -> Objective:
    """`task` as an Objective: an Objective itself, or a task name ("classification":
    cross-entropy, "regression": 1/2 squared error), the losses of runs made before train.loss."""
    if isinstance(task, Objective):
        return task
    return CE if task == "classification" else HALF_SQ


def from_config(spec, task: str) -> Objective:
    """The Objective of `train.loss` (validated: pipeline/config/validate.py) for data of `task`."""
    if spec is None or spec == "auto":
        return objective(task)
    if spec == "ce":
        return CE
    if spec == "mse":
        return MSE
    return Objective(str(spec["_target_"]), loss_function(spec), task == "classification")
