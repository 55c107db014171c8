#!/usr/bin/env python3
"""What ``nvmgr attach --live`` of a block section costs, beside libvirt's own hot-plug.

Part 1, on one running UEFI + TPM 2.0 guest (``examples/uefi-tpm.xml``, TCG,
defined by ``nvmgr define``, with spare PCIe root ports), ``--rounds`` times
(default 10), interleaved and the order alternating each round:

(a) ``nvmgr attach VM state<i>.xml --live``: a 1 MiB ``block`` section with a
    ``virtio-blk-pci`` device: the image grows beside the running QEMU (one
    crash-safe commit), the section is marked in use, QMP ``blockdev-add``
    of its raw slice and ``device_add`` through libvirt's monitor passthrough;
    with ``nvmgr cli-server`` running (as ``nvmgr-cli.service`` runs it; the
    bench starts one on a socket of its own), so the command's Python process
    hands the command line to a forked worker that has the imports done;
(a0) the same command without a CLI server (``NVMGR_CLI_SOCKET=``): the
    process imports lxml, cryptography and libvirt-python itself;
(b) ``virsh attach-device VM disk<i>.xml --live``: a plain 1 MiB raw disk
    file as a ``virtio`` ``<disk>``, libvirt's own hot-plug.

All are whole commands timed from fork to exit (``time.perf_counter``), the
order rotating each round; target: ``median(a) / median(b) < 2``.  Beside them, to show where (a)'s time
goes: ``nvmgr --version`` (the Python process and the CLI's imports) and (a')
the same attach as a library call in the warm bench process.  Nothing is detached (a guest at
OVMF's shell never releases a PCI device), so each attach takes a root port.

Part 2, in process: ``grow`` (open, add one 4 KiB section, commit, close) of
an image holding 1,024 sections, beside the same on an image of 4 sections,
``--grow-rounds`` times each (default 30), interleaved; plus the ``nvmgr
grow`` command on the 1,024-section image.

Needs root, libvirtd, QEMU, swtpm, OVMF and the nvmgr hook (``nvmgr
install-hook``); waits for the e2e lock (/run/lock/nvmgr-e2e.lock) so it never
runs beside an end-to-end session.  About two minutes.  Results are appended
to ``bench/RESULTS.md`` with the machine and the date (``--no-results``: not);
raw samples go to ``bench/out/attach-*.json``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench_hook import append_results, machine_info, machine_table  # noqa: E402
from benchlib import compile_bytecode  # noqa: E402
from lxml import etree  # noqa: E402

from nvmgr.format.layout import SectionSpec  # noqa: E402
from nvmgr.image.image import Image  # noqa: E402
from nvmgr.provision.prepare import grow  # noqa: E402
from nvmgr.virt.attach import attach  # noqa: E402
from tests.e2e import vmlib  # noqa: E402

OUT = ROOT / "bench" / "out"
NS = vmlib.NVMGR_NS
SIZE = 1 << 20


def log(msg: str) -> None:
    print(f"bench_attach: {msg}", file=sys.stderr, flush=True)


#: Set by main(): the private CLI server's socket (commands "served" ask it).
SERVER_ENV: dict[str, str] = {}
#: Commands "alone" run without any CLI server (as with none installed).
ALONE_ENV = {**os.environ, "NVMGR_CLI_SOCKET": ""}


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env or ALONE_ENV)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench_attach: {' '.join(cmd)} failed ({p.returncode}): "
                         f"{p.stdout}{p.stderr}")
    return dt


def start_cli_server(work: Path) -> subprocess.Popen[bytes]:
    """``nvmgr cli-server`` on a socket of the bench's own (a system one is not used)."""
    sock = work / "cli.sock"
    logf = open(work / "cli-server.log", "wb")  # noqa: SIM115 (closed with the process)
    p = subprocess.Popen([str(vmlib.NVMGR), "cli-server", "--socket", str(sock)],
                         stdout=logf, stderr=subprocess.STDOUT, env=ALONE_ENV)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench_attach: the CLI server did not start: "
                             f"{(work / 'cli-server.log').read_text()}")
        time.sleep(0.05)
    SERVER_ENV.update({**os.environ, "NVMGR_CLI_SOCKET": str(sock)})
    return p


