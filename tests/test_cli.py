"""The command line as scripts and people use it: help, JSON, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nvmgr import cli
from nvmgr.cli.common import COMMANDS
from nvmgr.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent


def all_commands() -> list[str]:
    cli.build_parser()
    return sorted(COMMANDS)


@pytest.mark.parametrize("name", all_commands())
def test_every_command_has_help_with_an_example_and_exit_codes(nvmgr, name: str) -> None:
    r = nvmgr(name, "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "example:" in out and f"nvmgr {name}" in out.split("example:")[1]
    assert "exit codes:" in out


@pytest.mark.parametrize("name", all_commands())
def test_every_command_is_in_the_readme(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"nvmgr {name}" in readme


def test_exit_codes_in_readme_match_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, code


def test_life_cycle_with_json_output(nvmgr, tmp_path: Path, key_file: Path) -> None:
    img = tmp_path / "vm.nvram"
    blob = tmp_path / "eeprom.bin"
    blob.write_bytes(os.urandom(256))
    r = nvmgr("create", img, "-s", "efivars:528K:pflash", "-s", "eeprom:256",
              "--key-file", key_file, "--output", "json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["encrypted"] and [s["name"] for s in created["sections"]] == ["efivars", "eeprom"]
    assert nvmgr("put", img, "eeprom", blob, "--key-file", key_file).returncode == 0
    out = tmp_path / "out.bin"
    r = nvmgr("get", img, "eeprom", "-o", out, "--key-file", key_file, "--output", "json")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob.read_bytes()
    assert json.loads(r.stdout)["length"] == 256
    assert os.stat(out).st_mode & 0o777 == 0o600
    r = nvmgr("check", img, "--key-file", key_file, "--output", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    info = json.loads(nvmgr("info", img, "-O", "json").stdout)
    assert info["sections"][1]["length"] == 256


def test_put_from_stdin_and_get_to_stdout(nvmgr, tmp_path: Path) -> None:
    img = tmp_path / "vm.nvram"
    assert nvmgr("create", img, "-s", "vpd:32K:fwcfg").returncode == 0
    data = os.urandom(30000)
    assert nvmgr("put", img, "vpd", "-", input=data).returncode == 0
    r = nvmgr("get", img, "vpd")
    assert r.returncode == 0 and r.stdout == data


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["info", "{missing}"], ExitCode.NOT_FOUND, "no such image"),
        (["get", "{img}", "nope"], ExitCode.NOT_FOUND, "no section named"),
        (["put", "{img}", "eeprom", "{big}"], ExitCode.NO_SPACE, "do not fit section eeprom"),
        (["create", "{new}", "-s", "../x:4K"], ExitCode.USAGE, "invalid section name"),
        (["create", "{new}", "-s", "x:12Q"], ExitCode.USAGE, "invalid size"),
        (["create", "{new}", "-s", "x:4K:teleport"], ExitCode.USAGE, "unknown binding"),
        (["info", "{foreign}"], ExitCode.CORRUPT, "not an nvmgr image"),
        (["frobnicate"], ExitCode.USAGE, "invalid choice"),
    ],
)
def test_errors_have_documented_exit_codes_and_change_nothing(
    nvmgr, tmp_path: Path, args: list[str], code: ExitCode, words: str
) -> None:
    img = tmp_path / "vm.nvram"
    assert nvmgr("create", img, "-s", "eeprom:256").returncode == 0
    (tmp_path / "big").write_bytes(b"x" * 257)
    (tmp_path / "foreign").write_bytes(os.urandom(300 * 1024))
    paths = {"img": img, "missing": tmp_path / "missing", "big": tmp_path / "big",
             "new": tmp_path / "new.nvram", "foreign": tmp_path / "foreign"}
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    r = nvmgr(*[a.format(**paths) for a in args])
    assert r.returncode == code, r.stderr
    assert words in r.stderr.decode()
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_json_errors_are_machine_readable(nvmgr, tmp_path: Path) -> None:
    r = nvmgr("info", tmp_path / "missing", "--output", "json")
    assert r.returncode == ExitCode.NOT_FOUND
    err = json.loads(r.stdout)
    assert err["error"] == "NotFoundError" and err["exit_code"] == 3


def test_key_file_must_be_private(nvmgr, tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    r = nvmgr("create", tmp_path / "x", "-s", "a:4K", "--key-file", key)
    assert r.returncode == ExitCode.USAGE and b"0600" in r.stderr
    assert not (tmp_path / "x").exists()


def test_wrong_and_missing_keys_have_their_own_codes(nvmgr, tmp_path: Path, key_file: Path,
                                                     key_file2: Path) -> None:
    img = tmp_path / "vm.nvram"
    nvmgr("create", img, "-s", "tpm:8K:tpm", "--key-file", key_file)
    nvmgr("put", img, "tpm", "-", "--key-file", key_file, input=b"t" * 100)
    assert nvmgr("get", img, "tpm").returncode == ExitCode.KEY_REQUIRED
    r = nvmgr("get", img, "tpm", "--key-file", key_file2)
    assert r.returncode == ExitCode.WRONG_KEY and b"not one of this image's keys" in r.stderr


def test_dump_asn1_and_der(nvmgr, tmp_path: Path) -> None:
    img = tmp_path / "vm.nvram"
    nvmgr("create", img, "-s", "efivars:528K:pflash", "-s", "tpm:64K:tpm")
    r = nvmgr("dump", img, "--asn1", "--der", tmp_path / "h.der")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert text.startswith("directory Directory ::= {") and 'name "efivars"' in text
    assert "binding pflash" in text and "flags { live }" in text
    assert (tmp_path / "h.der").read_bytes()[0] == 0x30


def test_busy_when_another_writer_holds_the_image(nvmgr, tmp_path: Path) -> None:
    from nvmgr.image.image import Image

    img = tmp_path / "vm.nvram"
    nvmgr("create", img, "-s", "eeprom:256")
    with Image.open(str(img), writable=True):
        r = nvmgr("put", img, "eeprom", "-", input=b"x")
        assert r.returncode == ExitCode.BUSY and b"--wait" in r.stderr
