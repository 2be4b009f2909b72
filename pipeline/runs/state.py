"""The training state: everything a resume needs (as torchtune's recipe state). A checkpoint is
exactly `TrainState.state_dict()`; its keys are named here and nowhere else.

    model, optimizer   theta_n and Adam's m, v (Definition 2.1) at the step
    step               n: the next row to compute is theta_n's
    crossed            the loss thresholds crossed before n
    diverge            (the initial loss, consecutive steps above diverge_factor times it)
    time_s             training time spent before n (over all attempts)
    rng_cpu, rng_cuda  torch's generators; rng_shuffle the micro-batch partition's (reshuffle)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KEYS = ("model", "optimizer", "step", "crossed", "diverge", "time_s", "rng_cpu", "rng_cuda", "rng_shuffle")
REQUIRED = frozenset({"model", "optimizer", "step", "crossed", "rng_cpu"})  # older checkpoints lack the rest


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    shuffle: torch.Generator | None = None  # the partition's generator with train.reshuffle
    step: int = 0
    crossed: list[float] = field(default_factory=list)
    loss0: float = math.nan  # the divergence rule's initial loss ...
    above: int = 0           # ... and the consecutive steps above diverge_factor times it
    time_s: float = 0.0      # training time before this attempt

    def state_dict(self, time_s: float) -> dict:
        """The checkpoint of theta at `self.step`, `time_s` seconds of training in."""
        cuda = self.device.type == "cuda"
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), step=self.step,
                    crossed=list(self.crossed), diverge=(self.loss0, self.above), time_s=time_s,
                    rng_cpu=torch.get_rng_state(), rng_cuda=torch.cuda.get_rng_state_all() if cuda else [],
                    rng_shuffle=self.shuffle.get_state() if self.shuffle is not None else None)

    def load_state_dict(self, ck: dict, initial_loss=lambda: math.nan) -> None:
        """Resume from a checkpoint; one written before the divergence rule existed takes its
        initial loss from `initial_loss()` (metrics.csv's row 0)."""
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.step, self.crossed, self.time_s = ck["step"], list(ck["crossed"]), ck["time_s"]
        self.loss0, self.above = ck.get("diverge") or (initial_loss(), 0)
        torch.set_rng_state(ck["rng_cpu"])
        if self.device.type == "cuda" and ck.get("rng_cuda"):
            torch.cuda.set_rng_state_all(ck["rng_cuda"])
        if self.shuffle is not None:
            self.shuffle.set_state(ck["rng_shuffle"])
