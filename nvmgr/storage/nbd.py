"""Images on an NBD server, through QEMU's own ``nbd`` driver: the generic
network location.

A location is an NBD URI, as QEMU spells it::

    nbd+unix:///EXPORT?socket=/PATH/TO/SOCKET
    nbd://HOST[:PORT]/EXPORT              (PORT defaults to 10809)

The export holds nvmgr's layout directly (raw bytes, whatever the server keeps
them in).  :class:`NbdContainer` reads and writes it like an RBD image: a
private ``qemu-storage-daemon`` opens an ``nbd`` node (with a ``raw`` node on
top) and exports it as one regular file through FUSE, which nvmgr uses with the
raw-file code.  nvmgr never speaks NBD itself.

An export has the size its server gives it: nvmgr cannot make one nor grow
it.  A new image is written into an export only when the export is *blank*
(every byte zero, as a new file a server serves is: nothing there to lose) and
large enough; an image then grows within the export's size, never past it.  nvmgr writers on one host exclude
each other with ``flock`` on a lock file per location under :func:`lock_dir`;
the server decides who else may write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from nvmgr.errors import ExternalError, NoSpaceError, NotFoundError, UsageError
from nvmgr.storage import qemu
from nvmgr.storage.fuse import FuseExport
from nvmgr.storage.network import LocationContainer, lock_location

PREFIXES = ("nbd://", "nbd+unix://")
DEFAULT_PORT = 10809
USAGE_HINT = "nbd+unix:///EXPORT?socket=/PATH or nbd://HOST[:PORT]/EXPORT"

_EXPORT = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}"
_UNIX = re.compile(rf"nbd\+unix:///(?P<export>{_EXPORT})?\?socket=(?P<socket>/[^?&#\0]{{0,4095}})")
_TCP = re.compile(r"nbd://(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                  rf"(?::(?P<port>[0-9]{{1,5}}))?(?:/(?P<export>{_EXPORT})?)?")


def is_nbd(location: str) -> bool:
    return isinstance(location, str) and location.startswith(PREFIXES)


@dataclass(frozen=True)
class NbdLocation:
    """A parsed NBD URI: a unix socket or a TCP server, and an export name."""

    export: str
    socket: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    @classmethod
    def parse(cls, location: str) -> NbdLocation:
        """:raise UsageError: not one of the two URI forms, a relative socket path,
        a port outside 1..65535."""
        m = _UNIX.fullmatch(location)
        if m is not None:
            if "/../" in m["socket"] + "/":
                raise UsageError(f"bad NBD location {location!r}: the socket path holds '..'")
            return cls(m["export"] or "", socket=m["socket"])
        m = _TCP.fullmatch(location)
        if m is not None:
            port = int(m["port"]) if m["port"] else DEFAULT_PORT
            if not 0 < port < 65536:
                raise UsageError(f"bad NBD location {location!r}: port {port} is not 1..65535")
            return cls(m["export"] or "", host=m["host"], port=port)
        raise UsageError(f"bad NBD location {location!r}: expected {USAGE_HINT}")

    def node(self) -> dict[str, object]:
        """The ``nbd`` blockdev node."""
        server: dict[str, object] = (
            {"type": "unix", "path": self.socket} if self.socket is not None else
            {"type": "inet", "host": (self.host or "").strip("[]"), "port": str(self.port)})
        n: dict[str, object] = {"driver": "nbd", "server": server}
        if self.export:
            n["export"] = self.export
        return n

    def same_export(self, node: object) -> bool:
        """Whether *node* (a ``-blockdev`` in JSON, parsed) is an ``nbd`` node of this
        export on this server."""
        if not isinstance(node, dict) or node.get("driver") != "nbd":
            return False
        server = node.get("server")
        if not isinstance(server, dict) or (node.get("export") or "") != self.export:
            return False
        if self.socket is not None:
            path = server.get("path")
            return (server.get("type") == "unix" and isinstance(path, str)
                    and os.path.realpath(path) == os.path.realpath(self.socket))
        return (server.get("type") == "inet" and str(server.get("port")) == str(self.port)
                and str(server.get("host")) == (self.host or "").strip("[]"))

    def server(self) -> str:
        """The server, in words: ``the NBD server on socket PATH`` or ``... at HOST:PORT``."""
        if self.socket is not None:
            return f"the NBD server on socket {self.socket}"
        return f"the NBD server at {self.host}:{self.port}"

    def uri(self) -> str:
        """The location as a URI (what ``qemu-img`` takes)."""
        if self.socket is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        return f"nbd://{self.host}:{self.port}/{self.export}"


def lock_dir() -> str:
    """Where nvmgr's per-location lock files for NBD exports live on this host."""
    return f"/run/lock/nvmgr-nbd-{os.getuid()}"


