"""The preprocess stage: the thesis's standardisation of a film, as one replayable recipe.

A *preset* (config ``preprocess.presets.<name>``) fixes every parameter of the steps the thesis
named, in this order: window the intensities (percentile clip, optional CLAHE), align the film
so the forearm is vertical (principal axis of its black-and-white mask, after Hržić et al.), trim it to
the exposed field (and optionally a band of rows), reduce it to one grey channel, and resize it
to the network input by ``letterbox`` (keep aspect, black border: the thesis's border) or
``stretch`` (the thesis's MobileNetV2 input, kept so its failure can be reproduced).

All geometry is one affine map from the original film to the output (``meta["matrix"]``, in
continuous pixel coordinates whose origin is the top-left *corner* of the first pixel), so
pixels and boxes cannot disagree, and the film is resampled once. :func:`preprocess_array` is
the only implementation: the stage, the train stage and ``physis predict`` all call it, so
train and predict cannot drift. ``recipe.json`` next to the images names the preset and the
hash of its parameters.

Outputs under ``results/preprocess/{preset}/``: ``images/{image_id}.png`` (single channel,
exactly the preset's height × width), ``boxes.parquet`` (boxes in output pixels),
``rejected.parquet`` (+ ``.csv``), ``recipe.json``, ``steps.png`` (the before/after figure) and
``index.parquet`` last. Manifest rows = index rows + rejected rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from physis.images import ImageReadError, read_gray
from physis.io import atomic_dir, write_json, write_parquet
from physis.logs import progress

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
BOX_COLUMNS = ["image_id", "class", "x", "y", "w", "h"]
#: index.parquet: the film, its preprocessed PNG and everything needed to map coordinates
#: (``matrix``: original → output, row-major 2×3, pixel-corner coordinates).
INDEX_COLUMNS = [
    "image_id", "path", "status", "reason", "angle", "crop_x", "crop_y", "crop_w", "crop_h", "scale_x",
    "scale_y", "pad_x", "pad_y", "width", "height", "source_width", "source_height", "window_lo", "window_hi",
    "matrix",
]
REJECT_COLUMNS = ["image_id", "source", "reason"]
#: Films are planned (field, window, angle) on a copy whose long side is this many pixels:
#: moments and percentiles need no more, and it keeps planning cheap next to decoding.
PLAN_SIDE = 256
_LEVELS = {"uint8": 255, "uint16": 65535}


class PreprocessError(ValueError):
    """A film that cannot be preprocessed (the stage lists it in rejected.parquet with this message)."""


# --------------------------------------------------------------------------------------------
# Recipes


def params_hash(params: dict) -> str:
    """First 16 hex digits of the SHA-256 of the canonical (sorted, compact) JSON of ``params``."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def make_recipe(preset: str, params: dict) -> dict:
    """The ``recipe.json`` content for ``preset`` with (default-filled) ``params``."""
    return {"preset": preset, "params": params, "hash": params_hash(params), "version": RECIPE_VERSION}


def load_recipe(preset_dir: str | Path) -> dict:
    """Read ``recipe.json`` of a preprocessed folder; fail if its hash does not match its params."""
    path = Path(preset_dir) / "recipe.json"
    recipe = json.loads(path.read_text())
    if recipe.get("version") != RECIPE_VERSION:
        raise PreprocessError(f"{path}: recipe version {recipe.get('version')} is not {RECIPE_VERSION}; "
                              "rerun preprocess")
    if params_hash(recipe["params"]) != recipe["hash"]:
        raise PreprocessError(f"{path}: params do not match their hash (edited by hand?); rerun preprocess")
    return recipe


# --------------------------------------------------------------------------------------------
# Geometry: 2×3 affine matrices in corner-origin pixel coordinates


def _h(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2] = matrix
    return out


def compose(*matrices: np.ndarray) -> np.ndarray:
    """``compose(A, B)`` applies B first, then A (like A @ B)."""
    out = np.eye(3)
    for matrix in matrices:
        out = out @ _h(matrix)
    return out[:2]


def _affine(sx: float = 1.0, sy: float = 1.0, tx: float = 0.0, ty: float = 0.0) -> np.ndarray:
    return np.array([[sx, 0.0, tx], [0.0, sy, ty]])


