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
from pathlib import Path

import pytest

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
    # QEMU holds RBD's exclusive lock; the key file is gone after start.
    assert not (v.runtime_dir / "rbd.key").exists()
    p = vmlib.nvmgr("put", loc, "uefi-vars", "/dev/null", check=False)
    assert p.returncode == 7, p  # a running VM's live section: busy
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", timeout=60)
    vmlib.nvmgr("check", loc)
    varstore = tmp_path / "vars.fd"
    vmlib.nvmgr("get", loc, "uefi-vars", "-o", varstore)
    assert vmlib.uefi_vars(varstore), "OVMF wrote no variables into the RBD image"
    permall = tmp_path / "permall"
    vmlib.nvmgr("get", loc, "tpm-permall", "-o", permall)
    ek1, _ = vmlib.read_ek(permall.read_bytes(), tmp_path)

    v.start()  # the TPM comes back from RBD
    v.wait_for_shell(240)
    v.destroy()
    vmlib.wait_hook_log(rf"{v.name} release end: ", timeout=60)
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
