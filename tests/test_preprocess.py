"""The preprocess stage: alignment, trim, resize, boxes, bit depth, recipes, bad input, Snakemake reruns."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import yaml
from PIL import Image

from physis import config, phantom
from physis.images import read_gray
from physis.preprocess import PreprocessError, load_recipe, params_hash, preprocess_array, run

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = config.load()["preprocess"]["presets"]["letterbox_256x128"]


def preset(**changes) -> dict:
    return {**DEFAULT, **changes}


def forearm(tilt: float = 0.0, height: int = 640, width: int = 440, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """A synthetic wrist film (uint16) tilted by ``tilt`` degrees (counter-clockwise), with bright
    collimator margins, and its fracture box (across the radius's physis) in film pixels."""
    canvas = np.full((height, width), 0.05, np.float32)
    canvas[:, int(0.2 * width):int(0.8 * width)] = 0.3  # soft tissue
    canvas[int(0.36 * height):, int(0.27 * width):int(0.45 * width)] = 0.75  # radius
    canvas[int(0.27 * height):int(0.33 * height), int(0.27 * width):int(0.45 * width)] = 0.7  # its epiphysis
    canvas[int(0.39 * height):, int(0.55 * width):int(0.68 * width)] = 0.7  # ulna
    for k in range(3):
        cv2.circle(canvas, (int((0.33 + 0.12 * k) * width), int(0.18 * height)), int(0.05 * width), 0.65, -1)
    rotate = cv2.getRotationMatrix2D((width / 2, height / 2), tilt, 1.0)
    film = cv2.warpAffine(canvas, rotate, (width, height), borderMode=cv2.BORDER_REPLICATE)
    film += 0.01 * np.random.default_rng(seed).standard_normal(film.shape).astype(np.float32)
    margin = width // 20
    film[:margin], film[-margin:], film[:, :margin], film[:, -margin:] = 0.92, 0.92, 0.92, 0.92  # collimator
    corners = np.array([[0.26 * width, 0.32 * height], [0.46 * width, 0.32 * height],
                        [0.46 * width, 0.37 * height], [0.26 * width, 0.37 * height]])
    moved = corners @ rotate[:, :2].T + rotate[:, 2]
    (x0, y0), (x1, y1) = moved.min(axis=0), moved.max(axis=0)
    box = pd.DataFrame({"image_id": ["f"], "class": ["fracture"], "x": [x0], "y": [y0], "w": [x1 - x0], "h": [y1 - y0]})
    return np.round(np.clip(film, 0, 1) * 60000).astype(np.uint16), box


def box_mask(shape: tuple[int, int], box) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[int(round(box.y)):int(round(box.y + box.h)), int(round(box.x)):int(round(box.x + box.w))] = 255
    return mask


def bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


def iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("tilt", [-12.0, 12.0])
def test_alignment_undoes_a_known_tilt(tilt):
    upright = preprocess_array(forearm(0.0)[0], DEFAULT)[2]
    tilted = preprocess_array(forearm(tilt)[0], DEFAULT)[2]
    assert upright["status"] == tilted["status"] == "ok"
    assert abs(upright["angle"]) <= 5.0  # the synthetic radius and ulna differ: a small axis of their own
    assert abs(tilted["angle"] - (upright["angle"] - tilt)) <= 3.0


@pytest.fixture(scope="module")
def phantom_films(tmp_path_factory) -> list[np.ndarray]:
    """Three phantom films without a cast (a cast hides the forearm's outline)."""
    root = tmp_path_factory.mktemp("phantom")
    phantom.generate(root, n_patients=3, seed=0, physeal_rate=0.5, size_scale=0.6)
    table = pd.read_csv(root / "dataset.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)
    stems = table.loc[table["cast"] != "1", "filestem"].head(3)
    return [read_gray(next(root.glob(f"images_part*/{stem}.png"))) for stem in stems]


def test_alignment_recovers_a_known_rotation_of_phantom_films(phantom_films):
    for film in phantom_films:
        before = preprocess_array(film, DEFAULT)[2]
        # scipy turns counter-clockwise for positive angles, like OpenCV (an independent rotation)
        after = preprocess_array(ndi.rotate(film, 12.0, reshape=True, order=1), DEFAULT)[2]
        assert before["status"] == after["status"] == "ok"
        assert abs(after["angle"] - (before["angle"] - 12.0)) <= 3.0


def test_alignment_switched_off_keeps_the_film_upright():
    _, _, meta = preprocess_array(forearm(12.0)[0], preset(align=False))
    assert meta["angle"] == 0.0 and meta["status"] == "ok"


def round_blob() -> np.ndarray:
    """A bright disc on noisy dark air: no principal axis."""
    film = np.random.default_rng(2).integers(1500, 2500, (300, 300)).astype(np.uint16)
    cv2.circle(film, (150, 150), 90, 50000, -1)
    return film


def test_alignment_without_an_axis_falls_back_unrotated():
    image, _, meta = preprocess_array(round_blob(), DEFAULT)
    assert meta["status"] == "fallback_unrotated" and meta["angle"] == 0.0
    assert "axis" in meta["reason"]
    assert image.shape == (256, 128)


def test_a_tilt_beyond_max_angle_falls_back():
    _, _, meta = preprocess_array(forearm(12.0)[0], preset(max_angle=5))
    assert meta["status"] == "fallback_unrotated" and "max_angle" in meta["reason"]


# ---------------------------------------------------------------------------- geometry and boxes


def test_boxes_stay_on_the_fracture_after_rotate_trim_letterbox():
    film, boxes = forearm(12.0)
    image, moved, meta = preprocess_array(film, DEFAULT, boxes)
    assert meta["angle"] != 0 and meta["crop_x"] > 0 and meta["crop_y"] > 0  # rotated and trimmed
    # the ground truth box as a mask, moved step by step with the recorded angle, crop, scale and pad
    mask = ndi.rotate(box_mask(film.shape, boxes.iloc[0]), meta["angle"], reshape=True, order=0)
    x, y = int(round(meta["crop_x"])), int(round(meta["crop_y"]))
    mask = mask[y:y + int(round(meta["crop_h"])), x:x + int(round(meta["crop_w"]))]
    content = (round(mask.shape[1] * meta["scale_x"]), round(mask.shape[0] * meta["scale_y"]))
    placed = np.zeros(image.shape, np.uint8)
    placed[meta["pad_y"]:meta["pad_y"] + content[1], meta["pad_x"]:meta["pad_x"] + content[0]] = \
        cv2.resize(mask, content, interpolation=cv2.INTER_NEAREST)
    box = moved.iloc[0]
    assert iou((box.x, box.y, box.x + box.w, box.y + box.h), bbox(placed > 0)) >= 0.9


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_zeros():
    film = np.random.default_rng(1).integers(1000, 60000, (1000, 250)).astype(np.uint16)  # 4:1
    image, _, meta = preprocess_array(film, preset(align=False, trim=False))
    assert meta["scale_x"] == pytest.approx(meta["scale_y"], rel=0.02)
    assert (meta["pad_x"], meta["pad_y"]) == (32, 0)  # 256 × 64 film centred in 256 × 128
    assert np.all(image[:, :32] == 0) and np.all(image[:, 96:] == 0)
    assert image[:, 32:96].mean() > 0.2


def test_stretch_does_not_keep_the_aspect_ratio():
    film = np.random.default_rng(1).integers(1000, 60000, (1000, 250)).astype(np.uint16)
    image, _, meta = preprocess_array(film, preset(align=False, trim=False, resize="stretch"))
    assert meta["scale_x"] / meta["scale_y"] == pytest.approx((128 / 250) / (256 / 1000))
    assert (meta["pad_x"], meta["pad_y"]) == (0, 0)
    assert image.mean(axis=0).min() > 0.2 and image.mean(axis=1).min() > 0.2  # no border anywhere


def test_trim_drops_the_collimator_shadow():
    film, _ = forearm(0.0)
    _, _, meta = preprocess_array(film, preset(align=False))
    margin = film.shape[1] // 20
    assert meta["crop_x"] >= margin - 1 and meta["crop_w"] <= film.shape[1] - 2 * margin + 2
    untrimmed = preprocess_array(film, preset(align=False, trim=False))[2]
    assert untrimmed["crop_w"] == film.shape[1]


def test_roi_rows_keep_a_band_and_drop_boxes_outside_it():
    film, boxes = forearm(0.0)
    _, moved, meta = preprocess_array(film, preset(align=False, roi_rows=[0.5, 1.0]), boxes)
    assert moved.empty  # the physis lies in the upper half
    assert meta["crop_y"] > film.shape[0] * 0.4


# ---------------------------------------------------------------------------- depth, windowing


def test_16_bit_depth_survives_reading(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32) * 13 % 65536).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert np.array_equal(read_gray(tmp_path / "ramp.png"), ramp)
    image, _, _ = preprocess_array(forearm()[0], preset(dtype="uint16"))
    assert len(np.unique(image)) > 256  # more levels than 8 bits hold


def test_windowing_maps_the_percentiles_of_the_field_to_black_and_white():
    film, _ = forearm()
    image, _, meta = preprocess_array(film, preset(align=False, trim=False, percentiles=[5, 95]))
    assert meta["window_lo"] < meta["window_hi"]
    assert image.min() == 0.0 and image.max() == 1.0
    with_clahe, _, _ = preprocess_array(film, preset(align=False, trim=False, clahe=2.0))
    assert with_clahe.shape == image.shape and not np.array_equal(with_clahe, image)


def test_constant_film_is_an_error():
    with pytest.raises(PreprocessError, match="all-constant"):
        preprocess_array(np.full((50, 40), 7, np.uint16), DEFAULT)


# ---------------------------------------------------------------------------- recipes


def test_recipe_hash_changes_with_any_parameter_and_only_then():
    assert params_hash(DEFAULT) == params_hash(dict(reversed(list(DEFAULT.items()))))
    for key, value in (("height", 255), ("resize", "stretch"), ("align", False), ("percentiles", [1, 99])):
        assert params_hash(preset(**{key: value})) != params_hash(DEFAULT), key


# ---------------------------------------------------------------------------- the stage


def test_stage_rejects_bad_films_and_reconciles(tmp_path):
    film, boxes = forearm(8.0)
    Image.fromarray(film).save(tmp_path / "good.png")
    Image.fromarray(np.full((80, 60), 1234, np.uint16)).save(tmp_path / "flat.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(round_blob()).save(tmp_path / "blob.png")
    manifest = pd.DataFrame({"image_id": ["good", "flat", "broken", "blob"],
                             "path": [str(tmp_path / f"{n}.png") for n in ("good", "flat", "broken", "blob")]})
    out = tmp_path / "out"
    summary = run(manifest, boxes.assign(image_id="good"), "test", DEFAULT, out, threads=2, figure_films=2)

    index = pd.read_parquet(out / "index.parquet")
    rejected = pd.read_parquet(out / "rejected.parquet").set_index("image_id")
    assert len(index) + len(rejected) == len(manifest) == summary["films"]
    assert dict(zip(index["image_id"], index["status"])) == {"good": "ok", "blob": "fallback_unrotated"}
    assert "all-constant" in rejected.loc["flat", "reason"] and "unreadable" in rejected.loc["broken", "reason"]
    assert rejected.loc["broken", "source"].endswith("broken.png")
    for path in index["path"]:
        with Image.open(path) as stored:
            assert (stored.height, stored.width, stored.mode) == (256, 128, "L")
    stored_boxes = pd.read_parquet(out / "boxes.parquet")
    assert list(stored_boxes.columns) == ["image_id", "class", "x", "y", "w", "h"] and len(stored_boxes) == 1
    recipe = load_recipe(out)
    assert recipe["preset"] == "test" and recipe["hash"] == params_hash(DEFAULT)
    assert (out / "steps.png").stat().st_size > 0 and (out / "rejected.csv").is_file()
    # the predict path replays the stage exactly
    replayed, _, _ = preprocess_array(read_gray(tmp_path / "good.png"), recipe["params"])
    stored = np.asarray(Image.open(index.loc[index["image_id"] == "good", "path"].iloc[0]), np.float32) / 255
    assert np.array_equal(replayed, stored.astype(np.float32))

    recipe["params"]["height"] = 300
    (out / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(PreprocessError, match="hash"):
        load_recipe(out)


@pytest.mark.slow  # two real Snakemake runs (about 25 s)
def test_snakemake_reruns_only_the_preset_whose_parameters_changed(tmp_path):
    results = tmp_path / "results"
    (results / "data").mkdir(parents=True)
    films = []
    for k, tilt in enumerate((5.0, -7.0)):
        film, boxes = forearm(tilt, height=200, width=140, seed=k)
        Image.fromarray(film).save(tmp_path / f"film{k}.png")
        films.append(boxes.assign(image_id=f"film{k}"))
    pd.DataFrame({"image_id": ["film0", "film1"], "path": [str(tmp_path / "film0.png"), str(tmp_path / "film1.png")],
                  "label": [0, 1], "split": ["train", "val"]}).to_parquet(results / "data/manifest.parquet")
    pd.concat(films).to_parquet(results / "data/boxes.parquet")
    cfg = {"results": str(results), "dataset": {"root": str(tmp_path), "phantom": {"enabled": False}},
           "plugin_dirs": [str(ROOT / "plugins")], "models": {}, "preprocess": {"figure_films": 1,
                                        "presets": {"small_a": {"height": 32, "width": 16},
                                                    "small_b": {"height": 32, "width": 16}}}}
    (tmp_path / "Snakefile").write_text(f'configfile: "config.yaml"\n'
                                        f'include: "{ROOT}/workflow/rules/common.smk"\n'
                                        f'include: "{ROOT}/workflow/rules/preprocess.smk"\n')

    def snakemake() -> dict[str, float]:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        done = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "--directory",
                               str(tmp_path), "--snakefile", str(tmp_path / "Snakefile"), "preprocess_only"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return {name: (results / "preprocess" / name / "recipe.json").stat().st_mtime_ns
                for name in ("small_a", "small_b")}

    first = snakemake()
    cfg["preprocess"]["presets"]["small_b"]["height"] = 48
    second = snakemake()
    assert second["small_a"] == first["small_a"]
    assert second["small_b"] != first["small_b"]
    assert json.loads((results / "preprocess/small_b/recipe.json").read_text())["params"]["height"] == 48
