"""nvmgr benchmarks (run through ``bench/run``).

1. ``put``/``get`` of 4 KiB, 512 KiB and 64 MiB sections on raw and qcow2,
   plain and encrypted, through the library (open + put/get + close, so the
   fsyncs are in) and through the CLI (whole process), side by side with
   ``dd if=FILE of=TARGET bs=4M conv=notrunc,fsync`` writing the same bytes
   into a same-sized, already written file on the same filesystem.
2. ``nvmgr info`` and ``nvmgr check`` (whole process) on images of 16, 256
   and 1,024 small sections that hold data, plus where the time of ``info``
   goes (interpreter start, imports, in-process work, cProfile).
3. Peak RSS (``/usr/bin/time -v``) and throughput of ``nvmgr check`` on an
   image with one 1 GiB section, against ``nvmgr get`` of a 64 MiB section.
4. ``--baseline-tree PATH`` (``--only ab``): this tree (or ``--after-tree
   PATH``) against another checkout of nvmgr (before a change), side by side in one run: ``put``/``get`` of 4 KiB,
   512 KiB and 64 MiB sections and ``info``, on qcow2 and raw, as whole
   processes (each tree's own ``python -m nvmgr``) and in process
   (``Image.open`` + op + ``close`` in a child of each tree's interpreter).
   Every round runs each before/after pair back to back in a random order,
   the pairs shuffled; the report gives medians and the median of the paired
   after/before ratios.

The machine is shared and noisy: every benchmark runs its variants in a
shuffled order within each round, repeats the rounds, and reports medians
and minima; ratios compare medians measured in the same run.  Work files go
to a temporary directory under /var/tmp (a real disk, so fsync is real) and
are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import pstats
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchlib import compile_bytecode  # noqa: E402

from nvmgr import Image, SectionSpec  # noqa: E402
from nvmgr.crypto.keys import load_key_file  # noqa: E402

OUT = os.path.join(BENCH, "out")
RESULTS = os.path.join(BENCH, "RESULTS.md")
MiB = 1 << 20
GiB = 1 << 30
CLI = [sys.executable, "-m", "nvmgr"]
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
GNU_TIME = "/usr/bin/time"

SIZES = {"4 KiB": 4 << 10, "512 KiB": 512 << 10, "64 MiB": 64 << 20}
FORMATS = ("raw", "qcow2")


# ---------------------------------------------------------------- helpers


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def short(argv: list[str]) -> str:
    """A command line as the reader would type it (nvmgr for python -m nvmgr)."""
    if argv[: len(CLI)] == CLI:
        argv = ["nvmgr", *argv[len(CLI) :]]
    return shlex.join(argv)


def run(argv: list[str]) -> float:
    """Run *argv* to completion (stdout discarded); its wall time in seconds."""
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{short(argv)} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt


def run_rss(argv: list[str]) -> tuple[float, int]:
    """Run *argv* under /usr/bin/time -v: (wall seconds, max RSS in KiB)."""
    if os.access(GNU_TIME, os.X_OK):
        t0 = time.perf_counter()
        p = subprocess.run([GNU_TIME, "-v", *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env=ENV, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{short(argv)} failed ({p.returncode}): {p.stderr[-2000:]}")
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        assert m, p.stderr
        return dt, int(m.group(1))
    # No GNU time (apt-get install time): the same number from wait4's rusage.
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=ENV)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{short(argv)} failed ({proc.returncode})")
    return dt, ru.ru_maxrss


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: str) -> None:
    """Evict one (clean, fsynced) file from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fmt_t(s: float) -> str:
    ms = s * 1000
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 1000:
        return f"{ms:.1f} ms"
    return f"{s:.2f} s"


def fmt_r(r: float) -> str:
    return f"{r:.2f}x"


@dataclass
class Variant:
    """One thing measured: a name, how to run it once, and its samples."""

    key: str
    run: Callable[[], float]
    meta: dict[str, Any] = field(default_factory=dict)
    reps: int = 5
    samples: list[float] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, **self.meta, "samples_s": self.samples,
                "median_s": self.median, "min_s": self.min, "extra": self.extra}


def interleave(variants: list[Variant], rng: random.Random, label: str) -> None:
    """Run each variant ``reps`` times, the order shuffled anew every round."""
    rounds = max(v.reps for v in variants)
    for r in range(rounds):
        todo = [v for v in variants if r < v.reps]
        rng.shuffle(todo)
        t0 = time.perf_counter()
        for v in todo:
            v.samples.append(v.run())
        log(f"{label}: round {r + 1}/{rounds} ({len(todo)} runs, {time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------- machine


def machine_info(work: str) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    fs = sh(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", work]) or sh(
        ["stat", "-f", "-c", "%T", work])
    qemu = sh(["qemu-storage-daemon", "--version"]).splitlines()
    rev = sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "uname -a": sh(["uname", "-a"]),
        "nproc": sh(["nproc"]),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "bench_dir": work,
        "filesystem": fs,
        "qemu": qemu[0] if qemu else "not found",
        "python": f"{platform.python_version()} ({sys.executable})",
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": rev + (" + uncommitted changes" if dirty else ""),
    }


# ---------------------------------------------------------------- 1: put/get vs dd


