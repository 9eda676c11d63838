"""Using a trained model: the predict rule and ``physis predict <file>``.

Both replay the preprocessing recipe saved with the model (``recipe.json``), so inference
inputs are prepared exactly like the training inputs. The predict rule writes raw scores (the
evaluate stage calibrates them); ``physis predict`` reports the calibrated probability, applying the
calibrator the evaluate stage saved in the model folder (``calibration.json``), and says so.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from physis import calibration, crossval
from physis import plugins as registry
from physis.detection import boxes_table
from physis.records import CONSPICUITY
from physis.plugins import ModelConfig, Plugin
from physis.train import load_frames, load_model, predict_data, predict_scores

PREDICTION_COLUMNS = ["image_id", "patient_id", "split", "y_true", "score", "sh_type", "age", "sex", "view"]
#: Manifest columns that travel with the scores when the data has them (the phantom's ground truth).
OPTIONAL_COLUMNS = [CONSPICUITY]
BOX_COLUMNS = ["image_id", "split", "x", "y", "w", "h", "score"]


def model_config(model_dir: str | Path) -> tuple[Plugin, ModelConfig]:
    """Rebuild the plugin and ModelConfig a model folder was trained with."""
    model_dir = Path(model_dir)
    params = json.loads((model_dir / "params.json").read_text())
    plugin = registry.load_source(params["plugin_source"])
    cfg = ModelConfig(name=params["model"], spec=plugin.spec, input_shape=tuple(params["input_shape"]),
                      params=params["params"], seed=params["seed"], work_dir=model_dir)
    return plugin, cfg


def load_trained(model_dir: str | Path):
    """(plugin, model, ModelConfig) of a finished model folder."""
    model_dir = Path(model_dir)
    if (model_dir / "ensemble.json").is_file():
        members = json.loads((model_dir / "ensemble.json").read_text())["members"]
        raise ValueError(f"{model_dir}: an ensemble of {', '.join(members)}, which has no network of its own; "
                         "give one model folder")
    if not (model_dir / "train_summary.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a finished model folder (no train_summary.json)")
    folds = crossval.fold_dirs(model_dir)
    if folds:
        raise ValueError(f"{model_dir}: a cross-validated model of {len(folds)} fold models; give one of its fold "
                         f"folders ({folds[0]}, …)")
    plugin, cfg = model_config(model_dir)
    return plugin, load_model(plugin, cfg), cfg


def predict_frame(model_dir: str | Path, manifest: pd.DataFrame, preset_dir: str | Path,
                  splits: tuple[str, ...] = ("val", "test")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores for the manifest's images of ``splits`` (the evaluate stage's input) and, for
    plugins with a ``predict_boxes`` hook, their raw boxes (image_id, split, x, y, w, h, score in
    preprocessed pixels; empty for classifiers). A cross-validated model folder gives pooled
    out-of-fold scores as ``val`` and the fold ensemble's mean on test (:func:`physis.crossval.combine`).
    """
    folds = crossval.fold_dirs(model_dir)
    if folds:
        return crossval.combine([predict_frame(folder, crossval.fold_manifest(manifest, k), preset_dir, splits)
                                 for k, folder in enumerate(folds)])
    plugin, model, cfg = load_trained(model_dir)
    preset_dir = Path(preset_dir)
    frames = load_frames(manifest[manifest["split"].isin(splits)], preset_dir)
    frame = pd.concat([frames[s] for s in splits if s in frames], ignore_index=True)
    data = predict_data(cfg, frame, pd.read_parquet(preset_dir / "boxes.parquet"), preset_dir)
    out = frame.rename(columns={"label": "y_true"}).assign(score=predict_scores(plugin, model, cfg, data))
    return out[PREDICTION_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in out]], predicted_boxes(plugin, model, cfg, data)


def predicted_boxes(plugin: Plugin, model, cfg: ModelConfig, data) -> pd.DataFrame:
    """The detector's boxes per film of ``data`` as one table (the same PredictData as ``predict``
    got, so a detector reuses the detections it scored the films with)."""
    hook = plugin.hook("predict_boxes")
    if hook is None:
        return pd.DataFrame(columns=BOX_COLUMNS)
    frame = data.frame
    table = boxes_table(list(frame["image_id"]), hook(model, data, cfg))
    return table.assign(split=table["image_id"].map(dict(zip(frame["image_id"], frame["split"]))))[BOX_COLUMNS]


def predict_file(path: str | Path, model_dir: str | Path) -> float:
    """Fracture probability of one image (PNG or DICOM), preprocessed with the model's recipe.

    The film is preprocessed into a temporary PNG exactly as the preprocess stage would, so the
    plugin's ``predict`` sees the same kind of input as in training (and a service plugin
    uploads pixels only, never the original file).
    """
    from physis import preprocess
    from physis.images import write_gray16

    film = _read_any(Path(path))  # first: a file that is no film fails before the model loads
    plugin, model, cfg = load_trained(model_dir)
    recipe = json.loads((Path(model_dir) / "recipe.json").read_text())
    image, _, _ = preprocess.preprocess_array(film, recipe["params"])
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "image.png"
        write_gray16(png, np.round(image * 65535))
        frame = pd.DataFrame({"image_id": ["image"], "path": [str(png)], "label": [0]})
        boxes = pd.DataFrame(columns=["image_id", "class", "x", "y", "w", "h"])
        return float(predict_scores(plugin, model, cfg, predict_data(cfg, frame, boxes, Path(tmp), batch_size=1))[0])


@dataclass(frozen=True)
class Prediction:
    """What ``physis predict`` reports for one film: ``probability`` is calibrated when ``calibrated``."""

    probability: float
    raw: float
    calibrated: bool
    calibration: str  # how the probability was calibrated, or why it was not
    threshold: dict | None  # the operating threshold (value, rule, note) chosen on validation


def predict_probability(path: str | Path, model_dir: str | Path) -> Prediction:
    """The film's fracture probability: the raw score through the model folder's ``calibration.json``
    (written by the evaluate stage); the raw score, said to be uncalibrated, before the model is evaluated."""
    raw = predict_file(path, model_dir)
    saved = calibration.load(model_dir)
    if saved is None:
        return Prediction(raw, raw, False, "not calibrated: the model folder has no calibration.json (the evaluate "
                                           "stage writes it)", None)
    calibrator, threshold = saved
    return Prediction(float(calibrator([raw])[0]), raw, calibrator.method != "none", calibrator.describe(), threshold)


def _read_any(path: Path) -> np.ndarray:
    """A 16-bit grey array from a PNG/JPEG/TIFF or a DICOM radiograph (same pixel pipeline as convert).

    Anything else is a ``ValueError`` naming the file and the reason (the CLI prints it in one line).
    """
    from physis.images import read_gray

    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a film")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        return read_gray(path)
    from physis.sources.dicom import read_film

    return read_film(path)
