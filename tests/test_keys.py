"""Tests for nvmgr.crypto.keys: key files, streams and libvirt secrets."""

from __future__ import annotations

import base64
import io
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from nvmgr.crypto import keys
from nvmgr.crypto.cipher import Kek
from nvmgr.errors import ExternalError, NotFoundError, NvmgrError, UsageError
from nvmgr.virt import secrets

# Bytes chosen so a leak is easy to spot in text and in reprs.
KEY = bytes.fromhex("c0ffee00deadbeef" * 4)
KEY_HEX = KEY.hex()
SECRET_UUID = "6c1e0b55-2a1b-4c8e-9a51-0a6b8e3c4d21"


def write(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def assert_no_leak(err: BaseException, *secrets: bytes) -> None:
    texts = [str(err), repr(err), repr(err.args)]
    if isinstance(err, NvmgrError):
        texts.append(repr(err.to_json()))
    for text in texts:
        low = text.lower()
        for s in (KEY, *secrets):
            assert s.hex() not in low
            assert s.hex()[:16] not in low
            assert repr(s)[2:20] not in text
        assert KEY_HEX[:16] not in low
        assert "c0ffee" not in low


# -- key files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        KEY,
        KEY_HEX.encode(),
        KEY_HEX.upper().encode(),
        KEY_HEX.encode() + b"\n",
    ],
    ids=["raw", "hex", "HEX", "hex-newline"],
)
def test_key_file_forms(tmp_path: Path, content: bytes) -> None:
    k = keys.load_key_file(write(tmp_path / "k", content))
    assert k.key_id == Kek(KEY).key_id
    assert k.label == "file"


def test_raw_key_that_looks_like_text(tmp_path: Path) -> None:
    # 32 raw bytes are raw even when they happen to be hex digits.
    raw = b"0123456789abcdef" * 2
    k = keys.load_key_file(write(tmp_path / "k", raw))
    assert k.key_id == Kek(raw).key_id


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o200])
def test_key_file_private_modes_ok(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "k", KEY, mode)
    if mode & 0o400 == 0 and os.geteuid() != 0:
        pytest.skip("owner cannot read a write-only file unless root")
    assert keys.load_key_file(path).key_id == Kek(KEY).key_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o601, 0o610, 0o666])
def test_key_file_mode_rejected(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "k", KEY, mode)
    with pytest.raises(UsageError) as ei:
        keys.load_key_file(path)
    assert ei.value.message == f"key file {path} must be mode 0600 (is {mode:04o})"
    assert_no_leak(ei.value)


def test_key_file_mode_message_example(tmp_path: Path) -> None:
    path = write(tmp_path / "k", KEY, 0o644)
    with pytest.raises(UsageError, match=r"must be mode 0600 \(is 0644\)"):
        keys.load_key_file(path)


def test_key_file_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(NotFoundError) as ei:
        keys.load_key_file(path)
    assert path in str(ei.value)
    assert isinstance(ei.value.__cause__, FileNotFoundError)  # the cause is kept
    with pytest.raises(NotFoundError) as ei:
        keys.load_key_file(str(tmp_path / "nope" / "deeper"))
    assert isinstance(ei.value.__cause__, OSError)


