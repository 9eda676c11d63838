"""config/grazpedwri.yaml, the thesis study on GRAZPEDWRI-DX for a SLURM GPU cluster: it validates on top of
the default config, keeps the thesis's input sizes and starting points, and `snakemake --profile slurm-gpu`
plans it (a dry run: no cluster, no GPU) against a tiny folder in the GRAZPEDWRI-DX layout with a GPU for
every thesis model's train job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from physis import config, phantom, plugins

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "config" / "grazpedwri.yaml"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
KERAS_APPLICATIONS = ("resnet50", "mobilenetv2", "mobilenetv2_stretch", "densenet169", "efficientnetv2", "convnext",
                      "resnet50_boxes", "densenet169_boxes", "efficientnetv2_boxes")


@pytest.fixture(scope="module")
def study() -> dict:
    """The study as the workflow sees it: the default config, then config/grazpedwri.yaml (keys merge)."""
    cfg = config.load(overrides=yaml.safe_load(STUDY.read_text()))
    previous = os.getcwd()
    os.chdir(ROOT)  # plugin_dirs are relative to the repository root, where the README runs Snakemake
    try:
        config.check_models(cfg, plugins.discover(cfg["plugin_dirs"]))
    finally:
        os.chdir(previous)
    return cfg


def input_size(cfg: dict, model: str) -> tuple[int, int]:
    preset = cfg["preprocess"]["presets"][cfg["models"][model]["preset"]]
    return preset["height"], preset["width"]


def thesis_models(cfg: dict) -> list[str]:
    """The models standing for a row of the thesis's Table 5.1, without the opt-in cloud service."""
    return [name for name in cfg["evaluate"]["thesis_models"] if name != "azure_custom_vision"]


def test_study_is_real_data_on_the_physeal_target(study):
    assert study["dataset"]["phantom"]["enabled"] is False
    assert study["dataset"]["format"] == "grazpedwri" and study["dataset"]["root"] == "data/grazpedwri"
    assert study["target"]["name"] == "physeal"
    assert study["train"]["require_gpu"] == "auto"


def test_study_uses_thesis_input_sizes_and_pretrained_starts(study):
    assert input_size(study, "custom_cnn") == (540, 203)  # thesis Listing 7.3
    for model in ("resnet50", "mobilenetv2", "mobilenetv2_stretch"):  # thesis Listing 7.10, section 7.5
        assert input_size(study, model) == (224, 224), model
    for model in ("spinenet49", "faster_rcnn", "retinanet_spinenet"):  # the Model Garden configs' 640 px
        assert max(input_size(study, model)) == 640, model
    height, width = input_size(study, "shapemask_spinenet")
    assert round(height * study["models"]["shapemask_spinenet"]["params"]["stage1_scale"]) == 640
    for model in KERAS_APPLICATIONS:
        assert study["models"][model]["params"]["weights"] == "imagenet", model
    # the Model Garden Faster R-CNN config's own ImageNet ResNet-50 (TensorFlow reads gs:// itself)
    garden = study["models"]["faster_rcnn"]["params"]
    assert garden["backbone"] == "resnet50" and garden["init_checkpoint"].startswith("gs://cloud-tpu-checkpoints/")
    assert garden["init_checkpoint_modules"] == "backbone"


def test_every_model_trains_on_one_gpu(study):
    enabled = [name for name, entry in study["models"].items() if entry["enabled"]]
    assert set(thesis_models(study)) <= set(enabled)
    for name in enabled:
        if name == "azure_custom_vision":
            continue
        hints = study["models"][name]["resources"]
        assert hints["gpus"] == 1 and hints["runtime"] <= 24 * 60 and hints["mem_mb"] <= 64000, (name, hints)


def train_jobs(dry_run: str) -> dict[str, str]:
    """model -> the resources line of its train job in a dry run's output."""
    jobs = {}
    for block in re.findall(r"^rule train:\n(.*?)(?=^\S|\Z)", dry_run, flags=re.M | re.S):
        model = re.search(r"wildcards: model=(\S+)", block).group(1)
        jobs[model] = re.search(r"resources: (.*)", block).group(1)
    return jobs


def test_study_dry_run_with_the_slurm_profile(study, tmp_path):
    """The README's cluster command, --dry-run, on a 4-patient folder in the GRAZPEDWRI-DX layout."""
    release = tmp_path / "release"
    phantom.generate(release, n_patients=4, size_scale=0.2)
    paths = tmp_path / "paths.yaml"
    paths.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "dataset": {"root": str(release)}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SBATCH_", "PHYSIS_SLURM_", "SNAKEMAKE_PROFILE"))}
    # One --configfile with both files: a second --configfile flag would replace the first.
    result = subprocess.run([SNAKEMAKE, "--profile", "slurm-gpu", "--configfile", STUDY, paths, "--dry-run"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    jobs = train_jobs(result.stdout)
    assert len(jobs) == result.stdout.count("rule train:"), "a train job the parser missed"
    missing = [model for model in thesis_models(study) if model not in jobs]
    assert not missing, f"thesis models without a train job: {missing}"
    for model, resources in jobs.items():
        hints = study["models"][model]["resources"]
        assert re.search(r"\bgpu=1\b", resources), (model, resources)
        assert f"runtime={hints['runtime']}" in resources and f"mem_mb={hints['mem_mb']}" in resources, resources
    # the study's own input sizes are the presets the jobs preprocess
    for preset in ("thesis_540x203", "letterbox_224", "stretch_224", "letterbox_640x384", "letterbox_1024x640"):
        assert f"preprocess/{preset}/index.parquet" in result.stdout, preset
