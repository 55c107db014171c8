"""2. TPM state: staged at prepare, collected at release, encrypted at rest, the same TPM
across starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.image.image import Image

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def test_tpm_state_is_encrypted_in_the_image_and_keeps_its_ek(vm: MakeVM, tmp_path: Path) -> None:
    key = tmp_path / "vm.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    v = vm("tpm")
    v.define("--key-file", str(key))
    assert v.section("tpm-permall")["encrypted"] is True
    assert v.section("uefi-vars")["encrypted"] is True  # a LUKS volume QEMU opens
    assert v.section("tpm-permall")["length"] == 0
    # Defined again without the key: refused (it could never start), the definition kept.
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    again = vmlib.nvmgr("define", v.xml_path, check=False)
    assert again.returncode == 6 and "--key-file" in again.stderr, again
    assert vmlib.virsh("dumpxml", "--inactive", v.name).stdout == xml

    # First start: nothing to stage, libvirt's swtpm_setup manufactures the TPM (EK + cert).
    mark = len(vmlib.hook_log_lines())
    v.start()
    assert "staged tpm none" in vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert (v.swtpm_dir / "tpm2-00.permall").is_file()
    v.destroy()
    line = vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark)
    assert "collected ['tpm-permall']" in line
    # release wiped the staged plaintext: the image holds the one copy of the TPM.
    assert not (v.swtpm_dir / "tpm2-00.permall").exists()
    assert not (v.swtpm_dir / "tpm2-00.volatilestate").exists()

    permall = v.get("tpm-permall", "--key-file", str(key))
    assert len(permall) > 1000 and v.section("tpm-permall")["length"] == len(permall)
    raw = v.image.read_bytes()
    for i in range(0, len(permall) - 64, 512):  # not one 64-byte run of plaintext at rest
        assert permall[i:i + 64] not in raw
    nokey = vmlib.nvmgr("get", "--domain", v.name, "tpm-permall", "-o", tmp_path / "x",
                        check=False)
    assert nokey.returncode == 6, nokey
    assert "encrypted" in nokey.stderr
    # swtpm's own encrypted state (libvirt's <encryption secret>), under nvmgr's wrapping
    with Image.open(str(v.image), kek=Kek(key.read_bytes())) as img:
        phrase = img.vtpm_passphrase()
    ek1, cert1 = vmlib.read_ek(permall, tmp_path, phrase)

    # Second start: prepare stages the image's state, swtpm uses it (no new manufacture).
    mark = len(vmlib.hook_log_lines())
    v.start()
    assert "staged tpm ['tpm2-00.permall']" in vmlib.wait_hook_log(
        rf"{v.name} prepare begin: ", after=mark)
    st = (v.swtpm_dir / "tpm2-00.permall").stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid != 0  # swtpm's user, not root
    v.wait_for_shell(60)  # OVMF started the TPM and measured the boot into it
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: collected", after=mark)
    assert not (v.swtpm_dir / "tpm2-00.permall").exists()
    permall2 = v.get("tpm-permall", "--key-file", str(key))
    assert permall2 != permall  # the TPM ran (its clock and counters moved) ...
    ek2, cert2 = vmlib.read_ek(permall2, tmp_path, phrase)
    assert ek2 == ek1  # ... and is the same TPM: the same endorsement key
    assert cert2 == cert1
    if cert1 is not None:
        print(f"EK certificate: {len(cert1)} bytes, identical across starts")
    vmlib.nvmgr("check", v.image, "--key-file", str(key))  # every crc and MAC
