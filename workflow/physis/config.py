"""Load and validate a physis config: the workflow's JSON schema (defaults filled in), then the checks
a schema cannot express (sums, cross-references, the phantom's folder). The Snakefile runs the same
checks at parse time, so a bad config fails before any job starts, with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import yaml
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
DEFAULT = ROOT / "config" / "config.yaml"


def merge(base: dict, overrides: dict) -> dict:
    """Recursively update ``base`` with ``overrides`` (nested dicts merge, other values replace)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ConfigError(ValueError):
    """A config that passes the schema but cannot work; the message names the key."""


def load(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config (the default one when ``path`` is None), merge overrides, validate, check."""
    cfg = merge(yaml.safe_load(Path(path or DEFAULT).read_text()) or {}, overrides or {})
    validate(cfg, str(SCHEMA), set_default=True)
    check(cfg)
    return cfg


def check(cfg: dict, plugins: dict | None = None) -> None:
    """The checks beyond the schema; with the plugin registry, also each model's plugin, params and preset."""
    from physis.phantom_folder import PhantomFolderError, check_folder

    fractions = cfg["split"]["fractions"]
    total = fractions["train"] + fractions["val"] + fractions["test"]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"split.fractions must add up to 1: train {fractions['train']:g} + val "
                          f"{fractions['val']:g} + test {fractions['test']:g} = {total:g}")
    if cfg["split"]["folds"] == 1:
        raise ConfigError("split.folds is 1, which is no cross-validation: use 0 (one train/val/test split) or ≥ 2")
    if cfg["dataset"]["phantom"]["enabled"]:
        try:
            check_folder(Path(cfg["dataset"]["root"]))
        except PhantomFolderError as err:
            raise ConfigError(f"dataset.root and dataset.phantom.enabled: true do not fit together: {err}") from None
    salt = Path(cfg["dataset"]["pseudonym_salt_file"]).resolve()
    if salt.is_relative_to(Path(cfg["results"]).resolve()):
        raise ConfigError(f"dataset.pseudonym_salt_file ({salt}) lies under results ({cfg['results']}): the salt and "
                          "the key that maps file aliases back to paths must stay out of the results you share")
    if plugins is not None:
        check_models(cfg, plugins)


def check_models(cfg: dict, plugins: dict) -> None:
    """Every configured model names a known plugin and known parameters; every enabled one a defined preset."""
    from physis.plugins import resolve_params

    presets = cfg["preprocess"]["presets"]
    for name, entry in cfg["models"].items():
        plugin_name = entry.get("plugin") or name
        if plugin_name not in plugins:
            raise ConfigError(f"models.{name}: no plugin named {plugin_name!r} (known: {', '.join(plugins)})")
        resolve_params(plugins[plugin_name], entry.get("params"))
        preset = entry.get("preset") or plugins[plugin_name].spec.preset
        if entry.get("enabled", True) and preset not in presets:
            key = f"models.{name}.preset" if entry.get("preset") else f"the {plugin_name} plugin's default preset"
            raise ConfigError(f"{key} names preset {preset!r}, which preprocess.presets does not define "
                              f"(known: {', '.join(presets)})")
