"""Config validation: every check names the key and the allowed values, and runs before any
work (no run directory, no job submission)."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from models import MODELS
from models.norm import NORMS

from .data import DATASETS
from .optim import OPTIMIZERS


class ConfigError(ValueError):
    """One line: `key=value: allowed ...`."""


def _num(cfg, key):
    v = cfg
    for part in key.split("."):
        v = v[part]
    return v


def _check_range(cfg, key, lo, hi, lo_open=False, hi_open=True):
    v = _num(cfg, key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{key}={v!r}: allowed range {lb}{lo}, {'inf' if hi is None else hi}{rb}")


def _check_choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed values are {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first invalid key."""
    _check_choice("model", cfg.model.name, MODELS)
    _check_choice("data", cfg.data.name, DATASETS)
    _check_choice("optim", cfg.optim.name, tuple(OPTIMIZERS))
    if "norm" in cfg.model:
        _check_choice("model.norm", cfg.model.norm, NORMS)
    if (cfg.model.name == "bilinear") != (cfg.data.name == "bilinear"):
        raise ConfigError(f"model={cfg.model.name}, data={cfg.data.name}: the bilinear model "
                          "runs on data=bilinear and data=bilinear needs model=bilinear")
    _check_range(cfg, "optim.h", 0, None, lo_open=True)
    for key in ("beta", "rho"):
        if key in cfg.optim:
            _check_range(cfg, f"optim.{key}", 0, 1)
    if "eps" in cfg.optim:
        _check_range(cfg, "optim.eps", 0, None, lo_open=True)
    for key in ("max_steps", "micro_batch", "eval_every", "checkpoint_every", "log_every"):
        v = cfg.train[key]
        if not (isinstance(v, int) and not isinstance(v, bool)
                and v >= (0 if key == "max_steps" else 1)):
            lo = 0 if key == "max_steps" else 1
            raise ConfigError(f"train.{key}={v!r}: allowed values are integers >= {lo}")
    for t in cfg.train.loss_thresholds:
        if not (isinstance(t, (int, float)) and t > 0):
            raise ConfigError(f"train.loss_thresholds={list(cfg.train.loss_thresholds)}: "
                              "allowed values are positive numbers")
    for key in ("subset", "per_class", "test_subset", "n_train", "n_test"):
        v = cfg.data.get(key)
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ConfigError(f"data.{key}={v!r}: allowed values are integers >= 1 or null")
    if cfg.train.bias_term and cfg.optim.name not in ("adam", "rmsprop"):
        raise ConfigError(f"train.bias_term=true with optim={cfg.optim.name}: allowed only "
                          "with optim=adam or optim=rmsprop (Eq. 3)")
    _check_choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _check_choice("precision", cfg.precision, ("fp32", "tf32", "bf16", "fp64"))
    _check_choice("train.progress", cfg.train.progress, ("auto", "bar", "log", "none"))
    _check_choice("logger", cfg.logger.name, ("none", "wandb"))
