"""Ensembles: several models' scores combined into one scores table, then evaluated exactly like a model.

Declared in the config (``ensembles: {name: {members: [...] | top_k_by_val: k, rule: ...}}``):

* **Members** are listed, or are the ``top_k_by_val`` evaluated models with the highest
  **validation** AUROC of their raw scores (test is never looked at; ties go by name).
* **Rules.** ``mean``: the mean of the members' raw scores. ``rank_mean``: the mean of the
  members' percentiles, each film's score placed among that member's validation scores (no label;
  test films never move another film's score). ``logistic``: stacking, a logistic regression on the members' logits
  fitted on the **validation** films only (scikit-learn's default L2 penalty keeps it finite when
  validation separates the classes).

The ensemble's ``results/scores/<name>.parquet`` has a model's columns and goes through the same
evaluate stage (calibration, threshold, metrics with patient-bootstrap CIs, figures, model card) and
the same aggregate stage (leaderboard row, clustered DeLong and McNemar tests, overview figures).
``results/models/<name>/ensemble.json`` records the members, rule, stacking weights, how members
were chosen and the members' summed training cost; it stands in for ``train_summary.json``. An
ensemble has no gallery (no network to explain) and no ``physis predict``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from physis.io import write_json, write_parquet

if TYPE_CHECKING:  # the Snakefile imports this module while parsing: the numeric stack loads in the job
    import pandas as pd

log = logging.getLogger(__name__)

RULES = ("mean", "rank_mean", "logistic")


class EnsembleError(ValueError):
    """An ensemble that cannot be built; the message names the ensemble (config key) and the problem."""


def resolve(ensembles: Mapping[str, dict], models: Mapping[str, dict], evaluated: Sequence[str],
            unavailable: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Check the config's ensembles against the models (at parse time); return each one's candidates, the
    models whose scores its job reads (the listed members, or every evaluated model for ``top_k_by_val``).

    ``models``: the config's models; ``evaluated``: those that will have scores; ``unavailable``:
    model → why it cannot run here.
    """
    candidates = {}
    for name, entry in ensembles.items():
        key = f"ensembles.{name}"
        if name in models:
            raise EnsembleError(f"{key}: the name is also a model's (models.{name}); give the ensemble another name")
        listed, k = entry.get("members"), entry.get("top_k_by_val")
        if (listed is None) == (k is None):
            raise EnsembleError(f"{key}: give either members or top_k_by_val, not {'both' if listed else 'neither'}")
        if listed is not None:
            for member in listed:
                if member not in models:
                    raise EnsembleError(f"{key}: member {member!r} is not a configured model "
                                        f"(models: {', '.join(models)})")
                if member in unavailable:
                    raise EnsembleError(f"{key}: member {member!r} cannot run here and has no scores: "
                                        f"{unavailable[member]}")
                if member not in evaluated:
                    raise EnsembleError(f"{key}: member {member!r} is not evaluated in this run "
                                        f"(models.{member}.enabled: false)")
            candidates[name] = tuple(dict.fromkeys(listed))
        else:
            if k > len(evaluated):
                raise EnsembleError(f"{key}: top_k_by_val is {k}, but only {len(evaluated)} model(s) are evaluated "
                                    f"in this run ({', '.join(evaluated) or 'none'})")
            candidates[name] = tuple(evaluated)
    return candidates


def summary_files(results: str, models: Sequence[str], ensembles: Sequence[str]) -> dict[str, str]:
    """Evaluated name → the summary its model card and leaderboard row read (``train_summary.json`` of a
    model, ``ensemble.json`` of an ensemble), models first."""
    return {**{name: f"{results}/models/{name}/train_summary.json" for name in models},
            **{name: f"{results}/models/{name}/ensemble.json" for name in ensembles}}


