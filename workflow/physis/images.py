"""Reading and writing single-channel X-ray images without losing bit depth.

Pillow keeps 16-bit PNGs as mode ``I;16`` (or ``I``) when asked nicely; ``cv2.imread`` without
``IMREAD_UNCHANGED`` and ``PIL.Image.convert('L')`` both drop silently to 8 bits, so all image
I/O in physis goes through here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

_DEPTH = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 16}


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode every byte: catches truncated files, not just bad headers
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"{path}: unreadable image ({err})") from None
    return image


def probe_image(path: str | Path) -> tuple[int, int, int]:
    """Fully decode an image and return (width, height, bit depth)."""
    image = _open(Path(path))
    return image.width, image.height, _DEPTH.get(image.mode, 8)


def read_gray(path: str | Path) -> np.ndarray:
    """Read an image as a 2-D uint16 array on the 16-bit scale (8-bit input is scaled ×257)."""
    image = _open(Path(path))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image, dtype=np.uint16) if image.mode != "I" else np.clip(
            np.asarray(image), 0, 65535).astype(np.uint16)
    grey = np.asarray(image.convert("L"), dtype=np.uint16)
    return grey * 257


def write_gray16(path: str | Path, pixels: np.ndarray) -> None:
    """Write a 2-D array as a 16-bit grayscale PNG (values clipped to 0–65535)."""
    array = np.clip(pixels, 0, 65535).astype(np.uint16)
    Image.fromarray(array).save(path, format="PNG")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Linear 16-bit → 8-bit (top byte), for formats and viewers that take 8 bits."""
    return (np.asarray(pixels, dtype=np.uint16) >> 8).astype(np.uint8)
