"""The one training loop (pipeline/engine/loop.py) driven by a fake backend: each point a 1-D
quadratic E(theta) = theta^2 / 2 under gradient descent from theta_0 = 1, so its loss is known
in closed form, E(theta_n) = (1 - h)^(2n) / 2. Each rule of the loop is checked once against
that formula, for a set of one point and of three: thresholds, divergence, the evaluation and
checkpoint cadences, stop_loss, preemption (then a resume) and fencing; and a set where one point
diverges, one is fenced off and one finishes, each with its own files."""

from __future__ import annotations

import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from pipeline.engine.dist import Ranks
from pipeline.engine.loop import open_point, train_points
from pipeline.engine.preempt import Requeue
from pipeline.engine.setup import plain
from pipeline.errors import LeaseLost
from pipeline.runs.history import METRIC_COLUMNS, read_metrics_table
from pipeline.runs.rundir import RunDir
from pipeline.runs.state import TrainState

from .conftest import make_cfg

COLUMNS = METRIC_COLUMNS + ["theta_0"]


def loss_at(h: float, n: int) -> float:
    return (1 - h) ** (2 * n) / 2


class Quadratics:
    """The backend: point k's theta is the one weight of its own nn.Linear(1, 1), its update
    torch.optim.SGD with its own h. It records what the loop asks of it."""

    ranks = Ranks()
    data = SimpleNamespace(task="regression", x_train=torch.zeros(1, 1))
    n_params = 1

    def __init__(self, points, signal_at=None):
        self.points, self.signal_at = list(points), signal_at
        self.tested, self.exported = [], []

    def step(self, flags):
        hosts = []
        for pt in self.points:
            n, (p,) = pt.state.step, list(pt.state.model.parameters())
            if self.signal_at == n:
                os.kill(os.getpid(), signal.SIGUSR2)  # preemption: seen by the next step's flags
            theta = p.item()
            p.grad = p.detach().clone()  # grad E(theta) = theta
            hosts.append(dict(loss=theta * theta / 2, correct=0, pert_norm=math.sqrt(theta * theta + pt.eps),
                              l1_norm=abs(theta), l2_norm=abs(theta), theta=[theta]))
        return hosts, flags

    def evaluate(self, want):
        out = []
        for pt, w in zip(self.points, want):
            self.tested += [(pt.index, pt.state.step)] * w
            out.append((pt.row["loss"], None) if w else None)
        return out

    def update(self):
        for pt in self.points:
            pt.state.optimizer.step()

    def keep(self, slots):
        self.points = [self.points[s] for s in slots]

    def export(self, slot, pt):
        self.exported.append((pt.index, pt.state.step))

    def discard(self):
        pass


class Owner:
    """A lease that another process takes over when its point reaches step `lose_at`."""

    def __init__(self, lose_at=None):
        self.lose_at, self.point = lose_at, None

    @property
    def lost(self) -> bool:
        return self.lose_at is not None and self.point.state.step >= self.lose_at

    def lost_error(self):
        return LeaseLost("lease taken over by another process")


def open_set(tmp_path, hs, lose_at=None, **train):
    """Points with step sizes `hs`, registered as runs in tmp_path/runs, `train` keys for all;
    point k's lease is lost at step lose_at[k]."""
    overrides = ["optim=gd", "logger=none", "train.progress=none", "train.loss_thresholds=[0.1,0.01]",
                 "train.diverge_factor=10", "train.diverge_patience=3"] + [f"train.{k}={v}" for k, v in train.items()]
    points = []
    for k, h in enumerate(hs):
        cfg = make_cfg(overrides + [f"optim.h={h}", f"seed={k}"], runs=tmp_path / "runs")
        run = RunDir(cfg.paths.runs, f"point{k}")
        if not run.path.exists():
            run.create(cfg)
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        state = TrainState(model, torch.optim.SGD(model.parameters(), lr=h), torch.device("cpu"))
        owner = Owner((lose_at or {}).get(k))
        points.append(open_point(k, cfg, run, owner, state, Ranks(), COLUMNS, "none"))
        owner.point = points[-1]
    return points, plain(points[0].cfg.train)


def rows(pt):
    header, body = read_metrics_table(pt.run.metrics)
    return [dict(zip(header, r)) for r in body]


@pytest.mark.parametrize("hs", [[0.5], [0.5, 0.3, 0.2]], ids=["one", "three"])
def test_each_rule_against_the_closed_form(tmp_path, hs):
    points, tc = open_set(tmp_path, hs, max_steps=12, eval_every=5, checkpoint_every=4)
    backend, outcomes = Quadratics(points), {}
    train_points(backend, points, tc, outcomes)
    for pt, h in zip(points, hs):
        got = rows(pt)
        assert [int(r["step"]) for r in got] == list(range(13)) and outcomes[pt.index] == ("completed", None)
        assert all(math.isclose(float(r["loss"]), loss_at(h, n), rel_tol=1e-6) for n, r in enumerate(got))
        crossings = [min(n for n in range(13) if loss_at(h, n) < t) for t in (0.1, 0.01)]
        want_tests = sorted({0, 5, 10, 12, *crossings})  # eval_every, each crossing, the last step
        assert [n for k, n in backend.tested if k == pt.index] == want_tests
        assert [n for n, r in enumerate(got) if r["test_loss"]] == want_tests
        assert [n for k, n in backend.exported if k == pt.index] == [4, 8, 12]  # checkpoint_every, the end
        assert pt.run.status()["state"] == "completed" and pt.state.crossed == [0.1, 0.01]


