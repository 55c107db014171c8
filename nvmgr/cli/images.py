"""Commands on an image: create, info, list, put, get, remove, check, grow,
resize, rekey, dump, snapshot, convert."""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import stat
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nvmgr.cli.common import (
    Result,
    _add_image,
    _add_key_args,
    _open,
    _progress,
    _section_spec,
    arguments,
    command,
    domain_key,
    load_key,
    resolve_image,
)
from nvmgr.errors import ExitCode, UsageError
from nvmgr.units import format_size, parse_size

if TYPE_CHECKING:
    from nvmgr.image.image import Image


def _sections_table(sections: list[dict[str, Any]]) -> str:
    split = any(s.get("member") for s in sections)
    rows = [("NAME", "BINDING", "LENGTH", "CAPACITY", "CRC32", "FLAGS", "OFFSET")
            + (("MEMBER",) if split else ())]
    for s in sections:
        flags = ",".join(f for f in ("encrypted", "live", "dirty") if s[f]) or "-"
        rows.append((s["name"], s["binding"], str(s["length"]), str(s["capacity"]),
                     s["crc32"], flags, str(s["offset"]))
                    + ((str(s["member"] or "-"),) if split else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# ---------------------------------------------------------------- commands

@arguments("create")
def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE",
                   help="the file to create (never overwritten), an rbd:POOL/IMAGE... "
                   "location, or an NBD URI of a blank export (all zeros: written into)")
    p.add_argument("--section", "-s", action="append", default=[], metavar="NAME:SIZE[:BINDING]",
                   help="a section and its worst-case size (K/M/G suffixes); binding is one of "
                        "opaque (default), pflash, tpm, block, fwcfg. Repeat for more sections.")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--domain-uuid", metavar="UUID", help="record the owning domain's UUID")
    _add_key_args(p)


@command("create", "create an image with empty sections (with a key, every section is "
         "encrypted: pflash and block ones are LUKS volumes, SIZE what the device sees)",
         "nvmgr create vm1.nvram -f qcow2 -s efivars:528K:pflash -s tpm-permall:128K:tpm "
         "--key-file /etc/nvmgr/vm1.key", render=lambda r: _render_info(r))
def cmd_create(args: argparse.Namespace) -> Result:
    from nvmgr.image.image import Image

    kek = load_key(args)
    specs = [_section_spec(s, luks=kek is not None) for s in args.section]
    dom = None
    if args.domain_uuid:
        try:
            dom = uuid.UUID(args.domain_uuid)
        except ValueError:
            raise UsageError(f"--domain-uuid {args.domain_uuid!r} is not a UUID") from None
    with Image.create(args.image, specs, fmt=args.format, kek=kek, domain_uuid=dom) as img:
        info: Result = _info(img)
        return info


def _info(img: Image) -> Result:
    d: Result = img.directory.to_json()
    d["path"] = img.path
    d["format"] = img.fmt
    d["file_size"] = img.container.size()
    # Sections as stored (a member's entry for those in a member image), and
    # each member as found: checked against this directory, or why not.
    d["sections"] = [s.to_json() for s in img.sections()]
    for m in d["members"]:
        m["resolved_path"] = img.member_path(img.directory.member(m["index"]))  # type: ignore[arg-type]
        m["sections"] = [s.name for s in img.member_sections(m["index"])]
    return d


def _render_info(r: Result) -> str:
    lines = [
        f"image: {r['path']}",
        f"format: {r['format']}",
        f"image uuid: {r['image_uuid']}",
        f"domain uuid: {r['domain_uuid'] or '-'}",
        f"generation: {r['generation']}",
        f"size: {format_size(r['image_size'])} (header areas 2 x {format_size(r['header_area'])})",
        f"encrypted: {'yes, ' + str(len(r['key_slots'])) + ' key slot(s)' if r['encrypted'] else 'no'}",
        f"sections: {len(r['sections'])}",
    ]
    if r.get("runner") or r.get("incoming"):  # a VM runs on it (or migrates to a host)
        who = r["runner"]
        lines.insert(-1, "running: " + (f"run {who['run'][:8]} on host {who['host']}"
                                        if who else "a VM started before nvmgr recorded runs")
                     + (f", migrating to host {r['incoming']['host']}" if r["incoming"] else ""))
    if r.get("parent"):
        lines.insert(-1, f"member of: image {r['parent']}")
    for m in r.get("members") or []:
        lines.insert(-1, f"member {m['index']}: {m['resolved_path']} "
                         f"({m['format'] or 'format probed'}, image {m['image_uuid']}): "
                         f"{', '.join(m['sections']) or 'no sections'}")
    if r["sections"]:
        lines += ["", _sections_table(r["sections"])]
    return "\n".join(lines)


@arguments("info")
def _info_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)


