"""Issue 8, part 2: swtpm's own state encryption for a domain with a key.

The vTPM passphrase and secret UUID derivations, the libvirt secret that
define creates and undefine removes (libvirt's ``test:///default`` with the
secret API in memory: libvirt 9.0's test driver has no secret driver; the
end-to-end tests use the real one), swtpm's
state file names per TPM version, the record the prepare hook reads to tell a
missing secret, hostile state files, and plaintext state re-encrypted by the
real swtpm (skipped without it)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import make_key

from nvmgr.crypto.cipher import Kek, SectionCipher
from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.errors import ExitCode, InvalidInputError
from nvmgr.format.layout import SectionSpec
from nvmgr.format.model import Binding
from nvmgr.image.image import Image
from nvmgr.provision import staging, vtpm

HAVE_SWTPM = all(shutil.which(t) for t in ("swtpm", "swtpm_ioctl", "swtpm_setup"))

# ----------------------------------------------------------------- derivations


def test_the_vtpm_passphrase_is_its_own_derivation_and_survives_a_rekey(tmp_path: Path) -> None:
    c = SectionCipher(bytes(range(32)))
    p = c.vtpm_passphrase()
    assert len(p) == 64 and bytes.fromhex(p.decode()) and p == p.lower()
    assert p == SectionCipher(bytes(range(32))).vtpm_passphrase()  # from the data key alone
    assert p != c.luks_passphrase()
    assert p != SectionCipher(bytes(range(1, 33))).vtpm_passphrase()
    # rekey re-wraps the data key only: the passphrase (and swtpm's ciphertext) stay
    path = tmp_path / "i.nvram"
    k1, k2 = Kek(os.urandom(32)), Kek(os.urandom(32))
    with Image.create(str(path), [SectionSpec("tpm-permall", 4096, Binding.TPM, True)],
                      kek=k1) as img:
        before = img.vtpm_passphrase()
        img.rekey(k2)
    with Image.open(str(path), kek=k2) as img:
        assert img.vtpm_passphrase() == before
    assert before.decode() not in path.read_bytes().decode("latin1")


def test_the_secret_uuid_is_per_domain_and_checked() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert qemuargs.vtpm_secret_uuid(a) == qemuargs.vtpm_secret_uuid(str(a))
    assert qemuargs.vtpm_secret_uuid(a) != qemuargs.vtpm_secret_uuid(b)
    assert qemuargs.vtpm_secret_uuid(a) != a
    assert qemuargs.vtpm_usage(a) == f"nvmgr-vtpm-{a}"
    for bad in ("", "not-a-uuid", "../../etc", "0" * 33):
        with pytest.raises(InvalidInputError, match="is not a domain UUID"):
            qemuargs.vtpm_secret_uuid(bad)


# ----------------------------------------------------------------- the domain XML

DOM = """<domain type='qemu'>
  <name>vt</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1" image="{image}"{key}/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>{tpm}</devices>
