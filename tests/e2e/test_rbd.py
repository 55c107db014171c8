"""A UEFI + TPM 2.0 VM whose image is in Ceph RBD, end to end (issue 12).

Real libvirtd, QEMU (TCG), OVMF and swtpm; the single-node cluster of
``tests/ceph_cluster.py`` on 127.0.0.1 (skipped, with the reason, without Ceph's
packages).  QEMU reaches the image through its own ``rbd`` driver as a cephx user
of its own, its key staged by the prepare hook in a runtime file that the started
hook removes.
"""

from __future__ import annotations

import html
import json
import os
import uuid
from pathlib import Path

import pytest
from lxml import etree

from nvmgr.domain.namespaces import NVMGR_NS
from tests.ceph_cluster import CephCluster

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def test_a_uefi_tpm_vm_with_its_image_on_rbd(vm: MakeVM, ceph: CephCluster,
                                             tmp_path: Path) -> None:
    _user, keyring, _key = ceph.client("qemu-e2e")
    keyring.chmod(0o600)  # root's (the hooks'); QEMU gets the key from a runtime file
    v = vm("rbd", metadata_attrs={
        "image": f"rbd:{ceph.pool}/{os.path.basename(str(vmlib.new_name('img')))}"
                 f":conf={ceph.conf}:id=qemu-e2e:keyring={keyring}"})
    r = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)
    loc = r["image"]
    assert loc.startswith("rbd:") and r["created"], r
    args = html.unescape(vmlib.virsh("dumpxml", v.name).stdout)
    assert '"driver":"rbd"' in args and "nvmgr-rbd-key" in args
    assert "AQ" not in args  # no key material in the domain XML

    v.start()
    v.wait_for_shell(240)
    # The key file is gone after start.  A write to the running VM's vars is busy
    # (7): the in-use mark, and QEMU's hold on RBD's exclusive lock (OVMF wrote its
    # variables at boot), which --force does not override (it overrides the mark).
    assert not (v.runtime_dir / "rbd.key").exists()
    (tmp_path / "vars.bin").write_bytes(os.urandom(4096))
    p = vmlib.nvmgr("put", loc, "uefi-vars", tmp_path / "vars.bin", check=False)
    assert p.returncode == 7 and "uefi-vars is live" in p.stderr, p
    p = vmlib.nvmgr("put", loc, "uefi-vars", tmp_path / "vars.bin", "--force", check=False)
    assert p.returncode == 7 and "RBD's exclusive lock: client." in p.stderr, p
    assert v.state() == "running"
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    vmlib.nvmgr("check", loc)
    varstore = tmp_path / "vars.fd"
    vmlib.nvmgr("get", loc, "uefi-vars", "-o", varstore)
    assert vmlib.uefi_vars(varstore), "OVMF wrote no variables into the RBD image"
    permall = tmp_path / "permall"
    vmlib.nvmgr("get", loc, "tpm-permall", "-o", permall)
    ek1, _ = vmlib.read_ek(permall.read_bytes(), tmp_path)

    v.start()  # the TPM comes back from RBD
    v.wait_for_shell(240)
    mark = len(vmlib.hook_log_lines())
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
    permall.unlink()
    vmlib.nvmgr("get", loc, "tpm-permall", "-o", permall)
    ek2, _ = vmlib.read_ek(permall.read_bytes(), tmp_path)
    assert ek1 == ek2

    # One flipped byte in the vars inside RBD: the start is refused, naming the section.
    off = int(vmlib.nvmgr_json("info", loc)["sections"][0]["offset"])  # type: ignore[index]
    image = loc.split("/", 1)[1].split(":", 1)[0]
    admin = f"rbd:{ceph.pool}/{image}:conf={ceph.conf}:id=admin:keyring={ceph.admin_keyring}"
    vmlib.run(["qemu-io", "-f", "raw", "-c", f"write -P 0xa5 {off + 4096} 512", admin])
    p = v.start(check=False)
    assert p.returncode != 0 and "uefi-vars" in p.stderr, p.stderr
    vmlib.nvmgr("undefine", v.name, "--keep-nvram")


