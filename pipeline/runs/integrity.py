"""The one integrity rule: is a run directory what it claims to be, and is its history whole?

`check(run)` reads the run's own files -- status.json, config.yaml and metrics.csv itself, not
only what status.json says -- and every decision uses its answer: `decide()` (pipeline/attempt.py's skip /
resume / restart and the sweep planner's launch / skip), `make status` and the analysis.

A run is *whole* when
- its folder is a real folder of yours or of a user store.trust names, writable by no one else
  unless the store is declared shared (runs/owners.py); any other is skipped and never counted;
- status.json is a JSON object with fields of the right types and a known state;
- config.yaml is a mapping that hashes to the run id (the folder's name): the run is the run
  of that config (an edited, deleted or replaced config.yaml is an identity problem);
- metrics.csv holds steps 0..k exactly once, in this order, every cell a number (or empty),
  where k is the last step of a finished run (status.json `step`), and for an unfinished one at
  least the steps before its checkpoint (status.json `step`, which the loop writes with each
  checkpoint); rows after the checkpoint of an unfinished run are cut back when it resumes.
Anything else is a problem: one line naming the file. A run with problems is flagged
everywhere; `retry` recomputes it from step 0.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from ..errors import shown
from . import owners
from .history import History, judge_history, read_history
from .ids import run_id
from .lease import lease_problem
from .rundir import FINISHED, RunDir, read_config_file


# -- the skip/launch decision (made by decide) --
@dataclass(frozen=True)
class Decision:
    action: str  # start | resume | restart | skip
    reason: str

    @property
    def launch(self) -> bool:
        return self.action != "skip"


@dataclass
class Health:
    """What `check` found: the status as read, the history, and the problems (one line each)."""

    status: dict
    history: History
    config: dict | None = None
    damaged: list[str] = field(default_factory=list)  # status.json or config.yaml: the run is not what it says
    holes: str = ""  # metrics.csv: what is not whole (also what a resume flagged in status.json)
    whole_until: int = -1  # rows 0..whole_until are there once each, in order, parseable
    foreign: bool = False  # the run folder is a link: never written, not even by retry

    @property
    def state(self) -> str | None:
        return self.status.get("state")

    @property
    def problems(self) -> list[str]:
        return self.damaged + ([f"metrics.csv: {self.holes}"] if self.holes else [])

    @property
    def whole(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return "; ".join(self.problems)


def identity_problem(run: RunDir, config: dict | None, why: str) -> str:
    """'' when config.yaml hashes to the run id, else what is wrong (naming the file)."""
    if why:
        return why
    if config is None:
        return "config.yaml: missing"
    try:
        rid = run_id(OmegaConf.create(config))
    except Exception as e:  # a mapping that is no config of ours (interpolations, odd types)
        return f"config.yaml: not a config of this pipeline ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    if rid != run.id:
        return (f"config.yaml: hashes to run id {rid}, not {run.id} (edited, or replaced by another run's; "
                "`make migrate` renames runs made under an older id rule)")
    return ""


def nonfinite_row(state: str | None, hist: History) -> int | None:
    """The index of the first row with a non-finite cell, or no loss, where none can be, else None.
    A non-finite training loss ends a run as diverged (pipeline/thresholds.py), and while the loss
    is finite so is every metric: a non-finite value or an empty loss anywhere but from the row
    where a diverged run's loss became non-finite on is not the run's history."""
    at = hist.header.index("loss") if "loss" in hist.header else None
    for i, row in enumerate(hist.rows):
        lost = at is not None and (row[at] == "" or not math.isfinite(float(row[at])))
        if state == "diverged" and lost:
            return None  # where a diverged run's loss became non-finite: the rest is its end
        if lost or any(c and not math.isfinite(float(c)) for c in row):
            return i
    return None


def loss_problem(state: str | None, hist: History) -> str:
    """'' or what nonfinite_row found, naming the column and step (every row has its loss)."""
    i = nonfinite_row(state, hist)
    if i is None:
        return ""
    row = hist.rows[i]
    col, cell = next((h, c) for h, c in zip(hist.header, row)
                     if (h == "loss" and c == "") or (c and not math.isfinite(float(c))))
    what = f"empty {col}" if cell == "" else f"non-finite {col} {cell}"
    return f"{what} at step {row[0]} of a {state or 'new'} run"


def step_problem(status: dict, config: dict | None) -> str:
    """status.json's step beyond the run's train.max_steps (an absurd step)."""
    step = status.get("step")
    top = ((config or {}).get("train") or {}).get("max_steps") if isinstance(config, dict) else None
    if isinstance(step, int) and isinstance(top, int) and not isinstance(top, bool) and step > top:
        return f"status.json: step {step} is beyond train.max_steps = {top}"
    return ""


def history_problem(status: dict, hist: History, max_steps: int | None = None) -> tuple[str, int]:
    """(what is wrong with the history, '' when whole; the last step of its whole prefix)."""
    state, last = status.get("state"), status.get("step")
    flagged = status.get("holes") or ""
    if hist.damage:
        return "; ".join(filter(None, [flagged, hist.damage])), -1
    schema = hist.schema_problem()
    if schema:
        return "; ".join(filter(None, [flagged, schema])), -1
    steps = hist.steps
    if state in FINISHED and isinstance(last, int):
        need = last
    elif state is None and not steps:
        need = -1  # a folder without status.json and without rows: nothing to check
    else:  # unfinished: at least the rows before its checkpoint
        ckpt = last if isinstance(last, int) else 0
        need = max(ckpt - 1, max(steps, default=-1))
    if isinstance(max_steps, int):  # a row beyond the run's last step is flagged as such, not as a hole
        need = min(need, max_steps)
    found, good = judge_history(hist, need)
    nonfinite = loss_problem(state, hist)
    if nonfinite:
        good = min(good, int(hist.rows[nonfinite_row(state, hist)][0]) - 1)
    parts = list(dict.fromkeys(p for p in (flagged, found, nonfinite) if p))
    return "; ".join(parts), good


def check(run: RunDir) -> Health:
    """The one rule (see the module doc), applied to `run`'s files as they are now."""
    foreign = run.path.is_symlink() or (run.path.exists() and not run.path.is_dir())
    if foreign:  # a link or a file where the run folder must be: never read through, never written
        what = f"a link to {shown(os.readlink(run.path))}" if run.path.is_symlink() else "a file"
        return Health({}, History([], [], missing_file=True), None,
                      [f"{run.path.name}: {what}, not a run folder (nothing is written through it; remove it)"],
                      foreign=True)
    untrusted = owners.problem(run.path) if run.path.is_dir() else ""
    if untrusted:  # a colleague's folder (or one anyone may write into) is neither trained nor counted
        return Health({}, History([], [], missing_file=True), None,
                      [f"{run.path.name}: {untrusted}; neither trained nor counted"], foreign=True)
    st = run.status()
    damaged = [st.pop("unreadable")] if "unreadable" in st else []
    config, why = read_config_file(run.config)
    hist = read_history(run.metrics)
    if st or config is not None or why or hist.rows or not hist.missing_file:
        ident = identity_problem(run, config, why)
        if ident:
            damaged.append(ident)
    absurd = step_problem(st, config)
    if absurd:
        damaged.append(absurd)
    lease_why = lease_problem(run)
    if lease_why:
        damaged.append(lease_why)
    top = ((config or {}).get("train") or {}).get("max_steps") if isinstance(config, dict) else None
    holes, good = history_problem(st, hist, top if isinstance(top, int) and not isinstance(top, bool) else None)
    return Health(st, hist, config, damaged, holes, good)


