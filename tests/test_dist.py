"""One run over several processes (torch.distributed, gloo on CPU, started by torchrun): the
same answer as one process, rank 0 alone writing, kill and resume; ghost batch norm apart from
the memory chunk; the micro-batch probe."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.engine.setup import largest_that_fits
from pipeline.engine.step import bn_layers, full_batch_step, partition
from pipeline.runs.ids import run_id
from pipeline.runs.rundir import RunDir
from pipeline.train import train

from .conftest import ROOT, make_cfg, proc_state

BASE = ["model=cnn", "model.width=4", "data=synthetic", "data.n_train=100", "data.n_test=40",
        "data.image_size=8", "train.micro_batch=20", "train.max_steps=20", "train.eval_every=5",
        "train.checkpoint_every=7", "device=cpu", "train.progress=none"]  # 5 micro-batches


def torchrun(nproc, args, cwd, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipeline.train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def close(a, b, rtol=1e-6):
    """|a - b| <= rtol * (|a| + the tensor's own scale): relative, also for entries near zero."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = np.nanmax(np.abs(a)) if a.size else 0.0
    both_nan = np.isnan(a) & np.isnan(b)
    ok = both_nan | (np.abs(a - b) <= rtol * (np.abs(a) + scale))
    return bool(ok.all()), float(np.nanmax(np.abs(a - b) / (np.abs(a) + scale + 1e-300)))


@pytest.mark.slow
@pytest.mark.parametrize("world,extra", [
    (2, ["model.norm=bn", "train.reshuffle=true"]),
    (3, ["model.norm=none", "train.reshuffle=false"]),
    (3, ["model.norm=bn", "model.bn_group=10", "train.reshuffle=true"]),
    (2, ["model.norm=none", "train.reshuffle=true"]),
], ids=["W2-bn-reshuffle", "W3-plain", "W3-bn-groups-reshuffle", "W2-plain-reshuffle"])
def test_w_processes_give_the_one_process_answer(tmp_path, world, extra):
    """Every metric and every parameter within 1e-6 relative of the one-process run over 20
    steps, with world sizes that do not divide the 5 micro-batches; the run id is the
    one-process id and rank 0 alone wrote the run directory."""
    one = make_cfg([*BASE, *extra], runs=tmp_path / "one")
    assert train(one) == "completed"
    p = torchrun(world, [*BASE, *extra, f"paths.runs={tmp_path}/many"], tmp_path)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    assert [d.name for d in (tmp_path / "many").iterdir()] == [run_id(one)]  # world size: not semantic
    a = RunDir(tmp_path / "one", run_id(one))
    b = RunDir(tmp_path / "many", run_id(one))
    ma, mb = pd.read_csv(a.metrics).drop(columns="time_s"), pd.read_csv(b.metrics).drop(columns="time_s")
    assert mb.step.tolist() == list(range(21))  # each row once: rank 0 alone writes
    worst = 0.0
    for col in ma.columns:
        ok, rel = close(ma[col], mb[col])
        assert ok, (col, rel)
        worst = max(worst, rel)
    ta = torch.load(a.checkpoint, weights_only=True)["model"]
    tb = torch.load(b.checkpoint, weights_only=True)["model"]
    for k in ta:
        ok, rel = close(ta[k].double().numpy(), tb[k].double().numpy())
        assert ok, (k, rel)
        worst = max(worst, rel)
    st = b.status()
    assert st["state"] == "completed" and st["attempts"] == 1 and not (b.path / "lease.json").exists()
    print(f"\nW={world} {' '.join(extra)}: largest relative difference from one process {worst:.1e}")


@pytest.mark.slow
def test_the_authors_evaluation_is_refused_with_several_processes_before_any_run_directory(tmp_path):
    """Running averages follow one sequence of groups: train.eval_mode=running_stats with W = 2
    is a one-line refusal on every rank, and nothing is created."""
    p = torchrun(2, [*BASE, "model.norm=bn", "train.eval_mode=running_stats", f"paths.runs={tmp_path}/runs"],
                 tmp_path)
    out, err = p.communicate(timeout=600)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines and all(ln.startswith("error: train.eval_mode=running_stats: ") for ln in lines), err[-2000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_killed_2_process_run_resumes_identically(tmp_path):
    """Rank 0 stops itself after writing row 9; the whole torchrun process group is SIGKILLed;
    the restarted 2-process run ends identical to an uninterrupted 2-process run."""
    args = [*BASE, "model.norm=bn", "train.reshuffle=true"]
    p = torchrun(2, [*args, f"paths.runs={tmp_path}/killed"], tmp_path, env=dict(ADAM_FAULTS="row@9:stop"))
    run = RunDir(tmp_path / "killed", run_id(make_cfg(args)))
    workers = []  # torchrun starts each rank in a session of its own: its children
    while not any(proc_state(w) == "T" for w in workers if os.path.exists(f"/proc/{w}")):
        assert p.poll() is None, p.stderr.read()[-3000:]
        time.sleep(0.1)
        workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                   text=True).stdout.split()]
    for pid in [p.pid, *workers]:  # every process of the run at once, as a node failure would
        os.kill(pid, signal.SIGKILL)
    p.wait()
    assert len(run.metrics.read_text().splitlines()) == 11  # header + steps 0..9: rank 0 stopped there
    assert run.status()["state"] == "running" and torch.load(run.checkpoint, weights_only=True)["step"] == 7
    r = torchrun(2, [*args, f"paths.runs={tmp_path}/killed"], tmp_path)
    _, err = r.communicate(timeout=900)
    assert r.returncode == 0 and "resuming at step 7" in err, err[-3000:]
    ref = torchrun(2, [*args, f"paths.runs={tmp_path}/ref"], tmp_path)
    _, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    a = pd.read_csv(run.metrics).drop(columns="time_s")
    b = pd.read_csv(RunDir(tmp_path / "ref", run.id).metrics).drop(columns="time_s")
    assert a.step.tolist() == list(range(21))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert run.status()["attempts"] == 2


