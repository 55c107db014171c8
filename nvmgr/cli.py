"""The ``nvmgr`` command line: a thin layer over the library.

Each command is a function that takes parsed arguments and returns a result
(a dict, printed as JSON with ``--output json`` or by the command's own
text renderer).  Errors are turned into messages and exit codes here and
only here (see :mod:`nvmgr.errors` for the codes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import os
import signal
import stat
import sys
import uuid
from collections.abc import Callable
from typing import Any

from . import __version__
from .errors import ExitCode, NvmgrError, UsageError
from .units import format_size, parse_size

log = logging.getLogger("nvmgr")

EXIT_CODES_TEXT = """exit codes:
  0  success                 6  the image is encrypted and no key was given
  1  other error             7  busy: another nvmgr writer, or a running VM
  2  usage: bad arguments    8  no space: data larger than a section, image full
  3  not found               9  invalid input: hostile or malformed domain XML
  4  corrupted (check found 10  an external tool failed (qemu-img, libvirt)
     errors, bad DER, foreign image)
  5  wrong key
"""

Result = dict[str, Any]
Handler = Callable[[argparse.Namespace], Result]
Renderer = Callable[[Result], str]


class _Command:
    def __init__(self, name: str, summary: str, example: str, handler: Handler,
                 render: Renderer | None) -> None:
        self.name, self.summary, self.example = name, summary, example
        self.handler, self.render = handler, render


COMMANDS: dict[str, _Command] = {}
_SETUP: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def command(name: str, summary: str, example: str,
            render: Renderer | None = None) -> Callable[[Handler], Handler]:
    """Register a subcommand; its ``--help`` ends with *example*."""
    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = _Command(name, summary, example, fn, render)
        return fn
    return deco


def arguments(name: str) -> Callable[[Callable[[argparse.ArgumentParser], None]],
                                      Callable[[argparse.ArgumentParser], None]]:
    def deco(fn: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        _SETUP[name] = fn
        return fn
    return deco


# ---------------------------------------------------------------- helpers

def _progress(args: argparse.Namespace, what: str) -> Callable[[int, int], None] | None:
    if not getattr(args, "progress", False):
        return None
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if pct != last[0]:
            last[0] = pct
            sys.stderr.write(f"\r{what}: {pct:3d}% ({format_size(done)} of {format_size(total)})")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return report


def load_key(args: argparse.Namespace) -> Any:
    """The key-encryption key from --key-file, --key-secret or --key-stdin, or None."""
    from . import keys

    given = [x for x in ("key_file", "key_secret", "key_stdin") if getattr(args, x, None)]
    if len(given) > 1:
        raise UsageError("give the key one way only: --key-file, --key-secret or --key-stdin")
    if getattr(args, "key_file", None):
        return keys.load_key_file(args.key_file)
    if getattr(args, "key_secret", None):
        return keys.load_libvirt_secret(args.key_secret, getattr(args, "connect", None))
    if getattr(args, "key_stdin", False):
        return keys.load_key_stream(sys.stdin.buffer)
    return None


def _add_key_args(p: argparse.ArgumentParser, *, prefix: str = "key") -> None:
    g = p.add_argument_group("keys (never on the command line itself)")
    g.add_argument(f"--{prefix}-file", metavar="FILE",
                   help="key-encryption key: a 0600 file of 32 bytes, raw or 64 hex digits")
    g.add_argument(f"--{prefix}-secret", metavar="UUID",
                   help="key-encryption key: the value of a libvirt secret (32 bytes)")
    g.add_argument(f"--{prefix}-stdin", action="store_true",
                   help="read the key-encryption key from standard input")


def _add_image(p: argparse.ArgumentParser) -> None:
    # Optional so that "--domain NAME SECTION" works: argparse gives IMAGE
    # nothing when only the later positionals are present.
    p.add_argument("image", metavar="IMAGE", nargs="?",
                   help="the nvmgr image file (or give --domain)")
    p.add_argument("--domain", metavar="NAME",
                   help="use the image recorded in this libvirt domain's nvmgr metadata")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt connection URI")


def resolve_image(args: argparse.Namespace) -> str:
    """IMAGE, or the image named by --domain's nvmgr metadata."""
    if getattr(args, "domain", None):
        from .virt import image_of_domain

        path: str = image_of_domain(args.domain, args.connect)
        if args.image and os.path.abspath(args.image) != os.path.abspath(path):
            raise UsageError(f"--domain {args.domain} uses {path}, not {args.image}")
        return path
    if not args.image:
        raise UsageError("name an IMAGE or give --domain NAME")
    return str(args.image)


