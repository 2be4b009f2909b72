"""Read run directories into tidy pandas frames.

A run directory is any folder holding `status.json` or `metrics.csv` (plus `config.yaml`);
`find_runs(DIR)` accepts a runs root, a sweep folder (whose entries link to run
directories), or a single run directory.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pandas as pd
import yaml

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
    """metrics.csv as floats; a row cut short by a crash is dropped, a missing or empty file
    gives an empty frame."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return pd.DataFrame()
    lines = text.split("\n")
    if len(lines) < 2 or not lines[0]:
        return pd.DataFrame()
    n = len(lines[0].split(","))
    complete = [ln for ln in lines[1:-1] if len(ln.split(",")) == n]
    exact = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
    df = pd.read_csv(io.StringIO("\n".join([lines[0], *complete]) + "\n"), **exact)
    return df.apply(pd.to_numeric, errors="coerce")


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
    return dict(run_id=status.get("run_id", path.resolve().name), path=path, config=config,
                status=status, metrics=read_metrics(path / "metrics.csv"))


def hyperparameters(config: dict) -> dict:
    return {k: _get(config, v) for k, v in HYPER.items()}


def load_runs(root) -> list[dict]:
    runs = [read_run(p) for p in find_runs(root)]
    for r in runs:
        if r["metrics"].empty:
            log.warning("run %s (%s): metrics.csv missing or empty", r["run_id"], r["path"])
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
