"""Where the analysis writes, and how: into a real folder of this user's, each file replaced
atomically through a random temporary name (pipeline/runs/files.py), so that a link planted in
the output folder of a shared sweep is replaced, never written through."""

from __future__ import annotations

import io
import os
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.runs import owners
from pipeline.runs.files import atomic_write_bytes


def output_folder(out: Path) -> None:
    """`out` created as a real directory of this user's; StoreError (one line) for a link, a file,
    a folder another user owns or one that others may write into (runs/owners.py)."""
    out = Path(out)
    if out.is_symlink():
        raise StoreError(f"{out}: a link; the analysis writes only into a real folder (remove it, or --out DIR)")
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: a file, not a folder; choose another --out DIR")
    try:
        owners.mkdir(out)
    except OSError as e:
        raise StoreError(f"{out}: cannot be created ({e.strerror or e}); choose another --out DIR") from None
    if out.stat().st_uid != os.getuid():
        raise StoreError(f"{out}: owned by another user; the analysis writes only into your own folder (--out DIR)")
    why = owners.problem(out)
    if why:
        raise StoreError(f"{out}: {why}; choose another --out DIR")
    if not os.access(out, os.W_OK | os.X_OK):
        raise StoreError(f"{out}: not writable; choose another --out DIR")


def write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(Path(path), text.encode())
    return Path(path)


def write_csv(df, path: Path, **kw) -> Path:
    return write_text(path, df.to_csv(None, index=False, **kw))


def write_parquet(df, path: Path) -> Path:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


TEXT = ("run_id", "point_id", "setting", "state", "regime", "eval_mode", "metric", "code_version", "damaged")


def read_csv(path: Path):
    """A CSV the analysis wrote, read back with its ids and words as text: 12 hex digits can spell a
    number (000000000100, 1e0000000002 = 100.0), which must neither collide nor mix with ids that
    do not."""
    import pandas as pd

    return pd.read_csv(path, dtype={c: str for c in TEXT})


def save_figure(fig, path: Path, **kw) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix[1:], **kw)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
