"""Two libvirt "hosts" on one machine, for migration tests (and anyone else).

Each :class:`Host` is a libvirtd (with its own virtlogd) in its own mount,
UTS and network namespace (``unshare --mount --uts --net --propagation
private``), with private copies bind-mounted over the paths a libvirt host
owns:

==========================  ==================================================
``/etc/libvirt``            a copy of the system's, with a host_uuid of its
                            own, ``cgroup_controllers = [ ]`` (two daemons
                            must not make the same cgroup), no domains,
                            autostart networks or secrets (never copied),
                            and the nvmgr hook installed by
                            ``nvmgr install-hook --hook-dir``
``/run``                    empty: libvirtd's socket, QEMU pid files,
                            ``/run/nvmgr`` (the hook's runtime files)
``/var/lib/libvirt``        empty but for libvirt's own directories (swtpm
                            state, QEMU's save and nvram directories)
``/var/cache/libvirt``      a copy (QEMU's capabilities, so the first start
                            need not probe QEMU again)
``/var/log/libvirt``,       empty: per-host logs
``/var/log/swtpm``,
``/var/log/nvmgr``
``/etc/nvmgr``              empty: the host's ``migrate.map``
==========================  ==================================================

Everything else -- ``/usr``, ``/tmp``, ``/var/tmp`` -- the hosts share: a
directory there is shared storage.  From outside, a host is reached through
the socket in its private ``/run`` (:attr:`Host.uri`), which is also what a
migration's destination URI is.  Migration data goes over a unix socket in
shared storage (``--migrateuri unix://...``).

The system libvirtd is never touched: nothing is written under the system's
``/etc/libvirt``, ``/run`` or ``/var/lib/libvirt``; the only thing the
harness may create outside its own directory is an empty ``/etc/nvmgr``
and ``/var/log/nvmgr`` to mount over.  :meth:`Host.stop` destroys the host's
domains (their release hooks run), kills what is left of its QEMU and swtpm
processes and its daemons, by pid, and removes its directory; the mounts go
with the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from . import vmlib
from .vmlib import Failed, run

#: System paths each host replaces with a private directory: (path, copy it?).
PRIVATE = (
    ("/etc/libvirt", True),
    ("/run", False),
    ("/var/lib/libvirt", False),
    ("/var/cache/libvirt", True),
    ("/var/log/libvirt", False),
    ("/var/log/swtpm", False),
    ("/var/log/nvmgr", False),
    ("/etc/nvmgr", False),
)
#: Directories libvirt expects under /var/lib/libvirt, /var/log/swtpm, /var/log/libvirt.
_SKELETON = ("var/lib/libvirt/qemu", "var/lib/libvirt/swtpm", "var/log/libvirt/qemu",
             "var/log/swtpm/libvirt/qemu")

_REAPER = vmlib.ROOT / "scripts" / "subreaper"

_SETUP = r"""
set -e
hostname "$1"
root="$2"
reaper="$3"  # scripts/subreaper: QEMU reaped at once when it exits, as systemd would
shift 3
for p in "$@"; do
  mount --bind "$root/$(printf %s "$p" | tr / _)" "$p"
