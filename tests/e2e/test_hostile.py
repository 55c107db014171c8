"""6. Hostile domain XML is refused (exit 9, a message saying why) and nothing is written:
no image, no domain, no staged files; the hook refuses the same input on its stdin."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from . import vmlib

pytestmark = pytest.mark.e2e

NS = "xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1'"


def _domain(name: str, *, metadata: str = "", prolog: str = "", name_text: str | None = None) -> str:
    """A UEFI + TPM domain that asks for nvmgr (its metadata has an ``<nvmgr:nvram>``)."""
    if "nvmgr:nvram" not in metadata:
        metadata += f"<nvmgr:nvram {NS}/>"
    return f"""{prolog}<domain type='qemu'>
  <name>{name_text if name_text is not None else name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>64</memory>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>
  </os>
  <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices>
</domain>
"""


LAUGHS = "<!DOCTYPE domain [<!ENTITY a 'lol'>" + "".join(
    f"<!ENTITY {chr(98 + i)} '{('&' + chr(97 + i) + ';') * 10}'>" for i in range(9)) + "]>\n"

CASES = {
    # what: (domain XML for a name, words the message must contain)
    "billion-laughs": (lambda n: _domain(n, prolog=LAUGHS, name_text=f"{n}&j;"),
                       ["<!DOCTYPE> is not allowed"]),
    "external-entity": (lambda n: _domain(
        n, prolog="<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>\n",
        name_text=f"{n}&x;"), ["<!DOCTYPE> is not allowed"]),
    "parameter-entity": (lambda n: _domain(
        n, prolog="<!DOCTYPE domain [<!ENTITY % p SYSTEM 'http://127.0.0.1:9/x.dtd'> %p;]>\n"),
        ["not allowed"]),
    "absurd-size": (lambda n: _domain(
        n, metadata=f"<nvmgr:nvram {NS}><nvmgr:section name='big' size='99999T'/></nvmgr:nvram>"),
        ["section big", "99999T", "larger than"]),
    "absurd-total": (lambda n: _domain(
        n, metadata=f"<nvmgr:nvram {NS}>" + "".join(
            f"<nvmgr:section name='s{i}' size='1T'/>" for i in range(100)) + "</nvmgr:nvram>"),
        ["total", "limit"]),
    "name-with-slash": (lambda n: _domain(n, name_text=f"../../etc/{n}"),
                        ["domain name", "without '/'"]),
    "name-dotdot": (lambda n: _domain(n, name_text=".."), ["domain name", "'..'"]),
    "section-name-slash": (lambda n: _domain(
        n, metadata=f"<nvmgr:nvram {NS}><nvmgr:section name='../../x' size='4K'/></nvmgr:nvram>"),
        ["../../x"]),
    "image-path-dotdot": (lambda n: _domain(
        n, metadata=f"<nvmgr:nvram {NS} image='/var/lib/libvirt/nvmgr/../../../../tmp/{n}'/>"),
        ["image=", "without '..'"]),
    "deep-nesting": (lambda n: _domain(n, metadata="<x>" * 100 + "</x>" * 100),
                     ["nest deeper than"]),
    "huge-input": (lambda n: _domain(n, metadata="<!--" + "x" * (2 << 20) + "-->"),
                   ["larger than the"]),
    "not-utf8": (lambda n: "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + _domain(n),
                 ["only UTF-8"]),
}


def _snapshot() -> set[str]:
    out = set()
    for d in (vmlib.IMAGE_DIR, vmlib.SWTPM_ROOT, vmlib.RUNTIME_ROOT):
        if d.is_dir():
            out |= {str(p) for p in d.iterdir()}
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_xml_is_refused_and_nothing_is_written(e2e_env: Path, tmp_path: Path,
                                                      case: str) -> None:
    name = vmlib.new_name(f"hostile-{case}")
    make, words = CASES[case]
    xml = tmp_path / "hostile.xml"
    xml.write_text(make(name), encoding="utf-8")
    before = _snapshot()
    try:
        p = vmlib.nvmgr("define", xml, check=False)
        assert p.returncode == 9, (p.returncode, p.stdout, p.stderr)
        for w in words:
            assert w in p.stderr, (w, p.stderr)
        assert "root:" not in p.stdout + p.stderr  # /etc/passwd never read
        assert len(p.stderr) < 2000
        assert _snapshot() == before  # no image, no swtpm or runtime directory
        assert not vmlib.exists(name) and not vmlib.image_of(name).exists()
        assert not Path(f"/tmp/{name}").exists()  # where image-path-dotdot points

        # The hook, given the same XML on stdin as libvirtd gives it, refuses it too: the
        # checkout's hooks/qemu and the copy libvirtd runs (/etc/libvirt/hooks/qemu.d/nvmgr).
        for h in _hooks(name, "prepare", "begin", stdin=xml.read_bytes()):
            assert h.returncode == 9, (h.args, h.returncode, h.stdout, h.stderr)
            assert h.stderr.startswith("nvmgr: ") and h.stdout == ""
            for w in words:
                assert w in h.stderr, (w, h.stderr)
        assert _snapshot() == before
    finally:
        vmlib.cleanup_domain(name, None)
        for stray in (Path(f"/tmp/{name}"),):
            if stray.exists():
                os.unlink(stray)


def test_the_hook_leaves_domains_without_nvmgr_metadata_alone(e2e_env: Path) -> None:
    """Not nvmgr's business: another tool's deep metadata must not stop a plain domain."""
    name = vmlib.new_name("plain")
    xml = _domain(name, metadata="<x>" * 100 + "</x>" * 100).replace(f"<nvmgr:nvram {NS}/>", "")
    assert "nvmgr" not in xml.replace(name, "")
    for op in (("prepare", "begin"), ("started", "begin"), ("release", "end")):
        for h in _hooks(name, *op, stdin=xml.encode()):
            assert (h.returncode, h.stdout, h.stderr) == (0, "", ""), h


def _hooks(name: str, op: str, sub: str, *, stdin: bytes) -> list[subprocess.CompletedProcess[str]]:
    return [vmlib.run([hook, name, op, sub, "-"], input=stdin, check=False,
                      env={"NVMGR_PYTHON": sys.executable})
            for hook in (vmlib.ROOT / "hooks" / "qemu", vmlib.HOOK)]
