"""The run id: a hash of the run's semantic config (Dora-style), with the rules that keep the ids
of existing runs unchanged as keys are added."""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf, open_dict

from ..ghost import ghost_size, uses_batch_norm
from ..thresholds import DIVERGE_FACTOR, DIVERGE_PATIENCE
from . import redact

# The run id hashes the whole config except these keys (top-level names or dotted paths): where
# files go, how progress is shown or logged, how the job is launched, how memory is chunked.
# Anything else, including a key added tomorrow, is semantic by default. (The world size of a
# distributed run is not in the config at all.)
NON_SEMANTIC = (
    "paths", "logger", "sweep", "retry", "device", "lease", "store", "hydra",
    "data.root", "data.download",
    "train.checkpoint_every", "train.log_every", "train.progress", "train.micro_batch", "train.threads",
)
# Semantic keys added after runs existed, left out of the hash at their default so that existing
# run ids never change. The divergence rule's default only stops earlier a run that the analysis
# (the same rule, pipeline.thresholds) classifies as diverged anyway, whenever it was made.
ADDED_KEYS: dict[str, object] = {"train.diverge_factor": DIVERGE_FACTOR, "train.diverge_patience": DIVERGE_PATIENCE,
                                  "train.perturb_theta0": None, "train.loss": "auto", "train.eval_mode": "exact",
                                  "data.std": "unbiased", "train.sharpness_every": None,
                                  "train.sharpness_iters": 20, "train.sharpness_tol": 1e-4}


def with_added_keys(cfg: DictConfig) -> DictConfig:
    """`cfg` (changed in place) with each ADDED_KEYS key it lacks set to the value that reproduces
    the runs made before the key existed: a job pickled by an older sweep, still queued, then
    validates and trains as it would have, under the same run id (those values are left out of it)."""
    for dotted, old in ADDED_KEYS.items():
        group, key = dotted.split(".", 1)
        node = cfg.get(group)
        if isinstance(node, DictConfig) and key not in node:
            with open_dict(node):
                node[key] = old
    return cfg


def semantic_config(cfg: DictConfig) -> dict:
    """The config without the NON_SEMANTIC keys (and ADDED_KEYS at their old value), resolved.

    The micro-batch only chunks memory, but a BatchNorm model's ghost-batch size is semantic:
    it is hashed where run ids have always had it, as `train.micro_batch` (`model.bn_group`, or
    the micro-batch itself when bn_group is null), so the ids of BatchNorm runs made before
    bn_group existed are unchanged."""
    ghost = None
    if "model" in cfg and uses_batch_norm(cfg.model):
        ghost = ghost_size(cfg.model, cfg.train.micro_batch)
    out = {}
    for key in cfg:
        if key in NON_SEMANTIC:
            continue
        node = cfg[key]
        out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    for dotted in NON_SEMANTIC:
        if "." in dotted:
            group, key = dotted.split(".", 1)
            if isinstance(out.get(group), dict):
                out[group].pop(key, None)
    for dotted, old in ADDED_KEYS.items():
        group, key = dotted.split(".", 1)
        if isinstance(out.get(group), dict) and key in out[group] and out[group][key] == old:
            del out[group][key]
    out = redact.obj(out)  # a credential's value is never part of the id (config.yaml holds it masked)
    if isinstance(out.get("model"), dict):
        out["model"].pop("bn_group", None)
    if ghost is not None:
        out["train"]["micro_batch"] = ghost
    return out


def legacy_run_id(cfg: DictConfig) -> str:
    """The id the run of `cfg` had under the rule before the micro-batch left the id (models
    without BatchNorm hashed `train.micro_batch` too): what `make migrate` renames from."""
    sem = semantic_config(cfg)
    if isinstance(sem.get("train"), dict) and "micro_batch" not in sem["train"]:
        sem["train"]["micro_batch"] = cfg.train.get("micro_batch")
    return hashlib.sha1(json.dumps(sem, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def config_hash(cfg: DictConfig) -> str:
    """SHA-1 (40 hex digits) of `semantic_config(cfg)` as canonical JSON: what a checkpoint names."""
    blob = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()


def run_id(cfg: DictConfig) -> str:
    """Short stable hash of `semantic_config(cfg)`: the first 12 hex digits of `config_hash`."""
    return config_hash(cfg)[:12]


def without_repeat(sem: dict) -> dict:
    """A semantic config (semantic_config's dict) without the REPEAT_KEYS: what the repeats of
    one grid point share."""
    sem = json.loads(json.dumps(sem))
    for dotted in REPEAT_KEYS:
        *parents, last = dotted.split(".")
        node = sem
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return sem


def point_id(cfg: DictConfig) -> str:
    """The grid point of a run: 12 hex digits of its semantic config without the repeat keys
    (seed, train.perturb_theta0). The repeats of a point share it; wandb groups by it."""
    blob = json.dumps(without_repeat(semantic_config(cfg)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def flat_semantic(config) -> dict | None:
    """A stored config (a dict, config.yaml's) as {dotted key: value} of its semantic config;
    None when it cannot be read as one (an older or foreign shape)."""
    try:
        sem = semantic_config(OmegaConf.create(config)) if config else None
    except Exception:
        return None
    if sem is None:
        return None
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, list) else v
    walk(sem, "")
    return out


def differing(flats) -> list[str]:
    """The dotted keys whose values differ among the flat configs `flats` (None entries skipped),
    sorted, the repeat keys last: what tells the runs of one sweep apart."""
    flats = [f for f in flats if f is not None]
    keys = sorted({k for f in flats for k in f})
    out = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    return [k for k in out if k not in REPEAT_KEYS] + [k for k in REPEAT_KEYS if k in out]


def repeat_of(cfg: DictConfig) -> str:
    """Which repeat of its point a run is, in words: `seed=1`, `seed=0 perturb_theta0=2`."""
    p = cfg.train.get("perturb_theta0") if "train" in cfg else None
    return f"seed={cfg.get('seed')}" + (f" perturb_theta0={p}" if p is not None else "")


# The keys that repeats of a grid point vary (`make sweep REPEATS=K`, sweep.repeat_by): the
# analysis aggregates over these, and only these (analysis/groups.py).
REPEAT_KEYS = ("seed", "train.perturb_theta0")


def folder_name(cfg, default: str) -> str:
    """The sweep's folder (and wandb group): `sweep.name` (else `default`), with `-<sweep.mode>`
    for a mode that is not the default (mode=paper: `fig4-paper`), so the modes never mix, and
    `.<sweep.variant>` for a sweep run with settings of its own (`variant`)."""
    name = cfg.sweep.get("name") or default
    name = f"{name}-{cfg.sweep.mode}" if cfg.sweep.get("mode") else name
    return f"{name}.{cfg.sweep.variant}" if cfg.sweep.get("variant") else name


def variant(overrides) -> str | None:
    """Six hex digits of the settings that the command-line `overrides` (make's EXTRA) change in
    the runs -- every semantic key but the repeat keys, grids included -- or None when they change
    none, or name the sweep (`sweep.name=`, NAME=): a sweep run with other settings lands in a
    folder of its own, never beside the preset's runs."""
    keys = []
    for o in overrides:
        key, eq, value = str(o).partition("=")
        key = key.lstrip("+~")
        if key == "sweep.name":
            return None
        top = key.split(".", 1)[0]
        if not eq or key in ("mode", "retry") or top in NON_SEMANTIC or key in NON_SEMANTIC or \
                key in REPEAT_KEYS or any(key.startswith(k + ".") for k in NON_SEMANTIC):
            continue
        keys.append(f"{key}={value}")
    if not keys:
        return None
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:6]

