"""The train stage: everything a plugin should not have to write.

:func:`train_model` resolves a configured model (plugin + preset + hyper-parameters), builds
its data, and runs the plugin's ``train`` hook with checkpoints every epoch (a killed or
timed-out job resumes where it stopped), early stopping on validation AUROC with the best
weights kept, class weights or balanced sampling, seeding, multi-GPU and mixed precision, and
a job granted a GPU that TensorFlow cannot see fails at once (:mod:`physis.devices`).
It writes ``results/models/{model}/``: the saved model, ``recipe.json`` (how inputs were
prepared), ``params.json``, ``history.parquet``, TensorBoard logs and ``train_summary.json``
(written last: its presence means the model is complete; its ``device`` records what trained it).

Keras plugins call :func:`fit_classifier` from their ``train`` hook; plugins with a custom
loop (Model Garden detectors) call :func:`run_epochs`.

Plugin files import this module while Snakemake parses the workflow, so at module level it imports
the standard library and physis's light modules only; NumPy, pandas and TensorFlow are imported
where they are used.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from physis import devices
from physis import plugins as registry
from physis.io import write_json, write_parquet
from physis.plugins import ModelConfig, Plugin, TrainData

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

MONITOR = "val_auroc"
MODEL_FILES = {"keras": "model.keras", "tf_keras": "weights", "service": "service"}


# --------------------------------------------------------------------------- configuration


def resolve(name: str, config: dict) -> tuple[Plugin, ModelConfig]:
    """Turn ``config["models"][name]`` into its plugin and a :class:`ModelConfig`."""
    entry = config["models"][name]
    found = registry.discover(config["plugin_dirs"])
    plugin_name = entry.get("plugin") or name
    if plugin_name not in found:
        raise registry.PluginError(f"model {name!r}: no plugin named {plugin_name!r} (known: {', '.join(found)})")
    plugin = found[plugin_name]
    preset = entry.get("preset") or plugin.spec.preset
    presets = config["preprocess"]["presets"]
    if preset not in presets:
        raise registry.PluginError(f"model {name!r}: preprocessing preset {preset!r} is not in preprocess.presets")
    size = presets[preset]
    params = registry.resolve_params(plugin, entry.get("params"))
    work_dir = Path(config["results"]) / "models" / name
    cfg = ModelConfig(name=name, spec=plugin.spec, input_shape=(size["height"], size["width"], plugin.spec.channels),
                      params=params, seed=config["train"]["seed"], work_dir=work_dir)
    return plugin, cfg


def resources(plugin: Plugin, entry: dict) -> dict[str, int]:
    """The plugin's cluster hints overridden by the model's ``resources`` config."""
    hints = plugin.spec.resources
    defaults = {"gpus": hints.gpus, "mem_mb": hints.mem_mb, "runtime": hints.runtime, "cpus": hints.cpus}
    return {**defaults, **(entry.get("resources") or {})}


# --------------------------------------------------------------------------- runtime set-up


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed Python, NumPy and TF, make TF ops deterministic, and cap TF's CPU threads."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))


def distribution(framework: str, kind: str = "classifier"):
    """MirroredStrategy over every visible GPU when there are several; mixed precision on GPU.

    Only classifiers (trained by ``model.fit``, which replicates its steps) get the strategy; the
    detectors' and the two-stage model's custom loops call their steps directly and train on one GPU.
    """
    import tensorflow as tf

    gpus = devices.visible_gpus()
    log.info("visible GPUs: %d (CUDA_VISIBLE_DEVICES=%s)", len(gpus), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if gpus and framework == "keras":
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    if len(gpus) > 1:
        if kind == "classifier":
            return tf.distribute.MirroredStrategy()
        log.info("%s: a custom training loop, trained on the first visible GPU only", kind)
    return tf.distribute.get_strategy()


# --------------------------------------------------------------------------- data


def load_frames(manifest: pd.DataFrame, preset_dir: Path) -> dict[str, pd.DataFrame]:
    """Manifest rows joined with the preset's index (preprocessed path), per split."""
    import pandas as pd

    index = pd.read_parquet(preset_dir / "index.parquet")[["image_id", "path"]]
    joined = manifest.drop(columns=["path"]).merge(index, on="image_id", how="inner")
    return {split: part.reset_index(drop=True) for split, part in joined.groupby("split")}


#: the splits whose rows and boxes the train hook sees; test labels stay out of its reach.
TRAIN_SPLITS = ("train", "val")


