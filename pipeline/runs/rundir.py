"""The run store: one folder per run, named by a hash of the run's semantic config (Dora-style).

    <paths.runs>/<run_id>/config.yaml         resolved config
                          metrics.csv         one row per step n = 0..k (source of truth)
                          status.json         state, step, attempts, holes, ...
                          checkpoint.pt       model, optimizer, step, RNG states
                          checkpoint.prev.pt  the one before, kept until the new one is in place
                          lease.json          the live owner (pipeline/runs/lease.py)
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
import io
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import faults
from ..errors import StoreError, shown
from . import redact
from .files import (
    atomic_write_text,
    fsync_dir,
    json_safe,
    raise_disk_full,
    read_json_object,
    read_text,
    real_folder,
    write_temp,
)
from .history import History, MetricsWriter, judge_history, read_history

log = logging.getLogger(__name__)

STATES = ("pending", "running", "completed", "diverged", "failed")
FINISHED = ("completed", "diverged")  # states of a run that ended by itself

# status.json: the fields the tools read, with the types they must have (others are kept as they are)
STATUS_FIELDS = {"state": (str,), "step": (int,), "attempts": (int,), "holes": (str,), "error": (str,),
                 "run_id": (str,), "slurm_job": (str,), "final_loss": (int, float, str),
                 "started_at": (int, float), "first_step_at": (int, float), "updated_at": (str,),
                 "kept": (str,)}
JOB_FIELDS = {"backend": (str,), "job_id": (str,), "sweep": (str,), "submitted_at": (int, float),
              "log": (str,), "host": (str,), "profile": (str,), "pid": (int,), "start": (str,)}
JOB_BACKENDS = ("slurm", "local")

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
    except RecursionError:
        return None, "config.yaml: nested too deeply, not a config of this pipeline"
    except yaml.YAMLError as e:
        return None, f"config.yaml: not valid YAML ({str(e).splitlines()[0][:80]})"
    if not isinstance(data, dict):
        return None, f"config.yaml: {'empty' if data is None else 'a YAML ' + type(data).__name__}, not a mapping"
    planted = interpolation(data)
    if planted:  # a file of the store is data: nothing in it is resolved (${oc.env:SECRET} would be)
        return None, f"config.yaml: {planted} is an interpolation, which a stored config never holds; not resolved"
    return data, ""


def interpolation(value, key: str = "") -> str:
    """The first key whose value holds `${...}` (OmegaConf would resolve it), else ''."""
    if isinstance(value, dict):
        return next((found for k, v in value.items() if (found := interpolation(v, f"{key}.{k}".lstrip(".")))), "")
    if isinstance(value, list):
        return next((found for i, v in enumerate(value) if (found := interpolation(v, f"{key}.{i}"))), "")
    return key or "a value" if isinstance(value, str) and "${" in value else ""


class RunDir:
    """One run's folder. `owner` (a Lease) is set while this process holds the run's lease:
    from then on every write checks it just before it acts (`fence`) and raises LeaseLost once
    another process has taken the run over."""

    def __init__(self, root: str | Path, rid: str):
        self.path = Path(root) / rid
        self.id = rid
        self.owner = None
        self.config_sha = None  # the semantic config's hash, once this process wrote config.yaml

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.csv")
    status_file = property(lambda self: self.path / "status.json")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    prev_checkpoint = property(lambda self: self.path / "checkpoint.prev.pt")
    job_file = property(lambda self: self.path / "job.json")
    log_file = property(lambda self: self.path / "train.log")
    provenance_file = property(lambda self: self.path / "provenance.json")

    FILES = ("config.yaml", "metrics.csv", "status.json", "checkpoint.pt", "checkpoint.prev.pt", "lease.json",
             "job.json", "train.log", "provenance.json")

    def usable(self) -> None:
        """StoreError naming the first of the run's files that is a link, a folder or a special
        file: a run writes only where regular files, or nothing, stand."""
        for name in self.FILES:
            p = self.path / name
            if p.is_symlink() or (p.exists() and not p.is_file()):
                what = "link" if p.is_symlink() else "folder" if p.is_dir() else "special file"
                raise StoreError(f"{p}: a {what} where the run's file must be; nothing is written through it "
                                 "and the run is left as it is (move it aside, then rerun)")

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
        made = not self.path.exists() and not self.path.is_symlink()
        real_folder(self.path, "a run folder", create=True)
        if self.status_file.exists() or self.status_file.is_symlink():
            return False
        st = dict(state="pending", step=0, attempts=0, run_id=self.id)
        try:
            self.write_config(cfg)
            tmp = write_temp(self.status_file, (json.dumps(st, indent=1, sort_keys=True) + "\n").encode())
        except BaseException:  # a full disk: nothing half-created is left (a folder without status.json)
            if made:
                self.config.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        try:
            os.link(tmp, self.status_file)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def write_config(self, cfg: DictConfig) -> None:
        from .ids import config_hash

        text = OmegaConf.to_yaml(OmegaConf.create(redact.config(cfg)))  # credentials masked (not in the id)
        atomic_write_text(self.config, text, self.fence, self._tag)
        self.config_sha = config_hash(cfg)

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

    # -- provenance (pipeline/runs/provenance.py) ------------------------------------------------------
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
        import torch  # here, not at import: planning a sweep or checking a run needs no torch

        step = state["step"]
        # whose checkpoint this is: refused by any other run (load_checkpoint)
        state = dict(state, identity=dict(run_id=self.id, config_sha=self.config_sha, step=step))
        buf = io.BytesIO()
        torch.save(state, buf)
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
                raise_disk_full(e, self.checkpoint)
            raise
        fsync_dir(self.path)
        faults.point("ckpt.done", step)

    @property
    def lost(self) -> bool:
        return self.owner is not None and self.owner.lost

    def load_checkpoint(self, map_location="cpu", required=frozenset({"model", "optimizer", "step"})) -> dict | None:
        """The newest checkpoint that loads: checkpoint.pt, else checkpoint.prev.pt, else None
        (step 0); one log line for each fallback."""
        import torch

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
                self._check_identity(ck)
                return ck
            except Exception as e:
                why = (str(e).strip().splitlines() or [""])[0][:160]
                log.warning("run %s: %s cannot be loaded (%s: %s): falling back to %s",
                            self.id, path.name, type(e).__name__, why, nxt)
        return None

    def _check_identity(self, ck: dict) -> None:
        """ValueError unless the checkpoint names this run, its config and its own step."""
        who = ck.get("identity")
        if not isinstance(who, dict):
            raise ValueError("it names no run (another run's, or made before checkpoints named their run)")
        if who.get("run_id") != self.id:
            raise ValueError(f"it is run {shown(who.get('run_id'), 20)}'s, not this run's")
        if self.config_sha is not None and who.get("config_sha") != self.config_sha:
            raise ValueError("it names another config than this run's")
        if who.get("step") != ck["step"]:
            raise ValueError(f"it names step {shown(who.get('step'), 20)} but holds step {ck['step']}")

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
        ours = hist.select(columns) if hist.header else History([], [])
        holes, _ = judge_history(ours, resume_step - 1, upto=resume_step - 1)
        lacking = [c for c in columns if c not in hist.header] if hist.header else []
        if resume_step > 0 and lacking:
            holes = "; ".join(filter(None, [f"no column {', '.join(lacking)} in the rows before step "
                                            f"{resume_step}", holes]))
        kept = self._keep_metrics(hist, columns, resume_step, holes)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(ours.in_step_order(upto=resume_step - 1))
        atomic_write_text(self.metrics, buf.getvalue(), self.fence, self._tag)
        writer = MetricsWriter(self.metrics, columns, self.fence)
        writer.holes, writer.last_written, writer.kept = holes, last_written, kept
        return writer

    def _keep_metrics(self, hist: History, columns: list[str], resume_step: int, holes: str) -> str:
        """No row is ever deleted: when metrics.csv is not exactly what this run continues (another
        header, CR LF lines, damage, unparseable rows, holes before `resume_step`), the file as it
        is goes beside it as `metrics.csv.<time>.kept` first (hard-linked, so it costs no copy).
        Returns '' or one line saying what was kept and why."""
        whole, _ = judge_history(hist, max(hist.steps, default=-1)) if hist.rows else ("", -1)
        why = hist.damage or ("columns differ from this run's" if hist.header and hist.header != columns else "") \
            or ("CR LF line endings" if hist.crlf else "") or ("unparseable rows" if hist.unparseable else "") \
            or (holes if resume_step > 0 and hist.rows else "") or whole
        if not why or hist.missing_file:
            return ""
        self.fence()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for i in range(100):
            name = f"metrics.csv.{stamp}{'' if i == 0 else f'.{i}'}.kept"
            try:
                if self.metrics.is_dir() and not self.metrics.is_symlink():
                    os.rename(self.metrics, self.path / name)  # a folder where the file must be: moved aside
                else:
                    os.link(self.metrics, self.path / name, follow_symlinks=False)
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise_disk_full(e, self.path / name)
                raise StoreError(f"{self.metrics}: cannot be kept aside ({e.strerror or e})") from None
        fsync_dir(self.path)
        return f"{name}: metrics.csv before the resume at step {resume_step} ({why})"
