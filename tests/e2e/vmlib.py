"""Real libvirtd, QEMU, swtpm and OVMF, driven the way an administrator would.

Shared by the end-to-end tests (``tests/e2e``), ``scripts/demo`` and
``bench/bench_hook.py``.  Everything here runs the real tools (``virsh``,
``nvmgr``, ``swtpm``, ``tpm2-tools``, ``qemu-img``, ``virt-fw-vars``) as
subprocesses; nothing is mocked.

Three ways of reading back what QEMU really exposes:

- :func:`read_ek`: runs ``swtpm`` on a TPM state file taken out of the image
  and reads the endorsement key (persistent handle 0x81010001, made by
  libvirt's ``swtpm_setup --createek``) and its certificate (NV index
  0x01c00002) with ``tpm2_readpublic`` / ``tpm2_nvread``;
- :func:`nbd_read`: asks the running QEMU, over QMP, to export one of its
  block nodes through NBD on a unix socket and reads it with ``qemu-img``;
- :class:`Shell`: types commands into OVMF's UEFI shell over the guest's
  serial port; :meth:`Shell.fw_cfg_read` makes the *guest* fetch a fw_cfg
  file through QEMU's fw_cfg DMA interface and dumps the memory it landed in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from lxml import etree

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
NVMGR = str(VENV_BIN / "nvmgr")
VIRT_FW_VARS = str(VENV_BIN / "virt-fw-vars")
EXAMPLE = ROOT / "examples" / "uefi-tpm.xml"
URI = "qemu:///system"

HOOK_DIR = Path("/etc/libvirt/hooks/qemu.d")
HOOK = HOOK_DIR / "nvmgr"
HOOK_LOG = Path("/var/log/nvmgr/hook.log")
IMAGE_DIR = Path("/var/lib/libvirt/nvmgr")
SWTPM_ROOT = Path("/var/lib/libvirt/swtpm")
RUNTIME_ROOT = Path("/run/nvmgr")
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
SWTPM_LOG_DIR = Path("/var/log/swtpm/libvirt/qemu")
#: Sockets the tests create (serial consoles, NBD exports).
SOCK_ROOT = Path("/run/nvmgr-e2e")
#: The session's descriptor of /run/lock/nvmgr-e2e.lock while it holds it (conftest).
E2E_LOCK_FD = -1

NVMGR_NS = "https://nvmgr.dev/schemas/metadata/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

#: OVMF's shell: the startup.nsh countdown, then the prompt.
SHELL_RE = re.compile(rb"Shell> |startup\.nsh")
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


class Failed(AssertionError):
    """A step did not do what it should (the message says what and shows output)."""


# ---------------------------------------------------------------- processes

def run(cmd: Sequence[str | os.PathLike[str]], *, check: bool = True, input: bytes | None = None,
        timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run *cmd* (stdin: *input*, else nothing); raise :class:`Failed` with its output
    when *check* and it fails.  stdout and stderr come back as text."""
    argv = [str(c) for c in cmd]
    p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False,
                       env={**os.environ, **(env or {})},
                       stdin=None if input is not None else subprocess.DEVNULL)
    out = subprocess.CompletedProcess(argv, p.returncode, p.stdout.decode("utf-8", "replace"),
                                      p.stderr.decode("utf-8", "replace"))
    if check and out.returncode != 0:
        raise Failed(f"{' '.join(argv)} exited {out.returncode}\nstdout: {out.stdout}\n"
                     f"stderr: {out.stderr}")
    return out


#: The environment :func:`nvmgr` runs the command with: set by
#: :func:`start_cli_server` to ask that server, as on a host with nvmgr-cli.service.
NVMGR_ENV: dict[str, str] = {}


def nvmgr(*args: str | os.PathLike[str], check: bool = True,
          input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return run([NVMGR, *args], check=check, input=input, env=NVMGR_ENV)


def nvmgr_json(*args: str | os.PathLike[str]) -> dict[str, object]:
    out: dict[str, object] = json.loads(nvmgr(*args, "--output", "json").stdout)
    return out


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["virsh", "-c", URI, *args], check=check, timeout=timeout)


