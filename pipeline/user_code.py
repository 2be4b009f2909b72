"""Your own model, data and loss, instantiated through Hydra's `_target_` (docs/custom.md).

    model=custom model._target_=mypkg.MyNet +model.width=64       a torch.nn.Module
    data=custom data._target_=mypkg.load +data.n=1000             tensors (below)
    +train.loss._target_=mypkg.my_loss +train.loss.margin=2       loss(out, y) -> the micro-batch's SUM

Every other key of the group is a keyword argument of the target. The model's target also gets
`num_classes` and `input_shape` (C, H, W) when its signature takes them. A data target returns
`(x_train, y_train, x_test, y_test)` (or a dict with those keys and optionally `num_classes`):
x as N x C x H x W images, uint8 (normalised per channel as the built-in datasets: data.std) or
float (used as given); y as int64 labels in [0, C) (classification) or float targets N x k
(regression: the loss 1/2 (y - f)^2 unless train.loss says otherwise). A loss target that is a
class is instantiated with its arguments (`'train.loss={_target_: torch.nn.CrossEntropyLoss, reduction: sum}'`
is the built-in ce); a function is the loss itself, its arguments bound.

The target and its arguments are part of the config, so of the run id. Validation imports the
target before anything starts (a clear line when it cannot); what it returns is checked before
any run directory exists (pipeline/config/user_outputs.py). Torch-free: imported by every layer.
"""

from __future__ import annotations

import functools
import importlib
import inspect

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

# keys of a group that are not arguments of its target; `version` is for the user: it goes into the
# run id only (a new version of the target's code is a new run)
RESERVED = {"model": ("name", "_target_", "version"), "data": ("name", "_target_", "std", "version"),
            "train.loss": ("_target_", "version")}


def why(e: BaseException) -> str:
    """An exception as a short clause: its type and the first line of its message."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def locate(key: str, target) -> object:
    """The object named by the dotted path `target`, or ConfigError naming `key`."""
    if not isinstance(target, str) or not target or "." not in target:
        raise ConfigError(f"{key}._target_={target}: allowed values are dotted paths to a class or "
                          "function, e.g. mypkg.models.MyNet")
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"{key}._target_={target}: cannot import {e.name} (is its package installed, "
                          "or on PYTHONPATH?)") from None
    except AttributeError:
        raise ConfigError(f"{key}._target_={target}: module {module} has no {name}") from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"{key}._target_={target}: importing {module} failed ({why(e)})") from None
    if not callable(obj):
        raise ConfigError(f"{key}._target_={target}: {type(obj).__name__} is not callable")
    return obj


def kwargs(node, key: str) -> dict:
    """The group's keyword arguments for its target (`node`: the group): every key but the reserved ones."""
    d = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in d.items() if k not in RESERVED[key]}


def check_target(cfg, key: str) -> None:
    """Validation of `<key>._target_` (model, data, train.loss): set, importable, callable."""
    target = OmegaConf.select(cfg, f"{key}._target_")
    if target is None:
        raise ConfigError(f"{key}._target_=null: {key}={OmegaConf.select(cfg, f'{key}.name') or 'custom'} needs "
                          f"{key}._target_=<package.module.name> (docs/custom.md)")
    locate(key, target)


def accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call(key: str, target: str, fn, kw: dict):
    try:
        return fn(**kw)
    except Exception as e:
        raise ConfigError(f"{key}._target_={target}: calling it with {sorted(kw)} failed "
                          f"({why(e)})") from None


def loss_function(spec):
    """The user's loss callable: a class instantiated with its arguments, a function with them bound."""
    target = spec["_target_"]
    fn = locate("train.loss", target)
    kw = kwargs(spec, "train.loss")
    if inspect.isclass(fn):
        return call("train.loss", target, fn, kw)
    return functools.partial(fn, **kw) if kw else fn
