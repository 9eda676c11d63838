"""Using a trained model: the predict rule and ``physis predict <files and folders>``.

Both replay the preprocessing recipe saved with the model (``recipe.json``), so inference
inputs are prepared exactly like the training inputs. The predict rule writes raw scores (the
evaluate stage calibrates them); ``physis predict`` reports the calibrated probability, applying the
calibrator the evaluate stage saved in the model folder (``calibration.json``), and says so.
:class:`Predictor` loads a model folder once and scores any number of films in batches;
:func:`find_films` turns the command line's files and folders into its inputs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path, PurePosixPath

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
OPTIONAL_COLUMNS = [CONSPICUITY, "study"]
BOX_COLUMNS = ["image_id", "split", "x", "y", "w", "h", "score"]
#: Films read by extension; any other file is read as DICOM (named on the command line, or found in a
#: folder with the DICOM preamble).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Films preprocessed and scored per call of the plugin's predict hook: bounds the temporary PNGs and memory.
CHUNK = 256
NOT_CALIBRATED = "the model folder has no calibration.json (the evaluate stage writes it)"


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
    uploads pixels only, never the original file). Many films: :class:`Predictor` (one model load).
    """
    film = _read_any(Path(path))  # first: a file that is no film fails before the model loads
    predictor = Predictor(model_dir)
    return float(predictor.raw_scores([predictor.prepare(film)], batch_size=1)[0])


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
    calibrator, threshold = Predictor(model_dir).calibration
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
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_gray(path)
    from physis.sources.dicom import read_film

    return read_film(path)


@dataclass(frozen=True)
class FilmInput:
    """One input of ``physis predict``: ``path`` as given or found, ``name`` (unique among the inputs) for
    its overlay file, and ``skip``: why it is no film, when the folder scan already knows."""

    path: Path
    name: str
    skip: str = ""


@dataclass(frozen=True)
class FilmResult:
    """What ``physis predict`` reports for one input: its scores, or why it was skipped (``error``).

    ``score`` is the calibrated probability (the raw score when the model folder has no calibration.json),
    ``positive`` the decision ``score >= threshold`` at the threshold chosen on validation (None without one).
    """

    film: str
    score: float | None = None
    raw_score: float | None = None
    positive: bool | None = None
    threshold: float | None = None
    calibrated: bool | None = None
    model: str = ""
    recipe_hash: str = ""
    overlay: str = ""  # the overlay file written for it, if any
    error: str = ""


def find_films(paths: Iterable[str | Path]) -> list[FilmInput]:
    """The inputs of ``physis predict`` in order: a file as given (read as a film whatever its name), a folder
    searched recursively (sorted) for images by extension and DICOM files by their preamble, whatever their
    name. Other files in a folder become inputs to skip, with the reason; hidden files and folders
    (``.DS_Store``, ``.git``) are left out. A path that does not exist is a usage error."""
    found: list[FilmInput] = []
    names: set[str] = set()
    for given in map(Path, paths):
        if given.is_dir():
            for path in sorted(given.rglob("*")):
                relative = path.relative_to(given)
                if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                    found.append(FilmInput(path, _unique(relative.as_posix(), names), _not_a_film(path)))
        elif given.exists():
            found.append(FilmInput(given, _unique(given.name, names)))
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name`` with ``-2``, ``-3`` … before its extension when an earlier input has it."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        path = PurePosixPath(name)
        candidate = str(path.with_name(f"{path.stem}-{n}{path.suffix}"))
    taken.add(candidate)
    return candidate