# -- ghost batch norm apart from the memory chunk ------------------------------------------------------
def grads(cfg_overrides, micro_batch, reshuffle_seed=None):
    from models import build_model
    from pipeline.engine.data import load_dataset

    cfg = make_cfg([*BASE, "model.norm=bn", "model.bn_group=8", "data.n_train=64", *cfg_overrides])
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(reshuffle_seed) if reshuffle_seed is not None else None
    parts = partition(64, micro_batch, gen)
    loss = full_batch_step(model, data.x_train, data.y_train, data.task, parts, params, 1e-8,
                           bn_layers(model))["loss"]
    stats = [t.clone() for m in bn_layers(model) for t in (m.running_mean, m.running_var)]
    return [p.grad.clone() for p in params], loss.item(), stats


@pytest.mark.parametrize("seed", [None, 3], ids=["fixed", "reshuffled"])
def test_micro_batches_of_1_2_4_groups_give_the_same_gradient(seed):
    """model.bn_group=8: micro-batches of 8, 16 and 32 examples normalise the same groups, so the
    gradient, the loss and the BatchNorm statistics agree to 1e-5 (with `reshuffle`, the groups
    are drawn by the same permutation whatever the micro-batch)."""
    g1, l1, s1 = grads([], 8, seed)
    for mb in (16, 32):
        g, loss, s = grads([], mb, seed)
        assert abs(loss - l1) <= 1e-5 * abs(l1)
        for a, b in zip(g1 + s1, g + s):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item()), (mb, (a - b).abs().max())
    g_other, l_other, _ = grads(["model.bn_group=16"], 16, seed)  # another group size: another experiment
    assert abs(l_other - l1) > 1e-6 * abs(l1) or any(not torch.allclose(a, b) for a, b in zip(g1, g_other))


