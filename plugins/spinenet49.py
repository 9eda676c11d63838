"""SpineNet-49 (Du et al., CVPR 2020) classifier from the TF Model Garden (official.vision): the
scale-permuted backbone with a classification head and one sigmoid fracture score. The thesis's
best single Model Garden model (73.3% accuracy, Table 5.1; Listing 7.11). Rectangular inputs work.
Trained from random initialisation (no ImageNet weights are reachable offline).
"""

from physis.keras_models import explain_gradcam, predict_classifier
from physis.plugins import ModelSpec, Resources
from physis.train import fit_classifier

SPEC = ModelSpec(
    kind="classifier",
    framework="tf_keras",
    preset="letterbox_256x128",
    channels=3,  # the Model Garden's RGB input convention (ImageNet mean/std inside the model)
    params={
        "epochs": 6,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "patience": 3,
        "dropout": 0.2,
        "norm_momentum": 0.9,  # Model Garden: 0.99; 0.9 settles the batch-norm statistics in short runs
    },
    resources=Resources(gpus=1, mem_mb=12000, runtime=180, cpus=4),
    reference="Du et al., SpineNet, CVPR 2020; thesis section 7.7, Listing 7.11, 73.3% accuracy (Table 5.1)",
    description="SpineNet-49 backbone + classification head (official.vision ClassificationModel)",
)


def build(cfg):
    from physis import garden

    return garden.spinenet_classifier(cfg.input_shape, cfg.params["dropout"], cfg.params["norm_momentum"])


train = fit_classifier
predict = predict_classifier
explain = explain_gradcam