</domain>"""
TPM2 = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
TPM12 = "<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>"


def _xml(tmp_path: Path, tpm: str = TPM2, key: Path | None = None,
         dom_uuid: str | None = None) -> str:
    return DOM.format(uuid=dom_uuid or uuid.uuid4(), image=tmp_path / "vt.nvram", tpm=tpm,
                      key=f" key-file='{key}'" if key else "")


def test_a_domain_with_a_key_names_its_vtpm_secret_and_strip_takes_it_away(
        tmp_path: Path) -> None:
    from nvmgr.domain.plan import plan_domain

    key = make_key(tmp_path / "k")
    xml = _xml(tmp_path, key=key)
    dom = parse_domain(xml)
    plan = plan_domain(xml)
    assert plan.encrypted
    assert any("<encryption secret=" in p for p in qemuargs.wiring_problems(dom, plan))
    out = qemuargs.rewrite_domain(xml, plan, str(tmp_path / "vt.nvram"), "raw", uuid.uuid4())
    wired = parse_domain(out)
    assert wired.tpms[0].encryption_secret == qemuargs.vtpm_secret_uuid(wired.uuid)
    assert qemuargs.wiring_problems(wired, plan) == []
    # virsh edit naming another secret: not wired (swtpm would not use nvmgr's value)
    other = out.replace(str(qemuargs.vtpm_secret_uuid(wired.uuid)), str(uuid.uuid4()))
    assert any("<encryption secret=" in p
               for p in qemuargs.wiring_problems(parse_domain(other), plan))
    stripped = parse_domain(qemuargs.strip_nvmgr(out))
    assert stripped.tpms[0].encryption_secret is None
    # without a key: no encryption, nothing asked for
    plain = _xml(tmp_path)
    p2 = plan_domain(plain)
    out2 = qemuargs.rewrite_domain(plain, p2, str(tmp_path / "vt.nvram"), "raw", uuid.uuid4())
    assert "<encryption" not in out2


# ----------------------------------------------------------------- define and undefine

@pytest.fixture
def testconn(libvirt_secrets: dict[str, object]) -> object:
    """A connection held open (test:///default keeps its state while one is), with
    libvirt's secret API in memory (libvirt 9.0's test driver has none)."""
    libvirt = pytest.importorskip("libvirt")
    from conftest import _SecretsConn

    conn = libvirt.open("test:///default")
    yield _SecretsConn(conn, libvirt_secrets)  # type: ignore[arg-type]
    conn.close()


def test_define_gives_libvirt_the_secret_and_undefine_removes_it(
        tmp_path: Path, testconn: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvmgr.virt import conn as virt
    from nvmgr.virt.define import define, undefine

    # libvirt 9.0's test driver refuses virsh's undefine flags (KEEP_NVRAM, KEEP_TPM)
    monkeypatch.setattr(virt, "undefine", lambda name, uri=None, remove_tpm=False:
                        testconn.lookupByName(name).undefine())  # type: ignore[attr-defined]

    key = make_key(tmp_path / "k")
    dom_uuid = str(uuid.uuid4())
    res = define(_xml(tmp_path, key=key, dom_uuid=dom_uuid), uri="test:///default",
                 kek=Kek(key.read_bytes()), key_file=str(key))
    su = str(qemuargs.vtpm_secret_uuid(dom_uuid))
    assert res.vtpm_secret == su
    sec = testconn.secretLookupByUUIDString(su)  # type: ignore[attr-defined]
    xml = sec.XMLDesc()
    assert "ephemeral='yes'" in xml and "private='yes'" in xml, xml
    assert f"<name>nvmgr-vtpm-{dom_uuid}</name>" in xml and "type='vtpm'" in xml
    with Image.open(res.image, kek=Kek(key.read_bytes())) as img:
        phrase = img.vtpm_passphrase()
    assert vtpm.record_path(su).read_text().split()[1] == vtpm.fingerprint(phrase)
    assert phrase.decode() not in res.xml and phrase.decode() not in xml
    # defined again (reconcile): the same secret, the same value
    define(res.xml, uri="test:///default", kek=Kek(key.read_bytes()))
    assert len([s for s in testconn.listAllSecrets()  # type: ignore[attr-defined]
                if s.UUIDString() == su]) == 1
    out = undefine("vt", uri="test:///default", keep_nvram=True)
    assert out["vtpm_secret_removed"] is True
    assert su not in [s.UUIDString() for s in testconn.listAllSecrets()]  # type: ignore[attr-defined]
    assert not vtpm.record_path(su).exists()


def test_define_without_a_key_or_without_a_tpm_gives_no_secret(
        tmp_path: Path, testconn: object) -> None:
    from nvmgr.virt.define import define

    res = define(_xml(tmp_path), uri="test:///default")
    assert res.vtpm_secret is None
    key = make_key(tmp_path / "k")
    res = define(_xml(tmp_path, tpm="", key=key).replace("vt.nvram", "vt2.nvram")
                 .replace("<name>vt<", "<name>vt2<"),
                 uri="test:///default", kek=Kek(key.read_bytes()), key_file=str(key))
    assert res.vtpm_secret is None
    assert testconn.listAllSecrets() == []  # type: ignore[attr-defined]


# ----------------------------------------------------------------- staging names

def test_each_tpm_version_has_its_own_state_files(tmp_path: Path) -> None:
    u12, u20 = str(uuid.uuid4()), str(uuid.uuid4())
    d12 = parse_domain(_xml(tmp_path, TPM12, dom_uuid=u12))
    d20 = parse_domain(_xml(tmp_path, TPM2, dom_uuid=u20))
    names12 = ["tpm-permall", "tpm-savestate", "tpm-volatilestate"]
    names20 = ["tpm-permall", "tpm-volatilestate"]
    f12 = staging.tpm_state_files(d12, names12, str(tmp_path))
    f20 = staging.tpm_state_files(d20, names20, str(tmp_path))
    assert f12 == {n: tmp_path / u12 / "tpm1.2" / f"tpm-00.{n[4:]}" for n in names12}
    assert f20 == {n: tmp_path / u20 / "tpm2" / f"tpm2-00.{n[4:]}" for n in names20}
    assert not set(f12.values()) & set(f20.values())


@pytest.mark.parametrize("name", ["tpm1-permall", "tpm", "tpm-", "tpmx-permall",
                                  "tpm01-permall", "tpm-1-permall/../x", "uefi-vars",
                                  "tpm99999999999999999999-permall"])
def test_hostile_or_foreign_section_names_get_no_state_file(tmp_path: Path, name: str) -> None:
    dom = parse_domain(_xml(tmp_path, TPM2))
    files = staging.tpm_state_files(dom, [name], str(tmp_path))
    assert files == {}


def test_a_section_of_a_tpm_removed_or_passthrough_is_not_staged(tmp_path: Path) -> None:
    dom = parse_domain(_xml(tmp_path, "<tpm model='tpm-tis'><backend type='passthrough'>"
                                      "<device path='/dev/tpm0'/></backend></tpm>"))
    assert staging.tpm_state_files(dom, ["tpm-permall"], str(tmp_path)) == {}
    assert staging.tpm_state_files(parse_domain(_xml(tmp_path, "")), ["tpm-permall"],
                                   str(tmp_path)) == {}


# ----------------------------------------------------------------- swtpm's blobs

def _plain(body: bytes) -> bytes:
    tlv = struct.pack(">HI", 1, len(body)) + body
    return struct.pack(">BBHHI", 2, 1, 10, 0, 10 + len(tlv)) + tlv


@pytest.mark.parametrize("data", [
    b"", b"\x02", b"TPM state " * 10, bytes(10), bytes(4096),
    struct.pack(">BBHHI", 2, 1, 10, 0, 999),  # total length beyond the data
    struct.pack(">BBHHI", 2, 1, 0xFFFF, 0, 10),  # header larger than the data
    struct.pack(">BBHHI", 2, 1, 2, 0, 10),  # header smaller than a header
    struct.pack(">BBHHI", 2, 1, 10, 0, 16) + struct.pack(">HI", 1, 0xFFFFFFFF),
    struct.pack(">BBHHI", 2, 1, 10, 0, 16) + struct.pack(">HI", 7, 0),  # not TAG_DATA
    struct.pack(">BBHHI", 9, 1, 10, 1, 10),  # unknown version
])
def test_blob_kind_takes_nothing_for_granted(data: bytes) -> None:
    assert vtpm.blob_kind(data) is None


def test_blob_kind_tells_plain_from_encrypted() -> None:
    assert vtpm.blob_kind(_plain(b"x" * 100)) == "plain"
    enc = struct.pack(">BBHHI", 2, 1, 10, 9, 16) + struct.pack(">HI", 2, 0)
    assert vtpm.blob_kind(enc) == "encrypted"


def test_the_record_tells_a_restarted_daemon_and_another_value(tmp_path: Path) -> None:
    pidfile = tmp_path / "driver.pid"
    su = str(uuid.uuid4())
    root = str(tmp_path / "run")
    # no pid file: nothing can be told, nothing refused
    assert vtpm.secret_problem(su, b"p" * 64, runtime_root=root, pidfile=str(pidfile)) is None
    pidfile.write_text(f"{os.getpid()}\n")
    assert "not given it" in vtpm.secret_problem(su, b"p" * 64, runtime_root=root,
                                                 pidfile=str(pidfile))
    vtpm.record_secret(su, b"p" * 64, runtime_root=root, pidfile=str(pidfile))
    rec = vtpm.record_path(su, root)
    assert oct(rec.stat().st_mode & 0o777) == "0o600" and b"p" * 8 not in rec.read_bytes()
    assert vtpm.secret_problem(su, b"p" * 64, runtime_root=root, pidfile=str(pidfile)) is None
    assert "another value" in vtpm.secret_problem(su, b"q" * 64, runtime_root=root,
                                                  pidfile=str(pidfile))
    pidfile.write_text(f"{os.getppid()}\n")  # another process holds the secrets now
    assert "restarted" in vtpm.secret_problem(su, b"p" * 64, runtime_root=root,
                                              pidfile=str(pidfile))
    for junk in (b"", b"a b c d", b"\xff" * 300):
        rec.write_bytes(junk)
        assert vtpm.secret_problem(su, b"p" * 64, runtime_root=root,
                                   pidfile=str(pidfile)) is not None
    for bad in ("-5", "x", "99999999999", ""):
        pidfile.write_text(bad)
        assert vtpm.driver_instance(str(pidfile)) is None


# ----------------------------------------------------------------- swtpm itself

def _manufacture(d: Path) -> bytes:
    """A TPM 2.0 made by swtpm_setup without a key: its plaintext permall."""
    d.mkdir()
    subprocess.run(["swtpm_setup", "--tpm2", "--tpmstate", str(d), "--createek",
                    "--overwrite"], check=True, capture_output=True)
    return (d / "tpm2-00.permall").read_bytes()


def _swtpm(d: Path, permall: bytes) -> tuple[subprocess.Popen[bytes], Path, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from e2e.vmlib import _swtpm_on

    return _swtpm_on({"tpm2-00.permall": permall}, d, True, None)


def _ek_name(permall: bytes, d: Path, phrase: bytes | None) -> str:
    """The EK's name and PEM, asked of a swtpm with *phrase* running on *permall*."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from e2e.vmlib import read_ek

    return read_ek(permall, d, phrase)[0]


