"""The storage layer's shape and its one seam to QEMU's tools.

- the registry: one list of formats, a probe per format, open/create by name;
- the seam (:mod:`nvmgr.storage.qemu`): a missing tool, a failed run, a lock
  conflict and a format rejection each become the documented error, the CLI
  shows them without a traceback, and no other module of ``nvmgr`` runs
  QEMU's tools;
- FUSE exports for a user other than root.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.errors import (
    BusyError,
    CorruptError,
    ExternalError,
    NotFoundError,
    UsageError,
)
from nvmgr.storage import (
    FORMATS,
    create_container,
    format_named,
    open_container,
    probe_format,
    qemu,
)
from nvmgr.storage.qcow2 import Qcow2Container
from nvmgr.storage.raw import RawContainer

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "nvmgr"
HAVE_QEMU = bool(shutil.which("qemu-img") and shutil.which("qemu-storage-daemon"))
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="needs qemu-img and qemu-storage-daemon")
MiB = 1 << 20


@pytest.fixture(autouse=True)
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """PATH without QEMU's tools (an empty directory); yields the environment."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    yield dict(os.environ, PATH=str(empty), PYTHONPATH=str(ROOT))


# -- the registry ------------------------------------------------------------------


def test_formats_are_listed_once() -> None:
    assert FORMATS == ("raw", "qcow2")
    assert format_named("raw") is RawContainer
    assert format_named("qcow2") is Qcow2Container
    with pytest.raises(UsageError, match="unknown image format 'vmdk'.*raw, qcow2"):
        format_named("vmdk")


def test_probe(tmp_path: Path) -> None:
    raw = tmp_path / "r.img"
    raw.write_bytes(b"QFI")  # short, and not the whole magic
    q = tmp_path / "q.img"
    q.write_bytes(b"QFI\xfb" + bytes(100))
    empty = tmp_path / "e.img"
    empty.write_bytes(b"")
    assert probe_format(str(raw)) == "raw"
    assert probe_format(str(q)) == "qcow2"
    assert probe_format(str(empty)) == "raw"
    with pytest.raises(NotFoundError) as nf:
        probe_format(str(tmp_path / "nope"))
    assert isinstance(nf.value.__cause__, FileNotFoundError)  # the cause is kept
    with pytest.raises(UsageError, match="is a directory"):
        probe_format(str(tmp_path))


def test_raw_round_trip_and_refusals(tmp_path: Path) -> None:
    path = str(tmp_path / "r.img")
    with create_container(path, "raw", 8192) as c:
        c.write(4000, b"abc")
        c.flush()
    with open_container(path) as c:
        assert isinstance(c, RawContainer) and not c.writable
        assert c.read(3999, 5) == b"\0abc\0"
        assert c.read(8190, 4) == b"\0\0\0\0"  # past the end: zeros
        with pytest.raises(UsageError, match="read-only"):
            c.write(0, b"x")
        with pytest.raises(UsageError, match="bad read"):
            c.read(-1, 1)
    with pytest.raises(UsageError, match="already exists"):
        create_container(path, "raw", 4096)
    with pytest.raises(UsageError, match="unknown image format"):
        create_container(str(tmp_path / "x"), "vdi", 4096)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_pieces_in_order_reused_or_fresh(tmp_path: Path, fmt: str) -> None:
    """Container.pieces: the bytes in order, in pieces of the size asked (the last
    shorter, past the end zeros); with reuse, every piece a view of one buffer."""
    if fmt == "qcow2" and not shutil.which("qemu-storage-daemon"):
        pytest.skip("needs qemu-storage-daemon")
    data = os.urandom(64 << 10)
    path = str(tmp_path / f"p.{fmt}")
    with create_container(path, fmt, len(data)) as c:
        c.write(0, data)
        c.flush()
    with open_container(path) as c:
        for reuse in (False, True):
            seen = []
            got = b""
            for p in c.pieces(1000, len(data), 4096, reuse=reuse):
                got += bytes(p)
                seen.append(p.obj if isinstance(p, memoryview) else p)
            assert got == data[1000:] + bytes(1000)
            assert len(seen) == 16
            if reuse:
                assert all(o is seen[0] for o in seen)
            else:
                assert len({id(o) for o in seen}) > 1
        with pytest.raises(UsageError, match="bad read"):
            list(c.pieces(-1, 10, 4, reuse=True))


