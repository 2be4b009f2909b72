"""Every bad input -> one line `error: <key>=<value>: <why>`, exit status 2, no traceback, no run
directory. The catalogue goes through the training CLI's entry point (`pipeline.train.cli`,
what `python -m pipeline.train` runs), in this process; a sample also as real processes."""

import os
import pickle
import shutil
import subprocess

import pytest

from pipeline.engine.data import write_fake_cifar
from pipeline.train import cli

from .conftest import run_cli

SYN = ["model=cnn", "model.width=4", "data=synthetic", "data.n_train=32", "data.n_test=16",
       "data.image_size=8", "train.max_steps=2", "device=cpu", "train.progress=none"]
CIFAR = ["model=cnn", "model.width=4", "data=cifar10", "data.download=false", "train.max_steps=2",
         "device=cpu", "train.progress=none"]

# (overrides, the line starts with, it also says)
CATALOGUE = [
    # optimizer
    (["optim.beta=1.2"], "optim.beta=1.2: ", "allowed range [0, 1)"),
    (["optim.rho=-0.1"], "optim.rho=-0.1: ", "allowed range [0, 1)"),
    (["optim.h=0"], "optim.h=0: ", "allowed range (0, inf]"),
    (["optim.h=1e100"], "optim.h=1e+100: ", "not representable in float32"),
    (["optim.h=1e36", "optim.beta=0.999"], "optim.h=1e+36: ", "h / (1 - beta) with beta=0.999 = 1e+39 is not"),
    (["optim.eps=0"], "optim.eps=0: ", "allowed range (0, inf]"),
    (["optim.eps=1e-50"], "optim.eps=1e-50: ", "not representable in float32"),
    (["optim=sgd"], "optim=sgd: ", "unknown option; available: adam, gd, momentum, rmsprop"),
    (["optim=gd", "optim.beta=0.9"], "optim.beta=0.9: ", "unknown key; optim has: name, h, eps"),
    (["optim.betta=0.9"], "optim.betta=0.9: ", "did you mean optim.beta?"),
    (["lr=1e-3"], "lr=1e-3: ", "unknown key; this pipeline calls it optim.h"),
    (["optim.lr=1e-3"], "optim.lr=1e-3: ", "unknown key; this pipeline calls it optim.h"),
    (["optim.learning_rate=1e-3"], "optim.learning_rate=1e-3: ", "calls it optim.h"),
    (["optim.beta1=0.9"], "optim.beta1=0.9: ", "calls it optim.beta"),
    (["optim.beta2=0.99"], "optim.beta2=0.99: ", "calls it optim.rho"),
    (["epochs=10"], "epochs=10: ", "calls it train.max_steps (full batch: one step per epoch)"),
    (["train.batch_size=128"], "train.batch_size=128: ", "calls it train.micro_batch (memory only"),
    (["optim.beta=["], "optim.beta=[: ", "not a valid override"),
    (["optim.beta=0.9,0.99"], "optim.beta=0.9,0.99: ", "a grid of values"),
    (["optim.eps_inside=maybe"], "optim.eps_inside=maybe: ", "allowed values are true, false"),
    # model
    (["model=resnet9000"], "model=resnet9000: ", "available: authors_cnn, bilinear, cnn, custom, mlp, resnet101, "
                                                 "resnet18, resnet50, vit"),
    (["model=vit", "model.patch_size=5"], "model.patch_size=5: ", "must split into whole patches"),
    (["model=vit", "model.dim=510"], "model.dim=510: ", "multiple of 4"),
    (["model=vit", "model.heads=0"], "model.heads=0: ", "integers >= 1"),
    (["model=custom"], "model._target_=null: ", "model=custom needs model._target_=<package.module.name>"),
    (["model=custom", "model._target_=nopkg_xyz.Net"], "model._target_=nopkg_xyz.Net: ", "cannot import nopkg_xyz"),
    (["model=custom", "model._target_=torch.nn.NoSuchLayer"], "model._target_=torch.nn.NoSuchLayer: ",
     "module torch.nn has no NoSuchLayer"),
    (["model=custom", "model._target_=math.pi"], "model._target_=math.pi: ", "float is not callable"),
    (["model=custom", "model._target_=Net"], "model._target_=Net: ", "dotted paths"),
    (["+model._target_=torch.nn.Linear"], "model._target_=torch.nn.Linear: ", "goes with model=custom"),
    (["model=authors_cnn", "data.image_size=4"], "data.image_size=4: ", "model=authors_cnn halves the image three"),
    (["model.width=-4"], "model.width=-4: ", "integers >= 1"),
    (["model.width=0"], "model.width=0: ", "integers >= 1"),
    (["model.norm=ln"], "model.norm=ln: ", "allowed values are bn, gn, none"),
    (["model=resnet18", "model.norm=gn", "model.width=48"], "model.width=48: ", "multiple of 32"),
    (["model=mlp", "model.depth=-1"], "model.depth=-1: ", "integers >= 0"),
    (["model=mlp", "model.activation=foo"], "model.activation=foo: ", "allowed values are relu, tanh, gelu"),
    (["model=bilinear", "data=bilinear", "model.theta0=[1.0]", "model.width=4"], "model.width=4: ",
     "unknown key; model has: name, theta0"),
    (["model=bilinear", "data=bilinear", "model.theta0=[1.0]"], "model.theta0=[1.0]: ", "two finite numbers"),
    (["model=bilinear", "data=bilinear", "data.x=inf"], "data.x=inf: ", "allowed range [-inf, inf]"),
    (["model.widht=3"], "model.widht=3: ", "did you mean model.width?"),
    # data
    (["data=imagenet"], "data=imagenet: ", "available: bilinear, cifar10, cifar100, custom, digits, eurosat, "
                                           "synthetic"),
    (["data.std=n"], "data.std=n: ", "allowed values are unbiased, population"),
    (["data=eurosat", "data.split_seed=-2"], "data.split_seed=-2: ", "integers >= 0"),
    (["data=eurosat", "data.subset=30000"], "data.subset=30000: ", "<= 21600"),
    (["data=custom"], "data._target_=null: ", "data=custom needs data._target_"),
    (["data=custom", "data._target_=nopkg_xyz.load"], "data._target_=nopkg_xyz.load: ", "cannot import nopkg_xyz"),
    (["data.num_classes=0"], "data.num_classes=0: ", "integers >= 2"),
    (["data.noise=nan"], "data.noise=nan: ", "allowed range [0, inf]"),
    (["data.image_size=0"], "data.image_size=0: ", "integers >= 1"),
    (["data.image_size=4"], "data.image_size=4: ", "model=cnn halves the image three times"),
    (["data.subset=600"], "data.subset=600: ", "integers >= 1 and <= 32"),
    (["data.n_train=0"], "data.n_train=0: ", "integers >= 1"),
    (["model=cnn", "data=bilinear"], "model=cnn, data=bilinear: ", "the bilinear model runs on data=bilinear"),
    (["data=cifar10", "data.subset=60000"], "data.subset=60000: ", "integers >= 1 and <= 50000"),
    (["data=cifar100", "data.per_class=501"], "data.per_class=501: ", "integers >= 1 and <= 500"),
    # training and the rest
    (["train.max_steps=-1"], "train.max_steps=-1: ", "integers >= 0"),
    (["train.micro_batch=0"], "train.micro_batch=0: ", "integers >= 1"),
    (["train.stop_loss=abc"], "train.stop_loss=abc: ", "allowed range (0, inf] or null"),
    (["train.diverge_factor=0.5"], "train.diverge_factor=0.5: ", "allowed range (1, inf] or null"),
    (["train.diverge_patience=0"], "train.diverge_patience=0: ", "integers >= 1"),
    (["data=digits", "data.split_seed=-1"], "data.split_seed=-1: ", "integers >= 0"),
    (["data=digits", "data.subset=2000"], "data.subset=2000: ", "<= 1437"),
    (["train.loss=huber"], "train.loss=huber: ", "allowed values are auto, ce, mse"),
    (["model=bilinear", "data=bilinear", "train.loss=mse"], "train.loss=mse: ", "a regression with the loss 1/2"),
    (["train.loss={_target_:nopkg_xyz.f}"], "train.loss._target_=nopkg_xyz.f: ", "cannot import nopkg_xyz"),
    (["train.loss={reduction:sum}"], "train.loss._target_=null: ", "needs train.loss._target_"),
    (["train.loss._target_=mypkg.f"], "train.loss._target_=mypkg.f: train.loss holds a value, not keys; "
                                      "+train.loss._target_=mypkg.f replaces", "docs/custom.md"),
    (["+train.loss._target_=nopkg_xyz.f"], "train.loss._target_=nopkg_xyz.f: ", "cannot import nopkg_xyz"),
    (["train.eval_mode=eval"], "train.eval_mode=eval: ", "allowed values are exact, running_stats"),
    (["mode=faithful"], "mode=faithful: ", "unknown option; available: exact, paper"),
    (["train.loss_thresholds=[0.1,-1]"], "train.loss_thresholds=[0.1, -1]: ", "positive numbers"),
    (["train.max_step=3"], "train.max_step=3: ", "did you mean train.max_steps?"),
    (["seed=abc"], "seed=abc: ", "integers >= 0"),
    (["precision=fp16"], "precision=fp16: ", "allowed values are fp32, tf32, bf16, fp64, torch_default"),
    (["device=tpu"], "device=tpu: ", "allowed values are auto, cpu, cuda"),
    (["compile=maybe"], "compile=maybe: ", "allowed values are true, false"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode=sometimes: ", "auto, online, offline, disabled"),
    (["logger=mlflow"], "logger=mlflow: ", "unknown option; available: none, wandb"),
    (["lease.heartbeat_s=1000"], "lease.heartbeat_s=1000: ", "allowed range (0, 600)"),
    (["foo=1"], "foo=1: ", "unknown key; top-level keys are: model, data, optim"),
    (["-m", "optim.rho=0.9,1.5"], "optim.rho=1.5: ", "allowed range [0, 1) (grid point: optim.rho=1.5)"),
]


@pytest.fixture
def broken(tmp_path):
    """Paths and datasets that are bad inputs only when the run gets to them."""
    (tmp_path / "afile").write_text("x")
    good = write_fake_cifar(tmp_path / "fake", n_train=100, n_test=20)
    trunc = tmp_path / "trunc"
    shutil_copy(good, trunc / "cifar-10-batches-py")
    raw = (trunc / "cifar-10-batches-py" / "data_batch_3").read_bytes()
    (trunc / "cifar-10-batches-py" / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    junk = tmp_path / "junk"
    shutil_copy(good, junk / "cifar-10-batches-py")
    (junk / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": 5}) + b"\0" * 100)
    return tmp_path


def shutil_copy(src, dst):
    shutil.copytree(src, dst)


RUNTIME = [  # (overrides with {tmp}, the line starts with, it also says)
    (SYN + ["paths.runs={tmp}/afile"], "paths.runs={tmp}/afile: ", "not a directory"),
    (SYN + ["paths.runs={tmp}/afile/runs"], "paths.runs={tmp}/afile/runs: ", "is not a directory"),
    (CIFAR + ["data.root={tmp}/nowhere"], "data.root={tmp}/nowhere: ", "not found; run `make data"),
    (CIFAR + ["data.root={tmp}/trunc"], "data.root={tmp}/trunc: {tmp}/trunc/cifar-10-batches-py/data_batch_3 ",
     "damaged or not a CIFAR batch"),
    (CIFAR + ["data.root={tmp}/junk"], "data.root={tmp}/junk: {tmp}/junk/cifar-10-batches-py/test_batch ",
     "damaged or not a CIFAR batch"),
    (CIFAR + ["data.root={tmp}/fake", "data.subset=500"], "data.subset=500: ",
     "larger than the 100 training examples of data=cifar10"),
    (CIFAR + ["data.root={tmp}/fake", "data.per_class=50"], "data.per_class=50: ",
     "larger than the"),
    (CIFAR + ["data=eurosat", "data.download=false", "data.root={tmp}/nowhere"], "data.root={tmp}/nowhere: ",
     "eurosat/2750 not found; run `make data DATASETS=eurosat"),
]


def one_error_line(capsys, argv, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        cli(argv)
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert e.value.code == code, out.err
    assert "Traceback" not in out.err + out.out
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    return lines[0][len("error: "):]


def base_for(overrides):
    """SYN, without the keys of the groups that the case chooses itself."""
    chosen = {o.split("=")[0] for o in overrides if "=" in o and "." not in o.split("=")[0]}
    return [a for a in SYN if a.split("=")[0].split(".")[0] not in chosen]


@pytest.mark.parametrize("overrides,starts,says", CATALOGUE, ids=[" ".join(c[0]) for c in CATALOGUE])
def test_bad_config_is_one_line_and_nothing_is_created(tmp_path, capsys, overrides, starts, says):
    line = one_error_line(capsys, [*base_for(overrides), f"paths.runs={tmp_path}/runs", *overrides])
    assert line.startswith(starts) and says in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,starts,says", RUNTIME, ids=[c[0][-1] for c in RUNTIME])
def test_bad_paths_and_data_are_one_line_and_nothing_is_created(broken, capsys, overrides, starts, says):
    runs = broken / "runs"
    argv = [o.format(tmp=broken) for o in overrides]
    argv = argv + ([f"paths.runs={runs}"] if not any(a.startswith("paths.runs") for a in argv) else [])
    line = one_error_line(capsys, argv)
    assert line.startswith(starts.format(tmp=broken)) and says in line, line
    assert not runs.exists()


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory this process cannot write into, root or not (a read-only tmpfs for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"root cannot be refused a write without a read-only mount: {r.stderr.decode().strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_read_only_runs_root_is_one_line(readonly_dir, capsys):
    line = one_error_line(capsys, [*SYN, f"paths.runs={readonly_dir}/runs"])
    assert line.startswith(f"paths.runs={readonly_dir}/runs: {readonly_dir} is not writable"), line
    assert not (readonly_dir / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["model=resnet9000"], ["optim.h=1e100"], ["optim.betta=0.9"],
                                       ["data=cifar10", "data.root={tmp}/trunc", "data.download=false"]])
def test_a_real_process_exits_2_with_one_line(broken, overrides):
    argv = [o.format(tmp=broken) for o in overrides]
    r = run_cli(["pipeline.train", *base_for(argv), *argv, f"paths.runs={broken}/runs"], cwd=broken)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (broken / "runs").exists()


@pytest.mark.parametrize("overrides", [
    ["sweep=toy", "optim.h=1e-2", "optim.beta=0.9"],
    ["model=mlp", "data=digits", "optim.eps=1e-6", "train.max_steps=7", "train.loss_thresholds=[0.5,0.1]"],
    ["sweep=fig4", "model.bn_group=500", "optim.rho=0.999", "paths.runs=/x"],
    ["optim=rmsprop", "optim.rho=0.5", "seed=3"],
    ["+note=hello", "optim.h=1", "train.stop_loss=null"],
    ["sweep=digits", "optim=gd", "optim.h=0.1"],
    ["sweep=fig5", "mode=paper", "optim.beta=0.9"],
    ["model=vit", "data=eurosat", "train.loss=mse"],
])
def test_a_grid_point_composed_by_its_values_is_the_config_hydra_composes(overrides):
    """The planner's shortcut (config groups composed once, values applied by Hydra's own step)
    gives exactly Hydra's full composition: the same keys, values, types and struct flag."""
    from omegaconf import OmegaConf, open_dict

    from pipeline.config.compose import Composer

    with Composer() as c:
        c.compose(["sweep=toy"])  # a cache with something else in it first
        fast = c.compose(overrides)
        full = c.compose(overrides, hydra=True)
    with open_dict(full):
        del full["hydra"]
    assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(full)
    assert OmegaConf.is_struct(fast) == OmegaConf.is_struct(full)
    assert [type(fast.optim[k]) for k in fast.optim] == [type(full.optim[k]) for k in full.optim]
