"""The azure_custom_vision plugin (and physis.custom_vision behind it), driven through the real SDK
against tests/azure_emulator.py.

Every test runs a fresh emulator on 127.0.0.1 and tiny 64×32 films; fault injection covers
throttling (429 + Retry-After), 5xx on upload, partial 207 batches, failed and endless
training, and answers lost after the service acted.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from azure_emulator import DOMAINS, AzureEmulator
from PIL import Image

from physis import custom_vision
from physis.images import write_gray16
from physis.plugins import PLUGIN_DIR, ModelConfig, PluginError, PredictData, TrainData, load_source, resolve_params

TRAINING_KEY = "tk-3f9a1c7e-not-a-real-key"
PREDICTION_KEY = "pk-8b2d6e04-not-a-real-key"
RESOURCE_ID = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/emu"
TEXT_BOX = (40.4, 1.6, 20.2, 6.5)  # x, y, w, h in preprocessed pixels; fractional on purpose
TEXT_ROWS, TEXT_COLS = slice(1, 9), slice(40, 61)  # the box widened to whole pixels
BLOB_ROWS, BLOB_COLS = slice(10, 22), slice(8, 24)  # the "fracture" the emulator can learn
ENV = ("AZURE_CUSTOM_VISION_ENDPOINT", "AZURE_CUSTOM_VISION_TRAINING_KEY", "AZURE_CUSTOM_VISION_PREDICTION_KEY",
       "AZURE_CUSTOM_VISION_PREDICTION_RESOURCE_ID", "AZURE_CUSTOM_VISION_PREDICTION_ENDPOINT")
FAST = {"allow_cloud_upload": True, "poll_interval_s": 0.01, "retry_base_s": 0.01, "retry_max_wait_s": 0.05,
        "max_retries": 3, "reserved_budget_in_hours": 7}


@pytest.fixture(scope="module")
def plugin():
    """The plugin loaded and validated by the registry (only this file: others' stay out)."""
    return load_source(str(PLUGIN_DIR / "azure_custom_vision.py"))


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """150 train and 24 test films: fracture films carry a bright blob; all carry burned-in text."""
    folder = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(0)
    rows, boxes = [], []
    for i in range(174):
        split, label = ("train", int(i % 3 == 0)) if i < 150 else ("test", i % 2)
        pixels = rng.integers(6000, 10000, size=(32, 64)).astype(np.uint16)  # noise: no two films alike
        pixels[2:8, 41:60] = 65535  # burned-in text
        if label:
            pixels[BLOB_ROWS, BLOB_COLS] = 50000
            boxes.append(("film%03d" % i, "fracture", 8, 10, 16, 12))
        path = folder / f"film{i:03d}.png"
        write_gray16(path, pixels)
        rows.append({"image_id": f"film{i:03d}", "patient_id": f"p{i:03d}", "path": str(path), "label": label,
                     "split": split})
        boxes.append((f"film{i:03d}", "text", *TEXT_BOX))
    frame = pd.DataFrame(rows)
    return SimpleNamespace(train=frame[frame.split == "train"].reset_index(drop=True),
                           test=frame[frame.split == "test"].reset_index(drop=True),
                           boxes=pd.DataFrame(boxes, columns=["image_id", "class", "x", "y", "w", "h"]))


@pytest.fixture
def emulator():
    with AzureEmulator(TRAINING_KEY, PREDICTION_KEY) as running:
        yield running


@pytest.fixture
def env(monkeypatch, emulator):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_CUSTOM_VISION_ENDPOINT", emulator.endpoint)
    monkeypatch.setenv("AZURE_CUSTOM_VISION_TRAINING_KEY", TRAINING_KEY)
    monkeypatch.setenv("AZURE_CUSTOM_VISION_PREDICTION_KEY", PREDICTION_KEY)
    monkeypatch.setenv("AZURE_CUSTOM_VISION_PREDICTION_RESOURCE_ID", RESOURCE_ID)


@pytest.fixture
def make_cfg(plugin, tmp_path):
    def make(**params) -> ModelConfig:
        return ModelConfig(name="azure_custom_vision", spec=plugin.spec, input_shape=(32, 64, 1),
                           params=resolve_params(plugin, {**FAST, **params}), work_dir=tmp_path / "model")
    return make


def train_data(films) -> TrainData:
    return TrainData(train=None, val=None, frames={"train": films.train, "val": films.test}, boxes=films.boxes,
                     class_weight=None, preset_dir=Path("unused"))


def predict_data(films, frame=None) -> PredictData:
    frame = films.test if frame is None else frame
    return PredictData(images=None, frame=frame, boxes=films.boxes[films.boxes.image_id.isin(frame.image_id)],
                       preset_dir=Path("unused"))


def run_train(plugin, cfg, films):
    model = plugin.module.build(cfg)
    plugin.module.train(model, train_data(films), cfg, [])
    return model


def state(cfg) -> dict:
    return json.loads((cfg.work_dir / "azure_state.json").read_text())


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


# --- metadata and opt-in -------------------------------------------------------------------
def test_spec_declares_service_and_retirement(plugin):
    spec = plugin.spec
    assert (spec.kind, spec.framework, spec.resources.gpus) == ("service", "service", 0)
    assert "25 Sep 2028" in spec.description and "inactive" in spec.description
    assert "25 Sep 2028" in plugin.module.__doc__
    assert spec.params["allow_cloud_upload"] is False and spec.params["batch_size"] == 64
    assert not any("key" in str(value).lower() and "_env" not in name for name, value in spec.params.items())


def test_available_gives_reasons(make_cfg, env, monkeypatch, plugin):
    assert "allow_cloud_upload is false" in plugin.module.available(make_cfg(allow_cloud_upload=False))
    cfg = make_cfg()
    assert plugin.module.available(cfg) is None
    monkeypatch.delenv("AZURE_CUSTOM_VISION_PREDICTION_KEY")
    assert plugin.module.available(cfg) == "environment variable AZURE_CUSTOM_VISION_PREDICTION_KEY is not set"
    with pytest.raises(PluginError, match="AZURE_CUSTOM_VISION_PREDICTION_KEY is not set"):
        plugin.module.build(cfg)
    monkeypatch.setenv("MY_KEY", PREDICTION_KEY)  # the variable's name comes from config
    assert plugin.module.available(make_cfg(prediction_key_env="MY_KEY")) is None


@pytest.mark.parametrize("params, message", [({"batch_size": 65}, "batch_size must be 1-64"),
                                             ({"export": "CoreML"}, "export must be"),
                                             ({"training_type": "Fast"}, "training_type must be")])
def test_bad_settings_fail_at_build(make_cfg, env, plugin, params, message):
    with pytest.raises(PluginError, match=message):
        plugin.module.build(make_cfg(**params))


# --- the whole cycle -----------------------------------------------------------------------
def test_whole_cycle_trains_publishes_and_predicts(make_cfg, env, emulator, plugin, films, tmp_path):
    cfg = make_cfg()
    model = run_train(plugin, cfg, films)

    uploads = emulator.calls("create_images_from_files")
    assert [call.images for call in uploads] == [64, 64, 22]
    assert sorted(emulator.uploads) == sorted(films.train.image_id)  # the train split only, named by id
    (project,) = emulator.projects.values()
    assert project.wire["settings"]["classificationType"] == "Multiclass"
    assert project.wire["settings"]["domainId"] == next(d["id"] for d in DOMAINS if d["name"] == "General [A2]")
    assert sorted(tag["name"] for tag in project.tags.values()) == ["fracture", "no_fracture"]
    (train_call,) = emulator.calls("train_project")
    assert train_call.query["trainingType"] == "Advanced" and train_call.query["reservedBudgetInHours"] == "7"
    (iteration,) = project.iterations.values()
    assert iteration.wire["publishName"] and iteration.wire["originalPublishResourceId"] == RESOURCE_ID
    recorded = state(cfg)
    assert (recorded["project_id"], recorded["iteration_id"]) == (project.wire["id"], iteration.wire["id"])
    assert sorted(recorded["uploaded"]) == sorted(films.train.image_id)
    assert pd.read_parquet(cfg.work_dir / "rejected.parquet").empty

    plugin.module.save(model, tmp_path / "saved")
    loaded = plugin.module.load(tmp_path / "saved", cfg)
    scores = plugin.module.predict(loaded, predict_data(films), cfg)
    assert scores.shape == (len(films.test),) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    labels = films.test.label.to_numpy()
    assert scores[labels == 1].min() > scores[labels == 0].max()  # the blob is learnable
    assert len(emulator.calls("classify_image_with_no_store")) == len(films.test)
    assert {call.op for call in emulator.requests} <= {"get_domains", "get_projects", "create_project", "get_tags",
                                                       "create_tag", "create_images_from_files", "get_iterations",
                                                       "train_project", "get_iteration", "publish_iteration",
                                                       "classify_image_with_no_store"}

    shuffled = films.test.sample(frac=1, random_state=1).reset_index(drop=True)
    again = plugin.module.predict(loaded, predict_data(films, shuffled), cfg)
    expected = dict(zip(films.test.image_id, scores))
    assert np.allclose(again, [expected[image_id] for image_id in shuffled.image_id])


def test_uploads_have_text_blacked_out_and_nothing_else(make_cfg, env, emulator, plugin, films):
    run_train(plugin, make_cfg(), films)
    for row in films.train.itertuples():
        pixels = decode(emulator.uploads[row.image_id])
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 64)
        assert not pixels[TEXT_ROWS, TEXT_COLS].any(), row.image_id
        assert pixels[:, :TEXT_COLS.start].min() > 0  # the rest of the film is untouched
        if row.label:
            assert (pixels[BLOB_ROWS, BLOB_COLS] == 50000 >> 8).all()
    image = Image.open(io.BytesIO(next(iter(emulator.uploads.values()))))
    assert not image.info  # no metadata chunks travel with the pixels


