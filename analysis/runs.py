"""Read run directories into tidy pandas frames.

A run directory is any folder holding `status.json` or `metrics.csv` (plus `config.yaml`);
`find_runs(DIR)` accepts a runs root, a sweep folder (whose entries link to run
directories), or a single run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pipeline.dispatch.plan import sweep_runs
from pipeline.runs.ids import ADDED_KEYS, REPEAT_KEYS, differing, flat_semantic, point_id
from pipeline.runs.integrity import check
from pipeline.runs.rundir import RunDir

log = logging.getLogger(__name__)

# hyperparameter columns: name in the summary -> path in config.yaml
HYPER = {
    "h": "optim.h", "beta": "optim.beta", "rho": "optim.rho", "eps": "optim.eps",
    "optim": "optim.name", "model": "model.name", "norm": "model.norm", "data": "data.name",
    "subset": "data.subset", "seed": "seed", "max_steps": "train.max_steps",
    "micro_batch": "train.micro_batch", "eps_inside": "optim.eps_inside",
    "bias_correction": "optim.bias_correction", "precision": "precision",
    "loss": "train.loss", "eval_mode": "train.eval_mode", "std": "data.std", "bn_group": "model.bn_group",
    "reshuffle": "train.reshuffle", "perturb_theta0": "train.perturb_theta0",
}
# what a run made before a setting existed had: the value pipeline/runs/ids.py keeps its id with
SETTING_BEFORE = {k: ADDED_KEYS[v] for k, v in HYPER.items() if v in ADDED_KEYS}


def _is_run(p: Path) -> bool:
    return (p / "status.json").exists() or (p / "metrics.csv").exists()


def find_runs(root, warnings: list | None = None) -> list[Path]:
    """Run directories at or below `root`, each once: a sweep folder's are those of its
    plan.json (pipeline.plan.sweep_runs; links that point elsewhere, dangle or are in no plan
    are warned about, never counted); a runs root's are its folders (two levels; links are
    followed, one run directory once; hidden folders and wandb's folders are skipped).
    `warnings` collects one line for each thing left out."""
    root = Path(root)
    warnings = [] if warnings is None else warnings
    if _is_run(root):
        return [root]
    if (root / "plan.json").exists():
        runs, warned = sweep_runs(root)
        warnings += warned
        return [r.path for r in runs]
    found, seen = [], set()
    candidates = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith(".") or p.name == "wandb" or not p.is_dir():
            if p.is_symlink() and not p.exists():
                warnings.append(f"{p}: a dangling link; ignored")
            continue
        if _is_run(p):
            candidates.append(p)
        elif (p / "plan.json").exists():
            runs, warned = sweep_runs(p)
            warnings += warned
            candidates += [r.path for r in runs]
        else:
            candidates += [q for q in sorted(p.iterdir()) if q.is_dir() and not q.name.startswith(".")
                           and _is_run(q)]
    for p in candidates:
        real = p.resolve()
        if real in seen:
            warnings.append(f"{p}: the same run directory as another one found ({real}); counted once")
            continue
        seen.add(real)
        found.append(p)
    return found


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def frame(header: list[str], rows: list[list[str]]) -> pd.DataFrame:
    """Rows of metrics.csv as floats (parsed by Python's float: exact round trip)."""
    if not header:
        return pd.DataFrame()
    cols = list(zip(*rows)) if rows else [()] * len(header)
    return pd.DataFrame({h: np.array([float(c) if c else np.nan for c in col], dtype=float)
                         for h, col in zip(header, cols)})


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv as floats through the store's reader: rows cut short by a crash or with a
    cell that is not a number are dropped; a missing or damaged file gives an empty frame."""
    from pipeline.runs.history import read_metrics_table

    return frame(*read_metrics_table(path))


def read_run(path: Path) -> dict:
    """{'run_id', 'path', 'config', 'status', 'metrics', 'holes', 'damaged', 'whole_until',
    'provenance'} of one
    run directory, judged by the one integrity rule (pipeline.integrity.check). The metrics are
    the parseable rows in step order, each step once; `whole_until` is the last step up to which
    they are known to be the run's whole history. A damaged run (status.json or config.yaml) has
    its problems in `damaged` and no config."""
    path = Path(path)
    run = RunDir(path.parent, path.name)
    health = check(run)
    rows = health.history.in_step_order()
    config = (health.config or {}) if not health.damaged else {}
    return dict(run_id=run.id, path=path, config=config, point_id=config_point(config),
                status=health.status, metrics=frame(health.history.header, rows), holes=health.holes,
                damaged="; ".join(health.damaged), whole_until=health.whole_until, foreign=health.foreign,
                provenance=run.provenance() if not health.foreign else [])


def config_point(config: dict) -> str | None:
    """pipeline.runs.ids.point_id of a stored config.yaml, or None when it cannot be read as one."""
    try:
        return point_id(OmegaConf.create(config)) if config else None
    except Exception:  # a config.yaml of an older or foreign shape: no point id, the run still counts
        return None


DRAWN = ("optim.h", "optim.beta", "optim.rho", "optim.eps")  # what the figures draw on an axis or as series


def label_settings(runs: list[dict]) -> list[str]:
    """Each run's `setting`: the keys (and their values) in which the runs differ besides the
    drawn hyperparameters h, beta, rho, eps and the repeat keys -- `train.max_steps=400` beside
    `train.max_steps=1000` -- '' when they differ in none. Figures, groups and tables keep runs of
    different settings apart, and say so. The keys found varying, in order."""
    flats = {r["run_id"]: None if r.get("damaged") else flat_semantic(r["config"]) for r in runs}
    varying = [k for k in differing(flats.values()) if k not in DRAWN and k not in REPEAT_KEYS]
    for r in runs:
        f = flats.get(r["run_id"])
        r["setting"] = " ".join(f"{k}={_shown(f.get(k))}" for k in varying) if f is not None else ""
    return varying


def _shown(v) -> str:
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def hyperparameters(config: dict) -> dict:
    out = {k: _get(config, v) for k, v in HYPER.items()}
    if config:
        out.update({k: v for k, v in SETTING_BEFORE.items() if out[k] is None})
    if isinstance(out["loss"], dict):  # a loss of your own: its target
        out["loss"] = out["loss"].get("_target_")
    return out


def load_runs(root) -> list[dict]:
    warnings = []
    runs = [read_run(p) for p in find_runs(root, warnings)]
    label_settings(runs)
    for w in warnings:
        log.warning("%s", w)
    for r in runs:
        if r["damaged"]:
            log.warning("run %s (%s): %s: its values are left out of the summary%s", r["run_id"], r["path"],
                        r["damaged"], "" if r.get("foreign") else "; retry=true recomputes it")
        elif r["metrics"].empty:
            log.warning("run %s (%s): metrics.csv missing or empty%s", r["run_id"], r["path"],
                        f" ({r['holes']})" if r["holes"] else "")
        elif r["holes"]:
            log.warning("run %s: metrics.csv not whole (%s): values that depend on the missing or damaged rows "
                        "are left empty; retry=true recomputes it", r["run_id"], r["holes"])
    return runs


# beside each curve row (the rest of a run's config: summary.csv)
CURVE_KEYS = ("h", "beta", "rho", "eps", "seed", "perturb_theta0")


def curves_frame(runs: list[dict]) -> pd.DataFrame:
    """Long format: run_id, h, beta, rho, eps, seed, step, metric, value (NaN cells dropped;
    the run's other settings are in summary.csv, by run_id)."""
    frames = []
    for r in runs:
        m = r["metrics"]
        if m.empty or "step" not in m or r.get("damaged"):  # a damaged run: not the run it claims to be
            continue
        long = m.melt(id_vars="step", var_name="metric", value_name="value").dropna(subset=["value"])
        hyper = hyperparameters(r["config"])
        for k in reversed(CURVE_KEYS):
            long.insert(0, k, hyper[k])
        long.insert(0, "setting", r.get("setting", ""))
        long.insert(0, "point_id", r.get("point_id"))
        long.insert(0, "run_id", r["run_id"])
        frames.append(long)
    if not frames:
        return pd.DataFrame(columns=["run_id", "point_id", "setting", *CURVE_KEYS, "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)
