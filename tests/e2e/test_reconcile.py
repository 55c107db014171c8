"""reconcile: a domain changed behind nvmgr's back (virsh edit, virt-manager) is brought back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

NVMGR_NS = "https://nvmgr.dev/schemas/metadata/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _edited(xml: str, *, add_section: bool, drop_commandline: bool) -> str:
    """What another tool might leave: a new metadata section, no qemu:commandline."""
    root = etree.fromstring(xml.encode())
    if add_section:
        nv = root.find(f"metadata/{{{NVMGR_NS}}}nvram")
        assert nv is not None
        etree.SubElement(nv, f"{{{NVMGR_NS}}}section", name="vpd0", kind="pci-vpd",
                         binding="fwcfg", attrib={"fwcfg-name": "opt/org.nvmgr/vpd"})
    if drop_commandline:
        for cl in root.findall(f"{{{QEMU_NS}}}commandline"):
            root.remove(cl)
    return etree.tostring(root, encoding="unicode")


def _virsh_define(xml: str, tmp_path: Path) -> None:
    path = tmp_path / "edited.xml"
    path.write_text(xml)
    vmlib.virsh("define", str(path))


def test_reconcile_restores_arguments_and_adds_new_sections(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("reconcile", tpm=False)
    v.define()
    defined = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "pflash1=nvmgr-uefi-vars" in defined
    _virsh_define(_edited(defined, add_section=True, drop_commandline=True), tmp_path)
    assert "pflash1" not in vmlib.virsh("dumpxml", "--inactive", v.name).stdout

    out = json.loads(vmlib.nvmgr("reconcile", v.name, "--output", "json").stdout)
    assert out["domains"] == [{"domain": v.name, "status": "reconciled", "added": ["vpd0"],
                               "adopted": False, "moved_aside": None, "in_members": {}}]
    now = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "pflash1=nvmgr-uefi-vars" in now and "opt/org.nvmgr/vpd" in now
    assert vmlib.section_info(v.image, "vpd0")["binding"] == "fwcfg"

    again = json.loads(vmlib.nvmgr("reconcile", v.name, "--output", "json").stdout)
    assert again["domains"][0]["status"] == "unchanged"
    v.start()
    try:
        running = json.loads(vmlib.nvmgr("reconcile", v.name, "--output", "json").stdout)
        assert running["domains"][0]["status"] == "running"
    finally:
        v.destroy()


def test_watch_reconciles_on_define_and_settles(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("watch", tpm=False)
    v.define()
    defined = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "nvmgr", "reconcile", v.name, "--watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"{v.name}: unchanged"
        _virsh_define(_edited(defined, add_section=False, drop_commandline=True), tmp_path)
        deadline = time.monotonic() + 30
        while "pflash1=nvmgr-uefi-vars" not in vmlib.virsh("dumpxml", "--inactive",
                                                          v.name).stdout:
            assert time.monotonic() < deadline, "the watcher did not restore the arguments"
            time.sleep(0.2)
        # Its own define raises an event too: it must not keep redefining.
        generation = vmlib.info(v.image)["generation"]
        xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
        time.sleep(3)
        assert vmlib.info(v.image)["generation"] == generation
        assert vmlib.virsh("dumpxml", "--inactive", v.name).stdout == xml
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == [f"{v.name}: reconciled"], (out, err)  # once, not in a loop
    assert "Traceback" not in err
