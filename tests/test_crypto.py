"""Tests for nvmgr.crypto.cipher: key ids, key wrap, slot unlocking, section encryption.

Expected values are computed independently of nvmgr: key ids, HKDF and MACs
with the stdlib ``hmac``/``hashlib``, key wrap against the RFC 3394 vector.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import pickle
import re

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nvmgr.crypto import cipher as crypto
from nvmgr.crypto.cipher import (
    DATA_KEY_LEN,
    Kek,
    SectionCipher,
    new_data_key,
    unlock,
)
from nvmgr.errors import CorruptError, UsageError, WrongKeyError
from nvmgr.format.model import KeySlot

KEK_BYTES = bytes(range(32))
DATA_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
# RFC 3394 section 4.6: wrap 256 bits of key data with a 256-bit KEK.
RFC3394_WRAPPED = bytes.fromhex(
    "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
)


def flip(b: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(b)
    out[index] ^= 1 << bit
    return bytes(out)


# -- independent reference implementation (stdlib only) ------------------------


def ref_key_id(key: bytes) -> bytes:
    return hmac.new(key, b"nvmgr-kek-id-v1", hashlib.sha256).digest()[:8]


def ref_hkdf(ikm: bytes, info: bytes) -> bytes:
    # RFC 5869 with no salt (= HashLen zero bytes), L = 32 (one block).
    prk = hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def ref_mac(data_key: bytes, name: str, iv: bytes, ct: bytes) -> bytes:
    mac_key = ref_hkdf(data_key, b"nvmgr-v1 section mac")
    msg = b"nvmgr-v1\0" + name.encode() + b"\0" + iv + ct
    return hmac.new(mac_key, msg, hashlib.sha256).digest()


def ref_enc_key(data_key: bytes) -> bytes:
    return ref_hkdf(data_key, b"nvmgr-v1 section encryption")


def raw_cbc_decrypt(key: bytes, iv: bytes, ct: bytes) -> bytes:
    d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return d.update(ct) + d.finalize()


def raw_cbc_encrypt(key: bytes, iv: bytes, padded: bytes) -> bytes:
    e = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return e.update(padded) + e.finalize()


def test_ref_hkdf_matches_rfc5869_case3() -> None:
    # RFC 5869 A.3: SHA-256, no salt, no info; checks the reference itself.
    ikm = bytes([0x0B] * 22)
    okm = ref_hkdf(ikm, b"")
    assert okm == bytes.fromhex("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d")


# -- data keys ------------------------------------------------------------------


def test_new_data_key() -> None:
    a, b = new_data_key(), new_data_key()
    assert DATA_KEY_LEN == 32
    assert len(a) == len(b) == 32
    assert a != b


# -- Kek ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 16, 31, 33, 64])
def test_kek_length(n: int) -> None:
    key = bytes([0xA5]) * n
    with pytest.raises(UsageError) as ei:
        Kek(key)
    assert str(ei.value) == f"key must be exactly 32 bytes (got {n})"


def test_kek_rejects_str() -> None:
    with pytest.raises(UsageError):
        Kek("x" * 32)  # type: ignore[arg-type]


def test_key_id_known_answer() -> None:
    k = Kek(KEK_BYTES)
    assert k.key_id == ref_key_id(KEK_BYTES)
    assert len(k.key_id) == 8
    assert Kek(bytes(32)).key_id == ref_key_id(bytes(32))
    assert Kek(bytes(32)).key_id != k.key_id


def test_kek_repr_hides_key() -> None:
    secret = bytes.fromhex("deadbeef" * 8)
    k = Kek(secret, label="file")
    for text in (repr(k), str(k), f"{k}", repr([k])):
        assert k.key_id.hex() in text
        assert "file" in text
        assert "deadbeef" not in text.lower()
        assert "\\xde\\xad" not in text
    assert not any(v == secret for v in vars_of(k))


def vars_of(obj: object) -> list[object]:
    return [getattr(obj, a) for a in dir(obj) if not a.startswith("_")]


def test_kek_not_picklable() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Kek(KEK_BYTES))


def test_wrap_rfc3394_vector() -> None:
    k = Kek(KEK_BYTES)
    assert k.wrap(DATA_KEY) == RFC3394_WRAPPED
    assert k.unwrap(RFC3394_WRAPPED) == DATA_KEY


def test_wrap_roundtrip_and_length() -> None:
    k = Kek(new_data_key())
    dk = new_data_key()
    w = k.wrap(dk)
    assert len(w) == 40
    assert k.unwrap(w) == dk


@pytest.mark.parametrize("n", [0, 16, 31, 33, 40])
def test_wrap_rejects_bad_data_key(n: int) -> None:
    with pytest.raises(UsageError):
        Kek(KEK_BYTES).wrap(bytes(n))


def test_unwrap_wrong_key() -> None:
    w = Kek(KEK_BYTES).wrap(DATA_KEY)
    with pytest.raises(WrongKeyError):
        Kek(bytes(32)).unwrap(w)


def test_unwrap_damaged() -> None:
    k = Kek(KEK_BYTES)
    with pytest.raises(WrongKeyError):
        k.unwrap(flip(RFC3394_WRAPPED, 20))
    with pytest.raises(CorruptError):
        k.unwrap(RFC3394_WRAPPED[:-8])


# -- unlock ---------------------------------------------------------------------


def slot_for(kek: Kek, dk: bytes, label: str | None = None) -> KeySlot:
    return KeySlot(key_id=kek.key_id, wrapped_key=kek.wrap(dk), label=label)


def test_unlock_picks_matching_slot() -> None:
    dk = new_data_key()
    a, b, c = Kek(new_data_key()), Kek(new_data_key()), Kek(new_data_key())
    slots = [slot_for(a, dk), slot_for(b, dk), slot_for(c, dk)]
    for k in (a, b, c):
        assert unlock(slots, k) == dk


def test_unlock_wrong_key() -> None:
    dk = new_data_key()
    a, b = Kek(new_data_key()), Kek(new_data_key())
    other = Kek(new_data_key())
    slots = [slot_for(a, dk), slot_for(b, dk)]
    with pytest.raises(WrongKeyError) as ei:
        unlock(slots, other, image="/img/vm.nvm")
    e = ei.value
    assert e.image == "/img/vm.nvm"
    assert "not one of this image's keys" in e.message
    assert a.key_id.hex() in e.message and b.key_id.hex() in e.message
    assert "/img/vm.nvm" in str(e)


def test_unlock_damaged_slot_is_corrupt_not_wrong_key() -> None:
    dk = new_data_key()
    a = Kek(new_data_key())
    slots = [KeySlot(a.key_id, flip(a.wrap(dk), 39))]
    with pytest.raises(CorruptError) as ei:
        unlock(slots, a, image="/img/vm.nvm")
    assert ei.value.message == f"key slot {a.key_id.hex()} is corrupted"
    assert ei.value.image == "/img/vm.nvm"
    assert not isinstance(ei.value, WrongKeyError)


def test_unlock_damaged_slot_but_good_duplicate() -> None:
    dk = new_data_key()
    a = Kek(new_data_key())
    slots = [KeySlot(a.key_id, flip(a.wrap(dk), 0)), slot_for(a, dk)]
    assert unlock(slots, a) == dk


# -- SectionCipher: one-shot ----------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 1000, 4096])
def test_roundtrip_and_length(n: int) -> None:
    c = SectionCipher(DATA_KEY)
    pt = bytes((i * 7) & 0xFF for i in range(n))
    ct, iv, mac = c.encrypt("tpm", pt)
    assert len(ct) == (n // 16 + 1) * 16
    assert len(iv) == 16 and len(mac) == 32
    assert c.decrypt("tpm", ct, iv, mac) == pt
    # A second cipher from the same data key reads it too.
    assert SectionCipher(DATA_KEY).decrypt("tpm", ct, iv, mac) == pt


def test_known_answer_against_reference() -> None:
    pt = b"The quick brown fox jumps over the lazy dog"
    ct, iv, mac = SectionCipher(DATA_KEY).encrypt("nvram", pt)
    assert mac == ref_mac(DATA_KEY, "nvram", iv, ct)
    padded = raw_cbc_decrypt(ref_enc_key(DATA_KEY), iv, ct)
    pad = 16 - len(pt) % 16
    assert padded == pt + bytes([pad]) * pad


def test_frozen_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pins the on-disk format; cross-checked with the stdlib reference above.
    iv = bytes(range(16, 32))
    monkeypatch.setattr(os, "urandom", lambda n: iv[:n])
    ct, got_iv, mac = SectionCipher(DATA_KEY).encrypt("nvram", b"nvmgr")
    assert got_iv == iv
    enc_key = ref_enc_key(DATA_KEY)
    assert ct == raw_cbc_encrypt(enc_key, iv, b"nvmgr" + bytes([11]) * 11)
    assert mac == ref_mac(DATA_KEY, "nvram", iv, ct)
    assert ref_enc_key(DATA_KEY) != ref_hkdf(DATA_KEY, b"nvmgr-v1 section mac")


def test_fresh_iv_each_encrypt() -> None:
    c = SectionCipher(DATA_KEY)
    outs = [c.encrypt("x", b"same plaintext") for _ in range(8)]
    assert len({iv for _, iv, _ in outs}) == 8
    assert len({ct for ct, _, _ in outs}) == 8
    assert len({mac for _, _, mac in outs}) == 8


@pytest.fixture
def sealed() -> tuple[SectionCipher, bytes, bytes, bytes, bytes]:
    c = SectionCipher(DATA_KEY, image="/img/a.nvm")
    pt = bytes(range(256)) * 3 + b"tail"
    ct, iv, mac = c.encrypt("eeprom", pt)
    return c, pt, ct, iv, mac


Sealed = tuple[SectionCipher, bytes, bytes, bytes, bytes]


def assert_mac_mismatch(ei: pytest.ExceptionInfo[CorruptError], name: str = "eeprom") -> None:
    assert ei.value.message == f"section {name} is corrupted (MAC mismatch)"
    assert ei.value.section == name


@pytest.mark.parametrize("index", [0, 15, 16, 100, -17, -1])
@pytest.mark.parametrize("bit", [0, 7])
def test_flipped_ciphertext(sealed: Sealed, index: int, bit: int) -> None:
    c, _, ct, iv, mac = sealed
    with pytest.raises(CorruptError) as ei:
        c.decrypt("eeprom", flip(ct, index, bit), iv, mac)
    assert_mac_mismatch(ei)
    assert ei.value.image == "/img/a.nvm"


@pytest.mark.parametrize("index", [0, 8, 15])
def test_flipped_iv(sealed: Sealed, index: int) -> None:
    c, _, ct, iv, mac = sealed
    with pytest.raises(CorruptError) as ei:
        c.decrypt("eeprom", ct, flip(iv, index), mac)
    assert_mac_mismatch(ei)


@pytest.mark.parametrize("index", [0, 16, 31])
def test_flipped_mac(sealed: Sealed, index: int) -> None:
    c, _, ct, iv, mac = sealed
    with pytest.raises(CorruptError) as ei:
        c.decrypt("eeprom", ct, iv, flip(mac, index))
    assert_mac_mismatch(ei)


def test_swapped_section_name(sealed: Sealed) -> None:
    c, _, ct, iv, mac = sealed
    for other in ("eeproM", "eeprom2", "eeprom\u00e9", "nvram"):
        with pytest.raises(CorruptError) as ei:
            c.decrypt(other, ct, iv, mac)
        assert_mac_mismatch(ei, other)


def test_swapped_sections_between_names() -> None:
    c = SectionCipher(DATA_KEY)
    a = c.encrypt("a", b"A" * 40)
    b = c.encrypt("b", b"B" * 40)
    with pytest.raises(CorruptError):
        c.decrypt("a", *b)
    with pytest.raises(CorruptError):
        c.decrypt("b", *a)


def test_truncated_or_extended(sealed: Sealed) -> None:
    c, _, ct, iv, mac = sealed
    for bad in (ct[:-16], ct[:-1], ct + bytes(16), b"", ct[16:]):
        with pytest.raises(CorruptError):
            c.decrypt("eeprom", bad, iv, mac)
    for bad_mac in (mac[:-1], mac + b"\0", b""):
        with pytest.raises(CorruptError):
            c.decrypt("eeprom", ct, iv, bad_mac)


def test_other_data_key(sealed: Sealed) -> None:
    _, _, ct, iv, mac = sealed
    with pytest.raises(CorruptError):
        SectionCipher(new_data_key()).decrypt("eeprom", ct, iv, mac)


def test_bad_iv_length(sealed: Sealed) -> None:
    c, _, ct, iv, mac = sealed
    with pytest.raises(CorruptError):
        c.decrypt("eeprom", ct, iv[:15], mac)
    # Moving a byte from the ciphertext into a longer "IV" keeps the MAC input
    # identical; the fixed IV length must stop it.
    with pytest.raises(CorruptError):
        c.decrypt("eeprom", ct[1:], iv + ct[:1], mac)


def _seal_raw(padded: bytes, name: str) -> tuple[bytes, bytes, bytes]:
    iv = bytes(16)
    ct = raw_cbc_encrypt(ref_enc_key(DATA_KEY), iv, padded)
    return ct, iv, ref_mac(DATA_KEY, name, iv, ct)


@pytest.mark.parametrize(
    "padded",
    [
        b"A" * 15 + b"\x00",  # pad byte 0
        b"A" * 15 + b"\x11",  # pad byte > 16
        b"A" * 14 + b"\x01\x02",  # inconsistent pad bytes
        b"A" * 32,  # no padding at all
    ],
)
def test_bad_padding_after_good_mac(padded: bytes) -> None:
    ct, iv, mac = _seal_raw(padded, "s")
    c = SectionCipher(DATA_KEY)
    with pytest.raises(CorruptError) as ei:
        c.decrypt("s", ct, iv, mac)
    assert ei.value.message == "section s is corrupted (bad padding)"
    assert ei.value.section == "s"


def test_good_padding_via_raw_seal() -> None:
    ct, iv, mac = _seal_raw(b"A" * 12 + b"\x04" * 4, "s")
    assert SectionCipher(DATA_KEY).decrypt("s", ct, iv, mac) == b"A" * 12


def test_bad_data_key_length() -> None:
    for n in (0, 16, 31, 33):
        with pytest.raises(UsageError):
            SectionCipher(bytes(n))


def test_name_with_nul_rejected() -> None:
    c = SectionCipher(DATA_KEY)
    with pytest.raises(UsageError):
        c.encrypt("a\0b", b"x")
    with pytest.raises(UsageError):
        c.encrypt("", b"x")


def test_cipher_repr_hides_keys() -> None:
    c = SectionCipher(DATA_KEY, image="/i")
    text = repr(c)
    for secret in (DATA_KEY, ref_enc_key(DATA_KEY), ref_hkdf(DATA_KEY, b"nvmgr-v1 section mac")):
        assert secret.hex() not in text
    with pytest.raises(TypeError):
        pickle.dumps(c)


# -- SectionCipher: streaming ---------------------------------------------------


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i : i + n])
        i += n
        k += 1
    return out


BIG = bytes((i * 31 + 7) & 0xFF for i in range(1 << 20)) + b"odd-tail"
SIZES = [1, 15, 16, 17, 4095, 65536, 3]


def test_stream_encrypt_matches_one_shot_decrypt() -> None:
    c = SectionCipher(DATA_KEY)
    enc = c.encryptor("blk")
    parts = [enc.update(ch) for ch in chunks(BIG, SIZES)]
    last, mac = enc.finalize()
    ct = b"".join(parts) + last
    assert all(len(p) % 16 == 0 for p in parts)
    assert len(ct) == (len(BIG) // 16 + 1) * 16
    assert mac == ref_mac(DATA_KEY, "blk", enc.iv, ct)
    assert c.decrypt("blk", ct, enc.iv, mac) == BIG


def test_stream_encrypt_fresh_iv() -> None:
    c = SectionCipher(DATA_KEY)
    assert len({c.encryptor("x").iv for _ in range(8)}) == 8


def test_verifier() -> None:
    c = SectionCipher(DATA_KEY)
    ct, iv, mac = c.encrypt("blk", BIG)
    ver = c.verifier("blk", iv)
    for ch in chunks(ct, SIZES):
        ver.update(ch)
    assert ver.verify(mac)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17])
def test_stream_small(n: int) -> None:
    c = SectionCipher(DATA_KEY)
    pt = b"z" * n
    enc = c.encryptor("s")
    ct = enc.update(pt)
    last, mac = enc.finalize()
    ct += last
    assert c.decrypt("s", ct, enc.iv, mac) == pt


def test_verifier_detects_tampering() -> None:
    c = SectionCipher(DATA_KEY)
    ct, iv, mac = c.encrypt("blk", BIG[:100000])

    def check(name: str, data: bytes, iv_: bytes, mac_: bytes) -> bool:
        v = c.verifier(name, iv_)
        for ch in chunks(data, SIZES):
            v.update(ch)
        return v.verify(mac_)

    assert check("blk", ct, iv, mac)
    assert not check("blk", flip(ct, 50000), iv, mac)
    assert not check("blk", ct, flip(iv, 3), mac)
    assert not check("blk", ct, iv, flip(mac, 31))
    assert not check("blK", ct, iv, mac)
    assert not check("blk", ct[:-16], iv, mac)


def test_verifier_bad_iv_length() -> None:
    c = SectionCipher(DATA_KEY)
    with pytest.raises(CorruptError):
        c.verifier("x", bytes(8))
    with pytest.raises(CorruptError):
        c.decrypt("x", bytes(16), bytes(17), bytes(32))


# -- the seam -------------------------------------------------------------------


def test_only_crypto_imports_cryptography() -> None:
    seam = pathlib.Path(crypto.__file__)
    pkg = seam.parents[1]  # the whole nvmgr package
    pattern = re.compile(r"^\s*(from|import)\s+cryptography\b", re.MULTILINE)
    offenders = [
        str(p.relative_to(pkg))
        for p in sorted(pkg.rglob("*.py"))
        if p != seam and pattern.search(p.read_text(errors="replace"))
    ]
    assert offenders == []


# -- the one-pass, streamed paths (put and get of large sections) ----------------

#: Sizes around the 256 KiB step and the chunk sizes used below (a chunk is
#: rounded down to whole blocks: 100,000 -> 99,984).
STEP_SIZES = [0, 15, 16, (256 << 10) - 1, 256 << 10, (256 << 10) + 17, (1 << 20) + 5]


def _ref_seal(pt: bytes, name: str) -> tuple[bytes, bytes, bytes]:
    """An image's bytes as the recipe writes them, made without nvmgr (PKCS#7,
    AES-256-CBC, HMAC over prefix, name, IV, ciphertext): what older images hold."""
    iv = os.urandom(16)
    pad = 16 - len(pt) % 16
    ct = raw_cbc_encrypt(ref_enc_key(DATA_KEY), iv, pt + bytes([pad]) * pad)
    return ct, iv, ref_mac(DATA_KEY, name, iv, ct)


@pytest.mark.parametrize("n", STEP_SIZES)
@pytest.mark.parametrize("chunk", [4096, 100_000, 4 << 20])
def test_seal_to_writes_the_recipe_in_contiguous_pieces(n: int, chunk: int) -> None:
    import zlib

    pt = os.urandom(n)
    pieces: list[tuple[int, bytes]] = []
    length, iv, mac, crc = SectionCipher(DATA_KEY).seal_to(
        "tpm", memoryview(pt), lambda off, piece: pieces.append((off, bytes(piece))), chunk=chunk)
    ct = b"".join(p for _o, p in pieces)
    assert [o for o, _p in pieces] == [sum(len(p) for _o, p in pieces[:i])
                                      for i in range(len(pieces))]
    assert all(len(p) <= chunk + 16 for _o, p in pieces)
    assert length == len(ct) == (n // 16 + 1) * 16
    assert crc == zlib.crc32(ct)
    assert mac == ref_mac(DATA_KEY, "tpm", iv, ct)
    pad = 16 - n % 16
    assert raw_cbc_decrypt(ref_enc_key(DATA_KEY), iv, ct) == pt + bytes([pad]) * pad


@pytest.mark.parametrize("n", STEP_SIZES)
def test_decrypt_and_decrypt_to_read_what_the_recipe_wrote(n: int) -> None:
    """Old images still open: the format is the recipe's, byte for byte."""
    import zlib

    pt = os.urandom(n)
    ct, iv, mac = _ref_seal(pt, "nvram")
    c = SectionCipher(DATA_KEY)
    assert c.decrypt("nvram", ct, iv, mac) == pt
    assert c.decrypt("nvram", bytearray(ct), iv, mac, crc32=zlib.crc32(ct)) == pt
    for chunk in (4096, 100_000, 4 << 20):
        got = bytearray()
        assert c.decrypt_to("nvram", ct, iv, mac, got.extend, chunk=chunk) == n
        assert got == pt