def bench_put_get(work: str, key_file: str, rng: random.Random, quick: bool) -> dict[str, Any]:
    reps = {"4 KiB": 3, "512 KiB": 3, "64 MiB": 3} if quick else {
        "4 KiB": 9, "512 KiB": 9, "64 MiB": 7}
    kek = load_key_file(key_file)
    data: dict[str, bytes] = {}
    data_file: dict[str, str] = {}
    dd_target: dict[str, str] = {}
    for label, n in SIZES.items():
        tag = label.replace(" ", "")
        data[label] = os.urandom(n)
        data_file[label] = os.path.join(work, f"data-{tag}.bin")
        write_file(data_file[label], data[label])
        # dd's target: same size, already written once (overwrite, as put does
        # once both of a section's slots have been written).
        dd_target[label] = os.path.join(work, f"dd-{tag}.bin")
        write_file(dd_target[label], data[label])

    images: dict[tuple[str, bool], str] = {}
    for fmt in FORMATS:
        for enc in (False, True):
            path = os.path.join(work, f"pg-{fmt}-{'enc' if enc else 'plain'}.img")
            specs = [SectionSpec(sec(label), n) for label, n in SIZES.items()]
            with Image.create(path, specs, fmt=fmt, kek=kek if enc else None) as img:
                for _ in range(2):  # both slots written: steady state, no first allocation
                    for label in SIZES:
                        img.put(sec(label), data[label])
            images[fmt, enc] = path
    log("put/get: images ready; verifying the CLI round trip")
    for (fmt, enc), path in images.items():
        for label in SIZES:
            out = os.path.join(work, "verify.out")
            run([*CLI, "put", path, sec(label), data_file[label], *keyargs(enc, key_file)])
            run([*CLI, "get", path, sec(label), "-o", out, *keyargs(enc, key_file)])
            with open(out, "rb") as f:
                assert f.read() == data[label], (fmt, enc, label)
            os.unlink(out)

    variants: list[Variant] = []
    floor = [sys.executable, "-c", "import nvmgr.cli"]
    bare = [sys.executable, "-c", "pass"]
    variants.append(Variant("python -c pass", lambda: run(bare),
                            {"op": "startup", "cmd": short(bare)}, max(reps.values())))
    variants.append(Variant("import nvmgr.cli", lambda: run(floor),
                            {"op": "startup", "cmd": short(floor)}, max(reps.values())))
    for label in SIZES:
        r = reps[label]
        dd_w = ["dd", f"if={data_file[label]}", f"of={dd_target[label]}", "bs=4M",
                "conv=notrunc,fsync", "status=none"]
        dd_r = ["dd", f"if={dd_target[label]}", "of=/dev/null", "bs=4M", "status=none"]
        variants.append(Variant(f"{label} dd write", lambda a=dd_w: run(a),
                                {"size": label, "op": "dd-write", "cmd": short(dd_w)}, r))
        variants.append(Variant(f"{label} dd read", lambda a=dd_r: run(a),
                                {"size": label, "op": "dd-read", "cmd": short(dd_r)}, r))
        for (fmt, enc), path in images.items():
            name = sec(label)
            ka = keyargs(enc, key_file)
            e = "enc" if enc else "plain"
            meta = {"size": label, "fmt": fmt, "enc": enc}
            put_cli = [*CLI, "put", path, name, data_file[label], *ka]
            get_cli = [*CLI, "get", path, name, "-o", "/dev/null", *ka]
            variants += [
                Variant(f"{label} put lib {fmt} {e}",
                        lambda p=path, s=name, d=data[label], k=enc: timed(
                            lambda: lib_put(p, s, d, key_file if k else None)),
                        {**meta, "op": "put", "via": "lib",
                         "cmd": f"Image.open({fmt}, writable) + put + close"}, r),
                Variant(f"{label} get lib {fmt} {e}",
                        lambda p=path, s=name, k=enc: timed(
                            lambda: lib_get(p, s, key_file if k else None)),
                        {**meta, "op": "get", "via": "lib",
                         "cmd": f"Image.open({fmt}) + get + close"}, r),
                Variant(f"{label} put cli {fmt} {e}", lambda a=put_cli: run(a),
                        {**meta, "op": "put", "via": "cli", "cmd": short(put_cli)}, r),
                Variant(f"{label} get cli {fmt} {e}", lambda a=get_cli: run(a),
                        {**meta, "op": "get", "via": "cli", "cmd": short(get_cli)}, r),
            ]
    # One untimed pass so every code path is warm (page cache, .pyc files).
    for v in variants:
        v.run()
    interleave(variants, rng, "put/get")
    for p in images.values():
        os.unlink(p)
    return {"variants": [v.to_json() for v in variants]}


def sec(label: str) -> str:
    return "s-" + label.replace(" ", "").lower()


def keyargs(enc: bool, key_file: str) -> list[str]:
    return ["--key-file", key_file] if enc else []


def lib_put(path: str, name: str, data: bytes, key_file: str | None) -> None:
    kek = load_key_file(key_file) if key_file else None
    with Image.open(path, writable=True, kek=kek) as img:
        img.put(name, data)


def lib_get(path: str, name: str, key_file: str | None) -> None:
    kek = load_key_file(key_file) if key_file else None
    with Image.open(path, kek=kek) as img:
        img.get(name)


# ---------------------------------------------------------------- 2: info/check vs sections


def fill_sections(path: str, fmt: str, n: int, rng: random.Random) -> int:
    """An image of *n* 4 KiB sections, each holding 512..4096 random bytes.

    The bytes and the directory are what *n* ``put`` calls would leave (data
    in the second slot, crc32 and length set, both header copies holding the
    full directory), written with one commit per copy instead of *n* (a
    1,024-section put costs about 0.1 s of DER encoding alone).
    """
    specs = [SectionSpec(f"sec{i:04d}", 4096) for i in range(n)]
    total = 0
    with Image.create(path, specs, fmt=fmt) as img:
        new = img._copy_dir()
        for s in new.sections:
            payload = rng.randbytes(rng.randint(512, 4096))
            assert s.spare is not None
            img.container.write(s.spare, payload)
            s.offset, s.spare = s.spare, s.offset
            s.length, s.crc32 = len(payload), zlib.crc32(payload)
            total += len(payload)
        img.container.flush()
        img._commit(new)
        img._commit(new)
    with Image.open(path) as img:
        rep = img.check()
        assert rep.ok and not rep.warnings and len(rep.sections) == n, rep.to_json()
        assert all(s.status == "ok" for s in rep.sections)
    return total


def bench_directory(work: str, rng: random.Random, quick: bool) -> dict[str, Any]:
    counts = (16, 256, 1024)
    reps = 3 if quick else 9
    images: dict[tuple[str, int], str] = {}
    payload: dict[str, int] = {}
    for fmt in FORMATS:
        for n in counts:
            path = os.path.join(work, f"dir-{n}.{fmt}")
            payload[f"{fmt}/{n}"] = fill_sections(path, fmt, n, rng)
            images[fmt, n] = path
    log("info/check: images ready")
    variants: list[Variant] = []
    base = [sys.executable, "-c", "pass"]
    imp = [sys.executable, "-c", "import nvmgr.cli"]
    variants.append(Variant("python -c pass", lambda: run(base),
                            {"what": "interpreter start", "cmd": short(base)}, reps))
    variants.append(Variant("import nvmgr.cli", lambda: run(imp),
                            {"what": "interpreter start + imports", "cmd": short(imp)}, reps))
    for (fmt, n), path in images.items():
        for cmd in ("info", "check"):
            argv = [*CLI, cmd, path]
            variants.append(Variant(f"{cmd} {fmt} {n}", lambda a=argv: run(a),
                                    {"cmd_name": cmd, "fmt": fmt, "sections": n,
                                     "cmd": short(argv)}, reps))
    for v in variants:
        v.run()
    interleave(variants, rng, "info/check")
    anatomy = info_anatomy(images["raw", max(counts)], work, 3 if quick else 7)
    for p in images.values():
        os.unlink(p)
    return {"variants": [v.to_json() for v in variants], "payload_bytes": payload,
            "anatomy": anatomy}


