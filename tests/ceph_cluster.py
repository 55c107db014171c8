"""A real single-node Ceph cluster on 127.0.0.1, for tests and by hand.

One monitor, one manager and one bluestore OSD on a sparse file, started
from Debian's packages (``ceph-mon``, ``ceph-mgr``, ``ceph-osd``,
``ceph-common``) in a directory of their own, in seconds, and torn down
without a trace.  (Without the manager, Pacific's OSD never finishes booting.)

    with CephCluster(Path("/tmp/ceph")) as c:
        c.conf            # the ceph.conf to hand to clients (conf=...)
        c.pool            # "rbd", initialised
        c.client("nvmgr") # a cephx user for QEMU: (name, keyring path, key)

By hand: ``python -m tests.ceph_cluster DIR`` starts one and waits (^C stops it).
Facts behind the settings are in ``../shared/DESIGN.md`` ("Ceph RBD on this
machine kind").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-common")
TOOLS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rbd")


class CephError(RuntimeError):
    """The cluster did not come up (the message names the step and shows its output)."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def skip_without_ceph() -> None:
    """``pytest.skip``, with the reason, where the harness cannot run: without root
    (its daemons run as root) or without Ceph's packages."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("the Ceph harness runs its daemons as root")
    missing = missing_tools()
    if missing:
        pytest.skip(f"Ceph is not installed ({', '.join(missing)} missing; scripts/setup "
                    f"installs {' '.join(PACKAGES)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    """A monitor and an OSD under *root* (created; removed by :meth:`stop`)."""

    def __init__(self, root: Path, *, pool: str = "rbd", osd_size: str = "2G") -> None:
        self.root = Path(root)
        self.pool = pool
        self.osd_size = osd_size
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.port2 = _free_port()
        self.conf = self.root / "ceph.conf"
        self.admin_keyring = self.root / "client.admin.keyring"
        self.procs: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------ running commands

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """A ceph tool with this cluster's conf and admin key; its stdout."""
        tool, *rest = argv
        full = [tool, "-c", str(self.conf), *rest] if tool in ("ceph", "rbd") else list(argv)
        if tool in ("ceph", "rbd"):
            full[3:3] = ["--keyring", str(self.admin_keyring), "--name", "client.admin"]
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, check=False)
        if check and p.returncode != 0:
            raise CephError(f"{' '.join(full)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def _daemon(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{argv[0]}-{len(self.procs)}.out", "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen([*argv, "-f", "-c", str(self.conf)], stdout=log,
                                           stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    # ------------------------------------------------------------ bring-up

    def start(self, timeout: float = 60) -> CephCluster:
        missing = missing_tools()
        if missing:
            raise CephError(f"not installed: {', '.join(missing)} "
                            f"(apt-get install {' '.join(PACKAGES)})")
        t0 = time.monotonic()
        for d in ("run", "log", "mon", "osd/ceph-0", "client"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # Clients run as other users too (QEMU as libvirt-qemu): the conf is readable by
        # all, and each client's admin socket and log go to a sticky world-writable dir.
        self.root.chmod(0o755)
        (self.root / "client").chmod(0o1777)
        r = self.root
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.port2},v1:127.0.0.1:{self.port}]
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
mon warn on pool no redundancy = false
run dir = {r}/run
log file = {r}/log/$name.log
admin socket = {r}/run/$name.$pid.asok
mon data = {r}/mon/$cluster-$id
osd data = {r}/osd/$cluster-$id
mgr data = {r}/mgr/$cluster-$id
mgr standby modules = false
osd objectstore = bluestore
bluestore block path = {r}/osd/$cluster-$id.block
bluestore block create = true
bluestore block size = {self._bytes(self.osd_size)}
bluestore fsck on mount = false
osd memory target = 536870912
[client]
admin socket = {r}/client/$name.$pid.asok
log file = {r}/client/$name.$pid.log
""")
        self.conf.chmod(0o644)
        mon_keyring = r / "mon.keyring"
        self.run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key",
                 "-n", "mon.", "--cap", "mon", "allow *")
        self.run("ceph-authtool", "--create-keyring", str(self.admin_keyring), "--gen-key",
                 "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *")
        self.run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.admin_keyring))
        monmap = r / "monmap"
        self.run("monmaptool", "--create", "--addv", "a",
                 f"[v2:127.0.0.1:{self.port2},v1:127.0.0.1:{self.port}]",
                 "--fsid", self.fsid, str(monmap))
        self.run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
                 "--keyring", str(mon_keyring))
        self._daemon("ceph-mon", "-i", "a")
        self._wait(lambda: self.run("ceph", "mon", "stat", check=False, timeout=10) != "",
                   "the monitor answering", timeout)
        mgr_dir = r / "mgr" / "ceph-x"
        mgr_dir.mkdir(parents=True, exist_ok=True)
        self.run("ceph", "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr",
                 "osd", "allow *", "-o", str(mgr_dir / "keyring"))
        self._daemon("ceph-mgr", "-i", "x")
        osd_uuid = str(uuid.uuid4())
        osd_id = self.run("ceph", "osd", "new", osd_uuid).strip()
        osd_dir = r / "osd" / f"ceph-{osd_id}"
        osd_dir.mkdir(parents=True, exist_ok=True)
        self.run("ceph-authtool", "--create-keyring", str(osd_dir / "keyring"), "--gen-key",
                 "-n", f"osd.{osd_id}")
        self.run("ceph", "auth", "add", f"osd.{osd_id}", "osd", "allow *",
                 "mon", "allow profile osd", "-i", str(osd_dir / "keyring"))
        self.run("ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs",
                 "--osd-uuid", osd_uuid, timeout=120)
        self._daemon("ceph-osd", "-i", osd_id)
        self.run("ceph", "osd", "pool", "create", self.pool, "8")
        self.run("ceph", "osd", "pool", "application", "enable", self.pool, "rbd")
        self._wait(self._osd_up, "the OSD up and in", timeout)
        self.run("rbd", "pool", "init", self.pool, timeout=timeout)
        self.started_in = time.monotonic() - t0
        return self

    @staticmethod
    def _bytes(size: str) -> int:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)

    def _osd_up(self) -> bool:
        # PG states come from the manager, which is not run: the monitor knows the OSD is
        # up and in; the first write (rbd pool init) then waits for the PGs to peer.
        return '"num_up_osds":1' in self.run("ceph", "osd", "stat", "-f", "json", check=False,
                                              timeout=10).replace(" ", "")

    def _wait(self, ok: object, what: str, timeout: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for p in self.procs:
                if p.poll() is not None:
                    raise CephError(f"{p.args[0]} exited {p.returncode} while waiting for "
                                    f"{what}; see {self.root / 'log'}")
            if ok():  # type: ignore[operator]
                return
            time.sleep(0.25)
        raise CephError(f"timed out after {timeout:.0f} s waiting for {what}; "
                        f"see {self.root / 'log'}")

    def client_ports(self) -> list[int]:
        """The TCP ports on 127.0.0.1 a client (librbd) talks to: the monitor's, the
        manager's and the OSDs' public ones (what a network bridge must carry)."""
        ports = {self.port, self.port2}
        dumps = (json.loads(self.run("ceph", "osd", "dump", "-f", "json"))["osds"],
                 [json.loads(self.run("ceph", "mgr", "dump", "-f", "json"))])
        for entry in (*dumps[0], *dumps[1]):
            for field in ("public_addrs", "active_addrs"):
                for a in entry.get(field, {}).get("addrvec", []):
                    host, _, port = a["addr"].rpartition(":")
                    if host == "127.0.0.1" and int(port):
                        ports.add(int(port))
        return sorted(ports)

    # ------------------------------------------------------------ users

    def client(self, name: str, *, pool: str | None = None) -> tuple[str, Path, str]:
        """A cephx user with RBD rights on the pool: (its name, a keyring file, its key)."""
        keyring = self.root / f"client.{name}.keyring"
        self.run("ceph", "auth", "get-or-create", f"client.{name}", "mon", "profile rbd",
                 "osd", f"profile rbd pool={pool or self.pool}", "-o", str(keyring))
        key = self.run("ceph", "auth", "print-key", f"client.{name}").strip()
        return f"client.{name}", keyring, key

    # ------------------------------------------------------------ tear-down

    @contextlib.contextmanager
    def opened_elsewhere(self, location: str, image: str) -> Iterator[None]:
        """``qemu-io`` holding *location* (qemu-img's spelling) open, a watcher of RBD
        image *image* of the pool, as a running VM on another host does; closed when
        the block ends (its "quit": a killed client would stay a watcher until its
        watch times out)."""
        client = subprocess.Popen(["qemu-io", "-f", "raw", location], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert client.stdin is not None
        client.stdin.write(b"read 0 512\n")
        client.stdin.flush()
        try:
            deadline = time.monotonic() + 60
            while '"watchers":[]' in self.run("rbd", "status", f"{self.pool}/{image}",
                                              "--format", "json"):
                if time.monotonic() > deadline:
                    raise CephError("qemu-io never opened the image")
                time.sleep(0.2)
            yield
        finally:
            client.communicate(b"quit\n", timeout=60)

    def stop(self) -> None:
        for p in reversed(self.procs):  # the OSD before the monitor
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - by hand
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/nvmgr-ceph")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on kill too
    c = CephCluster(root).start()
    print(f"ceph up in {c.started_in:.1f} s: conf {c.conf}, pool {c.pool}; ^C stops it",
          flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
