"""DenseNet-169 (Huang et al. 2017), the MURA baseline (Rajpurkar et al. 2017: AUROC 0.929,
wrist κ 0.931) — beyond the thesis. Global average pooling and one sigmoid unit, as in MURA.
"""

from physis.keras_models import classifier, explain_gradcam, predict_classifier, pretrained_backbone, scaled_input
from physis.plugins import ModelSpec, Resources
from physis.train import fit_classifier

SPEC = ModelSpec(
    kind="classifier",
    framework="keras",
    preset="letterbox_256x128",
    channels=3,
    params={
        "epochs": 8,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "patience": 3,
        "weights": "none",  # none | imagenet (MURA started from ImageNet) | local notop weights file
        "frozen_epochs": 2,
        "finetune_lr_factor": 0.1,
        "supervision": "labels",  # labels | boxes: the fracture boxes train a map head (physis.heatmap)
    },
    resources=Resources(gpus=1, mem_mb=10000, runtime=240, cpus=4),
    reference="Huang et al., CVPR 2017; Rajpurkar et al., MURA, arXiv 1712.06957",
)


def build(cfg):
    import keras

    inputs, x = scaled_input(cfg, "torch")
    base = pretrained_backbone(keras.applications.DenseNet169, cfg, input_tensor=x)
    return classifier(inputs, base.output, cfg, "densenet169", keras.layers.GlobalAveragePooling2D(name="head_pool"))


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
