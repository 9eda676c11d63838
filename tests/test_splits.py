"""Split invariants: no shared patients, both classes per split, same seed -> same split."""

import numpy as np
import pandas as pd
import pytest

from physis.splits import SplitError, apply_split_file, assign_splits, check_splits

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def films(n_patients=200, positive_rate=0.2, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        positive = rng.random() < positive_rate
        for k in range(rng.integers(1, 6)):
            rows.append({"patient_id": f"p{p}", "image_id": f"p{p}_{k}", "label": int(positive and k == 0)})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_and_both_classes_everywhere():
    out = assign_splits(films(), FRACTIONS, seed=1)
    assert out.groupby("patient_id")["split"].nunique().max() == 1
    for name in ("train", "val", "test"):
        assert set(out.loc[out.split == name, "label"]) == {0, 1}
    check_splits(out)


def test_fractions_are_patient_fractions_and_stratified():
    frame = films(400)
    out = assign_splits(frame, FRACTIONS, seed=3)
    patients = out.groupby("patient_id").agg(split=("split", "first"), pos=("label", "max"))
    shares = patients["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.02)
    assert shares["test"] == pytest.approx(0.15, abs=0.02)
    rate = patients.groupby("split")["pos"].mean()
    assert rate.max() - rate.min() < 0.03


def test_same_seed_same_split_different_seed_differs():
    frame = films()
    a = assign_splits(frame, FRACTIONS, seed=7)["split"]
    b = assign_splits(frame, FRACTIONS, seed=7)["split"]
    c = assign_splits(frame, FRACTIONS, seed=8)["split"]
    assert a.equals(b)
    assert not a.equals(c)


def test_folds_are_patient_grouped_and_exclude_test():
    out = assign_splits(films(300), FRACTIONS, seed=0, folds=5)
    assert set(out.loc[out.split == "test", "fold"]) == {-1}
    pool = out[out.split != "test"]
    assert set(pool["fold"]) == {0, 1, 2, 3, 4}
    assert pool.groupby("patient_id")["fold"].nunique().max() == 1


def test_split_with_one_class_is_an_error():
    frame = films(60, positive_rate=0.0)
    frame.loc[0, "label"] = 1
    out = assign_splits(frame, FRACTIONS, seed=0)
    with pytest.raises(SplitError, match="has only class 0"):
        check_splits(out)


def test_fractions_must_sum_to_one():
    with pytest.raises(SplitError, match="add up to 1"):
        assign_splits(films(), {"train": 0.5, "val": 0.2, "test": 0.2}, seed=0)


def test_stored_split_file_is_reused(tmp_path):
    frame = films(50)
    first = assign_splits(frame, FRACTIONS, seed=0)
    table = first.groupby("patient_id", as_index=False)["split"].first()
    table.to_csv(tmp_path / "split.csv", index=False)
    again = apply_split_file(frame, str(tmp_path / "split.csv"))
    assert again["split"].equals(first["split"])
    table.iloc[1:].to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(SplitError, match="have no split"):
        apply_split_file(frame, str(tmp_path / "partial.csv"))
