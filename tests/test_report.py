"""The HTML report: the privacy scanner, and the Snakemake report opened in a real headless Chromium.

The browser test builds a report with the evaluate/aggregate rules on a tiny workflow of its own
(the tiny phantom converted for real; trained models stood in for by ``physis.inference`` and
``physis.pipeline`` fakes injected with a ``sitecustomize``), then loads it in Debian's Chromium
through the DevTools protocol over a pipe (no websocket package, no network): no console errors,
every expected figure and table registered and rendered, and a screenshot of the leaderboard.
A second test checks the demo's own ``results/report.html`` the same way once ``make demo`` made it.
"""

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from privacy import assert_no_phi, find_phi

ROOT = Path(__file__).resolve().parents[1]
PER_MODEL = ["metrics.html", "subgroups.html", "roc.png", "pr.png", "calibration.png", "decision_curve.png",
             "confusion.png", "subgroups.png", "training.png", "model_card.html"]
SHARED = ["figures/data/class_balance.png", "figures/data/patients.png", "figures/data/examples.png",
          "figures/data/rejects.html", "leaderboard.html", "comparisons.html", "figures/comparison/roc_overlay.png",
          "figures/comparison/auroc_forest.png", "figures/comparison/accuracy_vs_thesis.png",
          "figures/comparison/cost.png", "figures/comparison/decision_curve.png"]
CATEGORIES = {"Data", "Training", "Evaluation", "Comparison"}


def expected_results(results: str, models: list[str], ensembles: list[str] = ()) -> set[str]:
    """Paths (as the report keys them) of every figure and table the report must hold (an ensemble's: all a
    model's but the gallery, which needs a network)."""
    return {f"{results}/{name}" for name in SHARED} | {
        f"{results}/figures/{model}/{name}" for model in [*models, *ensembles] for name in PER_MODEL} | {
        f"{results}/figures/{model}/gallery.png" for model in models}


# --------------------------------------------------------------------------- privacy scanner


def test_find_phi_sees_inside_containers(tmp_path):
    needle = "DOE^JANE"
    (tmp_path / "plain.txt").write_text("patient doe^jane here")
    pd.DataFrame({"name": [f"x{needle}y"] * 50}).to_parquet(tmp_path / "table.parquet", compression="zstd")
    encoded = base64.b64encode(f"<p>{needle}</p>".encode()).decode()
    (tmp_path / "report.html").write_text(f'<img src="data:text/html;charset=utf8;base64,{encoded}">')
    with zipfile.ZipFile(tmp_path / "report.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("report/data/raw/a.csv", f"id,name\n1,{needle}\n" * 20)
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", needle, zip=True)
    Image.new("L", (4, 4)).save(tmp_path / "figure.png", pnginfo=info)
    (tmp_path / "19700101_DOE^JANE.txt").write_text("nothing")
    hits = find_phi(tmp_path, [needle, "absent"])
    for where in ("plain.txt", "table.parquet[parquet]", "report.html[data uri 0]", "report.zip[report/data/raw/a.csv]",
                  "figure.png[png text]", "(file name)"):
        assert any(where in hit for hit in hits), where
    assert not any("absent" in hit for hit in hits)
    with pytest.raises(AssertionError, match="PHI hit"):
        assert_no_phi(tmp_path, [needle])
    assert_no_phi(tmp_path / "plain.txt", ["someone else"])


def test_dicom_headers_do_not_reach_evaluation_outputs(tmp_path, monkeypatch):
    """DICOM films with identifying headers → convert → data figures, evaluate, aggregate: no header value."""
    from conftest import make_config
    from pydicom.uid import generate_uid
    from test_aggregate import OUTPUTS
    from test_evaluate import eval_config, output_paths
    from test_source_dicom import dataset, make_root

    from physis import aggregate, datafigures, evaluate
    from physis.convert import convert

    monkeypatch.setenv("PHYSIS_PSEUDONYM_SALT", "salt-for-test")
    needles, files, rows = ["salt-for-test", "Lestrade"], {}, []
    for k in range(16):
        name, pid, accession = f"Holmes{k:02d}^Sherlock", f"PID-{7000 + k}", f"ACC{90 + k}"
        birth = f"2010{k % 12 + 1:02d}15"
        ds = dataset("CT_small.dcm" if k % 2 else "MR_small.dcm", PatientName=name, PatientID=pid,
                     PatientBirthDate=birth, AccessionNumber=accession, InstitutionName="St Bartholomew Hospital",
                     StudyDate="20240105", StudyInstanceUID=generate_uid())
        needles += [name, f"Holmes{k:02d}", pid, birth, accession, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)]
        files[f"f{k:02d}.dcm"] = ds
        positive = k % 3 == 0
        rows.append({"file": f"f{k:02d}.dcm", "ao_classification": "23r-E/2.1" if positive else "",
                     "fracture_visible": "1" if positive else ""})
    needles += ["St Bartholomew", "20240105"]
    root = make_root(tmp_path, files, rows)
    results = tmp_path / "results"
    cfg = make_config(root, results, dataset={"format": "dicom", "root": str(root), "phantom": {"enabled": False},
                                              "pseudonym_salt_file": str(tmp_path / "private" / "salt")})
    convert(cfg, results / "data")
    data = results / "data"
    datafigures.data_figures(data / "manifest.parquet", data / "boxes.parquet", data / "rejected.parquet",
                             data / "summary.json", {key: str(results / f"data_{key}.{ext}") for key, ext in (
                                 ("balance", "png"), ("patients", "png"), ("examples", "png"), ("rejects", "html"))}, 2)
    manifest = pd.read_parquet(data / "manifest.parquet")
    scores = manifest[manifest["split"].isin(["val", "test"])].rename(columns={"label": "y_true"})
    scores = scores.assign(score=0.2 + 0.6 * scores["y_true"])[evaluate.PREDICTION_COLUMNS[:5] + [
        "sh_type", "age", "sex", "view"]]
    scores.to_parquet(results / "scores.parquet")
    evaluated = results / "toy"
    evaluated.mkdir()
    outputs = {**output_paths(evaluated), "predictions": str(evaluated / "toy.parquet")}  # aggregate reads the stem
    evaluate.evaluate_model(results / "scores.parquet", outputs, eval_config(), "toy")
    (evaluated / "train_summary.json").write_text(json.dumps({"model": "toy", "plugin": "x", "params": 1}))
    aggregate.aggregate([outputs["metrics"]], [outputs["predictions"]], [str(evaluated / "train_summary.json")],
                        {key: str(results / name) for key, name in OUTPUTS.items()}, {}, eval_config())
    assert len(find_phi(root, needles)) > 16  # the inputs do carry them
    assert_no_phi(results, needles)


