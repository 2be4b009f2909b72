"""One full-batch training run: `python -m pipeline.train model=... optim.h=... optim.beta=...`.

Each iteration n: accumulate grad E(theta_n) over ALL training examples -> metrics at theta_n
(one host sync) -> optional test evaluation at theta_n -> optimizer update -> theta_{n+1}.
Rows are written for theta_0 .. theta_{max_steps}. The run directory is keyed by a hash of the
semantic config and written by one process at a time (its lease); a completed run is skipped,
a checkpointed one resumed.

Exit status (the one table: pipeline/errors.py): 0 done or skipped; 1 a crash, or a full disk
(the run stays pending); 2 bad input (one line `error: key=value: why`, nothing created); 3 the
run is live in another process (one line naming it, nothing changed); 4 fenced off: this
process was stopped for longer than the lease timeout and another process took the run over
(one line; this process wrote nothing more to the run).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import submitit
import torch
from omegaconf import DictConfig

from models import build_model

from . import dist, faults, preempt, provenance
from .compose import CONF_DIR, Composer
from .data import load_dataset
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_FENCED,
    EXIT_LIVE,
    ConfigError,
    DataError,
    DiskFull,
    LeaseHeld,
    LeaseLost,
)
from .integrity import check, decide
from .lease import Lease, holder, slurm_job_id
from .loggers import NullLogger, make_logger
from .optim import build_optimizer
from .progress import Progress
from .state import REQUIRED, TrainState
from .step import bn_layers, evaluate, full_batch_step, loss_sum, partition, to_host
from .store import METRIC_COLUMNS, RunDir, atomic_write_text, read_metrics_table, run_id
from .theory_metrics import bias_term_norm
from .thresholds import diverging, newly_crossed
from .validate import check_dir_writable, validate, validate_grid

log = logging.getLogger("pipeline.train")


@contextlib.contextmanager
def numerics(cfg):
    """(device, autocast) for `cfg`, with its TF32 and determinism switches set; the previous
    switches are restored on exit."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    # tf32: TF32 in matmuls and convolutions; torch_default: PyTorch's defaults, what the
    # authors' runs used (TF32 convolutions, fp32 matmuls, cuDNN's autotuner); fp32: no TF32
    tf32, torch_default = cfg.precision == "tf32", cfg.precision == "torch_default"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32 or torch_default
    torch.backends.cudnn.benchmark = torch_default and not cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    bf16 = cfg.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    try:
        yield device, autocast
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, det,
         torch.backends.cudnn.benchmark) = saved
        torch.use_deterministic_algorithms(det)


def build(cfg, data, device):
    """(model, the forward used by the loop, optimizer), with `data` moved to the same dtype
    and memory format as the model."""
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
def run_log(run: RunDir):
    """Log lines also into the run's own folder (every attempt appends to train.log; the file is
    opened at the first line, so a process that is refused writes nothing, and none once this
    process has lost the run's lease)."""
    handler = logging.FileHandler(run.log_file, delay=True)
    handler.addFilter(lambda record: not run.lost)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    top = logging.getLogger("pipeline")
    level = top.level
    top.setLevel(logging.INFO)
    top.addHandler(handler)
    try:
        yield
    finally:
        top.removeHandler(handler)
        top.setLevel(level)
        handler.close()


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


def _mark_pending(run: RunDir) -> None:
    """Resumable: the last checkpoint is where the next attempt starts (best effort on a full disk)."""
    with contextlib.suppress(OSError, DiskFull):
        run.write_status(state="pending")


def train(cfg: DictConfig, launched_by: list[str] | None = None) -> str:
    """Run (or resume, or skip) the run of `cfg`; returns its state. Raises ConfigError or
    DataError on bad input (nothing is created), LeaseHeld when another process owns the run
    (nothing is changed), DiskFull (the run is left pending, its last checkpoint intact).
    Under torchrun or a multi-task Slurm job every rank calls it (pipeline/dist.py)."""
    faults.arm()  # the crash tests' failpoints, from $ADAM_FAULTS (none in normal runs)
    validate(cfg)
    check_dir_writable("paths.runs", cfg.paths.runs)
    run = RunDir(cfg.paths.runs, run_id(cfg))
    with numerics(cfg) as (device, autocast), dist.group(device) as (ranks, device):
        # -- rank 0 decides, every rank follows: live elsewhere, nothing to do, or go --
        skipped = ranks.share(lambda: _precheck(run, cfg))
        if skipped:
            return skipped
        data = load_dataset(cfg.data, device)  # missing or damaged data: before any directory
        with contextlib.ExitStack() as held:
            owner = Lease(run.path, cfg.lease.timeout_s, cfg.lease.heartbeat_s,
                          cfg.lease.get("host")) if ranks.main else None
            skipped = ranks.share(lambda: _begin(run, cfg, owner, held, launched_by))
            if skipped:
                return skipped
            try:
                return _train(cfg, run, data, device, autocast, owner, ranks)
            except LeaseLost:
                raise  # the run is someone else's now: write nothing (every write is fenced too)
            except DiskFull:
                if ranks.main:
                    _mark_pending(run)
                raise
            except Exception as e:
                if ranks.main:
                    run.write_status(state="failed", error=f"{type(e).__name__}: {e}")
                raise
            except BaseException:  # preemption, Ctrl-C, kill: resumable from the last checkpoint
                if ranks.main:
                    _mark_pending(run)
                raise