def _lock(loc: NbdLocation, *, writable: bool, wait: float, location: str) -> int:
    return lock_location(lock_dir(), hashlib.sha256(loc.uri().encode()).hexdigest()[:32],
                         writable=writable, wait=wait, location=location)


def nbd_exists(location: str) -> bool:
    """Whether the server serves the export (``qemu-img info`` through QEMU's nbd driver).

    :raise ExternalError: the server cannot be asked (refused, no such socket).
    """
    loc = NbdLocation.parse(location)
    res = qemu.run(qemu.QEMU_IMG, ["info", "-U", "-f", "raw", loc.uri()], image=location)
    if res.returncode != 0 and _no_export(res.stderr):
        return False
    try:
        qemu.check(res, "qemu-img info", image=location)
    except ExternalError as e:
        raise _unreachable(loc, location, e) from e
    return True


def _unreachable(loc: NbdLocation, location: str, e: ExternalError) -> ExternalError:
    """*e* (QEMU's NBD client failed), saying first that the server cannot be reached
    when that is what QEMU said; as it is otherwise."""
    low = e.detail.lower()
    if "failed to connect" not in low and "connection refused" not in low:
        return e
    return ExternalError(f"cannot reach {loc.server()} (is it running, and may this user "
                         "connect?)", detail=e.detail, image=location)


#: Bytes read at a time when telling whether an export is blank.
BLANK_CHUNK = 4 << 20


def _no_export(stderr: str) -> bool:
    low = stderr.lower()
    return "export" in low and ("unknown" in low or "not available" in low
                                or "not present" in low)


