"""Sweeps without a cluster: presets, validation before launch, the sweep folder, skipping,
retrying, sharing runs between sweeps, `make status`."""

import json
import os
import subprocess
import time

import pandas as pd
import pytest
import yaml

from pipeline.errors import ConfigError

from .conftest import ROOT


def make(target, tmp_path, sweep="synthetic", launcher="basic", extra="", retry=0, timeout=600, *more):
    return subprocess.run(["make", "-s", "-C", str(ROOT), target, f"SWEEP={sweep}", f"LAUNCHER={launcher}",
                           f"RUNS={tmp_path}/runs", f"SWEEPS={tmp_path}/sweeps", f"EXTRA={extra}",
                           f"RETRY={retry}", "JOBS=2", f"NAME={sweep}", *more],  # NAME: one folder whatever EXTRA
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env=dict(os.environ, WANDB_MODE="offline"))


FAST = "train.max_steps=4 data.n_train=64 data.n_test=32"


@pytest.mark.slow
def test_sweep_runs_grid_registers_and_skips(tmp_path):
    r = make("sweep", tmp_path, extra=FAST)
    assert r.returncode == 0, r.stderr
    assert "sweep synthetic: 4 runs, 4 to launch, 0 skipped" in r.stdout
    folder = tmp_path / "sweeps" / "synthetic"
    links = sorted(p for p in folder.iterdir() if p.is_symlink())
    assert len(links) == 4 and all((p / "status.json").exists() for p in links)
    states = {json.loads((p / "status.json").read_text())["state"] for p in links}
    assert states == {"completed"}
    plan = json.loads((folder / "plan.json").read_text())
    betas_rhos = {tuple(sorted(o for o in pt["overrides"] if o.startswith("optim."))) for pt in plan["points"]}
    assert betas_rhos == {(f"optim.beta={b}", f"optim.rho={r}") for b in ("0.9", "0.99") for r in ("0.99", "0.999")}
    # rerun: nothing to do, nothing touched
    mtimes = {p.name: (p / "metrics.csv").stat().st_mtime_ns for p in links}
    r = make("sweep", tmp_path, extra=FAST)
    assert r.returncode == 0 and "0 to launch, 4 skipped" in r.stdout
    assert mtimes == {p.name: (p / "metrics.csv").stat().st_mtime_ns for p in links}
    # status table
    s = make("status", tmp_path)
    assert s.returncode == 0 and "4 runs: 4 completed" in s.stdout
    assert all(p.name in s.stdout for p in links)
    # analysis finds the sweep's runs through the links
    a = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "analysis", str(folder), "--no-figures"],
                       capture_output=True, text=True, cwd=ROOT)
    assert a.returncode == 0, a.stderr
    summary = pd.read_csv(folder / "analysis" / "summary.csv")
    assert len(summary) == 4 and set(summary.beta) == {0.9, 0.99}


@pytest.mark.slow
def test_sweeps_share_runs_and_retry_reruns_diverged(tmp_path):
    assert make("sweep", tmp_path, extra=FAST).returncode == 0
    # an ad-hoc grid overlapping the preset: same run ids, nothing rerun
    r = make("sweep", tmp_path, extra=f"{FAST} sweep.name=other optim.beta=0.9 optim.rho=0.99,0.5")
    assert r.returncode == 0, r.stderr
    assert "sweep other: 2 runs, 1 to launch, 1 skipped" in r.stdout
    a, b = tmp_path / "sweeps" / "synthetic", tmp_path / "sweeps" / "other"
    shared = {p.name for p in a.iterdir() if p.is_symlink()} & {p.name for p in b.iterdir() if p.is_symlink()}
    assert len(shared) == 1
    assert (a / next(iter(shared))).resolve() == (b / next(iter(shared))).resolve()
    other_states = [json.loads((p / "status.json").read_text())["state"] for p in b.iterdir() if p.is_symlink()]
    assert other_states == ["completed", "completed"]  # the new point ran, the shared one was kept
    # a diverging grid point ends `diverged`, the sweep goes on, RETRY=1 reruns it
    r = make("sweep", tmp_path, extra=f"{FAST} sweep.name=div optim.beta=0.9 optim.rho=0.99 optim.h=1e30,1e-3")
    assert r.returncode == 0, r.stderr
    st = make("status", tmp_path, sweep="div")
    assert "1 completed, 1 diverged" in st.stdout
    r = make("sweep", tmp_path, extra=f"{FAST} sweep.name=div optim.beta=0.9 optim.rho=0.99 optim.h=1e30,1e-3")
    assert "0 to launch" in r.stdout
    r = make("sweep", tmp_path, extra=f"{FAST} sweep.name=div optim.beta=0.9 optim.rho=0.99 optim.h=1e30,1e-3", retry=1)
    assert "1 to launch" in r.stdout


