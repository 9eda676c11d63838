"""ResNet50 (He et al. 2016) with the thesis's head: 2×2 average pooling of the last feature
map, flatten, one sigmoid unit — 23,620,481 parameters at 224×224×3 (thesis Listing 7.10).
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
        "weights": "none",  # none | imagenet (needs internet) | path to a local notop weights file
        "frozen_epochs": 2,  # with pretrained weights: epochs with a frozen backbone first
        "finetune_lr_factor": 0.1,
        "supervision": "labels",  # labels | boxes: the fracture boxes train a map head (physis.heatmap)
    },
    resources=Resources(gpus=1, mem_mb=8000, runtime=180, cpus=4),
    reference="He et al., CVPR 2016; thesis Listing 7.10, 69.1% accuracy (Table 5.1)",
)


def build(cfg):
    import keras

    inputs, x = scaled_input(cfg, "caffe")
    base = pretrained_backbone(keras.applications.ResNet50, cfg, input_tensor=x)

    def head(features):
        features = keras.layers.AveragePooling2D(pool_size=2, padding="same", name="head_pool")(features)
        return keras.layers.Flatten(name="head_flatten")(features)

    return classifier(inputs, base.output, cfg, "resnet50", head)


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
