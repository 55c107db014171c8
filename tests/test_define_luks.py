"""qcow2+LUKS is planned for in the metadata but not built: define and the hook say so."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from nvmgr.errors import UsageError
from nvmgr.hook import entry as hook
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


def test_define_refuses_luks_before_writing_anything(tmp_path: Path) -> None:
    image = tmp_path / "luks.nvram"
    with pytest.raises(UsageError, match="qcow2\\+LUKS images are not supported yet"):
        define(XML.format(image=image), uri="test:///default")
    assert not image.exists()


def test_the_hook_refuses_a_luks_domain_at_prepare(tmp_path: Path) -> None:
    image = tmp_path / "luks.nvram"
    err = io.StringIO()
    code = hook.main(["qemu", "luks-vm", "prepare", "begin", "-"],
                     io.BytesIO(XML.format(image=image).encode()), io.StringIO(), err,
                     log_file=str(tmp_path / "hook.log"))
    assert code == 2 and "not supported yet" in err.getvalue()
    assert not image.exists()
