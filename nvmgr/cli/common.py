"""What every command shares: the registry, key and image arguments, progress.

A command is a function that takes parsed arguments and returns a result (a
dict, printed as JSON with ``--output json`` or by the command's own text
renderer); :func:`command` registers it and :func:`arguments` its options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nvmgr.errors import UsageError
from nvmgr.units import format_size, parse_size

log = logging.getLogger("nvmgr")

EXIT_CODES_TEXT = """exit codes:
  0  success                 6  the image is encrypted and no key was given
  1  other error             7  busy: another nvmgr writer, or a running VM
  2  usage: bad arguments    8  no space: data larger than a section, image full
  3  not found               9  invalid input: hostile or malformed domain XML
  4  corrupted (check found 10  an external tool failed (qemu-img, libvirt)
     errors, bad DER,       11  nvmgr is installed incompletely, or the
     foreign image)             host lacks /run/nvmgr on tmpfs
                            12  the domain asks for nvmgr but is not
  5  wrong key                   wired for it: run nvmgr reconcile NAME
                            13  cannot be done live (nvmgr attach/detach
                                 --live): --config can
"""

if TYPE_CHECKING:
    from nvmgr.crypto.cipher import Kek
    from nvmgr.format.layout import SectionSpec
    from nvmgr.image.image import Image

Result = dict[str, Any]
Handler = Callable[[argparse.Namespace], Result]
Renderer = Callable[[Result], str]


class _Command:
    def __init__(self, name: str, summary: str, example: str, handler: Handler,
                 render: Renderer | None) -> None:
        self.name, self.summary, self.example = name, summary, example
        self.handler, self.render = handler, render


COMMANDS: dict[str, _Command] = {}
SETUP: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


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
        SETUP[name] = fn
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


def load_key(args: argparse.Namespace) -> Kek | None:
    """The key-encryption key from --key-file, --key-secret or --key-stdin, or None."""
    given = [x for x in ("key_file", "key_secret", "key_stdin") if getattr(args, x, None)]
    if len(given) > 1:
        raise UsageError("give the key one way only: --key-file, --key-secret or --key-stdin")
    if not given:
        return None  # and cryptography never imported: a plaintext image needs none of it
    from nvmgr.crypto import keys
    from nvmgr.virt import secrets

    if getattr(args, "key_file", None):
        return keys.load_key_file(args.key_file)
    if getattr(args, "key_secret", None):
        return secrets.load_libvirt_secret(args.key_secret, getattr(args, "connect", None))
    if getattr(args, "key_stdin", False):
        return keys.load_key_stream(sys.stdin.buffer)
    return None


def domain_key(args: argparse.Namespace, domain: str) -> Kek | None:
    """--key-file/--key-secret/--key-stdin if given, else the key *domain*'s metadata names."""
    kek = load_key(args)
    if kek is not None:
        return kek
    from nvmgr.domain.elements import parse_domain
    from nvmgr.virt import conn as virt
    from nvmgr.virt.secrets import domain_kek

    uri = getattr(args, "connect", None)
    return domain_kek(parse_domain(virt.domain_xml(domain, uri)).nvmgr, uri)


def _add_key_args(p: argparse.ArgumentParser, *, prefix: str = "key") -> None:
    g = p.add_argument_group("keys (never on the command line itself)")
    g.add_argument(f"--{prefix}-file", metavar="FILE",
                   help="key-encryption key: a 0600 file of 32 bytes, raw or 64 hex digits")
    g.add_argument(f"--{prefix}-secret", metavar="UUID",
                   help="key-encryption key: the value of a libvirt secret (32 bytes)")
    g.add_argument(f"--{prefix}-stdin", action="store_true",
                   help="read the key-encryption key from standard input")


#: False while the CLI builds its second parser, the one for ``--domain``
#: command lines: there IMAGE is no positional at all (see :func:`_add_image`).
IMAGE_POSITIONAL = [True]


def _add_image(p: argparse.ArgumentParser) -> None:
    # IMAGE is optional so that "--domain NAME SECTION" works.  An optional
    # positional alone is not enough: argparse hands it the first word
    # ("snapshot --domain VM create NAME" would take "create" for IMAGE), so
    # with --domain the command line is parsed by a parser without IMAGE
    # (nvmgr.cli.app.parse_args).
    if IMAGE_POSITIONAL[0]:
        p.add_argument("image", metavar="IMAGE", nargs="?",
                       help="the nvmgr image: a file, an rbd:POOL/IMAGE... location or an "
                            "NBD URI (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH); "
                            "or give --domain")
    else:
        p.set_defaults(image=None)
    p.add_argument("--domain", metavar="NAME",
                   help="use the image recorded in this libvirt domain's nvmgr metadata")
    p.add_argument("--connect", "-c", metavar="URI", help="libvirt connection URI")


def resolve_image(args: argparse.Namespace) -> str:
    """IMAGE, or the image named by --domain's nvmgr metadata."""
    if getattr(args, "domain", None):
        from nvmgr.virt.conn import image_of_domain

        path: str = image_of_domain(args.domain, args.connect)
        if args.image and os.path.abspath(args.image) != os.path.abspath(path):
            raise UsageError(f"--domain {args.domain} uses {path}, not {args.image}")
        return path
    if not args.image:
        raise UsageError("name an IMAGE or give --domain NAME")
    return str(args.image)


def _open(args: argparse.Namespace, *, writable: bool = False, with_key: bool = True) -> Image:
    from nvmgr.image.image import Image

    return Image.open(resolve_image(args), writable=writable,
                      kek=load_key(args) if with_key else None,
                      wait=getattr(args, "wait", 0.0) or 0.0)


def _section_spec(text: str, *, luks: bool = False) -> SectionSpec:
    """A ``--section NAME:SIZE[:BINDING]``.

    :param luks: the image has a key: a live section (``pflash``, ``block``)
        is a LUKS volume QEMU opens (issue 8), SIZE is what its device sees and
        the section counts the LUKS header on top (the image encrypts the
        other sections itself).
    """
    from nvmgr.format.layout import SectionSpec
    from nvmgr.format.model import LUKS_HEADER_SIZE, Binding

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise UsageError(f"--section {text!r}: use NAME:SIZE or NAME:SIZE:BINDING")
    binding = Binding.parse(parts[2]) if len(parts) == 3 else Binding.OPAQUE
    size = parse_size(parts[1], what=f"size of section {parts[0]}")
    if luks and binding.live:
        return SectionSpec(parts[0], size + LUKS_HEADER_SIZE, binding, encrypted=True)
    return SectionSpec(parts[0], size, binding)