@pytest.mark.parametrize("extra,key", [("optim.beta=1.2", "optim.beta"), ("optim.rho=-0.1", "optim.rho"),
                                       ("optim.h=0", "optim.h"), ("optim.rho=0.9,1.5", "optim.rho"),
                                       ("model.name=vgg", "model")])
def test_bad_grid_value_rejected_before_launch(tmp_path, extra, key):
    r = make("sweep", tmp_path, extra=f"{FAST} {extra}")
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {key}=") and "allowed" in err[0], r.stderr
    assert not (tmp_path / "runs").exists()  # nothing launched, nothing created


def test_unknown_model_lists_the_choices(tmp_path):
    r = make("sweep", tmp_path, extra=f"{FAST} model=vgg")
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(err) == 1
    assert err[0] == ("error: model=vgg: unknown option; available: authors_cnn, bilinear, cnn, custom, mlp, "
                      "resnet101, resnet18, resnet50, vit")
    assert not (tmp_path / "runs").exists()


def test_unknown_preset_lists_available(tmp_path):
    r = make("sweep", tmp_path, sweep="nope")
    assert r.returncode != 0
    assert "unknown preset" in r.stderr and "toy" in r.stderr and "fig5" in r.stderr


@pytest.mark.slow
def test_local_launcher_runs_jobs_in_parallel_batches(tmp_path):
    r = make("sweep", tmp_path, launcher="local", extra=FAST)
    assert r.returncode == 0, r.stderr + r.stdout
    s = make("status", tmp_path)
    assert "4 runs: 4 completed" in s.stdout