@command("info", "show the image's directory", "nvmgr info vm1.nvram --output json",
         render=_render_info)
def cmd_info(args: argparse.Namespace) -> Result:
    with _open(args, with_key=False) as img:
        return _info(img)


@arguments("list")
def _list_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)


@command("list", "list the sections", "nvmgr list vm1.nvram",
         render=lambda r: _sections_table(r["sections"]))
def cmd_list(args: argparse.Namespace) -> Result:
    with _open(args, with_key=False) as img:
        return {"sections": [s.to_json() for s in img.sections()]}


@arguments("put")
def _put_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("file", metavar="FILE", help="the bytes to store, or - for standard input")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another nvmgr writer instead of failing at once")
    p.add_argument("--progress", "-p", action="store_true", help="show progress on stderr")
    p.add_argument("--force", action="store_true",
                   help="write a live section even though the prepare hook marked it in use "
                        "(only when no VM runs on the image: a host crash left the mark)")
    _add_key_args(p)


@command("put", "store a file's bytes in a section (crash-safe)",
         "nvmgr put vm1.nvram nic0-eeprom eeprom.bin",
         render=lambda r: (f"{r['section']['name']}: {r['section']['length']} bytes stored "
                           f"(crc32 {r['section']['crc32']}"
                           f"{', encrypted' if r['section']['encrypted'] else ''}), "
                           f"generation {r['generation']}"))
def cmd_put(args: argparse.Namespace) -> Result:
    with contextlib.ExitStack() as stack:
        data: bytes | mmap.mmap
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            try:
                f = stack.enter_context(open(args.file, "rb"))
            except FileNotFoundError:
                from nvmgr.errors import NotFoundError
                raise NotFoundError(f"no such file: {args.file}") from None
            except IsADirectoryError:
                raise UsageError(f"{args.file} is a directory") from None
            size = os.fstat(f.fileno()).st_size
            if size and stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                # Map it: no 64 MiB copy into Python before the crc and the write.
                data = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            else:
                data = f.read()
        img = stack.enter_context(_open(args, writable=True))
        s = img.put(args.name, data, progress=_progress(args, f"put {args.name}"),
                    force=args.force)
        return {"image": img.path, "section": s.to_json(), "generation": img.directory.generation}


@arguments("get")
def _get_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("-o", "--output-file", metavar="FILE",
                   help="write here instead of standard output ('-': standard output, "
                        "as put reads '-' from standard input); a new FILE is 0600, one "
                        "replaced keeps its mode, and FILE changes only once the bytes "
                        "are verified")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for an nvmgr writer instead of failing at once")
    _add_key_args(p)


