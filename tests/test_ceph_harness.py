"""The single-node Ceph cluster harness (tests/ceph_cluster.py) works, as QEMU's tools see it.

Skipped, with the reason, without root or without Ceph's packages (``scripts/setup``
installs them).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph_cluster import PACKAGES, CephCluster, missing_tools


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    if os.geteuid() != 0:
        pytest.skip("the Ceph harness runs its daemons as root")
    missing = missing_tools()
    if missing:
        pytest.skip(f"Ceph is not installed ({', '.join(missing)} missing; scripts/setup "
                    f"installs {' '.join(PACKAGES)})")
    with CephCluster(tmp_path_factory.mktemp("ceph")) as c:
        yield c


def _run(*argv: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, check=True, timeout=120, input=input)


def test_qemu_reads_and_writes_an_rbd_image_as_a_cephx_client(ceph: CephCluster,
                                                                tmp_path: Path) -> None:
    user, keyring, key = ceph.client("nvmgr-test")
    assert user == "client.nvmgr-test" and keyring.is_file() and len(key) == 40
    uri = f"rbd:{ceph.pool}/harness:conf={ceph.conf}:id=nvmgr-test:keyring={keyring}"
    _run("qemu-img", "create", "-f", "raw", uri, "4M")
    assert "harness" in ceph.run("rbd", "ls", ceph.pool).split()
    # qemu-io writes through librbd, qemu-img reads the bytes back.
    _run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1048576 65536", uri)
    out = tmp_path / "out"
    _run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    got = out.read_bytes()
    assert len(got) == 4 << 20
    assert got[1 << 20:(1 << 20) + 65536] == b"\x5a" * 65536
    assert got[:1 << 20] == bytes(1 << 20)


def test_a_user_without_rights_on_the_pool_is_refused(ceph: CephCluster) -> None:
    ceph.run("ceph", "auth", "get-or-create", "client.nobody", "mon", "profile rbd",
             "osd", "profile rbd pool=elsewhere", "-o", str(ceph.root / "nobody.keyring"))
    uri = (f"rbd:{ceph.pool}/denied:conf={ceph.conf}:id=nobody:"
           f"keyring={ceph.root / 'nobody.keyring'}")
    p = subprocess.run(["qemu-img", "create", "-f", "raw", uri, "1M"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode != 0
    assert "denied" not in ceph.run("rbd", "ls", ceph.pool).split()
