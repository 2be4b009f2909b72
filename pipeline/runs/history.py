"""metrics.csv: its columns, its writer (a row per step, fsynced before each checkpoint) and its
one reader, which keeps what a torn or damaged file still holds and says what is missing."""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import faults
from .files import open_append, raise_disk_full, read_bytes, unreadable

METRIC_COLUMNS = ["step", "loss", "acc", "pert_norm", "l1_norm", "l2_norm", "pert_norm_floor",
                  "test_loss", "test_acc", "time_s"]
# metrics.csv's schema: every run writes these (more: theta_i, bias_norm); a file without one of
# them is not a run's history, whatever its rows (the one rule: pipeline/runs/integrity.py)
REQUIRED_COLUMNS = tuple(METRIC_COLUMNS)


def fmt(v) -> str:
    """Floats as Python's shortest round-trip repr; None as an empty cell."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)

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
    found is kept to be judged (pipeline/runs/integrity.py)."""

    header: list[str]
    rows: list[list[str]]
    damage: str = ""  # the file as a whole: not UTF-8, no header, ...
    unparseable: list = field(default_factory=list)  # (line number, step cell) of rows with a non-number
    missing_file: bool = False
    crlf: bool = False  # lines ended by CR LF (a file edited elsewhere): read as LF

    @property
    def steps(self) -> list[int]:
        return [int(r[0]) for r in self.rows]

    def schema_problem(self) -> str:
        """'' when the header names every required column once; else what is wrong."""
        if self.damage or not self.header:
            return ""
        missing = [c for c in REQUIRED_COLUMNS if c not in self.header]
        repeated = sorted({c for c in self.header if self.header.count(c) > 1})
        parts = [f"no column {', '.join(missing)}" if missing else "",
                 f"column {', '.join(repeated)} repeated" if repeated else ""]
        return "; ".join(p for p in parts if p)

    def select(self, columns: list[str]) -> History:
        """The rows with `columns` in this order, by name (a column the file lacks: empty cells);
        what else the file held is not carried over."""
        if self.header == columns:
            return self
        where = {c: i for i, c in reversed(list(enumerate(self.header)))}  # the first of a repeated name
        pick = [where.get(c) for c in columns]
        rows = [[r[i] if i is not None else "" for i in pick] for r in self.rows]
        return History(list(columns), rows, self.damage, list(self.unparseable), self.missing_file, self.crlf)

    def column(self, name: str) -> list[str]:
        i = self.header.index(name) if name in self.header else None
        return [r[i] for r in self.rows] if i is not None else []

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
        raw = read_bytes(path)
    except FileNotFoundError:
        return History([], [], missing_file=True)
    except OSError as e:  # a link planted at the name is never read: it may be another run's file
        return History([], [], damage=f"cannot be read ({unreadable(e)})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return History([], [], damage=f"not UTF-8 text (byte {e.start})")
    if not text:
        return History([], [], damage="empty (zero bytes)")
    lines = text.split("\n")
    crlf = lines[0].endswith("\r")
    if crlf:
        lines = [ln.removesuffix("\r") for ln in lines[:-1]] + lines[-1:]
    header = lines[0].split(",")
    if "step" not in header:
        return History([], [], damage="no header line with a column 'step'")
    at = header.index("step")  # read with the step first, whatever the file's order
    order = [at, *(i for i in range(len(header)) if i != at)]
    header = [header[i] for i in order]
    rows, bad = [], []
    for i, line in enumerate(lines[1:-1], start=2):  # the last piece has no newline after it: empty or torn
        cells = line.split(",")
        if at and len(cells) == len(order):
            cells = [cells[j] for j in order]
        if len(cells) != len(header) or not cells[0].isascii() or not cells[0].isdigit():
            continue
        if all(_number(c) for c in cells[1:]):
            rows.append(cells)
        else:
            bad.append((i, cells[0]))
    return History(header, rows, unparseable=bad, crlf=crlf)


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
    gaps, count, expect = [], 0, 0  # the missing steps as ranges, without listing them (a step may be 10^11)
    for s in sorted(x for x in seen if 0 <= x <= last) + [last + 1]:
        if s > expect:
            gaps.append(f"{expect}-{s - 1}" if s - 1 > expect else f"{expect}")
            count += s - expect
        expect = s + 1
    extra = sorted(s for s in seen if s > last or s < 0)
    parts = []
    if gaps:
        parts.append("missing " + (", ".join(gaps) if len(gaps) <= 20 else f"{count} steps in {len(gaps)} ranges"))
    if repeated:
        parts.append("repeated " + describe_ranges(repeated))
    if extra:
        parts.append("beyond the last step " + (describe_ranges(extra) if len(extra) <= 20
                                                else f"{len(extra)} steps"))
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
    keeps those). The rule of pipeline/runs/integrity.py and of `RunDir.open_metrics`."""
    steps = [s for s in hist.steps if upto is None or s <= upto]
    bad = [(line, int(step)) for line, step in hist.unparseable if upto is None or int(step) <= upto]
    found = history_holes(steps, last)
    good = whole_until(steps)
    if bad:
        found = "; ".join(filter(None, [found, f"unparseable row at line {describe_ranges([b[0] for b in bad][:20])}"]))
        good = min(good, min(b[1] for b in bad) - 1)
    return found, good

class MetricsWriter:
    """Appends one row per step; the rows reach the file at least every FLUSH_S seconds (a
    reader such as `make status` sees them that late at most; with a wandb mirror, which sends a
    row as it is written, every row at once: `flush_s` = 0) and always before a
    checkpoint (`sync`) and at `close`. `fence()` is called before every write to the file, so a
    process writes only while it owns the run; rows not yet written when a process dies are
    after its last checkpoint and are computed again by the resume."""

    holes = ""
    kept = ""  # what open_metrics kept beside the file (RunDir._keep_metrics)
    last_written = -1
    FLUSH_S = 0.5  # a small model's step takes ~1 ms: a fenced write and flush per row was a third of it

    def __init__(self, path: Path, columns: list[str], fence=None):
        self.path, self.columns = path, columns
        self.fence = fence or (lambda: None)
        self.flush_s = self.FLUSH_S  # 0 with a wandb mirror: it sends a row once it is on disk (never twice)
        # held open for the run's life, closed by close(); never through a link planted at its name
        self.f = os.fdopen(open_append(path), "a")
        self.pending: list[str] = []
        self.flushed_at = time.monotonic()

    def write(self, row: dict) -> None:
        step = row["step"]
        self.pending.append(",".join(fmt(row.get(c)) for c in self.columns) + "\n")
        if faults.armed("row.torn", step):  # the crash tests: half a row on disk, then a kill
            line = self.pending.pop()
            self.flush()
            self._write(line[: len(line) // 2])
            faults.point("row.torn", step)
            self.pending.append(line)
        if faults.armed("row", step) or time.monotonic() - self.flushed_at >= self.flush_s:
            self.flush()
        faults.point("row", step)

    def flush(self) -> None:
        """The pending rows into the file (fenced), flushed to the OS."""
        if self.pending:
            self._write("".join(self.pending))
            self.pending.clear()
        self.flushed_at = time.monotonic()

    def _write(self, text: str) -> None:
        self.fence()
        try:
            self.f.write(text)
            self.f.flush()
        except OSError as e:
            raise_disk_full(e, self.path)
            raise

    def sync(self) -> None:
        """Make the rows durable (before a checkpoint that says they exist)."""
        self.flush()
        self.fence()
        try:
            os.fsync(self.f.fileno())
        except OSError as e:
            raise_disk_full(e, self.path)
            raise

    def close(self) -> None:
        """The pending rows written (fenced), the file closed."""
        self.flush()
        with contextlib.suppress(OSError):
            self.f.close()
