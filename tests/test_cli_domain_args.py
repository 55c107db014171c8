"""With --domain, every command that takes IMAGE parses as if IMAGE were absent (issue 9)."""

from __future__ import annotations

import argparse

import pytest

from nvmgr.cli.app import build_parser, main, parse_args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("no subcommands")


def _domain_commands() -> dict[str, argparse.ArgumentParser]:
    subs = _subparsers(build_parser(domain_mode=True))
    return {n: p for n, p in subs.items()
            if any("--domain" in a.option_strings for a in p._actions)}


def _positionals(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not a.option_strings]


def test_every_image_command_is_covered() -> None:
    cmds = _domain_commands()
    # The commands of issue 9's report, and every other IMAGE command.
    assert {"snapshot", "put", "get", "info", "list", "check", "convert"} <= set(cmds)
    for name, p in _subparsers(build_parser()).items():
        has_image = any(a.dest == "image" and not a.option_strings for a in p._actions)
        if has_image and name != "create":
            assert name in cmds, name


@pytest.mark.parametrize("name", sorted(_domain_commands()))
@pytest.mark.parametrize("where", ["first", "last"])
def test_domain_line_fills_every_positional_but_image(name: str, where: str) -> None:
    p = _domain_commands()[name]
    values = {}
    for i, a in enumerate(_positionals(p)):
        values[a.dest] = sorted(a.choices)[-1] if a.choices else f"word{i}"
    words = list(values.values())
    for a in p._actions:  # required options (convert --format, grow --section)
        if a.required and a.option_strings and a.dest != "domain":
            words += [a.option_strings[0], sorted(a.choices)[0] if a.choices else "x:4K"]
    argv = ([name, "--domain", "vm1", *words] if where == "first"
            else [name, *words, "--domain", "vm1"])
    args = parse_args(build_parser(), argv)
    assert args.domain == "vm1" and getattr(args, "image", None) is None
    many = {a.dest for a in _positionals(p) if a.nargs in ("+", "*")}  # split SECTION...
    for dest, v in values.items():
        assert getattr(args, dest) == ([v] if dest in many else v), (dest, args)


def test_snapshot_create_with_domain_as_typed_in_the_issue() -> None:
    args = parse_args(build_parser(), ["snapshot", "--domain", "vm1", "create", "before-upgrade"])
    assert (args.domain, args.image, args.action, args.name) == (
        "vm1", None, "create", "before-upgrade")
    args = parse_args(build_parser(), ["snapshot", "--domain=vm1", "list"])
    assert (args.domain, args.image, args.action, args.name) == ("vm1", None, "list", None)


def test_image_lines_parse_as_before() -> None:
    args = parse_args(build_parser(), ["snapshot", "vm1.nvram", "create", "s1"])
    assert (args.domain, args.image, args.action, args.name) == (None, "vm1.nvram", "create", "s1")
    args = parse_args(build_parser(), ["put", "vm1.nvram", "efivars", "-"])
    assert (args.image, args.name, args.file) == ("vm1.nvram", "efivars", "-")
    # Both IMAGE and --domain: IMAGE is kept, for resolve_image to check they agree.
    args = parse_args(build_parser(), ["snapshot", "vm1.nvram", "list", "--domain", "vm1"])
    assert (args.domain, args.image, args.action) == ("vm1", "vm1.nvram", "list")


def test_a_bad_domain_line_names_the_word_that_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["snapshot", "--domain", "vm1", "bogus", "s1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "'s1'" not in err
