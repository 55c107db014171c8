"""The single-node Ceph cluster harness (tests/ceph_cluster.py) works, as QEMU's tools see it.

Skipped, with the reason, without root or without Ceph's packages (``scripts/setup``
installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph_cluster import CephCluster, skip_without_ceph


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    skip_without_ceph()
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


def _nvmgr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvmgr", *args], capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def test_an_nvmgr_image_on_rbd(ceph: CephCluster, tmp_path: Path) -> None:
    _user, keyring, _key = ceph.client("nvmgr-cli")
    where = f":conf={ceph.conf}:id=nvmgr-cli:keyring={keyring}"
    loc = f"rbd:{ceph.pool}/vm1-nvram{where}"
    p = _nvmgr("create", loc, "-s", "efivars:528K:pflash", "-s", "blob:64K", "-O", "json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == "rbd"
    assert "vm1-nvram" in ceph.run("rbd", "ls", ceph.pool).split()
    data = os.urandom(60000)
    (tmp_path / "blob").write_bytes(data)
    assert _nvmgr("put", loc, "blob", str(tmp_path / "blob")).returncode == 0
    assert _nvmgr("get", loc, "blob", "-o", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out").read_bytes() == data
    p = _nvmgr("grow", loc, "-s", "vpd:16K")
    assert p.returncode == 0, p.stderr
    assert _nvmgr("check", loc).returncode == 0
    names = [s["name"] for s in json.loads(_nvmgr("info", loc, "-O", "json").stdout)["sections"]]
    assert names == ["efivars", "blob", "vpd"]
    # The bytes are in Ceph: QEMU's own rbd driver reads the directory nvmgr wrote.
    raw = tmp_path / "raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    f"rbd:{ceph.pool}/vm1-nvram:conf={ceph.conf}:id=admin:"
                    f"keyring={ceph.admin_keyring}", str(raw)], check=True, timeout=120)
    copy = _nvmgr("get", str(raw), "blob", "-o", str(tmp_path / "out2"))
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "out2").read_bytes() == data
    # Errors: exists (2), no such image (3), a bad location (2); nothing changed.
    p = _nvmgr("create", loc, "-s", "x:4K")
    assert p.returncode == 2 and "exists" in p.stderr, p.stderr
    p = _nvmgr("info", f"rbd:{ceph.pool}/nope{where}")
    assert p.returncode == 3 and "no RBD image nope" in p.stderr, p.stderr
    p = _nvmgr("info", f"rbd:{ceph.pool}/x:conf=relative.conf")
    assert p.returncode == 2 and "absolute path" in p.stderr, p.stderr
    # Another nvmgr writer on this host holds it: busy (7), or wait for it.
    from nvmgr.image.image import Image

    with Image.open(loc, writable=True):
        p = _nvmgr("put", loc, "blob", str(tmp_path / "blob"))
        assert p.returncode == 7 and "another nvmgr" in p.stderr, p.stderr
    assert _nvmgr("check", loc).returncode == 0


def test_convert_a_file_to_rbd_and_back(ceph: CephCluster, tmp_path: Path) -> None:
    _user, keyring, _key = ceph.client("nvmgr-conv")
    where = f":conf={ceph.conf}:id=nvmgr-conv:keyring={keyring}"
    src = tmp_path / "vm.nvram"
    assert _nvmgr("create", str(src), "-s", "vars:528K:pflash", "-s", "blob:64K").returncode == 0
    payloads = {"vars": os.urandom(540672), "blob": os.urandom(50000)}
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(data)
        assert _nvmgr("put", str(src), name, str(tmp_path / name)).returncode == 0
    loc = f"rbd:{ceph.pool}/converted{where}"
    p = _nvmgr("convert", str(src), loc, "-f", "raw")
    assert p.returncode == 0, p.stderr
    back = tmp_path / "back.qcow2"
    p = _nvmgr("convert", loc, str(back), "-f", "qcow2")
    assert p.returncode == 0, p.stderr
    for image in (loc, str(back)):
        assert _nvmgr("check", image).returncode == 0
        for name, data in payloads.items():
            out = tmp_path / f"out-{name}"
            out.unlink(missing_ok=True)
            assert _nvmgr("get", image, name, "-o", str(out)).returncode == 0
            assert out.read_bytes() == data, (image, name)
    p = _nvmgr("convert", str(src), loc, "-f", "raw")  # never over an existing image
    assert p.returncode == 2 and "already exists" in p.stderr, p.stderr
    p = _nvmgr("convert", str(src), f"rbd:{ceph.pool}/q{where}", "-f", "qcow2")
    assert p.returncode == 2 and "raw" in p.stderr, p.stderr


def test_rbd_snapshots_of_an_image(ceph: CephCluster, tmp_path: Path) -> None:
    _user, keyring, _key = ceph.client("nvmgr-snap")
    loc = f"rbd:{ceph.pool}/snapped:conf={ceph.conf}:id=nvmgr-snap:keyring={keyring}"
    assert _nvmgr("create", loc, "-s", "blob:16K").returncode == 0
    old, new = os.urandom(3000), os.urandom(3000)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    assert _nvmgr("put", loc, "blob", str(tmp_path / "old")).returncode == 0
    assert _nvmgr("snapshot", loc, "create", "before").returncode == 0
    assert _nvmgr("put", loc, "blob", str(tmp_path / "new")).returncode == 0
    listed = json.loads(_nvmgr("snapshot", loc, "list", "-O", "json").stdout)["snapshots"]
    assert [(s["name"], s["kind"]) for s in listed] == [("before", "rbd")]
    assert "before" in ceph.run("rbd", "snap", "ls", f"{ceph.pool}/snapped")  # Ceph's own
    assert _nvmgr("snapshot", loc, "revert", "before").returncode == 0
    assert _nvmgr("get", loc, "blob", "-o", str(tmp_path / "got")).returncode == 0
    assert (tmp_path / "got").read_bytes() == old
    assert _nvmgr("check", loc).returncode == 0
    p = _nvmgr("snapshot", loc, "create", "before")
    assert p.returncode == 2 and "exists" in p.stderr, p.stderr
    assert _nvmgr("snapshot", loc, "delete", "before").returncode == 0
    p = _nvmgr("snapshot", loc, "revert", "before")
    assert p.returncode == 3 and "no snapshot" in p.stderr, p.stderr


def test_the_key_from_a_libvirt_secret_of_usage_type_ceph(
        ceph: CephCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``secret=UUID`` / ``secret_usage=NAME``: nvmgr reads the key from libvirt's
    secret store (as libvirt 9 keeps it: UUID.xml, and the value's base64 in
    UUID.base64) and hands it to qemu-img and qemu-storage-daemon as a secret
    object; the monitors come from ``mon_host`` (no conf file names them here)."""
    from nvmgr.cli.app import main

    _user, _keyring, key = ceph.client("nvmgr-secret")
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    uuid = "5f0e6c1d-2b3a-4c8d-9e7f-0a1b2c3d4e5f"
    (secrets / f"{uuid}.xml").write_text(
        f"<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid>"
        "<usage type='ceph'><name>client.nvmgr-secret secret</name></usage></secret>")
    (secrets / f"{uuid}.base64").write_text(key)
    monkeypatch.setattr("nvmgr.paths.SECRETS_DIR", str(secrets))
    # A conf without the monitors: they come from the location.
    conf = tmp_path / "client.conf"
    conf.write_text("".join(line + "\n" for line in ceph.conf.read_text().splitlines()
                            if not line.startswith("mon host")))
    where = (rf":conf={conf}:id=nvmgr-secret:mon_host=127.0.0.1\:{ceph.port}"
             f":secret={uuid}")
    loc = f"rbd:{ceph.pool}/from-secret{where}"
    assert main(["create", loc, "-s", "blob:64K"]) == 0
    data = os.urandom(5000)
    (tmp_path / "blob").write_bytes(data)
    assert main(["put", loc, "blob", str(tmp_path / "blob")]) == 0
    by_usage = (rf"rbd:{ceph.pool}/from-secret:conf={conf}:id=nvmgr-secret"
                rf":mon_host=127.0.0.1\:{ceph.port}:secret_usage=client.nvmgr-secret secret")
    assert main(["get", by_usage, "blob", "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").read_bytes() == data
    assert main(["snapshot", loc, "create", "s1"]) == 0
    assert main(["check", loc]) == 0
    capsys.readouterr()
    assert main(["snapshot", loc, "list", "-O", "json"]) == 0
    assert "s1" in capsys.readouterr().out
    assert main(["create", loc, "-s", "x:4K"]) == 2  # exists: qemu-img reached Ceph
    # convert to a file and back into another RBD image, both keyed by the secret.
    copy = tmp_path / "copy.qcow2"
    assert main(["convert", loc, str(copy), "-f", "qcow2"]) == 0
    loc2 = f"rbd:{ceph.pool}/from-secret-2{where}"
    assert main(["convert", str(copy), loc2, "-f", "raw"]) == 0
    for image in (str(copy), loc2):
        out = tmp_path / "out-conv"
        out.unlink(missing_ok=True)
        assert main(["get", image, "blob", "-o", str(out)]) == 0
        assert out.read_bytes() == data
        assert main(["check", image]) == 0
    assert main(["convert", str(copy), loc2, "-f", "raw"]) == 2  # never over an image
    # The secret's value gone: refused naming the secret (3), nothing asked of Ceph.
    (secrets / f"{uuid}.base64").unlink()
    capsys.readouterr()
    assert main(["info", loc]) == 3
    assert f"libvirt secret {uuid} has no value" in capsys.readouterr().err
    # A wrong key in the secret: Ceph refuses the user (external, 10).
    (secrets / f"{uuid}.base64").write_text(ceph.client("other")[2])
    assert main(["info", loc]) == 10


@contextlib.contextmanager
def guest_on_rbd(ceph: CephCluster, user: str, key: str, image: str, offset: int,
                 size: int, sock: Path) -> Iterator[str]:
    """What a running VM's QEMU does with its vars on RBD: an ``rbd`` node opened by
    QEMU's own driver (as the cephx *user*), a raw slice over it, here exported over
    NBD so that the test can play the guest writing its variables through it."""
    r, w = os.pipe()
    os.write(w, key.encode())
    os.close(w)
    node = {"driver": "rbd", "pool": ceph.pool, "image": image, "conf": str(ceph.conf),
            "user": user, "key-secret": "k", "node-name": "f"}
    p = subprocess.Popen(
        ["qemu-storage-daemon", "--object", f"secret,id=k,format=base64,file=/dev/fd/{r}",
         "--blockdev", json.dumps(node),
         "--blockdev", json.dumps({"driver": "raw", "file": "f", "offset": offset,
                                   "size": size, "node-name": "vars"}),
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=vars,name=vars,writable=on"],
        pass_fds=(r,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(r)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert p.poll() is None, p.stderr.read() if p.stderr else ""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not come up"
            time.sleep(0.05)
        yield f"nbd+unix:///vars?socket={sock}"
    finally:
        p.terminate()
        p.wait(30)


def test_a_running_qemu_on_rbd_is_told_by_the_exclusive_lock(ceph: CephCluster,
                                                              tmp_path: Path) -> None:
    """A live section is never written while a QEMU holds the RBD image's exclusive lock
    (librbd takes it at QEMU's first write): refused busy (7) even with --force, which
    overrides only nvmgr's own in-use mark (not set here); the lock is the only sign."""
    _user, keyring, key = ceph.client("nvmgr-lock")
    loc = f"rbd:{ceph.pool}/locked:conf={ceph.conf}:id=nvmgr-lock:keyring={keyring}"
    assert _nvmgr("create", loc, "-s", "efivars:528K:pflash", "-s", "blob:16K").returncode == 0
    vars_ = json.loads(_nvmgr("info", loc, "-O", "json").stdout)["sections"][0]
    assert vars_["name"] == "efivars" and not vars_["dirty"]
    new = tmp_path / "new"
    new.write_bytes(os.urandom(4096))
    with guest_on_rbd(ceph, "nvmgr-lock", key, "locked", vars_["offset"], 540672,
                      tmp_path / "vars.sock") as guest:
        # Open, not written yet: librbd holds no lock, nvmgr cannot tell (the mark does).
        assert "auto " not in ceph.run("rbd", "lock", "ls", f"{ceph.pool}/locked")
        _run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4096", guest)  # the guest writes
        assert "auto " in ceph.run("rbd", "lock", "ls", f"{ceph.pool}/locked")
        before = _nvmgr("info", loc, "-O", "json").stdout
        for extra in ((), ("--force",)):
            p = _nvmgr("put", loc, "efivars", str(new), *extra)
            assert p.returncode == 7, p.stderr
            assert "efivars is live" in p.stderr and "exclusive lock: client." in p.stderr
        p = _nvmgr("check", loc, "--repair", "--yes")
        assert p.returncode == 7 and "exclusive lock" in p.stderr, p.stderr
        assert _nvmgr("info", loc, "-O", "json").stdout == before  # nothing written
        # A section QEMU does not read may change beside it, as on a file.
        p = _nvmgr("put", loc, "blob", str(new))
        assert p.returncode == 0, p.stderr
    # QEMU gone: the lock with it, the write goes through.
    assert "auto " not in ceph.run("rbd", "lock", "ls", f"{ceph.pool}/locked")
    p = _nvmgr("put", loc, "efivars", str(new))
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    assert _nvmgr("get", loc, "efivars", "-o", str(out)).returncode == 0
    assert out.read_bytes() == new.read_bytes()


def test_orphans_on_rbd_recorded_listed_adopted_and_moved_aside(ceph: CephCluster,
                                                                  tmp_path: Path) -> None:
    """An image on RBD whose domain is gone: recorded in the image, listed by ``nvmgr
    images --image LOCATION`` (no directory lists a pool), adopted (same image, new
    owner) or moved aside under a new name in its pool (Ceph's rename: kept)."""
    from nvmgr.format.layout import SectionSpec
    from nvmgr.format.model import Binding, Orphaned
    from nvmgr.image.image import Image
    from nvmgr.provision import orphans
    from nvmgr.storage import image_exists

    owner, new = uuid.uuid4(), uuid.uuid4()
    _user, keyring, _key = ceph.client("nvmgr-orphan")
    where = f":conf={ceph.conf}:id=nvmgr-orphan:keyring={keyring}"
    loc = f"rbd:{ceph.pool}/vm-orphan{where}"
    specs = [SectionSpec("uefi-vars", 8192, Binding.PFLASH),
             SectionSpec("tpm-permall", 8192, Binding.TPM)]
    with Image.create(loc, specs, domain_uuid=owner) as img:
        img.put("uefi-vars", b"vars" * 100)
    assert not orphans.mark_orphaned(f"rbd:{ceph.pool}/gone{where}", str(owner), "vm1")
    assert orphans.mark_orphaned(loc, str(owner), "vm1", when=1_764_590_000)
    assert orphans.record_of(loc) == Orphaned(1_764_590_000, "vm1")
    p = _nvmgr("images", "--orphans", "--connect", "test:///default", "--dir", str(tmp_path),
               "--image", loc, "-O", "json")
    assert p.returncode == 0, p.stderr
    [entry] = json.loads(p.stdout)["images"]
    assert (entry["path"], entry["state"], entry["domain"]) == (loc, "orphaned", "vm1")
    assert entry["orphaned_since"] == "2025-12-01T11:53:20Z"

    image_uuid = orphans.adopt(loc, new)
    with Image.open(loc) as img:
        d = img.directory
        assert (d.domain_uuid, d.orphaned, d.image_uuid) == (new, None, image_uuid)
        assert img.get("uefi-vars") == b"vars" * 100

    moved = orphans.move_aside(loc, new)  # recorded first, then renamed in its pool
    assert moved.startswith(f"rbd:{ceph.pool}/vm-orphan.orphan-") and moved.endswith(where)
    assert not image_exists(loc) and image_exists(moved)
    assert moved.split("/", 1)[1].split(":", 1)[0] in ceph.run("rbd", "ls", ceph.pool).split()
    with Image.open(moved) as img:
        assert img.get("uefi-vars") == b"vars" * 100
        assert img.directory.orphaned is not None and img.directory.domain_uuid == new
