"""Issue 8: a domain with a key keeps its UEFI vars in a LUKS volume inside the
pflash slice; QEMU's ``luks`` driver opens it with a passphrase it reads from a
runtime file that the ``started`` hook removes.

1. (section 3, item 1) A known variable put into the vars before the first
   start, one boot to OVMF's shell: while the VM runs and after it stops,
   neither the UTF-16 names of OVMF's variables nor the known variable's
   bytes are in any file of the image, /var/lib/libvirt or /run; ``nvmgr get``
   with the key gives vars virt-fw-vars parses, with both.
2. (item 4) ``nvmgr rekey`` while the VM runs, destroy, start: it boots with
   the new key; the old key is refused by ``nvmgr get`` (exit 5) and by the
   start.  The same running VM gets a ``block`` section hot-plugged
   (``nvmgr attach --live``): a LUKS volume, opened by a ``luks`` node QEMU
   stacks on its slice.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from lxml import etree

from nvmgr.crypto.cipher import Kek
from nvmgr.domain.qemuargs import luks_node_name, vtpm_secret_uuid
from nvmgr.image.image import Image
from nvmgr.provision.vtpm import blob_kind

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e

TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_ORDER = "BootOrder".encode("utf-16-le")
#: Variables OVMF itself writes at every boot, as its varstore holds their names.
OVMF_NAMES = ("BootOrder", "Boot0000", "Boot0001", "PlatformLang", "ConOut", "Timeout")
#: Where plaintext vars must never be found (with the image and its members).
TREES = (Path("/var/lib/libvirt"), Path("/run"))
KNOWN = "NvmgrKnownVar"
STATE = (f"<nvmgr:section xmlns:nvmgr='{vmlib.NVMGR_NS}' name='state0' size='64K' "
         "binding='block' driver='virtio-blk-pci' device='nvmgr-state0'/>")
PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "debugfs", "securityfs", "fusectl",
             "bpf", "mqueue", "tracefs", "configfs", "nsfs", "binfmt_misc", "pstore", "efivarfs"}


def _needle_hits(roots: Iterable[Path], needles: Sequence[bytes]) -> dict[str, list[bytes]]:
    """Every regular file under *roots* (symlinks not followed) that holds one
    of *needles*: path -> the needles found.  Pseudo file systems mounted
    below them (proc, sysfs, cgroup, ...) are skipped."""
    pseudo = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, where, fstype, *_ = line.split()
        if fstype in PSEUDO_FS:
            pseudo.add(where.replace("\\040", " "))
    hits: dict[str, list[bytes]] = {}
    for root in roots:
        for top, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in pseudo]
            for f in files:
                path = os.path.join(top, f)
                try:
                    st = os.lstat(path)
                    if not os.path.isfile(path) or os.path.islink(path) or not st.st_size:
                        continue
                    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0,
                                                           access=mmap.ACCESS_READ) as m:
                        found = [n for n in needles if m.find(n) >= 0]
                except (FileNotFoundError, PermissionError, ValueError, OSError):
                    continue  # gone meanwhile (a socket, a pid file rewritten)
                if found:
                    hits[path] = found
    return hits


def _digest(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _assert_no_plaintext_vars(v: vmlib.VM, needles: Sequence[bytes],
                              baseline: dict[str, str | None], when: str) -> None:
    """No file of the image, its members, /var/lib/libvirt or /run holds a
    needle, except files that held one before this domain existed and are
    unchanged since (another test's leftover plaintext image, say)."""
    members = [Path(str(m["resolved_path"]))
               for m in vmlib.info(v.image)["members"]]  # type: ignore[attr-defined]
    hits = _needle_hits([*TREES], needles)
    for extra in [v.image, *members]:
        found = [n for n in needles if n in extra.read_bytes()]
        if found:
            hits[str(extra)] = found
    new = {p: [n.decode("utf-16-le", "replace") if len(n) < 40 else "(known bytes)" for n in f]
           for p, f in hits.items() if p not in baseline or _digest(p) != baseline[p]}
    assert not new, f"plaintext UEFI variables {when}: {new}"


def _known_var(tmp_path: Path) -> tuple[Path, bytes]:
    """A JSON variable for ``virt-fw-vars --set-json``: a fresh GUID and 48
    random bytes of data (non-volatile, boot and runtime access)."""
    data = os.urandom(48)
    j = tmp_path / "known.json"
    j.write_text(json.dumps({"version": 2, "variables": [
        {"name": KNOWN, "guid": str(uuid.uuid4()), "attr": 7, "data": data.hex()}]}))
    return j, data


def test_ovmf_boots_with_its_vars_in_a_luks_volume_inside_the_slice(vm: MakeVM,
                                                                    tmp_path: Path) -> None:
    known_json, known = _known_var(tmp_path)
    needles = [n.encode("utf-16-le") for n in (*OVMF_NAMES, KNOWN)] + [known]
    # Files that held plaintext vars before this domain existed (other tests' leftovers):
    # only a change to one of them, or a new file, counts below.
    baseline = {p: _digest(p) for p in _needle_hits(TREES, needles)}
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

    # A known variable, put into the vars before the first start the way an
    # administrator would: out with the key, virt-fw-vars, back in.
    (tmp_path / "t.fd").write_bytes(v.get("uefi-vars", "--key-file", str(key)))
    vmlib.run([vmlib.VIRT_FW_VARS, "-i", tmp_path / "t.fd", "--set-json", known_json,
               "-o", tmp_path / "k.fd"])
    assert known in (tmp_path / "k.fd").read_bytes()
    vmlib.nvmgr("put", "--domain", v.name, "uefi-vars", tmp_path / "k.fd", "--key-file", key)
    assert KNOWN in vmlib.uefi_vars(tmp_path / "k.fd")
    _assert_no_plaintext_vars(v, needles, baseline, "after the put, before the start")

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
    # While it runs: OVMF has written its boot variables (the guest reads them back
    # through QEMU: plaintext there), and none is plaintext at rest.
    time.sleep(2)
    seen = vmlib.nbd_read(v.name, node, payload, tmp_path)
    assert BOOT_ORDER in seen and known in seen
    _assert_no_plaintext_vars(v, needles, baseline, "while the VM runs")
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark)
    _assert_no_plaintext_vars(v, needles, baseline, "after the VM stopped")

    vmlib.nvmgr("check", v.image)  # without the key: crc32 over the ciphertext
    vmlib.nvmgr("check", v.image, "--key-file", str(key))  # with it: the volume opens
    after = v.get("uefi-vars", "--key-file", str(key))
    assert len(after) == payload and after != TEMPLATE.read_bytes()
    (tmp_path / "vars.fd").write_bytes(after)
    got = vmlib.uefi_vars(tmp_path / "vars.fd")
    assert "BootOrder" in got and KNOWN in got, got
    titles = [desc for name, desc in got.items() if name.startswith("Boot0")]
    assert any('"EFI Internal Shell"' in t for t in titles), titles
    dump = tmp_path / "vars.json"
    vmlib.run([vmlib.VIRT_FW_VARS, "-i", tmp_path / "vars.fd", "--output-json", dump])
    mine = [x for x in json.loads(dump.read_text())["variables"] if x["name"] == KNOWN]
    assert [bytes.fromhex(x["data"]) for x in mine] == [known], mine
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


