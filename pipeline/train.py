"""One full-batch training run: `python -m pipeline.train model=... optim.h=... optim.beta=...`.

Each iteration n: accumulate grad E(theta_n) over ALL training examples -> metrics at theta_n
(one host sync) -> optional test evaluation at theta_n -> optimizer update -> theta_{n+1}.
Rows are written for theta_0 .. theta_{max_steps}; the run directory is keyed by a hash of the
semantic config, a completed run is skipped and a checkpointed one resumed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from models import build_model

from . import preempt
from .data import DataError, load_dataset
from .loggers import make_logger
from .optim import build_optimizer
from .progress import Progress
from .step import bn_layers, evaluate, full_batch_step, partition
from .store import METRIC_COLUMNS, RunDir, run_id
from .theory_metrics import bias_term_norm
from .validate import ConfigError, validate

log = logging.getLogger("pipeline.train")


def setup_device(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    tf32 = cfg.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    bf16 = cfg.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    return device, autocast


def train(cfg: DictConfig) -> str:
    """Run (or resume, or skip) the run of `cfg`; returns its final state."""
    validate(cfg)
    rid = run_id(cfg)
    run = RunDir(cfg.paths.runs, rid)
    st = run.status()
    prev = st.get("state")
    if prev == "completed" or (prev in ("diverged", "failed") and not cfg.retry):
        log.info("run %s is %s: skipped%s", rid, prev, "" if prev == "completed" else " (retry=true reruns it)")
        return prev
    run.path.mkdir(parents=True, exist_ok=True)
    step = st.get("step", 0)
    if prev == "diverged":  # retry from scratch; a failed run resumes from its checkpoint
        run.checkpoint.unlink(missing_ok=True)
        step = 0
    run.write_config(cfg)
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    run.write_status(state="running", attempts=st.get("attempts", 0) + 1, step=step,
                     slurm_job=job, started_at=time.time())
    try:
        state = _train(cfg, run, rid)
    except Exception as e:
        run.write_status(state="failed", error=f"{type(e).__name__}: {e}")
        raise
    except BaseException:  # preemption, Ctrl-C, kill: resumable from the last checkpoint
        run.write_status(state="pending")
        raise
    return state


def _train(cfg, run: RunDir, rid: str) -> str:
    tc = cfg.train
    device, autocast = setup_device(cfg)
    data = load_dataset(cfg.data, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.input_shape).to(device)
    if cfg.precision == "fp64":  # exact arithmetic for small models (the bilinear toy)
        model = model.double()
        data.x_train, data.x_test = data.x_train.double(), data.x_test.double()
        if data.task == "regression":
            data.y_train, data.y_test = data.y_train.double(), data.y_test.double()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        data.x_train = data.x_train.contiguous(memory_format=torch.channels_last)
        data.x_test = data.x_test.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), cfg.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    eps = float(cfg.optim.eps)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed) if tc.reshuffle else None
    fwd = torch.compile(model) if cfg.compile else model
    bns = bn_layers(model)

    start, crossed, time_offset = 0, [], 0.0
    ckpt = run.load_checkpoint(map_location=device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, crossed, time_offset = ckpt["step"], list(ckpt["crossed"]), ckpt["time_s"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        if shuffle_gen is not None:
            shuffle_gen.set_state(ckpt["rng_shuffle"])
        log.info("run %s: resuming at step %d", rid, start)

    record = n_params <= tc.record_params
    columns = METRIC_COLUMNS + (["bias_norm"] if tc.bias_term else []) + (
        [f"theta_{i}" for i in range(n_params)] if record else [])
    writer = run.open_metrics(columns, start)
    logger = make_logger(cfg, run.path, rid)
    progress = Progress(tc.progress, start, tc.max_steps + 1, tc.log_every, rid)
    thresholds = sorted(float(t) for t in tc.loss_thresholds)
    t0 = time.perf_counter() - time_offset

    def checkpoint(step):
        run.save_checkpoint(dict(
            model=model.state_dict(), optimizer=opt.state_dict(), step=step, crossed=crossed,
            time_s=time.perf_counter() - t0, rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            rng_shuffle=shuffle_gen.get_state() if shuffle_gen is not None else None))
        run.write_status(step=step)

    state, n = "completed", start
    with preempt.guard() as signalled:
        for n in range(start, tc.max_steps + 1):
            # gradient of E at theta_n over ALL examples, and the metrics at theta_n
            parts = partition(data.x_train.shape[0], tc.micro_batch, shuffle_gen, device)
            loss, correct, norms = full_batch_step(fwd, data.x_train, data.y_train, data.task,
                                                   parts, params, eps, bns, autocast)
            extra = [bias_term_norm(model, data, cfg, parts, autocast)] if tc.bias_term else []
            theta = [torch.cat([p.detach().flatten() for p in params]).double()] if record else []
            vals = torch.cat([torch.stack([loss, correct.double()]), norms,
                              *[e.reshape(-1).double() for e in extra + theta]]).tolist()
            row = dict(step=n, loss=vals[0], pert_norm=vals[2], l1_norm=vals[3], l2_norm=vals[4],
                       pert_norm_floor=n_params * math.sqrt(eps),
                       acc=vals[1] / data.x_train.shape[0] if data.task == "classification" else None)
            if tc.bias_term:
                row["bias_norm"] = vals[5]
            if record:
                row.update({f"theta_{i}": v for i, v in enumerate(vals[-n_params:])})
            finite = math.isfinite(row["loss"]) and math.isfinite(row["l2_norm"])
            newly = [t for t in thresholds if finite and row["loss"] < t and t not in crossed]
            crossed += newly
            if finite and (n % tc.eval_every == 0 or newly or n == tc.max_steps):
                row["test_loss"], test_acc = evaluate(
                    fwd, data.x_test, data.y_test, data.task, tc.micro_batch, autocast)
                row["test_acc"] = test_acc if data.task == "classification" else None
            row["time_s"] = time.perf_counter() - t0
            writer.write(row)
            if n == 0:
                run.write_status(first_step_at=time.time())  # dispatch overhead = this - submission
            logger.log(row)
            progress.update(row)
            if not finite:
                state = "diverged"
                break
            if n == tc.max_steps or (tc.stop_loss is not None and row["loss"] < tc.stop_loss):
                break
            opt.step()  # theta_n -> theta_{n+1}
            if (n + 1) % tc.checkpoint_every == 0 or signalled():
                checkpoint(n + 1)
            if signalled():
                writer.close()
                progress.close()
                run.write_status(state="pending", step=n + 1)
                logger.finish("pending")
                preempt.hand_over(n + 1)
    writer.close()
    progress.close()
    checkpoint(n)
    run.write_status(state=state, step=n, final_loss=row["loss"])
    logger.finish(state)
    log.info("run %s %s at step %d (loss %.6g) in %s", rid, state, n, row["loss"], run.path)
    return state


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: works from any cwd


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> str | None:
    try:
        return train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    # call the importable module's function, not __main__'s: submitit then pickles it by reference
    from pipeline.train import main as _main

    _main()
