"""Images in Ceph RBD, through QEMU's own ``rbd`` driver (librbd).

A location is spelled the way ``qemu-img`` spells it::

    rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER][:keyring=FILE]

The image holds nvmgr's layout directly (raw).  :class:`RbdContainer` reads and
writes it like a qcow2 container: a private ``qemu-storage-daemon`` opens an
``rbd`` node (with a ``raw`` node on top) and exports it as one regular file
through FUSE; nvmgr uses that file with the raw-file code.  nvmgr never talks
to Ceph itself.

The cephx key: with ``keyring=FILE`` the key is read from that keyring and
handed to the daemon as a ``secret`` object through a pipe (never in argv,
the environment or a file); without it, librbd finds the key the way every
Ceph client does (the ``keyring`` setting of the conf file).

Locking: nvmgr writers on one host exclude each other with ``flock`` on a
lock file per image under :func:`lock_dir` (an RBD image has no local file to
lock).  Across hosts, a running VM's QEMU holds RBD's exclusive lock; nvmgr's
own in-use mark (set by the prepare hook) refuses writes to its live sections.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nvmgr.errors import ExternalError, NotFoundError, UsageError
from nvmgr.storage import qemu
from nvmgr.storage.base import lock_file
from nvmgr.storage.fuse import FuseExport
from nvmgr.storage.qcow2 import Qcow2Container, _check_size, check_snapshot_name

PREFIX = "rbd:"

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}"
_LOCATION = re.compile(rf"rbd:(?P<pool>{_NAME})/(?P<image>{_NAME})(?:@(?P<snap>{_NAME}))?"
                       r"(?P<opts>(?::[a-z_]+=[^:\0]+)*)")
_OPTIONS = ("conf", "id", "keyring")


def is_rbd(location: str) -> bool:
    return isinstance(location, str) and location.startswith(PREFIX)


@dataclass(frozen=True)
class RbdLocation:
    """A parsed ``rbd:`` location."""

    pool: str
    image: str
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    keyring: str | None = None

    @classmethod
    def parse(cls, location: str) -> RbdLocation:
        """:raise UsageError: not ``rbd:POOL/IMAGE[@SNAP][:conf=F][:id=U][:keyring=F]``."""
        m = _LOCATION.fullmatch(location)
        if m is None:
            raise UsageError(f"bad RBD location {location!r}: expected "
                             "rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER][:keyring=FILE]")
        opts: dict[str, str] = {}
        for part in filter(None, m["opts"].split(":")):
            key, _, value = part.partition("=")
            if key not in _OPTIONS or key in opts:
                raise UsageError(f"bad RBD location {location!r}: option {key!r} "
                                 f"(known once each: {', '.join(_OPTIONS)})")
            if key in ("conf", "keyring") and not os.path.isabs(value):
                raise UsageError(f"bad RBD location {location!r}: {key} must be an absolute path")
            opts[key] = value
        return cls(m["pool"], m["image"], m["snap"], opts.get("conf"), opts.get("id"),
                   opts.get("keyring"))

    def qemu_filename(self) -> str:
        """The legacy filename ``qemu-img`` takes (key material never in it)."""
        s = f"rbd:{self.pool}/{self.image}" + (f"@{self.snapshot}" if self.snapshot else "")
        for key, value in (("conf", self.conf), ("id", self.user), ("keyring", self.keyring)):
            if value:
                s += f":{key}={value}"
        return s

    def node(self) -> dict[str, object]:
        """The ``rbd`` blockdev node (without a key)."""
        n: dict[str, object] = {"driver": "rbd", "pool": self.pool, "image": self.image}
        if self.snapshot:
            n["snapshot"] = self.snapshot
        if self.conf:
            n["conf"] = self.conf
        if self.user:
            n["user"] = self.user
        return n


def read_keyring_key(path: str, user: str | None) -> str:
    """The base64 key of ``client.USER`` (or the only entry) in a Ceph keyring file.

    :raise NotFoundError: no such file, or no key for that user in it.
    """
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - small file
    except FileNotFoundError as e:
        raise NotFoundError(f"no such keyring: {path}") from e
    except OSError as e:
        raise UsageError(f"cannot read keyring {path}: {e.strerror or e}") from e
    want = f"client.{user}" if user else None
    section = None
    keys: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section and line.partition("=")[0].strip() == "key":
            keys[section] = line.partition("=")[2].strip()
    if want in keys:
        return keys[want]
    if want is None and len(keys) == 1:
        return next(iter(keys.values()))
    raise NotFoundError(f"keyring {path} has no key for {want or 'a single user'}")


def rbd_exists(location: str) -> bool:
    """Whether the RBD image exists (``qemu-img info`` through librbd).

    :raise ExternalError: the cluster cannot be asked.
    """
    loc = RbdLocation.parse(location)
    res = qemu.run(qemu.QEMU_IMG, ["info", "-U", "-f", "raw", loc.qemu_filename()],
                   image=location)
    if res.returncode != 0 and "No such file or directory" in res.stderr:
        return False
    qemu.check(res, "qemu-img info", image=location)
    return True


def lock_dir() -> str:
    """Where nvmgr's per-image lock files for RBD images live on this host."""
    return f"/run/lock/nvmgr-rbd-{os.getuid()}"