def train_data(cfg: ModelConfig, manifest: pd.DataFrame, preset_dir: Path, train_cfg: dict,
               augment: dict | None) -> TrainData:
    """What the plugin's ``train`` hook gets: train and validation films, datasets and boxes only."""
    import pandas as pd

    from physis import pipeline

    frames = load_frames(manifest[manifest["split"].isin(TRAIN_SPLITS)], preset_dir)
    batch = int(cfg.params.get("batch_size", 8))
    balance = "sampling" if train_cfg["class_balance"] == "sampling" else "none"
    train = pipeline.image_dataset(frames["train"], cfg.spec.channels, batch, training=True, seed=cfg.seed,
                                   augment=augment, cache=train_cfg["cache"], balance=balance)
    val = pipeline.image_dataset(frames["val"], cfg.spec.channels, batch, training=False, seed=cfg.seed,
                                 cache=train_cfg["cache"])
    weights = pipeline.class_weights(frames["train"]["label"]) if train_cfg["class_balance"] == "weights" else None
    boxes = pd.read_parquet(preset_dir / "boxes.parquet")
    boxes = boxes[boxes["image_id"].isin(pd.concat(frames.values())["image_id"])].reset_index(drop=True)
    return TrainData(train=train, val=val, frames=frames, boxes=boxes, class_weight=weights, preset_dir=preset_dir,
                     augment=augment, cache=train_cfg["cache"], balance=balance)


# --------------------------------------------------------------------------- callbacks


def _best_so_far(history_path: Path) -> float | None:
    import pandas as pd

    if not history_path.is_file():
        return None
    history = pd.read_parquet(history_path)
    return float(history[MONITOR].max()) if MONITOR in history and len(history) else None


def append_history(path: Path, epoch: int, logs: dict[str, float]) -> None:
    """Add one epoch to ``history.parquet``, replacing a row of the same epoch (after a resume)."""
    import pandas as pd

    row = {"epoch": epoch, **{key: float(value) for key, value in logs.items()}}
    history = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if len(history):
        history = history[history["epoch"] < epoch]
    write_parquet(pd.concat([history, pd.DataFrame([row])], ignore_index=True), path)


def callbacks(framework: str, work_dir: Path, patience: int, phase: str = "main") -> list:
    """Checkpoint/resume, best-weights, early-stopping, history and TensorBoard callbacks.

    ``framework`` picks Keras 3 (``keras``) or the Model Garden's ``tf_keras`` classes, which
    do not mix. ``phase`` separates the resume state of the two-phase fine-tuning schedule.
    """
    if framework == "tf_keras":
        import tf_keras as k
        best = str(work_dir / "best_weights" / "ckpt")
    else:
        import keras as k
        best = str(work_dir / "best.weights.h5")
    history_path = work_dir / "history.parquet"

    class History(k.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            append_history(history_path, epoch + 1, logs or {})
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{key}={value:.4f}" for key, value in (logs or {}).items()))

    if framework == "tf_keras":  # TensorFlow checkpoints: written to temporary files, then renamed
        backup = k.callbacks.BackupAndRestore(str(work_dir / "checkpoints" / phase))
        keep_best = k.callbacks.ModelCheckpoint(best, monitor=MONITOR, mode="max", save_best_only=True,
                                                save_weights_only=True,
                                                initial_value_threshold=_best_so_far(history_path))
    else:  # Keras 3 writes .h5 files in place: a kill mid-write must not leave the only copy half-written
        backup = k.callbacks.BackupAndRestore(str(work_dir / "checkpoints" / phase), double_checkpoint=True)

        class BestWeights(k.callbacks.Callback):
            """The best validation-AUROC weights, saved to a temporary file and renamed into place."""

            def __init__(self):
                super().__init__()
                self.best = _best_so_far(history_path)

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(MONITOR)
                if value is None or (self.best is not None and value <= self.best):
                    return
                self.best = value
                tmp = Path(best).with_name(f".partial.{Path(best).name}")
                self.model.save_weights(str(tmp))
                os.replace(tmp, best)

        keep_best = BestWeights()
    return [
        backup,
        keep_best,
        k.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience),
        k.callbacks.TensorBoard(str(work_dir / "tensorboard"), write_graph=False, profile_batch=0),
        History(),
    ]


def restore_best(model, framework: str, work_dir: Path) -> bool:
    """Load the best validation-AUROC weights saved during training, when there are any."""
    path = work_dir / ("best_weights/ckpt.index" if framework == "tf_keras" else "best.weights.h5")
    if not path.exists():
        return False
    model.load_weights(str(path).removesuffix(".index"))
    return True


# --------------------------------------------------------------------------- helpers for plugins


