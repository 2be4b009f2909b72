"""The training loop of a pack: K runs that differ only in h, beta, rho, eps and theta_0 (pipeline/config/pack.py)
stepped together in one process, their parameters stacked (engine/stack.py). Each point is
written exactly as its own run would be (engine/loop.py, whose row, judging and record helpers
it uses): its metrics.csv rows, checkpoints (the unpacked form: TrainState.state_dict), status.json,
wandb run and train.log lines, every write fenced by its own lease.

    for each tick, every point still going at its own step n:
        grad E(theta_n) of every point (one vmapped pass per micro-batch), metrics (one host sync)
        each point judged (thresholds, divergence), the test set where a point needs it
        each point's row; a point that ends (diverged, stop_loss, max_steps) or whose lease was
        taken over leaves the stacks, the others go on
        theta_n -> theta_{n+1} for the rest, a point's checkpoint every checkpoint_every steps
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from .. import faults
from ..errors import LeaseLost
from ..runs.history import METRIC_COLUMNS
from ..runs.rundir import RunDir
from ..runs.state import REQUIRED, TrainState
from . import preempt
from .dist import Ranks
from .loop import _finish, _initial_loss, _judge, _open_record, _write_row, build, largest_that_fits, metrics_row, plain
from .optim import build_optimizer
from .progress import Progress
from .stack import Stack
from .step import partition

log = logging.getLogger("pipeline.train")
ONE = Ranks()


@dataclass
class Point:
    """One run of the pack: its config, directory, lease and record, and its counters."""

    index: int  # its place in the pack (the caller's list)
    cfg: object
    run: RunDir
    owner: object
    state: TrainState
    writer: object = None
    logger: object = None
    progress: object = None
    saved: set = field(default_factory=set)
    t0: float = 0.0
    row: dict | None = None
    newly: list = field(default_factory=list)
    done: str | None = None  # why it leaves the pack: completed, diverged, fenced
    eps: float = 0.0  # its optim.eps (read every step: not through OmegaConf)
    evaluate: bool = False  # this tick: the test set at its theta_n

    @property
    def tag(self) -> dict:
        return {"run_id": self.run.id}  # its log lines go to its own train.log only


def pack_loop(cfgs, runs: list[RunDir], data, device, autocast, owners, outcomes: dict) -> dict:
    """Train the pack; `outcomes[index]` = (state, error) of each point as it ends (the caller
    marks the others after an exception)."""
    cfg, tc = cfgs[0], plain(cfgs[0].train)
    model, _, _ = build(cfg, data, device)  # the template: the pack's shared theta_0
    stack = Stack(model, [c.optim for c in cfgs], data.objective)
    mb = _micro_batch(cfg, stack, data, autocast)
    n_params = sum(p[0].numel() for p in stack.params)
    record = n_params <= tc.record_params
    columns = METRIC_COLUMNS + [f"theta_{i}" for i in range(n_params * record)]
    thresholds = sorted(float(t) for t in tc.loss_thresholds)
    log.info("pack of %d runs (%s): stacked and trained together", len(cfgs), " ".join(r.id for r in runs))
    points = [_open_point(k, c, run, owner, stack, model, device, columns, cfg, data)
              for k, (c, run, owner) in enumerate(zip(cfgs, runs, owners))]

    def checkpoint(pt: Point, slot: int, step: int) -> None:
        pt.state.step = step
        pt.state.optimizer = stack.out_of_slot(slot, model, pt.cfg.optim)  # the unpacked run's form
        pt.writer.sync()  # the rows before `step` are durable before a checkpoint says they exist
        pt.run.save_checkpoint(pt.state.state_dict(time.perf_counter() - pt.t0))
        pt.run.write_status(step=step)
        pt.saved.add(step)

    parts = partition(data.x_train.shape[0], mb, None, device)  # fixed: a pack has no reshuffle
    active = points
    with preempt.guard() as preemption, _finish_on_error(lambda: active):
        while active:
            faults.point("step", min(pt.state.step for pt in active))
            # -- a point whose lease was taken over leaves at once, writing nothing more --
            for pt in active:
                if pt.owner is not None and pt.owner.lost:
                    _fenced(pt, pt.owner.lost_error(), outcomes)
            if preemption.signalled():
                _hand_over(active, checkpoint, preemption, outcomes)
            active = _narrow(stack, active)
            if not active:
                break
            # -- step: grad E(theta_n) of every point, the metrics at theta_n, one host sync --
            loss, correct = stack.gradients(data.x_train, data.y_train, parts, autocast)
            metrics = [loss[:, None], correct.double()[:, None], stack.grad_norms()]
            metrics += [stack.theta().double()] if record else []
            host = torch.cat(metrics, 1).tolist()  # host sync: every point's metrics at its theta_n
            # -- each point judged; the test set at theta_n where a point needs it --
            for pt, h in zip(active, host):
                values = dict(loss=h[0], correct=h[1], pert_norm=h[2], l1_norm=h[3], l2_norm=h[4], theta=h[5:])
                pt.row = metrics_row(pt.state.step, values, data, n_params, pt.eps)
                finite, pt.newly, diverged = _judge(pt.state, pt.row, thresholds, tc)
                pt.done = "diverged" if diverged else None
                n = pt.state.step
                pt.evaluate = finite and (n % tc.eval_every == 0 or bool(pt.newly) or n == tc.max_steps)
            if any(pt.evaluate for pt in active):
                test_loss, test_acc = stack.evaluate(data.x_test, data.y_test, mb, autocast)
                for pt, tl, ta in zip(active, test_loss, test_acc):
                    if pt.evaluate:
                        pt.row["test_loss"], pt.row["test_acc"] = tl, ta if data.task == "classification" else None
            # -- each point's row; the points that end leave the stacks --
            for slot, pt in enumerate(active):
                _record(pt, slot, tc, outcomes, checkpoint)
            active = _narrow(stack, active)
            # -- update theta_n -> theta_{n+1}; a point's checkpoint every checkpoint_every steps --
            if active:
                stack.step()
            for slot, pt in enumerate(active):
                pt.state.step += 1
                if pt.state.step % tc.checkpoint_every == 0:
                    _fenced_ok(pt, outcomes, lambda pt=pt, slot=slot: checkpoint(pt, slot, pt.state.step))
    return outcomes


def _open_point(k: int, cfg, run: RunDir, owner, stack: Stack, model, device, columns, template, data) -> Point:
    """Point k of the pack, resumed from its own (unpacked-form) checkpoint when it has one, else
    from its own theta_0 (a repeat of another seed than the `template` config's), its metrics.csv
    open from its step on, its mirror and progress line."""
    pt = Point(k, cfg, run, owner, TrainState(model, build_optimizer(model.parameters(), cfg.optim), device))
    ck = run.load_checkpoint(map_location=device, required=REQUIRED)
    if ck is None and _own_theta0(cfg, template):  # a repeat: its own seed or one-ulp perturbation
        own, _, _ = build(cfg, data, device)
        stack.into_slot(k, own, build_optimizer(own.parameters(), cfg.optim), 0)
    if ck is not None:
        pt.state.load_state_dict(ck, lambda: _initial_loss(run))
        stack.into_slot(k, model, pt.state.optimizer, pt.state.step)
        pt.saved.add(pt.state.step)
        log.info("run %s: resuming at step %d", run.id, pt.state.step, extra=pt.tag)
    pt.writer, pt.logger = _open_record(cfg, run, ONE, pt.state.step, columns)
    tc = cfg.train
    mode = "log" if tc.progress in ("auto", "bar") else tc.progress  # one bar per run would garble a terminal
    pt.progress = Progress(mode, pt.state.step, tc.max_steps + 1, tc.log_every, run.id, extra=pt.tag)
    pt.t0, pt.eps = time.perf_counter() - pt.state.time_s, float(cfg.optim.eps)
    return pt


def _own_theta0(cfg, template) -> bool:
    """Whether point `cfg` starts from another theta_0 than the pack's template (`build` of the
    first config): another seed or another one-ulp perturbation."""
    return (cfg.seed, cfg.train.get("perturb_theta0")) != (template.seed, template.train.get("perturb_theta0"))


def _record(pt: Point, slot: int, tc, outcomes: dict, checkpoint) -> None:
    """Point `pt`'s row of this tick (metrics.csv first, then its mirror and progress line); when
    it ends here (diverged, the last step, below stop_loss): its checkpoint, status and mirror."""
    row, n = pt.row, pt.state.step
    row["time_s"] = time.perf_counter() - pt.t0

    def write():
        _write_row(row, pt.newly, pt.writer, pt.run, ONE, pt.logger, pt.progress)
        if pt.done or n == tc.max_steps or (tc.stop_loss is not None and row["loss"] < tc.stop_loss):
            outcome = pt.done or "completed"
            if n not in pt.saved:
                checkpoint(pt, slot, n)
            _finish(outcome, n, row, pt.run, ONE, pt.writer, pt.progress, pt.logger)
            pt.done = outcome
            outcomes[pt.index] = (outcome, None)

    _fenced_ok(pt, outcomes, write)


def _fenced_ok(pt: Point, outcomes: dict, write) -> None:
    """Run a write of point `pt`; if its lease was taken over meanwhile the point leaves the pack."""
    try:
        write()
    except LeaseLost as e:
        _fenced(pt, e, outcomes)


def _fenced(pt: Point, e: LeaseLost, outcomes: dict) -> None:
    """The run is another process's now: this one writes nothing more to it (its mirror abandoned)."""
    pt.progress.close()
    pt.logger.abandon()
    pt.done = "fenced"
    outcomes[pt.index] = ("fenced", f"{e}; this process stopped without writing to it")


