"""A local emulator of the Azure Custom Vision REST API, for physis' tests and demo only.

It implements the subset that the ``azure_custom_vision`` plugin (``physis.custom_vision``) uses,
with the paths, camelCase query names, JSON keys and status codes of the installed SDK (3.1.1:
training API v3.4-preview, prediction v3.1; any ``v3.x[-preview]`` is accepted), so that the plugin
talks to it through the real SDK with the endpoint pointed at 127.0.0.1. Key headers are matched case-insensitively (the
SDK sends ``Training-key``, the REST reference says ``Training-Key``).

Scoring is deliberately simple and honest: when a project is trained, the emulator shrinks every
uploaded image of each tag to a 16×16 thumbnail and keeps the tag's mean thumbnail; a
prediction is a softmax over the negative squared distances to those centroids (a
nearest-centroid classifier). It is deterministic, and films that look like a tag's training
films score higher for that tag; it says nothing about how well Azure itself would do.

Fault injection (what the tests drive): :meth:`AzureEmulator.fail` answers chosen calls of one
operation with an HTTP error (429 with ``Retry-After``, 500, …); :meth:`AzureEmulator.reject_images`
makes uploads of chosen images come back with an error status in a 207 batch;
``training_outcome = "Failed"`` ends training with ``trainingErrorDetails``; ``training_polls =
None`` keeps training running forever (for the plugin's wall-clock limit).

Use in tests: ``with AzureEmulator() as emulator: ... emulator.endpoint ...``. For a workflow demo:
``python tests/azure_emulator.py --port 8642`` (keys from the plugin's environment variables).
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import io
import json
import os
import re
import threading
import time
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_BATCH = 64
MAX_TRAINING_IMAGE_BYTES = 6 * 1024 * 1024
MAX_PREDICTION_IMAGE_BYTES = 4 * 1024 * 1024
MIN_IMAGES_PER_TAG = 5
THUMBNAIL = (16, 16)
EXPORT_PLATFORMS = ["CoreML", "TensorFlow", "DockerFile", "ONNX", "VAIDK", "OpenVino"]


def _domain(domain_id: str, name: str, kind: str = "Classification", exportable: bool = False) -> dict:
    return {"id": domain_id, "name": name, "type": kind, "exportable": exportable, "enabled": True,
            "exportablePlatforms": EXPORT_PLATFORMS if exportable else [], "modelInformation": None}


#: Classification domain ids as Microsoft documents them (select-domain). The object-detection entry has
#: an emulator-only id: it is there because real detection domains share names ("General") with
#: classification ones, which a client must not confuse.
DOMAINS = [
    _domain("ee85a74c-405e-4adc-bb47-ffa8ca0c9f31", "General"),
    _domain("a8e3c40f-fb4a-466f-832a-5e457ae4a344", "General [A1]"),
    _domain("2e37d7fb-3a54-486a-b4d6-cfc369af0018", "General [A2]"),
    _domain("c151d5b5-dd07-472a-acc8-15d29dea8518", "Food"),
    _domain("ca455789-012d-4b50-9fec-5bb63841c793", "Landmarks"),
    _domain("b30a91ae-e3c1-4f73-a81e-c270bff27c39", "Retail"),
    _domain("0732100f-1a38-4e49-a514-c9b44c697ab5", "General (compact)", exportable=True),
    _domain("a1db07ca-a19a-4830-bae8-e004a42dc863", "General (compact) [S1]", exportable=True),
    _domain("00000000-0000-4000-8000-0000000000d1", "General", kind="ObjectDetection"),
]
DEFAULT_DOMAIN = DOMAINS[0]["id"]

_API = re.compile(r"^/customvision/v3\.\d+(?:-preview)?/(?P<api>training|prediction)(?P<rest>/.*)$")
_ID = r"(?P<{}>[^/]+)"
#: (api, method, path under the API's base URL, SDK operation name). Downloads sit outside the
#: API, like the blob-storage URLs of real exports, and need no key.
_ROUTES = [
    ("training", "GET", "/domains", "get_domains"),
    ("training", "GET", "/projects", "get_projects"),
    ("training", "POST", "/projects", "create_project"),
    ("training", "GET", "/projects/{projectId}", "get_project"),
    ("training", "DELETE", "/projects/{projectId}", "delete_project"),
    ("training", "GET", "/projects/{projectId}/tags", "get_tags"),
    ("training", "POST", "/projects/{projectId}/tags", "create_tag"),
    ("training", "POST", "/projects/{projectId}/images/files", "create_images_from_files"),
    ("training", "POST", "/projects/{projectId}/train", "train_project"),
    ("training", "GET", "/projects/{projectId}/iterations", "get_iterations"),
    ("training", "GET", "/projects/{projectId}/iterations/{iterationId}", "get_iteration"),
    ("training", "POST", "/projects/{projectId}/iterations/{iterationId}/publish", "publish_iteration"),
    ("training", "DELETE", "/projects/{projectId}/iterations/{iterationId}/publish", "unpublish_iteration"),
    ("training", "POST", "/projects/{projectId}/iterations/{iterationId}/export", "export_iteration"),
    ("training", "GET", "/projects/{projectId}/iterations/{iterationId}/export", "get_exports"),
    ("prediction", "POST", "/{projectId}/classify/iterations/{publishedName}/image/nostore",
     "classify_image_with_no_store"),
    ("download", "GET", "/downloads/{token}", "download_export"),
]
_COMPILED = [(api, method, re.compile("^" + re.sub(r"\{(\w+)\}", lambda m: _ID.format(m[1]), path) + "$"), op)
             for api, method, path, op in _ROUTES]
_KEY_HEADER = {"training": "Training-Key", "prediction": "Prediction-Key"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ServiceError(Exception):
    """An error the service answers with its own top-level ``{"code", "message"}`` body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-serialisable, raw bytes, or None for an empty body
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Logged:
    """One request as the emulator saw it (no headers: they carry the keys)."""

    op: str
    method: str
    path: str
    query: dict[str, str]
    status: int
    time: float
    images: int = 0  # images in an upload batch