def pretrained(params: dict) -> bool:
    """Whether a model starts from pretrained weights: Keras ``weights`` or a Model Garden ``init_checkpoint``."""
    return any(params.get(key, "none") not in (None, "", "none") for key in ("weights", "init_checkpoint"))


def has_progress(work_dir: Path) -> bool:
    """Whether an earlier attempt of this job left checkpoints (a resumed job keeps its progress)."""
    folder = Path(work_dir) / "checkpoints"
    return folder.is_dir() and any(path.is_file() for path in folder.rglob("*"))


def fit_classifier(model, data: TrainData, cfg: ModelConfig, callbacks_: list, *, backbone: list | None = None,
                   initialize: Callable[[], None] | None = None) -> None:
    """Compile and fit a binary classifier (weighted BCE, AUROC/accuracy metrics).

    Usable directly as a plugin's ``train`` hook; a model with ``supervision: boxes`` is trained on the
    fracture boxes by :func:`physis.heatmap.fit` instead (from its initial weights, no frozen phase).
    ``initialize`` loads initial weights that the build does not (a Model Garden ``init_checkpoint``), on
    a fresh start only. With pretrained weights it follows the thesis's two phases: ``frozen_epochs`` with the ``backbone`` layers
    frozen (default: every layer not named ``head_*``), then fine-tuning at ``learning_rate *
    finetune_lr_factor``. The weights at the end of the frozen phase are kept, so a job resumed
    after it continues from them, not from the initial weights. Works for Keras 3 and tf_keras
    models alike.
    """
    from physis import heatmap

    if heatmap.box_supervised(cfg):  # supervision: boxes (physis.keras_models.classifier built the map head)
        heatmap.fit(model, data, cfg, callbacks_)
        return
    k = _keras_module(cfg.spec.framework)
    params = cfg.params
    epochs = int(params["epochs"])
    if model.output_shape[-1] != 1:
        raise registry.PluginError(f"model {cfg.name!r}: a binary classifier needs one sigmoid output, "
                                   f"got {model.output_shape[-1]} (the thesis's 3-output head is for "
                                   "reproducing its parameter count only)")
    if initialize is not None and not has_progress(cfg.work_dir):
        initialize()

    def compile_and_fit(learning_rate: float, cbs: list, first: int, last: int) -> None:
        model.compile(optimizer=k.optimizers.Adam(learning_rate),
                      loss=k.losses.BinaryCrossentropy(),
                      metrics=[k.metrics.AUC(name="auroc"), k.metrics.BinaryAccuracy(name="accuracy")])
        model.fit(data.train, validation_data=data.val, epochs=last, initial_epoch=first,
                  class_weight=data.class_weight, callbacks=cbs, verbose=2)

    frozen = int(params.get("frozen_epochs", 0))
    if not pretrained(params) or frozen <= 0:
        compile_and_fit(float(params["learning_rate"]), callbacks_, 0, epochs)
        return
    if backbone is None:
        backbone = [layer for layer in model.layers if not layer.name.startswith("head_")]
    done = cfg.work_dir / "checkpoints" / "frozen.done"
    end = cfg.work_dir / "checkpoints" / ("frozen_end.weights.h5" if cfg.spec.framework == "keras"
                                          else "frozen_end/weights")
    if done.exists():  # the frozen phase finished in an earlier attempt: continue from its weights
        model.load_weights(str(end))
    else:
        for layer in backbone:
            layer.trainable = False
        compile_and_fit(float(params["learning_rate"]),
                        callbacks(cfg.spec.framework, cfg.work_dir, int(params["patience"]), "frozen"), 0, frozen)
        end.parent.mkdir(parents=True, exist_ok=True)
        model.save_weights(str(end))
        done.touch()
    for layer in backbone:
        layer.trainable = True
    compile_and_fit(float(params["learning_rate"]) * float(params.get("finetune_lr_factor", 0.1)),
                    callbacks_, frozen, epochs)


