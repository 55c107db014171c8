"""define is idempotent; undefine has virsh's --keep-nvram / --remove-nvram semantics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def _layout(image: Path) -> tuple[object, object, list[tuple[object, ...]]]:
    d = vmlib.info(image)
    secs = [(s["name"], s["offset"], s["spare"], s["capacity"], s["crc32"])
            for s in d["sections"]]  # type: ignore[attr-defined]
    return d["image_uuid"], d["generation"], secs


def test_define_twice_changes_nothing(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("idem")
    first = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)
    assert first["created"] is True
    xml1 = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    # Vars that differ from the template, as after a boot: define must keep them.
    own = os.urandom(int(v.section("uefi-vars")["capacity"]))  # type: ignore[call-overload]
    (tmp_path / "vars.bin").write_bytes(own)
    vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", tmp_path / "vars.bin")
    layout1 = _layout(v.image)

    # Again from the user's file, then from libvirt's (already rewritten) definition.
    again = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)
    assert (again["created"], again["added"], again["imported"]) == (False, [], {})
    assert again["image_uuid"] == first["image_uuid"]
    assert vmlib.virsh("dumpxml", "--inactive", v.name).stdout == xml1
    (tmp_path / "dumped.xml").write_text(xml1)
    vmlib.nvmgr("define", tmp_path / "dumped.xml")
    assert vmlib.virsh("dumpxml", "--inactive", v.name).stdout == xml1
    assert _layout(v.image) == layout1  # same uuid, generation, offsets, slots, crcs
    assert v.get("uefi-vars") == own


def test_undefine_keeps_or_removes_the_image_as_virsh_does(vm: MakeVM) -> None:
    v = vm("undef")
    v.define()
    p = vmlib.nvmgr("undefine", v.name, check=False)
    assert p.returncode == 2 and "--keep-nvram or --remove-nvram" in p.stderr, p
    assert vmlib.exists(v.name) and v.image.exists()

    image_uuid = vmlib.info(v.image)["image_uuid"]
    vmlib.nvmgr("undefine", v.name, "--keep-nvram")
    assert not vmlib.exists(v.name) and v.image.exists()

    again = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)
    assert again["created"] is False and again["image_uuid"] == image_uuid
    v.start()
    v.destroy()
    assert (vmlib.SWTPM_ROOT / v.uuid).is_dir()  # libvirt's swtpm staging directory
    vmlib.nvmgr("undefine", v.name, "--remove-nvram")
    assert not vmlib.exists(v.name)
    assert not v.image.exists()
    assert not (vmlib.SWTPM_ROOT / v.uuid).exists()
    p = vmlib.nvmgr("undefine", v.name, check=False)
    assert p.returncode == 3