def _narrow(stack: Stack, active: list[Point]) -> list[Point]:
    """The points still going; the stacks narrowed to them when some left."""
    going = [slot for slot, pt in enumerate(active) if not pt.done]
    if len(going) < len(active):
        stack.keep(going)
    return [active[slot] for slot in going]


def _hand_over(active: list[Point], checkpoint, preemption, outcomes: dict) -> None:
    """A preemption signal: every point's checkpoint of theta_n, its run pending; then hand over."""
    def stop(pt, slot):
        n = pt.state.step
        if n not in pt.saved:
            checkpoint(pt, slot, n)
        pt.writer.close()
        pt.run.write_status(state="pending", step=n)
        pt.progress.close()
        pt.logger.finish("pending")
        pt.done = "pending"

    for slot, pt in enumerate(active):
        if not pt.done:
            _fenced_ok(pt, outcomes, lambda pt=pt, slot=slot: stop(pt, slot))
    preemption.hand_over(min(pt.state.step for pt in active), True)


@contextlib.contextmanager
def _finish_on_error(still_active):
    """A crash or an interruption still closes the points' wandb runs (failed / pending)."""
    try:
        yield
    except BaseException as e:  # a crash: failed; preemption, Ctrl-C, kill: pending (resumable)
        for pt in still_active():
            if not pt.done:
                pt.progress.close()
                pt.logger.finish("failed" if isinstance(e, Exception) else "pending")
        raise


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