def test_a_source_element_with_the_key_in_a_libvirt_ceph_secret(vm: MakeVM, ceph: CephCluster,
                                                                 tmp_path: Path) -> None:
    """The metadata names the image as libvirt's disks do, ``<nvmgr:source
    protocol='rbd'>`` with ``<auth><secret type='ceph' usage=...>``; the key is a
    secret of the system libvirtd, which the prepare hook reads from libvirt's own
    store (never asking libvirtd) and stages for QEMU."""
    _user, _keyring, key = ceph.client("qemu-secret")
    sec_uuid = str(uuid.uuid4())
    usage = f"nvmgr-e2e {sec_uuid[:8]}"
    sec_xml = tmp_path / "secret.xml"
    sec_xml.write_text(f"<secret ephemeral='no' private='yes'><uuid>{sec_uuid}</uuid>"
                       f"<usage type='ceph'><name>{usage}</name></usage></secret>")
    vmlib.virsh("secret-define", str(sec_xml))
    try:
        key_file = tmp_path / "key"
        key_file.touch(mode=0o600)
        key_file.write_text(key)  # virsh decodes it: the secret's value is the key's bytes
        vmlib.virsh("secret-set-value", sec_uuid, "--file", str(key_file))
        key_file.unlink()
        image = os.path.basename(str(vmlib.new_name("img")))
        v = vm("rbdsrc", metadata_attrs={"format": "raw"})
        source = (f"<nvmgr:source protocol='rbd' name='{ceph.pool}/{image}'>"
                  f"<nvmgr:config file='{ceph.conf}'/><nvmgr:auth username='qemu-secret'>"
                  f"<nvmgr:secret type='ceph' usage='{usage}'/></nvmgr:auth></nvmgr:source>")
        text = v.xml_path.read_text()
        assert 'format="raw"/>' in text
        v.xml_path.write_text(text.replace('format="raw"/>', f'format="raw">{source}</nvmgr:nvram>'))
        r = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)
        loc = r["image"]
        assert loc.startswith(f"rbd:{ceph.pool}/{image}:") and f"secret_usage={usage}" in loc, r
        dumped = vmlib.virsh("dumpxml", v.name).stdout
        nvram = etree.fromstring(dumped.encode()).find(f"metadata/{{{NVMGR_NS}}}nvram")
        assert nvram is not None and nvram.get("image") is None  # kept as the element it was
        src = nvram.find(f"{{{NVMGR_NS}}}source")
        assert src is not None and src.get("protocol") == "rbd", dumped
        assert src.get("name") == f"{ceph.pool}/{image}"
        args = html.unescape(dumped)
        assert '"key-secret":"nvmgr-rbd-key"' in args and key not in args
        v.start()
        v.wait_for_shell(240)
        assert not (v.runtime_dir / "rbd.key").exists()
        mark = len(vmlib.hook_log_lines())
        v.destroy()
        vmlib.wait_hook_log(rf"{v.name} release end: ", after=mark, timeout=60)
        vmlib.nvmgr("check", loc)
        varstore = tmp_path / "vars.fd"
        vmlib.nvmgr("get", loc, "uefi-vars", "-o", varstore)
        assert vmlib.uefi_vars(varstore), "OVMF wrote no variables into the RBD image"
        # The secret without its value: the start is refused, naming the secret.
        vmlib.virsh("secret-undefine", sec_uuid)
        p = v.start(check=False)
        assert p.returncode != 0 and f"libvirt secret of usage type ceph named '{usage}'" \
            in p.stderr, p.stderr
        # undefine --keep-nvram needs nothing of the image (nor its key).
        r = json.loads(vmlib.nvmgr("undefine", v.name, "--keep-nvram", "--output", "json").stdout)
        assert r["image"] == loc and not r["image_removed"], r
    finally:
        vmlib.virsh("secret-undefine", sec_uuid, check=False)