def _precheck(run: RunDir, cfg) -> str | None:
    """Before loading any data: LeaseHeld if the run is live elsewhere; its state if there is
    nothing to do (completed, or diverged/failed without retry); None to go on."""
    live = holder(run.path, cfg.lease.get("host"))
    if live:
        raise LeaseHeld(run.path, live)
    health = check(run)
    decision = decide(health, cfg.retry)
    if decision.launch:
        return None
    log.info("run %s: skipped (%s)", run.id, decision.reason)
    return health.state or "damaged"


def _begin(run: RunDir, cfg, owner: Lease, held: contextlib.ExitStack, launched_by=None) -> str | None:
    """Take the run's lease (held until `held` closes), decide again as its owner (another
    process may have ended the run meanwhile) and prepare the directory; the state to return
    when there is nothing to do, else None."""
    held.enter_context(run_log(run))
    held.enter_context(owner)
    run.owner = owner  # from here on every write to the run checks that this process still owns it
    health = check(run)
    st = health.status
    decision = decide(health, cfg.retry)
    if not decision.launch:
        log.info("run %s: skipped (%s)", run.id, decision.reason)
        return health.state or "damaged"
    if health.problems:
        log.warning("run %s: %s", run.id, decision.reason)
    stale = run.remove_stale_temps()
    if stale:
        log.info("run %s: removed %d temporary files of interrupted writes", run.id, len(stale))
    if decision.action == "restart":
        run.remove_checkpoints()
    run.write_config(cfg)
    run.record_provenance(st.get("attempts", 0) + 1, *provenance.collect(launched_by=launched_by))
    run.write_status(state="running", attempts=st.get("attempts", 0) + 1, slurm_job=slurm_job_id(),
                     started_at=time.time(), error=None,
                     **(dict(step=0, holes=None, final_loss=None) if decision.action == "restart" else {}))
    return None


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
    group = (cfg.model.get("bn_group") if cfg.model.get("norm") == "bn" else None) or 1
    share = -(-data.x_train.shape[0] // ranks.world)
    mb = -(-share // group) * group  # this rank's share of the examples, in whole groups
    if data.x_train.device.type != "cuda":
        return min(mb, max(group, 256 // group * group))

    def attempt(size):  # one micro-batch's forward and backward: the peak memory of a step
        try:
            with autocast():
                out = fwd(data.x_train[:size])
            loss_sum(out, data.y_train[:size], data.task).backward()
            torch.cuda.synchronize()
        finally:
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
    rows 0..start-1, what is missing there is flagged."""
    if not ranks.main:
        return None, NullLogger()
    writer = run.open_metrics(columns, start)
    if writer.holes:
        log.warning("run %s: metrics.csv of steps 0..%d is not whole (%s): the run goes on from its checkpoint "
                    "and is flagged; retry=true recomputes it from step 0", run.id, start - 1, writer.holes)
    run.write_status(step=start, holes=writer.holes or None)
    return writer, make_logger(cfg, run.path, run.id, sent_before=writer.last_written, fence=run.fence)


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


def _train(cfg, run: RunDir, data, device, autocast, owner: Lease | None, ranks: dist.Ranks) -> str:
    tc, eps = cfg.train, float(cfg.optim.eps)
    model, fwd, opt = build(cfg, data, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params, bns = sum(p.numel() for p in params), bn_layers(model)
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
            metrics = full_batch_step(fwd, data.x_train, data.y_train, data.task, parts, params, eps, bns,
                                      autocast, ranks, flags if ranks.world > 1 else ())
            metrics.update(_optional_metrics(cfg, model, data, parts, params, autocast, ranks, record))
            host = to_host(metrics)
            if _stopping(host.get("stop_flags", flags), owner, run):  # raises when the lease was lost
                _stop(state, n, saved, checkpoint, writer, run, ranks, progress, logger, preemption)
            row = metrics_row(n, host, data, n_params, eps)
            # -- thresholds crossed and divergence (decided here, once) --
            finite, newly, diverged = _judge(state, row, thresholds, tc)
            # -- evaluate: the test set at theta_n (its host sync is in evaluate) --
            if finite and (n % tc.eval_every == 0 or newly or n == tc.max_steps):
                row["test_loss"], test_acc = evaluate(fwd, data.x_test, data.y_test, data.task, mb, autocast, ranks)
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
        log.info("run %s %s at step %d (loss %.6g) in %s", run.id, outcome, n, row["loss"], run.path)
    logger.finish(outcome)
    return outcome


class TrainJob(submitit.helpers.Checkpointable):
    """What a sweep submits: `train(cfg)` in the job's process. On Slurm's warning signal the
    loop writes a checkpoint first (preempt.py); submitit then calls `checkpoint` (inherited:
    the same call again) and requeues the job, which resumes from that checkpoint.

    `outcome`: a JSON file (in the sweep's own folder) where the job says how its run ended,
    with the one-line reason of an expected failure, so that the sweep reads JSON, never
    submitit's result pickles. `launched_by`: the sweep's command line, for the run's provenance.

    Jobs pickled by older code lack attributes added since: every one is read with a default."""

    def __init__(self, outcome: str | None = None, launched_by: list[str] | None = None):
        self.outcome = outcome
        self.launched_by = launched_by

    def _say(self, result: str | None, error: str | None = None) -> None:
        path = getattr(self, "outcome", None)  # jobs pickled before outcomes existed have none
        if path:
            with contextlib.suppress(OSError):
                atomic_write_text(Path(path), json.dumps(dict(result=result, error=error, written_at=time.time(),
                                                              pid=os.getpid())) + "\n")

    def __call__(self, cfg: DictConfig) -> str:
        try:
            result = train(cfg, getattr(self, "launched_by", None))
        except LeaseHeld as e:  # another process (another sweep, a user) runs it: nothing to do here
            log.warning("%s", e)
            self._say("live", None)
            return "live"
        except LeaseLost as e:
            self._say("fenced", f"{e}; this process stopped without writing to it")
            fenced_exit(e)
        except (ConfigError, DataError) as e:
            self._say(None, str(e))
            raise
        except DiskFull as e:
            self._say("pending", f"{e}; the run resumes from its last checkpoint once there is room")
            raise
        except Exception as e:
            self._say("failed", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")
            raise
        self._say(result, None)
        return result


def _exit(code: int, message) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def train_or_exit(cfg: DictConfig) -> str:
    """`train`, with its expected failures as one line and an exit status (see the module doc)."""
    try:
        return train(cfg)
    except (ConfigError, DataError) as e:
        _exit(EXIT_BAD_INPUT, e)
    except LeaseHeld as e:
        _exit(EXIT_LIVE, e)
    except DiskFull as e:
        _exit(EXIT_CRASH, f"{e}; the run is pending and resumes from its last checkpoint once "
                          "there is room (rerun the same command)")
    except LeaseLost as e:
        fenced_exit(e)


def fenced_exit(e: LeaseLost) -> None:
    """One line and exit status 4, at once: no exit handler (wandb's among them) may write to a
    run that another process owns now."""
    print(f"error: {e}; this process stopped without writing to it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_FENCED)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> str | None:
    return train_or_exit(cfg)


def cli(argv=None) -> None:
    """`python -m pipeline.train [-m] overrides...`: every override (with -m, every grid point)
    is composed and validated here first, so a bad one gives one line and exit status 2, never
    a Hydra traceback; then Hydra runs it as usual (plain Hydra multirun with -m)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = [a for a in argv if a.startswith("-")]
    overrides = [a for a in argv if not a.startswith("-")]
    if all(f in ("-m", "--multirun") for f in flags):  # --cfg, --info, ...: Hydra's own business
        try:
            with Composer() as c:
                if flags:
                    validate_grid(c, overrides)  # the planner's check: every point, named when bad
                else:
                    validate(c.compose(overrides))
        except ConfigError as e:
            _exit(EXIT_BAD_INPUT, e)
    sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    # call the importable module's function, not __main__'s: pickles then refer to pipeline.train
    from pipeline.train import cli as _cli

    _cli()
