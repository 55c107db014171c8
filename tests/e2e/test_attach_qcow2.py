"""``nvmgr attach --live`` on a running VM whose image is qcow2 (issue 7).

The running QEMU holds the qcow2 file, so nvmgr writes the image through
QEMU: QEMU's NBD server exports the image's ``nvmgr-image`` format node (the
node the VM's pflash slice sits on), nvmgr opens that export as an NBD image
location, and the new sections go into a new raw member beside the image
(the qcow2's virtual size does not change); the member's slice is then
hot-plugged like a raw image's.

1. A running UEFI+TPM VM with a qcow2 image gets a ``block`` section with
   ``nvmgr attach --live --config --data FILE``: the bytes the running QEMU
   serves from the new node are FILE's; the qcow2 kept its size, the old
   sections did not move, the section is in a raw member QEMU's user owns;
   QEMU serves no export and runs no NBD server afterwards; a second section
   goes into that member too; after destroy and start both are still there
   (the next start's QEMU arguments, the same bytes), and ``check`` passes.
2. Refusals, each leaving the image as it was: ``--live`` of a fw_cfg section
   or a ``<tpm>`` (exit 13, before anything is exported); an NBD server some
   other user started in that QEMU (a libvirt backup, say: QEMU runs one at a
   time) -- exit 7, the other server left running.  The export and server an
   nvmgr killed midway leaves are cleared by the next attach, which goes through.
3. With a key: the new section in the raw member is a LUKS volume (ciphertext
   in the file) that QEMU's ``luks`` node opens; the guest reads the plaintext,
   at the next boot too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from nvmgr.domain.qemuargs import luks_node_name

from . import vmlib
from .conftest import MakeVM
from .test_attach import STATE, TPM, VPD, _edit, _offsets, _peripherals, _write

pytestmark = pytest.mark.e2e


def _exports(v: vmlib.VM) -> list[object]:
    return vmlib.qmp(v.name, "query-block-exports")  # type: ignore[return-value]


def _directory(v: vmlib.VM) -> tuple[object, ...]:
    """The image's directory as ``nvmgr info`` shows it (generation, sections, members)."""
    i = vmlib.info(v.image)
    return (i["generation"], i["image_size"], json.dumps(i["sections"], sort_keys=True),
            json.dumps(i.get("members"), sort_keys=True))


