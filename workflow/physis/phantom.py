"""A procedural GRAZPEDWRI-DX phantom: the workflow's embedded default dataset.

:func:`generate` writes synthetic pediatric wrist films in exactly the release's on-disk layout
(``dataset.csv`` with BOM and CRLF, 16-bit ``images_part1..4/*.png``, YOLO labels and Pascal VOC
XML under ``folder_structure/``), so every parser and every stage of the workflow runs end to end
without the real data. Each film is drawn from distance fields in the forearm's own coordinates
(radius, ulna, epiphyses behind a dark physis band, carpals, metacarpals, soft tissue, optional
cast and metal), rotated by up to ±15°, with noise and burned-in text.

Fractures follow the AO/PCCF codes of the CSV: Salter-Harris I–IV across a physis (``E/1``–``E/4``),
metaphyseal torus/greenstick (``M/2``) and complete (``M/3``) fractures, ulnar-styloid avulsions
(``23u-E/7``), shaft greenstick (``22r-D/2.1``) and scaphoid (``72B(b)``) fractures. As in the
release, the code is the episode diagnosis copied onto every film of the patient, while
``fracture_visible`` and the ``fracture`` boxes say what each film shows: follow-up studies often
show the fracture healed. A fracture is a dark gap a few pixels wide plus a displaced fragment, big
enough to survive letterboxing the film to 256×128; nothing global (size, brightness, text,
metal, cast) depends on the label.

Randomness is drawn per patient (episode, anatomy) and per film (pose, size, noise) from
generators seeded by ``(seed, patient)`` and ``(seed, patient, study, projection)``, so the same
arguments give byte-identical files and any film can be re-rendered on its own (:func:`render`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import struct
import sys
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from physis.phantom_folder import MARKER, PhantomFolderError, check_folder  # noqa: F401 (API)
from physis.records import CONSPICUITY, CSV_COLUMNS, YOLO_CLASSES, YOLO_LABEL_DIR, Box

IMAGE_FOLDERS = tuple(f"images_part{k}" for k in range(1, 5))
LABEL_DIR = Path(YOLO_LABEL_DIR)
VOC_DIR = Path("folder_structure/pascalvoc")

#: Share of physeal patients per Salter-Harris type (SH II dominates, as in the release).
SH_SHARES = {"SH1": 0.18, "SH2": 0.70, "SH3": 0.06, "SH4": 0.06}
#: Non-physeal episodes: (weight, fractures as (kind, bone), AO codes).
OTHER_EPISODES = (
    (0.42, (), ()),
    (0.12, (("M2", "radius"),), ("23r-M/2.1",)),
    (0.13, (("M3", "radius"),), ("23r-M/3.1",)),
    (0.05, (("M2", "radius"), ("M2", "ulna")), ("23-M/2.1",)),
    (0.06, (("M3", "radius"), ("M3", "ulna")), ("23-M/3.1",)),
    (0.06, (("M3", "radius"), ("M2", "ulna")), ("23r-M/3.1", "23u-M/2.1")),
    (0.03, (("M2", "ulna"),), ("23u-M/2.1",)),
    (0.06, (("E7", "ulna"),), ("23u-E/7",)),
    (0.03, (("D2", "radius"),), ("22r-D/2.1",)),
    (0.02, (("SCAPHOID", "scaphoid"),), ("72B(b)",)),  # adult AO hand codes, as in the release
    (0.01, (("SCAPHOID", "scaphoid"),), ("72B(c)",)),
    (0.01, (("SCAPHOID", "scaphoid"),), ("72B.(b)",)),
)
#: Dirty spellings seen in the release, per canonical code.
DIRTY_VARIANTS = {
    "23u-E/7": ("23u-E/7 ", "23u-E7", "23u/E/7"),
    "23r-M/3.1": ("23r-M3.1",),
    "23u-M/2.1": ("23u-M/2.",),
    "23r-E/1": ("23r-E/1 ",),
    "23r-E/1.1": ("23r-E/1 ",),
}
JUNK_CODE = "23r-X/9?"
SEPARATORS = (("; ", 0.88), (";", 0.06), (";  ", 0.04), (", ", 0.02))
SECOND_TEXTS = ("PA", "dv", "seitl.", "stehend", "li", "re")

_FAR = 1.0e5  # "infinity" for the open ends of shafts, in pixels
# Tags that keep the random streams apart. They lead the seed tuple because numpy's SeedSequence
# treats trailing zeros as absent: (seed, 7) and (seed, 7, 0, 0) give the same numbers.
_STREAM_ORDER, _STREAM_PATIENT, _STREAM_ANATOMY, _STREAM_FILM = 1, 2, 3, 4
_TWELVE_TO_SIXTEEN_BITS = (np.arange(4096, dtype=np.uint32) * 65535 // 4095).astype(np.uint16)


# --------------------------------------------------------------------------------------------
# The plan: patients, episodes, studies and the CSV row of every film


@dataclass(frozen=True)
class Fracture:
    """One fracture of an episode; ``shape`` (uniforms in [0, 1)) fixes its geometry for every film."""

    kind: str  # SH1..SH4, M2, M3, E7, D2, SCAPHOID
    bone: str  # radius, ulna, scaphoid
    shape: tuple[float, ...]


@dataclass(frozen=True)
class PhantomImage:
    """One planned film: its CSV metadata, what it shows, and the seeds that draw it."""

    patient_id: int
    study_number: int
    timehash: int
    gender: str
    age: float
    laterality: str
    projection: int
    initial_exam: bool
    ao_classification: str
    cast: bool
    diagnosis_uncertain: bool
    osteopenia: bool
    fracture_visible: bool
    metal: bool
    agfa: bool
    fractures: tuple[Fracture, ...]  # the episode's fractures (drawn only when fracture_visible)
    healing: float  # 0 at the first study, up to 1 in later follow-ups
    seed: int

    @property
    def stem(self) -> str:
        return (f"{self.patient_id:04d}_{self.timehash:010d}_{self.study_number:02d}_WRI-"
                f"{self.laterality}{self.projection}_{self.gender}{int(self.age):03d}")

    @property
    def image_seed(self) -> tuple[int, ...]:
        return (self.seed, _STREAM_FILM, self.patient_id, self.study_number, self.projection)

    @property
    def anatomy_seed(self) -> tuple[int, ...]:
        return (self.seed, _STREAM_ANATOMY, self.patient_id)

    def csv_row(self) -> list[str]:
        def flag(value: bool) -> str:
            return "1" if value else ""

        age = f"{self.age:.1f}"
        return [
            self.stem, str(self.patient_id), str(self.study_number), str(self.timehash), self.gender,
            age[:-2] if age.endswith(".0") else age, self.laterality, str(self.projection),
            flag(self.initial_exam), self.ao_classification, flag(self.cast), flag(self.diagnosis_uncertain),
            flag(self.osteopenia), flag(self.fracture_visible), flag(self.metal),
            "0.143" if self.agfa else "0.144", "Agfa" if self.agfa else "Siemens",
        ]


def _choice(rng: np.random.Generator, weighted) -> object:
    """One item of ``weighted`` (pairs of (item, weight)) by weight."""
    items = [item for item, _ in weighted]
    weights = np.array([w for _, w in weighted], dtype=float)
    return items[rng.choice(len(items), p=weights / weights.sum())]


def _physeal_counts(n_physeal: int) -> dict[str, int]:
    """Patients per Salter-Harris type by largest remainder; with ≥4 physeal patients each type has ≥1."""
    exact = {kind: share * n_physeal for kind, share in SH_SHARES.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    by_remainder = sorted(exact, key=lambda kind: exact[kind] - counts[kind], reverse=True)
    for kind in by_remainder[: n_physeal - sum(counts.values())]:
        counts[kind] += 1
    if n_physeal >= 4:
        for kind in counts:
            if counts[kind] == 0:
                counts[kind] = 1
                counts[max(counts, key=counts.get)] -= 1
    return counts


def _physeal_episode(kind: str, rng: np.random.Generator) -> tuple[list[tuple[str, str]], list[str]]:
    """Fractures and AO codes of a physeal episode of Salter-Harris ``kind``."""
    child = int(kind[-1])
    side = _choice(rng, [("r", 0.84 if child != 2 else 0.88), ("u", 0.16 if child != 2 else 0.08),
                         ("", 0.0 if child != 2 else 0.04)])
    bones = {"r": ["radius"], "u": ["ulna"], "": ["radius", "ulna"]}[side]
    severity = _choice(rng, [(".1", 0.8), ("", 0.15), (".2", 0.05)])
    return [(kind, bone) for bone in bones], [f"23{side}-E/{child}{severity}"]


def _episode(category: str | None, rng: np.random.Generator) -> tuple[list[tuple[str, str]], list[str]]:
    """Fractures (kind, bone) and AO codes of one patient's episode; ``category`` is an SH type or None."""
    if category is not None:
        fractures, codes = _physeal_episode(category, rng)
    else:
        _, episode_fractures, episode_codes = _choice(rng, [(episode, episode[0]) for episode in OTHER_EPISODES])
        fractures, codes = list(episode_fractures), list(episode_codes)
    fractured = {bone for _, bone in fractures}
    if "radius" in fractured and "ulna" not in fractured and rng.random() < 0.35:
        fractures.append(("E7", "ulna"))
        codes.append("23u-E/7")
    return fractures, codes


