"""QCOW2 containers, through QEMU's own qcow2 code.

:class:`Qcow2Container` never parses qcow2 itself: it starts a private
``qemu-storage-daemon`` that opens the image (``file`` node + ``qcow2``
node) and exports it over NBD on a private unix socket, then talks to it
with :class:`nvmgr.storage.nbd.NBDClient`.  Every write, flush and allocation is
therefore done by QEMU exactly as a VM would do it.

Start-up (about 5 ms to a finished handshake): nvmgr binds the listening
socket itself in a fresh 0700 directory (under ``$XDG_RUNTIME_DIR``, else the
temp dir), connects to it at once (the kernel queues the connection), removes
the socket path and directory again, and only then starts the daemon with the
listener as an inherited fd (``--nbd-server addr.type=fd``).  There is no
polling for a socket to appear and nothing on disk to leak; the daemon
answers the queued handshake as soon as its main loop runs.  If it fails
instead (bad image, a running QEMU holding the lock), it exits, the
connection is reset, and its stderr (an anonymous temp file) explains why.

The daemon is nvmgr's child, in its process group, holding nvmgr's flock'd fd
and (when util-linux ``setpriv`` is installed) with SIGTERM as its parent-death
signal: :meth:`Qcow2Container.close` stops and reaps it, and a killed nvmgr
takes its daemon with it.  SIGTERM makes the daemon close the image cleanly.

Locking, in order:

1. ``flock`` on an fd of the image (:func:`nvmgr.storage.container.lock_file`):
   shared for readers, exclusive for writers, against other nvmgr processes.
2. QEMU's own OFD byte-range image locks, taken by the daemon: a writable open
   fails while a running VM holds the image, and is reported as
   :class:`BusyError`.  Read-only opens use ``force-share=on`` so they can
   read an image that a running VM has open.

Resizing stops the daemon, runs ``qemu-img resize`` and starts the daemon
again (simpler than QMP ``block_resize``: no monitor protocol to speak, and
restarting costs about as much as one QMP round trip plus its set-up).

The offline snapshot functions (:func:`snapshot_create`, :func:`snapshot_list`,
:func:`snapshot_apply`, :func:`snapshot_delete`) use ``qemu-img snapshot``
and require that neither nvmgr nor QEMU has the image open.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

from nvmgr.errors import (
    BusyError,
    CorruptError,
    ExternalError,
    NoSpaceError,
    NotFoundError,
    UsageError,
)
from nvmgr.storage.container import QCOW2_MAGIC, Container, lock_file, probe_format
from nvmgr.storage.nbd import NBDClient

QEMU_IMG = "qemu-img"
QEMU_STORAGE_DAEMON = "qemu-storage-daemon"

#: The export name; the daemon serves exactly one export on a private socket.
EXPORT_NAME = "nvmgr"

#: qcow2 virtual sizes are whole 512-byte sectors.
SECTOR = 512

#: Seconds to wait for a SIGTERMed daemon (it closes the image cleanly,
#: flushing qcow2 metadata) before SIGKILL.
STOP_TIMEOUT = 30.0

#: Seconds to wait for a daemon that broke off the handshake to exit.
_FAILED_EXIT_TIMEOUT = 5.0

#: Seconds for the NBD handshake and each request.
NBD_TIMEOUT = 120.0

#: Longest unix socket path (sun_path is 108 bytes with the NUL).
_SUN_PATH_MAX = 107

#: What QEMU prints when another process holds a conflicting image lock.
_LOCK_FAILURE = ("Failed to get ", " lock")

MAX_SNAPSHOT_NAME = 64


def _abspath(path: str) -> str:
    """An absolute path, so that QEMU never reads a ``proto:`` prefix in it."""
    return os.path.abspath(path)


def _json_target(path: str) -> str:
    """A ``json:`` filename pinning the qcow2 driver, for commands without ``-f``.

    ``qemu-img snapshot`` has no ``-f``; this keeps QEMU from probing the format
    and from opening any backing file named in the image.
    """
    spec = {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": _abspath(path)},
    }
    return "json:" + json.dumps(spec)


def _qcow2_rejection(stderr: str) -> str | None:
    """QEMU's words when its qcow2 driver refused the file (the qcow2 --blockdev failed)."""
    for line in stderr.splitlines():
        if '"driver": "qcow2"' in line and "--blockdev" in line:
            return line.split("}: ", 1)[-1].strip()
    return None


