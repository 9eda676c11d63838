"""The emulator's fidelity to the parts of the wire contract the plugin's tests rely on."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from azure.cognitiveservices.vision.customvision.training import CustomVisionTrainingClient
from azure.cognitiveservices.vision.customvision.training.models import (CustomVisionErrorException,
                                                                        ImageFileCreateBatch, ImageFileCreateEntry)
from azure_emulator import AzureEmulator
from msrest.authentication import ApiKeyCredentials
from PIL import Image

KEY = "emulator-training-key"


@pytest.fixture
def emulator():
    with AzureEmulator() as running:
        yield running


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("header", ["Training-Key", "training-key", "TRAINING-KEY"])
@pytest.mark.parametrize("version", ["v3.3", "v3.4-preview"])
def test_key_header_is_case_insensitive_and_versions_vary(emulator, header, version):
    url = f"{emulator.endpoint}/customvision/{version}/training/domains"
    answer = requests.get(url, headers={header: KEY}, timeout=5)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    assert requests.get(url, headers={header: "wrong"}, timeout=5).status_code == 401
    assert requests.get(url, timeout=5).status_code == 401


def test_oversize_batch_and_delete_follow_the_service(emulator):
    client = CustomVisionTrainingClient(emulator.endpoint, ApiKeyCredentials(in_headers={"Training-key": KEY}))
    project = client.create_project("p")
    tag = client.create_tag(project.id, "t")
    batch = ImageFileCreateBatch(images=[ImageFileCreateEntry(name=f"{i}", contents=png(i), tag_ids=[tag.id])
                                         for i in range(65)])
    with pytest.raises(CustomVisionErrorException) as error:
        client.create_images_from_files(project.id, batch)
    assert error.value.response.status_code == 400 and error.value.error.code == "BadRequestExceededBatchSize"
    summary = client.create_images_from_files(project.id, ImageFileCreateBatch(images=batch.images[:2]))
    assert summary.is_batch_successful and [r.source_url for r in summary.images] == ['"0"', '"1"']
    answer = requests.delete(f"{emulator.endpoint}/customvision/v3.4-preview/training/projects/{project.id}",
                             headers={"Training-Key": KEY}, timeout=5)
    assert answer.status_code == 204 and answer.content == b""


def test_training_needs_five_images_per_tag(emulator):
    client = CustomVisionTrainingClient(emulator.endpoint, ApiKeyCredentials(in_headers={"Training-key": KEY}))
    project = client.create_project("p")
    tags = [client.create_tag(project.id, name).id for name in ("a", "b")]
    client.create_images_from_files(project.id, ImageFileCreateBatch(images=[
        ImageFileCreateEntry(name=f"{i}", contents=png(i), tag_ids=[tags[i % 2]]) for i in range(9)]))
    with pytest.raises(CustomVisionErrorException) as error:
        client.train_project(project.id)
    assert error.value.error.code == "BadRequestMultiClassClassificationTrainingValidationFailed"


def test_command_line_mode_serves_until_stopped():
    script = Path(__file__).with_name("azure_emulator.py")
    env = {**os.environ, "AZURE_CUSTOM_VISION_TRAINING_KEY": "demo-key"}
    with subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True,
                          env=env) as server:
        try:
            endpoint = re.search(r"http://127\.0\.0\.1:\d+", server.stdout.readline())[0]
            answer = requests.get(f"{endpoint}/customvision/v3.4-preview/training/domains",
                                  headers={"Training-Key": "demo-key"}, timeout=5)
            assert answer.status_code == 200
        finally:
            server.terminate()
