"""The hook server and the front end's client (nvmgr.hook.server, nvmgr.hook.client).

A real server (``nvmgr hook-server``, a subprocess) runs from a copy of the
package in a temporary directory, so a test can "upgrade" its code on disk;
the client runs as the installed hook runs it (a script, its own process).
Each test tells who ran a call from the server's own lines: one line per
call it ran ("NAME OP SUB: exit N"), one per call it handed back ("fallback").
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.errors import ExitCode
from nvmgr.hook import client
from tests.served import ROOT, ServerProcess

PLAIN = b"<domain type='qemu'><name>plain</name></domain>"
HOSTILE = (b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY x 'y'>]>"
           b"<domain><name>hostile</name></domain>")
#: What ``virsh define`` leaves of a domain that only asks for nvmgr.
ASKS_ONLY = (b"<domain type='qemu'><name>asks</name>"
             b"<uuid>6c1a4a55-0c8e-4e0b-9a49-6a3c1d7e0b11</uuid>"
             b"<metadata><nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1'/>"
             b"</metadata><os><type>hvm</type></os></domain>")


class HookServer(ServerProcess):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "hook-server", "hook.sock")

    def lines(self, what: str) -> list[str]:
        return [ln for ln in self.lines_text().splitlines() if what in ln]

    @property
    def client(self) -> Path:
        return self.pkg_root / "nvmgr" / "hook" / "client.py"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HookServer]:
    s = HookServer(tmp_path)
    yield s
    s.stop()


def call(client_py: Path, sock: Path, name: str, op: str, sub: str, xml: bytes,
         *, nvmgr_path: str = "", prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run the hook's client as the installed front end does."""
    return subprocess.run([*prefix, sys.executable, str(client_py), nvmgr_path, str(sock),
                           name, op, sub, "-"], input=xml, capture_output=True, timeout=60,
                          check=False)


