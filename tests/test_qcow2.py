"""Qcow2Container (a qemu-storage-daemon FUSE export read and written like a raw
file), its daemon's lifetime, stale mounts, and the qemu-img snapshot helpers,
against real QEMU tools."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.errors import (
    BusyError,
    CorruptError,
    ExternalError,
    NoSpaceError,
    NotFoundError,
    UsageError,
)
from nvmgr.storage import create_container, fuse, open_container
from nvmgr.storage.base import qemu_holds_write
from nvmgr.storage.qcow2 import (
    Qcow2Container,
    qemu_img_info,
    snapshot_apply,
    snapshot_create,
    snapshot_delete,
    snapshot_list,
)
from nvmgr.storage.raw import RawContainer

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-storage-daemon") and shutil.which("qemu-img")),
    reason="needs qemu-storage-daemon and qemu-img",
)

MiB = 1 << 20


def qsd_pids(marker: str) -> list[int]:
    """Live qemu-storage-daemon processes whose command line mentions *marker*."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmd and marker.encode() in cmd:
            pids.append(int(entry))
    return pids


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $XDG_RUNTIME_DIR; yields nvmgr's mountpoint directory in it, so
    tests can see what the daemons leave behind."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return run / f"nvmgr-fuse-{os.geteuid()}"


def leftovers(runtime: Path) -> list[str]:
    """What is left in the mountpoint directory (nothing, or no directory yet)."""
    return sorted(p.name for p in runtime.iterdir()) if runtime.exists() else []