def _ao_string(codes: list[str], physeal: bool, rng: np.random.Generator) -> str:
    """The CSV cell for ``codes`` with the release's separators and, rarely, its dirty spellings."""
    codes = list(codes)
    if codes and rng.random() < 0.08:
        dirty = [i for i, code in enumerate(codes) if code in DIRTY_VARIANTS]
        if dirty:
            i = dirty[rng.integers(len(dirty))]
            variants = DIRTY_VARIANTS[codes[i]]
            codes[i] = variants[rng.integers(len(variants))]
    if codes and not physeal and rng.random() < 0.01:
        codes[0] = JUNK_CODE
    return str(_choice(rng, SEPARATORS)).join(codes)


def _plan_patient(patient_id: int, category: str | None, seed: int) -> list[PhantomImage]:
    """All films of one patient. ``category`` is the Salter-Harris type of a physeal patient, else None."""
    rng = np.random.default_rng((seed, _STREAM_PATIENT, patient_id))
    fracture_list, codes = _episode(category, rng)
    fractures = tuple(Fracture(kind, bone, tuple(float(u) for u in rng.random(9))) for kind, bone in fracture_list)
    if fractures and category is None and rng.random() < 0.03:
        codes = []  # the release has fractures without a code (165 images)
    ao_string = _ao_string(codes, category is not None, rng)

    age = 2.0 + 15.9 * float(rng.beta(2.2, 1.6))
    if any(f.kind == "SCAPHOID" for f in fractures):
        age = max(age, 9.0 + 8.0 * float(rng.random()))
    gender = str(_choice(rng, [("M", 0.59), ("F", 0.405), ("O", 0.005)]))
    laterality = "L" if rng.random() < 0.55 else "R"
    agfa = bool(rng.random() < 0.01)
    osteopenia = bool(rng.random() < 0.06)
    n_studies = int(_choice(rng, [(1, 0.35), (2, 0.4), (3, 0.25)] if fractures else [(1, 0.75), (2, 0.25)]))

    images = []
    time = int(rng.integers(100_000_000, 1_400_000_000))
    days = 0.0
    for study in range(1, n_studies + 1):
        if study > 1:
            days += float(rng.uniform(5, 60))
        visible = bool(fractures) and (study == 1 or rng.random() < 0.4)
        cast = bool(rng.random() < 0.15)
        metal = bool(rng.random() < 0.04)
        projections = [1, 2] + ([3] if rng.random() < 0.01 else [])
        study_time = time + int(days * 86400) + int(rng.integers(0, 3600))
        for projection in projections:
            study_time += int(rng.integers(15, 240))
            images.append(PhantomImage(
                patient_id=patient_id, study_number=study, timehash=study_time, gender=gender,
                age=round(age + days / 365.25, 1), laterality=laterality, projection=projection,
                initial_exam=study == 1, ao_classification=ao_string, cast=cast,
                diagnosis_uncertain=bool(rng.random() < 0.025), osteopenia=osteopenia,
                fracture_visible=visible, metal=metal, agfa=agfa, fractures=fractures,
                healing=min(1.0, days / 42.0), seed=seed,
            ))
    return images


def plan(n_patients: int = 200, seed: int = 0, physeal_rate: float = 0.3) -> list[PhantomImage]:
    """Every film of the phantom, sorted by file stem (the CSV's row order).

    Physeal patients are exactly ``round(n_patients * physeal_rate)``, spread over the SH types by
    :data:`SH_SHARES`; which patients they are is a seeded permutation.
    """
    if not 1 <= n_patients <= 9999:
        raise ValueError(f"n_patients must be 1–9999 (the file stem has four digits), got {n_patients}")
    if not 0.0 <= physeal_rate <= 1.0:
        raise ValueError(f"physeal_rate must lie in [0, 1], got {physeal_rate}")
    n_physeal = round(n_patients * physeal_rate)
    categories: list[str | None] = [kind for kind, count in _physeal_counts(n_physeal).items() for _ in range(count)]
    categories += [None] * (n_patients - n_physeal)
    order = np.random.default_rng((seed, _STREAM_ORDER)).permutation(n_patients)
    images = [image for pid, index in enumerate(order, start=1)
              for image in _plan_patient(pid, categories[index], seed)]
    return sorted(images, key=lambda image: image.stem)


# --------------------------------------------------------------------------------------------
# Geometry helpers (vectorised over pixel arrays)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _chord(radius2: np.ndarray) -> np.ndarray:
    """Chord length through a unit sphere/cylinder at normalised squared distance ``radius2``."""
    return 2.0 * np.sqrt(np.maximum(1.0 - radius2, 0.0))


def _shell(r2: np.ndarray, inner: float = 0.72, marrow: float = 0.4) -> np.ndarray:
    """Projected thickness of a unit ellipsoid with a dense shell (cortex) and lighter marrow."""
    return _chord(r2) - (1.0 - marrow) * inner * _chord(r2 / inner**2)


def _tube(d: np.ndarray, r: np.ndarray, ri: np.ndarray, marrow: float = 0.3) -> np.ndarray:
    """Projected thickness (pixels) of a cortical tube of radius ``r``, medulla ``ri``, at distance ``d``."""
    return (np.sqrt(np.maximum(r * r - d * d, 0.0)) * 2.0
            - (1.0 - marrow) * 2.0 * np.sqrt(np.maximum(ri * ri - d * d, 0.0)))


def _segment_distance(x: np.ndarray, y: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance from every (x, y) to the polyline through ``points`` (k×2)."""
    best = None
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        d = np.hypot(x - x0 - t * dx, y - y0 - t * dy)
        best = d if best is None else np.minimum(best, d)
    return best


def _line_distance(x: np.ndarray, y: np.ndarray, points: np.ndarray, reach: float) -> np.ndarray:
    """:func:`_segment_distance` where the polyline's bounding box grown by ``reach`` holds the pixel,
    ``reach`` elsewhere: only pixels close to a fracture line need the exact distance."""
    (x0, y0), (x1, y1) = points.min(axis=0) - reach, points.max(axis=0) + reach
    close = np.nonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
    distance = np.full(x.shape, reach, dtype=np.float32)
    distance[close] = np.minimum(_segment_distance(x[close], y[close], points), reach)
    return distance


def _inside(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for every (x, y)."""
    result = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0 if y1 != y0 else 1e-9)
        result ^= crosses & (x < x_cross)
    return result


