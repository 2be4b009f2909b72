"""Config validation: every key of every group, before any work (no run directory, no job).
Each error is one line `key=value: why`, naming the allowed values."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..catalog import (
    ACTIVATIONS,
    CIFAR,
    DATASETS,
    DIGITS_TEST,
    EUROSAT,
    EVAL_MODES,
    FLOATS,
    LOSSES,
    MODELS,
    NORMS,
    OPTIMIZERS,
    STDS,
    gn_groups_ok,
)
from ..errors import ConfigError
from ..ghost import micro_batch_problem
from ..user_code import check_target


def show(v) -> str:
    """A value as one types it in an override."""
    if isinstance(v, (list, tuple, ListConfig)):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _get(cfg, key):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(cfg, key, lo=None, hi=None, lo_open=False, hi_open=False, null=False):
    v = _get(cfg, key)
    if v is None and null:
        return v
    ok = _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
        (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        rng = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
        raise ConfigError(f"{key}={show(v)}: allowed range {rng}{' or null' if null else ''}")
    return v


def integer(cfg, key, lo=0, hi=None, null=False):
    v = _get(cfg, key)
    if v is None and null:
        return v
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)):
        upto = f" and <= {hi}" if hi is not None else ""
        raise ConfigError(f"{key}={show(v)}: allowed values are integers >= {lo}{upto}"
                          f"{' or null' if null else ''}")
    return v


def boolean(cfg, key):
    v = _get(cfg, key)
    if not isinstance(v, bool):
        raise ConfigError(f"{key}={show(v)}: allowed values are true, false")
    return v


def choice(cfg, key, allowed, shown_key=None):
    v = _get(cfg, key)
    if v not in allowed:
        raise ConfigError(f"{shown_key or key}={show(v)}: allowed values are {', '.join(map(str, allowed))}")
    return v


def text(cfg, key, null=False):
    v = _get(cfg, key)
    if (v is None and null) or (isinstance(v, str) and v):
        return v
    raise ConfigError(f"{key}={show(v)}: allowed values are non-empty strings{' or null' if null else ''}")


def representable(key, v, dtype, precision, scaled=None):
    """A step size or eps that float32 cannot hold would overflow (or vanish) in the update.
    `scaled`: (what, value) when it is v times a factor that must be representable."""
    what, x = scaled or (None, v)
    largest, tiny = FLOATS[dtype]
    if x > largest or (0 < x < tiny):
        why = f"{what} = {x:.3g} is" if what else "is"
        raise ConfigError(f"{key}={show(v)}: {why} not representable in {dtype} (precision={precision}); "
                          f"allowed range [{tiny:.3g}, {largest:.3g}]")


def _no_environment_in_semantic_keys(cfg) -> None:
    """`${oc.env:...}` only where the run id and config.yaml never see its value (logger, paths, ...):
    in a semantic key it would be resolved into config.yaml and the id."""
    from ..runs.ids import NON_SEMANTIC
    from ..runs.redact import env_paths

    for path in env_paths(cfg):
        if not any(path == k or path.startswith(k + ".") for k in NON_SEMANTIC):
            raise ConfigError(f"{path}: an environment variable (oc.env) in a key that is part of the run id; allowed "
                              "only in logger, paths and the other non-semantic keys (its value would be written "
                              "into config.yaml)")


FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first invalid key (a section at a time, in the order of the config)."""
    _no_environment_in_semantic_keys(cfg)
    precision = _top_level(cfg)
    model = _model(cfg)
    _data(cfg, model)
    optim = _optimizer(cfg, precision)
    _training(cfg, optim)
    _lease_and_logger(cfg)
    _store(cfg)


