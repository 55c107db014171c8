"""Images on an NBD server: the generic network location (issue 12).

The image is made as a file and served by QEMU's own servers: a
qemu-storage-daemon NBD export on a unix socket, and ``qemu-nbd`` on
127.0.0.1.  nvmgr reaches it through QEMU's ``nbd`` driver, exported to it by a
private qemu-storage-daemon, like an RBD image.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvmgr.errors import UsageError
from nvmgr.storage.nbd import NbdLocation

ROOT = Path(__file__).resolve().parent.parent


# -- the URI ---------------------------------------------------------------------------

def test_the_two_uri_forms() -> None:
    u = NbdLocation.parse("nbd+unix:///vm1?socket=/run/x/nbd.sock")
    assert (u.export, u.socket, u.host) == ("vm1", "/run/x/nbd.sock", None)
    assert u.node() == {"driver": "nbd", "server": {"type": "unix", "path": "/run/x/nbd.sock"},
                        "export": "vm1"}
    t = NbdLocation.parse("nbd://127.0.0.1:10900/vm1")
    assert (t.export, t.host, t.port) == ("vm1", "127.0.0.1", 10900)
    assert t.node()["server"] == {"type": "inet", "host": "127.0.0.1", "port": "10900"}
    assert NbdLocation.parse("nbd://127.0.0.1/vm1").port == 10809
    assert NbdLocation.parse(t.uri()) == t and NbdLocation.parse(u.uri()) == u


@pytest.mark.parametrize("text,needle", [
    ("nbd+unix:///vm1?socket=relative.sock", "expected nbd+unix:///EXPORT?socket="),
    ("nbd+unix:///vm1?socket=/a/../b", "holds '..'"),
    ("nbd://127.0.0.1:0/vm1", "port 0 is not 1..65535"),
    ("nbd://127.0.0.1:70000/vm1", "port 70000"),
    ("nbd://bad host/vm1", "expected"),
    ("nbd+tcp://h/vm1", "expected"),
])
def test_bad_uris_are_refused(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as e:
        NbdLocation.parse(text)
    assert needle in str(e.value)


# -- served by QEMU ----------------------------------------------------------------------

def nvmgr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nvmgr", *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(ok: object, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not ok():  # type: ignore[operator]
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the server exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not up in 30 s")
        time.sleep(0.05)


@contextlib.contextmanager
def served_unix(image: Path, sock: Path) -> Iterator[str]:
    """*image* (raw) as export ``vm1`` of a qemu-storage-daemon on unix socket *sock*."""
    _need("qemu-storage-daemon")
    p = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,filename={image},node-name=f",
         "--blockdev", "driver=raw,file=f,node-name=n",
         "--nbd-server", f"addr.type=unix,addr.path={sock}",
         "--export", "type=nbd,id=e,node-name=n,name=vm1,writable=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(sock.exists, "qemu-storage-daemon", p)
        yield f"nbd+unix:///vm1?socket={sock}"
    finally:
        p.terminate()
        p.wait(30)


@contextlib.contextmanager
def served_tcp(image: Path) -> Iterator[str]:
    """*image* as export ``vm1`` of ``qemu-nbd`` on 127.0.0.1."""
    _need("qemu-nbd")
    port = _free_port()
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
                          "-x", "vm1", "--persistent", "--shared", "4", str(image)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        _wait(listening, "qemu-nbd", p)
        yield f"nbd://127.0.0.1:{port}/vm1"
    finally:
        p.terminate()
        p.wait(30)


def make_image(path: Path) -> None:
    p = nvmgr("create", str(path), "-s", "efivars:128K:pflash", "-s", "blob:64K")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("served", [served_unix, served_tcp], ids=["unix", "tcp"])
def test_info_put_get_check_through_an_nbd_server(served: object, tmp_path: Path) -> None:
    image = tmp_path / "vm1.nvram"
    make_image(image)
    data = os.urandom(50000)
    (tmp_path / "blob").write_bytes(data)
    with served(image, tmp_path / "nbd.sock") if served is served_unix \
            else served(image) as uri:  # type: ignore[operator]
        info = json.loads(nvmgr("info", uri, "-O", "json").stdout)
        assert info["format"] == "nbd" and [s["name"] for s in info["sections"]] == [
            "efivars", "blob"]
        p = nvmgr("put", uri, "blob", str(tmp_path / "blob"))
        assert p.returncode == 0, p.stderr
        p = nvmgr("get", uri, "blob", "-o", str(tmp_path / "out"))
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "out").read_bytes() == data
        p = nvmgr("check", uri)
        assert p.returncode == 0, p.stderr
        listed = json.loads(nvmgr("list", uri, "-O", "json").stdout)
        assert any(s["name"] == "blob" and s["length"] == len(data)
                   for s in (listed["sections"] if isinstance(listed, dict) else listed))
        # An export has its server's size: growing it is refused, nothing written.
        gen = info["generation"]
        p = nvmgr("grow", uri, "-s", "more:1M")
        assert p.returncode == 2 and "cannot be grown" in p.stderr, p.stderr
        assert json.loads(nvmgr("info", uri, "-O", "json").stdout)["generation"] == gen + 1
    # The bytes went to the served file: nvmgr reads them there directly.
    p = nvmgr("get", str(image), "blob", "-o", str(tmp_path / "out2"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out2").read_bytes() == data
    assert nvmgr("check", str(image)).returncode == 0


def test_errors_name_what_is_wrong(tmp_path: Path) -> None:
    image = tmp_path / "vm1.nvram"
    make_image(image)
    before = image.read_bytes()
    sock = tmp_path / "nbd.sock"
    with served_unix(image, sock) as uri:
        p = nvmgr("info", f"nbd+unix:///nope?socket={sock}")
        assert p.returncode == 3 and "no export 'nope'" in p.stderr, p.stderr
        p = nvmgr("create", f"nbd+unix:///vm2?socket={sock}", "-s", "x:4K")
        assert p.returncode == 3 and "no export 'vm2'" in p.stderr, p.stderr
        # An export that holds data (an image here) never gets a new image written over it.
        p = nvmgr("create", uri, "-s", "x:4K")
        assert p.returncode == 2 and "holds data that is not an nvmgr image" in p.stderr, \
            p.stderr
        # Another nvmgr on this host writes it: busy (7).
        from nvmgr.image.image import Image

        with Image.open(uri, writable=True):
            p = nvmgr("put", uri, "blob", "/dev/null")
            assert p.returncode == 7 and "another nvmgr" in p.stderr, p.stderr
    assert image.read_bytes() == before
    p = nvmgr("info", f"nbd+unix:///vm1?socket={tmp_path / 'gone.sock'}")
    assert p.returncode == 10 and "gone.sock" in p.stderr, p.stderr
    assert f"cannot reach the NBD server on socket {tmp_path / 'gone.sock'}" in p.stderr
    # A server killed (its socket left behind): the same, with QEMU's words.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(tmp_path / "stale.sock"))
    p = nvmgr("info", f"nbd+unix:///vm1?socket={tmp_path / 'stale.sock'}")
    assert p.returncode == 10 and "cannot reach the NBD server on socket" in p.stderr \
        and "Connection refused" in p.stderr, p.stderr
    port = _free_port()
    p = nvmgr("get", f"nbd://127.0.0.1:{port}/vm1", "blob", "-o", str(tmp_path / "x"))
    assert p.returncode == 10 and f"cannot reach the NBD server at 127.0.0.1:{port}" \
        in p.stderr, p.stderr
    p = nvmgr("info", "nbd://127.0.0.1:0/vm1")
    assert p.returncode == 2 and "port 0" in p.stderr, p.stderr


def test_orphans_on_an_nbd_export(tmp_path: Path) -> None:
    """An orphan served over NBD is recorded, read and adopted through the export; it
    cannot be moved aside (its server names it): refused, nothing written."""
    import uuid

    from nvmgr.errors import UsageError
    from nvmgr.format.model import Orphaned
    from nvmgr.image.image import Image
    from nvmgr.provision import orphans

    owner, new = uuid.uuid4(), uuid.uuid4()
    image = tmp_path / "vm1.nvram"
    assert nvmgr("create", str(image), "-s", "efivars:128K:pflash").returncode == 0
    with Image.open(str(image), writable=True) as img:
        img.reassign(image_uuid=img.directory.image_uuid, domain_uuid=owner)
    sock = tmp_path / "nbd.sock"
    with served_unix(image, sock) as uri:
        assert not orphans.mark_orphaned(f"nbd+unix:///nope?socket={sock}", str(owner), "x")
        assert orphans.mark_orphaned(uri, str(owner), "vm1", when=1_764_590_000)
        assert orphans.record_of(uri) == Orphaned(1_764_590_000, "vm1")
        [entry] = orphans.survey(orphans.candidates([], [uri]), {})
        assert (entry.path, entry.state, entry.domain) == (uri, "orphaned", "vm1")
        before = image.read_bytes()
        with pytest.raises(UsageError, match="NBD export, which nvmgr cannot move aside"):
            orphans.move_aside(uri, owner)
        assert image.read_bytes() == before
        orphans.adopt(uri, new)
    with Image.open(str(image)) as img:  # the bytes went to the served file
        assert img.directory.domain_uuid == new and img.directory.orphaned is None


# -- NBD in a domain's metadata and QEMU's arguments -------------------------------------

def _domain(meta: str) -> str:
    from nvmgr.domain.namespaces import NVMGR_NS

    xml = (ROOT / "tests" / "data" / "uefi-tpm2-in.xml").read_text()
    meta = meta.replace("<nvmgr:nvram", f"<nvmgr:nvram xmlns:nvmgr='{NVMGR_NS}'", 1)
    return xml.replace("<metadata>", f"<metadata>{meta}") if "<metadata>" in xml else \
        xml.replace("</domain>", f"<metadata>{meta}</metadata></domain>")


@pytest.mark.parametrize("meta,uri", [
    ("<nvmgr:nvram image='nbd+unix:///vm1?socket=/run/nbd/vm1.sock'/>",
     "nbd+unix:///vm1?socket=/run/nbd/vm1.sock"),
    ("<nvmgr:nvram image='nbd://10.0.0.5:10900/vm1'/>", "nbd://10.0.0.5:10900/vm1"),
    ("<nvmgr:nvram><nvmgr:source protocol='nbd' name='vm1'><nvmgr:host transport='unix' "
     "socket='/run/nbd/vm1.sock'/></nvmgr:source></nvmgr:nvram>",
     "nbd+unix:///vm1?socket=/run/nbd/vm1.sock"),
    ("<nvmgr:nvram><nvmgr:source protocol='nbd' name='vm1'><nvmgr:host name='nbd.example'/>"
     "</nvmgr:source></nvmgr:nvram>", "nbd://nbd.example:10809/vm1"),
], ids=["unix-attr", "tcp-attr", "unix-source", "tcp-source"])
def test_an_nbd_image_in_the_metadata_and_qemus_nbd_blockdev(meta: str, uri: str) -> None:
    """The metadata names the image as an NBD URI (the ``image`` attribute) or as libvirt
    spells an NBD disk (``<nvmgr:source protocol='nbd'>``, kept an element when nvmgr
    rewrites it); QEMU's live slices sit on an ``nbd`` blockdev of that export."""
    from nvmgr.domain import metadata, qemuargs
    from nvmgr.domain.elements import parse_domain
    from nvmgr.domain.plan import plan_domain

    xml = _domain(meta)
    m = parse_domain(xml).nvmgr
    assert m is not None and m.image == uri and m.image_element == ("<nvmgr:source" in meta)
    assert metadata.from_element(metadata.to_element(m)) == m  # round trip, same form
    plan = plan_domain(xml)
    args = qemuargs.qemu_args(plan, uri, "raw", domain_uuid=plan.domain_uuid)
    nodes = [json.loads(a) for a in args if a.startswith("{")]
    file_node = next(n for n in nodes if n.get("node-name") == qemuargs.FILE_NODE)
    assert file_node["driver"] == "nbd" and file_node["export"] == "vm1"
    want = ({"type": "unix", "path": "/run/nbd/vm1.sock"} if "unix" in uri else
            {"type": "inet", "host": uri.split("//")[1].split(":")[0],
             "port": uri.split(":")[2].split("/")[0]})
    assert file_node["server"] == want
    vars_ = next(n for n in nodes if n.get("node-name") == qemuargs.node_name("uefi-vars"))
    assert vars_["file"] == qemuargs.FILE_NODE and vars_["driver"] == "raw"
    assert qemuargs.slice_offsets(args)[qemuargs.node_name("uefi-vars")] == vars_["offset"]
    out = qemuargs.rewrite_domain(xml, plan, uri, "raw", str(plan.domain_uuid))
    again = parse_domain(out).nvmgr
    assert again is not None and again.image == uri and again.image_element == m.image_element
    with pytest.raises(UsageError, match="raw on RBD and NBD"):
        qemuargs.qemu_args(plan, uri, "qcow2", domain_uuid=plan.domain_uuid)


