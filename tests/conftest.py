"""Shared fixtures: a tiny phantom (written once per session) and config helpers."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
TINY = {"patients": 24, "seed": 3, "physeal_rate": 0.45, "size_scale": 0.3}


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """A small phantom in GRAZPEDWRI-DX layout; tests copy it before changing anything."""
    from physis import phantom

    root = tmp_path_factory.mktemp("phantom")
    phantom.generate(root, n_patients=TINY["patients"], seed=TINY["seed"], physeal_rate=TINY["physeal_rate"],
                     size_scale=TINY["size_scale"])
    return root


@pytest.fixture
def phantom_copy(phantom_root, tmp_path) -> Path:
    """A private copy of the tiny phantom that a test may damage."""
    return Path(shutil.copytree(phantom_root, tmp_path / "data"))


def make_config(root: Path, results: Path, **sections) -> dict:
    """The default config validated with defaults, pointed at ``root``/``results``."""
    from physis import config

    overrides = {"dataset": {"root": str(root), "phantom": {"enabled": False}}, "results": str(results),
                 "convert": {"tfrecord": False}}
    overrides.update(sections)
    return config.load(overrides=overrides)