# ---------------------------------------------------------------- services

def ensure_services() -> None:
    """virtlogd and libvirtd running, libvirtd answering (``scripts/services``)."""
    run([ROOT / "scripts" / "services"], timeout=60)


def libvirtd_pid() -> int | None:
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().strip())
        os.kill(pid, 0)
        if Path(f"/proc/{pid}/comm").read_text().strip() == "libvirtd":
            return pid
    except (OSError, ValueError):
        pass
    p = run(["pgrep", "-x", "libvirtd"], check=False)
    pids = [int(x) for x in p.stdout.split()]
    return pids[0] if len(pids) == 1 else None


def restart_libvirtd(timeout: float = 30) -> None:
    """Stop libvirtd (by its pid) and start it again; running domains keep running.

    libvirtd reads its hook directory once, when it starts.
    """
    pid = libvirtd_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise Failed(f"libvirtd (pid {pid}) did not stop within {timeout} s")
    run([ROOT / "scripts" / "subreaper", "libvirtd", "-d"])  # see scripts/subreaper
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(["virsh", "-c", URI, "version"], check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise Failed("libvirtd did not answer after a restart")


def hook_dir_has_hooks() -> bool:
    return HOOK_DIR.is_dir() and any(
        p.is_file() and os.access(p, os.X_OK) for p in HOOK_DIR.iterdir())


def install_hook() -> bool:
    """Install the nvmgr hook; restart libvirtd when the hook directory was empty.

    :return: whether libvirtd was restarted.
    """
    was_empty = not hook_dir_has_hooks() and not Path("/etc/libvirt/hooks/qemu").exists()
    nvmgr("install-hook")
    if was_empty:
        restart_libvirtd()
    return was_empty


HOOK_SERVER_PIDFILE = RUNTIME_ROOT / "hook-server.pid"


def _server_pid(pidfile: Path, command: str) -> int | None:
    """The pid in *pidfile* while that process runs ``nvmgr COMMAND``, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        if command.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    except (OSError, ValueError):
        pass
    return None


def _stop_server(pidfile: Path, command: str, timeout: float) -> None:
    """SIGTERM the ``nvmgr COMMAND`` daemon of *pidfile*, if it runs, and wait until it is gone."""
    pid = _server_pid(pidfile, command)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _server_pid(pidfile, command) == pid:
        if time.monotonic() > deadline:
            raise Failed(f"the {command} (pid {pid}) did not stop within {timeout} s")
        time.sleep(0.05)


def hook_server_pid() -> int | None:
    """The pid of the hook server started by :func:`start_hook_server`, if it runs."""
    return _server_pid(HOOK_SERVER_PIDFILE, "hook-server")


def stop_hook_server(timeout: float = 30) -> None:
    """Stop the hook server (any checkout's) and wait until it is gone."""
    _stop_server(HOOK_SERVER_PIDFILE, "hook-server", timeout)


def start_hook_server() -> int:
    """This checkout's ``nvmgr hook-server --daemon`` on the socket the installed hook
    asks (another one running is stopped first); returns its pid."""
    stop_hook_server()
    r = nvmgr("hook-server", "--daemon", "--pidfile", HOOK_SERVER_PIDFILE, "--output", "json")
    return int(json.loads(r.stdout)["pid"])


CLI_SERVER_PIDFILE = RUNTIME_ROOT / "cli-server.pid"
#: The CLI server's socket in the end-to-end tests (the default one of nvmgr-cli.service).
CLI_SOCKET = RUNTIME_ROOT / "cli.sock"


def start_cli_server() -> int:
    """This checkout's ``nvmgr cli-server --daemon`` (another one running is stopped
    first); from then on :func:`nvmgr` asks it, as a host's ``nvmgr`` does with
    nvmgr-cli.service running.  Returns its pid."""
    stop_cli_server()
    r = run([NVMGR, "cli-server", "--daemon", "--socket", CLI_SOCKET,
             "--pidfile", CLI_SERVER_PIDFILE, "--output", "json"])
    NVMGR_ENV["NVMGR_CLI_SOCKET"] = str(CLI_SOCKET)
    return int(json.loads(r.stdout)["pid"])


def stop_cli_server(timeout: float = 30) -> None:
    """Stop the CLI server :func:`start_cli_server` started, if it runs; :func:`nvmgr`
    runs commands in their own process again."""
    NVMGR_ENV.pop("NVMGR_CLI_SOCKET", None)
    _stop_server(CLI_SERVER_PIDFILE, "cli-server", timeout)


def uninstall_hook() -> bool:
    """Remove the nvmgr hook; restart libvirtd when the directory became empty.

    :return: whether libvirtd was restarted.
    """
    nvmgr("install-hook", "--uninstall")
    if not hook_dir_has_hooks() and not Path("/etc/libvirt/hooks/qemu").exists():
        restart_libvirtd()
        return True
    return False


_PROBE_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <nvmgr:nvram xmlns:nvmgr='https://nvmgr.dev/schemas/metadata/1' image='{image}'/>
  </metadata>
  <memory unit='MiB'>32</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
</domain>
"""


def hook_is_live(workdir: Path) -> bool:
    """Whether libvirtd runs the nvmgr hook: start a probe domain whose nvmgr image is
    not an image; only a live hook refuses it (otherwise the probe starts, and is destroyed).
    """
    name = new_name("probe")
    dom_uuid = str(uuid.uuid4())
    image = workdir / f"{name}-foreign.img"
    image.write_bytes(bytes(256 << 10))
    xml = workdir / f"{name}.xml"
    xml.write_text(_PROBE_XML.format(name=name, uuid=dom_uuid, image=image))
    try:
        virsh("define", str(xml))
        p = start(name, check=False)
        if p.returncode == 0:
            return False
        if "nvmgr" not in p.stderr:
            raise Failed(f"the probe domain failed to start for another reason: {p.stderr}")
        return True
    finally:
        cleanup_domain(name, dom_uuid, [image, xml])


def ensure_hook(workdir: Path) -> None:
    """The current hooks/qemu installed, and libvirtd running it (restarted if need be)."""
    install_hook()
    if not hook_is_live(workdir):
        restart_libvirtd()  # installed while libvirtd ran without hooks
        if not hook_is_live(workdir):
            raise Failed("libvirtd does not run the nvmgr hook even after a restart")


def hook_log_lines() -> list[str]:
    try:
        return HOOK_LOG.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def wait_hook_log(pattern: str, *, after: int = 0, timeout: float = 30) -> str:
    """The first hook log line (from line *after* on) matching *pattern*."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in hook_log_lines()[after:]:
            if rx.search(line):
                return line
        if time.monotonic() > deadline:
            tail = "\n".join(hook_log_lines()[after:][-10:])
            raise Failed(f"no hook log line matching {pattern!r} within {timeout} s; "
                         f"new lines:\n{tail}")
        time.sleep(0.1)


# ---------------------------------------------------------------- domains

def new_name(what: str) -> str:
    return f"nvmgr-e2e-{what}-{uuid.uuid4().hex[:6]}"


def serial_log(name: str) -> Path:
    return QEMU_LOG_DIR / f"{name}-serial.log"


def domain_xml(name: str, dom_uuid: str, *, base: Path = EXAMPLE, tpm: bool = True,
               sections: Sequence[dict[str, str]] = (), serial_socket: Path | None = None,
               metadata_attrs: dict[str, str] | None = None, description: str | None = None) -> str:
    """*base* (a libvirt domain XML) renamed, with a new UUID and per-domain paths.

    :param tpm: keep the base's ``<tpm>`` devices.
    :param sections: ``<nvmgr:section>`` attributes to declare in the metadata.
    :param serial_socket: the serial port becomes a unix socket there (so a
        test can type into OVMF's shell), still logged to :func:`serial_log`.
    """
    root = etree.fromstring(base.read_bytes(), etree.XMLParser(remove_comments=True,
                                                               resolve_entities=False))
    old = root.findtext("name")
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = dom_uuid  # type: ignore[union-attr]
    for el in root.iter():
        for k, v in el.attrib.items():
            if old and old in v and k in ("path",):
                el.set(k, v.replace(old, name))
        if el.text and old and old in el.text and el.tag == "nvram":
            el.text = el.text.replace(old, name)
    if description is not None:
        desc = etree.Element("description")
        desc.text = description
        root.find("uuid").addnext(desc)  # type: ignore[union-attr]
    devices = root.find("devices")
    assert devices is not None
    for s in devices.findall("serial") + devices.findall("console"):
        src = s.find("source")
        if src is not None and src.get("path"):
            src.set("path", str(serial_log(name)))
    if not tpm:
        for t in devices.findall("tpm"):
            devices.remove(t)
    if serial_socket is not None:
        for c in devices.findall("console"):
            devices.remove(c)
        for s in devices.findall("serial"):
            devices.remove(s)
        ser = etree.SubElement(devices, "serial", type="unix")
        etree.SubElement(ser, "source", mode="bind", path=str(serial_socket))
        etree.SubElement(ser, "log", file=str(serial_log(name)), append="off")
        etree.SubElement(ser, "target", port="0")
    if sections or metadata_attrs:
        md = root.find("metadata")
        if md is None:
            md = etree.Element("metadata")
            root.find("uuid").addnext(md)  # type: ignore[union-attr]
        nv = etree.SubElement(md, f"{{{NVMGR_NS}}}nvram", nsmap={"nvmgr": NVMGR_NS})
        for k, v in (metadata_attrs or {}).items():
            nv.set(k, v)
        for attrs in sections:
            etree.SubElement(nv, f"{{{NVMGR_NS}}}section", attrs)
    return etree.tostring(root, encoding="unicode")


def exists(name: str) -> bool:
    return virsh("domuuid", name, check=False).returncode == 0


def state(name: str) -> str:
    p = virsh("domstate", name, check=False)
    return p.stdout.strip() if p.returncode == 0 else "undefined"


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def image_of(name: str) -> Path:
    return IMAGE_DIR / f"{name}.nvram"


def info(image: Path | str) -> dict[str, object]:
    return nvmgr_json("info", image)


def section_info(image: Path | str, section: str) -> dict[str, object]:
    for s in info(image)["sections"]:  # type: ignore[attr-defined]
        if s["name"] == section:
            return dict(s)
    raise Failed(f"{image} has no section {section}")


def sha256(path: Path | str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def start(name: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    with contextlib.suppress(FileNotFoundError):
        serial_log(name).unlink()
    return virsh("start", name, check=check)


def destroy(name: str) -> None:
    if state(name) in ("running", "paused", "in shutdown"):
        virsh("destroy", name)


def wait_for_shell(name: str, timeout: float = 60, log: Path | None = None) -> float:
    """Seconds until OVMF's serial output reaches its shell (or its startup.nsh countdown)."""
    log = log or serial_log(name)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(FileNotFoundError):
            if SHELL_RE.search(log.read_bytes()):
                return time.monotonic() - t0
        if state(name) != "running":
            raise Failed(f"{name} stopped while booting ({state(name)})")
        time.sleep(0.25)
    tail = log.read_bytes()[-2000:] if log.exists() else b"(no serial log)"
    raise Failed(f"OVMF did not reach its shell within {timeout} s; serial log ends:\n"
                 f"{_ANSI.sub(b'', tail).decode('latin1')}")


def cleanup_domain(name: str, dom_uuid: str | None, images: Sequence[Path] = ()) -> list[str]:
    """Destroy, undefine, and remove everything a test domain left; return the problems."""
    problems = []
    if exists(name):
        if dom_uuid is None:
            dom_uuid = virsh("domuuid", name).stdout.strip()
        with contextlib.suppress(Failed):
            destroy(name)
        p = virsh("undefine", name, "--nvram", "--tpm", check=False)
        if p.returncode and exists(name):
            p = virsh("undefine", name, check=False)
            if p.returncode:
                problems.append(f"undefine {name}: {p.stderr.strip()}")
    for path in [image_of(name), *images, serial_log(name), QEMU_LOG_DIR / f"{name}.log",
                 SWTPM_LOG_DIR / f"{name}-swtpm.log",
                 Path(f"/var/lib/libvirt/qemu/nvram/{name}_VARS.fd")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if dom_uuid:
        for d in (SWTPM_ROOT / dom_uuid, RUNTIME_ROOT / dom_uuid):
            shutil.rmtree(d, ignore_errors=True)
        # virsh undefine leaves nvmgr's vTPM secret (a domain with a key) and its record
        from nvmgr.domain.qemuargs import vtpm_secret_uuid

        su = str(vtpm_secret_uuid(dom_uuid))
        virsh("secret-undefine", su, check=False)
        with contextlib.suppress(FileNotFoundError):
            (RUNTIME_ROOT / "vtpm-secrets" / su).unlink()
    return problems


# ---------------------------------------------------------------- UEFI variables

def uefi_vars(path: Path | str) -> dict[str, str]:
    """``virt-fw-vars --print`` of a varstore file: variable name -> its description.

    An empty dict is a varstore without variables (OVMF's template).
    """
    p = run([VIRT_FW_VARS, "-i", path, "--print"])
    if "var store range" not in p.stderr + p.stdout:
        raise Failed(f"virt-fw-vars did not parse {path} as a varstore:\n{p.stdout}{p.stderr}")
    out = {}
    for line in p.stdout.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() and not line.startswith(" "):
            out[name.strip()] = rest.strip()
    return out


# ---------------------------------------------------------------- TPM

def _swtpm_on(state: dict[str, bytes], d: Path, tpm2: bool,
              passphrase: bytes | None) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``swtpm socket`` on state files written to *d* (encrypted ones with *passphrase*,
    handed over a pipe as libvirt does); returns it, its socket and control socket."""
    for name, data in state.items():
        (d / name).write_bytes(data)
    sock, ctrl = d / "s", d / "s.ctrl"  # the swtpm TCTI finds the control channel at PATH.ctrl
    fds: tuple[int, ...] = ()
    key: list[str] = []
    if passphrase is not None:
        r, w = os.pipe()
        os.write(w, passphrase)
        os.close(w)
        fds, key = (r,), ["--key", f"pwdfd={r},mode=aes-256-cbc"]
    proc = subprocess.Popen(
        ["swtpm", "socket", *(["--tpm2"] if tpm2 else []), "--tpmstate", f"dir={d}",
         "--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={ctrl}",
         "--flags", "not-need-init,startup-clear", *key],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=fds)
    for fd in fds:
        os.close(fd)
    deadline = time.monotonic() + 10
    while not (sock.exists() and ctrl.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise Failed(f"swtpm did not start on the extracted state: "
                         f"{proc.stdout.read().decode() if proc.stdout else ''}")
        time.sleep(0.02)
    return proc, sock, ctrl


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


def read_pubek12(permall: bytes, workdir: Path, passphrase: bytes | None = None) -> bytes:
    """The public endorsement key of a swtpm TPM 1.2 state file (``TPM_ReadPubek``,
    sent as raw TPM 1.2 command bytes to ``swtpm socket`` on a copy of the state)."""
    d = Path(tempfile.mkdtemp(prefix="ek12-", dir=workdir))
    proc, sock, _ctrl = _swtpm_on({"tpm-00.permall": permall}, d, False, passphrase)
    try:
        cmd = struct.pack(">HII", 0x00C1, 30, 0x7C) + bytes(range(20))  # antiReplay nonce
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(cmd)
            resp = b""
            while len(resp) < 10 or len(resp) < struct.unpack(">I", resp[2:6])[0]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                resp += chunk
        tag, size, rc = struct.unpack(">HII", resp[:10])
        if rc != 0:
            raise Failed(f"TPM_ReadPubek failed: TPM result {rc:#x}")
        return resp[10:size - 20]  # TPM_PUBKEY, then the checksum
    finally:
        _stop(proc)
        shutil.rmtree(d, ignore_errors=True)


def read_ek(permall: bytes, workdir: Path,
            passphrase: bytes | None = None) -> tuple[str, bytes | None]:
    """(EK public area, EK certificate or None) of a swtpm TPM 2.0 state file.

    Runs ``swtpm socket`` on a copy of the state and asks it with tpm2-tools:
    ``tpm2_readpublic -c 0x81010001`` (the EK ``swtpm_setup --createek``
    makes persistent) and ``tpm2_nvread 0x01c00002`` (its RSA certificate).
    """
    d = Path(tempfile.mkdtemp(prefix="ek-", dir=workdir))
    proc, sock, _ctrl = _swtpm_on({"tpm2-00.permall": permall}, d, True, passphrase)
    try:
        tcti = f"swtpm:path={sock}"
        pub = run(["tpm2_readpublic", "-c", "0x81010001", "-T", tcti, "-f", "pem",
                   "-o", d / "ek.pem"])
        name = next((line.split(":", 1)[1].strip() for line in pub.stdout.splitlines()
                     if line.startswith("name:")), "")
        pem = (d / "ek.pem").read_text()
        cert = None
        nv = run(["tpm2_nvread", "-T", tcti, "-C", "o", "-o", d / "ekcert.der", "0x01c00002"],
                 check=False)
        if nv.returncode == 0:
            cert = (d / "ekcert.der").read_bytes()
        return f"{name}\n{pem}", cert
    finally:
        _stop(proc)
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- QEMU

def qmp(domain: str, command: str, arguments: dict[str, object] | None = None) -> object:
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    p = virsh("qemu-monitor-command", domain, json.dumps(msg))
    reply = json.loads(p.stdout)
    if "error" in reply:
        raise Failed(f"QMP {command}: {reply['error']}")
    return reply.get("return")


def qemu_cmdline(name: str) -> list[str]:
    raw = Path(f"/proc/{qemu_pid(name)}/cmdline").read_bytes()
    return [a.decode() for a in raw.split(b"\0") if a]


def nbd_read(name: str, node: str, length: int, workdir: Path) -> bytes:
    """The first *length* bytes of block node *node*, read through QEMU.

    QMP ``nbd-server-start`` + ``block-export-add`` make the running QEMU
    serve the node over NBD; ``qemu-img convert`` reads it.  Every byte
    comes out of QEMU's block layer, from the node QEMU's devices use.
    """
    SOCK_ROOT.mkdir(mode=0o755, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="nbd-", dir=SOCK_ROOT))
    shutil.chown(d, "libvirt-qemu", "libvirt-qemu")  # QEMU creates the socket
    sock = d / "nbd.sock"
    export = f"e2e-{node}"
    qmp(name, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    try:
        qmp(name, "block-export-add", {"type": "nbd", "id": export, "node-name": node,
                                       "name": node, "writable": False})
        out = workdir / f"{node}.nbd.bin"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
             f"nbd+unix:///{node}?socket={sock}", out])
        return out.read_bytes()[:length]
    finally:
        with contextlib.suppress(Failed):
            qmp(name, "block-export-del", {"id": export, "mode": "hard"})
        with contextlib.suppress(Failed):
            qmp(name, "nbd-server-stop")
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- OVMF's shell

class Shell:
    """OVMF's UEFI shell on the guest's serial port (a unix socket QEMU listens on)."""

    PROMPT = b"Shell> "

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(0.1)
        self.buf = b""
        self.fw_cfg_dir: dict[str, tuple[int, int]] = {}
        self.timings: list[tuple[str, float]] = []
        self._dma_area: int | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_until(self, pattern: bytes, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern in self.buf:
                return True
            with contextlib.suppress(TimeoutError, socket.timeout):
                data = self.sock.recv(65536)
                if not data:
                    raise Failed("the serial port closed (QEMU exited?)")
                self.buf += data
        return pattern in self.buf

    def wait_prompt(self, log: Path, timeout: float = 60) -> None:
        """Get to an idle prompt: wait for the shell, skip startup.nsh.

        The shell may have shown up before this connected (QEMU drops serial
        output nobody reads), so *log*, the port's log file, says when it is
        there; then Enter ("any other key": no startup.nsh to run) brings a prompt.
        """
        deadline = time.monotonic() + timeout
        while not (SHELL_RE.search(self.buf) or (log.exists() and SHELL_RE.search(log.read_bytes()))):
            if time.monotonic() > deadline:
                raise Failed(f"OVMF's shell did not show up on the serial port within {timeout} s")
            self._read_until(b"startup.nsh", 0.5)
        time.sleep(0.2)
        for _ in range(3):
            self.buf = b""
            self.sock.sendall(b"\r")
            if self._read_until(self.PROMPT, 10):
                self._drain()
                return
        raise Failed(f"no shell prompt after three Enters: {self.buf[-500:]!r}")

    def _drain(self) -> None:
        time.sleep(0.2)
        with contextlib.suppress(TimeoutError, socket.timeout):
            while self.sock.recv(65536):
                pass
        self.buf = b""

    def command(self, line: str, timeout: float = 60) -> str:
        """Type *line*, wait for the next prompt; its output without terminal escapes."""
        self.buf = b""
        t0 = time.monotonic()
        self.sock.sendall(line.encode("ascii") + b"\r")
        ok = self._read_until(self.PROMPT, timeout)
        self.timings.append((line, time.monotonic() - t0))
        if not ok:
            raise Failed(f"no prompt after {line!r} within {timeout} s: {self.buf[-800:]!r}")
        out = _ANSI.sub(b"", self.buf.rpartition(self.PROMPT)[0]).decode("latin1")
        self.buf = b""
        return out

    # -- memory and I/O ports through the shell's mm and dmem commands

    def write32(self, addr: int, value: int, *, io: bool = False) -> None:
        out = self.command(f"mm {addr:x} {value:x} -w 4 {'-IO' if io else '-MEM'} -n")
        if "rror" in out or "nvalid" in out:
            raise Failed(f"mm failed: {out}")

    def dmem(self, addr: int, length: int) -> bytes:
        out = self.command(f"dmem {addr:x} {length:x}")
        data = bytearray()
        for m in re.finditer(r"^\s*([0-9A-Fa-f]{8}): ((?:[0-9A-Fa-f]{2}[ -]){1,16})", out, re.M):
            if int(m.group(1), 16) != (addr + len(data)) & 0xFFFFFFFF:
                raise Failed(f"dmem output skips to {m.group(1)}:\n{out}")
            data += bytes.fromhex(m.group(2).replace("-", " "))
        if len(data) < length:
            raise Failed(f"dmem gave {len(data)} of {length} bytes:\n{out}")
        return bytes(data[:length])

    def free_memory(self, need: int) -> int:
        """A page-aligned address in memory the firmware lists as free (lowest first)."""
        out = self.command("memmap")
        for m in re.finditer(r"Available\s+([0-9A-F]{16})-([0-9A-F]{16})", out):
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if start >= 0x100000 and end - start + 1 >= need and end < 1 << 32:
                return start
        raise Failed(f"no free memory of {need} bytes in the UEFI memory map:\n{out[-2000:]}")

    # -- fw_cfg (QEMU's firmware configuration device, x86 I/O ports 0x510/0x514)

    FW_CFG_FILE_DIR = 0x19
    DMA_PORT = 0x514
    DMA_READ, DMA_SELECT, DMA_ERROR = 0x02, 0x08, 0x01

    def _dma_read(self, selector: int, length: int, area: int) -> bytes:
        """The guest reads *length* bytes of fw_cfg item *selector* by DMA into *area*.

        A FWCfgDmaAccess (big-endian control, length, address) is written at
        *area*, its address into the DMA register (big-endian, high word
        first; the low word starts the transfer); QEMU copies the item into
        guest memory at *area* + 4 KiB and clears the control word.
        """
        def be(v: int) -> int:  # mm stores little-endian; fw_cfg reads big-endian
            return int(struct.unpack("<I", struct.pack(">I", v))[0])

        buf = area + 0x1000
        words = [(0, (selector << 16) | self.DMA_SELECT | self.DMA_READ), (4, length)]
        if self._dma_area != area:  # the target address stays in place between transfers
            words += [(8, 0), (12, buf)]
            self._dma_area = area
        for off, v in words:
            self.write32(area + off, be(v))
        self.write32(self.DMA_PORT, 0, io=True)
        self.write32(self.DMA_PORT + 4, be(area), io=True)
        control = struct.unpack(">I", self.dmem(area, 4))[0]
        if control != 0:
            raise Failed(f"fw_cfg DMA did not complete (control word {control:#x})")
        return self.dmem(buf, length)

    def fw_cfg_files(self, area: int) -> dict[str, tuple[int, int]]:
        """fw_cfg's file directory as the guest sees it: name -> (selector, size)."""
        count = struct.unpack(">I", self._dma_read(self.FW_CFG_FILE_DIR, 4, area))[0]
        if not 0 < count < 256:
            raise Failed(f"implausible fw_cfg file count {count}")
        raw = self._dma_read(self.FW_CFG_FILE_DIR, 4 + 64 * count, area)[4:]
        files = {}
        for i in range(count):
            size, select = struct.unpack(">IH", raw[64 * i: 64 * i + 6])
            fname = raw[64 * i + 8: 64 * i + 64].split(b"\0", 1)[0].decode("ascii", "replace")
            files[fname] = (select, size)
        return files

    def fw_cfg_read(self, fw_name: str) -> bytes:
        """The bytes of fw_cfg file *fw_name*, fetched by the guest from QEMU.

        The directory the guest saw is left in :attr:`fw_cfg_dir`.
        """
        area = self.free_memory(1 << 20)
        files = self.fw_cfg_dir = self.fw_cfg_files(area)
        if fw_name not in files:
            raise Failed(f"fw_cfg has no file {fw_name}; it has {sorted(files)}")
        select, size = files[fw_name]
        if size > (1 << 20) - 0x1000:
            raise Failed(f"fw_cfg file {fw_name} is {size} bytes; read at most 1020 KiB")
        return self._dma_read(select, size, area)


@contextlib.contextmanager
def temp_key(path: Path) -> Iterator[Path]:
    """A fresh 32-byte key file, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------- a test VM

class VM:
    """One throw-away domain: a unique name and UUID, its XML, and its cleanup."""

    def __init__(self, what: str, workdir: Path, **xml_options: object) -> None:
        self.name = new_name(what)
        self.uuid = str(uuid.uuid4())
        self.workdir = workdir
        self.socket: Path | None = None
        if xml_options.pop("serial_socket", False):
            SOCK_ROOT.mkdir(mode=0o755, exist_ok=True)
            self.socket = SOCK_ROOT / f"{self.name}.serial"
            xml_options["serial_socket"] = self.socket
        self.xml = domain_xml(self.name, self.uuid, **xml_options)  # type: ignore[arg-type]
        self.xml_path = workdir / f"{self.name}.xml"
        self.xml_path.write_text(self.xml)
        self.extra_files: list[Path] = []

    @property
    def image(self) -> Path:
        return image_of(self.name)

    @property
    def swtpm_dir(self) -> Path:
        return SWTPM_ROOT / self.uuid / "tpm2"

    @property
    def runtime_dir(self) -> Path:
        return RUNTIME_ROOT / self.uuid

    def define(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return nvmgr("define", self.xml_path, *extra)

    def start(self, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return start(self.name, check=check)

    def destroy(self) -> None:
        destroy(self.name)

    def state(self) -> str:
        return state(self.name)

    def wait_for_shell(self, timeout: float = 60) -> float:
        return wait_for_shell(self.name, timeout)

    def get(self, section: str, *key_args: str) -> bytes:
        out = self.workdir / f"{self.name}.{section}.bin"
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        nvmgr("get", "--domain", self.name, section, "-o", out, *key_args)
        return out.read_bytes()

    def section(self, name: str) -> dict[str, object]:
        return section_info(self.image, name)

    def cleanup(self) -> list[str]:
        files = [*self.extra_files, *([self.socket] if self.socket else [])]
        return cleanup_domain(self.name, self.uuid, files)
