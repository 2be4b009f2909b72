"""`python -m pipeline.runs.migrate <runs root> [<sweeps root>]` (`make migrate`): rename the run
directories whose config hashes to another id under today's rule."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from . import lease
from .ids import legacy_run_id, run_id
from .rundir import RunDir, read_config_file

log = logging.getLogger(__name__)


def migrate(runs: Path, sweeps: Path | None = None) -> list[tuple[str, str]]:
    """Rename the run directories under `runs` whose config.yaml hashes to another id under the
    current rule (runs of models without BatchNorm made while the micro-batch was part of the
    id: its config.yaml hashes to the folder's name under that old rule), and repoint the links of
    the sweep folders under `sweeps`. A config.yaml that hashes to the folder's name under no rule
    (hand-edited, or another run's) is never renamed. A run whose new id exists
    already, or that is live, is left alone (one log line). Returns [(old id, new id)]."""
    moved = []
    for d in sorted(Path(runs).iterdir()) if Path(runs).is_dir() else []:
        if d.is_symlink() or not d.is_dir():
            continue
        try:
            cfg = OmegaConf.create(yaml_load(d / "config.yaml"))
            new, old = run_id(cfg), legacy_run_id(cfg)
        except Exception:  # unreadable, not YAML, not a config of ours, interpolations: not renamed
            continue
        if new == d.name:
            continue
        if old != d.name:  # a config.yaml that hashes to the folder under no rule: edited, or another run's
            log.warning("run %s: not renamed: its config.yaml hashes to %s, and to %s under the old rule, "
                        "not to the folder's name (edited, or another run's): retry=true recomputes it",
                        d.name, new, old)
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
    data, why = read_config_file(path)
    if data is None:
        raise ValueError(why or f"{path}: missing")
    return data


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or len(argv) > 2:
        sys.exit("usage: python -m pipeline.runs.migrate <runs root> [<sweeps root>]")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    done = migrate(Path(argv[0]), Path(argv[1]) if len(argv) > 1 else None)
    for old, new in done:
        print(f"{old} -> {new}")
    print(f"{len(done)} run directories renamed")


if __name__ == "__main__":
    from pipeline.errors import command

    command(main)