@pytest.mark.parametrize("meta,needle", [
    ("<nvmgr:nvram image='nbd://127.0.0.1:0/vm1'/>", "port 0 is not 1..65535"),
    ("<nvmgr:nvram image='nbd+unix:///vm1?socket=rel.sock'/>", "image="),
    ("<nvmgr:nvram><nvmgr:source protocol='nbd' name='vm1'/></nvmgr:nvram>",
     "source protocol='nbd' takes"),
    ("<nvmgr:nvram><nvmgr:source protocol='nbd'><nvmgr:host transport='unix' "
     "socket='/a/../b'/></nvmgr:source></nvmgr:nvram>", "socket='/a/../b'"),
])
def test_a_bad_nbd_image_in_the_metadata_is_invalid_input(meta: str, needle: str,
                                                          tmp_path: Path) -> None:
    (tmp_path / "d.xml").write_text(_domain(meta))
    p = nvmgr("plan", str(tmp_path / "d.xml"))
    assert p.returncode == 9 and needle in p.stderr, p.stderr


def test_convert_a_file_to_an_nbd_export_and_back(tmp_path: Path) -> None:
    """``nvmgr convert FILE nbd+unix://...`` writes the copy over an export that holds no
    nvmgr image (its server made it: never created, never an image overwritten); back to
    a file, every section is byte-identical."""
    src = tmp_path / "vm1.nvram"
    make_image(src)
    payloads = {"efivars": os.urandom(100000), "blob": os.urandom(50000)}
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(data)
        assert nvmgr("put", str(src), name, str(tmp_path / name)).returncode == 0
    size = src.stat().st_size
    target = tmp_path / "export.raw"
    with open(target, "wb") as f:
        f.truncate(size + (1 << 20))  # zeros, and room to spare
    small = tmp_path / "small.raw"
    with open(small, "wb") as f:
        f.truncate(size // 2)
    with served_unix(small, tmp_path / "small.sock") as uri:
        p = nvmgr("convert", str(src), uri, "-f", "raw")
        assert p.returncode == 8 and "the NBD export holds" in p.stderr, p.stderr
    assert small.read_bytes() == bytes(size // 2)  # nothing written
    with served_unix(target, tmp_path / "nbd.sock") as uri:
        p = nvmgr("convert", str(src), uri, "-f", "qcow2")
        assert p.returncode == 2 and "raw" in p.stderr, p.stderr
        p = nvmgr("convert", str(src), uri, "-f", "raw")
        assert p.returncode == 0, p.stderr
        p = nvmgr("convert", str(src), uri, "-f", "raw")  # an image there now: refused
        assert p.returncode == 2 and "holds an nvmgr image already" in p.stderr, p.stderr
        back = tmp_path / "back.qcow2"
        p = nvmgr("convert", uri, str(back), "-f", "qcow2")
        assert p.returncode == 0, p.stderr
        for image in (uri, str(back)):
            assert nvmgr("check", image).returncode == 0
            for name, data in payloads.items():
                out = tmp_path / f"out-{name}"
                out.unlink(missing_ok=True)
                assert nvmgr("get", image, name, "-o", str(out)).returncode == 0
                assert out.read_bytes() == data, (image, name)



# -- a new image written into a blank export ---------------------------------------------

def test_create_writes_a_new_image_only_into_a_blank_export(tmp_path: Path) -> None:
    """``nvmgr create`` on an export the server serves from a new (all-zero) file writes
    the image into it; an export too small is exit 8, one holding any data exit 2, and
    neither is written."""
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(4 << 20)
    with served_unix(blank, tmp_path / "nbd.sock") as uri:
        p = nvmgr("create", uri, "-s", "efivars:128K:pflash", "-s", "blob:64K")
        assert p.returncode == 0, p.stderr
        info = json.loads(nvmgr("info", uri, "-O", "json").stdout)
        assert [s["name"] for s in info["sections"]] == ["efivars", "blob"]
        assert nvmgr("check", uri).returncode == 0
    assert blank.stat().st_size == 4 << 20  # the server's file: written in, never resized
    assert nvmgr("check", str(blank)).returncode == 0  # a whole image, read as a file

    small = tmp_path / "small.raw"
    with open(small, "wb") as f:
        f.truncate(64 << 10)
    with served_unix(small, tmp_path / "small.sock") as uri:
        p = nvmgr("create", uri, "-s", "efivars:128K:pflash")
        assert p.returncode == 8 and "holds 65,536 bytes" in p.stderr, p.stderr
    assert small.read_bytes() == bytes(64 << 10)

    data = tmp_path / "data.raw"
    with open(data, "wb") as f:
        f.truncate(4 << 20)
        f.seek(3 << 20)
        f.write(b"someone's file system")  # past the first MiB: the whole export is read
    before = data.read_bytes()
    with served_unix(data, tmp_path / "data.sock") as uri:
        p = nvmgr("create", uri, "-s", "efivars:128K:pflash")
        assert p.returncode == 2 and "holds data that is not an nvmgr image" in p.stderr
    assert data.read_bytes() == before


def test_undefine_remove_nvram_takes_only_its_own_image_out_of_the_export(
        tmp_path: Path) -> None:
    """What ``undefine --remove-nvram`` blanks (:func:`nvmgr.virt.define._nbd_extent`,
    asked before the domain is undefined): the image's own bytes when the domain owns
    it; nothing in a blank export; another domain's image or data that is no nvmgr
    image are refused, the export unchanged."""
    import uuid

    from nvmgr.domain.plan import plan_domain
    from nvmgr.errors import ForeignImageError
    from nvmgr.provision.prepare import prepare_image
    from nvmgr.virt.define import _nbd_extent

    plan = plan_domain((ROOT / "tests" / "data" / "uefi-tpm2-in.xml").read_text())
    export = tmp_path / "export.raw"
    with open(export, "wb") as f:
        f.truncate(8 << 20)
    with served_unix(export, tmp_path / "nbd.sock") as uri:
        assert _nbd_extent(uri, plan.domain_uuid, "vm1") is None
        img, created, _added = prepare_image(plan, kek=None, fmt="raw", path=uri)
        with img:
            size = img.directory.image_size
        written = export.read_bytes()
        with pytest.raises(UsageError, match=rf"holds the image of another domain "
                           rf"\({plan.domain_uuid}\): nothing was removed"):
            _nbd_extent(uri, uuid.uuid4(), "vm2")
        assert _nbd_extent(uri, plan.domain_uuid, "vm1") == size
        assert export.read_bytes() == written
    export.write_bytes(b"somebody else's data".ljust(8 << 20, b"\0"))
    with served_unix(export, tmp_path / "nbd.sock") as uri, \
            pytest.raises(ForeignImageError):
        _nbd_extent(uri, plan.domain_uuid, "vm1")


def test_a_domains_image_goes_into_a_blank_export_and_is_blanked_back_out(
        tmp_path: Path) -> None:
    """What ``define --image nbd+unix://...`` and the prepare hook do
    (:func:`nvmgr.provision.prepare.prepare_image`): a blank export gets the domain's new
    image; a second call opens it; an export holding other data is refused, naming it,
    unwritten; :func:`nvmgr.storage.nbd.blank_out` (define's roll-back when libvirt
    refuses the domain) leaves the export blank again."""
    from nvmgr.domain.plan import plan_domain
    from nvmgr.errors import ForeignImageError
    from nvmgr.provision.prepare import owner_of, prepare_image
    from nvmgr.storage import nbd

    plan = plan_domain((ROOT / "tests" / "data" / "uefi-tpm2-in.xml").read_text())
    export = tmp_path / "export.raw"
    with open(export, "wb") as f:
        f.truncate(8 << 20)
    with served_unix(export, tmp_path / "nbd.sock") as uri:
        assert nbd.export_blank(uri) and owner_of(uri) is None  # define asks it first
        img, created, added = prepare_image(plan, kek=None, fmt="raw", path=uri)
        with img:
            assert created and added == [s.name for s in plan.sections]
            size = img.directory.image_size
            assert img.container.size() == 8 << 20 and size < 8 << 20
        img, created, added = prepare_image(plan, kek=None, fmt="raw", path=uri)
        with img:
            assert not created and added == []
        assert not nbd.export_blank(uri) and owner_of(uri) == plan.domain_uuid
        nbd.blank_out(uri, size)
        assert nbd.export_blank(uri)
    assert export.read_bytes() == bytes(8 << 20)

    other = tmp_path / "other.raw"
    with open(other, "wb") as f:
        f.truncate(8 << 20)
        f.write(b"\xeb\x3c\x90mkfs.fat")
    before = other.read_bytes()
    with served_unix(other, tmp_path / "other.sock") as uri:
        with pytest.raises(ForeignImageError, match="the NBD export holds data"):
            prepare_image(plan, kek=None, fmt="raw", path=uri)
        with pytest.raises(ForeignImageError, match="the NBD export holds data"):
            owner_of(uri)
    assert other.read_bytes() == before


# -- who has the export open: a QEMU on this host ------------------------------------------

def test_a_qemu_with_the_export_in_its_command_line_holds_it(tmp_path: Path) -> None:
    """NBD has no lock to ask: a ``qemu-system-*`` on this host whose ``-blockdev`` opens
    the export is what tells a running VM.  A live section's write is then refused,
    busy (7), even with ``--force`` (which overrides only the in-use mark); a QEMU with
    another export of the same server does not count."""
    _need("qemu-system-x86_64")
    from nvmgr.storage.nbd import NbdContainer, qemu_users

    image = tmp_path / "vm1.nvram"
    make_image(image)
    (tmp_path / "vars").write_bytes(os.urandom(4096))
    sock = tmp_path / "nbd.sock"
    with served_unix(image, sock) as uri:
        loc = NbdLocation.parse(uri)

        def qemu(export: str) -> subprocess.Popen[bytes]:
            node = {**NbdLocation(export, socket=str(sock)).node(), "node-name": "n"}
            return subprocess.Popen(
                ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                 "-S", "-blockdev", json.dumps(node)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        other = qemu("nope")  # QEMU refuses an export the server lacks, and exits
        other.wait(30)
        assert other.returncode != 0 and qemu_users(loc) == []
        q = qemu("vm1")
        try:
            deadline = time.monotonic() + 30
            while qemu_users(loc) != [q.pid]:
                assert q.poll() is None, q.stderr.read() if q.stderr else b""
                assert time.monotonic() < deadline, "the QEMU was not seen"
                time.sleep(0.05)
            c = NbdContainer(uri)
            try:
                assert c.running_holder() == (
                    f"a running QEMU (pid {q.pid}) on this host has the NBD export open")
            finally:
                c.close()
            gen = json.loads(nvmgr("info", uri, "-O", "json").stdout)["generation"]
            for force in ((), ("--force",)):
                p = nvmgr("put", uri, "efivars", str(tmp_path / "vars"), *force)
                assert p.returncode == 7 and f"a running QEMU (pid {q.pid})" in p.stderr, \
                    p.stderr
            assert json.loads(nvmgr("info", uri, "-O", "json").stdout)["generation"] == gen
            p = nvmgr("put", uri, "blob", str(tmp_path / "vars"))  # not live: written
            assert p.returncode == 0, p.stderr
        finally:
            q.kill()
            q.wait(30)
        assert qemu_users(loc) == []
        p = nvmgr("put", uri, "efivars", str(tmp_path / "vars"))
        assert p.returncode == 0, p.stderr


def test_only_an_nbd_blockdev_of_the_same_server_and_export_counts() -> None:
    u = NbdLocation.parse("nbd+unix:///vm1?socket=/run/nbd/s.sock")
    assert u.same_export({"driver": "nbd", "export": "vm1",
                          "server": {"type": "unix", "path": "/run/nbd//s.sock"}})
    assert not u.same_export({"driver": "nbd", "export": "vm2",
                              "server": {"type": "unix", "path": "/run/nbd/s.sock"}})
    assert not u.same_export({"driver": "nbd", "export": "vm1",
                              "server": {"type": "unix", "path": "/run/nbd/t.sock"}})
    assert not u.same_export({"driver": "file", "filename": "/run/nbd/s.sock"})
    assert not u.same_export(["nbd"])
    t = NbdLocation.parse("nbd://[::1]:10900/vm1")
    assert t.same_export({"driver": "nbd", "export": "vm1",
                          "server": {"type": "inet", "host": "::1", "port": "10900"}})
    assert not t.same_export({"driver": "nbd", "export": "vm1",
                              "server": {"type": "inet", "host": "::1", "port": "10809"}})
    assert NbdLocation.parse("nbd://h/").same_export(
        {"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "10809"}})


# -- QEMU's user reaches the server's socket --------------------------------------------------

def test_the_qemu_user_must_reach_the_servers_socket() -> None:
    """QEMU connects to an ``nbd+unix`` export itself, as the QEMU user: the prepare hook
    refuses the start (exit 11, the host is not set up) when that user cannot enter a
    directory above the socket or may not write the socket (connecting needs it), naming
    the path and the fix; a socket that is not there is left to the connection to tell."""
    import tempfile

    from nvmgr.errors import InstallationError
    from nvmgr.provision.staging import Users, require_qemu_reaches_socket

    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    users = Users(qemu_user="nobody", qemu_group="nogroup")
    d = Path(tempfile.mkdtemp(prefix="nvmgr-sock-", dir="/tmp"))  # 0700, root's
    try:
        sock = d / "nbd.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock))
            sock.chmod(0o755)
            with pytest.raises(InstallationError, match=f"no search permission on {d} "
                               r"\(mode 0700\)") as e:
                require_qemu_reaches_socket(str(sock), users, "the NBD server's socket")
            assert e.value.exit_code == 11
            d.chmod(0o755)
            with pytest.raises(InstallationError, match=r"may not connect to the NBD server's "
                               rf"socket {sock} \(owner root, mode 0755"):
                require_qemu_reaches_socket(str(sock), users, "the NBD server's socket")
            shutil.chown(sock, "nobody")
            require_qemu_reaches_socket(str(sock), users, "the NBD server's socket")
            shutil.chown(sock, "root")
            sock.chmod(0o777)
            require_qemu_reaches_socket(str(sock), users, "the NBD server's socket")
            sock.chmod(0o755)
            require_qemu_reaches_socket(str(sock), Users(qemu_user="root", qemu_group="root"),
                                        "the NBD server's socket")
        require_qemu_reaches_socket(str(d / "gone.sock"), users, "the NBD server's socket")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- a crash while a new image is written into a blank export ---------------------------------

FAULTRUN = ROOT / "tests" / "faultrun.py"


def _faultrun(n: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FAULTRUN), str(n), "--", *args],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def test_a_create_into_a_blank_export_killed_at_every_io(tmp_path: Path) -> None:
    """``nvmgr create`` into a blank export, SIGKILLed before each of its writes and
    flushes (``tests/faultrun.py``): the export is left blank (a new create writes the
    image) or holds a whole image (both checks pass, its sections listed); never
    something that is neither, which nvmgr would refuse to write over."""
    spec = ["-s", "efivars:128K:pflash", "-s", "blob:64K"]
    export = tmp_path / "export.raw"
    with open(export, "wb") as f:
        f.truncate(2 << 20)
    with served_unix(export, tmp_path / "dry.sock") as uri:
        dry = _faultrun(0, "create", uri, *spec)
        assert dry.returncode == 0, dry.stderr
    total = int(dry.stderr.strip().splitlines()[-1].split("=")[1])
    assert total >= 4, dry.stderr  # two header copies, each written and flushed
    outcomes = []
    for n in range(1, total + 1):
        export.unlink()
        with open(export, "wb") as f:
            f.truncate(2 << 20)
        with served_unix(export, tmp_path / f"k{n}.sock") as uri:
            r = _faultrun(n, "create", uri, *spec)
            assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr)
            from nvmgr.storage.nbd import export_blank

            if export_blank(uri, wait=30):
                outcomes.append("blank")
                p = nvmgr("create", uri, *spec)  # the export is as it was: made again
                assert p.returncode == 0, (n, p.stderr)
            else:
                outcomes.append("image")
            p = nvmgr("check", uri, "-O", "json")
            assert p.returncode == 0, (n, p.stdout, p.stderr)
            assert [s["name"] for s in json.loads(p.stdout)["sections"]] == [
                "efivars", "blob"], (n, p.stdout)
    assert outcomes[0] == "blank" and "image" in outcomes, outcomes
    assert outcomes == sorted(outcomes), outcomes  # blank, then image: never back
