"""The thesis's best model (80.9% accuracy, Table 5.1; sections 7.7-7.8, Listings 7.11-7.12): a
two-stage ensemble of TF Model Garden networks.

Stage 1: ShapeMask (Kuo et al., ICCV 2019; official.legacy.detection) with a SpineNet-49 backbone,
trained on the fracture boxes (instance masks filled from the boxes), proposes fracture regions on
the film scaled by ``stage1_scale``. Stage 2: a SpineNet-49 classifier scores square crops around
the top ``num_proposals`` proposals, cut from the full-resolution preprocessed film; the film's
score is the best crop's, or the whole film's when stage 1 proposes nothing. Stage 2 trains on
crops around true fracture boxes and stage-1 proposals (label: the film's label where the crop
overlaps a fracture box, else 0) and on whole films. The two tf_keras models stay separate, joined
by ``crop_and_resize``; the legacy SpineNet's input bugs are fixed per instance in physis.garden.
``init_checkpoint`` fine-tunes stage 1 from a checkpoint the legacy detection package reads (README:
pretrained checkpoints); stage 2 trains from scratch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from physis.plugins import Explanation, ModelSpec, Resources

if TYPE_CHECKING:  # Snakemake reads SPEC while parsing: heavy imports stay inside the hooks
    import numpy as np

SPEC = ModelSpec(
    kind="two_stage",
    framework="tf_keras",
    preset="letterbox_512x256",
    channels=3,
    needs_boxes=True,
    params={
        "epochs": 4,  # per stage
        "steps_per_epoch": 40,  # per stage
        "batch_size": 8,  # stage-2 crops per step
        "stage1_batch_size": 2,  # films per ShapeMask step
        "learning_rate": 1e-3,
        "optimizer": "adam",  # stage 1: adam | sgd; stage 2 always adam
        "clip_norm": 1.0,
        "patience": 3,
        "stage1_scale": 0.5,  # stage-1 input = preset size x this, rounded to multiples of 128
        "anchor_size": None,  # None: ShapeMask's own (4)
        "norm_momentum": 0.9,  # Model Garden: 0.997 / 0.99; 0.9 settles batch-norm statistics in short runs
        "score_threshold": 0.05,  # stage-1 proposals below this are dropped (Model Garden default)
        "max_detections": 20,
        "scale_jitter": [0.8, 1.2],  # ShapeMask's own training rescale range
        "predict_batch_size": 8,
        "train_boxes": "all",  # stage 1 learns every fracture box | positive: only films labelled 1
        "num_proposals": 3,  # crops per film scored by stage 2
        "crop_size": 128,  # stage-2 input (square)
        "crop_context": 2.0,  # crop side = this x the box's longer side ...
        "crop_min_size": 32,  # ... but at least this many preprocessed pixels
        "positive_iou": 0.3,  # a crop counts as showing the film's fracture from this IoU on
        "dropout": 0.2,
        "init_checkpoint": "none",  # stage 1 (ShapeMask): none | checkpoint prefix or folder (README)
        "init_checkpoint_modules": "backbone",  # backbone | all: of stage 1 (ShapeMask)
        "frozen_epochs": 0,  # with an init_checkpoint: epochs with the backbone frozen first
        "finetune_lr_factor": 0.1,  # then everything at learning_rate x this
    },
    resources=Resources(gpus=1, mem_mb=16000, runtime=480, cpus=4),
    reference=("Kuo et al., ShapeMask, ICCV 2019 + Du et al., SpineNet, CVPR 2020; thesis sections 7.7-7.8, "
               "Listings 7.11-7.12, 80.9% accuracy (Table 5.1)"),
    description="ShapeMask (SpineNet-49) proposals -> SpineNet-49 classifier on high-resolution crops",
)


def build(cfg):
    from physis import garden

    return garden.TwoStage(cfg.input_shape, cfg.params)


def train(model, data, cfg, callbacks):
    from physis import garden

    garden.train_two_stage(model, data, cfg)


def predict(model, data, cfg) -> np.ndarray:
    return model.predict(data.images)[0]


def predict_boxes(model, data, cfg) -> list[np.ndarray]:
    """Stage-1 proposals (x, y, w, h, ShapeMask score): the boxes its fracture AP is computed on."""
    return model.predict(data.images)[1]


def explain(model, image, cfg) -> Explanation:
    from physis import garden

    return garden.explain_two_stage(model, image, cfg)


def serving(model, cfg):
    """Stage 1 → crops → stage 2 with TF ops, for ``physis export``."""
    from physis import garden

    return garden.two_stage_serving(model, cfg)
