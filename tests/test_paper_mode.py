"""The paper authors' setting (mode=paper) and the pieces of their script the pipeline offers:
the MSE loss on one-hot targets, the n-divisor normalisation, the evaluation with BatchNorm
running averages, their ViT and EuroSAT. Each against an independent reference: a hand
computation, numpy, torch's own modules in eval() mode, vit-pytorch, torchvision's EuroSAT."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.engine.data import load_dataset, write_fake_eurosat
from pipeline.engine.losses import MSE
from pipeline.engine.step import accumulate_gradient, partition
from pipeline.runs.ids import run_id
from pipeline.train import train

from .conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


# -- train.loss=mse: the authors' MSELoss(reduction='sum') on one-hot targets, divided by N -----
def test_mse_value_and_gradient_equal_a_hand_computation():
    torch.manual_seed(0)
    n, d, c = 12, 5, 4
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, c, (n,))
    lin = nn.Linear(d, c).double()
    parts = partition(n, 5)  # accumulated over 3 micro-batches
    loss, correct = accumulate_gradient(lin, x, y, MSE, parts)
    w, b = lin.weight.detach(), lin.bias.detach()
    onehot = np.eye(c)[y.numpy()]
    r = x.numpy() @ w.numpy().T + b.numpy() - onehot  # residuals f(x_i) - e_{y_i}
    assert loss.item() == pytest.approx((r ** 2).sum() / n, rel=1e-14)
    # dE/dW = (2/N) sum_i r_i x_i^T, dE/db = (2/N) sum_i r_i
    np.testing.assert_allclose(lin.weight.grad.numpy(), 2 / n * r.T @ x.numpy(), rtol=1e-13)
    np.testing.assert_allclose(lin.bias.grad.numpy(), 2 / n * r.sum(0), rtol=1e-13)
    assert correct.item() == int((r + onehot).argmax(1).__eq__(y.numpy()).sum())
    # the authors' expression, as their script computes it
    out = x @ w.T + b
    theirs = nn.MSELoss(reduction="sum")(out, nn.functional.one_hot(y, c).double()) / n
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-14)


# -- data.std=population: numpy's std (divisor n), the authors' -------------------------------
@pytest.mark.parametrize("std,ddof", [("population", 0), ("unbiased", 1)])
def test_normalisation_divides_by_n_or_n_minus_1_as_numpy(std, ddof):
    cfg = make_cfg(["data=synthetic", "data.n_train=50", "data.n_test=10", "data.image_size=6", f"data.std={std}"])
    from pipeline.engine.data import synthetic

    raw = synthetic(cfg.data)[0].numpy().astype(np.float64) / 255
    mean = raw.mean(axis=(0, 2, 3), keepdims=True)
    sd = raw.std(axis=(0, 2, 3), ddof=ddof, keepdims=True)
    got = load_dataset(cfg.data).x_train.numpy()
    np.testing.assert_allclose(got, ((raw - mean) / sd).astype(np.float32), rtol=0, atol=2e-7)


def test_the_two_divisors_differ_on_the_same_images():
    a = load_dataset(make_cfg(["data=digits", "data.std=population"]).data).x_train
    b = load_dataset(make_cfg(["data=digits", "data.std=unbiased"]).data).x_train
    n = 1437 * 8 * 8
    ratio = (a[a.abs() > 1] / b[a.abs() > 1]).double()  # population std is smaller: |a| > |b|
    assert torch.allclose(ratio, torch.full_like(ratio, (n / (n - 1)) ** 0.5), rtol=1e-6)


# -- train.eval_mode=running_stats: theta_n in eval() mode after the step that made it --------
def test_running_stats_evaluation_equals_torch_batchnorm_in_eval_mode_after_each_step(tmp_path):
    """A BatchNorm CNN trained by the pipeline with the authors' evaluation; the reference is
    torch alone: nn.BatchNorm2d in train mode over the groups (momentum 0.1), torch.optim.Adam
    (eps outside the root, as optim.eps_inside=false), then model.eval() on the test set."""
    over = ["model=cnn", "model.norm=bn", "model.width=4", "model.bn_group=30", "data=synthetic",
            "data.n_train=90", "data.n_test=40", "data.image_size=8", "train.micro_batch=60", "train.max_steps=4",
            "train.eval_every=1", "train.progress=none", "device=cpu", "train.eval_mode=running_stats",
            "optim.eps_inside=false", "optim.h=0.01", "precision=fp64"]
    cfg = make_cfg(over, runs=tmp_path / "runs")
    assert train(cfg) == "completed"
    rows = (tmp_path / "runs" / run_id(cfg) / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    got = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert got[0]["test_loss"] == "" and got[0]["test_acc"] == ""  # no running averages at theta_0

    from models import build_model

    data = load_dataset(cfg.data)
    torch.manual_seed(cfg.seed)
    model = build_model(make_cfg(["model=cnn", "model.norm=bn", "model.width=4"]).model, 10, data.input_shape).double()
    assert all(m.group is None for m in model.modules() if hasattr(m, "group"))  # plain nn.BatchNorm2d
    x, y, xt, yt = data.x_train.double(), data.y_train, data.x_test.double(), data.y_test
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for n in range(1, 5):
        model.train()
        opt.zero_grad()
        for i in range(0, 90, 30):  # the authors' loader: one BatchNorm batch of 30 at a time
            nn.functional.cross_entropy(model(x[i:i + 30]), y[i:i + 30], reduction="sum").div(90).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xt)
        loss = nn.functional.cross_entropy(out, yt).item()
        acc = (out.argmax(1) == yt).double().mean().item()
        assert float(got[n]["test_loss"]) == pytest.approx(loss, rel=1e-10), n
        assert float(got[n]["test_acc"]) == pytest.approx(acc, abs=1e-12), n


def test_exact_evaluation_differs_from_running_stats_on_the_same_run(tmp_path):
    base = ["model=cnn", "model.norm=bn", "model.width=4", "model.bn_group=30", "data=synthetic", "data.n_train=90",
            "data.n_test=40", "data.image_size=8", "train.micro_batch=30", "train.max_steps=2", "train.eval_every=1",
            "train.progress=none", "device=cpu", "optim.h=0.05"]
    losses = {}
    for mode in ("exact", "running_stats"):
        cfg = make_cfg(base + [f"train.eval_mode={mode}"], runs=tmp_path / "runs")
        train(cfg)
        rows = (tmp_path / "runs" / run_id(cfg) / "metrics.csv").read_text().splitlines()
        h = rows[0].split(",")
        losses[mode] = [dict(zip(h, r.split(","))) for r in rows[1:]]
    train_loss = [[r["loss"] for r in losses[m]] for m in losses]
    assert train_loss[0] == train_loss[1]  # the evaluation does not touch the training
    assert losses["exact"][2]["test_loss"] != losses["running_stats"][2]["test_loss"]


# -- mode=paper: the five settings, and the ids of the exact runs untouched --------------------
def test_mode_paper_sets_the_authors_choices_on_top_of_every_cifar_preset():
    for preset in ("fig4", "fig5", "fig6", "fig7", "hgrid"):
        exact, paper = make_cfg([f"sweep={preset}"]), make_cfg([f"sweep={preset}", "mode=paper"])
        assert (paper.data.std, paper.train.reshuffle, paper.model.bn_group, paper.precision,
                paper.train.eval_mode) == ("population", True, 500, "torch_default", "running_stats"), preset
        assert (exact.data.std, exact.train.reshuffle, exact.precision, exact.train.eval_mode) == \
            ("unbiased", False, "fp32", "exact"), preset
        assert run_id(make_cfg([f"sweep={preset}", "mode=exact"])) == run_id(exact) != run_id(paper)
        header = (ROOT / "conf" / "sweep" / f"{preset}.yaml").read_text()
        assert "Paper:" in header and "Ours:" in header and "mode=paper" in header, preset


def test_the_default_of_each_new_key_keeps_the_pinned_ids():
    """train.loss=auto, train.eval_mode=exact and data.std=unbiased written out give the ids of
    tests/data/preset_run_ids.json (the runs made before those keys existed)."""
    golden = json.loads((ROOT / "tests" / "data" / "preset_run_ids.json").read_text())["ids"]
    for preset, point, _, now in golden[::15]:
        extra = ["train.loss=auto", "train.eval_mode=exact"]
        cfg = make_cfg([f"sweep={preset}", *point.split(), *extra])
        assert run_id(cfg) == now, (preset, point)
        if "std" in cfg.data:
            assert run_id(make_cfg([f"sweep={preset}", *point.split(), "data.std=population"])) != now


def test_train_loss_mse_is_a_new_run_and_trains(tmp_path):
    over = ["model=mlp", "model.width=8", "data=digits", "train.max_steps=3", "train.progress=none", "device=cpu"]
    ce, mse = make_cfg(over, runs=tmp_path / "r"), make_cfg(over + ["train.loss=mse"], runs=tmp_path / "r")
    assert run_id(ce) != run_id(mse)
    assert train(mse) == "completed"
    rows = (tmp_path / "r" / run_id(mse) / "metrics.csv").read_text().splitlines()
    first = dict(zip(rows[0].split(","), rows[1].split(",")))
    data = load_dataset(mse.data)
    from models import build_model

    torch.manual_seed(0)
    model = build_model(mse.model, 10, data.input_shape)
    with torch.no_grad():
        out = model(data.x_train).double()
    want = ((out - nn.functional.one_hot(data.y_train, 10)) ** 2).sum(1).mean().item()
    assert float(first["loss"]) == pytest.approx(want, rel=1e-6)


# -- model=vit: SimpleViT with the authors' sizes -----------------------------------------------
def test_vit_parameter_count_and_output_equal_the_published_simplevit():
    from models import build_model

    cfg = make_cfg(["model=vit"]).model
    model = build_model(cfg, 10, (3, 32, 32))
    # by the layers: patch LN(48) + Linear(48, 512) + LN(512); per block LN + qkv (no bias) + out
    # (no bias) + LN + Linear(512, 1024) + Linear(1024, 512); final LN; head Linear(512, 10)
    d, inner, mlp, pd = 512, 16 * 64, 1024, 3 * 4 * 4
    block = 2 * d + d * 3 * inner + inner * d + 2 * d + d * mlp + mlp + mlp * d + d
    count = 2 * pd + pd * d + d + 2 * d + 6 * block + 2 * d + d * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == count == 18_928_234
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    vit_pytorch = pytest.importorskip("vit_pytorch")
    torch.manual_seed(1)
    theirs = vit_pytorch.SimpleViT(image_size=32, patch_size=4, num_classes=10, dim=512, depth=6, heads=16,
                                   mlp_dim=1024)
    torch.manual_seed(1)
    ours = build_model(cfg, 10, (3, 32, 32))
    assert [k for k in ours.state_dict()] == [k for k in theirs.state_dict()]
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k  # the same initialisation, parameter by parameter
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


# -- data=eurosat: torchvision's EuroSAT, their seeded 80/20 split, resized to 32x32 -------------
def test_eurosat_equals_the_authors_loading_on_a_dataset_in_eurosats_layout(tmp_path):
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    write_fake_eurosat(tmp_path, per_class=7)
    cfg = make_cfg(["data=eurosat", f"data.root={tmp_path}", "data.download=false", "data.std=population"])
    got = load_dataset(cfg.data)
    assert got.x_train.shape == (56, 3, 32, 32) and got.x_test.shape == (14, 3, 32, 32) and got.num_classes == 10
    # the authors' datasets.py: EuroSAT with Resize((32, 32)) + ToTensor, random_split seeded 42
    full = tvd.EuroSAT(root=str(tmp_path), transform=T.Compose([T.Resize((32, 32)), T.ToTensor()]))
    train, test = torch.utils.data.random_split(full, [56, 14], generator=torch.Generator().manual_seed(42))
    xtr = torch.stack([train[i][0] for i in range(56)]).double()
    ytr = torch.tensor([train[i][1] for i in range(56)])
    xte = torch.stack([test[i][0] for i in range(14)]).double()
    mean = xtr.numpy().mean(axis=(0, 2, 3), keepdims=True)
    sd = xtr.numpy().std(axis=(0, 2, 3), keepdims=True)  # numpy: divisor n
    np.testing.assert_allclose(got.x_train.numpy(), (xtr.numpy() - mean) / sd, atol=3e-6)
    np.testing.assert_allclose(got.x_test.numpy(), (xte.numpy() - mean) / sd, atol=3e-6)
    assert torch.equal(got.y_train, ytr)


def test_a_damaged_eurosat_image_is_one_line_naming_it(tmp_path):
    from pipeline.errors import DataError

    base = write_fake_eurosat(tmp_path, per_class=2)
    bad = base / "Forest" / "Forest_2.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = make_cfg(["data=eurosat", f"data.root={tmp_path}", "data.download=false"])
    with pytest.raises(DataError, match=f"{bad} is damaged or not an image"):
        load_dataset(cfg.data)
    with pytest.raises(DataError, match="not found; run `make data"):
        load_dataset(make_cfg(["data=eurosat", f"data.root={tmp_path}/none", "data.download=false"]).data)


def test_eurosat_is_downloaded_with_torchvision_when_missing(tmp_path, monkeypatch):
    """data.download=true fetches EuroSAT through torchvision's class (its official archive); offline,
    one line naming the command that fetches it on a machine with internet."""
    import torchvision.datasets as tvd

    from pipeline.errors import DataError

    real, asked = tvd.EuroSAT, []

    def fake(root, download=False, **kw):
        if download:
            asked.append(root)
            write_fake_eurosat(root, per_class=3)
        return real(root, **kw)

    monkeypatch.setattr(tvd, "EuroSAT", fake)
    cfg = make_cfg(["data=eurosat", f"data.root={tmp_path}/es", "data.download=true"])
    assert load_dataset(cfg.data).x_train.shape[0] == 24 and asked == [f"{tmp_path}/es"]

    def offline(root, download=False, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tvd, "EuroSAT", offline)
    with pytest.raises(DataError, match=r"download failed \(OSError: Name or service not known\); run `make data "
                                        r"DATASETS=eurosat DATA_ROOT="):
        load_dataset(make_cfg(["data=eurosat", f"data.root={tmp_path}/off", "data.download=true"]).data)


def test_figures_say_when_the_test_columns_are_the_authors_evaluation():
    import pandas as pd

    from analysis.figures import axis_label

    ours = pd.DataFrame({"eval_mode": ["exact", "exact"]})
    theirs = pd.DataFrame({"eval_mode": ["running_stats", "running_stats"]})
    assert "running averages" in axis_label("test_acc", theirs)
    assert "running averages" in axis_label("max_test_acc", theirs)
    assert "running averages" not in axis_label("test_acc", ours)
    assert "running averages" not in axis_label("pert_norm", theirs)
    assert "running averages" not in axis_label("test_acc", pd.concat([ours, theirs]))  # mixed: no single label


def test_a_config_from_before_the_new_keys_gets_their_old_values():
    """A job pickled by an older sweep lacks train.loss, train.eval_mode and data.std: it is
    given the values that reproduce it, validates, and keeps its run id."""
    from omegaconf import open_dict

    from pipeline.config.validate import validate
    from pipeline.runs.ids import with_added_keys

    for over in (["sweep=fig4"], ["sweep=digits"], ["sweep=toy"]):
        cfg = make_cfg(over)
        old = cfg.copy()
        with open_dict(old):
            del old.train["loss"], old.train["eval_mode"]
            if "std" in old.data:
                del old.data["std"]
        assert run_id(old) == run_id(cfg)
        validate(with_added_keys(old))
        assert (old.train.loss, old.train.eval_mode, old.data.std) == ("auto", "exact", "unbiased")
        assert run_id(old) == run_id(cfg)


def test_the_bias_term_leaves_the_running_averages_alone(tmp_path):
    """train.bias_term's extra forward passes must not move BatchNorm's running averages: the test
    columns of running_stats are the same with and without it."""
    base = ["model=cnn", "model.norm=bn", "model.width=4", "model.bn_group=30", "data=synthetic", "data.n_train=60",
            "data.n_test=20", "data.image_size=8", "train.micro_batch=30", "train.max_steps=3", "train.eval_every=1",
            "train.progress=none", "device=cpu", "train.eval_mode=running_stats", "precision=fp64"]
    tests = []
    for extra in ([], ["train.bias_term=true"]):
        cfg = make_cfg(base + extra, runs=tmp_path / "runs")
        assert train(cfg) == "completed"
        rows = (tmp_path / "runs" / run_id(cfg) / "metrics.csv").read_text().splitlines()
        h = rows[0].split(",")
        tests.append([dict(zip(h, r.split(",")))["test_loss"] for r in rows[1:]])
    assert tests[0] == tests[1] and tests[0][1] != ""
