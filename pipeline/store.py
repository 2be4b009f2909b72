"""The run store: one folder per run, named by a hash of the run's semantic config (Dora-style).

    <paths.runs>/<run_id>/config.yaml         resolved config
                          metrics.csv         one row per step n = 0..k (source of truth)
                          status.json         state, step, attempts, holes, ...
                          checkpoint.pt       model, optimizer, step, RNG states
                          checkpoint.prev.pt  the one before, kept until the new one is in place
                          lease.json          the live owner (pipeline/lease.py)
                          job.json            the job that a sweep submitted for it
                          train.log           the run's log lines, every attempt

Every file but metrics.csv is replaced atomically (temporary file, fsync, rename) with the
permissions of the process umask; metrics.csv is appended row by row, fsynced before each
checkpoint and cut back to the checkpoint's step on resume. A kill at any instant leaves a run
that resumes to the same result; a history with holes is flagged, never passed off as whole.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import faults

log = logging.getLogger(__name__)

STATES = ("pending", "running", "completed", "diverged", "failed")
METRIC_COLUMNS = ["step", "loss", "acc", "pert_norm", "l1_norm", "l2_norm", "pert_norm_floor",
                  "test_loss", "test_acc", "time_s"]

# The run id hashes the whole config except these keys (top-level names or dotted paths): where
# files go, how progress is shown or logged, how the job is launched, how memory is chunked.
# Anything else, including a key added tomorrow, is semantic by default. (The world size of a
# distributed run is not in the config at all.)
NON_SEMANTIC = (
    "paths", "logger", "sweep", "retry", "device", "lease", "hydra",
    "data.root", "data.download",
    "train.checkpoint_every", "train.log_every", "train.progress", "train.micro_batch",
)
# Semantic keys added after runs existed, left out of the hash at their default so that existing
# run ids never change. The divergence rule's default only stops earlier a run that the analysis
# (the same rule, pipeline.thresholds) classifies as diverged anyway, whenever it was made.
ADDED_KEYS: dict[str, object] = {"train.diverge_factor": 10, "train.diverge_patience": 50}


def semantic_config(cfg: DictConfig) -> dict:
    """The config without the NON_SEMANTIC keys (and ADDED_KEYS at their old value), resolved.

    The micro-batch only chunks memory, but a BatchNorm model's ghost-batch size is semantic:
    it is hashed where run ids have always had it, as `train.micro_batch` (`model.bn_group`, or
    the micro-batch itself when bn_group is null), so the ids of BatchNorm runs made before
    bn_group existed are unchanged."""
    ghost = None
    if "model" in cfg and cfg.model.get("norm") == "bn":
        ghost = cfg.model.get("bn_group") or cfg.train.micro_batch
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
    if isinstance(out.get("model"), dict):
        out["model"].pop("bn_group", None)
    if ghost is not None:
        out["train"]["micro_batch"] = ghost
    return out


def run_id(cfg: DictConfig) -> str:
    """Short stable hash of `semantic_config(cfg)`: 12 hex digits of SHA-1 over canonical JSON."""
    blob = json.dumps(semantic_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# -- atomic files -----------------------------------------------------------------------------
class DiskFull(Exception):
    """A write failed for lack of space (ENOSPC, EDQUOT); `path` is the file being written."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(f"no space left on the device writing {self.path}")


