"""The training state: the checkpoint is exactly TrainState.state_dict(), and checkpoints in the
format runs already have on disk (also the older one without the divergence counters) resume to
the uninterrupted run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline import faults
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.runs.state import KEYS, REQUIRED, TrainState
from pipeline.train import train


def _state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # Adam's m, v are non-trivial
    return TrainState(model, opt, torch.device("cpu"), torch.Generator().manual_seed(seed + 1), step=7,
                      crossed=[0.1], loss0=2.3, above=3, time_s=1.5)


def test_state_dict_holds_the_named_keys_and_round_trips():
    a = _state(0)
    ck = a.state_dict(time_s=4.0)
    assert tuple(ck) == KEYS and set(ck) >= REQUIRED
    b = _state(5)  # other weights, other optimizer state, other generators
    torch.manual_seed(99)
    b.load_state_dict(ck)
    assert b.step == 7 and b.crossed == [0.1] and (b.loss0, b.above) == (2.3, 3) and b.time_s == 4.0
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    first = torch.rand(3)  # drawn right after the load: from the checkpoint's generator state
    torch.set_rng_state(ck["rng_cpu"])
    assert torch.equal(first, torch.rand(3))
    assert torch.equal(torch.rand(2, generator=b.shuffle), torch.rand(2, generator=a.shuffle))


def _interrupted_then_resumed(cfg, monkeypatch, edit=None):
    def interrupt(name, step=None):
        if name == "step" and step == 6:
            raise KeyboardInterrupt
    monkeypatch.setattr(faults, "point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    run = RunDir(cfg.paths.runs, run_id(cfg))
    if edit:
        ck = torch.load(run.checkpoint, weights_only=True)
        torch.save(edit(ck), run.checkpoint)
    assert train(cfg) == "completed"
    return pd.read_csv(run.metrics).drop(columns="time_s")


@pytest.mark.slow
@pytest.mark.parametrize("edit", [
    None,
    lambda ck: {k: ck[k] for k in ("model", "optimizer", "step", "crossed", "time_s", "rng_cpu", "rng_cuda",
                                   "rng_shuffle")},  # written before the divergence rule: no `diverge`
], ids=["today", "before-the-divergence-rule"])
def test_a_checkpoint_on_disk_resumes_to_the_uninterrupted_run(cfg_factory, tmp_path, monkeypatch, edit):
    over = ("train.max_steps=10", "train.checkpoint_every=4", "train.reshuffle=true", "model.norm=bn")
    whole = cfg_factory(*over)
    assert train(whole) == "completed"
    reference = pd.read_csv(RunDir(whole.paths.runs, run_id(whole)).metrics).drop(columns="time_s")
    from omegaconf import open_dict

    cut = cfg_factory(*over)
    with open_dict(cut):
        cut.paths.runs = str(tmp_path / "cut")
    resumed = _interrupted_then_resumed(cut, monkeypatch, edit)
    pd.testing.assert_frame_equal(resumed, reference)  # every column, exactly
