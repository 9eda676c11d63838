"""TF Model Garden helpers shared by the tf_keras plugins (spinenet49, faster_rcnn, retinanet_spinenet,
shapemask_spinenet): model builders with the CPU overrides, the legacy SpineNet fix, the detection
input pipeline, training steps, box decoding and the two-stage ShapeMask + SpineNet model.

Facts these helpers rely on (measured in ``docs/model-garden.md``):

- Every Model Garden model is tf_keras (Keras 2); ``official.vision`` builds the SpineNet-49
  classifier, Faster R-CNN (Mask R-CNN with masks off) and RetinaNet; ShapeMask exists only in
  ``official.legacy.detection``.
- The shipped configs target TPUs and COCO: bfloat16, sync batch norm, a ``gs://`` ImageNet
  checkpoint, 640² or 1024² inputs, 91 classes. :func:`vision_detector_config` and
  :func:`shapemask_params` switch them to float32, plain batch norm, the preset's size and two
  classes (background, fracture). Initialisation is random unless ``params.init_checkpoint`` names a
  checkpoint: :mod:`physis.checkpoints` loads it strictly (object-based, as the official.vision
  tasks' ``initialize()``; ShapeMask also name-based, through the legacy package's loader), when a
  job starts from scratch only; ``frozen_epochs`` then train with the backbone frozen, the rest at
  ``learning_rate * finetune_lr_factor`` (:class:`DetectorLoop`, :func:`train_classifier`).
- The legacy SpineNet hard-codes a 640×640 input and passes the height where the width belongs;
  :func:`_fixed_spinenet_builder` builds it for the real (rectangular) input instead, per model
  instance, without touching the installed package. The legacy factory also ignores the configured
  batch-norm momentum for SpineNet (0.99 instead), and ShapeMask's shipped config freezes the first
  conv/BN layers (meant for an ImageNet-initialised ResNet); both are overridden here.
- Batch-norm momentum is a parameter (0.9 by default in the plugins, Model Garden: 0.99-0.997):
  with a few hundred steps the slower averages leave eval-mode statistics far from the trained
  ones, and the detectors' boxes (not their scores) come out degenerate.
- The legacy ShapeMask builds separate train- and eval-mode graphs; :class:`ShapeMaskDetector`
  keeps both and copies the weights over before detecting.

Training data goes through the Model Garden's own readers and parsers (anchor labelling, box
jitter, mask targets): :func:`write_records` writes the preprocessed films and their fracture
boxes as COCO-style ``tf.train.Example`` records (the convert stage's encoder, box-filled masks for
ShapeMask), which ``task.build_inputs`` (official.vision) or ``InputFn`` (legacy) read back.
Prediction feeds the framework's images (float32 in [0, 1]) through the same normalisation.
Boxes leave this module as rows of x, y, w, h, score in preprocessed pixels.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import tf_keras

from physis import checkpoints
from physis.detection import FRACTURE
from physis.pipeline import film_images

log = logging.getLogger(__name__)

FRACTURE_ID = 1  # class ids of the detectors: 0 = background, 1 = fracture
NUM_CLASSES = 2
#: official.vision experiments per (plugin family, backbone).
VISION_EXPERIMENTS = {
    ("faster_rcnn", "resnet50"): "fasterrcnn_resnetfpn_coco",
    ("faster_rcnn", "spinenet49"): "maskrcnn_spinenet_coco",
    ("retinanet", "spinenet49"): "retinanet_spinenet_coco",
}


# --------------------------------------------------------------------------- small shared pieces


def multiple_of(value: float, stride: int) -> int:
    """The nearest multiple of ``stride`` to ``value`` (at least ``stride``)."""
    return max(stride, int(round(value / stride)) * stride)


def padded_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Smallest size ≥ (height, width) divisible by ``stride`` (the feature pyramid's top level)."""
    return -(-height // stride) * stride, -(-width // stride) * stride


def optimizer(name: str, learning_rate: float, clip_norm: float):
    """A tf_keras optimizer with global-norm gradient clipping (the legacy executor clips at 1)."""
    clip = float(clip_norm) if clip_norm else None
    if name == "adam":
        return tf_keras.optimizers.Adam(float(learning_rate), global_clipnorm=clip)
    if name == "sgd":
        return tf_keras.optimizers.SGD(float(learning_rate), momentum=0.9, global_clipnorm=clip)
    raise ValueError(f"optimizer {name!r} is not one of adam, sgd")


def auroc(labels: Iterable[float], scores: Iterable[float]) -> float:
    """The custom loops' validation AUROC, as the evaluate stage defines it (NaN with one class)."""
    from physis import metrics

    scores = np.asarray(list(scores), float)
    return metrics.compute(np.asarray(list(labels)), scores, scores >= 0.5, ["auroc"])["auroc"]


def as_batch(image, channels: int) -> tf.Tensor:
    """One preprocessed image ([H, W], [H, W, 1] or [H, W, C], values in [0, 1]) as a [1, H, W, C] batch."""
    image = tf.convert_to_tensor(image, tf.float32)
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] != channels:
        image = tf.repeat(image[..., :1], channels, axis=-1)
    return image[None]


def rgb(images: tf.Tensor) -> tf.Tensor:
    """Grey batches replicated to the three channels the Model Garden detectors take."""
    return images if images.shape[-1] == 3 else tf.repeat(images, 3, axis=-1)


# --------------------------------------------------------------------------- boxes


def fracture_boxes(frame: pd.DataFrame, boxes: pd.DataFrame, which: str = "all") -> dict[str, np.ndarray]:
    """Fracture boxes (n, 4: x, y, w, h) per image of ``frame``.

    ``which="all"`` keeps every fracture box (the GRAZPEDWRI-DX detection task); ``"positive"``
    only those on films whose label is 1 (the target's fractures, e.g. physeal only).
    """
    if which not in ("all", "positive"):
        raise ValueError(f"train_boxes {which!r} is not one of all, positive")
    ids = frame["image_id"] if which == "all" else frame.loc[frame["label"] == 1, "image_id"]
    rows = boxes[(boxes["class"] == FRACTURE) & boxes["image_id"].isin(set(ids))]
    grouped = {key: part[["x", "y", "w", "h"]].to_numpy(np.float32) for key, part in rows.groupby("image_id")}
    return {image_id: grouped.get(image_id, np.zeros((0, 4), np.float32)) for image_id in frame["image_id"]}


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]], axis=1)