def _lock_failure(stderr: str) -> str | None:
    """The line of QEMU's *stderr* that reports an image-lock conflict, if any."""
    start, end = _LOCK_FAILURE
    for line in stderr.splitlines():
        at = line.find(start)
        if at >= 0 and end in line[at:]:
            return line[at:].strip()
    return None


def _run(tool: str, args: list[str], path: str) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool, returning its result whatever its exit status.

    :raise ExternalError: the tool is not installed or could not be run.
    """
    try:
        return subprocess.run(
            [tool, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except FileNotFoundError:
        raise ExternalError(f"{tool} is not installed (QEMU tools are needed for qcow2)") from None
    except OSError as e:
        raise ExternalError(f"cannot run {tool}: {e.strerror or e}", image=path) from None


def _check_result(
    res: subprocess.CompletedProcess[str], what: str, path: str
) -> subprocess.CompletedProcess[str]:
    """Raise for a failed qemu-img run; return *res* otherwise.

    :raise BusyError: QEMU reported an image-lock conflict.
    :raise ExternalError: any other failure.
    """
    if res.returncode == 0:
        return res
    lock = _lock_failure(res.stderr)
    if lock is not None:
        raise BusyError(f"image is in use by a running QEMU: {lock}", image=path)
    raise ExternalError(f"{what} failed (exit {res.returncode})", detail=res.stderr, image=path)


def _check_size(size: int, path: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UsageError(f"bad image size {size!r}", image=path)
    if size % SECTOR:
        raise UsageError(
            f"a qcow2 image size must be a multiple of {SECTOR} bytes, not {size}", image=path
        )


def _runtime_dir() -> str:
    """Where the private socket directory goes: $XDG_RUNTIME_DIR, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return xdg
    return tempfile.gettempdir()


def _private_dir() -> str:
    """A fresh 0700 directory short enough to hold a unix socket path."""
    for base in (_runtime_dir(), "/tmp"):
        # mkdtemp creates the directory with mode 0700.
        d = tempfile.mkdtemp(prefix="nvmgr-qsd-", dir=base)
        if len(os.path.join(d, "nbd.sock").encode()) <= _SUN_PATH_MAX:
            return d
        os.rmdir(d)
    raise ExternalError("no directory with a short enough path for a unix socket")


