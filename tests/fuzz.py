"""The run-store fuzzer (issue 31): random damage to the files of a tiny sweep, then every command a
user runs on it; the invariants that must hold whatever the damage.

    python -m tests.fuzz --cases 2000 [--seed S]      (make fuzz CASES=2000)

A *base* sweep (the `synthetic` preset, shrunk: 4 runs) is trained once: two runs finished (as a
pack), two interrupted (killed at step 17, their checkpoint of step 15 on disk), and a *clean*
copy of the whole sweep run to the end gives each run's reference rows. Each case copies the base,
applies 1-3 operators of CATALOGUE to random files (a run's config.yaml, metrics.csv,
status.json, checkpoints, lease.json, job.json, provenance.json, train.log, lock file; the sweep's
plan.json and links; a whole run folder), then runs, in this process: `make status`, `make
analyze` (with figures), `analysis.table`, `analysis.redraw`, a dry `make sweep`, `make sweep`
(resume) and `make sweep RETRY=1`. It asserts

1. no traceback: every command returns or exits with 0, 1 or 2, and nothing prints "Traceback";
2. every run whose folder the case did not replace ends, after the retry, completed with rows
   identical (but time_s) to the clean run -- or it is refused, named with its reason in the
   retry's output (a file that cannot be used, e.g. a directory where the lock file must be);
3. every run whose files were not touched ends identical to the clean run;
4. no row is lost: every step of a parseable row left by the damage is, at the end, in the run's
   metrics.csv or in a file kept beside it (metrics.csv.<time>.kept);
5. every run whose history, semantic config, state or lease the damage changed is flagged by the
   one integrity rule (pipeline.runs.integrity.check), before repair, with a reason naming one of
   the files it changed (a history cut short is a finding only beside a readable status.json).

A failing case prints its seed and operators: `python -m tests.fuzz --seed S --cases 1` replays it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "synthetic"
SHRINK = ["data.n_train=48", "data.n_test=16", "data.image_size=8", "model.width=4", "train.micro_batch=48",
          "train.max_steps=30", "train.progress=none", "logger=none", "lease.timeout_s=2",
          "lease.heartbeat_s=0.5", "precision=fp64"]
REL = 1e-9  # a run retrained alone vs its packed reference: fp64, equal to summation order (1e-12 measured)
KILL_AT = 17  # the interrupted runs die here: their checkpoint is step 15
RUN_FILES = ["config.yaml", "metrics.csv", "status.json", "checkpoint.pt", "checkpoint.prev.pt", "lease.json",
             "job.json", "provenance.json", "train.log"]


# -- the catalogue of damage -------------------------------------------------------------------------
def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def truncate(rng, path):
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data) + 1)])


def tear_row(rng, path):
    lines = _lines(path)
    if len(lines) > 1:
        i = rng.randrange(1, len(lines))
        lines[i] = lines[i][: rng.randrange(len(lines[i]))] + b"\n"
    path.write_bytes(b"".join(lines))


def duplicate_row(rng, path):
    lines = _lines(path)
    if len(lines) > 1:
        i = rng.randrange(1, len(lines))
        lines.insert(rng.randrange(1, len(lines) + 1), lines[i])
    path.write_bytes(b"".join(lines))


def reorder_rows(rng, path):
    lines = _lines(path)
    if len(lines) > 2:
        i, j = rng.sample(range(1, len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
    path.write_bytes(b"".join(lines))


def _cells(rng, path, edit):
    lines = [ln.rstrip(b"\r\n").split(b",") for ln in _lines(path)]
    if lines:
        edit(lines)
    path.write_bytes(b"".join(b",".join(c) + b"\n" for c in lines))


def drop_column(rng, path):
    def edit(lines):
        k = rng.randrange(len(lines[0]))
        for c in lines:
            if len(c) > k:
                del c[k]
    _cells(rng, path, edit)


def add_column(rng, path):
    def edit(lines):
        k = rng.randrange(len(lines[0]) + 1)
        for i, c in enumerate(lines):
            c.insert(min(k, len(c)), b"extra" if i == 0 else b"1")
    _cells(rng, path, edit)


def crlf(rng, path):
    path.write_bytes(path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def _json_or_cell(rng, path, values, key=None):
    """A value of `values` into a field of a JSON object (`key` when it has one, else a random
    one), or a cell of a random CSV row (the step with `key`, else a random one)."""
    text = path.read_bytes()
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict) and obj:
        obj[key if key in obj else rng.choice(sorted(obj))] = rng.choice(values)
        path.write_text(json.dumps(obj))
        return

    def edit(lines):
        if len(lines) > 1:
            row = lines[rng.randrange(1, len(lines))]
            row[0 if key else rng.randrange(len(row))] = str(rng.choice(values)).encode()
    _cells(rng, path, edit)


def nonfinite(rng, path):
    _json_or_cell(rng, path, [float("nan"), float("inf"), "-inf", "nan"])


def absurd(rng, path):
    """An absurd step (a row's, status.json's): what a bit flip or a bad edit leaves."""
    _json_or_cell(rng, path, [99999999999, -5, 10**30, 1e308, "x" * 300], key="step")


def empty(rng, path):
    path.write_bytes(b"")


def binary(rng, path):
    path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))))


def garbage_json(rng, path):
    path.write_text(rng.choice(["{", "[1, 2]", '"text"', "null", '{"state": "completed"', "{}",
                                "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000]))


def chmod000(rng, path):
    os.chmod(path, 0)


def to_directory(rng, path):
    _remove(path)
    path.mkdir()
    (path / "inside").write_text("x")


def link_to_other(rng, path, other: Path):
    _remove(path)
    path.symlink_to(other / path.name)


def foreign_checkpoint(rng, path, other: Path):
    src = other / rng.choice(["checkpoint.pt", "checkpoint.prev.pt"])
    if src.exists():
        _remove(path)
        shutil.copyfile(src, path)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


FILE_OPS = {f.__name__: f for f in (truncate, tear_row, duplicate_row, reorder_rows, drop_column, add_column, crlf,
                                    nonfinite, absurd, empty, binary, garbage_json, chmod000, to_directory)}
OTHER_OPS = {f.__name__: f for f in (link_to_other, foreign_checkpoint)}
FOLDER_OPS = ("folder_link_to_other", "folder_as_file", "plan_of_other_sweep", "sweep_entry_directory",
              "planted_lease", "lock_as_directory")
CATALOGUE = sorted([*FILE_OPS, *OTHER_OPS, *FOLDER_OPS])


@dataclass
class Case:
    seed: int
    ops: list[str] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # run ids whose files were damaged
    replaced: set[str] = field(default_factory=set)  # run ids whose folder itself was replaced
    must_flag: dict[str, list] = field(default_factory=dict)  # run id -> the changed files (one must be named)
    rows_after_damage: dict[str, set[int]] = field(default_factory=dict)


def damage(rng: random.Random, case: Case, runs: Path, folder: Path, ids: list[str]) -> None:
    """1-3 operators of CATALOGUE on random files of the copied sweep; then what must be flagged."""
    from pipeline.runs.history import read_history
    from pipeline.runs.rundir import RunDir

    before = {rid: _meaning(RunDir(runs, rid)) for rid in ids}
    for _ in range(rng.randint(1, 3)):
        op, rid = rng.choice(CATALOGUE), rng.choice(ids)
        other = runs / rng.choice([i for i in ids if i != rid])
        if op in FOLDER_OPS:
            case.ops.append(f"{op} {rid}")
            _folder_op(rng, op, case, runs / rid, other, folder)
        else:
            _file_op(rng, op, case, runs / rid, other)
    for rid in ids:
        run = RunDir(runs, rid)
        if rid in case.replaced or not run.path.is_dir():
            continue
        case.rows_after_damage[rid] = set(read_history(run.metrics).steps)
        after = _meaning(run)
        changed = [what for what, was in before[rid].items() if after.get(what) != was]
        if changed:
            case.must_flag[rid] = changed


def _folder_op(rng, op: str, case: Case, path: Path, other: Path, folder: Path) -> None:
    rid = path.name
    real = path.is_dir() and not path.is_symlink()
    if op == "folder_link_to_other" and real:
        _remove(path)
        path.symlink_to(other)
        case.replaced.add(rid)
    elif op == "folder_as_file" and real:
        _remove(path)
        path.write_text("not a folder")
        case.replaced.add(rid)
    elif op == "plan_of_other_sweep":
        (folder / "plan.json").write_text(json.dumps(dict(sweep="toy", runs_root=str(path.parent), points=[
            dict(run_id="0123456789ab", overrides=[], action="start", reason="new")])))
    elif op == "sweep_entry_directory":
        _remove(folder / rid)
        (folder / rid).mkdir()
    elif op == "planted_lease" and real:
        _remove(path / "lease.json")
        (path / "lease.json").write_text(rng.choice(['{"host": "evil\\nerror: forged", "pid": "1"}', "garbage",
                                                     '{"host": "n", "pid": 1, "timeout_s": 1e308}']))
        case.touched.add(rid)
    elif op == "lock_as_directory" and real:
        import socket

        lock = path / f"lease.{socket.gethostname()}.lock"
        _remove(lock)
        lock.mkdir()
        case.touched.add(rid)


CSV_OPS = ("drop_column", "add_column", "crlf", "tear_row", "duplicate_row", "reorder_rows")


def _file_op(rng, op: str, case: Case, path: Path, other: Path) -> None:
    if not path.is_dir() or path.is_symlink():
        return
    name = rng.choice(RUN_FILES)
    if op in CSV_OPS and rng.random() < 0.7:
        name = "metrics.csv"  # the CSV operators mostly on the CSV
    target = path / name
    if op != "foreign_checkpoint" and (not target.exists() or (target.is_dir() and not target.is_symlink())):
        return
    case.ops.append(f"{op} {path.name}/{name}")
    case.touched.add(path.name)
    if op in OTHER_OPS:
        OTHER_OPS[op](rng, target, other)
    else:
        FILE_OPS[op](rng, target)


def _identity(config) -> str:
    """What a config.yaml says the run is: the hash of its semantic part (an edit of `paths` or
    `lease` changes nothing the run computes)."""
    from omegaconf import OmegaConf

    from pipeline.runs.ids import config_hash

    if config is None:
        return "none"
    try:
        return config_hash(OmegaConf.create(config))
    except Exception as e:  # not a config of ours
        return f"not a config ({type(e).__name__})"


def _meaning(run) -> dict:
    """What the damage must not change silently: the rows, the config, the state and step, the lease."""
    from pipeline.runs.history import METRIC_COLUMNS
    from pipeline.runs.integrity import check
    from pipeline.runs.lease import lease_problem

    health = check(run)
    hist = health.history
    mine = hist.select([c for c in METRIC_COLUMNS if c != "time_s"]) if hist.header else hist  # by name
    missing = [c for c in METRIC_COLUMNS if hist.header and c not in hist.header]
    return {"metrics.csv": (hist.damage, tuple(missing), tuple(map(tuple, mine.rows))),
            "config.yaml": _identity(health.config),
            "status.json": (health.status.get("state"), health.status.get("step")),
            "lease.json": lease_problem(run)}


# -- the commands a user runs ------------------------------------------------------------------------
@dataclass
class Outcome:
    code: int | None
    out: str
    error: str = ""  # a traceback: what the command should never show


def call(fn, *args) -> Outcome:
    """`fn(*args)` as a command: its exit status, what it printed, any traceback."""
    buf = io.StringIO()
    code, error = 0, ""
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = fn(*args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            error = traceback.format_exc()
    if isinstance(code, str):
        code = 1
    return Outcome(code, buf.getvalue(), error)


def as_command(main):
    """What `python -m <module>` does with `main` (pipeline.errors.command), as a callable."""
    from pipeline.errors import command

    return lambda argv: command(lambda: main(argv))


def commands(tmp: Path, folder: Path, figures: bool = True) -> list[tuple[str, Outcome]]:
    from analysis.__main__ import main as analysis_main
    from analysis.redraw import main as redraw_main
    from analysis.table import main as table_main
    from pipeline.dispatch.sweep import main as sweep_main

    sweep = as_command(sweep_main)
    paths = ["--", f"paths.runs={tmp}/runs", f"paths.sweeps={tmp}/sweeps", f"sweep.name={PRESET}", *SHRINK]
    done = [("status", call(sweep, ["status", PRESET, *paths]))]
    done.append(("analyze", call(as_command(analysis_main), [str(folder)] + ([] if figures else ["--no-figures"]))))
    done.append(("table", call(as_command(table_main), [str(folder / "analysis"), "--rows", "beta", "--cols", "rho",
                                                         "--value", "final_loss", "--agg", "mean"])))
    csvs = sorted((folder / "analysis").glob("*_vs_*.csv")) + sorted((folder / "analysis").glob("curves_by_*.csv"))
    if csvs:
        done.append(("redraw", call(as_command(redraw_main), [str(csvs[0]), "--out", str(tmp / "redrawn")])))
    done.append(("dry sweep", call(sweep, ["run", PRESET, "--launcher", "basic", "--dry", "1", *paths])))
    done.append(("resume", call(sweep, ["run", PRESET, "--launcher", "basic", "--pack", "auto", *paths])))
    done.append(("retry", call(sweep, ["run", PRESET, "--launcher", "basic", "--pack", "auto", "--retry", "1",
                                       *paths])))
    return done


# -- the invariants ------------------------------------------------------------------------------------
def rows_of(path: Path) -> list[list[str]]:
    """The rows of a metrics.csv, by the run's column names (time_s left out)."""
    from pipeline.runs.history import METRIC_COLUMNS, read_history

    h = read_history(path)
    return [] if h.damage or not h.header else h.select([c for c in METRIC_COLUMNS if c != "time_s"]).rows


