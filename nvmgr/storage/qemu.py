"""The one seam to QEMU's tools: every run of ``qemu-img`` and
``qemu-storage-daemon`` (and of ``fusermount3``, which unmounts their FUSE
exports for non-root users) goes through this module, under one error policy.

The policy, for every tool:

- a tool that is not installed: :class:`ExternalError` naming the tool and
  the package that ships it; a tool that cannot be started: the OS's reason;
- QEMU reports an image-lock conflict (another process, a running VM, holds
  the image): :class:`BusyError`;
- QEMU's format driver refuses the file named as the image's format node:
  :class:`CorruptError` (the container is damaged or not of that format);
- any other failure: :class:`ExternalError` carrying the tool's exit status
  and its own words (stderr).

The lock and format cases are recognised in QEMU's stderr, the only place it
says them (QEMU does not translate its messages); each check is written once,
here.

API::

    run(tool, args)                 -> Result      (raises only if the tool cannot run)
    check(result, what, image=...)  -> Result      (the policy above)
    qemu_img(args, what, image=...) -> str         (stdout; run + check)
    img_info / img_create / img_convert / read_image    qemu-img conveniences
    start_storage_daemon(args, ...) -> Popen       (dies with nvmgr: parent-death signal)
    daemon_error(stderr, status, ...) -> NvmgrError (the policy for a failed daemon)
    fusermount_unmount(path)                       (lazy unmount of a FUSE export)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from nvmgr.errors import (
    BusyError,
    CorruptError,
    ExternalError,
    NvmgrError,
    UsageError,
    WrongKeyError,
)

if TYPE_CHECKING:  # imported where a process starts: raw images' commands never pay for it
    import subprocess

QEMU_IMG = "qemu-img"
QEMU_STORAGE_DAEMON = "qemu-storage-daemon"
FUSERMOUNT = "fusermount3"
#: Ceph's own client tool, only for what QEMU cannot do: who holds an RBD image's
#: exclusive lock or has it open, renaming and removing an image (librbd's data path
#: is QEMU's rbd driver).
RBD = "rbd"

#: Where each tool comes from (Debian 12 and 13 package names).
PACKAGES = {
    QEMU_IMG: "qemu-utils",
    QEMU_STORAGE_DAEMON: "qemu-system-common",
    FUSERMOUNT: "fuse3",
    RBD: "ceph-common",
}

#: What nvmgr needs each tool for, in the error for a missing one.
_NEEDED_FOR = {RBD: "to tell whether a running VM holds an RBD image, and to rename or "
                   "remove one"}

#: What QEMU prints when another process holds a conflicting image lock:
#: ``Failed to get "write" lock`` / ``Failed to get shared "write" lock``.
_LOCK_FAILURE = ("Failed to get ", " lock")

#: What libfuse/QEMU print when the FUSE export cannot be mounted.
_FUSE_MOUNT_FAILURE = ("Failed to mount FUSE session", "fusermount", "fuse: ")

#: Seconds a SIGTERMed daemon gets to close its image (flushing qcow2
#: metadata) and unmount its export before SIGKILL.
STOP_TIMEOUT = 30.0

#: Seconds after SIGTERM before it is sent again, to the daemon's main thread: QEMU's
#: handler only sets a flag that its main loop reads when it next wakes, and a
#: signal that one of librbd's threads took wakes nothing (seen under strace).
TERM_AGAIN_AFTER = 1.0

#: PR_SET_PDEATHSIG from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


class Result:
    """A finished tool run."""

    __slots__ = ("argv", "returncode", "stdout", "stderr")

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def missing_tool(tool: str) -> ExternalError:
    """The error for a tool that is not installed."""
    pkg = PACKAGES.get(tool)
    hint = f" (Debian: apt-get install {pkg})" if pkg else ""
    need = _NEEDED_FOR.get(tool, "for qcow2 images and network locations")
    return ExternalError(f"{tool} is not installed: nvmgr needs it {need}{hint}")


def run(tool: str, args: Sequence[str], *, image: str | None = None,
        pass_fds: Sequence[int] = ()) -> Result:
    """Run *tool* with *args* to completion; its result whatever its exit status.

    stdin is empty; stdout and stderr are captured as text; *pass_fds* are
    inherited (``/dev/fd/N``: a key handed over through a pipe or a memfd, so
    keys and plaintext never touch a file).

    :raise ExternalError: the tool is not installed or cannot be started.
    """
    import subprocess

    argv = [tool, *args]
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise missing_tool(tool) from e
    except OSError as e:
        raise ExternalError(f"cannot run {tool}: {e.strerror or e}", image=image) from e
    return Result(argv, p.returncode, p.stdout, p.stderr)


def lock_failure(stderr: str) -> str | None:
    """The line of QEMU's *stderr* that reports an image-lock conflict, if any."""
    start, end = _LOCK_FAILURE
    for line in stderr.splitlines():
        at = line.find(start)
        if at >= 0 and end in line[at:]:
            return line[at:].strip()
    return None


