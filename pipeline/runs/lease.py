"""One owner per run: a training process holds an exclusive lease on its run directory for its
whole life, so that two processes can never write one run.

The lease is two things, so that it holds on one machine and across the nodes of a shared
file system alike:
- `lease.<host>.lock`, locked with flock(2) for the holder's life (released by the kernel when
  the process dies, however it dies): it excludes a second process of the same host at once.
  Across hosts flock is not relied on (on many shared file systems it is node-local);
- `lease.json`, a record naming the holder (host, pid and its start time, Slurm job, since,
  timeout) and its fencing token (`generation`, one more at every takeover, and a random
  `token`), created with link(2), which fails atomically when the file exists, also over NFS.
  Its mtime is the heartbeat: a thread touches it every `heartbeat_s`.

Fencing: a holder that was stopped (SIGSTOP, a long pause, a frozen file-system client) for
longer than the timeout may find its lease taken over when it continues. Every write to the run
directory calls `Lease.check()` just before it acts; it compares the record on disk with the
holder's token and raises `LeaseLost` when they differ, so a fenced-off process writes nothing
more (pipeline/runs/rundir.py: `RunDir.owner`). Temporary files carry their writer's host, pid and
generation in their names (`temp_tag`), so that a new owner can tell its own from others'.

A record whose holder is gone is stale and is taken over with one log line: on the same host
when the pid no longer runs (or is another process), from anywhere when its heartbeat is older
than its `timeout_s`, and by a requeued Slurm job from its own earlier incarnation. A process
that finds a live record is refused (`LeaseHeld`) and changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from pathlib import Path

from ..errors import LeaseHeld, LeaseLost, StoreError, shown
from ..errors import describe_holder as describe
from . import owners
from .files import read_bytes, real_folder

log = logging.getLogger(__name__)
RECORD = "lease.json"


def lock_name(host: str) -> str:
    return f"lease.{host}.lock"


def slurm_job_id() -> str | None:
    """`<array>_<task>` inside a job array, else the job id; None outside Slurm."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def proc_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot): a pid reused by another process
    has another one. None where /proc is absent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return start is None or proc_start(pid) in (None, start)


# lease.json's schema: a record without these, of these types, holds nothing (it is flagged damaged);
# OPTIONAL fields, when present, must have their types too
FIELDS = {"host": (str,), "pid": (int,)}
OPTIONAL = {"token": (str,), "generation": (int,), "timeout_s": (int, float), "slurm_job": (str,)}
MAX_BYTES = 4096  # a record is a few hundred bytes: a bigger file is not one


def read_file(path) -> dict:
    """A lease record file as a dict; {} when it is missing, garbled or not an object."""
    try:
        raw = read_bytes(path, MAX_BYTES)  # never through a link
        rec = json.loads(raw or b"{}") if len(raw) <= MAX_BYTES else None
    except (OSError, ValueError, RecursionError):
        return {}
    return rec if isinstance(rec, dict) else {}


def damage(rec: dict) -> str:
    """'' for a well-formed record, else what is wrong (one line)."""
    for key, types in (*FIELDS.items(), *((k, t) for k, t in OPTIONAL.items() if rec.get(k) is not None)):
        v = rec.get(key)
        if not isinstance(v, types) or isinstance(v, bool):
            return f"field {key} is {shown(json.dumps(v) if v is not None else 'missing', 40)}"
    if not 0 < rec["pid"] < 2**31:
        return f"field pid is {shown(rec['pid'], 40)}, not a process id"
    return ""


def read(run_path) -> dict | None:
    """The lease record with its heartbeat age (`age_s`), None when there is none; a record
    that is not well-formed has `damaged` (why)."""
    path = Path(run_path) / RECORD
    try:
        st = path.lstat()
    except OSError:
        return None
    age = time.time() - st.st_mtime
    rec = read_file(path)
    why = "not a JSON object of at most 4 KB" if not rec else damage(rec)
    if not why and not owners.trusted_owner(st.st_uid):  # a record planted by someone you do not trust
        why = f"written by uid {st.st_uid}, neither you nor a user store.trust names"
    if why:
        rec["damaged"] = why
    rec["age_s"] = max(0.0, age)
    return rec