@contextlib.contextmanager
def _published(path: str) -> Iterator[int | None]:
    """An anonymous file (``O_TMPFILE``) in *path*'s directory that becomes *path*
    only when the block ends without an exception; None where that cannot be done
    (*path* exists and is not a regular file, or the file system has no
    ``O_TMPFILE``): the caller then writes *path* itself, verified bytes only.

    *path* is replaced by a rename, so a failed or killed ``get`` leaves the old
    file whole or no file.  A file it replaces keeps its mode and owner, and the
    new one is fsync'ed first (the old content is at stake); the replacement is a
    new inode, as with ``cp --remove-destination``.
    """
    try:
        old: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        old = None
    dfd = tmp = -1
    if (old is None or stat.S_ISREG(old.st_mode)) and os.path.isdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # no O_TMPFILE here, or no such directory
            dfd = os.open(os.path.dirname(os.path.abspath(path)),
                          os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            tmp = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    if tmp < 0:
        if dfd >= 0:
            os.close(dfd)
        yield None
        return
    try:
        yield tmp
        if old is not None:
            os.fchmod(tmp, stat.S_IMODE(old.st_mode))
            with contextlib.suppress(PermissionError):
                os.fchown(tmp, old.st_uid, old.st_gid)
            os.fsync(tmp)
        base = os.path.basename(path)
        name = f".{base}.nvmgr-{uuid.uuid4().hex[:8]}"
        # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc link: the file gets a name.
        os.link(f"/proc/self/fd/{tmp}", name, dst_dir_fd=dfd, follow_symlinks=True)
        try:
            os.replace(name, base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)
            raise
    finally:
        os.close(tmp)
        os.close(dfd)


def _write_all(fd: int, chunk: bytes | bytearray | memoryview) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        view = view[os.write(fd, view):]


@command("get", "write a section's bytes out, verified and decrypted",
         "nvmgr get vm1.nvram efivars -o vars.fd")
def cmd_get(args: argparse.Namespace) -> Result:
    # Streamed in chunks (Image.get_to): a section of any size costs one chunk of memory.
    if args.output_file == "-":
        args.output_file = None
    with _open(args) as img:
        img.section(args.name)  # not found: before the output file is created
        if not args.output_file and getattr(args, "output", "text") == "json":
            raise UsageError("get with --output json needs -o FILE (the payload is binary)")
        if args.output_file:
            with _published(args.output_file) as tmp:
                if tmp is not None:
                    # Written as read (the next pieces on their way meanwhile); a
                    # corrupted section raises before the file is published.
                    length = img.get_to(args.name, lambda b: _write_all(tmp, b),
                                        verified_first=False)
                    return {"section": args.name, "length": length,
                            "file": args.output_file}
            # Opened at the first verified chunk: a corrupted section leaves no file.
            with contextlib.ExitStack() as stack:
                out: list[Any] = []

                def write(chunk: bytes | bytearray | memoryview) -> None:
                    if not out:
                        fd = os.open(args.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                     0o600)
                        out.append(stack.enter_context(os.fdopen(fd, "wb")))
                    out[0].write(chunk)

                length = img.get_to(args.name, write)
                if not out:
                    write(b"")
            return {"section": args.name, "length": length, "file": args.output_file}
        img.get_to(args.name, sys.stdout.buffer.write)
    sys.stdout.flush()
    return {"_silent": True}


@arguments("remove")
def _remove_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--force", action="store_true",
                   help="write a live section even though the prepare hook marked it in use "
                        "(only when no VM runs on the image: a host crash left the mark)")
    _add_key_args(p)


@command("remove", "remove a section from the directory (an encrypted section that holds "
         "data: with the image's key)", "nvmgr remove vm1.nvram old-vpd")
def cmd_remove(args: argparse.Namespace) -> Result:
    with _open(args, writable=True) as img:
        img.remove(args.name, force=args.force)
        return {"image": img.path, "removed": args.name, "generation": img.directory.generation}


def _render_check(r: Result) -> str:
    lines = [f"{s['name']}: {s['status']} ({s['detail']})" for s in r["sections"]]
    if r.get("repaired"):
        lines.append(f"repaired: resealed live section(s) {', '.join(r['repaired'])} with the "
                     "bytes they hold")
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines += [f"error: {e}" for e in r["errors"]]
    if r.get("hint"):
        lines.append(f"hint: {r['hint']}")
    lines.append("No errors were found on the image." if r["ok"]
                 else f"{len(r['errors'])} error(s) were found on the image.")
    return "\n".join(lines)


@arguments("check")
def _check_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("--progress", "-p", action="store_true", help="show progress on stderr")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for an nvmgr writer instead of failing at once")
    p.add_argument("--repair", action="store_true",
                   help="the VM is stopped: reseal live sections (UEFI vars, block) whose crc "
                        "no longer matches, or that a crash left marked in use, with the bytes "
                        "they hold (the guest's own); needs --yes")
    p.add_argument("--yes", action="store_true",
                   help="confirm --repair: the administrator's say-so that no VM runs on the image")
    _add_key_args(p)


@command("check", "verify both header copies and every section's crc32 (and MAC with a key); "
         "exit 4 when anything is corrupted; --repair --yes reseals live sections",
         "nvmgr check vm1.nvram --key-file /etc/nvmgr/vm1.key --output json\n"
         "  nvmgr check vm1.nvram --repair --yes   # after a power loss, the VM stopped",
         render=_render_check)
