"""Datasets as tensors on the training device (no DataLoader workers).

`load_dataset(cfg.data, device)` returns a `Dataset` with normalised float32 images and int64
labels for classification (CIFAR-10/100, `synthetic`) or float targets for regression
(`bilinear`, the single example of Section 6).

CIFAR is read from torchvision's on-disk layout (`cifar-10-batches-py/`,
`cifar-100-python/`). torchvision's classes refuse any copy whose md5 differs from the
official archive's, and unpickle without restriction; we read the same files ourselves with a
restricted unpickler (dicts, lists, bytes and numpy arrays only), check the md5 and warn when a
file is not the official one, and use torchvision only to download.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..catalog import CIFAR, DATASETS, DIGITS_TEST, EUROSAT, cifar_files, missing_data  # noqa: F401 -- DATASETS: the names load_dataset serves
from ..errors import ConfigError, DataError
from ..user_code import call, kwargs, locate
from .losses import Objective, objective

log = logging.getLogger(__name__)

@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int  # 0 for regression
    task: str  # "classification" | "regression"
    objective: Objective | None = None  # the loss (train.loss; the loop sets it): the task's default

    def __post_init__(self):
        if self.objective is None:
            self.objective = objective(self.task)

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])


class Refused(pickle.UnpicklingError):
    """The file asks to build an object that a CIFAR batch never holds."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only what CIFAR's pickles hold: builtins containers and numpy arrays."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("copy_reg", "_reconstructor"),
               ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
               ("_codecs", "encode")}  # bytes in protocol-2 pickles written by Python 3

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise Refused(f"refusing to unpickle {module}.{name} from a CIFAR file")


def _read_batch(path: Path, md5: str, label_key: str, root_key: str, classes: int):
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{root_key}: cannot read {path} ({e.strerror})") from None
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
        d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64)
        if len(y) != len(x) or (len(y) and (y.min() < 0 or y.max() >= classes)):
            raise ValueError(f"{len(x)} images, {len(y)} labels in [0, {classes})")
    except Refused as e:
        raise DataError(f"{root_key}: {path} is not a CIFAR batch ({e})") from None
    except Exception as e:  # truncated (EOFError), garbage, wrong keys or shapes
        raise DataError(f"{root_key}: {path} is damaged or not a CIFAR batch ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'truncated'}); delete it and run "
                        "`make data` again") from None
    return x, y, hashlib.md5(raw).hexdigest() == md5


def download(name: str, root: str | Path) -> None:
    """Fetch CIFAR-10/100 or EuroSAT into `root` with torchvision (the official archives, md5-checked)."""
    import torchvision.datasets as tvd

    if name == "eurosat":
        tvd.EuroSAT(root=str(root), download=True)
        return
    cls = getattr(tvd, CIFAR[name]["tv"])
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def fetch(name: str, root: str | Path) -> None:
    """`download`, or DataError: one line saying what to do on a machine without internet."""
    try:
        download(name, root)
    except Exception as e:  # offline compute node, proxy, ...
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"data.root={root}: {name} is missing there and the download failed "
            f"({type(e).__name__}: {why}); run `make data DATASETS={name} DATA_ROOT={root}` on a machine "
            "with internet, or point data.root at a copy") from None


def _load_cifar(cfg):
    spec, root = CIFAR[cfg.name], Path(cfg.root)
    missing = [p for p in cifar_files(cfg.name, root) if not p.exists()]
    if missing and cfg.download:
        fetch(cfg.name, root)
        missing = [p for p in cifar_files(cfg.name, root) if not p.exists()]
    if missing:
        raise DataError(missing_data(cfg.name, root))
    base, key = root / spec["folder"], f"data.root={root}"
    *train, test = [_read_batch(base / f, m, spec["label"], key, spec["classes"])
                    for f, m in spec["train"] + spec["test"]]
    odd = sum(not official for _, _, official in train + [test])
    return (torch.from_numpy(np.concatenate([x for x, _, _ in train])),
            torch.from_numpy(np.concatenate([y for _, y, _ in train])),
            torch.from_numpy(test[0]), torch.from_numpy(test[1]), spec["classes"],
            f"{key}: {odd} of the {len(train) + 1} files differ from the official CIFAR files (md5); "
            "loaded anyway" if odd else None)


