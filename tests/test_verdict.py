"""The learned / no evidence / degenerate verdict, on scores run through the real evaluation."""

import numpy as np
import pandas as pd
import pytest
from test_evaluate import eval_config

from physis import evaluate, verdict

N_PATIENTS = 120  # per split; two films each


def evaluated(score_of, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics table, predictions) of scores ``score_of(split, y, rng)`` on clustered val and test films."""
    rng = np.random.default_rng(seed)
    frames = []
    for split in ("val", "test"):
        patients = np.repeat(np.arange(N_PATIENTS), 2)
        y = np.repeat(rng.random(N_PATIENTS) < 0.25, 2).astype(int)
        frames.append(pd.DataFrame({
            "image_id": [f"{split}{k}" for k in range(len(y))], "patient_id": [f"{split}p{p}" for p in patients],
            "split": split, "y_true": y, "score": score_of(split, y, rng), "sh_type": pd.NA, "age": 10.0,
            "sex": "F", "view": "ap"}))
    scores = pd.concat(frames, ignore_index=True)
    evaluation = evaluate.evaluate_scores(scores, eval_config(bootstrap=200), "toy")
    return evaluation.table, evaluation.predictions


def test_a_model_that_ranks_on_validation_and_test_learned():
    table, predictions = evaluated(lambda split, y, rng: np.clip(0.2 + 0.6 * y + rng.normal(0, 0.15, len(y)), 0, 1))
    result = verdict.judge(table, predictions)
    assert result.verdict == verdict.LEARNED and "test kappa" in result.reason and not result.hint


def test_random_scores_show_no_evidence_of_learning():
    table, predictions = evaluated(lambda split, y, rng: rng.random(len(y)))
    history = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "val_auroc": [0.5, 0.55, 0.52, 0.58, 0.51],
                            "auroc": [0.55, 0.68, 0.77, 0.84, 0.9]})
    result = verdict.judge(table, predictions, history)
    assert result.verdict == verdict.NO_EVIDENCE and "includes chance" in result.reason
    assert result.hint.startswith("validation AUROC never rose above 0.58 in 5 epochs while training AUROC rose "
                                  "to 0.90 (memorising")


def test_constant_scores_are_degenerate_although_accuracy_is_the_majority_share():
    table, predictions = evaluated(lambda split, y, rng: np.full(len(y), 0.31))
    test = table[(table["split"] == "test") & (table["group"] == "overall")].set_index("metric")["value"]
    assert test["auroc"] == 0.5 and test["accuracy"] > 0.6  # looks like a result on one number
    result = verdict.judge(table, predictions)
    assert result.verdict == verdict.DEGENERATE and "near-constant scores" in result.reason


def test_near_constant_scores_with_an_auroc_ci_above_chance_are_degenerate():
    """resnet50 in the 52-minute demo: near-constant scores, test AUROC CI just above 0.5 (0.506-0.548),
    accuracy near the positive share. Validation shows no ranking: a test-only AUROC rule would call it learned."""
    def near_constant(split, y, rng):
        signal = 0.35 * y if split == "test" else 0.0
        return 0.6 + 0.004 * (signal + rng.random(len(y)))

    table, predictions = evaluated(near_constant, seed=3)
    test_auroc = table.query("metric == 'auroc' and split == 'test' and group == 'overall'").iloc[0]
    assert test_auroc["ci_low"] > 0.5  # the trap
    result = verdict.judge(table, predictions)
    assert result.verdict == verdict.DEGENERATE and "near-constant" in result.reason


def test_validation_luck_that_test_does_not_confirm_is_no_evidence():
    def lucky(split, y, rng):
        return np.clip(0.3 + (0.4 * y if split == "val" else 0) + rng.normal(0, 0.2, len(y)), 0, 1)

    table, predictions = evaluated(lucky, seed=1)
    result = verdict.judge(table, predictions)
    assert result.verdict == verdict.NO_EVIDENCE and "test does not confirm it" in result.reason


@pytest.mark.parametrize("history, members, expected", [
    (None, None, "no validation AUROC was recorded"),
    (pd.DataFrame({"epoch": [1], "val_auroc": [0.61]}), None, "never rose above 0.61 in 1 epoch;"),
    (None, ["a", "b", "a"], "an ensemble trains nothing itself: combining a, b gave no ranking"),
])
def test_history_hints(history, members, expected):
    assert expected in verdict.history_hint(history, members)


def test_calibration_that_shrinks_a_weak_model_towards_the_prevalence_does_not_make_it_degenerate():
    """A nearly flat calibration map (a Platt slope near 0) puts every film near the prevalence; the model's raw
    scores still vary, so it shows no evidence of learning: it is not degenerate."""
    table, predictions = evaluated(lambda split, y, rng: rng.random(len(y)))
    shrunk = predictions.assign(score=0.25 + 0.01 * (predictions["score_raw"] - 0.5))  # monotone: y_pred unchanged
    assert np.ptp(shrunk["score"]) < verdict.MIN_SPREAD < np.ptp(np.percentile(shrunk["score_raw"], [5, 95]))
    assert verdict.judge(table, shrunk).verdict == verdict.NO_EVIDENCE