def test_presets_compose_and_validate():
    from hydra import compose, initialize_config_dir

    from pipeline.config.validate import validate
    from pipeline.dispatch.cli import presets

    assert {"toy", "synthetic", "quick", "fig4", "fig5", "fig6", "fig7", "hgrid"} <= set(presets())
    expect = {"fig4": ("resnet50", "cifar10", 7.5e-5), "fig5": ("resnet50", "cifar10", 1e-4),
              "fig6": ("resnet101", "cifar10", 1e-4), "fig7": ("resnet101", "cifar100", 1e-4)}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in presets():
            cfg = compose(config_name="train", overrides=[f"sweep={name}"], return_hydra_config=True)
            if name == "custom":  # your own model and data: their targets and the grid come in EXTRA
                with pytest.raises(ConfigError, match=r"model._target_=null: model=custom needs model._target_"):
                    validate(cfg)
                continue
            assert cfg.sweep.name == name and cfg.hydra.sweeper.params
            validate(cfg)
            if name in expect:
                assert (cfg.model.name, cfg.data.name, cfg.optim.h) == expect[name]
                assert cfg.optim.eps == 1e-8
        fig5 = compose(config_name="train", overrides=["sweep=fig5"], return_hydra_config=True)
        assert fig5.optim.rho == 0.999 and "optim.beta" in fig5.hydra.sweeper.params


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    r = make("sweep", tmp_path, "synthetic", "basic", FAST, 0, 600, "DRY=1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "sweep synthetic: 4 runs, 4 to launch, 0 skipped" in lines[0]
    assert lines[1].startswith("  PACK=auto: 4 runs in 1 pack of 4 (each pack trains its runs together")
    assert lines[2].split() == ["run_id", "point", "action"]
    assert all(ln.split()[-1] == "launch" for ln in lines[3:7]) and "dry run" in lines[7]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_a_live_run_is_reported_and_never_submitted_again(tmp_path):
    """A run whose lease is held (here by a process on another node, heartbeat fresh) is live:
    the sweep reports it and launches the others only."""
    plan = make("sweep", tmp_path, "synthetic", "basic", FAST, 0, 600, "DRY=1")
    live_id = plan.stdout.splitlines()[3].split()[0]
    run = tmp_path / "runs" / live_id
    run.mkdir(parents=True)
    (run / "lease.json").write_text(json.dumps(dict(host="node-elsewhere", pid=4242, slurm_job="77_1",
                                                    timeout_s=600)))
    r = make("sweep", tmp_path, extra=FAST)
    assert r.returncode == 0, r.stderr
    assert "4 runs, 3 to launch, 1 skipped (1 live)" in r.stdout
    assert f"{live_id} " in r.stdout and "held by node-elsewhere:4242 (Slurm job 77_1)" in r.stdout
    assert not (run / "metrics.csv").exists()  # untouched
    s = make("status", tmp_path)
    row = [ln for ln in s.stdout.splitlines() if ln.startswith(live_id)][0]
    assert row.split()[4] == "running" and "3 completed" in s.stdout
    # the holder's heartbeat stops: after its timeout the run is launched (and resumed)
    old = time.time() - 3600
    os.utime(run / "lease.json", (old, old))
    r = make("sweep", tmp_path, extra=FAST)
    assert "1 to launch, 3 skipped" in r.stdout, r.stdout
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert not (run / "lease.json").exists()  # taken over, then released


@pytest.mark.slow
def test_runs_and_sweeps_variables_reach_every_target(tmp_path):
    r = make("sweep", tmp_path, extra=FAST)
    assert r.returncode == 0 and (tmp_path / "runs").is_dir() and (tmp_path / "sweeps" / "synthetic").is_dir()
    assert "4 runs: 4 completed" in make("status", tmp_path).stdout
    a = make("analyze", tmp_path, "synthetic", "basic", "", 0, 600, "ARGS=--no-figures")
    assert a.returncode == 0, a.stderr
    assert (tmp_path / "sweeps" / "synthetic" / "analysis" / "summary.csv").exists()
    s = make("sync", tmp_path)
    assert s.returncode == 0 and f"no offline wandb runs of sweep synthetic under {tmp_path}/runs" in s.stdout
    assert not (ROOT / "runs").exists() or not any(
        p.name in {q.name for q in (tmp_path / "runs").iterdir()} for p in (ROOT / "runs").iterdir())
    assert not (ROOT / "train.log").exists()


@pytest.mark.slow
def test_run_ids_of_existing_presets_never_change():
    """Run ids are where results live: every preset grid point has the id pinned in
    tests/data/preset_run_ids.json. BatchNorm presets kept theirs through every change; the
    presets without BatchNorm changed once, when the micro-batch left the id (make migrate)."""
    from pipeline.config.compose import Composer
    from pipeline.dispatch.cli import presets
    from pipeline.runs.ids import run_id

    golden = json.loads((ROOT / "tests" / "data" / "preset_run_ids.json").read_text())["ids"]
    assert len(golden) == 209
    with Composer() as c:
        for preset, point, old, now in golden:
            cfg = c.compose([f"sweep={preset}", *point.split()])
            assert run_id(cfg) == now, (preset, point)
            if old is not None:  # presets added since (regime) have no earlier id
                assert (old == now) == (cfg.model.get("norm") == "bn" or preset == "digits"), (preset, point)
        every = {run_id(c.compose(point)) for name in presets() if name != "custom"  # custom: the user's targets
                 for point in c.grid([f"sweep={name}"])}
    assert every == {now for _, _, _, now in golden}  # every point of every preset, a new one too


def test_every_key_but_the_non_semantic_ones_changes_the_run_id():
    """A key added tomorrow is semantic by default: only the listed keys leave the id alone."""
    from pipeline.config.compose import Composer
    from pipeline.runs.ids import NON_SEMANTIC, run_id

    with Composer() as c:
        base = c.compose(["sweep=synthetic"])
        rid = run_id(base)
        assert run_id(c.compose(["sweep=synthetic", "+train.new_knob=1"])) != rid
        assert run_id(c.compose(["sweep=synthetic", "+model.new_knob=1"])) != rid
        for ov in ["paths.runs=/x", "paths.sweeps=/y", "logger=wandb", "retry=true", "device=cpu",
                   "lease.timeout_s=5", "sweep.name=other", "train.checkpoint_every=3",
                   "train.log_every=2", "train.progress=none"]:
            assert run_id(c.compose(["sweep=synthetic", ov])) == rid, ov
    assert {"paths", "logger", "lease", "train.progress"} <= set(NON_SEMANTIC)


def test_preset_headers_say_what_comes_from_the_paper_and_fig7_has_rho_below_beta():
    """Every preset's header separates the paper's settings from ours (or says it is not from
    the paper); fig7 shows the hills "even if beta > rho" (Section 7): some rho below beta."""
    for f in sorted((ROOT / "conf" / "sweep").glob("*.yaml")):
        header = " ".join(line for line in f.read_text().splitlines() if line.startswith("#"))
        assert ("Paper:" in header and "Ours:" in header) or "Not from the paper" in header \
            or "Not a figure of the paper" in header, f.name
    fig7 = yaml.safe_load((ROOT / "conf" / "sweep" / "fig7.yaml").read_text())
    rhos = [float(r) for r in str(fig7["hydra"]["sweeper"]["params"]["optim.rho"]).split(",")]
    assert min(rhos) < fig7["optim"]["beta"] < max(rhos)


def test_a_sweep_whose_dataset_is_missing_stops_before_anything(tmp_path):
    """The planner checks the data of the runs it would launch: a missing CIFAR is one line with
    the command that fetches it, exit 2, no run directory, no sweep folder; DRY=1 warns."""
    over = f"train.max_steps=4 data=cifar10 data.root={tmp_path}/nodata data.download=false"
    r = make("sweep", tmp_path, "quick", "local", over)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(err) == 1, r.stdout + r.stderr
    assert f"data.root={tmp_path}/nodata: " in err[0] and f"run `make data DATA_ROOT={tmp_path}/nodata`" in err[0]
    assert "(no run was created, nothing submitted)" in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()
    dry = make("sweep", tmp_path, "quick", "local", over, 0, 600, "DRY=1")
    assert dry.returncode == 0 and "warning: data.root=" in dry.stderr and "make data" in dry.stderr
    assert not (tmp_path / "runs").exists()


def test_a_dataset_to_download_is_fetched_once_before_the_runs(tmp_path, monkeypatch, capsys):
    """data.download=true: the planner downloads it (compute nodes are often offline), once for
    all points; a failed download is the one line of the run's own failure, exit 2. Present data
    (CIFAR's real on-disk format, generated) passes."""
    from pipeline.dispatch import sweep
    from pipeline.dispatch.plan import make_plan
    from pipeline.engine import data

    extra = [f"paths.runs={tmp_path}/runs", f"paths.sweeps={tmp_path}/sweeps", "data=cifar10",
             f"data.root={tmp_path}/cifar", "data.download=true", "optim.beta=0.9,0.99"]
    plan = make_plan("quick", extra)
    assert [m[:3] for m in plan.missing_data()] == [("cifar10", f"{tmp_path}/cifar", True)]
    fetched = []
    monkeypatch.setattr(data, "download", lambda name, root: (fetched.append(name),
                                                                    data.write_fake_cifar(root, name)))
    sweep.fetch_data(plan, dry=False)
    assert fetched == ["cifar10"] and make_plan("quick", extra).missing_data() == []

    def offline(name, root):
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "download", offline)
    other = make_plan("quick", [*extra[:-3], f"data.root={tmp_path}/other", "data.download=true"])
    with pytest.raises(SystemExit) as e:
        sweep.fetch_data(other, dry=False)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the download failed (OSError: Name or service not known)" in err
    assert not (tmp_path / "runs").exists()


