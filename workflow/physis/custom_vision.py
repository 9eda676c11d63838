"""The Azure Custom Vision client behind the ``azure_custom_vision`` plugin (``plugins/azure_custom_vision.py``).

The plugin file holds the model's metadata and its opt-in check, which Snakemake reads while it
parses the workflow; this module holds everything that talks to the service through the SDK
(azure-cognitiveservices-vision-customvision on msrest), imported only when a hook runs. The
plugin's docstring describes the lifecycle: project, tags, batched uploads with per-image
statuses, training, publishing, optional export, and ``azure_state.json`` for resuming.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import requests
from azure.cognitiveservices.vision.customvision.prediction import CustomVisionPredictionClient
from azure.cognitiveservices.vision.customvision.training import CustomVisionTrainingClient
from azure.cognitiveservices.vision.customvision.training.models import (Domain, ImageFileCreateBatch,
                                                                        ImageFileCreateEntry, Iteration, Project)
from msrest.authentication import ApiKeyCredentials
from msrest.exceptions import ClientException, ClientRequestError, HttpOperationError
from PIL import Image

from physis.cloud import RetryPolicy, Transient, call_with_retries, parse_retry_after
from physis.images import read_gray, to_uint8
from physis.io import write_json, write_parquet
from physis.logs import progress
from physis.plugins import ModelConfig, PluginError, PredictData, TrainData

log = logging.getLogger(__name__)
T = TypeVar("T")

TAGS = ("no_fracture", "fracture")  # index = label
STATE_FILE = "azure_state.json"
REJECTS_FILE = "rejected.parquet"
MAX_BATCH = 64
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # prediction's limit (training allows 6 MB): one encoding serves both
TRAINING_TYPES = ("Regular", "Advanced")
EXPORT_FLAVORS = {"ONNX": None, "TensorFlow": "TensorFlowNormal"}
UPLOADED = {"OK", "OKDuplicate"}  # OKDuplicate: the project already holds these bytes (a resumed batch)
#: Per-image upload statuses that another attempt cannot fix.
PERMANENT = {"ErrorImageFormat", "ErrorImageSize", "ErrorImageDimensions", "ErrorLimitExceed", "ErrorTagLimitExceed",
             "ErrorRegionLimitExceed", "ErrorNegativeAndRegularTagOnSameImage", "ErrorInvalidTag"}
#: HTTP statuses worth another try: msrest's own list for GETs (408, 5xx but 501/505) and 429.
RETRY_STATUSES = {408, 429} | set(range(500, 600)) - {501, 505}


class AzureCustomVisionError(PluginError):
    """A failed service call or run; the message names the step, HTTP status and service message."""

    @classmethod
    def from_sdk(cls, step: str, err: ClientException) -> AzureCustomVisionError:
        """Describe an SDK error without its request (whose headers hold the key)."""
        response = getattr(err, "response", None)
        if response is None:  # ClientRequestError and friends: no HTTP answer at all
            return cls(f"azure_custom_vision: {step} failed: {err}")
        error = getattr(err, "error", None)  # CustomVisionError model of a CustomVisionErrorException
        code = getattr(error, "code", None)
        # Gateway bodies ({"error": {...}}, e.g. 429/401) and text/plain leave .error empty: use the text.
        message = getattr(error, "message", None) or response.text[:500] or response.reason
        return cls(f"azure_custom_vision: {step} failed: HTTP {response.status_code}"
                   f"{f' {code}' if code else ''}: {message}")


def _transient(err: Exception) -> Transient | None:
    if isinstance(err, ClientRequestError):
        return Transient(f"connection failed ({err})")
    response = getattr(err, "response", None)
    if not isinstance(err, HttpOperationError) or response is None:
        return None
    if response.status_code not in RETRY_STATUSES:
        return None
    return Transient(f"HTTP {response.status_code}", parse_retry_after(response.headers.get("Retry-After")))


def _settings_problem(params: dict[str, Any]) -> str | None:
    if not 1 <= params["batch_size"] <= MAX_BATCH:
        return f"batch_size must be 1-{MAX_BATCH} (Azure's limit per upload), got {params['batch_size']}"
    if params["training_type"] not in TRAINING_TYPES:
        return f"training_type must be one of {', '.join(TRAINING_TYPES)}, got {params['training_type']!r}"
    if params["training_type"] == "Advanced" and params["reserved_budget_in_hours"] < 1:
        return "Advanced training needs reserved_budget_in_hours >= 1"
    if params["export"] not in (None, *EXPORT_FLAVORS):
        return f"export must be null or one of {', '.join(EXPORT_FLAVORS)}, got {params['export']!r}"
    if params["poll_interval_s"] <= 0 or params["max_wait_hours"] <= 0 or params["max_retries"] < 0:
        return "poll_interval_s and max_wait_hours must be > 0 and max_retries >= 0"
    return None


def _text_boxes(boxes: pd.DataFrame | None) -> dict[str, list[tuple[float, float, float, float]]]:
    """The ``text`` boxes (preprocessed pixels) per image id."""
    if boxes is None or len(boxes) == 0:
        return {}
    text = boxes[boxes["class"] == "text"]
    return {image_id: list(zip(group.x, group.y, group.w, group.h)) for image_id, group in text.groupby("image_id")}


def film_png(path: str | Path, text_boxes: Iterable[tuple[float, float, float, float]]) -> bytes:
    """The preprocessed film as 8-bit PNG bytes with its burned-in text blacked out.

    Re-encoding from pixels drops every header and PNG text chunk. Boxes are widened to whole
    pixels (floor/ceil) so that no partly covered pixel row of text survives.
    """
    pixels = read_gray(path).copy()  # decoded arrays can be read-only views
    height, width = pixels.shape
    for x, y, w, h in text_boxes:
        x0, y0 = max(math.floor(x), 0), max(math.floor(y), 0)
        x1, y1 = min(math.ceil(x + w), width), min(math.ceil(y + h), height)
        pixels[y0:y1, x0:x1] = 0
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buffer, format="PNG")
    if buffer.tell() > MAX_IMAGE_BYTES:
        raise PluginError(f"azure_custom_vision: {path} is {buffer.tell()} bytes as PNG; Azure takes at most "
                          f"{MAX_IMAGE_BYTES} (use a smaller preprocessing preset)")
    return buffer.getvalue()


@dataclass
class AzureState:
    """What exists in the cloud for this model: written after every step, read to resume. No secrets."""

    project_name: str | None = None
    project_id: str | None = None
    domain_id: str | None = None
    tag_ids: dict[str, str] = field(default_factory=dict)  # tag name -> id
    uploaded: list[str] = field(default_factory=list)  # image ids the project holds
    rejected: dict[str, str] = field(default_factory=dict)  # image id -> reason
    iteration_id: str | None = None
    publish_name: str | None = None
    export_file: str | None = None


class Session:
    """The plugin's "model": SDK clients built from the environment, plus the recorded state."""

    def __init__(self, cfg: ModelConfig, state_path: Path):
        reason = _settings_problem(cfg.params)  # the plugin has checked opt-in and credentials
        if reason:
            raise PluginError(f"azure_custom_vision: {reason}")
        self.cfg, self.params, self.state_path = cfg, cfg.params, state_path
        endpoint = os.environ[self.params["endpoint_env"]]
        prediction_endpoint = os.environ.get(self.params["prediction_endpoint_env"]) or endpoint
        self.trainer = CustomVisionTrainingClient(
            endpoint, ApiKeyCredentials(in_headers={"Training-key": os.environ[self.params["training_key_env"]]}))
        self.predictor = CustomVisionPredictionClient(
            prediction_endpoint,
            ApiKeyCredentials(in_headers={"Prediction-key": os.environ[self.params["prediction_key_env"]]}))
        for client in (self.trainer, self.predictor):
            client.config.connection.timeout = self.params["request_timeout_s"]  # msrest default: 100 s
        self.policy = RetryPolicy(self.params["max_retries"], self.params["retry_base_s"],
                                  self.params["retry_max_wait_s"])
        self.state = AzureState(**json.loads(state_path.read_text())) if state_path.exists() else AzureState()
        log.info("Azure Custom Vision at %s (training) and %s (prediction)", endpoint, prediction_endpoint)

    # --- plumbing --------------------------------------------------------------------------
    def call(self, step: str, operation: Callable[..., T], *args, **kwargs) -> T:
        """One SDK call with back-off on 429/5xx/connection errors; other errors name the step."""
        try:
            return call_with_retries(lambda: operation(*args, **kwargs), self.policy, _transient, step)
        except ClientException as err:  # CustomVisionErrorException ⊂ HttpOperationError, ClientRequestError, …
            raise AzureCustomVisionError.from_sdk(step, err) from err

    def save_state(self) -> None:
        write_json(asdict(self.state), self.state_path)

    def wait(self, what: str, fetch: Callable[[], T], finished: Callable[[T], bool]) -> T:
        """Poll ``fetch`` until ``finished``; the limit counts from this run's start of waiting."""
        deadline = time.monotonic() + self.params["max_wait_hours"] * 3600
        while True:
            current = self.call(f"poll {what}", fetch)
            if finished(current):
                return current
            if time.monotonic() >= deadline:
                raise AzureCustomVisionError(f"azure_custom_vision: {what} still running after "
                                             f"{self.params['max_wait_hours']} h (max_wait_hours)")
            time.sleep(self.params["poll_interval_s"])

    # --- train steps -----------------------------------------------------------------------
    def check_resumable(self, frame: pd.DataFrame) -> None:
        """Refuse to resume a project that holds films outside this train split."""
        foreign = sorted(set(self.state.uploaded) - set(frame["image_id"]))
        if foreign:
            raise PluginError(f"azure_custom_vision: project {self.state.project_id} in {self.state_path} holds "
                              f"{len(foreign)} films outside this train split (e.g. {foreign[0]}); delete the "
                              f"project and {self.state_path} to start over")

    def find_project(self) -> Project | None:
        """The project named in the state, also when its creation's answer was lost."""
        name = self.state.project_name
        return next((p for p in self.call("list projects", self.trainer.get_projects) if p.name == name), None)

    def ensure_project(self) -> None:
        if self.state.project_id:
            if self.find_project() is not None:
                log.info("resuming project %s from %s", self.state.project_id, self.state_path)
                return
            log.warning("project %s recorded in %s no longer exists: starting over", self.state.project_id,
                        self.state_path)
            self.state = AzureState()
        domain = self.domain()
        if not self.state.project_name:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            self.state.project_name = f"{self.params['project_name']}-{self.cfg.name}-{stamp}-{uuid.uuid4().hex[:6]}"
            self.save_state()  # before the POST, so that a lost answer can be found by name
        export = self.params["export"]

        def create() -> Project:
            return self.find_project() or self.trainer.create_project(
                self.state.project_name, description="physis: pseudonymised preprocessed films, text blacked out",
                domain_id=domain.id, classification_type="Multiclass",
                target_export_platforms=[export] if export else None)

        self.state.project_id, self.state.domain_id = self.call("create project", create).id, domain.id
        self.save_state()
        log.info("created project %s (%s, domain %s)", self.state.project_id, self.state.project_name, domain.name)

    def domain(self) -> Domain:
        wanted = self.params["domain"]
        domains = [d for d in self.call("list domains", self.trainer.get_domains) if d.type == "Classification"]
        match = next((d for d in domains if wanted in (d.id, d.name)), None)
        if match is None:
            raise PluginError(f"azure_custom_vision: no classification domain {wanted!r} "
                              f"(known: {', '.join(d.name for d in domains)})")
        if self.params["export"] and not match.exportable:
            raise PluginError(f"azure_custom_vision: export needs a compact domain, and {match.name!r} is not "
                              "(e.g. domain: \"General (compact)\")")
        return match

    def ensure_tags(self) -> None:
        if set(self.state.tag_ids) == set(TAGS):
            return
        project_id = self.state.project_id

        def create_missing() -> dict[str, str]:  # safe to repeat: existing tags are reused
            tags = {tag.name: tag.id for tag in self.trainer.get_tags(project_id)}
            for name in TAGS:
                if name not in tags:
                    tags[name] = self.trainer.create_tag(project_id, name).id
            return tags

        self.state.tag_ids = self.call("create tags", create_missing)
        self.save_state()

    def upload(self, frame: pd.DataFrame, text: dict[str, list]) -> None:
        """Upload the films not yet in the project; retry failed ones, list the rest as rejects."""
        done = set(self.state.uploaded)
        pending = frame[~frame["image_id"].isin(done)]
        self.state.rejected = {}
        batch_size = self.params["batch_size"]
        for attempt in range(1, self.params["max_retries"] + 2):
            if pending.empty:
                break
            if attempt > 1:
                time.sleep(self.policy.delay(attempt - 1, None))
            failed: dict[str, str] = {}
            batches = [pending.iloc[i:i + batch_size] for i in range(0, len(pending), batch_size)]
            for batch in progress(batches, desc=f"upload to Azure (attempt {attempt})", total=len(batches)):
                failed.update(self.upload_batch(batch, text))
            retry = {image_id: status for image_id, status in failed.items() if status not in PERMANENT}
            self.state.rejected.update({i: s for i, s in failed.items() if i not in retry})
            pending = pending[pending["image_id"].isin(retry)]
        for image_id in pending["image_id"]:
            self.state.rejected[image_id] = f"{failed[image_id]} after {self.params['max_retries'] + 1} attempts"
        self.save_state()
        rejects = pd.DataFrame(list(self.state.rejected.items()), columns=["image_id", "reason"])
        write_parquet(rejects, self.cfg.work_dir / REJECTS_FILE)
        if self.state.rejected:
            log.warning("%d film(s) rejected by Azure: listed in %s", len(self.state.rejected),
                        self.cfg.work_dir / REJECTS_FILE)
        log.info("project holds %d films", len(self.state.uploaded))

    def upload_batch(self, batch: pd.DataFrame, text: dict[str, list]) -> dict[str, str]:
        """Upload one batch; record the stored films; return the failed ones' statuses."""
        entries = [ImageFileCreateEntry(name=row.image_id, contents=film_png(row.path, text.get(row.image_id, [])),
                                        tag_ids=[self.state.tag_ids[TAGS[int(row.label)]]])
                   for row in batch.itertuples(index=False)]
        summary = self.call("upload images", self.trainer.create_images_from_files, self.state.project_id,
                            ImageFileCreateBatch(images=entries))
        # A 207 answer parses like a 200: only the per-image status tells. Real answers quote
        # the file name in sourceUrl.
        status = {result.source_url.strip('"'): result.status for result in summary.images or []}
        failed = {}
        for image_id in batch["image_id"]:
            if status.get(image_id) in UPLOADED:
                self.state.uploaded.append(image_id)
            else:
                failed[image_id] = status.get(image_id, "no status returned")
        self.save_state()
        return failed

    def train_iteration(self) -> None:
        """Start (or adopt) the training, then wait for it; a Failed iteration is an error."""
        project_id = self.state.project_id
        if not self.state.iteration_id:
            def start() -> Iteration:
                # A training this project already runs (the answer to an earlier start was lost,
                # or the run was killed before recording it) is adopted: never pay twice.
                started = [it for it in self.trainer.get_iterations(project_id)
                           if it.status in ("Training", "Completed")]
                return max(started, key=lambda it: it.created) if started else self.trainer.train_project(
                    project_id, training_type=self.params["training_type"],
                    reserved_budget_in_hours=self.params["reserved_budget_in_hours"])

            self.state.iteration_id = self.call("start training", start).id
            self.save_state()
            log.info("training iteration %s (%s, budget %s h)", self.state.iteration_id, self.params["training_type"],
                     self.params["reserved_budget_in_hours"])
        iteration = self.wait("training", lambda: self.trainer.get_iteration(project_id, self.state.iteration_id),
                              lambda it: it.status in ("Completed", "Failed"))
        if iteration.status == "Failed":
            raise AzureCustomVisionError(f"azure_custom_vision: training failed: {iteration.training_error_details}")
        log.info("training completed in %s min", iteration.training_time_in_minutes)

    def publish(self) -> None:
        if self.state.publish_name:
            return
        project_id, iteration_id = self.state.project_id, self.state.iteration_id
        name = f"{self.params['project_name']}-{iteration_id}"

        def publish_once() -> str:  # safe to repeat: an iteration already published keeps its name
            published = self.trainer.get_iteration(project_id, iteration_id).publish_name
            if not published:
                self.trainer.publish_iteration(project_id, iteration_id, name,
                                               os.environ[self.params["prediction_resource_id_env"]])
            return published or name

        self.state.publish_name = self.call("publish iteration", publish_once)
        self.save_state()
        log.info("published iteration %s as %s", iteration_id, self.state.publish_name)

    def export(self) -> None:
        """Download the trained iteration for offline use. A failure only warns: the published
        model is what the benchmark uses, and a rerun retries the export."""
        platform = self.params["export"]
        if not platform or self.state.export_file:
            return
        project_id, iteration_id = self.state.project_id, self.state.iteration_id

        def exports() -> list:
            return [e for e in self.trainer.get_exports(project_id, iteration_id) if e.platform == platform]

        def start() -> None:  # the service refuses a second export to one platform: reuse the first
            if not exports():
                self.trainer.export_iteration(project_id, iteration_id, platform, EXPORT_FLAVORS[platform])

        try:
            self.call("start export", start)
            done = self.wait("export", exports, lambda found: found and found[0].status in ("Done", "Failed"))[0]
            if done.status == "Failed":
                raise AzureCustomVisionError(f"azure_custom_vision: export to {platform} failed")
            # The download URI carries a storage token: keep it out of messages.
            response = requests.get(done.download_uri, timeout=self.params["request_timeout_s"])
            if response.status_code != 200:
                raise AzureCustomVisionError(f"azure_custom_vision: export download failed: HTTP "
                                             f"{response.status_code}")
        except (AzureCustomVisionError, requests.RequestException) as err:
            log.warning("%s; the model stays published, and a rerun of train retries the export",
                        err if isinstance(err, AzureCustomVisionError) else "export download failed")
            return
        path = self.cfg.work_dir / f"azure_export_{platform.lower()}.zip"
        with open(path, "wb") as out:
            out.write(response.content)
        self.state.export_file = path.name
        self.save_state()
        log.info("exported iteration %s to %s", iteration_id, path)

    def discard(self) -> None:
        """After a failed train: unpublish and delete the project unless ``keep_project``."""
        name = self.state.project_name
        if name is None:
            return
        if self.params["keep_project"]:
            log.error("train failed; project %r kept (keep_project: true): rerun train to resume it", name)
            return
        try:  # looked up by name: the project may exist although its id was never recorded
            project = self.find_project()
            if project is None:
                return
            for iteration in self.call("list iterations", self.trainer.get_iterations, project.id):
                if iteration.publish_name:  # a published iteration blocks deletion
                    self.call("unpublish iteration", self.trainer.unpublish_iteration, project.id, iteration.id)
            self.call("delete project", self.trainer.delete_project, project.id)
        except AzureCustomVisionError as err:
            log.error("train failed, and project %r could not be deleted (%s): delete it in the Custom Vision "
                      "portal", name, err)
            return
        self.state_path.unlink(missing_ok=True)
        log.error("train failed; project %r deleted (keep_project: true would keep it for a resumed run)", name)