def test_rekey_while_running_then_the_new_key_boots_and_the_old_is_refused(
        vm: MakeVM, tmp_path: Path) -> None:
    key = tmp_path / "vm.key"  # the file the domain names: it gets the new key after the rekey
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    old = tmp_path / "old.key"
    old.write_bytes(key.read_bytes())
    old.chmod(0o600)
    new = tmp_path / "new.key"
    new.write_bytes(os.urandom(32))
    new.chmod(0o600)
    v = vm("rekey")
    root = etree.fromstring(v.xml.encode())  # spare PCIe root ports for the hot-plug
    devices = root.find("devices")
    assert devices is not None
    etree.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    for i in (1, 2):
        etree.SubElement(devices, "controller", type="pci", index=str(i), model="pcie-root-port")
    v.xml = etree.tostring(root, encoding="unicode")
    v.xml_path.write_text(v.xml)
    v.define("--key-file", str(key))
    v.start()
    v.wait_for_shell(300)

    # A block section hot-plugged into the running VM: a LUKS volume in the image,
    # a luks node QEMU stacks on its slice (the secret object it read at its start).
    data = os.urandom(64 << 10)
    (tmp_path / "state0.img").write_bytes(data)
    (tmp_path / "state0.xml").write_text(STATE)
    out = vmlib.nvmgr_json("attach", v.name, tmp_path / "state0.xml", "--live", "--config",
                           "--data", tmp_path / "state0.img")
    assert out["added"] == ["state0"] and "nvmgr-state0" in out["plugged"], out  # type: ignore[operator]
    s = v.section("state0")
    assert s["encrypted"] is True and s["live"] is True, s
    lnode = luks_node_name("state0")
    nodes = {n["node-name"]: n for n in vmlib.qmp(v.name, "query-named-block-nodes")}  # type: ignore[attr-defined]
    assert nodes[lnode]["drv"] == "luks", nodes[lnode]
    assert nodes[lnode]["image"]["virtual-size"] == 64 << 10, nodes[lnode]  # the payload
    # The guest's virtio-blk device reads through the luks node, not the raw slice.
    backends = vmlib.qmp(v.name, "query-block")
    assert any(b.get("inserted", {}).get("node-name") == lnode and "nvmgr-state0" in b["qdev"]
               for b in backends), backends  # type: ignore[attr-defined]
    assert vmlib.nbd_read(v.name, lnode, len(data), tmp_path) == data
    assert data[:4096] not in v.image.read_bytes()

    r = vmlib.nvmgr_json("rekey", "--domain", v.name, "--key-file", old, "--new-key-file", new)
    ids = [k["key_id"] for k in r["key_slots"]]  # type: ignore[attr-defined]
    assert ids == [Kek(new.read_bytes()).key_id.hex()], r
    assert v.state() == "running"
    v.destroy()
    key.write_bytes(new.read_bytes())  # the file the domain names now holds the new key
    v.start()
    v.wait_for_shell(300)  # OVMF's vars and the hot-plugged volume open with the new key
    assert vmlib.nbd_read(v.name, lnode, len(data), tmp_path) == data
    v.destroy()
    assert v.get("state0", "--key-file", str(new))[:len(data)] == data

    bad = vmlib.nvmgr("get", v.image, "uefi-vars", "--key-file", old, "-o", tmp_path / "x",
                      check=False)
    assert bad.returncode == 5 and "not one of this image's keys" in bad.stderr, bad
    before = vmlib.sha256(v.image)
    key.write_bytes(old.read_bytes())  # the domain pointed at the old key again
    p = v.start(check=False)
    assert p.returncode != 0 and v.state() == "shut off", p
    assert "wrong key" in p.stderr and "not one of this image's keys" in p.stderr, p.stderr
    assert vmlib.sha256(v.image) == before