def test_storage_modules_import_in_one_direction() -> None:
    """base <- raw <- qcow2 <- network <- rbd, nbd <- formats; qemu, mounts, nbdread and
    fuse below qcow2; nothing imports the compatibility module container."""
    order = ["base", "qemu", "raw", "mounts", "nbdread", "fuse", "qcow2", "network", "rbd",
             "nbd", "formats"]
    for i, name in enumerate(order):
        tree = ast.parse((PKG / "storage" / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("nvmgr.storage."):
                    deps.add(node.module.rsplit(".", 1)[1])
                elif node.module == "nvmgr.storage":
                    deps.update(a.name for a in node.names)
        assert "container" not in deps
        assert deps <= set(order[:i]), f"storage.{name} imports {deps - set(order[:i])}"


# -- the seam ----------------------------------------------------------------------


def test_missing_qemu_img_names_the_tool_and_package(no_tools: dict[str, str]) -> None:
    with pytest.raises(ExternalError, match=r"qemu-img is not installed.*apt-get install "
                       r"qemu-utils") as err:
        qemu.qemu_img(["--version"], "qemu-img --version")
    assert isinstance(err.value.__cause__, FileNotFoundError)


def test_missing_daemon_names_the_tool_and_package(no_tools: dict[str, str]) -> None:
    with tempfile.TemporaryFile() as log, pytest.raises(
        ExternalError, match=r"qemu-storage-daemon is not installed.*qemu-system-common"
    ):
        qemu.start_storage_daemon(["--version"], pass_fds=(), log=log)


@needs_qemu
def test_cli_without_qemu_tools_says_so_without_traceback(
    tmp_path: Path, no_tools: dict[str, str]
) -> None:
    img = tmp_path / "a.qcow2"
    env = dict(os.environ, PATH=os.defpath, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "nvmgr", "create", str(img), "-s", "a:4K",
                    "-f", "qcow2"], env=env, check=True, capture_output=True)
    for args, tool in (
        (["info", str(img)], "qemu-storage-daemon"),
        (["create", str(tmp_path / "b.qcow2"), "-s", "a:4K", "-f", "qcow2"], "qemu-img"),
        (["convert", str(img), str(tmp_path / "c.raw"), "-f", "raw"], "qemu-storage-daemon"),
        (["snapshot", str(img), "list"], "qemu-img"),
    ):
        res = subprocess.run([sys.executable, "-m", "nvmgr", *args], env=no_tools,
                             capture_output=True, text=True)
        assert res.returncode == 10, (args, res.stderr)
        assert f"{tool} is not installed" in res.stderr and "apt-get install" in res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "b.qcow2").exists() and not (tmp_path / "c.raw").exists()


@needs_qemu
def test_failed_run_carries_the_tools_words(tmp_path: Path) -> None:
    with pytest.raises(ExternalError, match=r"qemu-img info failed \(exit 1\): .*Could not open"):
        qemu.img_info(str(tmp_path / "nope.qcow2"), "qcow2")


@needs_qemu
def test_convert_failure_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 4092)
    dst = tmp_path / "out.raw"
    with pytest.raises(ExternalError, match="qemu-img convert failed"):
        qemu.img_convert(str(bad), "qcow2", str(dst), "raw")
    assert not dst.exists()


@needs_qemu
def test_read_image(tmp_path: Path) -> None:
    path = str(tmp_path / "v.qcow2")
    with Qcow2Container.create(path, MiB) as c:
        c.write(512, b"vars")
        c.flush()
    data = qemu.read_image(path, "qcow2")
    assert len(data) == MiB and data[512:516] == b"vars"


def test_policy_lock_conflict_is_busy() -> None:
    stderr = ('qemu-img: Could not open \'x\': Failed to get "write" lock\n'
              "Is another process using the image [x]?\n")
    res = qemu.Result(["qemu-img"], 1, "", stderr)
    with pytest.raises(BusyError, match='running QEMU: Failed to get "write" lock'):
        qemu.check(res, "qemu-img snapshot", image="x")
    err = qemu.daemon_error(stderr, 1, image="x", format_arg="{}", fmt="qcow2")
    assert isinstance(err, BusyError)


def test_policy_format_rejection_is_corrupt() -> None:
    arg = '{"driver": "qcow2", "node-name": "img0", "file": "file0"}'
    stderr = f"qemu-storage-daemon: --blockdev {arg}: Image is not in qcow2 format\n"
    err = qemu.daemon_error(stderr, 1, image="x", format_arg=arg, fmt="qcow2")
    assert isinstance(err, CorruptError)
    assert "damaged or not qcow2 at all: Image is not in qcow2 format" in str(err)
    # the same words about another argument are no format rejection
    other = qemu.daemon_error(stderr, 1, image="x", format_arg='{"driver": "raw"}', fmt="raw")
    assert type(other) is ExternalError and "failed (exit 1)" in str(other)


def test_policy_fuse_mount_failure_and_timeout() -> None:
    stderr = ("fuse: failed to exec fusermount3: No such file or directory\n"
              "qemu-storage-daemon: --export {...}: Failed to mount FUSE session to export\n")
    err = qemu.daemon_error(stderr, 1, image="x", format_arg="{}", fmt="qcow2")
    assert type(err) is ExternalError and "cannot mount its FUSE export" in str(err)
    assert "fusermount3: No such file" in str(err)
    hung = qemu.daemon_error("", None, image="x", format_arg="{}", fmt="qcow2")
    assert "did not export the image in time" in str(hung)