@pytest.mark.skipif(not HAVE_SWTPM or shutil.which("tpm2_readpublic") is None,
                    reason="needs swtpm, swtpm-tools and tpm2-tools")
def test_swtpm_reencrypts_plaintext_state_keeping_the_tpm(tmp_path: Path) -> None:
    plain = _manufacture(tmp_path / "made")
    assert vtpm.blob_kind(plain) == "plain"
    phrase = b"ab" * 32
    work = tempfile.mkdtemp(prefix="vt-")  # short: swtpm's sockets go there
    try:
        out = vtpm.encrypt_state({"tpm2-00.permall": plain, "other": b"kept"}, phrase, "2.0",
                                 work)
        assert os.listdir(work) == []  # nothing left behind
    finally:
        shutil.rmtree(work)
    enc = out["tpm2-00.permall"]
    assert vtpm.blob_kind(enc) == "encrypted" and out["other"] == b"kept"
    assert _ek_name(enc, tmp_path, phrase) == _ek_name(plain, tmp_path, None)
    # The end-to-end tests look for the EK's modulus on disk: plaintext state holds
    # it (so the search can find it), swtpm's encrypted state does not.
    from e2e.test_tpm_encrypted import _ek_modulus

    modulus = _ek_modulus(_ek_name(plain, tmp_path, None))[:64]
    assert modulus in plain and modulus not in enc
    # with volatile state (swtpm_ioctl -v of a running TPM): both come out encrypted
    d = tmp_path / "vol"
    d.mkdir()
    proc, _sock, ctrl = _swtpm(d, plain)
    try:
        subprocess.run(["swtpm_ioctl", "--unix", str(ctrl), "-v"], check=True,
                       capture_output=True)
    finally:
        subprocess.run(["swtpm_ioctl", "--unix", str(ctrl), "-s"], capture_output=True)
        proc.wait(10)
    vol = (d / "tpm2-00.volatilestate").read_bytes()
    assert vtpm.blob_kind(vol) == "plain"
    work = tempfile.mkdtemp(prefix="vt-")
    try:
        both = vtpm.encrypt_state({"tpm2-00.permall": plain, "tpm2-00.volatilestate": vol},
                                  phrase, "2.0", work)
    finally:
        shutil.rmtree(work)
    assert {vtpm.blob_kind(b) for b in both.values()} == {"encrypted"}
    # already encrypted: returned as it is, swtpm not even run
    assert vtpm.encrypt_state({"tpm2-00.permall": enc}, phrase, "2.0",
                              str(tmp_path / "nowhere")) == {"tpm2-00.permall": enc}
    assert not (tmp_path / "nowhere").exists()


