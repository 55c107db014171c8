"""The ``nvmgr`` command line: a thin layer over the library.

Errors are turned into messages and exit codes here and only here (see
:mod:`nvmgr.errors` for the codes); so are the operating system's own errors
(a missing directory for ``-o``, a directory given as a file), which the
library lets through as :class:`OSError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import NoReturn

from nvmgr import __version__
from nvmgr.cli import backup, domains, images, migration
from nvmgr.cli.common import COMMANDS, EXIT_CODES_TEXT, IMAGE_POSITIONAL, SETUP, Result
from nvmgr.errors import ExitCode, NvmgrError, from_os_error

log = logging.getLogger("nvmgr")

#: The modules whose commands make up the CLI, in the order --help lists them.
COMMAND_MODULES = (images, domains, backup, migration)


class _NotThisWay(Exception):
    """The ``--domain`` parser could not make sense of the command line."""


class _QuietParser(argparse.ArgumentParser):
    """Raises instead of printing and exiting: for trying one reading of a line."""

    def error(self, message: str) -> NoReturn:
        raise _NotThisWay(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _NotThisWay(message or "")


#: Parsers built, by (domain_mode, quiet): built once per process (the CLI
#: server's workers inherit them), read-only afterwards.
_PARSERS: dict[tuple[bool, bool], argparse.ArgumentParser] = {}


def build_parser(*, domain_mode: bool = False, quiet: bool = False) -> argparse.ArgumentParser:
    """The ``nvmgr`` parser; *domain_mode*: the one without IMAGE positionals,
    tried first on ``--domain`` lines; *quiet*: raise instead of exiting."""
    parser = _PARSERS.get((domain_mode, quiet))
    if parser is None:
        parser = _PARSERS[(domain_mode, quiet)] = _build(domain_mode, quiet)
    return parser


def _build(domain_mode: bool, quiet: bool) -> argparse.ArgumentParser:
    parser = (_QuietParser if quiet else argparse.ArgumentParser)(
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
        IMAGE_POSITIONAL[0] = not domain_mode
        try:
            SETUP[name](p)
        finally:
            IMAGE_POSITIONAL[0] = True
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse *argv*; with ``--domain``, as if the command had no IMAGE positional.

    IMAGE is an optional first positional, and argparse fills positionals
    from the left: ``snapshot --domain VM create NAME`` would give IMAGE
    "create".  So a command line is first parsed without IMAGE; when that
    succeeds and names a domain, that is the reading.  Otherwise (no
    --domain, or both an IMAGE and --domain, which resolve_image checks
    agree) the ordinary parser reads it, with its own messages.
    """
    words = sys.argv[1:] if argv is None else argv
    # Only lines that may name --domain (or an abbreviation) pay for a second parser.
    if (not any(w.startswith("--d") for w in words)
            or any(w in ("-h", "--help", "--version") for w in words)):
        return parser.parse_args(words)
    try:
        args = build_parser(domain_mode=True, quiet=True).parse_args(words)
        why = None
    except _NotThisWay as e:
        args, why = None, e
    if args is not None and getattr(args, "domain", None):
        return args
    if why is not None:
        # Neither reading works: the --domain reading's complaint is the one
        # about what was typed ("invalid choice: 'NAME'" would not be).
        try:
            return build_parser(quiet=True).parse_args(words)
        except _NotThisWay:
            parser.error(str(why))
    return parser.parse_args(words)


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
    args = parse_args(parser, argv)
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
    except BrokenPipeError:
        return int(ExitCode.ERROR)
    except OSError as e:  # the operating system's words, with the file they concern
        err = from_os_error(e)
        if getattr(args, "output", "text") == "json":
            print(json.dumps(err.to_json(), indent=2))
        sys.stderr.write(f"nvmgr: error: {err}\n")
        return int(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("nvmgr: interrupted\n")
        return 130

