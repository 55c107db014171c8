"""RBD locations without a cluster: the location string, the metadata's
``<nvmgr:source protocol='rbd'>`` element, the cephx key from libvirt's secret
store, and the QEMU arguments they give (issue 12)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nvmgr.domain import metadata, qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.namespaces import NVMGR_NS
from nvmgr.domain.plan import plan_domain
from nvmgr.errors import InvalidInputError, NotFoundError, UsageError
from nvmgr.hook import lifecycle
from nvmgr.storage.rbd import RbdLocation, image_opts, libvirt_ceph_key

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SECRET_UUID = "3c1a4e2b-8f7d-4a6c-9b5e-0d2f1e3a4b5c"
#: A cephx key as Ceph prints it (base64 of its 28 bytes); not a real cluster's.
CEPH_KEY = base64.b64encode(bytes(range(28))).decode()

pytestmark = pytest.mark.usefixtures("host_independent")


# -- the location string -------------------------------------------------------------

def test_a_full_location_parses_and_spells_back_the_same() -> None:
    text = (r"rbd:vms/vm1-nvram@snap1:conf=/etc/ceph/ceph.conf:id=libvirt"
            r":mon_host=10.0.0.1\:6789;mon2:secret=" + SECRET_UUID)
    loc = RbdLocation.parse(text)
    assert (loc.pool, loc.image, loc.snapshot, loc.conf, loc.user) == (
        "vms", "vm1-nvram", "snap1", "/etc/ceph/ceph.conf", "libvirt")
    assert loc.hosts == (("10.0.0.1", 6789), ("mon2", None))
    assert loc.secret == SECRET_UUID and loc.has_key_source
    assert RbdLocation.parse(loc.spec()) == loc and loc.spec() == text
    # qemu-img's legacy filename never carries nvmgr's own key source.
    assert "secret" not in loc.qemu_filename() and r"mon_host=10.0.0.1\:6789" in loc.qemu_filename()
    node = loc.node()
    assert node["server"] == [{"host": "10.0.0.1", "port": "6789"},
                              {"host": "mon2", "port": "6789"}]
    opts = image_opts(loc, "k")
    assert "file.server.0.host=10.0.0.1" in opts and opts.endswith("file.server.1.port=6789")
    assert "file.key-secret=k" in opts


@pytest.mark.parametrize("text,needle", [
    ("rbd:pool", "expected rbd:POOL/IMAGE"),
    ("rbd:p/i:size=1", "option 'size'"),
    ("rbd:p/i:id=a:id=b", "option 'id'"),
    ("rbd:p/i:conf=relative.conf", "conf must be an absolute path"),
    ("rbd:p/i:secret=not-a-uuid", "secret='not-a-uuid' is not the UUID"),
    (r"rbd:p/i:mon_host=bad host", "monitor 'bad host'"),
    (r"rbd:p/i:mon_host=h\:99999", "monitor 'h:99999'"),
    (f"rbd:p/i:keyring=/k:secret={SECRET_UUID}", "not keyring and secret"),
    ("rbd:p/i:secret_usage=a:secret=" + SECRET_UUID, "not secret and secret_usage"),
])
def test_bad_locations_are_refused_naming_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as e:
        RbdLocation.parse(text)
    assert needle in str(e.value)


def test_a_bad_location_on_the_command_line_is_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "nvmgr", "create",
                        "rbd:p/i:secret=nope", "-s", "a:4K"], capture_output=True, text=True,
                       cwd=tmp_path, check=False)
    assert p.returncode == 2, p
    assert "secret='nope' is not the UUID" in p.stderr
    assert list(tmp_path.iterdir()) == []


# -- the key from libvirt's secret store ----------------------------------------------

def secret_store(tmp_path: Path, *, kind: str = "ceph", usage: str = "client.libvirt secret",
                 value: str | None = CEPH_KEY, uuid: str = SECRET_UUID) -> Path:
    """A secret as libvirt 9 writes it: UUID.xml and UUID.base64 (the value's base64)."""
    d = tmp_path / "secrets"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    (d / f"{uuid}.xml").write_text(
        f"<secret ephemeral='no' private='yes'>\n  <uuid>{uuid}</uuid>\n"
        f"  <usage type='{kind}'>\n    <name>{usage}</name>\n  </usage>\n</secret>\n")
    if value is not None:
        (d / f"{uuid}.base64").write_text(value)
    return d


def test_the_key_comes_from_a_ceph_secret_by_uuid_or_usage(tmp_path: Path) -> None:
    d = secret_store(tmp_path)
    secret_store(tmp_path, kind="volume", usage="/var/lib/x.img",
                 uuid="00000000-1111-2222-3333-444444444444")  # another secret beside it
    assert libvirt_ceph_key(uuid=SECRET_UUID, secrets_dir=str(d)) == CEPH_KEY
    assert libvirt_ceph_key(uuid=SECRET_UUID.upper(), secrets_dir=str(d)) == CEPH_KEY
    assert libvirt_ceph_key(usage="client.libvirt secret", secrets_dir=str(d)) == CEPH_KEY
    loc = RbdLocation.parse("rbd:p/i:secret_usage=client.libvirt secret")
    assert loc.key(secrets_dir=str(d)) == CEPH_KEY


def test_a_missing_or_wrong_secret_is_refused_naming_it(tmp_path: Path) -> None:
    d = secret_store(tmp_path, value=None)
    with pytest.raises(NotFoundError, match=f"libvirt secret {SECRET_UUID}.* has no value"):
        libvirt_ceph_key(uuid=SECRET_UUID, secrets_dir=str(d))
    with pytest.raises(NotFoundError, match="no libvirt secret of usage type ceph named 'other'"):
        libvirt_ceph_key(usage="other", secrets_dir=str(d))
    with pytest.raises(NotFoundError, match="is not defined"):
        libvirt_ceph_key(uuid="00000000-1111-2222-3333-444444444444", secrets_dir=str(d))
    d2 = secret_store(tmp_path / "v", kind="volume")
    with pytest.raises(UsageError, match="is of usage type volume, not ceph"):
        libvirt_ceph_key(uuid=SECRET_UUID, secrets_dir=str(d2))
    d3 = secret_store(tmp_path / "b", value="not base64!")
    with pytest.raises(UsageError, match="is not base64"):
        libvirt_ceph_key(uuid=SECRET_UUID, secrets_dir=str(d3))


# -- the metadata's <nvmgr:source protocol='rbd'> --------------------------------------

def domain(source: str, attrs: str = "") -> str:
    xml = (DATA / "uefi-tpm2-in.xml").read_text()
    meta = f"<nvmgr:nvram xmlns:nvmgr='{NVMGR_NS}' {attrs}>{source}</nvmgr:nvram>"
    return xml.replace("<metadata>", f"<metadata>{meta}") if "<metadata>" in xml else \
        xml.replace("</domain>", f"<metadata>{meta}</metadata></domain>")


SOURCE = (f"<nvmgr:source protocol='rbd' name='vms/vm1-nvram'>"
          "<nvmgr:host name='10.0.0.1' port='6789'/><nvmgr:host name='mon2'/>"
          "<nvmgr:config file='/etc/ceph/ceph.conf'/>"
          f"<nvmgr:auth username='libvirt'><nvmgr:secret type='ceph' uuid='{SECRET_UUID}'/>"
          "</nvmgr:auth></nvmgr:source>")


def test_a_source_element_is_the_image_and_round_trips() -> None:
    meta = parse_domain(domain(SOURCE)).nvmgr
    assert meta is not None and meta.image_element
    assert meta.image == (r"rbd:vms/vm1-nvram:conf=/etc/ceph/ceph.conf:id=libvirt"
                          r":mon_host=10.0.0.1\:6789;mon2:secret=" + SECRET_UUID)
    el = metadata.to_element(meta)
    assert el.get("image") is None  # written back as the element it was
    src = el.find(metadata.SOURCE_TAG)
    assert src is not None and src.get("protocol") == "rbd" and src.get("name") == "vms/vm1-nvram"
    assert metadata.from_element(el) == meta
    # The same location given as the attribute round-trips as the attribute.
    attr = parse_domain(domain("", f"image='{meta.image}'")).nvmgr
    assert attr is not None and not attr.image_element and attr.image == meta.image
    assert metadata.to_element(attr).find(metadata.SOURCE_TAG) is None


@pytest.mark.parametrize("auth,want", [
    ("<nvmgr:auth username='u'><nvmgr:secret type='ceph' usage='client.u secret'/></nvmgr:auth>",
     ":id=u:secret_usage=client.u secret"),
    ("<nvmgr:auth username='u'><nvmgr:keyring file='/etc/ceph/u.keyring'/></nvmgr:auth>",
     ":id=u:keyring=/etc/ceph/u.keyring"),
    ("<nvmgr:auth username='u'/>", ":id=u"),
    ("<nvmgr:snapshot name='s1'/>", ""),
])
def test_key_sources_and_a_snapshot_in_the_source_element(auth: str, want: str) -> None:
    xml = domain(f"<nvmgr:source protocol='rbd' name='p/i'>{auth}</nvmgr:source>")
    meta = parse_domain(xml).nvmgr
    assert meta is not None
    assert meta.image == ("rbd:p/i@s1" if "snapshot" in auth else "rbd:p/i" + want)
    assert metadata.from_element(metadata.to_element(meta)) == meta


@pytest.mark.parametrize("source,attrs,needle", [
    (SOURCE, "image='/var/lib/x.nvram'", "give the image attribute or a <nvmgr:source>"),
    ("<nvmgr:source protocol='iscsi' name='p/i'/>", "", "is not a network protocol"),
    ("<nvmgr:source protocol='rbd' name='no-pool'/>", "", "is not POOL/IMAGE"),
    ("<nvmgr:source protocol='rbd' name='p/i'><nvmgr:host name='h' port='99999'/>"
     "</nvmgr:source>", "", "port='99999' is not a port number"),
    ("<nvmgr:source protocol='rbd' name='p/i'><nvmgr:host name='a b'/></nvmgr:source>", "",
     "is not a host name"),
    ("<nvmgr:source protocol='rbd' name='p/i'><nvmgr:config file='rel.conf'/></nvmgr:source>",
     "", "must be an absolute path"),
    ("<nvmgr:source protocol='rbd' name='p/i'><nvmgr:auth username='u'>"
     "<nvmgr:secret type='volume' uuid='" + SECRET_UUID + "'/></nvmgr:auth></nvmgr:source>",
     "", "is not 'ceph'"),
    ("<nvmgr:source protocol='rbd' name='p/i'><nvmgr:auth username='u'>"
     "<nvmgr:secret type='ceph' uuid='nope'/></nvmgr:auth></nvmgr:source>", "", "is not a UUID"),
    ("<nvmgr:source protocol='rbd' name='p/i'><nvmgr:auth username='u'>"
     "<nvmgr:keyring file='/k'/><nvmgr:secret type='ceph' uuid='" + SECRET_UUID + "'/>"
     "</nvmgr:auth></nvmgr:source>", "", "does not match"),
    ("<nvmgr:source protocol='rbd' name='p/i'/><nvmgr:source protocol='rbd' name='p/j'/>", "",
     "does not match"),
])
def test_a_bad_source_element_is_invalid_input(source: str, attrs: str, needle: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        _ = parse_domain(domain(source, attrs)).nvmgr
    assert needle in str(e.value), str(e.value)


def test_a_bad_source_element_is_exit_9_naming_it(tmp_path: Path) -> None:
    xml = tmp_path / "d.xml"
    xml.write_text(domain("<nvmgr:source protocol='rbd' name='p/i'>"
                          "<nvmgr:host name='h' port='0x50'/></nvmgr:source>"))
    p = subprocess.run([sys.executable, "-m", "nvmgr", "plan", str(xml)], capture_output=True,
                       text=True, cwd=ROOT, check=False)
    assert p.returncode == 9, p
    assert "port='0x50' is not a port number" in p.stderr


# -- QEMU's arguments and the hook's key file -------------------------------------------

def test_qemu_gets_an_rbd_blockdev_with_the_monitors_and_a_key_secret() -> None:
    plan = plan_domain(domain(SOURCE))
    assert plan.image is not None
    args = qemuargs.qemu_args(plan, plan.image, "raw",
                              domain_uuid="11111111-2222-3333-4444-555555555555")
    text = " ".join(args)
    assert "secret,id=nvmgr-rbd-key,format=base64,file=/run/nvmgr/" \
           "11111111-2222-3333-4444-555555555555/rbd.key" in text
    rbd = next(json.loads(a) for a in args if a.startswith("{") and '"driver":"rbd"' in a)
    assert rbd["key-secret"] == "nvmgr-rbd-key" and rbd["user"] == "libvirt"
    assert rbd["server"] == [{"host": "10.0.0.1", "port": "6789"},
                             {"host": "mon2", "port": "6789"}]
    assert SECRET_UUID not in text and CEPH_KEY not in text


def test_the_domain_rewrite_keeps_the_source_element() -> None:
    """``nvmgr define`` rewrites the metadata: the element stays an element."""
    xml = domain(SOURCE)
    plan = plan_domain(xml)
    assert plan.image is not None
    out = qemuargs.rewrite_domain(xml, plan, plan.image, "raw",
                                  "22222222-3333-4444-5555-666666666666")
    meta = parse_domain(out).nvmgr
    assert meta is not None and meta.image_element and meta.image == plan.image
    assert "<nvmgr:source" in out and " image=" not in out.split("<nvmgr:nvram")[1].split(">")[0]
    # Another location given for it (define --image): the element names that one.
    other = qemuargs.rewrite_domain(xml, plan, "rbd:vms/other", "raw",
                                    "22222222-3333-4444-5555-666666666666")
    meta = parse_domain(other).nvmgr
    assert meta is not None and meta.image_element and meta.image == "rbd:vms/other"


def test_the_prepare_hook_stages_the_key_from_the_libvirt_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = secret_store(tmp_path)
    monkeypatch.setattr("nvmgr.paths.SECRETS_DIR", str(d))
    staged: dict[str, bytes] = {}

    def stage_runtime(uuid: str, files: dict[str, bytes], users: object, root: str, *,
                      secret: bool = False) -> None:
        assert secret, "a cephx key is staged as a secret: onto tmpfs only"
        staged.update(files)

    monkeypatch.setattr(lifecycle.staging, "stage_runtime", stage_runtime)
    dom = parse_domain(domain(SOURCE))
    ctx = lifecycle.HookContext.of("t", "prepare", "begin", "", dom, users=None)  # type: ignore[arg-type]
    assert ctx is not None
    lifecycle._stage_rbd_key(ctx)
    assert staged == {"rbd.key": CEPH_KEY.encode()}
    os.unlink(d / f"{SECRET_UUID}.base64")  # the value gone: the start is refused
    with pytest.raises(NotFoundError, match="has no value"):
        lifecycle._stage_rbd_key(ctx)


SAMPLES = ["rbd", "ceph", "p/i", "h", "h.example", "10.0.0.1", "[::1]", "a b", "1", "65535",
           "123456", "/c", "rel", "u", "-u", SECRET_UUID, "nope", "client.x secret", "a:b", "",
           "x" * 300]


@pytest.mark.parametrize("key", sorted(metadata._SOURCE_VALUES))
def test_the_source_value_patterns_are_the_schemas(key: tuple[str, str]) -> None:
    """metadata._SOURCE_VALUES (which name a refused attribute) say what the schema says."""
    from lxml import etree

    element, attr = key
    for value in SAMPLES:
        auth = ("<nvmgr:keyring file='/k'/>" if element == "keyring" else
                "<nvmgr:secret type='ceph' usage='n'/>" if attr == "usage" else
                f"<nvmgr:secret type='ceph' uuid='{SECRET_UUID}'/>")
        src = etree.fromstring(
            f"<nvmgr:source xmlns:nvmgr='{NVMGR_NS}' protocol='rbd' name='p/i'>"
            "<nvmgr:host name='h' port='1'/><nvmgr:snapshot name='s'/>"
            f"<nvmgr:config file='/c'/><nvmgr:auth username='u'>{auth}</nvmgr:auth>"
            "</nvmgr:source>")
        el = src if element == "source" else src.find(f".//{{{NVMGR_NS}}}{element}")
        assert el is not None
        el.set(attr, value)
        schema = metadata._source_schema().validate(etree.ElementTree(src))
        assert schema == bool(re.fullmatch(metadata._SOURCE_VALUES[key], value)), (key, value)
