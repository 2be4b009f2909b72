"""The training loop, once, over a set of points (Definitions 2.1 and 4.1 applied to the
full-batch loss). A plain run is a set of one point on W ranks (engine/single.py), a pack a set
of K stacked points in one process (engine/packed.py); what differs is behind a backend:

    backend.step(flags)   grad E(theta_n) of every point and its metrics at theta_n, one host
                          sync; the stop flags ride on it (summed over the ranks): host dicts, flags
    backend.evaluate(want) the test set at theta_n of the points that want it: (loss, acc) or None
    backend.update()      theta_n -> theta_{n+1} of every point still going
    backend.keep(slots)   only these points go on
    backend.export(slot, point)  the point's state as its unpacked run checkpoints it
    backend.discard()     the step's side effects undone (a preemption after it)
    backend.ranks, .data, .n_params

The rules are here, each once: resume (open_point), the fence and the preemption hand-over,
thresholds and divergence (pipeline/thresholds.py), when to evaluate, the row, the update, the
checkpoint cadence, the end. Each point writes only its own run, every write fenced by its lease.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from .. import faults
from ..errors import LeaseLost
from ..runs.rundir import RunDir
from ..runs.state import REQUIRED, TrainState
from ..thresholds import diverging, newly_crossed
from . import preempt
from .dist import Ranks
from .progress import Progress
from .record import finish, initial_loss, metrics_row, open_record, write_row

log = logging.getLogger("pipeline.train")


@dataclass
class Point:
    """One run of the set: its config, directory, lease and training state, what it writes to,
    and how it stands (`done`: completed, diverged, fenced, pending)."""

    index: int  # its place in the caller's list
    cfg: object
    run: RunDir
    owner: object  # its Lease (None on ranks other than 0)
    state: TrainState
    ranks: Ranks
    writer: object = None
    logger: object = None
    progress: object = None
    saved: set = field(default_factory=set)  # steps checkpointed on disk
    t0: float = 0.0
    eps: float = 0.0  # its optim.eps (read every step: not through OmegaConf)
    row: dict | None = None
    newly: list = field(default_factory=list)
    evaluate: bool = False  # this step: the test set at its theta_n
    done: str | None = None
    error: LeaseLost | None = None  # why it was fenced off

    @property
    def tag(self) -> dict:
        return {"run_id": self.run.id}  # its log lines go to its own train.log only

    def lost(self) -> bool:
        return self.owner is not None and self.owner.lost

    def lost_error(self) -> LeaseLost:
        if self.owner is not None:
            return self.owner.lost_error()
        return LeaseLost(f"run {self.run.id}: lease lost on rank 0")


def open_point(k: int, cfg, run: RunDir, owner, state: TrainState, ranks: Ranks, columns: list[str],
               progress_mode: str, into_backend=None) -> Point:
    """Point k, resumed from the newest checkpoint of its run that loads, `into_backend(pt,
    resumed)` given its state, its metrics.csv open from its step on, its mirror and progress line."""
    pt = Point(k, cfg, run, owner, state, ranks)
    ck = run.load_checkpoint(map_location=state.device, required=REQUIRED)
    if ck is not None:
        state.load_state_dict(ck, lambda: initial_loss(run))
        pt.saved.add(state.step)
        log.info("run %s: resuming at step %d", run.id, state.step, extra=pt.tag)
    if into_backend is not None:
        into_backend(pt, ck is not None)
    pt.writer, pt.logger = open_record(cfg, run, ranks, state.step, columns)
    tc = cfg.train
    pt.progress = Progress(progress_mode if ranks.main else "none", state.step, tc.max_steps + 1, tc.log_every,
                           run.id, extra=pt.tag)
    pt.t0, pt.eps = time.perf_counter() - state.time_s, float(cfg.optim.eps)
    return pt


def train_points(backend, points: list[Point], tc, outcomes: dict) -> None:
    """Train the points to their ends; `outcomes[index]` = (state, error) of each point as it
    completes, diverges or is fenced off (a preemption leaves them pending and raises)."""
    thresholds, active = sorted(float(t) for t in tc.loss_thresholds), list(points)
    with preempt.guard() as preemption, _closing(lambda: active):
        while active:
            faults.point("step", min(pt.state.step for pt in active))
            # -- step: grad E(theta_n) of every point, its metrics at theta_n, one host sync; the
            # stop flags (a preemption signal, a lease taken over) ride along, summed over the ranks --
            hosts, flags = backend.step([preemption.signalled()] + [pt.lost() for pt in active])
            for pt, lost in zip(active, flags[1:]):
                if lost:  # the run is another process's now: nothing more is written to it
                    _fence(pt, pt.lost_error(), outcomes)
            active, hosts = _narrow(backend, active, hosts)
            if flags[0] and active:
                _hand_over(backend, active, preemption, outcomes)  # never returns
            # -- each point judged: thresholds crossed, divergence; whether it needs the test set --
            for pt, host in zip(active, hosts):
                pt.row = metrics_row(pt.state.step, host, backend.data, backend.n_params, pt.eps)
                _judge(pt, thresholds, tc)
            # -- evaluate: the test set at theta_n where a point needs it (its host sync in the backend) --
            if any(pt.evaluate for pt in active):
                for pt, result in zip(active, backend.evaluate([pt.evaluate for pt in active])):
                    if result is not None:
                        pt.row["test_loss"], pt.row["test_acc"] = result
            # -- each point's row (metrics.csv first); a point that ends leaves --
            for slot, pt in enumerate(active):
                _guarded(pt, outcomes, lambda pt=pt, slot=slot: _record(backend, pt, slot, tc, outcomes))
            active, _ = _narrow(backend, active)
            # -- update theta_n -> theta_{n+1}; a checkpoint every checkpoint_every steps --
            if active:
                backend.update()
            for slot, pt in enumerate(active):
                pt.state.step += 1
                if pt.state.step % tc.checkpoint_every == 0:
                    _guarded(pt, outcomes, lambda pt=pt, slot=slot: _checkpoint(backend, pt, slot, pt.state.step))
            active, _ = _narrow(backend, active)


def _judge(pt: Point, thresholds: list[float], tc) -> None:
    """The crossing and divergence rules of pipeline.thresholds at theta_n, decided once, here
    (the point's counters updated); whether the test set is needed: every eval_every steps, at
    a crossing and at the last step, while the loss is finite."""
    row, st = pt.row, pt.state
    finite = math.isfinite(row["loss"]) and math.isfinite(row["l2_norm"])
    if row["step"] == 0:
        st.loss0 = row["loss"]
    st.above, diverged = diverging(row["loss"] if finite else math.inf, st.loss0, st.above,
                                   tc.diverge_factor, tc.diverge_patience)
    pt.newly = newly_crossed(row["loss"], thresholds, st.crossed)
    st.crossed += pt.newly
    pt.done = "diverged" if diverged else None
    n = row["step"]
    pt.evaluate = finite and (n % tc.eval_every == 0 or bool(pt.newly) or n == tc.max_steps)


def _record(backend, pt: Point, slot: int, tc, outcomes: dict) -> None:
    """Point `pt`'s row (metrics.csv first, then its mirror and progress line); when it ends
    here (diverged, the last step, below stop_loss): its checkpoint, status and mirror."""
    row, n = pt.row, pt.state.step
    row["time_s"] = time.perf_counter() - pt.t0
    write_row(row, pt.newly, pt.writer, pt.run, pt.ranks, pt.logger, pt.progress)
    if pt.done or n == tc.max_steps or (tc.stop_loss is not None and row["loss"] < tc.stop_loss):
        outcome = pt.done or "completed"
        if n not in pt.saved:
            _checkpoint(backend, pt, slot, n)
        finish(outcome, n, row, pt.run, pt.ranks, pt.writer, pt.progress, pt.logger)
        pt.done = outcome
        outcomes[pt.index] = (outcome, None)


def _checkpoint(backend, pt: Point, slot: int, step: int) -> None:
    """The checkpoint of theta_step in the unpacked run's form (rank 0 writes it)."""
    pt.state.step = step
    backend.export(slot, pt)
    if pt.ranks.main:
        pt.writer.sync()  # the rows before `step` are durable before a checkpoint says they exist
        pt.run.save_checkpoint(pt.state.state_dict(time.perf_counter() - pt.t0))
        pt.run.write_status(step=step)
    pt.saved.add(step)


def _guarded(pt: Point, outcomes: dict, write) -> None:
    """Run a write of point `pt`; if its lease was taken over meanwhile the point leaves."""
    try:
        write()
    except LeaseLost as e:
        _fence(pt, e, outcomes)


def _fence(pt: Point, e: LeaseLost, outcomes: dict) -> None:
    """The run is another process's now: this one writes nothing more to it (its mirror abandoned)."""
    pt.progress.close()
    pt.logger.abandon()
    pt.done, pt.error = "fenced", e
    outcomes[pt.index] = ("fenced", f"{e}; this process stopped without writing to it")


def _narrow(backend, active: list[Point], hosts=None):
    """The points still going (and their host metrics); the backend narrowed to them when some left."""
    going = [slot for slot, pt in enumerate(active) if not pt.done]
    if len(going) < len(active):
        backend.keep(going)
    return [active[s] for s in going], hosts and [hosts[s] for s in going]


def _hand_over(backend, active: list[Point], preemption, outcomes: dict) -> None:
    """A preemption signal on some rank: theta_n of every point checkpointed (the step just
    computed discarded), its run pending; then hand over (never returns)."""
    backend.discard()

    def stop(pt, slot):
        n = pt.state.step
        if n not in pt.saved:
            _checkpoint(backend, pt, slot, n)
        if pt.ranks.main:
            pt.writer.close()
            pt.run.write_status(state="pending", step=n)
        pt.progress.close()
        pt.logger.finish("pending")
        pt.done = "pending"

    for slot, pt in enumerate(active):
        _guarded(pt, outcomes, lambda pt=pt, slot=slot: stop(pt, slot))
    preemption.hand_over(min(pt.state.step for pt in active), backend.ranks.main)


@contextlib.contextmanager
def _closing(still_active):
    """A crash or an interruption still closes each unfinished point's mirror and progress line:
    failed (a crash), pending (preemption, Ctrl-C, kill), abandoned (its lease lost)."""
    try:
        yield
    except BaseException as e:
        for pt in still_active():
            if not pt.done:
                pt.progress.close()
                if isinstance(e, LeaseLost):
                    pt.logger.abandon()
                else:
                    pt.logger.finish("failed" if isinstance(e, Exception) else "pending")
        raise