def lease_problem(run) -> str:
    """'lease.json: ...' when the run's lease record is damaged (it holds nothing; the next owner
    takes it over), else ''."""
    rec = read(run.path)
    return f"lease.json: {rec['damaged']} (holds nothing)" if rec and rec.get("damaged") else ""


def stale_reason(rec: dict, host: str | None = None, timeout_s: float | None = None) -> str | None:
    """Why the holder of `rec` is gone, or None while it may be alive (`host`: the asker's;
    `timeout_s`: the asker's lease.timeout_s -- never the record's own, which a planted file
    could set to 1e308; the record's only when the asker has none, capped at a day)."""
    if rec.get("damaged"):
        return f"its record is damaged ({rec['damaged']})"
    if timeout_s is None:
        try:
            timeout_s = min(float(rec.get("timeout_s", 600)), 86400.0)
        except (TypeError, ValueError):
            timeout_s = 600.0
        timeout_s = timeout_s if timeout_s == timeout_s else 600.0  # nan
    timeout = float(timeout_s)
    if rec.get("host") == (host or socket.gethostname()) and isinstance(rec.get("pid"), int):
        if not alive(rec["pid"], rec.get("start")):
            return f"process {rec['pid']} is gone"
        return None
    if rec["age_s"] > timeout:
        return f"heartbeat {rec['age_s']:.0f} s old, older than {timeout:.0f} s"
    return None


def holder(run_path, host: str | None = None, timeout_s: float | None = None) -> dict | None:
    """The live holder's record, or None: what `make sweep` and `make status` ask (as `host`,
    with their `lease.timeout_s`). A damaged record holds nothing."""
    rec = read(run_path)
    return rec if rec is not None and stale_reason(rec, host, timeout_s) is None else None


