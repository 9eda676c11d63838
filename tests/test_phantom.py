"""The phantom must look like GRAZPEDWRI-DX to every parser, and its fractures must really be drawn."""

from __future__ import annotations

import csv
import io
import re
import struct
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from physis import phantom
from physis.records import YOLO_CLASSES

N_PATIENTS, SEED, SCALE = 40, 3, 0.3
STEM = re.compile(r"^(\d{4})_(\d{10})_(\d{2})_WRI-([LR])([123])_([MFO])(\d{3})$")
FOREARM = re.compile(r"^(2[123])([ru]?)[-/]?([EMD])/?(\d)(?:\.(\d)?)?$")  # the doc's parser regex
#: dataset.csv's columns in the release's order (docs/grazpedwri-dx.md)
COLUMNS = ("filestem", "patient_id", "study_number", "timehash", "gender", "age", "laterality", "projection",
           "initial_exam", "ao_classification", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible",
           "metal", "pixel_spacing", "device_manufacturer")
FLAGS = ("initial_exam", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    phantom.generate(out, n_patients=N_PATIENTS, seed=SEED, size_scale=SCALE)
    return out


@pytest.fixture(scope="module")
def rows(root) -> list[dict]:
    with open(root / "dataset.csv", encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    head = path.read_bytes()[:26]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, colour


def image_paths(root: Path) -> dict[str, Path]:
    return {path.stem: path for path in root.glob("images_part*/*.png")}


def yolo_boxes(root: Path, stem: str) -> list[tuple[int, float, float, float, float]]:
    text = (root / "folder_structure/yolov5/labels" / f"{stem}.txt").read_text()
    return [(int(cls), *map(float, rest)) for cls, *rest in (line.split() for line in text.split("\n"))]


def codes(cell: str) -> list[str]:
    return [code.strip() for code in re.split(r"[;,]\s*", cell) if code.strip()]


def salter_harris(cell: str) -> set[int]:
    found = set()
    for code in codes(cell):
        match = FOREARM.match(code)
        if match and match[3] == "E" and match[4] in "1234":
            found.add(int(match[4]))
    return found


def test_layout_and_csv_format(root, rows):
    raw = (root / "dataset.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n") == len(rows) + 1
    header = raw[3:].split(b"\r\n")[0].decode().split(",")
    assert tuple(header) == COLUMNS

    images = image_paths(root)
    assert all(any((root / f"images_part{k}").glob("*.png")) for k in range(1, 5))
    assert sorted(images) == sorted(row["filestem"] for row in rows)
    for row in rows:
        assert len(row) == 17 and None not in row
        for flag in FLAGS:
            assert row[flag] in ("1", ""), (row["filestem"], flag, row[flag])
        match = STEM.match(row["filestem"])
        assert match, row["filestem"]
        patient, timehash, study, side, projection, sex, age = match.groups()
        assert int(patient) == int(row["patient_id"]) and int(timehash) == int(row["timehash"])
        assert int(study) == int(row["study_number"]) and side == row["laterality"]
        assert projection == row["projection"] and sex == row["gender"]
        assert re.fullmatch(r"\d+(\.\d)?", row["age"]) and not row["age"].endswith(".0")
        assert int(age) == int(float(row["age"])) and 2 <= float(row["age"]) < 19
        assert (row["pixel_spacing"], row["device_manufacturer"]) in (("0.144", "Siemens"), ("0.143", "Agfa"))
        assert row["initial_exam"] == ("1" if row["study_number"] == "1" else "")
        assert (root / "folder_structure/yolov5/labels" / f"{row['filestem']}.txt").is_file()
        assert (root / "folder_structure/pascalvoc" / f"{row['filestem']}.xml").is_file()
    assert {row["projection"] for row in rows} >= {"1", "2"}
    # integral ages are written without a decimal, as in the raw release
    assert any("." not in row["age"] for row in rows) and any("." in row["age"] for row in rows)
    # the CSV is exactly what plan() says
    planned = phantom.plan(N_PATIENTS, SEED)
    assert [row["filestem"] for row in rows] == [image.stem for image in planned]


def test_png_is_16_bit_grey_portrait_and_sizes_vary(root):
    images = image_paths(root)
    sizes = set()
    for path in images.values():
        width, height, depth, colour = png_header(path)
        assert (depth, colour) == (16, 0), path.name  # 16-bit greyscale, no alpha
        assert height > width
        sizes.add((width, height))
    assert len(sizes) > len(images) // 2
    for path in list(images.values())[:8]:
        with Image.open(path) as image:
            assert image.mode == "I;16"
            pixels = np.asarray(image)
        assert pixels.min() == 0 and pixels.max() == 65535  # the full range is used
        assert len(np.unique(pixels)) > 1000


def test_png16_round_trips_through_pillow():
    pixels = np.random.default_rng(0).integers(0, 65536, size=(7, 5), dtype=np.uint16)
    with Image.open(io.BytesIO(phantom.png16(pixels))) as image:
        assert image.mode == "I;16" and np.array_equal(np.asarray(image), pixels)


def test_yolo_labels(root, rows):
    fracture, metal, text = (YOLO_CLASSES.index(name) for name in ("fracture", "metal", "text"))
    for row in rows:
        stem = row["filestem"]
        raw = (root / "folder_structure/yolov5/labels" / f"{stem}.txt").read_bytes()
        assert raw and not raw.endswith(b"\n"), stem
        boxes = yolo_boxes(root, stem)
        for cls, xc, yc, w, h in boxes:
            assert 0 <= cls < len(YOLO_CLASSES)
            assert 0 < w <= 1 and 0 < h <= 1
            assert -1e-6 <= xc - w / 2 and xc + w / 2 <= 1 + 1e-6 and -1e-6 <= yc - h / 2 and yc + h / 2 <= 1 + 1e-6
        classes = Counter(box[0] for box in boxes)
        assert classes[text] >= 1, stem
        assert (classes[fracture] > 0) == (row["fracture_visible"] == "1"), stem
        assert (classes[metal] > 0) == (row["metal"] == "1"), stem
        if row["fracture_visible"]:
            # one box per drawn fracture: the codes list at least as many bones as there are boxes
            assert classes[fracture] <= 2 * max(1, len(codes(row["ao_classification"])))


def test_voc_xml_matches_yolo(root, rows):
    images = image_paths(root)
    for row in rows[::3]:
        stem = row["filestem"]
        width, height, _, _ = png_header(images[stem])
        annotation = ET.parse(root / "folder_structure/pascalvoc" / f"{stem}.xml").getroot()
        assert annotation.findtext("filename") == f"{stem}.png"
        assert [annotation.findtext(f"size/{key}") for key in ("width", "height", "depth")] == \
            [str(width), str(height), "1"]
        objects = annotation.findall("object")
        boxes = yolo_boxes(root, stem)
        assert len(objects) == len(boxes)
        for obj, (cls, xc, yc, w, h) in zip(objects, boxes):
            assert obj.findtext("name") == YOLO_CLASSES[cls]
            corners = [int(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
            # VOC corners are 1-based and inclusive
            expected = [(xc - w / 2) * width + 1, (yc - h / 2) * height + 1, (xc + w / 2) * width,
                        (yc + h / 2) * height]
            assert np.allclose(corners, expected, atol=1.0), (stem, corners, expected)
            assert 1 <= corners[0] <= corners[2] <= width and 1 <= corners[1] <= corners[3] <= height


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first, again, workers, other = (tmp_path / name for name in ("first", "again", "workers", "other"))
    phantom.generate(first, n_patients=4, seed=1, size_scale=0.2)
    assert phantom.main([str(again), "--patients", "4", "--seed", "1", "--size-scale", "0.2"]) == 0
    phantom.generate(workers, n_patients=4, seed=1, size_scale=0.2, workers=2)
    phantom.generate(other, n_patients=4, seed=2, size_scale=0.2)
    files = sorted(path.relative_to(first) for path in first.rglob("*") if path.is_file())
    assert len(files) > 3 * 8
    for copy in (again, workers):
        assert sorted(path.relative_to(copy) for path in copy.rglob("*") if path.is_file()) == files
        for name in files:
            assert (first / name).read_bytes() == (copy / name).read_bytes(), name
    assert (first / "dataset.csv").read_bytes() != (other / "dataset.csv").read_bytes()
    sample = next(iter(image_paths(first).values()))
    other_sample = sorted(image_paths(other).values())[0]
    assert sample.read_bytes() != other_sample.read_bytes()


def test_the_phantom_never_writes_into_a_folder_it_did_not_create(tmp_path, capsys):
    """A user's data set (a dataset.csv and images the phantom did not write) is refused, untouched."""
    from physis.cli import main

    users = tmp_path / "grazpedwri"
    (users / "images_part1").mkdir(parents=True)
    (users / "dataset.csv").write_text("the user's own table\n")
    (users / "images_part1" / "0001_1297860395_01_WRI-L1_M014.png").write_bytes(b"the user's own film")
    before = {path: path.read_bytes() for path in users.rglob("*") if path.is_file()}
    with pytest.raises(phantom.PhantomFolderError, match=f"{users} holds files the phantom did not write"):
        phantom.generate(users, n_patients=3, size_scale=0.2)
    assert main(["phantom", str(users), "--patients", "3", "--size-scale", "0.2"]) == 2
    assert "dataset.phantom.enabled: false" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in users.rglob("*") if path.is_file()} == before

    ours = tmp_path / "phantom"
    phantom.generate(ours, n_patients=4, seed=1, size_scale=0.2)
    films = set(image_paths(ours))
    phantom.generate(ours, n_patients=3, seed=1, size_scale=0.2)  # its own folder: rewritten, nothing stale left
    assert set(image_paths(ours)) < films
    assert (ours / phantom.MARKER).is_file()
    (tmp_path / "empty").mkdir()
    phantom.generate(tmp_path / "empty", n_patients=3, size_scale=0.2)  # an empty folder is fine too


def letterbox(pixels: np.ndarray, height: int = 256, width: int = 128) -> tuple[np.ndarray, float]:
    """Downscale keeping the aspect ratio into height×width (the size the classifiers train on)."""
    factor = min(height / pixels.shape[0], width / pixels.shape[1])
    size = (max(1, round(pixels.shape[1] * factor)), max(1, round(pixels.shape[0] * factor)))
    small = Image.fromarray(pixels.astype(np.float32)).resize(size, Image.BILINEAR)
    return np.asarray(small), factor


def window_matched_difference(broken: np.ndarray, intact: np.ndarray) -> np.ndarray:
    """|broken − intact| in [0, 1] after undoing the (slightly content-dependent) intensity window:
    fit broken ≈ a·intact + b on the unsaturated pixels, which are nearly all unchanged."""
    b, i = broken / 65535.0, intact / 65535.0
    usable = (b > 0) & (b < 1) & (i > 0) & (i < 1)
    for _ in range(2):  # refit without the pixels the fracture changed
        slope, offset = np.polyfit(i[usable][::7], b[usable][::7], 1)
        usable &= np.abs(b - (slope * i + offset)) < 0.01
    return np.abs(b - np.clip(slope * i + offset, 0.0, 1.0))


def test_fractures_are_drawn_at_their_boxes_and_survive_downscaling():
    """Render visible-fracture films with and without the fracture (same random draws): they differ
    strongly inside the fracture boxes, still after letterboxing to 256×128, and (up to the global
    intensity window) not far from them. A displaced fragment moves its whole outline, so "not far"
    allows a margin of a fifth of the film width around the tight line box."""
    films = [image for image in phantom.plan(N_PATIENTS, SEED) if image.fracture_visible][:24:2]
    kinds = Counter(fracture.kind for image in films for fracture in image.fractures)
    assert len(kinds) >= 4, kinds  # with this seed: SH II–IV, M/2, M/3 and E/7
    visible_small = 0
    for image in films:
        broken, boxes = phantom.render(image, 1.0)
        intact, intact_boxes = phantom.render(image, 1.0, show_fracture=False)
        assert [box for box in intact_boxes if box.cls != "fracture"] == [box for box in boxes if box.cls != "fracture"]
        fracture_boxes = [box for box in boxes if box.cls == "fracture"]
        assert fracture_boxes and not any(box.cls == "fracture" for box in intact_boxes)
        assert abs(broken.mean() - intact.mean()) / 65535 < 0.005  # no global brightness cue
        diff = window_matched_difference(broken, intact)
        inside, near = np.zeros(diff.shape, dtype=bool), np.zeros(diff.shape, dtype=bool)
        margin = int(0.2 * diff.shape[1])
        for box in fracture_boxes:
            x0, y0, x1, y1 = int(box.x), int(box.y), int(box.x + box.w), int(box.y + box.h)
            inside[y0:y1, x0:x1] = True
            near[max(y0 - margin, 0):y1 + margin, max(x0 - margin, 0):x1 + margin] = True
        assert ((diff > 0.01) & ~near).mean() < 0.005, image.stem
        assert diff[inside].mean() > 0.01, image.stem
        assert (diff[inside] > 0.1).sum() >= 20, image.stem
        small_diff, _ = letterbox(diff)
        visible_small += small_diff.max() > 0.1
    assert visible_small >= 0.8 * len(films)


def test_follow_ups_keep_the_code_but_often_hide_the_fracture(rows, root):
    hidden = [row for row in rows
              if row["study_number"] != "1" and row["ao_classification"] and not row["fracture_visible"]]
    assert hidden
    fracture = YOLO_CLASSES.index("fracture")
    for row in hidden:
        assert all(box[0] != fracture for box in yolo_boxes(root, row["filestem"]))
    by_patient = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], set()).add(row["ao_classification"])
    assert all(len(cells) == 1 for cells in by_patient.values())  # the episode code is on every film


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_physeal_share_and_salter_harris_types(rate):
    for seed in range(3):
        images = phantom.plan(100, seed, rate)
        patients = {image.patient_id: image.ao_classification for image in images}
        physeal = {pid: salter_harris(cell) for pid, cell in patients.items() if salter_harris(cell)}
        assert abs(len(physeal) / len(patients) - rate) <= 0.01
        types = Counter(t for found in physeal.values() for t in found)
        assert all(types[t] >= 1 for t in (1, 2, 3, 4)), types
        assert types[2] > types[1] >= max(types[3], types[4])


def test_codes_look_like_the_release():
    images = phantom.plan(1000, 0)
    cells = Counter(image.ao_classification for image in images if image.initial_exam and image.projection == 1)
    flat = Counter(code for cell, n in cells.items() for code in re.split(r"[;,]", cell) if code.strip())
    assert cells[""] > 0.2 * sum(cells.values())  # normals
    assert any(code.strip() == "23u-E/7" for code in flat)
    assert sum(n for cell, n in cells.items() if "23u-E/7" in cell and len(codes(cell)) > 1) > 10  # co-listed
    for dirty in ("23u-E/7 ", "23u-E7", "23u/E/7", "23r-M3.1", "23u-M/2."):
        assert any(code.lstrip() == dirty for code in flat), dirty
    assert any(code.strip() == phantom.JUNK_CODE for code in flat)
    assert any(code.strip().startswith("72B") for code in flat)
    assert any(re.fullmatch(r"23[ru]?-E/\d", code.strip()) for code in flat)  # severity omitted
    for separator in ("; ", ", "):
        assert any(separator in cell for cell in cells)
    assert any(re.search(r";(?! )", cell) for cell in cells) and any(";  " in cell for cell in cells)
    # every forearm code but the junk one parses with the doc's regex
    unparsed = {code.strip() for code in flat if not FOREARM.match(code.strip())}
    assert unparsed <= {phantom.JUNK_CODE, "72B(b)", "72B(c)", "72B.(b)"}
    # the rare values of the release occur
    assert {image.gender for image in images} == {"M", "F", "O"}
    assert {image.projection for image in images} == {1, 2, 3}
    assert any(image.agfa for image in images) and any(image.diagnosis_uncertain for image in images)


def test_labels_do_not_leak_through_global_cues():
    """Cast, metal and (via render) size are drawn independently of whether a fracture is visible."""
    images = phantom.plan(600, 5)
    visible = [image for image in images if image.fracture_visible]
    other = [image for image in images if not image.fracture_visible]
    for flag in ("cast", "metal"):
        share = [np.mean([getattr(image, flag) for image in group]) for group in (visible, other)]
        assert abs(share[0] - share[1]) < 0.06, (flag, share)