def _hook_domain(tmp_path: Path) -> tuple[object, Path]:
    import hookdom

    key = make_key(tmp_path / "vm.key")
    return hookdom.wired_domain(tmp_path, "vtpm", key_file=key), key


def test_prepare_refuses_when_libvirt_lost_the_secret_naming_the_fix(tmp_path: Path) -> None:
    d, key = _hook_domain(tmp_path)
    su = str(qemuargs.vtpm_secret_uuid(d.uuid))  # type: ignore[attr-defined]
    assert f"<encryption secret=\"{su}\"/>" in d.xml  # type: ignore[attr-defined]
    run = d.runtime_root  # type: ignore[attr-defined]
    (run / "libvirt-secrets.pid").write_text(f"{os.getpid()}\n")
    r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
    assert r.returncode == ExitCode.KEY_REQUIRED, r.stderr.decode()
    err = r.stderr.decode()
    assert f"nvmgr reconcile {d.name}" in err and su in err  # type: ignore[attr-defined]
    assert not (run / d.uuid / "image.key").exists()  # type: ignore[attr-defined]
    with Image.open(str(d.image), kek=Kek(key.read_bytes())) as img:  # type: ignore[attr-defined]
        phrase = img.vtpm_passphrase()
    vtpm.record_secret(su, phrase, runtime_root=str(run), pidfile=str(run / "libvirt-secrets.pid"))
    r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()


