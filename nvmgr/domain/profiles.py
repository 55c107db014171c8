"""Profiles: what each kind of device needs from the image, as data.

A profile lists the sections a device kind needs, each with its worst-case
size and :class:`~nvmgr.format.model.Binding`.  The numbers and where they come
from (measured here, or a documented limit) are in ``notes/measurements.md``;
this module only holds the tables and the lookups over them.

UEFI vars are sized from the varstore template: the template file's own size
when it can be read, else a table keyed by the template's file name, else the
vars size that goes with the loader (by file name, then by the code file's
size).  ``<os firmware='efi'>`` without a loader is resolved like libvirt
does, from the QEMU firmware descriptors (``/usr/share/qemu/firmware``).
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import json
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from nvmgr.errors import InvalidInputError, NotFoundError
from nvmgr.format.model import Binding

KiB = 1 << 10
MiB = 1 << 20

# --------------------------------------------------------------------------
# Device kinds


@dataclasses.dataclass(frozen=True)
class SectionProfile:
    """One section of a device kind.

    :param suffix: appended to the device's prefix (``tpm`` + ``-permall``);
        empty for kinds with one section, which take the declared name.
    :param size: worst-case bytes the device may ever store there.
    :param source: where the number comes from (see notes/measurements.md).
    """

    suffix: str
    size: int
    binding: Binding
    source: str


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """A device kind: its sections and, for ``block`` kinds, the QEMU device."""

    kind: str
    sections: tuple[SectionProfile, ...]
    driver: str | None = None
    description: str = ""
    #: The libvirt device element each of which gets a section of this kind
    #: when the domain's metadata asks for it (``<nvmgr:per-device kind=...>``).
    libvirt_device: str | None = None


_TPM2_SOURCE = "libtpms 0.9 limits; measured with swtpm 0.7.1 (notes/measurements.md)"
_TPM12_SOURCE = "libtpms TPMLIB_GetTPMProperty maxima + swtpm blob framing"

#: Every device kind nvmgr knows.  ``tpm-2.0``/``tpm-1.2`` are derived from
#: ``<tpm><backend type='emulator' version=...>``; the rest are named by
#: ``<nvmgr:section kind=...>`` in the domain's metadata.
PROFILES: Mapping[str, DeviceProfile] = {
    p.kind: p
    for p in (
        DeviceProfile(
            "tpm-2.0",
            (
                # libtpms marshals at most NV_MEMORY_SIZE (176,832) bytes of NV
                # plus fixed state into permall; NV filled to TPM_RC_NV_SPACE
                # gave 150,814 bytes.  256 KiB covers NV_MEMORY_SIZE + 32 KiB
                # (libtpms' own first buffer) + swtpm's header/encryption framing.
                SectionProfile("-permall", 256 * KiB, Binding.TPM, _TPM2_SOURCE),
                # VolatileState_Save returns a UINT16: at most 65,535 bytes,
                # + 4 KiB for swtpm's framing (header, IV, HMAC, padding).
                SectionProfile("-volatilestate", 68 * KiB, Binding.TPM, _TPM2_SOURCE),
                # No savestate: libtpms' TPM 2 never produces one (length 0).
            ),
            description="swtpm TPM 2.0 state (tpm2-00.permall, tpm2-00.volatilestate)",
        ),
        DeviceProfile(
            "tpm-1.2",
            (
                # TPMPROP_TPM_MAX_NV_SPACE 40,960; SAVESTATE 21,088;
                # VOLATILESTATE 21,319; each + 4 KiB of swtpm framing.
                SectionProfile("-permall", 44 * KiB, Binding.TPM, _TPM12_SOURCE),
                SectionProfile("-savestate", 28 * KiB, Binding.TPM, _TPM12_SOURCE),
                SectionProfile("-volatilestate", 28 * KiB, Binding.TPM, _TPM12_SOURCE),
            ),
            description="swtpm TPM 1.2 state (tpm-00.permall, -savestate, -volatilestate)",
        ),
        DeviceProfile(
            "pci-vpd",
            (SectionProfile("", 32 * KiB, Binding.FWCFG, "PCI VPD address is 15 bits"),),
            description="PCI Vital Product Data, handed to firmware through fw_cfg",
        ),
        DeviceProfile(
            "nic-eeprom",
            (SectionProfile("", 32 * KiB, Binding.OPAQUE, "largest Intel NIC NVM image (82574)"),),
            description="NIC EEPROM/NVM image; no x86 NIC in QEMU 7.2 reads one, so kept only",
            libvirt_device="interface",
        ),
        DeviceProfile(
            "ipmi-fru",
            (SectionProfile("", 64 * KiB, Binding.OPAQUE, "ipmi-bmc-sim fruareasize is 16-bit"),),
            description="IPMI FRU/chassis data for ipmi-bmc-sim's frudatafile",
        ),
        DeviceProfile(
            "spapr-nvram",
            (SectionProfile("", 64 * KiB, Binding.BLOCK, "QEMU default; accepts 8 KiB-1 MiB"),),
            driver="spapr-nvram",
            description="pSeries NVRAM through the device's drive property",
        ),
    )
}


def per_device_profiles() -> dict[str, DeviceProfile]:
    """The kinds ``<nvmgr:per-device kind=...>`` may name: one section per libvirt device."""
    return {k: p for k, p in PROFILES.items() if p.libvirt_device is not None}


def per_device_section(kind: str, mac: str) -> str:
    """The section name of a per-device kind's device: ``eeprom-525400a1b2c3`` for a NIC."""
    stem = "eeprom" if kind == "nic-eeprom" else kind
    return f"{stem}-{mac.replace(':', '').lower()}"


