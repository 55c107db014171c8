"""``luks='yes'`` and keys: a domain with a key gets its live sections as LUKS
volumes; ``luks='yes'`` without a key is refused by define and the hook."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_key

from nvmgr.crypto.cipher import Kek
from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.errors import UsageError
from nvmgr.format.model import LUKS_HEADER_SIZE
from nvmgr.hook import entry as hook
from nvmgr.image.image import Image
from nvmgr.virt.define import define

XML = """<domain type='qemu'>
  <name>luks-vm</name>
  <uuid>0b5c1a52-55d8-4a0e-9d7e-3f0a7d3c9a11</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1"
                 image="{image}" format="qcow2" luks="yes"/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
</domain>"""

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
UEFI_XML = f"""<domain type='qemu'>
  <name>luks-uefi</name>
  <uuid>0b5c1a52-55d8-4a0e-9d7e-3f0a7d3c9a12</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1" image="{{image}}"/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>
    <nvram template='{OVMF_VARS}'/>
  </os>
  <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>
</domain>"""


def test_define_refuses_luks_without_a_key_before_writing_anything(tmp_path: Path) -> None:
    image = tmp_path / "luks.nvram"
    with pytest.raises(UsageError, match="luks='yes'.*names none: give --key-file"):
        define(XML.format(image=image), uri="test:///default")
    assert not image.exists()


def test_the_hook_refuses_a_luks_domain_without_a_key_at_prepare(tmp_path: Path) -> None:
    image = tmp_path / "luks.nvram"
    err = io.StringIO()
    code = hook.main(["qemu", "luks-vm", "prepare", "begin", "-"],
                     io.BytesIO(XML.format(image=image).encode()), io.StringIO(), err,
                     log_file=str(tmp_path / "hook.log"))
    assert code == 2 and "names none" in err.getvalue()
    assert not image.exists()


@pytest.mark.skipif(not (os.path.isfile(OVMF_CODE) and os.path.isfile(OVMF_VARS))
                    or shutil.which("qemu-img") is None, reason="needs OVMF and qemu-img")
@pytest.mark.parametrize("luks", ["", " luks='yes'"])
def test_define_with_a_key_makes_the_vars_a_luks_volume_holding_the_template(
        tmp_path: Path, luks: str, libvirt_secrets: dict[str, object]) -> None:
    image = tmp_path / "uefi.nvram"
    key = make_key(tmp_path / "k.key")
    xml = UEFI_XML.format(image=image).replace('"/>', f'"{luks}/>', 1)
    res = define(xml, uri="test:///default", kek=Kek(key.read_bytes()), key_file=str(key))
    assert res.imported["uefi-vars"] == f"template {OVMF_VARS}"
    template = Path(OVMF_VARS).read_bytes()
    with Image.open(str(image), kek=Kek(key.read_bytes())) as img:
        s = img.section("uefi-vars")
        assert s.luks and s.payload == len(template)
        assert s.capacity == len(template) + LUKS_HEADER_SIZE
        assert img.get("uefi-vars") == template
    raw = image.read_bytes()
    assert template[:4096] not in raw and "NvVars".encode("utf-16-le") not in raw
    args = parse_domain(res.xml).qemu_args
    assert f"pflash1={qemuargs.luks_node_name('uefi-vars')}" in args
    assert key.read_bytes().hex() not in res.xml
