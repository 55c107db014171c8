"""The package as a user gets it: built, installed in a fresh venv, used there.

The checkout's files that git would commit (tracked plus untracked, not
ignored, as they are in the work tree now) are copied to a temporary
directory, built into a source distribution and from that into a wheel (as
``python -m build`` does), and the wheel is installed into a new venv. The
tests then run that venv's ``nvmgr`` from a temporary directory: nothing of
the checkout is on its ``sys.path``.

Offline and fast: the build uses this interpreter's setuptools without
build isolation; the venv is made without pip (this interpreter's pip
installs into it with ``--python``); nvmgr's dependencies are not installed
again but found where this interpreter has them, through one ``.pth`` file
in the new venv naming those directories (the same Python, so the same
ABI). Those directories hold no nvmgr (an editable install's finder there
is never activated: a path line in a ``.pth`` file runs none of the
directory's own ``.pth`` files), which a test checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import nvmgr

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

#: Modules nvmgr imports at run time from outside the standard library
#: (libvirt-python too: define and friends; pyasn1 for dump --asn1).
DEPENDENCIES = ("lxml", "cryptography", "pyasn1", "libvirt", "cffi", "_cffi_backend")

#: What the wheel must carry inside the package, and the checkout's original.
SHIPPED = {
    "nvmgr/data/nvmgr.asn1": "schemas/nvmgr.asn1",
    "nvmgr/data/nvmgr-metadata.rng": "schemas/nvmgr-metadata.rng",
    "nvmgr/data/hook-qemu": "hooks/qemu",
    "nvmgr/data/nvmgr.1": "nvmgr/data/nvmgr.1",
    "nvmgr/data/nvmgr.bash": "nvmgr/data/nvmgr.bash",
    "nvmgr/data/nvmgr-watch.service": "nvmgr/data/nvmgr-watch.service",
    "nvmgr/py.typed": "nvmgr/py.typed",
}

#: Installed outside the package, relative to the venv (the prefix).
DATA_FILES = {
    "share/man/man1/nvmgr.1": "nvmgr/data/nvmgr.1",
    "share/bash-completion/completions/nvmgr.bash": "nvmgr/data/nvmgr.bash",
}

_BUILD = """
import sys
from setuptools import build_meta
kind, out = sys.argv[1:]
print((build_meta.build_sdist if kind == "sdist" else build_meta.build_wheel)(out))
"""


@dataclass
class Installed:
    base: Path
    venv: Path
    wheel: Path
    site: Path  # the venv's site-packages, where the wheel went
    cwd: Path  # an empty directory to run in
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def nvmgr(self) -> Path:
        return self.venv / "bin" / "nvmgr"

    def run(self, *args: str | os.PathLike[str], input: bytes | None = None,
            wrap: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*(wrap or []), *map(str, args)], input=input,
                              capture_output=True, cwd=self.cwd, env=self.env,
                              timeout=120, check=False)


def _clean_env() -> dict[str, str]:
    """This environment without anything that steers Python or pip."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _copy_checkout(dest: Path) -> None:
    """The files git would commit, as they are in the work tree (links as links)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True, check=True)
    for name in sorted(set(r.stdout.decode().split("\0")) - {""}):
        src, dst = ROOT / name, dest / name
        if not src.is_symlink() and not src.exists():
            continue  # deleted in the work tree, not yet in git
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)


def _build(kind: str, src: Path, out: Path, env: dict[str, str]) -> Path:
    r = subprocess.run([sys.executable, "-c", _BUILD, kind, str(out)], cwd=src, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, (
        f"building the {kind} failed (tests need setuptools>=70.1: pip install -e '.[test]')\n"
        f"{r.stdout}\n{r.stderr}")
    return out / r.stdout.strip().splitlines()[-1]


def _import_root(name: str) -> Path | None:
    """The sys.path directory module *name* is imported from, if it is importable."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent.parent if spec.submodule_search_locations else origin.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    env = _clean_env()
    src, dist = base / "src", base / "dist"
    dist.mkdir()
    _copy_checkout(src)
    sdist = _build("sdist", src, dist, env)
    unpacked = base / "sdist"
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(unpacked, filter="data")
        else:  # Pythons before the extraction filters (3.11.2): our own archive
            tar.extractall(unpacked)
    wheel = _build("wheel", unpacked / sdist.name.removesuffix(".tar.gz"), dist, env)

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   env=env, timeout=120)
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, env=env).stdout.strip())
    roots = dict.fromkeys(r for r in map(_import_root, DEPENDENCIES) if r is not None)
    (site / "nvmgr-test-dependencies.pth").write_text("".join(f"{r}\n" for r in roots))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                        "install", "--no-deps", "--no-index", "--no-cache-dir", str(wheel)],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    cwd = base / "cwd"
    cwd.mkdir()
    return Installed(base, venv, wheel, site, cwd, env)


