"""The run store: one folder per run, named by a hash of the run's semantic config (Dora-style).

    <paths.runs>/<run_id>/config.yaml    resolved config
                          metrics.csv    one row per step (source of truth)
                          status.json    state, step, attempts, ...
                          checkpoint.pt  model, optimizer, step, RNG states

Every file but metrics.csv is replaced atomically (write to a temporary file, fsync, rename);
metrics.csv is appended row by row and cut back to the checkpoint's step on resume, so a
crash or a kill never leaves a run that cannot be resumed or read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

STATES = ("pending", "running", "completed", "diverged", "failed")
METRIC_COLUMNS = ["step", "loss", "acc", "pert_norm", "l1_norm", "l2_norm", "pert_norm_floor",
                  "test_loss", "test_acc", "time_s"]

# Keys that do not change what a run computes: never part of its id.
NON_SEMANTIC = {
    "data": {"root", "download"},
    "train": {"checkpoint_every", "log_every", "progress"},
}
SEMANTIC_TOP = ("model", "data", "optim", "train", "seed", "precision", "channels_last", "compile",
                "deterministic")


def semantic_config(cfg: DictConfig) -> dict:
    """The part of the config that defines the computation (model, data, optim, train, seed
    and numerics), without paths, logging, launcher or bookkeeping keys."""
    out = {}
    for key in SEMANTIC_TOP:
        if key not in cfg:
            continue
        v = OmegaConf.to_container(cfg[key], resolve=True) if isinstance(
            cfg[key], DictConfig) else cfg[key]
        if isinstance(v, dict):
            v = {k: x for k, x in v.items() if k not in NON_SEMANTIC.get(key, ())}
        out[key] = v
    return out


def run_id(cfg: DictConfig) -> str:
    """Short stable hash of `semantic_config(cfg)`: 12 hex digits of SHA-1 over canonical JSON."""
    blob = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def fmt(v) -> str:
    """Floats as Python's shortest round-trip repr; None/NaN as empty or 'nan'."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class RunDir:
    def __init__(self, root: str | Path, rid: str):
        self.path = Path(root) / rid
        self.id = rid

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.csv")
    status_file = property(lambda self: self.path / "status.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_status(self, **fields) -> dict:
        st = self.status()
        st.update(fields, run_id=self.id, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_text(self.status_file, json.dumps(st, indent=1, sort_keys=True) + "\n")
        return st

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint, buf.getvalue())

    def load_checkpoint(self, map_location="cpu") -> dict | None:
        if not self.checkpoint.exists():
            return None
        return torch.load(self.checkpoint, map_location=map_location, weights_only=True)

    # -- metrics -----------------------------------------------------------------------------
    def open_metrics(self, columns: list[str], resume_step: int) -> MetricsWriter:
        """Keep the complete rows with step < resume_step (atomically), then append."""
        kept = []
        if resume_step > 0 and self.metrics.exists():
            kept = [r for r in read_rows(self.metrics) if int(r["step"]) < resume_step]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(kept)
        atomic_write_text(self.metrics, buf.getvalue())
        return MetricsWriter(self.metrics, columns)


def read_rows(path: Path) -> list[dict]:
    """Complete rows of a metrics.csv (a row cut short by a crash is dropped)."""
    with open(path, newline="") as f:
        lines = f.read().split("\n")
    if not lines or not lines[0]:
        return []
    header = lines[0].split(",")
    rows = []
    for line in lines[1:-1]:  # the last piece has no newline after it: empty or torn
        cells = line.split(",")
        if len(cells) != len(header):
            continue  # empty trailing line or a torn write
        rows.append(dict(zip(header, cells)))
    return rows


class MetricsWriter:
    """Appends one row per step and flushes it, so a reader (or wandb sync) sees it at once."""

    def __init__(self, path: Path, columns: list[str]):
        self.columns = columns
        self.f = open(path, "a", buffering=1)

    def write(self, row: dict) -> None:
        self.f.write(",".join(fmt(row.get(c)) for c in self.columns) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