def test_the_micro_batch_is_not_in_the_run_id_but_the_group_is():
    base = make_cfg([*BASE, "model.norm=bn", "model.bn_group=10"])
    assert run_id(make_cfg([*BASE, "model.norm=bn", "model.bn_group=10", "train.micro_batch=50"])) == run_id(base)
    assert run_id(make_cfg([*BASE, "model.norm=bn", "model.bn_group=20"])) != run_id(base)
    plain = make_cfg([*BASE, "model.norm=none"])
    assert run_id(make_cfg([*BASE, "model.norm=none", "train.micro_batch=50"])) == run_id(plain)
    # a BatchNorm run without bn_group normalises each micro-batch: there the micro-batch is the group
    old = make_cfg([*BASE, "model.norm=bn"])
    assert run_id(make_cfg([*BASE, "model.norm=bn", "model.bn_group=20"])) == run_id(old)
    assert run_id(make_cfg([*BASE, "model.norm=bn", "train.micro_batch=50"])) != run_id(old)


def test_the_probe_halves_in_whole_groups_until_it_fits():
    tried = []

    def attempt(size):
        tried.append(size)
        if size > 300:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert largest_that_fits(1000, 50, attempt) == 250 and tried == [1000, 500, 250]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        largest_that_fits(1000, 400, lambda s: (_ for _ in ()).throw(torch.OutOfMemoryError("no")))


def test_auto_micro_batch_needs_a_batchnorm_group():
    from pipeline.config.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="train.micro_batch=auto: with model.norm=bn set model.bn_group"):
        validate(make_cfg([*BASE, "model.norm=bn", "train.micro_batch=auto"]))
    with pytest.raises(ConfigError, match="train.micro_batch=30: with model.bn_group=20 allowed values are multiples"):
        validate(make_cfg([*BASE, "model.norm=bn", "model.bn_group=20", "train.micro_batch=30"]))
    validate(make_cfg([*BASE, "model.norm=bn", "model.bn_group=20", "train.micro_batch=auto"]))


def test_migrate_renames_runs_to_their_current_ids(tmp_path):
    """A run of a model without BatchNorm made while the micro-batch was part of the id is found
    under its current id after `make migrate`, and its sweep link follows it."""
    import json

    from pipeline.runs.ids import legacy_run_id
    from pipeline.runs.migrate import migrate

    golden = json.loads((ROOT / "tests/data/preset_run_ids.json").read_text())["ids"]
    moved = [r for r in golden if r[2] is not None and r[2] != r[3]]  # None: a preset added after the rule changed
    assert moved  # the presets' points that moved are pinned in the golden file, with their old ids
    for preset, point, old, _ in moved:  # the old rule, as code, against the ids it gave
        assert legacy_run_id(make_cfg([f"sweep={preset}", *point.split()])) == old, (preset, point)
    preset, point, old, new = next(r for r in moved if r[0] == "synthetic")
    cfg = make_cfg([f"sweep={preset}", *point.split(), "train.max_steps=2"], runs=tmp_path / "runs")
    cfg_new, cfg_old = run_id(cfg), legacy_run_id(cfg)
    assert train(cfg) == "completed"
    os.rename(tmp_path / "runs" / cfg_new, tmp_path / "runs" / cfg_old)  # as the old rule named it
    (tmp_path / "sweeps" / "s").mkdir(parents=True)
    (tmp_path / "sweeps" / "s" / cfg_old).symlink_to(f"../../runs/{cfg_old}")
    assert migrate(tmp_path / "runs", tmp_path / "sweeps") == [(cfg_old, cfg_new)]
    assert (tmp_path / "sweeps" / "s" / cfg_new / "metrics.csv").exists()
    assert RunDir(tmp_path / "runs", cfg_new).status()["run_id"] == cfg_new


def test_migrate_never_renames_a_run_whose_config_was_edited(tmp_path, caplog):
    """config.yaml hand-edited (beta 0.9 -> 0.95): it hashes to the folder's name under no rule,
    so `make migrate` leaves the run where it is (flagged), never passing it off as a beta = 0.95 run."""
    from pipeline.runs.migrate import migrate

    cfg = make_cfg(["sweep=synthetic", "optim.beta=0.9", "train.max_steps=2"], runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    run = RunDir(tmp_path / "runs", run_id(cfg))
    run.config.write_text(run.config.read_text().replace("beta: 0.9", "beta: 0.95"))
    assert migrate(tmp_path / "runs") == []
    assert run.path.is_dir() and "not renamed" in caplog.text and "edited" in caplog.text
