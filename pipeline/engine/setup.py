"""What a run is built from: the model, the optimizer and the forward (`build`, with theta_0's
one-ulp perturbation), the micro-batch size of `train.micro_batch=auto`, and a config group as
plain attributes for the loop."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from models import build_model

from ..ghost import micro_batch_unit
from .losses import from_config
from .optim import build_optimizer
from .step import bn_layers, bn_load, bn_state

log = logging.getLogger("pipeline.train")


def build(cfg, data, device):
    """(model, the forward used by the loop, optimizer), with `data` moved to the same dtype
    and memory format as the model."""
    data.objective = from_config(cfg.train.get("loss"), data.task)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.input_shape).to(device)
    if cfg.precision == "fp64":  # exact arithmetic for small models (the bilinear toy)
        model = model.double()
        data.x_train, data.x_test = data.x_train.double(), data.x_test.double()
        if data.task == "regression":
            data.y_train, data.y_test = data.y_train.double(), data.y_test.double()
    if cfg.train.get("perturb_theta0") is not None:
        perturb_one_ulp(model.parameters(), cfg.train.perturb_theta0)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        data.x_train = data.x_train.contiguous(memory_format=torch.channels_last)
        data.x_test = data.x_test.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), cfg.optim)
    fwd = torch.compile(model) if cfg.compile else model
    return model, fwd, opt


@torch.no_grad()
def perturb_one_ulp(params, seed: int) -> None:
    """Move every coordinate of theta_0 to its neighbour in its own dtype (`torch.nextafter`):
    up or down with probability 1/2, the signs drawn on the CPU with `seed`, so the same on
    every device. A perturbation at the level of rounding (one ulp: 6e-8 relative in fp32) that
    is defined for any model and any number of ranks, unlike a change of summation order."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        up = torch.rand(p.shape, generator=gen, dtype=torch.float64) < 0.5
        toward = torch.where(up, math.inf, -math.inf).to(device=p.device, dtype=p.dtype)
        p.copy_(torch.nextafter(p, toward))


def micro_batch(cfg, fwd, data, params, ranks, autocast) -> int:
    """`train.micro_batch`, or for `auto` the largest multiple of the BatchNorm group that fits:
    on CUDA a probe (one micro-batch's forward and backward, halved on out-of-memory, the
    smallest over the ranks), elsewhere about 256 examples."""
    mb = cfg.train.micro_batch
    if mb != "auto":
        return mb
    group = micro_batch_unit(cfg.model)
    share = -(-data.x_train.shape[0] // ranks.world)
    mb = -(-share // group) * group  # this rank's share of the examples, in whole groups
    if data.x_train.device.type != "cuda":
        return min(mb, max(group, 256 // group * group))

    def attempt(size):  # one micro-batch's forward and backward: the peak memory of a step
        try:
            saved = bn_state(bn_layers(fwd))  # the probe's forward must not move the running averages
            with autocast():
                out = fwd(data.x_train[:size])
            data.objective(out, data.y_train[:size]).backward()
            torch.cuda.synchronize()
        finally:
            bn_load(bn_layers(fwd), saved)
            for p in params:
                p.grad = None
            out = None
            torch.cuda.empty_cache()

    mb = ranks.min(largest_that_fits(mb, group, attempt))
    log.info("train.micro_batch=auto: %d examples per forward/backward (%d per BatchNorm group)", mb, group)
    return mb


def largest_that_fits(size: int, group: int, attempt) -> int:
    """`size`, halved (in whole groups) until `attempt(size)` runs without running out of memory."""
    while True:
        try:
            attempt(size)
            return size
        except torch.OutOfMemoryError:
            if size <= group:
                raise
            size = max(group, size // 2 // group * group)


def plain(node) -> SimpleNamespace:
    """A config group as plain attributes: read every step, an OmegaConf lookup costs ~50 us."""
    return SimpleNamespace(**OmegaConf.to_container(node, resolve=True))