def device_profile(kind: str) -> DeviceProfile:
    """The profile for *kind*.

    :raise InvalidInputError: no such kind (the message lists the known ones).
    """
    try:
        return PROFILES[kind]
    except KeyError as e:
        known = ", ".join(sorted(PROFILES))
        raise InvalidInputError(f"unknown device kind {kind!r} (known: {known})") from e


#: The TPM version libvirt 9.0 fills in for ``<backend type='emulator'>``
#: without one, by model (measured: ``virsh define``, then ``dumpxml``; a
#: ``<tpm>`` without a model becomes ``tpm-tis`` on x86).
TPM_DEFAULT_VERSION: Mapping[str, str] = {
    "tpm-tis": "1.2",
    "tpm-crb": "2.0",
    "tpm-spapr": "2.0",
}
TPM_DEFAULT_MODEL = "tpm-tis"


def tpm_version(model: str | None, version: str | None) -> str:
    """The TPM version a ``<tpm>`` gets: its own, else libvirt's default for the model."""
    if version:
        return version
    return TPM_DEFAULT_VERSION.get(model or TPM_DEFAULT_MODEL, "2.0")


def tpm_prefix(index: int) -> str:
    """Section-name prefix of the n-th TPM: ``tpm``, then ``tpm1``... (pSeries has two)."""
    return "tpm" if index == 0 else f"tpm{index}"


# --------------------------------------------------------------------------
# UEFI variable stores

UEFI_SECTION = "uefi-vars"

#: Varstore templates by file name.  Debian/Ubuntu (``/usr/share/OVMF``,
#: ``/usr/share/AAVMF``), Fedora/RHEL (``/usr/share/edk2``) and QEMU's own
#: bundled images (``/usr/share/qemu``).
VARS_BY_TEMPLATE: Mapping[str, int] = {
    "OVMF_VARS.fd": 128 * KiB,
    "OVMF_VARS.ms.fd": 128 * KiB,
    "OVMF_VARS_4M.fd": 528 * KiB,
    "OVMF_VARS_4M.ms.fd": 528 * KiB,
    "OVMF_VARS_4M.snakeoil.fd": 528 * KiB,
    "OVMF_VARS.secboot.fd": 528 * KiB,  # Fedora: 4M build under the old name
    "OVMF_VARS.secboot.qcow2": 528 * KiB,
    "OVMF_VARS_4M.qcow2": 528 * KiB,
    "OVMF_VARS_4M.secboot.qcow2": 528 * KiB,
    "edk2-i386-vars.fd": 528 * KiB,
    "AAVMF_VARS.fd": 64 * MiB,
    "AAVMF_VARS.ms.fd": 64 * MiB,
    "AAVMF_VARS.snakeoil.fd": 64 * MiB,
    "AAVMF32_VARS.fd": 64 * MiB,
    "vars-template-pflash.raw": 64 * MiB,
    "vars-template-pflash.qcow2": 64 * MiB,
    "edk2-arm-vars.fd": 64 * MiB,
}