def cmd_check(args: argparse.Namespace) -> Result:
    if args.yes and not args.repair:
        raise UsageError("--yes confirms --repair: give --repair --yes")
    if args.repair and not args.yes:
        raise UsageError("--repair takes the bytes in live sections as their content (the "
                         "guest's own UEFI variables); confirm that no VM runs on the image "
                         "with --repair --yes")
    repaired: list[str] = []
    with _open(args, writable=args.repair) as img:
        if args.repair:
            repaired = img.repair()
        report = img.check(progress=_progress(args, "check"))
    r: Result = report.to_json()
    if args.repair:
        r["repaired"] = repaired
    hint = report.repair_hint()
    if hint:
        r["hint"] = hint
    if not report.ok:
        r["_exit"] = ExitCode.CORRUPT
    return r


@arguments("grow")
def _grow_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("--section", "-s", action="append", default=[], required=True,
                   metavar="NAME:SIZE[:BINDING]", help="a section to add (repeatable)")
    p.add_argument("--content", action="append", default=[], metavar="NAME=FILE",
                   help="the bytes a new section starts with, in the image before the section "
                        "is (repeatable; encrypted sections need the key)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")
    _add_key_args(p)


def _contents(pairs: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--content {pair!r}: use NAME=FILE")
        with open(path, "rb") as f:
            out[name] = f.read(MAX_SECTION_SIZE_READ + 1)
        if len(out[name]) > MAX_SECTION_SIZE_READ:
            raise UsageError(f"--content {pair!r}: more than {MAX_SECTION_SIZE_READ:,} bytes; "
                             "grow the section empty and put the file with nvmgr put")
    return out


#: Largest --content file read into memory (nvmgr put streams larger ones).
MAX_SECTION_SIZE_READ = 256 << 20


@command("grow", "add sections, growing the image; nothing existing moves, freed space is "
         "reused first", "nvmgr grow vm1.nvram -s pci-vpd:32K:fwcfg --content pci-vpd=vpd.bin",
         render=_render_info)
def cmd_grow(args: argparse.Namespace) -> Result:
    from nvmgr.provision.prepare import grow

    contents = _contents(args.content)
    live = any(_section_spec(s).binding.live for s in args.section)
    # The key for contents to encrypt, and for a live section of an encrypted image
    # (a LUKS volume, made before the commit that adds it).
    with _open(args, writable=True, with_key=bool(contents) or live) as img:
        grow(img, [_section_spec(s, luks=img.directory.encrypted) for s in args.section],
             contents=contents)
        return _info(img)


@arguments("resize")
def _resize_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("size", metavar="SIZE", help="its new worst-case size (K/M/G suffixes)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--force", action="store_true",
                   help="write a live section even though the prepare hook marked it in use "
                        "(only when no VM runs on the image: a host crash left the mark)")


@command("resize", "change a section's worst-case size (moves non-live sections if needed)",
         "nvmgr resize vm1.nvram tpm-permall 256K", render=_render_info)
def cmd_resize(args: argparse.Namespace) -> Result:
    with _open(args, writable=True, with_key=False) as img:
        img.resize_section(args.name, parse_size(args.size), force=args.force)
        return _info(img)


@arguments("rekey")
def _rekey_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    _add_key_args(p)
    g = p.add_argument_group("the new key")
    g.add_argument("--new-key-file", metavar="FILE", help="the new key-encryption key file")
    g.add_argument("--new-key-secret", metavar="UUID", help="the new key as a libvirt secret")
    p.add_argument("--keep-old", action="store_true",
                   help="keep the current key's slot too (add a key instead of replacing it)")
    p.add_argument("--remove-key-id", metavar="HEX", help="drop the key slot with this id instead")
    p.add_argument("--seal-directory", action="store_true",
                   help="instead: authenticate the directory of an image written before nvmgr "
                        "authenticated directories (every section's MAC is checked first)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")


@command("rekey", "replace (or add) a key-encryption key without rewriting section data",
         "nvmgr rekey vm1.nvram --key-file old.key --new-key-file new.key")
def cmd_rekey(args: argparse.Namespace) -> Result:
    from nvmgr.crypto import keys
    from nvmgr.virt import secrets

    if args.seal_directory:
        from nvmgr.image.image import Image

        kek = load_key(args)
        if kek is None:
            raise UsageError("--seal-directory needs the image's key (--key-file, --key-secret "
                             "or --key-stdin)")
        with Image.open(resolve_image(args), writable=True, kek=kek, wait=args.wait,
                        unsealed=True) as img:
            img.seal_directory()
            return {"image": img.path, "generation": img.directory.generation,
                    "sealed": True}
    with _open(args, writable=True) as img:
        if args.remove_key_id:
            try:
                key_id = bytes.fromhex(args.remove_key_id)
            except ValueError:
                raise UsageError(f"--remove-key-id {args.remove_key_id!r} is not hex") from None
            img.remove_key(key_id)
        else:
            if bool(args.new_key_file) == bool(args.new_key_secret):
                raise UsageError("give the new key with --new-key-file or --new-key-secret")
            new = (keys.load_key_file(args.new_key_file) if args.new_key_file
                   else secrets.load_libvirt_secret(args.new_key_secret, args.connect))
            img.rekey(new, keep_old=args.keep_old)
        return {"image": img.path, "generation": img.directory.generation,
                "key_slots": img.directory.to_json()["key_slots"]}


@arguments("dump")
def _dump_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("--asn1", action="store_true",
                   help="print the directory in ASN.1 value notation instead")
    p.add_argument("--der", metavar="FILE",
                   help="write the current header copy's DER to FILE (for openssl asn1parse)")


@command("dump", "print the directory (JSON, ASN.1 value notation, or raw DER)",
         "nvmgr dump vm1.nvram --asn1")
def cmd_dump(args: argparse.Namespace) -> Result:
    from nvmgr.format import codec

    with _open(args, with_key=False) as img:
        d = img.directory
        mac = d.mac  # an encrypted image's directory MAC, as the header copy holds it
        blob = codec.encode_header(d, (lambda _der: mac) if mac is not None else None)
        if args.der:
            with open(args.der, "wb") as f:
                f.write(blob)
        if args.asn1:
            # pyasn1 renders the value notation: the one command that loads it.
            from nvmgr.format import asn1

            return {"_text": asn1.value_notation(d)}
        r: Result = d.to_json()
        r["headers"] = [h.__dict__ for h in img.headers]
        return r


def _snapshot_render(r: Result) -> str:
    if "snapshots" in r:
        rows = [f"{s.get('id', '-')}\t{s.get('kind', 'internal')}\t{s.get('date', '')}\t"
                f"{s.get('name', '')}" for s in r["snapshots"]]
        return "\n".join(["ID\tKIND\tDATE\tNAME", *rows]) if rows else "no snapshots"
    paused = (f" (guest paused {r['paused_ms']:.1f} ms)" if r.get("paused_ms") is not None
              else "")
    return f"{r['action']} {r['name']}: done{paused}"


@arguments("snapshot")
def _snapshot_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("action", choices=("create", "list", "apply", "revert", "delete"))
    p.add_argument("name", metavar="NAME", nargs="?", help="snapshot name")
    _add_key_args(p)


@command("snapshot", "snapshots of every section: with --domain, of a running or stopped VM "
         "(stored beside the image, like backups; a qcow2 image's internal ones too); "
         "of an IMAGE, qcow2 internal snapshots (VM stopped)",
         "nvmgr snapshot --domain vm1 create before-upgrade", render=_snapshot_render)
def cmd_snapshot(args: argparse.Namespace) -> Result:
    from nvmgr.storage import qcow2
    from nvmgr.storage.container import probe_format

    if args.domain:
        return _domain_snapshot(args)
    path = resolve_image(args)
    fmt = probe_format(path)
    if fmt not in ("qcow2", "rbd"):
        raise UsageError("image snapshots need a qcow2 image (nvmgr convert IMAGE OUT -f qcow2) "
                         "or an RBD image", image=path)
    store: Any = qcow2
    if fmt == "rbd":  # Ceph's own snapshots; no image lock of QEMU's tells a running VM
        from nvmgr.errors import BusyError
        from nvmgr.image.image import Image
        from nvmgr.storage import rbd

        store = rbd
        with Image.open(path) as img:
            if args.action != "list" and any(s.live and s.dirty
                                              for s in img.directory.sections):
                raise BusyError("a VM runs on the image (its live sections are marked in "
                                "use); stop it first", image=path)
    if args.action == "list":
        return {"snapshots": [{**s, "kind": "internal" if store is qcow2 else "rbd"}
                              for s in store.snapshot_list(path)]}
    if not args.name:
        raise UsageError(f"snapshot {args.action} needs a NAME")
    fn = {"create": store.snapshot_create, "apply": store.snapshot_apply,
          "revert": store.snapshot_apply, "delete": store.snapshot_delete}[args.action]
    fn(path, args.name)
    return {"action": args.action, "name": args.name, "image": path}


def _domain_snapshot(args: argparse.Namespace) -> Result:
    from nvmgr.virt import backup as snap

    if args.action == "list":
        return {"snapshots": snap.snapshot_list(args.domain, uri=args.connect)}
    if not args.name:
        raise UsageError(f"snapshot {args.action} needs a NAME")
    if args.action == "create":
        return snap.snapshot_create(args.domain, args.name, uri=args.connect,
                                    kek=domain_key(args, args.domain))
    if args.action in ("apply", "revert"):
        return snap.snapshot_revert(args.domain, args.name, uri=args.connect,
                                    kek=domain_key(args, args.domain))
    return snap.snapshot_delete(args.domain, args.name, uri=args.connect)


@arguments("convert")
def _convert_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("output", metavar="OUTPUT", help="the new image (never overwritten)")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"), required=True)


@command("convert", "copy an image into another container format (qemu-img convert)",
         "nvmgr convert vm1.nvram vm1.qcow2 -f qcow2")
def cmd_convert(args: argparse.Namespace) -> Result:
    from nvmgr.image.convert import convert

    src = resolve_image(args)
    convert(src, args.output, args.format)
    return {"image": src, "output": args.output, "format": args.format}


# ---------------------------------------------------------------- members

def _member_render(r: Result) -> str:
    verb = "split" if r["action"] == "split" else "merged"
    where = "into" if r["action"] == "split" else "back from"
    out = (f"{verb} {', '.join(r['sections'])} {where} member {r['index']} ({r['member']})"
           + ("; member file removed" if r.get("removed") else ""))
    if r.get("reconciled"):
        out += f"\ndomain {r['reconciled']}: {r['reconcile_status']}"
    elif r.get("hint"):
        out += f"\n{r['hint']}"
    return out


def _after_move(args: argparse.Namespace, img_path: str, moved_live: list[str],
                res: Result) -> Result:
    """Rewire the domain whose live sections moved (QEMU's arguments name the file and
    offset of each); without --domain, say what to run."""
    if args.domain:
        from nvmgr.virt.define import reconcile

        rr = reconcile(args.domain, uri=args.connect)
        res["reconciled"], res["reconcile_status"] = args.domain, rr.status
    elif moved_live:
        res["hint"] = (f"live section(s) {', '.join(moved_live)} moved: run 'nvmgr reconcile "
                       "DOMAIN' for the domain that uses this image before its next start "
                       "(the start is refused until its QEMU arguments name the new place)")
    return res


@arguments("split")
def _split_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("sections", metavar="SECTION", nargs="+", help="the sections to move")
    p.add_argument("--into", required=True, metavar="MEMBER",
                   help="the member image: a new file (another directory, an rbd: location) "
                        "or a member the image already has")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"),
                   help="container format of a new member (default: the image's)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another nvmgr writer instead of failing at once")
    p.add_argument("--force", action="store_true",
                   help="move a live section the prepare hook marked in use (only when no VM "
                        "runs on the image: a host crash left the mark)")
    _add_key_args(p)


