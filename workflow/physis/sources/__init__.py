"""Data sources: one module per on-disk layout, each with ``read(root, cfg, work_dir)``.

``read`` yields :class:`physis.records.ImageRecord` and :class:`physis.records.Rejected`;
it raises :class:`DataSourceError` only when the whole input is unusable. The small parsers
shared by several layouts (flags, numbers, projections, box clipping) live here.
"""

from __future__ import annotations

import math

from physis.records import Box

#: GRAZPEDWRI-DX ``projection`` column → view.
PROJECTION_VIEWS = {"1": "ap", "2": "lat", "3": "oblique"}


class DataSourceError(ValueError):
    """The input as a whole cannot be used; the message names the file and the reason."""


def parse_flag(value: str) -> bool:
    """``1`` (or a pandas-rewritten ``1.0``) is set; empty or 0 is not."""
    value = str(value).strip()
    if value in ("", "0", "0.0"):
        return False
    if value in ("1", "1.0"):
        return True
    raise ValueError(f"flag value {value!r} is not 1 or empty")


def parse_int(value: str, column: str) -> int:
    """An integer column that pandas-rewritten copies may spell ``12.0``."""
    try:
        return int(float(value))
    except ValueError:
        raise ValueError(f"{column} {value!r} is not a number") from None


def fit_box(cls: str, x: float, y: float, w: float, h: float, width: int, height: int) -> Box | str:
    """Clip a pixel box to a ``width``×``height`` image; the reason (a str) when nothing usable is left."""
    where = f"box ({x:g}, {y:g}, {w:g}, {h:g})"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"{where} has coordinates that are not finite numbers"
    if w <= 0 or h <= 0:
        return f"degenerate {where}: width and height must be positive"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"{where} lies outside the {width}×{height} image"
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return f"{where} has less than one pixel inside the {width}×{height} image"
    return Box(cls, x0, y0, x1 - x0, y1 - y0)
