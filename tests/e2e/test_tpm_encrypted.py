"""Issue 8, part 2: a domain with a key has no plaintext swtpm state on disk while
it runs.  swtpm encrypts its state itself (libvirt's ``<encryption secret>``, a
private ephemeral secret of usage ``vtpm`` that nvmgr defines with a value derived
from the image's data key); the image stores swtpm's ciphertext; a host crash
loses nothing swtpm wrote; a TPM 1.2 and a TPM 2.0 domain keep their own files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nvmgr.crypto.cipher import Kek
from nvmgr.domain.qemuargs import vtpm_secret_uuid
from nvmgr.image.image import Image
from nvmgr.provision.vtpm import blob_kind

from . import vmlib, watchlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def _key(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def _phrase(v: vmlib.VM, key: Path) -> bytes:
    with Image.open(str(v.image), kek=Kek(key.read_bytes())) as img:
        return img.vtpm_passphrase()


def _state_files(v: vmlib.VM) -> dict[str, bytes]:
    """Every file under the domain's swtpm directory (any version), by path."""
    out = {}
    for p in (vmlib.SWTPM_ROOT / v.uuid).rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            out[str(p)] = p.read_bytes()
    return out


def _no_plaintext(v: vmlib.VM, needles: list[bytes]) -> None:
    """Each swtpm state file is swtpm's encrypted blob, and no file under
    /var/lib/libvirt/swtpm holds any of *needles* (the EK's public key bytes)."""
    for path, data in _state_files(v).items():
        assert blob_kind(data) == "encrypted", f"{path} is not swtpm's encrypted blob"
    for p in vmlib.SWTPM_ROOT.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            for n in needles:
                assert n not in data, f"{p} holds the TPM's plaintext state"


def _ek_modulus(pem_text: str) -> bytes:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = pem_text.split("\n", 1)[1].encode()
    key = load_pem_public_key(pem)
    n = key.public_numbers().n  # type: ignore[union-attr]
    return int(n).to_bytes((n.bit_length() + 7) // 8, "big")


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def test_swtpm_encrypts_the_state_and_a_host_crash_loses_nothing(vm: MakeVM,
                                                                 tmp_path: Path) -> None:
    key = _key(tmp_path / "vm.key")
    v = vm("tpmenc")
    v.define("--key-file", str(key))
    su = str(vtpm_secret_uuid(v.uuid))
    xml = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert f"<encryption secret='{su}'/>" in xml, xml
    listed = vmlib.virsh("secret-list").stdout
    assert su in listed and f"nvmgr-vtpm-{v.uuid}" in listed, listed
    # private: no client reads it; ephemeral: its value is in no file of libvirt's
    assert vmlib.virsh("secret-get-value", su, check=False).returncode != 0
    assert not list(Path("/etc/libvirt/secrets").glob(f"{su}*"))
    phrase = _phrase(v, key)

    # First start: libvirt's swtpm_setup manufactures the TPM, encrypted.
    mark = len(vmlib.hook_log_lines())
    v.start()
    vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert "--key pwdfd=" in Path(f"/proc/{_swtpm_pid(v)}/cmdline").read_bytes().decode(
        "latin1").replace("\0", " ")
    permall_path = v.swtpm_dir / "tpm2-00.permall"
    assert blob_kind(permall_path.read_bytes()) == "encrypted"
    ek1, cert1 = vmlib.read_ek(permall_path.read_bytes(), tmp_path, phrase)
    needles = [_ek_modulus(ek1)[:64]]
    _no_plaintext(v, needles)
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: collected", after=mark)
    assert not _state_files(v)
    stored = v.get("tpm-permall", "--key-file", str(key))
    assert blob_kind(stored) == "encrypted"  # swtpm's ciphertext, wrapped by nvmgr
    assert vmlib.read_ek(stored, tmp_path, phrase) == (ek1, cert1)
    _no_plaintext(v, needles)

    # Second start, until the TPM has written its state; then a host crash.
    mark = len(vmlib.hook_log_lines())
    v.start()
    line = vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert "staged tpm ['tpm2-00.permall']" in line, line
    v.wait_for_shell(300)
    deadline = time.monotonic() + 60
    while permall_path.read_bytes() == stored:  # swtpm writes NV state as the TPM runs
        assert time.monotonic() < deadline, "swtpm never wrote its state during the run"
        time.sleep(0.5)
    written = permall_path.read_bytes()
    _no_plaintext(v, needles)
    for pid in (vmlib.qemu_pid(v.name), _swtpm_pid(v), vmlib.libvirtd_pid()):
        assert pid is not None
        _kill(pid)
    time.sleep(1)
    assert permall_path.read_bytes() == written  # on the persistent disk, as swtpm left it
    vmlib.restart_libvirtd()

    # The ephemeral secret went with libvirtd: the start is refused, naming the fix.
    assert v.state() == "shut off"
    r = v.start(check=False)
    assert r.returncode != 0
    assert f"nvmgr reconcile {v.name}" in r.stderr and su in r.stderr, r.stderr
    # Nothing lost by the crash nor the refusal: libvirtd's release of the refused
    # start collected what swtpm wrote (else the next prepare recovers it).
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark)
    assert not permall_path.exists() or permall_path.read_bytes() == written
    if not permall_path.exists():
        assert v.get("tpm-permall", "--key-file", str(key)) == written
    vmlib.nvmgr("reconcile", v.name)
    mark = len(vmlib.hook_log_lines())
    v.start()
    line = vmlib.wait_hook_log(rf"{v.name} prepare begin: ", after=mark)
    assert "staged tpm ['tpm2-00.permall']" in line, line
    v.wait_for_shell(300)
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: collected", after=mark)
    final = v.get("tpm-permall", "--key-file", str(key))
    assert blob_kind(final) == "encrypted"
    assert vmlib.read_ek(final, tmp_path, phrase) == (ek1, cert1)  # the same TPM
    (tmp_path / "vars.fd").write_bytes(v.get("uefi-vars", "--key-file", str(key)))
    assert "BootOrder" in vmlib.uefi_vars(tmp_path / "vars.fd")
    vmlib.nvmgr("check", v.image, "--key-file", str(key))
    _no_plaintext(v, needles)

    # libvirtd restarted while the domain is stopped: refused until reconcile.
    vmlib.restart_libvirtd()
    r = v.start(check=False)
    assert r.returncode != 0 and f"nvmgr vtpm-secret --domain {v.name}" in r.stderr, r.stderr
    got = vmlib.nvmgr_json("vtpm-secret", "--domain", v.name)
    assert got["secret"] == su, got
    v.start()
    v.destroy()
    # With the watcher (nvmgr-watch.service): it gives the secret back when it reconnects.
    said = f"{v.name}: vTPM secret {su} given to libvirt"
    with watchlib.watching() as w:
        w.wait_line(said, stream="out")  # at its start
        vmlib.restart_libvirtd()
        w.wait_line("reconnected to libvirt", stream="err")
        deadline = time.monotonic() + 60
        while w.out.count(said) < 2:  # again, after the reconnect
            assert time.monotonic() < deadline, w.out
            time.sleep(0.2)
        v.start()
        v.destroy()
    # undefine takes the secret out of libvirt
    vmlib.nvmgr("undefine", v.name, "--remove-nvram")
    assert su not in vmlib.virsh("secret-list").stdout


