"""The config is the manual: schema completeness, defaults, and the pins of pyproject vs envs/."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from physis import config

ROOT = Path(__file__).resolve().parents[1]


def walk(schema, path="config"):
    """Yield (path, node) for every property node of the schema."""
    for key, node in schema.get("properties", {}).items():
        yield f"{path}.{key}", node
        yield from walk(node, f"{path}.{key}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from walk(extra, f"{path}.<name>")


def test_every_schema_key_has_a_description_and_a_default():
    schema = yaml.safe_load(config.SCHEMA.read_text())
    missing = [path for path, node in walk(schema)
               if "description" not in node or ("default" not in node and "<name>" not in path)]
    assert not missing, f"schema keys without description/default: {missing}"


def test_empty_config_gets_every_default(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    cfg = config.load(empty)
    assert cfg["dataset"]["format"] == "grazpedwri"
    assert cfg["split"]["fractions"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    assert cfg["target"]["physeal_not_visible"] == "exclude"


def test_invalid_values_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: {name: elbow}\n")
    with pytest.raises(Exception, match="validating config"):
        config.load(bad)


def test_overrides_merge_into_nested_sections():
    cfg = config.load(overrides={"dataset": {"root": "/elsewhere"}})
    assert cfg["dataset"]["root"] == "/elsewhere"
    assert cfg["dataset"]["phantom"]["patients"] == 240  # untouched sibling keys survive


def pins_from_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", dep).groups() for dep in project["dependencies"])


def conda_pins(name: str) -> dict[str, str]:
    """The pip section of envs/<name> as {requirement (with its extras): version}."""
    env = yaml.safe_load((ROOT / "envs" / name).read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    return dict(re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", dep).groups() for dep in pip_section)


def test_conda_env_names_the_same_versions_as_pyproject():
    assert conda_pins("physis.yaml") == pins_from_pyproject()


def test_gpu_extra_and_gpu_env_pin_the_same_tensorflow():
    """`make setup GPU=1` and envs/physis-gpu.yaml add TensorFlow's CUDA libraries to the same versions."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    with_cuda = f"tensorflow[and-cuda]=={pins_from_pyproject()['tensorflow']}"
    assert extras["gpu"] == [with_cuda]
    pins = pins_from_pyproject()
    pins["tensorflow[and-cuda]"] = pins.pop("tensorflow")
    assert conda_pins("physis-gpu.yaml") == pins


def test_every_dependency_is_pinned_and_tensorflow_cpu_is_absent():
    pins = pins_from_pyproject()
    assert "tensorflow-cpu" not in pins
    assert pins["tensorflow"].startswith("2.20") and pins["tf-models-official"].startswith("2.20")
    assert pins["snakemake"].startswith("9.")


def test_the_pseudonym_salt_may_not_live_under_results(tmp_path):
    with pytest.raises(config.ConfigError, match="dataset.pseudonym_salt_file .* lies under results"):
        config.load(overrides={"results": str(tmp_path / "results"), "dataset": {
            "phantom": {"enabled": False}, "pseudonym_salt_file": str(tmp_path / "results" / "keys" / "salt")}})
    config.load(overrides={"results": str(tmp_path / "results"), "dataset": {
        "phantom": {"enabled": False}, "pseudonym_salt_file": str(tmp_path / "private" / "salt")}})