# --- the plugin's hooks --------------------------------------------------------------------
def build(cfg: ModelConfig) -> Session:
    if cfg.work_dir is None:
        raise PluginError("azure_custom_vision: needs cfg.work_dir for its state file")
    return Session(cfg, Path(cfg.work_dir) / STATE_FILE)


def train(model: Session, data: TrainData, cfg: ModelConfig, callbacks: list) -> None:
    """Upload the train split, train, publish (and export); resumes from ``azure_state.json``.

    A failure deletes the project (unless ``keep_project``); an interrupted or killed job does not
    get that far, so its rerun resumes. ``callbacks`` drive Keras loops and do not apply here.
    """
    frame = data.frames["train"]
    model.check_resumable(frame)
    try:
        model.ensure_project()
        model.ensure_tags()
        if not model.state.iteration_id:  # once training started, the uploaded set is frozen
            model.upload(frame, _text_boxes(data.boxes))
        model.train_iteration()
        model.publish()
    except Exception:
        model.discard()
        raise
    model.export()


def predict(model: Session, data: PredictData, cfg: ModelConfig) -> np.ndarray:
    """Probability of the fracture tag per row of ``data.frame`` (no-store endpoint)."""
    state = model.state
    if not state.publish_name:
        raise PluginError(f"azure_custom_vision: no published iteration in {model.state_path}: run train first")
    text = _text_boxes(data.boxes)
    fracture = state.tag_ids[TAGS[1]]
    scores = np.empty(len(data.frame), dtype=np.float32)
    rows = data.frame.itertuples(index=False)
    for i, row in enumerate(progress(rows, desc="classify with Azure", total=len(data.frame))):
        result = model.call(f"classify {row.image_id}", model.predictor.classify_image_with_no_store,
                            state.project_id, state.publish_name, film_png(row.path, text.get(row.image_id, [])))
        probability = next((p.probability for p in result.predictions if p.tag_id == fracture), None)
        if probability is None:
            raise AzureCustomVisionError(f"azure_custom_vision: classify {row.image_id}: no fracture tag in the answer")
        scores[i] = probability
    return scores


def save(model: Session, folder: str | Path) -> None:
    """Write the handle (project, iteration, publish name, tags; no secrets) as JSON."""
    write_json(asdict(model.state), Path(folder) / STATE_FILE)


def load(folder: str | Path, cfg: ModelConfig) -> Session:
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise PluginError(f"azure_custom_vision: {path} not found: run train first")
    return Session(cfg, path)
