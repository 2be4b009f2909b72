"""Whose folders a process writes into and counts results from, and the modes of what it creates:
git's `safe.directory` and OpenSSH's StrictModes for a run store (docs/runs.md "Shared run stores").

A run folder, sweep folder or analysis folder is used when it is owned by you, or by a user the
store's config trusts (`store.trust`: user names, uids, `@group` for every member of a group; a
`store.group` is trusted too), and when no one else can write into it unless it says so: a folder
writable by every user is refused; one writable by its group only when that group is the declared
`store.group`. Everything this process creates gets an explicit mode, never the umask's accident:
folders 0700 and files 0600 by default; with `store.group`, folders 2770 (setgid: what is created
inside keeps the group) and files 0660, in that group.

The policy is process-wide, like the umask it replaces: `configure(cfg.store)` once at the
entry points (sweep, status, train, analysis) sets it."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class Policy:
    uids: frozenset = field(default_factory=frozenset)  # trusted owners besides this user
    gids: frozenset = field(default_factory=frozenset)  # trusted groups: any member may own a folder
    group: int | None = None  # the shared store's group (its folders may be group-writable)
    trust: tuple = ()  # store.trust as configured (`where --store`)
    group_name: str | None = None  # store.group as configured

    @property
    def folder_mode(self) -> int:
        return 0o2770 if self.group is not None else 0o700

    @property
    def file_mode(self) -> int:
        return 0o660 if self.group is not None else 0o600


_policy = Policy()


def policy() -> Policy:
    return _policy


def _uid(entry) -> int:
    if isinstance(entry, int) or str(entry).isdigit():
        return int(entry)
    try:
        return pwd.getpwnam(str(entry)).pw_uid
    except KeyError:
        raise ConfigError(f"store.trust: no user {entry!r} on this machine (allowed: user names, uids, "
                          "@group)") from None


def _gid(name, key: str) -> int:
    name = str(name)
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{key}: no group {name!r} on this machine") from None


def make_policy(trust=(), group=None) -> Policy:
    """The policy of `store.trust` (a list) and `store.group` (a group name or gid, or null)."""
    if trust is None:
        trust = ()
    if isinstance(trust, (str, int)):
        trust = [trust]
    uids, gids = set(), set()
    for entry in trust:
        if isinstance(entry, bool) or not isinstance(entry, (str, int)) or str(entry).strip() in ("", "@"):
            raise ConfigError(f"store.trust: {entry!r} is not a user name, uid or @group")
        entry = str(entry).strip()
        if entry.startswith("@"):
            gids.add(_gid(entry[1:], "store.trust"))
        else:
            uids.add(_uid(entry))
    gid = None
    if group is not None and str(group) != "":
        gid = _gid(group, "store.group")
        gids.add(gid)
    return Policy(frozenset(uids), frozenset(gids), gid, tuple(str(t).strip() for t in trust),
                  str(group) if gid is not None else None)


def configure(store) -> Policy:
    """Set this process's policy from the `store` config node (or a dict); returns it."""
    global _policy
    store = store or {}
    _policy = make_policy(store.get("trust") or (), store.get("group"))
    return _policy


def _name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def trusted_owner(uid: int, p: Policy | None = None) -> bool:
    p = p or _policy
    me = os.getuid()
    if uid == me or uid in p.uids:
        return True
    if not p.gids:
        return False
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid in p.gids:
        return True
    return any(user.pw_name in grp.getgrgid(g).gr_mem for g in p.gids if _has_group(g))


def _has_group(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


def problem(path: Path, st: os.stat_result | None = None, p: Policy | None = None) -> str:
    """'' when this process may use the folder `path`; else why not, in words (no path)."""
    p = p or _policy
    st = st if st is not None else os.lstat(path)
    if not trusted_owner(st.st_uid, p):
        return (f"owned by {_name(st.st_uid)}, neither you nor a user store.trust names "
                "(a shared store lists its users: store.trust=[alice,@group])")
    if st.st_mode & stat.S_IWOTH and not stat.S_ISLNK(st.st_mode):
        return f"writable by every user (mode {stat.S_IMODE(st.st_mode):04o}); chmod o-w it"
    if st.st_mode & stat.S_IWGRP and st.st_gid != p.group:
        return (f"writable by group {_group_name(st.st_gid)} (mode {stat.S_IMODE(st.st_mode):04o}), which "
                "store.group does not declare shared; chmod g-w it, or set store.group")
    return ""


def mkdir(path: Path) -> bool:
    """Create the folder `path` (parents too, with the same mode) unless it exists; True when this
    call created it. Its mode and group are the policy's, whatever the umask."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    if not path.parent.exists() and not path.parent.is_symlink():
        mkdir(path.parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    adopt(path, folder=True)
    return True


def adopt(path, folder: bool = False, fd: int | None = None) -> None:
    """Give what this process just created the policy's mode and group."""
    p = _policy
    mode = p.folder_mode if folder else p.file_mode
    if fd is not None:
        if p.group is not None:
            os.fchown(fd, -1, p.group)
        os.fchmod(fd, mode)
        return
    if p.group is not None:
        os.chown(path, -1, p.group, follow_symlinks=False)
    os.chmod(path, mode)
