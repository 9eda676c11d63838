import os
import sys
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml", set_default=True)

# ---- the library comes from this checkout: Snakemake alone parses the workflow (what --sdm conda
# needs), also when another workflow uses it as a module. The jobs' conda environment installs the
# same checkout (envs/physis.post-deploy.sh reads PHYSIS_ROOT).
PHYSIS_ROOT = Path(str(workflow.current_basedir)).parents[1]
sys.path.insert(0, str(PHYSIS_ROOT / "workflow"))
os.environ.update(PHYSIS_ROOT=str(PHYSIS_ROOT))

RESULTS = config["results"]
DATA = f"{RESULTS}/data"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


from physis import config as physis_config
from physis import ensemble as physis_ensemble
from physis import fingerprint, runlock
from physis import plugins as plugin_registry
from physis import train as physis_train

# ---- models: names come from config, plugins from the registry (plugins/ + entry points)
PLUGINS = plugin_registry.discover(config["plugin_dirs"])
physis_config.check(config, PLUGINS)

# ---- a run killed earlier leaves a lock; only the main Snakemake process (not a job) clears it
if workflow.is_main_process:
    _lock_note = runlock.clear_stale_lock(".")
    if _lock_note:
        logger.warning(_lock_note)

PHANTOM = config["dataset"]["phantom"]["enabled"]
INPUT_FINGERPRINT = f"{DATA}/input_fingerprint.json"
if not PHANTOM and workflow.is_main_process:
    fingerprint.update(config["dataset"]["root"], INPUT_FINGERPRINT)


def convert_inputs():
    """The phantom rule's output when the phantom is on; else the user's index file and the fingerprint
    of every file under dataset.root, which changes whenever a file is added, removed or changed."""
    root = Path(config["dataset"]["root"])
    marker = {"grazpedwri": "dataset.csv", "voc": "Annotations", "dicom": config["dataset"]["labels_csv"]}
    index = str(root / marker[config["dataset"]["format"]])
    return [index] if PHANTOM else [index, INPUT_FINGERPRINT]


def model_plugin(name):
    return PLUGINS[config["models"][name].get("plugin") or name]


def model_preset(name):
    return config["models"][name].get("preset") or model_plugin(name).spec.preset


def unavailable_reason(name):
    """Why a configured model cannot run here (e.g. a cloud service without credentials)."""
    check = model_plugin(name).hook("available")
    if check is None:
        return None
    _, cfg = physis_train.resolve(name, config)
    return check(cfg)


CONFIGURED = [name for name, entry in config["models"].items() if entry["enabled"]]
UNAVAILABLE = {name: reason for name in CONFIGURED if (reason := unavailable_reason(name))}
MODELS = [name for name in CONFIGURED if name not in UNAVAILABLE]
# ---- ensembles: name -> the models whose scores it reads; evaluated like models (names must not clash)
ENSEMBLES = physis_ensemble.resolve(config["ensembles"], config["models"], MODELS, UNAVAILABLE)
EVALUATED = MODELS + list(ENSEMBLES)
SUMMARIES = physis_ensemble.summary_files(RESULTS, MODELS, ENSEMBLES)


def train_resources(name):
    """The plugin's gpus/mem_mb/runtime/cpus hints, overridden by models.<name>.resources."""
    return physis_train.resources(model_plugin(name), config["models"][name])


def train_priority(name):
    """Where cores are scarce, models train in the order the config lists them (the first first)."""
    return len(MODELS) - MODELS.index(name)


# ---- cross-validation (physis.crossval): k train jobs per model, one per fold
FOLDS = config["split"]["folds"] if config["split"]["folds"] > 1 else 0
FOLD_DIR = "fold{fold}/" if FOLDS else ""
FOLD_SUFFIX = "_fold{fold}" if FOLDS else ""


wildcard_constraints:
    model="|".join(MODELS) or "no_models_configured",
    fold=r"\d+",