def _top_level(cfg) -> str:
    integer(cfg, "seed", 0)
    choice(cfg, "device", ("auto", "cpu", "cuda"))
    precision = choice(cfg, "precision", ("fp32", "tf32", "bf16", "fp64", "torch_default"))
    for key in ("channels_last", "compile", "deterministic", "retry"):
        boolean(cfg, key)
    text(cfg, "paths.runs")
    text(cfg, "paths.sweeps")
    if _get(cfg, "sweep.repeats") is not None:  # configs pickled before repeats existed have none
        v = _get(cfg, "sweep.repeats")
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ConfigError(f"sweep.repeats={show(v)} (REPEATS=): allowed values are whole numbers >= 1")
        choice(cfg, "sweep.repeat_by", ("seed", "perturb_theta0"))
    for key in ("sweep.name", "sweep.mode", "sweep.variant"):  # a folder's name under paths.sweeps, never a path
        name = text(cfg, key, null=True) if _get(cfg, key) is not None else None
        if name is not None and not FOLDER_NAME.fullmatch(name):
            raise ConfigError(f"{key}={show(name)}: allowed values are names of letters, digits, '_', '.' and '-' "
                              "(not starting with '.' or '-'): the sweep folder is <paths.sweeps>/<name>")
    return precision


def _model(cfg) -> str:
    model = choice(cfg, "model.name", MODELS, shown_key="model")
    _built_in(cfg, "model", model, "a model")
    if model in ("cnn", "resnet18", "resnet50", "resnet101"):
        norm = choice(cfg, "model.norm", NORMS)
        width = integer(cfg, "model.width", 1)
        integer(cfg, "model.bn_group", 1, null=True)
        problem = micro_batch_problem(cfg.model, _get(cfg, "train.micro_batch"))
        if problem:
            raise ConfigError(problem)
        if norm == "gn" and not gn_groups_ok(model, width):
            raise ConfigError(f"model.width={width}: with model.norm=gn every layer's channel count "
                              "must be below 32 or a multiple of 32 (GroupNorm with 32 groups)")
    elif model == "vit":
        for key in ("patch_size", "dim", "depth", "heads", "mlp_dim", "dim_head"):
            integer(cfg, f"model.{key}", 1)
        if cfg.model.dim % 4:
            raise ConfigError(f"model.dim={cfg.model.dim}: the 2-D sin-cos position embedding needs a multiple of 4")
    elif model == "custom":
        check_target(cfg, "model")
    elif model == "mlp":
        integer(cfg, "model.width", 1)
        integer(cfg, "model.depth", 0)
        choice(cfg, "model.activation", ACTIVATIONS)
    elif model == "bilinear":
        theta0 = _get(cfg, "model.theta0")
        if not (isinstance(theta0, (list, ListConfig)) and len(theta0) == 2 and all(map(_is_num, theta0))):
            raise ConfigError(f"model.theta0={show(theta0)}: allowed values are two finite numbers "
                              "[theta_1, theta_2]")
    return model


def _built_in(cfg, group: str, name: str, what: str) -> None:
    """`<group>._target_` belongs to `<group>=custom`: a built-in one has its own keys."""
    target = _get(cfg, group).get("_target_")
    if name != "custom" and target is not None:
        raise ConfigError(f"{group}._target_={target}: {what} of your own goes with {group}=custom "
                          f"({group}={name} is built in); see docs/custom.md")