def rotation(width: int, height: int, angle: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Rotate a width × height film by ``angle`` degrees (counter-clockwise as displayed, OpenCV's
    convention) onto a canvas just big enough to keep every pixel; returns (matrix, canvas size)."""
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    canvas = (width * cos + height * sin, width * sin + height * cos)
    matrix[:, 2] += (canvas[0] - width) / 2, (canvas[1] - height) / 2
    return matrix, canvas


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], replicate: bool = False) -> np.ndarray:
    """Resample ``image`` bilinearly by ``matrix`` (corner-origin coordinates) onto a ``size`` =
    (width, height) canvas; outside the image is 0 (black), or its nearest edge with ``replicate``."""
    # OpenCV puts pixel centres on integers: shift by half a pixel on both sides.
    centred = compose(_affine(tx=-0.5, ty=-0.5), matrix, _affine(tx=0.5, ty=0.5))
    border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
    return cv2.warpAffine(image, centred, size, flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)


def _corners(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _downscale(pixels: np.ndarray, fx: float, fy: float) -> tuple[np.ndarray, np.ndarray]:
    """Area-average ``pixels`` to about fx × fy of its size (factors ≤ 1); returns (image, matrix).

    Integer decimation first (OpenCV's fast path for INTER_AREA, ~5× faster than a fractional
    factor), then the exact remainder on the smaller image. Up to k−1 edge rows/columns that do
    not fill a k×k block are dropped (less than one output pixel).
    """
    height, width = pixels.shape
    kx, ky = max(1, int(1 / fx)), max(1, int(1 / fy))
    if kx > 1 or ky > 1:
        pixels = cv2.resize(pixels[: height // ky * ky, : width // kx * kx], (width // kx, height // ky),
                            interpolation=cv2.INTER_AREA)
    target = (max(1, round(width * fx)), max(1, round(height * fy)))
    if target != pixels.shape[::-1]:
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    return pixels, _affine(target[0] / (width // kx * kx), target[1] / (height // ky * ky))


def transform_boxes(boxes: pd.DataFrame, matrix: np.ndarray, clip: tuple[float, float, float, float]
                    ) -> pd.DataFrame:
    """Map x, y, w, h boxes by ``matrix``: the axis-aligned box around the 4 moved corners,
    clipped to ``clip`` = (x0, y0, x1, y1); boxes left narrower or lower than 1 pixel are dropped."""
    if boxes.empty:
        return boxes.copy()
    x, y = boxes["x"].to_numpy(float), boxes["y"].to_numpy(float)
    x1, y1 = x + boxes["w"].to_numpy(float), y + boxes["h"].to_numpy(float)
    corners = np.stack([np.stack([x, y], -1), np.stack([x1, y], -1), np.stack([x1, y1], -1),
                        np.stack([x, y1], -1)], axis=1)  # n × 4 × 2
    moved = corners @ matrix[:, :2].T + matrix[:, 2]
    lo = np.maximum(moved.min(axis=1), clip[:2])
    hi = np.minimum(moved.max(axis=1), clip[2:])
    out = boxes.copy()
    out["x"], out["y"] = lo[:, 0], lo[:, 1]
    out["w"], out["h"] = hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1]
    return out[(out["w"] >= 1) & (out["h"] >= 1)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Planning one film: field, window, angle, crop and output placement


@dataclass
class Plan:
    """Everything decided about one film before its pixels are resampled."""

    source: tuple[int, int]  # original (width, height)
    size: tuple[int, int]  # output (width, height)
    window: tuple[float, float]  # raw intensities mapped to 0 and 1
    field: np.ndarray  # exposed-field mask (uint8) on the planning copy
    shrink: np.ndarray  # original → planning copy
    angle: float  # degrees applied (counter-clockwise positive)
    status: str  # "ok" or "fallback_unrotated"
    reason: str  # why alignment fell back ("" when ok)
    rotation: np.ndarray  # original → rotated canvas
    canvas: tuple[float, float]  # rotated canvas (width, height)
    crop: tuple[float, float, float, float]  # (x, y, w, h) on the rotated canvas
    scale: tuple[float, float]  # crop → output
    pad: tuple[int, int]  # left and top border of the letterbox
    content: tuple[int, int]  # (width, height) of the film inside the output

    @cached_property
    def matrix(self) -> np.ndarray:
        """Original film → output, corner-origin pixel coordinates."""
        place = _affine(self.scale[0], self.scale[1], self.pad[0], self.pad[1])
        return compose(place, _affine(tx=-self.crop[0], ty=-self.crop[1]), self.rotation)

    @property
    def content_box(self) -> tuple[float, float, float, float]:
        return (self.pad[0], self.pad[1], self.pad[0] + self.content[0], self.pad[1] + self.content[1])

    def meta(self) -> dict:
        """The per-film record the stage writes into index.parquet."""
        return {
            "status": self.status, "reason": self.reason, "angle": self.angle,
            "crop_x": self.crop[0], "crop_y": self.crop[1], "crop_w": self.crop[2], "crop_h": self.crop[3],
            "scale_x": self.scale[0], "scale_y": self.scale[1], "pad_x": self.pad[0], "pad_y": self.pad[1],
            "width": self.size[0], "height": self.size[1],
            "source_width": self.source[0], "source_height": self.source[1],
            "window_lo": self.window[0], "window_hi": self.window[1],
            "matrix": [float(v) for v in self.matrix.ravel()],
        }


def _exposed_field(small: np.ndarray, tolerance: float) -> np.ndarray:
    """Mask (uint8) of the exposed field on the planning copy.

    Outside lie padding (the frame's most common value, when it covers a fifth of the frame: the
    black corners of a rotated film, a scanner's border) and the collimator's shadow: flat, bright
    (unexposed film is bright in this display convention) regions along the film's rim. Dark
    margins are exposed air and stay, so the field never shrinks to the anatomy (which would change
    the scale from film to film). Collimated fields and rotated films are convex, so the field is
    the convex hull of what remains: a notch where bright bone leaves the film is filled again.
    """
    kernel = np.ones((3, 3), np.uint8)
    edge = np.zeros(small.shape, np.uint8)
    edge[[0, -1], :] = edge[:, [0, -1]] = 1
    values, counts = np.unique(small[edge == 1], return_counts=True)
    padding = np.zeros(small.shape, np.uint8)
    if counts.max() >= 0.2 * counts.sum():
        padding[small == values[counts.argmax()]] = 1
        padding = cv2.dilate(padding, kernel)  # one pixel more: the blended rim of the padding
    rim = ((cv2.dilate(padding, kernel) | edge) & (1 - padding)) == 1
    low, high = np.percentile(small[padding == 0], (1, 99))
    bright = rim & (small > low + 0.5 * (high - low))
    seeds, near = padding.copy(), np.zeros(small.shape, np.uint8)
    if bright.sum() >= 0.2 * rim.sum():
        shade = float(np.median(small[bright]))
        near[np.abs(small - shade) <= tolerance * (high - low)] = 1
        # seeds must be flat too: bone leaving the film can be as bright as the shadow, but not as
        # flat (the padding counts as shadow here, or a strip beside it would never be flat)
        relief = cv2.morphologyEx(np.where(padding == 1, np.float32(shade), small), cv2.MORPH_GRADIENT, kernel)
        seeds[(near == 1) & (relief <= tolerance * (high - low))] = 1
    _, labels = cv2.connectedComponents(seeds, connectivity=8)
    touching = np.unique(labels[(edge | padding) == 1])
    outside = np.isin(labels, touching[touching > 0]).astype(np.uint8)
    for _ in range(3):  # thin or blended parts of the shadow: a few pixels through near-shade pixels
        outside |= near & cv2.dilate(outside, kernel)
    # two pixels more take the blended rim between shadow and field, which is neither flat nor dark
    remaining = cv2.morphologyEx(1 - cv2.dilate(outside, np.ones((5, 5), np.uint8)), cv2.MORPH_OPEN, kernel)
    if remaining.sum() < 0.01 * remaining.size:
        return np.ones(small.shape, np.uint8)
    contours, _ = cv2.findContours(remaining, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    return cv2.fillConvexPoly(np.zeros(small.shape, np.uint8), hull, 1)


def _window(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``low``..``high`` to 0..1, clipped, as float32."""
    return np.clip((pixels.astype(np.float32) - low) * np.float32(1.0 / (high - low)), 0.0, 1.0)


def _tilt(windowed: np.ndarray, field: np.ndarray, min_elongation: float) -> tuple[float | None, str]:
    """Correction angle (degrees, OpenCV convention) that makes the film's principal axis vertical.

    As Hržić et al.: a black-and-white image (Otsu's threshold over the exposed field: the forearm's
    bone and soft tissue, or its cast, against air), then PCA of the white pixels from the second
    central moments. The angle is reduced to (−90°, 90°]: the film is never turned upside down.
    Returns (None, reason) when the mask is empty or has no dominant axis.
    """
    grey = np.round(windowed * 255).astype(np.uint8)
    threshold, _ = cv2.threshold(grey[field == 1].reshape(-1, 1), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ((grey > threshold) & (field == 1)).astype(np.uint8)
    moments = cv2.moments(mask, binaryImage=True)
    if moments["m00"] == 0:
        return None, "empty forearm mask"
    a, b, c = moments["mu20"], moments["mu11"], moments["mu02"]
    spread = math.hypot((a - c) / 2, b)
    major, minor = (a + c) / 2 + spread, (a + c) / 2 - spread
    if minor > 0 and math.sqrt(major / minor) < min_elongation:
        return None, f"no dominant forearm axis (elongation {math.sqrt(major / minor):.2f} < {min_elongation})"
    theta = 0.5 * math.degrees(math.atan2(2 * b, a - c))  # major axis, from +x towards +y (down)
    angle = (theta - 90.0) % 180.0
    return (angle - 180.0 if angle > 90.0 else angle), ""


def plan(pixels: np.ndarray, params: dict) -> Plan:
    """Decide window, alignment, crop and placement for one uint16 film (see the module docstring)."""
    if pixels.ndim != 2:
        raise PreprocessError(f"expected a single-channel image, got shape {pixels.shape}")
    low_value, high_value, _, _ = cv2.minMaxLoc(pixels)
    if low_value == high_value:
        raise PreprocessError(f"all-constant image (every pixel is {int(low_value)})")
    height, width = pixels.shape
    factor = 1 / math.ceil(max(height, width) / PLAN_SIDE)
    small, shrink = _downscale(pixels, factor, factor)
    small = small.astype(np.float32)

    field = (_exposed_field(small, params["trim_tolerance"]) if params["trim"]
             else np.ones(small.shape, np.uint8))
    low, high = (float(v) for v in np.percentile(small[field == 1], params["percentiles"]))
    if high <= low:
        raise PreprocessError(f"no contrast in the exposed field (percentiles {params['percentiles']} "
                              f"both {low:g})")

    angle, status, reason = 0.0, "ok", ""
    if params["align"]:
        tilt, reason = _tilt(_window(small, low, high), field, params["min_elongation"])
        if tilt is not None and abs(tilt) > params["max_angle"]:
            tilt, reason = None, f"tilt {tilt:.1f}° beyond max_angle {params['max_angle']}°"
        if tilt is None:
            status = "fallback_unrotated"
        else:
            angle = tilt
    rotate, canvas = rotation(width, height, angle)

    if params["trim"]:
        contours, _ = cv2.findContours(field, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        outline = np.concatenate(contours).reshape(-1, 2).astype(float)
        pixel_corners = np.concatenate([outline + offset for offset in _corners(0, 0, 1, 1)])
        moved = _apply(compose(rotate, cv2.invertAffineTransform(shrink)), pixel_corners)
        cx0, cy0 = np.maximum(moved.min(axis=0), 0.0)
        cx1, cy1 = np.minimum(moved.max(axis=0), canvas)
    else:
        cx0, cy0, (cx1, cy1) = 0.0, 0.0, canvas
    top, bottom = params["roi_rows"]
    crop = (float(cx0), float(cy0 + top * (cy1 - cy0)), float(cx1 - cx0), float((bottom - top) * (cy1 - cy0)))

    out_w, out_h = params["width"], params["height"]
    if params["resize"] == "letterbox":
        fit = min(out_w / crop[2], out_h / crop[3])
        content = (max(1, min(out_w, round(crop[2] * fit))), max(1, min(out_h, round(crop[3] * fit))))
    else:
        content = (out_w, out_h)
    pad = ((out_w - content[0]) // 2, (out_h - content[1]) // 2)
    scale = (content[0] / crop[2], content[1] / crop[3])
    return Plan((width, height), (out_w, out_h), (low, high), field, shrink, float(angle), status, reason,
                rotate, canvas, crop, scale, pad, content)


def _field_mask(plan: Plan) -> np.ndarray:
    """1 on the film's exposed field inside the letterbox's content area, 0 elsewhere (output pixels)."""
    to_output = compose(plan.matrix, cv2.invertAffineTransform(plan.shrink))
    # replicate: the planning copy may lack the film's last few pixels; the outline below bounds it
    mask = (warp(plan.field.astype(np.float32), to_output, plan.size, replicate=True) > 0.5).astype(np.float32)
    outline = _apply(plan.matrix, _corners(0, 0, *plan.source)) - 0.5  # pixel centres on integers
    film = cv2.fillConvexPoly(np.zeros_like(mask), np.round(outline * 16).astype(np.int32), 1, shift=4)
    x0, y0, x1, y1 = plan.content_box
    film[:, :x0] = film[:, x1:] = 0
    film[:y0] = film[y1:] = 0
    return mask * film


def render(pixels: np.ndarray, plan: Plan, params: dict) -> np.ndarray:
    """Resample ``pixels`` per ``plan``: a float32 (height, width) image in [0, 1], quantised to the
    preset's dtype so that it equals what the stored PNG decodes to."""
    # Shrink to about the output scale first: INTER_AREA averages (no aliasing), the warp then
    # works near 1:1 and handles only rotation, crop and the last bit of scale.
    pre, shrink = _downscale(pixels, min(1.0, plan.scale[0]), min(1.0, plan.scale[1]))
    # replicate: the shrunk copy may lack the film's last few pixels; the field mask blacks out the rest
    image = warp(_window(pre, *plan.window), compose(plan.matrix, cv2.invertAffineTransform(shrink)), plan.size,
                 replicate=True)
    if params["clahe"] > 0:
        x0, y0, x1, y1 = plan.content_box
        tiles = params["clahe_tiles"]
        clahe = cv2.createCLAHE(clipLimit=params["clahe"], tileGridSize=(tiles, tiles))
        image[y0:y1, x0:x1] = clahe.apply(np.round(image[y0:y1, x0:x1] * 65535).astype(np.uint16)) / 65535.0
    image *= _field_mask(plan)
    levels = _LEVELS[params["dtype"]]
    return (np.round(image * levels) / levels).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The single-image API (stage, train, predict)


def preprocess_array(pixels: np.ndarray, params: dict, boxes: pd.DataFrame | None = None
                     ) -> tuple[np.ndarray, pd.DataFrame | None, dict]:
    """Preprocess one uint16 film with a preset's params (``recipe["params"]``).

    Returns the float32 (height, width) image in [0, 1], ``boxes`` (columns x, y, w, h in original
    pixels; other columns kept) mapped to output pixels and clipped (None when not given), and the
    meta dict (status, angle, crop/scale/pad, matrix, ...). Raises :class:`PreprocessError` for a
    film that cannot be used; an alignment failure is not an error (status says fallback).
    """
    film = plan(pixels, params)
    image = render(pixels, film, params)
    moved = None if boxes is None else transform_boxes(boxes, film.matrix, film.content_box)
    return image, moved, film.meta()


def preprocess_file(path: str | Path, params: dict) -> tuple[np.ndarray, dict]:
    """Read a film (16-bit safe) and preprocess it: (float32 image in [0, 1], meta)."""
    image, _, meta = preprocess_array(read_gray(path), params)
    return image, meta


def stages(pixels: np.ndarray, params: dict, max_side: int = 400) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The film after each step, for the before/after figure: (name, image in [0, 1], matrix from the
    original). Intermediate steps are shrunk to at most ``max_side`` pixels for display."""
    film = plan(pixels, params)
    raw = pixels.astype(np.float32)
    windowed = _window(raw, *film.window)
    aligned = ("alignment off" if not params["align"] else f"aligned ({film.angle:+.1f}°)" if film.status == "ok"
               else "aligned (fallback: unrotated)")
    trimmed = compose(_affine(tx=-film.crop[0], ty=-film.crop[1]), film.rotation)
    steps = [("original", _window(raw, raw.min(), raw.max()), _affine(), film.source),
             ("windowed", windowed, _affine(), film.source),
             (aligned, windowed, film.rotation, film.canvas),
             ("trimmed", windowed, trimmed, film.crop[2:])]
    out = []
    for name, image, matrix, size in steps:
        shrink = min(1.0, max_side / max(size))
        display = compose(_affine(shrink, shrink), matrix)
        out.append((name, warp(image, display, (max(1, round(size[0] * shrink)), max(1, round(size[1] * shrink)))),
                    display))
    out.append((f"{params['resize']} {film.size[1]}×{film.size[0]}", render(pixels, film, params), film.matrix))
    return out


# --------------------------------------------------------------------------------------------
# The stage


@dataclass
class _Result:
    image_id: str
    source: str  # the manifest's path of the original film
    meta: dict | None  # None when rejected
    boxes: pd.DataFrame | None  # None when rejected
    reason: str = ""


def _process(row, boxes: pd.DataFrame, params: dict, image_dir: Path, final_dir: Path) -> _Result:
    """Read, preprocess and write one manifest row; a bad film becomes a rejected result."""
    try:
        image, moved, meta = preprocess_array(read_gray(row.path), params, boxes)
    except (ImageReadError, PreprocessError) as err:
        return _Result(row.image_id, row.path, None, None, str(err))
    levels = _LEVELS[params["dtype"]]
    stored = np.round(image * levels).astype(np.uint8 if levels == 255 else np.uint16)
    Image.fromarray(stored).save(image_dir / f"{row.image_id}.png", format="PNG", compress_level=1)
    meta = {"image_id": row.image_id, "path": str(final_dir / f"{row.image_id}.png"), **meta}
    if meta["status"] != "ok":
        log.warning("%s: alignment fell back to the unrotated film: %s", row.image_id, meta["reason"])
    return _Result(row.image_id, row.path, meta, moved)


def run(manifest: pd.DataFrame, boxes: pd.DataFrame, preset: str, params: dict, out_dir: str | Path,
        threads: int = 1, figure_films: int = 3) -> dict:
    """Preprocess every manifest film with one preset into ``out_dir``; returns counts and the
    wall-clock and CPU seconds spent on the films (without the figure).

    Streams one film at a time per worker thread (OpenCV and the PNG codecs release the GIL);
    only the small per-film records are kept. ``index.parquet`` is written last.
    """
    out_dir = Path(out_dir)
    recipe = make_recipe(preset, params)
    log.info("preset %s (hash %s): %s", preset, recipe["hash"], json.dumps(params, sort_keys=True))
    cv2.setNumThreads(1)  # parallelism is per film; OpenCV's own threads would oversubscribe
    by_image = dict(tuple(boxes.groupby("image_id")))
    empty = boxes.iloc[0:0][BOX_COLUMNS]
    final_images = out_dir / "images"
    start, cpu_start = time.perf_counter(), time.process_time()
    with atomic_dir(final_images) as image_dir, ThreadPoolExecutor(max(1, threads)) as pool:
        results = pool.map(
            lambda row: _process(row, by_image.get(row.image_id, empty), params, image_dir, final_images),
            manifest.itertuples())
        index_rows, box_frames, rejects = [], [], []
        for result in progress(results, desc=f"preprocess {preset}", total=len(manifest)):
            if result.meta is None:
                rejects.append({"image_id": result.image_id, "source": result.source, "reason": result.reason})
                log.warning("%s rejected: %s", result.image_id, result.reason)
            else:
                index_rows.append(result.meta)
                box_frames.append(result.boxes)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    index = pd.DataFrame(index_rows, columns=INDEX_COLUMNS)
    rejected = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    out_boxes = pd.concat([empty, *box_frames], ignore_index=True)[BOX_COLUMNS]
    if len(index) + len(rejected) != len(manifest):
        raise RuntimeError(f"counts do not reconcile: {len(manifest)} films in, {len(index)} kept + "
                           f"{len(rejected)} rejected")
    summary = {"films": len(manifest), "kept": len(index), "rejected": len(rejected),
               "fallback_unrotated": int((index["status"] != "ok").sum()),
               "boxes_in": int(boxes["image_id"].isin(manifest["image_id"]).sum()), "boxes_out": len(out_boxes),
               "seconds": seconds, "cpu_seconds": cpu_seconds}
    log.info("films in %(films)d = kept %(kept)d + rejected %(rejected)d in %(seconds).1f s (%(cpu_seconds).1f s "
             "CPU); alignment fell back on %(fallback_unrotated)d; boxes %(boxes_in)d in, %(boxes_out)d out (the "
             "rest were on rejected films or cropped away)", summary)

    from physis.preprocess_figure import steps_figure  # matplotlib: only the stage needs it

    steps_figure(_figure_films(manifest, boxes, index, figure_films), boxes, params, out_dir / "steps.png")
    write_parquet(out_boxes, out_dir / "boxes.parquet")
    write_parquet(rejected, out_dir / "rejected.parquet")
    rejected.to_csv(out_dir / "rejected.csv", index=False)
    write_json(recipe, out_dir / "recipe.json")
    write_parquet(index, out_dir / "index.parquet")  # last: its presence means the stage finished
    return summary


def _figure_films(manifest: pd.DataFrame, boxes: pd.DataFrame, index: pd.DataFrame, count: int) -> pd.DataFrame:
    """The films the figure shows: kept ones with a fracture box first, then others, by image_id."""
    kept = manifest[manifest["image_id"].isin(index["image_id"])]
    fractured = set(boxes.loc[boxes["class"] == "fracture", "image_id"])
    order = kept.assign(_first=~kept["image_id"].isin(fractured)).sort_values(["_first", "image_id"])
    return order.head(count).drop(columns="_first")