def synthetic(cfg):
    """Seeded CIFAR-shaped images: a random template per class plus Gaussian noise, so that
    the task is learnable but not trivial."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    c, s = int(cfg.num_classes), int(cfg.image_size)
    templates = torch.randn(c, 3, s, s, generator=g)

    def draw(n):
        y = torch.randint(0, c, (n,), generator=g)
        x = templates[y] + float(cfg.noise) * torch.randn(n, 3, s, s, generator=g)
        return (x * 40 + 128).clamp(0, 255).to(torch.uint8), y

    xtr, ytr = draw(int(cfg.n_train))
    xte, yte = draw(int(cfg.n_test))
    return xtr, ytr, xte, yte, c




def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8, labels) of scikit-learn's digits, read from the file the package ships
    (`sklearn/datasets/data/digits.csv.gz`) as `sklearn.datasets.load_digits` reads it, without
    importing scikit-learn (2-3 s of a digits run's start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.origin:
        raise DataError("data=digits: needs scikit-learn (pip install scikit-learn)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = np.loadtxt(f, delimiter=",")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"data=digits: {path} cannot be read ({e}); reinstall scikit-learn") from e
    if data.ndim != 2 or data.shape[1] != 65:
        raise DataError(f"data=digits: {path} is not 8x8 images with a label (shape {data.shape})")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _digits(cfg):
    """scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set: 1,797 real images
    of 43 writers, 16 grey levels), shipped inside the package: no download. Pixels 0..16 are
    scaled to 0..256 and cut at 255 as uint8; one channel. A fixed split: a permutation drawn
    with seed `data.split_seed` (default 0), the last 360 images for testing, 1,437 for training."""
    images, target = digits_arrays()
    x = torch.from_numpy((images * 16).clip(0, 255).astype(np.uint8)).unsqueeze(1)  # N x 1 x 8 x 8
    y = torch.from_numpy(target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(cfg.get("split_seed", 0))))
    train, test = perm[:-DIGITS_TEST].sort().values, perm[-DIGITS_TEST:].sort().values
    return x[train], y[train], x[test], y[test], 10


def _eurosat(cfg):
    """EuroSAT RGB as the authors' script reads it: torchvision's `EuroSAT` (ImageFolder: classes
    and files in sorted order), `random_split` 80/20 with a generator seeded `data.split_seed`
    (42: theirs; the split's order is kept), each image `Resize((s, s))` (PIL, bilinear) with
    s = data.image_size (32: theirs). Returned as uint8, normalised below as every image set."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    from PIL import Image

    root = Path(cfg.root)
    if missing_data("eurosat", root) and cfg.download:
        fetch("eurosat", root)
    if missing_data("eurosat", root):
        raise DataError(missing_data("eurosat", root))
    try:
        samples = tvd.EuroSAT(root=str(root)).samples
    except (FileNotFoundError, RuntimeError) as e:  # a class folder without images
        raise DataError(f"data.root={root}: {root / EUROSAT['folder']} is not EuroSAT's layout "
                        f"(<class>/<image>.jpg: {str(e).splitlines()[0]})") from None
    size = int(cfg.get("image_size", 32))
    resize = T.Resize((size, size))
    x = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                x[i] = np.asarray(resize(img.convert("RGB")))
        except Exception as e:  # truncated or not an image
            raise DataError(f"data.root={root}: {path} is damaged or not an image ({type(e).__name__}); "
                            "delete the eurosat folder and run `make data DATASETS=eurosat` again") from None
    y = torch.tensor([c for _, c in samples], dtype=torch.int64)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    n_train = int(EUROSAT["train_fraction"] * len(samples))
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(int(cfg.split_seed)))
    train, test = perm[:n_train], perm[n_train:]
    return x[train], y[train], x[test], y[test], EUROSAT["classes"]


