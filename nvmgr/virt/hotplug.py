"""A ``block`` section into (and out of) a running QEMU, over QMP.

QMP goes through libvirt's QEMU monitor passthrough (:func:`nvmgr.virt.conn.qmp`).
:func:`plug`:

1. ``blockdev-add`` of the section's raw offset/size slice, as the
   ``-blockdev`` the domain's QEMU arguments give at boot but over a ``file``
   node of its own (:func:`extra_file_node`), opened in the same command as
   the slice's child (it goes when the slice goes): QEMU 7.2 learns a file
   node's size when it opens it and its raw slices forbid resizing it
   (``block_resize`` is refused, measured), so the image's ``nvmgr-file``
   node does not reach a slice the growth just added;
2. ``device_add`` of the section's device (``driver=``) with the slice as its
   drive, on a free PCI Express root port when the machine has one (q35's
   root bus takes no hot-plug); the highest free one, since libvirt gives the
   lowest to its own hot-plugs and does not know about this device (a port is
   free when QOM shows no device on its bus; :func:`_free_root_port`).

Round trips of a plug with a device (libvirt's monitor passthrough, each one
through libvirtd): one ``blockdev-add`` (two with a LUKS node), ``qom-list``
of the peripherals, ``query-pci``, ``qom-list`` of the chosen port,
``device_add``.

Anything that fails is undone (nodes deleted) before the error goes up.
:func:`unplug` undoes a plug: ``device_del``, wait for the guest to let the
device go, ``blockdev-del``.

:func:`exported` lends nvmgr a qcow2 image the running QEMU holds: QEMU's
built-in NBD server (``nbd-server-start`` on a unix socket, unless a server
nvmgr left runs there already) serves its ``nvmgr-image`` format node
writable (``block-export-add``), so nvmgr reads and writes the image through
the very node the VM's slices sit on, never beside it; the export and the
server go when the block ends.  QEMU 7.2 takes the export of a node that
has other parents (the pflash slice) and writes through it while the guest
uses the slices (measured); it refuses ``block_resize`` of that node
("Permission conflict on node 'nvmgr-image': permissions 'resize' are both
required by ... and unshared by ..."), so an image lent this way never grows.
"""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import time
from collections.abc import Iterator
from typing import Any

from nvmgr.domain.plan import PlannedSection
from nvmgr.domain.qemuargs import (
    FILE_NODE,
    device_props,
    extra_file_node,
    file_node,
    luks_node_name,
    luks_props,
    node_name,
    slice_props,
)
from nvmgr.errors import BusyError, ExternalError, NotHotpluggableError, UsageError
from nvmgr.virt.conn import qmp

#: How long :func:`unplug` waits for the guest to release a device (seconds).
UNPLUG_WAIT = 10.0

#: The id and NBD name of the export :func:`exported` adds.
EXPORT_ID = "nvmgr-image-export"


def block_nodes(dom: Any) -> dict[str, dict[str, Any]]:
    """The running QEMU's named block nodes: node name -> QMP's description."""
    nodes = qmp(dom, "query-named-block-nodes", {"flat": True}) or []
    return {n["node-name"]: n for n in nodes if isinstance(n, dict) and "node-name" in n}


def _occupied_by_pci(dom: Any) -> dict[str, bool]:
    """Root port id -> whether ``query-pci`` shows a device behind it, for the
    ports whose secondary bus the firmware has numbered (``query-pci`` lists
    a bus's devices only by its number; an unnumbered port is left out)."""
    out: dict[str, bool] = {}

    def walk(devices: list[Any]) -> None:
        for d in devices:
            if not isinstance(d, dict):
                continue
            bridge = d.get("pci_bridge")
            if not isinstance(bridge, dict):
                continue
            bus = bridge.get("bus")
            if not isinstance(bus, dict):
                bus = {}
            children = bridge.get("devices") or []
            if d.get("qdev_id") and int(bus.get("secondary", 0) or 0) > 0:
                out[str(d["qdev_id"])] = bool(children)
            walk(children)

    for b in qmp(dom, "query-pci") or []:
        if isinstance(b, dict):
            walk(b.get("devices") or [])
    return out


def _port_is_free(dom: Any, port: str) -> bool:
    """QOM's word on *port* (a bus links each device on it as ``child[N]``)."""
    bus = qmp(dom, "qom-list", {"path": f"/machine/peripheral/{port}/{port}"}) or []
    return not any(str(b.get("name", "")).startswith("child[") for b in bus
                   if isinstance(b, dict))