def domain_xml(name: str, dom_uuid: str, ports: int) -> str:
    root = etree.fromstring(vmlib.domain_xml(name, dom_uuid).encode())
    devices = root.find("devices")
    assert devices is not None
    etree.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    for i in range(ports):
        etree.SubElement(devices, "controller", type="pci", index=str(i + 1),
                         model="pcie-root-port")
    return etree.tostring(root, encoding="unicode")


def attach_rounds(work: Path, rounds: int) -> dict[str, list[float]]:
    name, dom_uuid = vmlib.new_name("bench-attach"), uuid.uuid4()
    xml = work / "dom.xml"
    xml.write_text(domain_xml(name, str(dom_uuid), 4 * rounds + 2))
    samples: dict[str, list[float]] = {"nvmgr": [], "served": [], "virsh": [], "library": [],
                                       "start": [], "start served": []}
    disks: list[Path] = []
    try:
        vmlib.nvmgr("define", xml)
        vmlib.start(name)
        vmlib.wait_for_shell(name, 300)  # OVMF walks every root port under TCG
        for i in range(rounds):
            sec = work / f"state{i}.xml"
            sec.write_text(f"<nvmgr:section xmlns:nvmgr='{NS}' name='state{i}' size='1M' "
                           f"binding='block' driver='virtio-blk-pci' device='nvmgr-state{i}'/>")
            disk = vmlib.IMAGE_DIR / f"{name}-disk{i}.img"
            with open(disk, "wb") as f:
                f.truncate(SIZE)
            disks.append(disk)
            dev = work / f"disk{i}.xml"
            dev.write_text(f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                           f"<source file='{disk}'/><target dev='vd{chr(ord('b') + i)}' "
                           "bus='virtio'/></disk>")
            sec2 = work / f"served{i}.xml"
            sec2.write_text(f"<nvmgr:section xmlns:nvmgr='{NS}' name='served{i}' size='1M' "
                            f"binding='block' driver='virtio-blk-pci' device='nvmgr-served{i}'/>")
            steps = [("nvmgr", [vmlib.NVMGR, "attach", name, str(sec), "--live"], ALONE_ENV),
                     ("served", [vmlib.NVMGR, "attach", name, str(sec2), "--live"], SERVER_ENV),
                     ("virsh", ["virsh", "-c", vmlib.URI, "attach-device", name, str(dev),
                                "--live"], ALONE_ENV)]
            order = steps if i % 2 == 0 else steps[::-1]
            for label, cmd, env in order[i % 3:] + order[:i % 3]:
                samples[label].append(timed(cmd, env))
            # Where (a)'s time goes: the Python process and imports alone, and the
            # same attach as a library call in this (warm) process.
            samples["start"].append(timed([vmlib.NVMGR, "--version"]))
            samples["start served"].append(timed([vmlib.NVMGR, "--version"], SERVER_ENV))
            lib = (f"<nvmgr:section xmlns:nvmgr='{NS}' name='lib{i}' size='1M' binding='block' "
                   f"driver='virtio-blk-pci' device='nvmgr-lib{i}'/>")
            t0 = time.perf_counter()
            attach(name, lib, live=True)
            samples["library"].append(time.perf_counter() - t0)
            log(f"round {i + 1}/{rounds}: nvmgr {samples['nvmgr'][-1] * 1000:.0f} ms, "
                f"served {samples['served'][-1] * 1000:.0f} ms, "
                f"virsh {samples['virsh'][-1] * 1000:.0f} ms")
        vmlib.destroy(name)
        vmlib.nvmgr("check", "--domain", name)  # the image holds up afterwards
    finally:
        vmlib.cleanup_domain(name, str(dom_uuid), disks)
    return samples