def fuse_mounts_under(d: Path) -> list[str]:
    """FUSE mount points under *d*, from /proc/self/mountinfo (dead ones too)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            fstype = fields[fields.index("-") + 1]
            if fstype.startswith("fuse") and fields[4].startswith(str(d)):
                out.append(fields[4])
    return out


@pytest.fixture
def image(tmp_path: Path, runtime: Path) -> Iterator[str]:
    path = str(tmp_path / "nv.qcow2")
    Qcow2Container.create(path, 64 * MiB).close()
    yield path
    assert qsd_pids(str(tmp_path)) == []
    assert leftovers(runtime) == []
    assert fuse_mounts_under(tmp_path) == []


# -- create / open ----------------------------------------------------------------


def test_create_makes_private_qcow2(tmp_path: Path, runtime: Path) -> None:
    path = str(tmp_path / "new.qcow2")
    with Qcow2Container.create(path, 8 * MiB) as c:
        assert c.fmt == "qcow2" and c.writable
        assert c.size() == 8 * MiB
        assert c.read(0, 4096) == bytes(4096)
        assert c.start_latency < 5
        # one export: its mountpoint (a FUSE mount now) and its lock
        assert c._export is not None
        mp = c._export.mountpoint
        assert leftovers(runtime) == sorted([os.path.basename(mp), os.path.basename(mp) + ".lock"])
        assert fuse.is_fuse_mount(mp) and os.stat(mp).st_size == 8 * MiB
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert leftovers(runtime) == []
    assert not fuse.is_fuse_mount(mp)
    assert os.stat(path).st_mode & 0o777 == 0o600
    info = qemu_img_info(path)
    assert info["format"] == "qcow2" and info["virtual-size"] == 8 * MiB
    assert "backing-filename" not in info


def test_create_refuses_existing_file(tmp_path: Path, runtime: Path) -> None:
    path = tmp_path / "exists.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists") as qerr:
        Qcow2Container.create(str(path), MiB)
    with pytest.raises(UsageError) as rerr:
        RawContainer.create(str(path), MiB)
    assert str(qerr.value) == str(rerr.value)
    assert path.read_bytes() == b"precious"


def test_create_rejects_unaligned_size(tmp_path: Path, runtime: Path) -> None:
    with pytest.raises(UsageError, match="multiple of 512"):
        Qcow2Container.create(str(tmp_path / "x.qcow2"), 1000)
    assert not (tmp_path / "x.qcow2").exists()


def test_generic_entry_points_pick_qcow2(tmp_path: Path, runtime: Path) -> None:
    path = str(tmp_path / "g.qcow2")
    with create_container(path, "qcow2", MiB) as c:
        assert isinstance(c, Qcow2Container)
        c.write(0, b"abc")
        c.flush()
    with open_container(path) as c:
        assert isinstance(c, Qcow2Container) and not c.writable
        assert c.read(0, 3) == b"abc"


def test_open_missing_and_foreign(tmp_path: Path, runtime: Path) -> None:
    with pytest.raises(NotFoundError):
        Qcow2Container(str(tmp_path / "nope.qcow2"))
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(4096))
    with pytest.raises(UsageError, match="not a qcow2 image"):
        Qcow2Container(str(raw))
    assert leftovers(runtime) == []


def test_daemon_failure_cleans_up(tmp_path: Path, runtime: Path) -> None:
    """A qcow2 magic over garbage: the daemon refuses it; nothing is left behind."""
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 4092)
    with pytest.raises(CorruptError, match="the qcow2 container is damaged or not qcow2"):
        Qcow2Container(str(bad), writable=True)
    assert qsd_pids(str(tmp_path)) == []
    assert leftovers(runtime) == []
    assert fuse_mounts_under(tmp_path) == []
    # and the flock was released
    with RawContainer(str(bad), writable=True):
        pass


# -- I/O --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (12345, 1),
        (1, 4095),
        (4097, 4095),
        (3, MiB + 3),
        (5 * MiB - 7, MiB + 3),
        (777, 40 * MiB),  # many FUSE requests
    ],
)
def test_round_trip(image: str, offset: int, length: int) -> None:
    data = os.urandom(length)
    with Qcow2Container(image, writable=True) as c:
        c.write(offset, data)
        assert c.read(offset, length) == data
        c.flush()
        # neighbours untouched
        if offset:
            assert c.read(offset - 1, 1) == b"\0"
        assert c.read(offset + length, 1) == b"\0"
    with Qcow2Container(image) as c:
        assert c.read(offset, length) == data
    assert qemu_img_info(image)["virtual-size"] == 64 * MiB


def test_memoryview_write_and_empty_io(image: str) -> None:
    with Qcow2Container(image, writable=True) as c:
        c.write(100, memoryview(b"xxhelloxx")[2:7])
        c.write(5, b"")
        assert c.read(100, 0) == b""
        assert c.read(99, 7) == b"\0hello\0"


def test_read_past_end_is_zeros_write_past_end_fails(image: str) -> None:
    with Qcow2Container(image, writable=True) as c:
        end = c.size()
        c.write(end - 2, b"ab")
        assert c.read(end - 2, 6) == b"ab\0\0\0\0"
        assert c.read(end + 10, 3) == b"\0\0\0"
        with pytest.raises(NoSpaceError):
            c.write(end - 1, b"xy")
        with pytest.raises(UsageError):
            c.read(-1, 1)


def test_read_only_container_refuses_changes(image: str) -> None:
    with Qcow2Container(image) as c:
        assert not c.writable
        with pytest.raises(UsageError, match="read-only"):
            c.write(0, b"x")
        with pytest.raises(UsageError, match="read-only"):
            c.resize(128 * MiB)
        c.flush()  # harmless


def _sigkill_daemon(c: Qcow2Container) -> None:
    pid = c.daemon_pid
    assert pid is not None and c._export is not None and c._export._proc is not None
    os.kill(pid, signal.SIGKILL)
    c._export._proc.wait()


def test_flush_survives_daemon_kill(image: str, runtime: Path, tmp_path: Path) -> None:
    """After flush the data is on disk even if the daemon then dies by SIGKILL;
    the dead daemon's mount is detached by close, nothing is left behind."""
    c = Qcow2Container(image, writable=True)
    try:
        c.write(MiB, b"durable")
        c.flush()
        _sigkill_daemon(c)
        assert fuse_mounts_under(tmp_path)  # dead, still mounted
        with pytest.raises(ExternalError, match="exited with status -9") as err:
            c.read(0, 1)
        assert err.value.image == image
        assert isinstance(err.value.__cause__, OSError)  # the cause is kept
    finally:
        c.close()
    c.close()  # idempotent
    assert fuse_mounts_under(tmp_path) == [] and leftovers(runtime) == []
    with Qcow2Container(image) as c2:
        assert c2.read(MiB, 7) == b"durable"


def test_fsync_reaches_the_qcow2_file(tmp_path: Path, runtime: Path) -> None:
    """fsync on the exported file is QEMU's flush: a write into a new cluster
    survives a SIGKILLed daemon after flush(), and is lost without it (QEMU
    keeps the new L2 entry in its metadata cache until the flush)."""
    for flushed in (True, False):
        path = str(tmp_path / f"f{flushed}.qcow2")
        Qcow2Container.create(path, 8 * MiB).close()
        c = Qcow2Container(path, writable=True)
        try:
            c.write(3 * MiB, b"cluster")
            if flushed:
                c.flush()
            _sigkill_daemon(c)
        finally:
            c.close()
        with Qcow2Container(path) as c2:
            got = c2.read(3 * MiB, 7)
        assert got == (b"cluster" if flushed else bytes(7)), f"flushed={flushed}: {got!r}"
    assert leftovers(runtime) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root sets the export's read-ahead")
