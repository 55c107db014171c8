"""Staging: sections that QEMU or swtpm read as files, moved in and out of the image.

- ``tpm`` sections become swtpm's state files in libvirt's state directory
  (``/var/lib/libvirt/swtpm/<uuid>/tpm2/tpm2-00.permall`` ...), owned by the
  swtpm user with modes 0700/0600, before libvirt starts swtpm; afterwards
  they are collected back into the image and the staged files removed, so
  the image is the one copy of the TPM.
- ``fwcfg`` sections become read-only files under ``/run/nvmgr/<uuid>/``
  (tmpfs) for QEMU's ``-fw_cfg name=...,file=...``
  (:data:`~nvmgr.paths.RUNTIME_ROOT`, named by the QEMU arguments).

Writes are atomic (temporary file, fsync, rename), so swtpm never sees half
a state file; a wipe unlinks a file before overwriting its bytes, so a staged
name never holds anything but the TPM's real state.

Every file write, fsync, rename and unlink here calls :data:`fault` first
when it is set (``tests/faultrun.py`` kills the hook at each of them, as it
does at every image I/O through ``Container._fault``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import os
import pwd
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from nvmgr.domain.elements import Domain
from nvmgr.domain.profiles import tpm_prefix, tpm_version
from nvmgr.errors import InstallationError, InvalidInputError
from nvmgr.format.model import Binding, Section
from nvmgr.paths import QEMU_CONF, RUNTIME_ROOT, SWTPM_STATE_ROOT
from nvmgr.storage.mounts import filesystem_of

#: Fault injection for tests: called as ``fault(kind, path)`` before every
#: write, fsync, rename and unlink of a staged file.  None in normal operation.
fault: Callable[[str, str], None] | None = None


def _fault(kind: str, path: Path | str) -> None:
    if fault is not None:
        fault(kind, str(path))


_QEMU_CONF_USER = re.compile(r'\s*(user|group|swtpm_user|swtpm_group)\s*=\s*"([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Users:
    """Who QEMU and swtpm run as (``/etc/libvirt/qemu.conf``, Debian defaults)."""

    qemu_user: str = "libvirt-qemu"
    qemu_group: str = "libvirt-qemu"
    swtpm_user: str = "tss"
    swtpm_group: str = "tss"

    @classmethod
    def from_qemu_conf(cls, path: str = QEMU_CONF) -> Users:
        values: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                m = _QEMU_CONF_USER.match(line)
                if m:
                    values[m.group(1)] = m.group(2)
        d = cls()
        return cls(
            qemu_user=values.get("user", d.qemu_user),
            qemu_group=values.get("group", d.qemu_group),
            swtpm_user=values.get("swtpm_user", d.swtpm_user),
            swtpm_group=values.get("swtpm_group", d.swtpm_group),
        )


def _ids(user: str, group: str) -> tuple[int, int]:
    """uid/gid for names or ``+N`` numbers; -1 (unchanged) when unknown."""
    def one(name: str, lookup: Callable[[str], int]) -> int:
        if name.startswith("+") and name[1:].isdigit():
            return int(name[1:])
        try:
            return lookup(name)
        except KeyError:
            return -1
    return (one(user, lambda n: pwd.getpwnam(n).pw_uid),
            one(group, lambda n: grp.getgrnam(n).gr_gid))


def write_atomic(path: Path, data: bytes, *, owner: tuple[int, int], mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.nvmgr-tmp")
    _fault("write", tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        _fault("fsync", tmp)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fault("rename", path)
    os.replace(tmp, path)


def _ensure_dir(path: Path, owner: tuple[int, int], mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise OSError(f"{path} is a symbolic link")
    os.chown(path, *owner)
    os.chmod(path, mode)


# ---------------------------------------------------------------- tpm

def tpm_state_dir(domain_uuid: str, version: str = "2.0",
                  root: str = SWTPM_STATE_ROOT) -> Path:
    return Path(root) / domain_uuid / ("tpm2" if version == "2.0" else "tpm1.2")


def tpm_file_name(section: str, version: str = "2.0") -> str:
    """``tpm-permall`` -> ``tpm2-00.permall`` (swtpm's file naming)."""
    blob = section.rsplit("-", 1)[-1]
    return f"{'tpm2' if version == '2.0' else 'tpm'}-00.{blob}"


def tpm_sections(sections: list[Section]) -> list[Section]:
    return [s for s in sections if s.binding is Binding.TPM]


#: swtpm's state blobs (its file names end with these), the suffixes of tpm sections.
TPM_BLOBS = frozenset({"permall", "volatilestate", "savestate"})


def tpm_state_files(dom: Domain, names: list[str], root: str = SWTPM_STATE_ROOT,
                    ) -> dict[str, Path]:
    """Where swtpm keeps each of the tpm sections *names*: section -> its state file.

    Each section belongs to the ``<tpm>`` its prefix names (``tpm``: the
    first, ``tpm1``: the second, as the plan names them) and goes into that
    TPM's own version's directory and file name (``<uuid>/tpm2/tpm2-00.permall``,
    ``<uuid>/tpm1.2/tpm-00.permall``).  A section of a TPM the domain no
    longer has (or not an emulator) has no file: nothing stages or collects it.

    :raise InvalidInputError: two sections would share one file (two swtpm
        TPMs of one version: libvirt 9.0 refuses such a domain anyway).
    """
    tpms = dom.tpms
    out: dict[str, Path] = {}
    for name in names:
        prefix, sep, blob = name.partition("-")
        if not sep or blob not in TPM_BLOBS or not prefix.startswith("tpm"):
            continue
        idx = 0 if prefix == "tpm" else int(prefix[3:]) if prefix[3:].isdigit() else -1
        if not 0 <= idx < len(tpms) or tpm_prefix(idx) != prefix:
            continue
        t = tpms[idx]
        if t.backend_type != "emulator":
            continue
        version = tpm_version(t.model, t.version)
        path = tpm_state_dir(str(dom.uuid), version, root) / tpm_file_name(blob, version)
        if path in out.values():
            raise InvalidInputError(f"sections {name} and "
                                    f"{next(n for n, p in out.items() if p == path)} would "
                                    f"share swtpm's state file {path}: one emulated TPM per "
                                    "version")
        out[name] = path
    return out


def read_files(files: dict[str, Path], limits: dict[str, int] | None = None,
               ) -> dict[str, bytes]:
    """The staged files that exist, by section name; *limits*: the most bytes
    each may hold (its section's capacity), see :func:`read_tpm`."""
    out = {}
    for name, p in files.items():
        got = read_tpm(p.parent, [p.name], limit=(limits or {}).get(name))
        if p.name in got:
            out[name] = got[p.name]
    return out


def wipe_files(files: dict[str, Path]) -> None:
    for p in files.values():
        wipe_tpm(p.parent, [p.name])


def stage_files(files: dict[str, Path], blobs: dict[str, bytes], users: Users) -> list[str]:
    """Write each section's blob in *blobs* to its state file; the file names written."""
    written = []
    for name, data in blobs.items():
        p = files[name]
        written += stage_tpm(p.parent, {p.name: data}, users)
    return written


def stage_tpm(state_dir: Path, blobs: dict[str, bytes], users: Users) -> list[str]:
    """Write swtpm state files; return the file names written."""
    owner = _ids(users.swtpm_user, users.swtpm_group)
    _ensure_dir(state_dir, owner, 0o700)
    written = []
    for name, data in blobs.items():
        write_atomic(state_dir / name, data, owner=owner)
        written.append(name)
    return written


def read_tpm(state_dir: Path, names: list[str], *, limit: int | None = None,
             ) -> dict[str, bytes]:
    """The state files that exist, by file name: regular files only, opened
    without following a link (swtpm's user owns the directory and could swap a
    file for a link to one of root's between a check and a read).

    :param limit: the most bytes a file may hold (its section's capacity).
    :raise InvalidInputError: a file holds more: refused, not read into memory.
    """
    out = {}
    for name in names:
        p = state_dir / name
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:  # a link: never swtpm's own state
                continue
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a FIFO, a device: nothing swtpm writes
                continue
            if limit is not None and st.st_size > limit:
                raise InvalidInputError(
                    f"swtpm state file {p} holds {st.st_size} bytes, more than its section "
                    f"can ({limit}): refusing to read it (not swtpm's own state)")
            data = f.read() if limit is None else f.read(limit + 1)
            if limit is not None and len(data) > limit:  # grew since fstat
                raise InvalidInputError(
                    f"swtpm state file {p} holds more than its section can ({limit} "
                    "bytes): refusing to read it (not swtpm's own state)")
        out[name] = data
    return out


def wipe_tpm(state_dir: Path, names: list[str]) -> None:
    """Remove staged state files, then overwrite their bytes with zeros.

    Unlinked first, through a descriptor kept open: a wipe cut short leaves
    the file whole or gone, never a name holding zeros that the next prepare
    would take for the TPM's newest state.
    """
    for name in names:
        p = state_dir / name
        if p.is_file() and not p.is_symlink():
            try:
                fd = os.open(p, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                fd = -1
            try:
                _fault("unlink", p)
                p.unlink()
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        size = os.fstat(fd).st_size
                        _fault("write", p)
                        os.pwrite(fd, bytes(size), 0)
                        _fault("fsync", p)
                        os.fsync(fd)
            finally:
                if fd >= 0:
                    os.close(fd)


# ---------------------------------------------------------------- fw_cfg / runtime

def runtime_dir(domain_uuid: str, root: str = RUNTIME_ROOT) -> Path:
    return Path(root) / domain_uuid


#: Filesystems whose files never reach a disk.
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def require_volatile(path: Path | str) -> None:
    """Refuse to write a key under *path* unless it is on tmpfs (or ramfs).

    QEMU reads an image's LUKS passphrase and a cephx key from a runtime file;
    nvmgr never puts a key on persistent storage, so that file must be in
    memory.  ``/run`` is a tmpfs on every distribution's init (systemd's and
    sysvinit's alike); a host where it is not (some minimal containers and
    microVMs) needs one mounted on ``/run/nvmgr`` first.

    :raise InstallationError: *path* is on a filesystem that reaches a disk.
    """
    fstype = filesystem_of(path)
    if fstype not in VOLATILE_FILESYSTEMS:
        raise InstallationError(
            f"refusing to write a key under {path}: it is on {fstype}, not on tmpfs, and "
            "nvmgr never writes a key to persistent storage; mount a tmpfs there first "
            f"(mount -t tmpfs -o mode=0755,nosuid,nodev,noexec nvmgr {path})")


def stage_runtime(domain_uuid: str, files: dict[str, bytes], users: Users,
                  root: str = RUNTIME_ROOT, *, secret: bool = False) -> list[str]:
    """Files QEMU reads at start (fw_cfg blobs; with *secret*, key files, which
    only a tmpfs may hold: :func:`require_volatile`), 0600, owned by the QEMU user."""
    owner = _ids(users.qemu_user, users.qemu_group)
    d = runtime_dir(domain_uuid, root)
    _ensure_dir(Path(root), (0, 0), 0o755)
    if secret:
        require_volatile(root)
    _ensure_dir(d, owner, 0o700)
    for name, data in files.items():
        write_atomic(d / name, data, owner=owner)
    return sorted(files)


def remove_runtime(domain_uuid: str, root: str = RUNTIME_ROOT) -> None:
    _fault("unlink", runtime_dir(domain_uuid, root))
    shutil.rmtree(runtime_dir(domain_uuid, root), ignore_errors=True)


def hand_to_qemu(image: str, users: Users) -> None:
    """QEMU opens the image itself (libvirt does not chown qemu:commandline files)."""
    _fault("chown", image)
    os.chown(image, *_ids(users.qemu_user, users.qemu_group))
    os.chmod(image, 0o600)


def _may(st: os.stat_result, uid: int, gids: set[int], bits: int) -> bool:
    """Whether *uid* (in *gids*) has permission *bits* (``0o2`` write, ``0o1`` search)
    on a file with stat *st*, by its owner, group and other bits."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bits << 6))
    if st.st_gid in gids:
        return bool(st.st_mode & (bits << 3))
    return bool(st.st_mode & bits)


def require_qemu_reaches_socket(path: str, users: Users, what: str) -> None:
    """QEMU, running as the QEMU user, can connect to the unix socket *path*: search
    permission on each directory above it and write permission on the socket itself
    (libvirt hands QEMU only the files it knows of; a socket named in
    ``<qemu:commandline>`` is the administrator's to open to QEMU).

    Not told here (no refusal): a QEMU user this host does not know, a socket
    that is not there (connecting to it tells that the server cannot be reached).

    :raise InstallationError: it cannot (the message names the socket, its owner
        and mode, and the fix).
    """
    uid, gid = _ids(users.qemu_user, users.qemu_group)
    if uid < 0:
        return
    gids = {gid} | {g.gr_gid for g in grp.getgrall() if users.qemu_user in g.gr_mem}
    try:
        pwent = pwd.getpwuid(uid)
        gids.add(pwent.pw_gid)
    except KeyError:
        pass
    p = Path(path)
    for d in reversed(p.parents):
        try:
            st = os.stat(d)
        except OSError:
            return  # no server there: connecting says so
        if not _may(st, uid, gids, 0o1):
            raise InstallationError(
                f"QEMU runs as {users.qemu_user}, which cannot reach {what} {path}: it has no "
                f"search permission on {d} (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"chmod o+x {d}, or serve the socket from a directory {users.qemu_user} "
                "can enter")
    try:
        st = os.stat(p)
    except OSError:
        return  # no server there: connecting says so (cannot reach it)
    if stat.S_ISSOCK(st.st_mode) and not _may(st, uid, gids, 0o2):
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        raise InstallationError(
            f"QEMU runs as {users.qemu_user}, which may not connect to {what} {path} "
            f"(owner {owner}, mode {stat.S_IMODE(st.st_mode):04o}: connecting needs write "
            f"permission): chown {users.qemu_user} {path} (again after each server "
            f"start), or run the server as {users.qemu_user}")