def test_undefine_remove_nvram_takes_the_rbd_image_unless_a_client_has_it_open(
        vm: MakeVM, ceph: CephCluster) -> None:
    """``undefine --remove-nvram`` of a domain whose image is on RBD removes the RBD
    image with its snapshots (``rbd snap purge``, ``rbd rm``: the storage seam's
    :func:`nvmgr.storage.rbd.remove`); while another client has it open (a VM on
    another host) it is refused (7) before anything changes: the domain stays."""
    _user, keyring, _key = ceph.client("qemu-undef")
    keyring.chmod(0o600)
    image = os.path.basename(str(vmlib.new_name("img")))
    v = vm("rbdundef", metadata_attrs={
        "image": f"rbd:{ceph.pool}/{image}:conf={ceph.conf}:id=qemu-undef:keyring={keyring}"})
    loc = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)["image"]
    vmlib.nvmgr("snapshot", loc, "create", "before")
    admin = f"rbd:{ceph.pool}/{image}:conf={ceph.conf}:id=admin:keyring={ceph.admin_keyring}"
    with ceph.opened_elsewhere(admin, image):
        p = vmlib.nvmgr("undefine", v.name, "--remove-nvram", check=False)
        assert p.returncode == 7 and "the RBD image is open: client." in p.stderr, p
        assert vmlib.exists(v.name)
    assert image in ceph.run("rbd", "ls", ceph.pool).split()
    r = json.loads(vmlib.nvmgr("undefine", v.name, "--remove-nvram", "--output", "json").stdout)
    assert r["image"] == loc and r["image_removed"] is True, r
    assert not vmlib.exists(v.name)
    assert image not in ceph.run("rbd", "ls", ceph.pool).split()


def test_backup_and_restore_of_a_domain_whose_image_is_on_rbd(vm: MakeVM, ceph: CephCluster,
                                                              tmp_path: Path) -> None:
    """``nvmgr backup`` copies an RBD image (read through the storage seam, which
    hands QEMU the cephx key) into a file; ``restore`` writes its sections back."""
    _user, keyring, _key = ceph.client("qemu-bk")
    keyring.chmod(0o600)
    image = os.path.basename(str(vmlib.new_name("img")))
    v = vm("rbdbk", metadata_attrs={
        "image": f"rbd:{ceph.pool}/{image}:conf={ceph.conf}:id=qemu-bk:keyring={keyring}"})
    loc = json.loads(vmlib.nvmgr("define", v.xml_path, "--output", "json").stdout)["image"]
    before = tmp_path / "before.fd"
    vmlib.nvmgr("get", loc, "uefi-vars", "-o", before)
    out = tmp_path / "backup.nvram"
    r = json.loads(vmlib.nvmgr("backup", "--domain", v.name, out, "--output", "json").stdout)
    assert out.is_file() and (out.stat().st_mode & 0o777) == 0o600, r
    vmlib.nvmgr("check", out)
    other = tmp_path / "other.fd"
    other.write_bytes(os.urandom(before.stat().st_size))
    vmlib.nvmgr("put", loc, "uefi-vars", other)
    r = json.loads(vmlib.nvmgr("restore", "--domain", v.name, out, "--output", "json").stdout)
    assert "uefi-vars" in r["restored"], r
    after = tmp_path / "after.fd"
    vmlib.nvmgr("get", loc, "uefi-vars", "-o", after)
    assert after.read_bytes() == before.read_bytes()
    # Stored snapshots go beside an image file: refused for an RBD image, nothing
    # made under the caller's working directory.
    p = vmlib.nvmgr("snapshot", "--domain", v.name, "create", "s1", check=False)
    assert p.returncode == 2 and "network location" in p.stderr, p
    assert not Path(f"rbd:{ceph.pool}").exists()
    listed = json.loads(vmlib.nvmgr("snapshot", "--domain", v.name, "list",
                                    "--output", "json").stdout)
    assert listed == {"snapshots": []}, listed
    vmlib.nvmgr("undefine", v.name, "--remove-nvram")
    assert image not in ceph.run("rbd", "ls", ceph.pool).split()
