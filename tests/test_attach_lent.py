"""``nvmgr attach --live`` of a qcow2 image a running QEMU holds, libvirt faked
and a qemu-storage-daemon in the VM's QEMU's place: its QMP monitor takes the
commands nvmgr sends through libvirt's passthrough (``nbd-server-start``,
``block-export-add`` of ``nvmgr-image``, their removal), so the growth really
goes through an NBD export of a qcow2 node; the hot-plug itself is faked
(``tests/e2e/test_attach_qcow2.py`` has the real VM).  Refusals: a member
recorded by a relative path, a QEMU with no node over the image (exit 13,
nothing changed, no export left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvmgr.domain.elements import parse_domain
from nvmgr.errors import BusyError, ExitCode, ExternalError, NotHotpluggableError
from nvmgr.image.image import Image
from nvmgr.image.members import split
from nvmgr.paths import RUNTIME_ROOT
from nvmgr.virt import attach as attach_mod
from nvmgr.virt import conn as virt_conn
from nvmgr.virt import hotplug
from nvmgr.virt.attach import attach, detach
from tests.test_attach import NS, FakeDomain

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                       reason="qemu-storage-daemon is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="stages /run/nvmgr and chowns as the hook does"),
]

STATE = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='state0' size='64K' binding='block' "
         "driver='virtio-blk-pci' device='nvmgr-state0'/>")


class Qsd:
    """A qemu-storage-daemon with *image* (qcow2) open as node *node*, and a QMP
    monitor that answers as QEMU's does through libvirt's passthrough."""

    def __init__(self, image: Path, work: Path, node: str = "nvmgr-image") -> None:
        self.qmp_path = work / "qmp.sock"
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={image},node-name=nvmgr-file",
             "--blockdev", f"driver=qcow2,file=nvmgr-file,node-name={node}",
             "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=m",
             "--monitor", "chardev=m"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-storage-daemon did not come up"
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.qmp_path))
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.sent: list[str] = []
        self("qmp_capabilities")
        self.sent.clear()

    def _read(self) -> dict[str, Any]:
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                return dict(msg)

    def __call__(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """As :func:`nvmgr.virt.conn.qmp` answers: the return, or ExternalError."""
        self.sent.append(command)
        self.file.write(json.dumps({"execute": command,
                                    **({"arguments": arguments} if arguments else {})}
                                   ).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise ExternalError(f"QEMU refused {command}", detail=reply["error"]["desc"])
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def lent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A running (faked) domain whose image is qcow2 and held by a qsd standing in for QEMU."""
    image = tmp_path / "vm.qcow2"
    dom_uuid = uuid.uuid4()
    xml = (f"<domain type='qemu'><name>vm</name><uuid>{dom_uuid}</uuid><metadata>"
           f"<nvmgr:nvram xmlns:nvmgr='{NS}' image='{image}' format='qcow2'>"
           "<nvmgr:section name='fru0' size='4K'/></nvmgr:nvram></metadata>"
           "<memory>65536</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>"
           "<devices/></domain>")
    state: dict[str, Any] = {"defined": [], "plugged": [], "image": image, "uuid": dom_uuid,
                             "tmp": tmp_path}

    @contextlib.contextmanager
    def connect(uri: str | None = None, *, readonly: bool = False) -> Iterator[object]:
        yield object()

    def define(xml: str, uri: str | None = None) -> str:
        state["defined"].append(xml)
        state["dom"].xml = xml
        return "vm"

    monkeypatch.setattr(virt_conn, "connect", connect)
    monkeypatch.setattr(virt_conn, "lookup", lambda _c, _n: state["dom"])
    monkeypatch.setattr(virt_conn, "define", define)
    monkeypatch.setattr(virt_conn, "exists", lambda *_a, **_k: True)
    monkeypatch.setattr(virt_conn, "is_active", lambda *_a, **_k: state["dom"].active)
    monkeypatch.setattr(virt_conn, "require_inactive", lambda *_a, **_k: None)
    monkeypatch.setattr(virt_conn, "uuid_exists", lambda *_a, **_k: True)
    monkeypatch.setattr(attach_mod.hotplug, "plug",
                        lambda _d, _p, s, **kw: state["plugged"].append((s, kw))
                        or [f"nvmgr-{s.name}"])
    monkeypatch.setattr(attach_mod, "_live_metadata", lambda *_a, **_k: None)
    from nvmgr.virt.define import _define

    dom = FakeDomain(xml, active=False)
    dom.UUIDString = lambda: str(dom_uuid)  # type: ignore[attr-defined]
    state["dom"] = dom
    _define(parse_domain(xml), xml, uri=None, kek=None)
    assert Image.open(str(image)).fmt == "qcow2"
    try:
        yield state
    finally:
        if "qsd" in state:
            state["qsd"].close()
        shutil.rmtree(Path(RUNTIME_ROOT) / str(dom_uuid), ignore_errors=True)


