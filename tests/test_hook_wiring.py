"""The prepare hook never starts a domain that asks for nvmgr on libvirt's own nvram.

A domain defined by another tool (``virsh define``, virt-manager, a ``virsh
edit`` that dropped nvmgr's arguments) carries ``<nvmgr:nvram>`` metadata but
not the wiring ``nvmgr define`` / ``nvmgr reconcile`` writes.  The hook
refuses its start with exit 12, naming the domain and the command that wires
it, and writes nothing; the other hook calls leave it alone.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from nvmgr.domain import qemuargs
from nvmgr.domain.elements import parse_domain
from nvmgr.domain.plan import plan_domain
from nvmgr.errors import ExitCode
from nvmgr.hook import entry as hook

pytestmark = pytest.mark.usefixtures("host_independent")

NAME = "wiring-vm"
ASKS = """<domain type='qemu'>
  <name>wiring-vm</name>
  <uuid>6a1f3c2e-8d4b-4e5f-9a0b-1c2d3e4f5a6b</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr="https://nvmgr.dev/schemas/metadata/1"{image}/>
  </metadata>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/wiring-vm_VARS.fd</nvram>
  </os>
  <devices>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"""


def run_hook(xml: str, op: str, sub: str, tmp_path: Path) -> tuple[int, str]:
    err = io.StringIO()
    code = hook.main(["qemu", NAME, op, sub, "-"], io.BytesIO(xml.encode()), io.StringIO(),
                     err, log_file=str(tmp_path / "hook.log"))
    return code, err.getvalue()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.name != "hook.log"}


def test_metadata_alone_is_refused_at_prepare_naming_the_command(tmp_path: Path) -> None:
    before = files_under(tmp_path)
    code, err = run_hook(ASKS.format(image=""), "prepare", "begin", tmp_path)
    assert code == ExitCode.NOT_WIRED == 12
    assert f"domain {NAME}" in err and f"nvmgr reconcile {NAME}" in err
    assert "names no image" in err
    assert files_under(tmp_path) == before
    assert "refused" in (tmp_path / "hook.log").read_text()


@pytest.mark.parametrize("op,sub", [("started", "begin"), ("release", "end"),
                                    ("reconnect", "begin")])
def test_other_calls_leave_an_unwired_domain_alone(op: str, sub: str, tmp_path: Path) -> None:
    assert run_hook(ASKS.format(image=""), op, sub, tmp_path) == (0, "")


def test_an_image_named_without_the_arguments_is_refused_before_anything_is_made(
        tmp_path: Path) -> None:
    image = tmp_path / "vm.nvram"
    code, err = run_hook(ASKS.format(image=f" image='{image}'"), "prepare", "begin", tmp_path)
    assert code == 12, err
    assert "<qemu:commandline> lacks" in err and "pflash1=nvmgr-uefi-vars" in err
    assert "is not stateless='yes'" in err and "<nvram> element" in err
    assert not image.exists()


def test_a_wired_domain_passes_the_wiring_check(tmp_path: Path) -> None:
    """The same domain after nvmgr's rewrite gets past the check (and so starts)."""
    image = tmp_path / "vm.nvram"
    xml = ASKS.format(image=f" image='{image}'")
    p = plan_domain(xml)
    wired = qemuargs.rewrite_domain(xml, p, str(image), "raw",
                                    "11111111-2222-3333-4444-555555555555")
    assert qemuargs.wiring_problems(parse_domain(wired), plan_domain(wired)) == []