def test_key_file_not_regular(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(UsageError, match="not a regular file"):
        keys.load_key_file(str(d))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    # Must fail at once, not block waiting for a writer.
    with pytest.raises(UsageError, match="not a regular file"):
        keys.load_key_file(str(fifo))


def test_key_file_symlink_followed(tmp_path: Path) -> None:
    target = write(tmp_path / "k", KEY)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert keys.load_key_file(str(link)).key_id == Kek(KEY).key_id
    # The target's mode is what counts.
    os.chmod(target, 0o644)
    with pytest.raises(UsageError, match="mode 0600"):
        keys.load_key_file(str(link))


BAD_CONTENTS = {
    "empty": b"",
    "31-raw": KEY[:31],
    "33-raw": KEY + b"\x00",
    "raw-newline": KEY + b"\n",
    "63-hex": KEY_HEX[:63].encode(),
    "65-hex": KEY_HEX.encode() + b"0",
    "hex-crlf": KEY_HEX.encode() + b"\r\n",
    "hex-2-newlines": KEY_HEX.encode() + b"\n\n",
    "hex-space": KEY_HEX.encode() + b" ",
    "hex-leading-space": b" " + KEY_HEX.encode(),
    "hex-spaced": " ".join(KEY_HEX[i : i + 2] for i in range(0, 64, 2)).encode(),
    "hex-0x": b"0x" + KEY_HEX.encode(),
    "not-hex": (KEY_HEX[:63] + "g").encode(),
    "128-hex": (KEY_HEX * 2).encode(),
    "long": KEY * 10,
    "base64": base64.b64encode(KEY),
}


@pytest.mark.parametrize("content", list(BAD_CONTENTS.values()), ids=list(BAD_CONTENTS))
def test_key_file_bad_content(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "k", content)
    with pytest.raises(UsageError) as ei:
        keys.load_key_file(path)
    assert ei.value.message == f"key file {path} must hold 32 bytes raw or 64 hex digits"
    assert_no_leak(ei.value, content[:32] if content else KEY)
    assert ei.value.__cause__ is None and ei.value.__context__ is None


# -- streams ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [KEY, KEY_HEX.encode(), KEY_HEX.encode() + b"\n"])
def test_stream_forms(content: bytes) -> None:
    k = keys.load_key_stream(io.BytesIO(content))
    assert k.key_id == Kek(KEY).key_id
    assert k.label == "stdin"


@pytest.mark.parametrize("content", list(BAD_CONTENTS.values()), ids=list(BAD_CONTENTS))
def test_stream_bad_content(content: bytes) -> None:
    with pytest.raises(UsageError) as ei:
        keys.load_key_stream(io.BytesIO(content))
    assert ei.value.message == "key from standard input must hold 32 bytes raw or 64 hex digits"
    assert_no_leak(ei.value, content[:32] if content else KEY)


class Trickle(io.RawIOBase):
    """A pipe-like stream: short reads, counts what it hands out."""

    def __init__(self, data: bytes, step: int = 5) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        n = self.step if n is None or n < 0 else min(n, self.step)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def test_stream_short_reads() -> None:
    s = Trickle(KEY_HEX.encode() + b"\n", step=7)
    k = keys.load_key_stream(cast(BinaryIO, s), what="pipe", label="pipe")
    assert k.key_id == Kek(KEY).key_id
    assert k.label == "pipe"


def test_stream_reads_at_most_200_bytes() -> None:
    s = Trickle(b"a" * 100000, step=64)
    with pytest.raises(UsageError, match="key from pipe must hold"):
        keys.load_key_stream(cast(BinaryIO, s), what="pipe")
    assert s.pos <= 200


def test_stream_text_mode_rejected() -> None:
    with pytest.raises(UsageError):
        keys.load_key_stream(cast(BinaryIO, io.StringIO(KEY_HEX)))


def test_stream_real_pipe() -> None:
    r, w = os.pipe()
    os.write(w, KEY)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        assert keys.load_key_stream(f).key_id == Kek(KEY).key_id


# -- libvirt secret store on disk ---------------------------------------------------


def test_secret_file(tmp_path: Path) -> None:
    (tmp_path / f"{SECRET_UUID}.base64").write_bytes(base64.b64encode(KEY))
    k = keys.load_libvirt_secret_file(SECRET_UUID, str(tmp_path))
    assert k.key_id == Kek(KEY).key_id
    assert k.label == f"libvirt-secret:{SECRET_UUID}"
    # Upper-case input finds libvirt's lower-case file name, same label.
    k2 = keys.load_libvirt_secret_file(SECRET_UUID.upper(), str(tmp_path))
    assert k2.key_id == k.key_id and k2.label == k.label


@pytest.mark.parametrize("value", [KEY_HEX.encode(), KEY_HEX.encode() + b"\n"])
def test_secret_file_hex_value(tmp_path: Path, value: bytes) -> None:
    (tmp_path / f"{SECRET_UUID}.base64").write_bytes(base64.b64encode(value) + b"\n")
    assert keys.load_libvirt_secret_file(SECRET_UUID, str(tmp_path)).key_id == Kek(KEY).key_id


def test_secret_file_missing(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as ei:
        keys.load_libvirt_secret_file(SECRET_UUID, str(tmp_path))
    assert SECRET_UUID in str(ei.value)
    with pytest.raises(NotFoundError):
        keys.load_libvirt_secret_file(SECRET_UUID, str(tmp_path / "no-such-dir"))


@pytest.mark.parametrize(
    "stored",
    [base64.b64encode(KEY[:31]), base64.b64encode(KEY + b"\n"), base64.b64encode(b"")],
)
def test_secret_file_bad_value(tmp_path: Path, stored: bytes) -> None:
    (tmp_path / f"{SECRET_UUID}.base64").write_bytes(stored)
    with pytest.raises(UsageError) as ei:
        keys.load_libvirt_secret_file(SECRET_UUID, str(tmp_path))
    assert ei.value.message == (
        f"libvirt secret {SECRET_UUID} must hold 32 bytes raw or 64 hex digits"
    )
    assert_no_leak(ei.value, stored[:32] or KEY)


def test_secret_file_bad_base64(tmp_path: Path) -> None:
    stored = base64.b64encode(KEY)[:-3] + b"*!"
    (tmp_path / f"{SECRET_UUID}.base64").write_bytes(stored)
    with pytest.raises(UsageError, match="not valid base64") as ei:
        keys.load_libvirt_secret_file(SECRET_UUID, str(tmp_path))
    assert_no_leak(ei.value, stored[:32])
    assert stored[:20].decode() not in str(ei.value)
    # The cause is kept (a traceback shows it): it must not leak either.
    assert ei.value.__cause__ is not None
    assert_no_leak(ei.value.__cause__, stored[:32])
    assert stored[:20].decode() not in str(ei.value.__cause__)


BAD_UUIDS = [
    "",
    "not-a-uuid",
    SECRET_UUID.replace("-", ""),
    "{" + SECRET_UUID + "}",
    "urn:uuid:" + SECRET_UUID,
    SECRET_UUID + "\n",
    "../../etc/passwd",
    SECRET_UUID[:-1] + "g",
]


@pytest.mark.parametrize("bad", BAD_UUIDS)
def test_secret_file_bad_uuid(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError, match="invalid secret UUID"):
        keys.load_libvirt_secret_file(bad, str(tmp_path))


# -- libvirt secret through the API ---------------------------------------------------


SECRET_XML = (
    "<secret ephemeral='no' private='no'><usage type='volume'><volume>/x</volume></usage></secret>"
)


def test_libvirt_secret_test_driver() -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        try:
            secret = conn.secretDefineXML(SECRET_XML)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                pytest.skip(
                    "libvirt's test:///default driver has no secret driver "
                    f"(virsh -c test:///default secret-define fails too): {e}"
                )
            raise
        secret.setValue(KEY)
        # test:///default is one shared instance per process while a
        # connection to it is open, so the loader's own connection sees it.
        k = secrets.load_libvirt_secret(secret.UUIDString(), "test:///default")
        assert k.key_id == Kek(KEY).key_id
        assert k.label == f"libvirt-secret:{secret.UUIDString()}"
    finally:
        conn.close()


def test_libvirt_secret_real_connection_failure() -> None:
    pytest.importorskip("libvirt")
    with pytest.raises(ExternalError, match="cannot connect to libvirt at test:///"):
        secrets.load_libvirt_secret(SECRET_UUID, "test:///no/such/config.xml")


def test_libvirt_secret_real_test_driver_lookup() -> None:
    pytest.importorskip("libvirt")
    # The test driver either has no such secret or no secret support at all;
    # either way the libvirt error is mapped, never leaked as libvirtError.
    with pytest.raises((NotFoundError, ExternalError)) as ei:
        secrets.load_libvirt_secret(SECRET_UUID, "test:///default")
    assert SECRET_UUID in str(ei.value)


class FakeLibvirtError(Exception):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return str(self)


VIR_ERR_NO_SUPPORT = 3
VIR_ERR_OPERATION_DENIED = 55
VIR_ERR_NO_SECRET = 66


class FakeSecret:
    def __init__(self, value: bytes | Exception) -> None:
        self._value = value

    def value(self) -> bytes:
        if isinstance(self._value, Exception):
            raise self._value
        return self._value


class FakeConn:
    def __init__(self, secrets: dict[str, FakeSecret]) -> None:
        self.secrets = secrets
        self.closed = False

    def secretLookupByUUIDString(self, u: str) -> FakeSecret:  # noqa: N802 (libvirt's name)
        if u not in self.secrets:
            raise FakeLibvirtError(f"Secret not found: no secret with matching uuid '{u}'", 66)
        return self.secrets[u]

    def close(self) -> int:
        self.closed = True
        return 0


@pytest.fixture
def fake_libvirt(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    def install(
        secrets: dict[str, FakeSecret] | None = None, open_error: Exception | None = None
    ) -> types.SimpleNamespace:
        state = types.SimpleNamespace(uris=[], conns=[])

        def open_(uri: str | None) -> FakeConn:
            state.uris.append(uri)
            if open_error is not None:
                raise open_error
            conn = FakeConn(secrets or {})
            state.conns.append(conn)
            return conn

        mod = types.ModuleType("libvirt")
        mod.open = open_  # type: ignore[attr-defined]
        mod.libvirtError = FakeLibvirtError  # type: ignore[attr-defined]
        mod.VIR_ERR_NO_SECRET = VIR_ERR_NO_SECRET  # type: ignore[attr-defined]
        mod.VIR_ERR_NO_SUPPORT = VIR_ERR_NO_SUPPORT  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "libvirt", mod)
        return state

    return install


@pytest.mark.parametrize("value", [KEY, KEY_HEX.encode(), KEY_HEX.encode() + b"\n"])
def test_libvirt_secret_loaded(fake_libvirt: Callable[..., Any], value: bytes) -> None:
    state = fake_libvirt({SECRET_UUID: FakeSecret(value)})
    k = secrets.load_libvirt_secret(SECRET_UUID.upper(), "qemu:///system")
    assert k.key_id == Kek(KEY).key_id
    assert k.label == f"libvirt-secret:{SECRET_UUID}"
    assert state.uris == ["qemu:///system"]
    assert state.conns[0].closed


def test_libvirt_secret_default_uri(fake_libvirt: Callable[..., Any]) -> None:
    state = fake_libvirt({SECRET_UUID: FakeSecret(KEY)})
    secrets.load_libvirt_secret(SECRET_UUID)
    assert state.uris == [None]


def test_libvirt_secret_no_such_secret(fake_libvirt: Callable[..., Any]) -> None:
    state = fake_libvirt({})
    with pytest.raises(NotFoundError) as ei:
        secrets.load_libvirt_secret(SECRET_UUID)
    assert SECRET_UUID in str(ei.value)
    assert isinstance(ei.value.__cause__, FakeLibvirtError)  # the cause is kept
    assert state.conns[0].closed


def test_libvirt_secret_no_value(fake_libvirt: Callable[..., Any]) -> None:
    err = FakeLibvirtError(f"secret '{SECRET_UUID}' does not have a value", VIR_ERR_NO_SECRET)
    fake_libvirt({SECRET_UUID: FakeSecret(err)})
    with pytest.raises(NotFoundError, match="does not have a value"):
        secrets.load_libvirt_secret(SECRET_UUID)


def test_libvirt_secret_denied(fake_libvirt: Callable[..., Any]) -> None:
    err = FakeLibvirtError("operation forbidden: secret is private", VIR_ERR_OPERATION_DENIED)
    state = fake_libvirt({SECRET_UUID: FakeSecret(err)})
    with pytest.raises(ExternalError) as ei:
        secrets.load_libvirt_secret(SECRET_UUID)
    assert "secret is private" in str(ei.value)
    assert state.conns[0].closed


def test_libvirt_secret_connect_failure(fake_libvirt: Callable[..., Any]) -> None:
    fake_libvirt(open_error=FakeLibvirtError("Failed to connect socket", 38))
    with pytest.raises(ExternalError, match="cannot connect to libvirt at qemu:///system"):
        secrets.load_libvirt_secret(SECRET_UUID, "qemu:///system")


@pytest.mark.parametrize("value", list(BAD_CONTENTS.values()), ids=list(BAD_CONTENTS))
def test_libvirt_secret_bad_value(fake_libvirt: Callable[..., Any], value: bytes) -> None:
    fake_libvirt({SECRET_UUID: FakeSecret(value)})
    with pytest.raises(UsageError) as ei:
        secrets.load_libvirt_secret(SECRET_UUID)
    assert ei.value.message == (
        f"libvirt secret {SECRET_UUID} must hold 32 bytes raw or 64 hex digits"
    )
    assert_no_leak(ei.value, value[:32] if value else KEY)


@pytest.mark.parametrize("bad", BAD_UUIDS)
def test_libvirt_secret_bad_uuid_checked_first(fake_libvirt: Callable[..., Any], bad: str) -> None:
    state = fake_libvirt({})
    with pytest.raises(UsageError, match="invalid secret UUID"):
        secrets.load_libvirt_secret(bad)
    assert state.uris == []


def test_libvirt_module_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)
    with pytest.raises(ExternalError, match="libvirt Python module is missing"):
        secrets.load_libvirt_secret(SECRET_UUID)