def _run(state: dict[str, Any], monkeypatch: pytest.MonkeyPatch, node: str = "nvmgr-image") -> Qsd:
    """The VM starts: the qsd opens the image; QMP goes to it."""
    qsd = Qsd(state["image"], state["tmp"], node)
    state["qsd"] = qsd
    monkeypatch.setattr(hotplug, "qmp", lambda _d, c, a=None: qsd(c, a))
    state["dom"].active = True
    return qsd


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_live_attach_writes_the_held_qcow2_through_its_export(
        lent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    image: Path = lent["image"]
    with Image.open(str(image)) as img:
        old = {s.name: (s.offset, s.member) for s in img.directory.sections}
        size = img.container.size()
    qsd = _run(lent, monkeypatch)
    data = os.urandom(40000)
    r = attach("vm", STATE, live=True, config=True, contents={"state0": data})
    assert r.added == ["state0"] and r.plugged == ["nvmgr-state0"] and not r.deferred, r
    assert qsd.sent[:4] == ["query-named-block-nodes", "block-export-del", "nbd-server-start",
                            "block-export-add"], qsd.sent
    assert qsd.sent[-2:] == ["block-export-del", "nbd-server-stop"], qsd.sent
    assert qsd("query-block-exports") == []
    ((ps, kw),) = lent["plugged"]
    member = image.parent / "vm.m1.nvram"  # raw, beside the image
    assert ps.member_path == str(member) and ps.member_format == "raw", ps
    assert kw == {"base": "nvmgr-image"}
    assert member.stat().st_uid == pwd.getpwnam("libvirt-qemu").pw_uid
    assert not (Path(RUNTIME_ROOT) / str(lent["uuid"]) / "lent-image.sock").exists()
    assert str(member) in lent["defined"][-1] and "nvmgr-state0" in lent["defined"][-1]
    qsd.close()
    del lent["qsd"]
    with Image.open(str(image)) as img:
        assert img.check().ok
        assert img.container.size() == size
        assert {n: (s.offset, s.member) for n, s in
                ((s.name, s) for s in img.directory.sections) if n in old} == old
        assert img.get("state0")[:len(data)] == data
        assert img.section("state0").dirty  # in use by the running VM
        (m,) = img.directory.members or []
        assert m.fmt == "raw" and m.path == str(member)


def test_a_member_recorded_by_a_relative_path_is_refused_and_nothing_changes(
        lent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    image: Path = lent["image"]
    with Image.open(str(image), writable=True) as img:
        split(img, ["fru0"], str(image.parent / "m.nvram"))
        new = img._copy_dir()
        new.members = [dataclasses.replace(m, path="m.nvram") for m in new.members or []]
        img._commit(new)
    before = _sha(image), sorted(os.listdir(image.parent))
    qsd = _run(lent, monkeypatch)
    with pytest.raises(NotHotpluggableError, match="relative path") as e:
        attach("vm", STATE, live=True, config=True, contents={"state0": b"x"})
    assert e.value.exit_code == ExitCode.NOT_HOTPLUGGABLE
    assert qsd("query-block-exports") == [] and qsd.sent[-3:-1] == ["block-export-del",
                                                                      "nbd-server-stop"]
    assert not lent["plugged"] and len(lent["defined"]) == 1
    qsd.close()
    del lent["qsd"]
    assert (_sha(image), sorted(os.listdir(image.parent))) == before


def test_a_qemu_without_a_node_over_the_qcow2_keeps_the_refusal(
        lent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    image: Path = lent["image"]
    before = _sha(image)
    qsd = _run(lent, monkeypatch, node="other")
    with pytest.raises(NotHotpluggableError, match="holds the qcow2 image") as e:
        attach("vm", STATE, live=True, config=True)
    assert e.value.exit_code == 13
    assert qsd.sent == ["query-named-block-nodes"]
    qsd.close()
    del lent["qsd"]
    assert _sha(image) == before and not lent["plugged"] and len(lent["defined"]) == 1


def test_config_data_writes_the_held_qcow2_now_without_a_plug(
        lent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``attach --config --data`` (no --live) on the running qcow2 VM: the bytes
    go into the image now, through the export; nothing is hot-plugged; the
    definition places the section where it was written (the next boot)."""
    image: Path = lent["image"]
    with Image.open(str(image)) as img:
        old = {s.name: (s.offset, s.member) for s in img.directory.sections}
    qsd = _run(lent, monkeypatch)
    data = os.urandom(30000)
    r = attach("vm", STATE, config=True, contents={"state0": data})
    assert r.added == ["state0"] and not r.plugged and not r.live and not r.deferred, r
    assert "block-export-add" in qsd.sent and qsd.sent[-2:] == ["block-export-del",
                                                                "nbd-server-stop"], qsd.sent
    assert qsd("query-block-exports") == [] and not lent["plugged"]
    member = image.parent / "vm.m1.nvram"
    assert str(member) in lent["defined"][-1] and "nvmgr-state0" in lent["defined"][-1]
    # A detach --config while it runs: the definition keeps state0 in its member
    # (where it is only the image knows: read through the export).
    detach("vm", section="fru0", config=True, remove_section=True)
    assert str(member) in lent["defined"][-1] and "fru0" not in lent["defined"][-1]
    qsd.close()
    del lent["qsd"]
    with Image.open(str(image)) as img:
        assert img.check().ok
        assert {n: (s.offset, s.member) for n, s in
                ((s.name, s) for s in img.directory.sections) if n in old and n != "fru0"} \
            == {n: v for n, v in old.items() if n != "fru0"}
        assert img.get("state0")[:len(data)] == data
        assert not img.section("state0").dirty  # no running QEMU reads it yet


def test_remove_section_of_a_held_qcow2_goes_through_its_export(
        lent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``detach --section NAME --config --remove-section`` of a non-live section
    while the qcow2 VM runs: removed through QEMU's export (it was exit 7)."""
    image: Path = lent["image"]
    with Image.open(str(image)) as img:
        assert img.directory.find("fru0") is not None
        others = {s.name: s.offset for s in img.directory.sections if s.name != "fru0"}
    qsd = _run(lent, monkeypatch)
    r = detach("vm", section="fru0", config=True, remove_section=True)
    assert r.removed == ["fru0"] and not r.kept and not r.unplugged, r
    # to read the directory, to place the definition's sections, to remove
    assert qsd.sent.count("block-export-add") == 3
    assert qsd("query-block-exports") == []
    assert "fru0" not in lent["defined"][-1]
    qsd.close()
    del lent["qsd"]
    with Image.open(str(image)) as img:
        assert img.check().ok
        assert img.directory.find("fru0") is None
        assert {s.name: s.offset for s in img.directory.sections} == others


def test_remove_section_of_a_live_section_of_a_held_qcow2_is_still_refused(
        lent: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A live section without --live: the running VM reads it (exit 7), nothing changes."""
    image: Path = lent["image"]
    qsd = _run(lent, monkeypatch)
    attach("vm", STATE, live=True, config=True, contents={"state0": b"y" * 100})
    qsd.close()
    del lent["qsd"]
    before = _sha(image), len(lent["defined"])
    qsd = _run(lent, monkeypatch)
    with pytest.raises(BusyError, match="running VM reads it") as e:
        detach("vm", section="state0", config=True, remove_section=True)
    assert e.value.exit_code == ExitCode.BUSY
    assert qsd("query-block-exports") == []
    qsd.close()
    del lent["qsd"]
    assert (_sha(image), len(lent["defined"])) == before