def decide(health: Health, retry: bool, live: str | None = None) -> Decision:
    """What to do with a run, given what `check` found, `retry`, and a description of its live
    owner or job (None when there is none). The one rule: train.py and the sweep planner both
    call it.

    live -> skip; damaged (status.json or config.yaml) -> skip unless retry, which restarts it
    from step 0 under the config of this sweep (never resumed under another config); completed
    and whole -> skip; diverged, failed or with problems in its history -> skip unless retry
    (diverged and problems restart from step 0, failed resumes from its last loadable
    checkpoint); new -> start; pending or running (interrupted) -> resume (a history with holes
    stays flagged)."""
    state, holes = health.state, health.holes
    if live:
        return Decision("skip", f"live: {live}")
    if health.foreign:
        return Decision("skip", "damaged (" + "; ".join(health.damaged) + ")")
    if health.damaged:
        what = "damaged (" + "; ".join(health.damaged) + ")"
        if not retry:
            return Decision("skip", f"{what}; retry recomputes it from step 0")
        return Decision("restart", f"{what}: retry")
    if state == "completed" and not holes:
        return Decision("skip", "completed")
    if state in FINISHED or state == "failed":
        what = f"{state} with holes (metrics.csv: {holes})" if holes and state != "failed" else state
        if not retry:
            return Decision("skip", f"{what}; retry reruns it")
        return Decision("restart" if state != "failed" or holes else "resume", f"{what}: retry")
    if state is None:
        return Decision("start", "new")
    if holes and retry:
        return Decision("restart", f"{state} with holes (metrics.csv: {holes}): retry")
    return Decision("resume", state)
