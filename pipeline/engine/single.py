"""One run: the loop of engine/loop.py over a set of one point, computed on W ranks (each its
share of the micro-batches, one all-reduce per step: engine/step.py). The backend holds the
model, the optimizer and the test-time BatchNorm mode; pipeline/attempt.py takes the run's lease
and decides to start, resume or skip before `train_loop` is called.
"""

from __future__ import annotations

import contextlib

import torch

from ..runs.history import METRIC_COLUMNS
from ..runs.lease import Lease
from ..runs.rundir import RunDir
from ..runs.state import TrainState
from . import dist
from .loop import open_point, train_points
from .setup import build, micro_batch, plain
from .sharpness import COLUMNS as SHARPNESS_COLUMNS
from .sharpness import Sharpness, StepGraphs
from .step import bn_layers, bn_load, bn_state, bn_swapped, evaluate, full_batch_step, partition, to_host
from .theory_metrics import bias_term_norm


def train_loop(cfg, run: RunDir, data, device, autocast, owner: Lease | None, ranks: dist.Ranks) -> str:
    """Train the run of `cfg` in `run` (owned by this process) to its end; its state (completed,
    diverged). Raises LeaseLost when its lease was taken over, and on preemption (pending)."""
    tc = plain(cfg.train)
    model, fwd, opt = build(cfg, data, device)
    state = TrainState(model, opt, device, torch.Generator().manual_seed(cfg.seed) if tc.reshuffle else None)
    backend = Single(cfg, tc, model, fwd, opt, data, state, autocast, ranks)
    pt = open_point(0, cfg, run, owner, state, ranks, backend.columns, tc.progress)
    outcomes: dict = {}
    train_points(backend, [pt], tc, outcomes)
    if pt.error is not None:
        raise pt.error
    return outcomes[0][0]


class Single:
    """The backend of one point on `ranks`: its gradients, metrics, test pass and update."""

    def __init__(self, cfg, tc, model, fwd, opt, data, state: TrainState, autocast, ranks: dist.Ranks):
        self.cfg, self.fwd, self.opt, self.data, self.state = cfg, fwd, opt, data, state
        self.model, self.autocast, self.ranks = model, autocast, ranks
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_params, self.eps = sum(p.numel() for p in self.params), float(cfg.optim.eps)
        self.mb = micro_batch(cfg, fwd, data, self.params, ranks, autocast)
        self.record = self.n_params <= tc.record_params  # few-parameter models: theta_n itself
        self.sharpness = Sharpness(tc.sharpness_every, tc.sharpness_iters, tc.sharpness_tol, cfg.seed) \
            if tc.sharpness_every else None
        self.columns = (METRIC_COLUMNS + ["bias_norm"] * tc.bias_term + SHARPNESS_COLUMNS * bool(self.sharpness)
                        + [f"theta_{i}" for i in range(self.n_params * self.record)])
        bns = bn_layers(model)
        running = tc.eval_mode == "running_stats" and bool(bns)  # one process (pipeline/attempt.py checks)
        self.test_mode = RunningAverages(bns, tc.bias_term) if running else BatchStatistics(bns)

    def step(self, flags: list) -> tuple[list[dict], list]:
        data, ranks = self.data, self.ranks
        self.parts = partition(data.x_train.shape[0], self.mb, self.state.shuffle, self.state.device)
        self.test_mode.before_step()
        due = self.sharpness is not None and self.sharpness.due(self.state.step)
        graphs = StepGraphs(self.params, len(ranks.shard(self.parts))) if due and self.fwd is self.model else None
        metrics = full_batch_step(self.fwd, data.x_train, data.y_train, data.objective, self.parts, self.params,
                                  self.eps, self.test_mode.gathered, self.autocast, ranks,
                                  flags if ranks.world > 1 else (), graphs)
        with self.test_mode.extra_passes():
            metrics.update(self.optional_metrics())
        host = to_host(metrics)
        if due:  # Lanczos on the step's graphs (not a compiled model's): a host sync per product
            host.update(self.sharpness.measure(self.model, data, self.parts, self.params, self.opt, self.autocast,
                                               ranks, graphs))
        return [host], host.get("stop_flags", flags)

    def optional_metrics(self) -> dict:
        """On-device extras of the step: the bias term's norm (train.bias_term), theta_n itself
        (few-parameter models)."""
        out = {}
        if self.cfg.train.bias_term:
            out["bias_norm"] = bias_term_norm(self.model, self.data, self.cfg, self.parts, self.autocast, self.ranks)
        if self.record:
            out["theta"] = torch.cat([p.detach().flatten() for p in self.params])
        return out

    def evaluate(self, want: list[bool]) -> list:
        d = self.data

        def test():
            loss, acc = evaluate(self.fwd, d.x_test, d.y_test, d.objective, self.mb, self.autocast, self.ranks)
            return loss, (acc if d.task == "classification" else None)

        return [self.test_mode.test(self.state.step, test) if want[0] else None]

    def update(self) -> None:
        self.opt.step()

    def keep(self, slots: list[int]) -> None:
        pass  # a set of one: the loop ends when its point does

    def export(self, slot: int, pt) -> None:
        pass  # the state holds the model and the optimizer themselves

    def discard(self) -> None:
        self.test_mode.discard()


class BatchStatistics:
    """train.eval_mode=batch: BatchNorm normalises each ghost group by its own statistics in the
    step (gathered there, and averaged over the ranks), the test set by the running averages of
    that step."""

    def __init__(self, bns):
        self.gathered = bns

    def before_step(self) -> None:
        pass

    def extra_passes(self):
        return contextlib.nullcontext()

    def discard(self) -> None:
        pass

    def test(self, n: int, run_test):
        return run_test()


class RunningAverages:
    """train.eval_mode=running_stats (the authors' test curves): BatchNorm keeps nn.BatchNorm's
    running averages (momentum 0.1, never reset) through the steps, and row n's test columns are
    theta_n in eval() mode with the averages as the pass of theta_{n-1} left them: none at step 0."""

    gathered = ()  # the step's passes move the averages as nn.BatchNorm does

    def __init__(self, bns, bias_term: bool):
        self.bns, self.bias_term, self.before = bns, bias_term, None

    def before_step(self) -> None:
        self.before = bn_state(self.bns)  # the running averages theta_n is evaluated with

    @contextlib.contextmanager
    def extra_passes(self):
        kept = bn_state(self.bns) if self.bias_term else None  # the bias term's passes are not the authors'
        yield
        if kept is not None:
            bn_load(self.bns, kept)

    def discard(self) -> None:
        bn_load(self.bns, self.before)  # theta_n's checkpoint holds the averages before its pass

    def test(self, n: int, run_test):
        if n == 0:
            return None
        with bn_swapped(self.bns, self.before):
            return run_test()