class Qcow2Container(Container):
    """A qcow2 image read and written through a private ``qemu-storage-daemon``.

    :param path: the image file.
    :param writable: open for writing (exclusive flock, writable export).
    :param wait: seconds to wait for another nvmgr process to release the
        image (0: fail at once).
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* cannot be opened or is not a qcow2 image.
    :raise BusyError: another nvmgr holds the image (past *wait*), or a running
        QEMU holds it with a conflicting lock.
    :raise ExternalError: ``qemu-storage-daemon`` failed to start or serve.
    """

    fmt = "qcow2"

    def __init__(self, path: str, *, writable: bool = False, wait: float = 0) -> None:
        self._init_state(path, writable)
        try:
            flags = os.O_RDWR if writable else os.O_RDONLY
            try:
                self._fd = os.open(path, flags | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NotFoundError(f"no such image: {path}", image=path) from None
            except IsADirectoryError:
                raise UsageError(f"{path} is a directory, not an image", image=path) from None
            except PermissionError as e:
                raise UsageError(f"cannot open {path}: {e.strerror}", image=path) from None
            lock_file(self._fd, path, writable, wait)
            self._open_locked()
        except BaseException:
            self.close()
            raise

    def _init_state(self, path: str, writable: bool) -> None:
        self.path = path
        self.writable = writable
        self._abs = _abspath(path)
        self._fd = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._nbd: NBDClient | None = None
        #: Seconds from spawning the daemon to a finished NBD handshake.
        self.start_latency = 0.0

    def _open_locked(self) -> None:
        """Check the magic and start the daemon; the flock is already held."""
        head = os.pread(self._fd, 4, 0)
        if head != QCOW2_MAGIC:
            raise UsageError(f"{self.path} is not a qcow2 image", image=self.path)
        self._start()

    @classmethod
    def create(cls, path: str, size: int, *, wait: float = 0) -> Qcow2Container:
        """Create a new qcow2 image of *size* bytes (mode 0600) and open it writable.

        The name is reserved with ``O_CREAT|O_EXCL`` (mode 0600) and locked before
        ``qemu-img create`` formats it, so no other process can slip in.

        :param path: the new image; must not exist.
        :param size: virtual size in bytes, a multiple of 512.
        :param wait: unused (the new file is locked at once); kept for symmetry.
        :raise UsageError: *path* exists, or *size* is not a multiple of 512.
        :raise ExternalError: ``qemu-img create`` or the daemon failed.
        """
        del wait  # nobody else can hold a file this call just created
        _check_size(size, path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UsageError(f"{path} already exists (nvmgr never overwrites an image)") from None
        except OSError as e:
            raise UsageError(f"cannot create {path}: {e.strerror}", image=path) from None
        self = cls.__new__(cls)
        self._init_state(path, True)
        self._fd = fd
        try:
            lock_file(fd, path, True, 0)
            res = _run(
                QEMU_IMG,
                ["create", "-q", "-f", "qcow2", "-o", "preallocation=off", self._abs, str(size)],
                path,
            )
            _check_result(res, "qemu-img create", path)
            self._open_locked()
        except BaseException:
            # The file is ours (O_EXCL): remove it while still holding the lock.
            self._stop()
            with contextlib.suppress(OSError):
                os.unlink(path)
            self.close()
            raise
        return self

    # -- the daemon --------------------------------------------------------

    def _daemon_args(self, listen_fd: int) -> list[str]:
        file_node: dict[str, Any] = {"driver": "file", "node-name": "file0", "filename": self._abs}
        qcow2_node: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": "img0",
            "file": "file0",
            # Never follow a backing file named inside the image.
            "backing": None,
        }
        if not self.writable:
            file_node.update({"read-only": True, "force-share": True})
            qcow2_node.update({"read-only": True, "force-share": True})
        nbd_server = {"addr": {"type": "fd", "str": str(listen_fd)}, "max-connections": 1}
        export = {
            "type": "nbd",
            "id": "exp0",
            "node-name": "img0",
            "name": EXPORT_NAME,
            "writable": self.writable,
        }
        return [
            QEMU_STORAGE_DAEMON,
            "--blockdev",
            json.dumps(file_node),
            "--blockdev",
            json.dumps(qcow2_node),
            "--nbd-server",
            json.dumps(nbd_server),
            "--export",
            json.dumps(export),
        ]

    def _start(self) -> None:
        """Start the daemon and connect to it.

        The client connects to the listening socket *before* the daemon exists
        (the kernel queues the connection), so the socket path and its private
        directory are removed again before the daemon even starts: nothing is
        left on disk whatever happens to nvmgr.

        :raise BusyError: a running QEMU holds a conflicting image lock.
        :raise ExternalError: the daemon failed; its stderr is in the message.
        """
        d = _private_dir()
        sock_path = os.path.join(d, "nbd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(sock_path)
                listener.listen(1)
                client.connect(sock_path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock_path)
                os.rmdir(d)
            # Anonymous (O_TMPFILE or unlinked at once): the daemon's stderr.
            with tempfile.TemporaryFile() as log:
                t0 = time.monotonic()
                self._spawn(listener, log)
                # Only the daemon holds the listener now: if it dies, the
                # handshake fails at once instead of hanging.
                listener.close()
                try:
                    self._nbd = NBDClient(sock_path, EXPORT_NAME, timeout=NBD_TIMEOUT, sock=client)
                except (ExternalError, OSError) as e:
                    raise self._daemon_failure(e, log) from None
                self.start_latency = time.monotonic() - t0
        except BaseException:
            client.close()
            raise
        finally:
            listener.close()
        if self._nbd.read_only == self.writable:
            raise ExternalError(
                "qemu-storage-daemon exported the image "
                + ("read-only" if self.writable else "writable"),
                image=self.path,
            )

    def _spawn(self, listener: socket.socket, log: IO[bytes]) -> None:
        """Popen the daemon with the listener and the flock'd image fd inherited.

        The daemon inherits nvmgr's locked fd of the image (an open file
        description shares its ``flock``): the nvmgr lock is then held until
        nvmgr *and* its daemon are gone, so a daemon that outlives a killed
        nvmgr for a moment never makes the next nvmgr mistake it for a VM.
        With util-linux ``setpriv``, the daemon also gets SIGTERM (a clean
        shutdown) when the thread that started it dies, even by SIGKILL; so
        use a container from a thread that outlives it.
        """
        args = self._daemon_args(listener.fileno())
        setpriv = shutil.which("setpriv")
        if setpriv:
            args = [setpriv, "--pdeathsig", "TERM", "--", *args]
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(listener.fileno(), self._fd),
                close_fds=True,
                # Deliberately in nvmgr's process group: a terminal's ^C or
                # hangup reaches the daemon too, which then shuts down cleanly.
            )
        except FileNotFoundError:
            raise ExternalError(
                f"{QEMU_STORAGE_DAEMON} is not installed (needed for qcow2 images)"
            ) from None
        except OSError as e:
            raise ExternalError(
                f"cannot start {QEMU_STORAGE_DAEMON}: {e.strerror or e}", image=self.path
            ) from None

    def _daemon_failure(self, err: Exception, log: IO[bytes]) -> Exception:
        """Reap a daemon whose export failed; turn its stderr into an error."""
        proc = self._proc
        status: int | None = None
        if proc is not None:
            try:
                status = proc.wait(timeout=_FAILED_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                status = None  # alive but not serving: _stop() kills it
        try:
            log.seek(0)
            stderr = log.read(1 << 16).decode("utf-8", "replace")
        except OSError:
            stderr = ""
        lock = _lock_failure(stderr)
        if lock is not None:
            return BusyError(f"image is in use by a running QEMU: {lock}", image=self.path)
        qcow2_said = _qcow2_rejection(stderr)
        if qcow2_said is not None:
            return CorruptError(
                f"the qcow2 container is damaged or not qcow2 at all: {qcow2_said}",
                image=self.path,
            )
        if status is not None:
            return ExternalError(
                f"{QEMU_STORAGE_DAEMON} failed (exit {status})",
                detail=stderr or str(err),
                image=self.path,
            )
        return ExternalError(
            f"{QEMU_STORAGE_DAEMON} is not serving the image", detail=str(err), image=self.path
        )

    def _stop(self) -> None:
        """Disconnect, SIGTERM the daemon (it closes the image cleanly) and reap it."""
        nbd, self._nbd = self._nbd, None
        if nbd is not None:
            nbd.close()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()

    def _client(self) -> NBDClient:
        if self._nbd is None:
            raise UsageError(f"{self.path} is closed", image=self.path)
        return self._nbd

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """Give NBD failures the image's name, and the daemon's fate if it died."""
        try:
            yield
        except ExternalError as e:
            if e.image is not None:
                raise
            status = self._proc.poll() if self._proc is not None else None
            died = (
                f" ({QEMU_STORAGE_DAEMON} exited with status {status})"
                if status is not None
                else ""
            )
            raise ExternalError(e.message + died, image=self.path) from e

    # -- Container -----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read *length* bytes at *offset*; past the end reads as zeros (as raw).

        :raise UsageError: negative offset or length, or the container is closed.
        :raise ExternalError: the daemon failed the read.
        """
        nbd = self._client()
        if offset < 0 or length < 0:
            raise UsageError(f"bad read of {length} bytes at {offset}", image=self.path)
        inside = max(0, min(length, nbd.size - offset))
        with self._io():
            data = nbd.read(offset, inside) if inside else b""
        if inside < length:
            data += bytes(length - inside)
        return data

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write *data* at *offset* (calls the fault hook first).

        :raise UsageError: read-only container, negative offset, or closed.
        :raise NoSpaceError: the write ends past the image's size (qcow2 does
            not grow on write; :meth:`resize` first).
        :raise ExternalError: the daemon failed the write.
        """
        n = memoryview(data).nbytes
        self._fault("write", offset, n)
        nbd = self._client()
        if not self.writable:
            raise UsageError(f"{self.path} is open read-only", image=self.path)
        if offset < 0:
            raise UsageError(f"bad write offset {offset}", image=self.path)
        if offset + n > nbd.size:
            raise NoSpaceError(
                f"write of {n} bytes at {offset} ends past the image's {nbd.size} bytes",
                image=self.path,
            )
        with self._io():
            nbd.write(offset, data)

    def flush(self) -> None:
        """Make all writes durable: NBD flush, i.e. qcow2 metadata and data fsynced by QEMU.

        :raise ExternalError: the daemon failed the flush.
        """
        self._fault("flush", 0, 0)
        nbd = self._client()
        with self._io():
            nbd.flush()

    def size(self) -> int:
        """The image's virtual (guest-visible) size in bytes."""
        return self._client().size

    def resize(self, size: int) -> None:
        """Grow the image to *size* bytes; new space reads as zeros.

        Stops the daemon (which flushes), runs ``qemu-img resize`` and starts the
        daemon again; the flock is held throughout.

        :param size: the new virtual size, a multiple of 512, not smaller.
        :raise UsageError: read-only, shrinking, or a bad size.
        :raise BusyError: a running QEMU grabbed the image meanwhile.
        :raise ExternalError: ``qemu-img`` or the daemon failed.
        """
        current = self._client().size
        if not self.writable:
            raise UsageError(f"{self.path} is open read-only", image=self.path)
        _check_size(size, self.path)
        if size < current:
            raise UsageError(
                f"cannot shrink a qcow2 image ({current} -> {size} bytes)", image=self.path
            )
        self._fault("write", size, 0)
        if size == current:
            return
        self._stop()
        try:
            res = _run(QEMU_IMG, ["resize", "-q", "-f", "qcow2", self._abs, str(size)], self.path)
            try:
                _check_result(res, "qemu-img resize", self.path)
            finally:
                self._start()
        except BaseException:
            if self._nbd is None:
                self._stop()  # a daemon that started but did not serve
            raise

    def close(self) -> None:
        """Disconnect, stop the daemon (waiting for it), release the flock.

        Idempotent; safe on a half-initialised container.
        """
        try:
            self._stop()
        finally:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)  # releases the flock, after the daemon is gone

    def __enter__(self) -> Qcow2Container:
        return self

    def __del__(self) -> None:
        # Last resort against a leaked daemon when close() was never called.
        with contextlib.suppress(Exception):
            if getattr(self, "_proc", None) is not None or getattr(self, "_fd", -1) >= 0:
                self.close()


# -- offline tools -------------------------------------------------------------


def qemu_img_info(path: str, *, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json`` of *path*, with ``-U`` (force-share).

    Works while a VM has the image open (the result may then be slightly stale).

    :param path: the image.
    :param fmt: ``raw`` or ``qcow2``; probed from the magic when None (never by QEMU).
    :raise NotFoundError: *path* does not exist.
    :raise ExternalError: ``qemu-img`` failed or printed no JSON object.
    """
    fmt = fmt or probe_format(path)
    if not os.path.exists(path):
        raise NotFoundError(f"no such image: {path}", image=path)
    res = _check_result(
        _run(QEMU_IMG, ["info", "--output=json", "-U", "-f", fmt, _abspath(path)], path),
        "qemu-img info",
        path,
    )
    try:
        info = json.loads(res.stdout)
    except ValueError as e:
        raise ExternalError("qemu-img info printed bad JSON", detail=str(e), image=path) from None
    if not isinstance(info, dict):
        raise ExternalError("qemu-img info printed no JSON object", image=path)
    return info


def check_snapshot_name(name: str) -> None:
    """Validate a snapshot name: 1-64 printable characters, not starting with ``-``.

    :raise UsageError: the name is not acceptable.
    """
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_SNAPSHOT_NAME
        or not name.isprintable()
        or name.startswith("-")
        or name != name.strip()
    ):
        raise UsageError(
            f"bad snapshot name {name!r}: 1-{MAX_SNAPSHOT_NAME} printable characters, "
            "no leading '-' or surrounding spaces"
        )


@contextlib.contextmanager
def _offline(path: str, exclusive: bool, wait: float) -> Iterator[None]:
    """Hold nvmgr's flock on *path* while qemu-img works on it."""
    if probe_format(path) != "qcow2":
        raise UsageError(f"{path} is not a qcow2 image (snapshots need qcow2)", image=path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"no such image: {path}", image=path) from None
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror}", image=path) from None
    try:
        lock_file(fd, path, exclusive, wait)
        yield
    finally:
        os.close(fd)


def snapshot_list(path: str, *, wait: float = 0) -> list[dict[str, Any]]:
    """The internal snapshots of a qcow2 image, oldest first.

    Each entry is QEMU's own record: ``id``, ``name``, ``vm-state-size``,
    ``date-sec``, ``date-nsec``, ``vm-clock-sec``, ``vm-clock-nsec`` (and
    ``icount`` on newer QEMU).

    :param path: the image.
    :param wait: seconds to wait for an nvmgr writer to release the image.
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: not a qcow2 image.
    :raise BusyError: an nvmgr writer holds the image.
    :raise ExternalError: ``qemu-img`` failed.
    """
    with _offline(path, False, wait):
        snaps = qemu_img_info(path, fmt="qcow2").get("snapshots", [])
    if not isinstance(snaps, list):
        raise ExternalError("qemu-img info: 'snapshots' is not a list", image=path)
    return [s for s in snaps if isinstance(s, dict)]


def _snapshot_id(path: str, name: str) -> str:
    """The id of the one snapshot called *name*.

    QEMU allows several snapshots of one name, and ``qemu-img snapshot -a``
    looks its argument up as an *id* before trying names; resolving the name
    here (and refusing duplicates) makes every operation hit exactly one
    snapshot.

    :raise NotFoundError: no snapshot has that name.
    :raise UsageError: several snapshots have that name.
    """
    matches = [
        s for s in qemu_img_info(path, fmt="qcow2").get("snapshots", []) if s.get("name") == name
    ]
    if not matches:
        raise NotFoundError(f"no snapshot named {name!r}", image=path)
    if len(matches) > 1:
        ids = ", ".join(str(s.get("id")) for s in matches)
        raise UsageError(f"{len(matches)} snapshots are named {name!r} (ids {ids})", image=path)
    return str(matches[0]["id"])


def snapshot_create(path: str, name: str, *, wait: float = 0) -> None:
    """Take an internal snapshot called *name* of an image nobody has open.

    :param path: the qcow2 image.
    :param name: the new snapshot's name (see :func:`check_snapshot_name`).
    :param wait: seconds to wait for another nvmgr process to release the image.
    :raise UsageError: bad name, a snapshot of that name exists, not qcow2.
    :raise NotFoundError: *path* does not exist.
    :raise BusyError: nvmgr or a running QEMU has the image open.
    :raise ExternalError: ``qemu-img snapshot`` failed.
    """
    check_snapshot_name(name)
    with _offline(path, True, wait):
        for s in qemu_img_info(path, fmt="qcow2").get("snapshots", []):
            if s.get("name") == name:
                raise UsageError(f"a snapshot named {name!r} already exists", image=path)
        _check_result(
            _run(QEMU_IMG, ["snapshot", "-q", "-c", name, _json_target(path)], path),
            f"qemu-img snapshot -c {name!r}",
            path,
        )


def snapshot_apply(path: str, name: str, *, wait: float = 0) -> None:
    """Revert an image nobody has open to its snapshot *name*.

    :raise UsageError: bad name, the name is ambiguous, not qcow2.
    :raise NotFoundError: no such image or snapshot.
    :raise BusyError: nvmgr or a running QEMU has the image open.
    :raise ExternalError: ``qemu-img snapshot`` failed.
    """
    _snapshot_op(path, name, "-a", wait)


def snapshot_delete(path: str, name: str, *, wait: float = 0) -> None:
    """Delete the snapshot *name* of an image nobody has open.

    :raise UsageError: bad name, the name is ambiguous, not qcow2.
    :raise NotFoundError: no such image or snapshot.
    :raise BusyError: nvmgr or a running QEMU has the image open.
    :raise ExternalError: ``qemu-img snapshot`` failed.
    """
    _snapshot_op(path, name, "-d", wait)


def _snapshot_op(path: str, name: str, op: str, wait: float) -> None:
    check_snapshot_name(name)
    with _offline(path, True, wait):
        sid = _snapshot_id(path, name)
        # qemu-img 7.2 looks "-a ARG" up as an id first, then as a name, but
        # "-d ARG" as a name only: give each the key it matches exactly.
        arg = sid if op == "-a" else name
        res = _run(QEMU_IMG, ["snapshot", "-q", op, arg, _json_target(path)], path)
        if (
            res.returncode != 0
            and _lock_failure(res.stderr) is None
            and ("No such file" in res.stderr or "not found" in res.stderr)
        ):
            raise NotFoundError(f"no snapshot named {name!r}", image=path)
        _check_result(res, f"qemu-img snapshot {op} {name!r}", path)