def info_anatomy(path: str, work: str, reps: int) -> dict[str, Any]:
    """Where the time of ``nvmgr info`` on *path* goes."""
    from nvmgr import cli
    from nvmgr.cli import images as cli_images
    from nvmgr.image.image import Image as Img
    from nvmgr.image.image import read_directory

    def in_process() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["info", path]) == 0

    def open_close() -> None:
        Img.open(path).close()

    def render() -> None:
        with Img.open(path) as img:
            t0 = time.perf_counter()
            cli_images._render_info(cli_images._info(img))
            samples["render only"].append(time.perf_counter() - t0)

    samples: dict[str, list[float]] = {"cli.main(['info']) in process": [],
                                       "Image.open + close": [],
                                       "read_directory (both copies)": [], "render only": []}
    in_process()
    for _ in range(reps):
        samples["cli.main(['info']) in process"].append(timed(in_process))
        samples["Image.open + close"].append(timed(open_close))
        with Img.open(path) as img:
            samples["read_directory (both copies)"].append(
                timed(lambda c=img.container: read_directory(c)))
        render()
    inproc = {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in samples.items()}
    try:
        steps = decode_steps(path, reps)
    except Exception as e:  # the codec's internals moved: report, do not fail the run
        steps = {"error": f"{type(e).__name__}: {e}"}

    # cProfile of the whole command (imports included), in a child process.
    prof = os.path.join(work, "info.prof")
    argv = [sys.executable, "-m", "cProfile", "-o", prof, "-m", "nvmgr", "info", path]
    run(argv)
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"func": f"{short_path(fname)}:{line}({func})", "calls": nc,
                     "tottime_s": tt, "cumtime_s": ct})
    total = max(r["cumtime_s"] for r in rows)
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:15]
    interesting = ("nvmgr/codec.py", "nvmgr/der.py", "nvmgr/image.py", "nvmgr/cli.py",
                   "nvmgr/model.py", "nvmgr/asn1.py")
    by_cum = sorted((r for r in rows if r["func"].startswith(interesting)),
                    key=lambda r: -r["cumtime_s"])[:15]
    pkg: dict[str, float] = {}
    for r in rows:
        name = package_of(r["func"])
        pkg[name] = pkg.get(name, 0.0) + r["tottime_s"]
    by_pkg = dict(sorted(pkg.items(), key=lambda kv: -kv[1])[:8])

    # -X importtime: self time of every imported module, summed per top package.
    it = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nvmgr.cli"],
                        capture_output=True, text=True, env=ENV, check=True)
    imports: dict[str, int] = {}
    top_cum: list[tuple[str, int]] = []
    for line in it.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        name = m.group(4)
        root = name.split(".")[0]
        imports[root] = imports.get(root, 0) + int(m.group(1))
        if name.startswith(("nvmgr", "pyasn1", "cryptography")) and name.count(".") <= 2:
            top_cum.append((name, int(m.group(2))))
    return {
        "image": path,
        "in_process": inproc,
        "decode_steps": steps,
        "cprofile": {"cmd": short(argv), "total_s": total, "by_tottime": by_tot,
                     "nvmgr_by_cumtime": by_cum, "tottime_by_package_s": by_pkg},
        "importtime": {
            "cmd": f"{sys.executable} -X importtime -c 'import nvmgr.cli'",
            "self_us_by_package": dict(sorted(imports.items(), key=lambda kv: -kv[1])[:10]),
            "cumulative_us": dict(sorted(top_cum, key=lambda kv: -kv[1])[:12]),
        },
    }


def decode_steps(path: str, reps: int) -> dict[str, Any]:
    """Time each step of ``codec.decode_header`` on one header copy of *path*.

    Mirrors the steps of nvmgr.format.codec.decode_header (strict DER walk, pyasn1
    decode, pyasn1 re-encode for the canonical-form check, digest, model
    conversion, layout validation); ``read_directory`` does this for both copies.
    """
    import hashlib

    from pyasn1.codec.der import decoder as der_decoder
    from pyasn1.codec.der import encoder as der_encoder

    from nvmgr.format import asn1, codec, der

    with Image.open(path) as img:
        buf = img.container.read(0, img.directory.header_area)
    total = der.walk(buf, allow_zero_padding=True)
    body = bytes(buf[:total])
    value, _ = der_decoder.decode(body, asn1Spec=asn1.HeaderCopy())
    d = codec.directory_from_asn1(value["directory"])
    fns: dict[str, Callable[[], object]] = {
        "der.walk (strict DER rules)": lambda: der.walk(buf, allow_zero_padding=True),
        "pyasn1 decode against the schema": lambda: der_decoder.decode(
            body, asn1Spec=asn1.HeaderCopy()),
        "pyasn1 re-encode (canonical-form check)": lambda: der_encoder.encode(value),
        "sha256 digest": lambda: hashlib.sha256(body).digest(),
        "directory_from_asn1": lambda: codec.directory_from_asn1(value["directory"]),
        "validate (layout rules)": lambda: codec.validate(d),
        "codec.decode_header (all of the above)": lambda: codec.decode_header(buf),
    }
    out: dict[str, Any] = {"der_bytes": total, "sections": len(d.sections)}
    for k, fn in fns.items():
        ts = [timed(fn) for _ in range(reps)]
        out[k] = {"median_s": statistics.median(ts), "min_s": min(ts)}
    return out


def short_path(fname: str) -> str:
    for marker in ("site-packages/", ROOT + "/"):
        if marker in fname:
            return fname.split(marker, 1)[1]
    m = re.search(r"lib/python3\.\d+/(.*)", fname)
    return m.group(1) if m else fname


def package_of(func: str) -> str:
    if func.startswith("~") or func.startswith("{"):
        return "builtins (C)"
    head = func.split(":", 1)[0]
    if head.startswith("nvmgr/"):
        return "nvmgr/" + head.split("/")[1]
    return head.split("/")[0].removesuffix(".py")


# ---------------------------------------------------------------- 3: check memory