def test_status_shows_the_metrics_sorted_by_hyperparameters_and_watch_ends_when_nothing_is_live(tmp_path):
    r = make("sweep", tmp_path, extra=FAST)
    assert r.returncode == 0, r.stderr
    s = make("status", tmp_path, "synthetic", "basic", "", 0, 600, "WATCH=0.5")
    assert s.returncode == 0, s.stderr
    lines = s.stdout.splitlines()
    head = lines[0].split()
    assert head == ["run_id", "h", "beta", "rho", "state", "step", "last_loss", "pert_norm", "test_acc", "job",
                    "slurm_state"]
    rows = [ln.split() for ln in lines[1:5]]
    assert [(float(r[2]), float(r[3])) for r in rows] == sorted((float(r[2]), float(r[3])) for r in rows)
    assert all(r[4] == "completed" and float(r[7]) > 0 and 0 <= float(r[8]) <= 1 for r in rows)
    assert s.stdout.count("run_id") == 1  # nothing live: the table once, then done
    bad = make("status", tmp_path, "synthetic", "basic", "", 0, 600, "WATCH=soon")
    assert bad.returncode != 0 and "error: WATCH=soon: allowed values are a finite number of seconds" in bad.stderr


def test_a_running_job_is_shown_with_its_step_loss_and_time_left(tmp_path):
    """Between a run's start and end line, the local sweep prints where it is: the last whole
    row of its metrics.csv (a torn last piece is ignored) and the time left at its rate so far."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipeline.dispatch.local import progress_line
    from pipeline.runs.rundir import RunDir

    run = RunDir(tmp_path, "0123456789ab")
    run.path.mkdir()
    cfg = OmegaConf.create(dict(train=dict(max_steps=400), optim=dict(h=0.01, beta=0.9, rho=0.99)))
    p = SimpleNamespace(run=run, cfg=cfg, shown="")
    assert progress_line([p], time.time() - 3).endswith(": starting (3 s)")
    run.metrics.write_text("step,loss,acc\n0,2.5,\n1,2.25,\n100,0.125,\n10")  # "10": a row being written
    run.write_status(state="running", step=0, first_step_at=time.time() - 10.0)
    line = progress_line([p, p], time.time())
    assert line.startswith("  ...   0123456789ab h=0.01 beta=0.9 rho=0.99 (pack of 2): step 100/400, loss 0.125, ~3")
    assert line.endswith(" s left") and 29 <= float(line.split("~")[1].split()[0]) <= 31
