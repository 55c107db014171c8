#!/usr/bin/env python3
"""What encryption costs (issue 8): a VM's boot with its state encrypted, and the
section cipher against OpenSSL's command-line tools.

Part 1, the section cipher, 64 MiB of random bytes, ``--rounds`` rounds (default
7), every variant once per round in an order shuffled anew each round:

- ``openssl enc -aes-256-cbc`` (data -> ciphertext file) and ``openssl dgst
  -sha256 -hmac`` over that ciphertext: the reference for a put;
  ``openssl dgst -sha256 -hmac`` and ``openssl enc -d -aes-256-cbc``
  (ciphertext -> plaintext file): the reference for a get;
- ``put`` and ``get`` of the same 64 MiB in an encrypted (nvmgr cipher,
  non-live) section of a raw image, with the key, as a library call
  (``Image.open`` + put/get + ``close``, the median of 3 in a warm process)
  and as the ``nvmgr put``/``nvmgr get -o FILE`` command, each *before*
  (``--baseline REV``, default ``main``: its ``nvmgr/`` exported with ``git
  archive``) and *after* (this tree).

Targets (the issue's): put and get within 1.5x of the two OpenSSL commands
together.  nvmgr's put also crc32s the ciphertext and fsyncs the image (the
crash-safe commit); the OpenSSL commands neither.

Part 2, boot to OVMF's shell of the same UEFI + TPM 2.0 guest
(``examples/uefi-tpm.xml``, TCG), one domain defined with ``nvmgr define``
plain and one with ``--key-file`` (its vars a LUKS volume QEMU opens, its
TPM state sealed in the image), ``--boot-rounds`` starts of each (default
5), interleaved, the order shuffled each round: seconds from ``virsh start``
to the shell on the serial port, then ``virsh destroy``.  Target: encrypted
within 10% of plain.  Needs root, libvirtd, QEMU, swtpm, OVMF; installs this
tree's hook and runs its hook server as the end-to-end tests do.

The whole run holds the e2e lock (/run/lock/nvmgr-e2e.lock): it never runs
beside an end-to-end session or another bench that drives libvirtd, and the
cipher part is not disturbed by one.  Results are appended to
``bench/RESULTS.md`` with the machine, the date, the commit and the load
(``--no-results``: not); raw samples go to ``bench/out/crypt-*.json``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from benchlib import enter_venv  # stdlib only: safe before the re-exec into .venv

ROOT = enter_venv(__file__)  # libvirt-python, lxml

from bench_hook import machine_info  # noqa: E402

from tests.e2e import vmlib  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
OUT = ROOT / "bench" / "out"
SIZE = 64 << 20
LIB_K = 3

#: Run by each tree's interpreter (PYTHONPATH: that tree): prints the seconds of
#: each of K timed ``Image.open`` + op + ``close`` after one untimed one.
DRIVER = """
import json, sys, time
import nvmgr
from nvmgr import Image
from nvmgr.crypto.keys import load_key_file
op, path, data_file, key_file, k, tree = sys.argv[1:7]
assert nvmgr.__file__.startswith(tree), (nvmgr.__file__, tree)
kek = load_key_file(key_file)
data = open(data_file, "rb").read()
out = []
for i in range(int(k) + 1):
    t0 = time.perf_counter()
    if op == "put":
        with Image.open(path, writable=True, kek=kek) as img:
            img.put("s", data)
    else:
        with Image.open(path, kek=kek) as img:
            got = img.get("s")
        if got != data:
            sys.exit("get returned other bytes than were put")
    out.append(time.perf_counter() - t0)
