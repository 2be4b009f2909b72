"""`make sweep` / `make status`: run a sweep preset of `conf/sweep/` and report on it.

    python -m pipeline.sweep run toy [--launcher local|basic|slurm] [--jobs 2] [--profile default]
                                     [--retry 0|1] [-- <hydra overrides>]
    python -m pipeline.sweep status toy

`run` is a Hydra multirun of `pipeline.train` with the `adam` sweeper (validation, sweep
folder, skip/resume; see hydra_plugins/adam_sweeper) and one of three launchers:
  basic  in this process, one run after another;
  local  submitit's local executor, JOBS runs at a time (default);
  slurm  hydra-submitit-launcher, one job array, settings from a site profile
         (`slurm/hydra/launcher/<profile>.yaml`). The launcher waits for results, so it runs
         detached (log: sweeps/<name>/launcher.log) and `make sweep` returns once Slurm has
         accepted the array; `sweeps/<name>/jobs.json` maps run ids to Slurm job ids.
Before any launch, a dry run of the same multirun validates every grid point.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
LAUNCHERS = {"basic": "basic", "local": "submitit_local", "slurm": "submitit_slurm"}


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def profiles() -> list[str]:
    return sorted(p.stem for p in (ROOT / "slurm" / "hydra" / "launcher").glob("*.yaml"))


def _override_value(extra: list[str], key: str, default: str) -> str:
    for o in extra:
        if o.lstrip("+").split("=", 1)[0] == key:
            return o.split("=", 1)[1]
    return default


def sweep_folder(preset: str, extra=()) -> Path:
    """`<paths.sweeps>/<sweep.name>`, both overridable in EXTRA (the preset names the sweep)."""
    extra = list(extra)
    return Path(_override_value(extra, "paths.sweeps", "sweeps")) / _override_value(extra, "sweep.name", preset)


def multirun_cmd(preset, launcher, jobs, profile, retry, extra, dry_run):
    cmd = [sys.executable, "-m", "pipeline.train", "-m", f"sweep={preset}",
           f"hydra/launcher={LAUNCHERS[launcher] if launcher != 'slurm' else profile}",
           f"retry={'true' if retry else 'false'}", f"hydra.sweeper.dry_run={str(dry_run).lower()}"]
    if launcher == "slurm":
        cmd.insert(4, f"hydra.searchpath=[file://{ROOT / 'slurm'}]")
    elif launcher == "local":
        cmd += [f"hydra.sweeper.max_batch_size={jobs}", "hydra.launcher.timeout_min=10080"]
    return cmd + list(extra)


def _fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _error_line(text: str) -> str:
    """The message of a failed Hydra process, without its traceback; for an unknown config
    group option, with the available options."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    avail = [i for i, ln in enumerate(lines) if ln.startswith("Available options")]
    if avail:
        i = avail[0]
        opts = []
        for ln in lines[i + 1:]:
            if not ln.startswith("\t"):
                break
            opts.append(ln.strip())
        first = next((ln for ln in lines if ln.startswith("In ") or "Could not" in ln), lines[0])
        return f"{first.strip()}; available: {', '.join(opts)}"
    for ln in reversed(lines):
        for marker in ("ConfigError: ", "ConfigCompositionException: ", "Error: "):
            if marker in ln:
                return ln.split(marker, 1)[1]
    for ln in lines:
        if not ln.startswith(("Traceback", "  ", "Set the environment variable")):
            return ln
    return lines[-1] if lines else "unknown error"


