"""Which device a train job trains on: the GPUs the scheduler granted, the GPUs TensorFlow sees, and a
record of what was actually used.

A SLURM job that was granted a GPU but trains on the CPU is the costliest silent failure on a cluster:
it holds the GPU for hours at CPU speed, and the leaderboard's cost column then compares a CPU run with
GPU runs. :func:`check_gpus` stops such a job at once, or only warns (``train.require_gpu: false``);
:func:`describe_device` records the device in ``train_summary.json`` so that costs compare fairly.

``train.require_gpu``:

- ``auto`` (default): under SLURM, fail when the job was granted GPUs and TensorFlow sees none; outside
  SLURM never fail (a workstation or laptop trains on what it has).
- ``true``: fail whenever TensorFlow sees no GPU, with or without SLURM.
- ``false``: never fail; warn when granted GPUs go unused.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

#: The pip package of ``tensorflow[and-cuda]`` whose presence tells that the CUDA libraries are installed.
CUDA_LIBRARIES = "nvidia-cudnn-cu12"
FIX = ("install TensorFlow's CUDA libraries where the jobs run: `make setup GPU=1` (pip install -e '.[test,gpu]', "
       "which adds tensorflow[and-cuda]), or with conda the environment envs/physis-gpu.yaml; check with "
       "`srun --gpus=1 .venv/bin/python -c \"import tensorflow as tf; print(tf.config.list_physical_devices('GPU'))\"`")


class GPUUnavailableError(RuntimeError):
    """A train job that must train on a GPU sees none."""


def granted_gpus(environ: Mapping[str, str] = os.environ) -> int | None:
    """GPUs SLURM granted this job on this node; None outside a SLURM job.

    ``SLURM_GPUS_ON_NODE`` is set by SLURM for jobs and steps with a GPU allocation (``--gpus``,
    ``--gres=gpu``); the GPU index lists (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``) back it up.
    """
    if not environ.get("SLURM_JOB_ID"):
        return None
    count = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if count.isdigit():
        return int(count)
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        indexes = [index for index in environ.get(name, "").split(",") if index.strip()]
        if indexes:
            return len(indexes)
    return 0


def visible_gpus() -> list:
    """The GPUs TensorFlow can use (physical devices)."""
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def build_info() -> dict:
    """The installed TensorFlow: version, whether it is a CUDA build, and whether its CUDA libraries are there."""
    import tensorflow as tf

    info = tf.sysconfig.get_build_info()
    try:
        libraries = metadata.version(CUDA_LIBRARIES)
    except metadata.PackageNotFoundError:
        libraries = None
    return {"tensorflow": tf.__version__, "cuda_build": bool(info.get("is_cuda_build")),
            "cuda_version": info.get("cuda_version"), "cudnn_version": info.get("cudnn_version"),
            "cuda_libraries": libraries}


def describe_build(info: dict) -> str:
    """One sentence on the TensorFlow build, for the messages of :func:`check_gpus`."""
    if not info["cuda_build"]:
        return f"TensorFlow {info['tensorflow']} is a CPU-only build (no CUDA)"
    cuda = f"CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}"
    if info["cuda_libraries"] is None:
        return (f"TensorFlow {info['tensorflow']} is a CUDA build ({cuda}) but its CUDA libraries are not "
                f"installed (no {CUDA_LIBRARIES}: tensorflow[and-cuda] was not installed)")
    return (f"TensorFlow {info['tensorflow']} is a CUDA build ({cuda}) with its CUDA libraries "
            f"({CUDA_LIBRARIES} {info['cuda_libraries']}): check the node's NVIDIA driver (nvidia-smi inside a "
            "job) and TensorFlow's messages above ('Cannot dlopen some GPU libraries', 'failed call to cuInit')")


def check_gpus(require: bool | str, model: str = "", environ: Mapping[str, str] = os.environ,
               visible: list | None = None) -> int:
    """Fail (or warn) when this train job should train on a GPU and TensorFlow sees none.

    ``require`` is ``train.require_gpu`` (module docstring). Returns the number of visible GPUs.
    Raises :class:`GPUUnavailableError` naming ``CUDA_VISIBLE_DEVICES``, the SLURM job id, the
    TensorFlow build and the fix.
    """
    if require not in ("auto", True, False):
        raise ValueError(f"train.require_gpu must be auto, true or false, got {require!r}")
    visible = visible_gpus() if visible is None else visible
    granted = granted_gpus(environ)
    if visible or (not granted and require is not True):
        return len(visible)
    job = environ.get("SLURM_JOB_ID")
    who = f"the train job of model {model!r}" if model else "this train job"
    if granted:
        problem = (f"{who} was granted {granted} GPU(s) by SLURM (job {job}, SLURM_GPUS_ON_NODE="
                   f"{environ.get('SLURM_GPUS_ON_NODE')}) but TensorFlow sees no GPU")
    else:
        where = f"SLURM job {job} granted no GPU" if job else "not in a SLURM job (no SLURM_JOB_ID)"
        problem = f"train.require_gpu is true but TensorFlow sees no GPU in {who} ({where})"
    message = (f"{problem}. CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')}. "
               f"{describe_build(build_info())}.")
    if require is False:
        log.warning("%s train.require_gpu is false: training on the CPU. To use the GPU, %s.", message, FIX)
        return 0
    raise GPUUnavailableError(f"{message} Fix: {FIX}; or set train.require_gpu: false to train on the CPU "
                              "anyway (slow: the job keeps its GPU allocation idle).")


def mixed_precision(framework: str) -> bool:
    """Whether the framework's Keras computes in float16: its global policy, which
    :func:`physis.train.distribution` sets on a GPU."""
    if framework == "keras":
        import keras

        return keras.mixed_precision.global_policy().name.startswith("mixed")
    if framework == "tf_keras":
        import tf_keras

        return tf_keras.mixed_precision.global_policy().name.startswith("mixed")
    return False


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name(device) -> str:
    import tensorflow as tf

    return tf.config.experimental.get_device_details(device).get("device_name") or device.name


def describe_device(gpus_used: int, mixed: bool, threads: int | None = None,
                    environ: Mapping[str, str] = os.environ) -> dict:
    """What the training ran on, for ``train_summary.json`` (key ``device``) and the model card.

    ``gpus_used``: GPUs the training was placed on (0 = CPU); ``mixed``: mixed precision on;
    ``threads``: the CPU threads TensorFlow was given (the job's cores).
    """
    visible = visible_gpus()
    if gpus_used and visible:
        names = sorted({gpu_name(device) for device in visible[:gpus_used]})
        kind, name, count = "GPU", " + ".join(names), gpus_used
    else:
        kind, name, count = "CPU", cpu_name(), threads or os.cpu_count() or 1
    precision = "mixed precision" if mixed else "float32"
    threads_text = f"{count} thread{'s' if count != 1 else ''}"
    label = f"{count} × {name} ({precision})" if kind == "GPU" else f"CPU: {name}, {threads_text} ({precision})"
    return {"type": kind, "name": name, "count": count, "mixed_precision": mixed, "label": label,
            "gpus_granted": granted_gpus(environ), "gpus_visible": len(visible),
            "slurm_job_id": environ.get("SLURM_JOB_ID"), "cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"),
            **build_info()}
