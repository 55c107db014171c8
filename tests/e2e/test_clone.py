"""Clones never share their original's state (ANCHORS: clones sharing one NVRAM file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def _get(image: Path, section: str, out: Path) -> bytes:
    vmlib.nvmgr("get", image, section, "-o", out)
    return out.read_bytes()


def _clone_xml(xml: str, name: str, dom_uuid: str) -> str:
    """What virt-clone leaves for a disk-less VM: the XML, renamed, with a new UUID."""
    root = etree.fromstring(xml.encode())
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = dom_uuid  # type: ignore[union-attr]
    for src in root.iterfind("devices/*/source[@path]"):  # its own serial log
        src.set("path", str(vmlib.serial_log(name)))
    return etree.tostring(root, encoding="unicode")


def test_a_clone_gets_its_own_image_and_a_shared_one_is_refused(vm: MakeVM,
                                                                tmp_path: Path) -> None:
    orig = vm("orig", tpm=True)
    orig.define()
    orig.start()
    vmlib.wait_for_shell(orig.name)
    orig.destroy()
    assert vmlib.section_info(orig.image, "tpm-permall")["length"]
    orig_sha = vmlib.sha256(orig.image)
    xml = vmlib.virsh("dumpxml", "--inactive", orig.name).stdout

    # A clone defined with plain virsh shares the original's image: its start is refused.
    clone = vm("clone")
    shared = tmp_path / "shared.xml"
    shared.write_text(_clone_xml(xml, clone.name, clone.uuid))
    vmlib.virsh("define", str(shared))
    p = vmlib.start(clone.name, check=False)
    assert p.returncode != 0 and f"belongs to domain {orig.uuid}" in p.stderr, p.stderr
    assert vmlib.sha256(orig.image) == orig_sha
    assert vmlib.state(clone.name) == "shut off"

    # nvmgr define on the clone's XML copies the image: vars kept, TPM fresh, new owner.
    out = json.loads(vmlib.nvmgr("define", shared, "--output", "json").stdout)
    assert out["image"] == str(clone.image) and out["image"] != str(orig.image)
    assert "copied from" in out["imported"]["*"]
    info = vmlib.info(clone.image)
    assert info["domain_uuid"] == clone.uuid
    assert info["image_uuid"] != vmlib.info(orig.image)["image_uuid"]
    assert vmlib.section_info(clone.image, "tpm-permall")["length"] == 0
    assert (_get(clone.image, "uefi-vars", tmp_path / "c.fd")
            == _get(orig.image, "uefi-vars", tmp_path / "o.fd"))
    clone.start()
    vmlib.wait_for_shell(clone.name)
    clone.destroy()
    assert vmlib.sha256(orig.image) == orig_sha  # the original was never touched
    ek_orig = vmlib.read_ek(_get(orig.image, "tpm-permall", tmp_path / "p1"), tmp_path)
    ek_clone = vmlib.read_ek(_get(clone.image, "tpm-permall", tmp_path / "p2"), tmp_path)
    assert ek_orig[0] != ek_clone[0]  # a clone is a new machine: its own TPM identity