def test_predictions_black_out_text_too(make_cfg, env, emulator, plugin, films):
    model = run_train(plugin, make_cfg(), films)
    plugin.module.predict(model, predict_data(films), model.cfg)
    assert len(emulator.classified) == len(films.test)
    assert all(not decode(png)[TEXT_ROWS, TEXT_COLS].any() for png in emulator.classified)


def test_keys_never_in_logs_results_or_errors(make_cfg, env, emulator, plugin, films, caplog, capsys, tmp_path):
    caplog.set_level(logging.DEBUG)  # msrest and urllib3 too
    cfg = make_cfg(export="ONNX", domain="General (compact)")
    emulator.fail("create_images_from_files", 429, retry_after="0")
    model = run_train(plugin, cfg, films)
    plugin.module.save(model, tmp_path / "saved")
    plugin.module.predict(plugin.module.load(tmp_path / "saved", cfg), predict_data(films), cfg)
    emulator.fail("create_project", 400, code="BadRequestProjectName", message="Invalid name")
    failing = make_cfg()
    failing.work_dir = tmp_path / "failing"
    with pytest.raises(PluginError) as failure:
        run_train(plugin, failing, films)

    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, str(failure.value), repr(failure.value)]
    texts += [path.read_bytes().decode("latin-1") for path in tmp_path.rglob("*") if path.is_file()]
    assert "retry" in caplog.text  # the logs did capture the run
    for key in (TRAINING_KEY, PREDICTION_KEY):
        assert not any(key in text for text in texts)


