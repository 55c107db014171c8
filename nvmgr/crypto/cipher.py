"""Section encryption and key wrapping: the only module that imports ``cryptography``.

An encrypted image has one random 32-byte *data key*.  Each key-encryption key
(:class:`Kek`) that may open the image wraps the data key with RFC 3394 AES key
wrap into a key slot (``schemas/nvmgr.asn1``, ``KeySlot``); the slot is named
by the KEK's *key id* so the right slot is found without trial decryption.

Sections are encrypted with scheme ``aes256CbcHmacSha256``
(:class:`SectionCipher`):

* from the data key, HKDF-SHA256 (no salt) derives a 32-byte AES-256 key
  (info ``"nvmgr-v1 section encryption"``) and a 32-byte HMAC key
  (info ``"nvmgr-v1 section mac"``);
* the payload is padded with PKCS#7 and encrypted with AES-256-CBC under a
  fresh random 16-byte IV each time it is written, so the stored length is
  ``(len(plaintext) // 16 + 1) * 16``;
* encrypt-then-MAC: HMAC-SHA256 over
  ``b"nvmgr-v1\\0" + name.encode() + b"\\0" + iv + ciphertext``.  Binding the
  section name means a ciphertext moved to another section fails to verify.

The MAC is always checked (in constant time) before any byte is decrypted by
:meth:`SectionCipher.decrypt`, the only way to decrypt: no plaintext leaves
this module unauthenticated.  :meth:`SectionCipher.verifier` checks a MAC in
a streaming pass without decrypting (``nvmgr check`` on large sections).
"""

from __future__ import annotations

import mmap
import os
import zlib
from collections.abc import Callable, Sequence
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from nvmgr.errors import CorruptError, UsageError, WrongKeyError
from nvmgr.format.model import KeySlot

__all__ = [
    "DATA_KEY_LEN",
    "IV_LEN",
    "KEK_LEN",
    "KEY_ID_LEN",
    "MAC_LEN",
    "WRAPPED_KEY_LEN",
    "Kek",
    "SectionCipher",
    "SectionEncryptor",
    "SectionVerifier",
    "new_data_key",
    "unlock",
]

#: Length of an image's data key (AES-256).
DATA_KEY_LEN = 32
#: Length of a key-encryption key (AES-256 key wrap).
KEK_LEN = 32
#: Length of a wrapped data key (RFC 3394 adds one 8-byte block).
WRAPPED_KEY_LEN = DATA_KEY_LEN + 8
#: Length of a key id.
KEY_ID_LEN = 8
#: AES-CBC IV length.
IV_LEN = 16
#: HMAC-SHA256 tag length.
MAC_LEN = 32

#: What the one-pass methods read from: any contiguous bytes, viewed, never copied.
BytesLike = bytes | bytearray | memoryview | mmap.mmap

_BLOCK = 16
#: Bytes per step of a one-shot encryption or decryption: each step's
#: ciphertext is MACed (and crc'd) while it is still in the CPU's cache.
_STEP = 256 << 10
_KEY_ID_INFO = b"nvmgr-kek-id-v1"
_ENC_INFO = b"nvmgr-v1 section encryption"
_MAC_INFO = b"nvmgr-v1 section mac"
_DIR_INFO = b"nvmgr-v1 directory mac"
_LUKS_INFO = b"nvmgr-v1 luks passphrase"
_VTPM_INFO = b"nvmgr-v1 vtpm passphrase"
_DIR_PREFIX = b"nvmgr-v1 directory\0"
_MAC_PREFIX = b"nvmgr-v1\0"


def new_data_key() -> bytes:
    """Return a fresh random data key of :data:`DATA_KEY_LEN` bytes from ``os.urandom``."""
    return os.urandom(DATA_KEY_LEN)


def _hmac_sha256(key: bytes) -> hmac.HMAC:
    return hmac.HMAC(key, hashes.SHA256())