def _raise_disk_full(e: OSError, path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(path) from e


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_temp(path: Path, data: bytes) -> Path:
    """`data` in a durable temporary file beside `path`, created with the umask's permissions
    (mkstemp would make it 0600, unreadable to the rest of a group on a shared cluster)."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            _raise_disk_full(e, path)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def json_safe(v):
    """Non-finite floats as the strings 'inf', '-inf', 'nan', so the JSON stays valid."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def fmt(v) -> str:
    """Floats as Python's shortest round-trip repr; None as an empty cell."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


# -- reading metrics.csv: the one reader ---------------------------------------------------
def read_metrics_table(path) -> tuple[list[str], list[list[str]]]:
    """(header, complete rows as lists of cells) of a metrics.csv that may be torn.

    A row is kept when it has the header's number of cells and an integer step; a row cut
    short by a kill, a crash or a full disk (anywhere in the file) is dropped, and so is the
    last piece when no newline ends it. A missing or empty file gives ([], [])."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return [], []
    except UnicodeDecodeError:
        return [], []
    lines = text.split("\n")
    if len(lines) < 2 or not lines[0].startswith("step,"):
        return [], []
    header = lines[0].split(",")
    rows = []
    for line in lines[1:-1]:  # the last piece has no newline after it: empty or torn
        cells = line.split(",")
        if len(cells) == len(header) and cells[0].isdigit():
            rows.append(cells)
    return header, rows


def describe_ranges(steps) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    steps = sorted(steps)
    parts, i = [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        parts.append(f"{steps[i]}-{steps[j]}" if j > i else f"{steps[i]}")
        i = j + 1
    return ", ".join(parts)


def history_holes(steps: list[int], last: int) -> str:
    """'' when `steps` are exactly 0..last, each once; else what is wrong, e.g.
    'missing 334-800' or 'missing 5; repeated 7'."""
    seen, repeated = set(), set()
    for s in steps:
        (repeated if s in seen else seen).add(s)
    missing = [] if last < 0 else sorted(set(range(last + 1)) - seen)
    extra = sorted(s for s in seen if s > last or s < 0)
    parts = []
    if missing:
        parts.append("missing " + (describe_ranges(missing) if len(missing) < 10_000
                                   else f"{len(missing)} steps"))
    if repeated:
        parts.append("repeated " + describe_ranges(repeated))
    if extra:
        parts.append("beyond the last step " + describe_ranges(extra))
    return "; ".join(parts)


def run_holes(status: dict, steps: list[int]) -> str:
    """What is wrong with a run's history, '' when it is whole: the holes flagged when it resumed
    (status.json) and those of its metrics.csv now (steps 0..k exactly once, k the last step of a
    completed or diverged run, else the last step written)."""
    last = status.get("step") if status.get("state") in ("completed", "diverged") else None
    if not isinstance(last, int):
        last = max(steps, default=-1)
    found = [h for h in (status.get("holes") or "", history_holes(steps, last)) if h]
    return "; ".join(dict.fromkeys(found))


# -- the skip/launch rule ---------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    action: str  # start | resume | restart | skip
    reason: str

    @property
    def launch(self) -> bool:
        return self.action != "skip"


def decide(status: dict, retry: bool, live: str | None = None) -> Decision:
    """What to do with a run, given its status.json, `retry`, and a description of its live
    owner or job (None when there is none). The one rule: train.py and the sweep planner both
    call it.

    live -> skip; completed and whole -> skip; diverged, failed or completed with holes ->
    skip unless retry (diverged and holes restart from step 0, failed resumes from its last
    loadable checkpoint); new -> start; pending or running (interrupted) -> resume."""
    state, holes = status.get("state"), status.get("holes")
    if live:
        return Decision("skip", f"live: {live}")
    if state == "completed" and not holes:
        return Decision("skip", "completed")
    if state in ("diverged", "failed", "completed"):
        what = f"completed with holes ({holes})" if state == "completed" else state
        if not retry:
            return Decision("skip", f"{what}; retry reruns it")
        return Decision("resume" if state == "failed" else "restart", f"{what}: retry")
    if state is None:
        return Decision("start", "new")
    return Decision("resume", state)


# -- the run directory ------------------------------------------------------------------------
CHECKPOINT_KEYS = {"model", "optimizer", "step", "crossed", "rng_cpu"}


class RunDir:
    def __init__(self, root: str | Path, rid: str):
        self.path = Path(root) / rid
        self.id = rid

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.csv")
    status_file = property(lambda self: self.path / "status.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    prev_checkpoint = property(lambda self: self.path / "checkpoint.prev.pt")
    job_file = property(lambda self: self.path / "job.json")
    log_file = property(lambda self: self.path / "train.log")

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict:
        """status.json; {} when missing, {'unreadable': why} when garbled."""
        try:
            st = json.loads(self.status_file.read_text())
            return st if isinstance(st, dict) else {"unreadable": "not a JSON object"}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            return {"unreadable": f"{type(e).__name__}: {e}"}

    def write_status(self, **fields) -> dict:
        st = {k: v for k, v in self.status().items() if k != "unreadable"}
        st.update(fields, run_id=self.id, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        st = {k: v for k, v in st.items() if v is not None}  # None clears a field
        atomic_write_text(self.status_file, json.dumps(json_safe(st), indent=1, sort_keys=True,
                                                       allow_nan=False) + "\n")
        return st

    def create(self, cfg: DictConfig) -> bool:
        """Register a new run (config.yaml, status.json `pending`) unless it exists: the status
        file is created with link(2), which fails atomically if another process made one first."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.status_file.exists():
            return False
        self.write_config(cfg)
        st = dict(state="pending", step=0, attempts=0, run_id=self.id)
        tmp = write_temp(self.status_file, (json.dumps(st, indent=1, sort_keys=True) + "\n").encode())
        try:
            os.link(tmp, self.status_file)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.config, OmegaConf.to_yaml(cfg, resolve=True))

    def job(self) -> dict | None:
        try:
            return json.loads(self.job_file.read_text())
        except (OSError, ValueError):
            return None

    def write_job(self, handle: dict) -> None:
        atomic_write_text(self.job_file, json.dumps(handle, indent=1, sort_keys=True) + "\n")

    def remove_stale_temps(self) -> list[Path]:
        """Temporary files of writes that a kill interrupted (the lease's own excepted)."""
        stale = [p for p in self.path.glob(".*.tmp") if not p.name.startswith(".lease.json.")]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        """Write the checkpoint of state['step'] so that a kill at any instant leaves one that
        loads: temporary file (fsync) -> checkpoint.pt becomes checkpoint.prev.pt -> the
        temporary file becomes checkpoint.pt."""
        buf = io.BytesIO()
        torch.save(state, buf)
        step = state["step"]
        tmp = write_temp(self.checkpoint, buf.getvalue())
        try:
            faults.point("ckpt.tmp", step)
            if self.checkpoint.exists():
                os.replace(self.checkpoint, self.prev_checkpoint)
            faults.point("ckpt.prev", step)
            os.replace(tmp, self.checkpoint)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                _raise_disk_full(e, self.checkpoint)
            raise
        _fsync_dir(self.path)
        faults.point("ckpt.done", step)

    def load_checkpoint(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that loads: checkpoint.pt, else checkpoint.prev.pt, else None
        (step 0); one log line for each fallback."""
        candidates = [p for p in (self.checkpoint, self.prev_checkpoint) if p.exists()]
        if self.prev_checkpoint.exists() and not self.checkpoint.exists():
            log.warning("run %s: checkpoint.pt missing (killed while replacing it): trying "
                        "checkpoint.prev.pt", self.id)
        for i, path in enumerate(candidates):
            nxt = candidates[i + 1].name if i + 1 < len(candidates) else "step 0"
            try:
                ck = torch.load(path, map_location=map_location, weights_only=True)
                if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= ck.keys():
                    raise ValueError(f"not a checkpoint of this pipeline (keys {sorted(ck)[:6]})"
                                     if isinstance(ck, dict) else "not a checkpoint dict")
                return ck
            except Exception as e:
                why = (str(e).strip().splitlines() or [""])[0][:160]
                log.warning("run %s: %s cannot be loaded (%s: %s): falling back to %s",
                            self.id, path.name, type(e).__name__, why, nxt)
        return None

    def remove_checkpoints(self) -> None:
        self.checkpoint.unlink(missing_ok=True)
        self.prev_checkpoint.unlink(missing_ok=True)

    # -- metrics -----------------------------------------------------------------------------
    def open_metrics(self, columns: list[str], resume_step: int) -> MetricsWriter:
        """Keep the complete rows with step < resume_step (atomically), then append.

        The kept rows must be exactly steps 0..resume_step-1; what is not (a hole, a torn row
        in the middle, a deleted file) is returned as `writer.holes` for status.json.
        `writer.last_written` is the last step that the file held before (a resumed mirror
        must not send those rows twice)."""
        header, rows = read_metrics_table(self.metrics)
        last_written = max((int(r[0]) for r in rows), default=-1)
        kept, seen = [], set()
        if header == columns:
            for r in rows:
                s = int(r[0])
                if s < resume_step and s not in seen:
                    seen.add(s)
                    kept.append(r)
        holes = history_holes([int(r[0]) for r in kept], resume_step - 1)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(kept)
        atomic_write_text(self.metrics, buf.getvalue())
        writer = MetricsWriter(self.metrics, columns)
        writer.holes, writer.last_written = holes, last_written
        return writer


class MetricsWriter:
    """Appends one row per step and flushes it, so a reader (or wandb sync) sees it at once."""

    holes = ""
    last_written = -1

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns = path, columns
        self.f = open(path, "a", buffering=1)

    def write(self, row: dict) -> None:
        line = ",".join(fmt(row.get(c)) for c in self.columns) + "\n"
        try:
            if faults.armed("row.torn", row["step"]):
                self.f.write(line[: len(line) // 2])
                self.f.flush()
                faults.point("row.torn", row["step"])
            self.f.write(line)
            self.f.flush()
        except OSError as e:
            _raise_disk_full(e, self.path)
            raise
        faults.point("row", row["step"])

    def sync(self) -> None:
        """Make the rows durable (before a checkpoint that says they exist)."""
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            _raise_disk_full(e, self.path)
            raise

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


# -- migration ------------------------------------------------------------------------------------
def migrate(runs: Path, sweeps: Path | None = None) -> list[tuple[str, str]]:
    """Rename the run directories under `runs` whose config.yaml hashes to another id under the
    current rule (runs of models without BatchNorm made while the micro-batch was part of the
    id), and repoint the links of the sweep folders under `sweeps`. A run whose new id exists
    already, or that is live, is left alone (one log line). Returns [(old id, new id)]."""
    from . import lease

    moved = []
    for d in sorted(Path(runs).iterdir()) if Path(runs).is_dir() else []:
        try:
            cfg = OmegaConf.create(yaml_load(d / "config.yaml"))
        except (OSError, ValueError):
            continue
        new = run_id(cfg)
        if new == d.name:
            continue
        if (d.parent / new).exists() or lease.holder(d):
            log.warning("run %s: not renamed to %s (%s)", d.name, new,
                        "that folder exists" if (d.parent / new).exists() else "it is live")
            continue
        os.rename(d, d.parent / new)
        RunDir(runs, new).write_status(run_id=new, renamed_from=d.name)
        moved.append((d.name, new))
    renamed = dict(moved)
    for link in Path(sweeps).glob("*/*") if sweeps and Path(sweeps).is_dir() else []:
        if link.is_symlink() and Path(os.readlink(link)).name in renamed:
            new = renamed[Path(os.readlink(link)).name]
            target = Path(os.readlink(link)).with_name(new)
            link.unlink()
            link.with_name(new).symlink_to(target, target_is_directory=True)
    return moved


def yaml_load(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a config")
    return data


if __name__ == "__main__":  # python -m pipeline.store migrate <runs> [<sweeps>]
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "migrate":
        sys.exit("usage: python -m pipeline.store migrate <runs root> [<sweeps root>]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = migrate(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    for old, new in done:
        print(f"{old} -> {new}")
    print(f"{len(done)} run directories renamed")