def run_epochs(cfg: ModelConfig, *, trackables: dict[str, Any], train_epoch: Callable[[int], dict],
               evaluate: Callable[[], dict], epochs: int, patience: int,
               initialize: Callable[[], None] | None = None) -> None:
    """A resumable epoch loop for custom training loops (Model Garden detectors).

    Restores ``tf.train.Checkpoint(**trackables, epoch=…)`` from ``work_dir/checkpoints/loop``;
    without one (a fresh start, and only then) calls ``initialize`` (an initial checkpoint), so a
    resumed job never loses its progress to it. Then per epoch: ``train_epoch(epoch)`` → train
    logs, ``evaluate()`` → val logs (with ``val_auroc``), history row, TensorBoard scalars,
    checkpoint; stops early after ``patience`` epochs without a better ``val_auroc`` and restores
    the best weights of ``trackables["model"]``.
    """
    import pandas as pd
    import tensorflow as tf

    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(**trackables, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, str(cfg.work_dir / "checkpoints" / "loop"), max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)
        log.info("resuming from %s at epoch %d", manager.latest_checkpoint, int(epoch_var.numpy()))
    elif initialize is not None:
        initialize()
    best_ckpt = tf.train.Checkpoint(model=trackables["model"])
    best_prefix = str(cfg.work_dir / "best_weights" / "loop")
    history_path = cfg.work_dir / "history.parquet"
    best = _best_so_far(history_path)
    history = pd.read_parquet(history_path) if history_path.is_file() else pd.DataFrame()
    since_best = 0
    if best is not None and len(history):
        since_best = int(history["epoch"].max() - history.loc[history[MONITOR].idxmax(), "epoch"])
    boards = {split: tf.summary.create_file_writer(str(cfg.work_dir / "tensorboard" / split))
              for split in ("train", "validation")}
    for epoch in range(int(epoch_var.numpy()), epochs):
        if since_best >= patience:
            log.info("early stopping: no better %s for %d epochs", MONITOR, patience)
            break
        logs = {**train_epoch(epoch), **evaluate()}
        append_history(history_path, epoch + 1, logs)
        epoch_scalars(boards, epoch, logs)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{key}={value:.4f}" for key, value in logs.items()))
        if best is None or logs[MONITOR] > best:
            best, since_best = logs[MONITOR], 0
            best_ckpt.write(best_prefix)
        else:
            since_best += 1
        epoch_var.assign(epoch + 1)
        manager.save()
    if Path(best_prefix + ".index").exists():
        best_ckpt.read(best_prefix).expect_partial()


def epoch_scalars(boards: dict, epoch: int, logs: dict[str, float]) -> None:
    """One epoch's logs as TensorBoard scalars, laid out as Keras's TensorBoard callback writes them
    (``train/epoch_loss``; ``val_auroc`` as ``validation/epoch_auroc``; 0-based epochs), so custom
    loops and Keras models compare in one TensorBoard."""
    import tensorflow as tf

    for split, board in boards.items():
        with board.as_default(step=epoch):
            for key, value in logs.items():
                if key.startswith("val_") == (split == "validation"):
                    tf.summary.scalar(f"epoch_{key.removeprefix('val_')}", float(value))
        board.flush()  # a killed job keeps the epochs it finished


def _keras_module(framework: str):
    if framework == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


# --------------------------------------------------------------------------- save / load


def save_model(plugin: Plugin, model, work_dir: Path) -> None:
    """Save with the framework's own format; the plugin's ``save`` for services."""
    framework = plugin.spec.framework
    if framework == "keras":
        model.save(work_dir / MODEL_FILES["keras"])
    elif framework == "tf_keras":
        model.save_weights(str(work_dir / MODEL_FILES["tf_keras"]))
    else:
        plugin.hook("save")(model, work_dir / MODEL_FILES["service"])


def load_model(plugin: Plugin, cfg: ModelConfig):
    """Inverse of :func:`save_model` (tf_keras models are rebuilt, then their weights loaded)."""
    framework = plugin.spec.framework
    if framework == "keras":
        import keras

        return keras.models.load_model(cfg.work_dir / MODEL_FILES["keras"], compile=False)
    if framework == "tf_keras":
        model = plugin.hook("build")(cfg)
        model.load_weights(str(cfg.work_dir / MODEL_FILES["tf_keras"])).expect_partial()
        return model
    return plugin.hook("load")(cfg.work_dir / MODEL_FILES["service"], cfg)


def count_params(model) -> int | None:
    counter = getattr(model, "count_params", None)
    try:
        return int(counter()) if counter else None
    except ValueError:  # an unbuilt subclassed model
        return None


# --------------------------------------------------------------------------- the stage


