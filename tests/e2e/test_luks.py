"""Issue 8, part 1: a domain with a key keeps its UEFI vars in a LUKS volume
inside the pflash slice; QEMU's ``luks`` driver opens it with a passphrase it
reads from a runtime file that the ``started`` hook removes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.domain.qemuargs import luks_node_name, vtpm_secret_uuid
from nvmgr.image.image import Image
from nvmgr.provision.vtpm import blob_kind

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_ORDER = "BootOrder".encode("utf-16-le")


def test_ovmf_boots_with_its_vars_in_a_luks_volume_inside_the_slice(vm: MakeVM,
                                                                    tmp_path: Path) -> None:
    key = tmp_path / "vm.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    kek_hex = key.read_bytes().hex()
    v = vm("luks")
    out = v.define("--key-file", str(key))
    assert "imported: uefi-vars from template" in out.stdout
    s = v.section("uefi-vars")
    assert s["encrypted"] is True and s["live"] is True
    with Image.open(str(v.image), kek=Kek(key.read_bytes())) as img:
        phrase = img.luks_passphrase().decode()
        payload = img.section("uefi-vars").payload
    assert payload == TEMPLATE.stat().st_size

    # The domain: a luks node on the raw slice, pflash1 on it, the key only by file name.
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    node = luks_node_name("uefi-vars")
    assert f"pflash1={node}" in xml and "secret,id=nvmgr-key" in xml
    assert f"file={v.runtime_dir}/image.key" in xml
    assert phrase not in xml and kek_hex not in xml
    assert v.get("uefi-vars", "--key-file", str(key)) == TEMPLATE.read_bytes()
    assert BOOT_ORDER not in v.image.read_bytes()

    mark = len(vmlib.hook_log_lines())
    v.start()
    line = vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert "the LUKS key of ['uefi-vars']" in line
    # The started hook removed the runtime key file QEMU read at its start.
    vmlib.wait_hook_log(rf"{v.name} started begin: removed the runtime key file", after=mark)
    assert not (v.runtime_dir / "image.key").exists()
    # Neither the passphrase nor the KEK in QEMU's argv or environment, nor in the hook log.
    pid = vmlib.qemu_pid(v.name)
    cmdline = " ".join(vmlib.qemu_cmdline(v.name))
    assert f"pflash1={node}" in cmdline and '"driver":"luks"' in cmdline
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode("latin1")
    for secret in (phrase, kek_hex):
        assert secret not in cmdline and secret not in environ
        assert not any(secret in ln for ln in vmlib.hook_log_lines())
    # QEMU's block layer: the device sees the payload, through the luks node.
    block = vmlib.virsh("qemu-monitor-command", v.name, "--hmp", "info block").stdout
    assert node in block and "system.flash1" in block, block
    secs = v.wait_for_shell(300)
    print(f"OVMF reached its shell in {secs:.1f} s with its vars in a LUKS volume")
    # While it runs: OVMF has written its boot variables, and none is plaintext at rest.
    time.sleep(2)
    assert BOOT_ORDER not in v.image.read_bytes()
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark)

    raw = v.image.read_bytes()
    assert BOOT_ORDER not in raw and "Boot0000".encode("utf-16-le") not in raw
    vmlib.nvmgr("check", v.image)  # without the key: crc32 over the ciphertext
    vmlib.nvmgr("check", v.image, "--key-file", str(key))  # with it: the volume opens
    after = v.get("uefi-vars", "--key-file", str(key))
    assert len(after) == payload and after != TEMPLATE.read_bytes()
    (tmp_path / "vars.fd").write_bytes(after)
    got = vmlib.uefi_vars(tmp_path / "vars.fd")
    assert "BootOrder" in got, got
    titles = [desc for name, desc in got.items() if name.startswith("Boot0")]
    assert any('"EFI Internal Shell"' in t for t in titles), titles
    nokey = vmlib.nvmgr("get", "--domain", v.name, "uefi-vars", "-o", tmp_path / "x",
                        check=False)
    assert nokey.returncode == 6, nokey


def test_encrypt_converts_a_plaintext_domain_and_it_boots_with_its_vars(vm: MakeVM,
                                                                      tmp_path: Path) -> None:
    v = vm("encrypt")
    v.define()
    v.start()
    v.wait_for_shell(300)
    v.destroy()
    plain = v.get("uefi-vars")
    assert BOOT_ORDER in v.image.read_bytes()  # plaintext at rest: what encrypt removes
    key = tmp_path / "vm.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    r = vmlib.nvmgr_json("encrypt", "--domain", v.name, "--key-file", str(key))
    assert "uefi-vars" in r["encrypted"] and "tpm-permall" in r["encrypted"], r  # type: ignore[operator]
    assert BOOT_ORDER not in v.image.read_bytes()
    assert v.get("uefi-vars", "--key-file", str(key)) == plain  # the vars OVMF wrote, kept
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert f"pflash1={luks_node_name('uefi-vars')}" in xml and str(key) in xml
    assert r["vtpm_secret"] == str(vtpm_secret_uuid(v.uuid)), r  # swtpm encrypts from now on
    again = vmlib.nvmgr_json("encrypt", "--domain", v.name, "--key-file", str(key))
    assert again["encrypted"] == [], again
    mark = len(vmlib.hook_log_lines())
    v.start()
    # The TPM state swtpm made in plaintext: re-encrypted by swtpm before it is staged.
    line = vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert "re-encrypted ['tpm-permall']" in line, line
    assert blob_kind((v.swtpm_dir / "tpm2-00.permall").read_bytes()) == "encrypted"
    v.wait_for_shell(300)
    v.destroy()
    assert BOOT_ORDER not in v.image.read_bytes()
    vmlib.nvmgr("check", v.image, "--key-file", str(key))
