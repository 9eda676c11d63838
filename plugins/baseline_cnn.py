"""A compact CNN baseline (beyond the thesis): five conv/batch-norm/pool blocks and a global max
pool, about 0.28 M parameters at 256×128. Max pooling keeps a small, local finding such as a fracture line
from being averaged away; the network trains in minutes on a CPU, which makes it the sanity check
to run first on new data.
"""

from physis.keras_models import binary_head, explain_gradcam, predict_classifier, scaled_input
from physis.plugins import ModelSpec, Resources
from physis.train import fit_classifier

SPEC = ModelSpec(
    kind="classifier",
    framework="keras",
    preset="letterbox_256x128",
    channels=1,
    params={
        "epochs": 30,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "patience": 8,
        "width": 32,  # filters of the first block; later blocks grow by 1.5x
        "dropout": 0.2,
    },
    resources=Resources(gpus=1, mem_mb=4000, runtime=60, cpus=4),
    reference="physis baseline; conv-BN-pool design after Simonyan & Zisserman, ICLR 2015",
)


def build(cfg):
    from keras import layers

    inputs, x = scaled_input(cfg, None)
    width = int(cfg.params["width"])
    x = layers.Conv2D(width, 5, strides=2, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    for block in range(4):
        x = layers.Conv2D(int(width * 1.5 ** (block + 1)), 3, padding="same", activation="relu")(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalMaxPooling2D(name="head_pool")(x)
    x = layers.Dropout(float(cfg.params["dropout"]), name="head_dropout")(x)
    return binary_head(inputs, x, "baseline_cnn")


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