class Lease:
    """`with Lease(run_dir):` the exclusive right to write `run_dir` (created if missing).
    `lost` turns true if another process took the lease over (this one was stopped for longer
    than the timeout): the holder must then stop writing."""

    def __init__(self, run_path, timeout_s: float = 600, heartbeat_s: float = 30, host: str | None = None):
        self.path = Path(run_path)
        self.timeout_s, self.heartbeat_s = float(timeout_s), float(heartbeat_s)
        self.host = host or socket.gethostname()  # `lease.host`: tests play another node
        self.fd = None
        self.record_fd = None  # our record's inode, which the heartbeat touches (never another holder's)
        self.lost = False
        self._stop = threading.Event()
        self._thread = None
        self.record = None
        self._seen = None  # (inode, size, mtime, ctime) of lease.json when last read and found ours

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def _mine(self, generation: int = 1) -> dict:
        return dict(host=self.host, pid=os.getpid(), start=proc_start(os.getpid()),
                    slurm_job=slurm_job_id(), since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    timeout_s=self.timeout_s, heartbeat_s=self.heartbeat_s,
                    generation=generation, token=secrets.token_hex(8))

    @property
    def temp_tag(self) -> str:
        """What this holder's temporary files carry in their names: host, pid, generation."""
        return f"{self.host}-{os.getpid()}-g{self.record['generation']}"

    def _create_record(self) -> bool:
        """Create lease.json with our record, atomically and only if absent (link(2))."""
        tmp = self.path / f".{RECORD}.{os.getpid()}.{secrets.token_hex(8)}.tmp"  # no name to plant a link at
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            owners.adopt(tmp, fd=fd)
            os.write(fd, json.dumps(self.record).encode())
            os.link(tmp, self.path / RECORD)
        except FileExistsError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        if self.record_fd is not None:
            os.close(self.record_fd)
        self.record_fd = fd
        return True

    @staticmethod
    def _open_lock(lock: Path) -> int:
        """A descriptor on the run's lock file for this host: a regular file of this user's, 0600.
        One that another user owns or could open (a read-only handle on it would hold the flock
        and keep the run "live" for ever) is no lock of ours: it is removed and made anew."""
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
            except PermissionError:
                fd = None
            except OSError as e:
                raise StoreError(f"{lock}: cannot be opened as the run's lock file ({e.strerror or e}); "
                                 "remove it (a regular file, or nothing, is allowed)") from None
            if fd is not None:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
                    return fd
                os.close(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise StoreError(f"{lock}: not a regular file; remove it (a regular file, or nothing, is allowed)")
            try:
                lock.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StoreError(f"{lock}: another user's lock file that cannot be removed ({e.strerror or e}); "
                                 "remove it") from None
        raise StoreError(f"{lock}: replaced by another process each time it is made; remove it")

    def acquire(self) -> None:
        real_folder(self.path, "a run folder", create=True)
        fd = self._open_lock(self.path / lock_name(self.host))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LeaseHeld(self.path, read(self.path)) from None
        self.fd, self.record = fd, self._mine()
        try:
            for _ in range(3):  # a racing taker-over can move the record under us
                if self._create_record():
                    break
                rec = read(self.path)
                if rec is None:
                    continue
                why = stale_reason(rec, self.host, self.timeout_s)
                me = self.record["slurm_job"]
                if why is None and me and rec.get("slurm_job") == me:
                    why = f"Slurm job {me} was requeued"
                if why is None:
                    raise LeaseHeld(self.path, rec)
                aside = self.path / f".{RECORD}.{self.host}.{os.getpid()}.stale"
                try:
                    os.rename(self.path / RECORD, aside)  # only one taker-over can win this
                except FileNotFoundError:
                    continue
                moved = read_file(aside)
                if moved.get("token") != rec.get("token") or moved.get("pid") != rec.get("pid"):
                    # another taker-over replaced the stale record meanwhile: give it back
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, self.path / RECORD)
                    aside.unlink(missing_ok=True)
                    continue
                aside.unlink(missing_ok=True)
                gen = rec.get("generation")
                self.record = self._mine((gen if isinstance(gen, int) else 0) + 1)
                log.warning("run %s: taking over the lease %s (%s)", self.path.name,
                            describe(rec).replace("held by ", "of "), why)
            else:
                raise LeaseHeld(self.path, read(self.path))
            if not self._still_mine():  # a racing taker-over on another host won after all
                raise LeaseHeld(self.path, read(self.path))
        except BaseException:
            self._unlock()
            raise
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _still_mine(self, cached: bool = False) -> bool:
        """Whether lease.json is our record (its token, pid, host). `cached`: when the file is
        the one we last read and found ours -- the same inode, size, mtime and ctime (a take-over
        links a new file; any write or touch changes ctime) -- without reading it again: the
        fence of every write (pipeline/runs/rundir.py) then costs one stat."""
        path = self.path / RECORD
        st = os.stat(path) if cached else None
        if st is not None and (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == self._seen:
            return True
        rec = read_file(path)
        mine = bool(rec) and rec.get("token") == self.record["token"] and \
            rec.get("pid") == self.record["pid"] and rec.get("host") == self.record["host"]
        self._seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) if mine and st else None
        return mine

    def check(self) -> None:
        """Raise LeaseLost unless this process still holds the lease: every write to the run
        directory calls it just before it acts (the fencing token compared with the record)."""
        if self.fd is None:
            raise LeaseLost(f"run {self.path.name}: this process no longer holds the lease (released)")
        try:
            mine = not self.lost and self._still_mine(cached=True)
        except OSError:  # the record cannot be read: not ours to write on
            mine = False
        if not mine:
            self._lose()
            raise self.lost_error()

    def lost_error(self) -> LeaseLost:
        """LeaseLost saying who holds the run now."""
        rec = read(self.path)
        by = (f"by {describe(rec).removeprefix('held by ')}" if rec else
              "by another process, which has released it since")
        return LeaseLost(f"run {self.path.name}: the lease was taken over {by}")

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            log.error("run %s: lease lost to %s; this process stops writing",
                      self.path.name, describe(read(self.path) or {}))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._still_mine():
                    self._lose()
                    return
                # through our own record's descriptor: if another process replaced the record
                # since the check above (this thread may be paused anywhere), its file is untouched
                os.utime(self.record_fd)
            except OSError as e:  # a full disk or a file server hiccup: try again next beat
                log.warning("run %s: lease heartbeat failed (%s)", self.path.name, e)

    def _unlock(self) -> None:
        if self.record_fd is not None:
            os.close(self.record_fd)
            self.record_fd = None
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._still_mine():
                (self.path / RECORD).unlink(missing_ok=True)
        except OSError:
            pass
        self._unlock()
