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

import contextlib
import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import faults
from .errors import DiskFull
from .thresholds import DIVERGE_FACTOR, DIVERGE_PATIENCE

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
ADDED_KEYS: dict[str, object] = {"train.diverge_factor": DIVERGE_FACTOR, "train.diverge_patience": DIVERGE_PATIENCE,
                                  "train.perturb_theta0": None}


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
def _raise_disk_full(e: OSError, path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(path) from e


def _temp_name(path: Path, tag: str | None = None) -> Path:
    """`.<name>.<writer>.<random>.tmp`: the writer is the lease holder's host, pid and
    generation (Lease.temp_tag), so that a new owner can tell its own temporary files from
    those of a process that lost the run."""
    tag = tag or f"{socket.gethostname()}-{os.getpid()}"
    return path.with_name(f".{path.name}.{tag}.{secrets.token_hex(4)}.tmp")


def private_folder(path: Path) -> Path:
    """`path`, created readable and writable by this user only (submitit's pickles, a sweep's
    outcomes and submission intents live there)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_temp(path: Path, data: bytes, tag: str | None = None) -> Path:
    """`data` in a durable temporary file beside `path`, created with the umask's permissions
    (mkstemp would make it 0600, unreadable to the rest of a group on a shared cluster)."""
    path = Path(path)
    tmp = _temp_name(path, tag)
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


def atomic_write_bytes(path: Path, data: bytes, fence=None, tag: str | None = None) -> None:
    """Replace `path` by `data` (temporary file, fsync, rename). `fence()`, when given, is
    called just before the rename: it raises when this process may no longer write here."""
    path = Path(path)
    if fence is not None:
        fence()
    tmp = write_temp(path, data, tag)
    try:
        if fence is not None:
            fence()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, fence=None, tag: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), fence, tag)


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
def _number(cell: str) -> bool:
    if cell == "":
        return True
    try:
        float(cell)
        return True
    except ValueError:
        return False


@dataclass
class History:
    """metrics.csv as read: `rows` are the complete, parseable rows in file order; what else was
    found is kept to be judged (pipeline/integrity.py)."""

    header: list[str]
    rows: list[list[str]]
    damage: str = ""  # the file as a whole: not UTF-8, no header, ...
    unparseable: list = field(default_factory=list)  # (line number, step cell) of rows with a non-number
    missing_file: bool = False

    @property
    def steps(self) -> list[int]:
        return [int(r[0]) for r in self.rows]

    def in_step_order(self, upto: int | None = None) -> list[list[str]]:
        """The rows sorted by step, the first of a repeated step only (steps <= `upto` when given)."""
        first = {}
        for r in self.rows:
            if upto is None or int(r[0]) <= upto:
                first.setdefault(int(r[0]), r)
        return [first[s] for s in sorted(first)]


def read_history(path) -> History:
    """metrics.csv, which may be torn or damaged. A row is kept when it has the header's number
    of cells, an integer step and numbers (or empty cells) elsewhere; a row cut short by a kill
    (anywhere in the file) is dropped, and so is the last piece when no newline ends it; a row
    with a cell that is not a number is noted in `unparseable`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return History([], [], missing_file=True)
    except OSError as e:
        return History([], [], damage=f"cannot be read ({e.strerror or e})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return History([], [], damage=f"not UTF-8 text (byte {e.start})")
    if not text:
        return History([], [], damage="empty (zero bytes)")
    lines = text.split("\n")
    if not lines[0].startswith("step,"):
        return History([], [], damage="no header line starting with 'step,'")
    header = lines[0].split(",")
    rows, bad = [], []
    for i, line in enumerate(lines[1:-1], start=2):  # the last piece has no newline after it: empty or torn
        cells = line.split(",")
        if len(cells) != len(header) or not cells[0].isdigit():
            continue
        if all(_number(c) for c in cells[1:]):
            rows.append(cells)
        else:
            bad.append((i, cells[0]))
    return History(header, rows, unparseable=bad)


def read_metrics_table(path) -> tuple[list[str], list[list[str]]]:
    """(header, complete parseable rows in file order) of a metrics.csv; ([], []) when there is
    none or it is damaged as a whole."""
    h = read_history(path)
    return h.header, h.rows


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
    """'' when `steps` are exactly 0..last, each once, in this order; else what is wrong, e.g.
    'missing 334-800' or 'missing 5; repeated 7; out of order at step 24'."""
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
    disorder = sorted({b for a, b in zip(steps, steps[1:]) if b < a})
    if disorder and not repeated:
        parts.append("out of order at step " + describe_ranges(disorder[:20]))
    return "; ".join(parts)


def whole_until(steps: list[int]) -> int:
    """The largest k such that the history starts with steps 0..k, once each, in order (-1: none)."""
    k = -1
    for s in steps:
        if s != k + 1:
            break
        k = s
    return k


def judge_history(hist: History, last: int, upto: int | None = None) -> tuple[str, int]:
    """(what is wrong with the rows of `hist` as the history of steps 0..last, '' when whole;
    the last step of its whole prefix). `upto`: judge only the rows of steps <= upto (a resume
    keeps those). The rule of pipeline/integrity.py and of `RunDir.open_metrics`."""
    steps = [s for s in hist.steps if upto is None or s <= upto]
    bad = [(line, int(step)) for line, step in hist.unparseable if upto is None or int(step) <= upto]
    found = history_holes(steps, last)
    good = whole_until(steps)
    if bad:
        found = "; ".join(filter(None, [found, f"unparseable row at line {describe_ranges([b[0] for b in bad][:20])}"]))
        good = min(good, min(b[1] for b in bad) - 1)
    return found, good


# -- the skip/launch decision (made by pipeline.integrity.decide) ------------------------------
@dataclass(frozen=True)
class Decision:
    action: str  # start | resume | restart | skip
    reason: str

    @property
    def launch(self) -> bool:
        return self.action != "skip"


# -- the run directory ------------------------------------------------------------------------
FINISHED = ("completed", "diverged")  # states of a run that ended by itself

# status.json: the fields the tools read, with the types they must have (others are kept as they are)
STATUS_FIELDS = {"state": (str,), "step": (int,), "attempts": (int,), "holes": (str,), "error": (str,),
                 "run_id": (str,), "slurm_job": (str,), "final_loss": (int, float, str),
                 "started_at": (int, float), "first_step_at": (int, float), "updated_at": (str,)}
JOB_FIELDS = {"backend": (str,), "job_id": (str,), "sweep": (str,), "submitted_at": (int, float),
              "log": (str,), "host": (str,), "profile": (str,), "pid": (int,), "start": (str,)}
JOB_BACKENDS = ("slurm", "local")


def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "true/false"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def read_text(path: Path) -> tuple[str | None, str]:
    """(the file's text, '') ; (None, '') when it is missing; (None, why) when it cannot be read or
    is not UTF-8 (`why` names the file)."""
    name = Path(path).name
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"{name}: cannot be read ({e.strerror or e})"
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"{name}: not UTF-8 text (byte {e.start})"


def read_json_object(path: Path, fields: dict) -> tuple[dict | None, str]:
    """(object, '') for a JSON file holding an object whose `fields` have their types; (None, '')
    when the file is missing; (None, why) when it is damaged (`why` names the file)."""
    name = Path(path).name
    text, why = read_text(path)
    if text is None:
        return None, why
    if not text.strip():
        return None, f"{name}: empty ({len(text.encode())} bytes)"
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, f"{name}: not valid JSON ({str(e).splitlines()[0][:80]})"
    if not isinstance(obj, dict):
        return None, f"{name}: a JSON {type(obj).__name__}, not an object"
    for key, types in fields.items():
        v = obj.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return None, f"{name}: field {key} is {json.dumps(v)[:40]}, not {_type_names(types)}"
    return obj, ""


def read_status_file(path: Path) -> tuple[dict, str]:
    """(status.json, '') or ({}, why it is damaged); a missing file is ({}, '')."""
    st, why = read_json_object(path, STATUS_FIELDS)
    if st is None:
        return {}, why
    if st.get("state") not in STATES:
        return {}, f"status.json: state {json.dumps(st.get('state'))[:40]} is not one of {', '.join(STATES)}"
    for key in ("step", "attempts"):
        if isinstance(st.get(key), int) and st[key] < 0:
            return {}, f"status.json: field {key} is {st[key]}, not >= 0"
    return st, ""


def read_config_file(path: Path) -> tuple[dict | None, str]:
    """(config.yaml as a dict, '') or (None, why); why is '' only when the file is missing."""
    import yaml

    text, why = read_text(path)
    if text is None:
        return None, why
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return None, f"config.yaml: not valid YAML ({str(e).splitlines()[0][:80]})"
    if not isinstance(data, dict):
        return None, f"config.yaml: {'empty' if data is None else 'a YAML ' + type(data).__name__}, not a mapping"
    return data, ""


class RunDir:
    """One run's folder. `owner` (a Lease) is set while this process holds the run's lease:
    from then on every write checks it just before it acts (`fence`) and raises LeaseLost once
    another process has taken the run over."""

    def __init__(self, root: str | Path, rid: str):
        self.path = Path(root) / rid
        self.id = rid
        self.owner = None

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.csv")
    status_file = property(lambda self: self.path / "status.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    prev_checkpoint = property(lambda self: self.path / "checkpoint.prev.pt")
    job_file = property(lambda self: self.path / "job.json")
    log_file = property(lambda self: self.path / "train.log")
    provenance_file = property(lambda self: self.path / "provenance.json")

    def fence(self) -> None:
        """Raise LeaseLost when this process held the run's lease and no longer does."""
        if self.owner is not None:
            self.owner.check()

    @property
    def _tag(self) -> str | None:
        return self.owner.temp_tag if self.owner is not None else None

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict:
        """status.json; {} when missing, {'unreadable': why} when damaged."""
        st, why = read_status_file(self.status_file)
        return {"unreadable": why} if why else st

    def write_status(self, **fields) -> dict:
        st = {k: v for k, v in self.status().items() if k != "unreadable"}
        st.update(fields, run_id=self.id, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        st = {k: v for k, v in st.items() if v is not None}  # None clears a field
        atomic_write_text(self.status_file, json.dumps(json_safe(st), indent=1, sort_keys=True,
                                                       allow_nan=False) + "\n", self.fence, self._tag)
        return st

    def create(self, cfg: DictConfig) -> bool:
        """Register a new run (config.yaml, status.json `pending`) unless it exists: the status
        file is created with link(2), which fails atomically if another process made one first."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.status_file.exists() or self.status_file.is_symlink():
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
        atomic_write_text(self.config, OmegaConf.to_yaml(cfg, resolve=True), self.fence, self._tag)

    def job(self) -> dict | None:
        """job.json, None when missing or damaged (`read_job` says why)."""
        return self.read_job()[0]

    def read_job(self) -> tuple[dict | None, str]:
        job, why = read_json_object(self.job_file, JOB_FIELDS)
        if job is not None and (job.get("backend") not in JOB_BACKENDS or
                                (job.get("backend") == "slurm" and not job.get("job_id"))):
            what = "backend" if job.get("backend") not in JOB_BACKENDS else "job_id"
            return None, (f"job.json: field {what} is {json.dumps(job.get(what))[:40]}, not "
                          + ("one of " + ", ".join(JOB_BACKENDS) if what == "backend" else "a Slurm job id"))
        return job, why

    def write_job(self, handle: dict) -> None:
        """The sweep's handle of the job it submitted (the sweep process writes it, not the run's owner)."""
        atomic_write_text(self.job_file, json.dumps(handle, indent=1, sort_keys=True) + "\n")

    # -- provenance (pipeline/provenance.py) ------------------------------------------------------
    def provenance(self) -> list[dict]:
        """The attempts' records of provenance.json, oldest first; [] when missing or damaged (it
        describes the run, it is not the run: a damaged one costs the record, not the results)."""
        text, _ = read_text(self.provenance_file)
        try:
            attempts = json.loads(text).get("attempts") if text else []
        except (ValueError, AttributeError):
            return []
        return [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []

    def record_provenance(self, attempt: int, record: dict, diff: str | None) -> None:
        """Add this attempt's record (fenced, like every write of the owner); a dirty tree's diff
        goes beside it as code-<attempt>.diff, written first so that the record never names a
        file that is not there."""
        entry = dict(attempt=attempt, **record)
        if diff:
            name = f"code-{attempt}.diff"
            atomic_write_text(self.path / name, diff, self.fence, self._tag)
            entry["diff_file"] = name
        attempts = [a for a in self.provenance() if a.get("attempt") != attempt] + [entry]
        atomic_write_text(self.provenance_file, json.dumps(dict(attempts=json_safe(attempts)), indent=1,
                                                           sort_keys=True) + "\n", self.fence, self._tag)

    def remove_stale_temps(self) -> list[Path]:
        """Temporary files of other writers (interrupted, or fenced off); the lease's own excepted."""
        self.fence()
        mine = f".{self._tag}." if self._tag else None
        stale = [p for p in self.path.glob(".*.tmp")
                 if not p.name.startswith(".lease.json.") and not (mine and mine in p.name)]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        """Write the checkpoint of state['step'] so that a kill at any instant leaves one that
        loads: temporary file (fsync) -> checkpoint.pt becomes checkpoint.prev.pt -> the
        temporary file becomes checkpoint.pt. The lease is checked before each of the three."""
        buf = io.BytesIO()
        torch.save(state, buf)
        step = state["step"]
        self.fence()
        tmp = write_temp(self.checkpoint, buf.getvalue(), self._tag)
        try:
            faults.point("ckpt.tmp", step)
            self.fence()
            if self.checkpoint.exists():
                os.replace(self.checkpoint, self.prev_checkpoint)
            faults.point("ckpt.prev", step)
            self.fence()
            os.replace(tmp, self.checkpoint)
        except BaseException as e:
            if not self.lost:
                tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                _raise_disk_full(e, self.checkpoint)
            raise
        _fsync_dir(self.path)
        faults.point("ckpt.done", step)

    @property
    def lost(self) -> bool:
        return self.owner is not None and self.owner.lost

    def load_checkpoint(self, map_location="cpu", required=frozenset({"model", "optimizer", "step"})) -> dict | None:
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
                if not isinstance(ck, dict) or not ck.keys() >= required:
                    raise ValueError(f"not a checkpoint of this pipeline (keys {sorted(ck)[:6]})"
                                     if isinstance(ck, dict) else "not a checkpoint dict")
                if not isinstance(ck["step"], int) or isinstance(ck["step"], bool) or ck["step"] < 0 \
                        or not isinstance(ck["model"], dict) or not isinstance(ck["optimizer"], dict):
                    raise ValueError("its step, model or optimizer has the wrong type")
                return ck
            except Exception as e:
                why = (str(e).strip().splitlines() or [""])[0][:160]
                log.warning("run %s: %s cannot be loaded (%s: %s): falling back to %s",
                            self.id, path.name, type(e).__name__, why, nxt)
        return None

    def remove_checkpoints(self) -> None:
        self.fence()
        self.checkpoint.unlink(missing_ok=True)
        self.prev_checkpoint.unlink(missing_ok=True)

    # -- metrics -----------------------------------------------------------------------------
    def open_metrics(self, columns: list[str], resume_step: int) -> MetricsWriter:
        """Keep the complete rows with step < resume_step (atomically), then append.

        The kept rows must be exactly steps 0..resume_step-1, in order; what is not (a hole, a
        torn or unparseable row, a repeated or out-of-order step, a deleted file) is returned as
        `writer.holes` for status.json, and the kept rows are written in step order, each once.
        `writer.last_written` is the last step that the file held before (a resumed mirror
        must not send those rows twice)."""
        hist = read_history(self.metrics)
        last_written = max(hist.steps, default=-1)
        ours = hist if hist.header == columns else History([], [])
        holes, _ = judge_history(ours, resume_step - 1, upto=resume_step - 1)
        if resume_step > 0 and hist.header and hist.header != columns:
            holes = "; ".join(filter(None, ["columns differ from this run's", holes]))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(ours.in_step_order(upto=resume_step - 1))
        atomic_write_text(self.metrics, buf.getvalue(), self.fence, self._tag)
        writer = MetricsWriter(self.metrics, columns, self.fence)
        writer.holes, writer.last_written = holes, last_written
        return writer


class MetricsWriter:
    """Appends one row per step and flushes it, so a reader (or wandb sync) sees it at once;
    `fence()` is called before each row and each sync."""

    holes = ""
    last_written = -1

    def __init__(self, path: Path, columns: list[str], fence=None):
        self.path, self.columns = path, columns
        self.fence = fence or (lambda: None)
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 -- held open for the run's life, closed by close()

    def write(self, row: dict) -> None:
        line = ",".join(fmt(row.get(c)) for c in self.columns) + "\n"
        self.fence()
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
        self.fence()
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            _raise_disk_full(e, self.path)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()


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
