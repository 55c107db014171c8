"""Where key-encryption keys come from.

A key is read from a file (mode 0600 or stricter), from a stream (standard
input), from a libvirt secret through the libvirt API, or, for hooks that must
never call back into libvirt, straight from libvirt's secret store on disk.
Keys never travel in argv, the environment or logs, and no message here ever
includes key material.

Accepted key material, everywhere: exactly 32 raw bytes, or 64 hexadecimal
digits optionally followed by a single newline.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import stat
import uuid
from typing import BinaryIO

from nvmgr import paths
from nvmgr.crypto.cipher import KEK_LEN, Kek
from nvmgr.errors import NotFoundError, NvmgrError, UsageError

__all__ = [
    "DEFAULT_SECRETS_DIR",
    "load_key_file",
    "load_key_stream",
    "load_libvirt_secret_file",
]

#: Where the system libvirtd (9.0) keeps persistent secrets.
DEFAULT_SECRETS_DIR = paths.SECRETS_DIR

#: Upper bound on bytes read from any key source.
_MAX_READ = 200
_HEX_RE = re.compile(rb"[0-9A-Fa-f]{%d}\n?" % (2 * KEK_LEN))
_UUID_RE = re.compile(
    r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
)


def _parse_material(data: bytes, what: str) -> bytes:
    """Return the 32-byte key in *data*, or raise without echoing *data*.

    :param data: the bytes read from the key source.
    :param what: names the source in the message, e.g. ``"key file /k"``.
    :raise UsageError: *data* is neither 32 raw bytes nor 64 hex digits.
    """
    if len(data) == KEK_LEN:
        return bytes(data)
    if _HEX_RE.fullmatch(data):
        return bytes.fromhex(data[: 2 * KEK_LEN].decode("ascii"))
    raise UsageError(f"{what} must hold {KEK_LEN} bytes raw or {2 * KEK_LEN} hex digits")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.read(fd, limit - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _open_regular(path: str, what: str) -> tuple[int, os.stat_result]:
    """Open *path* read-only and check that it is a regular file.

    :return: the descriptor (the caller closes it) and its ``fstat``.
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* is not a regular file.
    :raise NvmgrError: it cannot be opened for another reason.
    """
    try:
        # O_NONBLOCK: a FIFO must not hang the open; no effect on regular files.
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NotFoundError(f"{what} does not exist") from e
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise NotFoundError(f"{what} does not exist") from e
        raise NvmgrError(f"cannot open {what}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise NvmgrError(f"cannot read {what}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UsageError(f"{what} is not a regular file")
    return fd, st


def load_key_file(path: str) -> Kek:
    """Load a key-encryption key from a file.

    The file must be a regular file with no group or other permission bits
    (0600 or 0400), and hold exactly 32 raw bytes or 64 hex digits with at
    most one trailing newline.  Symbolic links are followed.

    :param path: the key file.
    :return: the key, labelled ``"file"``.
    :raise NotFoundError: *path* does not exist.
    :raise UsageError: *path* is not a regular file, is readable or writable
        by group or others, or does not hold a key in either form.
    :raise NvmgrError: it cannot be read (e.g. permission denied).
    """
    what = f"key file {path}"
    fd, st = _open_regular(path, what)
    try:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise UsageError(f"{what} must be mode 0600 (is {mode:04o})")
        try:
            data = _read_at_most(fd, _MAX_READ)
        except OSError as e:
            raise NvmgrError(f"cannot read {what}: {e.strerror}") from e
    finally:
        os.close(fd)
    return Kek(_parse_material(data, what), label="file")


def load_key_stream(stream: BinaryIO, what: str = "standard input", label: str = "stdin") -> Kek:
    """Load a key-encryption key from a binary stream, e.g. ``sys.stdin.buffer``.

    Reads at most 200 bytes; the content rules are those of :func:`load_key_file`.

    :param stream: a stream opened in binary mode.
    :param what: names the stream in error messages.
    :param label: the key's label.
    :return: the key.
    :raise UsageError: the stream does not hold a key in either form, or is
        not a binary stream.
    :raise NvmgrError: the stream cannot be read.
    """
    chunks: list[bytes] = []
    got = 0
    try:
        while got < _MAX_READ:
            chunk = stream.read(_MAX_READ - got)
            if not chunk:
                break
            if not isinstance(chunk, bytes | bytearray):
                raise UsageError(f"key from {what}: stream is not in binary mode")
            chunks.append(bytes(chunk))
            got += len(chunk)
    except OSError as e:
        raise NvmgrError(f"cannot read key from {what}: {e.strerror}") from e
    return Kek(_parse_material(b"".join(chunks), f"key from {what}"), label=label)


def _check_uuid(secret_uuid: str) -> str:
    """Return *secret_uuid* in libvirt's canonical (lower-case) form.

    :raise UsageError: it is not a UUID in the 8-4-4-4-12 hex form.
    """
    if not isinstance(secret_uuid, str) or not _UUID_RE.fullmatch(secret_uuid):
        raise UsageError(
            f"invalid secret UUID {str(secret_uuid)[:80]!r} "
            "(expected the form 01234567-89ab-cdef-0123-456789abcdef)"
        )
    return str(uuid.UUID(secret_uuid))


def load_libvirt_secret_file(secret_uuid: str, secrets_dir: str = DEFAULT_SECRETS_DIR) -> Kek:
    """Load a key-encryption key from libvirt's on-disk secret store.

    For hooks, which must never call back into libvirt.  libvirt 9.0 keeps the
    value of a defined, non-ephemeral secret base64-encoded in
    ``<secrets_dir>/<uuid>.base64``; the decoded value must be 32 raw bytes or
    64 hex digits.  (Secrets defined ``private='yes'`` are stored the same way.)

    :param secret_uuid: the secret's UUID.
    :param secrets_dir: libvirt's secrets directory (``/etc/libvirt/secrets``
        for the system daemon).
    :return: the key, labelled ``"libvirt-secret:<uuid>"`` like
        :func:`load_libvirt_secret`, so both find the same key slot label.
    :raise UsageError: *secret_uuid* is not a UUID, or the file is not valid
        base64 or does not hold a key in either form.
    :raise NotFoundError: the secret is not defined, is ephemeral or has no
        value.
    :raise NvmgrError: the file cannot be read (e.g. permission denied).
    """
    u = _check_uuid(secret_uuid)
    path = os.path.join(secrets_dir, f"{u}.base64")
    what = f"libvirt secret {u}"
    fd, _ = _open_regular(path, f"value file {path} of {what}")
    try:
        # base64 of 64 hex digits + newline is 88 bytes; allow whitespace.
        data = _read_at_most(fd, _MAX_READ)
    except OSError as e:
        raise NvmgrError(f"cannot read {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"value file {path} of {what} is not valid base64") from e
    return Kek(_parse_material(raw, what), label=f"libvirt-secret:{u}")