#: The varstore that goes with a code image, by the code file's name.
VARS_BY_LOADER: Mapping[str, int] = {
    "OVMF_CODE.fd": 128 * KiB,
    "OVMF_CODE.secboot.fd": 128 * KiB,
    "OVMF_CODE.ms.fd": 128 * KiB,
    "OVMF_CODE_4M.fd": 528 * KiB,
    "OVMF_CODE_4M.secboot.fd": 528 * KiB,
    "OVMF_CODE_4M.ms.fd": 528 * KiB,
    "OVMF_CODE_4M.snakeoil.fd": 528 * KiB,
    "OVMF_CODE.secboot.qcow2": 528 * KiB,
    "OVMF_CODE_4M.qcow2": 528 * KiB,
    "edk2-x86_64-code.fd": 528 * KiB,
    "edk2-x86_64-secure-code.fd": 528 * KiB,
    "AAVMF_CODE.fd": 64 * MiB,
    "AAVMF_CODE.ms.fd": 64 * MiB,
    "AAVMF_CODE.no-secboot.fd": 64 * MiB,
    "AAVMF32_CODE.fd": 64 * MiB,
    "QEMU_EFI-pflash.raw": 64 * MiB,
    "QEMU_EFI-silent-pflash.raw": 64 * MiB,
    "edk2-aarch64-code.fd": 64 * MiB,
    "edk2-arm-code.fd": 64 * MiB,
}

#: The varstore that goes with a code image, by the code file's size: x86
#: flash is 2 MiB or 4 MiB in total (code + vars); Arm pads both to 64 MiB.
VARS_BY_LOADER_SIZE: Mapping[int, int] = {
    1_966_080: 128 * KiB,
    3_653_632: 528 * KiB,
    64 * MiB: 64 * MiB,
}

_QCOW2_MAGIC = b"QFI\xfb"

#: The largest flash image nvmgr accepts as a varstore template, a varstore
#: to import or a loader to size from: AAVMF's 64 MiB, the largest pflash a
#: real firmware uses (x86 OVMF's varstore is 528 KiB).
MAX_FLASH = 64 * MiB


