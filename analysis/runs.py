"""Read run directories into tidy pandas frames.

A run directory is any folder holding `status.json` or `metrics.csv` (plus `config.yaml`);
`find_runs(DIR)` accepts a runs root, a sweep folder (whose entries link to run
directories), or a single run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.store import read_metrics_table, run_holes

log = logging.getLogger(__name__)

# hyperparameter columns: name in the summary -> path in config.yaml
HYPER = {
    "h": "optim.h", "beta": "optim.beta", "rho": "optim.rho", "eps": "optim.eps",
    "optim": "optim.name", "model": "model.name", "norm": "model.norm", "data": "data.name",
    "subset": "data.subset", "seed": "seed", "max_steps": "train.max_steps",
    "micro_batch": "train.micro_batch", "eps_inside": "optim.eps_inside",
    "bias_correction": "optim.bias_correction", "precision": "precision",
}


def _is_run(p: Path) -> bool:
    return (p / "status.json").exists() or (p / "metrics.csv").exists()


def find_runs(root) -> list[Path]:
    """Run directories at or below `root` (two levels; links are followed; hidden folders and
    wandb's folders are skipped)."""
    root = Path(root)
    if _is_run(root):
        return [root]
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith(".") or p.name == "wandb" or not p.is_dir():
            continue
        if _is_run(p):
            found.append(p)
        else:
            found += [q for q in sorted(p.iterdir()) if q.is_dir() and not q.name.startswith(".")
                      and _is_run(q)]
    return found


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv as floats (parsed by Python's float: exact round trip), through the store's
    reader: rows cut short by a crash are dropped; a missing or empty file gives an empty frame."""
    header, rows = read_metrics_table(path)
    if not header:
        return pd.DataFrame()
    cols = list(zip(*rows)) if rows else [()] * len(header)
    return pd.DataFrame({h: np.array([float(c) if c else np.nan for c in col], dtype=float)
                         for h, col in zip(header, cols)})


def read_run(path: Path) -> dict:
    """{'run_id', 'path', 'config', 'status', 'metrics'} of one run directory."""
    path = Path(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        config = {}
    try:
        status = json.loads((path / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        status = {}
    metrics = read_metrics(path / "metrics.csv")
    steps = [int(s) for s in metrics["step"]] if "step" in metrics else []
    return dict(run_id=status.get("run_id", path.resolve().name), path=path, config=config,
                status=status, metrics=metrics, holes=run_holes(status, steps))


def hyperparameters(config: dict) -> dict:
    return {k: _get(config, v) for k, v in HYPER.items()}


def load_runs(root) -> list[dict]:
    runs = [read_run(p) for p in find_runs(root)]
    for r in runs:
        if r["metrics"].empty:
            log.warning("run %s (%s): metrics.csv missing or empty", r["run_id"], r["path"])
        elif r["holes"]:
            log.warning("run %s: history not whole (%s): values that depend on the missing rows are "
                        "left empty; retry=true recomputes it", r["run_id"], r["holes"])
    return runs


def curves_frame(runs: list[dict]) -> pd.DataFrame:
    """Long format: run_id, hyperparameters, step, metric, value (NaN cells dropped)."""
    frames = []
    for r in runs:
        m = r["metrics"]
        if m.empty or "step" not in m:
            continue
        long = m.melt(id_vars="step", var_name="metric", value_name="value").dropna(subset=["value"])
        for k, v in reversed(list(hyperparameters(r["config"]).items())):
            long.insert(0, k, v)
        long.insert(0, "run_id", r["run_id"])
        frames.append(long)
    if not frames:
        return pd.DataFrame(columns=["run_id", *HYPER, "step", "metric", "value"])
    return pd.concat(frames, ignore_index=True)
