"""Shared fixtures: a key file, running the CLI as a user would, golden files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# No command a test runs is handed to a CLI server by accident (one of this
# host's nvmgr-cli.service, say): the tests that want one name its socket
# (tests/test_cli_server.py, the end-to-end tests through vmlib.start_cli_server).
os.environ["NVMGR_CLI_SOCKET"] = ""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-output", action="store_true", default=False,
                     help="rewrite golden *-out files from the current code")


@pytest.fixture
def regenerate(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate-output"))


Golden = Callable[[Path, str], None]


@pytest.fixture
def golden(regenerate: bool) -> Golden:
    """``golden(path, text)``: *text* must equal the golden file (rewritten with
    ``--regenerate-output``)."""

    def check(path: Path, text: str) -> None:
        if regenerate:
            path.write_text(text)
        assert path.exists(), f"{path.name} missing: run pytest --regenerate-output"
        assert path.read_text() == text, (
            f"{path.name} differs (pytest --regenerate-output to accept)")

    return check


@pytest.fixture
def host_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans must not depend on which firmware files this host has installed."""
    from nvmgr.domain import profiles

    monkeypatch.setattr(profiles, "_image_size", lambda path: None)
    monkeypatch.setattr(profiles, "FIRMWARE_DIRS", (str(ROOT / "tests" / "data" / "firmware"),))


def make_key(path: Path, *, hex_form: bool = False) -> Path:
    key = os.urandom(32)
    path.write_bytes(key.hex().encode() + b"\n" if hex_form else key)
    path.chmod(0o600)
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return make_key(tmp_path / "kek.key")


@pytest.fixture
def key_file2(tmp_path: Path) -> Path:
    return make_key(tmp_path / "kek2.key", hex_form=True)


RunCli = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture
def nvmgr() -> RunCli:
    """Run ``nvmgr ARGS...`` in a subprocess; returns the CompletedProcess (bytes)."""

    def run(*args: str | os.PathLike[str], input: bytes | None = None,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "nvmgr", *map(str, args)],
                              input=input, capture_output=True, cwd=cwd, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    return run


@pytest.fixture(autouse=True)
def _volatile_dirs_removed() -> Iterator[None]:
    """The tmpfs directories a test's hook domains used as their runtime root
    (tests/hookdom.py: volatile_dir) go when the test ends."""
    yield
    module = sys.modules.get("hookdom")  # the tests import it as "hookdom"
    if module is not None:
        module.remove_volatile_dirs()


@pytest.fixture(autouse=True)
def _vtpm_records_in_tmp(tmp_path_factory: pytest.TempPathFactory,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of vTPM secrets given to libvirt (test:///default here) go to a
    directory of the test, never /run/nvmgr."""
    from nvmgr.provision import vtpm

    monkeypatch.setattr(vtpm, "RECORDS_ROOT", str(tmp_path_factory.mktemp("run")))


class _FakeSecret:
    """A libvirt secret as libvirt's secret API shows it (test:///default has no
    secret driver on libvirt 9.0: ``virsh -c test:///default secret-define`` fails)."""

    def __init__(self, store: dict[str, _FakeSecret], xml: str) -> None:
        from lxml import etree

        root = etree.fromstring(xml.encode())
        self.store, self.xml = store, xml
        self.uuid = root.findtext("uuid")
        self.ephemeral = root.get("ephemeral") == "yes"
        self.private = root.get("private") == "yes"
        self.usage = (root.find("usage").get("type"), root.findtext("usage/name"))
        self._value: bytes | None = None

    def UUIDString(self) -> str:  # noqa: N802 - libvirt's name
        return str(self.uuid)

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return self.xml

    def setValue(self, value: bytes, flags: int = 0) -> None:  # noqa: N802
        self._value = bytes(value)

    def value(self, flags: int = 0) -> bytes:
        if self.private or self._value is None:
            raise _libvirt_error("secret is private", 66)
        return self._value

    def undefine(self) -> None:
        del self.store[str(self.uuid)]


def _libvirt_error(message: str, code: int) -> Exception:
    import libvirt

    e = libvirt.libvirtError(message)
    e.err = (code, 0, message, 0, "", None, None, 0, 0)
    return e


class _SecretsConn:
    """A test:///default connection with libvirt's secret API on top (in memory)."""

    def __init__(self, conn: object, store: dict[str, _FakeSecret]) -> None:
        self._conn, self._store = conn, store

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)

    def secretLookupByUUIDString(self, u: str) -> _FakeSecret:  # noqa: N802
        import libvirt

        if u not in self._store:
            raise _libvirt_error(f"no secret with matching uuid '{u}'", libvirt.VIR_ERR_NO_SECRET)
        return self._store[u]

    def secretDefineXML(self, xml: str, flags: int = 0) -> _FakeSecret:  # noqa: N802
        s = _FakeSecret(self._store, xml)
        if any(o.usage == s.usage and o.uuid != s.uuid for o in self._store.values()):
            raise _libvirt_error(f"a secret with usage {s.usage} exists", 1)
        self._store[str(s.uuid)] = s
        return s

    def listAllSecrets(self, flags: int = 0) -> list[_FakeSecret]:  # noqa: N802
        return list(self._store.values())


@pytest.fixture
def libvirt_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, _FakeSecret]:
    """Connections to test:///default get libvirt's secret API (held in the returned dict)."""
    import contextlib

    from nvmgr.virt import conn as virt

    store: dict[str, _FakeSecret] = {}
    real = virt.connect

    @contextlib.contextmanager
    def connect(uri: str | None = None, *, readonly: bool = False):  # type: ignore[no-untyped-def]
        with real(uri, readonly=readonly) as c:
            yield _SecretsConn(c, store) if uri == "test:///default" else c

    monkeypatch.setattr(virt, "connect", connect)
    return store
