"""The hook server under the real libvirtd: it runs the start's and the stop's calls, a
refusal reaches ``virsh start`` through it, and without it the hook does the same work."""

from __future__ import annotations

import re

import pytest

from . import vmlib
from .conftest import MakeVM

pytestmark = pytest.mark.e2e


def _server_lines(name: str, after: int) -> list[str]:
    return [ln for ln in vmlib.hook_log_lines()[after:]
            if re.match(rf"hook-server\[\d+\]: {re.escape(name)} ", ln)]


def test_the_hook_server_runs_a_start_and_a_stop_and_passes_a_refusal_through(
        vm: MakeVM) -> None:
    assert vmlib.hook_server_pid() is not None  # the session's server (conftest)
    v = vm("hookserver")
    v.define()
    mark = len(vmlib.hook_log_lines())
    v.start()
    v.destroy()
    vmlib.wait_hook_log(rf"^hook-server\[\d+\]: {re.escape(v.name)} release end: exit 0",
                        after=mark)
    ran = [ln.split(": ", 1)[1].split(" in ")[0] for ln in _server_lines(v.name, mark)]
    assert ran == [f"{v.name} prepare begin: exit 0", f"{v.name} release end: exit 0"], ran
    # ... and nothing ran them a second time (the lifecycle's own line, once per call).
    done = [ln.split()[2] for ln in vmlib.hook_log_lines()[mark:]
            if re.match(rf"^\S+Z {re.escape(v.name)} (prepare|release) ", ln)]
    assert done == ["prepare", "release"], done
    # (the CLI server logs here too: another checkout's nvmgr handed back is its business)
    assert not [ln for ln in vmlib.hook_log_lines()[mark:]
                if ln.startswith("hook-server[") and "fallback" in ln]
    # The TPM state went back into the image through the server's worker.
    assert v.section("tpm-permall")["length"]

    # A refusal: the worker writes into the hook's stderr, libvirt shows it.
    s = v.section("tpm-permall")
    at = int(s["offset"]) + int(s["length"]) // 2  # type: ignore[call-overload]
    with open(v.image, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))
    mark = len(vmlib.hook_log_lines())
    p = v.start(check=False)
    assert p.returncode != 0 and v.state() == "shut off"
    assert "section tpm-permall is corrupted" in p.stderr, p.stderr
    assert any(": exit 4 " in ln for ln in _server_lines(v.name, mark))


def test_without_the_server_the_hook_does_the_same_work(vm: MakeVM) -> None:
    v = vm("noserver")
    v.define()
    vmlib.stop_hook_server()
    try:
        mark = len(vmlib.hook_log_lines())
        v.start()
        v.destroy()
        vmlib.wait_hook_log(rf"^\S+ {re.escape(v.name)} release end: ", after=mark)
        assert not _server_lines(v.name, mark)
        assert v.section("tpm-permall")["length"]
    finally:
        vmlib.start_hook_server()
