"""3 and 4. A corrupted section, a missing key, a wrong key: libvirt's start is refused with
nvmgr's reason, and the image is left exactly as it was.  For a domain with a key (issue 8,
section 3, item 3) the three differ too: a missing key file, a wrong key, one byte of the
encrypted vars (a LUKS volume) damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvmgr.format.model import LUKS_HEADER_SIZE

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def _flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())


def _refused(v: vmlib.VM) -> str:
    """Start the domain; it must fail, stay off, and libvirt must show nvmgr's reason."""
    p = v.start(check=False)
    assert p.returncode != 0, f"{v.name} started: {p.stdout}"
    assert v.state() == "shut off"
    assert "nvmgr: " in p.stderr and f"domain {v.name}" in p.stderr, p.stderr
    return p.stderr


def test_one_corrupted_byte_refuses_the_start(vm: MakeVM) -> None:
    v = vm("corrupt")
    v.define()
    v.start()
    v.destroy()  # a real TPM state in tpm-permall, real vars in uefi-vars
    for name in ("tpm-permall", "uefi-vars"):
        s = v.section(name)
        assert s["length"] and s["dirty"] is False
        clean = vmlib.sha256(v.image)
        good = v.image.read_bytes()
        # One bit of one byte, inside the slot the current directory points at.
        _flip(v.image, int(s["offset"]) + int(s["length"]) // 2)  # type: ignore[call-overload]
        damaged = vmlib.sha256(v.image)
        assert damaged != clean
        err = _refused(v)
        assert f"section {name} is corrupted" in err, err
        # Nothing changed the image: not prepare, not the release libvirtd runs after it
        # (no crc resealed over the damage, no header rewritten).
        assert vmlib.sha256(v.image) == damaged
        check = vmlib.nvmgr("check", v.image, check=False)
        assert check.returncode == 4 and f"section {name} is corrupted" in check.stdout
        v.image.write_bytes(good)  # repair, then the other section
        vmlib.nvmgr("check", v.image)
    v.start()  # the repaired image starts again
    v.destroy()


def test_missing_or_wrong_key_refuses_the_start(vm: MakeVM, tmp_path: Path) -> None:
    key = tmp_path / "vm.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    v = vm("keys", tpm=True)
    v.define("--key-file", str(key))
    v.start()
    v.destroy()  # encrypted TPM state now in the image
    assert v.section("tpm-permall")["length"]
    before = vmlib.sha256(v.image)

    key.rename(tmp_path / "vm.key.away")  # missing
    err = _refused(v)
    assert "key is missing" in err and str(key) in err and "corrupted" not in err, err
    assert vmlib.sha256(v.image) == before

    key.write_bytes(os.urandom(32))  # another 32-byte key, 0600: wrong
    key.chmod(0o600)
    err = _refused(v)
    assert "wrong key" in err and "not one of this image's keys" in err, err
    assert "corrupted" not in err, err
    assert vmlib.sha256(v.image) == before
    assert not (v.swtpm_dir / "tpm2-00.permall").exists()  # nothing was staged

    (tmp_path / "vm.key.away").replace(key)  # the right key back

    # One byte of the encrypted vars (the LUKS volume's payload) damaged: refused as
    # corruption (the crc32 over the ciphertext, before any key is used), not as a key.
    s = v.section("uefi-vars")
    assert s["encrypted"] and s["live"] and s["dirty"] is False, s
    good = v.image.read_bytes()
    _flip(v.image, int(s["offset"]) + LUKS_HEADER_SIZE + 1000)  # type: ignore[call-overload]
    damaged = vmlib.sha256(v.image)
    err = _refused(v)
    assert "section uefi-vars is corrupted" in err, err
    assert "wrong key" not in err and "key is missing" not in err, err
    assert vmlib.sha256(v.image) == damaged
    check = vmlib.nvmgr("check", v.image, check=False)  # without the key, too
    assert check.returncode == 4 and "section uefi-vars is corrupted" in check.stdout, check
    v.image.write_bytes(good)

    mark = len(vmlib.hook_log_lines())  # the right key, the image repaired: it starts, same state
    v.start()
    assert "staged tpm ['tpm2-00.permall']" in vmlib.wait_hook_log(
        rf"{v.name} prepare begin: ", after=mark)
    v.destroy()