def train_model(name: str, config: dict, threads: int | None = None, fold: int | None = None) -> dict:
    """Train one configured model end to end and write its folder; return the summary. With ``fold``
    (cross-validation), train fold ``fold``'s model into ``models/{name}/fold{fold}/`` (:mod:`physis.crossval`)."""
    import pandas as pd

    from physis import crossval

    plugin, cfg = resolve(name, config)
    if fold is not None:
        cfg.work_dir = crossval.fold_dir(cfg.work_dir, fold)
    work_dir = cfg.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    log.info("train %s (plugin %s, %s/%s) CUDA_VISIBLE_DEVICES=%s SLURM_JOB_ID=%s", name, plugin.name,
             cfg.spec.kind, cfg.spec.framework, os.environ.get("CUDA_VISIBLE_DEVICES"),
             os.environ.get("SLURM_JOB_ID"))
    if resources(plugin, config["models"][name])["gpus"] > 0:  # a model that asks for no GPU is not checked
        devices.check_gpus(config["train"]["require_gpu"], model=name)
    preset = config["models"][name].get("preset") or plugin.spec.preset
    preset_dir = Path(config["results"]) / "preprocess" / preset
    recipe = json.loads((preset_dir / "recipe.json").read_text())
    write_json(recipe, work_dir / "recipe.json")
    write_json({"model": name, "plugin": plugin.name, "plugin_source": plugin.source, "params": cfg.params,
                "seed": cfg.seed, "input_shape": list(cfg.input_shape)}, work_dir / "params.json")

    if (work_dir / "checkpoints").exists():
        log.info("resuming from checkpoint in %s", work_dir / "checkpoints")
    seed_everything(cfg.seed, threads)
    manifest = pd.read_parquet(Path(config["results"]) / "data" / "manifest.parquet")
    if fold is not None:
        manifest = crossval.fold_manifest(manifest, fold)
    data = train_data(cfg, manifest, preset_dir, config["train"], config["preprocess"].get("augment"))
    start = time.monotonic()
    strategy = distribution(cfg.spec.framework, cfg.spec.kind)
    with strategy.scope():
        model = plugin.hook("build")(cfg)
    patience = int(cfg.params.get("patience", 5))
    cbs = callbacks(cfg.spec.framework, work_dir, patience) if cfg.spec.framework != "service" else []
    plugin.hook("train")(model, data, cfg, cbs)
    restored = restore_best(model, cfg.spec.framework, work_dir) if cfg.spec.framework != "service" else False
    seconds = time.monotonic() - start
    save_model(plugin, model, work_dir)

    history = pd.read_parquet(work_dir / "history.parquet") if (work_dir / "history.parquet").is_file() else None
    best_epoch = None
    if history is not None and MONITOR in history and history[MONITOR].notna().any():
        best_epoch = int(history.loc[history[MONITOR].idxmax(), "epoch"])
    summary = {
        "model": name, "plugin": plugin.name, "kind": cfg.spec.kind, "framework": cfg.spec.framework,
        "preset": preset, "recipe_hash": recipe.get("hash"), "train_seconds": round(seconds, 2),
        "params": count_params(model), "epochs_run": None if history is None else int(history["epoch"].max()),
        "best_epoch": best_epoch, "restored_best": restored, "input_shape": list(cfg.input_shape),
        "device": devices.describe_device(_gpus_used(strategy), devices.mixed_precision(cfg.spec.framework), threads),
        **({} if fold is None else {"fold": fold}),
    }
    write_json(summary, work_dir / "train_summary.json")  # last: marks the model complete
    return summary


def _gpus_used(strategy) -> int:
    """GPUs the training ran on: the strategy's replicas when TensorFlow sees a GPU (the default
    strategy places everything on the first one), else none."""
    return strategy.num_replicas_in_sync if devices.visible_gpus() else 0


def predict_data(cfg: ModelConfig, frame: pd.DataFrame, boxes: pd.DataFrame, preset_dir: Path,
                 batch_size: int = 16):
    """The PredictData of ``frame``'s films (preprocessed PNG paths). Pass the same object to
    ``predict`` and ``predict_boxes``: detectors keep their detections for the same data."""
    from physis import pipeline
    from physis.plugins import PredictData

    return PredictData(images=pipeline.film_images(frame, cfg.spec.channels, batch_size), frame=frame,
                       boxes=boxes[boxes["image_id"].isin(frame["image_id"])], preset_dir=preset_dir)


def predict_scores(plugin: Plugin, model, cfg: ModelConfig, data) -> np.ndarray:
    """Run the plugin's ``predict`` hook over ``data`` (:func:`predict_data`); check its scores."""
    import numpy as np

    frame = data.frame
    scores = np.asarray(plugin.hook("predict")(model, data, cfg), dtype=float).reshape(-1)
    if len(scores) != len(frame):
        raise registry.PluginError(f"plugin {plugin.name!r}: predict returned {len(scores)} scores for "
                                   f"{len(frame)} images")
    if np.isnan(scores).any() or np.any((scores < 0) | (scores > 1)):
        raise registry.PluginError(f"plugin {plugin.name!r}: predict returned scores outside [0, 1]")
    return scores