# --------------------------------------------------------------------------- Chromium over DevTools


def chromium_binary() -> str:
    """Debian's Chromium; installed with apt when missing (needs root), else a skip saying why."""
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Debian's chromium is not installed and cannot be: apt-get install needs root and apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # wait for a parallel install (tests/cluster/setup.sh) instead of failing on dpkg's lock
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    subprocess.run(["apt-get", *lock, "update", "-qq"], env=env, capture_output=True, timeout=900)
    done = subprocess.run(["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode:
        pytest.skip(f"apt-get could not install chromium: {done.stderr.strip()[-300:]}")
    return "/usr/lib/chromium/chromium"


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                 "--window-size=1600,1000", "about:blank"]
        # bash places the pipe ends on the fds Chromium expects (3: commands in, 4: messages out)
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', binary, *flags],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, timeout: float = 60, browser: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def console_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry'].get('url', '')}: {params['entry']['text']}")
        return errors

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", browser=True, timeout=10)
        except (ConnectionError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def poll(browser: DevTools, expression: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"page never satisfied: {expression}")


SHOW_LEADERBOARD = """(() => {
  const path = Object.keys(results).find(p => p.endsWith("leaderboard.html"));
  app.showCategory("Comparison");
  app.setView({content: "html", contentPath: results[path].data_uri, resultPath: path});
  const bytes = Uint8Array.from(atob(results[path].data_uri.split(",")[1]), c => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
})()"""


def check_report(report: Path, expected: set[str], screenshot: Path, tmp_path: Path) -> str:
    """Open ``report`` in Chromium, check it, save a screenshot of the leaderboard; return its HTML."""
    browser = DevTools(chromium_binary(), tmp_path / "chromium-profile")
    try:
        browser.open(report.resolve().as_uri())
        poll(browser, "typeof app !== 'undefined' && document.querySelector('#app').innerText.length > 0")
        registered = browser.evaluate("JSON.stringify({results: results, categories: categories})")
        registered = json.loads(registered)
        assert expected <= set(registered["results"]), sorted(expected - set(registered["results"]))
        assert CATEGORIES <= set(registered["categories"]), registered["categories"].keys()
        for path in expected:
            entry = registered["results"][path]
            assert entry["caption"].strip(), f"{path}: no caption"
            assert entry["data_uri"].startswith("data:"), f"{path}: not embedded"
        text = browser.evaluate("document.body.innerText")
        for category in CATEGORIES:
            assert category in text, f"category {category} not rendered in the navigation"
        leaderboard = browser.evaluate(SHOW_LEADERBOARD)
        assert "Leaderboard (test split)" in leaderboard
        poll(browser, "document.querySelector('iframe') !== null")
        time.sleep(1.0)  # let the frame paint
        browser.screenshot(screenshot)
        for path in expected:  # every figure and table actually displays
            kind = "img" if path.endswith(".png") else "iframe"
            browser.evaluate(f"""(() => {{ const r = results[{json.dumps(path)}];
                app.setView({{content: "{'img' if kind == 'img' else 'html'}", contentPath: r.data_uri,
                              resultPath: {json.dumps(path)}}}); }})()""")
            if kind == "img":
                poll(browser, "(() => { const i = document.querySelector('img[src^=\"data:image/png\"]');"
                              " return i !== null && i.complete && i.naturalWidth > 50; })()", timeout=15)
        time.sleep(0.5)
        errors = browser.console_errors()
        assert not errors, errors
    finally:
        browser.close()
    assert screenshot.read_bytes()[:4] == b"\x89PNG"
    return leaderboard


# --------------------------------------------------------------------------- a tiny workflow

FAKE_INFERENCE = '''
"""Stand-in for physis.inference: scores from the labels, a tiny untrained Keras classifier."""
import types
from pathlib import Path

import numpy as np

COLUMNS = ["image_id", "patient_id", "split", "y_true", "score", "sh_type", "age", "sex", "view"]


def predict_frame(model_dir, manifest, preset_dir, splits=("val", "test")):
    name = Path(model_dir).name
    rng = np.random.default_rng(len(name))
    films = manifest[manifest["split"].isin(splits)].reset_index(drop=True)
    patient = films["patient_id"].map({p: rng.normal() for p in films["patient_id"].unique()})
    logit = {"alpha": 2.5, "beta": 0.8}[name] * (2 * films["label"] - 1) + patient + rng.normal(0, .5, len(films))
    scores = films.rename(columns={"label": "y_true"}).assign(score=1 / (1 + np.exp(-logit)))[COLUMNS]
    import pandas as pd

    return scores, pd.DataFrame(columns=["image_id", "split", "x", "y", "w", "h", "score"])  # classifiers: no boxes


def load_trained(model_dir):
    import keras
    from physis.plugins import ModelConfig, ModelSpec, Plugin

    spec = ModelSpec(kind="classifier", framework="keras", preset="tiny")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1, activation="sigmoid")])
    plugin = Plugin("fake", types.SimpleNamespace(SPEC=spec), "test")
    return plugin, model, ModelConfig(Path(model_dir).name, spec, (32, 32, 1), {})
'''

FAKE_PIPELINE = '''
"""Stand-in for physis.pipeline: films read, scaled to [0, 1] and resized to 32 x 32."""
import numpy as np


def image_dataset(frame, channels, batch, training=False, seed=0, **_):
    import tensorflow as tf
    from physis.images import read_gray

    images = [tf.image.resize(read_gray(p)[..., None] / 65535.0, (32, 32)).numpy() for p in frame["path"]]
    images = np.repeat(np.stack(images).astype("float32"), channels, axis=-1)
    return tf.data.Dataset.from_tensor_slices((images, frame["label"].to_numpy())).batch(batch)
'''

SITECUSTOMIZE = '''
import sys

import fake_inference
import fake_pipeline
import physis

for name, module in (("inference", fake_inference), ("pipeline", fake_pipeline)):
    sys.modules[f"physis.{name}"] = module
    setattr(physis, name, module)
'''

SNAKEFILE = '''
from physis import ensemble


configfile: "config.yaml"


report: "{root}/workflow/report/workflow.rst"


RESULTS = config["results"]
DATA = f"{{RESULTS}}/data"
LOGS = f"{{RESULTS}}/logs"
BENCH = f"{{RESULTS}}/benchmarks"
MODELS = ["alpha", "beta"]
UNAVAILABLE = {{"azure_custom_vision": "no Azure credentials in this test"}}
ENSEMBLES = ensemble.resolve(config["ensembles"], {{m: {{}} for m in MODELS}}, MODELS, UNAVAILABLE)
EVALUATED = MODELS + list(ENSEMBLES)
SUMMARIES = ensemble.summary_files(RESULTS, MODELS, ENSEMBLES)


def model_preset(name):
    return "tiny"


def train_resources(name):
    return {{"mem_mb": 1000, "cpus": 1, "runtime": 10}}


def model_plugin(name):
    class Classifier:
        def hook(self, hook):
            return None

    return Classifier()


wildcard_constraints:
    model="|".join(MODELS),


include: "{root}/workflow/rules/evaluate.smk"
include: "{root}/workflow/rules/aggregate.smk"


rule all:
    input:
        rules.evaluate_all.input,
'''


def tiny_workflow(folder: Path, phantom: Path) -> Path:
    """Inputs of the evaluate stage (real convert on the tiny phantom, fake models) and a Snakefile."""
    from conftest import make_config

    from physis.convert import convert

    results = folder / "results"
    cfg = make_config(phantom, results, evaluate={"bootstrap": 40, "gallery_films": 2, "data_examples": 2,
                                                  "min_positive_patients": 2},
                      ensembles={"duo": {"members": ["alpha", "beta"], "rule": "logistic"}})
    cfg["results"] = "results"
    convert(cfg, results / "data")
    manifest = pd.read_parquet(results / "data" / "manifest.parquet")
    preset = results / "preprocess" / "tiny"
    preset.mkdir(parents=True)
    manifest[["image_id", "path"]].to_parquet(preset / "index.parquet")
    shutil.copy(results / "data" / "boxes.parquet", preset / "boxes.parquet")
    for model, seconds, params in (("alpha", 120.0, 1_000_000), ("beta", 30.0, 50_000)):
        model_dir = results / "models" / model
        model_dir.mkdir(parents=True)
        (model_dir / "train_summary.json").write_text(json.dumps({
            "model": model, "plugin": {"alpha": "custom_cnn", "beta": "mobilenetv2"}[model], "kind": "classifier",
            "framework": "keras", "train_seconds": seconds, "params": params, "epochs_run": 3, "best_epoch": 2,
            "input_shape": [32, 32, 1]}))
        (model_dir / "params.json").write_text(json.dumps({"model": model, "params": {"epochs": 3}}))
        (model_dir / "recipe.json").write_text(json.dumps({"preset": "tiny", "params": {"size": 32}}))
        pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.7, 0.5, 0.4], "val_loss": [0.7, 0.6, 0.62],
                      "auroc": [0.6, 0.7, 0.8], "val_auroc": [0.55, 0.66, 0.64], "accuracy": [0.6, 0.7, 0.75],
                      "val_accuracy": [0.6, 0.65, 0.64]}).to_parquet(model_dir / "history.parquet")
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    (folder / "Snakefile").write_text(SNAKEFILE.format(root=ROOT))
    stubs = folder / "stubs"
    stubs.mkdir()
    for name, text in (("fake_inference.py", FAKE_INFERENCE), ("fake_pipeline.py", FAKE_PIPELINE),
                       ("sitecustomize.py", SITECUSTOMIZE)):
        (stubs / name).write_text(text)
    return stubs


