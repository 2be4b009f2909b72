"""What a run writes, by point: metrics.csv opened at its step (holes flagged), the row of
theta_n by name, its wandb mirror and progress line, and the status of its end. Rank 0 writes;
every write is fenced by the run's lease (pipeline/runs/rundir.py)."""

from __future__ import annotations

import logging
import math
import time

import torch

from .. import threads
from ..runs.history import read_metrics_table
from ..runs.rundir import RunDir
from . import dist
from .loggers import NullLogger, make_logger
from .sharpness import COLUMNS as SHARPNESS_COLUMNS

log = logging.getLogger("pipeline.train")
OPTIONAL = ("bias_norm", *SHARPNESS_COLUMNS)  # columns of the runs that ask for them (train.bias_term, ...)


def initial_loss(run: RunDir) -> float:
    """The training loss at theta_0 from metrics.csv (checkpoints made before the divergence rule)."""
    header, rows = read_metrics_table(run.metrics)
    try:
        return float(rows[0][header.index("loss")]) if rows and rows[0][0] == "0" else math.nan
    except ValueError:
        return math.nan


def open_record(cfg, run: RunDir, ranks: dist.Ranks, start: int, columns: list[str]):
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
    row.update({k: host[k] for k in OPTIONAL if k in host})  # on the steps that record them
    row.update({f"theta_{i}": v for i, v in enumerate(host.get("theta", []))})
    return row


def write_row(row: dict, newly: list, writer, run: RunDir, ranks: dist.Ranks, logger, progress) -> None:
    """metrics.csv first (the truth, rank 0), then the wandb mirror and the progress line."""
    if ranks.main:
        writer.write(row)
        if row["step"] == 0:
            run.write_status(first_step_at=time.time())  # dispatch overhead = this - submission
    logger.log(row, newly)
    progress.update(row)


def finish(outcome: str, n: int, row: dict, run: RunDir, ranks: dist.Ranks, writer, progress, logger) -> str:
    """The run ended by itself at step n (completed or diverged): status, log line, mirror."""
    progress.close()
    if ranks.main:
        writer.close()
        run.write_status(state=outcome, step=n, final_loss=row["loss"])
        log.info("run %s %s at step %d (loss %.6g) in %s", run.id, outcome, n, row["loss"], run.path,
                 extra={"run_id": run.id})
    logger.finish(outcome)
    return outcome
