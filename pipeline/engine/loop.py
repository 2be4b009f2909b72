"""The training loop of one run (Definitions 2.1 and 4.1 applied to the full-batch loss):

    for n = start .. max_steps:
        grad E(theta_n) over ALL training examples, the metrics at theta_n   (step.py, one host sync)
        thresholds crossed, divergence                                      (pipeline/thresholds.py)
        the test set at theta_n, every eval_every steps and at each crossing (step.evaluate)
        metrics.csv row n (rank 0, the truth), the wandb mirror, the progress line
        theta_n -> theta_{n+1} (optim.py), a checkpoint every checkpoint_every steps

It is given a run directory that this process owns (pipeline/train.py takes the lease and
decides to start, resume or skip); every write to it is fenced by that lease.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from models import build_model

from .. import faults, threads
from ..errors import LeaseLost
from ..ghost import micro_batch_unit
from ..runs.history import METRIC_COLUMNS, read_metrics_table
from ..runs.lease import Lease
from ..runs.rundir import RunDir
from ..runs.state import REQUIRED, TrainState
from ..thresholds import diverging, newly_crossed
from . import dist, preempt
from .loggers import NullLogger, make_logger
from .losses import from_config
from .optim import build_optimizer
from .progress import Progress
from .step import bn_layers, bn_load, bn_state, bn_swapped, evaluate, full_batch_step, partition, to_host
from .theory_metrics import bias_term_norm

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

@contextlib.contextmanager
def _finish_on_error(logger, progress):
    """A crash or an interruption still closes the wandb run (failed / pending) and the bar."""
    try:
        yield
    except LeaseLost:  # the run (and its wandb run) is another process's now
        progress.close()
        logger.abandon()
        raise
    except Exception:
        progress.close()
        logger.finish("failed")
        raise
    except BaseException:
        progress.close()
        logger.finish("pending")
        raise

def _initial_loss(run: RunDir) -> float:
    """The training loss at theta_0 from metrics.csv (checkpoints made before the divergence rule)."""
    header, rows = read_metrics_table(run.metrics)
    try:
        return float(rows[0][header.index("loss")]) if rows and rows[0][0] == "0" else math.nan
    except ValueError:
        return math.nan


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


def _open_record(cfg, run: RunDir, ranks: dist.Ranks, start: int, columns: list[str]):
    """(metrics writer, wandb mirror) on rank 0 (None, NullLogger elsewhere): metrics.csv keeps
    rows 0..start-1, what is missing there is flagged; the log says how many threads compute."""
    if not ranks.main:
        return None, NullLogger()
    tag = {"run_id": run.id}  # in a pack, the line goes to this run's train.log only
    log.info("run %s: %d CPU threads per process (%s)", run.id, torch.get_num_threads(),
             threads.budget(cfg.train.get("threads"))[1], extra=tag)
    writer = run.open_metrics(columns, start)
    if writer.holes:
        log.warning("run %s: metrics.csv of steps 0..%d is not whole (%s): the run goes on from its checkpoint "
                    "and is flagged; retry=true recomputes it from step 0", run.id, start - 1, writer.holes, extra=tag)
    if writer.kept:
        log.warning("run %s: kept %s; flagged in status.json", run.id, writer.kept, extra=tag)
    kept = "; ".join(filter(None, [run.status().get("kept"), writer.kept])) if writer.kept else None
    run.write_status(step=start, holes=writer.holes or None, **({"kept": kept} if kept else {}))
    mirror = make_logger(cfg, run.path, run.id, sent_before=writer.last_written, fence=run.fence)
    if not isinstance(mirror, NullLogger):  # a mirrored row must be on disk: a resume sends only rows past it
        writer.flush_s = 0.0
    return writer, mirror


def metrics_row(n: int, host: dict, data, n_params: int, eps: float) -> dict:
    """The metrics.csv row of theta_n, by name, from the step's metrics on the host."""
    row = dict(step=n, loss=host["loss"], pert_norm=host["pert_norm"], l1_norm=host["l1_norm"],
               l2_norm=host["l2_norm"], pert_norm_floor=n_params * math.sqrt(eps),
               acc=host["correct"] / data.x_train.shape[0] if data.task == "classification" else None)
    if "bias_norm" in host:
        row["bias_norm"] = host["bias_norm"]
    row.update({f"theta_{i}": v for i, v in enumerate(host.get("theta", []))})
    return row


