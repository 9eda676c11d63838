"""YOLOv7 (Wang, Bochkovskiy & Liao, CVPR 2023) from the TF Model Garden's ``official.projects.yolo``,
for the ``yolov7`` plugin: builder with width/depth multipliers and the CPU overrides, input
pipeline, detection and the plugin's hooks.

Facts these helpers rely on (tf-models-official 2.20; ``docs/model-garden.md``):

- ``exp_factory.get_exp_config("coco_yolov7")`` builds only once the project's backbone and decoder
  modules are imported (they register the ``yolov7`` builders); importing the task module alone
  does not. The architectures are tables (``BACKBONES`` / ``DECODERS``, keyed by model id) of
  ``[block, from, …, filters, is_output]`` rows.
- ``width_multiple`` scales every filter count (rounded to a multiple of 8, at least 8);
  ``depth_multiple`` scales the ELAN blocks' chains of 3×3 convolutions (YOLOv7: 4 per block),
  keeping the concatenation pattern (every second conv in the backbone, all in the head). Both 1.0
  is the Model Garden's (and the paper's) YOLOv7 itself, built from its own model id, so its
  checkpoints fit; other values build a table of their own, added under a ``physis-…`` id next to
  the shipped ones (the installed package's files stay untouched).
- YOLO has no background class: class 0 stays empty here so that the fracture is class 1 as in the
  other Garden detectors (:data:`physis.garden.FRACTURE_ID`) and boxes decode through
  :func:`physis.garden.decode_detections`; ``extra_classes`` (other GRAZPEDWRI-DX classes) are
  trained as classes 2, 3, … and never scored.
- The shipped config: COCO's 80 classes (its decoder maps COCO's 91 ids to 80: switched off),
  ``norm_momentum 0.03`` (PyTorch's momentum convention copied into a TF momentum: the moving
  statistics follow the last batch; physis: 0.9 like its other detectors, 0.97 is YOLOv7's value in
  TF terms), sync batch norm, mosaic on every film. Images enter in [0, 1], without mean/std.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from physis import checkpoints, garden
from physis.detection import FRACTURE

EXPERIMENT = "coco_yolov7"
BASE_ID = "yolov7"
STRIDE = 32  # levels 3-5: the input is padded to a multiple of 32


# --------------------------------------------------------------------------- architecture


def _absolute(specs: list) -> list:
    """The rows with every integer ``from`` made absolute (layer 0's -1, the block input, stays)."""
    def fix(i, ref):
        if isinstance(ref, list):
            return [fix(i, r) for r in ref]
        return ref if isinstance(ref, str) or ref >= 0 or i + ref < 0 else i + ref
    return [[row[0], fix(i, row[1]), *row[2:]] for i, row in enumerate(specs)]


def _elan_at(specs: list, a: int) -> tuple[int, list[int]] | None:
    """An ELAN block starting at row ``a`` (1×1 cv1, 1×1 cv2 on the same input, a chain of 3×3
    stride-1 convs, a concat of chain members and both 1×1s): its chain length and the chain
    positions (1-based) the concat takes (every k-th up to the last); None elsewhere."""
    if a + 3 >= len(specs) or specs[a][0] != "convbn" or specs[a + 1][0] != "convbn":
        return None
    if specs[a][2] != 1 or specs[a + 1][2] != 1 or specs[a][1] != specs[a + 1][1]:
        return None
    n, j = 0, a + 2
    while j < len(specs) and specs[j][0] == "convbn" and specs[j][1] == j - 1 and specs[j][2:4] == [3, 1]:
        n, j = n + 1, j + 1
    if n < 1 or j >= len(specs) or specs[j][0] != "concat" or {a, a + 1} - set(specs[j][1]):
        return None
    taken = sorted(r - (a + 1) for r in specs[j][1] if r > a + 1)
    step = n // max(1, len(taken))
    return (n, taken) if taken == list(range(step, n + 1, step)) else None  # every step-th member, the last too


def scaled_specs(specs: list, width: float, depth: float) -> list:
    """A YOLOv7 backbone or decoder table with filters × ``width`` and ELAN chains × ``depth``
    (``from`` made absolute: both builders index their list of outputs with it)."""
    rows, out, remap, i = _absolute(specs), [], {}, 0

    def filters(f):
        return max(8, int(round(f * width / 8)) * 8)

    def renamed(ref):
        return [renamed(r) for r in ref] if isinstance(ref, list) else (ref if isinstance(ref, str) or ref < 0
                                                                        else remap[ref])

    def add(old, row):
        remap[old] = len(out)
        row = [row[0], renamed(row[1]), *row[2:]]
        if row[0] in ("convbn", "repconv"):
            row[4] = filters(row[4])
        elif row[0] == "sppcspc":
            row[2] = filters(row[2])
        out.append(row)

    while i < len(rows):
        elan = _elan_at(rows, i)
        if elan is None:
            add(i, rows[i])
            i += 1
            continue
        n, taken = elan
        step = n // len(taken)
        m = step * max(1, int(round(len(taken) * depth)))
        add(i, rows[i])
        add(i + 1, rows[i + 1])
        chain = []
        for k in range(m):  # the shipped chains' rows are alike; past their end the last one repeats
            conv = rows[i + 2 + min(k, n - 1)]
            out.append(["convbn", len(out) - 1, conv[2], conv[3], filters(conv[4]), conv[5]])
            chain.append(len(out) - 1)
        concat = rows[i + 2 + n]
        picks = [chain[p - 1] for p in range(m, 0, -step)] + [remap[i + 1], remap[i]]
        remap[i + 2 + n] = len(out)
        out.append(["concat", picks, *concat[2:]])
        i += n + 3
    return out


def model_id(width: float, depth: float) -> str:
    """The backbone/decoder id of YOLOv7 × (width, depth): ``yolov7`` itself at 1, 1; otherwise a
    table made by :func:`scaled_specs`, registered once under ``physis-yolov7-w…-d…``."""
    from official.projects.yolo.modeling.backbones import yolov7 as backbones
    from official.projects.yolo.modeling.decoders import yolov7 as decoders

    if float(width) == 1.0 and float(depth) == 1.0:
        return BASE_ID
    name = f"physis-{BASE_ID}-w{float(width):g}-d{float(depth):g}"
    if name not in backbones.BACKBONES:
        backbones.BACKBONES[name] = scaled_specs(backbones.BACKBONES[BASE_ID], width, depth)
        decoders.DECODERS[name] = scaled_specs(decoders.DECODERS[BASE_ID], width, depth)
    return name


def class_ids(params: dict) -> dict[str, int]:
    """Detection class id per GRAZPEDWRI-DX class name: fracture 1, ``extra_classes`` 2, 3, …"""
    from physis.records import YOLO_CLASSES

    extra = [c for c in params.get("extra_classes") or [] if c != FRACTURE]
    unknown = sorted(set(extra) - set(YOLO_CLASSES))
    if unknown:
        raise ValueError(f"extra_classes {unknown} are not GRAZPEDWRI-DX classes ({', '.join(YOLO_CLASSES)})")
    return {FRACTURE: garden.FRACTURE_ID, **{name: garden.FRACTURE_ID + 1 + k for k, name in enumerate(extra)}}


def yolo_config(input_shape: tuple[int, int, int], params: dict):
    """``coco_yolov7`` with physis's classes, the preset's size (padded to 32) and the CPU overrides."""
    from official.core import exp_factory
    from official.projects.yolo.configs import yolov7 as _configs  # noqa: F401  (registers the experiments)
    from official.projects.yolo.modeling.backbones import yolov7 as _backbone  # noqa: F401  (registers builders)
    from official.projects.yolo.modeling.decoders import yolov7 as _decoder  # noqa: F401
    from official.projects.yolo.tasks import yolov7 as _task  # noqa: F401  (registers the task)

    config = exp_factory.get_exp_config(EXPERIMENT)
    config.runtime.mixed_precision_dtype = "float32"
    task = config.task
    task.init_checkpoint = ""  # physis loads params.init_checkpoint itself (on a fresh start only)
    model = task.model
    name = model_id(params["width_multiple"], params["depth_multiple"])
    model.backbone.yolov7.model_id = model.decoder.yolov7.model_id = name
    model.num_classes = 1 + len(class_ids(params))  # class 0 stays empty (see the module docstring)
    model.input_size = [*garden.padded_size(*input_shape[:2], STRIDE), 3]
    model.norm_activation.use_sync_bn = False
    model.norm_activation.norm_momentum = float(params["norm_momentum"])
    model.detection_generator.iou_thresh = float(params["score_threshold"])  # the pre-NMS score threshold
    model.detection_generator.max_boxes = int(params["max_detections"])
    model.loss.use_ota = bool(params["ota"])
    data = task.train_data
    data.dtype = "float32"
    data.decoder.simple_decoder.coco91_to_80 = False
    data.shuffle_buffer_size = 256
    data.parser.mosaic.mosaic_frequency = float(params["mosaic"])
    return config


def redraw_kernels(model) -> None:
    """Give every convolution kernel its own draw of the Model Garden's YOLO initialiser.

    ``initializer_ops.pytorch_kernel_initializer`` returns one unseeded ``VarianceScaling`` (scale
    1/3, fan in, uniform: PyTorch's default) that every layer shares, and tf_keras's stateless
    initialisers return the same values on every call: kernels of one shape start identical (36 of
    79 at width 0.25, depth 0.5; tf_keras warns "unseeded and being called multiple times"). The
    same distribution is drawn again here per kernel, from TensorFlow's seeded global generator.
    """
    import tf_keras

    for layer in model.submodules:
        if isinstance(layer, tf_keras.layers.Conv2D) and layer.built:
            kernel = layer.kernel
            limit = float(np.prod(kernel.shape[:-1])) ** -0.5  # sqrt(3 * scale / fan_in), scale 1/3
            kernel.assign(tf.random.uniform(kernel.shape, -limit, limit, kernel.dtype))


class YoloDetector:
    """A YOLOv7 model with its task (OTA loss, YOLO input pipeline), the interface of
    :class:`physis.garden.VisionDetector` that :class:`physis.garden.DetectorLoop` drives."""

    def __init__(self, input_shape: tuple[int, int, int], params: dict, model=None):
        from official.core import task_factory

        self.input_hw = tuple(input_shape[:2])
        self.config = yolo_config(input_shape, params)
        self.task = task_factory.get_task(self.config.task)
        if model is None:
            with warnings.catch_warnings():  # "unseeded and being called multiple times": redrawn below
                warnings.filterwarnings("ignore", "The initializer VarianceScaling is unseeded")
                model = self.task.build_model()
            redraw_kernels(model)
        self.model = model
        self.padded_hw = tuple(self.config.task.model.input_size[:2])

    @property
    def backbone(self):
        return self.model.backbone

    def ensure_built(self) -> None:
        self._detect(tf.zeros([1, *self.input_hw, 3]))

    def restore_initial(self, path: str, modules: str) -> None:
        """Load a checkpoint as the YOLO task's ``initialize()`` reads it (``backbone`` or ``all``)."""
        self.ensure_built()
        checkpoints.restore(path, modules, self.model, self.model.backbone,
                            f"yolov7 (init_checkpoint_modules: {modules})")

    def dataset(self, records: Path, batch_size: int, seed: int) -> tf.data.Dataset:
        """Infinite, shuffled, augmented training batches of :func:`write_records` output, seeded by
        ``seed`` (the task seeds its pipeline from the task config's ``seed``, 1000 as shipped)."""
        self.task.task_config.seed = int(seed)
        data = self.config.task.train_data.replace(input_path=str(records), global_batch_size=int(batch_size),
                                                   is_training=True, seed=seed)
        return self.task.build_inputs(data)

    def train_step(self, opt) -> Callable:
        @tf.function
        def step(inputs):
            return tf.reduce_sum(self.task.train_step(inputs, self.model, opt)["loss"])  # the loss is [1]
        return step

    @functools.cached_property
    def _detect(self) -> Callable:
        height, width = self.input_hw
        size = tf.constant([*self.padded_hw, *self.padded_hw], tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def detect(images):
            outputs = self.model(tf.image.pad_to_bounding_box(images, 0, 0, *self.padded_hw), training=False)
            return {"detection_boxes": outputs["bbox"] * size, "detection_scores": outputs["confidence"],
                    "detection_classes": outputs["classes"], "num_detections": outputs["num_detections"]}
        return detect

    def detect(self, images) -> list[np.ndarray]:
        """Fracture boxes (x, y, w, h, score) per image of a batch (float32 [B, H, W, C] in [0, 1])."""
        images = garden.rgb(tf.convert_to_tensor(images, tf.float32))
        return garden.decode_detections({k: v.numpy() for k, v in self._detect(images).items()})


# --------------------------------------------------------------------------- training


def write_records(frame: pd.DataFrame, boxes: pd.DataFrame, ids: dict[str, int], path: Path,
                  which: str = "all") -> Path:
    """:func:`physis.garden.write_records` with the classes of ``ids`` (fracture boxes per ``which``)."""
    from physis.export import tf_example

    columns = ["x", "y", "w", "h", "class"]
    fractures = garden.fracture_boxes(frame, boxes, which)
    others = {key: part[columns] for key, part in boxes[boxes["class"].isin(set(ids) - {FRACTURE})].groupby("image_id")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for n, row in enumerate(frame.itertuples(index=False), start=1):
            film = pd.DataFrame(fractures[row.image_id], columns=columns[:4]).assign(**{"class": FRACTURE})
            if row.image_id in others:
                film = pd.concat([film, others[row.image_id]], ignore_index=True)
            example = tf_example(pd.Series({"path": row.path, "coco_id": n, "image_id": row.image_id}), film)
            labels = example.features.feature["image/object/class/label"].int64_list.value
            labels[:] = [ids[name] for name in film["class"]]
            writer.write(example.SerializeToString())
    tmp.replace(path)
    return path


class YoloLoop(garden.DetectorLoop):
    """:class:`physis.garden.DetectorLoop` (its phases, steps and validation) on records that hold the
    ``extra_classes`` boxes too (:func:`write_records`; ``ids``: class name -> detection class)."""

    def __init__(self, detector: YoloDetector, data, work_dir: Path, *, ids: dict[str, int], **options):
        self.ids = ids
        super().__init__(detector, data, work_dir, **options)

    def training_records(self, train: pd.DataFrame, boxes: pd.DataFrame, train_boxes: str, path: Path) -> Path:
        return write_records(train, boxes, self.ids, path, train_boxes)


# --------------------------------------------------------------------------- plugin hooks


def detector(model, cfg) -> YoloDetector:
    """The model's detector wrapper, made once per model (its traced ``detect`` is reused)."""
    found = getattr(model, "_physis_yolo", None) if model is not None else None
    if found is None:
        found = YoloDetector(cfg.input_shape, cfg.params, model)
        object.__setattr__(found.model, "_physis_yolo", found)  # bypasses Keras tracking: not in checkpoints
    return found


def build(cfg):
    return detector(None, cfg).model


def train(model, data, cfg) -> None:
    """:func:`physis.train.run_epochs` over :class:`YoloLoop` epochs, early-stopped on the validation
    AUROC of the image scores; fine-tuned from ``init_checkpoint`` if one is set."""
    from physis.train import run_epochs

    p = cfg.params
    found = detector(model, cfg)
    schedule, initialize = garden.fine_tuning(found, p)
    loop = YoloLoop(found, data, cfg.work_dir, ids=class_ids(p), batch_size=p["batch_size"],
                    steps=p["steps_per_epoch"], learning_rate=p["learning_rate"], optimizer_name=p["optimizer"],
                    clip_norm=p["clip_norm"], train_boxes=p["train_boxes"], seed=cfg.seed, **schedule)
    run_epochs(cfg, trackables=loop.trackables, train_epoch=loop.train_epoch, evaluate=loop.evaluate,
               epochs=int(p["epochs"]), patience=int(p["patience"]), initialize=initialize)


def predict_boxes(model, data, cfg) -> list[np.ndarray]:
    """Fracture boxes per film of ``data``; kept for the same ``data`` (``predict`` then ``predict_boxes``)."""
    found = detector(model, cfg)
    last = getattr(found, "_last", None)
    if last is None or last[0] is not data:
        found._last = (data, garden.detect_all(found, data.images))
    return found._last[1]


def predict(model, data, cfg) -> np.ndarray:
    return garden.image_scores(predict_boxes(model, data, cfg))


def explain(model, image, cfg):
    from physis.plugins import Explanation

    return Explanation(boxes=detector(model, cfg).detect(garden.as_batch(image, cfg.input_shape[-1]))[0])


def serving(model, cfg) -> Callable:
    """The export's scores and boxes with TF ops (:func:`physis.garden.serving_detections`)."""
    found = detector(model, cfg)
    return lambda images: garden.serving_detections(found._detect(garden.rgb(images)))
