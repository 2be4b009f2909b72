"""Slurm, as the sweep sees it: site profiles and job states.

A site profile is `slurm/profiles/<name>.yaml`: sbatch options named as submitit's
SlurmExecutor takes them, plus `max_num_timeout` and `requeue`. Job states come from squeue
(queued and running jobs, array tasks one by one) and sacct (finished ones); when either cannot
be reached, the caller gets the reason instead of a silent blank.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from .validate import ConfigError

PROFILES = Path(__file__).resolve().parents[1] / "slurm" / "profiles"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING",
          "SUSPENDED", "RESV_DEL_HOLD", "STOPPED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
OURS = {"max_num_timeout", "requeue"}


def profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(name: str) -> dict:
    """The profile's settings; ConfigError naming the key when one is unknown to sbatch."""
    from submitit.slurm.slurm import _get_default_parameters

    path = PROFILES / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"PROFILE={name}: no {path.relative_to(PROFILES.parents[1])}; "
                          f"available: {', '.join(profiles())}")
    try:
        prof = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"PROFILE={name}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    valid = set(_get_default_parameters()) | OURS
    unknown = sorted(set(prof) - valid)
    if unknown:
        raise ConfigError(f"PROFILE={name}: unknown key {unknown[0]} in {path}; allowed keys: "
                          f"{', '.join(sorted(valid))}")
    return {k: v for k, v in prof.items() if v is not None}


def _expand(job: str) -> list[str]:
    """'12_[0-2,5%4]' -> ['12_0', '12_1', '12_2', '12_5'] (how squeue and sacct print pending
    array tasks); other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    out = []
    for part in m.group(2).split(","):
        a, _, b = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(a), int(b or a) + 1)]
    return out


def _query(cmd: list[str]) -> tuple[dict, str | None]:
    if not shutil.which(cmd[0]):
        return {}, f"{cmd[0]} not found on PATH"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {}, f"{cmd[0]} did not answer within 60 s"
    if r.returncode != 0:
        return {}, f"{cmd[0]} failed: {(r.stderr.strip().splitlines() or ['exit %d' % r.returncode])[0]}"
    states = {}
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            for j in _expand(jid.strip()):
                states[j] = (state.split() or [""])[0]
    return states, None


def job_states(job_ids) -> tuple[dict[str, str], str | None]:
    """({job id: Slurm state}, None) for the jobs Slurm knows; (partial, reason) when squeue or
    sacct cannot be reached. A job absent from both is absent from the dict."""
    job_ids = sorted(set(job_ids))
    if not job_ids:
        return {}, None
    arrays = sorted({j.split("_")[0] for j in job_ids})
    live, err = _query(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
    if err and "Invalid job id" in err:  # squeue refuses ids it has forgotten: none is queued
        live, err = {}, None
    done, err2 = _query(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)])
    states = {j: done[j] for j in job_ids if j in done}
    states.update({j: live[j] for j in job_ids if j in live})
    why = "; ".join(e for e in (err, err2) if e)
    return states, (f"Slurm cannot be reached ({why})" if why else None)