@pytest.mark.skipif(not HAVE_SWTPM or shutil.which("tpm2_readpublic") is None,
                    reason="needs swtpm, swtpm-tools and tpm2-tools")
def test_prepare_reencrypts_plaintext_tpm_state_before_staging_it(tmp_path: Path) -> None:
    """An image whose TPM state is swtpm's plaintext (made before the domain had
    a key, converted by nvmgr encrypt): swtpm with a key refuses it, so the first
    prepare has swtpm encrypt it, stores that, and stages only ciphertext."""
    d, key = _hook_domain(tmp_path)
    kek = Kek(key.read_bytes())
    assert d.hook("prepare", "begin").returncode == 0  # type: ignore[attr-defined]
    assert d.hook("release", "end").returncode == 0  # type: ignore[attr-defined]
    plain = _manufacture(tmp_path / "made")
    with Image.open(str(d.image), writable=True, kek=kek) as img:  # type: ignore[attr-defined]
        img.put("tpm-permall", plain)
        phrase = img.vtpm_passphrase()
    # a plaintext file left staged by a run before the key (a crash): the newest state
    d.tpm_dir.mkdir(parents=True)  # type: ignore[attr-defined]
    (d.tpm_dir / "tpm2-00.permall").write_bytes(plain)  # type: ignore[attr-defined]
    r = d.hook("prepare", "begin")  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr.decode()
    log = d.log.read_text()  # type: ignore[attr-defined]
    assert "re-encrypted ['tpm-permall']" in log, log
    staged = (d.tpm_dir / "tpm2-00.permall").read_bytes()  # type: ignore[attr-defined]
    assert vtpm.blob_kind(staged) == "encrypted"
    with Image.open(str(d.image), kek=kek) as img:  # type: ignore[attr-defined]
        assert img.get("tpm-permall") == staged
    assert _ek_name(staged, tmp_path, phrase) == _ek_name(plain, tmp_path, None)


@pytest.mark.skipif(not HAVE_SWTPM or shutil.which("tpm2_readpublic") is None,
                    reason="needs swtpm, swtpm-tools and tpm2-tools")
