"""Hardened XML parsing: the only place nvmgr hands text to lxml's parser.

Domain XML reaches nvmgr from hook stdin, libvirt and users' files, so every
document goes through :func:`parse_tree`:

- the input is capped at :data:`MAX_INPUT_BYTES` and must be UTF-8;
- any ``<!DOCTYPE`` or ``<!ENTITY`` is refused before lxml sees the text
  (billion laughs, external entities such as ``file:///etc/passwd``); the
  parser itself also resolves no entities, loads no DTD, uses no network and
  keeps libxml2's default (non-huge) limits, and the parsed document is
  checked again for a DTD and for entity references;
- element nesting is capped at :data:`MAX_DEPTH`.

Every problem is an :class:`nvmgr.errors.InvalidInputError` naming what was
wrong.
"""

from __future__ import annotations

import re

from lxml import etree

from nvmgr.errors import InvalidInputError

#: Largest domain XML accepted, in bytes (libvirt's own domains are a few KiB).
MAX_INPUT_BYTES = 1 << 20
#: Deepest element nesting accepted (libvirt's schema needs about 8 levels).
MAX_DEPTH = 64

_FORBIDDEN_MARKUP = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_XML_DECL_ENCODING = re.compile(rb"""^<\?xml[^>]*\bencoding\s*=\s*["']([^"']*)["']""")


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=False,
        remove_pis=False,
        collect_ids=False,
    )


def _as_utf8(data: str | bytes, what: str) -> bytes:
    if isinstance(data, str):
        raw = data.encode("utf-8", "surrogatepass")
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise InvalidInputError(f"{what}: expected text or bytes, not {type(data).__name__}")
    if len(raw) > MAX_INPUT_BYTES:
        raise InvalidInputError(
            f"{what} is {len(raw):,} bytes, larger than the {MAX_INPUT_BYTES:,}-byte limit"
        )
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"{what} is not UTF-8 (byte {e.start}); libvirt XML is always UTF-8"
        ) from e
    m = _XML_DECL_ENCODING.match(raw.lstrip())
    if m and m.group(1).lower() not in (b"utf-8", b"utf8", b"us-ascii", b"ascii"):
        raise InvalidInputError(
            f"{what} declares encoding {m.group(1).decode('ascii', 'replace')!r}; "
            "only UTF-8 is accepted"
        )
    return raw


def parse_tree(data: str | bytes, *, what: str = "domain XML") -> etree._Element:
    """Parse untrusted XML with every guard described in the module docstring.

    :param data: the document, as text or UTF-8 bytes.
    :param what: names the input in error messages.
    :raise InvalidInputError: oversized, not UTF-8, a DOCTYPE or entity
        declaration, not well-formed, or nested deeper than :data:`MAX_DEPTH`.
    """
    raw = _as_utf8(data, what)
    m = _FORBIDDEN_MARKUP.search(raw)
    if m:
        line = raw.count(b"\n", 0, m.start()) + 1
        raise InvalidInputError(
            f"{what}, line {line}: <!{m.group(1).decode().upper()}> is not allowed "
            "(document type and entity declarations can expand without bound or read "
            "local files)"
        )
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as e:
        if "Excessive depth" in str(e):  # libxml2's own cap (256), met before ours
            raise InvalidInputError(
                f"{what}: elements nest deeper than {MAX_DEPTH} levels (line {e.lineno})"
            ) from e
        raise InvalidInputError(f"{what} is not well-formed XML: {e}") from e
    except (etree.LxmlError, ValueError) as e:  # any other refusal of lxml's: still input
        raise InvalidInputError(f"{what} cannot be parsed: {e}") from e
    tree = root.getroottree()
    if getattr(tree.docinfo, "doctype", "") or tree.docinfo.internalDTD is not None:
        raise InvalidInputError(f"{what}: a document type declaration is not allowed")
    depth = 0
    for event, node in etree.iterwalk(root, events=("start", "end")):
        if event == "end":
            depth -= 1
            continue
        depth += 1
        if depth > MAX_DEPTH:
            raise InvalidInputError(
                f"{what}: elements nest deeper than {MAX_DEPTH} levels (at line {node.sourceline})"
            )
    entity = next(root.iter(etree.Entity), None)  # unreachable without a DTD; kept as a guard
    if entity is not None:
        raise InvalidInputError(f"{what}: entity reference {entity.text} is not allowed")
    return root