# --- retries -------------------------------------------------------------------------------
def test_429_on_upload_waits_retry_after_then_succeeds(make_cfg, env, emulator, plugin, films):
    emulator.fail("create_images_from_files", 429, calls=(2,), retry_after="1")
    run_train(plugin, make_cfg(retry_max_wait_s=5), films)
    calls = emulator.calls("create_images_from_files")
    assert [call.status for call in calls] == [200, 429, 200, 200]
    assert calls[2].time - calls[1].time >= 0.95  # Retry-After: 1 was honoured
    assert len(emulator.uploads) == 150


def test_retry_after_is_capped(make_cfg, env, emulator, plugin, films):
    emulator.fail("train_project", 429, retry_after="3600")
    started = time.monotonic()
    run_train(plugin, make_cfg(retry_max_wait_s=0.05), films)
    assert time.monotonic() - started < 30
    assert [call.status for call in emulator.calls("train_project")] == [429, 200]


def test_500_on_upload_is_retried_without_duplicates(make_cfg, env, emulator, plugin, films):
    emulator.fail("create_images_from_files", 500, calls=(1, 2))
    emulator.fail("create_images_from_files", 503, calls=(3,), lost_answer=True)  # stored, then 503
    run_train(plugin, make_cfg(), films)
    assert [call.status for call in emulator.calls("create_images_from_files")] == [500, 500, 503, 207, 200, 200]
    (project,) = emulator.projects.values()
    assert len(project.images) == 150


