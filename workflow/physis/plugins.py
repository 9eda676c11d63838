"""The model plugin contract and registry.

A plugin is one Python file in ``plugins/`` (or a module that an installed package lists in
the ``physis.plugins`` entry-point group); its module name is the model's name. It declares
``SPEC`` (a :class:`ModelSpec`: metadata as data) and three hooks:

``build(cfg: ModelConfig) -> model``
    Build the network for ``cfg.input_shape`` with ``cfg.params`` (resolved hyper-parameters).
``train(model, data: TrainData, cfg: ModelConfig, callbacks: list) -> None``
    Fit ``model`` on ``data``. Keras plugins pass ``callbacks`` (checkpointing, early stopping,
    history: provided by :mod:`physis.train`) to ``fit``; custom loops call them per epoch.
``predict(model, data: PredictData, cfg: ModelConfig) -> np.ndarray``
    One fracture score in [0, 1] per row of ``data.frame`` (in that order).

Optional hooks:
``explain(model, image, cfg) -> Explanation``: a heat map or boxes for the evaluate stage's gallery.
``predict_boxes(model, data: PredictData, cfg) -> list[np.ndarray]``: detectors' raw boxes,
    one (n, 5) array of x, y, w, h, score (preprocessed pixels) per row of ``data.frame``.
``available(cfg: ModelConfig) -> str | None``: a reason why the model cannot run here (e.g. a
    cloud service without credentials); the workflow then schedules no job for it.
``save(model, folder)`` / ``load(folder, cfg)``: only for framework ``service``, whose "model"
    is a handle to remote state; Keras and tf_keras models are saved by the framework.
``serving(model, cfg) -> callable``: for ``physis export`` (:mod:`physis.serving`): a function of a
    float32 [B, H, W, C] batch in [0, 1] (what ``predict`` gets), written with TF ops (it is traced into
    the exported SavedModel), returning ``{"score": [B]}`` equal to ``predict``'s scores, and for
    detectors ``"boxes"`` [B, N, 5] (``predict_boxes``' rows, best first, zero-padded) and
    ``"num_boxes"`` [B]. Without it a classifier is exported as its model's output column 0 (what
    ``predict_classifier`` returns); detectors and two-stage models need one. Services cannot export.
Everything else (save/load, resume, early stopping, class weights) is the framework's job.

Snakemake imports every plugin file each time it parses the workflow, where only Snakemake may be
installed (``--sdm conda``): a plugin file imports TensorFlow, NumPy, pandas or an SDK inside its
hooks, never at module level (``tests/test_deployment.py`` checks the shipped plugins).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("classifier", "detector", "two_stage", "service")
FRAMEWORKS = ("keras", "tf_keras", "service")
REQUIRED_HOOKS = ("build", "train", "predict")
ENTRY_POINT_GROUP = "physis.plugins"
#: The workflow's own folder (the repository): relative ``plugin_dirs`` are resolved against it, so the
#: workflow finds its plugins from any working directory, also when another workflow uses it as a module.
ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "plugins"


class PluginError(ValueError):
    """A plugin that cannot be loaded or used; the message names the plugin and the problem."""


@dataclass(frozen=True)
class Resources:
    """Cluster hints for the plugin's train job (config ``models.<name>.resources`` overrides)."""

    gpus: int = 0
    mem_mb: int = 4000
    runtime: int = 60  # minutes
    cpus: int = 2


@dataclass(frozen=True)
class ModelSpec:
    """Metadata of one model, as data."""

    kind: str  # one of KINDS
    framework: str  # one of FRAMEWORKS: keras = Keras 3, tf_keras = Model Garden, service = cloud
    preset: str  # name of the preprocessing preset (config ``preprocess.presets``) it consumes
    channels: int = 1  # 1 = grey; 3 = grey replicated for ImageNet-style networks
    needs_boxes: bool = False  # trains on the fracture boxes (detectors, two-stage)
    params: dict[str, Any] = field(default_factory=dict)  # default hyper-parameters (all overridable)
    resources: Resources = field(default_factory=Resources)
    reference: str = ""  # paper / thesis listing the model comes from
    description: str = ""


@dataclass
class ModelConfig:
    """What the hooks get: the resolved input shape, hyper-parameters, seed and weights choice."""

    name: str
    spec: ModelSpec
    input_shape: tuple[int, int, int]  # (height, width, channels)
    params: dict[str, Any]
    seed: int = 0
    work_dir: Path | None = None  # the model's folder (results/models/{name}); for plugin extras


@dataclass
class TrainData:
    """What ``train`` gets. Datasets yield ``(images float32 [B,H,W,C] in [0,1], labels [B])``.

    ``frames`` holds the train/val rows (manifest joined with the preprocess index: image_id,
    patient_id, path of the preprocessed PNG, label, …); ``boxes`` the preprocessed boxes of all
    classes (image_id, class, x, y, w, h) of those films, for plugins that need them. No test-split
    film is in either, so a plugin cannot train on test labels by accident.
    """

    train: Any  # tf.data.Dataset, augmented, shuffled, one pass per epoch
    val: Any  # tf.data.Dataset, file order, no augmentation
    frames: dict[str, Any]  # split name -> pandas DataFrame
    boxes: Any  # pandas DataFrame
    class_weight: dict[int, float] | None
    preset_dir: Path
    augment: dict | None = None  # the train-time augmentation recipe (config preprocess.augment)
    cache: bool = False  # keep decoded films in memory (config train.cache)
    balance: str = "none"  # "sampling": balanced batches (config train.class_balance), else "none"


