"""Your own model, data and loss through `_target_` (docs/custom.md): the page's example run as it
is written (its package written to a folder outside the repository, its `make sweep` commands
run), what the targets return checked with one line before any run directory exists, and the
target with its arguments in the run id."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.runs.ids import run_id
from pipeline.train import train

from .conftest import make_cfg
from .test_inputs import one_error_line

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "custom.md"


def doc_package(where: Path) -> Path:
    """The page's python blocks, each written to the file its first line names (`# mypkg/x.py`)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks
    for code in blocks:
        name = code.splitlines()[0].removeprefix("# ").strip()
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(code)
    return where


def doc_commands() -> list[str]:
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S) if "make sweep" in c]


@pytest.mark.slow
def test_the_pages_example_sweeps_end_to_end(tmp_path):
    code = doc_package(tmp_path / "code")
    commands = doc_commands()
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command.replace("$HOME/code", str(code)))
        env_assign, argv = argv[0], argv[1:]
        assert env_assign.startswith("PYTHONPATH=") and argv[:2] == ["make", "sweep"]
        env = dict(os.environ, PYTHONPATH=env_assign.split("=", 1)[1], OMP_NUM_THREADS="1")
        r = subprocess.run([*argv[:2], "-s", "-C", str(ROOT), *argv[2:], f"RUNS={tmp_path}/runs",
                            f"SWEEPS={tmp_path}/sweeps"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "2 completed" in r.stdout, r.stdout
    for name, loss in (("moons", "auto"), ("moons-hinge", "mypkg.squared_hinge")):
        links = sorted((tmp_path / "sweeps" / name).glob("*/status.json"))
        assert len(links) == 2, name
        for status in links:
            assert json.loads(status.read_text())["state"] == "completed"
            config = yaml.safe_load((status.parent / "config.yaml").read_text())
            assert config["model"] == {"name": "custom", "_target_": "mypkg.TwoLayer", "hidden": 16}
            assert config["data"] == {"name": "custom", "_target_": "mypkg.two_moons", "std": "unbiased", "n": 200}
            assert config["train"]["loss"] == (loss if loss == "auto" else {"_target_": loss, "margin": 0.5})
            rows = (status.parent / "metrics.csv").read_text().splitlines()
            header, last = rows[0].split(","), rows[-1].split(",")
            assert len(rows) == 32 and 0.5 < float(last[header.index("test_acc")]) <= 1  # learned something


PKG = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, input_shape, out=None):
        super().__init__()
        self.lin = nn.Linear(input_shape[0], out or num_classes)

    def forward(self, x):
        return self.lin(x)


class NotAModule:
    def __init__(self, **kw):
        pass


def load(n=20, kind="ok"):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, generator=g), torch.randint(0, 4, (n,), generator=g)
    if kind == "three":
        return x, y, x
    if kind == "labels":
        return x, y - 1, x, y
    if kind == "nonfinite":
        return x * float("nan"), y, x, y
    if kind == "regression":
        return x, x[:, :2] * 2, x, x[:, :2] * 2
    if kind == "flat_targets":
        return x, x[:, 0], x, x[:, 0]
    if kind == "flat_uint8":
        return (x > 0).to(torch.uint8), y, (x > 0).to(torch.uint8), y
    return x, y, x[:5], y[:5]


def vector_loss(out, y):
    return (out ** 2).sum(1)


def mean_ce(out, y, scale=1.0):
    return scale * torch.nn.functional.cross_entropy(out, y, reduction="sum")
