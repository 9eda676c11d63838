"""Faster R-CNN (Ren et al., NeurIPS 2015) from the TF Model Garden (official.vision): the Mask R-CNN
family with masks off, trained on the fracture boxes. A film's score is its highest fracture-box
score (0 without a box). The thesis reports 71.8% accuracy (Table 5.1, section 7.4).

``head: 2fc`` (the classic two-FC box head on 128 sampled RoIs, 2.5-3.6x cheaper on CPU) is the
default for tests and the demo; ``head: full`` restores the Model Garden's 4 conv + 1 FC head on
512 RoIs (set ``num_rois: 512`` too). ``backbone``: resnet50 (FPN; fasterrcnn_resnetfpn_coco) or
spinenet49 (maskrcnn_spinenet_coco, ~40% cheaper at 512x256). ``init_checkpoint`` fine-tunes from an
official.vision checkpoint, e.g. the Model Garden's ResNet-50 ImageNet one for ``backbone: resnet50``
(README: pretrained checkpoints).
"""

from physis.garden_hooks import detector_hooks
from physis.plugins import ModelSpec, Resources

FAMILY = "faster_rcnn"

SPEC = ModelSpec(
    kind="detector",
    framework="tf_keras",
    preset="letterbox_512x256",
    channels=3,
    needs_boxes=True,
    params={
        "epochs": 4,
        "steps_per_epoch": 40,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "optimizer": "adam",  # adam | sgd (momentum 0.9)
        "clip_norm": 1.0,
        "patience": 3,
        "backbone": "resnet50",  # resnet50 | spinenet49
        "head": "2fc",  # 2fc (CPU-friendly) | full (Model Garden default)
        "num_rois": 128,  # RoIs sampled per image for the box head (Model Garden: 512)
        "anchor_size": None,  # None: the experiment's own
        "norm_momentum": 0.9,  # Model Garden: 0.997; 0.9 settles the batch-norm statistics in short runs
        "score_threshold": 0.01,  # detections kept for boxes and AP (Model Garden: 0.05)
        "max_detections": 20,
        "scale_jitter": [0.8, 1.25],  # random rescale range of the training films (Model Garden default)
        "train_boxes": "all",  # all fracture boxes | positive: only those on films labelled 1
        "init_checkpoint": "none",  # none | checkpoint prefix or folder, local or gs:// (README: pretrained)
        "init_checkpoint_modules": "backbone",  # backbone | all (as the Model Garden task configs)
        "frozen_epochs": 0,  # with an init_checkpoint: epochs with the backbone frozen first
        "finetune_lr_factor": 0.1,  # then everything at learning_rate x this
    },
    resources=Resources(gpus=1, mem_mb=16000, runtime=360, cpus=4),
    reference="Ren et al., Faster R-CNN, NeurIPS 2015; thesis section 7.4, 71.8% accuracy (Table 5.1)",
    description="official.vision Faster R-CNN (MaskRCNNModel, include_mask=False)",
)


build, train, predict, predict_boxes, explain, serving = detector_hooks(FAMILY)