@dataclass
class PredictData:
    """What ``predict`` gets: ``images`` (batched, no labels, in ``frame`` order) and the rows."""

    images: Any  # tf.data.Dataset of float32 [B,H,W,C] in [0,1]
    frame: Any  # pandas DataFrame: image_id, path, … (one row per image)
    boxes: Any  # pandas DataFrame of preprocessed boxes for these images (may be empty)
    preset_dir: Path


@dataclass
class Plugin:
    name: str
    module: ModuleType
    source: str  # file path or entry point, for messages

    @property
    def spec(self) -> ModelSpec:
        return self.module.SPEC

    def hook(self, name: str):
        return getattr(self.module, name, None)


def _validate(name: str, module: ModuleType, source: str) -> Plugin:
    where = f"plugin {name!r} ({source})"
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, ModelSpec):
        raise PluginError(f"{where}: SPEC must be a physis.plugins.ModelSpec, got {type(spec).__name__}")
    for hook in REQUIRED_HOOKS:
        if not callable(getattr(module, hook, None)):
            raise PluginError(f"{where}: missing hook {hook}()")
    if spec.kind not in KINDS:
        raise PluginError(f"{where}: SPEC.kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.framework not in FRAMEWORKS:
        raise PluginError(f"{where}: SPEC.framework {spec.framework!r} is not one of {', '.join(FRAMEWORKS)}")
    if spec.channels not in (1, 3):
        raise PluginError(f"{where}: SPEC.channels must be 1 or 3, got {spec.channels!r}")
    if not isinstance(spec.resources, Resources):
        raise PluginError(f"{where}: SPEC.resources must be a physis.plugins.Resources")
    if not isinstance(spec.params, dict):
        raise PluginError(f"{where}: SPEC.params must be a dict of default hyper-parameters")
    for hook in ("build", "train", "predict"):
        if len(inspect.signature(getattr(module, hook)).parameters) == 0:
            raise PluginError(f"{where}: hook {hook}() takes no arguments")
    return Plugin(name, module, source)


def _load_file(path: Path) -> ModuleType:
    module_name = f"physis_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise PluginError(f"plugin {path.stem!r} ({path}): import failed: {type(err).__name__}: {err}") from err
    return module


def discover(plugin_dirs: list[str | Path] | None = None, use_entry_points: bool = True) -> dict[str, Plugin]:
    """Find every plugin: ``*.py`` files in ``plugin_dirs`` (default: the repository's ``plugins/``;
    a relative folder is relative to the repository, not to the working directory) and modules
    listed in the installed ``physis.plugins`` entry points.

    A name found twice is an error naming both sources.
    """
    found: dict[str, Plugin] = {}

    def add(name: str, load, source: str) -> None:
        if name in found:
            raise PluginError(f"plugin {name!r} is defined twice: {found[name].source} and {source}")
        found[name] = _validate(name, load(), source)

    for directory in plugin_dirs or [PLUGIN_DIR]:
        directory = ROOT / directory  # an absolute folder stays as it is
        if not directory.is_dir():
            raise PluginError(f"{directory}: plugin folder not found")
        for path in sorted(directory.glob("*.py")):
            if not path.stem.startswith("_"):
                add(path.stem, lambda path=path: _load_file(path), str(path.resolve()))
    if use_entry_points:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            add(point.name, point.load, f"entry point {point.value}")
    return found


def load_source(source: str) -> Plugin:
    """Load one plugin again from the ``source`` it was discovered at (a file or an entry point)."""
    if source.startswith("entry point "):
        value = source.removeprefix("entry point ")
        point = next(p for p in entry_points(group=ENTRY_POINT_GROUP) if p.value == value)
        return _validate(point.name, point.load(), source)
    path = Path(source)
    if not path.is_file():
        raise PluginError(f"plugin file {source} no longer exists")
    return _validate(path.stem, _load_file(path), source)


def resolve_params(plugin: Plugin, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Plugin defaults updated by config; an unknown key is an error naming the plugin."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(plugin.spec.params))
    if unknown:
        known = ", ".join(sorted(plugin.spec.params))
        raise PluginError(f"plugin {plugin.name!r}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
    return {**plugin.spec.params, **overrides}


@dataclass
class Explanation:
    """What a plugin's ``explain`` hook returns for one preprocessed image (its pixel frame).

    ``heatmap``: 2-D array in [0, 1] of the image's height × width (Grad-CAM for classifiers).
    ``boxes``: rows of (x, y, w, h, score) in pixels (detectors, two-stage proposals).
    """

    heatmap: Any = None
    boxes: Any = None