def snakemake(folder: Path, stubs: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT / "tests")])}
    done = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--cores", "2", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=1200)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted((folder / "results" / "logs").rglob("*.log"))
                     ) if (folder / "results" / "logs").is_dir() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n{logs}"


@pytest.mark.browser
@pytest.mark.slow
def test_report_of_tiny_workflow_in_chromium(tmp_path, phantom_root):
    folder = tmp_path / "workflow"
    folder.mkdir()
    stubs = tiny_workflow(folder, phantom_root)
    snakemake(folder, stubs, "all")
    snakemake(folder, stubs, "all", "--report", "report.html")
    report = folder / "report.html"
    leaderboard = check_report(report, expected_results("results", ["alpha", "beta"], ["duo"]),
                               tmp_path / "leaderboard.png", tmp_path)
    assert "not configured" in leaderboard and "no Azure credentials in this test" in leaderboard
    assert "different data set" in leaderboard
    board = pd.read_parquet(folder / "results" / "leaderboard.parquet")
    assert list(board["status"]) == ["evaluated", "evaluated", "evaluated", "not configured"]
    assert board.set_index("model").loc["duo", "kind"] == "ensemble" and "Brier score, raw" in leaderboard
    assert not (folder / "results" / "figures" / "duo" / "gallery.png").exists()
    for model in ("alpha", "duo"):  # the calibrator physis predict reads, next to the model
        assert json.loads((folder / "results" / "models" / model / "calibration.json").read_text())["method"]
    assert_no_phi(folder / "results", ["physis-canary-name"])
    assert_no_phi(report, ["physis-canary-name"])
    print(f"leaderboard screenshot: {tmp_path / 'leaderboard.png'}")


@pytest.mark.browser
def test_demo_report_in_chromium(tmp_path):
    """The real workflow's report (``make demo``): every model's figures, the leaderboard, a screenshot."""
    results = ROOT / "results"
    report = results / "report.html"
    if not report.is_file() or not (results / "leaderboard.parquet").is_file():
        pytest.skip("no demo report yet: run `make demo` (it ends with results/report.html)")
    board = pd.read_parquet(results / "leaderboard.parquet")
    evaluated = board[board["status"] == "evaluated"]
    ensembles = evaluated["kind"] == "ensemble"
    check_report(report, expected_results("results", evaluated.loc[~ensembles, "model"].tolist(),
                                          evaluated.loc[ensembles, "model"].tolist()),
                 results / "report_leaderboard.png", tmp_path)
