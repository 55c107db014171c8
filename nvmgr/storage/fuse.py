"""An image exported as one regular file by a private ``qemu-storage-daemon``
FUSE export, and the clean-up of exports that a killed nvmgr left behind.

:class:`FuseExport` starts the daemon (through :mod:`nvmgr.storage.qemu`)
with the image's file node, its format node and
``--export type=fuse,mountpoint=M``, where *M* is an empty regular file in
nvmgr's private runtime directory.  Once the export is up, *M* reads and
writes as the image's guest-visible bytes, fsync on it flushes the format
driver and the image file (QEMU's FUSE ``fsync`` and ``flush`` operations
call ``blk_flush``), and ftruncate on it resizes the image.

The runtime directory, ``nvmgr-fuse-UID`` under ``$XDG_RUNTIME_DIR`` (else
the temp directory), is mode 0700 and must belong to the user.  Each export
owns two or three names in it::

    ID.lock   flock'd for the export's whole life, by nvmgr and by its daemon
    ID        the mountpoint
    ID.nbd    the daemon's NBD socket, when it has one (``nbd=True``: a network
              image's large reads, :mod:`nvmgr.storage.nbdread`)

Liveness is that lock: a ``.lock`` nobody holds belongs to an export whose
nvmgr and daemon are both gone.  Every start first sweeps such leftovers --
while holding the directory's own flock, which starts also take, so a sweep
never sees an export half set up: a mountpoint still mounted (a daemon killed
by SIGKILL leaves a dead FUSE mount: "Transport endpoint is not connected")
is detached lazily, then both names are removed.  A dead mount is never
``stat``-ed (that would ask the dead file system); ``unlink`` failing with
EBUSY is what tells a mountpoint still mounted.

Readiness: before the daemon starts, nvmgr opens ``/proc/self/mountinfo``,
which reports every change of the mount table to ``poll`` (POLLPRI), and a
pidfd of the daemon, readable when it exits.  It then sleeps in ``poll`` on
both until the mountpoint shows up in mountinfo as a FUSE mount, the daemon
exits (its stderr, an anonymous file, says why) or :data:`READY_TIMEOUT`
passes.  No polling with blind sleeps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import stat
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from nvmgr.errors import ExternalError, NvmgrError
from nvmgr.storage import qemu
from nvmgr.storage.mounts import MOUNTINFO, is_fuse_mount  # noqa: F401 (is_fuse_mount: this module's too)
from nvmgr.storage.nbdread import NbdReader

if TYPE_CHECKING:  # imported where a process starts: raw images' commands never pay for it
    import subprocess

log = logging.getLogger(__name__)

#: Seconds for the daemon to open the image and mount its export.
READY_TIMEOUT = 30.0

#: Read-ahead (KiB) of an export's own backing device, set when root: FUSE
#: then asks QEMU for 1 MiB (libfuse's largest request) at a time instead of
#: the kernel's default 128 KiB, which reads a 64 MiB section ~20% faster.
READ_AHEAD_KB = 1024

#: umount2() flags from <sys/mount.h>.
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8

_LOCK_SUFFIX = ".lock"
_NBD_SUFFIX = ".nbd"
#: sizeof(sockaddr_un.sun_path) on Linux, with its terminating NUL.
_SUN_PATH_MAX = 108
#: The name of the format node's NBD export (on the slot's own socket).
NBD_EXPORT = "img0"


def _base_dir() -> str:
    """Where the runtime directory goes: $XDG_RUNTIME_DIR, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return xdg
    import tempfile

    return tempfile.gettempdir()


def runtime_dir() -> str:
    """nvmgr's private runtime directory for mountpoints: created 0700, checked ours.

    :return: its real path (the form /proc/self/mountinfo shows).
    :raise ExternalError: it exists but is not a directory of ours, mode 0700.
    """
    uid = os.geteuid()
    d = os.path.join(os.path.realpath(_base_dir()), f"nvmgr-fuse-{uid}")
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ExternalError(f"cannot create {d}: {e.strerror or e}") from e
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or stat.S_IMODE(st.st_mode) != 0o700:
        raise ExternalError(
            f"{d} must be a directory of uid {uid} with mode 0700 (remove it and retry)"
        )
    return d


