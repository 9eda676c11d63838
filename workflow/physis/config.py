"""Load and validate a physis config with the workflow's JSON schema (defaults filled in)."""

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


def load(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """Read a YAML config (the default one when ``path`` is None), merge overrides, validate."""
    cfg = merge(yaml.safe_load(Path(path or DEFAULT).read_text()) or {}, overrides or {})
    validate(cfg, str(SCHEMA), set_default=True)
    return cfg