# --------------------------------------------------------------------------------------------
# Bones: each has local coordinates, a thickness field and a local → canonical map


@dataclass
class _Fragment:
    """What a fracture does to its bone, in the bone's local coordinates."""

    line: np.ndarray  # k×2 polyline of the fracture (for the gap and the box)
    width: float  # gap width in pixels
    depth: float  # 0..1: how much bone the gap removes
    polygon: np.ndarray | None = None  # the displaced fragment before displacement
    shift: tuple[float, float] = (0.0, 0.0)
    bulge: tuple[float, float, float, tuple[int, ...]] | None = None  # (v, amplitude, width, sides)
    extra_points: np.ndarray | None = None  # further points the box must cover


@dataclass
class _LongBone:
    """Radius or ulna. Local coordinates: x across the bone from its axis, v along it from the physis."""

    uc: float  # canonical u of the axis
    yp: float  # canonical v of the physis on the axis
    slope: float  # physis tilt (dv/du)
    bow: float  # physis curvature (pixels at the metaphyseal cortex)
    rm: float  # metaphyseal half-width at the physis
    rs: float  # shaft half-width
    flare: float  # length over which the metaphysis narrows to the shaft
    tp: float  # physis thickness
    ea: float  # epiphysis half-width
    eb: float  # epiphysis half-height
    ek: float  # how far the epiphysis ellipse is cut flat by the physis (fraction of eb)
    eu: float  # epiphysis offset across the bone
    knobs: tuple[tuple[float, float, float, float], ...]  # styloids etc.: (x, v, a, b) ellipses of the epiphysis
    outer: int  # +1/-1: the canonical u direction of this bone's free (outer) side

    def physis_v(self, x):
        return self.slope * x + self.bow * (x / self.rm) ** 2

    def local(self, u, v):
        x = u - self.uc
        return x, v - self.yp - self.physis_v(x)

    def canonical(self, points: np.ndarray) -> np.ndarray:
        x, v = points[:, 0], points[:, 1]
        return np.stack([self.uc + x, self.yp + self.physis_v(x) + v], axis=1)

    def radius_at(self, v):
        """Metaphyseal/shaft half-width at local ``v`` (below the physis)."""
        return self.rm + (self.rs - self.rm) * _smoothstep(v / self.flare)

    def surface(self, x: float) -> float:
        """Local v of the epiphysis' articular surface (its dome, without knobs) at ``x``."""
        across = min(abs(x - self.eu) / self.ea, 0.95)
        return -self.tp / 2 - self.ek * self.eb - self.eb * math.sqrt(1.0 - across**2)

    @property
    def top(self) -> float:
        """Local v of the epiphysis top (negative: distal)."""
        tops = [-self.tp / 2 - self.eb * (1 + self.ek)] + [kv - kb for _, kv, _, kb in self.knobs]
        return min(tops)

    def bounds(self) -> tuple[float, float, float, float]:
        """Canonical (u0, u1, v0, v1) covering the bone (open-ended towards the elbow)."""
        half, tilt = self._extent()
        return self.uc - half, self.uc + half, self.yp + self.top - tilt - 4, _FAR

    def parts(self, start: float | None = None):
        """(bounds, thickness function) pairs that add up to :meth:`thickness` (beyond local v =
        ``start`` if given): epiphysis, metaphysis and shaft on separate windows, much cheaper
        than one long window for everything."""
        half, tilt = self._extent()
        u0, u1 = self.uc - half, self.uc + half
        begin = -_FAR if start is None else start
        flare = max(self.flare, begin)

        def metaphysis(x, v):
            return self.metaphysis(x, v) * ((v <= flare) & (v > begin))

        def shaft(x, v):
            return self.metaphysis(x, v, at_shaft=True) * (v > flare)

        windows = [((u0, u1, self.yp + flare - tilt - 2, _FAR), shaft)]
        if begin < self.flare:
            windows.append(((u0, u1, self.yp + max(begin, 0.0) - tilt - 2, self.yp + flare + tilt + 2), metaphysis))
        if start is None:
            windows.append(((u0, u1, self.yp + self.top - tilt - 4, self.yp + tilt + 2), self.epiphysis))
        return windows

    def _extent(self) -> tuple[float, float]:
        half = 1.8 * self.rm
        return half, abs(self.slope) * half + abs(self.bow) * (half / self.rm) ** 2 + self.tp

    def metaphysis(self, x, v, bulge=None, at_shaft=False):
        """Metaphysis and shaft (local v > tp/2), optionally with a torus bulge (v, amplitude, width, sides).
        ``at_shaft`` promises v ≥ flare (a plain tube there: nothing depends on v)."""
        if at_shaft:
            return _tube(np.abs(x), self.rs, self.rs * 0.72, marrow=0.25)
        half_tp = self.tp / 2
        s = _smoothstep(v / self.flare)
        r = self.rm + (self.rs - self.rm) * s
        centre = 0.0
        if bulge is not None:
            bv, amplitude, width, sides = bulge
            bump = amplitude * np.exp(-(((v - bv) / width) ** 2))
            if len(sides) == 1:  # push one cortex out: widen by half the bump, shift the axis by the other half
                bump = bump / 2
                centre = sides[0] * bump
            r = r + bump
        cortex = r * (0.12 + 0.16 * s)
        meta = _tube(np.abs(x - centre), r, r - cortex, marrow=0.25)
        # a soft end at the physis, and the dense zone of provisional calcification just below it
        end = np.clip((v - half_tp) / 1.5 + 0.5, 0.0, 1.0)
        calcification = np.clip(1.0 - np.abs(v - 1.1 * self.tp) / (0.6 * self.tp), 0.0, 1.0)
        return meta * end * (1.0 + 0.4 * calcification)

    def epiphysis(self, x, v):
        """Epiphysis with its knobs (styloids), cut flat by the physis (local v < -tp/2)."""
        half_tp = self.tp / 2
        epi_r2 = ((x - self.eu) / self.ea) ** 2 + ((v + half_tp + self.ek * self.eb) / self.eb) ** 2
        epi = self.ea * 0.9 * _shell(epi_r2)
        for kx, kv, ka, kb in self.knobs:
            knob = ka * 1.2 * _shell(((x - kx) / ka) ** 2 + ((v - kv) / kb) ** 2, inner=0.6, marrow=0.5)
            epi = np.maximum(epi, knob)
        return epi * np.clip((-half_tp - v) / 1.5 + 0.5, 0.0, 1.0)

    def thickness(self, x, v, bulge=None):
        """Projected bone thickness (pixels) at local (x, v)."""
        return self.metaphysis(x, v, bulge) + self.epiphysis(x, v)