def test_live_block_attach_to_a_running_qcow2_image(vm: MakeVM, tmp_path: Path) -> None:
    v = vm("attach-qcow2")
    _edit(v, root_ports=3, native_hotplug=True)
    v.define("--format", "qcow2")
    assert vmlib.info(v.image)["format"] == "qcow2"
    v.start()
    old = _offsets(v.image)
    assert set(old) >= {"uefi-vars", "tpm-permall"}
    size_before = vmlib.info(v.image)["image_size"]
    data = os.urandom(64 << 10)
    blob = tmp_path / "state0.img"
    blob.write_bytes(data)

    out = json.loads(vmlib.nvmgr("attach", v.name, _write(tmp_path, "state0.xml", STATE),
                                 "--live", "--config", "--data", blob, "-O", "json").stdout)
    assert out["added"] == ["state0"] and out["live"] and out["config"], out
    assert not out["deferred"] and "nvmgr-state0" in out["plugged"], out
    # The running QEMU serves the new node; its bytes are the ones given.
    assert vmlib.nbd_read(v.name, "nvmgr-state0", len(data), tmp_path) == data
    assert "nvmgr-state0" in _peripherals(v)
    # nvmgr's export and NBD server are gone (nbd_read started and stopped its own).
    assert _exports(v) == []
    # The qcow2 kept its virtual size; nothing that was there moved; the new
    # section is in a raw member beside it, which QEMU's user may open.
    info = vmlib.info(v.image)
    assert info["image_size"] == size_before == out["image_size"], (info, out)
    now = _offsets(v.image)
    assert {k: now[k] for k in old} == old
    sec = vmlib.section_info(v.image, "state0")
    members = info["members"]
    assert isinstance(members, list) and len(members) == 1, info
    member = Path(members[0]["path"])
    v.extra_files.append(member)
    assert sec["member"] == members[0]["index"], sec
    assert member.parent == v.image.parent and vmlib.info(member)["format"] == "raw"
    assert member.stat().st_uid == pwd.getpwnam("libvirt-qemu").pw_uid
    assert any(member.name in str(n.get("file", "")) or str(member) in json.dumps(n)
               for n in vmlib.qmp(v.name, "query-named-block-nodes",  # type: ignore[union-attr]
                                  {"flat": True}) if n["node-name"].endswith("state0"))
    persistent = vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert "nvmgr-state0" in persistent and str(member) in persistent

    # A second section: into the same member (it is raw and has no limit).
    data1 = os.urandom(32 << 10)
    (tmp_path / "state1.img").write_bytes(data1)
    state1 = _write(tmp_path, "state1.xml", STATE.replace("state0", "state1"))
    out = json.loads(vmlib.nvmgr("attach", v.name, state1, "--live", "--config", "--data",
                                 tmp_path / "state1.img", "-O", "json").stdout)
    assert out["added"] == ["state1"] and "nvmgr-state1" in out["plugged"], out
    assert vmlib.nbd_read(v.name, "nvmgr-state1", len(data1), tmp_path) == data1
    assert vmlib.section_info(v.image, "state1")["member"] == sec["member"]
    assert len(vmlib.info(v.image)["members"]) == 1  # type: ignore[arg-type]
    assert {k: _offsets(v.image)[k] for k in now} == now

    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)
    assert v.get("state0")[:len(data)] == data and v.get("state1")[:len(data1)] == data1
    v.start()
    args = vmlib.qemu_cmdline(v.name)
    for n in ("state0", "state1"):
        assert any(f'"node-name":"nvmgr-{n}"' in a for a in args), args
        assert any(f'"drive":"nvmgr-{n}"' in a for a in args), args
    assert any(str(member) in a for a in args), args
    assert vmlib.nbd_read(v.name, "nvmgr-state0", len(data), tmp_path) == data
    assert vmlib.nbd_read(v.name, "nvmgr-state1", len(data1), tmp_path) == data1
    assert {k: _offsets(v.image)[k] for k in old} == old
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)