print(json.dumps(out[1:]))
"""


def log(msg: str) -> None:
    print(f"[bench_crypt] {msg}", file=sys.stderr, flush=True)


def timed(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                       cwd=cwd)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


# ---------------------------------------------------------------- part 1: the cipher


class Tree:
    """nvmgr's code to run: PYTHONPATH pointing at a directory holding ``nvmgr/``."""

    def __init__(self, label: str, path: Path, rev: str) -> None:
        self.label, self.path, self.rev = label, path, rev
        self.env = dict(os.environ, PYTHONPATH=str(path))

    def lib(self, op: str, image: Path, data: Path, key: Path) -> float:
        p = subprocess.run([sys.executable, "-c", DRIVER, op, str(image), str(data), str(key),
                            str(LIB_K), str(self.path)],
                           capture_output=True, text=True, env=self.env, cwd=str(self.path))
        if p.returncode != 0:
            raise RuntimeError(f"[{self.label}] library {op} failed: {p.stderr[-2000:]}")
        return float(statistics.median(json.loads(p.stdout)))

    def cli(self, *args: str) -> float:
        # cwd: the tree, which ``-m`` puts first on sys.path (before PYTHONPATH).
        return timed([sys.executable, "-m", "nvmgr", *args], env=self.env, cwd=self.path)

    def check(self) -> None:
        """This tree's nvmgr is the one its commands import."""
        p = subprocess.run([sys.executable, "-c", "import nvmgr; print(nvmgr.__file__)"],
                           capture_output=True, text=True, env=self.env, cwd=self.path,
                           check=True)
        if not p.stdout.strip().startswith(str(self.path) + os.sep):
            raise RuntimeError(f"[{self.label}] imports {p.stdout.strip()}, not {self.path}")


def export_tree(rev: str, where: Path) -> Tree:
    """``git archive REV nvmgr`` unpacked under *where*."""
    full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                          capture_output=True, text=True, check=True).stdout.strip()
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "nvmgr"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return Tree("before", where, f"{rev} ({full})")


def bench_cipher(work: Path, baseline: str, rounds: int, rng: random.Random) -> dict[str, object]:
    data = work / "data.bin"
    data.write_bytes(os.urandom(SIZE))
    key = work / "kek.bin"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    trees = {"before": export_tree(baseline, work / "before"),
             "after": Tree("after", ROOT, head + (" + uncommitted changes" if dirty else ""))}
    images: dict[str, Path] = {}
    for side, tree in trees.items():
        tree.check()
        images[side] = work / f"{side}.img"
        tree.cli("create", str(images[side]), "-s", "s:65M", "--key-file", str(key))
        tree.cli("put", str(images[side]), "s", str(data), "--key-file", str(key))
    # OpenSSL: the same key material for both commands (hex in argv: a bench key).
    aes, ivx, mackey = os.urandom(32).hex(), os.urandom(16).hex(), os.urandom(32).hex()
    ct, back = work / "openssl.ct", work / "openssl.pt"
    openssl_enc = ["openssl", "enc", "-aes-256-cbc", "-K", aes, "-iv", ivx, "-in", str(data),
                   "-out", str(ct)]
    openssl_dec = ["openssl", "enc", "-d", "-aes-256-cbc", "-K", aes, "-iv", ivx, "-in", str(ct),
                   "-out", str(back)]
    openssl_mac = ["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{mackey}",
                   str(ct)]
    timed(openssl_enc)
    out = work / "get.out"
    variants: dict[str, Callable[[], float]] = {
        "openssl enc -aes-256-cbc": lambda: timed(openssl_enc),
        "openssl dgst -sha256 -hmac": lambda: timed(openssl_mac),
        "openssl enc -d -aes-256-cbc": lambda: timed(openssl_dec),
    }
    for side, tree in trees.items():
        img = images[side]
        variants[f"library put, {side}"] = (
            lambda t=tree, i=img: t.lib("put", i, data, key))
        variants[f"library get, {side}"] = (
            lambda t=tree, i=img: t.lib("get", i, data, key))
        variants[f"nvmgr put, {side}"] = (
            lambda t=tree, i=img: t.cli("put", str(i), "s", str(data), "--key-file", str(key)))
        variants[f"nvmgr get -o FILE, {side}"] = (
            lambda t=tree, i=img: t.cli("get", str(i), "s", "-o", str(out), "--key-file", str(key)))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        t0 = time.perf_counter()
        for k in order:
            samples[k].append(variants[k]())
            if k.startswith("nvmgr get"):
                out.unlink()
        log(f"cipher: round {r + 1}/{rounds} ({time.perf_counter() - t0:.1f} s)")
    if out.exists() or back.read_bytes() != data.read_bytes():
        raise RuntimeError("openssl's round trip gave other bytes")
    samples["openssl enc + dgst (per round)"] = [
        a + b for a, b in zip(samples["openssl enc -aes-256-cbc"],
                              samples["openssl dgst -sha256 -hmac"], strict=True)]
    samples["openssl dgst + enc -d (per round)"] = [
        a + b for a, b in zip(samples["openssl dgst -sha256 -hmac"],
                              samples["openssl enc -d -aes-256-cbc"], strict=True)]
    return {"samples": samples, "trees": {k: t.rev for k, t in trees.items()},
            "commands": [shlex.join(openssl_enc).replace(aes, "AESKEY").replace(ivx, "IV"),
                         shlex.join(openssl_mac).replace(mackey, "MACKEY"),
                         shlex.join(openssl_dec).replace(aes, "AESKEY").replace(ivx, "IV")]}