@dataclass
class Fault:
    status: int
    calls: set[int] | None  # 1-based call numbers, counted from when the fault was set; None = every call
    offset: int  # calls of the operation before the fault was set
    retry_after: str | None
    code: str
    message: str
    lost_answer: bool  # the operation takes effect, but the client sees the error (a lost answer)


@dataclass
class StoredImage:
    id: str
    name: str
    png: bytes
    tag_ids: list[str]
    width: int
    height: int
    created: str


def _thumbnail(image: Image.Image) -> np.ndarray:
    grey = image.convert("L").resize(THUMBNAIL, Image.BILINEAR)
    return np.asarray(grey, dtype=np.float64).ravel() / 255.0


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@dataclass(frozen=True)
class CentroidModel:
    """The emulator's "training": one mean thumbnail per tag, softmax over negative distances."""

    tag_ids: tuple[str, ...]
    centroids: np.ndarray  # (tags, pixels)
    temperature: float  # mean squared distance of training images to their own centroid

    @classmethod
    def fit(cls, images: list[StoredImage], tag_ids: list[str]) -> CentroidModel:
        thumbs = {tag: [_thumbnail(_decode(im.png)) for im in images if tag in im.tag_ids] for tag in tag_ids}
        centroids = np.stack([np.mean(thumbs[tag], axis=0) for tag in tag_ids])
        spread = [np.sum((t - centroids[i]) ** 2) for i, tag in enumerate(tag_ids) for t in thumbs[tag]]
        return cls(tuple(tag_ids), centroids, float(np.mean(spread)) + 1e-6)

    def probabilities(self, image: Image.Image) -> np.ndarray:
        distance = np.sum((self.centroids - _thumbnail(image)) ** 2, axis=1)
        logits = -distance / self.temperature
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()


@dataclass
class EmulatedIteration:
    wire: dict
    polls_left: int | None  # GETs until training ends; None = never
    outcome: str
    model: CentroidModel | None