class Kek:
    """A key-encryption key: wraps and unwraps an image's data key.

    The key bytes are kept private; ``repr()`` and ``str()`` show only the key
    id and the label, and no error message ever includes them.

    :param key: exactly :data:`KEK_LEN` (32) bytes.
    :param label: where the key came from (``"file"``,
        ``"libvirt-secret:<uuid>"``), stored in the key slot for humans.
    :raise UsageError: *key* is not 32 bytes.

    :ivar key_id: the first 8 bytes of HMAC-SHA256(key, ``b"nvmgr-kek-id-v1"``);
        names the key in key slots without revealing it.
    :ivar label: the label given.
    """

    __slots__ = ("__key", "key_id", "label")

    def __init__(self, key: bytes, label: str | None = None) -> None:
        if not isinstance(key, bytes | bytearray):
            raise UsageError(f"key must be exactly {KEK_LEN} bytes (got {type(key).__name__})")
        if len(key) != KEK_LEN:
            raise UsageError(f"key must be exactly {KEK_LEN} bytes (got {len(key)})")
        self.__key = bytes(key)
        h = _hmac_sha256(self.__key)
        h.update(_KEY_ID_INFO)
        self.key_id: bytes = h.finalize()[:KEY_ID_LEN]
        self.label: str | None = label

    def __repr__(self) -> str:
        return f"Kek(key_id={self.key_id.hex()}, label={self.label!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would copy the key bytes out of this object; refuse.
        raise TypeError("Kek objects cannot be pickled")

    def wrap(self, data_key: bytes) -> bytes:
        """Wrap *data_key* with RFC 3394 AES key wrap.

        :param data_key: the image's data key, :data:`DATA_KEY_LEN` bytes.
        :return: the wrapped key, :data:`WRAPPED_KEY_LEN` (40) bytes.
        :raise UsageError: *data_key* is not 32 bytes.
        """
        if len(data_key) != DATA_KEY_LEN:
            raise UsageError(f"data key must be exactly {DATA_KEY_LEN} bytes (got {len(data_key)})")
        return aes_key_wrap(self.__key, bytes(data_key))

    def unwrap(self, wrapped: bytes) -> bytes:
        """Unwrap a data key wrapped by :meth:`wrap`.

        :param wrapped: :data:`WRAPPED_KEY_LEN` (40) bytes.
        :return: the data key, :data:`DATA_KEY_LEN` bytes.
        :raise WrongKeyError: the integrity check failed: this KEK did not wrap
            *wrapped* (or *wrapped* is damaged; :func:`unlock` tells the two apart
            by key id).
        :raise CorruptError: *wrapped* is not 40 bytes long.
        """
        if len(wrapped) != WRAPPED_KEY_LEN:
            raise CorruptError(f"wrapped key must be {WRAPPED_KEY_LEN} bytes (got {len(wrapped)})")
        try:
            return aes_key_unwrap(self.__key, bytes(wrapped))
        except InvalidUnwrap as e:
            raise WrongKeyError(f"key {self.key_id.hex()} does not unwrap this data key") from e


def unlock(slots: Sequence[KeySlot], kek: Kek, *, image: str | None = None) -> bytes:
    """Return the data key from the key slot that *kek* opens.

    The slot is chosen by key id, so a wrong key is told apart from a damaged
    slot: a key id match that fails to unwrap means the slot bytes are damaged.

    :param slots: the image directory's key slots.
    :param kek: the key the user gave.
    :param image: the image path, for error messages.
    :return: the image's data key.
    :raise WrongKeyError: no slot has *kek*'s key id.
    :raise CorruptError: a slot has *kek*'s key id but does not unwrap.
    """
    matching = [s for s in slots if s.key_id == kek.key_id]
    if not matching:
        ids = ", ".join(s.key_id.hex() for s in slots) or "none"
        raise WrongKeyError(
            f"the key given is not one of this image's keys (key ids: {ids})", image=image
        )
    for slot in matching:
        try:
            return kek.unwrap(slot.wrapped_key)
        except (WrongKeyError, CorruptError):
            continue
    raise CorruptError(f"key slot {kek.key_id.hex()} is corrupted", image=image)