def test_persistent_500_is_a_clear_error_and_leaves_no_project(make_cfg, env, emulator, plugin, films, caplog):
    emulator.fail("create_images_from_files", 500, calls=None, message="Storage unavailable")
    cfg = make_cfg(max_retries=2)
    with pytest.raises(PluginError, match=r"upload images failed: HTTP 500 ErrorUnknown: Storage unavailable"):
        run_train(plugin, cfg, films)
    assert len(emulator.calls("create_images_from_files")) == 3  # first try + max_retries
    assert emulator.projects == {} and len(emulator.deleted_projects) == 1
    assert not (cfg.work_dir / "azure_state.json").exists()
    assert "deleted" in caplog.text


def test_429_on_prediction_is_retried(make_cfg, env, emulator, plugin, films):
    model = run_train(plugin, make_cfg(), films)
    emulator.fail("classify_image_with_no_store", 429, calls=(3, 4), retry_after="0")
    scores = plugin.module.predict(model, predict_data(films), model.cfg)
    assert len(scores) == len(films.test)
    assert [c.status for c in emulator.calls("classify_image_with_no_store")].count(429) == 2


def test_lost_answers_create_nothing_twice(make_cfg, env, emulator, plugin, films):
    for op in ("create_project", "create_tag", "train_project", "publish_iteration"):
        emulator.fail(op, 500, lost_answer=True)
    run_train(plugin, make_cfg(), films)
    (project,) = emulator.projects.values()
    assert len(project.tags) == 2 and len(project.iterations) == 1
    assert len(emulator.calls("train_project")) == 1  # the retry found the running training
    assert next(iter(project.iterations.values())).wire["publishName"]


# --- partial batches -----------------------------------------------------------------------
def test_partial_207_batch_retries_failed_images_and_lists_rejects(make_cfg, env, emulator, plugin, films):
    emulator.reject_images({"film001": "ErrorStorage"}, times=1)  # fails once, then stored
    emulator.reject_images({"film004": "ErrorImageFormat"}, times=None)  # permanent: not retried
    emulator.reject_images({"film007": "ErrorUnknown"}, times=None)  # transient, but never recovers
    cfg = make_cfg(max_retries=2)
    run_train(plugin, cfg, films)

    assert [call.status for call in emulator.calls("create_images_from_files")] == [207, 200, 200, 207, 207]
    assert [call.images for call in emulator.calls("create_images_from_files")] == [64, 64, 22, 2, 1]
    rejects = pd.read_parquet(cfg.work_dir / "rejected.parquet").set_index("image_id")["reason"].to_dict()
    assert rejects == {"film004": "ErrorImageFormat", "film007": "ErrorUnknown after 3 attempts"}
    assert "film001" in emulator.uploads and sorted(state(cfg)["rejected"]) == ["film004", "film007"]
    assert len(state(cfg)["uploaded"]) == 148
    (project,) = emulator.projects.values()
    assert len(project.images) == 148 and len(project.iterations) == 1


# --- training outcomes -----------------------------------------------------------------------
def test_failed_training_is_a_clear_error_and_leaves_no_project(make_cfg, env, emulator, plugin, films):
    emulator.training_outcome = "Failed"
    with pytest.raises(PluginError, match="training failed: Training failed: the model did not converge"):
        run_train(plugin, make_cfg(), films)
    assert emulator.projects == {} and len(emulator.deleted_projects) == 1


def test_failed_training_keeps_project_when_asked(make_cfg, env, emulator, plugin, films):
    emulator.training_outcome = "Failed"
    cfg = make_cfg(keep_project=True)
    with pytest.raises(PluginError, match="training failed"):
        run_train(plugin, cfg, films)
    assert list(emulator.projects) == [state(cfg)["project_id"]] and not emulator.deleted_projects