def validation_auroc(scores: pd.DataFrame) -> float:
    """AUROC of a model's raw scores on its validation films (NaN with one class)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    val = scores[scores["split"] == "val"]
    return float(roc_auc_score(val["y_true"], val["score"])) if val["y_true"].nunique() == 2 else np.nan


def select(scores: Mapping[str, pd.DataFrame], members: Sequence[str] | None,
           top_k_by_val: int | None) -> tuple[list[str], str]:
    """The members and how they were chosen: as listed, or the top k candidates by validation AUROC."""
    import numpy as np

    if top_k_by_val is None:
        return list(members), "listed in the config"
    auroc = {model: validation_auroc(frame) for model, frame in scores.items()}
    ranked = sorted(auroc, key=lambda m: (np.isnan(auroc[m]), -np.nan_to_num(auroc[m]), m))
    chosen = ranked[:top_k_by_val]
    return chosen, (f"top {top_k_by_val} by validation AUROC of the raw scores (" +
                    ", ".join(f"{m} {auroc[m]:.3f}" for m in ranked) + ")")


def combine(scores: Mapping[str, pd.DataFrame], members: Sequence[str], rule: str) -> tuple[pd.DataFrame, dict]:
    """The ensemble's scores table on the films every member scored, and its stacking weights (``logistic``)."""
    import numpy as np
    from scipy.special import logit
    from sklearn.linear_model import LogisticRegression

    from physis.calibration import EPS

    missing = [member for member in dict.fromkeys(members) if member not in scores]
    if missing:
        raise EnsembleError(f"member(s) {', '.join(missing)} have no scores: not evaluated in this run")
    common = set.intersection(*(set(scores[member]["image_id"]) for member in members))
    first = scores[members[0]]
    base = first[first["image_id"].isin(common)].reset_index(drop=True)
    if base.empty:
        raise EnsembleError(f"no film was scored by every member ({', '.join(members)})")
    for member in dict.fromkeys(members):
        if len(scores[member]) > len(base):
            log.warning("%s: %d film(s) not scored by every member are left out", member,
                        len(scores[member]) - len(base))
    matrix = np.column_stack([scores[member].set_index("image_id").loc[base["image_id"], "score"].to_numpy(float)
                              for member in members])
    weights: dict = {}
    if rule == "mean":
        combined = matrix.mean(axis=1)
    elif rule == "rank_mean":
        # each film's (mid-)percentile among the member's validation scores, so no test film moves another
        # film's score; a 1e-6 share of the raw score breaks the ties between validation scores
        reference = np.sort(matrix[(base["split"] == "val").to_numpy()], axis=0)
        if not len(reference):
            raise EnsembleError("rank_mean needs validation films")
        percentiles = [(np.searchsorted(reference[:, k], matrix[:, k], side="left")
                        + np.searchsorted(reference[:, k], matrix[:, k], side="right")) / (2 * len(reference))
                       for k in range(matrix.shape[1])]
        combined = np.mean([(1 - 1e-6) * q + 1e-6 * matrix[:, k] for k, q in enumerate(percentiles)], axis=0)
    elif rule == "logistic":
        val = (base["split"] == "val").to_numpy()
        if base.loc[val, "y_true"].nunique() < 2:
            raise EnsembleError("logistic stacking needs validation films of both classes")
        features = logit(np.clip(matrix, EPS, 1 - EPS))
        stack = LogisticRegression().fit(features[val], base.loc[val, "y_true"])
        combined = stack.predict_proba(features)[:, 1]
        weights = {"members": list(members), "coefficients": stack.coef_[0].tolist(),
                   "intercept": float(stack.intercept_[0]), "fitted_on": f"{int(val.sum())} validation films"}
    else:
        raise EnsembleError(f"unknown rule {rule!r} (one of {', '.join(RULES)})")
    return base.assign(score=combined), weights


def _total(summaries: Mapping[str, dict], members: Sequence[str], key: str) -> float | None:
    values = [summaries.get(member, {}).get(key) for member in dict.fromkeys(members)]
    return None if any(value is None for value in values) else sum(values)


def build(score_paths: Sequence[str], summary_paths: Sequence[str], entry: dict, name: str,
          outputs: Mapping[str, str]) -> dict:
    """Run the ensemble job: read the candidates' scores and summaries, choose members, combine, write
    the scores table and ``ensemble.json`` (``entry``: the ensemble's config)."""
    import pandas as pd

    scores = {Path(path).stem: pd.read_parquet(path) for path in score_paths}
    summaries = {summary["model"]: summary for summary in (json.loads(Path(p).read_text()) for p in summary_paths)}
    try:
        members, selection = select(scores, entry.get("members"), entry.get("top_k_by_val"))
        table, weights = combine(scores, members, entry["rule"])
    except EnsembleError as err:
        raise EnsembleError(f"ensembles.{name}: {err}") from None
    write_parquet(table, outputs["scores"])
    summary = {"model": name, "kind": "ensemble", "framework": "ensemble", "plugin": None, "rule": entry["rule"],
               "members": members, "selection": selection, "weights": weights,
               "train_seconds": _total(summaries, members, "train_seconds"),
               "params": _total(summaries, members, "params")}
    write_json(summary, outputs["summary"])
    log.info("%s: %s of %s (%s); %d films", name, entry["rule"], ", ".join(members), selection, len(table))
    return summary
