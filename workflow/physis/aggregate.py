"""The aggregate stage: every model's test metrics in one leaderboard, paired tests, overview figures.

* Leaderboard: one row per configured model or ensemble — its verdict (:mod:`physis.verdict`: did it learn?),
  headline test metrics with CIs, training time and parameter count, and, for models the thesis
  also trained, the thesis's Table 5.1 accuracy (a *different* data set: Graz, 21,557 films, its
  own split; shown for orientation, not as a comparison). Only models that learned are ranked;
  the others follow, unranked, with a hint from their training history. Models that could not run
  here (e.g. Azure without credentials) are rows with status ``not configured`` and the reason.
  The Brier score and ECE appear twice: of the calibrated probabilities and of the raw scores.
* Comparisons: every pair of models on the test films both scored — DeLong's test for AUROC
  and McNemar's test for accuracy at each model's own threshold, both clustered by patient
  (Obuchowski 1997, 1998: a child's films are not independent), each family Holm-corrected.
* Decision curves: net benefit of every model's calibrated test probabilities against threshold
  probability, with "treat all" and "treat none" (Vickers & Elkin 2006).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from physis import figures, metrics, stats, verdict
from physis.io import write_parquet

log = logging.getLogger(__name__)

#: The thesis's Table 5.1 (accuracy; Graz data, 21,557 films, not GRAZPEDWRI-DX).
THESIS_TABLE_5_1 = {
    "ShapeMask and SpineNet": 0.809,
    "Custom CNN": 0.746,
    "Azure custom vision ai": 0.737,
    "SpineNet": 0.733,
    "Faster R-CNN": 0.718,
    "ResNet": 0.691,
    "MobileNetV2": 0.461,
}
THESIS_NOTE = ("Thesis Table 5.1 accuracies come from a different data set (Graz, 21,557 films, its own "
               "split and labels): shown for orientation only, not comparable with this run's numbers.")
HEADLINE = ["auroc", "accuracy", "kappa", "sensitivity", "specificity", "ppv", "npv", "f1", "average_precision",
            "brier", "brier_raw", "ece", "ece_raw"]
#: Study-level test metrics on the leaderboard (columns ``study_<metric>``; physis.evaluate.study_rows).
STUDY_HEADLINE = ["auroc", "accuracy", "sensitivity", "specificity"]
SUMMARY_FIELDS = ["plugin", "kind", "framework", "train_seconds", "params", "epochs_run", "best_epoch", "folds"]


def thesis_row(model: str, plugin: str | None, mapping: Mapping[str, str]) -> str | None:
    """The Table 5.1 row a model corresponds to (matched on the model name, then the plugin name)."""
    return next((mapping[key] for key in (model, plugin) if key in mapping), None)


def leaderboard(tables: Sequence[pd.DataFrame], summaries: Mapping[str, dict], unavailable: Mapping[str, str],
                thesis_models: Mapping[str, str], verdicts: Mapping[str, verdict.Verdict]) -> pd.DataFrame:
    """One row per model: the ones that learned ranked by test AUROC, then the evaluated ones without
    evidence of learning (unranked), then the ones that could not run."""
    rows = []
    for table in tables:
        model = table["model"].iloc[0]
        overall = table[(table["group"] == "overall")]
        test = overall[overall["split"] == "test"].set_index("metric")
        judged = verdicts[model]
        row: dict = {"model": model, "status": "evaluated", "reason": "", "verdict": judged.verdict,
                     "verdict_reason": judged.reason, "hint": judged.hint}
        for name in HEADLINE:
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = test.loc[name, ["value", "ci_low", "ci_high"]]
        studies = table[(table["group"] == "study") & (table["split"] == "test")].set_index("metric")
        for name in STUDY_HEADLINE if name in studies.index else []:
            row[f"study_{name}"], row[f"study_{name}_ci_low"], row[f"study_{name}_ci_high"] = studies.loc[
                name, ["value", "ci_low", "ci_high"]]
        if "auroc" in studies.index:
            row["n_test_studies"] = int(studies.loc["auroc", "n"])
        threshold = overall[overall["metric"] == "threshold"].iloc[0]
        row.update(threshold=threshold["value"], threshold_note=threshold["note"], n_test=int(test["n"].iloc[0]),
                   n_test_patients=int(test["n_patients"].iloc[0]), n_test_positive=int(test["n_positive"].iloc[0]))
        row.update({field: summaries[model].get(field) for field in SUMMARY_FIELDS})
        row["device"] = (summaries[model].get("device") or {}).get("label")  # what the train job really ran on
        rows.append(row)
    for model, reason in unavailable.items():
        rows.append({"model": model, "status": "not configured", "reason": reason, "verdict": verdict.NOT_CONFIGURED,
                     "verdict_reason": reason, "hint": ""})
    board = pd.DataFrame(rows, columns=_board_columns())
    board["thesis_model"] = [thesis_row(m, p if isinstance(p, str) else None, thesis_models)
                             for m, p in zip(board["model"], board["plugin"])]
    board["thesis_accuracy"] = board["thesis_model"].map(THESIS_TABLE_5_1)
    board["order"] = board["verdict"].map(verdict.ORDER.index)
    board = board.sort_values(["order", "auroc", "model"], ascending=[True, False, True], na_position="last")
    board = board.drop(columns="order")
    board.insert(0, "rank", np.where(board["verdict"] == verdict.LEARNED, np.arange(1, len(board) + 1), pd.NA))
    return board.reset_index(drop=True).astype({"rank": "Int64"})


def _board_columns() -> list[str]:
    metric_columns = [f"{name}{suffix}" for name in HEADLINE for suffix in ("", "_ci_low", "_ci_high")]
    study_columns = [f"study_{name}{suffix}" for name in STUDY_HEADLINE for suffix in ("", "_ci_low", "_ci_high")]
    return ["model", "status", "reason", "verdict", "verdict_reason", "hint", *metric_columns, "threshold",
            "threshold_note", "n_test", "n_test_patients", "n_test_positive", *study_columns, "n_test_studies",
            *SUMMARY_FIELDS, "device"]


def leaderboard_html(board: pd.DataFrame, path: str | Path, ci: str) -> None:
    """The leaderboard as the report shows it: metric (CI) strings, cost, thesis column."""
    view = pd.DataFrame({"Rank": board["rank"].astype(object).where(board["rank"].notna(), "–"),
                         "Model": board["model"],
                         "Verdict": [f"{v}: {why}" + (f". Hint: {hint}" if hint else "")
                                     for v, why, hint in board[["verdict", "verdict_reason", "hint"]].fillna(
                                         "").to_numpy()]})
    labels = {**metrics.METRICS, "brier": "Brier score, calibrated", "ece": "ECE, calibrated",
              **{f"{name}_raw": f"{metrics.METRICS[name]}, raw" for name in ("brier", "ece")}}
    for name in ("auroc", "accuracy", "kappa", "sensitivity", "specificity", "brier", "brier_raw", "ece", "ece_raw"):
        view[f"{labels[name]} ({ci})"] = [
            figures.format_ci(v, lo, hi) for v, lo, hi in board[[name, f"{name}_ci_low", f"{name}_ci_high"]].to_numpy()]
    view["Threshold (val)"] = board["threshold"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}")
    studied = board["n_test_studies"].notna().any()
    for name in STUDY_HEADLINE if studied else []:
        view[f"Study {labels[name]} ({ci})"] = [figures.format_ci(v, lo, hi) for v, lo, hi in board[
            [f"study_{name}", f"study_{name}_ci_low", f"study_{name}_ci_high"]].to_numpy()]
    view["Test films / patients / positives"] = [
        "–" if pd.isna(n) else f"{int(n)} / {int(p)} / {int(q)}"
        for n, p, q in board[["n_test", "n_test_patients", "n_test_positive"]].to_numpy()]
    view["Train time (min)"] = board["train_seconds"].map(lambda s: "–" if pd.isna(s) else f"{s / 60:.1f}")
    cross_validated = board["folds"].notna() & (board["folds"].fillna(0) > 1)
    if cross_validated.any():
        view["Validation"] = [f"pooled out-of-fold, {int(k)} folds" if cv else "validation split"
                              for k, cv in zip(board["folds"].fillna(0), cross_validated)]
    view["Trained on"] = board["device"].map(lambda d: d if isinstance(d, str) and d else "not recorded")
    view["Parameters"] = board["params"].map(lambda p: "–" if pd.isna(p) else f"{int(p):,}")
    view["Thesis accuracy (different data)"] = [
        "–" if pd.isna(a) else f"{a:.1%} ({m})" for m, a in board[["thesis_model", "thesis_accuracy"]].to_numpy()]
    notes = [verdict.RULE,
             "All metrics on the held-out test split, of probabilities calibrated on the validation split "
             "(raw: the model's own scores); the threshold was chosen on the calibrated validation "
             "probabilities. Average precision and the other metrics are in leaderboard.csv and each "
             "model's metrics table.",
             f"{ci}s: percentile bootstrap resampling patients, not films.", THESIS_NOTE]
    if studied:
        notes.insert(2, "Study columns: a study (one patient's films of one visit) scores the max or mean "
                        "(evaluate.study_score) of its films' probabilities and is positive when any film is, "
                        "with its own threshold chosen on the validation studies; n = test studies.")
    if cross_validated.any():
        notes.insert(2, "Cross-validated models: every train+val film was scored by the fold model that did not "
                        "train on it, and these pooled out-of-fold scores served as the validation split (threshold, "
                        "calibration, verdict); test films were scored by the mean of the fold models.")
    figures.write_html_table(view, path, "Leaderboard (test split)",
                             "Models that learned are ranked by test AUROC; the models below them show no "
                             "evidence of learning and are not results (see the verdict). Pairwise significance "
                             "tests are in the comparisons table.", notes)


def comparisons(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Patient-clustered DeLong (AUROC) and McNemar (accuracy) tests for every model pair on their
    common test films; ``n_patients`` is the number of clusters the tests see."""
    rows = []
    for a, b in combinations(sorted(predictions), 2):
        pa = predictions[a][predictions[a]["split"] == "test"]
        pb = predictions[b][predictions[b]["split"] == "test"]
        both = pa.merge(pb, on="image_id", suffixes=("_a", "_b"))
        y = both["y_true_a"].to_numpy()
        patients = both["patient_id_a"].to_numpy()
        row = {"model_a": a, "model_b": b, "n": len(both), "n_patients": both["patient_id_a"].nunique(),
               "n_positive": int(y.sum()), "note": ""}
        try:
            result = stats.delong_test(y, both["score_a"], both["score_b"], patients)
            row.update(auroc_a=result.auc_a, auroc_b=result.auc_b, auroc_difference=result.auc_a - result.auc_b,
                       delong_z=result.z, delong_p=result.p_value)
        except ValueError as err:
            row["note"] = f"DeLong not computable: {err}"
        mcnemar = stats.mcnemar_test(both["y_pred_a"] == y, both["y_pred_b"] == y, patients)
        row.update(accuracy_a=(both["y_pred_a"] == y).mean() if len(both) else np.nan,
                   accuracy_b=(both["y_pred_b"] == y).mean() if len(both) else np.nan,
                   only_a_correct=mcnemar.only_a_correct, only_b_correct=mcnemar.only_b_correct,
                   mcnemar_chi2=mcnemar.chi2, mcnemar_p=mcnemar.p_value)
        rows.append(row)
    columns = ["model_a", "model_b", "n", "n_patients", "n_positive", "auroc_a", "auroc_b", "auroc_difference",
               "delong_z", "delong_p", "delong_p_holm", "accuracy_a", "accuracy_b", "only_a_correct",
               "only_b_correct", "mcnemar_chi2", "mcnemar_p", "mcnemar_p_holm", "note"]
    table = pd.DataFrame(rows, columns=columns)
    table["delong_p_holm"] = stats.holm(table["delong_p"].to_numpy(float))
    table["mcnemar_p_holm"] = stats.holm(table["mcnemar_p"].to_numpy(float))
    return table


