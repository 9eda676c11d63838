"""Ensembles on synthetic score tables: a model with itself is the model, members are chosen and weighted on
validation only, bad declarations fail at parse time naming the key, and an ensemble reaches the leaderboard."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from test_evaluate import eval_config, synthetic_scores

from physis import aggregate, config, ensemble, evaluate, verdict


def models(strengths: dict[str, float], patients: int = 60) -> dict[str, pd.DataFrame]:
    """Raw scores tables of models of different strength on the same films."""
    base = synthetic_scores(patients=patients, seed=0)
    rng = np.random.default_rng(7)
    out = {}
    for name, strength in strengths.items():
        logit = strength * (2 * base["y_true"] - 1) + rng.normal(0, 1, len(base))
        out[name] = base.assign(score=1 / (1 + np.exp(-logit)))
    return out


@pytest.mark.parametrize("rule", ensemble.RULES)
def test_an_ensemble_of_a_model_with_itself_is_the_model(rule):
    scores = models({"a": 1.5})
    combined, _ = ensemble.combine(scores, ["a", "a"], rule)
    cfg = eval_config(bootstrap=0)  # the point estimates say it; no CIs needed
    alone, doubled = evaluate.evaluate_scores(scores["a"], cfg, "a"), evaluate.evaluate_scores(combined, cfg, "a")
    if rule == "mean":  # the very same scores, so the very same evaluation
        pd.testing.assert_frame_equal(combined, scores["a"])
        pd.testing.assert_frame_equal(doubled.table, alone.table)
    else:  # a strictly increasing transform of the model's score: the same ranking and the same decisions
        for split in ("val", "test"):
            films = combined["split"] == split
            assert roc_auc_score(combined.loc[films, "y_true"], combined.loc[films, "score"]) == roc_auc_score(
                scores["a"].loc[films, "y_true"], scores["a"].loc[films, "score"])
        assert (doubled.predictions["y_pred"] == alone.predictions["y_pred"]).all()


def test_rank_mean_places_films_among_validation_scores_only():
    scores = models({"a": 1.5, "b": 0.8})
    combined, _ = ensemble.combine(scores, ["a", "b"], "rank_mean")
    test = scores["a"]["split"] == "test"
    moved = {name: frame.assign(score=np.where(test, 1 - frame["score"], frame["score"]))
             for name, frame in scores.items()}
    again, _ = ensemble.combine(moved, ["a", "b"], "rank_mean")
    assert np.array_equal(combined.loc[~test, "score"], again.loc[~test, "score"])  # test scores change nothing else
    val = scores["a"][~test]
    top = val["score"].idxmax()  # a's best validation film sits at a's top percentile
    assert combined.loc[top, "score"] >= 0.5 * (1 - 0.5 / len(val))


def test_stacking_and_member_choice_use_validation_only():
    scores = models({"strong": 2.0, "middling": 0.8, "weak": 0.1})
    # on test, "weak" is made the best model: top_k_by_val must not notice
    test = scores["weak"]["split"] == "test"
    scores["weak"] = scores["weak"].assign(score=np.where(test, 0.1 + 0.8 * scores["weak"]["y_true"],
                                                          scores["weak"]["score"]))
    members, how = ensemble.select(scores, None, 2)
    assert members == ["strong", "middling"] and how.startswith("top 2 by validation AUROC")
    scrambled = {name: frame.assign(y_true=np.where(test, 1 - frame["y_true"], frame["y_true"]))
                 for name, frame in scores.items()}
    assert ensemble.select(scrambled, None, 2)[0] == members
    stacked, weights = ensemble.combine(scores, members, "logistic")
    again, weights_again = ensemble.combine(scrambled, members, "logistic")
    assert weights == weights_again and np.array_equal(stacked["score"], again["score"])
    assert weights["members"] == members and weights["coefficients"][0] > weights["coefficients"][1] > 0


def test_members_missing_or_not_evaluated_fail_clearly():
    cfg_models = {"a": {}, "b": {}, "off": {"enabled": False}, "azure": {}}
    evaluated, unavailable = ["a", "b"], {"azure": "no Azure credentials"}
    specs = ensemble.resolve({"duo": {"members": ["a", "b"], "rule": "mean"},
                              "best": {"top_k_by_val": 2, "rule": "logistic"}}, cfg_models, evaluated, unavailable)
    assert specs == {"duo": ("a", "b"), "best": ("a", "b")}
    assert ensemble.summary_files("r", evaluated, specs) == {
        "a": "r/models/a/train_summary.json", "b": "r/models/b/train_summary.json",
        "duo": "r/models/duo/ensemble.json", "best": "r/models/best/ensemble.json"}
    bad = {
        "a": ({"members": ["b"], "rule": "mean"}, "ensembles.a: the name is also a model's"),
        "x": ({"members": ["a"], "top_k_by_val": 1, "rule": "mean"}, "give either members or top_k_by_val, not both"),
        "y": ({"rule": "mean"}, "not neither"),
        "z": ({"members": ["a", "ghost"], "rule": "mean"}, "member 'ghost' is not a configured model"),
        "w": ({"members": ["a", "off"], "rule": "mean"}, "member 'off' is not evaluated in this run"),
        "v": ({"members": ["azure"], "rule": "mean"}, "member 'azure' cannot run here and has no scores: no Azure"),
        "u": ({"top_k_by_val": 3, "rule": "mean"}, "top_k_by_val is 3, but only 2 model(s) are evaluated"),
    }
    for name, (entry, message) in bad.items():
        with pytest.raises(ensemble.EnsembleError, match=re.escape(message)):
            ensemble.resolve({name: entry}, cfg_models, evaluated, unavailable)
    with pytest.raises(ensemble.EnsembleError, match=re.escape("member(s) b have no scores: not evaluated")):
        ensemble.combine(models({"a": 1.0}), ["a", "b"], "mean")


def test_config_schema_takes_ensembles_with_a_default_rule():
    cfg = config.load(overrides={"ensembles": {"duo": {"members": ["heatmap_cnn", "custom_cnn"]}}})
    assert cfg["ensembles"]["duo"]["rule"] == "mean" and config.load()["ensembles"] == {}
    with pytest.raises(Exception, match="validating config"):
        config.load(overrides={"ensembles": {"duo": {"members": ["a"], "rule": "median"}}})


def test_an_ensemble_is_built_evaluated_and_ranked_like_a_model(tmp_path):
    scores = models({"a": 1.5, "b": 1.0}, patients=40)
    paths = {"scores": [], "summaries": []}
    for name, frame in scores.items():
        frame.to_parquet(path := tmp_path / f"{name}.parquet")
        paths["scores"].append(str(path))
        (summary := tmp_path / name / "train_summary.json").parent.mkdir()
        summary.write_text(json.dumps({"model": name, "train_seconds": 60.0, "params": 1000}))
        paths["summaries"].append(str(summary))
    outputs = {"scores": str(tmp_path / "duo.parquet"), "summary": str(tmp_path / "duo" / "ensemble.json")}
    summary = ensemble.build(paths["scores"], paths["summaries"], {"top_k_by_val": 2, "rule": "rank_mean"}, "duo",
                             outputs)
    assert json.loads((tmp_path / "duo" / "ensemble.json").read_text()) == summary
    assert summary["kind"] == "ensemble" and summary["train_seconds"] == 120.0 and summary["params"] == 2000
    assert sorted(summary["members"]) == ["a", "b"]
    combined = pd.read_parquet(outputs["scores"])
    assert list(combined.columns) == list(scores["a"].columns)  # a model's scores contract
    cfg = eval_config(bootstrap=30)
    evaluations = {name: evaluate.evaluate_scores(frame, cfg, name)
                   for name, frame in {**scores, "duo": combined}.items()}
    verdicts = {name: verdict.judge(e.table, e.predictions, None, summary["members"] if name == "duo" else None)
                for name, e in evaluations.items()}
    board = aggregate.leaderboard([e.table for e in evaluations.values()],
                                  {"a": {}, "b": {}, "duo": summary}, {}, {}, verdicts)
    duo = board.set_index("model").loc["duo"]
    assert duo["kind"] == "ensemble" and duo["train_seconds"] == 120.0 and not np.isnan(duo["auroc_ci_low"])
    table = aggregate.comparisons({name: e.predictions for name, e in evaluations.items()})
    assert {("a", "duo"), ("b", "duo")} <= set(zip(table["model_a"], table["model_b"]))
    assert table["delong_p"].notna().all()
