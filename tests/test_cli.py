"""The command line as scripts and people use it: help, JSON, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvmgr.cli import app
from nvmgr.cli.common import COMMANDS
from nvmgr.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent


def all_commands() -> list[str]:
    app.build_parser()
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


def _flip(img: Path, offset: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_get_o_publishes_the_file_only_when_verified(nvmgr, tmp_path: Path) -> None:
    """get -o writes a large section as it reads it, into an anonymous file that
    takes the name only once the crc holds: a corrupted section leaves an older file
    whole (content, mode) and no new or temporary file; a good get replaces it and
    keeps its mode."""
    from nvmgr.image.image import Image

    img = tmp_path / "vm.nvram"
    data = os.urandom(9 << 20)  # three 4 MiB pieces
    src = tmp_path / "blob"
    src.write_bytes(data)
    assert nvmgr("create", img, "-s", "blob:10M").returncode == 0
    assert nvmgr("put", img, "blob", src).returncode == 0
    with Image.open(str(img)) as opened:
        offset = opened.section("blob").offset
    out = tmp_path / "out.bin"
    out.write_bytes(b"older")
    os.chmod(out, 0o640)
    r = nvmgr("get", img, "blob", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data and os.stat(out).st_mode & 0o777 == 0o640
    out.write_bytes(b"older")
    _flip(img, offset + (9 << 20) - 5)  # in the last piece: the first two are written
    r = nvmgr("get", img, "blob", "-o", out)
    assert r.returncode == ExitCode.CORRUPT and b"section blob is corrupted" in r.stderr
    assert out.read_bytes() == b"older" and os.stat(out).st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.bin"
    assert nvmgr("get", img, "blob", "-o", fresh).returncode == ExitCode.CORRUPT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "out.bin", "vm.nvram"]


def test_get_o_to_a_device_or_through_a_symlink_writes_in_place(nvmgr, tmp_path: Path) -> None:
    """Where the output is not a plain file (a device, a symlink), get writes it
    itself, verified bytes only: /dev/null stays a device, a symlink stays a symlink
    and its target gets the bytes."""
    img = tmp_path / "vm.nvram"
    data = os.urandom(5 << 20)
    src = tmp_path / "blob"
    src.write_bytes(data)
    assert nvmgr("create", img, "-s", "blob:6M").returncode == 0
    assert nvmgr("put", img, "blob", src).returncode == 0
    assert nvmgr("get", img, "blob", "-o", "/dev/null").returncode == 0
    target = tmp_path / "target.bin"
    target.write_bytes(b"x")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert nvmgr("get", img, "blob", "-o", link).returncode == 0
    assert link.is_symlink() and target.read_bytes() == data


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


# ---------------------------------------------------------------- install-hook


def test_install_hook_installs_the_shipped_front_end_for_this_python(
        nvmgr, tmp_path: Path) -> None:
    from nvmgr import resources

    hook_dir = tmp_path / "qemu.d"
    r = nvmgr("install-hook", "--hook-dir", hook_dir, "--output", "json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    hook = hook_dir / "nvmgr"
    assert result["hook"] == str(hook) and "restart" in result["note"]
    assert result["nvmgr"] == str(ROOT / "nvmgr" / "__init__.py")
    assert os.stat(hook).st_mode & 0o777 == 0o755
    shipped = resources.read_text(resources.HOOK_FRONTEND).splitlines()
    installed = hook.read_text().splitlines()
    # The shipped front end, line for line, but for the three settings.
    settings = {"PYTHON", "PYTHON_FLAGS", "NVMGR_PATH", "HOOK_CLIENT", "HOOK_SOCKET"}
    assert len(installed) == len(shipped)
    assert [a for a, b in zip(installed, shipped, strict=True) if a != b] == [
        ln for ln in installed if ln.split("=", 1)[0] in settings - {"HOOK_SOCKET"}]
    values = dict(ln.split("=", 1) for ln in installed if ln.split("=", 1)[0] in settings)
    assert values["PYTHON_FLAGS"] == "'-I -S'"
    assert values["NVMGR_PATH"].split(":")[0] == str(ROOT)  # this checkout's nvmgr first
    assert values["HOOK_CLIENT"] == str(ROOT / "nvmgr" / "hook" / "client.py")
    assert values["HOOK_SOCKET"] == "/run/nvmgr/hook.sock"
    assert not (hook_dir / ".nvmgr.tmp").exists()
    # (install-hook has run the hook's Python as the hook will, -I -S, and
    # seen it import this nvmgr; tests/test_wheel.py runs installed hooks.)
    r = subprocess.run([hook, "other", "prepare", "begin", "-"], capture_output=True,
                       input=b"<domain><name>other</name></domain>", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")  # the sh alone answers

    r = nvmgr("install-hook", "--hook-dir", hook_dir, "--uninstall", "-O", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] is True
    assert not hook.exists()
    r = nvmgr("install-hook", "--hook-dir", hook_dir, "--uninstall", "-O", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["removed"] is False


def test_hook_values_name_this_nvmgr_and_every_site_directory() -> None:
    import site

    from nvmgr.cli.hookinstall import hook_values

    values = hook_values()
    assert values["PYTHON"] == sys.executable
    paths = values["NVMGR_PATH"].split(":")
    assert paths[0] == str(ROOT)
    assert set(site.getsitepackages()) & set(paths)  # this venv's site-packages


def test_hook_script_without_a_setting_line_is_an_installation_error() -> None:
    from nvmgr.cli.hookinstall import hook_script
    from nvmgr.errors import InstallationError

    values = {"PYTHON": "/usr/bin/python3", "PYTHON_FLAGS": "-I -S", "NVMGR_PATH": "/x"}
    with pytest.raises(InstallationError, match="NVMGR_PATH"):
        hook_script("#!/bin/sh\nPYTHON=python3\nPYTHON_FLAGS=\n", values)
    script = hook_script("#!/bin/sh\nPYTHON=\nPYTHON_FLAGS=\nNVMGR_PATH=\n", values)
    assert script == "#!/bin/sh\nPYTHON=/usr/bin/python3\nPYTHON_FLAGS='-I -S'\nNVMGR_PATH=/x\n"


#: Runs the CLI with nvmgr's data directory replaced by an empty one.
_WITHOUT_DATA = """
import sys
from importlib import resources
from pathlib import Path
resources.files = lambda package: Path(sys.argv[1])
from nvmgr.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("missing", "args"), [
    ("nvmgr-metadata.rng", ["plan", str(ROOT / "tests" / "data" / "sections-in.xml")]),
    ("hook-qemu", ["install-hook", "--hook-dir", "{hooks}"]),
])
def test_a_missing_data_file_is_exit_11_with_its_name(
        tmp_path: Path, missing: str, args: list[str]) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    hooks = tmp_path / "hooks"
    r = subprocess.run([sys.executable, "-c", _WITHOUT_DATA, str(empty),
                        *[a.format(hooks=hooks) for a in args]],
                       capture_output=True, text=True, cwd=tmp_path, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == ExitCode.INSTALLATION, r.stderr
    assert f"nvmgr is installed without {missing} (looked for {empty / missing})" in r.stderr
    assert "reinstall nvmgr" in r.stderr and "Traceback" not in r.stderr
    assert not hooks.exists()


# ---------------------------------------------------------------- man page, completion


@pytest.mark.parametrize("name", ["nvmgr.1", "nvmgr.bash"])
def test_man_page_and_completion_are_up_to_date(name: str) -> None:
    from nvmgr.cli import manpage

    committed = (ROOT / "nvmgr" / "data" / name).read_text()
    assert committed == manpage.OUTPUTS[name](), (
        f"nvmgr/data/{name} is stale: run python -m nvmgr.cli.manpage --write")


def test_man_page_documents_every_command_option_and_exit_code() -> None:
    from nvmgr.cli import manpage

    page = manpage.render_manpage()
    parser = app.build_parser()
    for name, sub in manpage._subparsers(parser).items():
        assert f'.SS "{name.replace("-", chr(92) + "-")}"' in page
        assert manpage._roff_literal(COMMANDS[name].example) in page
        for action in sub._actions:
            for opt in action.option_strings:
                assert f"\\fB{opt.replace('-', chr(92) + '-')}\\fR" in page, (name, opt)
    status = page.split(".SH EXIT STATUS", 1)[1].split(".SH", 1)[0]
    for code in ExitCode:
        assert f".TP\n\\fB{int(code)}\\fR\n" in status, code
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "FILES",
                    "SEE ALSO"):
        assert f"\n.SH {section}\n" in page


