"""One run of a checkout's `python -m pipeline.train` in a fresh temporary store, for the benches
that time whole runs (run_bench, startup_bench, sharpness_bench)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fresh_run(root: Path, overrides: list[str], **env: str) -> Iterator[tuple[Path, float, float]]:
    """Train `overrides` with `root`'s pipeline (this interpreter, `env` added to the environment)
    in a new store under a temporary folder, also its working directory; yield (the run's folder,
    the launch's time.time(), the process's wall seconds). The store is removed on leaving."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=str(root), **env)
        start = time.time()
        subprocess.run([sys.executable, "-m", "pipeline.train", *overrides, f"paths.runs={d}/runs"], cwd=d, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.time() - start
        (metrics,) = Path(d, "runs").glob("*/metrics.csv")
        yield metrics.parent, start, wall
