"""Search outputs for protected health information (names, IDs, dates from DICOM headers).

``assert_no_phi(folder, needles)`` looks for each needle, case-insensitively, in every file under
``folder`` (or one file): in the raw bytes (UTF-8 and UTF-16), in file and archive-member names,
and inside containers where a plain byte search would miss it — zip archives (the zipped
report), gzip streams, parquet files (compressed column pages are decoded), PNG text chunks
(``zTXt`` is deflated) and base64 ``data:`` URIs (how the HTML report embeds every result).
"""

from __future__ import annotations

import base64
import gzip
import io
import re
import struct
import zipfile
import zlib
from pathlib import Path

DATA_URI = re.compile(rb"data:[^,\"']*?;base64,([A-Za-z0-9+/=]+)")
MAX_DEPTH = 4


def _variants(needle: str) -> list[bytes]:
    low = needle.lower()
    return [low.encode("utf-8"), low.encode("utf-16-le")]


def _parquet_text(data: bytes) -> bytes:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    text = [str(table.schema.metadata or b"")] + [str(value) for column in table.columns
                                                  for value in column.to_pylist()]
    return "\n".join(text).encode("utf-8")


def _png_text(data: bytes) -> bytes:
    chunks, offset = [], 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if kind in (b"tEXt", b"iTXt"):
            chunks.append(body)
        elif kind == b"zTXt":
            keyword, _, rest = body.partition(b"\0")
            chunks.append(keyword + b"\0" + zlib.decompress(rest[1:]))
        offset += 12 + length
    return b"\n".join(chunks)


def _inner(data: bytes) -> list[tuple[str, bytes]]:
    """(label, bytes) of everything nested inside ``data`` that a byte search cannot see."""
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [(f"[{info.filename}]", info.filename.encode() + b"\n" + archive.read(info))
                    for info in archive.infolist() if not info.is_dir()]
    if data[:2] == b"\x1f\x8b":
        return [("[gunzip]", gzip.decompress(data))]
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        return [("[parquet]", _parquet_text(data))]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return [("[png text]", _png_text(data))]
    return [(f"[data uri {i}]", base64.b64decode(match.group(1) + b"=" * (-len(match.group(1)) % 4)))
            for i, match in enumerate(DATA_URI.finditer(data))]


def _scan(label: str, data: bytes, needles: list[str], hits: list[str], depth: int = 0) -> None:
    low = data.lower()
    hits += [f"{label}: {needle!r}" for needle in needles if any(v in low for v in _variants(needle))]
    if depth < MAX_DEPTH:
        for inner_label, inner in _inner(data):
            _scan(label + inner_label, inner, needles, hits, depth + 1)


def find_phi(path: str | Path, needles: list[str]) -> list[str]:
    """Every place under ``path`` where a needle occurs, as ``file[member]: 'needle'`` strings."""
    needles = [needle for needle in needles if needle]
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    hits: list[str] = []
    for file in files:
        name = str(file.relative_to(root) if root.is_dir() else file.name)
        hits += [f"{name} (file name): {n!r}" for n in needles if n.lower() in name.lower()]
        _scan(name, file.read_bytes(), needles, hits)
    return hits


def assert_no_phi(path: str | Path, needles: list[str]) -> None:
    """Fail, listing every hit, when any needle occurs anywhere under ``path``."""
    hits = find_phi(path, needles)
    assert not hits, f"{len(hits)} PHI hit(s) under {path}:\n" + "\n".join(hits[:50])