def set_readahead(st_dev: int, kib: int = READ_AHEAD_KB) -> bool:
    """Set the read-ahead of the FUSE mount whose ``st_dev`` is *st_dev*; best effort.

    Only root may write ``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb``; the
    device is the export's own (anonymous, gone with the mount).

    :return: whether it was set.
    """
    if os.geteuid() != 0:
        return False
    bdi = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
    try:
        with open(bdi, "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.debug("cannot set %s: %s", bdi, e)
        return False
    return True


def detach(path: str) -> None:
    """Lazily unmount *path* (``MNT_DETACH``): root by umount2, others by fusermount3.

    :raise ExternalError: the unmount failed.
    """
    if os.geteuid() != 0:
        qemu.fusermount_unmount(path)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: not (or no longer) a mount point
            raise ExternalError(f"cannot unmount {path}: {os.strerror(err)}")


def remove_mountpoint(path: str) -> None:
    """Remove the mountpoint file *path*, detaching a mount still on it first."""
    try:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
    log.warning("detaching a dead FUSE export at %s", path)
    detach(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep(d: str) -> list[str]:
    """Remove the leftovers of dead exports from the runtime directory *d*.

    Call with *d*'s own flock held.  Best effort: a leftover that cannot be
    removed is logged and left for the next sweep.

    :return: the mountpoints removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(d)
    except OSError as e:
        log.warning("cannot list %s: %s", d, e)
        return removed
    locks = {n for n in names if n.endswith(_LOCK_SUFFIX)}
    for n in sorted(locks):
        lock_path = os.path.join(d, n)
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live export
            mountpoint = lock_path[: -len(_LOCK_SUFFIX)]
            remove_mountpoint(mountpoint)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mountpoint + _NBD_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            removed.append(mountpoint)
        except (OSError, NvmgrError) as e:
            log.warning("cannot clean up %s: %s", lock_path, e)
        finally:
            os.close(fd)
    for n in names:  # a mountpoint (or socket) whose .lock is gone: its export is dead
        stem = n.removesuffix(_NBD_SUFFIX)
        if n.endswith(_LOCK_SUFFIX) or stem + _LOCK_SUFFIX in locks:
            continue
        try:
            if stem != n:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(d, n))
                continue
            remove_mountpoint(os.path.join(d, n))
            removed.append(os.path.join(d, n))
        except (OSError, NvmgrError) as e:
            log.warning("cannot clean up %s: %s", os.path.join(d, n), e)
    return removed


class _Slot:
    """An export's two names in the runtime directory, locked (see the module doc)."""

    def __init__(self) -> None:
        d = runtime_dir()
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
            sweep(d)
            while True:
                name = os.urandom(8).hex()
                try:
                    self.lock_fd = os.open(
                        os.path.join(d, name + _LOCK_SUFFIX),
                        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        0o600,
                    )
                    break
                except FileExistsError:
                    continue
            self.mountpoint = os.path.join(d, name)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.close(os.open(self.mountpoint, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except BaseException:
                self.release()
                raise
        except OSError as e:
            raise ExternalError(f"cannot set up a mountpoint in {d}: {e.strerror or e}") from e
        finally:
            os.close(dfd)

    def release(self) -> None:
        """Remove both names (detaching a dead mount) and drop the lock."""
        fd, self.lock_fd = self.lock_fd, -1
        if fd < 0:
            return
        try:
            remove_mountpoint(self.mountpoint)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.mountpoint + _NBD_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.mountpoint + _LOCK_SUFFIX)
        except (OSError, NvmgrError) as e:
            # Unlocked below: the next export's sweep retries.
            log.warning("cannot remove the mountpoint %s: %s", self.mountpoint, e)
        finally:
            os.close(fd)


class _MountWatch:
    """Sleep until a path is mounted or a process exits (see the module doc)."""

    def __init__(self) -> None:
        self._mountinfo = os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        self._pidfd = -1
        self._poll = select.poll()
        self._poll.register(self._mountinfo, select.POLLPRI)

    def watch(self, pid: int) -> None:
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Linux < 5.3: fall back to short naps
            return
        self._poll.register(self._pidfd, select.POLLIN)

    def wait(self, mountpoint: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
        """True once *mountpoint* is a FUSE mount; False if *proc* exited or time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            if is_fuse_mount(mountpoint):
                return True
            if proc.poll() is not None:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            nap = left if self._pidfd >= 0 else min(left, 0.01)
            self._poll.poll(max(1, int(nap * 1000)))

    def close(self) -> None:
        for fd in (self._mountinfo, self._pidfd):
            if fd >= 0:
                os.close(fd)
        self._mountinfo = self._pidfd = -1


class FuseExport:
    """A private ``qemu-storage-daemon`` exporting one image as the file :attr:`mountpoint`.

    :param image_path: the image file (absolute, so QEMU never reads a
        ``proto:`` prefix in it).
    :param driver: its format driver (``qcow2``).
    :param writable: a writable export (else read-only, with ``force-share``
        so that an image a running VM holds can be read).
    :param pass_fds: descriptors the daemon inherits (nvmgr's flock'd fd of
        the image: the nvmgr lock then lasts until nvmgr *and* its daemon
        are gone).
    :param image: the image's name in errors.
    :param nbd: also export the format node read-only over NBD, on the unix
        socket :attr:`nbd_socket` (export :data:`NBD_EXPORT`): several reads in
        flight, where the FUSE file serves one at a time (:meth:`reader`).
    :raise BusyError: a running QEMU holds a conflicting image lock.
    :raise CorruptError: the format driver refused the file.
    :raise ExternalError: the daemon is missing, failed, could not mount its
        export, or was not ready within :data:`READY_TIMEOUT` s.
    """

    def __init__(
        self,
        image_path: str,
        *,
        driver: str,
        writable: bool,
        pass_fds: Sequence[int] = (),
        image: str,
        protocol: dict[str, object] | None = None,
        objects: Sequence[str] = (),
        nbd: bool = False,
    ) -> None:
        self.image = image
        self.driver = driver
        #: The protocol node instead of a ``file`` node (an ``rbd`` node, say).
        self.protocol = protocol
        #: ``--object`` arguments the nodes refer to (a ``secret`` for a cephx key).
        self.objects = tuple(objects)
        self._proc: subprocess.Popen[bytes] | None = None
        #: Seconds from starting the daemon to a mounted export.
        self.start_latency = 0.0
        self._slot = _Slot()
        self.mountpoint = self._slot.mountpoint
        #: The NBD socket (``nbd=True``), else None; None too where its path is
        #: longer than a unix socket's may be (a deep $XDG_RUNTIME_DIR): the FUSE
        #: file then serves every read.
        sock = self.mountpoint + _NBD_SUFFIX
        self.nbd_socket = sock if nbd and len(os.fsencode(sock)) < _SUN_PATH_MAX else None
        try:
            self._start(image_path, writable, tuple(pass_fds))
        except BaseException:
            self.close()
            raise

    def _args(self, image_path: str, writable: bool) -> tuple[list[str], str]:
        file_node: dict[str, object] = (
            {**self.protocol, "node-name": "file0"} if self.protocol is not None
            else {"driver": "file", "node-name": "file0", "filename": image_path})
        fmt_node: dict[str, object] = {
            "driver": self.driver,
            "node-name": "img0",
            "file": "file0",
        }
        if self.driver == "qcow2":
            fmt_node["backing"] = None  # never follow a backing file named in the image
        if not writable:
            for node in (file_node, fmt_node):
                node["read-only"] = True
                if node is fmt_node or self.protocol is None:  # rbd has no image locks
                    node["force-share"] = True
        export = {
            "type": "fuse",
            "id": "exp0",
            "node-name": "img0",
            "mountpoint": self.mountpoint,
            "writable": writable,
        }
        fmt_arg = json.dumps(fmt_node)
        args = [
            *(x for o in self.objects for x in ("--object", o)),
            "--blockdev", json.dumps(file_node),
            "--blockdev", fmt_arg,
        ]
        if self.nbd_socket is not None:
            # Set up before the FUSE export: once the mount shows, the socket listens.
            args += ["--nbd-server", json.dumps(
                        {"addr": {"type": "unix", "path": self.nbd_socket}}),
                     "--export", json.dumps({"type": "nbd", "id": "nbd0", "node-name": "img0",
                                             "name": NBD_EXPORT, "writable": False})]
        args += ["--export", json.dumps(export)]
        return args, fmt_arg

    def _start(self, image_path: str, writable: bool, pass_fds: tuple[int, ...]) -> None:
        import tempfile

        args, fmt_arg = self._args(image_path, writable)
        watch = _MountWatch()
        try:
            # Anonymous (O_TMPFILE or unlinked at once): the daemon's stderr.
            with tempfile.TemporaryFile() as log_file:
                t0 = time.monotonic()
                self._proc = qemu.start_storage_daemon(
                    args,
                    pass_fds=(self._slot.lock_fd, *pass_fds),
                    log=log_file,
                    image=self.image,
                )
                watch.watch(self._proc.pid)
                if not watch.wait(self.mountpoint, self._proc, READY_TIMEOUT):
                    raise self._failure(log_file, fmt_arg)
                self.start_latency = time.monotonic() - t0
        finally:
            watch.close()

    def _failure(self, log_file: IO[bytes], fmt_arg: str) -> NvmgrError:
        """The error for a daemon that did not get its export up; stops it."""
        proc = self._proc
        status = proc.poll() if proc is not None else None
        if proc is not None and status is None:
            qemu.stop_daemon(proc, timeout=5.0)  # hung: its words so far explain it
        try:
            log_file.seek(0)
            stderr = log_file.read(1 << 16).decode("utf-8", "replace")
        except OSError:
            stderr = ""
        return qemu.daemon_error(
            stderr, status, image=self.image, format_arg=fmt_arg, fmt=self.driver
        )

    def reader(self) -> NbdReader:
        """A new connection to the daemon's NBD export (``nbd=True`` only).

        :raise ExternalError: the daemon does not answer on it.
        """
        if self.nbd_socket is None:
            raise ValueError("this export has no NBD socket")
        return NbdReader(self.nbd_socket, NBD_EXPORT, image=self.image)

    @property
    def pid(self) -> int | None:
        """The daemon's pid (None once stopped)."""
        return self._proc.pid if self._proc is not None else None

    def exit_status(self) -> int | None:
        """The daemon's exit status if it has exited, else None."""
        return self._proc.poll() if self._proc is not None else None

    def close(self) -> None:
        """Stop the daemon (SIGTERM: it flushes, closes the image, unmounts), reap
        it, remove the mountpoint (detaching it if the daemon died without
        unmounting) and release the slot.  Idempotent."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                qemu.stop_daemon(proc)
        finally:
            self._slot.release()
