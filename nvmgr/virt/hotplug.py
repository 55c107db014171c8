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
"""

from __future__ import annotations

import time
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


def plug(dom: Any, image: str, s: PlannedSection) -> list[str]:
    """Give the running QEMU section *s* (placed: its offset in the image) and its device.

    The slice goes over a ``file`` node of its own, opened in the same
    ``blockdev-add`` (:func:`extra_file_node`; the slice owns it): QEMU knows
    its ``nvmgr-file`` node's size from its start, and the image has just
    grown, so no query of QEMU's nodes is needed first.

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
    props["file"] = file_node(s.member_path or image, extra_file_node(s.name))
    try:
        qmp(dom, "blockdev-add", props)
    except ExternalError as e:
        if "Duplicate" in e.detail:
            raise UsageError(f"section {s.name} is plugged into the running QEMU already "
                             f"({e.detail.strip()})", section=s.name) from e
        raise
    added += [extra_file_node(s.name), slice_node]
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
        (q35's root bus ``pcie.0``, where the VM's start put it): nothing changed.
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
                "bus, which takes no hot-unplug (a device nvmgr hot-plugs goes on a PCIe root "
                "port); detach it with --config, it is gone at the next boot",
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