@contextlib.contextmanager
def _foreign_nbd_server(v: vmlib.VM) -> Path:  # type: ignore[misc]
    vmlib.SOCK_ROOT.mkdir(mode=0o755, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="nbd-", dir=vmlib.SOCK_ROOT))
    shutil.chown(d, "libvirt-qemu", "libvirt-qemu")
    sock = d / "other.sock"
    vmlib.qmp(v.name, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    try:
        yield sock
    finally:
        with contextlib.suppress(vmlib.Failed):
            vmlib.qmp(v.name, "nbd-server-stop")
        shutil.rmtree(d, ignore_errors=True)


def test_live_attach_to_qcow2_refusals_leave_the_image_as_it_was(
        vm: MakeVM, tmp_path: Path) -> None:
    v = vm("attach-qcow2-refuse")
    _edit(v, root_ports=2, native_hotplug=True)
    v.define("--format", "qcow2")
    v.start()
    before = _directory(v)
    blob = tmp_path / "vpd.bin"
    blob.write_bytes(os.urandom(700))
    p = vmlib.nvmgr("attach", v.name, _write(tmp_path, "vpd.xml", VPD), "--live", "--config",
                    "--data", blob, check=False)
    assert p.returncode == 13, p
    assert "binding fwcfg" in p.stderr and "cannot be hot-plugged" in p.stderr, p.stderr
    p = vmlib.nvmgr("attach", v.name, _write(tmp_path, "tpm.xml", TPM), "--live", check=False)
    assert p.returncode == 13 and "a <tpm> cannot be hot-plugged" in p.stderr, p
    assert _directory(v) == before and _exports(v) == []

    # Another NBD server runs in the QEMU: refused, that server left alone.
    state = _write(tmp_path, "state0.xml", STATE)
    data = tmp_path / "state0.img"
    data.write_bytes(os.urandom(4096))
    with _foreign_nbd_server(v) as sock:
        p = vmlib.nvmgr("attach", v.name, state, "--live", "--config", "--data", data,
                        check=False)
        assert p.returncode == 7, p
        assert "serves NBD already" in p.stderr and "--config" in p.stderr, p.stderr
        assert sock.is_socket()  # still served: a second start is refused as running
        with pytest.raises(vmlib.Failed, match="already running"):
            vmlib.qmp(v.name, "nbd-server-start",
                      {"addr": {"type": "unix", "data": {"path": str(sock) + "2"}}})
    assert _directory(v) == before and _exports(v) == []
    assert "state0" not in vmlib.virsh("dumpxml", "--inactive", v.name).stdout
    assert not list(v.image.parent.glob(v.image.stem + ".m*"))

    # What an nvmgr killed while it wrote through the export leaves (the
    # server on its socket, the export): cleared, and the attach goes through.
    run = v.runtime_dir
    run.mkdir(mode=0o700, exist_ok=True)
    shutil.chown(run, "libvirt-qemu", "libvirt-qemu")
    sock = run / "lent-image.sock"
    vmlib.qmp(v.name, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    vmlib.qmp(v.name, "block-export-add", {"type": "nbd", "id": "nvmgr-image-export",
                                           "node-name": "nvmgr-image",
                                           "name": "nvmgr-image-export", "writable": True})
    assert len(_exports(v)) == 1
    out = json.loads(vmlib.nvmgr("attach", v.name, state, "--live", "--config", "--data", data,
                                 "-O", "json").stdout)
    assert out["added"] == ["state0"] and "nvmgr-state0" in out["plugged"], out
    v.extra_files += list(v.image.parent.glob(v.image.stem + ".m*"))
    assert _exports(v) == [] and not sock.exists()
    assert vmlib.nbd_read(v.name, "nvmgr-state0", 4096, tmp_path) == data.read_bytes()
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name)


def test_live_block_attach_to_an_encrypted_running_qcow2_image(vm: MakeVM, tmp_path: Path) -> None:
    """With a key: the section in the raw member is a LUKS volume (its bytes
    ciphertext there), opened by a ``luks`` node on its slice with the secret
    QEMU read at its start; the guest's device reads the plaintext."""
    key = tmp_path / "vm.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    v = vm("attach-qcow2-luks")
    _edit(v, root_ports=3, native_hotplug=True)
    v.define("--format", "qcow2", "--key-file", str(key))
    v.start()
    data = os.urandom(64 << 10)
    (tmp_path / "state0.img").write_bytes(data)
    out = json.loads(vmlib.nvmgr("attach", v.name, _write(tmp_path, "state0.xml", STATE),
                                 "--live", "--config", "--data", tmp_path / "state0.img",
                                 "-O", "json").stdout)
    assert out["added"] == ["state0"] and "nvmgr-state0" in out["plugged"], out
    s = v.section("state0")
    assert s["encrypted"] is True and s["member"] is not None, s
    members = vmlib.info(v.image)["members"]
    member = Path(members[0]["path"])  # type: ignore[index]
    v.extra_files.append(member)
    lnode = luks_node_name("state0")
    assert lnode in out["plugged"], out
    assert vmlib.nbd_read(v.name, lnode, len(data), tmp_path) == data
    assert data[:4096] not in member.read_bytes()
    assert _exports(v) == []
    v.destroy()
    vmlib.nvmgr("check", "--domain", v.name, "--key-file", str(key))
    assert v.get("state0", "--key-file", str(key))[:len(data)] == data
    v.start()
    assert vmlib.nbd_read(v.name, lnode, len(data), tmp_path) == data
    v.destroy()
