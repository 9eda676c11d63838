"""YOLOv7 (Wang, Bochkovskiy & Liao, CVPR 2023) from the TF Model Garden's ``official.projects.yolo``
(``coco_yolov7``): the one-stage YOLO family that the GRAZPEDWRI-DX release's own baselines use,
trained on the fracture boxes (and, with ``extra_classes``, other GRAZPEDWRI-DX classes as extra
detection classes). A film's score is its highest fracture-box score (0 without a box). Not in the thesis.

``width_multiple`` / ``depth_multiple`` scale the filters and the ELAN blocks' 3x3 chains; the
defaults (0.25, 0.5: 2.0 M parameters) are a CPU-sized variant for the tests and the demo, 1.0 / 1.0
is the real YOLOv7 (37,251,678 parameters at two classes). The rest of the YOLOv7 recipe is the Model
Garden's, except where a parameter says otherwise (real values in the comments). ``init_checkpoint``
fine-tunes from a Model Garden YOLOv7 checkpoint at 1.0 / 1.0 (README: pretrained checkpoints).
Library code: ``workflow/physis/yolo.py``.
"""

from physis.plugins import ModelSpec, Resources

SPEC = ModelSpec(
    kind="detector",
    framework="tf_keras",
    preset="letterbox_512x256",
    channels=3,
    needs_boxes=True,
    params={
        "epochs": 4,
        "steps_per_epoch": 40,
        "batch_size": 2,  # YOLOv7: 64 per GPU (COCO config: 256 on a TPU pod)
        "learning_rate": 1e-3,  # YOLOv7: SGD 0.01, momentum 0.937, 3 warm-up epochs, cosine decay
        "optimizer": "adam",  # adam | sgd (momentum 0.9)
        "clip_norm": 1.0,
        "patience": 3,
        "width_multiple": 0.25,  # filters x this (multiples of 8); YOLOv7: 1.0
        "depth_multiple": 0.5,  # ELAN chain length x this (YOLOv7: 4 3x3 convs per block); YOLOv7: 1.0
        "extra_classes": [],  # other GRAZPEDWRI-DX classes to detect as well, e.g. [periostealreaction, metal]
        "norm_momentum": 0.9,  # Model Garden config: 0.03 (PyTorch's convention); YOLOv7 in TF terms: 0.97
        "score_threshold": 0.01,  # detections kept for boxes and AP (Model Garden: 0.001)
        "max_detections": 20,  # Model Garden: 300
        "mosaic": 0.0,  # share of training films made 4-/9-film mosaics (YOLOv7: 1.0, with mixup 0.15)
        "ota": False,  # YOLOv7: True (OTA label assignment; 3-10x dearer per step on a CPU, slower to learn here)
        "train_boxes": "all",  # all fracture boxes | positive: only those on films labelled 1
        "init_checkpoint": "none",  # none | checkpoint prefix or folder, local or gs:// (README: pretrained)
        "init_checkpoint_modules": "backbone",  # backbone | all
        "frozen_epochs": 0,  # with an init_checkpoint: epochs with the backbone frozen first
        "finetune_lr_factor": 0.1,  # then everything at learning_rate x this
    },
    resources=Resources(gpus=1, mem_mb=16000, runtime=240, cpus=4),
    reference="Wang, Bochkovskiy & Liao, YOLOv7, CVPR 2023 (official.projects.yolo)",
    description="official.projects.yolo YOLOv7 with width/depth multipliers (one-stage detector)",
)


def build(cfg):
    from physis import yolo  # TensorFlow and the Model Garden load only when a hook runs

    return yolo.build(cfg)


def train(model, data, cfg, callbacks):
    from physis import yolo

    yolo.train(model, data, cfg)


def predict_boxes(model, data, cfg):
    from physis import yolo

    return yolo.predict_boxes(model, data, cfg)


def predict(model, data, cfg):
    from physis import yolo

    return yolo.predict(model, data, cfg)


def explain(model, image, cfg):
    from physis import yolo

    return yolo.explain(model, image, cfg)


def serving(model, cfg):
    from physis import yolo

    return yolo.serving(model, cfg)