def test_prepare_killed_at_every_io_of_a_start_that_reencrypts(tmp_path: Path) -> None:
    """SIGKILL at each I/O of the prepare that re-encrypts plaintext TPM state
    (its puts into the image, the wipe of the plaintext staged file, the staging
    of the ciphertext): the image checks under the key, its TPM section and any
    staged file are whole (the plaintext or swtpm's ciphertext, never torn), and
    the start tried again stages ciphertext of the same TPM (its EK)."""
    from test_hook_crash import ok, sweep

    (tmp_path / "d").mkdir()
    d, key = _hook_domain(tmp_path / "d")
    kek = Kek(key.read_bytes())
    ok(d.hook("prepare", "begin"))  # type: ignore[attr-defined]
    ok(d.hook("release", "end"))  # type: ignore[attr-defined]
    plain = _manufacture(tmp_path / "made")
    ek = _ek_name(plain, tmp_path, None)
    with Image.open(str(d.image), writable=True, kek=kek) as img:  # type: ignore[attr-defined]
        img.put("tpm-permall", plain)
        phrase = img.vtpm_passphrase()
    d.tpm_dir.mkdir(parents=True)  # type: ignore[attr-defined]
    (d.tpm_dir / "tpm2-00.permall").write_bytes(plain)  # type: ignore[attr-defined]

    def judge(c: object, n: int) -> str:
        staged_path = c.tpm_dir / "tpm2-00.permall"  # type: ignore[attr-defined]
        with Image.open(str(c.image), kek=kek) as img:  # type: ignore[attr-defined]
            assert img.check().ok
            stored = img.get("tpm-permall")
        kind = vtpm.blob_kind(stored)
        assert stored == plain or kind == "encrypted", "the TPM section is torn"
        if staged_path.exists():
            left = staged_path.read_bytes()
            assert left == plain or left == stored, "a staged file that is not the TPM"
        ok(c.hook("release", "end"))  # type: ignore[attr-defined]
        ok(c.hook("prepare", "begin"))  # type: ignore[attr-defined]
        staged = staged_path.read_bytes()
        assert vtpm.blob_kind(staged) == "encrypted"
        with Image.open(str(c.image), kek=kek) as img:  # type: ignore[attr-defined]
            assert img.get("tpm-permall") == staged
        assert _ek_name(staged, c.image.parent, phrase) == ek  # type: ignore[attr-defined]
        ok(c.hook("release", "end"))  # type: ignore[attr-defined]
        return "plain" if stored == plain else "enc"

    outcomes = sweep(d, tmp_path / "d", "prepare", "begin", judge)  # type: ignore[arg-type]
    assert "plain" in outcomes and "enc" in outcomes


def test_vtpm_secret_of_an_image_for_a_migrations_destination(
        tmp_path: Path, testconn: object) -> None:
    """The destination has the image's copy and the key, not the domain: the
    secret's UUID and value come from the image (its directory names the domain)."""
    from nvmgr.errors import UsageError
    from nvmgr.virt.define import vtpm_secret_of_image

    key = make_key(tmp_path / "k")
    owner = uuid.uuid4()
    path = tmp_path / "copy.nvram"
    with Image.create(str(path), [SectionSpec("tpm-permall", 4096, Binding.TPM, True)],
                      kek=Kek(key.read_bytes()), domain_uuid=owner) as img:
        phrase = img.vtpm_passphrase()
    got = vtpm_secret_of_image(str(path), Kek(key.read_bytes()), "test:///default")
    su = str(qemuargs.vtpm_secret_uuid(owner))
    assert got == {"domain_uuid": str(owner), "secret": su}
    assert testconn.secretLookupByUUIDString(su)._value == phrase  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="wrong key|not one of"):
        vtpm_secret_of_image(str(path), Kek(os.urandom(32)), "test:///default")
    plain = tmp_path / "plain.nvram"
    with Image.create(str(plain), [SectionSpec("tpm-permall", 4096, Binding.TPM)],
                      domain_uuid=owner):
        pass
    with pytest.raises(UsageError, match="not encrypted"):
        vtpm_secret_of_image(str(plain), Kek(key.read_bytes()), "test:///default")


def test_the_watcher_gives_the_secret_back_after_a_restart_and_takes_it_away(
        tmp_path: Path, testconn: object, libvirt_secrets: dict[str, object]) -> None:
    """After a reconnect (libvirtd restarted: ephemeral secrets gone) the watcher's
    catch-up gives every keyed domain's vTPM secret again, even when its definition
    did not change; a domain undefined behind nvmgr's back loses its secret."""
    from nvmgr.virt.define import define
    from nvmgr.virt.watch import Watcher

    key = make_key(tmp_path / "k")
    dom_uuid = str(uuid.uuid4())
    define(_xml(tmp_path, key=key, dom_uuid=dom_uuid), uri="test:///default",
           kek=Kek(key.read_bytes()), key_file=str(key))
    su = str(qemuargs.vtpm_secret_uuid(dom_uuid))
    lines: list[str] = []
    w = Watcher("test:///default", None, lines.append, lambda _s: None, lambda: False)
    w.catch_up(first=True)
    libvirt_secrets.clear()  # what a libvirtd restart does to ephemeral secrets
    w.catch_up(first=False)
    assert su in libvirt_secrets, lines
    assert f"vt: vTPM secret {su} given to libvirt" in lines
    testconn.lookupByName("vt").undefine()  # type: ignore[attr-defined]
    w.gone(dom_uuid, "vt")
    assert su not in libvirt_secrets
    assert "vt: undefined; removed its vTPM secret" in lines