def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (len(a) × len(b)) of x, y, w, h boxes (pycocotools' box IoU)."""
    from pycocotools import mask

    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(mask.iou(a, b, [0] * len(b)))


def decode_detections(outputs: dict, scale: float = 1.0) -> list[np.ndarray]:
    """Model Garden detection outputs → one (n, 5) array (x, y, w, h, score) per image, fracture class only.

    ``detection_boxes`` are y0, x0, y1, x1 in the network's input pixels; dividing by ``scale``
    (the input's resize factor) gives preprocessed pixels.
    """
    boxes = np.asarray(outputs["detection_boxes"], np.float32)
    scores = np.asarray(outputs["detection_scores"], np.float32)
    classes = np.asarray(outputs["detection_classes"])
    counts = np.asarray(outputs["num_detections"]).reshape(-1).astype(int)
    decoded = []
    for i, count in enumerate(counts):
        keep = np.arange(len(scores[i])) < count
        keep &= (classes[i] == FRACTURE_ID) & (scores[i] > 0)
        xywh = yxyx_to_xywh(boxes[i][keep]) / scale
        order = np.argsort(-scores[i][keep], kind="stable")
        decoded.append(np.concatenate([xywh, scores[i][keep][:, None]], axis=1)[order].astype(np.float32))
    return decoded


def image_scores(boxes: list[np.ndarray]) -> np.ndarray:
    """Image-level fracture score: the highest box score, 0 without boxes."""
    return np.array([float(b[:, 4].max()) if len(b) else 0.0 for b in boxes])


def serving_detections(outputs: dict, scale: float = 1.0) -> dict[str, tf.Tensor]:
    """:func:`decode_detections` and :func:`image_scores` with TF ops, for the export's signature
    (:mod:`physis.serving`): ``boxes`` [B, N, 5] (x, y, w, h, score; fracture class only, best first,
    zero rows after ``num_boxes``), ``num_boxes`` [B] and the film ``score`` [B] (0 without a box)."""
    boxes = tf.cast(outputs["detection_boxes"], tf.float32)
    scores = tf.cast(outputs["detection_scores"], tf.float32)
    count = tf.reshape(tf.cast(outputs["num_detections"], tf.int32), [-1])
    keep = tf.range(tf.shape(scores)[1])[None] < count[:, None]
    keep &= (tf.cast(outputs["detection_classes"], tf.int32) == FRACTURE_ID) & (scores > 0)
    y0, x0, y1, x1 = tf.unstack(boxes, axis=-1)
    rows = tf.concat([tf.stack([x0, y0, x1 - x0, y1 - y0], axis=-1) / scale, scores[..., None]], axis=-1)
    order = tf.argsort(tf.where(keep, scores, -1.0), direction="DESCENDING", stable=True)  # kept ones first
    return {"score": tf.reduce_max(tf.where(keep, scores, 0.0), axis=1),
            "boxes": tf.gather(tf.where(keep[..., None], rows, 0.0), order, batch_dims=1),
            "num_boxes": tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)}


# --------------------------------------------------------------------------- input records


def write_records(frame: pd.DataFrame, boxes: dict[str, np.ndarray], path: Path) -> Path:
    """Write ``frame``'s films with their fracture boxes as Model Garden ``tf.train.Example`` records.

    Uses the convert stage's encoder (:func:`physis.export.tf_example`: 8-bit PNG, normalised
    boxes, box-filled instance masks) with the class relabelled to :data:`FRACTURE_ID`. Films
    without a box are kept: they teach the detector what fracture-free looks like.
    """
    from physis.export import tf_example

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for n, row in enumerate(frame.itertuples(index=False), start=1):
            film_boxes = pd.DataFrame(boxes[row.image_id], columns=["x", "y", "w", "h"]).assign(**{"class": FRACTURE})
            record = pd.Series({"path": row.path, "coco_id": n, "image_id": row.image_id})
            example = tf_example(record, film_boxes)
            labels = example.features.feature["image/object/class/label"].int64_list.value
            labels[:] = [FRACTURE_ID] * len(labels)
            writer.write(example.SerializeToString())
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- SpineNet-49 classifier


def spinenet_classifier(input_shape: tuple[int, int, int], dropout: float = 0.0,
                        norm_momentum: float = 0.99) -> tf_keras.Model:
    """official.vision SpineNet-49 + classification head → fracture probability [B, 1].

    Input: float32 [B, H, W, C] in [0, 1]; the model normalises with the ImageNet mean/std the
    Model Garden's parsers use, so Model Garden checkpoints stay usable.
    """
    from official.vision.configs import backbones, common
    from official.vision.configs.image_classification import ImageClassificationModel
    from official.vision.modeling import factory
    from official.vision.ops.preprocess_ops import MEAN_NORM, STDDEV_NORM

    height, width, channels = input_shape
    config = ImageClassificationModel(
        num_classes=1, input_size=[height, width, channels], dropout_rate=float(dropout),
        backbone=backbones.Backbone(type="spinenet", spinenet=backbones.SpineNet(model_id="49")),
        norm_activation=common.NormActivation(use_sync_bn=False, norm_momentum=float(norm_momentum)))
    specs = tf_keras.layers.InputSpec(shape=[None, height, width, channels])
    classifier = factory.build_classification_model(specs, config)
    inputs = tf_keras.Input(shape=(height, width, channels), name="image")
    mean, std = (np.resize(np.array(v, np.float32), channels) for v in (MEAN_NORM, STDDEV_NORM))
    normalised = tf_keras.layers.Normalization(mean=mean, variance=std ** 2, name="imagenet_norm")(inputs)
    probability = tf_keras.layers.Activation("sigmoid", dtype="float32", name="fracture")(classifier(normalised))
    return tf_keras.Model(inputs, probability, name="spinenet49_classifier")


def classification_model(model: tf_keras.Model):
    """The official.vision ClassificationModel inside a :func:`spinenet_classifier` model (the
    object Model Garden classification checkpoints hold as ``model``; its ``backbone`` as ``backbone``)."""
    return next(layer for layer in model.layers if hasattr(layer, "checkpoint_items"))


def restore_classifier(model: tf_keras.Model, path: str, modules: str) -> None:
    """Initialise a :func:`spinenet_classifier` model from an official.vision checkpoint, as
    ``ImageClassificationTask.initialize`` reads it (``backbone``: the SpineNet only)."""
    inner = classification_model(model)
    checkpoints.restore(path, modules, inner, inner.backbone,
                        f"the SpineNet-49 classifier (init_checkpoint_modules: {modules})")


def train_classifier(model: tf_keras.Model, data, cfg, callbacks_: list) -> None:
    """:func:`physis.train.fit_classifier` for a :func:`spinenet_classifier` model: the initial
    checkpoint (if any) loaded when the job starts from scratch, the SpineNet frozen first."""
    from physis.train import fit_classifier

    request = checkpoints.requested(cfg.params)
    initialize = None if request is None else functools.partial(restore_classifier, model, *request)
    fit_classifier(model, data, cfg, callbacks_, backbone=[classification_model(model).backbone],
                   initialize=initialize)


