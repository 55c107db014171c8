"""swtpm's own state encryption for a domain with a key (issue 8, part 2).

A domain that names a key has ``<encryption secret='S'/>`` in its TPM's
backend (:func:`nvmgr.domain.qemuargs.apply_plan`), S a libvirt secret of
usage type ``vtpm`` that nvmgr defines ephemeral and private
(:mod:`nvmgr.virt.secrets`), its value the image's vTPM passphrase
(:meth:`nvmgr.image.image.Image.vtpm_passphrase`).  libvirt hands the value
to swtpm over a pipe (``--key pwdfd=N,mode=aes-256-cbc``), and swtpm writes
only ciphertext state files: the prepare hook stages and the release hook
collects swtpm's encrypted blobs as they are, and a host crash loses nothing
swtpm wrote (its files are on the persistent disk; the next prepare collects
them).

Here, what the hook needs for that and may do without libvirt:

- :func:`blob_kind`: whether a swtpm state file is plaintext or encrypted
  (its header's flags);
- :func:`encrypt_state`: plaintext state made before (a domain converted
  with ``nvmgr encrypt``, a TPM manufactured before the domain had a key)
  re-encrypted by swtpm itself: swtpm 0.7.1 with a key refuses plaintext
  state ("Wrong decryption key"), measured; the plaintext reaches swtpm
  through a memfd (never a file) and swtpm writes only ciphertext;
- :func:`record_secret` / :func:`secret_problem`: an ephemeral secret lives
  only in the memory of the daemon running libvirt's secret driver and is
  gone after it restarts.  Whoever gives libvirt the secret records which
  daemon holds it (the pid in :data:`~nvmgr.paths.LIBVIRT_SECRETS_PIDFILE`
  and that process's start time) and a fingerprint of the value; the
  prepare hook compares, and refuses a start that libvirt would fail with
  only "no secret with matching uuid", naming the command that fixes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nvmgr.errors import ExternalError
from nvmgr.paths import LIBVIRT_SECRETS_PIDFILE, RUNTIME_ROOT, VTPM_RECORDS

#: Fault injection for tests (as :data:`nvmgr.provision.staging.fault`): called
#: as ``fault(kind, path)`` before each write, fsync, rename and unlink here.
fault: Callable[[str, str], None] | None = None

# swtpm's state file header (big endian): version, min_version, header size,
# flags, total length; then TLVs (tag: u16, length: u32).  Facts measured on
# swtpm 0.7.1's files: plaintext "02 01 00 0a 00 00 ..." then tag 1 (data);
# encrypted "02 01 00 0a 00 09 ..." (flags: encrypted | 256-bit key).
_HEADER = struct.Struct(">BBHHI")
_TLV = struct.Struct(">HI")
_FLAG_ENCRYPTED = 0x1
_FLAG_MIGRATION_DATA = 0x4
_TAG_DATA = 1
_TAG_MIGRATION_DATA = 4

#: swtpm's blob types (``swtpm_ioctl --load TYPE``) by state file suffix.
_BLOB_TYPES = {"permall": "permanent", "volatilestate": "volatile", "savestate": "savestate"}
#: Where the records of vTPM secrets go (:data:`~nvmgr.paths.VTPM_RECORDS` below it);
#: the functions here take another root too (tests, the hook's own root).
RECORDS_ROOT = RUNTIME_ROOT
#: Seconds swtpm and swtpm_ioctl get for each step of a conversion.
STEP_TIMEOUT = 20.0


def _fault(kind: str, path: Path | str) -> None:
    if fault is not None:
        fault(kind, str(path))


def blob_kind(data: bytes) -> str | None:
    """``"encrypted"`` or ``"plain"`` for a swtpm state file; None when *data*
    is not one (empty, truncated, another layout): nothing is assumed then."""
    if len(data) < _HEADER.size:
        return None
    version, _min, hsize, flags, total = _HEADER.unpack_from(data)
    if version not in (1, 2) or hsize < _HEADER.size or hsize > len(data) or total != len(data):
        return None
    if flags & _FLAG_ENCRYPTED:
        return "encrypted"
    if len(data) - hsize < _TLV.size:
        return None
    tag, length = _TLV.unpack_from(data, hsize)
    if tag != _TAG_DATA or hsize + _TLV.size + length != len(data):
        return None
    return "plain"


def _state_blob(plain: bytes) -> bytes:
    """A plaintext state file as the state blob swtpm's control channel takes
    (``CMD_SET_STATEBLOB``): its data wrapped once more, flagged as migration
    data (what ``swtpm_ioctl --save`` gives for the same state, measured)."""
    version, min_version, hsize, _flags, _total = _HEADER.unpack_from(plain)
    body = plain[hsize:]
    inner = _TLV.pack(_TAG_MIGRATION_DATA, len(body)) + body
    return (_HEADER.pack(version, min_version, _HEADER.size, _FLAG_MIGRATION_DATA,
                         _HEADER.size + len(inner)) + inner)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ExternalError(f"{name} is not installed: it re-encrypts TPM state made "
                            "before the domain had a key (apt-get install swtpm swtpm-tools)")
    return path


def _memfd(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, 0)  # inheritable only through pass_fds
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _ioctl(ctrl: Path, *args: str, pass_fds: tuple[int, ...] = ()) -> None:
    r = subprocess.run([_tool("swtpm_ioctl"), "--unix", str(ctrl), *args],
                       capture_output=True, timeout=STEP_TIMEOUT, pass_fds=pass_fds,
                       stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        raise ExternalError(f"swtpm_ioctl {args[0]} failed while re-encrypting TPM state",
                            detail=(r.stderr or r.stdout).decode("utf-8", "replace").strip())


def encrypt_state(files: dict[str, bytes], passphrase: bytes, version: str,
                  workdir: str) -> dict[str, bytes]:
    """swtpm state files (by swtpm's file name) with the plaintext ones
    encrypted under *passphrase* by swtpm itself, as libvirt's swtpm would
    read them (``--key pwdfd=N,mode=aes-256-cbc``).

    A swtpm with the key starts on an empty directory under *workdir*; each
    plaintext blob goes in through its control channel (``swtpm_ioctl
    --load``, from a memfd), ``CMD_INIT`` makes swtpm store the state, in
    its encrypted form, and it is stopped.  Encrypted and unknown files are
    returned as they are.  The directory is removed.  Takes 0.25 s here.

    :raise ExternalError: swtpm is missing or failed; the message has its words.
    """
    plain = {n: d for n, d in files.items() if blob_kind(d) == "plain"}
    if not plain:
        return dict(files)
    for name in plain:
        if name.rsplit(".", 1)[-1] not in _BLOB_TYPES:
            raise ExternalError(f"{name} is not a swtpm state file nvmgr can re-encrypt")
    # Only ciphertext, swtpm's log and sockets go there: a unix socket's path is at
    # most 107 bytes, so a long *workdir* gives way to the system's temp directory.
    parent: str | None = None
    if len(workdir) <= 60:
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        parent = workdir
    d = Path(tempfile.mkdtemp(prefix=".swtpm-encrypt-", dir=parent))
    ctrl, srv = d / "ctrl", d / "srv"
    state = d / "state"
    state.mkdir(mode=0o700)
    r, w = os.pipe()
    fds: list[int] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        os.write(w, passphrase)
        os.close(w)
        w = -1
        argv = [_tool("swtpm"), "socket", *(["--tpm2"] if version == "2.0" else []),
                "--tpmstate", f"dir={state},mode=0600",
                "--ctrl", f"type=unixio,path={ctrl}", "--server", f"type=unixio,path={srv}",
                "--key", f"pwdfd={r},mode=aes-256-cbc", "--log", f"file={d / 'log'}"]
        proc = subprocess.Popen(argv, pass_fds=(r,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(r)
        r = -1
        deadline = time.monotonic() + STEP_TIMEOUT
        while not _listening(ctrl):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ExternalError("swtpm did not start to re-encrypt TPM state",
                                    detail=_log(d, proc))
            time.sleep(0.01)
        for name, data in plain.items():
            fd = _memfd(_state_blob(data), "nvmgr-tpm-state")
            fds.append(fd)
            _ioctl(ctrl, "--load", _BLOB_TYPES[name.rsplit(".", 1)[-1]], f"/dev/fd/{fd}",
                   pass_fds=(fd,))
        _ioctl(ctrl, "-i")  # swtpm stores the state it was given, encrypted
        if any(n.endswith(".volatilestate") for n in plain):
            _ioctl(ctrl, "-v")
        _ioctl(ctrl, "-s")
        try:
            proc.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise ExternalError("swtpm did not stop after re-encrypting TPM state") from e
        out = dict(files)
        for name in plain:
            p = state / name
            got = p.read_bytes() if p.is_file() else b""
            if blob_kind(got) != "encrypted":
                raise ExternalError(f"swtpm did not write {name} encrypted",
                                    detail=_log(d, proc))
            out[name] = got
        return out
    except (OSError, subprocess.SubprocessError) as e:
        raise ExternalError("could not run swtpm to re-encrypt TPM state", detail=str(e)) from e
    finally:
        for fd in (r, w, *fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
        shutil.rmtree(d, ignore_errors=True)


def _listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _log(d: Path, proc: subprocess.Popen[bytes]) -> str:
    text = ""
    with contextlib.suppress(OSError):
        text = (d / "log").read_text(errors="replace")[-2000:]
    if proc.poll() is not None and proc.stderr:
        with contextlib.suppress(OSError, ValueError):
            text += proc.stderr.read(2000).decode("utf-8", "replace")
    return text.strip()


# ---------------------------------------------------------------- which daemon holds the secret

def driver_instance(pidfile: str = LIBVIRT_SECRETS_PIDFILE) -> str | None:
    """``PID:STARTTIME`` of the daemon running libvirt's secret driver, or
    None when that cannot be told here (no pid file: another layout, or no
    daemon; a pid that is not running)."""
    try:
        with open(pidfile, "rb") as f:
            pid = int(f.read(32).strip())
        if pid <= 0:
            return None
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except (OSError, ValueError):
        return None
    # comm may hold spaces and parentheses: the fields follow the last ')'.
    fields = stat.rpartition(b")")[2].split()
    if len(fields) < 20:
        return None
    return f"{pid}:{fields[19].decode('ascii', 'replace')}"


def fingerprint(passphrase: bytes) -> str:
    """What a record says of the secret's value: a hash that identifies it
    (the value is 256 bits of HKDF output: the hash gives nothing to guess from)."""
    return hashlib.sha256(b"nvmgr-v1 vtpm secret record\0" + passphrase).hexdigest()[:32]


def record_path(secret_uuid: str, runtime_root: str | None = None) -> Path:
    return Path(runtime_root or RECORDS_ROOT) / VTPM_RECORDS / secret_uuid


def record_secret(secret_uuid: str, passphrase: bytes, *, runtime_root: str | None = None,
                  pidfile: str = LIBVIRT_SECRETS_PIDFILE) -> None:
    """Note that the daemon holding libvirt's secrets now has *secret_uuid*
    with *passphrase* as its value (written atomically, root's, 0600)."""
    root = Path(runtime_root or RECORDS_ROOT)
    if not root.is_dir():
        root.mkdir(mode=0o755, parents=True)  # QEMU's runtime files are below it too
    d = root / VTPM_RECORDS
    d.mkdir(mode=0o700, exist_ok=True)
    text = f"{driver_instance(pidfile) or '-'} {fingerprint(passphrase)}\n".encode("ascii")
    p = d / secret_uuid
    tmp = d / f".{secret_uuid}.tmp"
    _fault("write", tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text)
        _fault("fsync", tmp)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fault("rename", p)
    os.replace(tmp, p)


def forget_secret(secret_uuid: str, runtime_root: str | None = None) -> None:
    """Remove the record of a secret nvmgr took out of libvirt."""
    p = record_path(secret_uuid, runtime_root)
    _fault("unlink", p)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()


def secret_problem(secret_uuid: str, passphrase: bytes, *, runtime_root: str | None = None,
                   pidfile: str = LIBVIRT_SECRETS_PIDFILE) -> str | None:
    """Why libvirt will not have the vTPM secret with the image's value at
    this start; None when it should (or when that cannot be told here)."""
    now = driver_instance(pidfile)
    if now is None:
        return None
    try:
        with open(record_path(secret_uuid, runtime_root), "rb") as f:
            words = f.read(256).decode("ascii", "replace").split()
    except FileNotFoundError:
        return "nvmgr has not given it to this libvirtd since it started"
    except OSError as e:
        return f"its record cannot be read ({e.strerror})"
    if len(words) != 2:
        return "its record is unreadable"
    if words[0] != now:
        return ("libvirtd restarted since nvmgr gave it the secret (an ephemeral secret "
                "lives only in libvirtd's memory)")
    if words[1] != fingerprint(passphrase):
        return "libvirt holds another value than this image's (the image was replaced?)"
    return None