@pytest.mark.parametrize("hs", [[2.5], [2.5, 0.5, 2.2]], ids=["one", "three"])
def test_divergence_and_stop_loss(tmp_path, hs):
    points, tc = open_set(tmp_path, hs, max_steps=40, stop_loss=1e-4, checkpoint_every=100)
    outcomes = {}
    train_points(Quadratics(points), points, tc, outcomes)
    for pt, h in zip(points, hs):
        above = [loss_at(h, n) > 10 * loss_at(h, 0) for n in range(41)]
        diverged = next((n for n in range(2, 41) if all(above[n - 2:n + 1])), None)  # patience 3
        below = next(n for n in range(41) if loss_at(h, n) < 1e-4) if h < 1 else None
        end, state = (diverged, "diverged") if diverged is not None else (below, "completed")
        assert [int(r["step"]) for r in rows(pt)] == list(range(end + 1)), h
        assert outcomes[pt.index] == (state, None) and pt.run.status()["state"] == state
        assert pt.run.status()["step"] == end and pt.saved == {end}  # its checkpoint at the end


@pytest.mark.parametrize("hs", [[0.5], [0.5, 0.3, 0.2]], ids=["one", "three"])
def test_preemption_checkpoints_theta_n_and_a_resume_goes_on_from_it(tmp_path, monkeypatch, hs):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    points, tc = open_set(tmp_path, hs, max_steps=12, checkpoint_every=100)
    with pytest.raises(Requeue):
        train_points(Quadratics(points, signal_at=6), points, tc, {})
    for pt in points:  # the signal came during step 6, step 7 saw it: theta_7 checkpointed, its row discarded
        assert [int(r["step"]) for r in rows(pt)] == list(range(7)) and pt.saved == {7}
        assert pt.run.status()["state"] == "pending" and pt.run.status()["step"] == 7
    again, tc = open_set(tmp_path, hs, max_steps=12, checkpoint_every=100)
    assert [pt.state.step for pt in again] == [7] * len(hs)  # resumed from its own checkpoint
    outcomes = {}
    train_points(Quadratics(again), again, tc, outcomes)
    for pt, h in zip(again, hs):
        got = rows(pt)
        assert [int(r["step"]) for r in got] == list(range(13)) and outcomes[pt.index] == ("completed", None)
        assert all(math.isclose(float(r["loss"]), loss_at(h, n), rel_tol=1e-6) for n, r in enumerate(got))


@pytest.mark.parametrize("hs", [[0.5], [0.5, 0.3, 0.2]], ids=["one", "three"])
def test_a_fenced_point_writes_nothing_more(tmp_path, hs):
    points, tc = open_set(tmp_path, hs, {0: 7}, max_steps=12, checkpoint_every=4)
    outcomes = {}
    train_points(Quadratics(points), points, tc, outcomes)
    assert outcomes[0][0] == "fenced" and "taken over" in outcomes[0][1] and isinstance(points[0].error, LeaseLost)
    steps = [int(r["step"]) for r in rows(points[0])]  # rows past the checkpoint of 4 may still be buffered
    assert steps == list(range(len(steps))) and 4 <= len(steps) <= 7  # none from step 7, where it lost its lease
    assert points[0].run.status()["state"] == "pending" and points[0].run.status()["step"] == 4
    for pt in points[1:]:  # the others went on to their end
        assert outcomes[pt.index] == ("completed", None) and len(rows(pt)) == 13


def test_a_set_where_one_diverges_one_is_fenced_and_one_finishes(tmp_path):
    points, tc = open_set(tmp_path, [2.5, 0.3, 0.5], {1: 9}, max_steps=20, checkpoint_every=5)
    backend, outcomes = Quadratics(points), {}
    train_points(backend, points, tc, outcomes)
    assert {k: v[0] for k, v in outcomes.items()} == {0: "diverged", 1: "fenced", 2: "completed"}
    ends = {0: 5, 1: 8, 2: 20}  # 2.25^n > 10 from n = 3: three steps above at n = 5; lease lost at step 9
    for pt in points:
        got, end = rows(pt), ends[pt.index]
        steps = [int(r["step"]) for r in got]  # the fenced one's rows past its checkpoint may be buffered
        if pt.index == 1:
            assert steps == list(range(len(steps))) and 5 <= len(steps) <= 9  # rows 0..4 durable, none from 9
        else:
            assert steps == list(range(end + 1))
        assert all(float(r["theta_0"]) == pytest.approx((1 - pt.cfg.optim.h) ** n) for n, r in enumerate(got))
    assert [n for k, n in backend.exported if k == 1] == [5]  # none after its lease was lost
    assert points[1].run.status()["state"] == "pending" and points[1].run.status()["step"] == 5