def test_export_reads_ahead_in_large_requests(image: str) -> None:
    with Qcow2Container(image) as c:
        assert c._file is not None
        dev = os.fstat(c._file.fd).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
            assert int(f.read()) == fuse.READ_AHEAD_KB


def test_runtime_dir_must_be_private(runtime: Path, image: str) -> None:
    runtime.mkdir(mode=0o700, exist_ok=True)
    runtime.chmod(0o755)
    try:
        with pytest.raises(ExternalError, match="mode 0700"):
            Qcow2Container(image)
    finally:
        runtime.chmod(0o700)
    with Qcow2Container(image) as c:
        assert c.read(0, 1) == b"\0"


@pytest.mark.parametrize("how", ["setpriv", "prctl"])
def test_killed_nvmgr_takes_its_daemon_along(
    image: str, tmp_path: Path, runtime: Path, how: str
) -> None:
    """SIGKILL of the process that opened the container: no daemon survives it,
    whether the parent-death signal comes from setpriv or from prctl in the
    child (no setpriv on PATH); the clean shutdown unmounted the export."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if how == "setpriv":
        if not shutil.which("setpriv"):
            pytest.skip("needs util-linux setpriv")
    else:  # a PATH with qemu-storage-daemon but without setpriv
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        qsd = shutil.which("qemu-storage-daemon")
        assert qsd is not None
        (bin_dir / "qemu-storage-daemon").symlink_to(qsd)
        env["PATH"] = str(bin_dir)
    script = (
        "import os, signal, sys\n"
        "from nvmgr.storage.qcow2 import Qcow2Container\n"
        "c = Qcow2Container(sys.argv[1], writable=True)\n"
        "c.write(0, b'before the crash')\n"
        "print(c.daemon_pid, c._export.mountpoint, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, image], env=env, capture_output=True, text=True
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    pid, mp = res.stdout.split()
    deadline = time.monotonic() + 10
    while qsd_pids(str(tmp_path)):
        assert time.monotonic() < deadline, "daemon outlived nvmgr"
        time.sleep(0.01)
    assert int(pid) not in qsd_pids(str(tmp_path))
    assert fuse_mounts_under(tmp_path) == [] and os.path.exists(mp)  # unmounted, not swept
    # The daemon shut down cleanly: the acknowledged (unflushed) write survived,
    # and the image is free for the next writer, whose start sweeps the leftovers.
    with Qcow2Container(image, writable=True, wait=10) as c:
        assert c.read(0, 16) == b"before the crash"
        assert not os.path.exists(mp)


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True
    )


def test_dead_mount_of_a_killed_nvmgr_is_swept(image: str, runtime: Path, tmp_path: Path) -> None:
    """nvmgr and its daemon both SIGKILLed: the dead FUSE mount stays (any stat of
    it fails) until the next export's sweep detaches and removes it."""
    script = (
        "import os, signal, sys\n"
        "from nvmgr.storage.qcow2 import Qcow2Container\n"
        "c = Qcow2Container(sys.argv[1], writable=True)\n"
        "c.write(0, b'flushed')\n"
        "c.flush()\n"
        "print(c._export.mountpoint, flush=True)\n"
        "os.kill(c.daemon_pid, signal.SIGKILL)\n"
        "c._export._proc.wait()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = _run_script(script, image)
    assert res.returncode == -signal.SIGKILL, res.stderr
    mp = res.stdout.strip()
    assert fuse_mounts_under(tmp_path) == [mp]
    with pytest.raises(OSError) as err:
        os.stat(mp)
    assert err.value.errno == errno.ENOTCONN  # what would break a careless next run
    assert qsd_pids(str(tmp_path)) == []

    with Qcow2Container(image, writable=True) as c:  # sweeps first
        assert fuse_mounts_under(tmp_path) == [c._export.mountpoint if c._export else ""]
        assert not os.path.lexists(mp) and not os.path.lexists(mp + ".lock")
        assert c.read(0, 7) == b"flushed"
    assert leftovers(runtime) == [] and fuse_mounts_under(tmp_path) == []


def test_sweep_leaves_live_exports_alone(image: str, runtime: Path) -> None:
    with Qcow2Container(image) as a:
        assert a._export is not None
        assert fuse.sweep(str(runtime)) == []
        with Qcow2Container(image) as b:  # its start sweeps too
            assert b.read(0, 4) == a.read(0, 4)
        assert fuse.is_fuse_mount(a._export.mountpoint)
        assert a.read(0, 4) == bytes(4)


def test_sweep_removes_orphans(runtime: Path) -> None:
    """Leftovers of a clean daemon exit under a killed nvmgr: a plain file, an NBD
    socket and an unlocked lock; a mountpoint and a socket whose lock is gone.  A
    live export's three names stay."""
    import fcntl
    import socket

    runtime.mkdir(mode=0o700, exist_ok=True)
    socks = []
    for n in ("aaaa.nbd", "cccc.nbd", "dddd.nbd"):
        sk = socket.socket(socket.AF_UNIX)
        sk.bind(str(runtime / n))
        socks.append(sk)
    (runtime / "aaaa").write_bytes(b"")
    (runtime / "aaaa.lock").write_bytes(b"")
    (runtime / "bbbb").write_bytes(b"")
    held = runtime / "cccc.lock"
    held.write_bytes(b"")
    (runtime / "cccc").write_bytes(b"")

    with open(held, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        removed = fuse.sweep(str(runtime))
        assert sorted(os.path.basename(p) for p in removed) == ["aaaa", "bbbb"]
        assert leftovers(runtime) == ["cccc", "cccc.lock", "cccc.nbd"]
    for n in ("cccc", "cccc.lock", "cccc.nbd"):
        (runtime / n).unlink()
    for sk in socks:
        sk.close()


def test_closed_container(image: str) -> None:
    c = Qcow2Container(image, writable=True)
    c.close()
    c.close()
    with pytest.raises(UsageError, match="closed"):
        c.read(0, 1)


# -- resize -----------------------------------------------------------------------


def test_resize_grows_keeps_data(image: str) -> None:
    data = os.urandom(3 * MiB + 5)
    with Qcow2Container(image, writable=True) as c:
        c.write(62 * MiB, data[: 2 * MiB])
        c.write(7, data)
        pid = c.daemon_pid
        c.resize(96 * MiB)
        assert c.daemon_pid == pid  # in place: ftruncate through the export
        assert c.size() == 96 * MiB
        assert c.read(7, len(data)) == data
        assert c.read(62 * MiB, 2 * MiB) == data[: 2 * MiB]
        assert c.read(64 * MiB, 32 * MiB) == bytes(32 * MiB)
        c.write(96 * MiB - 4, b"tail")
        c.resize(96 * MiB)  # same size: no-op
        with pytest.raises(UsageError, match="shrink"):
            c.resize(32 * MiB)
        with pytest.raises(UsageError, match="multiple of 512"):
            c.resize(100 * MiB + 1)
        c.flush()
    with Qcow2Container(image) as c:
        assert c.size() == 96 * MiB
        assert c.read(96 * MiB - 4, 4) == b"tail"


# -- locking ----------------------------------------------------------------------


def test_second_writer_is_busy(image: str) -> None:
    with Qcow2Container(image, writable=True):
        with pytest.raises(BusyError, match="another nvmgr"):
            Qcow2Container(image, writable=True, wait=0)
        with pytest.raises(BusyError):
            Qcow2Container(image)  # readers wait for the writer too
        with pytest.raises(BusyError):
            snapshot_create(image, "s")


def test_readers_share(image: str) -> None:
    with Qcow2Container(image) as a, Qcow2Container(image) as b:
        assert a.daemon_pid != b.daemon_pid  # one daemon and mountpoint each
        assert a.read(0, 10) == b.read(0, 10)
        with pytest.raises(BusyError):
            Qcow2Container(image, writable=True)


def test_writer_waits_for_first_to_close(image: str) -> None:
    first = Qcow2Container(image, writable=True)
    first.write(0, b"first")
    timer = threading.Timer(0.5, first.close)
    t0 = time.monotonic()
    timer.start()
    try:
        with Qcow2Container(image, writable=True, wait=20) as second:
            assert time.monotonic() - t0 >= 0.4
            assert second.read(0, 5) == b"first"
    finally:
        timer.join()
        first.close()


@pytest.fixture
def running_vm(image: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A qemu-storage-daemon holding the image writable, as a running VM would."""
    sock = str(tmp_path / "vm.sock")
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            json.dumps({"driver": "file", "node-name": "f", "filename": image}),
            "--blockdev",
            json.dumps({"driver": "qcow2", "node-name": "q", "file": "f"}),
            "--nbd-server",
            json.dumps({"addr": {"type": "unix", "path": sock}}),
            "--export",
            json.dumps({"type": "nbd", "id": "e", "node-name": "q", "writable": True}),
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not (os.path.exists(sock) and qemu_holds_write(image)):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield proc
    finally:
        proc.terminate()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_running_qemu_makes_writer_busy(
    running_vm: subprocess.Popen[bytes], image: str, tmp_path: Path
) -> None:
    with pytest.raises(BusyError, match="running QEMU") as err:
        Qcow2Container(image, writable=True)
    assert err.value.image == image
    assert "lock" in str(err.value)
    assert qsd_pids(str(tmp_path / "nv.qcow2")) == [running_vm.pid]
    # offline tools refuse too
    with pytest.raises(BusyError, match="running QEMU"):
        snapshot_create(image, "s1")
    # but nvmgr may still read it (force-share), and qemu_img_info works (-U)
    with Qcow2Container(image) as c:
        assert c.read(0, 16) == bytes(16)
    assert qemu_img_info(image)["format"] == "qcow2"


# -- fault hook -------------------------------------------------------------------


def test_fault_hook_sees_writes_and_flushes(image: str) -> None:
    calls: list[tuple[str, int, int]] = []
    with Qcow2Container(image, writable=True) as c:
        c.fault = lambda kind, off, n: calls.append((kind, off, n))
        c.write(4096, b"abc")
        c.flush()
        c.read(0, 10)
        c.resize(65 * MiB)
    assert calls == [("write", 4096, 3), ("flush", 0, 0), ("write", 65 * MiB, 0)]


def test_fault_hook_can_stop_a_write(image: str) -> None:
    class Crash(Exception):
        pass

    def hook(kind: str, off: int, n: int) -> None:
        if kind == "write" and off == 8192:
            raise Crash

    with Qcow2Container(image, writable=True) as c:
        c.fault = hook
        c.write(0, b"kept")
        with pytest.raises(Crash):
            c.write(8192, b"lost")
        assert c.read(8192, 4) == bytes(4)
        assert c.read(0, 4) == b"kept"


# -- snapshots --------------------------------------------------------------------


def test_snapshots(image: str) -> None:
    with Qcow2Container(image, writable=True) as c:
        c.write(1000, b"version one")
        c.flush()
    assert snapshot_list(image) == []
    snapshot_create(image, "one")
    with Qcow2Container(image, writable=True) as c:
        c.write(1000, b"version two")
    snapshot_create(image, "two")
    snaps = snapshot_list(image)
    assert [s["name"] for s in snaps] == ["one", "two"]
    for s in snaps:
        assert {"id", "name", "vm-state-size", "date-sec", "vm-clock-nsec"} <= set(s)
    with pytest.raises(UsageError, match="already exists"):
        snapshot_create(image, "one")

    snapshot_apply(image, "one")
    with Qcow2Container(image) as c:
        assert c.read(1000, 11) == b"version one"
    snapshot_apply(image, "two")
    with Qcow2Container(image) as c:
        assert c.read(1000, 11) == b"version two"

    snapshot_delete(image, "one")
    assert [s["name"] for s in snapshot_list(image)] == ["two"]
    with pytest.raises(NotFoundError):
        snapshot_apply(image, "one")
    with pytest.raises(NotFoundError):
        snapshot_delete(image, "nosuch")
    snapshot_delete(image, "two")
    assert snapshot_list(image) == []


def test_snapshot_names_are_names_not_ids(image: str) -> None:
    """qemu-img -a takes an id first; nvmgr must still apply the snapshot *named* "1"."""
    with Qcow2Container(image, writable=True) as c:
        c.write(0, b"AAAA")
    snapshot_create(image, "first")  # id 1
    with Qcow2Container(image, writable=True) as c:
        c.write(0, b"BBBB")
    snapshot_create(image, "1")  # id 2, named like id 1
    with Qcow2Container(image, writable=True) as c:
        c.write(0, b"CCCC")
    snapshot_apply(image, "1")
    with Qcow2Container(image) as c:
        assert c.read(0, 4) == b"BBBB"
    snapshot_delete(image, "1")
    assert [s["name"] for s in snapshot_list(image)] == ["first"]


@pytest.mark.parametrize("name", ["", "-o", "x" * 65, "tab\there", " pad", "nl\n"])
def test_bad_snapshot_names(image: str, name: str) -> None:
    with pytest.raises(UsageError):
        snapshot_create(image, name)
    with pytest.raises(UsageError):
        snapshot_apply(image, name)


def test_snapshot_missing_or_raw_image(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        snapshot_list(str(tmp_path / "nope.qcow2"))
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(4096))
    with pytest.raises(UsageError):
        snapshot_create(str(raw), "s")