def _calls_of(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines that call subprocess.NAME (or NAME imported from subprocess)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in names
                    and isinstance(f.value, ast.Name) and f.value.id == "subprocess"):
                lines.append(node.lineno)
    return lines


def test_only_the_seam_runs_qemu_tools() -> None:
    """No module of nvmgr but storage/qemu.py names a QEMU tool as a value, and
    no module of nvmgr/storage but qemu.py starts a process."""
    tools = {qemu.QEMU_IMG, qemu.QEMU_STORAGE_DAEMON, "qemu-io", "qemu-nbd", qemu.FUSERMOUNT}
    seam = PKG / "storage" / "qemu.py"
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path == seam:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in tools:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
        if path.parent.name == "storage":
            for line in _calls_of(tree, {"run", "Popen", "call", "check_call", "check_output"}):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: subprocess call")
    assert offenders == []


@pytest.mark.parametrize(
    "path",
    sorted([*(PKG / "storage").glob("*.py"), PKG / "image" / "convert.py"]),
    ids=lambda p: p.name,
)
def test_causes_kept_and_no_asserts(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            bad.append(f"{node.lineno}: assert")
        if (isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant)
                and node.cause.value is None):
            bad.append(f"{node.lineno}: raise ... from None")
    assert bad == []


# -- FUSE as a user other than root ---------------------------------------------------


@needs_qemu
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"),
                    reason="needs root (to become nobody) and runuser")
def test_fuse_export_as_another_user() -> None:
    """As nobody: with fusermount3 the qcow2 round trip works (and the dead mount
    of a killed daemon is detached with fusermount3); without it the error says
    what to install."""
    with tempfile.TemporaryDirectory(prefix="nvmgr-nobody-") as d:
        os.chmod(d, 0o777)
        img = os.path.join(d, "n.qcow2")
        run = os.path.join(d, "run")
        script = (
            "import os, signal, sys\n"
            "from nvmgr.errors import NvmgrError\n"
            "from nvmgr.storage.qcow2 import Qcow2Container\n"
            "try:\n"
            "    c = Qcow2Container.create(sys.argv[1], 1 << 20)\n"
            "except NvmgrError as e:\n"
            "    print('ERROR', e); sys.exit(0)\n"
            "c.write(0, b'nobody'); c.flush()\n"
            "os.kill(c.daemon_pid, signal.SIGKILL); c._export._proc.wait()\n"
            "c.close()\n"
            "with Qcow2Container(sys.argv[1]) as r:\n"
            "    print('READ', r.read(0, 6).decode())\n"
            "print('LEFT', sorted(os.listdir(os.path.join(sys.argv[2], f'nvmgr-fuse-{os.geteuid()}'))))\n"
        )
        os.mkdir(run, 0o700)
        shutil.chown(run, "nobody")
        # nobody may not reach the checkout (a clone under /root is 0700): a copy can.
        pkg = os.path.join(d, "pkg")
        shutil.copytree(ROOT / "nvmgr", os.path.join(pkg, "nvmgr"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(pkg):
            for n in dirnames + filenames:
                os.chmod(os.path.join(dirpath, n), 0o755)
        os.chmod(pkg, 0o755)
        env = {"PATH": os.defpath, "PYTHONPATH": pkg, "XDG_RUNTIME_DIR": run,
               "HOME": d}
        # The test's own interpreter may live where nobody cannot reach (/root):
        # the system's python3 runs nvmgr.storage (standard library only) as well.
        runuser = shutil.which("runuser") or "runuser"
        py = next((p for p in (sys.executable, "/usr/bin/python3")
                   if subprocess.run([runuser, "-u", "nobody", "--", p, "-c", "pass"],
                                     capture_output=True).returncode == 0), None)
        if py is None:
            pytest.skip("no Python interpreter that nobody may run")
        res = subprocess.run([runuser, "-u", "nobody", "--", py, "-c", script,
                              img, run], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        if shutil.which(qemu.FUSERMOUNT):
            assert "READ nobody" in res.stdout and "LEFT []" in res.stdout, res.stdout
        else:
            assert "ERROR" in res.stdout, res.stdout
            assert "cannot mount its FUSE export" in res.stdout
            assert "apt-get install fuse3" in res.stdout


def test_stop_daemon_terms_the_main_thread_again_before_it_kills(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon whose first SIGTERM woke nothing (QEMU's handler sets a flag; a
    signal one of librbd's threads took leaves the main loop asleep) gets a second
    one, at its main thread, long before SIGKILL: it exits cleanly (status 0)."""
    monkeypatch.setattr(qemu, "TERM_AGAIN_AFTER", 0.2)
    child = ("import signal, sys, time\n"
             "seen = []\n"
             "def on_term(*_):\n"
             "    seen.append(1)\n"
             "    if len(seen) == 2:\n"
             "        sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, on_term)\n"
             "print('ready', flush=True)\n"
             "while True:\n"
             "    time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    assert qemu.stop_daemon(proc, timeout=60) == 0  # not -9: the second SIGTERM came
    proc.stdout.close()