def test_endless_training_hits_the_wall_clock_limit(make_cfg, env, emulator, plugin, films):
    emulator.training_polls = None
    errors = []

    def run():
        try:
            run_train(plugin, make_cfg(max_wait_hours=0.0001), films)
        except PluginError as err:
            errors.append(str(err))

    worker = threading.Thread(target=run, daemon=True)  # a broken limit must fail the test, not hang it
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the poll loop ignored max_wait_hours"
    assert errors == ["azure_custom_vision: training still running after 0.0001 h (max_wait_hours)"]
    assert emulator.projects == {} and len(emulator.deleted_projects) == 1


def test_discard_unpublishes_before_deleting(make_cfg, env, emulator, plugin, films):
    model = run_train(plugin, make_cfg(), films)
    model.discard()
    assert [call.op for call in emulator.requests[-2:]] == ["unpublish_iteration", "delete_project"]
    assert emulator.projects == {}


# --- resume --------------------------------------------------------------------------------
def test_rerun_after_kill_resumes_without_reupload_or_second_training(make_cfg, env, emulator, plugin, films,
                                                                     monkeypatch):
    cfg = make_cfg()
    session = custom_vision.Session
    train_iteration, publish = session.train_iteration, session.publish

    def killed(self):  # a BaseException, like SIGINT: no cleanup, the state stays for the rerun
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "train_iteration", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(plugin, cfg, films)
    assert len(state(cfg)["uploaded"]) == 150 and state(cfg)["iteration_id"] is None

    monkeypatch.setattr(session, "train_iteration", train_iteration)
    monkeypatch.setattr(session, "publish", killed)  # killed again, while training
    with pytest.raises(KeyboardInterrupt):
        run_train(plugin, cfg, films)
    monkeypatch.setattr(session, "publish", publish)
    run_train(plugin, cfg, films)

    assert len(emulator.calls("create_images_from_files")) == 3  # the first run's batches only
    assert len(emulator.calls("create_project")) == len(emulator.calls("train_project")) == 1
    (project,) = emulator.projects.values()
    assert len(project.images) == 150 and next(iter(project.iterations.values())).wire["publishName"]


def test_second_train_is_a_no_op(make_cfg, env, emulator, plugin, films):
    cfg = make_cfg()
    run_train(plugin, cfg, films)
    before = len(emulator.requests)
    run_train(plugin, cfg, films)
    assert {call.op for call in emulator.requests[before:]} <= {"get_domains", "get_projects", "get_iteration"}


def test_state_from_another_split_is_refused(make_cfg, env, emulator, plugin, films):
    cfg = make_cfg()
    run_train(plugin, cfg, films)
    other = SimpleNamespace(**{**vars(films), "train": films.train.iloc[10:]})
    with pytest.raises(PluginError, match="10 films outside this train split"):
        run_train(plugin, cfg, other)
    assert len(emulator.projects) == 1  # refused before touching the project


def test_vanished_project_starts_over(make_cfg, env, emulator, plugin, films, caplog):
    cfg = make_cfg()
    model = run_train(plugin, cfg, films)
    recorded = (cfg.work_dir / "azure_state.json").read_text()
    model.discard()  # the project disappears behind the state file's back
    (cfg.work_dir / "azure_state.json").write_text(recorded)
    run_train(plugin, cfg, films)
    assert "no longer exists" in caplog.text and len(emulator.projects) == 1


# --- export --------------------------------------------------------------------------------
def test_export_downloads_the_trained_iteration(make_cfg, env, emulator, plugin, films):
    cfg = make_cfg(domain="General (compact)", export="ONNX")
    run_train(plugin, cfg, films)
    (call,) = emulator.calls("export_iteration")
    assert call.query["platform"] == "ONNX"
    assert state(cfg)["export_file"] == "azure_export_onnx.zip"
    assert (cfg.work_dir / "azure_export_onnx.zip").read_bytes()[:2] == b"PK"


def test_export_needs_a_compact_domain(make_cfg, env, emulator, plugin, films):
    with pytest.raises(PluginError, match="export needs a compact domain"):
        run_train(plugin, make_cfg(export="TensorFlow"), films)
    assert emulator.projects == {} and not emulator.calls("create_project")


def test_wrong_key_is_a_clear_error(make_cfg, env, emulator, plugin, films, monkeypatch):
    monkeypatch.setenv("AZURE_CUSTOM_VISION_TRAINING_KEY", "wrong")
    with pytest.raises(PluginError, match="list domains failed: HTTP 401.*invalid subscription key"):
        run_train(plugin, make_cfg(), films)