def _data(cfg, model: str) -> None:
    data = choice(cfg, "data.name", DATASETS, shown_key="data")
    if (model == "bilinear") != (data == "bilinear"):
        raise ConfigError(f"model={model}, data={data}: the bilinear model runs on data=bilinear "
                          "and data=bilinear needs model=bilinear")
    _built_in(cfg, "data", data, "a dataset")
    if data != "bilinear":
        choice(cfg, "data.std", STDS)
    if data == "bilinear":
        number(cfg, "data.x")
        number(cfg, "data.y")
    elif data == "custom":
        check_target(cfg, "data")
    else:
        if data in CIFAR:
            text(cfg, "data.root")
            boolean(cfg, "data.download")
            n_train, n_test = CIFAR[data]["n_train"], CIFAR[data]["n_test"]
            classes, size = CIFAR[data]["classes"], 32
        elif data == "eurosat":
            text(cfg, "data.root")
            boolean(cfg, "data.download")
            integer(cfg, "data.split_seed", 0)
            size = integer(cfg, "data.image_size", 1)
            n_train = int(EUROSAT["n"] * EUROSAT["train_fraction"])
            n_test, classes = EUROSAT["n"] - n_train, EUROSAT["classes"]
        elif data == "digits":
            integer(cfg, "data.split_seed", 0)
            n_train, n_test, classes, size = 1797 - DIGITS_TEST, DIGITS_TEST, 10, 8
        else:  # synthetic
            integer(cfg, "data.seed", 0)
            classes = integer(cfg, "data.num_classes", 2)
            size = integer(cfg, "data.image_size", 1)
            n_train, n_test = integer(cfg, "data.n_train", 1), integer(cfg, "data.n_test", 1)
            number(cfg, "data.noise", 0)
        integer(cfg, "data.subset", 1, n_train, null=True)
        integer(cfg, "data.per_class", 1, n_train // classes if data != "synthetic" else n_train, null=True)
        integer(cfg, "data.test_subset", 1, n_test, null=True)
        if model in ("cnn", "authors_cnn") and size < 8:
            raise ConfigError(f"data.image_size={size}: model={model} halves the image three times; "
                              "allowed values are integers >= 8")
        if model == "vit" and size % cfg.model.patch_size:
            raise ConfigError(f"model.patch_size={cfg.model.patch_size}: the {size}x{size} images of data={data} "
                              "must split into whole patches; allowed: a divisor of the image size")


def _optimizer(cfg, precision: str) -> str:
    optim = choice(cfg, "optim.name", tuple(OPTIMIZERS), shown_key="optim")
    dtype = "float64" if precision == "fp64" else "float32"
    h = number(cfg, "optim.h", 0, lo_open=True)
    representable("optim.h", h, dtype, precision)
    eps = number(cfg, "optim.eps", 0, lo_open=True)
    representable("optim.eps", eps, dtype, precision)
    if optim in ("adam", "momentum"):
        beta = number(cfg, "optim.beta", 0, 1, hi_open=True)
        if optim == "adam":  # the first update divides h by 1 - beta
            representable("optim.h", h, dtype, precision, (f"h / (1 - beta) with beta={show(beta)}", h / (1 - beta)))
    if optim in ("adam", "rmsprop"):
        number(cfg, "optim.rho", 0, 1, hi_open=True)
        boolean(cfg, "optim.eps_inside")
    if optim == "adam":
        boolean(cfg, "optim.bias_correction")
    return optim


def _training(cfg, optim: str) -> None:
    integer(cfg, "train.max_steps", 0)
    mb = _get(cfg, "train.micro_batch")
    if mb != "auto" and not (isinstance(mb, int) and not isinstance(mb, bool) and mb >= 1):
        raise ConfigError(f"train.micro_batch={show(mb)}: allowed values are integers >= 1 or auto")
    for key in ("eval_every", "checkpoint_every", "log_every"):
        integer(cfg, f"train.{key}", 1)
    integer(cfg, "train.record_params", 0)
    boolean(cfg, "train.reshuffle")
    _loss(cfg)
    choice(cfg, "train.eval_mode", EVAL_MODES)
    boolean(cfg, "train.bias_term")
    integer(cfg, "train.perturb_theta0", 0, null=True)
    choice(cfg, "train.progress", ("auto", "bar", "log", "none"))
    integer(cfg, "train.threads", 1, null=True)
    ts = _get(cfg, "train.loss_thresholds")
    if not (isinstance(ts, (list, ListConfig)) and all(_is_num(t) and t > 0 for t in ts)):
        raise ConfigError(f"train.loss_thresholds={show(ts)}: allowed values are lists of positive "
                          "numbers, e.g. [0.1, 0.01]")
    number(cfg, "train.stop_loss", 0, lo_open=True, null=True)
    number(cfg, "train.diverge_factor", 1, lo_open=True, null=True)
    integer(cfg, "train.diverge_patience", 1)
    integer(cfg, "train.sharpness_every", 1, null=True)
    integer(cfg, "train.sharpness_iters", 1)
    number(cfg, "train.sharpness_tol", 0, 1, lo_open=True, hi_open=True)
    if cfg.train.bias_term and optim not in ("adam", "rmsprop"):
        raise ConfigError(f"train.bias_term=true with optim={optim}: allowed only with optim=adam "
                          "or optim=rmsprop (Eq. 3)")


def _loss(cfg) -> None:
    loss = _get(cfg, "train.loss")
    if isinstance(loss, DictConfig):
        check_target(cfg, "train.loss")
        return
    choice(cfg, "train.loss", LOSSES)
    if loss != "auto" and _get(cfg, "data.name") == "bilinear":
        raise ConfigError(f"train.loss={loss}: data=bilinear is a regression with the loss 1/2 (y - f)^2 of "
                          "Section 6; allowed value auto")


def _store(cfg) -> None:
    """store.trust and store.group name users and groups of this machine (runs/owners.py)."""
    from ..runs import owners

    store = cfg.get("store") or {}
    trust = store.get("trust")
    if trust is not None and not isinstance(trust, (str, int)) and not OmegaConf.is_list(trust):
        raise ConfigError(f"store.trust={trust}: allowed values are a list of user names, uids and @groups")
    owners.make_policy(trust, store.get("group"))
    group = store.get("group")
    if group is not None and str(group) != "" and os.getuid() != 0:
        gid = owners.make_policy((), group).group
        if gid not in os.getgroups() and gid != os.getgid():
            raise ConfigError(f"store.group={group}: you are not a member of that group (allowed: a group of "
                              "yours, or null)")


def _lease_and_logger(cfg) -> None:
    timeout = number(cfg, "lease.timeout_s", 0, lo_open=True)
    number(cfg, "lease.heartbeat_s", 0, timeout, lo_open=True, hi_open=True)
    host = cfg.lease.get("host")
    if host is not None and (not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", host)):
        raise ConfigError(f"lease.host={host}: allowed values are null (this machine's name) or a host "
                          "name of letters, digits, '.', '_' and '-'")
    logger = choice(cfg, "logger.name", ("none", "wandb"), shown_key="logger")
    if logger == "wandb":
        text(cfg, "logger.project")
        text(cfg, "logger.entity", null=True)
        choice(cfg, "logger.mode", ("auto", "online", "offline", "disabled"))
        number(cfg, "logger.init_timeout", 0, lo_open=True)
        number(cfg, "logger.finish_timeout", 0)
        tags = _get(cfg, "logger.tags")
        if not (isinstance(tags, (list, ListConfig)) and all(isinstance(t, str) for t in tags)):
            raise ConfigError(f"logger.tags={show(tags)}: allowed values are lists of strings")


def validate_grid(composer, overrides: list[str]) -> list[tuple[list[str], DictConfig]]:
    """Every point of the grid of `overrides` (pipeline.compose.Composer.grid), composed and
    validated: the one grid check of `make sweep` and of `python -m pipeline.train -m`. A bad
    point raises ConfigError naming the key and the point (its values of the keys that vary
    over the grid)."""
    points = composer.grid(overrides)
    values: dict[str, set] = {}
    for point in points:
        for o in point:
            key, _, v = o.partition("=")
            values.setdefault(key, set()).add(v)
    varying = {k for k, vs in values.items() if len(vs) > 1}
    out = []
    for point in points:
        cfg = composer.compose(point)
        try:
            validate(cfg)
        except ConfigError as e:
            where = " ".join(o for o in point if o.partition("=")[0] in varying)
            raise ConfigError(f"{e} (grid point: {where})" if where else str(e)) from None
        out.append((point, cfg))
    return out


def check_dir_writable(key: str, path) -> None:
    """`path` is (or can be created as) a directory this process can write into."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path}: not a directory")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise ConfigError(f"{key}={path}: {q} is not a directory")
    if not os.access(q, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {q} is not writable")
    try:  # access() says yes to root on a read-only mount
        os.statvfs(q)
        probe = q / f".write-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise ConfigError(f"{key}={path}: {q} is not writable ({e.strerror})") from None
