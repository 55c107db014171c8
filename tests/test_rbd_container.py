"""An nvmgr image in Ceph RBD (:class:`nvmgr.storage.rbd.RbdContainer`) against the
single-node cluster of ``tests/ceph_cluster.py``: a large first write goes out
split (librbd's cache leaves its writethrough start at the first flush), and a
put stays crash-safe at every I/O with the split in it.

Skipped, with the reason, without root or Ceph's packages (``scripts/setup``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr import paths
from nvmgr.errors import BusyError, ExitCode, ExternalError, NotFoundError, UsageError
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import CHUNK, Image
from nvmgr.storage import rbd
from nvmgr.storage.nbdread import REUSE_PIECE
from nvmgr.storage.rbd import WRITEBACK_FROM, WRITEBACK_SPLIT, RbdContainer
from tests.ceph_cluster import CephCluster, skip_without_ceph
from tests.conftest import RunCli
from tests.test_crash import Crash, Faults, State, assert_monotone, explain, injected, observe, rand


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    skip_without_ceph()
    with CephCluster(tmp_path_factory.mktemp("ceph")) as c:
        # A SIGKILLed daemon's RBD lock is broken once its watch times out (30 s
        # by default): the daemon-kill model waits for that at every crash point.
        c.run("ceph", "config", "set", "osd", "osd_client_watch_timeout", "5")
        yield c


@pytest.fixture(scope="module")
def where(ceph: CephCluster) -> str:
    """The location options of a cephx user of the test's own."""
    _u, keyring, _k = ceph.client("nvtest")
    return f":conf={ceph.conf}:id=nvtest:keyring={keyring}"


def _location(ceph: CephCluster, where: str, image: str) -> str:
    return f"rbd:{ceph.pool}/{image}{where}"


def _all_bytes(location: str) -> str:
    with RbdContainer(location) as c:
        return hashlib.sha256(c.read(0, c.size())).hexdigest()


def test_a_large_first_write_goes_out_split_and_flushed(ceph: CephCluster, where: str) -> None:
    loc = _location(ceph, where, f"split-{uuid.uuid4().hex[:8]}")
    size = 8 << 20
    trace = Faults()
    first, second, small = os.urandom(3 << 20), os.urandom(2 << 20), os.urandom(4096)
    one_request = os.urandom(WRITEBACK_FROM)
    with RbdContainer.create(loc, size) as c:
        c.fault = trace
        c.write(4096, small)  # one FUSE request: as it is, the cache still writes through
        c.write(7 << 20, one_request)
        c.write(1 << 20, first)
        c.write(5 << 20, second)  # after a flush: as it is
        c.flush()
    assert trace.trace == [
        ("write", 4096, 4096),
        ("write", 7 << 20, WRITEBACK_FROM),
        ("write", 1 << 20, WRITEBACK_SPLIT),
        ("flush", 0, 0),
        ("write", (1 << 20) + WRITEBACK_SPLIT, len(first) - WRITEBACK_SPLIT),
        ("write", 5 << 20, len(second)),
        ("flush", 0, 0),
    ]
    with RbdContainer(loc) as c:  # a new export reads what librbd stored
        assert c.read(4096, 4096) == small
        assert c.read(1 << 20, len(first)) == first
        assert c.read(5 << 20, len(second)) == second
        assert c.read(7 << 20, WRITEBACK_FROM) == one_request
        assert c.read(0, 4096) == bytes(4096)


def test_a_flush_after_a_write_ends_the_writethrough_start(ceph: CephCluster,
                                                          where: str) -> None:
    loc = _location(ceph, where, f"flushed-{uuid.uuid4().hex[:8]}")
    trace = Faults()
    with RbdContainer.create(loc, 4 << 20) as c:
        c.fault = trace
        c.flush()  # no write before it: QEMU skips it, librbd still writes through
        big = os.urandom(2 << 20)
        c.write(0, big)
        c.write(2 << 20, big)
    assert [k for k, _o, n in trace.trace] == ["flush", "write", "flush", "write", "write"]
    assert trace.trace[1] == ("write", 0, WRITEBACK_SPLIT)


