"""Devices added after define (issue 7, part 1): ``nvmgr attach``/``detach`` and the watcher.

1. A running UEFI+TPM VM gets a ``block`` device-state section hot-added with
   ``nvmgr attach --live --config``: the bytes given before the attach are what the
   running QEMU reads from the new node (exported over NBD through QMP); the
   image grew, the old sections did not move; after destroy and start the
   device is still there (on a PCIe root port nvmgr added), and ``check``
   passes.  Live detach of a second one hot-plugged in the same run:
   ``nvmgr detach --live --config`` takes it out of the running QEMU (device and block nodes) and the
   definition, keeps its bytes, and the next start is without it.
2. ``--live`` of a fw_cfg section or a ``<tpm>`` is refused (exit 13, its
   message, the image untouched); ``--config`` works and the next boot shows
   the fw_cfg blob to the guest (OVMF's shell reads it through fw_cfg DMA).
3. A NIC added with plain ``virsh attach-device --config`` to a domain whose
   metadata asks for an EEPROM per NIC gets its section from the watcher before
   the next start, which verifies it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lxml import etree

from . import vmlib, watchlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

NS = vmlib.NVMGR_NS
STATE = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='state0' size='64K' binding='block' "
         "driver='virtio-blk-pci' device='nvmgr-state0'/>")
FW_NAME = "opt/org.nvmgr/vpd1"
VPD = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='vpd1' kind='pci-vpd' binding='fwcfg' "
       f"fwcfg-name='{FW_NAME}'/>")
TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


def _edit(v: vmlib.VM, *, root_ports: int = 0, per_device: str | None = None,
          native_hotplug: bool = False) -> None:
    """Spare PCIe root ports (q35 hot-plugs only there) and/or a per-device rule.

    *native_hotplug*: the root ports' native PCIe hot-plug instead of q35's
    ACPI one (QEMU 7.2's default), whose unplug waits for an operating system
    to eject the device: OVMF's shell never does; with native hot-plug, QEMU
    removes a device from a slot the guest never powered on at once (both
    measured with QEMU 7.2: ``device_del``, then ``qom-list``)."""
    root = etree.fromstring(v.xml.encode())
    devices = root.find("devices")
    assert devices is not None
    if native_hotplug:
        qns = vmlib.QEMU_NS
        cl = root.find(f"{{{qns}}}commandline")
        if cl is None:
            cl = etree.SubElement(root, f"{{{qns}}}commandline", nsmap={"qemu": qns})
        for value in ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"):
            etree.SubElement(cl, f"{{{qns}}}arg", value=value)
    if root_ports:  # libvirt numbers controllers from pcie-root's index 0
        etree.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    for i in range(root_ports):
        etree.SubElement(devices, "controller", type="pci", index=str(i + 1),
                         model="pcie-root-port")
    if per_device is not None:
        md = root.find("metadata")
        if md is None:
            md = etree.Element("metadata")
            root.find("uuid").addnext(md)  # type: ignore[union-attr]
        nv = md.find(f"{{{NS}}}nvram")
        if nv is None:
            nv = etree.SubElement(md, f"{{{NS}}}nvram", nsmap={"nvmgr": NS})
        etree.SubElement(nv, f"{{{NS}}}per-device", kind=per_device)
    v.xml = etree.tostring(root, encoding="unicode")
    v.xml_path.write_text(v.xml)


def _offsets(image: Path) -> dict[str, tuple[int, ...]]:
    """Where each section lives: its slot (live) or its two slots (a write
    alternates between them: the TPM's collect at every stop flips it)."""
    return {s["name"]: tuple(sorted(x for x in (s["offset"], s["spare"]) if x is not None))
            for s in vmlib.info(image)["sections"]}  # type: ignore[index]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_live_block_attach_reaches_the_running_qemu_and_the_next_boot(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("attach")
    _edit(v, root_ports=2, native_hotplug=True)
    v.define()
    v.start()
    old = _offsets(v.image)
    assert set(old) >= {"uefi-vars", "tpm-permall"}
    size_before = vmlib.info(v.image)["image_size"]
    data = os.urandom(64 << 10)
    blob = tmp_path / "state0.img"
    blob.write_bytes(data)

    out = json.loads(vmlib.nvmgr("attach", v.name, _write(tmp_path, "state0.xml", STATE),
                                 "--live", "--config", "--data", blob, "-O", "json").stdout)
    assert out["added"] == ["state0"] and out["live"] and out["config"], out
    assert "nvmgr-state0" in out["plugged"], out
    # The running QEMU serves the new node; its bytes are the ones given before the attach.
    assert vmlib.nbd_read(v.name, "nvmgr-state0", len(data), tmp_path) == data
    peripherals = {p["name"] for p in vmlib.qmp(v.name, "qom-list",  # type: ignore[union-attr]
                                                 {"path": "/machine/peripheral"})}
    assert "nvmgr-state0" in peripherals, peripherals
    # The image grew; nothing that was there moved.
    now = _offsets(v.image)
    assert {k: now[k] for k in old} == old
    assert vmlib.info(v.image)["image_size"] > size_before  # type: ignore[operator]
    persistent = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "nvmgr-state0" in persistent and "virtio-blk-pci" in persistent
    assert "state0" in vmlib.virsh("dumpxml", v.name).stdout  # the live metadata says it too

    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
    v.start()
    args = vmlib.qemu_cmdline(v.name)
    assert any('"node-name":"nvmgr-state0"' in a for a in args), args
    assert any('"drive":"nvmgr-state0"' in a for a in args), args
    assert vmlib.nbd_read(v.name, "nvmgr-state0", len(data), tmp_path) == data
    assert _offsets(v.image) == now

    # state0 was plugged at this start on a PCIe root port nvmgr added to the
    # definition (q35's root bus takes no hot-unplug); its live detach, with a
    # guest that accepts it, and the refusal for a domain without such a port
    # are in test_detach_boot.py.
    dev = next(json.loads(a) for a in args if '"drive":"nvmgr-state0"' in a)
    assert str(dev.get("bus", "")).startswith("ua-nvmgr-port-"), dev
    # A section hot-plugged in this run (on a PCIe root port) goes out of the
    # running QEMU (device and block nodes) and the definition; its bytes stay.
    data1 = os.urandom(64 << 10)
    (tmp_path / "state1.img").write_bytes(data1)
    state1 = _write(tmp_path, "state1.xml", STATE.replace("state0", "state1"))
    vmlib.nvmgr("attach", v.name, state1, "--live", "--config", "--data", tmp_path / "state1.img")
    assert "nvmgr-state1" in _peripherals(v)
    out = json.loads(vmlib.nvmgr("detach", v.name, state1, "--live", "--config",
                                 "-O", "json").stdout)
    assert out["unplugged"] == ["state1"] and out["kept"] == ["state1"], out
    assert not out["removed"], out
    assert "nvmgr-state1" not in _peripherals(v) and "nvmgr-state0" in _peripherals(v)
    nodes = {n["node-name"] for n in vmlib.qmp(v.name, "query-named-block-nodes",  # type: ignore[union-attr]
                                                {"flat": True})}
    assert not {n for n in nodes if "state1" in n} and "nvmgr-state0" in nodes, nodes
    assert "state1" not in vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "state1" not in vmlib.virsh("dumpxml", v.name).stdout  # the live metadata too
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
    assert v.get("state1")[:len(data1)] == data1  # kept (no --remove-section)
    assert v.get("state0")[:len(data)] == data
    v.start()  # the next start: state0, without state1
    args = vmlib.qemu_cmdline(v.name)
    assert not any("state1" in a for a in args), args
    assert any('"drive":"nvmgr-state0"' in a for a in args), args
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)


def _peripherals(v: vmlib.VM) -> set[str]:
    return {p["name"] for p in vmlib.qmp(v.name, "qom-list",  # type: ignore[union-attr]
                                         {"path": "/machine/peripheral"})}


def test_fwcfg_and_tpm_refuse_live_and_work_with_config(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("attach-fwcfg", tpm=False, serial_socket=True)
    v.define()
    v.start()
    before = vmlib.sha256(v.image)
    vpd = os.urandom(700)
    blob = tmp_path / "vpd.bin"
    blob.write_bytes(vpd)
    dev = _write(tmp_path, "vpd.xml", VPD)
    p = vmlib.nvmgr("attach", v.name, dev, "--live", "--config", "--data", blob, check=False)
    assert p.returncode == 13, p
    assert "binding fwcfg" in p.stderr and "cannot be hot-plugged" in p.stderr, p.stderr
    assert "--config" in p.stderr
    p = vmlib.nvmgr("attach", v.name, _write(tmp_path, "tpm.xml", TPM), "--live", check=False)
    assert p.returncode == 13 and "a <tpm> cannot be hot-plugged" in p.stderr, p
    assert vmlib.sha256(v.image) == before  # refused before anything was written
    assert "vpd1" not in vmlib.virsh("dumpxml", "--inactive", v.name).stdout

    out = json.loads(vmlib.nvmgr("attach", v.name, dev, "--config", "--data", blob,
                                 "-O", "json").stdout)
    assert out["added"] == ["vpd1"] and not out["live"], out
    v.destroy()
    v.start()
    assert v.socket is not None
    with vmlib.Shell(v.socket) as sh:
        sh.wait_prompt(vmlib.serial_log(v.name), 90)
        assert sh.fw_cfg_read(FW_NAME) == vpd
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)


def test_watcher_gives_a_nic_added_by_virsh_its_section_before_the_next_start(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("attach-watch", tpm=False)
    _edit(v, per_device="nic-eeprom")
    v.define()
    nic = _write(tmp_path, "nic.xml", "<interface type='user'><mac address='52:54:00:7a:11:e1'/>"
                                      "<model type='virtio'/></interface>")
    with watchlib.watching() as w:
        # Its first look at every domain done (a define racing it could be undone).
        w.wait_line(f"{v.name}: unchanged", stream="out")
        vmlib.virsh("attach-device", v.name, str(nic), "--config")
        line = w.wait_line(f"{v.name}: reconciled (added eeprom-5254007a11e1)", stream="out")
    assert line
    sec = vmlib.section_info(v.image, "eeprom-5254007a11e1")
    assert sec["binding"] == "opaque" and sec["capacity"] == 32 << 10, sec
    after = vmlib.hook_log_lines()
    v.start()
    vmlib.wait_hook_log(rf"{v.name} prepare begin.*verified", after=len(after))
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