def _free_root_port(dom: Any) -> str | None:
    """The id of the last PCI Express root port with no device on its bus (None: none).

    QOM is the authority (a bus links each device on it), one ``qom-list``
    per port; ``query-pci`` answers for every port at once where the firmware
    numbered its bus, so the ports it shows occupied are skipped without
    asking QOM, and the one chosen is confirmed by QOM (a guest programs bus
    numbers, so ``query-pci`` alone is not trusted to say a port is free).
    Three QMP commands when the firmware has run, instead of one per taken port.
    """
    ports = [p["name"] for p in qmp(dom, "qom-list", {"path": "/machine/peripheral"}) or []
             if isinstance(p, dict) and p.get("type") == "child<pcie-root-port>"]
    if not ports:
        return None

    def order(port: str) -> tuple[int, str]:
        tail = port.rsplit(".", 1)[-1]
        return (int(tail) if tail.isdigit() else -1, port)

    occupied = _occupied_by_pci(dom)
    for port in sorted(ports, key=order, reverse=True):
        if occupied.get(port):
            continue
        if _port_is_free(dom, port):
            return str(port)
    return None


def _devices(dom: Any) -> set[str]:
    """Ids of the user-created devices (``/machine/peripheral``)."""
    return {p["name"] for p in qmp(dom, "qom-list", {"path": "/machine/peripheral"}) or []
            if isinstance(p, dict) and str(p.get("type", "")).startswith("child<")}


def plug(dom: Any, image: str, s: PlannedSection, *, base: str | None = None) -> list[str]:
    """Give the running QEMU section *s* (placed: its offset in the image) and its device.

    The slice goes over a ``file`` node of its own, opened in the same
    ``blockdev-add`` (:func:`extra_file_node`; the slice owns it): QEMU knows
    its ``nvmgr-file`` node's size from its start, and the image has just
    grown, so no query of QEMU's nodes is needed first.

    :param base: for a section in the image itself (not in a member), the
        node QEMU has over it already to put the slice on (a qcow2 image's
        ``nvmgr-image``, whose virtual size a growth through :func:`exported`
        never changes); None: a ``file`` node of its own, as above.

    :return: the QEMU names added: node names (the slice last), then the
        device id if any (once, when it is the slice's name too).
    :raise NotHotpluggableError: no slot takes a hot-plugged device.
    :raise UsageError: the section's node is in QEMU already.
    :raise ExternalError: QEMU refused a step.
    """
    slice_node = node_name(s.name)
    if s.member_path is not None and (s.member_format or "raw") != "raw":
        raise NotHotpluggableError(
            f"section {s.name} was placed in the {s.member_format} member image "
            f"{s.member_path} (the domain's max-image-size): nvmgr hot-plugs slices of raw "
            "files only; attach with --config (there at the next boot)", section=s.name)
    added: list[str] = []
    props = slice_props(s, FILE_NODE)
    own_file = base is None or s.member_path is not None
    if own_file:
        props["file"] = file_node(s.member_path or image, extra_file_node(s.name))
    else:
        props["file"] = base
    try:
        qmp(dom, "blockdev-add", props)
    except ExternalError as e:
        if "Duplicate" in e.detail:
            raise UsageError(f"section {s.name} is plugged into the running QEMU already "
                             f"({e.detail.strip()})", section=s.name) from e
        raise
    added += [extra_file_node(s.name), slice_node] if own_file else [slice_node]
    try:
        if s.luks:  # QEMU's nvmgr-key secret object holds the passphrase since its start
            qmp(dom, "blockdev-add", luks_props(s))
            added.append(luks_node_name(s.name))
        if s.driver:
            dev = device_props(s)
            if s.driver.endswith("-pci"):
                port = _free_root_port(dom)
                if port is not None:
                    dev["bus"] = port
            try:
                qmp(dom, "device_add", dev)
            except ExternalError as e:
                if "hotplug" in e.detail.lower() or "slot" in e.detail.lower():
                    raise NotHotpluggableError(
                        f"QEMU cannot hot-plug {s.driver} for section {s.name} ({e.detail.strip()}): "
                        "give the domain a free slot (<controller type='pci' "
                        "model='pcie-root-port'/> on q35) or attach with --config",
                        section=s.name) from e
                raise
            added.append(str(dev["id"]))
    except BaseException:
        for node in reversed([n for n in added if n in (slice_node, luks_node_name(s.name))]):
            try:
                qmp(dom, "blockdev-del", {"node-name": node})
            except ExternalError:
                pass  # reported below: the original error is the one that counts
        raise
    return list(dict.fromkeys(added))