def write_fake_eurosat(root: str | Path, per_class: int = 5, seed: int = 0, size: int = 64) -> Path:
    """A small dataset in EuroSAT's real on-disk layout (root/eurosat/2750/<Class>/<Class>_<i>.jpg,
    RGB JPEGs of size x size): for tests and for trying the real loading path offline."""
    from PIL import Image

    base = Path(root) / EUROSAT["folder"]
    rng = np.random.default_rng(seed)
    for c in EUROSAT_CLASSES:
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(base / c / f"{c}_{i + 1}.jpg")
    return base


EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")


def _subset(x, y, cfg, num_classes):
    if cfg.get("per_class"):
        k = int(cfg.per_class)
        have = min(int((y == c).sum()) for c in range(num_classes))
        if k > have:
            raise DataError(f"data.per_class={k}: larger than the {have} training examples of the "
                            f"rarest class of data={cfg.name}")
        idx = torch.cat([torch.nonzero(y == c).flatten()[:k] for c in range(num_classes)])
        idx = idx.sort().values  # keep the file order
        x, y = x[idx], y[idx]
    if cfg.get("subset"):
        if int(cfg.subset) > len(x):
            raise DataError(f"data.subset={cfg.subset}: larger than the {len(x)} training examples "
                            f"of data={cfg.name}")
        x, y = x[: int(cfg.subset)], y[: int(cfg.subset)]
    return x, y


def load_dataset(cfg, device="cpu") -> Dataset:
    """`cfg` is the `data` config group."""
    if cfg.name == "bilinear":
        x = torch.full((1, 1), float(cfg.x))
        y = torch.full((1, 1), float(cfg.y))
        return Dataset(x.to(device), y.to(device), x.to(device), y.to(device), 0, "regression")
    note, task = None, "classification"  # note: a warning, given once everything loaded (an error comes alone)
    if cfg.name in CIFAR:
        xtr, ytr, xte, yte, c, note = _load_cifar(cfg)
    elif cfg.name == "synthetic":
        xtr, ytr, xte, yte, c = synthetic(cfg)
    elif cfg.name == "digits":
        xtr, ytr, xte, yte, c = _digits(cfg)
    elif cfg.name == "eurosat":
        xtr, ytr, xte, yte, c = _eurosat(cfg)
    elif cfg.name == "custom":  # your own (docs/custom.md)
        xtr, ytr, xte, yte, c, task = user_data(cfg)
        if task == "regression":
            ytr, yte = ytr.float(), yte.float()
        if xtr.is_floating_point():  # used as given
            return Dataset(xtr.float().to(device), ytr.to(device), xte.float().to(device), yte.to(device), c, task)
    else:
        raise DataError(f"data={cfg.name!r}: allowed values are {DATASETS}")
    # per-channel statistics of the whole training split, before any subset; data.std:
    # unbiased (divisor n-1, torch's) or population (divisor n, numpy's: the authors')
    xf = xtr.double() / 255
    mean = xf.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = xf.std(dim=(0, 2, 3), correction=int(cfg.get("std") != "population")).view(1, -1, 1, 1)
    del xf
    xtr, ytr = _subset(xtr, ytr, cfg, c)
    if cfg.get("test_subset"):
        if int(cfg.test_subset) > len(xte):
            raise DataError(f"data.test_subset={cfg.test_subset}: larger than the {len(xte)} test "
                            f"examples of data={cfg.name}")
        xte, yte = xte[: int(cfg.test_subset)], yte[: int(cfg.test_subset)]

    def norm(x):
        return ((x.double() / 255 - mean) / std).float().to(device)

    if note:
        log.warning("%s", note)
    return Dataset(norm(xtr), ytr.to(device), norm(xte), yte.to(device), c, task)