def classify(model: tf_keras.Model, images: tf.Tensor, batch_size: int = 32) -> np.ndarray:
    """Fracture probabilities of a stack of images (any count, fixed-size batches)."""
    images = tf.convert_to_tensor(images)
    if images.shape[0] == 0:
        return np.zeros(0)
    return np.concatenate([model(images[i:i + batch_size], training=False).numpy().reshape(-1)
                           for i in range(0, images.shape[0], batch_size)])


# --------------------------------------------------------------------------- official.vision detectors


def vision_detector_config(family: str, input_shape: tuple[int, int, int], params: dict):
    """The official.vision experiment for ``family`` (faster_rcnn, retinanet) with the CPU overrides."""
    from official.core import exp_factory
    from official.vision import registry_imports  # noqa: F401  (registers the experiments and tasks)

    backbone = params.get("backbone", "spinenet49")
    key = (family, backbone)
    if key not in VISION_EXPERIMENTS:
        raise ValueError(f"{family}: backbone {backbone!r} is not one of "
                         f"{', '.join(b for f, b in VISION_EXPERIMENTS if f == family)}")
    config = exp_factory.get_exp_config(VISION_EXPERIMENTS[key])
    config.runtime.mixed_precision_dtype = "float32"  # the configs default to bfloat16 (TPU)
    task = config.task
    task.init_checkpoint = ""  # physis loads params.init_checkpoint itself (on a fresh start only)
    model = task.model
    height, width, channels = input_shape
    model.num_classes = NUM_CLASSES
    model.input_size = [*padded_size(height, width, 2 ** model.max_level), 3]
    model.norm_activation.use_sync_bn = False
    model.norm_activation.norm_momentum = float(params["norm_momentum"])
    if params["anchor_size"] is not None:  # None: the experiment's own (SpineNet 3, ResNet-FPN 8)
        model.anchor.anchor_size = float(params["anchor_size"])
    model.detection_generator.pre_nms_score_threshold = float(params["score_threshold"])
    model.detection_generator.max_num_detections = int(params["max_detections"])
    if family == "faster_rcnn":
        model.include_mask = False
        model.mask_head = model.mask_sampler = model.mask_roi_aligner = None
        if params["head"] == "2fc":  # the classic head: 2.5-3.6x cheaper on CPU than 4 conv + 1 fc on 512 RoIs
            model.detection_head.num_convs = 0
            model.detection_head.num_fcs = 2
            model.roi_sampler.num_sampled_rois = int(params["num_rois"])
        elif params["head"] != "full":
            raise ValueError(f"head {params['head']!r} is not one of 2fc, full")
    data = task.train_data
    data.dtype = "float32"
    data.parser.aug_rand_hflip = True
    data.parser.aug_scale_min, data.parser.aug_scale_max = (float(v) for v in params["scale_jitter"])
    data.shuffle_buffer_size = 256
    return config


class VisionDetector:
    """An official.vision detector (Faster R-CNN or RetinaNet) with its task (losses, inputs)."""

    def __init__(self, family: str, input_shape: tuple[int, int, int], params: dict, model=None):
        from official.core import task_factory

        self.family = family
        self.input_hw = tuple(input_shape[:2])
        self.config = vision_detector_config(family, input_shape, params)
        self.task = task_factory.get_task(self.config.task)
        self.model = model if model is not None else self.task.build_model()
        self.padded_hw = tuple(self.config.task.model.input_size[:2])

    @property
    def backbone(self) -> tf_keras.Model:
        return self.model.backbone

    def ensure_built(self) -> None:
        """Create every variable (the heads are built on their first call): one detection pass."""
        self._detect(tf.zeros([1, *self.input_hw, 3]))

    def restore_initial(self, path: str, modules: str) -> None:
        """Load an official.vision checkpoint as the task's ``initialize()`` reads it."""
        self.ensure_built()
        checkpoints.restore(path, modules, self.model, self.model.backbone,
                            f"{self.family} (init_checkpoint_modules: {modules})")

    def dataset(self, records: Path, batch_size: int, seed: int) -> tf.data.Dataset:
        """Infinite, shuffled, augmented training batches from :func:`write_records` output."""
        data = self.config.task.train_data.replace(
            input_path=str(records), global_batch_size=int(batch_size), is_training=True, seed=seed)
        return self.task.build_inputs(data)

    def train_step(self, opt) -> Callable:
        """The task's own ``train_step`` (RPN + Fast R-CNN or focal losses) as one tf.function."""
        @tf.function
        def step(inputs):
            return self.task.train_step(inputs, self.model, opt)["loss"]
        return step

    @functools.cached_property
    def _detect(self) -> Callable:
        from official.vision.ops.preprocess_ops import normalize_image

        height, width = self.input_hw

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def detect(images):
            images = normalize_image(images)
            images = tf.image.pad_to_bounding_box(images, 0, 0, *self.padded_hw)
            shape = tf.tile(tf.constant([[height, width]], tf.float32), [tf.shape(images)[0], 1])
            outputs = self.model(images, image_shape=shape, training=False)
            return {key: outputs[key] for key in
                    ("detection_boxes", "detection_scores", "detection_classes", "num_detections")}
        return detect

    def detect(self, images) -> list[np.ndarray]:
        """Boxes (x, y, w, h, score) per image of a batch (float32 [B, H, W, C] in [0, 1])."""
        images = rgb(tf.convert_to_tensor(images, tf.float32))
        return decode_detections({k: v.numpy() for k, v in self._detect(images).items()})


# --------------------------------------------------------------------------- legacy ShapeMask


