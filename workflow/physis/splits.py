"""Patient-level train/val/test splits: decided once, stratified by label, seeded.

Films of one patient are correlated, so a patient's films never straddle two splits. The
patient's stratum is whether any of their films is positive. scikit-learn does the
stratified shuffling; this module only groups by patient and checks the result.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """The data cannot be split as configured (too few patients, a split with one class)."""


def _stratified(items: pd.Series, strata: pd.Series, size: float, seed: int):
    """train_test_split on patients, stratified when each side can hold every stratum."""
    counts = strata.value_counts()
    held_out = math.ceil(size * len(items))
    feasible = counts.min() >= 2 and min(held_out, len(items) - held_out) >= len(counts)
    stratify = strata if feasible else None
    if stratify is None:
        log.warning("too few patients to stratify a %.0f%% split by label; splitting unstratified", 100 * size)
    return train_test_split(items, test_size=size, random_state=seed, stratify=stratify)


def assign_splits(
    frame: pd.DataFrame, fractions: dict[str, float], seed: int, folds: int = 0
) -> pd.DataFrame:
    """Return ``frame`` with a ``split`` column (and ``fold`` when ``folds`` > 1).

    ``frame`` needs ``patient_id`` and ``label``. Same input and seed → same split.
    """
    total = sum(fractions[name] for name in SPLITS)
    if abs(total - 1.0) > 1e-6:
        raise SplitError(f"split fractions must add up to 1, got {total:g}")
    patients = frame.groupby("patient_id", sort=True)["label"].max().astype(int)
    if len(patients) < 3:
        raise SplitError(f"need at least 3 patients to split into train/val/test, got {len(patients)}")
    ids = pd.Series(patients.index, index=patients.index)
    rest, test = _stratified(ids, patients, fractions["test"], seed)
    val_share = fractions["val"] / (fractions["train"] + fractions["val"])
    train, val = _stratified(rest, patients.loc[rest], val_share, seed)
    mapping = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}
    out = frame.copy()
    out["split"] = out["patient_id"].map(mapping)
    return assign_folds(out, folds, seed)


def assign_folds(frame: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """``frame`` with a ``fold`` column when ``folds`` > 1: patient-grouped stratified folds over
    train+val (test films get -1: the test split stays out of every fold)."""
    if folds <= 1:
        return frame
    pool = frame[frame["split"] != "test"]
    patients = pool["patient_id"].nunique()
    if patients < folds:
        raise SplitError(f"split.folds is {folds} but train+val hold only {patients} patients")
    fold = pd.Series(-1, index=frame.index, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(pool, pool["label"], groups=pool["patient_id"])):
        fold.loc[pool.index[held]] = k
    return frame.assign(fold=fold)


def apply_split_file(frame: pd.DataFrame, split_file: str) -> pd.DataFrame:
    """Reuse a stored patient → split table (parquet or csv with patient_id, split)."""
    table = pd.read_parquet(split_file) if split_file.endswith(".parquet") else pd.read_csv(split_file)
    missing = {"patient_id", "split"} - set(table.columns)
    if missing:
        raise SplitError(f"{split_file}: missing column(s) {', '.join(sorted(missing))}")
    mapping = dict(zip(table["patient_id"].astype(str), table["split"]))
    out = frame.copy()
    out["split"] = out["patient_id"].map(mapping)
    unknown = out.loc[out["split"].isna(), "patient_id"].unique()
    if len(unknown):
        raise SplitError(f"{split_file}: {len(unknown)} patient(s) have no split, e.g. {unknown[0]}")
    return out


def check_splits(frame: pd.DataFrame) -> None:
    """Fail on a patient in two splits, an empty split, or a split left with one class."""
    per_patient = frame.groupby("patient_id")["split"].nunique()
    if (per_patient > 1).any():
        raise SplitError(f"patient {per_patient[per_patient > 1].index[0]} appears in more than one split")
    for name in SPLITS:
        labels = set(frame.loc[frame["split"] == name, "label"])
        if not labels:
            raise SplitError(f"split {name!r} is empty: the data set is too small for these fractions")
        if len(labels) < 2:
            raise SplitError(
                f"split {name!r} has only class {labels.pop()}: add data or change split.fractions/seed"
            )
    if "fold" in frame:
        pool = frame[frame["split"] != "test"]
        for k, part in pool.groupby("fold"):
            for held, rows in (("held-out", part), ("training", pool[pool["fold"] != k])):
                if rows["label"].nunique() < 2:
                    raise SplitError(f"fold {k}'s {held} films have only class {rows['label'].iloc[0]}: "
                                     "use fewer split.folds or more data")
