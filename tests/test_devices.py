"""physis.devices: the GPUs a job was granted against the GPUs TensorFlow sees, and the device record.

This machine's TensorFlow sees no GPU; a visible one is simulated by passing ``visible``. The same check
under a real SLURM allocation is tests/test_cluster.py::test_gpu_check_in_a_slurm_job_granted_a_gpu.
"""

import logging

import pytest
from conftest import make_config

from physis import devices
from physis.devices import GPUUnavailableError, check_gpus, granted_gpus

SLURM_WITH_GPU = {"SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
SLURM_WITHOUT_GPU = {"SLURM_JOB_ID": "4243"}
NO_SLURM = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"SLURM_GPUS_ON_NODE": "1"}, None),  # a leftover variable outside a job is not a grant
    (SLURM_WITHOUT_GPU, 0),
    (SLURM_WITH_GPU, 1),
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,3"}, 2),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_GPUS": "0"}, 1),
])
def test_granted_gpus_reads_the_slurm_allocation(environ, expected):
    assert granted_gpus(environ) == expected


@pytest.mark.parametrize("require", ["auto", True, False])
@pytest.mark.parametrize("environ", [SLURM_WITH_GPU, SLURM_WITHOUT_GPU, NO_SLURM])
def test_a_visible_gpu_always_passes(require, environ):
    assert check_gpus(require, environ=environ, visible=["GPU:0"]) == 1


@pytest.mark.parametrize("environ", [SLURM_WITHOUT_GPU, NO_SLURM])
def test_auto_trains_on_what_it_has_when_no_gpu_was_granted(environ, caplog):
    with caplog.at_level(logging.WARNING):
        assert check_gpus("auto", environ=environ, visible=[]) == 0
    assert not caplog.records


def test_auto_fails_when_slurm_granted_a_gpu_that_tensorflow_cannot_see():
    with pytest.raises(GPUUnavailableError) as error:
        check_gpus("auto", model="resnet50", environ=SLURM_WITH_GPU, visible=[])
    message = str(error.value)
    for part in ("'resnet50'", "granted 1 GPU", "job 4242", "CUDA_VISIBLE_DEVICES=0", "TensorFlow 2.20",
                 "make setup GPU=1", "require_gpu: false"):
        assert part in message, (part, message)
    # This machine's TensorFlow wheel is a CUDA build without the pip CUDA libraries of tensorflow[and-cuda].
    assert "CUDA build" in message and "not installed" in message


def test_false_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="physis.devices"):
        assert check_gpus(False, model="resnet50", environ=SLURM_WITH_GPU, visible=[]) == 0
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "granted 1 GPU" in record.message and "CUDA_VISIBLE_DEVICES=0" in record.message
    assert "require_gpu is false: training on the CPU" in record.message


@pytest.mark.parametrize(("environ", "where"), [(NO_SLURM, "not in a SLURM job"),
                                                 (SLURM_WITHOUT_GPU, "SLURM job 4243 granted no GPU")])
def test_true_fails_without_a_gpu_anywhere(environ, where):
    with pytest.raises(GPUUnavailableError, match="require_gpu is true") as error:
        check_gpus(True, environ=environ, visible=[])
    assert where in str(error.value) and "CUDA_VISIBLE_DEVICES=" in str(error.value)


def test_unknown_require_value_is_an_error():
    with pytest.raises(ValueError, match="auto, true or false"):
        check_gpus("yes", environ=NO_SLURM, visible=[])


@pytest.mark.parametrize(("info", "expected"), [
    ({"tensorflow": "2.20.0", "cuda_build": False}, "CPU-only build"),
    ({"tensorflow": "2.20.0", "cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9",
      "cuda_libraries": None}, "CUDA build (CUDA 12.5.1, cuDNN 9) but its CUDA libraries are not installed"),
    ({"tensorflow": "2.20.0", "cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9",
      "cuda_libraries": "9.3.0.75"}, "nvidia-smi"),
])
def test_the_message_says_which_build_is_installed(info, expected):
    assert expected in devices.describe_build(info)


def test_device_record_on_this_machine():
    record = devices.describe_device(0, False, threads=4, environ=SLURM_WITH_GPU)
    assert record["type"] == "CPU" and record["count"] == 4 and record["mixed_precision"] is False
    assert record["name"] and record["label"].startswith("CPU: ") and "4 threads (float32)" in record["label"]
    assert record["gpus_granted"] == 1 and record["gpus_visible"] == 0 and record["slurm_job_id"] == "4242"
    assert record["tensorflow"].startswith("2.20") and isinstance(record["cuda_build"], bool)


def test_gpu_record_names_the_gpu(monkeypatch):
    monkeypatch.setattr(devices, "visible_gpus", lambda: ["GPU:0", "GPU:1"])
    monkeypatch.setattr(devices, "gpu_name", lambda device: "NVIDIA H100 80GB HBM3")
    record = devices.describe_device(2, True, threads=8, environ=NO_SLURM)
    assert (record["type"], record["count"], record["gpus_visible"]) == ("GPU", 2, 2)
    assert record["label"] == "2 × NVIDIA H100 80GB HBM3 (mixed precision)"
    assert record["gpus_granted"] is None


def test_train_job_fails_before_reading_any_data(tmp_path, monkeypatch):
    """require_gpu: true on this GPU-less machine: train_model stops at the check, before the (missing) data."""
    from physis.train import train_model

    for name in ("SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(name, raising=False)
    cfg = make_config(tmp_path / "no-data", tmp_path / "results", train={"require_gpu": True})
    with pytest.raises(GPUUnavailableError, match="custom_cnn"):
        train_model("custom_cnn", cfg)
    assert not (tmp_path / "results" / "models" / "custom_cnn" / "train_summary.json").exists()