@functools.cache
def _fixed_spinenet_builder():
    """The legacy SpineNet builder with both input bugs fixed for this model instance only.

    Bug 1: ``SpineNetBuilder`` always builds ``InputSpec([None, 640, 640, 3])``; here the spec
    comes from the actual input tensor. Bug 2: ``SpineNet.__init__`` passes ``shape[1]`` (the
    height) as ``input_width`` to the scale-permuted network, which mis-sizes the resampling of
    non-square inputs ("AddN … [?,8,4,1024] vs [?,16,8,1024]"); here it gets ``shape[2]``, as
    official.vision's SpineNet does.
    """
    from official.legacy.detection.modeling.architecture import spinenet

    class SpineNet(spinenet.SpineNet):
        def __init__(self, input_specs, **kwargs):
            self._input_width = input_specs.shape[2]
            super().__init__(input_specs=input_specs, **kwargs)

        def _build_scale_permuted_network(self, net, input_width, weighted_fusion=False):
            return super()._build_scale_permuted_network(net, self._input_width, weighted_fusion)

    class SpineNetBuilder(spinenet.SpineNetBuilder):
        def __call__(self, inputs, is_training=None):
            specs = tf_keras.layers.InputSpec(shape=[None, *inputs.shape[1:]])
            model = SpineNet(
                input_specs=specs, min_level=self._min_level, max_level=self._max_level,
                block_specs=self._block_specs, endpoints_num_filters=self._endpoints_num_filters,
                resample_alpha=self._resample_alpha, block_repeats=self._block_repeats,
                filter_size_scale=self._filter_size_scale, kernel_initializer=self._kernel_initializer,
                kernel_regularizer=self._kernel_regularizer, bias_regularizer=self._bias_regularizer,
                activation=self._activation, use_sync_bn=self._use_sync_bn,
                norm_momentum=self._norm_momentum, norm_epsilon=self._norm_epsilon)
            return model(inputs)

    return SpineNetBuilder


def shapemask_params(input_hw: tuple[int, int], params: dict, batch_size: int):
    """``configs.factory.config_generator('shapemask')`` with SpineNet-49 and the CPU overrides."""
    from official.legacy.detection.configs import factory as config_factory

    config = config_factory.config_generator("shapemask")
    anchor = {} if params["anchor_size"] is None else {"anchor_size": float(params["anchor_size"])}
    config.override({
        "use_tpu": False,
        "strategy_type": "one_device",
        "architecture": {"backbone": "spinenet", "multilevel_features": "identity", "use_bfloat16": False,
                         "num_classes": NUM_CLASSES},
        "spinenet": {"model_id": "49"},
        "norm_activation": {"batch_norm_momentum": float(params["norm_momentum"])},
        "anchor": anchor,
        # the shipped prefix freezes the first conv/BN layers, meant for an ImageNet-initialised
        # ResNet; from random initialisation everything must train
        "train": {"batch_size": int(batch_size), "frozen_variable_prefix": "", "train_file_pattern": ""},
        "eval": {"batch_size": int(params["predict_batch_size"])},
        "shapemask_parser": {"output_size": list(input_hw), "aug_scale_min": float(params["scale_jitter"][0]),
                             "aug_scale_max": float(params["scale_jitter"][1])},
        "postprocess": {"score_threshold": float(params["score_threshold"]),
                        "max_total_size": int(params["max_detections"]), "pre_nms_num_boxes": 1000},
    }, is_strict=True)
    config.validate()
    config.lock()
    return config


class ShapeMaskDetector:
    """Legacy ShapeMask + SpineNet-49: the train-mode model (weights) and an eval-mode twin.

    The legacy code builds separate functional models per mode (the eval graph adds detection
    post-processing, the train graph takes ground-truth mask boxes); :meth:`detect` copies the
    trained weights into the eval twin before use. Images are resized by the legacy
    ``resize_and_crop_image`` to ``input_hw`` (multiples of 128: levels 3-7), so boxes come back
    scaled to the frame of the images given.
    """

    def __init__(self, source_hw: tuple[int, int], input_hw: tuple[int, int], params: dict, batch_size: int):
        from official.legacy.detection.dataloader import mode_keys
        from official.legacy.detection.modeling import factory as model_factory

        self.source_hw, self.input_hw = tuple(source_hw), tuple(input_hw)
        self.params = shapemask_params(self.input_hw, params, batch_size)
        self.predict_batch = int(params["predict_batch_size"])

        def build(mode):
            model_fn = model_factory.model_generator(self.params)
            # the legacy factory builds SpineNet with its default batch-norm momentum (0.99), not
            # norm_activation's: pass the configured one (eval-mode boxes depend on settled statistics)
            model_fn._backbone_fn = _fixed_spinenet_builder()(model_id="49",
                                                              norm_momentum=float(params["norm_momentum"]))
            return model_fn, model_fn.build_model(self.params, mode)

        self._model_fn, self.model = build(mode_keys.TRAIN)
        self._loss_fn = self._model_fn.build_loss_fn()
        self._eval_fn, self._eval_model = build(mode_keys.PREDICT)
        self.scale = min(self.input_hw[0] / self.source_hw[0], self.input_hw[1] / self.source_hw[1])

    @property
    def backbone(self) -> tf_keras.Model:
        """The train model's SpineNet (a nested model; layer names vary with what the process built before)."""
        from official.legacy.detection.modeling.architecture import spinenet

        return next(layer for layer in self.model.layers if isinstance(layer, spinenet.SpineNet))

    def ensure_built(self) -> None:
        """Nothing to do: the legacy models are functional, built with all their variables."""

    def restore_initial(self, path: str, modules: str) -> None:
        """Load a checkpoint the way the legacy detection package does (``all``: the train model;
        ``backbone``: its SpineNet), then refresh the eval twin: an object-based one as its executor
        restores its own (``model`` at the top, as physis's loop checkpoints too), a name-based (TF1)
        one with its ``checkpoint_utils`` initialiser."""
        label = f"ShapeMask (init_checkpoint_modules: {modules})"
        if checkpoints.object_based(path):
            checkpoints.restore(path, modules, self.model, self.backbone, label)
        else:
            checkpoints.restore_by_name(self.model if modules == "all" else self.backbone, path, label)
        self.sync()

    def dataset(self, records: Path, batch_size: int, seed: int) -> tf.data.Dataset:
        from official.legacy.detection.dataloader import input_reader, mode_keys

        return input_reader.InputFn(str(records), self.params, mode_keys.TRAIN, int(batch_size))()

    def train_step(self, opt) -> Callable:
        """Forward, the model's ``build_loss_fn`` loss, backward: the legacy executor's step."""
        variables = self._model_fn.make_filter_trainable_variables_fn()(self.model.trainable_variables)

        @tf.function
        def step(batch):
            inputs, labels = batch
            with tf.GradientTape() as tape:
                outputs = self.model(inputs, training=True)
                loss = self._loss_fn(labels, outputs)["total_loss"]
            grads = tape.gradient(loss, variables)
            opt.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            return loss
        return step

    def sync(self) -> None:
        """Copy the train model's weights into the eval-mode twin."""
        self._eval_model.set_weights(self.model.get_weights())

    @functools.cached_property
    def _detect(self) -> Callable:
        from official.legacy.detection.utils import input_utils

        @tf.function
        def detect(images):
            images = input_utils.normalize_image(rgb(images))
            resized, infos = tf.map_fn(
                lambda image: input_utils.resize_and_crop_image(image, list(self.input_hw), list(self.input_hw)),
                images, fn_output_signature=(tf.TensorSpec([*self.input_hw, 3], tf.float32),
                                             tf.TensorSpec([4, 2], tf.float32)))
            outputs = self._eval_model({"image": resized, "image_info": infos}, training=False)
            return {key: outputs[key] for key in
                    ("detection_boxes", "detection_scores", "detection_classes", "num_detections")}
        return detect

    def detect(self, images) -> list[np.ndarray]:
        """Boxes (x, y, w, h, score) in the images' pixels, per image of a batch in [0, 1]."""
        images = tf.convert_to_tensor(images, tf.float32)
        count = int(images.shape[0])
        decoded = []
        for start in range(0, count, self.predict_batch):  # the eval graph has a fixed batch size
            chunk = images[start:start + self.predict_batch]
            pad = self.predict_batch - int(chunk.shape[0])
            if pad:
                chunk = tf.concat([chunk, tf.zeros([pad, *chunk.shape[1:]], chunk.dtype)], axis=0)
            outputs = {k: v.numpy() for k, v in self._detect(chunk).items()}
            decoded += decode_detections(outputs, self.scale)[:self.predict_batch - pad]
        return decoded