def test_long_reads_go_over_nbd_with_requests_in_flight(ceph: CephCluster, where: str,
                                                       tmp_path: Path, nvmgr: RunCli) -> None:
    """A read-only container reads more than one piece through its daemon's NBD
    export (the FUSE file serves one request at a time); a writable one has no NBD
    export (it would pin the image's size).  ``nvmgr get -o`` of a 9 MiB section
    gets the stored bytes; one flipped byte in its last piece is named and leaves
    no output file."""
    loc = _location(ceph, where, f"nbdread-{uuid.uuid4().hex[:8]}")
    data = os.urandom(9 << 20)
    with Image.create(loc, [SectionSpec("blob", 10 << 20, Binding.OPAQUE)]) as img:
        img.put("blob", data)
        offset = img.section("blob").offset
        assert isinstance(img.container, RbdContainer)
        assert img.container._export is not None and img.container._export.nbd_socket is None
    with RbdContainer(loc) as c:
        assert c._export is not None and c._export.nbd_socket is not None
        assert c.read(offset, 4096) == data[:4096] and c._reader is None  # small: FUSE
        pieces = [bytes(p) for p in c.pieces(offset, len(data), CHUNK)]
        assert c._reader is not None and not c._reader.closed
        assert b"".join(pieces) == data and [len(p) for p in pieces] == [CHUNK, CHUNK, 1 << 20]
        reused = [len(p) for p in c.pieces(offset, len(data), CHUNK, reuse=True)]
        assert reused == [REUSE_PIECE] * (len(data) // REUSE_PIECE)
    out = tmp_path / "out.bin"
    r = nvmgr("get", loc, "blob", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    out.unlink()
    with RbdContainer(loc, writable=True) as c:
        last = c.read(offset + len(data) - 1, 1)
        c.write(offset + len(data) - 1, bytes([last[0] ^ 1]))
        c.flush()
    r = nvmgr("get", loc, "blob", "-o", out)
    assert r.returncode == ExitCode.CORRUPT and b"section blob is corrupted" in r.stderr
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- crash safety

BIG = CHUNK + (1 << 20)  # a 4 MiB chunk (split) and 1 MiB more


def _state(location: str) -> State:
    with Image.open(location) as img:
        return observe(img, {})


def _build(location: str) -> None:
    specs = [SectionSpec("blob", BIG, Binding.OPAQUE), SectionSpec("canary", 1024, Binding.OPAQUE)]
    with Image.create(location, specs, fmt="rbd") as img:
        img.put("blob", rand(BIG - 4096, "rbd-old"))
        img.put("canary", rand(1000, "canary"))


def _put_new(img: Image) -> None:
    img.put("blob", rand(BIG - 8192, "rbd-new"))


def _copy(ceph: CephCluster, where: str, template: str, tag: str) -> str:
    image = f"{template}-{tag}"
    ceph.run("rbd", "cp", f"{ceph.pool}/{template}", f"{ceph.pool}/{image}", timeout=120)
    return _location(ceph, where, image)


def _crash(location: str, hook: Faults, kill_daemon: bool) -> bool:
    """Run the put under *hook*; at the crash, SIGKILL the daemon first when asked
    (librbd then loses whatever it had in flight and no flush had waited for)."""
    with injected(hook) as opened:
        img = None
        try:
            img = Image.open(location, writable=True)
            _put_new(img)
            crashed = False
        except Crash:
            crashed = True
            if kill_daemon:
                pid = opened[0].daemon_pid  # type: ignore[attr-defined]
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
        finally:
            if img is not None:
                img.close()
    assert not hook.after, f"I/O was attempted after the crash: {hook.after}"
    return crashed


def _verify(location: str, old: State, new: State) -> str:
    before = _all_bytes(location)
    got = _state(location)
    assert _all_bytes(location) == before, "a read-only open changed the image"
    assert got in (old, new), explain(got, old, new)
    with Image.open(location, writable=True) as img:
        fresh = os.urandom(700)
        img.put("canary", fresh)
    with Image.open(location) as img:
        after = observe(img, {})
        assert [h.error for h in img.headers] == [None, None]
    assert after == got.with_section("canary", fresh), "a put after recovery disturbed it"
    return "old" if got == old else "new"


@pytest.mark.parametrize("kill_daemon", [False, True], ids=["exception", "daemon-sigkill"])
def test_a_large_put_on_rbd_is_crash_safe_at_every_io(ceph: CephCluster, where: str,
                                                      kill_daemon: bool) -> None:
    template = f"crash-{uuid.uuid4().hex[:8]}"
    _build(_location(ceph, where, template))
    old = _state(_location(ceph, where, template))
    dry = _copy(ceph, where, template, "dry")
    hook = Faults()
    assert not _crash(dry, hook, False)
    new = _state(dry)
    assert new != old
    trace = hook.trace
    # The split is in the put: its first chunk's head, a flush, the rest, ... commit.
    assert trace[:3] == [("write", trace[0][1], WRITEBACK_SPLIT), ("flush", 0, 0),
                         ("write", trace[0][1] + WRITEBACK_SPLIT, CHUNK - WRITEBACK_SPLIT)]
    outcomes = []
    for n in range(1, len(trace) + 1):
        loc = _copy(ceph, where, template, f"c{n}")
        assert _crash(loc, Faults(n), kill_daemon), f"no crash at I/O {n}"
        try:
            outcomes.append(_verify(loc, old, new))
        except AssertionError as e:
            raise AssertionError(f"crash at I/O {n}/{len(trace)} {trace[n - 1]}: {e}") from None
    if not kill_daemon:
        assert_monotone(outcomes, trace)
        return
    # SIGKILLed, the daemon loses what librbd's cache still had in flight: the commit
    # write too, when the crash comes before the last flush.  The put never returned
    # then, and either state is right; a crash never goes back from new to old.
    assert outcomes[0] == "old", outcomes
    first_new = outcomes.index("new") if "new" in outcomes else len(outcomes)
    assert all(o == "new" for o in outcomes[first_new:]), outcomes
    assert first_new >= len(outcomes) - 1, f"new before the commit's flush: {outcomes}"


# -------------------------------------------------------------- removal

def _exists(ceph: CephCluster, image: str) -> bool:
    return image in ceph.run("rbd", "ls", ceph.pool).split()


def test_remove_takes_the_image_and_its_snapshots(ceph: CephCluster, where: str) -> None:
    image = f"rm-{uuid.uuid4().hex[:8]}"
    loc = _location(ceph, where, image)
    with Image.create(loc, [SectionSpec("s", 4096, Binding.OPAQUE)], fmt="rbd") as img:
        img.put("s", b"x" * 100)
    rbd.snapshot_create(loc, "before")
    rbd.remove(loc)
    assert not _exists(ceph, image)
    with pytest.raises(NotFoundError, match=f"no RBD image {image}"):
        rbd.remove(loc)
    with pytest.raises(UsageError, match="names a snapshot"):
        rbd.remove(loc.replace(image, f"{image}@before", 1))


def test_remove_refuses_an_open_image_and_leaves_it_whole(ceph: CephCluster, where: str) -> None:
    image = f"rmbusy-{uuid.uuid4().hex[:8]}"
    loc = _location(ceph, where, image)
    with Image.create(loc, [SectionSpec("s", 4096, Binding.OPAQUE)], fmt="rbd") as img:
        img.put("s", b"kept")
    rbd.snapshot_create(loc, "snap1")
    with Image.open(loc) as img, pytest.raises(BusyError, match="another nvmgr"):
        rbd.remove(loc)  # this host's nvmgr holds it
    # Another client (QEMU, as a running VM) has it open: a watcher.
    with ceph.opened_elsewhere(rbd.RbdLocation.parse(loc).qemu_filename(), image), \
            pytest.raises(BusyError, match="the RBD image is open: client"):
        rbd.remove(loc)
    assert _exists(ceph, image)
    assert [s["name"] for s in rbd.snapshot_list(loc)] == ["snap1"]
    with Image.open(loc) as img:
        assert img.get("s") == b"kept"
    rbd.remove(loc)  # closed by its client: removed
    assert not _exists(ceph, image)


@pytest.mark.parametrize("source", ["keyring", "secret"])
def test_copy_out_reads_the_image_into_a_private_file(ceph: CephCluster, where: str,
                                                      tmp_path_factory: pytest.TempPathFactory,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      source: str) -> None:
    """The copy a backup starts from: the image's bytes, mode 0600; with the key in
    a libvirt secret (read from libvirt's store, handed to QEMU through a pipe) too."""
    image = f"cp-{uuid.uuid4().hex[:8]}"
    loc = _location(ceph, where, image)
    with Image.create(loc, [SectionSpec("s", 8192, Binding.OPAQUE)], fmt="rbd") as img:
        img.put("s", os.urandom(5000))
    if source == "secret":
        store = tmp_path_factory.mktemp("secrets")
        sec = str(uuid.uuid4())
        _u, _keyring, key = ceph.client("nvtest")
        (store / f"{sec}.xml").write_text(
            f"<secret ephemeral='no' private='yes'><uuid>{sec}</uuid>"
            f"<usage type='ceph'><name>nvtest</name></usage></secret>")
        (store / f"{sec}.base64").write_text(key)
        monkeypatch.setattr(paths, "SECRETS_DIR", str(store))
        loc = f"rbd:{ceph.pool}/{image}:conf={ceph.conf}:id=nvtest:secret={sec}"
    dst = tmp_path_factory.mktemp("copy") / "copy.raw"
    rbd.copy_out(loc, str(dst), "raw")
    assert dst.stat().st_mode & 0o777 == 0o600
    with RbdContainer(loc) as c:
        assert dst.read_bytes() == c.read(0, c.size())
    with Image.open(str(dst)) as copy:
        assert copy.check().ok
    with pytest.raises(ExternalError, match="qemu-img convert failed"):
        rbd.copy_out(loc.replace(image, image + "-gone", 1), str(dst) + ".2", "raw")
    assert not os.path.exists(str(dst) + ".2")