def format_rejection(stderr: str, format_arg: str) -> str | None:
    """QEMU's words when it refused the ``--blockdev`` argument *format_arg*.

    qemu-storage-daemon reports a failed option as ``PROG: --blockdev ARG: MSG``.
    """
    marker = f"--blockdev {format_arg}: "
    for line in stderr.splitlines():
        at = line.find(marker)
        if at >= 0:
            return line[at + len(marker) :].strip()
    return None


def check(res: Result, what: str, *, image: str | None = None) -> Result:
    """Apply the error policy to a finished run; return *res* if it succeeded.

    :raise BusyError: QEMU reported an image-lock conflict.
    :raise ExternalError: any other failure (the tool's stderr in the message).
    """
    if res.returncode == 0:
        return res
    lock = lock_failure(res.stderr)
    if lock is not None:
        raise BusyError(f"image is in use by a running QEMU: {lock}", image=image)
    raise ExternalError(f"{what} failed (exit {res.returncode})", detail=res.stderr, image=image)


def qemu_img(args: Sequence[str], what: str, *, image: str | None = None) -> str:
    """Run ``qemu-img ARGS`` under the policy; its stdout."""
    return check(run(QEMU_IMG, args, image=image), what, image=image).stdout


def img_info(path: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info --output=json -U -f FMT`` of *path* (works while a VM runs).

    :raise ExternalError: ``qemu-img`` failed or printed no JSON object.
    """
    out = qemu_img(
        ["info", "--output=json", "-U", "-f", fmt, _name(path)],
        "qemu-img info",
        image=path,
    )
    try:
        info = json.loads(out)
    except ValueError as e:
        raise ExternalError("qemu-img info printed bad JSON", detail=str(e), image=path) from e
    if not isinstance(info, dict):
        raise ExternalError("qemu-img info printed no JSON object", image=path)
    return info


def img_create(path: str, fmt: str, size: int, *, options: Sequence[str] = ()) -> None:
    """``qemu-img create -f FMT [-o OPT]... PATH SIZE``; formats an existing (empty) file."""
    args = ["create", "-q", "-f", fmt]
    for opt in options:
        args += ["-o", opt]
    qemu_img([*args, os.path.abspath(path), str(size)], "qemu-img create", image=path)


def img_convert(src: str, src_fmt: str, dst: str, dst_fmt: str, *,
                force_share: bool = False, existing: bool = False) -> None:
    """``qemu-img convert`` *src* into a new file *dst* (mode 0600).

    *force_share* (``-U``) reads an image a running QEMU holds; live slices
    in the copy may then be torn, which the caller must account for.
    *existing* (``-n``): *dst* exists (an NBD export) and is written over.
    A partial *dst* is removed when the conversion fails.
    """
    old = os.umask(0o077)
    try:
        res = run(
            QEMU_IMG,
            ["convert", "-q", *(["-U"] if force_share else []), *(["-n"] if existing else []),
             "-f", src_fmt, "-O", dst_fmt,
             _name(src), _name(dst)],
            image=src,
        )
    finally:
        os.umask(old)
    if res.returncode != 0 and not _is_location(dst):
        try:
            os.unlink(dst)
        except FileNotFoundError:
            pass
    check(res, "qemu-img convert", image=src)


def _is_location(name: str) -> bool:
    """A network location QEMU parses (``rbd:...``, an NBD URI), not a file name."""
    return name.startswith(("rbd:", "nbd://", "nbd+unix://"))


def _name(name: str) -> str:
    """A file name made absolute (QEMU never reads a ``proto:`` prefix in it), or a
    network location as it is."""
    return name if _is_location(name) else os.path.abspath(name)


def read_image(path: str, fmt: str) -> bytes:
    """The guest-visible bytes of the image *path* in format *fmt* (through qemu-img)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nvmgr-") as tmp:
        out = os.path.join(tmp, "image.raw")
        img_convert(path, fmt, out, "raw")
        with open(out, "rb") as f:
            return f.read()


# -- LUKS volumes (encrypted live sections) -------------------------------------

#: PBKDF2 time QEMU spends per LUKS key slot (``iter-time``, ms).  The
#: passphrase is 256 random bits (HKDF of the image's data key), so stretching
#: it buys nothing; 50 ms is what QEMU's own benchmark measures reliably on a
#: loaded machine (below ~10 ms it failed with "Unable to get accurate CPU usage").
LUKS_ITER_TIME_MS = 50
#: Runs of ``qemu-img create -f luks`` before its PBKDF benchmark's failure
#: ("Unable to get accurate CPU usage", a process starved of CPU on an
#: overloaded machine: seen twice in a row at a load average of 90) is final.
LUKS_CREATE_ATTEMPTS = 5
#: What qemu-img says when a passphrase opens no key slot of a LUKS volume.
_LUKS_BAD_PASSPHRASE = "Invalid password, cannot unlock any keyslot"
#: ... when QEMU's PBKDF benchmark could not time itself (a loaded machine).
_LUKS_BENCHMARK = "Unable to get accurate CPU usage"


def memfd(name: str, data: bytes = b"") -> int:
    """An anonymous in-memory file holding *data* (never on persistent storage)."""
    fd = os.memfd_create(f"nvmgr-{name}", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, min(4 << 20, size - len(out)), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _luks_failure(res: Result, what: str, image: str | None, section: str | None
                  ) -> NvmgrError:
    if _LUKS_BAD_PASSPHRASE in res.stderr:
        return WrongKeyError(f"{what}: the LUKS volume does not open with the image's "
                             "passphrase", image=image, section=section)
    if "LUKS" in res.stderr and ("not in LUKS format" in res.stderr
                                 or "header" in res.stderr.lower()):
        return CorruptError(f"{what}: not a LUKS volume ({res.stderr.strip()})",
                            image=image, section=section)
    return ExternalError(f"{what} failed (exit {res.returncode})", detail=res.stderr,
                         image=image)


def luks_payload(volume: bytes, passphrase: bytes, *, image: str | None = None,
                 section: str | None = None) -> bytes:
    """The plaintext payload of the LUKS volume *volume* (a section's stored bytes).

    ``qemu-img convert --image-opts driver=luks,...`` from and into anonymous
    memory files; the passphrase reaches qemu-img as a ``secret`` object read
    from another (``/dev/fd/N``), never in its arguments or environment.

    :raise WrongKeyError: *passphrase* opens none of the volume's key slots.
    :raise CorruptError: *volume* is not a LUKS volume.
    :raise ExternalError: qemu-img failed otherwise.
    """
    key, src, out = memfd("key", passphrase), memfd("luks", volume), memfd("plain")
    try:
        res = run(QEMU_IMG, ["convert", "-q", "--object", f"secret,id=k,file=/dev/fd/{key}",
                             "--image-opts",
                             f"driver=luks,key-secret=k,file.driver=raw,"
                             f"file.file.filename=/dev/fd/{src},file.file.locking=off",
                             "-O", "raw", f"/dev/fd/{out}"],
                  image=image, pass_fds=(key, src, out))
        if res.returncode != 0:
            raise _luks_failure(res, f"section {section}" if section else "a LUKS volume",
                                image, section)
        return _read_fd(out)
    finally:
        for fd in (key, src, out):
            os.close(fd)


def luks_volume(payload: bytes, size: int, passphrase: bytes, *,
                volume: bytes | None = None, image: str | None = None,
                section: str | None = None) -> bytes:
    """A LUKS volume of *size* payload bytes holding *payload* (zero-padded).

    *volume* (the section's current volume, if any) is re-encrypted in place
    when *passphrase* opens it: its header and master key stay, no key
    derivation benchmark runs.  Otherwise a new volume is made
    (``qemu-img create -f luks``, aes-256-xts, :data:`LUKS_ITER_TIME_MS`;
    retried (:data:`LUKS_CREATE_ATTEMPTS`) when QEMU's PBKDF benchmark fails on a
    loaded machine).
    Everything passes through anonymous memory files (``/dev/fd/N``).

    :raise UsageError: *payload* is larger than *size*.
    :raise ExternalError: qemu-img failed.
    """
    if len(payload) > size:
        raise UsageError(f"{len(payload):,} bytes do not fit a LUKS payload of {size:,}",
                         image=image, section=section)
    plain = bytes(payload) + bytes(size - len(payload))
    key, src = memfd("key", passphrase), memfd("plain", plain)
    out = -1
    try:
        fds = (key, src)
        if volume is not None:
            out = memfd("luks", volume)
            if _luks_write(key, src, out, image) is None:
                return _read_fd(out)
            os.close(out)
            out = -1
        for attempt in range(1, LUKS_CREATE_ATTEMPTS + 1):
            out = memfd("luks")
            res = run(QEMU_IMG, ["create", "-q", "-f", "luks",
                                 "--object", f"secret,id=k,file=/dev/fd/{key}",
                                 "-o", f"key-secret=k,iter-time={LUKS_ITER_TIME_MS}",
                                 f"/dev/fd/{out}", str(size)],
                      image=image, pass_fds=(*fds, out))
            if res.returncode == 0:
                break
            os.close(out)
            out = -1
            if attempt == LUKS_CREATE_ATTEMPTS or _LUKS_BENCHMARK not in res.stderr:
                raise _luks_failure(res, f"section {section or '-'}: qemu-img create -f luks",
                                    image, section)
        failed = _luks_write(key, src, out, image)
        if failed is not None:
            raise _luks_failure(failed, f"section {section or '-'}: writing its LUKS volume",
                                image, section)
        return _read_fd(out)
    finally:
        for fd in (key, src, out):
            if fd >= 0:
                os.close(fd)


def _luks_write(key: int, src: int, out: int, image: str | None) -> Result | None:
    """Encrypt the plaintext in *src* into the LUKS volume in *out*; the failed
    run, or None."""
    res = run(QEMU_IMG, ["convert", "-q", "-n", "--object", f"secret,id=k,file=/dev/fd/{key}",
                         "-f", "raw", f"/dev/fd/{src}", "--target-image-opts",
                         f"driver=luks,key-secret=k,file.driver=file,"
                         f"file.filename=/dev/fd/{out},file.locking=off"],
              image=image, pass_fds=(key, src, out))
    return None if res.returncode == 0 else res


# -- qemu-storage-daemon -------------------------------------------------------


def _pdeathsig_preexec() -> Callable[[], None]:
    """A preexec_fn that sets SIGTERM as the child's parent-death signal (prctl)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: go now
            os._exit(1)

    return preexec


def start_storage_daemon(
    args: Sequence[str], *, pass_fds: Sequence[int], log: IO[bytes], image: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``qemu-storage-daemon ARGS`` as nvmgr's child that dies with nvmgr.

    The daemon gets SIGTERM (a clean shutdown: it flushes and closes its
    images and unmounts its exports) as its parent-death signal: through
    util-linux ``setpriv --pdeathsig TERM`` when installed (it always is on
    Debian), else through ``prctl(PR_SET_PDEATHSIG)`` in the child before
    exec.  Linux sends that signal when the *thread* that started the child
    exits, so start daemons from a thread that outlives their use.  The
    daemon stays in nvmgr's process group: a terminal's ^C or hangup reaches
    it too.  stdout and stderr go to *log*.

    :param pass_fds: descriptors the daemon inherits (an image's flock'd fd...).
    :raise ExternalError: the daemon is not installed or cannot be started.
    """
    import shutil
    import subprocess

    exe = shutil.which(QEMU_STORAGE_DAEMON)
    if exe is None:
        raise missing_tool(QEMU_STORAGE_DAEMON)
    argv = [exe, *args]
    preexec: Callable[[], None] | None = None
    setpriv = shutil.which("setpriv")
    if setpriv:
        argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
    else:
        preexec = _pdeathsig_preexec()
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            preexec_fn=preexec,
        )
    except OSError as e:
        raise ExternalError(
            f"cannot start {QEMU_STORAGE_DAEMON}: {e.strerror or e}", image=image
        ) from e


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to *timeout* s for *proc* to exit and reap it; True if it did.

    Sleeps in ``poll`` on a pidfd (Python's own ``wait(timeout)`` naps in
    growing steps, which adds up to milliseconds to every stop).
    """
    if proc.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3
        import subprocess

        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        return False
    proc.wait()
    return True


def _term_main_thread(pid: int) -> None:
    """SIGTERM the main thread of *pid* itself (``tgkill``): it interrupts the
    daemon's main loop, which then sees the flag its handler sets."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    tgkill = getattr(libc, "tgkill", None)  # glibc 2.30 and later
    if tgkill is None or tgkill(pid, pid, int(signal.SIGTERM)) != 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM *proc* (a clean shutdown), again to its main thread after
    :data:`TERM_AGAIN_AFTER` s, SIGKILL it after *timeout* s; reap it.

    :return: its exit status (negative: the signal that ended it).
    """
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        first = min(TERM_AGAIN_AFTER, timeout)
        if not wait_exit(proc, first):
            _term_main_thread(proc.pid)
        if proc.poll() is None and not wait_exit(proc, max(0.0, timeout - first)):
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


def daemon_error(
    stderr: str,
    status: int | None,
    *,
    image: str,
    format_arg: str,
    fmt: str,
) -> NvmgrError:
    """The policy for a daemon that failed to serve *image*.

    :param stderr: what the daemon printed.
    :param status: its exit status, None if it still runs (did not get ready).
    :param format_arg: the ``--blockdev`` argument of the image's format node.
    :param fmt: that format's name, for the message.
    """
    lock = lock_failure(stderr)
    if lock is not None:
        return BusyError(f"image is in use by a running QEMU: {lock}", image=image)
    said = format_rejection(stderr, format_arg)
    if said is not None:
        return CorruptError(
            f"the {fmt} container is damaged or not {fmt} at all: {said}", image=image
        )
    if any(m in stderr for m in _FUSE_MOUNT_FAILURE):
        who = "" if os.geteuid() == 0 else (
            f"; as a user other than root, {FUSERMOUNT} must be installed "
            f"(Debian: apt-get install {PACKAGES[FUSERMOUNT]})"
        )
        return ExternalError(
            f"{QEMU_STORAGE_DAEMON} cannot mount its FUSE export of the image "
            f"(needs /dev/fuse{who})",
            detail=stderr,
            image=image,
        )
    if status is None:
        return ExternalError(
            f"{QEMU_STORAGE_DAEMON} did not export the image in time", detail=stderr, image=image
        )
    return ExternalError(
        f"{QEMU_STORAGE_DAEMON} failed (exit {status})", detail=stderr, image=image
    )


def fusermount_unmount(path: str) -> None:
    """``fusermount3 -u -z PATH``: lazily unmount a FUSE mount of this user.

    :raise ExternalError: fusermount3 is missing or failed.
    """
    check(run(FUSERMOUNT, ["-u", "-z", path]), f"{FUSERMOUNT} -u -z")