# --------------------------------------------------------------------------- training loops


#: A progress line (running mean loss, seconds per step) every this many training steps; the
#: epoch's line with its validation metrics follows from :func:`physis.train.run_epochs`.
LOG_EVERY_STEPS = 10


def run_steps(step: Callable, iterator, steps: int, every: int = LOG_EVERY_STEPS) -> float:
    """Run ``steps`` training steps, with a progress line every ``every`` steps and after the last; the mean loss."""
    losses: list[float] = []
    start = time.monotonic()
    for done in range(1, int(steps) + 1):
        losses.append(float(step(next(iterator))))
        if done % every == 0 or done == int(steps):
            log.info("step %d/%d: loss=%.4f (%.2f s/step)", done, steps, float(np.mean(losses)),
                     (time.monotonic() - start) / done)
    if not all(math.isfinite(v) for v in losses):
        raise FloatingPointError(f"non-finite training loss: {losses}")
    return float(np.mean(losses))


def iterate(dataset: tf.data.Dataset):
    """``iter(dataset)``, outside TF op determinism when its rewrite fails on the dataset.

    Under ``enable_op_determinism`` tf.data rewrites parallel maps with random ops into
    deterministic ones; on the RetinaNet parser (TF 2.20) that rewrite fails with "input[0] ==
    '^args_3', is not found ... make_deterministic_parallel_map_and_batch". Such a pipeline then
    runs without the rewrite: seeded, but its augmentation order is not bit-identical across runs.
    """
    try:
        return iter(dataset)
    except tf.errors.InvalidArgumentError as error:
        if "make_deterministic" not in str(error):
            raise
        # TF has no public switch back (only enable_op_determinism): the private one, briefly
        from tensorflow.python.framework import config as tf_config

        log.warning("training input pipeline runs without TF op determinism (TF's rewrite fails on it)")
        tf_config.disable_op_determinism()
        try:
            return iter(dataset)
        finally:
            tf_config.enable_op_determinism()


def detect_all(detector, images: tf.data.Dataset) -> list[np.ndarray]:
    """Boxes per image over a batched dataset of images (or (image, label) pairs)."""
    if isinstance(detector, ShapeMaskDetector):
        detector.sync()
    found: list[np.ndarray] = []
    for batch in images:
        found += detector.detect(batch[0] if isinstance(batch, tuple) else batch)
    return found


#: Training films the custom loops score after every epoch, for training-vs-validation AUROC curves.
TRAINING_SAMPLE = 64


