"""5. A blob put with ``nvmgr put`` is what QEMU exposes: the guest reads the VPD blob from
fw_cfg, and QEMU's block layer serves the block section's bytes.

What is proven, and how:

- fwcfg (VPD): the *guest* reads it.  OVMF's shell, driven over the serial port, writes a
  fw_cfg DMA request (mm) and dumps the memory QEMU copied the file into (dmem).  The staged
  file is zeroed before, so the bytes come from the copy QEMU loaded at start through the
  domain's ``-fw_cfg`` argument (also checked on QEMU's command line).
- block (an EEPROM image): QEMU exports its own ``nvmgr-eeprom0`` node (the raw slice a
  device's ``drive=`` would name) over NBD through QMP, and qemu-img reads it: the bytes
  come out of QEMU's block layer.  No guest device reads it in this test (x86 has no EEPROM
  device that takes a drive); that a device sees the node is QEMU's business.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

FW_NAME = "opt/org.nvmgr/vpd"
SECTIONS = [
    {"name": "vpd0", "kind": "pci-vpd", "binding": "fwcfg", "fwcfg-name": FW_NAME},
    {"name": "eeprom0", "size": "64K", "binding": "block"},
]


def test_put_blobs_are_what_qemu_and_the_guest_read(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("blob", tpm=False, sections=SECTIONS, serial_socket=True)
    v.define()
    vpd = os.urandom(1000)
    eeprom = os.urandom(64 << 10)
    (tmp_path / "vpd.bin").write_bytes(vpd)
    (tmp_path / "eeprom.bin").write_bytes(eeprom)
    vmlib.nvmgr("put", "--domain", v.name, "vpd0", tmp_path / "vpd.bin")
    vmlib.nvmgr("put", "--domain", v.name, "eeprom0", tmp_path / "eeprom.bin")

    v.start()
    staged = v.runtime_dir / "vpd0"
    # prepare staged the fwcfg section where the domain's -fw_cfg points, for QEMU's user only.
    assert staged.read_bytes() == vpd
    assert staged.stat().st_mode & 0o777 == 0o600
    args = vmlib.qemu_cmdline(v.name)
    assert f"name={FW_NAME},file={staged}" in args, args

    # The block section: QEMU exports its own node over NBD (QMP), qemu-img reads it.
    assert vmlib.nbd_read(v.name, "nvmgr-eeprom0", len(eeprom), tmp_path) == eeprom

    # The fwcfg section: the guest itself fetches the file through QEMU's fw_cfg device
    # (OVMF's shell, mm/dmem over the serial port, fw_cfg DMA), reading QEMU's copy.
    staged.write_bytes(bytes(len(vpd)))  # QEMU read the file at start; this copy no longer matters
    assert v.socket is not None
    with vmlib.Shell(v.socket) as sh:
        sh.wait_prompt(vmlib.serial_log(v.name), 60)
        got = sh.fw_cfg_read(FW_NAME)
        assert sh.fw_cfg_dir[FW_NAME][1] == len(vpd), sh.fw_cfg_dir
        assert got == vpd

    v.destroy()
    assert not v.runtime_dir.exists()  # release removed the staged files
    assert v.get("vpd0") == vpd and v.get("eeprom0") == eeprom
