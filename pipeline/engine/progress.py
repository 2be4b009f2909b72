"""A live line per step on a terminal (tqdm), plain log lines elsewhere (Slurm logs)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pipeline.train")


def _fmt(row: dict) -> str:
    parts = [f"loss={row['loss']:.4g}", f"pert_norm={row['pert_norm']:.4g}"]
    if row.get("test_acc") is not None:
        parts.append(f"test_acc={row['test_acc']:.4f}")
    return " ".join(parts)


class Progress:
    def __init__(self, mode: str, start: int, total: int, every: int, name: str, extra: dict | None = None):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.every, self.name = mode, total, every, name
        self.t_last, self.n0, self.t0 = time.perf_counter(), start, time.perf_counter()
        self.last_test, self.extra = None, extra  # extra: the log record's run_id in a pack
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)

    def update(self, row: dict) -> None:
        now = time.perf_counter()
        step_s, self.t_last = now - self.t_last, now
        if row.get("test_acc") is not None:
            self.last_test = row["test_acc"]
        shown = dict(row, test_acc=self.last_test)
        n = row["step"]
        if self.bar is not None:
            self.bar.set_postfix_str(f"{_fmt(shown)} step={step_s * 1e3:.0f}ms", refresh=False)
            self.bar.update(1)
        elif self.mode == "log" and (n % self.every == 0 or n + 1 >= self.total):
            done = n + 1 - self.n0
            eta = (now - self.t0) / max(done, 1) * (self.total - n - 1)
            log.info("%s step %d/%d %s step_time=%.3fs eta=%.0fs", self.name, n,
                     self.total - 1, _fmt(shown), step_s, eta, extra=self.extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
