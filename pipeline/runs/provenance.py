"""What produced a run: the code (commit, whether the tree was dirty, and then its diff), the
software (Python, torch, CUDA, cuDNN), the machine (host, GPU model and count) and the command
line. `train` records one entry per attempt in the run's provenance.json (RunDir.record_provenance),
a dirty tree's diff beside it as `code-<attempt>.diff`; the analysis puts `code_version` into
summary.csv and warns when one figure mixes code versions.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from .. import ROOT  # the checkout this code runs from
from ..threads import cores
from . import redact


def _git(repo: Path, *args: str) -> str | None:
    """stdout of `git -C repo ...`, None when git is missing, the folder is no checkout, or it fails."""
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def code_state(repo: Path = ROOT) -> tuple[dict, str | None]:
    """({commit, dirty, untracked}, the diff of the tracked files against the commit when dirty).
    Untracked files that git does not ignore make the tree dirty too (a new module is code), and
    are listed by name. Outside a git checkout: commit None, dirty None."""
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return dict(commit=None, dirty=None, untracked=[]), None
    status = _git(repo, "status", "--porcelain=v1", "--untracked-files=all") or ""
    lines = [ln for ln in status.splitlines() if ln.strip()]
    untracked = [ln[3:] for ln in lines if ln.startswith("??")]
    dirty = bool(lines)
    diff = _git(repo, "diff", "HEAD") if dirty else None
    return dict(commit=commit.strip(), dirty=dirty, untracked=untracked), diff or None


def software_and_machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                host=socket.gethostname(), gpu=torch.cuda.get_device_name() if cuda else None,
                gpus=torch.cuda.device_count() if cuda else 0, threads=torch.get_num_threads(),
                cores=cores())


def command_line(argv: list[str]) -> list[str]:
    """`argv` with every credential masked (pipeline/runs/redact.py): none lands in a run's folder."""
    return redact.argv(argv)


def collect(repo: Path = ROOT, launched_by: list[str] | None = None,
            hosts: list[str] | None = None) -> tuple[dict, str | None]:
    """(the record of this attempt, the diff to keep beside it or None). `launched_by`: the
    command line of the sweep that submitted the job (the job's own argv is submitit's); `hosts`:
    every rank's host, in rank order, for a run of several processes (`host` is rank 0's)."""
    code, diff = code_state(repo)
    record = dict(**code, **software_and_machine(), argv=command_line(sys.argv), cwd=str(Path.cwd()),
                  recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if launched_by:
        record["launched_by"] = command_line(list(launched_by))
    if hosts and len(hosts) > 1:
        record["hosts"] = list(hosts)
    return record, redact.text(diff) if diff else diff


def code_version(record: dict | None) -> str:
    """`<12 hex digits of the commit>`, with `+dirty` when the tree was; `unknown` without a record."""
    if not record or not record.get("commit"):
        return "unknown"
    return str(record["commit"])[:12] + ("+dirty" if record.get("dirty") else "")


def code_versions(records: list[dict]) -> str:
    """The code versions of a run's attempts, each once, in order (`a then b` when a resume ran
    other code)."""
    seen: list[str] = []
    for r in records:
        v = code_version(r)
        if v not in seen:
            seen.append(v)
    return " then ".join(seen) if seen else "unknown"