def wait_for(pred, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def test_the_client_and_the_errors_agree_on_the_exit_code_of_a_dead_worker() -> None:
    assert client.EXIT_ERROR == ExitCode.ERROR


def test_the_server_runs_calls_and_its_worker_writes_to_the_callers_stderr(
        server: HookServer) -> None:
    r = call(server.client, server.sock, "plain", "prepare", "begin", PLAIN)
    assert (r.returncode, r.stderr) == (0, b"")
    r = call(server.client, server.sock, "hostile", "prepare", "begin", HOSTILE)
    assert r.returncode == ExitCode.INVALID_INPUT
    assert r.stderr.startswith(b"nvmgr: ") and r.stderr.count(b"\n") == 1, r.stderr
    r = call(server.client, server.sock, "asks", "prepare", "begin", ASKS_ONLY)
    assert r.returncode == ExitCode.NOT_WIRED, r.stderr
    assert b"nvmgr reconcile asks" in r.stderr
    wait_for(lambda: len(server.lines(": exit ")) == 3, "three call lines")
    assert [ln.split(": exit ")[1].split()[0] for ln in server.lines(": exit ")] == [
        "0", str(int(ExitCode.INVALID_INPUT)), str(int(ExitCode.NOT_WIRED))]
    assert not server.lines("fallback")


def test_many_calls_at_once_each_get_their_own_answer(server: HookServer) -> None:
    xmls = [PLAIN, HOSTILE, ASKS_ONLY] * 4
    with_rc: list[tuple[bytes, int]] = []
    lock = threading.Lock()

    def one(xml: bytes) -> None:
        r = call(server.client, server.sock, "d", "prepare", "begin", xml)
        with lock:
            with_rc.append((xml, r.returncode))

    threads = [threading.Thread(target=one, args=(x,)) for x in xmls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = {PLAIN: 0, HOSTILE: ExitCode.INVALID_INPUT, ASKS_ONLY: ExitCode.NOT_WIRED}
    assert sorted(rc for _, rc in with_rc) == sorted(want[x] for x in xmls)
    assert all(rc == want[x] for x, rc in with_rc)
    wait_for(lambda: len(server.lines(": exit ")) == len(xmls), "a line per call")


def test_another_installations_call_is_handed_back_and_run_by_the_client(
        server: HookServer) -> None:
    checkout_client = ROOT / "nvmgr" / "hook" / "client.py"  # not the server's copy
    r = call(checkout_client, server.sock, "asks", "prepare", "begin", ASKS_ONLY,
             nvmgr_path=str(ROOT))
    assert r.returncode == ExitCode.NOT_WIRED and b"nvmgr reconcile asks" in r.stderr
    wait_for(lambda: server.lines("fallback"), "fallback line")
    assert "the caller's nvmgr is" in server.lines("fallback")[0]
    assert not server.lines(": exit ")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a UTS namespace")
def test_a_caller_in_other_namespaces_is_handed_back(server: HookServer) -> None:
    r = call(server.client, server.sock, "asks", "prepare", "begin", ASKS_ONLY,
             nvmgr_path=str(server.pkg_root), prefix=("unshare", "--uts"))
    assert r.returncode == ExitCode.NOT_WIRED, r.stderr
    wait_for(lambda: server.lines("fallback"), "fallback line")
    assert "other namespaces" in server.lines("fallback")[0]


def test_code_changed_on_disk_hands_calls_back_and_the_server_leaves(
        server: HookServer) -> None:
    entry = server.pkg_root / "nvmgr" / "hook" / "entry.py"
    st = entry.stat()
    os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # an upgrade
    r = call(server.client, server.sock, "asks", "prepare", "begin", ASKS_ONLY,
             nvmgr_path=str(server.pkg_root))
    assert r.returncode == ExitCode.NOT_WIRED, r.stderr  # run by the client itself
    server.proc.wait(timeout=10)  # and the server left, for its service manager to restart it
    assert server.proc.returncode == 0
    assert "code changed on disk" in server.lines_text()
    assert not server.sock.exists()


def test_with_no_server_the_client_runs_the_call_itself(tmp_path: Path) -> None:
    client_py = ROOT / "nvmgr" / "hook" / "client.py"
    r = call(client_py, tmp_path / "nobody.sock", "asks", "prepare", "begin", ASKS_ONLY,
             nvmgr_path=str(ROOT))
    assert r.returncode == ExitCode.NOT_WIRED and b"nvmgr reconcile asks" in r.stderr
    (tmp_path / "stale.sock").touch()  # a file where the socket was: still no server
    r = call(client_py, tmp_path / "stale.sock", "plain", "prepare", "begin", PLAIN,
             nvmgr_path=str(ROOT))
    assert (r.returncode, r.stderr) == (0, b"")


def _fake_server(path: Path, reply: bytes) -> threading.Thread:
    """A server that reads a whole call, answers *reply* and hangs up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)

    def serve() -> None:
        conn, _ = s.accept()
        with conn:
            _msg, anc, _flags, _addr = conn.recvmsg(4096, socket.CMSG_SPACE(8))
            for _level, _kind, data in anc:  # the caller's stdout and stderr: not ours to hold
                for i in range(0, len(data) - len(data) % 4, 4):
                    os.close(int.from_bytes(data[i:i + 4], sys.byteorder))
            _magic, n_meta, n_xml = struct.unpack("!4sII", _msg[:12])
            left = 12 + n_meta + n_xml - len(_msg)
            while left > 0:
                left -= len(conn.recv(left))
            conn.sendall(reply)
        s.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_a_worker_that_dies_mid_call_is_an_error_not_a_second_run(tmp_path: Path) -> None:
    client_py = ROOT / "nvmgr" / "hook" / "client.py"
    t = _fake_server(tmp_path / "dies.sock", b"+")  # taken, then EOF: no exit code
    r = call(client_py, tmp_path / "dies.sock", "asks", "prepare", "begin", ASKS_ONLY,
             nvmgr_path=str(ROOT))
    t.join(10)
    assert r.returncode == ExitCode.ERROR
    assert b"worker died during prepare begin" in r.stderr
    assert b"nvmgr reconcile" not in r.stderr  # the client did not run it again


def test_a_server_that_hangs_up_before_taking_the_call_is_a_fallback(tmp_path: Path) -> None:
    client_py = ROOT / "nvmgr" / "hook" / "client.py"
    t = _fake_server(tmp_path / "gone.sock", b"")
    r = call(client_py, tmp_path / "gone.sock", "asks", "prepare", "begin", ASKS_ONLY,
             nvmgr_path=str(ROOT))
    t.join(10)
    assert r.returncode == ExitCode.NOT_WIRED and b"nvmgr reconcile asks" in r.stderr


def test_a_malformed_call_is_dropped_and_the_server_goes_on(server: HookServer) -> None:
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"NVH1" + b"\xff" * 8, b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(server.sock))
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                answer = s.recv(100)
            except ConnectionResetError:  # closed with our bytes unread
                answer = b""
            assert answer == b""  # no answer, no worker
    wait_for(lambda: len(server.lines("dropped a call")) == 3, "three dropped calls")
    r = call(server.client, server.sock, "plain", "prepare", "begin", PLAIN)
    assert r.returncode == 0
    wait_for(lambda: server.lines(": exit 0"), "the next call run")


def test_the_socket_is_root_only(server: HookServer) -> None:
    assert server.sock.stat().st_mode & 0o777 == 0o600


def test_the_installed_front_end_runs_a_call_once(tmp_path: Path) -> None:
    """The sh front end hands the call to the client and stops there (server or not)."""
    r = subprocess.run([sys.executable, "-m", "nvmgr", "install-hook", "--hook-dir",
                        str(tmp_path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    p = subprocess.run([tmp_path / "nvmgr", "asks", "prepare", "begin", "-"], input=ASKS_ONLY,
                       capture_output=True, timeout=60, check=False)
    assert p.returncode == ExitCode.NOT_WIRED
    assert p.stderr.count(b"nvmgr reconcile asks") == 1, p.stderr
