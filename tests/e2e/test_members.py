"""Member images with a real libvirtd, QEMU (TCG), OVMF and swtpm (issue 7, 3.4 and 3.5).

4. The UEFI variables split into a member image in another directory: the VM
   boots, OVMF writes its variables into the member (QEMU's pflash slice lies
   in the member's file); a backup of the running VM holds them (one file),
   and restore puts them back into the member; merged back, the VM boots
   again with the same boot entries.
5. A domain with a maximum image size: a section added after define (the
   metadata gains a section, ``nvmgr reconcile``; ``nvmgr attach`` is the
   other engineer's branch) goes into a new member instead of growing the
   image, nvmgr says so, and the VM starts with QEMU reading the new block
   section from the member's file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

NVMGR_NS = "https://nvmgr.dev/schemas/metadata/1"


@pytest.fixture
def member_dir() -> Iterator[Path]:
    """Another directory than the images' own, readable by QEMU's user."""
    d = Path("/var/lib/libvirt/nvmgr-e2e-members")
    d.mkdir(mode=0o711, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _boot_entries(path: Path) -> dict[str, str]:
    got = vmlib.uefi_vars(path)
    return {k: v for k, v in got.items() if k.startswith("Boot0")}


def test_uefi_vars_in_a_member_then_merged_back(vm: MakeVM, tmp_path: Path,
                                                 member_dir: Path) -> None:
    v = vm("member")
    v.define()
    member = member_dir / f"{v.name}.vars.nvram"
    v.extra_files.append(member)
    out = vmlib.nvmgr("split", "--domain", v.name, "uefi-vars", "--into", member).stdout
    assert f"member 1 ({member})" in out and f"domain {v.name}: reconciled" in out, out
    info = vmlib.info(v.image)
    assert [m["path"] for m in info["members"]] == [str(member)]  # type: ignore[union-attr]
    s = v.section("uefi-vars")
    assert s["member"] == 1
    # The domain's QEMU arguments now open the member and slice it.
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert str(member) in xml and "nvmgr-m1-file" in xml and "pflash1=nvmgr-uefi-vars" in xml

    v.start()
    block = vmlib.virsh("qemu-monitor-command", v.name, "--hmp", "info block").stdout
    assert "nvmgr-uefi-vars" in block and str(member) in block and "system.flash1" in block
    assert v.section("uefi-vars")["dirty"] is True  # the member's in-use mark
    secs = v.wait_for_shell(60)
    print(f"OVMF on a member reached its shell in {secs:.1f} s")
    # A backup of the running VM follows the member: one file, every section in it,
    # the vars read from the member's slice while the guest is paused.
    backup = tmp_path / "backup.nvram"
    out = vmlib.nvmgr_json("backup", "--domain", v.name, backup, "-O", "json")
    assert out["running"] and "uefi-vars" in out["sections"], out  # type: ignore[operator]
    vmlib.nvmgr("check", backup)
    assert not vmlib.info(backup)["members"]
    vmlib.nvmgr("get", backup, "uefi-vars", "-o", tmp_path / "backup.fd")
    backed = (tmp_path / "backup.fd").read_bytes()
    v.destroy()

    vmlib.nvmgr("check", v.image)  # every member: UUID, parent link, crc
    s = v.section("uefi-vars")
    assert s["dirty"] is False
    vars_member = v.get("uefi-vars")
    # OVMF wrote into the member's file: the bytes at the section's offset there.
    with open(member, "rb") as f:
        f.seek(int(s["offset"]))  # type: ignore[arg-type]
        assert f.read(len(vars_member)) == vars_member
    (tmp_path / "split.fd").write_bytes(vars_member)
    entries = _boot_entries(tmp_path / "split.fd")
    assert any('"EFI Internal Shell"' in t for t in entries.values()), entries
    assert _boot_entries(tmp_path / "backup.fd") == entries
    # restore puts the backup's vars back where the domain keeps them: the member.
    vmlib.nvmgr("restore", "--domain", v.name, backup)
    assert v.section("uefi-vars")["member"] == 1 and v.get("uefi-vars") == backed
    vars_member = backed
    assert "BootOrder" in vmlib.uefi_vars(tmp_path / "split.fd")

    out = vmlib.nvmgr("merge", "--domain", v.name, member).stdout
    assert "member file removed" in out and f"domain {v.name}: reconciled" in out, out
    assert not member.exists()
    assert not vmlib.info(v.image)["members"]
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert str(member) not in xml and "nvmgr-m1-file" not in xml
    assert v.get("uefi-vars") == vars_member  # merged back byte for byte

    v.start()
    v.wait_for_shell(60)
    v.destroy()
    vmlib.nvmgr("check", v.image)
    (tmp_path / "merged.fd").write_bytes(v.get("uefi-vars"))
    assert _boot_entries(tmp_path / "merged.fd") == entries


def test_max_image_size_splits_a_new_section_into_a_member(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("autosplit", tpm=False)
    plan = vmlib.nvmgr_json("plan", v.xml_path, "-O", "json")
    limit = int(plan["image"]["size"]) + (64 << 10)  # type: ignore[index]
    v.xml = vmlib.domain_xml(v.name, v.uuid, tpm=False,
                             metadata_attrs={"max-image-size": str(limit)})
    v.xml_path.write_text(v.xml)
    v.define()
    size_before = os.path.getsize(v.image)
    assert size_before <= limit and not vmlib.info(v.image)["members"]

    # A section added after define: the domain's metadata gains a block section of
    # 256 KiB (past the limit), as virsh edit would; reconcile grows the domain.
    root = etree.fromstring(vmlib.virsh("dumpxml", "--inactive", v.name).stdout.encode())
    nv = root.find(f"metadata/{{{NVMGR_NS}}}nvram")
    assert nv is not None and nv.get("max-image-size") == str(limit)
    etree.SubElement(nv, f"{{{NVMGR_NS}}}section",
                     {"name": "eeprom0", "size": "256K", "binding": "block"})
    edited = tmp_path / "edited.xml"
    edited.write_bytes(etree.tostring(root))
    vmlib.virsh("define", str(edited))
    out = vmlib.nvmgr("reconcile", v.name).stdout
    member = Path(str(v.image).removesuffix(".nvram") + ".m1.nvram")
    v.extra_files.append(member)
    assert f"eeprom0 placed in member image {member} (max-image-size)" in out, out
    assert os.path.getsize(v.image) == size_before  # the image did not grow
    assert os.path.getsize(member) <= limit
    info = vmlib.info(v.image)
    assert [m["path"] for m in info["members"]] == [str(member)]  # type: ignore[union-attr]
    assert v.section("eeprom0")["member"] == 1
    vmlib.nvmgr("check", v.image)

    data = os.urandom(256 << 10)
    (tmp_path / "eeprom.bin").write_bytes(data)
    vmlib.nvmgr("put", "--domain", v.name, "eeprom0", tmp_path / "eeprom.bin")
    v.start()
    args = " ".join(vmlib.qemu_cmdline(v.name))  # the slice sits on the member's file node
    assert f'"filename":"{member}","node-name":"nvmgr-m1-file"' in args, args
    assert '"file":"nvmgr-m1-file"' in args and '"node-name":"nvmgr-eeprom0"' in args, args
    assert vmlib.nbd_read(v.name, "nvmgr-eeprom0", len(data), tmp_path) == data
    v.destroy()
    vmlib.nvmgr("check", v.image)
    assert v.get("eeprom0") == data

    # undefine --remove-nvram removes the members too.
    vmlib.nvmgr("undefine", v.name, "--remove-nvram")
    assert not v.image.exists() and not member.exists()