def _open(args: argparse.Namespace, *, writable: bool = False, with_key: bool = True) -> Any:
    from .image import Image

    return Image.open(resolve_image(args), writable=writable,
                      kek=load_key(args) if with_key else None,
                      wait=getattr(args, "wait", 0.0) or 0.0)


def _section_spec(text: str, encrypted: bool = False) -> Any:
    from .layout import SectionSpec
    from .model import Binding

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise UsageError(f"--section {text!r}: use NAME:SIZE or NAME:SIZE:BINDING")
    binding = Binding.parse(parts[2]) if len(parts) == 3 else Binding.OPAQUE
    return SectionSpec(parts[0], parse_size(parts[1], what=f"size of section {parts[0]}"),
                       binding, encrypted=encrypted and not binding.live)


def _sections_table(sections: list[dict[str, Any]]) -> str:
    rows = [("NAME", "BINDING", "LENGTH", "CAPACITY", "CRC32", "FLAGS", "OFFSET")]
    for s in sections:
        flags = ",".join(f for f in ("encrypted", "live", "dirty") if s[f]) or "-"
        rows.append((s["name"], s["binding"], str(s["length"]), str(s["capacity"]),
                     s["crc32"], flags, str(s["offset"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# ---------------------------------------------------------------- commands

@arguments("create")
def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="the file to create (never overwritten)")
    p.add_argument("--section", "-s", action="append", default=[], metavar="NAME:SIZE[:BINDING]",
                   help="a section and its worst-case size (K/M/G suffixes); binding is one of "
                        "opaque (default), pflash, tpm, block, fwcfg. Repeat for more sections.")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"), default="raw")
    p.add_argument("--domain-uuid", metavar="UUID", help="record the owning domain's UUID")
    _add_key_args(p)


@command("create", "create an image with empty sections",
         "nvmgr create vm1.nvram -f qcow2 -s efivars:528K:pflash -s tpm-permall:128K:tpm "
         "--key-file /etc/nvmgr/vm1.key", render=lambda r: _render_info(r))
def cmd_create(args: argparse.Namespace) -> Result:
    from .image import Image

    kek = load_key(args)
    specs = [_section_spec(s) for s in args.section]
    dom = None
    if args.domain_uuid:
        try:
            dom = uuid.UUID(args.domain_uuid)
        except ValueError:
            raise UsageError(f"--domain-uuid {args.domain_uuid!r} is not a UUID") from None
    with Image.create(args.image, specs, fmt=args.format, kek=kek, domain_uuid=dom) as img:
        info: Result = _info(img)
        return info


def _info(img: Any) -> Result:
    d: Result = img.directory.to_json()
    d["path"] = img.path
    d["format"] = img.fmt
    d["file_size"] = img.container.size()
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
        return {"sections": [s.to_json() for s in img.directory.sections]}


@arguments("put")
def _put_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("file", metavar="FILE", help="the bytes to store, or - for standard input")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another nvmgr writer instead of failing at once")
    p.add_argument("--progress", "-p", action="store_true", help="show progress on stderr")
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
                from .errors import NotFoundError
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
        s = img.put(args.name, data, progress=_progress(args, f"put {args.name}"))
        return {"image": img.path, "section": s.to_json(), "generation": img.directory.generation}


@arguments("get")
def _get_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("-o", "--output-file", metavar="FILE",
                   help="write here (created 0600) instead of standard output")
    _add_key_args(p)


@command("get", "write a section's bytes out, verified and decrypted",
         "nvmgr get vm1.nvram efivars -o vars.fd")
def cmd_get(args: argparse.Namespace) -> Result:
    with _open(args) as img:
        data = img.get(args.name)
    if args.output_file:
        fd = os.open(args.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return {"section": args.name, "length": len(data), "file": args.output_file}
    if getattr(args, "output", "text") == "json":
        raise UsageError("get with --output json needs -o FILE (the payload is binary)")
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return {"_silent": True}


@arguments("remove")
def _remove_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")


@command("remove", "remove a section from the directory", "nvmgr remove vm1.nvram old-vpd")
def cmd_remove(args: argparse.Namespace) -> Result:
    with _open(args, writable=True, with_key=False) as img:
        img.remove(args.name)
        return {"image": img.path, "removed": args.name, "generation": img.directory.generation}


def _render_check(r: Result) -> str:
    lines = [f"{s['name']}: {s['status']} ({s['detail']})" for s in r["sections"]]
    lines += [f"warning: {w}" for w in r["warnings"]]
    lines += [f"error: {e}" for e in r["errors"]]
    lines.append("No errors were found on the image." if r["ok"]
                 else f"{len(r['errors'])} error(s) were found on the image.")
    return "\n".join(lines)


@arguments("check")
def _check_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("--progress", "-p", action="store_true", help="show progress on stderr")
    _add_key_args(p)


@command("check", "verify both header copies and every section's crc32 (and MAC with a key); "
         "exit 4 when anything is corrupted",
         "nvmgr check vm1.nvram --key-file /etc/nvmgr/vm1.key --output json",
         render=_render_check)
def cmd_check(args: argparse.Namespace) -> Result:
    with _open(args) as img:
        report = img.check(progress=_progress(args, "check"))
    r: Result = report.to_json()
    if not report.ok:
        r["_exit"] = ExitCode.CORRUPT
    return r


@arguments("grow")
def _grow_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("--section", "-s", action="append", default=[], required=True,
                   metavar="NAME:SIZE[:BINDING]", help="a section to add (repeatable)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")


@command("grow", "add sections, growing the image; nothing existing moves",
         "nvmgr grow vm1.nvram -s pci-vpd:32K:fwcfg", render=_render_info)
def cmd_grow(args: argparse.Namespace) -> Result:
    with _open(args, writable=True, with_key=False) as img:
        img.add_sections([_section_spec(s) for s in args.section])
        return _info(img)


@arguments("resize")
def _resize_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("name", metavar="NAME", help="the section")
    p.add_argument("size", metavar="SIZE", help="its new worst-case size (K/M/G suffixes)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")


@command("resize", "change a section's worst-case size (moves non-live sections if needed)",
         "nvmgr resize vm1.nvram tpm-permall 256K", render=_render_info)
def cmd_resize(args: argparse.Namespace) -> Result:
    with _open(args, writable=True, with_key=False) as img:
        img.resize_section(args.name, parse_size(args.size))
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
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")


@command("rekey", "replace (or add) a key-encryption key without rewriting section data",
         "nvmgr rekey vm1.nvram --key-file old.key --new-key-file new.key")
def cmd_rekey(args: argparse.Namespace) -> Result:
    from . import keys

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
                   else keys.load_libvirt_secret(args.new_key_secret, args.connect))
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
    from . import codec

    with _open(args, with_key=False) as img:
        d = img.directory
        blob = codec.encode_header(d)
        if args.der:
            with open(args.der, "wb") as f:
                f.write(blob)
        if args.asn1:
            return {"_text": codec.value_notation(d)}
        r: Result = d.to_json()
        r["headers"] = [h.__dict__ for h in img.headers]
        return r


def _snapshot_render(r: Result) -> str:
    if "snapshots" in r:
        rows = [f"{s.get('id', '')}\t{s.get('name', '')}" for s in r["snapshots"]]
        return "\n".join(["ID\tNAME", *rows]) if rows else "no snapshots"
    return f"{r['action']} {r['name']}: done"


@arguments("snapshot")
def _snapshot_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("action", choices=("create", "list", "apply", "revert", "delete"))
    p.add_argument("name", metavar="NAME", nargs="?", help="snapshot name")


@command("snapshot", "qcow2 internal snapshots of a stopped VM's image",
         "nvmgr snapshot vm1.nvram create before-upgrade", render=_snapshot_render)
def cmd_snapshot(args: argparse.Namespace) -> Result:
    from . import qcow2
    from .container import probe_format

    path = resolve_image(args)
    if probe_format(path) != "qcow2":
        raise UsageError("internal snapshots need a qcow2 image (nvmgr convert IMAGE OUT -f qcow2)",
                         image=path)
    if args.action == "list":
        return {"snapshots": qcow2.snapshot_list(path)}
    if not args.name:
        raise UsageError(f"snapshot {args.action} needs a NAME")
    fn = {"create": qcow2.snapshot_create, "apply": qcow2.snapshot_apply,
          "revert": qcow2.snapshot_apply, "delete": qcow2.snapshot_delete}[args.action]
    fn(path, args.name)
    return {"action": args.action, "name": args.name, "image": path}


@arguments("convert")
def _convert_args(p: argparse.ArgumentParser) -> None:
    _add_image(p)
    p.add_argument("output", metavar="OUTPUT", help="the new image (never overwritten)")
    p.add_argument("--format", "-f", choices=("raw", "qcow2"), required=True)


@command("convert", "copy an image into another container format (qemu-img convert)",
         "nvmgr convert vm1.nvram vm1.qcow2 -f qcow2")
def cmd_convert(args: argparse.Namespace) -> Result:
    from .convert import convert

    src = resolve_image(args)
    convert(src, args.output, args.format)
    return {"image": src, "output": args.output, "format": args.format}


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="nvmgr",
        description="One file of persistent device state (UEFI vars, vTPM, EEPROM, VPD, FRU) "
                    "per libvirt/QEMU virtual machine.",
        epilog=EXIT_CODES_TEXT + "\nexample:\n  nvmgr create vm1.nvram -s efivars:528K:pflash\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nvmgr {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", "-O", choices=("text", "json"), default="text",
                        help="text for people, json for scripts")
    common.add_argument("--verbose", "-v", action="store_true", help="log what is done to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=cmd.summary, description=cmd.summary,
                           epilog=f"example:\n  {cmd.example}\n\n{EXIT_CODES_TEXT}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _SETUP[name](p)
    return parser


def _load_plugins() -> None:
    """Commands that live in other modules register themselves on import."""
    import importlib

    for mod in ("nvmgr.cli_domain",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def _render_plain(result: Result) -> str:
    """``key: value`` lines, for commands without a renderer of their own."""
    lines = []
    for k, v in result.items():
        if isinstance(v, list | dict):
            v = json.dumps(v, default=str)
        lines.append(f"{k.replace('_', ' ')}: {v}")
    return "\n".join(lines)


def _emit(args: argparse.Namespace, result: Result) -> int:
    code = int(result.pop("_exit", ExitCode.OK))
    if result.pop("_silent", False):
        return code
    text = result.pop("_text", None)
    if args.output == "json":
        if text is not None:
            result["text"] = text
        print(json.dumps(result, indent=2, sort_keys=False, default=str))
    elif text is not None:
        print(text)
    else:
        cmd = COMMANDS[args.command]
        print(cmd.render(result) if cmd.render else _render_plain(result))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def usage_error(message: str) -> None:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"nvmgr: error: {message}\n")
        raise SystemExit(ExitCode.USAGE)

    parser.error = usage_error  # type: ignore[method-assign,assignment]
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return int(ExitCode.USAGE)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="nvmgr: %(message)s", stream=sys.stderr)

    def terminate(signum: int, _frame: object) -> None:
        # Unwind through every finally: qemu-storage-daemons stop, locks drop.
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    try:
        return _emit(args, COMMANDS[args.command].handler(args))
    except NvmgrError as e:
        if getattr(args, "output", "text") == "json":
            print(json.dumps(e.to_json(), indent=2))
        sys.stderr.write(f"nvmgr: error: {e}\n")
        return int(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("nvmgr: interrupted\n")
        return 130
    except BrokenPipeError:
        return int(ExitCode.ERROR)


if __name__ == "__main__":
    # Run the imported module, where the other modules register their commands.
    from nvmgr import cli as _cli

    sys.exit(_cli.main())
