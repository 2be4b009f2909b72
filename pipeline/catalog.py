"""The names a config may use, without torch: validation checks every key against these before
any heavy import, so that a bad value costs a fraction of a second, not torch's start-up. The
modules that implement them import them from here (models/, engine/data.py, engine/optim.py);
tests/test_startup.py checks that each implementation offers exactly these."""

from __future__ import annotations

from pathlib import Path

MODELS = ("resnet18", "resnet50", "resnet101", "cnn", "authors_cnn", "vit", "mlp", "bilinear", "custom")
NORMS = ("bn", "gn", "none")
GN_GROUPS = 32
ACTIVATIONS = ("relu", "tanh", "gelu")
OPTIMIZERS = ("adam", "rmsprop", "gd", "momentum")
LOSSES = ("auto", "ce", "mse")  # train.loss (pipeline/engine/losses.py), or {_target_: ...}
EVAL_MODES = ("exact", "running_stats")  # train.eval_mode
STDS = ("unbiased", "population")  # data.std: the divisor n-1 or n of the per-channel std
# the largest finite and the smallest normal number of each float type (torch.finfo's max, tiny)
FLOATS = {"float32": (3.4028234663852886e38, 1.1754943508222875e-38),
          "float64": (1.7976931348623157e308, 2.2250738585072014e-308)}


def gn_groups_ok(model: str, width: int) -> bool:
    """GroupNorm(min(32, c), c) needs 32 | c wherever c >= 32: c runs over every layer's
    channel count (width * 2^stage, times 4 after a ResNet Bottleneck; the CNN has 3 stages)."""
    expansion = 4 if model in ("resnet50", "resnet101") else 1
    stages = 3 if model == "cnn" else 4
    channels = {width * 2**i * e for i in range(stages) for e in (1, expansion)}
    return all(c < GN_GROUPS or c % GN_GROUPS == 0 for c in channels)


DATASETS = ("cifar10", "cifar100", "eurosat", "digits", "synthetic", "bilinear", "custom")

# folder, train files, test file, label key, official md5s (torchvision's lists)
CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py", label="labels", classes=10, n_train=50_000, n_test=10_000,
        train=[("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
        test=[("test_batch", "40351d587109b95175f43aff81a1287e")],
        tv="CIFAR10"),
    "cifar100": dict(
        folder="cifar-100-python", label="fine_labels", classes=100, n_train=50_000, n_test=10_000,
        train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
        test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        tv="CIFAR100"),
}

DIGITS_TEST = 360  # 20% of the 1,797 images

# EuroSAT RGB (torchvision.datasets.EuroSAT): root/eurosat/2750/<class>/*.jpg, 27,000 64x64 images of
# 10 classes; the authors' split: random_split 80/20 with a generator seeded 42, resized to 32x32
EUROSAT = dict(folder="eurosat/2750", n=27_000, classes=10, train_fraction=0.8)


def cifar_files(name: str, root: str | Path) -> list[Path]:
    """The batch files of CIFAR `name` under `root`, in torchvision's on-disk layout."""
    spec = CIFAR[name]
    base = Path(root) / spec["folder"]
    return [base / f for f, _ in spec["train"] + spec["test"]]


def missing_data(name: str, root: str | Path) -> str | None:
    """Why dataset `name` cannot be read from `root` (one line with the command that fetches it),
    or None: the check of the sweep planner (before anything is created) and of the run."""
    if name == "eurosat":
        folder = Path(root) / EUROSAT["folder"]
        return None if folder.is_dir() else (
            f"data.root={root}: {folder} not found; run `make data DATASETS=eurosat DATA_ROOT={root}` "
            "(or set data.download=true)")
    if name not in CIFAR:
        return None
    for path in cifar_files(name, root):
        if not path.is_file():
            return f"data.root={root}: {path} not found; run `make data DATA_ROOT={root}` (or set data.download=true)"
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            return f"data.root={root}: {path} cannot be read ({e.strerror or e})"
    return None