def same_rows(a: list[list[str]], b: list[list[str]]) -> bool:
    """The same steps, every cell equal within REL (empty where the other is empty)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if len(x) != len(y) or x[0] != y[0]:
            return False
        for u, v in zip(x, y):
            if u != v and (not u or not v or abs(float(u) - float(v)) > REL * max(abs(float(v)), 1e-300)):
                return False
    return True


def check_case(case: Case, tmp: Path, ref: dict[str, list], done: list[tuple[str, Outcome]], flags: dict) -> list[str]:
    from pipeline.runs.history import read_history
    from pipeline.runs.rundir import RunDir

    bad = []
    for name, o in done:
        if o.error or "Traceback" in o.out:
            bad.append(f"{name}: a traceback\n{o.error or o.out[-3000:]}")
        elif o.code not in (0, 1, 2, None):
            bad.append(f"{name}: exit status {o.code}\n{o.out[-2000:]}")
    retry_out = dict(done)["retry"].out
    for rid, rows in ref.items():
        run = RunDir(tmp / "runs", rid)
        if rid in case.replaced:
            continue
        st = run.status() if run.path.is_dir() else {}
        whole = run.path.is_dir() and st.get("state") == "completed" and same_rows(rows_of(run.metrics), rows)
        if not whole and rid not in case.touched:
            bad.append(f"run {rid}: untouched, but not identical to the clean run at the end ({st})")
        elif not whole and rid not in retry_out:
            bad.append(f"run {rid}: not completed as the clean run, and the retry did not say why ({st})")
        kept = [p for p in run.path.glob("metrics.csv.*.kept")] if run.path.is_dir() else []
        have = set(read_history(run.metrics).steps) if run.path.is_dir() else set()
        for k in kept:
            have |= set(read_history(k).steps) if k.is_file() else set()
        lost = case.rows_after_damage.get(rid, set()) - have
        if lost:
            bad.append(f"run {rid}: rows of steps {sorted(lost)[:10]} lost (not in metrics.csv nor a kept file)")
    for rid, changed in case.must_flag.items():  # flagged, naming one of the files the damage changed
        if not any(what in flags.get(rid, "") for what in changed):
            bad.append(f"run {rid}: {', '.join(changed)} changed by the damage, but the integrity rule named none "
                       f"(it said: {flags.get(rid) or 'nothing'})")
    return bad


# -- the base sweep ------------------------------------------------------------------------------------
def _sweep_cli(tmp: Path, *args, env=None) -> subprocess.CompletedProcess:
    paths = [f"paths.runs={tmp}/runs", f"paths.sweeps={tmp}/sweeps", f"sweep.name={PRESET}"]
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, "-m", "pipeline.dispatch.sweep", *args, "--", *paths, *SHRINK],
                          cwd=tmp, env=e, capture_output=True, text=True, timeout=900)


def build_base(where: Path) -> tuple[Path, dict[str, list]]:
    """(the base sweep, each run's reference rows without time_s)."""
    from pipeline.runs.rundir import RunDir

    clean, base = where / "clean", where / "base"
    for d in (clean, base):
        d.mkdir(parents=True, exist_ok=True)
    r = _sweep_cli(clean, "run", PRESET, "--launcher", "basic", "--pack", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = sorted(p.name for p in (clean / "runs").iterdir())
    ref = {rid: rows_of(RunDir(clean / "runs", rid).metrics) for rid in ids}
    r = _sweep_cli(base, "run", PRESET, "--launcher", "basic", "--pack", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    for rid in ids[:2]:  # two interrupted runs: killed at step 17, alone
        cfg = (base / "runs" / rid / "config.yaml")
        shutil.rmtree(base / "runs" / rid)
        over = _overrides_of(clean / "runs" / rid)
        e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                 ADAM_FAULTS=f"step@{KILL_AT}")
        p = subprocess.run([sys.executable, "-m", "pipeline.train", f"sweep={PRESET}", *SHRINK, *over,
                            f"paths.runs={base}/runs"], cwd=base, env=e, capture_output=True, text=True, timeout=900)
        assert p.returncode == -9 and cfg.exists() and (base / "runs" / rid / "checkpoint.pt").exists(), \
            p.stderr[-2000:]
    return base, ref


def _overrides_of(run: Path) -> list[str]:
    import yaml

    c = yaml.safe_load((run / "config.yaml").read_text())
    return [f"optim.beta={c['optim']['beta']}", f"optim.rho={c['optim']['rho']}"]


def copy_base(base: Path, tmp: Path) -> Path:
    shutil.copytree(base / "runs", tmp / "runs", symlinks=True)
    shutil.copytree(base / "sweeps", tmp / "sweeps", symlinks=True)
    folder = tmp / "sweeps" / PRESET
    plan = json.loads((folder / "plan.json").read_text())
    (folder / "plan.json").write_text(json.dumps(dict(plan, runs_root=str(tmp / "runs"))))
    return folder


def run_case(seed: int, base: Path, ref: dict, tmp: Path, figures: bool = True) -> tuple[Case, list[str]]:
    from pipeline.runs.integrity import check
    from pipeline.runs.rundir import RunDir

    rng = random.Random(seed)
    case = Case(seed)
    folder = copy_base(base, tmp)
    damage(rng, case, tmp / "runs", folder, sorted(ref))
    flags = {}
    for rid in ref:
        run = RunDir(tmp / "runs", rid)
        if rid not in case.replaced and run.path.is_dir():
            flags[rid] = check(run).summary()
    done = commands(tmp, folder, figures)
    for p in tmp.rglob("*"):  # what chmod 000 took away, back, so the case folder can be removed
        with contextlib.suppress(OSError):
            if not p.is_symlink():
                os.chmod(p, 0o700 if p.is_dir() else 0o600)
    return case, check_case(case, tmp, ref, done, flags)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--seed", type=int, default=None, help="the first case's seed (default: from the clock)")
    ap.add_argument("--keep", action="store_true", help="keep each failing case's folder")
    ap.add_argument("--figures-every", type=int, default=5, help="draw the figures in one case of this many")
    a = ap.parse_args(argv)
    import tempfile

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    first = a.seed if a.seed is not None else int(time.time())
    print(f"fuzz: {a.cases} cases from seed {first}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="adam-fuzz-"))
    t0 = time.time()
    base, ref = build_base(work)
    failed = 0
    for i in range(a.cases):
        tmp = work / f"case-{first + i}"
        case, bad = run_case(first + i, base, ref, tmp, figures=(first + i) % a.figures_every == 0)
        if bad:
            failed += 1
            print(f"FAILED seed {case.seed} ({'; '.join(case.ops)}):\n  " + "\n  ".join(bad), flush=True)
        if not bad or not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"fuzz: {a.cases} cases, {failed} failed, in {time.time() - t0:.0f} s (seeds {first}..{first + a.cases - 1})")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