@dataclass
class EmulatedProject:
    wire: dict
    tags: dict[str, dict] = field(default_factory=dict)
    images: dict[str, StoredImage] = field(default_factory=dict)
    iterations: dict[str, EmulatedIteration] = field(default_factory=dict)
    exports: dict[tuple[str, str], dict] = field(default_factory=dict)  # (iteration, platform) -> Export
    changed_since_training: bool = True


class AzureEmulator:
    """The service's state, its fault knobs, its request log, and an HTTP server on 127.0.0.1."""

    def __init__(self, training_key: str = "emulator-training-key",
                 prediction_key: str = "emulator-prediction-key", port: int = 0):
        self.training_key = training_key
        self.prediction_key = prediction_key
        self.projects: dict[str, EmulatedProject] = {}
        self.deleted_projects: list[str] = []
        self.uploads: dict[str, bytes] = {}  # image name -> last accepted PNG, kept after project deletion
        self.classified: list[bytes] = []  # every image sent for prediction, in order
        self.requests: list[Logged] = []
        self.training_polls: int | None = 2
        self.training_outcome = "Completed"
        self._faults: dict[str, list[Fault]] = {}
        self._image_rejects: dict[str, list] = {}  # name -> [status, remaining times or None]
        self._calls: Counter[str] = Counter()
        self._downloads: dict[str, bytes] = {}
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._server.emulator = self
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> AzureEmulator:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="azure-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self) -> None:
        """Serve in the foreground until interrupted (the command-line mode)."""
        try:
            self._server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._server.server_close()

    def __enter__(self) -> AzureEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- fault knobs -----------------------------------------------------------------------
    def fail(self, op: str, status: int, calls: tuple[int, ...] | None = (1,), retry_after: str | None = None,
             code: str = "ErrorUnknown", message: str = "Injected fault", lost_answer: bool = False) -> None:
        """Answer the ``calls``-th calls of SDK operation ``op`` from now on (1-based; None = all) with ``status``.

        ``lost_answer``: carry the operation out first, as when a gateway times out after the
        service acted; a client that simply repeats the call would then act twice.
        """
        with self._lock:
            fault = Fault(status, None if calls is None else set(calls), self._calls[op], retry_after, code, message,
                          lost_answer)
            self._faults.setdefault(op, []).append(fault)

    def reject_images(self, statuses: dict[str, str], times: int | None = 1) -> None:
        """Make uploads of these image names fail with the given per-image status ``times`` times."""
        for name, status in statuses.items():
            self._image_rejects[name] = [status, times]

    def calls(self, op: str) -> list[Logged]:
        return [entry for entry in self.requests if entry.op == op]

    # --- dispatch --------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers, body: bytes) -> Reply:
        url = urlsplit(target)
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        api, path = "download", url.path
        if match := _API.match(url.path):
            api, path = match["api"], match["rest"]
        for route_api, route_method, pattern, op in _COMPILED:
            params = pattern.match(path)
            if route_api == api and route_method == method and params:
                break
        else:
            return Reply(404, {"error": {"code": "404", "message": "Resource not found"}})
        with self._lock:
            self._calls[op] += 1
            reply = self._answer(op, self._calls[op], api, params.groupdict(), query, headers, body)
            uploaded = op == "create_images_from_files" and reply.status in (200, 207)
            images = len(json.loads(body)["images"]) if uploaded else 0
            self.requests.append(Logged(op, method, url.path, query, reply.status, time.time(), images))
        return reply

    def _answer(self, op, number, api, params, query, headers, body) -> Reply:
        if api in _KEY_HEADER and headers.get(_KEY_HEADER[api]) != self._key(api):
            return Reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key "
                                                                   "or wrong API endpoint."}})
        fault = next((f for f in self._faults.get(op, []) if f.calls is None or number - f.offset in f.calls), None)
        if fault and not fault.lost_answer:
            return self._fault_reply(op, fault)
        try:
            reply = getattr(self, f"_{op}")(params, query, body, headers)
        except ServiceError as err:
            reply = Reply(err.status, {"code": err.code, "message": err.message})
        return self._fault_reply(op, fault) if fault else reply

    def _key(self, api: str) -> str:
        return self.training_key if api == "training" else self.prediction_key

    @staticmethod
    def _fault_reply(op: str, fault: Fault) -> Reply:
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.status == 429:  # the API gateway's nested shape, not the service's top-level one
            message = (f"Requests to the {op} Operation under Custom Vision have exceeded rate limit of your "
                       f"current pricing tier. Please retry after {fault.retry_after or 1} second.")
            return Reply(429, {"error": {"code": "429", "message": message}}, headers)
        return Reply(fault.status, {"code": fault.code, "message": fault.message}, headers)

    # --- lookups ---------------------------------------------------------------------------
    def _project(self, params) -> EmulatedProject:
        try:
            return self.projects[params["projectId"]]
        except KeyError:
            raise ServiceError(404, "NotFoundProject", f"Project {params['projectId']} not found") from None

    def _iteration(self, params) -> EmulatedIteration:
        project = self._project(params)
        try:
            iteration = project.iterations[params["iterationId"]]
        except KeyError:
            raise ServiceError(404, "NotFoundIteration", f"Iteration {params['iterationId']} not found") from None
        self._advance(iteration)
        return iteration

    @staticmethod
    def _advance(iteration: EmulatedIteration) -> None:
        """Training progresses by GETs, not by time, so tests are deterministic."""
        if iteration.wire["status"] != "Training" or iteration.polls_left is None:
            return
        iteration.polls_left -= 1
        if iteration.polls_left > 0:
            return
        iteration.wire.update(status=iteration.outcome, trainedAt=_now(), lastModified=_now(),
                              trainingTimeInMinutes=1)
        if iteration.outcome == "Failed":
            iteration.model = None
            iteration.wire["trainingErrorDetails"] = "Training failed: the model did not converge (injected)"

    # --- training API ----------------------------------------------------------------------
    def _get_domains(self, params, query, body, headers) -> Reply:
        return Reply(200, DOMAINS)

    def _get_projects(self, params, query, body, headers) -> Reply:
        return Reply(200, [project.wire for project in self.projects.values()])

    def _create_project(self, params, query, body, headers) -> Reply:
        domain_id = query.get("domainId", DEFAULT_DOMAIN)
        domain = next((d for d in DOMAINS if d["id"] == domain_id and d["type"] == "Classification"), None)
        if domain is None:
            raise ServiceError(400, "BadRequestProjectUnknownDomain", f"Unknown domain {domain_id}")
        kind = query.get("classificationType", "Multiclass")
        if kind not in ("Multiclass", "Multilabel"):
            raise ServiceError(400, "BadRequestProjectUnknownClassification", f"Unknown classification {kind}")
        platforms = [p for p in query.get("targetExportPlatforms", "").split(",") if p]
        if platforms and not domain["exportable"]:
            raise ServiceError(400, "BadRequestProjectUnsupportedExportPlatform",
                               f"Domain {domain['name']} cannot export")
        project_id = str(uuid.uuid4())
        settings = {"domainId": domain_id, "classificationType": kind, "targetExportPlatforms": platforms,
                    "useNegativeSet": False, "imageProcessingSettings": None}
        wire = {"id": project_id, "name": query["name"], "description": query.get("description", ""),
                "settings": settings, "created": _now(), "lastModified": _now(), "thumbnailUri": None,
                "drModeEnabled": False, "status": "Succeeded"}
        self.projects[project_id] = EmulatedProject(wire)
        return Reply(200, wire)

    def _get_project(self, params, query, body, headers) -> Reply:
        return Reply(200, self._project(params).wire)

    def _delete_project(self, params, query, body, headers) -> Reply:
        project = self._project(params)
        if any(it.wire["publishName"] for it in project.iterations.values()):
            raise ServiceError(400, "BadRequestIterationIsPublished",
                               "Cannot delete a project with a published iteration; unpublish it first")
        del self.projects[params["projectId"]]
        self.deleted_projects.append(params["projectId"])
        return Reply(204)

    def _get_tags(self, params, query, body, headers) -> Reply:
        return Reply(200, list(self._project(params).tags.values()))

    def _create_tag(self, params, query, body, headers) -> Reply:
        project = self._project(params)
        if any(tag["name"] == query["name"] for tag in project.tags.values()):
            raise ServiceError(400, "BadRequestTagNameNotUnique", f"Tag {query['name']} already exists")
        tag = {"id": str(uuid.uuid4()), "name": query["name"], "description": query.get("description"),
               "type": query.get("type", "Regular"), "imageCount": 0}
        project.tags[tag["id"]] = tag
        return Reply(200, tag)

    def _create_images_from_files(self, params, query, body, headers) -> Reply:
        project = self._project(params)
        batch = json.loads(body)
        entries = batch.get("images") or []
        if not entries:
            raise ServiceError(400, "BadRequestImageBatch", "The batch holds no images")
        if len(entries) > MAX_BATCH:
            raise ServiceError(400, "BadRequestExceededBatchSize",
                               f"Batch holds {len(entries)} images; max {MAX_BATCH}")
        results = [self._store(project, entry, batch.get("tagIds") or []) for entry in entries]
        # Whether OKDuplicate counts as success is not documented; treating it as a failed batch
        # (207) is the strict reading, and makes clients check per-image status.
        ok = all(result["status"] == "OK" for result in results)
        return Reply(200 if ok else 207, {"isBatchSuccessful": ok, "images": results})

    def _store(self, project: EmulatedProject, entry: dict, batch_tags: list[str]) -> dict:
        name = entry.get("name", "")
        # Real responses quote the file name in sourceUrl ("\"name.png\"").
        result = {"sourceUrl": f'"{name}"', "status": "OK", "image": None}
        png = base64.b64decode(entry.get("contents") or "")
        tag_ids = (entry.get("tagIds") or []) + batch_tags
        reject = self._image_rejects.get(name)
        if reject and reject[1] != 0:
            reject[1] = None if reject[1] is None else reject[1] - 1
            return {**result, "status": reject[0]}
        if len(png) > MAX_TRAINING_IMAGE_BYTES:
            return {**result, "status": "ErrorImageSize"}
        if not tag_ids or any(tag not in project.tags for tag in tag_ids):
            return {**result, "status": "ErrorInvalidTag"}
        try:
            image = _decode(png)
        except (UnidentifiedImageError, OSError):
            return {**result, "status": "ErrorImageFormat"}
        duplicate = next((im for im in project.images.values() if im.png == png), None)
        stored = duplicate or StoredImage(str(uuid.uuid4()), name, png, tag_ids, image.width, image.height, _now())
        if duplicate is None:
            project.images[stored.id] = stored
            project.changed_since_training = True
            self.uploads[name] = png
            for tag in tag_ids:
                project.tags[tag]["imageCount"] += 1
        return {**result, "status": "OKDuplicate" if duplicate else "OK", "image": self._image_wire(project, stored)}

    @staticmethod
    def _image_wire(project: EmulatedProject, image: StoredImage) -> dict:
        uri = f"https://emulator.invalid/images/{image.id}"
        tags = [{"tagId": t, "tagName": project.tags[t]["name"], "created": image.created} for t in image.tag_ids]
        return {"id": image.id, "created": image.created, "width": image.width, "height": image.height,
                "resizedImageUri": uri, "thumbnailUri": uri, "originalImageUri": uri, "tags": tags,
                "regions": None, "metadata": None}

    def _train_project(self, params, query, body, headers) -> Reply:
        project = self._project(params)
        training_type = query.get("trainingType", "Regular")
        budget = int(query.get("reservedBudgetInHours", "0"))
        if training_type == "Advanced" and budget < 1:
            raise ServiceError(400, "BadRequestReservedBudgetInHoursNotEnoughForAdvancedTraining",
                               "Advanced training needs a reserved budget of at least 1 hour")
        if any(it.wire["status"] == "Training" for it in project.iterations.values()):
            raise ServiceError(400, "BadRequestTrainingAlreadyInProgress", "Training already in progress")
        counts = {tag["name"]: tag["imageCount"] for tag in project.tags.values()}
        if len(counts) < 2 or min(counts.values()) < MIN_IMAGES_PER_TAG:
            raise ServiceError(400, "BadRequestMultiClassClassificationTrainingValidationFailed",
                               f"Need two tags with at least {MIN_IMAGES_PER_TAG} images each; have {counts}")
        if not project.changed_since_training and query.get("forceTrain") != "true":
            raise ServiceError(400, "BadRequestTrainingNotNeeded", "Nothing changed since the last training")
        settings = project.wire["settings"]
        domain = next(d for d in DOMAINS if d["id"] == settings["domainId"])
        wire = {"id": str(uuid.uuid4()), "name": f"Iteration {len(project.iterations) + 1}", "status": "Training",
                "created": _now(), "lastModified": _now(), "trainedAt": None, "projectId": project.wire["id"],
                "exportable": domain["exportable"], "exportableTo": domain["exportablePlatforms"],
                "domainId": domain["id"], "classificationType": settings["classificationType"],
                "trainingType": training_type, "reservedBudgetInHours": budget, "trainingTimeInMinutes": 0,
                "publishName": None, "originalPublishResourceId": None, "customBaseModelInfo": None,
                "trainingErrorDetails": None}
        model = CentroidModel.fit(list(project.images.values()), list(project.tags))
        project.iterations[wire["id"]] = EmulatedIteration(wire, self.training_polls, self.training_outcome, model)
        project.changed_since_training = False
        return Reply(200, wire)

    def _get_iterations(self, params, query, body, headers) -> Reply:
        iterations = self._project(params).iterations.values()
        for iteration in iterations:
            self._advance(iteration)
        return Reply(200, [iteration.wire for iteration in iterations])

    def _get_iteration(self, params, query, body, headers) -> Reply:
        return Reply(200, self._iteration(params).wire)

    def _publish_iteration(self, params, query, body, headers) -> Reply:
        iteration = self._iteration(params)
        if iteration.wire["status"] != "Completed":
            raise ServiceError(400, "BadRequestIterationIsNotTrained", "The iteration is not trained")
        if not query.get("publishName"):
            raise ServiceError(400, "BadRequestInvalidPublishName", "publishName is required")
        if not query.get("predictionId"):
            raise ServiceError(400, "BadRequestInvalidPublishTarget", "predictionId is required")
        if iteration.wire["publishName"]:
            raise ServiceError(400, "BadRequestIterationIsPublished", "The iteration is already published")
        iteration.wire.update(publishName=query["publishName"], originalPublishResourceId=query["predictionId"])
        return Reply(200, True)

    def _unpublish_iteration(self, params, query, body, headers) -> Reply:
        iteration = self._iteration(params)
        if not iteration.wire["publishName"]:
            raise ServiceError(400, "BadRequestIterationNotPublished", "The iteration is not published")
        iteration.wire.update(publishName=None, originalPublishResourceId=None)
        return Reply(204)

    def _export_iteration(self, params, query, body, headers) -> Reply:
        project, iteration = self._project(params), self._iteration(params)
        if iteration.wire["status"] != "Completed":
            raise ServiceError(400, "BadRequestIterationIsNotTrained", "The iteration is not trained")
        platform = query["platform"]
        if platform not in iteration.wire["exportableTo"]:
            raise ServiceError(400, "BadRequestExportValidationFailed", f"This iteration cannot export to {platform}")
        key = (iteration.wire["id"], platform)
        if key in project.exports:
            raise ServiceError(400, "BadRequestExportAlreadyInProgress", f"An export to {platform} exists")
        token = uuid.uuid4().hex
        self._downloads[token] = _export_zip(platform, project)
        project.exports[key] = {"platform": platform, "status": "Exporting", "flavor": query.get("flavor"),
                                "downloadUri": None, "newerVersionAvailable": False, "_token": token}
        return Reply(200, _public(project.exports[key]))

    def _get_exports(self, params, query, body, headers) -> Reply:
        project, iteration = self._project(params), self._iteration(params)
        exports = [export for (iid, _), export in project.exports.items() if iid == iteration.wire["id"]]
        for export in exports:  # one GET later the export is done
            if export["status"] == "Exporting":
                export.update(status="Done", downloadUri=f"{self.endpoint}/downloads/{export['_token']}")
        return Reply(200, [_public(export) for export in exports])

    def _download_export(self, params, query, body, headers) -> Reply:
        try:
            return Reply(200, self._downloads[params["token"]])
        except KeyError:
            return Reply(404, {"error": {"code": "BlobNotFound", "message": "The blob does not exist"}})

    # --- prediction API --------------------------------------------------------------------
    def _classify_image_with_no_store(self, params, query, body, headers) -> Reply:
        project = self._project(params)
        iteration = next((it for it in project.iterations.values()
                          if it.wire["publishName"] == params["publishedName"]), None)
        if iteration is None or iteration.model is None:
            raise ServiceError(404, "ErrorPredictionModelNotFound", f"No model published as {params['publishedName']}")
        data = _multipart_field(headers.get("Content-Type", ""), body, "imageData")
        if data is None:
            raise ServiceError(400, "BadRequestImageStream", "No imageData in the request")
        if len(data) > MAX_PREDICTION_IMAGE_BYTES:
            raise ServiceError(400, "BadRequestImageSizeBytes", "Images must be at most 4 MB")
        try:
            image = _decode(data)
        except (UnidentifiedImageError, OSError):
            raise ServiceError(400, "BadRequestImageFormat", "Unsupported image format") from None
        self.classified.append(data)
        probabilities = iteration.model.probabilities(image)
        predictions = sorted(({"probability": float(p), "tagId": tag, "tagName": project.tags[tag]["name"],
                               "tagType": "Regular", "boundingBox": None}
                              for tag, p in zip(iteration.model.tag_ids, probabilities)),
                             key=lambda p: -p["probability"])
        return Reply(200, {"id": str(uuid.uuid4()), "project": project.wire["id"], "iteration": iteration.wire["id"],
                           "created": _now(), "predictions": predictions})