def comparisons_html(table: pd.DataFrame, path: str | Path, alpha: float = 0.05) -> None:
    """Pairwise tests as an HTML table; Holm-adjusted p-values decide significance."""
    def p(value: float) -> str:
        return "–" if pd.isna(value) else ("<0.001" if value < 0.001 else f"{value:.3f}")

    view = pd.DataFrame({
        "Model A": table["model_a"], "Model B": table["model_b"],
        "Common test films / patients": [f"{n} / {k}" for n, k in table[["n", "n_patients"]].to_numpy()],
        "AUROC A − B": table["auroc_difference"].map(lambda d: "–" if pd.isna(d) else f"{d:+.3f}"),
        "DeLong p": table["delong_p"].map(p), "DeLong p (Holm)": table["delong_p_holm"].map(p),
        "Accuracy A / B": [f"{x:.3f} / {y:.3f}" if not pd.isna(x) else "–"
                           for x, y in table[["accuracy_a", "accuracy_b"]].to_numpy()],
        "Only A / only B correct": [f"{x} / {y}" for x, y in table[["only_a_correct", "only_b_correct"]].to_numpy()],
        "McNemar p": table["mcnemar_p"].map(p), "McNemar p (Holm)": table["mcnemar_p_holm"].map(p),
        "Significant (Holm, α=0.05)": [
            ", ".join(name for name, q in (("AUROC", d), ("accuracy", m)) if not pd.isna(q) and q < alpha) or "no"
            for d, m in table[["delong_p_holm", "mcnemar_p_holm"]].to_numpy()],
        "Note": table["note"]})
    figures.write_html_table(view, path, "Pairwise comparisons on the same test films",
                             "DeLong's test for correlated AUROCs; McNemar's test for paired accuracy at each "
                             "model's validation-chosen threshold. Both tests are clustered by patient "
                             "(Obuchowski 1997, 1998), not films: a child's films are correlated. Holm's "
                             "correction is applied within each family of tests.")