def open_flash_file(path: str, what: str) -> int | None:
    """An open descriptor of firmware file *path*, checked; None if it does not exist.

    Never blocks: opened with ``O_NONBLOCK`` (a FIFO does not wait for a
    writer) and refused unless the opened file is a regular file of at most
    :data:`MAX_FLASH` bytes.  The caller closes the descriptor.

    :raise InvalidInputError: not a regular file (FIFO, device, directory,
        socket), or larger than :data:`MAX_FLASH`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.EISDIR:
            raise InvalidInputError(f"{what} {path} is a directory, not a firmware file") from e
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError(
                f"{what} {path} is not a regular file (a FIFO, device or socket); "
                "a firmware file must be a regular file")
        if st.st_size > MAX_FLASH:
            raise InvalidInputError(
                f"{what} {path} is {st.st_size:,} bytes, larger than the largest flash "
                f"a real firmware uses ({MAX_FLASH:,} bytes, AAVMF's)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_flash_file(path: str) -> None:
    """:raise InvalidInputError: *path* exists and is no firmware file
    (:func:`open_flash_file`)."""
    _image_size(path)


def _image_size(path: str, what: str = "firmware file") -> int | None:
    """Guest-visible size of a raw or qcow2 file, or None if it does not exist.

    :raise InvalidInputError: see :func:`open_flash_file`; or a qcow2 file
        whose virtual size is above :data:`MAX_FLASH`.
    """
    fd = open_flash_file(path, what)
    if fd is None:
        return None
    try:
        head = os.pread(fd, 32, 0)
        size = os.fstat(fd).st_size
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[:4] == _QCOW2_MAGIC and len(head) >= 32:
        size = int(struct.unpack(">Q", head[24:32])[0])
        if size > MAX_FLASH:
            raise InvalidInputError(
                f"{what} {path} is a qcow2 image of {size:,} bytes, larger than the "
                f"largest flash a real firmware uses ({MAX_FLASH:,} bytes)")
    return size


@dataclasses.dataclass(frozen=True)
class VarsSize:
    """A varstore size and how it was found (shown by ``nvmgr plan``)."""

    size: int
    source: str


def uefi_vars_size(template: str | None, loader: str | None) -> VarsSize:
    """Worst-case size of the UEFI vars section for this template/loader pair.

    :raise InvalidInputError: neither names a known firmware nor can be read.
    """
    lookups: list[tuple[str | None, Mapping[str, int], str]] = [
        (template, VARS_BY_TEMPLATE, "template name"),
        (loader, VARS_BY_LOADER, "loader name"),
    ]
    if template:
        size = _image_size(template)
        if size:
            return VarsSize(size, f"size of {template}")
    for path, table, what in lookups:
        if path and os.path.basename(path) in table:
            return VarsSize(table[os.path.basename(path)], f"{what} {os.path.basename(path)}")
    if loader:
        size = _image_size(loader)
        if size is not None and size in VARS_BY_LOADER_SIZE:
            return VarsSize(VARS_BY_LOADER_SIZE[size], f"loader size {size:,}")
    raise InvalidInputError(
        f"cannot tell the UEFI vars size for loader {loader!r}, template {template!r}: "
        f"give it with <nvmgr:section name='{UEFI_SECTION}' size='...'/>"
    )


# --------------------------------------------------------------------------
# Firmware autoselection (``<os firmware='efi'>`` without a loader)

#: Where QEMU firmware descriptors live, highest priority first (libvirt's order).
FIRMWARE_DIRS = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")

#: libvirt machine aliases -> the canonical prefix descriptors match against.
MACHINE_ALIASES: Mapping[str, str] = {
    "q35": "pc-q35-",
    "pc": "pc-i440fx-",
    "virt": "virt-",
}


@dataclasses.dataclass(frozen=True)
class Firmware:
    """One firmware choice: code image, varstore template, and their formats."""

    loader: str
    template: str | None
    format: str
    descriptor: str
    features: frozenset[str]


def _descriptors(dirs: Iterable[str]) -> list[Path]:
    """Descriptor files in libvirt's order: by file name, earlier dirs override."""
    found: dict[str, Path] = {}
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if name.endswith(".json") and name not in found:
                found[name] = Path(d) / name
    return [found[n] for n in sorted(found)]


def _machine_matches(machine: str, patterns: Iterable[str]) -> bool:
    canon = machine
    for alias, prefix in MACHINE_ALIASES.items():
        if machine == alias:
            canon = prefix + "0"
    return any(fnmatch.fnmatchcase(canon, p) or fnmatch.fnmatchcase(machine, p) for p in patterns)


def select_firmware(
    arch: str,
    machine: str,
    features: Mapping[str, bool],
    *,
    smm: bool | None = None,
    dirs: Iterable[str] | None = None,
) -> Firmware:
    """The UEFI flash firmware libvirt would pick for this guest.

    :param features: ``<os><firmware><feature>`` wishes (``secure-boot``,
        ``enrolled-keys``: True required, False refused).
    :param smm: ``<features><smm state=...>``; False skips firmware that
        requires SMM.
    :param dirs: descriptor directories, default :data:`FIRMWARE_DIRS`.
    :raise NotFoundError: no descriptor fits.
    """
    dirs = tuple(FIRMWARE_DIRS if dirs is None else dirs)
    for path in _descriptors(dirs):
        try:
            desc = json.loads(path.read_text())
            mapping = desc["mapping"]
            if "uefi" not in desc.get("interface-types", ()) or mapping.get("device") != "flash":
                continue
            if mapping.get("mode", "split") != "split":
                continue
            feats = frozenset(desc.get("features", ()))
            targets = desc.get("targets", ())
            loader = mapping["executable"]["filename"]
            template = mapping.get("nvram-template", {}).get("filename")
            fmt = mapping["executable"].get("format", "raw")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if not any(
            t.get("architecture") == arch and _machine_matches(machine, t.get("machines", ()))
            for t in targets
            if isinstance(t, dict)
        ):
            continue
        if any((name in feats) != wanted for name, wanted in features.items()):
            continue
        if smm is False and "requires-smm" in feats:
            continue
        return Firmware(loader, template, fmt, str(path), feats)
    raise NotFoundError(
        f"no UEFI firmware descriptor in {', '.join(dirs)} fits arch {arch}, machine "
        f"{machine}, features {dict(features)}: name the <loader> explicitly"
    )
