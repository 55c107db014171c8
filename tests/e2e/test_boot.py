"""1. UEFI + TPM 2.0: OVMF boots with its variables in the image's pflash section."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_ovmf_writes_its_boot_entries_into_the_image(vm: MakeVM, tmp_path: Path, fmt: str) -> None:
    v = vm(f"boot-{fmt}")
    out = v.define("--format", fmt)
    assert "imported: uefi-vars from template" in out.stdout
    assert vmlib.info(v.image)["format"] == fmt

    # The domain QEMU gets: libvirt's own vars file gone, a raw slice of the image on pflash1.
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "<nvram" not in xml and "stateless='yes'" in xml
    assert "pflash1=nvmgr-uefi-vars" in xml and str(v.image) in xml
    before = v.get("uefi-vars")
    assert before == TEMPLATE.read_bytes()  # fresh from the template, byte for byte
    template_vars = vmlib.uefi_vars(TEMPLATE)
    assert "BootOrder" not in template_vars
    assert not any(k.startswith("Boot0") for k in template_vars)

    v.start()
    # QEMU really runs on the image's slice, and the section is flagged in use while it does.
    block = vmlib.virsh("qemu-monitor-command", v.name, "--hmp", "info block").stdout
    assert "nvmgr-uefi-vars" in block and str(v.image) in block and "system.flash1" in block
    if fmt == "qcow2":  # the slice sits on QEMU's qcow2 driver, not on the file
        assert '"driver": "qcow2"' in block, block
    assert v.section("uefi-vars")["dirty"] is True
    secs = v.wait_for_shell(60)
    print(f"OVMF reached its shell in {secs:.1f} s")
    v.destroy()

    # release resealed the section: crc valid again, no longer in use, check passes.
    s = v.section("uefi-vars")
    assert s["dirty"] is False
    vmlib.nvmgr("check", v.image)
    after = v.get("uefi-vars")
    assert after != before and len(after) == len(before)
    (tmp_path / "vars.fd").write_bytes(after)
    got = vmlib.uefi_vars(tmp_path / "vars.fd")
    # The boot entries OVMF wrote on its first boot, absent from the template.
    assert "BootOrder" in got, got
    titles = [desc for name, desc in got.items() if name.startswith("Boot0")]
    assert any('"EFI Internal Shell"' in t for t in titles), titles
    assert any('"UiApp"' in t for t in titles), titles
    # Only the slice changed: the libvirt vars file the example names was never created.
    assert not Path(f"/var/lib/libvirt/qemu/nvram/{v.name}_VARS.fd").exists()