def test_the_wheel_carries_the_data_files_and_no_links(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        for inside, original in SHIPPED.items():
            assert inside in names, f"{inside} is not in the wheel"
            info = z.getinfo(inside)
            assert (info.external_attr >> 16) & 0o170000 != 0o120000, f"{inside} is a link"
            assert z.read(inside) == (ROOT / original).read_bytes(), inside
        data = f"nvmgr-{nvmgr.__version__}.data/data/"
        for path, original in DATA_FILES.items():
            assert z.read(data + path) == (ROOT / original).read_bytes(), path
        info = f"nvmgr-{nvmgr.__version__}.dist-info/"
        assert any(n.startswith(info) and n.endswith("LICENSE") for n in names)
        meta = z.read(info + "METADATA").decode()
    assert {n.split("/")[0] for n in names} == {
        "nvmgr", f"nvmgr-{nvmgr.__version__}.dist-info", f"nvmgr-{nvmgr.__version__}.data"}
    assert "License: GPL-2.0-or-later" in meta
    assert "Requires-Dist: pyasn1<0.7" in meta


def test_the_installed_nvmgr_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    r = installed.run(installed.python, "-c",
                      "import importlib.metadata as m, json, sys, nvmgr, nvmgr.resources as res;"
                      "print(json.dumps([nvmgr.__file__, sys.path, m.version('nvmgr'),"
                      " str(res.data_path(res.METADATA_SCHEMA))]))")
    assert r.returncode == 0, r.stderr
    where, path, version, schema = json.loads(r.stdout)
    assert Path(where).is_relative_to(installed.site)
    assert Path(schema) == installed.site / "nvmgr" / "data" / "nvmgr-metadata.rng"
    assert version == nvmgr.__version__
    for entry in path:
        p = Path(entry or installed.cwd)
        assert p == installed.site or not (p / "nvmgr").exists(), f"{entry} holds an nvmgr"
    for path, original in DATA_FILES.items():
        assert (installed.venv / path).read_bytes() == (ROOT / original).read_bytes()


def test_plan_a_domain_with_nvmgr_metadata(installed: Installed) -> None:
    xml = installed.cwd / "stateless.xml"
    shutil.copy(DATA / "stateless-in.xml", xml)
    r = installed.run(installed.nvmgr, "plan", xml, "--output", "json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == (DATA / "stateless-plan.json").read_text()
    r = installed.run(installed.nvmgr, "--version")
    assert r.stdout.decode().split() == ["nvmgr", nvmgr.__version__]


def test_the_installed_cli_server_runs_the_installed_commands(installed: Installed) -> None:
    """The wheel's own ``nvmgr cli-server`` (its imports and data files found in the
    venv, nothing of the checkout) takes the wheel's ``nvmgr`` command lines."""
    sock = installed.base / "cli.sock"
    log = installed.base / "cli-server.log"
    env = {**installed.env, "NVMGR_CLI_SOCKET": str(sock)}
    with open(log, "wb") as out:
        server = subprocess.Popen([installed.nvmgr, "cli-server", "--socket", sock],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=installed.cwd,
                                  env=env)
    try:
        deadline = time.monotonic() + 60
        while b"listening" not in log.read_bytes():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        xml = installed.cwd / "served.xml"
        shutil.copy(DATA / "stateless-in.xml", xml)
        r = subprocess.run([installed.nvmgr, "plan", xml, "--output", "json"], env=env,
                           cwd=installed.cwd, capture_output=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == (DATA / "stateless-plan.json").read_text()
        deadline = time.monotonic() + 10
        while b"plan: exit 0" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert b"fallback" not in log.read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _namespace_wrapper(installed: Installed) -> tuple[list[str], Path | None]:
    """A command prefix that runs the hook with a private /var/log (bound to a
    temporary directory, returned), so that the host's hook log stays as it
    is; none where mount namespaces are not to be had."""
    unshare = shutil.which("unshare")
    logs = installed.base / "var-log"
    logs.mkdir(exist_ok=True)
    if os.geteuid() != 0 or unshare is None:
        return [], None  # no right to write /var/log: the hook logs to stderr instead
    wrap = [unshare, "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{logs}" /var/log && exec "$0" "$@"']
    probe = subprocess.run([*wrap, "true"], capture_output=True, check=False)
    return (wrap, logs) if probe.returncode == 0 else ([], None)


def _domain(installed: Installed, image: Path) -> bytes:
    """A domain with nvmgr metadata, its image under the test's directory."""
    xml = (DATA / "stateless-in.xml").read_text()
    xml = xml.replace("<name>stateless</name>", "<name>nvmgr-wheel-test</name>")
    xml = xml.replace("format='qcow2' image='/srv/images/stateless.qcow2'",
                      f"format='raw' image='{image}'")
    assert str(image) in xml
    return xml.encode()


def test_install_hook_and_run_the_installed_hook(installed: Installed) -> None:
    hook_dir = installed.base / "hooks"
    r = installed.run(installed.nvmgr, "install-hook", "--hook-dir", hook_dir, "-O", "json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    hook = hook_dir / "nvmgr"
    assert result["hook"] == str(hook)
    assert Path(result["nvmgr"]).is_relative_to(installed.site)
    assert os.stat(hook).st_mode & 0o777 == 0o755
    text = hook.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f"PYTHON={installed.venv}/bin/python" in text  # this venv's interpreter
    nvmgr_path = next(ln for ln in text.splitlines() if ln.startswith("NVMGR_PATH="))
    assert nvmgr_path.split("=", 1)[1].strip("'").split(":")[0] == str(installed.site)
    assert "from nvmgr.hook.entry import main" in text

    wrap, logs = _namespace_wrapper(installed)

    # Not nvmgr's domain: answered by the sh front end alone.
    r = installed.run(hook, "other", "prepare", "begin", "-",
                      input=b"<domain type='kvm'><name>other</name></domain>", wrap=wrap)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    # A document type declaration always goes to Python, which refuses it.
    hostile = (b"<!DOCTYPE domain [<!ENTITY x 'y'>]>"
               b"<domain type='kvm'><name>evil</name>&x;</domain>")
    r = installed.run(hook, "evil", "prepare", "begin", "-", input=hostile, wrap=wrap)
    assert r.returncode == 9, r.stderr
    assert b"DOCTYPE" in r.stderr
    if logs is not None:
        assert "evil prepare begin: refused" in (logs / "nvmgr" / "hook.log").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="prepare hands the image to the QEMU user (root)")
def test_the_installed_hook_prepares_and_refuses_an_image(installed: Installed) -> None:
    hook = installed.base / "hooks" / "nvmgr"
    if not hook.exists():
        r = installed.run(installed.nvmgr, "install-hook", "--hook-dir", hook.parent)
        assert r.returncode == 0, r.stderr
    wrap, logs = _namespace_wrapper(installed)
    image = installed.base / "images" / "vm.nvram"
    image.parent.mkdir()
    xml = _domain(installed, image)

    r = installed.run(hook, "nvmgr-wheel-test", "prepare", "begin", "-", input=xml, wrap=wrap)
    assert r.returncode == 0, r.stderr
    r = installed.run(installed.nvmgr, "list", image, "-O", "json")
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads(r.stdout)["sections"]] == ["fru"]
    r = installed.run(hook, "nvmgr-wheel-test", "release", "end", "-", input=xml, wrap=wrap)
    assert r.returncode == 0, r.stderr

    # Both header copies gone under junk (all zeros of exactly the planned size would be
    # the remains of a creation cut short, which prepare makes again).
    image.write_bytes(b"\x5a" * image.stat().st_size)
    r = installed.run(hook, "nvmgr-wheel-test", "prepare", "begin", "-", input=xml, wrap=wrap)
    assert r.returncode == 4, r.stderr
    assert b"not an nvmgr image" in r.stderr
    if logs is not None:
        log = (logs / "nvmgr" / "hook.log").read_text()
        assert "nvmgr-wheel-test prepare begin: verified 1 section(s)" in log
        assert "nvmgr-wheel-test prepare begin: refused" in log


@pytest.mark.parametrize(("missing", "command"), [
    ("nvmgr-metadata.rng", ["plan", "{xml}"]),
    ("hook-qemu", ["install-hook", "--hook-dir", "{hooks}"]),
])
def test_a_missing_data_file_is_an_installation_error(
        installed: Installed, missing: str, command: list[str]) -> None:
    xml = installed.cwd / "stateless.xml"
    shutil.copy(DATA / "stateless-in.xml", xml)
    hooks = installed.base / f"hooks-without-{missing}"
    path = installed.site / "nvmgr" / "data" / missing
    saved = path.read_bytes()
    path.unlink()
    try:
        args = [a.format(xml=xml, hooks=hooks) for a in command]
        r = installed.run(installed.nvmgr, *args)
    finally:
        path.write_bytes(saved)
    assert r.returncode == 11, r.stderr
    err = r.stderr.decode()
    assert f"nvmgr is installed without {missing}" in err and "reinstall nvmgr" in err
    assert "Traceback" not in err
    assert not (hooks / "nvmgr").exists()
