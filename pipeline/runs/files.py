"""Atomic files: replaced by a durable temporary file and a rename, with the store policy's
mode (runs/owners.py: 0600, or 0660 in a shared store's group); and the readers that say, in one
line naming the file, why one is damaged."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import socket
from pathlib import Path

from ..errors import DiskFull, StoreError
from . import owners


def raise_disk_full(e: OSError, path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFull(path) from e


def _temp_name(path: Path, tag: str | None = None) -> Path:
    """`.<name>.<writer>.<random>.tmp`: the writer is the lease holder's host, pid and
    generation (Lease.temp_tag), so that a new owner can tell its own temporary files from
    those of a process that lost the run."""
    tag = tag or f"{socket.gethostname()}-{os.getpid()}"
    return path.with_name(f".{path.name}.{tag}.{secrets.token_hex(4)}.tmp")


def real_folder(path: Path, what: str, create: bool = False) -> None:
    """StoreError (one line) unless `path` is a real directory (created first when `create`, with
    the store policy's mode) that this user may use (runs/owners.py: owned by you or a trusted
    user, writable by no one else unless the store is declared shared): nothing is ever written
    through a link, into a file standing where a folder must be, nor into a colleague's folder."""
    path = Path(path)
    if create and not path.is_symlink():
        try:
            owners.mkdir(path)
        except OSError as e:
            raise_disk_full(e, path)
            raise StoreError(f"{path}: cannot be created ({e.strerror or e})") from None
    if path.is_symlink() or not path.is_dir():
        found = "a link" if path.is_symlink() else "a file" if path.exists() else "missing"
        raise StoreError(f"{path}: {found}, not {what}; nothing is written through it (remove it, or move it aside)")
    why = owners.problem(path)
    if why:
        raise StoreError(f"{path}: {why}; nothing is written into it")


def private_folder(path: Path) -> Path:
    """`path`, created readable and writable by this user only (submitit's pickles, a sweep's
    outcomes and submission intents live there), whatever store.trust says. A link there, or a
    folder another user owns (a colleague who pre-created `.submitit` in a shared sweep folder
    could swap the job pickles that a compute node unpickles), is StoreError: one line, nothing
    written."""
    path = Path(path)
    real_folder(path, "a private folder", create=True)
    if path.stat().st_uid != os.getuid():
        raise StoreError(f"{path}: owned by another user (uid {path.stat().st_uid}); job pickles and outcomes are "
                         "written only into a folder of yours (remove it, or use a sweep folder of your own)")
    os.chmod(path, 0o700)
    return path


def write_temp(path: Path, data: bytes, tag: str | None = None) -> Path:
    """`data` in a durable temporary file beside `path` (a random name, O_EXCL: no link can be
    planted at it), with the store policy's mode and group (owners.adopt)."""
    path = Path(path)
    tmp = _temp_name(path, tag)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            owners.adopt(tmp, fd=f.fileno())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise_disk_full(e, path)
        raise


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, fence=None, tag: str | None = None) -> None:
    """Replace `path` by `data` (temporary file, fsync, rename). `fence()`, when given, is
    called just before the rename: it raises when this process may no longer write here."""
    path = Path(path)
    if fence is not None:
        fence()
    tmp = write_temp(path, data, tag)
    try:
        if fence is not None:
            fence()
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (IsADirectoryError, NotADirectoryError)):
            raise StoreError(f"{path}: a folder where a file must be, or in a file where a folder must be "
                             "(remove it)") from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, fence=None, tag: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), fence, tag)


def json_safe(v):
    """Non-finite floats as the strings 'inf', '-inf', 'nan', so the JSON stays valid."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v

def _type_names(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object",
             bool: "true/false"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def read_bytes(path, limit: int | None = None) -> bytes:
    """The file's bytes (at most `limit` + 1 of them), never through a link planted at its name
    (OSError ELOOP: `unreadable` says so); a FIFO does not block."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
        return f.read() if limit is None else f.read(limit + 1)


def unreadable(e: OSError) -> str:
    """Why `read_bytes` failed, in words."""
    return "a link, not a file" if e.errno == errno.ELOOP else str(e.strerror or e)


def open_append(path) -> int:
    """A descriptor appending to `path` (created with the store policy's mode), never through a
    link."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(path, flags)
    owners.adopt(path, fd=fd)
    return fd


MAX_BYTES = 1 << 20  # a run's JSON and YAML files are a few KB: one bigger than this is not one of ours
MAX_DEPTH = 32  # ours nest 4 deep; a planted file nested thousands deep would exhaust the parser's stack


def read_text(path: Path, limit: int = MAX_BYTES) -> tuple[str | None, str]:
    """(the file's text, '') ; (None, '') when it is missing; (None, why) when it cannot be read, is
    larger than `limit` bytes, nests brackets deeper than MAX_DEPTH or is not UTF-8 (`why` names
    the file). Never follows a link planted at the name."""
    name = Path(path).name
    try:
        raw = read_bytes(path, limit)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"{name}: cannot be read ({unreadable(e)})"
    if len(raw) > limit:
        return None, f"{name}: larger than {limit} bytes, not a file of this pipeline"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{name}: not UTF-8 text (byte {e.start})"
    depth = nesting(text)
    if depth > MAX_DEPTH:
        return None, f"{name}: nested {depth} deep (at most {MAX_DEPTH}), not a file of this pipeline"
    return text, ""


def nesting(text: str) -> int:
    """The deepest nesting of [ and { in `text` (quotes are not parsed: an upper bound)."""
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
    return deepest


def read_json_object(path: Path, fields: dict) -> tuple[dict | None, str]:
    """(object, '') for a JSON file holding an object whose `fields` have their types; (None, '')
    when the file is missing; (None, why) when it is damaged (`why` names the file)."""
    name = Path(path).name
    text, why = read_text(path)
    if text is None:
        return None, why
    if not text.strip():
        return None, f"{name}: empty ({len(text.encode())} bytes)"
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return None, f"{name}: not valid JSON ({(str(e).splitlines() or [''])[0][:80]})"
    if not isinstance(obj, dict):
        return None, f"{name}: a JSON {type(obj).__name__}, not an object"
    for key, types in fields.items():
        v = obj.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            return None, f"{name}: field {key} is {json.dumps(v)[:40]}, not {_type_names(types)}"
    return obj, ""