def _lock(loc: RbdLocation, *, writable: bool, wait: float, location: str) -> int:
    d = lock_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, f"{loc.pool}%{loc.image}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_file(fd, location, writable, wait)
    except BaseException:
        os.close(fd)
        raise
    return fd


class RbdContainer(Qcow2Container):
    """An nvmgr image in an RBD image, through a private ``qemu-storage-daemon``.

    :param path: the ``rbd:`` location.
    :raise UsageError: a bad location.
    :raise NotFoundError: no such RBD image (or pool, or keyring).
    :raise BusyError: another nvmgr on this host holds it.
    :raise ExternalError: librbd (through the daemon) failed: the cluster is
        unreachable, the user has no rights, ...
    """

    fmt = "rbd"

    @staticmethod
    def probe(head: bytes) -> bool:
        return False  # an RBD image is named by its location, never probed

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        self.location = RbdLocation.parse(path)
        self._init_state(path, writable)
        self._abs = path
        try:
            self._lock_fd = _lock(self.location, writable=writable, wait=wait, location=path)
            self._open_locked()
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> RbdContainer:
        """Create a new RBD image of *size* bytes and open it writable.

        :raise UsageError: the image exists, or a bad size.
        """
        loc = RbdLocation.parse(path)
        _check_size(size, path)
        fd = _lock(loc, writable=True, wait=wait, location=path)
        try:
            res = qemu.run(qemu.QEMU_IMG, ["create", "-q", "-f", "raw", loc.qemu_filename(),
                                           str(size)], image=path)
            if res.returncode != 0 and "exists" in res.stderr.lower():
                raise UsageError(f"RBD image {loc.image} exists in pool {loc.pool} (nvmgr "
                                 "never overwrites an image)", image=path)
            qemu.check(res, "qemu-img create", image=path)
        finally:
            os.close(fd)
        return cls(path, writable=True, wait=wait)

    def _open_locked(self) -> None:
        loc = self.location
        node = loc.node()
        objects: list[str] = []
        fds: list[int] = [self._lock_fd]
        keep: list[int] = []
        try:
            if loc.keyring:
                key = read_keyring_key(loc.keyring, loc.user)
                r, w = os.pipe()
                keep.append(r)
                os.write(w, key.encode("ascii"))
                os.close(w)
                os.set_inheritable(r, True)
                # QEMU base64-encodes a secret for Ceph: hand it the key decoded.
                objects.append(f"secret,id=nvmgr-rbd-key,format=base64,file=/dev/fd/{r}")
                node["key-secret"] = "nvmgr-rbd-key"
                fds.append(r)
            try:
                export = FuseExport(self._abs, driver="raw", writable=self.writable,
                                    pass_fds=tuple(fds), image=self.path, protocol=node,
                                    objects=objects)
            except ExternalError as e:
                if "No such file or directory" in str(e):
                    raise NotFoundError(f"no RBD image {loc.image} in pool {loc.pool}",
                                        image=self.path) from e
                raise
            self._export = export
        finally:
            for fd in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._open_export(export)


# ---------------------------------------------------------------- RBD snapshots

@contextlib.contextmanager
def _held(path: str, exclusive: bool, wait: float) -> Iterator[RbdLocation]:
    """nvmgr's lock on the RBD image while ``qemu-img`` works on it."""
    loc = RbdLocation.parse(path)
    fd = _lock(loc, writable=exclusive, wait=wait, location=path)
    try:
        yield loc
    finally:
        os.close(fd)


def snapshot_list(path: str, *, wait: float = 0) -> list[dict[str, Any]]:
    """The RBD snapshots of the image (QEMU's records: ``id``, ``name``, ...)."""
    with _held(path, False, wait) as loc:
        snaps = qemu.img_info(loc.qemu_filename(), "raw").get("snapshots", [])
    return [s for s in snaps if isinstance(s, dict)] if isinstance(snaps, list) else []


def _names(loc: RbdLocation) -> set[str]:
    snaps = qemu.img_info(loc.qemu_filename(), "raw").get("snapshots", [])
    return {str(s.get("name")) for s in snaps if isinstance(s, dict)} \
        if isinstance(snaps, list) else set()


def _snapshot(path: str, name: str, op: str, wait: float) -> None:
    check_snapshot_name(name)
    with _held(path, True, wait) as loc:
        known = name in _names(loc)
        if op == "-c" and known:
            raise UsageError(f"a snapshot named {name!r} exists", image=path)
        if op != "-c" and not known:
            raise NotFoundError(f"no snapshot named {name!r}", image=path)
        # A raw image named by its location: qemu-img probes it as raw (and says so).
        qemu.qemu_img(["snapshot", "-q", op, name, loc.qemu_filename()],
                      f"qemu-img snapshot {op} {name!r}", image=path)


def snapshot_create(path: str, name: str, *, wait: float = 0) -> None:
    """Take the RBD snapshot *name* (Ceph's own, copy-on-write) of the image."""
    _snapshot(path, name, "-c", wait)


def snapshot_apply(path: str, name: str, *, wait: float = 0) -> None:
    """Roll the image back to its RBD snapshot *name*."""
    _snapshot(path, name, "-a", wait)


def snapshot_delete(path: str, name: str, *, wait: float = 0) -> None:
    """Delete the RBD snapshot *name*."""
    _snapshot(path, name, "-d", wait)
