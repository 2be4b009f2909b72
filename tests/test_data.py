"""Data: CIFAR's real on-disk format (generated here), safe unpickling, offline errors,
subsets, normalisation, the synthetic set."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.engine.data import DataError, cifar_files, load_dataset, write_fake_cifar

from .conftest import ROOT


def cifar_cfg(root, name="cifar10", **kw):
    base = dict(name=name, root=str(root), download=False, subset=None, per_class=None,
                test_subset=None)
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_loads_generated_cifar_in_real_format(tmp_path, caplog, name, classes):
    write_fake_cifar(tmp_path, name, n_train=120, n_test=30, seed=1)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(cifar_cfg(tmp_path, name))
    assert "files differ from the official CIFAR files (md5)" in caplog.text  # md5 checked, and said so
    assert ds.x_train.shape == (120, 3, 32, 32) and ds.x_test.shape == (30, 3, 32, 32)
    assert ds.num_classes == classes and ds.y_train.dtype == torch.int64
    # normalised with the training set's per-channel statistics
    assert torch.allclose(ds.x_train.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(ds.x_train.double().std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-4)
    # same pixels as the file, in CHW order (independent read with plain pickle)
    first = cifar_files(name, tmp_path)[0]
    with open(first, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    img = torch.from_numpy(np.asarray(d["data"][0]).reshape(3, 32, 32)).double() / 255
    xr = ds.x_train[0].double()
    # x = (img - mean)/std per channel: affine per channel, so correlation is 1
    for c in range(3):
        a, b = img[c].flatten(), xr[c].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999999
    label_key = "labels" if name == "cifar10" else "fine_labels"
    assert ds.y_train[0].item() == d[label_key][0]


def test_torchvision_reads_our_files_when_md5_is_skipped(tmp_path):
    """The generated files are CIFAR's real format: torchvision's own parser reads them."""
    import torchvision

    write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)

    class NoMd5(torchvision.datasets.CIFAR10):
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = [str(i) for i in range(10)]

    tv = NoMd5(str(tmp_path), train=True, download=False)
    ours = load_dataset(cifar_cfg(tmp_path))
    assert len(tv) == 50
    assert tv.targets == ours.y_train.tolist()


def test_refuses_malicious_pickle(tmp_path):
    base = write_fake_cifar(tmp_path, "cifar10", n_train=10, n_test=5)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(base / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_1 is not a CIFAR batch \(refusing to unpickle "
                                        r"__builtin__.print"):
        load_dataset(cifar_cfg(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "garbage", "wrong labels"])
def test_damaged_batch_file_is_named_in_one_line(tmp_path, damage):
    base = write_fake_cifar(tmp_path, "cifar10", n_train=50, n_test=10)
    f = base / "data_batch_3"
    raw = f.read_bytes()
    if damage == "wrong labels":
        with open(f, "wb") as out:
            pickle.dump({"data": np.zeros((10, 3072), np.uint8), "labels": [11] * 10}, out, protocol=2)
    else:
        f.write_bytes({"truncated": raw[: len(raw) // 2], "zero-byte": b"",
                       "garbage": bytes(range(256)) * 10}[damage])
    with pytest.raises(DataError) as e:
        load_dataset(cifar_cfg(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"data.root={tmp_path}: {f} ") and "\n" not in msg, msg


def test_missing_files_offline_names_root_and_make_data(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(cifar_cfg(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value) and "make data" in str(e.value)


def test_failed_download_names_root_and_make_data(tmp_path, monkeypatch):
    import pipeline.engine.data as d

    def offline(name, root):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(d, "download", offline)
    cfg = cifar_cfg(tmp_path)
    cfg.download = True
    with pytest.raises(DataError) as e:
        load_dataset(cfg)
    assert "make data" in str(e.value) and str(tmp_path) in str(e.value)


def test_subset_and_per_class(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", n_train=200, n_test=20)
    full = load_dataset(cifar_cfg(tmp_path))
    sub = load_dataset(cifar_cfg(tmp_path, subset=37))
    assert torch.equal(sub.x_train, full.x_train[:37])  # first N, same normalisation
    pc = load_dataset(cifar_cfg(tmp_path, per_class=3))
    counts = torch.bincount(pc.y_train, minlength=10)
    assert counts.tolist() == [min(3, int((full.y_train == c).sum())) for c in range(10)]
    # the first 3 of each class, in file order
    idx = torch.cat([torch.nonzero(full.y_train == c).flatten()[:3] for c in range(10)]).sort().values
    assert torch.equal(pc.x_train, full.x_train[idx])


def test_synthetic_is_seeded_and_learnable_shape():
    cfg = OmegaConf.create(dict(name="synthetic", seed=3, num_classes=4, image_size=8,
                                n_train=64, n_test=16, noise=1.0, subset=None, per_class=None,
                                test_subset=None))
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (64, 3, 8, 8) and a.num_classes == 4
    cfg.seed = 4
    assert not torch.equal(load_dataset(cfg).x_train, a.x_train)


def test_digits_are_the_real_bundled_images_with_a_fixed_split():
    """data=digits: scikit-learn's 1,797 8x8 digits, 1,437 train / 360 test, disjoint, the same
    split on every call, normalised with the training split's statistics (one channel)."""
    from sklearn.datasets import load_digits

    cfg = OmegaConf.create(dict(name="digits", split_seed=0, subset=None, per_class=None, test_subset=None))
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8) and a.num_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert abs(float(a.x_train.mean())) < 1e-5 and abs(float(a.x_train.std()) - 1) < 1e-3
    # every image is one of sklearn's, each used once across the two splits
    d = load_digits()
    raw = torch.from_numpy(d.images.reshape(1797, 64)).double()
    mean, std = raw.mean() / 16, (raw / 16).std()
    back = torch.cat([a.x_train, a.x_test]).reshape(1797, 64).double() * std + mean
    back = (back * 16).round()
    assert sorted(map(tuple, back.tolist())) == sorted(map(tuple, raw.tolist()))  # the same images, once each
    labels = torch.cat([a.y_train, a.y_test])
    assert sorted(labels.tolist()) == sorted(d.target.tolist())
    other = load_dataset(OmegaConf.create(dict(cfg, split_seed=1)))
    assert not torch.equal(other.y_test, a.y_test)


@pytest.mark.parametrize("model", [["model=mlp"],
                                   ["model=cnn", "model.width=4", "model.norm=bn", "model.bn_group=479"]])
def test_digits_train_with_the_mlp_and_a_small_cnn(cfg_factory, model):
    from analysis.runs import read_metrics
    from pipeline.runs.ids import run_id
    from pipeline.runs.rundir import RunDir
    from pipeline.train import train

    cfg = cfg_factory(*model, "data=digits", "optim.h=1e-2", "train.max_steps=15", "train.micro_batch=479",
                      "train.eval_every=5", "train.progress=none", "device=cpu", tiny=False)
    assert train(cfg) == "completed"
    m = read_metrics(RunDir(cfg.paths.runs, run_id(cfg)).metrics)
    assert m.loss.iloc[-1] < 0.7 * m.loss.iloc[0] and m.test_acc.dropna().iloc[-1] > 0.5


def test_digits_are_read_as_scikit_learn_reads_them_without_importing_it():
    """The pipeline reads the digits file scikit-learn ships (a quick start: no sklearn import);
    the arrays equal load_digits' exactly."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from pipeline.engine.data import digits_arrays

    images, target = digits_arrays()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(target, ref.target)
    probe = ("import sys; from pipeline.engine.data import digits_arrays; digits_arrays(); "
             "print('sklearn' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.stdout.strip() == "False", r.stderr
