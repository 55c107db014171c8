"""``nvmgr cli-server``: the command line run by a forked worker of a resident process.

A real server (``nvmgr cli-server``, a subprocess) runs from a copy of the
package in a temporary directory; the commands are the real ``nvmgr`` entry
(``python -m nvmgr`` with that copy on PYTHONPATH), pointed at the server by
``NVMGR_CLI_SOCKET``.  Each test reads who ran a command from the server's
own lines (one per command: "COMMAND: exit N in T ms (worker PID)"), so a
test whose command quietly ran in the client would fail; and each compares
with the same command run without the server (``NVMGR_CLI_SOCKET=``).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr import paths
from nvmgr.cli import client
from nvmgr.cli.server import MAGIC
from nvmgr.errors import ExitCode
from tests.served import ServerProcess


class CliServer(ServerProcess):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, "cli-server", "cli.sock", env={"NVMGR_CLI_SOCKET": ""},
                         timeout=60)

    def env(self, *, served: bool = True, **extra: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.pkg_root),
                "NVMGR_CLI_SOCKET": str(self.sock) if served else "", **extra}

    def nvmgr(self, *args: str, served: bool = True, cwd: Path | None = None,
              stdin: bytes | None = None, **extra: str) -> subprocess.CompletedProcess[bytes]:
        # (-m puts the working directory first on sys.path: never the checkout's)
        return subprocess.run([sys.executable, "-m", "nvmgr", *args], input=stdin,
                              capture_output=True, cwd=cwd or self.pkg_root.parent, env=self.env(served=served, **extra),
                              timeout=120, check=False)

    def ran(self, command: str) -> list[str]:
        """The server's lines of workers that ran *command*."""
        return [ln for ln in self.lines_text().splitlines()
                if ln.startswith(f"cli-server: {command}: exit ")]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CliServer]:
    s = CliServer(tmp_path)
    yield s
    s.stop()


