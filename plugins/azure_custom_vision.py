"""Azure Custom Vision: the thesis's no-code cloud baseline, as a ``service`` plugin.

The thesis trained an Azure Custom Vision Multiclass image-classification project on the same
films, with a 24-hour and a 7-hour Advanced training budget, and reached about 73.7 % accuracy
(Table 5.1). This plugin repeats that run through the official SDK
(azure-cognitiveservices-vision-customvision 3.1.1, on msrest 0.7.1); tests/azure_emulator.py
implements the REST subset it uses, and the tests drive it through the real SDK.

**Retirement.** Microsoft retires Azure Custom Vision on 25 Sep 2028 (calls fail after that date;
plan the move by 25 Sep 2026), and the SDK is marked inactive (unmaintained since 1 Nov 2024).
The suggested successors are Azure Machine Learning AutoML image classification and the Azure
Content Understanding classifier.

**Opt-in and data protection.** Nothing leaves the machine unless the config sets
``allow_cloud_upload: true`` *and* the environment variables whose *names* the config gives hold
the endpoint, keys and prediction resource id (values never come from config and are never logged
or written). Uploads are the preprocessed PNGs re-encoded from pixels (no DICOM or PNG metadata),
with the burned-in ``text`` boxes blacked out, named by their pseudonymous image ids. Only the
train split is uploaded; val/test films go to the no-store prediction endpoint.

**Lifecycle.** ``train`` creates the project and its two tags, uploads in batches of at most 64
(checking each image's status: a 207 batch is a partial failure), trains, polls until the
iteration is Completed or Failed within a wall-clock limit, publishes it, and optionally exports
it. Each step is recorded in ``work_dir/azure_state.json`` as soon as it is done, so a rerun after
an interruption resumes without duplicate uploads or a second training bill. When ``train`` fails,
the project is unpublished and deleted unless ``keep_project: true``. msrest never retries a POST,
so every call goes through :func:`physis.cloud.call_with_retries`.
"""

from __future__ import annotations

import os
from pathlib import Path

from physis.plugins import ModelConfig, ModelSpec, PluginError, Resources

# Snakemake reads SPEC and ``available`` while it parses the workflow: the SDK, NumPy and pandas
# live in physis.custom_vision, which the hooks import when they run.

SPEC = ModelSpec(
    kind="service",
    framework="service",
    preset="letterbox_512x256",
    channels=1,
    params={
        "allow_cloud_upload": False,  # opt-in: nothing is uploaded unless true
        # Names of the environment variables holding the secrets (never the values).
        "endpoint_env": "AZURE_CUSTOM_VISION_ENDPOINT",
        "training_key_env": "AZURE_CUSTOM_VISION_TRAINING_KEY",
        "prediction_key_env": "AZURE_CUSTOM_VISION_PREDICTION_KEY",
        "prediction_resource_id_env": "AZURE_CUSTOM_VISION_PREDICTION_RESOURCE_ID",
        # Optional: a separate prediction resource's endpoint (unset: the training endpoint).
        "prediction_endpoint_env": "AZURE_CUSTOM_VISION_PREDICTION_ENDPOINT",
        "domain": "General [A2]",  # name or id; export needs a compact one, e.g. "General (compact)"
        "training_type": "Advanced",  # or "Regular" (quick, no budget)
        "reserved_budget_in_hours": 24,  # thesis: 24 and 7
        "poll_interval_s": 60.0,  # status polls count against the 10 calls/s limit
        "max_wait_hours": 30.0,  # wall-clock limit for training (and export) in this run
        "batch_size": 64,  # images per upload; Azure's maximum is 64
        "max_retries": 5,  # per call on 429/5xx/connection errors, and per failed image
        "retry_base_s": 1.0,  # back-off without Retry-After: 1, 2, 4, … s
        "retry_max_wait_s": 60.0,  # cap on any one wait, Retry-After included
        "request_timeout_s": 300.0,  # per HTTP request (an upload of 64 films)
        "keep_project": False,  # true: a failed train keeps the project for a resumed run
        "export": None,  # None, "ONNX" or "TensorFlow": download the trained iteration
        "project_name": "physis",  # prefix of the project name
    },
    # The job mostly waits: up to max_wait_hours of polling. Killed at its time limit, it resumes.
    resources=Resources(gpus=0, mem_mb=4000, runtime=32 * 60, cpus=1),
    reference="Microsoft Azure Custom Vision; thesis Table 5.1 (73.7%)",
    description=("Azure Custom Vision Multiclass classifier trained in the cloud (opt-in upload of the train "
                 "split, text blacked out). The service retires on 25 Sep 2028 and its SDK "
                 "(azure-cognitiveservices-vision-customvision) is marked inactive."),
)


def available(cfg: ModelConfig) -> str | None:
    """Why the plugin cannot run here (not opted in, or a variable unset), or None when it can."""
    params = cfg.params
    if not params["allow_cloud_upload"]:
        return "allow_cloud_upload is false (set it to true to upload the train split to Azure)"
    for name in ("endpoint_env", "training_key_env", "prediction_key_env", "prediction_resource_id_env"):
        if not os.environ.get(params[name]):
            return f"environment variable {params[name]} is not set"
    return None


def _check_available(cfg: ModelConfig) -> None:
    reason = available(cfg)
    if reason:
        raise PluginError(f"azure_custom_vision: {reason}")


def build(cfg: ModelConfig):
    """A session (SDK clients + the recorded cloud state) for ``cfg.work_dir``."""
    _check_available(cfg)
    from physis import custom_vision

    return custom_vision.build(cfg)


def train(model, data, cfg: ModelConfig, callbacks: list) -> None:
    from physis import custom_vision

    custom_vision.train(model, data, cfg, callbacks)


def predict(model, data, cfg: ModelConfig):
    from physis import custom_vision

    return custom_vision.predict(model, data, cfg)


def save(model, folder: str | Path) -> None:
    from physis import custom_vision

    custom_vision.save(model, folder)


def load(folder: str | Path, cfg: ModelConfig):
    _check_available(cfg)
    from physis import custom_vision

    return custom_vision.load(folder, cfg)