def unplug(dom: Any, section: str, device: str | None, *, wait: float = UNPLUG_WAIT) -> bool:
    """Take section *section*'s device and nodes out of the running QEMU.

    :param device: the device id (``None``: the section feeds no device).
    :return: False when QEMU had no node for the section (nothing to do).
    :raise NotHotpluggableError: the device sits on a bus without hot-unplug
        (q35's root bus ``pcie.0``, where the VM's start put it when the domain
        has no root port for it, :func:`nvmgr.domain.qemuargs.apply_plan`):
        nothing changed.
    :raise BusyError: the guest did not release the device within *wait*
        seconds (its node stays; the section is kept).
    """
    nodes = block_nodes(dom)
    slice_node = node_name(section)
    if slice_node not in nodes:
        return False
    if device is not None and device in _devices(dom):
        try:
            qmp(dom, "device_del", {"id": device})
        except ExternalError as e:
            if "does not support hotplugging" not in e.detail:
                raise
            raise NotHotpluggableError(
                f"device {device} of section {section} cannot be unplugged from the running "
                f"VM ({e.detail.strip()}): it was plugged when the VM started, on the root "
                "bus, which takes no hot-unplug (nvmgr puts a device on a PCIe root port of "
                "its own in a q35 domain it wired since; `nvmgr reconcile` of the stopped "
                "domain gives it one); detach it with --config, it is gone at the next boot",
                section=section) from e
        deadline = time.monotonic() + wait
        while device in _devices(dom):
            if time.monotonic() > deadline:
                raise BusyError(
                    f"the guest has not released device {device} within {wait:g} s (an "
                    "operating system must accept the unplug); section "
                    f"{section} stays plugged and kept", section=section)
            time.sleep(0.1)
    deadline = time.monotonic() + wait
    top = luks_node_name(section) if luks_node_name(section) in nodes else slice_node
    while True:  # the device's hold on its node goes when QEMU finalizes it, a moment later
        try:
            qmp(dom, "blockdev-del", {"node-name": top})
            break
        except ExternalError as e:
            if "is in use" not in e.detail or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    if top != slice_node:  # a LUKS section's node on its slice went first
        qmp(dom, "blockdev-del", {"node-name": slice_node})
    extra = extra_file_node(section)
    if extra in nodes:  # gone with its slice, unless a plug of its own added it
        try:
            qmp(dom, "blockdev-del", {"node-name": extra})
        except ExternalError as e:
            if "not owned by the monitor" not in e.detail and "find" not in e.detail:
                raise
    return True


def _listening(path: str) -> bool:
    """Whether a server accepts connections on unix socket *path*."""
    with contextlib.closing(_socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)) as sk:
        sk.settimeout(2.0)
        try:
            sk.connect(path)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def exported(dom: Any, node: str, socket: str) -> Iterator[str]:
    """Serve block node *node* of the running QEMU writable over NBD on unix
    *socket* for the block's length; yield its ``nbd+unix://`` location.

    An export of nvmgr's left by an nvmgr killed inside the block is removed
    first; a server listening on *socket* already is one such nvmgr left
    (the caller holds a lock that keeps two at bay) and is used, and stopped
    after, like one this call starts.  The caller makes *socket*'s directory,
    where QEMU's user may create it.

    :raise BusyError: QEMU runs an NBD server elsewhere (a libvirt backup or
        a migration's disk copy): QEMU has one at a time.
    :raise ExternalError: QEMU refused a step (its words in the detail).
    """
    with contextlib.suppress(ExternalError):  # what an nvmgr killed in this block left
        qmp(dom, "block-export-del", {"id": EXPORT_ID, "mode": "hard"})
    try:
        qmp(dom, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket}}})
    except ExternalError as e:
        if "already running" not in e.detail:
            raise
        if not _listening(socket):
            raise BusyError(
                "the running QEMU serves NBD already, not for nvmgr (a libvirt backup or a "
                f"migration's disk copy?), and runs one NBD server at a time ({e.detail.strip()}): "
                "attach --live when it is done, or with --config (the image grows at the next "
                "start)") from e
    steps: list[tuple[str, dict[str, Any] | None]] = [("nbd-server-stop", None)]
    try:
        qmp(dom, "block-export-add", {"type": "nbd", "id": EXPORT_ID, "node-name": node,
                                      "name": EXPORT_ID, "writable": True})
        steps.insert(0, ("block-export-del", {"id": EXPORT_ID, "mode": "hard"}))
        yield f"nbd+unix:///{EXPORT_ID}?socket={socket}"
    except BaseException:
        for command, args in steps:  # the error that counts is the one going up
            with contextlib.suppress(ExternalError):
                qmp(dom, command, args)
        with contextlib.suppress(OSError):
            os.unlink(socket)
        raise
    for command, args in steps:
        qmp(dom, command, args)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