'''

BASE = ["model=custom", "model._target_=userpkg.Net", "data=custom", "data._target_=userpkg.load",
        "train.max_steps=2", "train.progress=none", "device=cpu"]


@pytest.fixture
def userpkg(tmp_path, monkeypatch):
    (tmp_path / "code" / "userpkg").mkdir(parents=True)
    (tmp_path / "code" / "userpkg" / "__init__.py").write_text(PKG)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield tmp_path
    sys.modules.pop("userpkg", None)


@pytest.mark.parametrize("extra,starts,says", [
    (["+model.out=7"], "model._target_=userpkg.Net: output (2, 7) for input (2, 3); allowed: (2, 4)",
     "logit per class"),
    (["model._target_=userpkg.NotAModule"], "model._target_=userpkg.NotAModule: returned a NotAModule",
     "torch.nn.Module"),
    (["+model.depth=3"], "model._target_=userpkg.Net: calling it with", "TypeError"),
    (["+data.kind=three"], "data._target_=userpkg.load: returned tuple", "(x_train, y_train, x_test, y_test)"),
    (["+data.kind=labels"], "data._target_=userpkg.load: labels must be", "[0, num_classes"),
    (["+data.kind=nonfinite"], "data._target_=userpkg.load: x_train is torch.float32", "finite floats"),
    (["+data.kind=flat_targets", "+model.out=1"], "data._target_=userpkg.load: y is torch.float32 (20,)",
     "float targets N x k"),
    (["+data.kind=flat_uint8"], "data._target_=userpkg.load: uint8 x_train (20, 3)", "N x C x H x W"),
    (["+data.kind=regression", "+model.out=2", "train.loss=mse"], "train.loss=mse: data=custom gives float targets",
     "allowed: auto"),
    (["train.loss={_target_:userpkg.vector_loss}"], "train.loss._target_=userpkg.vector_loss: returned (2,)",
     "0-d float tensor"),
    (["train.loss={_target_:userpkg.mean_ce,bogus:1}"], "train.loss._target_=userpkg.mean_ce: calling it on",
     "unexpected keyword"),
    (["model.name=mlp"], "model._target_=userpkg.Net: a model of your own goes with model=custom",
     "docs/custom.md"),
])
def test_what_a_target_returns_is_checked_before_any_run_directory(userpkg, capsys, extra, starts, says):
    line = one_error_line(capsys, [*BASE, *extra, f"paths.runs={userpkg}/runs"])
    assert line.startswith(starts) and says in line, line
    assert not (userpkg / "runs").exists()


def test_a_user_loss_is_the_built_in_one_when_it_computes_the_same(userpkg):
    """`mean_ce` with scale 1 is cross-entropy summed: the same training numbers as train.loss=ce."""
    a = make_cfg(BASE + ["train.loss={_target_:userpkg.mean_ce,scale:1.0}"], runs=userpkg / "runs")
    b = make_cfg(BASE + ["train.loss=ce"], runs=userpkg / "runs")
    assert train(a) == train(b) == "completed" and run_id(a) != run_id(b)
    rows = [(userpkg / "runs" / run_id(c) / "metrics.csv").read_text().splitlines() for c in (a, b)]
    cols = [[r.split(",")[:6] for r in rs] for rs in rows]  # step, loss, acc and the gradient's norms
    assert cols[0] == cols[1]


def test_a_regression_of_your_own_trains_with_half_squared_error(userpkg):
    """Float targets N x k: a regression, the loss 1/2 |y - f|^2 averaged over the examples."""
    cfg = make_cfg(BASE + ["+data.kind=regression", "+model.out=2", "train.max_steps=0"], runs=userpkg / "runs")
    assert train(cfg) == "completed"
    rows = (userpkg / "runs" / run_id(cfg) / "metrics.csv").read_text().splitlines()
    first = dict(zip(rows[0].split(","), rows[1].split(",")))
    import userpkg as up

    x, y, _, _ = up.load(kind="regression")
    torch.manual_seed(0)
    net = up.Net(0, (3,), out=2)
    assert float(first["loss"]) == pytest.approx(0.5 * ((net(x) - y) ** 2).sum(1).mean().item(), rel=1e-6)
    assert first["acc"] == "" and first["test_acc"] == ""


def test_the_run_id_holds_the_target_and_its_arguments(userpkg):
    ids = {run_id(make_cfg(BASE + extra)) for extra in
           ([], ["+model.out=4"], ["+data.n=21"], ["data._target_=userpkg.load", "+data.kind=ok"],
            ["train.loss={_target_:userpkg.mean_ce}"], ["train.loss={_target_:userpkg.mean_ce,scale:2.0}"],
            ["+model.version=2"], ["+data.version=b"],
            ["+train.loss._target_=userpkg.mean_ce", "+train.loss.version=2"])}
    assert len(ids) == 9


def test_a_version_key_names_new_code_without_reaching_the_target(userpkg):
    """`version` is in the run id but not an argument: Net, load and mean_ce take no such keyword."""
    cfg = make_cfg(BASE + ["+model.version=2", "+data.version=2", "+train.loss._target_=userpkg.mean_ce",
                           "+train.loss.version=2"], runs=userpkg / "runs")
    assert train(cfg) == "completed"


def test_a_custom_model_trains_as_a_built_in_one_does(userpkg):
    """The pipeline's numbers for a Linear model of your own equal torch's on the same data."""
    cfg = make_cfg(BASE + ["train.max_steps=1", "optim.eps_inside=false", "optim.h=0.1"], runs=userpkg / "runs")
    assert train(cfg) == "completed"
    rows = (userpkg / "runs" / run_id(cfg) / "metrics.csv").read_text().splitlines()
    got = [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    import userpkg as up

    x, y, _, _ = up.load()
    torch.manual_seed(0)
    net = up.Net(4, (3,))
    opt = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    for n in range(2):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        assert float(got[n]["loss"]) == pytest.approx(loss.item(), rel=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
