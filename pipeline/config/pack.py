"""Which grid points may train together in one process (a pack, `make sweep PACK=K`), in one
place. Points that differ only in the optimizer's numbers h, beta, rho, eps and in theta_0 (the
seed, train.perturb_theta0: the repeats of a point) share the model, the data and the
micro-batch partition, so their K parameter sets are stacked and trained together
(pipeline/engine/stack.py); every point is still its own run (its own id, directory, lease,
metrics.csv, checkpoint, status.json, wandb run). Torch-free: the sweep groups its points and
refuses what cannot pack before anything starts.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from ..ghost import uses_batch_norm
from ..runs.ids import semantic_config

PER_POINT = ("h", "beta", "rho", "eps")  # the optim keys a pack's points may differ in
PER_POINT_THETA0 = ("seed", "train.perturb_theta0")  # and theta_0: each point's own (the repeats of REPEATS=K)
SHARED_HOW = ("device", "train.micro_batch", "train.checkpoint_every", "train.threads")  # not semantic, but one process
AUTO_MODELS = ("bilinear", "mlp", "cnn")  # PACK=auto packs these; a ResNet fills a device by itself
AUTO_MAX = 16  # PACK=auto: at most this many points per pack (on 1 CPU thread a step costs K times one point's)


def refusal(cfg: DictConfig) -> str | None:
    """Why the point of `cfg` cannot be packed (one line naming the key), or None."""
    if uses_batch_norm(cfg.model):
        return ("model.norm=bn: BatchNorm's running statistics are module state that torch.func.vmap "
                "cannot keep per point; such points run one per process (PACK=1)")
    if cfg.model.name == "custom":
        return ("model=custom: a model of your own may hold module state (BatchNorm buffers) that "
                "torch.func.vmap cannot keep per point; such points run one per process (PACK=1)")
    every = OmegaConf.select(cfg, "train.sharpness_every")
    if every is not None:
        return (f"train.sharpness_every={every}: the Lanczos iterations of the Hessian's top eigenvalue stop at "
                "each point's own residual, which a stacked pass cannot; such points run one per process (PACK=1)")
    for key, why in (("train.reshuffle", "each point's partition generator would have to be stacked too"),
                     ("train.bias_term", "the bias term's norm is computed for one model at a time"),
                     ("compile", "torch.compile of a vmapped forward is not supported here"),
                     ("channels_last", "stacked weights have no channels-last layout")):
        if OmegaConf.select(cfg, key):
            return f"{key}=true: {why}; such points run one per process (PACK=1)"
    return None


def shared(cfg: DictConfig) -> dict:
    """What a pack's points must have in common: the semantic config without optim's per-point
    numbers, with how the process computes (device, micro-batch, checkpoint period, threads)."""
    sem = semantic_config(cfg)
    sem["optim"] = {k: v for k, v in sem.get("optim", {}).items() if k not in PER_POINT}
    sem.pop("seed", None)  # theta_0 only (a pack has no reshuffle, whose order the seed would also set)
    sem.get("train", {}).pop("perturb_theta0", None)
    sem["_how"] = {k: OmegaConf.select(cfg, k) for k in SHARED_HOW}
    return sem


def key(cfg: DictConfig) -> str:
    """Points with equal keys may share a pack (`shared`, as canonical JSON)."""
    return json.dumps(shared(cfg), sort_keys=True, default=str)


def problem(cfgs: list[DictConfig]) -> str | None:
    """Why these points cannot train as one pack (one line), or None."""
    for c in cfgs:
        why = refusal(c)
        if why:
            return why
    first = shared(cfgs[0])
    for c in cfgs[1:]:
        other = shared(c)
        if other != first:
            diff = sorted(_differing(first, other))
            return (f"a pack's points differ only in optim.{'/'.join(PER_POINT)} and theta_0 "
                    f"({', '.join(PER_POINT_THETA0)}); these differ in "
                    f"{', '.join(diff[:4])}")
    return None


def _differing(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _differing(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".").replace("_how.", "")]


def packs(cfgs: list[DictConfig], size: int | str, slots: int = 1) -> list[list[int]]:
    """The points (indices into `cfgs`, in order) grouped into packs. `size`: an integer K (at most
    K points per pack; points that cannot pack raise ValueError with the one-line reason) or
    'auto' (the small models of AUTO_MODELS, spread over `slots` packs at a time, at most AUTO_MAX
    per pack; everything else alone)."""
    groups: dict[str, list[int]] = {}
    alone = []
    for i, c in enumerate(cfgs):
        why = refusal(c)
        if size == "auto" and (why or c.model.name not in AUTO_MODELS):
            alone.append([i])
        elif why and size != 1:
            raise ValueError(why)
        else:
            groups.setdefault(key(c), []).append(i)
    out = []
    for members in groups.values():
        k = size if size != "auto" else min(AUTO_MAX, -(-len(members) // max(1, slots)))
        out += [members[j:j + k] for j in range(0, len(members), k)]
    return sorted(out + alone)
