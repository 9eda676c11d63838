from pathlib import Path

from snakemake.utils import validate


validate(config, "../schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
DATA = f"{RESULTS}/data"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


def dataset_marker():
    """convert's input: the phantom rule's output when the phantom is on, else the user's files."""
    root = Path(config["dataset"]["root"])
    marker = {"grazpedwri": "dataset.csv", "voc": "Annotations", "dicom": config["dataset"]["labels_csv"]}
    return str(root / marker[config["dataset"]["format"]])


# ---- models: names come from config, plugins from the registry (plugins/ + entry points)
from physis import plugins as plugin_registry
from physis import train as physis_train

PLUGINS = plugin_registry.discover(config["plugin_dirs"])
for _name, _entry in config["models"].items():
    _plugin = _entry.get("plugin") or _name
    if _plugin not in PLUGINS:
        raise ValueError(f"models.{_name}: no plugin named {_plugin!r} (known: {', '.join(PLUGINS)})")
    plugin_registry.resolve_params(PLUGINS[_plugin], _entry.get("params"))


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


def train_resources(name):
    """The plugin's gpus/mem_mb/runtime/cpus hints, overridden by models.<name>.resources."""
    return physis_train.resources(model_plugin(name), config["models"][name])


wildcard_constraints:
    model="|".join(MODELS) or "no_models_configured",