def _check_name(name: str) -> bytes:
    if not isinstance(name, str) or not name or "\0" in name:
        raise UsageError(f"invalid section name {name!r} for encryption", section=str(name)[:80])
    return name.encode("utf-8")


class SectionCipher:
    """Encrypts and decrypts section payloads under one image's data key.

    :param data_key: the image's data key (:data:`DATA_KEY_LEN` bytes), e.g.
        from :func:`unlock` or :func:`new_data_key`.
    :param image: the image path, named in the errors this cipher raises.
    :raise UsageError: *data_key* is not 32 bytes.
    """

    __slots__ = ("__dir_key", "__enc_key", "__luks", "__mac_key", "__vtpm", "image")

    def __init__(self, data_key: bytes, *, image: str | None = None) -> None:
        if len(data_key) != DATA_KEY_LEN:
            raise UsageError(f"data key must be exactly {DATA_KEY_LEN} bytes (got {len(data_key)})")
        self.__enc_key = _hkdf(bytes(data_key), _ENC_INFO)
        self.__mac_key = _hkdf(bytes(data_key), _MAC_INFO)
        self.__dir_key = _hkdf(bytes(data_key), _DIR_INFO)
        self.__luks = _hkdf(bytes(data_key), _LUKS_INFO)
        self.__vtpm = _hkdf(bytes(data_key), _VTPM_INFO)
        self.image = image

    def __repr__(self) -> str:
        return f"SectionCipher(image={self.image!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("SectionCipher objects cannot be pickled")

    # -- internals ------------------------------------------------------

    def _mac(self, name: bytes, iv: bytes) -> hmac.HMAC:
        h = _hmac_sha256(self.__mac_key)
        h.update(_MAC_PREFIX + name + b"\0" + iv)
        return h

    def _cipher(self, iv: bytes) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES256(self.__enc_key), modes.CBC(iv))

    def _corrupt(self, name: str, why: str) -> CorruptError:
        return CorruptError(f"section {name} is corrupted ({why})", image=self.image, section=name)

    def _check_iv(self, name: str, iv: bytes) -> bytes:
        if len(iv) != IV_LEN:
            raise self._corrupt(name, f"IV must be {IV_LEN} bytes, is {len(iv)}")
        return bytes(iv)

    # -- one-shot -------------------------------------------------------

    def encrypt(self, name: str, plaintext: BytesLike) -> tuple[bytes, bytes, bytes]:
        """Encrypt the payload of section *name* under a fresh random IV.

        :param name: the section name, bound into the MAC.
        :param plaintext: the payload.
        :return: ``(ciphertext, iv, mac)``; the ciphertext is
            ``(len(plaintext) // 16 + 1) * 16`` bytes, the IV 16, the MAC 32.
        :raise UsageError: *name* is empty or contains NUL.
        """
        parts: list[bytes] = []
        _n, iv, mac, _crc = self.seal_to(name, plaintext, lambda _off, piece: parts.append(
            bytes(piece)))
        return b"".join(parts), iv, mac

    def seal_to(self, name: str, plaintext: BytesLike, write: Callable[[int, memoryview], object],
                *, chunk: int = 4 << 20) -> tuple[int, bytes, bytes, int]:
        """:meth:`encrypt` in one pass, streamed: the ciphertext goes to
        ``write(offset, view)`` in pieces of up to *chunk* bytes (the view is
        reused after the call returns: copy or write it, do not keep it).

        The same bytes as :meth:`encrypt` (PKCS#7, AES-256-CBC, the MAC over
        the IV and ciphertext), made in steps of 256 KiB from views of
        *plaintext* (never copied) into one buffer of *chunk* bytes; each step
        is MACed and crc'd while it is in the CPU's cache.  The crc32 is what
        an image's directory keeps to check the stored bytes without the key.

        :return: ``(length of the ciphertext, iv, mac, crc32 of the ciphertext)``.
        :raise UsageError: *name* is empty or contains NUL.
        """
        bname = _check_name(name)
        chunk = max(_BLOCK, chunk - chunk % _BLOCK)
        src = memoryview(plaintext).cast("B")
        n = len(src)
        full = n - n % _BLOCK
        pad = _BLOCK - (n - full)
        tail = bytes(src[full:]) + bytes([pad]) * pad
        iv = os.urandom(IV_LEN)
        enc = self._cipher(iv).encryptor()
        mac = self._mac(bname, iv)
        crc = 0
        # Room for a chunk, the padded last block, and the block more update_into wants.
        buf = bytearray(min(chunk, full) + 2 * _BLOCK)
        fill = base = off = 0
        with memoryview(buf) as view:
            while True:
                k = min(_STEP, full - off, chunk - fill)
                if k:
                    with src[off:off + k] as piece, view[fill:] as into:
                        enc.update_into(piece, into)
                last = off + k == full
                m = k
                if last:
                    with view[fill + k:] as into:
                        enc.update_into(tail, into)
                    m += _BLOCK
                with view[fill:fill + m] as piece:
                    mac.update(piece)
                    crc = zlib.crc32(piece, crc)
                fill += m
                off += k
                if last or fill >= chunk:
                    with view[:fill] as piece:
                        write(base, piece)
                    base += fill
                    fill = 0
                if last:
                    break
        enc.finalize()
        return full + _BLOCK, iv, mac.finalize(), crc

    def _verify(self, name: str, src: memoryview, iv: bytes, mac: bytes,
                crc32: int | None) -> None:
        """One pass over the ciphertext *src*: its crc32 (when given) and its MAC."""
        h = self._mac(_check_name(name), self._check_iv(name, iv))
        crc = 0
        for off in range(0, len(src), _STEP):
            with src[off:off + _STEP] as piece:
                h.update(piece)
                if crc32 is not None:
                    crc = zlib.crc32(piece, crc)
        if crc32 is not None and crc != crc32:
            raise self._corrupt(name, f"crc32 {crc:08x}, directory says {crc32:08x}")
        try:
            h.verify(bytes(mac))
        except InvalidSignature:
            raise self._corrupt(name, "MAC mismatch") from None
        if not src or len(src) % _BLOCK:
            raise self._corrupt(name, "bad length")

    def _padding(self, name: str, src: memoryview, iv: bytes) -> int:
        """The PKCS#7 padding length of the (verified) ciphertext *src*,
        from its last block alone (CBC: that block decrypted, XOR the one
        before it or the IV), so nothing is written before it is known good."""
        prev = bytes(src[-2 * _BLOCK:-_BLOCK]) if len(src) > _BLOCK else bytes(iv)
        ecb = Cipher(algorithms.AES256(self.__enc_key), modes.CBC(prev)).decryptor()
        last = ecb.update(bytes(src[-_BLOCK:])) + ecb.finalize()
        pad = last[-1]
        if not 1 <= pad <= _BLOCK or last[-pad:] != bytes([pad]) * pad:
            raise self._corrupt(name, "bad padding")
        return pad

    def decrypt(self, name: str, ciphertext: BytesLike, iv: bytes, mac: bytes, *,
                crc32: int | None = None) -> bytes:
        """Verify and decrypt the payload of section *name*.

        The MAC is checked in constant time before anything is decrypted.  In
        the same pass over the ciphertext (256 KiB steps), when *crc32* is
        given, its crc32 is checked too (the image's check without the key:
        a mismatch is reported as such, before the MAC's verdict).

        :param name: the section name the payload was encrypted under.
        :param ciphertext: the stored bytes.
        :param iv: the section's IV (16 bytes).
        :param mac: the section's MAC (32 bytes).
        :param crc32: the crc32 the directory keeps for the stored bytes.
        :return: the payload.
        :raise CorruptError: the crc32 or the MAC does not match (tampered or
            damaged ciphertext, IV, MAC or name, or another image's key), or
            the MAC matches but the length or padding is wrong.
        :raise UsageError: *name* is empty or contains NUL.
        """
        parts: list[bytes] = []
        self.decrypt_to(name, ciphertext, iv, mac, lambda piece: parts.append(bytes(piece)),
                        crc32=crc32)
        return b"".join(parts)

    def decrypt_to(self, name: str, ciphertext: BytesLike, iv: bytes, mac: bytes,
                   write: Callable[[memoryview], object], *, crc32: int | None = None,
                   chunk: int = 4 << 20) -> int:
        """:meth:`decrypt`, streamed: the payload goes to ``write(view)`` in
        pieces of up to *chunk* bytes (the view is reused after the call
        returns), decrypted in 256 KiB steps into one buffer.  Nothing is
        written before the MAC (and *crc32*) and the padding are checked.

        :return: the payload's length.
        :raise CorruptError, UsageError: as :meth:`decrypt`.
        """
        src = memoryview(ciphertext).cast("B")
        self._verify(name, src, iv, mac, crc32)
        n = len(src) - self._padding(name, src, iv)
        chunk = max(_BLOCK, chunk - chunk % _BLOCK)
        dec = self._cipher(bytes(iv)).decryptor()
        buf = bytearray(min(chunk, len(src)) + _BLOCK)
        done = 0  # ciphertext offset decrypted so far
        with memoryview(buf) as view:
            while done < len(src):
                fill = 0
                while fill < chunk and done < len(src):
                    k = min(_STEP, chunk - fill, len(src) - done)
                    with src[done:done + k] as piece, view[fill:] as into:
                        dec.update_into(piece, into)
                    fill += k
                    done += k
                keep = fill - max(0, done - n)  # the padding is not the payload's
                if keep:
                    with view[:keep] as piece:
                        write(piece)
        dec.finalize()
        return n

    # -- live sections: LUKS volumes QEMU opens ---------------------------

    def luks_passphrase(self) -> bytes:
        """The passphrase of the image's LUKS volumes (its encrypted live sections).

        64 hexadecimal digits (ASCII) of HKDF-SHA256(data key, info
        ``"nvmgr-v1 luks passphrase"``): per image, random as the data key is,
        and never a key-encryption key.  Derived from the data key, not from
        a KEK, so ``rekey`` (which only re-wraps the data key) leaves every
        LUKS volume as it is and the next start opens them with the new KEK.
        One per image, not one per section: each LUKS volume has its own
        random master key anyway, and QEMU then needs one ``secret`` object
        read from one runtime file.  Text, not raw bytes, so the runtime key
        file and QEMU's ``secret`` object read it the same way everywhere.
        """
        return self.__luks.hex().encode("ascii")

    def vtpm_passphrase(self) -> bytes:
        """The passphrase swtpm encrypts the image's TPM state with while the VM runs.

        64 hexadecimal digits (ASCII) of HKDF-SHA256(data key, info
        ``"nvmgr-v1 vtpm passphrase"``): the value of the domain's libvirt
        secret of usage type ``vtpm``, which libvirt hands to swtpm over a
        pipe (``--key pwdfd=N,mode=aes-256-cbc``).  Its own HKDF output, so
        it tells nothing about the LUKS passphrase or the section keys; from
        the data key, so ``rekey`` leaves it (and swtpm's encrypted state) as
        it is.
        """
        return self.__vtpm.hex().encode("ascii")

    # -- the directory --------------------------------------------------

    def directory_mac(self, directory_der: bytes) -> bytes:
        """HMAC-SHA256 of a directory's DER under a key derived from the data
        key (HKDF info ``"nvmgr-v1 directory mac"``), over
        ``b"nvmgr-v1 directory\\0" + DER``: stored beside the directory in
        each header copy of an encrypted image (``HeaderCopy.mac``), so that
        only a holder of the image's key can write a directory it accepts.
        """
        h = _hmac_sha256(self.__dir_key)
        h.update(_DIR_PREFIX + bytes(directory_der))
        return h.finalize()

    def verify_directory(self, directory_der: bytes, mac: bytes) -> bool:
        """Whether *mac* authenticates *directory_der* (compared in constant time)."""
        h = _hmac_sha256(self.__dir_key)
        h.update(_DIR_PREFIX + bytes(directory_der))
        try:
            h.verify(bytes(mac))
        except InvalidSignature:
            return False
        return True

    # -- streaming ------------------------------------------------------

    def verifier(self, name: str, iv: bytes) -> SectionVerifier:
        """Start a streaming MAC check of section *name*'s ciphertext.

        Feed the whole ciphertext through :meth:`SectionVerifier.update` in
        chunks of any size, then call :meth:`SectionVerifier.verify`.

        :param name: the section name.
        :param iv: the section's IV.
        :raise CorruptError: *iv* is not 16 bytes.
        :raise UsageError: *name* is empty or contains NUL.
        """
        return SectionVerifier(self._mac(_check_name(name), self._check_iv(name, iv)))

    def encryptor(self, name: str) -> SectionEncryptor:
        """Start a streaming encryption of section *name* under a fresh random IV.

        :param name: the section name.
        :return: an encryptor; its ``iv`` goes into the directory with the MAC
            that :meth:`SectionEncryptor.finalize` returns.
        :raise UsageError: *name* is empty or contains NUL.
        """
        bname = _check_name(name)
        iv = os.urandom(IV_LEN)
        return SectionEncryptor(iv, self._cipher(iv), self._mac(bname, iv))


