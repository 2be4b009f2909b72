"""A pack: the loop of engine/loop.py over K runs that differ only in h, beta, rho, eps and
theta_0 (pipeline/config/pack.py), stepped together in one process, their parameters stacked
(engine/stack.py). Each point is written exactly as its own run would be: its metrics.csv rows,
checkpoints (the unpacked form: TrainState.state_dict), status.json, wandb run and train.log
lines, every write fenced by its own lease. A point that ends (diverged, stop_loss, max_steps)
or whose lease was taken over leaves the stacks; the others go on.
"""

from __future__ import annotations

import logging

import torch

from ..runs.history import METRIC_COLUMNS
from ..runs.rundir import RunDir
from ..runs.state import TrainState
from .dist import Ranks
from .loop import open_point, train_points
from .optim import build_optimizer
from .setup import build, largest_that_fits, plain
from .stack import Stack
from .step import partition

log = logging.getLogger("pipeline.train")
ONE = Ranks()


def pack_loop(cfgs, runs: list[RunDir], data, device, autocast, owners, outcomes: dict) -> dict:
    """Train the pack; `outcomes[index]` = (state, error) of each point as it ends (the caller
    marks the others after an exception)."""
    cfg, tc = cfgs[0], plain(cfgs[0].train)
    model, _, _ = build(cfg, data, device)  # the template: the pack's shared theta_0
    backend = Packed(Stack(model, [c.optim for c in cfgs], data.objective), cfg, data, autocast)
    log.info("pack of %d runs (%s): stacked and trained together", len(cfgs), " ".join(r.id for r in runs))
    mode = "log" if tc.progress in ("auto", "bar") else tc.progress  # one bar per run would garble a terminal

    def into_slot(pt, resumed: bool) -> None:
        if resumed:  # its own (unpacked-form) checkpoint
            backend.stack.into_slot(pt.index, model, pt.state.optimizer, pt.state.step)
        elif _own_theta0(pt.cfg, cfg):  # a repeat: its own seed or one-ulp perturbation
            own, _, _ = build(pt.cfg, data, device)
            backend.stack.into_slot(pt.index, own, build_optimizer(own.parameters(), pt.cfg.optim), 0)

    points = [open_point(k, c, run, owner, TrainState(model, build_optimizer(model.parameters(), c.optim), device),
                         ONE, backend.columns, mode, into_slot)
              for k, (c, run, owner) in enumerate(zip(cfgs, runs, owners))]
    train_points(backend, points, tc, outcomes)
    return outcomes


def _own_theta0(cfg, template) -> bool:
    """Whether point `cfg` starts from another theta_0 than the pack's template (`build` of the
    first config): another seed or another one-ulp perturbation."""
    return (cfg.seed, cfg.train.get("perturb_theta0")) != (template.seed, template.train.get("perturb_theta0"))


class Packed:
    """The backend of K stacked points in one process: one vmapped pass per micro-batch."""

    ranks = ONE

    def __init__(self, stack: Stack, cfg, data, autocast):
        self.stack, self.data, self.autocast = stack, data, autocast
        self.mb = _micro_batch(cfg, stack, data, autocast)
        self.n_params = sum(p[0].numel() for p in stack.params)
        self.record = self.n_params <= cfg.train.record_params
        self.columns = METRIC_COLUMNS + [f"theta_{i}" for i in range(self.n_params * self.record)]
        self.parts = partition(data.x_train.shape[0], self.mb, None, data.x_train.device)  # a pack never reshuffles

    def step(self, flags: list) -> tuple[list[dict], list]:
        loss, correct = self.stack.gradients(self.data.x_train, self.data.y_train, self.parts, self.autocast)
        metrics = [loss[:, None], correct.double()[:, None], self.stack.grad_norms()]
        metrics += [self.stack.theta().double()] if self.record else []
        host = torch.cat(metrics, 1).tolist()  # host sync: every point's metrics at its theta_n
        return [dict(loss=h[0], correct=h[1], pert_norm=h[2], l1_norm=h[3], l2_norm=h[4], theta=h[5:])
                for h in host], flags

    def evaluate(self, want: list[bool]) -> list:
        test_loss, test_acc = self.stack.evaluate(self.data.x_test, self.data.y_test, self.mb, self.autocast)
        classification = self.data.task == "classification"
        return [(tl, ta if classification else None) if w else None for w, tl, ta in zip(want, test_loss, test_acc)]

    def update(self) -> None:
        self.stack.step()

    def keep(self, slots: list[int]) -> None:
        self.stack.keep(slots)

    def export(self, slot: int, pt) -> None:
        pt.state.optimizer = self.stack.out_of_slot(slot, pt.state.model, pt.cfg.optim)  # the unpacked run's form

    def discard(self) -> None:
        pass  # the stacked passes change nothing but the gradients


def _micro_batch(cfg, stack: Stack, data, autocast) -> int:
    """`train.micro_batch`; for `auto` on CUDA the largest multiple that fits with all K points
    (a probe of the stacked forward and backward), elsewhere about 256 examples."""
    mb = cfg.train.micro_batch
    if mb != "auto":
        return mb
    n = data.x_train.shape[0]
    if data.x_train.device.type != "cuda":
        return min(n, 256)

    def attempt(size):
        try:
            stack.gradients(data.x_train[:size], data.y_train[:size], [slice(0, size)], autocast)
            torch.cuda.synchronize()
        finally:
            for p in stack.params:
                p.grad = None
            torch.cuda.empty_cache()

    mb = largest_that_fits(n, 1, attempt)
    log.info("train.micro_batch=auto: %d examples per forward/backward of the pack's %d points", mb, stack.k)
    return mb