# ---------------------------------------------------------------- part 2: boot to the shell


def bench_boot(work: Path, rounds: int, rng: random.Random) -> dict[str, list[float]]:
    key = work / "vm.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    doms = {"plain": (vmlib.new_name("bench-boot-plain"), str(uuid.uuid4())),
            "encrypted": (vmlib.new_name("bench-boot-enc"), str(uuid.uuid4()))}
    files: list[Path] = []
    times: dict[str, list[float]] = {k: [] for k in doms}
    try:
        for kind, (name, dom_uuid) in doms.items():
            xml = work / f"{name}.xml"
            xml.write_text(vmlib.domain_xml(name, dom_uuid))
            files.append(xml)
            vmlib.nvmgr("define", xml, *(["--key-file", str(key)] if kind == "encrypted" else []))
            # One untimed boot each: the first start imports the template, creates the
            # TPM's state (swtpm_setup) and, encrypted, makes the LUKS volume.
            vmlib.start(name)
            vmlib.wait_for_shell(name, 300)
            vmlib.destroy(name)
        luks = vmlib.section_info(vmlib.image_of(doms["encrypted"][0]), "uefi-vars")
        if not (luks["encrypted"] and luks["live"]):
            raise RuntimeError(f"the encrypted domain's vars are not a LUKS volume: {luks}")
        for r in range(rounds):
            order = list(doms)
            rng.shuffle(order)
            for kind in order:
                name = doms[kind][0]
                t0 = time.monotonic()
                vmlib.start(name)
                vmlib.wait_for_shell(name, 300)
                times[kind].append(time.monotonic() - t0)
                vmlib.destroy(name)
            log(f"boot: round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {times[k][-1]:.1f} s" for k in order))
    finally:
        for name, dom_uuid in doms.values():
            vmlib.cleanup_domain(name, dom_uuid, files)
    return times


# ---------------------------------------------------------------- report


