"""A run's own log: every line of the process about the run also goes to its train.log (each
attempt appends; a pack's lines go to their own run's file), never through a link planted at
its name, and none once this process has lost the run's lease."""

from __future__ import annotations

import contextlib
import logging
import os

from .files import open_append
from .rundir import RunDir


class NoFollowFileHandler(logging.FileHandler):
    """A FileHandler that appends to its file but never through a link planted at its name."""

    def _open(self):
        return os.fdopen(open_append(self.baseFilename), "a", encoding=self.encoding or "utf-8", errors=self.errors)


@contextlib.contextmanager
def run_log(run: RunDir):
    """Log lines also into the run's own folder (every attempt appends to train.log; the file is
    opened at the first line, so a process that is refused writes nothing, and none once this
    process has lost the run's lease)."""
    handler = NoFollowFileHandler(run.log_file, delay=True)
    handler.addFilter(lambda record: not run.lost and getattr(record, "run_id", run.id) == run.id)  # a pack: its lines
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    top = logging.getLogger("pipeline")
    level = top.level
    top.setLevel(logging.INFO)
    top.addHandler(handler)
    try:
        yield
    finally:
        top.removeHandler(handler)
        top.setLevel(level)
        handler.close()