def labelled(board: pd.DataFrame, separator: str = " ") -> pd.Series:
    """Model names as the comparison figures show them: with the verdict of every model that did not learn,
    so that no screenshot of a figure presents such a model as a result."""
    return pd.Series([model if judged == verdict.LEARNED else f"{model}{separator}[{verdict.SHORT[judged]}]"
                      for model, judged in board[["model", "verdict"]].to_numpy()], index=board.index)


def overview_figures(board: pd.DataFrame, predictions: Mapping[str, pd.DataFrame], outputs: Mapping[str, str],
                     ci: str) -> None:
    """ROC overlay, AUROC forest plot, accuracy vs. thesis, cost vs. AUROC and decision curves, each naming
    the verdicts."""
    board = board.assign(label=labelled(board))
    evaluated = board[board["status"] == "evaluated"]
    curves, decision = [], []
    for model in evaluated["model"]:
        test = predictions[model][predictions[model]["split"] == "test"]
        row = evaluated.set_index("model").loc[model]
        no_band = np.zeros((0, len(test)), dtype=int)
        if test["y_true"].nunique() == 2:
            label = f"{row.label}: AUROC {figures.format_ci(row.auroc, row.auroc_ci_low, row.auroc_ci_high)}"
            curves.append((label, metrics.curve("roc", test["y_true"], test["score"], no_band)))
        if len(test):
            decision.append((row.label, metrics.decision_curve(test["y_true"], test["score"], no_band)))
    films = f"n={int(evaluated['n_test'].max())} test films" if len(evaluated) else "no evaluated models"
    figures.curve_figure("roc", curves, outputs["roc_overlay"], f"ROC curves on the test split ({films})")

    forest = pd.DataFrame({
        "label": evaluated["label"], "value": evaluated["auroc"].astype(float),
        "low": evaluated["auroc_ci_low"].astype(float), "high": evaluated["auroc_ci_high"].astype(float),
        "annotation": [figures.format_ci(v, lo, hi) for v, lo, hi in
                       evaluated[["auroc", "auroc_ci_low", "auroc_ci_high"]].to_numpy()],
        "flagged": (evaluated["auroc_ci_low"].isna() | (evaluated["verdict"] != verdict.LEARNED)).to_numpy()})
    figures.forest_figure(forest, outputs["forest"], f"Test AUROC with {ci} (patient bootstrap); grey: no result",
                          "AUROC", reference=0.5)

    bars = board.assign(label=labelled(board, "\n")).set_index("label")
    ours = f"this run: test accuracy ({ci})"
    frame = pd.DataFrame({ours: bars["accuracy"].astype(float),
                          "thesis Table 5.1 (different data set)": bars["thesis_accuracy"].astype(float)})
    errors = pd.DataFrame({f"{ours}_low": bars["accuracy_ci_low"].astype(float),
                           f"{ours}_high": bars["accuracy_ci_high"].astype(float)})
    figures.bar_figure(frame, outputs["thesis"], "Accuracy: this run vs. the thesis (not the same data)\n"
                       "grey, [verdict]: the model did not learn, its accuracy is no result",
                       "Accuracy", errors, hatched=["thesis Table 5.1 (different data set)"], fmt="{:.2f}",
                       ylim=(0, 1.08), muted=list(bars.index[bars["verdict"] != verdict.LEARNED]))
    figures.cost_figure(evaluated.assign(model=evaluated["label"]), outputs["cost"], "Cost against test AUROC", ci)
    figures.decision_curve_figure(decision, outputs["decision_curve"],
                                  f"Decision curves on the test split ({films}, calibrated probabilities)")