def report(info: dict[str, str], cipher: dict[str, object] | None,
           boot: dict[str, list[float]] | None, argv: list[str], secs: float) -> str:
    lines = [
        f"\n## {info['date']}: encryption's cost (issue 8): boot encrypted vs plain, "
        "the section cipher vs openssl\n",
        f"Machine: {info['host']}, {info['nproc']} CPUs ({info['cpu']}), {info['memory']}, "
        f"kernel {info['kernel']}; {info['libvirt']}; {info['qemu']}; {info['swtpm']}; OVMF "
        f"{info['ovmf']}; git {info['git']}; load average at start {info['loadavg_at_start']}, "
        f"at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        f"Command: `{shlex.join(['bench/bench_crypt.py', *argv])}` ({secs:.0f} s).\n",
    ]
    if boot:
        p, e = statistics.median(boot["plain"]), statistics.median(boot["encrypted"])
        lines += [
            "### Boot to OVMF's shell, UEFI + TPM 2.0, TCG (interleaved, order shuffled)\n",
            "| domain | n | median s | min s | max s |",
            "|---|---|---|---|---|",
        ]
        for k, label in (("plain", "plain (`nvmgr define`)"),
                         ("encrypted", "encrypted (`nvmgr define --key-file`: LUKS vars, "
                                       "sealed TPM state)")):
            xs = boot[k]
            lines.append(f"| {label} | {len(xs)} | {statistics.median(xs):.2f} | {min(xs):.2f} | "
                         f"{max(xs):.2f} |")
        lines.append(f"\nRatio of medians encrypted/plain: {e / p:.3f}; target within 10%: "
                     f"{'met' if e / p <= 1.10 else 'NOT met'}.\n")
    if cipher:
        s: dict[str, list[float]] = cipher["samples"]  # type: ignore[assignment]
        trees: dict[str, str] = cipher["trees"]  # type: ignore[assignment]
        lines += [
            f"### 64 MiB in an encrypted section vs openssl (interleaved, order shuffled; "
            f"before = {trees['before']}, after = {trees['after']})\n",
            "| variant | n | median ms | min ms | max ms |",
            "|---|---|---|---|---|",
        ]
        for k, xs in s.items():
            lines.append(f"| {k} | {len(xs)} | {med_ms(xs):.1f} | {min(xs) * 1000:.1f} | "
                         f"{max(xs) * 1000:.1f} |")
        put_ref = med_ms(s["openssl enc + dgst (per round)"])
        get_ref = med_ms(s["openssl dgst + enc -d (per round)"])
        lines += ["", "| ratio to openssl (medians) | before | after | target 1.5x |",
                  "|---|---|---|---|"]
        for what, ref, key in (("library put / (enc + dgst)", put_ref, "library put"),
                               ("library get / (dgst + enc -d)", get_ref, "library get"),
                               ("`nvmgr put` / (enc + dgst)", put_ref, "nvmgr put"),
                               ("`nvmgr get -o FILE` / (dgst + enc -d)", get_ref,
                                "nvmgr get -o FILE")):
            b, a = med_ms(s[f"{key}, before"]) / ref, med_ms(s[f"{key}, after"]) / ref
            lines.append(f"| {what} | {b:.2f}x | {a:.2f}x | {'met' if a <= 1.5 else 'NOT met'} |")
        cmds: list[str] = cipher["commands"]  # type: ignore[assignment]
        lines += ["", "OpenSSL commands (keys elided):", "", "```", *cmds, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="bench/bench_crypt.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="cipher rounds (default 7)")
    ap.add_argument("--boot-rounds", type=int, default=5,
                    help="timed boots of each domain (default 5, at least 5 for the target)")
    ap.add_argument("--baseline", default="main", metavar="REV",
                    help="the 'before' code: git revision whose nvmgr/ is exported (default main)")
    ap.add_argument("--no-boot", action="store_true", help="the cipher part only")
    ap.add_argument("--no-cipher", action="store_true", help="the boot part only")
    ap.add_argument("--quick", action="store_true", help="3 cipher rounds, 2 boots of each")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.boot_rounds = 3, 2
    rng = random.Random()
    t0 = time.monotonic()
    if os.geteuid() != 0 and not args.no_boot:
        log("the boot part needs root (the system libvirtd); give --no-boot")
        return 2
    with open("/run/lock/nvmgr-e2e.lock", "w") as lock:
        log("waiting for the e2e lock")
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = machine_info()
        work = Path(tempfile.mkdtemp(prefix="bench-crypt-", dir="/var/tmp"))
        try:
            cipher = None if args.no_cipher else bench_cipher(work, args.baseline, args.rounds, rng)
            boot = None
            if not args.no_boot:
                vmlib.ensure_services()
                vmlib.ensure_hook(work)
                vmlib.start_hook_server()
                try:
                    boot = bench_boot(work, args.boot_rounds, rng)
                finally:
                    vmlib.stop_hook_server()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    text = report(info, cipher, boot, argv, time.monotonic() - t0)
    print(text)
    OUT.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    (OUT / f"crypt-{stamp}.json").write_text(json.dumps(
        {"info": info, "cipher": cipher, "boot": boot}, indent=1))
    if not args.no_results:
        with open(RESULTS, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
