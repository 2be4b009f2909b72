"""Slurm, as the sweep sees it: site profiles and job states.

A site profile is `slurm/profiles/<name>.yaml`: sbatch options named as submitit's
SlurmExecutor takes them, plus `max_num_timeout` and `requeue`. Job states come from squeue
(queued and running jobs, array tasks one by one) and sacct (finished ones); when either cannot
be reached, the caller gets the reason instead of a silent blank.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess

import yaml

from .. import ROOT
from ..errors import ConfigError

PROFILES = ROOT / "slurm" / "profiles"
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING",
          "SUSPENDED", "RESV_DEL_HOLD", "STOPPED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
OURS = {"max_num_timeout", "requeue"}
NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def _kinds(annotation) -> tuple[set, type | None]:
    """(the plain types a value of this annotation may have, the element type of a list)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kinds, elem = set(), None
    for a in args:
        origin = typing.get_origin(a) or a
        if origin in (list, tuple, typing.Iterable, typing.Sequence) or str(origin).endswith("Iterable'>"):
            kinds.add(list)
            elem = (typing.get_args(a) or (str,))[0]
        elif origin in (dict, dict):
            kinds.add(dict)
        elif a in (str, int, bool, float):
            kinds.add(a)
        elif "Path" in str(a):
            kinds.add(str)
    return kinds, elem


def parameter_types() -> dict:
    """{sbatch option: (types allowed, list element type)} from submitit's own signature, plus ours."""
    import inspect

    from submitit.slurm.slurm import _make_sbatch_string

    out = {k: _kinds(p.annotation) for k, p in inspect.signature(_make_sbatch_string).parameters.items()}
    out.update(max_num_timeout=({int}, None), requeue=({bool}, None), time=({int, str}, None))  # "1-00:00:00" too
    return out


def _type_ok(v, kinds: set, elem) -> bool:
    if isinstance(v, bool):
        return bool in kinds
    if isinstance(v, int):
        return bool(kinds & {int, str, float})  # a number where sbatch takes text (mem: 64000) is fine
    if isinstance(v, float):
        return bool(kinds & {float, str})
    if isinstance(v, str):
        return str in kinds
    if isinstance(v, list):
        return list in kinds and all(isinstance(x, elem or str) for x in v)
    if isinstance(v, dict):
        return dict in kinds
    return False


def load_profile(name: str) -> dict:
    """The profile's settings; ConfigError naming the file and key when the file is not a mapping
    of sbatch options (as submitit names them) with values of their types."""
    from submitit.slurm.slurm import _get_default_parameters

    path = PROFILES / f"{name}.yaml"
    if not NAME_OK.fullmatch(name or "") or not path.exists():
        raise ConfigError(f"PROFILE={name}: no slurm/profiles/{name}.yaml; available: {', '.join(profiles())}")
    try:
        prof = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"PROFILE={name}: {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"PROFILE={name}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    prof = {} if prof is None else prof
    if not isinstance(prof, dict):
        raise ConfigError(f"PROFILE={name}: {path} holds a YAML {type(prof).__name__}, not a mapping of "
                          "sbatch options (key: value lines)")
    valid = set(_get_default_parameters()) | OURS
    unknown = sorted(str(k) for k in set(prof) - valid)
    if unknown:
        raise ConfigError(f"PROFILE={name}: unknown key {unknown[0]} in {path}; allowed keys: "
                          f"{', '.join(sorted(valid))}")
    types = parameter_types()
    for key, v in prof.items():
        kinds, elem = types.get(key, (set(), None))
        if v is not None and kinds and not _type_ok(v, kinds, elem):
            allowed = " or ".join(sorted({list: "a list of strings", dict: "a mapping", bool: "true/false",
                                          int: "a whole number", str: "text", float: "a number"}[k] for k in kinds))
            raise ConfigError(f"PROFILE={name}: {key}: {v!r} in {path} is not {allowed}")
    for key in ("nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "time", "array_parallelism",
                "max_num_timeout", "signal_delay_s"):
        v = prof.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v < (0 if key in ("gpus_per_node", "max_num_timeout",
                                                                                "signal_delay_s") else 1):
            raise ConfigError(f"PROFILE={name}: {key}: {v} in {path} is out of range")
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


def _lines(cmd: list[str]) -> tuple[list[str], str | None]:
    """(the output lines of a Slurm client command, None), or ([], why) when it cannot be run,
    does not answer within 60 s or fails."""
    if not shutil.which(cmd[0]):
        return [], f"{cmd[0]} not found on PATH"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return [], f"{cmd[0]} did not answer within 60 s"
    if r.returncode != 0:
        return [], f"{cmd[0]} failed: {(r.stderr.strip().splitlines() or [f'exit {r.returncode}'])[0]}"
    return r.stdout.splitlines(), None


def _query(cmd: list[str]) -> tuple[dict, str | None]:
    """{job id: state} from `<id>|<state>` lines (array ranges expanded)."""
    lines, err = _lines(cmd)
    states = {}
    for line in lines:
        if "|" in line:
            jid, state = line.split("|", 1)
            for j in _expand(jid.strip()):
                states[j] = (state.split() or [""])[0]
    return states, err


def jobs_with_comment(marker: str) -> tuple[dict[str, str], str | None]:
    """({job id: state} of this user's queued or running jobs whose Slurm comment holds
    `marker`, None), or ({}, why) when squeue cannot be reached (pipeline/dispatch/orphans.py)."""
    user = os.environ.get("USER") or getpass.getuser()
    lines, err = _lines(["squeue", "-h", "-r", "-u", user, "-o", "%i|%T|%k"])
    out = {}
    for line in lines:
        jid, _, rest = line.partition("|")
        state, _, comment = rest.partition("|")
        if marker in comment.split():
            out.update({j: state.strip() for j in _expand(jid.strip())})
    return out, err


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
