"""The nvmgr error tree.

Every failure nvmgr reports is an :class:`NvmgrError`.  Only the command line
(:mod:`nvmgr.cli`) and the hook entry (:mod:`nvmgr.hook.entry`) turn errors into
messages and exit codes; library code raises and never exits.

::

    NvmgrError                      exit 1   anything not more specific
     +-- UsageError                 exit 2   bad arguments, names, sizes
     +-- NotFoundError              exit 3   image, section, domain, secret
     +-- CorruptError               exit 4   crc/MAC/structure mismatch
     |    +-- DERError              exit 4   malformed or non-canonical DER
     |    +-- ForeignImageError     exit 4   not an nvmgr image at all
     |    +-- MemberError           exit 4   a member image missing, foreign or short
     +-- WrongKeyError              exit 5   a key was given and is not the one
     +-- KeyRequiredError           exit 6   the image is encrypted, no key given
     +-- BusyError                  exit 7   locked by another writer, VM running
     +-- NoSpaceError               exit 8   data larger than the section, image full
     +-- InvalidInputError          exit 9   hostile or malformed domain XML, metadata
     +-- ExternalError              exit 10  qemu-img, qemu-storage-daemon, libvirt failed
     +-- InstallationError          exit 11  nvmgr itself is installed incompletely
     +-- NotWiredError              exit 12  the domain asks for nvmgr but is not wired for it
     +-- NotHotpluggableError       exit 13  a live change QEMU cannot make (--config can)

Each error carries the context it was raised in (``image``, ``section``,
``domain``) and names it in its message.
"""

from __future__ import annotations

import enum
import errno
import logging

# A library's loggers stay quiet unless the application configures logging
# (the CLI does); every module that logs imports this one.
logging.getLogger("nvmgr").addHandler(logging.NullHandler())


class ExitCode(enum.IntEnum):
    """Documented process exit codes (README "Exit codes", ``nvmgr --help``)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    CORRUPT = 4
    WRONG_KEY = 5
    KEY_REQUIRED = 6
    BUSY = 7
    NO_SPACE = 8
    INVALID_INPUT = 9
    EXTERNAL = 10
    INSTALLATION = 11
    NOT_WIRED = 12
    NOT_HOTPLUGGABLE = 13


class NvmgrError(Exception):
    """Root of all nvmgr errors.

    :param message: what went wrong, in words a user can act on.
    :param image: the image path the error concerns, if any.
    :param section: the section name the error concerns, if any.
    :param domain: the domain name the error concerns, if any.
    """

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(
        self,
        message: str,
        *,
        image: str | None = None,
        section: str | None = None,
        domain: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.image = image
        self.section = section
        self.domain = domain

    def __str__(self) -> str:
        where = []
        if self.domain:
            where.append(f"domain {self.domain}")
        if self.image:
            where.append(f"image {self.image}")
        if where:
            return f"{', '.join(where)}: {self.message}"
        return self.message

    def to_json(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": str(self),
            "exit_code": int(self.exit_code),
            "image": self.image,
            "section": self.section,
            "domain": self.domain,
        }


class UsageError(NvmgrError):
    exit_code = ExitCode.USAGE


class NotFoundError(NvmgrError):
    exit_code = ExitCode.NOT_FOUND


class CorruptError(NvmgrError):
    exit_code = ExitCode.CORRUPT


class DERError(CorruptError):
    """The directory bytes are not strict, canonical DER of the nvmgr schema."""


class ForeignImageError(CorruptError):
    """The file holds no nvmgr directory in either header copy."""


class MemberError(CorruptError):
    """A member image of a split image is missing, belongs to another image,
    or does not hold what the directory says it holds (exit 4): the message
    names the member and the section(s) it should hold."""


class WrongKeyError(NvmgrError):
    exit_code = ExitCode.WRONG_KEY


class KeyRequiredError(NvmgrError):
    exit_code = ExitCode.KEY_REQUIRED


class BusyError(NvmgrError):
    exit_code = ExitCode.BUSY


class OrphanedImageError(BusyError):
    """The image a domain is to use holds the state of a domain that no longer
    exists (undefined behind nvmgr's back): ``--adopt`` takes that state,
    ``--fresh`` moves it aside."""


class NoSpaceError(NvmgrError):
    exit_code = ExitCode.NO_SPACE


class InvalidInputError(NvmgrError):
    exit_code = ExitCode.INVALID_INPUT


class ExternalError(NvmgrError):
    """An external tool (qemu-img, qemu-storage-daemon, libvirt) failed.

    :param detail: the tool's own words (stderr), kept for the message.
    """

    exit_code = ExitCode.EXTERNAL

    def __init__(self, message: str, *, detail: str = "", **kw: str | None) -> None:
        if detail:
            message = f"{message}: {detail.strip()}"
        super().__init__(message, **kw)
        self.detail = detail


class InstallationError(NvmgrError):
    """A file nvmgr ships (a schema, the hook front end) is missing: a broken
    installation, not a mistake of the user's; or the host lacks what nvmgr
    needs (``/run/nvmgr`` on tmpfs for QEMU's key files)."""

    exit_code = ExitCode.INSTALLATION


class NotWiredError(NvmgrError):
    """The domain's metadata asks for nvmgr, but its XML lacks nvmgr's QEMU
    arguments or stateless loader (``virsh define``, ``virsh edit``): starting
    it would leave its state to libvirt's own nvram.  ``nvmgr reconcile``
    wires it."""

    exit_code = ExitCode.NOT_WIRED


class NotHotpluggableError(NvmgrError):
    """A live attach or detach (``--live``) that the running QEMU cannot do: a
    binding QEMU reads only at start (``fwcfg``, ``pflash``, ``tpm``), a
    ``<tpm>``, an image QEMU holds that nvmgr cannot grow beside it (qcow2,
    RBD), no free hot-plug slot.  ``--config`` makes the change for the next
    boot."""

    exit_code = ExitCode.NOT_HOTPLUGGABLE


#: How the operating system's errors read as nvmgr errors (errno -> class).
_OS_ERRORS: dict[int, type[NvmgrError]] = {
    errno.ENOENT: NotFoundError,
    errno.ENOTDIR: UsageError,
    errno.EISDIR: UsageError,
    errno.EEXIST: UsageError,
    errno.EACCES: UsageError,
    errno.EPERM: UsageError,
    errno.EROFS: UsageError,
    errno.ENOSPC: NoSpaceError,
    errno.EDQUOT: NoSpaceError,
    errno.EFBIG: NoSpaceError,
}


def from_os_error(e: OSError) -> NvmgrError:
    """*e* as an :class:`NvmgrError` with a message naming the file; the
    cause is kept (``raise from_os_error(e) from e``)."""
    cls = _OS_ERRORS.get(e.errno or 0, NvmgrError)
    what = e.strerror or str(e)
    if e.filename is not None and e.filename2 is not None:
        msg = f"{e.filename} -> {e.filename2}: {what}"
    elif e.filename is not None:
        msg = f"{e.filename}: {what}"
    else:
        msg = what
    err = cls(msg)
    err.__cause__ = e
    return err