class SectionVerifier:
    """Streaming MAC check; made by :meth:`SectionCipher.verifier`. Single use."""

    __slots__ = ("_h",)

    def __init__(self, h: hmac.HMAC) -> None:
        self._h = h

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed the next chunk of ciphertext.

        :param chunk: any number of bytes.
        :raise cryptography.exceptions.AlreadyFinalized: after :meth:`verify`.
        """
        self._h.update(chunk)

    def verify(self, mac: bytes) -> bool:
        """Compare, in constant time, the MAC of everything fed with *mac*.

        :param mac: the stored MAC.
        :return: True when it matches.
        :raise cryptography.exceptions.AlreadyFinalized: when called twice.
        """
        try:
            self._h.verify(bytes(mac))
        except InvalidSignature:
            return False
        return True


class SectionEncryptor:
    """Streaming encryption; made by :meth:`SectionCipher.encryptor`. Single use.

    :ivar iv: the random IV this encryption uses, to store in the directory.
    """

    __slots__ = ("_enc", "_mac", "_pad", "iv")

    def __init__(self, iv: bytes, cipher: Cipher[modes.CBC], mac: hmac.HMAC) -> None:
        self.iv = iv
        self._pad = padding.PKCS7(128).padder()
        self._enc = cipher.encryptor()
        self._mac = mac

    def update(self, chunk: bytes) -> bytes:
        """Encrypt the next chunk of plaintext.

        :param chunk: any number of bytes.
        :return: ciphertext so far (whole blocks; may be empty).
        :raise cryptography.exceptions.AlreadyFinalized: after :meth:`finalize`.
        """
        out = self._enc.update(self._pad.update(chunk))
        self._mac.update(out)
        return out

    def finalize(self) -> tuple[bytes, bytes]:
        """Pad and encrypt the last block.

        :return: ``(last_ciphertext, mac)``: append the first to what
            :meth:`update` returned; store the second with :attr:`iv`.
        :raise cryptography.exceptions.AlreadyFinalized: when called twice.
        """
        out = self._enc.update(self._pad.finalize()) + self._enc.finalize()
        self._mac.update(out)
        return out, self._mac.finalize()


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