def aggregate(metric_paths: Sequence[str], prediction_paths: Sequence[str], summary_paths: Sequence[str],
              outputs: Mapping[str, str], unavailable: Mapping[str, str], cfg: dict) -> pd.DataFrame:
    """Run the stage: read every model's outputs, write the leaderboard, comparisons and figures."""
    tables = [pd.read_parquet(path) for path in metric_paths]
    predictions = {Path(path).stem: pd.read_parquet(path) for path in prediction_paths}
    summaries, histories = {}, {}
    for path in summary_paths:
        summary = json.loads(Path(path).read_text())
        summaries[summary["model"]] = summary
        history = Path(path).with_name("history.parquet")  # written by the same train job, before the summary
        histories[summary["model"]] = pd.read_parquet(history) if history.exists() else None
    verdicts = {model: verdict.judge(table, predictions[model], histories.get(model),
                                     summaries.get(model, {}).get("members"))
                for model, table in ((t["model"].iloc[0], t) for t in tables)}
    board = leaderboard(tables, summaries, unavailable, cfg["thesis_models"], verdicts)
    write_parquet(board, outputs["leaderboard"])
    board.to_csv(outputs["csv"], index=False)
    ci = figures.ci_name(cfg["ci_level"])
    leaderboard_html(board, outputs["html"], ci)
    table = comparisons(predictions)
    write_parquet(table, outputs["comparisons"])
    comparisons_html(table, outputs["comparisons_html"])
    overview_figures(board, predictions, outputs, ci)
    for row in board.itertuples():
        log.info("%s %s: %s; test AUROC %s", row.rank, row.model, row.verdict,
                 figures.format_ci(row.auroc, row.auroc_ci_low, row.auroc_ci_high))
    return board