def _swtpm_pid(v: vmlib.VM) -> int:
    r = vmlib.run(["pgrep", "-f", f"swtpm socket .*{v.uuid}"], check=False)
    pids = [int(x) for x in r.stdout.split()]
    assert len(pids) == 1, r.stdout
    return pids[0]


def test_a_tpm_1_2_and_a_tpm_2_0_domain_side_by_side(vm: MakeVM, tmp_path: Path) -> None:
    key = _key(tmp_path / "vm.key")
    v12 = vm("tpm12")
    v12.xml = v12.xml.replace('<tpm model="tpm-crb">', '<tpm model="tpm-tis">').replace(
        'version="2.0"', 'version="1.2"')
    assert 'version="1.2"' in v12.xml
    v12.xml_path.write_text(v12.xml)
    v20 = vm("tpm20")
    for v in (v12, v20):
        v.define("--key-file", str(key))
    names = {v12: "tpm1.2/tpm-00.permall", v20: "tpm2/tpm2-00.permall"}
    ids: dict[vmlib.VM, object] = {}
    for run in (1, 2):
        for v in (v12, v20):
            v.start()
        time.sleep(3)  # both run side by side
        for v in (v12, v20):
            staged = vmlib.SWTPM_ROOT / v.uuid / names[v]
            assert staged.is_file(), f"{v.name}: no {names[v]}"
            assert blob_kind(staged.read_bytes()) == "encrypted"
            other = "tpm2" if v is v12 else "tpm1.2"
            assert not (vmlib.SWTPM_ROOT / v.uuid / other).exists()
        for v in (v12, v20):
            v.destroy()
        for v in (v12, v20):
            phrase = _phrase(v, key)
            deadline = time.monotonic() + 30
            while (vmlib.SWTPM_ROOT / v.uuid / names[v]).exists():
                assert time.monotonic() < deadline, f"{v.name}: release did not collect"
                time.sleep(0.2)
            permall = v.get("tpm-permall", "--key-file", str(key))
            ident = (vmlib.read_pubek12(permall, tmp_path, phrase) if v is v12
                     else vmlib.read_ek(permall, tmp_path, phrase))
            if run == 1:
                ids[v] = ident
            else:
                assert ident == ids[v], f"{v.name}: another TPM after a restart"
    assert ids[v12] != ids[v20]