def training_sample(train: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A fixed sample of the training films (the same every epoch), for the training AUROC."""
    return train.sample(n=min(TRAINING_SAMPLE, len(train)), random_state=seed)


class DetectorLoop:
    """``train_epoch`` / ``evaluate`` closures of one detector for :func:`physis.train.run_epochs`.

    Training batches come from the train films' records (all films, boxes per ``train_boxes``);
    ``evaluate`` scores the validation films by their highest box score. With ``frozen_epochs``
    (fine-tuning from an initial checkpoint) epochs before that number train with the backbone
    frozen (its batch norm in inference mode) at ``learning_rate``, later ones everything at
    ``learning_rate * finetune_lr_factor``; the phase follows from the epoch number, so a resumed
    job picks up the right one.
    """

    def __init__(self, detector, data, work_dir: Path, *, batch_size: int, steps: int, learning_rate: float,
                 optimizer_name: str, clip_norm: float, train_boxes: str, seed: int, frozen_epochs: int = 0,
                 finetune_lr_factor: float = 0.1):
        train = data.frames["train"]
        records = self.training_records(train, data.boxes, train_boxes, Path(work_dir) / "records" / "train.tfrecord")
        self.detector = detector
        self.iterator = iterate(detector.dataset(records, batch_size, seed))
        self.learning_rate = float(learning_rate)
        self.optimizer = optimizer(optimizer_name, learning_rate, clip_norm)
        self.frozen_epochs, self.finetune_lr_factor = int(frozen_epochs), float(finetune_lr_factor)
        if self.frozen_epochs:
            # one optimizer for both phases, built on every variable: unfreezing finds the backbone's slots
            detector.ensure_built()
            self.optimizer.build(detector.model.trainable_variables)
        self.frozen: bool | None = None  # the phase the current ``step`` was traced for
        self.step = None
        self.steps = int(steps)
        self.val = data.frames.get("val")
        self.train_sample = training_sample(data.frames["train"], seed)

    def training_records(self, train: pd.DataFrame, boxes: pd.DataFrame, train_boxes: str, path: Path) -> Path:
        """The training films' records: their fracture boxes (:func:`write_records`)."""
        return write_records(train, fracture_boxes(train, boxes, train_boxes), path)

    def enter_phase(self, epoch: int) -> None:
        """Freeze or unfreeze the backbone and set the learning rate for ``epoch``; retrace the step
        when the trainable variables change."""
        frozen = epoch < self.frozen_epochs
        if frozen is self.frozen:
            return
        self.detector.backbone.trainable = not frozen
        finetuning = self.frozen_epochs and not frozen
        self.optimizer.learning_rate = self.learning_rate * (self.finetune_lr_factor if finetuning else 1.0)
        self.step = self.detector.train_step(self.optimizer)
        self.frozen = frozen
        if self.frozen_epochs:
            log.info("epoch %d: %s", epoch + 1, "backbone frozen" if frozen else "fine-tuning everything")

    @property
    def trackables(self) -> dict:
        return {"model": self.detector.model, "optimizer": self.optimizer}

    def train_epoch(self, epoch: int) -> dict:
        self.enter_phase(epoch)
        return {"loss": run_steps(self.step, self.iterator, self.steps)}

    def evaluate(self) -> dict:
        if self.val is None or self.val.empty:
            return {"val_auroc": float("nan")}
        found = detect_all(self.detector, film_images(self.val, 3, 8))
        seen = detect_all(self.detector, film_images(self.train_sample, 3, 8))
        return {"auroc": auroc(self.train_sample["label"], image_scores(seen)),
                "val_auroc": auroc(self.val["label"], image_scores(found)),
                "val_boxes_per_image": float(np.mean([len(b) for b in found]))}


# --------------------------------------------------------------------------- two-stage: crops


def crop_windows(boxes: np.ndarray, image_hw: tuple[int, int], context: float, min_size: float) -> np.ndarray:
    """Square windows (y0, x0, y1, x1, normalised) centred on x, y, w, h boxes.

    Side = ``context`` × the box's longer side, at least ``min_size`` pixels; a window may reach
    past the border (filled with zeros by ``crop_and_resize``).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    height, width = image_hw
    side = np.maximum(np.maximum(boxes[:, 2], boxes[:, 3]) * context, min_size)
    cx, cy = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    return np.stack([(cy - side / 2) / height, (cx - side / 2) / width,
                     (cy + side / 2) / height, (cx + side / 2) / width], axis=1).astype(np.float32)


#: The crop window of a whole film (y0, x0, y1, x1, normalised): stage 2's fallback.
WHOLE_FILM = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)


def proposal_windows(proposals: list[np.ndarray], image_hw: tuple[int, int], top_k: int, context: float,
                     min_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows and their image index for a batch: the top ``top_k`` proposals of each image,
    or the whole film when an image has none."""
    windows, indices = [], []
    for i, found in enumerate(proposals):
        found = found[:top_k]
        image_windows = crop_windows(found[:, :4], image_hw, context, min_size) if len(found) else WHOLE_FILM
        windows.append(image_windows)
        indices += [i] * len(image_windows)
    return np.concatenate(windows), np.array(indices, np.int32)


def crop_table(frame: pd.DataFrame, gt: dict[str, np.ndarray], proposals: dict[str, np.ndarray],
               image_hw: tuple[int, int], params: dict) -> pd.DataFrame:
    """Stage-2 training crops: one row per (film, window, label).

    Positives and hard negatives come from where stage 2 will look: windows around every true
    fracture box and every top proposal take the film's label when they overlap a fracture box
    (IoU ≥ ``positive_iou``) and 0 otherwise; each film also adds its whole-film window (the
    fallback when stage 1 proposes nothing) with the film's label. Fracture boxes on negative
    films (fractures that are not the target, e.g. metaphyseal ones for ``physeal``) thus become
    negatives: stage 1 finds fractures, stage 2 decides.
    """
    rows = []
    for film in frame.itertuples(index=False):
        truth = gt.get(film.image_id, np.zeros((0, 4), np.float32))
        found = proposals.get(film.image_id, np.zeros((0, 5), np.float32))[: int(params["num_proposals"])]
        candidates = np.concatenate([truth, found[:, :4]]) if len(found) else truth
        hits = (iou_xywh(candidates, truth).max(axis=1) >= float(params["positive_iou"])
                if len(truth) else np.zeros(len(candidates), bool))
        windows = crop_windows(candidates, image_hw, float(params["crop_context"]), float(params["crop_min_size"]))
        for window, hit in zip(np.concatenate([windows, WHOLE_FILM]), [*hits, True]):
            rows.append({"image_id": film.image_id, "path": film.path, "label": float(film.label) * float(hit),
                         "y0": window[0], "x0": window[1], "y1": window[2], "x1": window[3]})
    return pd.DataFrame(rows, columns=["image_id", "path", "label", "y0", "x0", "y1", "x1"])


def crop_dataset(table: pd.DataFrame, image_hw: tuple[int, int], channels: int, size: int, batch_size: int,
                 seed: int, jitter: float = 0.15) -> tf.data.Dataset:
    """Infinite, class-balanced batches of (crop [B, size, size, C], label [B]) for stage 2.

    Each crop window is jittered (shift up to ``jitter`` × its side, scale 0.85-1.2) and flipped
    left-right at random.
    """
    from physis.pipeline import decode

    def load(path, window, label):
        image = decode(path, image_hw)
        image = tf.image.grayscale_to_rgb(image) if channels == 3 else image
        side = window[2:] - window[:2]
        centre = (window[2:] + window[:2]) / 2 + tf.random.uniform([2], -jitter, jitter) * side
        half = side * tf.random.uniform([], 0.85, 1.2) / 2
        crop = tf.image.crop_and_resize(image[None], tf.concat([centre - half, centre + half], 0)[None], [0],
                                        [size, size])[0]
        return tf.image.random_flip_left_right(crop), label

    parts = []
    for label in (1.0, 0.0):
        part = table[table["label"] == label]
        if len(part):
            slices = (part["path"].astype(str).tolist(),
                      part[["y0", "x0", "y1", "x1"]].to_numpy(np.float32), part["label"].to_numpy(np.float32))
            parts.append(tf.data.Dataset.from_tensor_slices(slices).shuffle(len(part), seed=seed).repeat())
    mixed = parts[0] if len(parts) == 1 else tf.data.Dataset.sample_from_datasets(parts, [0.5, 0.5], seed=seed)
    return mixed.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)


def classifier_step(model: tf_keras.Model, opt) -> Callable:
    """One binary cross-entropy training step of a probability-output classifier."""
    bce = tf_keras.losses.BinaryCrossentropy()

    @tf.function
    def step(batch):
        images, labels = batch
        with tf.GradientTape() as tape:
            loss = bce(labels[:, None], model(images, training=True))
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        opt.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return loss
    return step


# --------------------------------------------------------------------------- two-stage model