def user_data(data_cfg):
    """(x_train, y_train, x_test, y_test, num_classes, task) from the user's data target;
    DataError naming the target when the returned value is not of the documented form."""
    target = data_cfg["_target_"]
    fn = locate("data", target)
    try:
        got = call("data", target, fn, kwargs(data_cfg, "data"))
    except ConfigError as e:
        raise DataError(str(e)) from None
    where = f"data._target_={target}"
    classes = None
    if isinstance(got, dict):
        classes = got.get("num_classes")
        try:
            got = tuple(got[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        except KeyError as e:
            raise DataError(f"{where}: the returned dict has no {e.args[0]!r}; allowed: x_train, y_train, "
                            "x_test, y_test (num_classes optional)") from None
    if not (isinstance(got, (tuple, list)) and len(got) == 4 and all(isinstance(t, torch.Tensor) for t in got)):
        raise DataError(f"{where}: returned {type(got).__name__}; allowed: (x_train, y_train, x_test, y_test) "
                        "tensors or a dict of them")
    xtr, ytr, xte, yte = got
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if x.dim() < 2 or len(x) != len(y) or len(x) == 0:
            raise DataError(f"{where}: x_{name} {tuple(x.shape)} and y_{name} {tuple(y.shape)}: allowed: "
                            "N >= 1 examples in both, x with a batch dimension")
        floating = x.is_floating_point()
        if not (x.dtype == torch.uint8 or floating) or (floating and not torch.isfinite(x).all()):
            raise DataError(f"{where}: x_{name} is {x.dtype}; allowed: uint8 images or finite floats")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{where}: x_train {tuple(xtr.shape[1:])} and x_test {tuple(xte.shape[1:])} per example differ")
    if xtr.dtype == torch.uint8 and xtr.dim() != 4:
        raise DataError(f"{where}: uint8 x_train {tuple(xtr.shape)}: allowed: images N x C x H x W (normalised per "
                        "channel), or float inputs of any shape (used as given)")
    if ytr.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        ytr, yte = ytr.long(), yte.long()
        top = int(max(ytr.max(), yte.max())) + 1
        classes = top if classes is None else int(classes)
        if ytr.dim() != 1 or yte.dim() != 1 or int(min(ytr.min(), yte.min())) < 0 or top > classes:
            raise DataError(f"{where}: labels must be one per example in [0, num_classes={classes})")
        return xtr, ytr, xte, yte, classes, "classification"
    if not (ytr.is_floating_point() and yte.is_floating_point()) or ytr.dim() != 2 or yte.dim() != 2:
        raise DataError(f"{where}: y is {ytr.dtype} {tuple(ytr.shape)}; allowed: int64 labels N (classification) "
                        "or float targets N x k (regression)")
    return xtr, ytr, xte, yte, 0, "regression"


def write_fake_cifar(root: str | Path, name: str = "cifar10", n_train: int = 100,
                     n_test: int = 50, seed: int = 0) -> Path:
    """Write a small dataset in CIFAR's real on-disk format (python pickles, protocol 2, as
    the official files). For tests and for trying the real loading path offline."""
    spec = CIFAR[name]
    base = Path(root) / spec["folder"]
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = spec["train"]
    per_file = [n_train // len(files) + (i < n_train % len(files)) for i in range(len(files))]
    for (fname, _), n in zip(files + spec["test"], per_file + [n_test]):
        d = {"batch_label": fname, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             spec["label"]: rng.integers(0, spec["classes"], n).tolist(),
             "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(base / fname, "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = "batches.meta" if name == "cifar10" else "meta"
    with open(base / meta, "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(spec["classes"])]}, f, protocol=2)
    return base


def main(argv=None) -> None:
    """`python -m pipeline.engine.data ROOT NAME...` (`make data`): download each dataset into ROOT."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    names = ("cifar10", "cifar100", "eurosat")
    if len(argv) < 2 or any(n not in names for n in argv[1:]):
        raise DataError(f"make data DATASETS={' '.join(argv[1:])}: allowed names are {', '.join(names)} "
                        "(usage: python -m pipeline.engine.data ROOT NAME...)")
    for name in argv[1:]:
        download(name, argv[0])
        print(f"{name}: in {argv[0]}")


if __name__ == "__main__":
    from pipeline.errors import command

    command(main)