@command("split", "move sections into a member image (crash-safe; VM stopped for live ones)",
         "nvmgr split --domain vm1 uefi-vars --into /srv/fast/vm1-vars.nvram",
         render=_member_render)
def cmd_split(args: argparse.Namespace) -> Result:
    from nvmgr.image.members import split

    with _open(args, writable=True) as img:
        r = split(img, args.sections, args.into, fmt=args.format, force=args.force)
        live = [n for n in args.sections if img.directory.find(n) is not None
                and img.section(n).live]
        path = img.path
    return _after_move(args, path, live, {"action": "split", **r.to_json()})


@arguments("merge")
def _merge_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("member", metavar="MEMBER", help="the member image to bring back")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another nvmgr writer instead of failing at once")
    p.add_argument("--force", action="store_true",
                   help="move a live section the prepare hook marked in use (only when no VM "
                        "runs on the image: a host crash left the mark)")
    _add_key_args(p)


@command("merge", "bring a member image's sections back into the image, remove the member",
         "nvmgr merge --domain vm1 /srv/fast/vm1-vars.nvram", render=_member_render)
def cmd_merge(args: argparse.Namespace) -> Result:
    from nvmgr.image.members import merge

    with _open(args, writable=True) as img:
        r = merge(img, args.member, force=args.force)
        live = [n for n in r.sections if img.section(n).live]
        path = img.path
    return _after_move(args, path, live, {"action": "merge", **r.to_json()})