class TwoStage:
    """ShapeMask + SpineNet-49 (the thesis's best model): two tf_keras models joined by plain TF ops.

    Stage 1 (:class:`ShapeMaskDetector`, on the film scaled by ``stage1_scale``) proposes fracture
    regions; each of the top ``num_proposals`` is cropped from the full-resolution preprocessed
    film and scored by stage 2 (the SpineNet-49 classifier); the film's score is the best crop's.
    A film without proposals is scored on the whole film. A tf_keras model cannot be nested in
    another graph, hence the plain ``crop_and_resize`` between them.
    """

    def __init__(self, input_shape: tuple[int, int, int], params: dict):
        height, width, channels = input_shape
        self.image_hw = (height, width)
        self.channels = channels
        self.params = dict(params)
        stage1_hw = (multiple_of(height * float(params["stage1_scale"]), 128),
                     multiple_of(width * float(params["stage1_scale"]), 128))
        self.detector = ShapeMaskDetector(self.image_hw, stage1_hw, params, int(params["stage1_batch_size"]))
        size = int(params["crop_size"])
        self.classifier = spinenet_classifier((size, size, channels), float(params["dropout"]),
                                              float(params["norm_momentum"]))
        self._last = None

    def _checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(stage1=self.detector.model, stage2=self.classifier)

    def save_weights(self, path: str) -> None:
        """Both stages in one TF checkpoint (``path.index`` + data), children ``stage1`` and ``stage2``."""
        self._checkpoint().write(str(path))

    def load_weights(self, path: str):
        status = self._checkpoint().read(str(path))
        self.detector.sync()
        self._last = None
        return status

    def count_params(self) -> int:
        return int(self.detector.model.count_params() + self.classifier.count_params())

    def windows(self, proposals: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        return proposal_windows(proposals, self.image_hw, int(p["num_proposals"]), float(p["crop_context"]),
                                float(p["crop_min_size"]))

    def score_batch(self, images, proposals: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Film scores of a batch given its proposals; and per film the crop scores (x, y, w, h, score)."""
        images = tf.convert_to_tensor(images, tf.float32)
        windows, indices = self.windows(proposals)
        size = int(self.params["crop_size"])
        probabilities = classify(self.classifier, tf.image.crop_and_resize(images, windows, indices, [size, size]))
        scores = np.zeros(len(proposals))
        scored = []
        height, width = self.image_hw
        for i in range(len(proposals)):
            mine = indices == i
            scores[i] = probabilities[mine].max()
            w = windows[mine]
            xywh = np.stack([w[:, 1] * width, w[:, 0] * height, (w[:, 3] - w[:, 1]) * width,
                             (w[:, 2] - w[:, 0]) * height], axis=1)
            scored.append(np.concatenate([xywh, probabilities[mine][:, None]], axis=1).astype(np.float32))
        return scores, scored

    def predict(self, images: tf.data.Dataset) -> tuple[np.ndarray, list[np.ndarray]]:
        """Film scores and stage-1 proposals over a batched dataset of films in [0, 1]; kept for
        the same dataset (the plugin's ``predict`` then ``predict_boxes``)."""
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        self.detector.sync()
        scores, proposals = [], []
        for batch in images:
            batch = batch[0] if isinstance(batch, tuple) else batch
            found = self.detector.detect(batch)
            scores.append(self.score_batch(batch, found)[0])
            proposals += found
        self._last = (images, ((np.concatenate(scores) if scores else np.zeros(0)), proposals))
        return self._last[1]


class CropLoop:
    """Stage-2 ``train_epoch`` / ``evaluate`` for :func:`physis.train.run_epochs`.

    Runs the (trained) stage 1 once over the train and validation films; trains the classifier on
    :func:`crop_table` crops and validates the whole two-stage model on the validation films.
    """

    def __init__(self, model: TwoStage, data, *, batch_size: int, steps: int, learning_rate: float,
                 clip_norm: float, seed: int):
        p = model.params
        self.model = model
        model.detector.sync()
        train = data.frames["train"]
        train_proposals = detect_all(model.detector, film_images(train, model.channels, 8))
        gt = fracture_boxes(train, data.boxes, "all")
        table = crop_table(train, gt, dict(zip(train["image_id"], train_proposals)), model.image_hw, p)
        log.info("stage 2: %d crops (%d positive) from %d films", len(table), int(table["label"].sum()), len(train))
        self.table = table
        sample = training_sample(train, seed)
        self.train_sample = (sample["label"], film_images(sample, model.channels, 8),
                             [train_proposals[i] for i in sample.index])
        dataset = crop_dataset(table, model.image_hw, model.channels, int(p["crop_size"]), batch_size, seed)
        self.iterator = iter(dataset)
        self.optimizer = optimizer("adam", learning_rate, clip_norm)
        self.step = classifier_step(model.classifier, self.optimizer)
        self.steps = int(steps)
        self.val = data.frames.get("val")
        if self.val is not None and not self.val.empty:
            self.val_images = film_images(self.val, model.channels, 8)
            self.val_proposals = detect_all(model.detector, self.val_images)

    @property
    def trackables(self) -> dict:
        return {"model": self.model.classifier, "optimizer": self.optimizer}

    def train_epoch(self, epoch: int) -> dict:
        return {"loss": run_steps(self.step, self.iterator, self.steps)}

    def score(self, images: tf.data.Dataset, proposals: list[np.ndarray]) -> np.ndarray:
        """Stage-2 film scores of batched ``images`` whose stage-1 ``proposals`` are known."""
        scores, start = [], 0
        for batch in images:
            scores.append(self.model.score_batch(batch, proposals[start:start + int(batch.shape[0])])[0])
            start += int(batch.shape[0])
        return np.concatenate(scores)

    def evaluate(self) -> dict:
        if self.val is None or self.val.empty:
            return {"val_auroc": float("nan")}
        labels, images, proposals = self.train_sample
        return {"auroc": auroc(labels, self.score(images, proposals)),
                "val_auroc": auroc(self.val["label"], self.score(self.val_images, self.val_proposals)),
                "val_stage1_auroc": auroc(self.val["label"], image_scores(self.val_proposals))}


# --------------------------------------------------------------------------- plugin hooks


def _stage_cfg(cfg, folder: str):
    """``cfg`` with its own work folder (own checkpoints, history and best weights) for one stage."""
    import dataclasses

    return dataclasses.replace(cfg, work_dir=Path(cfg.work_dir) / folder)


def _detector(family: str, model, cfg) -> VisionDetector:
    """The model's detector wrapper, made once per model so its traced ``detect`` is reused."""
    found = getattr(model, "_physis_detector", None) if model is not None else None
    if found is None:
        found = VisionDetector(family, cfg.input_shape, cfg.params, model)
        object.__setattr__(found.model, "_physis_detector", found)  # bypasses Keras tracking: not in checkpoints
    return found


def build_detector(family: str, cfg) -> tf_keras.Model:
    return _detector(family, None, cfg).model


def fine_tuning(detector, params: dict) -> tuple[dict, Callable[[], None] | None]:
    """The schedule of a detector given its plugin parameters: :class:`DetectorLoop`'s
    ``frozen_epochs`` / ``finetune_lr_factor`` (no freezing without an initial checkpoint) and the
    ``initialize`` of :func:`physis.train.run_epochs` (None without one)."""
    request = checkpoints.requested(params)
    if request is None:
        return {}, None
    schedule = {"frozen_epochs": int(params["frozen_epochs"]),
                "finetune_lr_factor": float(params["finetune_lr_factor"])}
    return schedule, functools.partial(detector.restore_initial, *request)


def train_detector(family: str, model, data, cfg) -> None:
    """Resumable epochs of the task's train steps (:func:`physis.train.run_epochs`), early-stopped
    on the validation AUROC of the image scores; fine-tuned from ``init_checkpoint`` if one is set."""
    from physis.train import run_epochs

    p = cfg.params
    detector = _detector(family, model, cfg)
    schedule, initialize = fine_tuning(detector, p)
    loop = DetectorLoop(detector, data, cfg.work_dir, batch_size=p["batch_size"], steps=p["steps_per_epoch"],
                        learning_rate=p["learning_rate"], optimizer_name=p["optimizer"], clip_norm=p["clip_norm"],
                        train_boxes=p["train_boxes"], seed=cfg.seed, **schedule)
    run_epochs(cfg, trackables=loop.trackables, train_epoch=loop.train_epoch, evaluate=loop.evaluate,
               epochs=int(p["epochs"]), patience=int(p["patience"]), initialize=initialize)


def detector_boxes(family: str, model, data, cfg) -> list[np.ndarray]:
    """Boxes per film of ``data``; kept for the same ``data`` (``predict`` then ``predict_boxes``)."""
    detector = _detector(family, model, cfg)
    last = getattr(detector, "_last", None)
    if last is None or last[0] is not data:
        detector._last = (data, detect_all(detector, data.images))
    return detector._last[1]


def detector_serving(family: str, model, cfg) -> Callable:
    """The plugin's ``serving`` hook: a batch's film scores and boxes, as ``predict`` and ``predict_boxes``."""
    detector = _detector(family, model, cfg)
    return lambda images: serving_detections(detector._detect(rgb(images)))


def explain_detector(family: str, model, image, cfg):
    from physis.plugins import Explanation

    return Explanation(boxes=_detector(family, model, cfg).detect(as_batch(image, cfg.input_shape[-1]))[0])


def train_two_stage(model: TwoStage, data, cfg) -> None:
    """Stage 1 (ShapeMask, fine-tuned from ``init_checkpoint`` if one is set) to completion in
    ``work_dir/stage1``, then stage 2 (crop classifier, from scratch); both resumable and
    early-stopped (stage 1 on its own image-score AUROC)."""
    from physis.train import run_epochs

    p = cfg.params
    epochs, patience, steps = int(p["epochs"]), int(p["patience"]), int(p["steps_per_epoch"])
    stage1_cfg = _stage_cfg(cfg, "stage1")
    schedule, initialize = fine_tuning(model.detector, p)
    stage1 = DetectorLoop(model.detector, data, stage1_cfg.work_dir, batch_size=p["stage1_batch_size"], steps=steps,
                          learning_rate=p["learning_rate"], optimizer_name=p["optimizer"], clip_norm=p["clip_norm"],
                          train_boxes=p["train_boxes"], seed=cfg.seed, **schedule)
    run_epochs(stage1_cfg, trackables=stage1.trackables, train_epoch=stage1.train_epoch, evaluate=stage1.evaluate,
               epochs=epochs, patience=patience, initialize=initialize)
    stage2 = CropLoop(model, data, batch_size=p["batch_size"], steps=steps, learning_rate=p["learning_rate"],
                      clip_norm=p["clip_norm"], seed=cfg.seed)
    run_epochs(cfg, trackables=stage2.trackables, train_epoch=stage2.train_epoch, evaluate=stage2.evaluate,
               epochs=epochs, patience=patience)


def two_stage_serving(model: TwoStage, cfg) -> Callable:
    """The plugin's ``serving`` hook: :meth:`TwoStage.predict` with TF ops. ShapeMask's eval graph takes
    ``predict_batch_size`` films at a time, so the batch is padded to a multiple of it and mapped over;
    crops around the top ``num_proposals`` proposals (the whole film without one) go through stage 2 at
    once, and a film's score is its best crop's. ``boxes`` are the stage-1 proposals."""
    detector, p = model.detector, model.params
    detector.sync()
    chunk, top_k, size = detector.predict_batch, int(p["num_proposals"]), int(p["crop_size"])
    height, width = model.image_hw

    def detect(images):
        return serving_detections(detector._detect(images), detector.scale)

    def serve(images):
        count = tf.shape(images)[0]
        padded = tf.pad(images, [[0, -count % chunk], [0, 0], [0, 0], [0, 0]])
        found = tf.map_fn(detect, tf.reshape(padded, [-1, chunk, *images.shape[1:]]), fn_output_signature={
            "score": tf.TensorSpec([chunk], tf.float32), "boxes": tf.TensorSpec([chunk, None, 5], tf.float32),
            "num_boxes": tf.TensorSpec([chunk], tf.int32)})
        boxes = tf.reshape(found["boxes"], [-1, tf.shape(found["boxes"])[2], 5])[:count]
        num = tf.reshape(found["num_boxes"], [-1])[:count]
        top = boxes[:, :top_k]
        slots = tf.range(tf.shape(top)[1])[None]
        whole = (num[:, None] == 0) & (slots == 0)  # no proposal: the first slot is the whole film
        x, y, w, h = tf.unstack(top[..., :4], axis=-1)
        side = tf.maximum(tf.maximum(w, h) * float(p["crop_context"]), float(p["crop_min_size"]))  # crop_windows
        cx, cy = x + w / 2, y + h / 2
        windows = tf.stack([(cy - side / 2) / height, (cx - side / 2) / width,
                            (cy + side / 2) / height, (cx + side / 2) / width], axis=-1)
        windows = tf.where(whole[..., None], tf.constant(WHOLE_FILM[0]), windows)
        crops = tf.image.crop_and_resize(images, tf.reshape(windows, [-1, 4]),
                                         tf.repeat(tf.range(count), tf.shape(top)[1]), [size, size])
        crop_scores = tf.reshape(model.classifier(crops, training=False), [count, -1])
        valid = (slots < num[:, None]) | whole
        return {"score": tf.reduce_max(tf.where(valid, crop_scores, -1.0), axis=1), "boxes": boxes, "num_boxes": num}
    return serve


def explain_two_stage(model: TwoStage, image, cfg):
    """The crops stage 2 looked at, scored by stage 2 (x, y, w, h, probability)."""
    from physis.plugins import Explanation

    batch = as_batch(image, cfg.input_shape[-1])
    model.detector.sync()
    return Explanation(boxes=model.score_batch(batch, model.detector.detect(batch))[1][0])
