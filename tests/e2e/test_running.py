"""A running VM: its image is QEMU's (writes refused), libvirtd restarts (reconnect), and a
missing image is made again from the template at the next start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def test_a_running_vm_owns_its_image(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("busy")
    v.define()
    v.start()
    (tmp_path / "vars.bin").write_bytes(os.urandom(4096))
    p = vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", tmp_path / "vars.bin", check=False)
    assert p.returncode == 7, p
    assert "running QEMU holds the image" in p.stderr
    p = vmlib.nvmgr("define", v.xml_path, check=False)
    assert p.returncode == 7 and "running" in p.stderr, p
    p = vmlib.nvmgr("undefine", v.name, "--remove-nvram", check=False)
    assert p.returncode == 7 and v.image.exists(), p
    assert v.state() == "running"
    v.destroy()
    vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", tmp_path / "vars.bin")  # now it may


def test_libvirtd_restart_reconnects_and_keeps_the_section_in_use(vm: MakeVM) -> None:
    v = vm("reconnect")
    v.define()
    v.start()
    assert v.section("uefi-vars")["dirty"] is True
    mark = len(vmlib.hook_log_lines())
    vmlib.restart_libvirtd()
    line = vmlib.wait_hook_log(rf"{v.name} reconnect begin: ", after=mark)
    assert "uefi-vars" in line and "marked in use" in line, line
    assert v.state() == "running"
    assert v.section("uefi-vars")["dirty"] is True
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark)
    assert v.section("uefi-vars")["dirty"] is False
    vmlib.nvmgr("check", v.image)


def test_prepare_makes_a_missing_image_again(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("recreate")
    v.define()
    image_uuid = vmlib.info(v.image)["image_uuid"]
    v.image.unlink()
    v.start()  # prepare creates the image from the plan, vars from the template
    assert v.image.exists()
    v.wait_for_shell(60)
    v.destroy()
    d = vmlib.info(v.image)
    assert d["image_uuid"] == image_uuid  # still the image the domain's metadata names
    (tmp_path / "vars.fd").write_bytes(v.get("uefi-vars"))
    assert "BootOrder" in vmlib.uefi_vars(tmp_path / "vars.fd")
    v.start()  # and the next start takes it as the domain's own
    v.destroy()
    vmlib.nvmgr("check", v.image)