def wait_for(pred, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def test_the_client_agrees_with_the_server_and_the_paths() -> None:
    assert client.SOCKET == paths.CLI_SOCKET
    assert client.MAGIC == MAGIC
    assert client.EXIT_ERROR == ExitCode.ERROR


def test_a_command_runs_in_a_worker_in_the_callers_directory_with_its_stdin_and_umask(
        server: CliServer, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = server.nvmgr("create", "vm.nvram", "-s", "blob:4K:opaque", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "vm.nvram").is_file()  # relative to the caller's directory, not the server's
    data = os.urandom(3000)
    r = server.nvmgr("put", "vm.nvram", "blob", "-", cwd=work, stdin=data)
    assert r.returncode == 0, r.stderr
    r = server.nvmgr("get", "vm.nvram", "blob", "-o", "-", cwd=work)
    assert (r.returncode, r.stdout) == (0, data), r.stderr
    wait_for(lambda: server.ran("get"), "the get's line")
    assert len(server.ran("create")) == len(server.ran("put")) == len(server.ran("get")) == 1
    assert "fallback" not in server.lines_text()
    # the file the worker created carries the client's umask (the server's is 022)
    r = subprocess.run(["sh", "-c", f"umask 077; exec {sys.executable} -m nvmgr create "
                        "private.nvram -s blob:4K:opaque"], cwd=work, env=server.env(),
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((work / "private.nvram").stat().st_mode) & 0o077 == 0
    wait_for(lambda: len(server.ran("create")) == 2, "the second create's line")


def test_output_errors_and_exit_codes_are_those_of_the_command_run_here(
        server: CliServer, tmp_path: Path) -> None:
    img = tmp_path / "a.nvram"
    assert server.nvmgr("create", str(img), "-s", "x:4K:opaque", served=False).returncode == 0
    cases = [("info", str(img), "--output", "json"),
             ("info", str(tmp_path / "missing.nvram")),
             ("get", str(img), "no-such-section", "-o", "-"),
             ("create", str(img), "-s", "bad name:4K:opaque"),
             ("no-such-command",)]
    for args in cases:
        here = server.nvmgr(*args, served=False)
        there = server.nvmgr(*args)
        assert (there.returncode, there.stdout, there.stderr) == \
            (here.returncode, here.stdout, here.stderr), args
    assert {server.nvmgr(*a).returncode for a in cases[1:]} >= {
        ExitCode.NOT_FOUND, ExitCode.USAGE}
    wait_for(lambda: len(server.ran("info")) == 3, "the info lines")
    assert "fallback" not in server.lines_text()


def test_the_callers_environment_is_the_commands(server: CliServer) -> None:
    # argparse wraps --help to $COLUMNS: the worker must read the caller's, not the server's
    narrow = server.nvmgr("info", "--help", COLUMNS="50")
    wide = server.nvmgr("info", "--help", COLUMNS="200")
    assert narrow.returncode == wide.returncode == 0
    assert narrow.stdout != wide.stdout
    assert narrow.stdout == server.nvmgr("info", "--help", COLUMNS="50", served=False).stdout
    wait_for(lambda: len(server.ran("info")) == 2, "two info lines")


def test_a_signal_to_the_client_interrupts_the_command_in_the_worker(
        server: CliServer, tmp_path: Path) -> None:
    img = tmp_path / "b.nvram"
    assert server.nvmgr("create", str(img), "-s", "x:64K:opaque").returncode == 0
    # put ... - waits for stdin that never ends: only the forwarded SIGINT stops it
    p = subprocess.Popen([sys.executable, "-m", "nvmgr", "put", str(img), "x", "-"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=server.env(), cwd=tmp_path)
    wait_for(lambda: "put" in subprocess.run(["pgrep", "-af", "cli-server"], text=True,
                                             capture_output=True).stdout
             or os.path.exists(f"/proc/{p.pid}"), "the client")
    time.sleep(1.0)  # the call is with the worker by now
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert b"interrupted" in err
    wait_for(lambda: server.ran("put"), "the put's line")
    assert "exit 130" in server.ran("put")[0]
    assert server.nvmgr("get", str(img), "x", "-o", "-").stdout == b""  # nothing was put


def test_commands_that_run_until_stopped_never_go_to_the_server(server: CliServer) -> None:
    r = server.nvmgr("cli-server", "--help")
    assert r.returncode == 0 and b"--daemon" in r.stdout
    r = server.nvmgr("reconcile", "--watch", "--help")
    assert r.returncode == 0
    r = server.nvmgr("reconcile", "--help")  # a reconcile that ends: the server's
    assert r.returncode == 0
    wait_for(lambda: server.ran("reconcile"), "the reconcile's line")
    time.sleep(0.3)
    assert not server.ran("cli-server") and len(server.ran("reconcile")) == 1
    assert server.nvmgr("--version").returncode == 0
    wait_for(lambda: server.ran("(no command)"), "--version's line")


def test_changed_code_is_handed_back_and_the_server_leaves(
        server: CliServer, tmp_path: Path) -> None:
    img = tmp_path / "c.nvram"
    (server.pkg_root / "nvmgr" / "units.py").touch()  # an upgrade of nvmgr's files
    os.utime(server.pkg_root / "nvmgr" / "units.py", (1, 1))
    r = server.nvmgr("create", str(img), "-s", "x:4K:opaque")
    assert r.returncode == 0, r.stderr  # run by the client itself
    assert img.is_file()
    wait_for(lambda: server.proc.poll() is not None, "the server's exit")
    assert "fallback: the server's code changed on disk" in server.lines_text()
    assert not server.ran("create")


def test_no_server_means_the_command_runs_here(tmp_path: Path) -> None:
    env = {**os.environ, "NVMGR_CLI_SOCKET": str(tmp_path / "nobody.sock")}
    r = subprocess.run([sys.executable, "-m", "nvmgr", "--version"], env=env, cwd=tmp_path,
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout.startswith(b"nvmgr ")
    assert client.ask_server(["--version"], str(tmp_path / "nobody.sock")) is None
    assert client.ask_server(["--version"], "") is None


def _fake_server(sock: Path, reply: list[bytes]) -> threading.Thread:
    """A server that takes one call, then sends *reply* (each item one write) and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            _msg, anc, _f, _a = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            for _level, _kind, data in anc:  # the caller's descriptors: not ours to keep
                for i in range(0, len(data) - len(data) % 4, 4):
                    os.close(int.from_bytes(data[i:i + 4], sys.byteorder))
            for chunk in reply:
                conn.sendall(chunk)
                time.sleep(0.05)

    t = threading.Thread(target=serve)
    t.start()
    return t


@pytest.mark.parametrize("reply, rc, died", [
    ([b"+4242\nrc 3\n"], 3, False),  # both lines in one read: still one run, its code
    ([b"+4242\n", b"rc 0\n"], 0, False),
    ([b"+42", b"42\nr", b"c 5\n"], 5, False),  # lines split across reads
    ([b"+4242\n"], ExitCode.ERROR, True),  # the worker died: no code, never a second run
    ([b"+"], ExitCode.ERROR, True),  # taken, then EOF before its pid
])
def test_a_call_a_worker_took_is_never_run_again_by_the_client(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], reply: list[bytes], rc: int,
        died: bool) -> None:
    sock = tmp_path / "fake.sock"
    t = _fake_server(sock, reply)
    try:
        assert client.ask_server(["info", "x.nvram"], str(sock)) == rc
    finally:
        t.join(timeout=10)
    err = capfd.readouterr().err
    assert ("the cli-server's worker" in err) == died, err


def test_a_fallback_is_run_by_the_client(tmp_path: Path) -> None:
    sock = tmp_path / "fake.sock"
    t = _fake_server(sock, [b"fallback the server's code changed on disk\n"])
    try:
        assert client.ask_server(["info", "x.nvram"], str(sock)) is None
    finally:
        t.join(timeout=10)
