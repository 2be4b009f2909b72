"""The command line's rules, shared by `make sweep` and `make status`: the preset names, the
arguments' allowed values (one line and exit 2 for a bad one), counts in words, tables."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..config.compose import CONF_DIR

LAUNCHERS = ("local", "basic", "slurm")
YES, NO = ("1", "true", "yes"), ("", "0", "false", "no")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def presets() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "sweep").glob("*.yaml"))


def fail(msg, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def plural(k: int, noun: str) -> str:
    return f"{k} {noun}{'s' * (k != 1)}"


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def check_arguments(preset, launcher, jobs, gpus, tasks) -> None:
    """The launcher's own arguments: one line and exit 2 for a bad one."""
    if preset not in presets():
        fail(f"SWEEP={preset}: unknown preset; available: {', '.join(presets())}")
    if launcher not in LAUNCHERS:
        fail(f"LAUNCHER={launcher}: allowed values are {', '.join(LAUNCHERS)}")
    if jobs < 1:
        fail(f"JOBS={jobs}: allowed values are integers >= 1")
    for key, v in (("GPUS", gpus), ("TASKS", tasks)):
        if v is not None and v < 1:
            fail(f"{key}={v}: allowed values are integers >= 1")
    if launcher == "basic" and (gpus or tasks):
        fail("LAUNCHER=basic runs in this process: GPUS/TASKS need LAUNCHER=local or slurm")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other mistake
        fail(f"{self.prog}: {message}")


def seconds(name: str, value) -> float | None:
    """WATCH=: a number of seconds > 0, empty or 0 for none; anything else is refused."""
    v = str(value or "").strip()
    try:
        x = float(v) if v else 0.0
    except ValueError:
        x = -1.0
    if x < 0 or x != x or x == float("inf"):
        fail(f"{name}={value}: allowed values are a finite number of seconds > 0, or 0 for once")
    return x or None


def flag(name: str, value) -> bool:
    """RETRY=/DRY=: 0/1/true/false/yes/no (any case), empty for no; anything else is refused."""
    v = str(value if value is not None else "").strip().lower()
    if v in YES or v in NO:
        return v in YES
    fail(f"{name}={value}: allowed values are 1, 0, true, false, yes, no")


def count(name: str, value, empty=None) -> int | None:
    """JOBS=/GPUS=/TASKS=: a whole number >= 1 (empty: `empty`)."""
    v = str(value if value is not None else "").strip()
    if v == "":
        return empty
    if not v.isdigit() or int(v) < 1:
        fail(f"{name}={value}: allowed values are whole numbers >= 1")
    return int(v)


def pack_size(value) -> int | str:
    """PACK=: a whole number >= 1, or auto (empty: 1)."""
    v = str(value if value is not None else "").strip().lower()
    if v in ("auto", ""):
        return v or 1
    if not v.isdigit() or int(v) < 1:
        fail(f"PACK={value}: allowed values are whole numbers >= 1 (runs per process) or auto")
    return int(v)


def sweep_name(value: str) -> str:
    if not NAME.fullmatch(value or ""):
        fail(f"SWEEP={value!r}: a sweep name is one word of letters, digits, '_', '.' and '-' "
              f"(presets: {', '.join(presets())})")
    return value
