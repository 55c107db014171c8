"""End-to-end harness: a real libvirtd (with virtlogd), QEMU under TCG, swtpm and OVMF.

The session fixture starts the services where none runs (``scripts/services``),
installs the nvmgr hook (restarting libvirtd once when the hook directory was
empty, since libvirtd looks for hooks only when it starts) and proves the
hook is live with a probe domain.  The ``vm`` fixture hands out domains with
unique names (``nvmgr-e2e-<what>-<random>``) and UUIDs, and removes each one
after the test, failed or not: destroyed, undefined, image, swtpm and runtime
directories, logs and sockets deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import vmlib

MakeVM = Callable[..., vmlib.VM]

_PROBE_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1' image='{image}'/>
  </metadata>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
</domain>
"""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def _hook_is_live(workdir: Path) -> bool:
    """Start a probe domain whose nvmgr image is not an image: only a live hook refuses it."""
    import uuid

    name = vmlib.new_name("probe")
    dom_uuid = str(uuid.uuid4())
    image = workdir / "probe-foreign.img"
    image.write_bytes(bytes(256 << 10))
    xml = workdir / "probe.xml"
    xml.write_text(_PROBE_XML.format(name=name, uuid=dom_uuid, image=image))
    try:
        vmlib.virsh("define", str(xml))
        p = vmlib.start(name, check=False)
        if p.returncode == 0:
            return False  # started: libvirtd ran no nvmgr hook
        if "nvmgr" not in p.stderr:
            raise vmlib.Failed(f"the probe domain failed to start for another reason: {p.stderr}")
        return True
    finally:
        vmlib.cleanup_domain(name, dom_uuid, [image])


@pytest.fixture(scope="session")
def e2e_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests drive the system libvirtd: run them as root")
    for tool in ("virsh", "libvirtd", "qemu-system-x86_64", "swtpm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    if shutil.which("tpm2_readpublic") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "tpm2-tools"], check=True,
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    vmlib.ensure_services()
    vmlib.install_hook()
    work = tmp_path_factory.mktemp("e2e")
    if not _hook_is_live(work):
        vmlib.restart_libvirtd()  # installed while libvirtd ran with hooks it had found before
        if not _hook_is_live(work):
            raise vmlib.Failed("libvirtd does not run the nvmgr hook even after a restart")
    yield work


@pytest.fixture
def vm(e2e_env: Path, tmp_path: Path) -> Iterator[MakeVM]:
    """``vm(what, **xml_options)`` -> a :class:`vmlib.VM`, removed after the test."""
    made: list[vmlib.VM] = []

    def make(what: str, **xml_options: object) -> vmlib.VM:
        v = vmlib.VM(what, tmp_path, **xml_options)
        made.append(v)
        return v

    yield make
    problems = []
    for v in made:
        problems += v.cleanup()
    assert not problems, problems
