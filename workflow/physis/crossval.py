"""Cross-validation with pooled out-of-fold scoring (config ``split.folds: k`` ≥ 2; nnU-Net's practice).

The convert stage gives every train+val film a patient-grouped, label-stratified ``fold`` (0 … k-1;
test films -1). Each model then trains k times, one job per model × fold (``models/{model}/fold{k}/``):
fold k's model trains on the other folds' films and early-stops on fold k's. Downstream:

* every train+val film is scored once, by the one fold model that never saw it; these pooled
  out-of-fold scores take the place of the validation split (split ``val`` in the scores), so the
  threshold, the calibration and the verdict rest on all k·(held-out) films instead of one small
  validation split, with the same patient-bootstrap CIs;
* the test films are scored by the fold ensemble: the mean of the k fold models' scores.

``models/{model}/`` itself then holds the k fold folders and ``train_summary.json`` (the folds'
summaries combined, written last), ``history.parquet`` (every fold's epochs, column ``fold``),
``recipe.json`` and ``params.json``. ``split.folds: 0`` keeps the single train/val/test split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from physis.io import write_json, write_parquet

SUMMARY = "train_summary.json"


def fold_dir(model_dir: str | Path, fold: int) -> Path:
    return Path(model_dir) / f"fold{fold}"


def fold_dirs(model_dir: str | Path) -> list[Path]:
    """The fold model folders of a cross-validated model folder; empty for a single model."""
    summary = Path(model_dir) / SUMMARY
    k = json.loads(summary.read_text()).get("folds") if summary.is_file() else None
    return [fold_dir(model_dir, fold) for fold in range(k)] if k else []


def fold_manifest(manifest: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The manifest as fold ``fold``'s model sees it: its held-out films are ``val``, the other train+val
    films ``train``; test stays test."""
    if "fold" not in manifest:
        raise ValueError("the manifest has no fold column: it was converted with split.folds 0 or 1; the "
                         "convert stage reruns when split.folds changes")
    if fold not in set(manifest["fold"]):
        raise ValueError(f"the manifest has no fold {fold} (folds: {sorted(set(manifest['fold']) - {-1})})")
    pool = manifest["split"] != "test"
    out = manifest.copy()
    out.loc[pool, "split"] = np.where(out.loc[pool, "fold"] == fold, "val", "train")
    return out


def combine(per_fold: list[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores and boxes of the cross-validated model from each fold model's (scores, boxes) on its
    :func:`fold_manifest`: the pooled out-of-fold films as ``val``, the test films with the fold
    models' mean score. Boxes cannot be averaged: out-of-fold boxes come from the fold model that
    scored the film, test boxes from fold 0's model."""
    scores = [frame.assign(fold=k) for k, (frame, _) in enumerate(per_fold)]
    oof = pd.concat([frame[frame["split"] == "val"] for frame in scores], ignore_index=True)
    tests = [frame[frame["split"] == "test"].set_index("image_id") for frame in scores]
    test = tests[0].assign(score=np.mean([t.loc[tests[0].index, "score"] for t in tests], axis=0), fold=-1)
    boxes = [b if k == 0 else b[b["split"] == "val"] for k, (_, b) in enumerate(per_fold)]
    boxes = [b for b in boxes if len(b)]
    return (pd.concat([oof, test.reset_index()], ignore_index=True),
            pd.concat(boxes, ignore_index=True) if boxes else per_fold[0][1].iloc[0:0])


def finish(model_dir: str | Path, k: int) -> dict:
    """Write the cross-validated model folder's own files from its k finished folds; the summary last."""
    model_dir = Path(model_dir)
    summaries = [json.loads((fold_dir(model_dir, fold) / SUMMARY).read_text()) for fold in range(k)]
    for name in ("recipe.json", "params.json"):  # every fold was trained with the same ones
        shutil.copyfile(fold_dir(model_dir, 0) / name, model_dir / name)
    histories = [pd.read_parquet(path).assign(fold=fold) for fold in range(k)
                 if (path := fold_dir(model_dir, fold) / "history.parquet").is_file()]
    if histories:
        write_parquet(pd.concat(histories, ignore_index=True), model_dir / "history.parquet")
    first = summaries[0]
    summary = {
        **{key: first.get(key) for key in ("model", "plugin", "kind", "framework", "preset", "recipe_hash",
                                           "input_shape", "device")},
        "folds": k,
        "train_seconds": round(sum(s["train_seconds"] for s in summaries), 2),
        "params": first.get("params"),  # of one network; the fold ensemble runs k of them
        "epochs_run": _total([s.get("epochs_run") for s in summaries]),
        "best_epoch": None,  # one per fold: fold_best_epochs
        "fold_epochs": [s.get("epochs_run") for s in summaries],
        "fold_best_epochs": [s.get("best_epoch") for s in summaries],
        "restored_best": all(s.get("restored_best") for s in summaries),
    }
    write_json(summary, model_dir / SUMMARY)
    return summary


def _total(values: list) -> int | None:
    return None if any(v is None for v in values) else int(sum(values))