def test_man_page_renders_without_warnings(tmp_path: Path) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (Debian: groff-base)")
    page = ROOT / "nvmgr" / "data" / "nvmgr.1"
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", page],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if shutil.which("man"):
        r = subprocess.run(["man", "--warnings", "-l", page], capture_output=True, text=True,
                           env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat",
                                "PAGER": "cat"}, check=False)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert "nvmgr install-hook" in r.stdout
    if shutil.which("lexgrog"):  # what mandb and whatis read from the NAME section
        r = subprocess.run(["lexgrog", page], capture_output=True, text=True, check=False)
        assert r.returncode == 0 and '"nvmgr - one file' in r.stdout, r.stdout + r.stderr


_COMPLETE = """
source "$1"
shift
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()
_nvmgr
printf '%s\\n' "${COMPREPLY[@]}"
"""


@pytest.mark.parametrize(("words", "expected"), [
    (["nvmgr", "ins"], ["install-hook"]),
    (["nvmgr", "install-hook", "--u"], ["--uninstall"]),
    (["nvmgr", "create", "x", "--format", "q"], ["qcow2"]),
    (["nvmgr", "snapshot", "vm1.nvram", "re"], ["revert"]),
    (["nvmgr", "get", "--output", "j"], ["json"]),
])
def test_bash_completion(tmp_path: Path, words: list[str], expected: list[str]) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = ROOT / "nvmgr" / "data" / "nvmgr.bash"
    r = subprocess.run([bash, "-c", _COMPLETE, "complete", script, *words], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected
