"""Fixtures: configs composed the way users compose them (pipeline.compose.Composer, Hydra's
compose API underneath, as in lightning-hydra-template)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

os.environ.setdefault("WANDB_MODE", "offline")
# one thread per process, in this one and in every process a test spawns (pipeline/threads.py reads
# it): the suite runs processes side by side on 2 cores; a test about threads sets its own
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"].split(",")[0]))


@pytest.fixture(autouse=True)
def _store_policy_reset():
    """The store policy (runs/owners.py) is process-wide, set by each train/sweep/analysis call:
    every test starts from the default (your folders only, private modes)."""
    from pipeline.runs import owners

    owners.configure({})
    yield
    owners.configure({})


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A Hydra app run in this process (the CLI tests) configures the root logger with a handler on
    the stderr of that moment, which pytest closes after the test: put the root logger back."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


def make_cfg(overrides=(), runs=None):
    """The config of `overrides` as users get it: through pipeline.compose.Composer, the path
    of `make sweep` and of the training CLI's pre-check (one-line ConfigError on a bad one)."""
    from pipeline.config.compose import Composer

    with Composer() as c:
        cfg = c.compose(list(overrides))
    if runs is not None:
        with open_dict(cfg):
            cfg.paths.runs = str(runs)
            cfg.paths.sweeps = str(Path(runs).parent / "sweeps")
    return cfg


TINY = ["model=cnn", "model.width=4", "data=synthetic", "data.n_train=96", "data.n_test=40",
        "data.image_size=8", "train.micro_batch=40", "train.max_steps=12", "train.eval_every=5",
        "train.checkpoint_every=4", "train.progress=none", "device=cpu"]


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides, tiny=True):
        return make_cfg((TINY if tiny else []) + list(overrides), runs=tmp_path / "runs")
    return factory


def run_cli(args, cwd, timeout=300, env=None):
    """`python -m <args>` in a subprocess, from the repository's root on sys.path."""
    e = dict(os.environ, **{"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def proc_state(pid: int) -> str:
    """One letter: R running, S sleeping, T stopped, Z zombie, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def start_stopped_at(tmp_path, args, step, env=None, faults=None):
    """A child training process that stops itself (SIGSTOP) right after writing row `step`
    (failpoint `row@step:stop`): a kill or a signal from outside then lands at a known moment,
    never racing the child to the end of its run. Waits by progress, not by the clock."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), ADAM_FAULTS=faults or f"row@{step}:stop", **(env or {}))
    p = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc_state(p.pid) != "T":
        assert p.poll() is None, f"the child ended before step {step}: {p.stderr.read()}"
        time.sleep(0.05)
    return p


@contextlib.contextmanager
def crash_at_step(monkeypatch, step: int, message: str):
    """In this block, the training loop's gradient computation raises at step `step` (a crash of
    the training code, as a CUDA error or a node failure would be)."""
    import pipeline.engine.single as pt

    real, calls = pt.full_batch_step, []

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == step + 1:
            raise RuntimeError(message)
        return real(*a, **k)

    monkeypatch.setattr(pt, "full_batch_step", crashing)
    try:
        yield
    finally:
        monkeypatch.setattr(pt, "full_batch_step", real)
