"""The mounts this process sees, from ``/proc/self/mountinfo``: one reader.

Used to tell a FUSE export's mount point (:mod:`nvmgr.storage.fuse`) and the
filesystem a path lives on (the runtime key files must be on tmpfs:
:func:`nvmgr.provision.staging.require_volatile`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    point: str  # as a path (the kernel's octal escapes undone)
    fstype: str  # "tmpfs", "ext4", "fuse", "fuse.sshfs", ...


def mounts(mountinfo: str = MOUNTINFO) -> list[Mount]:
    """Every mount, in the kernel's order (a later one over an earlier one)."""
    out = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, sep, post = line.partition(" - ")
            fields = pre.split(" ")
            if not sep or len(fields) < 5 or not post.split():
                continue
            point = _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append(Mount(point, post.split()[0]))
    return out


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem *path* lives on: the last-mounted of the deepest
    mount points that hold it (``unknown`` when none does)."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    for m in mounts():
        inside = target == m.point or target.startswith(m.point.rstrip("/") + "/")
        if inside and len(m.point) >= len(best):
            best, fstype = m.point, m.fstype
    return fstype


def is_fuse_mount(path: str) -> bool:
    """True when *path* (as given: the form mountinfo shows) is the mount point of
    a FUSE file system."""
    return any(m.point == path and (m.fstype == "fuse" or m.fstype.startswith("fuse."))
               for m in mounts())
