"""Parse the AO/OTA pediatric (PCCF) fracture codes of GRAZPEDWRI-DX's ``ao_classification``.

A code reads ``{bone}{segment}{r|u}-{E|M|D}/{child}.{severity}``: ``23r-E/2.1`` is a
Salter-Harris II fracture of the distal radius. The release writes codes with several
separators and dirty variants (``23u-E7``, ``23u/E/7``, ``23r-M/2.``, trailing spaces, no
severity); the rules here are the ones in ``docs/grazpedwri-dx.md``. Non-forearm
adult codes (``72B(b)``) pass through as kind ``other``; anything else unreadable is kept as
kind ``unknown`` so nothing is lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Split on ';' or ',' plus following spaces, but not inside brackets (``23r-M/2.1[1,7]``).
_SEPARATOR = re.compile(r"[;,]\s*(?![^\[]*\])")
_FOREARM = re.compile(r"^(2[123])([ru]?)[-/]?([EMD])/?(\d)(?:\.(\d)?)?(?:\[[^\]]*\])?$")
_TWO_DIGITS = re.compile(r"^\d{2}")
_BONES = {"r": "radius", "u": "ulna", "": "both"}


@dataclass(frozen=True)
class AOCode:
    """One parsed code. ``kind`` is ``forearm``, ``other`` (non-forearm) or ``unknown``."""

    raw: str
    kind: str
    bone: str | None = None  # radius, ulna or both (one code for the pair)
    segment: int | None = None  # 1 proximal, 2 shaft, 3 distal
    subsegment: str | None = None  # E epiphysis, M metaphysis, D diaphysis
    child: int | None = None
    severity: int | None = None

    @property
    def salter_harris(self) -> int | None:
        """Salter-Harris type 1–4 for epiphyseal child codes E/1–E/4, else None (E/7 avulsion is not physeal)."""
        if self.subsegment == "E" and self.child in (1, 2, 3, 4):
            return self.child
        return None

    @property
    def is_physeal(self) -> bool:
        return self.salter_harris is not None

    @property
    def normalized(self) -> str:
        """Canonical spelling (``23u-E/7``); the raw text for non-forearm and unknown codes."""
        if self.kind != "forearm":
            return self.raw
        side = "" if self.bone == "both" else self.bone[0]
        text = f"2{self.segment}{side}-{self.subsegment}/{self.child}"
        return f"{text}.{self.severity}" if self.severity is not None else text


def split_codes(field: str | None) -> list[str]:
    """Split one ``ao_classification`` cell into stripped, non-empty code strings."""
    if field is None:
        return []
    return [part.strip() for part in _SEPARATOR.split(str(field)) if part.strip()]


def parse_code(raw: str) -> AOCode:
    """Parse one code string; never raises."""
    text = raw.strip()
    match = _FOREARM.match(text)
    if match:
        segment, side, subsegment, child, severity = match.groups()
        return AOCode(
            raw=text,
            kind="forearm",
            bone=_BONES[side],
            segment=int(segment[1]),
            subsegment=subsegment,
            child=int(child),
            severity=int(severity) if severity else None,
        )
    if _TWO_DIGITS.match(text) and not text.startswith(("21", "22", "23")):
        return AOCode(raw=text, kind="other")
    return AOCode(raw=text, kind="unknown")


def parse_field(field: str | None) -> list[AOCode]:
    """Parse a whole ``ao_classification`` cell."""
    return [parse_code(code) for code in split_codes(field)]
