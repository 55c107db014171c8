"""hosts.TcpBridge: a TCP service on the machine's loopback, reached from inside
another network namespace at the same address and port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from .hosts import TcpBridge


def test_a_namespace_reaches_a_loopback_service_through_the_bridge() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs root, unshare and nsenter")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"echo:" + conn.recv(100))

    threading.Thread(target=echo, daemon=True).start()
    ns = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up; echo up; "
                           "exec sleep 120"], stdout=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"up\n"
        client = ("import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])),"
                  " timeout=10); s.sendall(b'hello'); print(s.recv(100).decode())")
        inside = ["nsenter", "-t", str(ns.pid), "-n", sys.executable, "-c", client, str(port)]
        # Without a bridge the namespace's loopback has nothing on that port.
        p = subprocess.run(inside, capture_output=True, text=True, timeout=30, check=False)
        assert p.returncode != 0 and "Connection refused" in p.stderr, p
        bridge = TcpBridge(f"/proc/{ns.pid}/ns/net", [port])
        try:
            p = subprocess.run(inside, capture_output=True, text=True, timeout=30, check=False)
            assert p.returncode == 0 and p.stdout.strip() == "echo:hello", p
        finally:
            bridge.close()
        deadline = time.monotonic() + 10  # closed: the namespace's port is free again
        while subprocess.run(inside, capture_output=True, timeout=30,
                             check=False).returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        ns.kill()
        ns.wait()
        server.close()