def bench_memory(work: str, key_file: str, rng: random.Random, quick: bool) -> dict[str, Any]:
    big = (256 * MiB) if quick else GiB
    reps = 2 if quick else 3
    kek = load_key_file(key_file)
    block = os.urandom(64 * MiB)
    images: dict[str, str] = {}
    kinds = [("raw", False), ("raw", True)] + ([] if quick else [("qcow2", False)])

    for fmt, enc in kinds:
        path = os.path.join(work, f"big-{fmt}-{'enc' if enc else 'plain'}.img")
        t0 = time.perf_counter()
        with Image.create(path, [SectionSpec("big", big)], fmt=fmt,
                          kek=kek if enc else None) as img:
            payload = block * (big // len(block))
            img.put("big", payload)
            del payload
        log(f"memory: filled {path} ({big // MiB} MiB, {time.perf_counter() - t0:.1f} s)")
        images[f"{fmt}-{'enc' if enc else 'plain'}"] = path
    with Image.open(images["raw-plain"]) as img:
        s = img.section("big")
        off, length = s.offset, s.stored_length

    small: dict[str, str] = {}
    for fmt, enc in [("raw", False), ("raw", True), ("qcow2", False), ("qcow2", True)]:
        path = os.path.join(work, f"g64-{fmt}-{'enc' if enc else 'plain'}.img")
        with Image.create(path, [SectionSpec("s64", 64 * MiB)], fmt=fmt,
                          kek=kek if enc else None) as img:
            img.put("s64", block)
        small[f"{fmt}-{'enc' if enc else 'plain'}"] = path
    del block

    variants: list[Variant] = []

    def rss_variant(key: str, argv: list[str], meta: dict[str, Any],
                    before: Callable[[], None] | None = None) -> Variant:
        def once() -> float:
            if before:
                before()
            dt, kib = run_rss(argv)
            v.extra.append(kib)
            return dt
        v = Variant(key, once, {**meta, "cmd": short(argv)}, reps)
        return v

    raw = images["raw-plain"]
    variants.append(rss_variant(
        f"check raw plain {big // MiB} MiB (hot cache)", [*CLI, "check", raw],
        {"op": "check", "fmt": "raw", "enc": False, "cache": "hot", "bytes": length}))
    variants.append(rss_variant(
        f"check raw plain {big // MiB} MiB (cold cache)", [*CLI, "check", raw],
        {"op": "check", "fmt": "raw", "enc": False, "cache": "cold", "bytes": length},
        before=lambda: drop_cache(raw)))
    enc_img = images["raw-enc"]
    variants.append(rss_variant(
        f"check raw enc+key {big // MiB} MiB (hot cache, crc32 + MAC)",
        [*CLI, "check", enc_img, "--key-file", key_file],
        {"op": "check", "fmt": "raw", "enc": True, "cache": "hot", "bytes": length}))
    if "qcow2-plain" in images:
        variants.append(rss_variant(
            f"check qcow2 plain {big // MiB} MiB (hot cache)", [*CLI, "check", images["qcow2-plain"]],
            {"op": "check", "fmt": "qcow2", "enc": False, "cache": "hot", "bytes": length}))
    dd = ["dd", f"if={raw}", "of=/dev/null", "bs=4M", "iflag=skip_bytes,count_bytes",
          f"skip={off}", f"count={length}", "status=none"]
    variants.append(rss_variant(f"dd read {big // MiB} MiB (hot cache)", dd,
                                {"op": "dd-read", "cache": "hot", "bytes": length}))
    variants.append(rss_variant(f"dd read {big // MiB} MiB (cold cache)", dd,
                                {"op": "dd-read", "cache": "cold", "bytes": length},
                                before=lambda: drop_cache(raw)))
    for kind, path in small.items():
        fmt, e = kind.split("-")
        ka = keyargs(e == "enc", key_file)
        variants.append(rss_variant(f"get {fmt} {e} 64 MiB",
                                    [*CLI, "get", path, "s64", "-o", "/dev/null", *ka],
                                    {"op": "get", "fmt": fmt, "enc": e == "enc",
                                     "bytes": 64 * MiB}))
        variants.append(rss_variant(f"check {fmt} {e} 64 MiB",
                                    [*CLI, "check", path, *ka],
                                    {"op": "check", "fmt": fmt, "enc": e == "enc",
                                     "bytes": 64 * MiB}))
    variants.append(rss_variant("info (startup baseline)", [*CLI, "info", small["raw-plain"]],
                                {"op": "info", "fmt": "raw", "enc": False}))
    for v in variants:  # warm-up (page cache, .pyc); the 1 GiB runs need none
        if v.meta.get("bytes", 0) <= 64 * MiB:
            v.run()
            v.extra.clear()
    interleave(variants, rng, "memory")
    profile = profile_check(raw)
    for p in [*images.values(), *small.values()]:
        os.unlink(p)
    return {"section_bytes": length, "variants": [v.to_json() for v in variants],
            "check_profile": profile}


def profile_check(path: str) -> dict[str, Any]:
    """cProfile of an in-process Image.check of *path* (hot cache): where check spends."""
    import cProfile

    with Image.open(path) as img:
        img.check()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    with Image.open(path) as img:
        assert img.check().ok
    prof.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = [{"func": f"{short_path(f)}:{line}({func})", "calls": nc, "tottime_s": tt,
             "cumtime_s": ct}
            for (f, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items()]  # type: ignore[attr-defined]
    return {"what": f"Image.open({path}) + check() + close, in process, under cProfile",
            "total_s": total, "by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:6]}


# ---------------------------------------------------------------- 4: before/after (A/B)


@dataclass
class Tree:
    """A checkout of nvmgr to run: its root, interpreter, environment and commit."""

    label: str
    root: str
    python: str
    env: dict[str, str]
    rev: str

    @classmethod
    def at(cls, label: str, root: str) -> Tree:
        root = os.path.abspath(root)
        venv_py = os.path.join(root, ".venv", "bin", "python")
        python = venv_py if os.access(venv_py, os.X_OK) else sys.executable
        env = dict(os.environ, PYTHONPATH=root)
        rev = sh(["git", "-C", root, "rev-parse", "--short", "HEAD"]) or "(not a git checkout)"
        if sh(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"]):
            rev += " + uncommitted changes"
        log(f"[{label}] " + compile_bytecode(python, root))
        return cls(label, root, python, env, rev)

    @property
    def cli(self) -> list[str]:
        return [self.python, "-m", "nvmgr"]

    def run(self, args: list[str]) -> float:
        """Run ``nvmgr ARGS`` of this tree (cwd: its root); wall seconds."""
        argv = [*self.cli, *args]
        t0 = time.perf_counter()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=self.env, cwd=self.root)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"[{self.label}] {shlex.join(argv)} failed ({p.returncode}): "
                               f"{p.stderr.decode()[-2000:]}")
        return dt


#: In-process driver, run by each tree's interpreter: prints the seconds of
#: each of K timed ``Image.open`` + op + ``close`` (after one untimed one).
AB_DRIVER = """
import json, sys, time
from nvmgr import Image
op, path, name, data_file, k = sys.argv[1:6]
data = open(data_file, "rb").read()
out = []
for i in range(int(k) + 1):
    got = data
    t0 = time.perf_counter()
    if op == "put":
        with Image.open(path, writable=True) as img:
            img.put(name, data)
    elif op == "get":
        with Image.open(path) as img:
            got = img.get(name)
    else:
        with Image.open(path) as img:
            img.directory
    out.append(time.perf_counter() - t0)
    if got != data:
        sys.exit("get returned other bytes than were put")
print(json.dumps(out[1:]))
"""


def ab_lib(tree: Tree, op: str, path: str, name: str, data_file: str, k: int) -> float:
    """Median in-process seconds of *k* ``Image.open`` + *op* + ``close`` in *tree*."""
    p = subprocess.run([tree.python, "-c", AB_DRIVER, op, path, name, data_file, str(k)],
                       capture_output=True, text=True, env=tree.env, cwd=tree.root)
    if p.returncode != 0:
        raise RuntimeError(f"[{tree.label}] in-process {op} failed: {p.stderr[-2000:]}")
    return float(statistics.median(json.loads(p.stdout)))


def bench_ab(work: str, baseline: str, after: str, rng: random.Random,
             quick: bool) -> dict[str, Any]:
    trees = {"before": Tree.at("before", baseline), "after": Tree.at("after", after)}
    if os.path.realpath(trees["before"].root) == os.path.realpath(after):
        log("warning: --baseline-tree is the after tree: both sides run the same code")
    versions = {k: sh([t.python, "-c", "import sys; print(sys.version.split()[0])"])
                for k, t in trees.items()}
    if len(set(versions.values())) != 1:
        # Each side runs its own .venv; another interpreter is another benchmark.
        raise SystemExit("ab: the two trees' interpreters differ "
                         + ", ".join(f"{k}: Python {v} ({trees[k].python})"
                                     for k, v in versions.items())
                         + "; make both .venv with one Python (PYTHON=... scripts/setup)")
    reps = 5 if quick else 15
    lib_k = 3 if quick else 5
    data_file: dict[str, str] = {}
    for label, n in SIZES.items():
        data_file[label] = os.path.join(work, f"ab-data-{label.replace(' ', '')}.bin")
        write_file(data_file[label], os.urandom(n))
    fmts = ("qcow2", "raw")
    images: dict[tuple[str, str], str] = {}
    for side, tree in trees.items():
        for fmt in fmts:
            # Each tree creates and fills its own image (both slots written:
            # steady state, no first allocation).
            path = os.path.join(work, f"ab-{side}.{fmt}")
            specs = [a for label, n in SIZES.items() for a in ("-s", f"{sec(label)}:{n}")]
            tree.run(["create", path, *specs, "-f", fmt])
            for _ in range(2):
                for label in SIZES:
                    tree.run(["put", path, sec(label), data_file[label]])
            images[side, fmt] = path
    log("ab: images ready (" + ", ".join(f"{k}: {t.rev} {t.python}" for k, t in trees.items())
        + ")")

    pairs: list[tuple[Variant, Variant]] = []

    def pair(key: str, meta: dict[str, Any], make: Callable[[str], Callable[[], float]],
             n: int) -> None:
        a = Variant(f"{key} before", make("before"), {**meta, "side": "before"}, n)
        b = Variant(f"{key} after", make("after"), {**meta, "side": "after"}, n)
        pairs.append((a, b))

    for fmt in fmts:
        for label in SIZES:
            for op in ("put", "get"):
                n = reps if SIZES[label] < 64 * MiB else max(3, reps * 2 // 3)
                meta = {"fmt": fmt, "size": label, "op": op}

                def cli_run(side: str, op: str = op, fmt: str = fmt,
                            label: str = label) -> Callable[[], float]:
                    img = images[side, fmt]
                    args = ([op, img, sec(label), data_file[label]] if op == "put"
                            else [op, img, sec(label), "-o", "/dev/null"])
                    return lambda: trees[side].run(args)

                def lib_run(side: str, op: str = op, fmt: str = fmt,
                            label: str = label) -> Callable[[], float]:
                    return lambda: ab_lib(trees[side], op, images[side, fmt], sec(label),
                                          data_file[label], lib_k)

                pair(f"cli {op} {fmt} {label}", {**meta, "via": "cli"}, cli_run, n)
                pair(f"lib {op} {fmt} {label}", {**meta, "via": "lib"}, lib_run, n)
        meta = {"fmt": fmt, "size": "", "op": "info"}

        def info_cli(side: str, fmt: str = fmt) -> Callable[[], float]:
            return lambda: trees[side].run(["info", images[side, fmt]])

        def info_lib(side: str, fmt: str = fmt) -> Callable[[], float]:
            return lambda: ab_lib(trees[side], "info", images[side, fmt], "-",
                                  data_file["4 KiB"], lib_k)

        pair(f"cli info {fmt}", {**meta, "via": "cli"}, info_cli, reps)
        pair(f"lib open+close {fmt}", {**meta, "op": "open+close", "via": "lib"}, info_lib, reps)

    for a, b in pairs:  # warm-up: page cache, .pyc files
        a.run()
        b.run()
    rounds = max(a.reps for a, _ in pairs)
    for r in range(rounds):
        todo = [p for p in pairs if r < p[0].reps]
        rng.shuffle(todo)
        t0 = time.perf_counter()
        for a, b in todo:
            for v in ((a, b) if rng.random() < 0.5 else (b, a)):
                v.samples.append(v.run())
        log(f"ab: round {r + 1}/{rounds} ({2 * len(todo)} runs, "
            f"{time.perf_counter() - t0:.1f} s)")
    for p in images.values():
        os.unlink(p)
    return {
        "trees": {k: {"root": t.root, "python": t.python, "rev": t.rev,
                      "cli": shlex.join(t.cli)} for k, t in trees.items()},
        "lib_iterations": lib_k,
        "pairs": [{"before": a.to_json(), "after": b.to_json(),
                   "ratios": [y / x for x, y in zip(a.samples, b.samples, strict=True)]}
                  for a, b in pairs],
    }


def report_ab(res: dict[str, Any]) -> tuple[str, list[str]]:
    t = res["trees"]
    out = [
        "### 4. Before / after (A/B in one run)",
        "",
        f"before: `{t['before']['root']}` at {t['before']['rev']}, run as "
        f"`{t['before']['cli']}` (cwd: that tree); after: `{t['after']['root']}` at "
        f"{t['after']['rev']}, run as `{t['after']['cli']}`. `cli` = the whole process; "
        f"`lib` = in process, the median of {res['lib_iterations']} `Image.open` + op + "
        "`close` in a child of each tree's interpreter (interpreter start and imports not "
        "timed). Each round ran every before/after pair back to back in a random order, the "
        "pairs shuffled; ratio = after / before, the median of the per-round ratios (and of "
        "the medians). Each tree created and filled its own images (both slots written).",
        "",
    ]
    rows = []
    worst: tuple[float, str] = (0.0, "")
    for p in res["pairs"]:
        a, b = p["before"], p["after"]
        paired = statistics.median(p["ratios"])
        of_medians = b["median_s"] / a["median_s"]
        what = f"{b['via']} {b['op']} {b['fmt']} {b['size']}".strip()
        rows.append([what, str(len(p["ratios"])), fmt_t(a["median_s"]), fmt_t(b["median_s"]),
                     fmt_r(paired), fmt_r(of_medians),
                     f"{fmt_r(min(p['ratios']))}..{fmt_r(max(p['ratios']))}"])
        worst = max(worst, (paired, what))
    out += [md_table(["benchmark", "n", "before (median)", "after (median)",
                      "after/before (paired median)", "ratio of medians", "paired range"],
                     rows), ""]
    slower = [r[0] for r in rows if float(r[4].rstrip("x")) > 1.10]
    line = (f"**Target: nothing slower than before by more than 10%: "
            f"{'MET' if not slower else 'NOT MET'}** - worst paired ratio "
            f"{worst[0]:.2f}x ({worst[1]})"
            + (f"; over 1.10x: {', '.join(slower)}" if slower else "") + ".")
    out += [line, ""]
    return "\n".join(out), [line]


# ---------------------------------------------------------------- report


def md_table(head: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def by_key(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["key"]: v for v in res["variants"]}


def report_put_get(res: dict[str, Any]) -> tuple[str, list[str]]:
    v = by_key(res)
    out = [
        "### 1. put / get vs dd",
        "",
        "Every row ran in the same shuffled rounds; median and min over the rounds "
        "(n per size below). `lib` = in-process `Image.open` + `put`/`get` + `close` "
        "(fsyncs included, interpreter start not); `cli` = the whole `nvmgr` process. "
        "Baseline `dd write` = `dd if=FILE of=TARGET bs=4M conv=notrunc,fsync` into a "
        "same-sized, already written file on the same filesystem; `dd read` = "
        "`dd if=TARGET of=/dev/null bs=4M` (get writes to /dev/null too). "
        "Sections' both slots were written before timing (steady state: overwrite, "
        "no first allocation). Ratios are of medians (and of minima).",
        "",
    ]
    notes: list[str] = []
    for label in SIZES:
        ddw, ddr = v[f"{label} dd write"], v[f"{label} dd read"]
        n = len(ddw["samples_s"])
        rows = [["dd write (baseline)", fmt_t(ddw["median_s"]), fmt_t(ddw["min_s"]), "1.00x",
                 "1.00x", ""],
                ["dd read", fmt_t(ddr["median_s"]), fmt_t(ddr["min_s"]),
                 fmt_r(ddr["median_s"] / ddw["median_s"]), fmt_r(ddr["min_s"] / ddw["min_s"]),
                 "1.00x"]]
        for k, what in (("python -c pass", "CLI floor: `python -c pass`"),
                        ("import nvmgr.cli", "CLI floor: `python -c 'import nvmgr.cli'`")):
            x = v[k]
            rows.append([what, fmt_t(x["median_s"]), fmt_t(x["min_s"]),
                         fmt_r(x["median_s"] / ddw["median_s"]),
                         fmt_r(x["min_s"] / ddw["min_s"]), ""])
        for op in ("put", "get"):
            for via in ("lib", "cli"):
                for fmt in FORMATS:
                    for e in ("plain", "enc"):
                        x = v[f"{label} {op} {via} {fmt} {e}"]
                        rows.append([
                            f"{op} {via} {fmt} {e}", fmt_t(x["median_s"]), fmt_t(x["min_s"]),
                            fmt_r(x["median_s"] / ddw["median_s"]),
                            fmt_r(x["min_s"] / ddw["min_s"]),
                            fmt_r(x["median_s"] / ddr["median_s"]) if op == "get" else "",
                        ])
        out += [f"**{label}** (n = {n})", "",
                md_table(["variant", "median", "min", "x dd write (median)", "x dd write (min)",
                          "x dd read (median)"], rows), ""]
    x = v["64 MiB put cli raw plain"]
    y = v["64 MiB put lib raw plain"]
    ddw = v["64 MiB dd write"]
    rc, rl = x["median_s"] / ddw["median_s"], y["median_s"] / ddw["median_s"]
    verdict = "MET" if rc <= 2 else "NOT MET"
    line = (f"**Target: raw put of 64 MiB within 2x of dd: {verdict}** - CLI `nvmgr put` "
            f"{fmt_r(rc)} (min {fmt_r(x['min_s'] / ddw['min_s'])}), library {fmt_r(rl)} "
            f"(min {fmt_r(y['min_s'] / ddw['min_s'])}) of `dd ... conv=notrunc,fsync`.")
    out += [line, ""]
    notes.append(line)
    fl = v["import nvmgr.cli"]
    line = (f"The CLI's floor alone (`python -c 'import nvmgr.cli'`, no work) is "
            f"{fmt_t(fl['median_s'])} = {fmt_r(fl['median_s'] / ddw['median_s'])} of dd's "
            f"64 MiB write; `nvmgr put` minus that floor is "
            f"{fmt_t(x['median_s'] - fl['median_s'])} "
            f"({fmt_r((x['median_s'] - fl['median_s']) / ddw['median_s'])} of dd).")
    out += [line, ""]
    notes.append(line)
    out += ["Commands (last-run form; FILE/TARGET/IMG are in a temporary directory under /var/tmp):", "", "```"]
    seen = set()
    for label in ("64 MiB", "import"):
        for k, x in v.items():
            if k.startswith(label) and x["cmd"] not in seen:
                seen.add(x["cmd"])
                out.append(x["cmd"])
    out += ["```", ""]
    return "\n".join(out), notes


def report_directory(res: dict[str, Any]) -> tuple[str, list[str]]:
    v = by_key(res)
    base = v["python -c pass"]
    imp = v["import nvmgr.cli"]
    n = len(base["samples_s"])
    out = [
        "### 2. info / check vs number of sections",
        "",
        f"Whole `nvmgr` process, median and min of {n} shuffled rounds. Every section is "
        "4 KiB with 512..4096 random bytes in it (crc32 set, both header copies full). "
        "The ratio column is to the interpreter alone (`python -c pass`).",
        "",
    ]
    rows = [["`python -c pass`", "", fmt_t(base["median_s"]), fmt_t(base["min_s"]), "1.00x"],
            ["`python -c 'import nvmgr.cli'`", "", fmt_t(imp["median_s"]), fmt_t(imp["min_s"]),
             fmt_r(imp["median_s"] / base["median_s"])]]
    for cmd in ("info", "check"):
        for fmt in FORMATS:
            for k in (16, 256, 1024):
                x = v[f"{cmd} {fmt} {k}"]
                rows.append([f"`nvmgr {cmd}` {fmt}", str(k), fmt_t(x["median_s"]),
                             fmt_t(x["min_s"]), fmt_r(x["median_s"] / base["median_s"])])
    out += [md_table(["command", "sections", "median", "min", "x python -c pass"], rows), ""]
    notes = []
    for fmt in FORMATS:
        x = v[f"info {fmt} 1024"]
        ok = x["median_s"] < 0.5
        line = (f"**Target: info on 1,024 sections under 0.5 s ({fmt}): "
                f"{'MET' if ok else 'NOT MET'}** - median {fmt_t(x['median_s'])}, "
                f"min {fmt_t(x['min_s'])}.")
        out.append(line)
        notes.append(line)
    out += ["", "Commands: `" + v["info raw 1024"]["cmd"] + "`, `" + v["check raw 1024"]["cmd"]
            + "` (and the same on the .qcow2 image and for 16 and 256 sections).", ""]

    a = res["anatomy"]
    ip = a["in_process"]
    out += ["**Where the time of `nvmgr info` on 1,024 sections (raw) goes**", ""]
    rows = [["interpreter start (`python -c pass`)", fmt_t(base["median_s"])],
            ["+ `import nvmgr.cli` (all imports)", fmt_t(imp["median_s"] - base["median_s"])]]
    rows += [[k, fmt_t(x["median_s"])] for k, x in ip.items()]
    out += [md_table(["part", "median"], rows), ""]
    ds = a["decode_steps"]
    if "error" in ds:
        out += [f"(decode steps not measured: {ds['error']})", ""]
    else:
        out += [f"One header copy ({ds['der_bytes']} bytes of DER, {ds['sections']} sections), "
                "each step of `codec.decode_header` timed in process; `Image.open` decodes "
                "both copies (A and B), so twice this:", ""]
        tot = ds["codec.decode_header (all of the above)"]["median_s"]
        rows = [[k, fmt_t(x["median_s"]), fmt_t(x["min_s"]), f"{100 * x['median_s'] / tot:.0f}%"]
                for k, x in ds.items() if isinstance(x, dict)]
        out += [md_table(["step", "median", "min", "of decode_header"], rows), ""]
    cp = a["cprofile"]
    out += [f"cProfile (`{cp['cmd']}`; total {fmt_t(cp['total_s'])} under the profiler), "
            "self time by package:", "", "```"]
    out += [f"{k:<28} {fmt_t(t):>10}" for k, t in cp["tottime_by_package_s"].items()]
    out += ["```", "", "top functions by self time:", "", "```",
            f"{'calls':>8} {'self':>10} {'cumul':>10}  function"]
    out += [f"{r['calls']:>8} {fmt_t(r['tottime_s']):>10} {fmt_t(r['cumtime_s']):>10}  {r['func']}"
            for r in cp["by_tottime"][:12]]
    out += ["```", "", "nvmgr functions by cumulative time:", "", "```"]
    out += [f"{r['calls']:>8} {fmt_t(r['tottime_s']):>10} {fmt_t(r['cumtime_s']):>10}  {r['func']}"
            for r in cp["nvmgr_by_cumtime"][:10]]
    it = a["importtime"]
    out += ["```", "", f"`{it['cmd']}`: self time summed per top-level package:", "", "```"]
    out += [f"{k:<28} {us / 1000:8.1f} ms" for k, us in it["self_us_by_package"].items()]
    out += ["```", ""]
    return "\n".join(out), notes


def report_memory(res: dict[str, Any]) -> tuple[str, list[str]]:
    v = by_key(res)
    base = v["info (startup baseline)"]
    base_kib = statistics.median(base["extra"])
    n = len(base["samples_s"])
    out = [
        "### 3. Peak memory and throughput of check",
        "",
        f"Whole `nvmgr` process under `/usr/bin/time -v` (\"Maximum resident set size\"; for "
        f"qcow2 this is the larger of nvmgr and its qemu-storage-daemon child), {n} shuffled "
        "rounds. Cold cache = the image file evicted with posix_fadvise(DONTNEED) before each "
        "run. Throughput = section bytes / median wall time. The last column is RSS above "
        f"`nvmgr info` on a small image ({base_kib / 1024:.1f} MiB, interpreter + imports).",
        "",
    ]
    rows = []
    notes = []
    for k, x in v.items():
        kib = statistics.median(x["extra"])
        thr = ""
        if "bytes" in x:
            thr = f"{x['bytes'] / MiB / x['median_s']:.0f} MiB/s"
        rows.append([k, fmt_t(x["median_s"]), fmt_t(x["min_s"]), thr,
                     f"{kib / 1024:.1f} MiB (max {max(x['extra']) / 1024:.1f})",
                     f"{(kib - base_kib) / 1024:+.1f} MiB" if x.get("op") != "dd-read" else ""])
    out += [md_table(["command", "median", "min", "throughput", "max RSS (median)",
                      "RSS - info"], rows), ""]
    big = [x for k, x in v.items() if x.get("op") == "check" and x["bytes"] > 64 * MiB]
    worst = max(max(x["extra"]) for x in big) - base_kib
    stream = worst <= 32 * 1024
    line = (f"**check streams: {'YES' if stream else 'NO'}** - largest RSS above the "
            f"startup baseline while checking a {res['section_bytes'] // MiB} MiB section: "
            f"{worst / 1024:.1f} MiB (bound used: 32 MiB, i.e. a few 4 MiB chunks).")
    out += [line, ""]
    notes.append(line)
    hot = next(x for x in big if x.get("cache") == "hot" and x["fmt"] == "raw" and not x["enc"])
    cold = next(x for x in big if x.get("cache") == "cold")
    ddh = next(x for x in v.values() if x.get("op") == "dd-read" and x["cache"] == "hot")
    ddc = next(x for x in v.values() if x.get("op") == "dd-read" and x["cache"] == "cold")
    mib = res["section_bytes"] / MiB
    line = (f"check throughput on the {mib:.0f} MiB raw section (whole process): "
            f"{mib / hot['median_s']:.0f} MiB/s hot cache (dd: {mib / ddh['median_s']:.0f}), "
            f"{mib / cold['median_s']:.0f} MiB/s cold (dd: {mib / ddc['median_s']:.0f}).")
    out += [line, ""]
    notes.append(line)
    cp = res["check_profile"]
    out += [f"Where check's time goes ({cp['what']}; {fmt_t(cp['total_s'])}), top self time:",
            "", "```", f"{'calls':>8} {'self':>10} {'cumul':>10}  function"]
    out += [f"{r['calls']:>8} {fmt_t(r['tottime_s']):>10} {fmt_t(r['cumtime_s']):>10}  {r['func']}"
            for r in cp["by_tottime"]]
    out += ["```", "", "Commands:", "", "```"]
    out += list(dict.fromkeys(x["cmd"] for x in v.values()))
    out += ["```", ""]
    return "\n".join(out), notes


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def workdir(base: str, keep: bool) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="nvmgr-bench-", dir=base)
    try:
        yield d
    finally:
        if keep:
            log(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fewer repeats and a 256 MiB check image instead of 1 GiB")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: put, dir, mem, ab (default: put, dir, "
                    "mem, and ab when --baseline-tree is given)")
    ap.add_argument("--baseline-tree", metavar="PATH", default=None,
                    help="another checkout of nvmgr (e.g. before a change) to compare with, "
                    "run through PATH/.venv/bin/python when it exists (benchmark ab)")
    ap.add_argument("--after-tree", metavar="PATH", default=ROOT,
                    help="the checkout on the after side of benchmark ab (default: this one), "
                    "e.g. a worktree at the commit that ended a change")
    ap.add_argument("--no-results", action="store_true",
                    help="do not append to bench/RESULTS.md (JSON is still written)")
    ap.add_argument("--base", default="/var/tmp", help="where the temporary work directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--seed", type=int, default=None, help="seed of the shuffling")
    args = ap.parse_args(argv)
    known = {"put", "dir", "mem", "ab"}
    default = "put,dir,mem" + (",ab" if args.baseline_tree else "")
    only = {x.strip() for x in (args.only or default).split(",") if x.strip()}
    if only - known:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(only - known))}")
    if "ab" in only and not args.baseline_tree:
        ap.error("benchmark ab needs --baseline-tree PATH")
    if args.baseline_tree and not os.path.isfile(
            os.path.join(args.baseline_tree, "nvmgr", "__init__.py")):
        ap.error(f"--baseline-tree {args.baseline_tree}: no nvmgr package there")
    if not os.path.isfile(os.path.join(args.after_tree, "nvmgr", "__init__.py")):
        ap.error(f"--after-tree {args.after_tree}: no nvmgr package there")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    cmdline = "bench/run" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    with workdir(args.base, args.keep) as work:
        if sh(["stat", "-f", "-c", "%T", work]) in ("tmpfs", "ramfs"):
            log(f"warning: {work} is on tmpfs, fsync costs nothing there")
        info = machine_info(work)
        info["bytecode"] = compile_bytecode(sys.executable, ROOT)
        log("machine: " + json.dumps(info))
        key_file = os.path.join(work, "kek.bin")
        write_file(key_file, os.urandom(32), 0o600)
        os.chmod(key_file, 0o600)
        if "put" in only:
            results["put_get"] = bench_put_get(work, key_file, rng, args.quick)
        if "dir" in only:
            results["directory"] = bench_directory(work, rng, args.quick)
        if "mem" in only:
            results["memory"] = bench_memory(work, key_file, rng, args.quick)
        if "ab" in only:
            results["ab"] = bench_ab(work, str(args.baseline_tree), str(args.after_tree),
                                     rng, args.quick)
    elapsed = time.perf_counter() - t_start
    info["loadavg_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta = {"command": cmdline, "quick": args.quick, "seed": seed, "machine": info,
            "elapsed_s": elapsed, "cli": short(CLI) + f" = {shlex.join(CLI)}"}
    os.makedirs(OUT, exist_ok=True)
    for name, res in results.items():
        for suffix in (stamp, "latest"):
            with open(os.path.join(OUT, f"{name}-{suffix}.json"), "w") as f:
                json.dump({**meta, name: res}, f, indent=1)

    sections = []
    notes: list[str] = []
    for name, fn in (("put_get", report_put_get), ("directory", report_directory),
                     ("memory", report_memory), ("ab", report_ab)):
        if name in results:
            text, n = fn(results[name])
            sections.append(text)
            notes += n
    head = [
        f"## {info['date']}{' (quick)' if args.quick else ''}",
        "",
        f"Command: `{cmdline}` (from the repository root; {elapsed:.0f} s; shuffle seed {seed}). "
        f"`nvmgr` below is `{shlex.join(CLI)}`. Raw samples: "
        f"`bench/out/*-{stamp}.json`.",
        "",
        md_table(["machine", ""], [[k, str(x).replace("|", "/")] for k, x in info.items()]),
        "",
        "Summary:",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    md = "\n".join(head) + "\n" + "\n".join(sections)
    print(md)
    if not args.no_results:
        new = not os.path.exists(RESULTS)
        with open(RESULTS, "a") as f:
            if new:
                f.write("# nvmgr benchmark results\n\nProduced by `bench/run` "
                        "(see `bench/bench_image.py`); each run appends a dated section.\n\n")
            f.write(md + "\n")
        log(f"appended to {RESULTS}")
    log(f"done in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
