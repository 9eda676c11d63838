"""RetinaNet (Lin et al., ICCV 2017) with a SpineNet-49 backbone from the TF Model Garden
(official.vision, ``retinanet_spinenet_coco``): the one-stage detector baseline beside Faster R-CNN
and the thesis's ShapeMask (which is RetinaNet plus mask heads). Trained on the fracture boxes; a
film's score is its highest fracture-box score (0 without a box). Not in the thesis.
``init_checkpoint`` fine-tunes from an official.vision checkpoint (README: pretrained checkpoints).
"""

from physis.garden_hooks import detector_hooks
from physis.plugins import ModelSpec, Resources

FAMILY = "retinanet"

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
        "backbone": "spinenet49",
        "anchor_size": None,  # None: the experiment's own (3)
        "norm_momentum": 0.9,  # Model Garden: 0.99; 0.9 settles the batch-norm statistics in short runs
        "score_threshold": 0.01,  # detections kept for boxes and AP (Model Garden: 0.05)
        "max_detections": 20,
        "scale_jitter": [0.8, 1.25],
        "train_boxes": "all",  # all fracture boxes | positive: only those on films labelled 1
        "init_checkpoint": "none",  # none | checkpoint prefix or folder, local or gs:// (README: pretrained)
        "init_checkpoint_modules": "backbone",  # backbone | all (as the Model Garden task configs)
        "frozen_epochs": 0,  # with an init_checkpoint: epochs with the backbone frozen first
        "finetune_lr_factor": 0.1,  # then everything at learning_rate x this
    },
    resources=Resources(gpus=1, mem_mb=16000, runtime=300, cpus=4),
    reference="Lin et al., Focal Loss for Dense Object Detection, ICCV 2017; Du et al., SpineNet, CVPR 2020",
    description="official.vision RetinaNet with a SpineNet-49 backbone (one-stage detector baseline)",
)


build, train, predict, predict_boxes, explain, serving = detector_hooks(FAMILY)