def run(preset, launcher="local", jobs=2, profile="default", retry=False, extra=(), wait_s=600):
    if preset not in presets():
        _fail(f"SWEEP={preset}: unknown preset; available: {', '.join(presets())}")
    if launcher not in LAUNCHERS:
        _fail(f"LAUNCHER={launcher}: allowed values are {', '.join(LAUNCHERS)}")
    if launcher == "slurm" and profile not in profiles():
        _fail(f"PROFILE={profile}: no slurm/hydra/launcher/{profile}.yaml; available: {', '.join(profiles())}")
    if launcher == "slurm" and not shutil.which("sbatch"):
        _fail("LAUNCHER=slurm: sbatch not found on PATH (run on a Slurm login node, or use LAUNCHER=local)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # 1. dry run: validate every grid point, register the sweep folder, plan what to launch
    dry = subprocess.run(multirun_cmd(preset, launcher, jobs, profile, retry, extra, True),
                         cwd=os.getcwd(), env=env, capture_output=True, text=True)
    if dry.returncode != 0:
        _fail(_error_line(dry.stderr + dry.stdout))
    folder = sweep_folder(preset, extra)
    plan = json.loads((folder / "plan.json").read_text())
    n, todo = len(plan["points"]), len(plan["launched"])
    states = {}
    for p in plan["points"]:
        if not p["launch"]:
            states[p["state"]] = states.get(p["state"], 0) + 1
    why = ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
    hint = "; RETRY=1 reruns diverged/failed" if set(states) - {"completed"} else ""
    print(f"sweep {folder.name}: {n} runs, {todo} to launch, {n - todo} skipped"
          f"{f' ({why}{hint})' if why else ''} -> {folder}")
    if todo == 0:
        return 0
    cmd = multirun_cmd(preset, launcher, jobs, profile, retry, extra, False)
    if launcher != "slurm":
        return subprocess.run(cmd, env=env).returncode
    # 2. Slurm: the launcher blocks until the array ends, so detach it and wait for submission
    log = open(folder / "launcher.log", "ab")
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    (folder / "launcher.pid").write_text(str(proc.pid))
    while time.time() - started < wait_s:
        ids = _submitted_jobs(folder, started)
        if len(ids) >= todo:
            jobs_map = dict(zip(plan["launched"], ids))
            old = json.loads((folder / "jobs.json").read_text()) if (folder / "jobs.json").exists() else {}
            (folder / "jobs.json").write_text(json.dumps({**old, **jobs_map}, indent=1))
            print(f"submitted {todo} runs as Slurm array {ids[0].split('_')[0]}; "
                  f"`make status SWEEP={folder.name}` to follow, launcher log: {folder / 'launcher.log'}")
            return 0
        if proc.poll() is not None:
            _fail(f"the launcher exited ({proc.returncode}) before submitting: "
                  f"{_error_line((folder / 'launcher.log').read_text())}", 1)
        time.sleep(0.5)
    _fail(f"no submission after {wait_s}s; see {folder / 'launcher.log'}", 1)


def _submitted_jobs(folder: Path, since: float) -> list[str]:
    """Slurm ids `<array>_<task>` of the array submitted since `since`, in task order."""
    ids = []
    for p in (folder / ".hydra").glob(".submitit/*/*_submitted.pkl"):
        if p.stat().st_mtime >= since - 1:
            ids.append(p.parent.name)
    return sorted(ids, key=lambda j: [int(x) if x.isdigit() else x for x in j.split("_")])


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job (sacct, falling back to squeue), '' when unknown."""
    if not job_ids or not shutil.which("sacct"):
        return {}
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True)
    states = {}
    for line in out.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid] = state.split()[0] if state else ""
    return states


def _last_loss(metrics: Path):
    try:
        with open(metrics, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="ignore").split("\n")
        header = metrics.open().readline().strip().split(",")
        for line in reversed(tail[:-1]):
            cells = line.split(",")
            if len(cells) == len(header) and cells[0].isdigit():
                return float(cells[header.index("loss")])
    except (FileNotFoundError, ValueError, IndexError):
        pass
    return None


def status(preset, extra=()) -> int:
    folder = sweep_folder(preset, extra)
    if not folder.is_dir():
        _fail(f"SWEEP={preset}: no sweep folder {folder} (run `make sweep SWEEP={preset}` first)")
    jobs = json.loads((folder / "jobs.json").read_text()) if (folder / "jobs.json").exists() else {}
    runs = sorted(p for p in folder.iterdir() if p.is_symlink() or (p / "status.json").exists())
    slurm = slurm_states(sorted({jobs[p.name] for p in runs if p.name in jobs}))
    rows = []
    for p in runs:
        st = json.loads((p / "status.json").read_text()) if (p / "status.json").exists() else {}
        cfg = yaml.safe_load((p / "config.yaml").read_text()) if (p / "config.yaml").exists() else {}
        o = cfg.get("optim", {})
        state = st.get("state", "?")
        job = jobs.get(p.name, "")
        sstate = slurm.get(job, "")
        if state in ("pending", "running") and sstate in ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL",
                                                          "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
            state = f"{state}/{sstate.lower()}"  # the job is gone: the run will not progress
        loss = _last_loss(p / "metrics.csv")
        rows.append([p.name, f"{o.get('h', '')}", f"{o.get('beta', '')}", f"{o.get('rho', '')}", state,
                     str(st.get("step", "")), "" if loss is None else f"{loss:.6g}", job, sstate])
    head = ["run_id", "h", "beta", "rho", "state", "step", "last_loss", "slurm_job", "slurm_state"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    counts = {}
    for r in rows:
        counts[r[4]] = counts.get(r[4], 0) + 1
    print(f"\n{len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("preset")
    r.add_argument("--launcher", default="local")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--profile", default="default")
    r.add_argument("--retry", default="0")
    r.add_argument("--wait", type=float, default=600, help="seconds to wait for Slurm to accept the array")
    s = sub.add_parser("status")
    s.add_argument("preset")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # Hydra overrides
    argv = argv[:argv.index("--")] if "--" in argv else argv
    a = ap.parse_args(argv)
    extra = [x for x in extra if x]
    if a.cmd == "run":
        return run(a.preset, a.launcher, a.jobs, a.profile, a.retry not in ("0", "", "false"), extra, a.wait)
    return status(a.preset, extra)


if __name__ == "__main__":
    sys.exit(main())
