"""Live migration with the image on Ceph RBD, between the two libvirtd hosts of
``hosts.py`` (issue 12).

The hosts have network namespaces of their own; the single-node cluster of
``tests/ceph_cluster.py`` listens on the machine's 127.0.0.1.  Each host gets a
:class:`hosts.TcpBridge` that carries the cluster's client ports (monitor,
manager, OSD) into its namespace, so QEMU's rbd driver, the hook server's
qemu-storage-daemon and swtpm's collection all reach the same cluster at the
addresses its maps name.  The test's own ``nvmgr`` commands talk to the cluster
directly.

The image's directory records who runs it: the runner follows the guest from
host to host, the in-use mark stays while either QEMU writes, and the image is
clean after the VM stops.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph_cluster import CephCluster

from . import hosts, vmlib
from .hosts import Host, destroy_checked, migrate_checked, runner_host
from .test_migrate import SERIAL_DIR, GuestVM

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rbd_cluster(ceph: CephCluster) -> Iterator[tuple[Host, Host, Path]]:
    """Two hosts, each reaching the Ceph cluster through a bridge of its own."""
    hosts.require()
    ports = ceph.client_ports()
    with hosts.two_hosts("rbdmig") as got:
        for h in got[:2]:
            h.path(SERIAL_DIR).mkdir(mode=0o755)
            h.forward_tcp(ports)
            # The bridge works: a Ceph client inside the host sees the cluster.
            h.enter("rbd", "-c", str(ceph.conf), "--keyring", str(ceph.admin_keyring),
                    "--name", "client.admin", "ls", ceph.pool)
        yield got


def test_live_migration_with_the_image_on_rbd(
        rbd_cluster: tuple[Host, Host, Path], ceph: CephCluster, tmp_path: Path) -> None:
    a, b, shared = rbd_cluster
    _user, keyring, _key = ceph.client("qemu-mig")
    keyring.chmod(0o600)  # root's (the hooks'); QEMU gets the key from a runtime file
    loc = (f"rbd:{ceph.pool}/mig-{uuid.uuid4().hex[:8]}"
           f":conf={ceph.conf}:id=qemu-mig:keyring={keyring}")
    v = GuestVM("rbd-mig", loc, tmp_path)
    v.define(a)
    v.start(a)
    v.boot_to_shell(a)
    assert not a.runtime_dir(v.uuid).joinpath("rbd.key").exists()  # removed at started
    v.setvar(a, "BeforeMigration", "written-on-source")
    ek = v.staged_ek(a)
    info = v.info()
    assert runner_host(info) == a.name and info["incoming"] is None and v.in_use()

    # A -> B: the destination's prepare stages the key for its QEMU and notes the
    # incoming run; the source's release hands the image over.
    migrate_checked(v, a, b, shared)
    assert not b.runtime_dir(v.uuid).joinpath("rbd.key").exists()
    v.setvar(b, "OnB", "written-on-destination")

    # B -> A: the owner follows the guest back.
    migrate_checked(v, b, a, shared)
    v.setvar(a, "BackOnA", "written-after-the-return")

    # Destroyed where it ended: the TPM collected, the vars resealed, a clean image.
    destroy_checked(v, a, ek=ek, variables={"BeforeMigration": "written-on-source",
                                            "OnB": "written-on-destination",
                                            "BackOnA": "written-after-the-return"})
    vmlib.nvmgr("check", loc)

    # It boots again from RBD, with the same TPM.
    mark_a = len(a.hook_log_lines())
    v.start(a)
    v.boot_to_shell(a)
    assert v.staged_ek(a) == ek
    a.virsh("destroy", v.name)
    a.wait_hook_log(rf"{v.name} release end: ", after=mark_a)
    vmlib.nvmgr("check", loc)
    assert v.vars()["BackOnA"] == "written-after-the-return"
