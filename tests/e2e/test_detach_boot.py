"""Live detach of a ``block`` device nvmgr wired at define (issue 7).

On q35 a device on the root bus ``pcie.0`` cannot be unplugged; nvmgr puts
each boot-time block device on a PCI Express root port of its own (a
``<controller model='pcie-root-port'>`` with user alias ``ua-nvmgr-port-…``).

1. Define with a block section, start: QEMU's device sits on nvmgr's port;
   ``nvmgr detach --live --config`` takes it out of the running guest (QOM:
   the device and its port's bus) and the definition (section and port); after destroy and
   start it is not there; its bytes stay in the image.
2. A domain wired by an nvmgr before the ports (device on the root bus, no
   port): ``detach --live`` is refused (exit 13, nothing changed);
   ``nvmgr reconcile`` of the stopped domain gives it its port, and after the
   next start the live detach works.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

NS = vmlib.NVMGR_NS
SECTION = {"name": "state0", "size": "64K", "binding": "block", "driver": "virtio-blk-pci",
           "device": "nvmgr-state0"}
STATE = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='state0' size='64K' binding='block' "
         "driver='virtio-blk-pci' device='nvmgr-state0'/>")


def _native_hotplug(v: vmlib.VM) -> None:
    """The root ports' native PCIe hot-plug instead of q35's ACPI one: OVMF's shell
    never ejects a device for ACPI; with native hot-plug QEMU removes a device
    from a slot the guest never powered on at once (see tests/e2e/test_attach.py)."""
    root = etree.fromstring(v.xml.encode())
    qns = vmlib.QEMU_NS
    cl = root.find(f"{{{qns}}}commandline")
    if cl is None:
        cl = etree.SubElement(root, f"{{{qns}}}commandline", nsmap={"qemu": qns})
    for value in ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"):
        etree.SubElement(cl, f"{{{qns}}}arg", value=value)
    v.xml = etree.tostring(root, encoding="unicode")
    v.xml_path.write_text(v.xml)


def _ports(xml: str) -> dict[str, str]:
    """nvmgr's root ports in a domain XML: alias -> index."""
    root = etree.fromstring(xml.encode())
    out = {}
    for c in root.findall("./devices/controller[@type='pci']"):
        a = c.find("alias")
        if a is not None and (a.get("name") or "").startswith("ua-nvmgr-port-"):
            assert c.get("model") == "pcie-root-port"
            out[str(a.get("name"))] = str(c.get("index"))
    return out


def _peripherals(v: vmlib.VM) -> set[str]:
    return {p["name"] for p in vmlib.qmp(v.name, "qom-list",  # type: ignore[union-attr]
                                         {"path": "/machine/peripheral"})}


def _on_port(v: vmlib.VM, port: str) -> list[str]:
    """The devices QOM shows on *port*'s bus (``query-pci`` lists a port's
    devices only once the firmware numbered its bus; OVMF's shell may not)."""
    bus = vmlib.qmp(v.name, "qom-list", {"path": f"/machine/peripheral/{port}/{port}"}) or []
    return [str(b["type"]) for b in bus  # type: ignore[union-attr]
            if str(b.get("name", "")).startswith("child[")]


def _port_bdf(xml: str, alias: str) -> tuple[int, int, int]:
    """The root port's own PCI address (bus, slot, function) libvirt gave it."""
    root = etree.fromstring(xml.encode())
    for c in root.findall("./devices/controller[@type='pci']"):
        a = c.find("alias")
        if a is not None and a.get("name") == alias:
            ad = c.find("address")
            assert ad is not None, xml
            return (int(ad.get("bus", "0"), 16), int(ad.get("slot", "0"), 16),
                    int(ad.get("function", "0"), 16))
    raise AssertionError(f"no port {alias}")


def _mm(sh: vmlib.Shell, bdf: tuple[int, int, int], reg: int, width: int,
        value: int | None = None) -> int:
    """The guest reads (or writes) PCI configuration space with the shell's ``mm -PCI``."""
    bus, dev, fn = bdf
    addr = f"{bus:02x}{dev:02x}{fn:02x}{reg:02x}"
    line = f"mm {addr} {'' if value is None else f'{value:x} '}-w {width} -PCI -n"
    out = sh.command(line)
    if value is not None:
        return value
    found = re.findall(r":\s*0x([0-9A-Fa-f]+)", out)
    assert found, (line, out)
    return int(found[-1], 16)


def _guest_ejects(sh: vmlib.Shell, bdf: tuple[int, int, int]) -> None:
    """What an operating system does on the attention button of a native PCIe
    hot-plug slot: it powers the slot off (Slot Control: power controller off,
    power indicator off), and QEMU then lets the device go."""
    ptr = _mm(sh, bdf, 0x34, 1)
    while ptr and _mm(sh, bdf, ptr, 1) != 0x10:  # the PCI Express capability
        ptr = _mm(sh, bdf, ptr + 1, 1)
    assert ptr, "the root port has no PCI Express capability"
    deadline = time.monotonic() + 8
    while not _mm(sh, bdf, ptr + 0x1A, 2) & 0x1:  # Slot Status: attention button pressed
        assert time.monotonic() < deadline, "QEMU never pressed the slot's attention button"
        time.sleep(0.2)
    sltctl = _mm(sh, bdf, ptr + 0x18, 2)
    _mm(sh, bdf, ptr + 0x18, 2, sltctl | 0x0400 | 0x0300)