def test_decrypt_to_writes_nothing_unless_crc_mac_and_padding_are_good() -> None:
    import zlib

    pt = os.urandom((1 << 20) + 3)
    ct, iv, mac = _ref_seal(pt, "s")
    c = SectionCipher(DATA_KEY)
    written: list[bytes] = []

    def fail(what: bytes, message: str, **kw: object) -> None:
        with pytest.raises(CorruptError) as ei:
            c.decrypt_to("s", what, iv, kw.pop("mac", mac), lambda p: written.append(bytes(p)),
                         **kw)  # type: ignore[arg-type]
        assert ei.value.message == f"section s is corrupted ({message})"
        assert written == []

    damaged = flip(ct, len(ct) // 2)
    fail(damaged, "MAC mismatch")
    fail(damaged, f"crc32 {zlib.crc32(damaged):08x}, directory says {zlib.crc32(ct):08x}",
         crc32=zlib.crc32(ct))
    fail(ct, "MAC mismatch", mac=flip(mac, 0))
    bad, iv2, mac2 = _seal_raw(b"A" * (1 << 20) + b"A" * 15 + b"\x00", "s")
    with pytest.raises(CorruptError, match="bad padding"):
        c.decrypt_to("s", bad, iv2, mac2, lambda p: written.append(bytes(p)))
    assert written == []
