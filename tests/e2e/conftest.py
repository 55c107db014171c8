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

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.ceph_cluster import CephCluster, skip_without_ceph

from . import vmlib

MakeVM = Callable[..., vmlib.VM]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


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
    # One end-to-end session at a time on a machine: each installs the hook of
    # its own checkout into the one system libvirtd.  A second session (another
    # checkout, a bench) waits here for the first to finish.
    with open("/run/lock/nvmgr-e2e.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        vmlib.E2E_LOCK_FD = lock.fileno()  # handed to scripts/demo (tests/e2e/test_demo.py)
        vmlib.ensure_services()
        work = tmp_path_factory.mktemp("e2e")
        vmlib.ensure_hook(work)
        # The hook as a host with nvmgr-hook.service runs it: calls go to the hook
        # server (tests/test_hook_server.py tests the hook without one, and the
        # migration harness's hosts, in their own namespaces, run their calls themselves).
        vmlib.start_hook_server()
        # nvmgr's commands as a host with nvmgr-cli.service runs them: vmlib.nvmgr asks
        # the CLI server (tests/test_cli_server.py tests it against commands run alone,
        # and the tests that run `python -m nvmgr` themselves run them alone).
        vmlib.start_cli_server()
        try:
            yield work
        finally:
            vmlib.stop_cli_server()
            vmlib.stop_hook_server()


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


@pytest.fixture(scope="module")
def ceph() -> Iterator[CephCluster]:
    """A single-node Ceph cluster on 127.0.0.1 for the module (``tests/ceph_cluster.py``);
    skipped, with the reason, without root or Ceph's packages."""
    skip_without_ceph()
    # Not under pytest's 0700 temp root: QEMU (libvirt-qemu) reads the conf.
    root = Path(tempfile.mkdtemp(prefix="nvmgr-ceph-e2e-", dir="/var/tmp"))
    with CephCluster(root) as c:
        yield c