def _detach_with_guest(v: vmlib.VM, xml: Path, alias: str) -> dict[str, object]:
    """``nvmgr detach --live --config`` while the guest (OVMF's shell, as an
    operating system would) accepts the unplug QEMU asks it for."""
    bdf = _port_bdf(vmlib.virsh("dumpxml", v.name).stdout, alias)
    assert v.socket is not None
    with vmlib.Shell(v.socket) as sh:
        sh.wait_prompt(vmlib.serial_log(v.name), 90)
        cmd = [str(vmlib.NVMGR), "detach", v.name, str(xml), "--live", "--config", "-O", "json"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, env={**os.environ, **vmlib.NVMGR_ENV})
        try:
            _guest_ejects(sh, bdf)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, (p.returncode, out, err)
    return json.loads(out)  # type: ignore[no-any-return]


def _device_bus(v: vmlib.VM) -> str | None:
    """The ``bus`` of the nvmgr-state0 device in QEMU's command line (None: none given)."""
    for a in vmlib.qemu_cmdline(v.name):
        if '"drive":"nvmgr-state0"' in a:
            return json.loads(a).get("bus")  # type: ignore[no-any-return]
    raise AssertionError("no nvmgr-state0 device on QEMU's command line")


def _put(v: vmlib.VM, tmp_path: Path) -> bytes:
    data = os.urandom(64 << 10)
    (tmp_path / "state0.bin").write_bytes(data)
    vmlib.nvmgr("put", "--domain", v.name, "state0", tmp_path / "state0.bin")
    return data


def test_boot_time_block_device_detaches_live(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("detach-boot", sections=[SECTION], serial_socket=True)
    _native_hotplug(v)
    v.define()
    persistent = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    ports = _ports(persistent)
    assert len(ports) == 1, persistent
    (alias, index), = ports.items()
    # libvirt's own devices sit on other ports: none names nvmgr's port's bus.
    assert f"bus='{int(index):#04x}'" not in persistent, persistent
    data = _put(v, tmp_path)
    v.start()
    assert _device_bus(v) == alias
    assert "nvmgr-state0" in _peripherals(v)
    assert _on_port(v, alias) == ["link<virtio-blk-pci>"], _on_port(v, alias)

    xml = tmp_path / "state0.xml"
    xml.write_text(STATE)
    out = _detach_with_guest(v, xml, alias)
    assert out["unplugged"] == ["state0"] and out["kept"] == ["state0"], out
    assert "nvmgr-state0" not in _peripherals(v) and not _on_port(v, alias)
    nodes = {n["node-name"] for n in vmlib.qmp(v.name, "query-named-block-nodes",  # type: ignore[union-attr]
                                                {"flat": True})}
    assert not {n for n in nodes if "state0" in n}, nodes
    persistent = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "state0" not in persistent and not _ports(persistent), persistent

    v.destroy()
    v.start()
    assert not any("state0" in a for a in vmlib.qemu_cmdline(v.name))
    assert "nvmgr-state0" not in _peripherals(v)
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
    assert v.get("state0")[:len(data)] == data  # kept: no --remove-section


def test_domain_without_port_refuses_then_reconcile_gives_one(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("detach-oldport", sections=[SECTION], serial_socket=True)
    _native_hotplug(v)
    v.define()
    # As an nvmgr before the ports wired it: no port, no bus= on the device.
    root = etree.fromstring(vmlib.virsh("dumpxml", "--inactive", v.name).stdout.encode())
    for c in root.findall("./devices/controller[@type='pci']"):
        a = c.find("alias")
        if a is not None and (a.get("name") or "").startswith("ua-nvmgr-port-"):
            root.find("devices").remove(c)  # type: ignore[union-attr]
    for arg in root.iter(f"{{{vmlib.QEMU_NS}}}arg"):
        value = arg.get("value") or ""
        if '"drive":"nvmgr-state0"' in value:
            dev = json.loads(value)
            dev.pop("bus")
            arg.set("value", json.dumps(dev, separators=(",", ":")))
    old = tmp_path / "old.xml"
    old.write_bytes(etree.tostring(root))
    vmlib.virsh("define", old)
    data = _put(v, tmp_path)
    v.start()  # the hook takes the old wiring
    assert _device_bus(v) is None

    xml = tmp_path / "state0.xml"
    xml.write_text(STATE)
    before = vmlib.sha256(v.image), vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    p = vmlib.nvmgr("detach", v.name, xml, "--live", "--config", check=False)
    assert p.returncode == 13 and "root bus" in p.stderr and "reconcile" in p.stderr, p
    assert (vmlib.sha256(v.image), vmlib.virsh("dumpxml", "--inactive", v.name).stdout) == before
    assert "nvmgr-state0" in _peripherals(v)

    v.destroy()
    out = json.loads(vmlib.nvmgr("reconcile", v.name, "-O", "json").stdout)
    persistent = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert len(_ports(persistent)) == 1, (out, persistent)
    v.start()
    alias = next(iter(_ports(persistent)))
    assert _device_bus(v) == alias
    out = _detach_with_guest(v, xml, alias)
    assert out["unplugged"] == ["state0"], out
    assert "nvmgr-state0" not in _peripherals(v)
    v.destroy()
    assert v.get("state0")[:len(data)] == data
