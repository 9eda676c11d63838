"""A box-supervised heat-map CNN (beyond the thesis): the fracture boxes train a map of the film at
1/16 resolution, and the map's maximum is the fracture score (:mod:`physis.heatmap`).

Same conv/batch-norm/pool design as ``baseline_cnn`` (about 0.5 M parameters at 256×128), but
every map cell is supervised: 1 under a fracture box of a positive film, 0 elsewhere, including
the boxes of fractures that are not the target (metaphyseal, styloid, scaphoid on the physeal
target). Needs the fracture boxes that GRAZPEDWRI-DX (and the phantom) ship; its explanation is
its own map, not Grad-CAM.
"""

import math

from physis.heatmap import explain, fit, map_head
from physis.keras_models import predict_classifier, scaled_input
from physis.plugins import ModelSpec, Resources

SPEC = ModelSpec(
    kind="classifier",
    framework="keras",
    preset="letterbox_256x128",
    channels=1,
    needs_boxes=True,
    params={
        "epochs": 40,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "patience": 10,
        "width": 32,  # filters of the first block; later blocks grow by 1.5x
        "stride": 16,  # input pixels per map cell (a power of two, at least 4)
        "heat_weight": 10.0,  # weight of the per-cell loss against the image-level loss
        "cell_weight": 20.0,  # weight of a fracture cell against a background cell
    },
    resources=Resources(gpus=1, mem_mb=4000, runtime=60, cpus=4),
    reference="Li et al., Thoracic Disease Identification and Localization with Limited Supervision, CVPR 2018",
)


def build(cfg):
    from keras import layers

    stride = int(cfg.params["stride"])
    if stride < 4 or stride & (stride - 1):
        raise ValueError(f"stride must be a power of two >= 4, got {stride}")
    # batch-norm momentum 0.9, not Keras's 0.99: over a few hundred steps the slow averages leave
    # the inference-time statistics behind the weights and the validation AUROC swings
    inputs, x = scaled_input(cfg, None)
    width = int(cfg.params["width"])
    x = layers.Conv2D(width, 5, strides=2, padding="same", activation="relu")(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    blocks = int(math.log2(stride)) - 1
    for block in range(1, blocks + 1):
        x = layers.Conv2D(int(width * 1.5 ** block), 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.MaxPooling2D(padding="same")(x)
    # context around each cell: is this line at the physis or below it?
    for dilation in (1, 2):
        x = layers.Conv2D(int(width * 1.5 ** (blocks + 1)), 3, padding="same", dilation_rate=dilation,
                          activation="relu")(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
    return map_head(inputs, x, "heatmap_cnn")


train = fit
predict = predict_classifier