def grow_rounds(work: Path, rounds: int) -> dict[str, list[float]]:
    images = {}
    for n in (4, 1024):
        p = work / f"s{n}.nvram"
        with Image.create(str(p), [SectionSpec(f"s{i}", 4096) for i in range(n)]):
            pass
        images[n] = p
    samples: dict[str, list[float]] = {"grow 4": [], "grow 1024": [], "nvmgr grow 1024": []}
    for i in range(rounds):
        for n in ((4, 1024) if i % 2 == 0 else (1024, 4)):
            t0 = time.perf_counter()
            with Image.open(str(images[n]), writable=True) as img:
                grow(img, [SectionSpec(f"new{i}", 4096)])
            samples[f"grow {n}"].append(time.perf_counter() - t0)
    for i in range(min(rounds, 10)):
        samples["nvmgr grow 1024"].append(
            timed([vmlib.NVMGR, "grow", str(images[1024]), "-s", f"cli{i}:4K"]))
    with Image.open(str(images[1024])) as img:
        if not img.check().ok:
            raise SystemExit("bench_attach: the 1,024-section image fails check after growing")
    return samples


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_attach.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="hot-plugs of each kind (default 10)")
    ap.add_argument("--grow-rounds", type=int, default=30, help="grows per image (default 30)")
    ap.add_argument("--quick", action="store_true", help="4 hot-plugs, 10 grows")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.grow_rounds = 4, 10
    if os.geteuid() != 0:
        log("needs root (the system libvirtd)")
        return 2
    t0 = time.monotonic()
    # The timed `nvmgr attach` starts as an installed nvmgr does: its bytecode
    # written (pip does it at install; under PYTHONDONTWRITEBYTECODE a checkout's
    # stale __pycache__ would be recompiled on every run).
    compile_bytecode(sys.executable, ROOT)
    with open("/run/lock/nvmgr-e2e.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        vmlib.ensure_services()
        work = Path(tempfile.mkdtemp(prefix="bench-attach-"))
        try:
            vmlib.ensure_hook(work)
            info = machine_info()
            server = start_cli_server(work)
            try:
                hot = attach_rounds(work, args.rounds)
            finally:
                server.terminate()
                server.wait(timeout=60)
            grows = grow_rounds(work, args.grow_rounds)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ratio = statistics.median(hot["served"]) / statistics.median(hot["virsh"])
    alone = statistics.median(hot["nvmgr"]) / statistics.median(hot["virsh"])
    met = "met" if ratio < 2 else "NOT met"
    lines = [
        f"\n## nvmgr attach --live vs virsh attach-device --live; grow of 1,024 sections "
        f"({info['date']})\n",
        machine_table(info) + "\n",
        f"Command: `bench/bench_attach.py{' --quick' if args.quick else ''}` "
        f"({time.monotonic() - t0:.0f} s).\n",
        "| step | n | median ms | min ms | max ms |",
        "|---|---|---|---|---|",
    ]
    rows = {
        "(a) `nvmgr attach --live`, 1 MiB block section + virtio-blk-pci, "
        "`nvmgr cli-server` running (nvmgr-cli.service)": hot["served"],
        "(a0) the same command without a CLI server (a Python process of its own)": hot["nvmgr"],
        "(b) `virsh attach-device --live`, 1 MiB raw disk, virtio": hot["virsh"],
        "(a') the same attach as a library call (`nvmgr.virt.attach.attach`, warm process)":
            hot["library"],
        "`nvmgr --version` without a CLI server (Python start and the CLI's imports only)":
            hot["start"],
        "`nvmgr --version` with the CLI server (Python start, the client, a forked worker)":
            hot["start served"],
        "grow by one section, image of 4 sections (in process)": grows["grow 4"],
        "grow by one section, image of 1,024 sections (in process)": grows["grow 1024"],
        "`nvmgr grow` by one section, image of 1,024 sections": grows["nvmgr grow 1024"],
    }
    for label, xs in rows.items():
        lines.append(f"| {label} | {len(xs)} | {ms(xs)} | {min(xs) * 1000:.1f} | "
                     f"{max(xs) * 1000:.1f} |")
    lib_ratio = statistics.median(hot["library"]) / statistics.median(hot["virsh"])
    lines.append(f"\nRatio of medians (a)/(b): {ratio:.2f}x; target under 2x: {met}. "
                 f"(a0)/(b): {alone:.2f}x; (a')/(b): {lib_ratio:.2f}x. "
                 f"Grow, 1,024 vs 4 sections: "
                 f"{statistics.median(grows['grow 1024']) / statistics.median(grows['grow 4']):.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    (OUT / f"attach-{stamp}.json").write_text(json.dumps(
        {"info": info, "attach": hot, "grow": grows, "ratio": ratio, "ratio_alone": alone},
        indent=1))
    if not args.no_results:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