def _optional_metrics(cfg, model, data, parts, params, autocast, ranks, record: bool) -> dict:
    """On-device extras of the step: the bias term's norm (train.bias_term), theta_n itself
    (few-parameter models)."""
    out = {}
    if cfg.train.bias_term:
        out["bias_norm"] = bias_term_norm(model, data, cfg, parts, autocast, ranks)
    if record:
        out["theta"] = torch.cat([p.detach().flatten() for p in params])
    return out


def _judge(state: TrainState, row: dict, thresholds: list[float], tc) -> tuple[bool, list[float], bool]:
    """(finite, thresholds newly crossed, diverged) at theta_n: the crossing and divergence
    rules of pipeline.thresholds, decided once, here; the state's counters updated."""
    finite = math.isfinite(row["loss"]) and math.isfinite(row["l2_norm"])
    if row["step"] == 0:
        state.loss0 = row["loss"]
    state.above, diverged = diverging(row["loss"] if finite else math.inf, state.loss0, state.above,
                                      tc.diverge_factor, tc.diverge_patience)
    newly = newly_crossed(row["loss"], thresholds, state.crossed)
    state.crossed += newly
    return finite, newly, diverged


def _write_row(row: dict, newly: list, writer, run: RunDir, ranks: dist.Ranks, logger, progress) -> None:
    """metrics.csv first (the truth, rank 0), then the wandb mirror and the progress line."""
    if ranks.main:
        writer.write(row)
        if row["step"] == 0:
            run.write_status(first_step_at=time.time())  # dispatch overhead = this - submission
    logger.log(row, newly)
    progress.update(row)


def _stop(state: TrainState, n: int, saved: set, checkpoint, writer, run, ranks, progress, logger, preemption):
    """A preemption signal: the checkpoint of theta_n, the run pending, then hand over (never returns)."""
    if n not in saved:
        checkpoint(n)
    if ranks.main:
        writer.close()
        run.write_status(state="pending", step=n)
    progress.close()
    logger.finish("pending")
    preemption.hand_over(n, ranks.main)


def plain(node) -> SimpleNamespace:
    """A config group as plain attributes: read every step, an OmegaConf lookup costs ~50 us."""
    return SimpleNamespace(**OmegaConf.to_container(node, resolve=True))