def _public(export: dict) -> dict:
    return {key: value for key, value in export.items() if not key.startswith("_")}


def _export_zip(platform: str, project: EmulatedProject) -> bytes:
    """A stand-in for an exported model: the labels and a note that no real weights exist."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("labels.txt", "\n".join(tag["name"] for tag in project.tags.values()) + "\n")
        archive.writestr("README.txt", f"Azure Custom Vision emulator: placeholder {platform} export, no weights.\n")
    return buffer.getvalue()


def _multipart_field(content_type: str, body: bytes, name: str) -> bytes | None:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == name:
            return part.get_payload(decode=True)
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's pooled session expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        reply = self.server.emulator.handle(self.command, self.path, self.headers, body)
        if reply.body is None:
            payload, content_type = b"", None
        elif isinstance(reply.body, bytes):
            payload, content_type = reply.body, "application/octet-stream"
        else:  # msrest cannot deserialise a 200 sent as text/plain
            payload, content_type = json.dumps(reply.body).encode(), "application/json; charset=utf-8"
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args) -> None:
        """Silence the per-request stderr lines: the emulator keeps its own request log."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8642, help="port on 127.0.0.1 (0 = any free one)")
    parser.add_argument("--training-polls", type=int, default=2, help="status GETs until training completes")
    args = parser.parse_args(argv)
    # The same variables the plugin reads, so a demo needs them set once.
    training_key = os.environ.get("AZURE_CUSTOM_VISION_TRAINING_KEY", "emulator-training-key")
    prediction_key = os.environ.get("AZURE_CUSTOM_VISION_PREDICTION_KEY", "emulator-prediction-key")
    emulator = AzureEmulator(training_key, prediction_key, port=args.port)
    emulator.training_polls = args.training_polls
    print(f"Azure Custom Vision emulator on {emulator.endpoint}; set AZURE_CUSTOM_VISION_ENDPOINT={emulator.endpoint}",
          flush=True)
    emulator.serve()


if __name__ == "__main__":
    main()