def _not_a_film(path: Path) -> str:
    """Why a file found in a folder is not read ('' for an image or a DICOM file). The 132-byte preamble
    check costs nothing on big folders; pydicom then reads the file as :func:`_read_any` does."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return "" if handle.read(4) == b"DICM" else "neither an image (PNG, JPEG, TIFF) nor a DICOM file"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"


class Predictor:
    """A trained model folder, loaded once, that scores many films: ``physis predict``'s engine.

    Everything loads at first use: the network (and with it the folder's checks) at the first readable
    film, so an input that is no film fails before TensorFlow loads. A cross-validated model folder scores
    with the mean of its fold models, as the evaluate stage scored its test films (and explains with fold 0's).
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)

    @cached_property
    def networks(self) -> list[tuple[Plugin, object, ModelConfig]]:
        """(plugin, network, ModelConfig) of the model, or of each fold model: :func:`load_trained`."""
        return [load_trained(folder) for folder in crossval.fold_dirs(self.model_dir) or [self.model_dir]]

    @property
    def trained(self) -> tuple[Plugin, object, ModelConfig]:
        """The (first) network: what names the model, holds its recipe and explains a film."""
        return self.networks[0]

    @cached_property
    def recipe(self) -> dict:
        """The preprocessing recipe the model was trained with (``recipe.json``)."""
        return json.loads((self.trained[2].work_dir / "recipe.json").read_text())

    @cached_property
    def calibration(self) -> tuple[calibration.Calibrator, dict | None]:
        """The calibrator and operating threshold the evaluate stage saved; the identity and no threshold
        before the model is evaluated."""
        return calibration.load(self.model_dir) or (calibration.Calibrator("none", note=NOT_CALIBRATED), None)

    def prepare(self, film: np.ndarray) -> np.ndarray:
        """A film (16-bit grey) as the network sees it: the model's recipe applied, on the 16-bit scale of the
        PNG the plugin reads (the preprocess stage's PNGs hold the same values)."""
        from physis import preprocess

        image, _, _ = preprocess.preprocess_array(film, self.recipe["params"])
        return np.round(image * 65535).astype(np.uint16)

    def raw_scores(self, films: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """The plugin's scores of prepared films: written as temporary PNGs, read by its ``predict`` hook in
        batches of ``batch_size``, as the predict rule reads the preprocess stage's films."""
        from physis.images import write_gray16

        with tempfile.TemporaryDirectory(prefix="physis-predict-") as tmp:
            paths = [Path(tmp) / f"film{k}.png" for k in range(len(films))]
            for path, film in zip(paths, films):
                write_gray16(path, film)
            frame = pd.DataFrame({"image_id": [path.stem for path in paths], "path": list(map(str, paths)),
                                  "label": 0})
            boxes = pd.DataFrame(columns=["image_id", "class", "x", "y", "w", "h"])
            return np.mean([predict_scores(plugin, model, cfg, predict_data(cfg, frame, boxes, Path(tmp), batch_size))
                            for plugin, model, cfg in self.networks], axis=0)

    def score(self, inputs: Sequence[FilmInput], batch_size: int = 16,
              overlay_dir: str | Path | None = None) -> Iterator[FilmResult]:
        """One result per input, in order, :data:`CHUNK` films per call of the plugin's predict hook. An input
        that cannot be read or preprocessed comes back with ``error`` set (a model that cannot be used raises).
        With ``overlay_dir``, each scored film is also drawn there with its explanation (:meth:`overlay`)."""
        for start in range(0, len(inputs), CHUNK):
            yield from self._score_chunk(inputs[start:start + CHUNK], batch_size, overlay_dir)

    def _score_chunk(self, chunk: Sequence[FilmInput], batch_size: int,
                     overlay_dir: str | Path | None) -> list[FilmResult]:
        results: dict[int, FilmResult] = {}
        films: dict[int, np.ndarray] = {}
        for k, item in enumerate(chunk):
            film = self._prepared_or_reason(item)
            if isinstance(film, str):
                results[k] = FilmResult(str(item.path), error=film)
            else:
                films[k] = film
        if films:
            raw = self.raw_scores(list(films.values()), batch_size)
            calibrator, threshold = self.calibration
            value = None if threshold is None else float(threshold["value"])
            for (k, film), raw_score, score in zip(films.items(), raw, calibrator(raw)):
                result = FilmResult(str(chunk[k].path), float(score), float(raw_score),
                                    None if value is None else bool(score >= value), value,
                                    calibrator.method != "none", self.trained[2].name, self.recipe["hash"])
                if overlay_dir is not None:
                    result = self.overlay(film, result, Path(overlay_dir) / _png_name(chunk[k].name))
                results[k] = result
        return [results[k] for k in range(len(chunk))]

    def _prepared_or_reason(self, item: FilmInput) -> np.ndarray | str:
        """The prepared film, or why the input is skipped. Only the film's own problems are reasons: a model
        folder that cannot be used raises (it is checked once a film could be read)."""
        from physis.preprocess import PreprocessError

        if item.skip:
            return item.skip
        try:
            film = _read_any(item.path)
        except (ValueError, OSError) as err:  # ValueError: not a film; OSError: vanished or not readable
            return str(err).removeprefix(f"{item.path}: ")
        try:
            return self.prepare(film)
        except PreprocessError as err:
            return f"cannot be preprocessed: {err}"

    def overlay(self, film: np.ndarray, result: FilmResult, path: Path) -> FilmResult:
        """Write ``film`` (prepared) as an 8-bit PNG with the model's explanation (the plugin's ``explain`` hook,
        Grad-CAM for Keras classifiers: :func:`physis.explain.explainer`) and the score and decision drawn on it;
        ``result`` with the file's path."""
        from PIL import Image

        from physis.explain import explainer, overlay

        plugin, model, cfg = self.trained
        explain, _ = explainer(plugin, cfg)
        image = film.astype(np.float32) / 65535
        explanation = explain(model, np.repeat(image[..., None], cfg.spec.channels, axis=-1), cfg) if explain else None
        decision = ("no threshold" if result.positive is None else
                    f"{'fracture' if result.positive else 'no fracture'} (t = {result.threshold:.2f})")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay(image, explanation, [f"p = {result.score:.2f}", decision])).save(path, format="PNG")
        return replace(result, overlay=str(path))


def _png_name(name: str) -> str:
    return name if name.lower().endswith(".png") else f"{name}.png"