def train_loop(cfg, run: RunDir, data, device, autocast, owner: Lease | None, ranks: dist.Ranks) -> str:
    tc, eps = plain(cfg.train), float(cfg.optim.eps)
    model, fwd, opt = build(cfg, data, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params, bns = sum(p.numel() for p in params), bn_layers(model)
    # train.eval_mode=running_stats (the authors' test curves): BatchNorm keeps nn.BatchNorm's running
    # averages (momentum 0.1, never reset) through the steps, and row n's test columns are theta_n
    # in eval() mode with the averages as the pass of theta_{n-1} left them: none at step 0
    running = tc.eval_mode == "running_stats" and bool(bns)  # one process (pipeline/train.py checks)
    state = TrainState(model, opt, device, torch.Generator().manual_seed(cfg.seed) if tc.reshuffle else None)
    mb = micro_batch(cfg, fwd, data, params, ranks, autocast)
    # -- resume: the newest checkpoint that loads (every rank reads the same file) --
    ckpt = run.load_checkpoint(map_location=device, required=REQUIRED)
    if ckpt is not None:
        state.load_state_dict(ckpt, lambda: _initial_loss(run))
        log.info("run %s: resuming at step %d", run.id, state.step)
    start, saved = state.step, {state.step} if ckpt is not None else set()  # steps checkpointed on disk
    # -- record: rank 0 writes metrics.csv (the truth), the wandb mirror, the progress line --
    record = n_params <= tc.record_params  # few-parameter models: theta_n itself
    columns = METRIC_COLUMNS + ["bias_norm"] * tc.bias_term + [f"theta_{i}" for i in range(n_params * record)]
    writer, logger = _open_record(cfg, run, ranks, start, columns)
    progress = Progress(tc.progress if ranks.main else "none", start, tc.max_steps + 1, tc.log_every, run.id)
    thresholds, t0 = sorted(float(t) for t in tc.loss_thresholds), time.perf_counter() - state.time_s

    def checkpoint(step):
        state.step = step
        if ranks.main:
            writer.sync()  # the rows before `step` are durable before a checkpoint says they exist
            run.save_checkpoint(state.state_dict(time.perf_counter() - t0))
            run.write_status(step=step)
        saved.add(step)

    outcome, n = "completed", start
    with preempt.guard() as preemption, _finish_on_error(logger, progress):
        for n in range(start, tc.max_steps + 1):
            faults.point("step", n)
            # -- step: grad E(theta_n) over ALL examples, the metrics at theta_n, one host sync;
            # every rank's stop flags (a preemption signal, the lease taken over) ride along --
            flags = (preemption.signalled(), owner is not None and owner.lost)
            parts = partition(data.x_train.shape[0], mb, state.shuffle, device)
            before = bn_state(bns) if running else None  # the running averages theta_n is evaluated with
            metrics = full_batch_step(fwd, data.x_train, data.y_train, data.objective, parts, params, eps,
                                      () if running else bns, autocast, ranks, flags if ranks.world > 1 else ())
            kept = bn_state(bns) if running and tc.bias_term else None  # the bias term's passes are not the authors'
            metrics.update(_optional_metrics(cfg, model, data, parts, params, autocast, ranks, record))
            if kept is not None:
                bn_load(bns, kept)
            host = to_host(metrics)
            if _stopping(host.get("stop_flags", flags), owner, run):  # raises when the lease was lost
                if running:  # theta_n's checkpoint holds the averages before its pass, which is discarded
                    bn_load(bns, before)
                _stop(state, n, saved, checkpoint, writer, run, ranks, progress, logger, preemption)
            row = metrics_row(n, host, data, n_params, eps)
            # -- thresholds crossed and divergence (decided here, once) --
            finite, newly, diverged = _judge(state, row, thresholds, tc)
            # -- evaluate: the test set at theta_n (its host sync is in evaluate) --
            if finite and (n % tc.eval_every == 0 or newly or n == tc.max_steps) and not (running and n == 0):
                with bn_swapped(bns, before) if running else contextlib.nullcontext():
                    row["test_loss"], test_acc = evaluate(fwd, data.x_test, data.y_test, data.objective, mb,
                                                          autocast, ranks)
                row["test_acc"] = test_acc if data.task == "classification" else None
            row["time_s"] = time.perf_counter() - t0
            _write_row(row, newly, writer, run, ranks, logger, progress)
            if diverged or n == tc.max_steps or (tc.stop_loss is not None and row["loss"] < tc.stop_loss):
                outcome = "diverged" if diverged else outcome
                break
            # -- update theta_n -> theta_{n+1}; checkpoint every checkpoint_every steps --
            opt.step()
            if (n + 1) % tc.checkpoint_every == 0:
                checkpoint(n + 1)
    if n not in saved:
        checkpoint(n)
    return _finish(outcome, n, row, run, ranks, writer, progress, logger)


def _stopping(flags, owner: Lease | None, run: RunDir) -> bool:
    """Whether some rank got the preemption signal (then theta_n is checkpointed, its gradient
    discarded); raises LeaseLost when rank 0's lease was taken over. `flags`: (signal, lost),
    summed over the ranks."""
    signal, lost = (bool(f) for f in flags)
    if lost:
        raise owner.lost_error() if owner is not None else LeaseLost(f"run {run.id}: lease lost on rank 0")
    return signal


def _finish(outcome: str, n: int, row: dict, run: RunDir, ranks: dist.Ranks, writer, progress, logger) -> str:
    """The run ended by itself at step n (completed or diverged): status, log line, mirror."""
    progress.close()
    if ranks.main:
        writer.close()
        run.write_status(state=outcome, step=n, final_loss=row["loss"])
        log.info("run %s %s at step %d (loss %.6g) in %s", run.id, outcome, n, row["loss"], run.path,
                 extra={"run_id": run.id})
    logger.finish(outcome)
    return outcome