class NbdContainer(LocationContainer):
    """An nvmgr image on an NBD export, through a private ``qemu-storage-daemon``.

    :param path: the NBD URI.
    :raise UsageError: a bad location.
    :raise NotFoundError: the server has no such export.
    :raise BusyError: another nvmgr on this host holds it.
    :raise ExternalError: the server cannot be reached, or refused the connection.
    """

    fmt = "nbd"
    location: NbdLocation

    @staticmethod
    def _parse(path: str) -> NbdLocation:
        return NbdLocation.parse(path)

    @classmethod
    def _lock(cls, path: str, *, writable: bool, wait: float) -> int:
        return _lock(NbdLocation.parse(path), writable=writable, wait=wait, location=path)

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> NbdContainer:
        """Open a *blank* export (every byte zero) of at least *size* bytes for a new
        image.  An NBD server makes its exports; nvmgr writes a new image only into
        one that holds nothing, never over data (an image, a file system, anything).

        :raise UsageError: the export holds data.
        :raise NoSpaceError: the export is smaller than *size*.
        :raise NotFoundError: the server has no such export.
        :raise BusyError: another nvmgr on this host holds it.
        :raise ExternalError: the server cannot be reached.
        """
        c = cls(path, writable=True, wait=wait)
        try:
            have = c.size()
            if have < size:
                raise NoSpaceError(f"the NBD export holds {have:,} bytes, the new image "
                                   f"needs {size:,}: make the served file larger",
                                   image=path)
            if not c.blank():
                raise UsageError(
                    "the NBD export holds data that is not an nvmgr image: nvmgr writes a "
                    "new image only into a blank export (all zeros, as a new file the "
                    "server serves is), never over data", image=path)
        except BaseException:
            c.close()
            raise
        return c

    def blank(self) -> bool:
        """Whether every byte of the export is zero (read up to the first that is not;
        the first header copy's room first, where an image or a file system starts)."""
        size, off, n = self.size(), 0, 64 << 10
        while off < size:
            chunk = self.read(off, min(n, size - off))
            if chunk.count(0) != len(chunk):
                return False
            off, n = off + len(chunk), BLANK_CHUNK
        return True

    def _open_locked(self) -> None:
        try:
            export = FuseExport(self._abs, driver="raw", writable=self.writable,
                                pass_fds=(self._lock_fd,), image=self.path,
                                protocol=self.location.node(), nbd=not self.writable)
        except ExternalError as e:
            if _no_export(str(e)):
                raise NotFoundError(f"the NBD server has no export {self.location.export!r}",
                                    image=self.path) from e
            raise _unreachable(self.location, self.path, e) from e
        self._export = export
        self._open_export(export)

    def running_holder(self) -> str | None:
        """A QEMU on this host whose command line opens this export (a running VM's).

        NBD has no lock a client could ask about (the server decides who may
        connect), so this is what can be told here: a ``qemu-system-*`` process
        with an ``nbd`` ``-blockdev`` of this server and export, as nvmgr's own
        QEMU arguments give a domain.  A QEMU on another host is not seen; the
        in-use mark the prepare hook sets covers that one.
        """
        pids = qemu_users(self.location)
        if not pids:
            return None
        return (f"a running QEMU (pid {', '.join(map(str, pids))}) on this host has the NBD "
                "export open")

    def resize(self, size: int) -> None:
        """:raise UsageError: an export has the size its server gives it."""
        if size == self.size():
            return
        raise UsageError(f"an NBD export cannot be grown by nvmgr ({self.size()} bytes); "
                         "grow it on the server, or convert the image to a file", image=self.path)


def export_blank(location: str, *, wait: float = 0) -> bool:
    """Whether the export at *location* is blank (:meth:`NbdContainer.blank`): a new
    image may be written into it.

    :raise NotFoundError: the server has no such export.
    :raise ExternalError: the server cannot be reached.
    """
    c = NbdContainer(location, wait=wait)
    try:
        return c.blank()
    finally:
        c.close()


def blank_out(location: str, length: int) -> None:
    """Write zeros over the first *length* bytes of the export (both header copies
    first): a new image that must not stay (its domain was refused) taken back out,
    leaving the export blank as it was given.

    :raise NvmgrError: the export cannot be opened or written.
    """
    with NbdContainer(location, writable=True) as c:
        length = min(length, c.size())
        for off in range(0, length, BLANK_CHUNK):
            c.write(off, bytes(min(BLANK_CHUNK, length - off)))
        c.flush()


#: Where :func:`qemu_users` looks for processes (a test may point it elsewhere).
PROC = "/proc"


def qemu_users(loc: NbdLocation) -> list[int]:
    """The pids of ``qemu-system-*`` processes on this host whose command line has an
    ``nbd`` ``-blockdev`` (JSON) of *loc*'s server and export."""
    pids = []
    try:
        entries = os.listdir(PROC)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(PROC, entry, "comm"), "rb") as f:
                if not f.read(64).startswith(b"qemu-system"):
                    continue
            with open(os.path.join(PROC, entry, "cmdline"), "rb") as f:
                args = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for arg in args:
            if arg.startswith(b"{") and b'"nbd"' in arg:
                try:
                    node = json.loads(arg)
                except ValueError:
                    continue
                if loc.same_export(node):
                    pids.append(int(entry))
                    break
    return sorted(pids)