done
ip link set lo up
"$reaper" virtlogd -d
"$reaper" libvirtd -d
echo ready
exec sleep infinity
"""


def _not_copied(directory: str, names: list[str]) -> set[str]:
    """What a host's copy of /etc/libvirt leaves out: the system's domains, networks'
    autostart, secrets (their values never leave the system's own directory), hooks."""
    d = Path(directory)
    if d == Path("/etc/libvirt"):
        return {n for n in names if n in ("hooks", "secrets")}
    if d in (Path("/etc/libvirt/qemu"), Path("/etc/libvirt/storage")):
        return {n for n in names if n.endswith(".xml") or n == "autostart"}
    if d == Path("/etc/libvirt/qemu/networks"):
        return {n for n in names if n == "autostart"}
    return set()


def _private(root: Path, path: str) -> Path:
    return root / path.replace("/", "_")


class Host:
    """One private libvirtd; :meth:`start` it, :meth:`stop` it (or use ``with``)."""

    def __init__(self, name: str, base: Path, *, hook_server: bool = True) -> None:
        self.name = name
        self.hook_server = hook_server
        self.root = base / name
        self.host_uuid = str(uuid.uuid4())
        self._holder: subprocess.Popen[bytes] | None = None
        self._bridges: list[TcpBridge] = []

    # ------------------------------------------------------------ paths

    def path(self, system_path: str) -> Path:
        """Where *system_path* (inside the host) is seen from outside."""
        for p, _copy in sorted(PRIVATE, key=lambda x: -len(x[0])):
            if system_path == p or system_path.startswith(p + "/"):
                return _private(self.root, p) / system_path[len(p) + 1:]
        return Path(system_path)

    @property
    def socket(self) -> Path:
        return self.path("/run/libvirt/libvirt-sock")

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def hook_log(self) -> Path:
        return self.path("/var/log/nvmgr/hook.log")

    @property
    def migrate_map(self) -> Path:
        return self.path("/etc/nvmgr/migrate.map")

    def swtpm_dir(self, dom_uuid: str) -> Path:
        return self.path(f"/var/lib/libvirt/swtpm/{dom_uuid}/tpm2")

    def runtime_dir(self, dom_uuid: str) -> Path:
        return self.path(f"/run/nvmgr/{dom_uuid}")

    def serial_log(self, name: str) -> Path:
        return self.path(f"/var/log/libvirt/qemu/{name}-serial.log")

    # ------------------------------------------------------------ life

    def _prepare(self) -> None:
        self.root.mkdir(mode=0o755, parents=True)
        for p, copy in PRIVATE:
            Path(p).mkdir(parents=True, exist_ok=True)  # a mount point; empty if new
            dest = _private(self.root, p)
            if copy:
                shutil.copytree(p, dest, symlinks=True, ignore=_not_copied)
            else:
                dest.mkdir(mode=0o755)
            st = os.stat(p)
            os.chown(dest, st.st_uid, st.st_gid)
            os.chmod(dest, st.st_mode & 0o7777)
        for rel in _SKELETON:  # libvirt's own directories, owners and modes as on the system
            src = Path("/") / rel
            parts = Path(rel).parts
            for i in range(1, len(parts) + 1):
                sub = Path(*parts[:i])
                dest = self.path("/" + str(sub))
                if not dest.exists():
                    dest.mkdir()
                    st = os.stat(Path("/") / sub) if (Path("/") / sub).exists() else os.stat(src)
                    os.chown(dest, st.st_uid, st.st_gid)
                    os.chmod(dest, st.st_mode & 0o7777)
        for d in ("save", "nvram", "snapshot", "checkpoint", "dump", "ram", "channel"):
            src = Path("/var/lib/libvirt/qemu") / d
            dest = self.path(f"/var/lib/libvirt/qemu/{d}")
            dest.mkdir(exist_ok=True)
            if src.exists():
                st = os.stat(src)
                os.chown(dest, st.st_uid, st.st_gid)
                os.chmod(dest, st.st_mode & 0o7777)
        etc = self.path("/etc/libvirt")
        (etc / "secrets").mkdir(mode=0o700)
        with open(etc / "libvirtd.conf", "a") as f:
            f.write(f'\nhost_uuid = "{self.host_uuid}"\n'
                    'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        with open(etc / "qemu.conf", "a") as f:
            f.write("\ncgroup_controllers = [ ]\n")
        # The hook runs this tree's nvmgr, whatever else is installed.
        subprocess.run([sys.executable, "-m", "nvmgr", "install-hook", "--hook-dir",
                        str(etc / "hooks" / "qemu.d")], cwd=vmlib.ROOT, check=True,
                       capture_output=True, timeout=120)

    def start(self, timeout: float = 60) -> None:
        """Make the directories, enter the namespaces, start virtlogd and libvirtd."""
        self._prepare()
        paths = [p for p, _ in PRIVATE]
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--net", "--propagation", "private",
             "sh", "-c", _SETUP, "host-setup", self.name, str(self.root), str(_REAPER), *paths],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline()
        if line.strip() != b"ready":
            err = self._holder.stderr.read().decode() if self._holder.stderr else ""
            raise Failed(f"host {self.name} did not start: {line!r} {err}")
        self._wait_answer(timeout)
        if self.hook_server:
            # As a host with nvmgr-hook.service: the server runs in the host's own
            # namespaces (a server outside them hands every call back).
            self.enter(sys.executable, "-m", "nvmgr", "hook-server", "--daemon",
                       "--pidfile", "/run/nvmgr/hook-server.pid")

    def _wait_answer(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists() and self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise Failed(f"host {self.name}: libvirtd did not answer on {self.uri}")

    def enter(self, *cmd: str | os.PathLike[str], check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run *cmd* inside the host's namespaces."""
        assert self._holder is not None
        return run(["nsenter", "-t", str(self._holder.pid), "-m", "-u", "-n", *cmd],
                   check=check, timeout=timeout)

    def forward_tcp(self, ports: Sequence[int]) -> TcpBridge:
        """Make 127.0.0.1:PORT inside this host reach 127.0.0.1:PORT of the machine
        (a service of the root network namespace, such as the Ceph cluster), for each
        of *ports*; :meth:`stop` ends it."""
        assert self._holder is not None
        bridge = TcpBridge(f"/proc/{self._holder.pid}/ns/net", ports)
        self._bridges.append(bridge)
        return bridge

    def _pid(self, pidfile: str, comm: str | None = None) -> int | None:
        try:
            pid = int(self.path(pidfile).read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        if comm is not None:
            try:
                if not Path(f"/proc/{pid}/comm").read_text().strip().startswith(comm):
                    return None
            except OSError:
                return None
        return pid

    @property
    def libvirtd_pid(self) -> int | None:
        return self._pid("/run/libvirtd.pid", "libvirtd")

    def restart_libvirtd(self, timeout: float = 30) -> None:
        """Stop this host's libvirtd (by its pid) and start it again; its domains keep
        running and libvirtd reconnects to them (the ``reconnect`` hook runs)."""
        pid = self.libvirtd_pid
        if pid is None:
            raise Failed(f"host {self.name}: no libvirtd to restart")
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, timeout, f"libvirtd of host {self.name}")
        self.enter(_REAPER, "libvirtd", "-d")
        self._wait_answer(timeout)

    def stop(self) -> list[str]:
        """Destroy and undefine the host's domains, kill what is left, remove it all.

        :return: problems met (the caller decides whether they fail a test).
        """
        problems: list[str] = []
        if self._holder is None:
            shutil.rmtree(self.root, ignore_errors=True)
            return problems
        if self.libvirtd_pid is not None:
            listed = self.virsh("list", "--all", "--name", check=False).stdout.split()
            for dom in listed:
                if self.virsh("domstate", dom, check=False).stdout.strip() != "shut off":
                    p = self.virsh("destroy", dom, check=False)
                    if p.returncode:
                        problems.append(f"{self.name}: destroy {dom}: {p.stderr.strip()}")
                self.virsh("managedsave-remove", dom, check=False)
                self.virsh("undefine", dom, "--nvram", "--tpm", check=False)
        pids = []
        run_qemu = self.path("/run/libvirt/qemu")
        if run_qemu.is_dir():  # QEMU and swtpm libvirtd did not stop (a killed libvirtd)
            for pidfile in [*run_qemu.glob("*.pid"), *run_qemu.glob("swtpm/*.pid")]:
                pid = self._pid("/run/libvirt/qemu/" + str(pidfile.relative_to(run_qemu)))
                if pid is not None:
                    pids.append(pid)
        for pidfile, comm in (("/run/libvirtd.pid", "libvirtd"), ("/run/virtlogd.pid", "virtlogd"),
                              ("/run/nvmgr/hook-server.pid", "python")):
            pid = self._pid(pidfile, comm)
            if pid is not None:
                pids.append(pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            try:
                _wait_gone(pid, 15, f"pid {pid}")
            except Failed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for bridge in self._bridges:
            bridge.close()
        self._bridges.clear()
        self._holder.kill()
        self._holder.wait(10)
        for stream in (self._holder.stdout, self._holder.stderr):
            if stream is not None:
                stream.close()
        self._holder = None
        shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def __enter__(self) -> Host:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ tools

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(["virsh", "-c", self.uri, *args], check=check, timeout=timeout)

    def state(self, name: str) -> str:
        p = self.virsh("domstate", name, check=False)
        return p.stdout.strip() if p.returncode == 0 else "undefined"

    def hook_log_lines(self) -> list[str]:
        try:
            return self.hook_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_hook_log(self, pattern: str, *, after: int = 0, timeout: float = 30) -> str:
        """The first line of this host's hook log (from line *after* on) matching *pattern*."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.hook_log_lines()[after:]:
                if rx.search(line):
                    return line
            if time.monotonic() > deadline:
                tail = "\n".join(self.hook_log_lines()[after:][-10:])
                raise Failed(f"host {self.name}: no hook log line matching {pattern!r} "
                             f"within {timeout} s; new lines:\n{tail}")
            time.sleep(0.1)

    def wait_state(self, name: str, want: str | Sequence[str], timeout: float = 30) -> str:
        wants = [want] if isinstance(want, str) else list(want)
        deadline = time.monotonic() + timeout
        while True:
            got = self.state(name)
            if got in wants:
                return got
            if time.monotonic() > deadline:
                raise Failed(f"host {self.name}: {name} is {got!r}, not {wants} after {timeout} s")
            time.sleep(0.1)

    def wait_for_shell(self, name: str, timeout: float = 90) -> float:
        """Seconds until OVMF's serial output on this host reaches its shell."""
        log = self.serial_log(name)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(FileNotFoundError):
                if vmlib.SHELL_RE.search(log.read_bytes()):
                    return time.monotonic() - t0
            time.sleep(0.25)
        raise Failed(f"host {self.name}: OVMF of {name} did not reach its shell in {timeout} s")


_CLONE_NEWNET = 0x40000000


def _listen_in(netns: str, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:*port* of the network namespace *netns*.

    A socket belongs to the namespace of the thread that made it, for its
    whole life: a short-lived thread enters *netns* (``setns`` changes only
    the calling thread), makes the socket and ends.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    got: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(64)
            got.append(s)
        except BaseException as e:  # handed to the caller's thread
            got.append(e)

    t = threading.Thread(target=make, name=f"netns-listen-{port}")
    t.start()
    t.join()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


class TcpBridge:
    """127.0.0.1:PORT in another network namespace -> 127.0.0.1:PORT here.

    The hosts of this harness have network namespaces of their own (only ``lo``);
    a service listening on the machine's loopback (the Ceph cluster of
    ``tests/ceph_cluster.py``) is out of their reach, and a route cannot carry
    127.0.0.0/8 between namespaces.  This carries each connection byte for byte,
    in threads of the test process: the peers on both sides see 127.0.0.1 and the
    same port, so addresses a service hands out (Ceph's OSD map) stay right.
    """

    def __init__(self, netns: str, ports: Sequence[int]) -> None:
        self._closed = threading.Event()
        self._listeners = [(_listen_in(netns, p), p) for p in ports]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        for sock, port in self._listeners:
            threading.Thread(target=self._accept, args=(sock, port), daemon=True,
                             name=f"bridge-{port}").start()

    def _accept(self, listener: socket.socket, port: int) -> None:
        while not self._closed.is_set():
            try:
                inside, _ = listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", port), timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            with self._lock:
                self._conns += [inside, outside]
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed.set()
        for sock, _port in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            self._conns.clear()


def _wait_gone(pid: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    raise Failed(f"{what} did not stop within {timeout} s")


def require() -> None:
    """Skip unless this can run: root, and libvirt's, QEMU's and swtpm's tools."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("private libvirt hosts need root (mount namespaces)")
    for tool in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "swtpm", "unshare",
                 "nsenter", "ip", "tpm2_readpublic"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")


def staging_users() -> tuple[int, int]:
    """uid and gid QEMU runs as (qemu.conf's user, Debian's libvirt-qemu by default)."""
    import grp
    import pwd

    from nvmgr.provision.staging import Users

    u = Users.from_qemu_conf()
    return pwd.getpwnam(u.qemu_user).pw_uid, grp.getgrnam(u.qemu_group).gr_gid


def migrate_uri(shared: Path, what: str = "mig") -> str:
    """A unix socket for the migration stream, where both hosts' QEMUs can reach it."""
    return f"unix://{shared / 'sockets' / (what + '-' + uuid.uuid4().hex[:6] + '.sock')}"


def shared_dir(prefix: str = "nvmgr-hosts-") -> Path:
    """A directory both hosts see at the same path (mode 0755: QEMU runs as its own user)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    d.chmod(0o755)
    return d


@contextlib.contextmanager
def two_hosts(tag: str = "hosts") -> Iterator[tuple[Host, Host, Path]]:
    """(source, destination, a shared directory), all removed afterwards."""
    base = shared_dir(f"nvmgr-{tag}-")
    src, dst = Host(f"{tag}-a", base), Host(f"{tag}-b", base)
    try:
        shared = base / "shared"
        shared.mkdir(mode=0o755)
        sockets = shared / "sockets"  # the destination's QEMU listens here
        sockets.mkdir(mode=0o700)
        qemu = staging_users()
        os.chown(sockets, qemu[0], qemu[1])
        src.start()
        dst.start()
        yield src, dst, shared
    finally:
        problems = dst.stop() + src.stop()
        shutil.rmtree(base, ignore_errors=True)
        if problems:
            raise Failed("; ".join(problems))


# ---------------------------------------------------------------- migration checks


class MigratingVM(Protocol):
    """What the migration checks need of a test's VM (``test_migrate.GuestVM``)."""

    name: str
    uuid: str

    def migrate(self, src: Host, dst: Host, shared: Path, *extra: str,
                wait: bool = True) -> subprocess.Popen[str]: ...

    def info(self) -> dict[str, object]: ...

    def in_use(self) -> bool: ...

    def vars(self) -> dict[str, str]: ...

    def ek(self) -> tuple[str, bytes | None]: ...


def runner_host(info: dict[str, object], field: str = "runner") -> str | None:
    """The host name in the image's ``runner`` (or ``incoming``) record, if any."""
    who = info[field]
    return who["host"] if isinstance(who, dict) else None


def migrate_checked(v: MigratingVM, src: Host, dst: Host, shared: Path) -> tuple[str, str]:
    """Live-migrate *v* from *src* to *dst* and check the hand-over the hooks make:
    the destination's prepare notes the incoming run, the source's release hands the
    image to the destination's run, which owns it (in use: its QEMU writes it); the
    source keeps no TPM state and no runtime directory.

    :return: (the destination's prepare line, the source's release line) of the hook log.
    """
    mark_src, mark_dst = len(src.hook_log_lines()), len(dst.hook_log_lines())
    v.migrate(src, dst, shared)
    assert dst.state(v.name) == "running"
    prepare = dst.wait_hook_log(rf"{v.name} prepare begin: ", after=mark_dst)
    assert "incoming migration: run " in prepare, prepare
    release = src.wait_hook_log(rf"{v.name} release end: ", after=mark_src)
    assert "handed the image to run" in release and f"on host {dst.name}" in release, release
    info = v.info()
    assert runner_host(info) == dst.name and info["incoming"] is None and v.in_use()
    assert not (src.swtpm_dir(v.uuid) / "tpm2-00.permall").exists()  # the source holds nothing
    assert not src.runtime_dir(v.uuid).exists()
    return prepare, release


def destroy_checked(v: MigratingVM, host: Host, *, ek: tuple[str, bytes | None],
                    variables: dict[str, str]) -> None:
    """Destroy *v* where it runs and check what its release left: the TPM collected,
    the vars resealed, nobody running it, the guest's variables and the TPM's
    endorsement key in the image."""
    mark = len(host.hook_log_lines())
    host.virsh("destroy", v.name)
    line = host.wait_hook_log(rf"{v.name} release end: ", after=mark)
    assert "collected ['tpm-permall']" in line and "resealed ['uefi-vars']" in line, line
    info = v.info()
    assert info["runner"] is None and info["incoming"] is None and not v.in_use()
    assert v.vars() == variables
    assert v.ek() == ek
