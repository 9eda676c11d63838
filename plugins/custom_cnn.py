"""The thesis's custom CNN (Listings 7.5/7.6): seven 3×3 convolutions, a per-pixel Dense(128),
a Dense(2048) on the flattened features — 102,850,851 parameters at 540×203×3 with the
thesis's 3-output head. physis trains it with one sigmoid output (``outputs: 1``).
"""

from physis.keras_models import classifier, explain_gradcam, predict_classifier, scaled_input
from physis.plugins import ModelSpec, Resources
from physis.train import fit_classifier

SPEC = ModelSpec(
    kind="classifier",
    framework="keras",
    preset="thesis_540x203",
    channels=3,  # the thesis fed 3-channel films; its parameter count depends on it
    params={
        "epochs": 8,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "patience": 3,
        "outputs": 1,  # 3 = the thesis's softmax head, only to reproduce its parameter count
        "weights": "none",  # no pretrained weights exist for this network
        "supervision": "labels",  # labels | boxes: the fracture boxes train a map head (physis.heatmap)
    },
    resources=Resources(gpus=1, mem_mb=12000, runtime=240, cpus=4),
    reference="Thesis (Graz 2021) Listings 7.5/7.6: custom CNN, 74.6% accuracy (Table 5.1)",
    description="Plain VGG-like CNN; most parameters sit in the Dense(2048) after Flatten.",
)


def build(cfg):
    import keras
    from keras import layers

    inputs, x = scaled_input(cfg, None)
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu")(x)
    x = layers.Dense(128, activation="relu")(x)  # acts per pixel, as in the thesis
    for filters in (256, 256):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="last_conv")(x)
    return classifier(inputs, x, cfg, "custom_cnn",
                      lambda features: layers.Dense(2048, activation="relu")(layers.Flatten()(features)),
                      outputs=int(cfg.params["outputs"]))


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
