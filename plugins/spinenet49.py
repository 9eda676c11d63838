"""SpineNet-49 (Du et al., CVPR 2020) classifier from the TF Model Garden (official.vision): the
scale-permuted backbone with a classification head and one sigmoid fracture score. The thesis's
best single Model Garden model (73.3% accuracy, Table 5.1; Listing 7.11). Rectangular inputs work.
Random initialisation by default; ``init_checkpoint`` fine-tunes from an official.vision checkpoint
(the SpineNet frozen for ``frozen_epochs`` first; README: pretrained checkpoints).
"""

from physis.keras_models import explain_gradcam, predict_classifier
from physis.plugins import ModelSpec, Resources

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
        "init_checkpoint": "none",  # none | checkpoint prefix or folder, local or gs:// (README: pretrained)
        "init_checkpoint_modules": "backbone",  # backbone | all (as the Model Garden task configs)
        "frozen_epochs": 0,  # with an init_checkpoint: epochs with the backbone frozen first
        "finetune_lr_factor": 0.1,  # then everything at learning_rate x this
    },
    resources=Resources(gpus=1, mem_mb=12000, runtime=180, cpus=4),
    reference="Du et al., SpineNet, CVPR 2020; thesis section 7.7, Listing 7.11, 73.3% accuracy (Table 5.1)",
    description="SpineNet-49 backbone + classification head (official.vision ClassificationModel)",
)


def build(cfg):
    from physis import garden

    return garden.spinenet_classifier(cfg.input_shape, cfg.params["dropout"], cfg.params["norm_momentum"])


def train(model, data, cfg, callbacks):
    from physis import garden

    garden.train_classifier(model, data, cfg, callbacks)


predict = predict_classifier
explain = explain_gradcam
