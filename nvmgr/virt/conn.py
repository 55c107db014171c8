"""The seam over libvirt-python: the only module (with :mod:`nvmgr.crypto.keys`) that imports it.

Never used from the hook: a hook must not call back into libvirt (libvirtd
waits for the hook while holding the domain's job, so a call back deadlocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from nvmgr.errors import BusyError, ExternalError, InvalidInputError, NotFoundError

DEFAULT_URI = "qemu:///system"


def load_libvirt() -> None:
    """Import libvirt-python now (``nvmgr cli-server``: before its workers fork)."""
    _libvirt()


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as e:  # pragma: no cover - a dependency
        raise ExternalError("libvirt-python is not installed", detail=str(e)) from e
    # libvirt-python prints every error to stderr by default; nvmgr reports them itself.
    libvirt.registerErrorHandler(lambda *_: None, None)
    return libvirt


@contextlib.contextmanager
def connect(uri: str | None = None, *, readonly: bool = False) -> Iterator[Any]:
    """A libvirt connection, closed on exit.

    :raise ExternalError: the daemon cannot be reached.
    """
    lv = _libvirt()
    try:
        conn = lv.openReadOnly(uri or DEFAULT_URI) if readonly else lv.open(uri or DEFAULT_URI)
    except lv.libvirtError as e:
        raise ExternalError(f"cannot connect to libvirt at {uri or DEFAULT_URI}",
                            detail=str(e)) from e
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def lookup(conn: Any, name: str) -> Any:
    """The domain called *name* (or with that UUID).

    :raise NotFoundError: no such domain.
    """
    lv = _libvirt()
    for how in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return how(name)
        except lv.libvirtError:
            continue
    raise NotFoundError(f"no libvirt domain named {name!r}", domain=name)


def domain_xml(name: str, uri: str | None = None, *, inactive: bool = True) -> str:
    """The domain's XML (the persistent definition when *inactive*)."""
    lv = _libvirt()
    with connect(uri, readonly=True) as conn:
        dom = lookup(conn, name)
        flags = lv.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        xml: str = dom.XMLDesc(flags)
        return xml


def exists(name: str, uri: str | None = None) -> bool:
    with connect(uri, readonly=True) as conn:
        try:
            lookup(conn, name)
            return True
        except NotFoundError:
            return False


def is_active(name: str, uri: str | None = None) -> bool:
    with connect(uri, readonly=True) as conn:
        return bool(lookup(conn, name).isActive())


def define(xml: str, uri: str | None = None) -> str:
    """Define (or redefine) a domain from *xml*; return its name.

    :raise InvalidInputError: libvirt rejects the XML.
    """
    lv = _libvirt()
    with connect(uri) as conn:
        try:
            dom = conn.defineXML(xml)
        except lv.libvirtError as e:
            raise InvalidInputError(f"libvirt refused the domain XML: {e}") from e
        name: str = dom.name()
        return name


def undefine(name: str, uri: str | None = None, *, remove_tpm: bool = False) -> None:
    """Undefine a domain, keeping libvirt-managed NVRAM files libvirt knows of.

    nvmgr-managed domains have no libvirt ``<nvram>`` file; their state is
    the nvmgr image, which the caller keeps or removes.

    :param remove_tpm: also remove libvirt's swtpm state directory (for an
        nvmgr domain only a staging place, wiped after every run); kept
        otherwise.
    """
    lv = _libvirt()
    with connect(uri) as conn:
        dom = lookup(conn, name)
        flags = getattr(lv, "VIR_DOMAIN_UNDEFINE_KEEP_NVRAM", 0)
        flags |= getattr(lv, "VIR_DOMAIN_UNDEFINE_TPM" if remove_tpm
                         else "VIR_DOMAIN_UNDEFINE_KEEP_TPM", 0)
        try:
            dom.undefineFlags(flags)
        except lv.libvirtError as e:
            raise ExternalError(f"libvirt could not undefine {name}", detail=str(e),
                                domain=name) from e


def require_inactive(name: str, uri: str | None = None, *, what: str = "this") -> None:
    """:raise BusyError: when the domain is running."""
    if is_active(name, uri):
        raise BusyError(f"the domain is running; stop it before {what}", domain=name)


def image_of_domain(name: str, uri: str | None = None) -> str:
    """The nvmgr image path recorded in the domain's nvmgr metadata.

    :raise NotFoundError: the domain does not exist or has no nvmgr metadata.
    """
    from nvmgr.domain.elements import parse_domain

    dom = parse_domain(domain_xml(name, uri))
    meta = dom.nvmgr
    if meta is None or not meta.image:
        raise NotFoundError("the domain has no nvmgr image (define it with nvmgr define)",
                            domain=name)
    return str(meta.image)


def defined_domains(uri: str | None = None) -> list[str]:
    """Names of every persistent domain."""
    with connect(uri, readonly=True) as conn:
        return sorted(d.name() for d in conn.listAllDomains(_libvirt().VIR_CONNECT_LIST_DOMAINS_PERSISTENT))


def uuid_exists(dom_uuid: str, uri: str | None = None) -> bool:
    """Whether libvirt knows a domain (persistent or running) with this UUID."""
    lv = _libvirt()
    with connect(uri, readonly=True) as conn:
        try:
            conn.lookupByUUIDString(dom_uuid)
            return True
        except lv.libvirtError as e:
            if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                return False
            raise ExternalError("libvirt could not look up a domain", detail=str(e)) from e


_EVENT_LOOP: list[int] = []


def event_loop(tick: float = 0.25) -> None:
    """Register libvirt's default event loop (once per process), woken every *tick* s.

    The tick lets a caller of ``virEventRunDefaultImpl`` look at its stop
    flag (a SIGTERM) between turns instead of waiting for the next event.
    """
    if _EVENT_LOOP:
        return
    lv = _libvirt()
    lv.virEventRegisterDefaultImpl()
    _EVENT_LOOP.append(lv.virEventAddTimeout(int(tick * 1000), lambda *_: None, None))


def qmp(dom: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """One QMP command to the running QEMU of libvirt domain object *dom*, through
    libvirt's QEMU monitor passthrough (``virDomainQemuMonitorCommand``); its ``return``.

    libvirt marks the domain tainted (custom-monitor): it does not know the
    nodes and devices added this way.  nvmgr uses it only for the block nodes
    and devices of its own sections (``nvmgr-*`` names).

    :raise ExternalError: libvirt could not pass the command on, or QEMU
        answered with an error (its ``desc`` is the detail).
    """
    import json

    try:
        import libvirt_qemu
    except ImportError as e:  # pragma: no cover - ships with libvirt-python
        raise ExternalError("libvirt-python has no libvirt_qemu module", detail=str(e)) from e
    lv = _libvirt()
    msg = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, msg, 0))
    except lv.libvirtError as e:
        raise ExternalError(f"libvirt could not pass QMP {command} to QEMU",
                            detail=e.get_error_message() or str(e)) from e
    except ValueError as e:
        raise ExternalError(f"QEMU's answer to {command} is not JSON", detail=str(e)) from e
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc", "") if isinstance(err, dict) else str(err)
        raise ExternalError(f"QEMU refused {command}", detail=str(desc))
    return reply.get("return")