@dataclass
class _OvalBone:
    """A carpal: an ellipse of half-axes (a, b) turned by ``angle``. Local coordinates along its axes."""

    cu: float
    cv: float
    a: float
    b: float
    angle: float

    def local(self, u, v):
        c, s = math.cos(self.angle), math.sin(self.angle)
        du, dv = u - self.cu, v - self.cv
        return c * du + s * dv, -s * du + c * dv

    def canonical(self, points: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = points[:, 0], points[:, 1]
        return np.stack([self.cu + c * x - s * y, self.cv + s * x + c * y], axis=1)

    def bounds(self) -> tuple[float, float, float, float]:
        r = max(self.a, self.b) + 2
        return self.cu - r, self.cu + r, self.cv - r, self.cv + r

    def parts(self):
        return ((self.bounds(), self.thickness),)

    def thickness(self, x, y, bulge=None):
        return min(self.a, self.b) * 1.6 * _shell((x / self.a) ** 2 + (y / self.b) ** 2)


@dataclass
class _Capsule:
    """A metacarpal: a tube from ``base`` along ``angle`` (0 = straight up) for ``length`` pixels."""

    bu: float
    bv: float
    r: float
    length: float
    angle: float

    def local(self, u, v):
        c, s = math.cos(self.angle), math.sin(self.angle)
        du, dv = u - self.bu, v - self.bv
        return c * du + s * dv, -s * du + c * dv  # y negative along the bone

    def bounds(self) -> tuple[float, float, float, float]:
        tip_u = self.bu + math.sin(self.angle) * self.length
        tip_v = self.bv - math.cos(self.angle) * self.length
        return (min(self.bu, tip_u) - 1.5 * self.r, max(self.bu, tip_u) + 1.5 * self.r,
                min(self.bv, tip_v) - 1.5 * self.r, max(self.bv, tip_v) + 1.5 * self.r)

    def parts(self):
        return ((self.bounds(), self.thickness),)

    def thickness(self, x, y, bulge=None):
        along = np.clip(-y, 0.0, self.length)
        d = np.hypot(x, y + along)
        # heads and bases are wider than the shaft
        ends = np.exp(-((along / (1.2 * self.r)) ** 2)) + np.exp(-(((self.length - along) / (1.2 * self.r)) ** 2))
        r = self.r * (1.0 + 0.35 * ends)
        return _tube(d, r, r * 0.55, marrow=0.35)


# --------------------------------------------------------------------------------------------
# Fracture geometry: the polyline, gap, fragment and displacement of each kind


def _fragment(fracture: Fracture, bone, scale: float, healing: float) -> _Fragment:
    """Geometry of ``fracture`` on ``bone`` (local coordinates) ``healing`` (0–1) into recovery:
    displacement and bulge shrink to half, the gap fades by a third."""
    fresh = _fresh_fragment(fracture, bone, scale)
    fresh.line = _jagged(fresh.line, 0.35 * fresh.width, np.random.default_rng(int(fracture.shape[0] * 2**32)))
    settle = 1.0 - 0.5 * healing
    bulge = fresh.bulge
    if bulge is not None:
        bulge = (bulge[0], bulge[1] * settle, bulge[2], bulge[3])
    shift = (fresh.shift[0] * settle, fresh.shift[1] * settle)
    return replace(fresh, depth=fresh.depth * (1.0 - healing / 3), shift=shift, bulge=bulge)


def _jagged(line: np.ndarray, amplitude: float, rng: np.random.Generator, pieces: int = 4) -> np.ndarray:
    """``line`` with every segment cut into ``pieces`` whose joints wander up to ``amplitude`` sideways.
    Staying inside the gap's half-width, the wander never uncovers the fragment's straight edge."""
    points = [line[0]]
    for start, stop in zip(line[:-1], line[1:]):
        normal = np.array([start[1] - stop[1], stop[0] - start[0]]) / max(float(np.hypot(*(stop - start))), 1e-9)
        for k in range(1, pieces):
            points.append(start + (stop - start) * k / pieces + normal * amplitude * float(rng.uniform(-1, 1)))
        points.append(stop)
    return np.array(points)


def _fresh_fragment(fracture: Fracture, bone, scale: float) -> _Fragment:
    """Geometry of a fresh ``fracture`` on ``bone`` (local coordinates); ``scale``: pixels per forearm unit."""
    q = fracture.shape
    f = 1 if q[7] < 0.5 else -1  # which side of the bone the fracture favours
    width = max(2.0, scale * (0.011 + 0.006 * q[6]))
    depth = 0.75 + 0.2 * q[8]
    kind = fracture.kind
    if kind == "SCAPHOID":
        tilt = bone.a * 0.5 * (q[0] - 0.5)
        line = np.array([[-1.3 * bone.a, tilt], [1.3 * bone.a, -tilt]])
        a, b = 3 * bone.a, 3 * bone.b
        polygon = np.array([[-a, tilt], [a, -tilt], [a, -b], [-a, -b]])
        return _Fragment(line, width, depth, polygon, (scale * 0.004 * f, -scale * 0.004))

    R, tp = bone.rm, bone.tp
    top = bone.top
    far = 4.0 * R + 4.0 * abs(top)
    above = [[f * far, -far], [-f * far, -far]]  # closes a fragment polygon on the distal side
    if kind == "SH1":
        line = np.array([[-1.05 * R, 0.0], [1.05 * R, 0.0]])
        polygon = np.array([[-far, 0.0], [far, 0.0], [far, -far], [-far, -far]])
        shift = (f * scale * (0.008 + 0.02 * q[1]), -tp * (0.7 + 0.8 * q[0]))
        return _Fragment(line, tp, 0.0, polygon, shift)
    if kind == "SH2":
        corner = f * R * (-0.3 + 0.6 * q[0])
        h = R * (0.3 + 0.5 * q[1])
        exit_x = f * 1.05 * float(bone.radius_at(np.float32(h)))
        line = np.array([[-f * 1.05 * R, 0.0], [corner, 0.0], [exit_x, h]])
        polygon = np.array([[-f * far, 0.0], [corner, 0.0], [exit_x, h], [f * far, h]] + above)
        shift = (f * scale * (0.006 + 0.018 * q[2]), -tp * (0.2 + 0.5 * q[3]))
        return _Fragment(line, width, depth, polygon, shift)
    if kind == "SH3":
        corner = f * R * (-0.2 + 0.5 * q[0])
        articular_x = corner + f * 0.15 * R * (q[1] - 0.5)
        articular = (articular_x, bone.surface(articular_x) - 0.3 * tp)
        line = np.array([[f * 1.05 * R, 0.0], [corner, 0.0], articular])
        polygon = np.array([[f * far, 0.0], [corner, 0.0], articular, [articular[0], -far], [f * far, -far]])
        shift = (f * scale * (0.006 + 0.014 * q[2]), -tp * (0.2 + 0.5 * q[3]))
        return _Fragment(line, width, depth, polygon, shift)
    if kind == "SH4":
        x1 = f * R * (-0.25 + 0.45 * q[0])
        h = R * (0.3 + 0.4 * q[1])
        exit_x = f * 1.05 * float(bone.radius_at(np.float32(h)))
        articular = bone.surface(x1) - 0.3 * tp
        line = np.array([[x1, articular], [x1 + f * 0.15 * R, 0.0], [exit_x, h]])
        polygon = np.array([[x1, -far], [x1, articular], [x1 + f * 0.15 * R, 0.0], [exit_x, h], [f * far, h],
                            [f * far, -far]])
        shift = (f * scale * (0.004 + 0.01 * q[2]), -scale * (0.006 + 0.014 * q[3]))
        return _Fragment(line, width, depth, polygon, shift)
    if kind == "M3":
        v = tp / 2 + R * (0.45 + 0.9 * q[0])
        lean = R * 0.35 * (2 * q[1] - 1)
        r = 1.1 * float(bone.radius_at(np.float32(v)))
        line = np.array([[-r, v + lean], [r, v - lean]])
        polygon = np.array([[-far, v + lean], [-r, v + lean], [r, v - lean], [far, v - lean], [far, -far],
                            [-far, -far]])
        shift = (f * scale * (0.008 + 0.022 * q[2]), scale * (-0.004 + 0.012 * q[3]))
        return _Fragment(line, width, depth, polygon, shift)
    if kind in ("M2", "D2"):
        if kind == "M2":
            v = tp / 2 + R * (0.5 + 0.9 * q[0])
            bulge_sides = (f,) if q[1] >= 0.4 else (1, -1)
        else:
            v = R * (1.6 + 1.2 * q[0])
            bulge_sides = (-f,)  # greenstick: break on one side, bend on the other
        r = float(bone.radius_at(np.float32(v)))
        inner = f * r * (1.05 - 0.5 - 0.4 * q[4])  # the break crosses half the bone or more
        line = np.array([[f * 1.05 * r, v], [inner, v + R * 0.2 * (q[5] - 0.5)]])
        amplitude = scale * (0.012 + 0.012 * q[2])
        bulge_width = scale * (0.02 + 0.02 * q[3])
        extra = np.array([[s * (r + amplitude), v + dv] for s in bulge_sides for dv in (-bulge_width, bulge_width)])
        return _Fragment(line, width, 0.8 * depth, None, (0.0, 0.0), (v, amplitude, bulge_width, bulge_sides), extra)
    if kind == "E7":
        kx, kv, ka, kb = bone.knobs[0]
        base = kv + 0.35 * kb
        lean = ka * 0.6 * (q[0] - 0.5)
        line = np.array([[kx - 1.6 * ka, base + lean], [kx + 1.6 * ka, base - lean]])
        polygon = np.array([[kx - 1.6 * ka, base + lean], [kx + 1.6 * ka, base - lean], [kx + 1.6 * ka, kv - 4 * kb],
                            [kx - 1.6 * ka, kv - 4 * kb]])
        shift = (bone.outer * scale * (0.006 + 0.01 * q[1]), -scale * (0.008 + 0.01 * q[2]))
        return _Fragment(line, 0.85 * width, depth, polygon, shift)
    raise ValueError(f"unknown fracture kind {kind!r}")


def _reach(fragment: _Fragment) -> float:
    """Largest local v (towards the elbow) that ``fragment`` changes; at least the physis, so that
    the window it bounds holds the whole epiphysis."""
    points = [fragment.line[:, 1] + abs(fragment.shift[1])]
    if fragment.extra_points is not None:
        points.append(fragment.extra_points[:, 1])
    extent = 5 * fragment.width + (3 * fragment.bulge[2] if fragment.bulge else 0.0) + 2
    return max(float(np.concatenate(points).max()) + extent, 0.0)


def _fractured_thickness(bone, x, y, fragment: _Fragment) -> np.ndarray:
    """Bone thickness with ``fragment`` applied: displaced fragment, gap, bulge."""
    t = bone.thickness(x, y, fragment.bulge)
    if fragment.polygon is not None:
        dx, dy = fragment.shift
        original = _inside(x, y, fragment.polygon)
        moved = _inside(x - dx, y - dy, fragment.polygon)
        t = np.where(original, 0.0, t) + np.where(moved, bone.thickness(x - dx, y - dy), 0.0)
    if fragment.depth > 0:
        distance = _line_distance(x, y, fragment.line, 3.0 * fragment.width)
        gap = np.clip((fragment.width / 2 - distance) + 0.5, 0.0, 1.0)
        # compressed trabeculae make the fracture margins denser than the bone around them
        margin = np.exp(-(((distance - fragment.width) / (0.6 * fragment.width)) ** 2))
        t = t * (1.0 - fragment.depth * gap) * (1.0 + 0.35 * fragment.depth * margin)
    return t


def _callus(bone, x, y, fragment: _Fragment) -> np.ndarray:
    """A healed fracture: a faint dense band where the line was (no gap, no displacement)."""
    band = np.exp(-((_line_distance(x, y, fragment.line, 6.0 * fragment.width) / (1.5 * fragment.width)) ** 2))
    return bone.thickness(x, y) * (1.0 + 0.25 * band)


# --------------------------------------------------------------------------------------------
# Rendering one film


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


class _Film:
    """Pixel grid of one film with the canonical (unrotated forearm) coordinates of every pixel."""

    def __init__(self, width: int, height: int, angle: float, origin: tuple[float, float]):
        self.width, self.height = width, height
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.ox, self.oy = origin
        xs = np.arange(width, dtype=np.float32) - np.float32(self.ox)
        ys = np.arange(height, dtype=np.float32)[:, None] - np.float32(self.oy)
        self.u = np.float32(self.cos) * xs + np.float32(self.sin) * ys
        self.v = np.float32(-self.sin) * xs + np.float32(self.cos) * ys
        self.soft = np.zeros((height, width), dtype=np.float32)
        self.bone = np.zeros((height, width), dtype=np.float32)
        self.dense = np.zeros((height, width), dtype=np.float32)  # cast and metal
        corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], dtype=float) - origin
        corner_v = -self.sin * corners[:, 0] + self.cos * corners[:, 1]
        self.v_range = (float(corner_v.min()), float(corner_v.max()))

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Canonical (u, v) points → image (x, y)."""
        u, v = points[:, 0], points[:, 1]
        return np.stack([self.ox + self.cos * u - self.sin * v, self.oy + self.sin * u + self.cos * v], axis=1)

    def crop(self, bounds: tuple[float, float, float, float]) -> tuple[slice, slice] | None:
        """Image slices covering the canonical rectangle ``bounds`` (u0, u1, v0, v1); None if off-film."""
        u0, u1, v0, v1 = bounds
        far = 2.0 * (self.width + self.height)
        corners = np.array([[u0, v0], [u1, v0], [u0, v1], [u1, v1]], dtype=float).clip(-far, far)
        xy = self.to_image(corners)
        x0, y0 = np.floor(xy.min(axis=0)).astype(int)
        x1, y1 = np.ceil(xy.max(axis=0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def add_part(self, bone, bounds: tuple[float, float, float, float], thickness) -> None:
        """Add ``thickness`` (a function of ``bone``'s local coordinates) over the canonical rectangle
        ``bounds``. Tall rectangles are cut into slabs: on a tilted film one window around a whole
        shaft would be mostly empty."""
        u0, u1, v0, v1 = bounds
        v0, v1 = max(v0, self.v_range[0] - 1.0), min(v1, self.v_range[1] + 1.0)
        step = max(u1 - u0, 16.0)
        slabs = max(1, math.ceil((v1 - v0) / step - 0.5))
        edges = np.linspace(v0, v1, slabs + 1)
        for start, stop in zip(edges[:-1], edges[1:]):
            window = self.crop((u0, u1, start, stop))
            if window is None:
                continue
            u, v = self.u[window], self.v[window]
            t = thickness(*bone.local(u, v))
            self.bone[window] += t if slabs == 1 else t * ((v >= start) & (v < stop))

    def add_bone(self, bone, fragment: _Fragment | None = None, callus: _Fragment | None = None) -> None:
        """Add ``bone``'s thickness: intact, broken (``fragment``) or healed (``callus``)."""
        changed = fragment if fragment is not None else callus
        if changed is None:
            for bounds, thickness in bone.parts():
                self.add_part(bone, bounds, thickness)
            return

        def broken(x, y):
            return _callus(bone, x, y, callus) if callus is not None else _fractured_thickness(bone, x, y, fragment)

        if isinstance(bone, _LongBone):  # only the distal end changes: the shaft stays on cheap windows
            reach = _reach(changed)
            for bounds, thickness in bone.parts(start=reach):
                self.add_part(bone, bounds, thickness)
            u0, u1, v0, _ = bone.bounds()
            self.add_part(bone, (u0, u1, v0, bone.yp + reach + bone._extent()[1] + 2),
                          lambda x, y: broken(x, y) * (y <= reach))
        else:
            self.add_part(bone, bone.bounds(), broken)

    def box(self, cls: str, image_points: np.ndarray, pad: float) -> Box | None:
        """Pixel box around ``image_points`` (k×2, image coordinates) grown by ``pad``, clipped to the film."""
        return _pixel_box(cls, image_points, pad, self.width, self.height)


def _pixel_box(cls: str, points: np.ndarray, pad: float, width: int, height: int) -> Box | None:
    """Box of whole pixels around ``points`` (k×2 image x, y) grown by ``pad``, clipped to the image;
    None when less than 3×3 pixels remain."""
    x0 = max(math.floor(points[:, 0].min() - pad), 0)
    y0 = max(math.floor(points[:, 1].min() - pad), 0)
    x1 = min(math.ceil(points[:, 0].max() + pad), width - 1)
    y1 = min(math.ceil(points[:, 1].max() + pad), height - 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return Box(cls, float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1))


def _mask_box(cls: str, mask: np.ndarray, top: int, left: int, pad: float, width: int, height: int) -> Box | None:
    """Box around the set pixels of ``mask``, whose corner lies at (``top``, ``left``) of the image."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    corners = np.array([[left + cols[0], top + rows[0]], [left + cols[-1], top + rows[-1]]], dtype=float)
    return _pixel_box(cls, corners, pad, width, height)


def _film_size(rng: np.random.Generator, size_scale: float) -> tuple[int, int]:
    """Portrait size like the release's (about 450–1140 wide, 610–1330 tall), times ``size_scale``."""
    width = float(rng.uniform(450, 1140))
    height = float(np.clip(width * rng.uniform(1.05, 1.85), max(610.0, width * 1.04), 1330.0))
    return max(48, round(width * size_scale)), max(64, round(height * size_scale))


def _forearm(spec: PhantomImage, anatomy: np.random.Generator, rng: np.random.Generator, width: int, height: int):
    """Sample the anatomy of one film: scale, soft tissue and every bone (canonical coordinates)."""
    scale = width * float(rng.uniform(0.85, 1.1))  # pixels per "forearm unit"
    view = {1: 0.0, 2: 1.0, 3: 0.5}[spec.projection]  # 0 = AP, 1 = lateral, between = oblique
    out = 1 if spec.laterality == "R" else -1  # the radial side of the film
    age = spec.age
    grown = float(np.clip(0.55 + 0.04 * age, 0.62, 1.0))
    # patient-level proportions (same for every film of the patient)
    rad_w, uln_w = anatomy.uniform(0.92, 1.08, size=2)
    tp_factor = anatomy.uniform(0.85, 1.2) * (1.25 - 0.03 * (age - 2.0))
    uc = scale * float(rng.uniform(-0.05, 0.05))
    yp = height * (float(rng.uniform(0.42, 0.52)) - 0.5)
    tp = max(2.0, scale * 0.015 * tp_factor)
    rm = scale * 0.125 * rad_w * (0.93 if view else 1.0) * (0.85 + 0.15 * grown)
    radius = _LongBone(
        uc=uc + out * scale * (0.16 * (1 - view) + 0.03 * view), yp=yp,
        slope=-out * float(rng.uniform(0.12, 0.22)) * (1 - view) + float(rng.uniform(-0.08, 0.08)) * view,
        bow=scale * float(rng.uniform(-0.012, 0.012)),
        rm=rm, rs=scale * 0.072 * rad_w, flare=scale * 0.28, tp=tp,
        ea=rm * float(rng.uniform(0.95, 1.02)) * (0.7 + 0.3 * grown), eb=scale * 0.052 * grown,
        ek=0.9 - 0.7 * (grown - 0.62) / 0.38, eu=out * rm * 0.05,
        knobs=((out * rm * 0.55 * (1 - view), -tp / 2 - scale * (0.07 - 0.02 * view) * grown, rm * 0.35,
                scale * (0.045 - 0.015 * view) * grown),),
        outer=out,
    )
    urm = scale * 0.085 * uln_w * (0.85 + 0.15 * grown)
    ulna_yp = yp + scale * float(rng.uniform(0.035, 0.06))
    ulna = _LongBone(
        uc=uc - out * scale * (0.15 * (1 - view) + 0.03 * view), yp=ulna_yp,
        slope=float(rng.uniform(-0.06, 0.06)), bow=scale * float(rng.uniform(-0.006, 0.006)),
        rm=urm, rs=scale * 0.058 * uln_w, flare=scale * 0.2, tp=tp * 0.9,
        ea=urm * 0.8 * (0.6 + 0.4 * grown), eb=scale * 0.032 * grown, ek=0.9 - 0.6 * (grown - 0.62) / 0.38,
        eu=0.0,
        knobs=((-out * urm * 0.4 * (1 - 0.5 * view), -tp / 2 - scale * 0.055 * grown, scale * 0.022 * grown,
                scale * 0.04 * grown),),
        outer=-out,
    )
    # carpals: name, u across (towards the radius), v from the wrist, half-axes a, b, angle, ossification age
    wrist = yp - scale * 0.05
    carpal_table = (
        ("scaphoid", 0.17, -0.14, 0.055, 0.085, 0.5, 4.5),
        ("lunate", 0.03, -0.13, 0.06, 0.055, 0.0, 3.5),
        ("triquetrum", -0.10, -0.11, 0.05, 0.05, 0.2, 2.5),
        ("pisiform", -0.14, -0.07, 0.03, 0.035, 0.0, 9.5),
        ("trapezium", 0.20, -0.29, 0.05, 0.055, 0.3, 5.0),
        ("trapezoid", 0.11, -0.30, 0.04, 0.05, 0.0, 5.5),
        ("capitate", 0.01, -0.28, 0.06, 0.09, 0.0, 0.2),
        ("hamate", -0.11, -0.26, 0.055, 0.08, -0.2, 0.3),
    )
    carpals = {}
    for name, cu, cv, ca, cb, angle, onset in carpal_table:
        if age < onset:
            continue
        size = float(np.clip(0.4 + (age - onset) / 7.0, 0.4, 1.0))
        carpals[name] = _OvalBone(
            cu=uc + out * scale * cu * (1 - 0.7 * view) + scale * float(rng.uniform(-0.01, 0.01)),
            cv=wrist + scale * cv * (0.9 + 0.1 * grown) + scale * float(rng.uniform(-0.01, 0.01)),
            a=scale * ca * size, b=scale * cb * size, angle=out * angle * (1 - view))
    metacarpals = []
    base_v = wrist - scale * 0.40 * (0.9 + 0.1 * grown)
    for k, spread in enumerate((0.19, 0.09, 0.0, -0.09)):
        metacarpals.append(_Capsule(
            bu=uc + out * scale * spread * (1 - 0.8 * view), bv=base_v + scale * 0.02 * k * (k % 2),
            r=scale * 0.042 * (0.8 + 0.2 * grown), length=scale * 0.55 * (0.8 + 0.2 * grown),
            angle=out * spread * 0.8 * (1 - 0.7 * view)))
    thumb = _Capsule(bu=uc + out * scale * (0.27 - 0.15 * view), bv=wrist - scale * 0.3, r=scale * 0.045 * grown,
                     length=scale * 0.4, angle=out * (0.75 - 0.3 * view))
    soft = dict(uc=uc, forearm=scale * (0.34 - 0.05 * view), hand=scale * (0.44 - 0.12 * view), wrist=yp)
    return scale, radius, ulna, carpals, metacarpals + [thumb], soft


def _soft_tissue(film: _Film, soft: dict, scale: float) -> None:
    """Forearm and hand as one cylinder whose radius widens from the wrist towards the fingers.
    Smooth enough to draw on every other pixel and interpolate (a quarter of the work)."""
    u, v = film.u[::2, ::2], film.v[::2, ::2]
    blend = _smoothstep((soft["wrist"] - v) / (0.35 * scale))
    half = soft["forearm"] + (soft["hand"] - soft["forearm"]) * blend
    coarse = (half * _chord(((u - soft["uc"]) / half) ** 2)).astype(np.float32)
    film.soft += np.asarray(Image.fromarray(coarse).resize((film.width, film.height), Image.BILINEAR))


def _cast(film: _Film, soft: dict, scale: float, rng: np.random.Generator) -> None:
    """A forearm cast: a hollow cylinder (bright walls) with a faint fibreglass mesh."""
    outer = soft["forearm"] + scale * float(rng.uniform(0.05, 0.09))
    wall = scale * float(rng.uniform(0.02, 0.035))
    start = soft["wrist"] - scale * float(rng.uniform(0.2, 0.45))
    window = film.crop((soft["uc"] - outer - 2, soft["uc"] + outer + 2, start - 4, _FAR))
    if window is None:
        return
    u, v = film.u[window], film.v[window]
    d = np.abs(u - soft["uc"])
    shell = _tube(d, np.full_like(d, outer), np.full_like(d, outer - wall), marrow=0.0)
    period = scale * 0.03
    mesh = 1.0 + 0.08 * np.sin(u * (2 * np.pi / period)) * np.sin(v * (2 * np.pi / period))
    film.dense[window] += 0.35 * shell * mesh * np.clip((v - start) / 3.0, 0.0, 1.0)


def _metal(film: _Film, scale: float, rng: np.random.Generator) -> Box | None:
    """A wire, clip or ring centred well inside the film (so it always has a box); returns its box."""
    kind = int(rng.integers(3))
    angle = float(rng.uniform(-1.2, 1.2))
    x, y = film.width * float(rng.uniform(0.25, 0.75)), film.height * float(rng.uniform(0.25, 0.75))
    cu, cv = film.cos * (x - film.ox) + film.sin * (y - film.oy), -film.sin * (x - film.ox) + film.cos * (y - film.oy)
    if kind == 0:  # Kirschner wire
        half, r = scale * float(rng.uniform(0.15, 0.25)), scale * float(rng.uniform(0.005, 0.009))
    elif kind == 1:  # clip / snap
        half, r = scale * float(rng.uniform(0.02, 0.04)), scale * float(rng.uniform(0.012, 0.02))
    else:  # ring
        half, r = 0.0, scale * float(rng.uniform(0.03, 0.05))
    reach = half + r + 2
    window = film.crop((cu - reach, cu + reach, cv - reach, cv + reach))
    if window is None:
        return None
    du, dv = film.u[window] - cu, film.v[window] - cv
    c, s = math.cos(angle), math.sin(angle)
    along, across = c * du + s * dv, -s * du + c * dv
    if kind == 2:
        d = np.abs(np.hypot(along, across) - r * 0.8)
        mask = np.clip(r * 0.2 - d + 0.5, 0.0, 1.0)
    else:
        d = np.hypot(np.maximum(np.abs(along) - half, 0.0), across)
        mask = np.clip(r - d + 0.5, 0.0, 1.0)
    film.dense[window] += 6.0 * mask
    return _mask_box("metal", mask > 0.5, window[0].start, window[1].start, 1, film.width, film.height)


def _texts(canvas: np.ndarray, spec: PhantomImage, rng: np.random.Generator) -> list[Box]:
    """Burn in the side marker (and sometimes a short note); return their text boxes."""
    height, width = canvas.shape
    labels = [spec.laterality] + ([str(rng.choice(SECOND_TEXTS))] if rng.random() < 0.2 else [])
    corners = rng.permutation(4)
    boxes = []
    for label, corner in zip(labels, corners):
        size = max(8, round(height * float(rng.uniform(0.03, 0.055))))
        font = _font(size)
        *_, right, bottom = font.getbbox(label)
        tile = Image.new("L", (right + 4, bottom + 4))
        ImageDraw.Draw(tile).text((2, 2), label, fill=255, font=font)
        tile = tile.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, expand=True)
        mask = np.asarray(tile, dtype=np.float32) / 255.0
        margin_x, margin_y = int(width * rng.uniform(0.02, 0.08)), int(height * rng.uniform(0.02, 0.06))
        left = margin_x if corner % 2 == 0 else width - margin_x - mask.shape[1]
        top = margin_y if corner < 2 else height - margin_y - mask.shape[0]
        left, top = max(0, min(left, width - mask.shape[1])), max(0, min(top, height - mask.shape[0]))
        mask = mask[: height - top, : width - left]
        window = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
        canvas[window] = np.maximum(canvas[window], mask * float(rng.uniform(0.9, 1.0)))
        box = _mask_box("text", mask > 0.3, top, left, 1, width, height)
        if box is not None:
            boxes.append(box)
    return boxes


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean noise with features about ``cell`` pixels wide (bilinear upsampling of a coarse grid)."""
    h, w = shape
    coarse = rng.standard_normal((max(2, round(h / cell)), max(2, round(w / cell)))).astype(np.float32)
    return np.array(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


@dataclass(frozen=True)
class FractureTruth:
    """What the phantom drew for one visible fracture: how conspicuous it is, in the bone's own size.

    ``displacement_pct``: the fragment's shift, ``gap_pct``: the fracture gap's width, both in percent
    of the bone's width at its metaphysis; ``healing``: 0 (fresh) to 1 (six weeks on).
    """

    filestem: str
    kind: str
    bone: str
    displacement_pct: float
    gap_pct: float
    healing: float


#: The phantom's ground truth, one row per visible fracture, next to dataset.csv (not part of the release).
TRUTH_FILE = "phantom_truth.csv"


def render(spec: PhantomImage, size_scale: float = 1.0, show_fracture: bool | None = None
           ) -> tuple[np.ndarray, list[Box]]:
    """Draw one film: a uint16 array (full 0–65535 range) and its boxes in pixels.

    ``show_fracture`` overrides ``spec.fracture_visible`` (the tests compare both renderings of
    a film: they differ only near its fracture boxes). Random draws do not depend on it.
    """
    pixels, boxes, _ = _render(spec, size_scale, show_fracture)
    return pixels, boxes


def _render(spec: PhantomImage, size_scale: float = 1.0, show_fracture: bool | None = None
            ) -> tuple[np.ndarray, list[Box], list[FractureTruth]]:
    """:func:`render`, plus the ground truth of every fracture drawn."""
    rng = np.random.default_rng(spec.image_seed)
    anatomy = np.random.default_rng(spec.anatomy_seed)
    width, height = _film_size(rng, size_scale)
    angle = math.radians(float(rng.uniform(-15, 15)))
    origin = (width * (0.5 + float(rng.uniform(-0.04, 0.04))), height * (0.5 + float(rng.uniform(-0.03, 0.03))))
    film = _Film(width, height, angle, origin)
    scale, radius, ulna, carpals, metacarpals, soft = _forearm(spec, anatomy, rng, width, height)
    bones = {"radius": radius, "ulna": ulna, "scaphoid": carpals.get("scaphoid")}

    visible = spec.fracture_visible if show_fracture is None else show_fracture
    callus_site = bool(rng.random() < 0.5)
    fragments: dict[int, _Fragment] = {}
    for index, fracture in enumerate(spec.fractures):
        bone = bones[fracture.bone]
        if bone is not None:
            fragments[index] = _fragment(fracture, bone, scale, spec.healing)
    by_bone = {spec.fractures[i].bone: fragment for i, fragment in fragments.items()}

    _soft_tissue(film, soft, scale)
    for name, bone in (("radius", radius), ("ulna", ulna)):
        fragment = by_bone.get(name)
        if visible:
            film.add_bone(bone, fragment)
        else:
            film.add_bone(bone, callus=fragment if callus_site else None)
    for name, carpal in carpals.items():
        film.add_bone(carpal, by_bone.get(name) if visible else None)
    for metacarpal in metacarpals:
        film.add_bone(metacarpal)

    boxes: list[Box] = []
    truth: list[FractureTruth] = []
    if visible:
        for index, fragment in fragments.items():
            bone = bones[spec.fractures[index].bone]
            bone_width = 2 * bone.rm if isinstance(bone, _LongBone) else 2 * bone.a  # metaphysis, or a carpal's
            truth.append(FractureTruth(spec.stem, spec.fractures[index].kind, spec.fractures[index].bone,
                                       round(100 * float(np.hypot(*fragment.shift)) / bone_width, 2),
                                       round(100 * fragment.width / bone_width, 2), round(spec.healing, 3)))
            points = [fragment.line, fragment.line + np.array(fragment.shift)]
            if fragment.extra_points is not None:
                points.append(fragment.extra_points)
            image_points = film.to_image(bone.canonical(np.concatenate(points)))
            box = film.box("fracture", image_points, pad=fragment.width / 2 + 0.012 * scale)
            if box is not None:
                boxes.append(box)
    if spec.cast:
        _cast(film, soft, scale, rng)
    if spec.metal:
        box = _metal(film, scale, rng)
        if box is not None:
            boxes.append(box)

    # log-domain attenuation with a soft shoulder, computed in place: this runs on every pixel
    texture = _smooth_noise(rng, (height, width), max(3.0, scale * 0.012))
    texture *= 0.07
    texture += 1.0
    image = film.bone
    image *= texture
    image *= (2.4 if spec.osteopenia else 3.0) / scale
    image += film.soft * (0.3 / scale)
    if spec.cast or spec.metal:
        image += film.dense * (5.0 / scale)
    shoulder = image * 0.85
    shoulder += 1.0
    image /= shoulder
    image *= 1.3
    exposure = _smooth_noise(rng, (height, width), max(8.0, width / 6.0))  # uneven exposure
    exposure *= 0.04
    image += exposure
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= float(rng.uniform(0.002, 0.004))
    image += noise
    if rng.random() < 0.35:  # collimation: bright margins outside the exposed field
        left, right = (int(width * m) for m in rng.uniform(0, 0.07, size=2))
        top, bottom = (int(height * m) for m in rng.uniform(0, 0.05, size=2))
        shielded = np.ones(image.shape, dtype=bool)
        shielded[top:height - bottom, left:width - right] = False
        image[shielded] = 0.82 + 0.1 * image[shielded]
    low, high = np.percentile(image[::4, ::4], (0.5, 99.7))
    image -= low
    image *= 1.0 / max(float(high - low), 1e-6)
    np.clip(image, 0.0, 1.0, out=image)
    boxes += _texts(image, spec, rng)
    # a 12-bit detector reading stretched to the 16-bit range (also keeps the PNGs smaller)
    image *= 4095.0
    np.rint(image, out=image)
    return _TWELVE_TO_SIXTEEN_BITS[image.astype(np.uint16)], boxes, truth


# --------------------------------------------------------------------------------------------
# Writing the release layout


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``pixels`` (uint16). Every row uses the "Up" filter: on noisy films
    as small as Pillow's adaptive filtering, at a fraction of its encoding time."""
    height, width = pixels.shape
    data = pixels.astype(">u2").view(np.uint8).reshape(height, 2 * width)
    rows = np.empty((height, 2 * width + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type "Up": each byte minus the byte above it, modulo 256
    rows[0, 1:] = data[0]
    np.subtract(data[1:], data[:-1], out=rows[1:, 1:])

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16 bit, greyscale, no interlace
    # noisy films barely repeat: Huffman coding of runs is as small as full deflate, and 2.5× faster
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    body = deflate.compress(rows.tobytes()) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def yolo_text(boxes: list[Box], width: int, height: int) -> str:
    """YOLO label text (``class xc yc w h`` normalised), no trailing newline, as in the release."""
    return "\n".join(
        f"{YOLO_CLASSES.index(b.cls)} {(b.x + b.w / 2) / width:.6f} {(b.y + b.h / 2) / height:.6f} "
        f"{b.w / width:.6f} {b.h / height:.6f}" for b in boxes)


def voc_xml(stem: str, folder: str, boxes: list[Box], width: int, height: int) -> str:
    """Pascal VOC annotation; corners are 1-based and inclusive."""
    objects = "".join(
        f"\t<object>\n\t\t<name>{escape(b.cls)}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{round(b.x) + 1}</xmin>\n\t\t\t<ymin>{round(b.y) + 1}</ymin>\n"
        f"\t\t\t<xmax>{round(b.x + b.w)}</xmax>\n\t\t\t<ymax>{round(b.y + b.h)}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for b in boxes)
    return (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{stem}.png</filename>\n"
            f"\t<source>\n\t\t<database>GRAZPEDWRI-DX phantom</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>1</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{objects}</annotation>\n")


def write_csv(path: Path, images: list[PhantomImage]) -> None:
    """``dataset.csv`` as released: UTF-8 with BOM, CRLF, flags ``1`` or empty."""
    with open(path, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(image.csv_row() for image in images)


def _write_film(root: Path, folder: str, spec: PhantomImage, size_scale: float
                ) -> tuple[list[str], list[FractureTruth]]:
    """Render one film and write its PNG, YOLO label and VOC XML; return its box classes and truth."""
    pixels, boxes, truth = _render(spec, size_scale)
    height, width = pixels.shape
    (root / folder / f"{spec.stem}.png").write_bytes(png16(pixels))
    (root / LABEL_DIR / f"{spec.stem}.txt").write_text(yolo_text(boxes, width, height), encoding="ascii")
    (root / VOC_DIR / f"{spec.stem}.xml").write_text(voc_xml(spec.stem, folder, boxes, width, height),
                                                      encoding="utf-8")
    return [box.cls for box in boxes], truth


def claim_folder(root: Path) -> None:
    """Make ``root`` the phantom's folder (see :func:`check_folder`) and mark it.

    A marked folder is cleared of the phantom's earlier files, so a smaller phantom leaves no stale films.
    """
    check_folder(root)
    for name in (*IMAGE_FOLDERS, "folder_structure", "dataset.csv", TRUTH_FILE):
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by physis.phantom; the phantom may overwrite this folder\n")


def generate(root: str | Path, n_patients: int = 200, seed: int = 0, physeal_rate: float = 0.3,
             size_scale: float = 1.0, workers: int = 1) -> dict:
    """Write the phantom into ``root`` (see :func:`claim_folder`); return a small summary dict (counts).

    ``workers`` > 1 renders films in that many processes; the files are the same either way.
    """
    root = Path(root)
    images = plan(n_patients, seed, physeal_rate)
    claim_folder(root)
    for folder in (*IMAGE_FOLDERS, LABEL_DIR, VOC_DIR):
        (root / folder).mkdir(parents=True, exist_ok=True)
    # the release splits its images over four zips in file-name order
    folders = [IMAGE_FOLDERS[index * len(IMAGE_FOLDERS) // len(images)] for index in range(len(images))]
    jobs = ([root] * len(images), folders, images, [size_scale] * len(images))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            written = list(pool.map(_write_film, *jobs, chunksize=8))
    else:
        written = list(map(_write_film, *jobs))
    classes = [film_classes for film_classes, _ in written]
    truth = pd.DataFrame([asdict(row) for _, rows in written for row in rows],
                         columns=[f.name for f in fields(FractureTruth)])
    truth.to_csv(root / TRUTH_FILE, index=False)
    write_csv(root / "dataset.csv", images)  # last: the workflow's phantom rule tracks it as "done"
    physeal = {image.patient_id for image in images if any(f.kind.startswith("SH") for f in image.fractures)}
    return {
        "patients": n_patients,
        "images": len(images),
        "studies": len({(image.patient_id, image.study_number) for image in images}),
        "physeal_patients": len(physeal),
        "fracture_visible": sum(image.fracture_visible for image in images),
        "boxes": dict(sorted(Counter(cls for film in classes for cls in film).items())),
    }


def attach_truth(manifest: pd.DataFrame, root: str | Path) -> pd.DataFrame:
    """The manifest with :data:`CONSPICUITY` (the displacement of each film's most displaced visible
    physeal fracture) when ``root`` is a phantom with its truth file; unchanged for real data."""
    path = Path(root) / TRUTH_FILE
    if not path.is_file():
        return manifest
    truth = pd.read_csv(path, dtype={"filestem": str})
    physeal = truth[truth["kind"].str.startswith("SH")]
    displacement = physeal.groupby("filestem")["displacement_pct"].max().rename(CONSPICUITY)
    return manifest.join(displacement, on="image_id")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m physis.phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder (created if missing)")
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--physeal-rate", type=float, default=0.3)
    parser.add_argument("--size-scale", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering films (output is identical)")
    args = parser.parse_args(argv)
    summary = generate(args.root, args.patients, args.seed, args.physeal_rate, args.size_scale, args.workers)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
