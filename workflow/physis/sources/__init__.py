"""Data sources: one module per on-disk layout, each with ``read(root, cfg, work_dir)``.

``read`` yields :class:`physis.records.ImageRecord` and :class:`physis.records.Rejected`;
it raises :class:`DataSourceError` only when the whole input is unusable. The small parsers
shared by several layouts (flags, numbers, projections, box clipping) live here.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from physis.records import Box

#: GRAZPEDWRI-DX ``projection`` column → view.
PROJECTION_VIEWS = {"1": "ap", "2": "lat", "3": "oblique"}


class DataSourceError(ValueError):
    """The input as a whole cannot be used; the message names the file and the reason."""


def read_table(path: Path, encoding: str = "utf-8-sig", required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV read as text (every cell a string, empty stays empty); fail naming the file and the reason.

    The release and the label files are UTF-8. A file saved by Excel on Windows is often Windows-1252:
    that is an error with the byte offset and how to convert, not a guess (``dataset.csv_encoding``
    reads a file whose encoding you know).
    """
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path}: not {encoding.removesuffix('-sig').upper()} text: byte 0x{data[err.start]:02x} at offset "
            f"{err.start} cannot be decoded. Convert the file (a spreadsheet saved on Windows is usually "
            f"Windows-1252: iconv -f cp1252 -t utf-8 {path.name} > {path.stem}-utf8.csv) or set "
            "dataset.csv_encoding to its encoding (e.g. cp1252)") from None
    except LookupError:
        raise DataSourceError(f"dataset.csv_encoding: {encoding!r} is not an encoding Python knows") from None
    try:
        frame = pd.read_csv(io.StringIO(text.removeprefix("\ufeff")), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataSourceError(f"{path}: not a readable CSV ({err})") from err
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataSourceError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


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
    return Box(cls, x0, y0, x1 - x0, y1 - y0, clipped=(x0, y0, x1, y1) != (x, y, x + w, y + h))
