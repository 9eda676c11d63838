"""The model card of one evaluated model or ensemble (Mitchell et al., FAT* 2019), and its training curves.

The card follows the paper's sections, as one table for the report: model details; intended use and
out-of-scope use; data (source, films per split, label definition); test metrics with CIs;
calibration (Brier score and ECE before and after); subgroups; the training device and budget;
limitations, which always include the verdict (:mod:`physis.verdict`) and, on the phantom, that the
numbers are not clinical results; then the resolved run parameters and the preprocessing recipe.
Each section is a small function of plain data, so the card can be checked without a workflow.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from physis import figures, metrics, verdict
from physis.evaluate import GROUP_LABELS, STUDY_METRICS, Evaluation, subgroup_rows

Row = tuple[str, str, str]  # section, field, value
NOT_RECORDED = "not recorded"
INTENDED_USE = ("Research: benchmarking detectors of visible physeal (Salter-Harris I–IV) fractures on pediatric "
                "wrist radiographs. Its output is a calibrated probability for one film, meant as a second "
                "reader's flag that a radiologist confirms or dismisses.")
OUT_OF_SCOPE = ("Diagnosis without a radiologist; adults; other body regions; Salter-Harris V (no AO code); "
                "films from another site, device or population before local validation and recalibration; any "
                "use on real films of a model trained on the phantom. Not a medical device.")


def data_rows(context: Mapping, data: Mapping) -> Iterator[Row]:
    """Source, films per split and the label definition (``context``: the config's dataset and target;
    ``data``: the convert stage's summary.json)."""
    dataset, target = context["dataset"], context["target"]
    if dataset["phantom"]["enabled"]:
        source = (f"the procedural phantom ({dataset['phantom']['patients']} synthetic patients in the "
                  "GRAZPEDWRI-DX layout): no real patient")
    elif dataset["format"] == "grazpedwri":
        source = "GRAZPEDWRI-DX (Nagy et al., Sci Data 9:222, 2022; pediatric wrist films from Graz)"
    else:
        source = f"the user's {dataset['format']} data set"
    yield "Data", "Source", source
    for split in ("train", "val", "test"):
        counts = data["splits"].get(split, {"images": 0, "patients": 0, "positives": 0})
        yield "Data", f"{split} split", (f"{counts['images']} films, {counts['patients']} patients, "
                                         f"{counts['positives']} positive films")
    if target["name"] == "physeal":
        label = ("positive: an AO/PCCF code E/1–E/4 (Salter-Harris I–IV) is listed and the fracture is visible "
                 f"on the film; a physeal code on a film without a visible fracture is "
                 f"{'excluded' if target['physeal_not_visible'] == 'exclude' else 'counted as negative'}")
    else:
        label = "positive: a fracture is visible on the film (the data set's fracture_visible flag)"
    yield "Data", "Label", label


def _overall(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    return table[(table["group"] == "overall") & (table["split"] == split)].set_index("metric")


def _value(row: pd.Series) -> str:
    return figures.format_ci(row["value"], row["ci_low"], row["ci_high"])


def metric_rows(evaluation: Evaluation, ci: str) -> Iterator[Row]:
    """Every headline test metric with its CI, and the threshold."""
    test = _overall(evaluation.table)
    section = f"Metrics (test split, {ci})"
    for name, label in metrics.METRICS.items():
        yield section, label, _value(test.loc[name])
    threshold = evaluation.threshold
    yield section, "Threshold", (f"{threshold.value:.3f} ({threshold.rule}), chosen on the calibrated validation "
                                 "probabilities" + (f"; {threshold.note}" if threshold.note else ""))
    table = evaluation.table
    studies = table[(table["group"] == "study") & (table["split"] == "test")].set_index("metric")
    for name in STUDY_METRICS:
        if name in studies.index:
            yield section, f"Study level: {metrics.METRICS[name]}", (
                f"{_value(studies.loc[name])} ({int(studies.loc[name, 'n'])} studies; {studies.loc[name, 'subgroup']} "
                "of the films' probabilities, own threshold chosen on the validation studies)")


def calibration_rows(evaluation: Evaluation) -> Iterator[Row]:
    """The calibrator and the Brier score and ECE before and after it (and AUROC, which isotonic ties move)."""
    test = _overall(evaluation.table)
    yield "Calibration", "Method", evaluation.calibrator.describe()
    for name in ("brier", "ece"):
        yield ("Calibration", f"{metrics.METRICS[name]}: before → after",
               f"{_value(test.loc[f'{name}_raw'])} → {_value(test.loc[name])}")
    films = evaluation.predictions[evaluation.predictions["split"] == "test"]
    if evaluation.calibrator.method == "isotonic" and films["y_true"].nunique() == 2:
        before = roc_auc_score(films["y_true"], films["score_raw"])
        yield ("Calibration", "AUROC: before → after", f"{before:.3f} → {test.loc['auroc', 'value']:.3f} (films "
               "on one isotonic step become ties)")


def subgroup_summary(evaluation: Evaluation) -> Iterator[Row]:
    """Test sensitivity per subgroup level, one line per grouping; too-rare levels are starred."""
    rows = subgroup_rows(evaluation.table)
    rows = rows[rows["metric"] == "sensitivity"]
    for group, levels in rows.groupby("group", sort=False):
        text = "; ".join(f"{r.subgroup} {figures.format_ci(r.value, r.ci_low, r.ci_high, 2)} "
                         f"({r.n_positive} pos){' *' if str(r.note).startswith('too rare') else ''}"
                         for r in levels.itertuples())
        yield "Subgroups (test sensitivity)", GROUP_LABELS[group], text
    yield ("Subgroups (test sensitivity)", "Note", "* too few positive patients to interpret; every subgroup "
           "metric is in the subgroup table")


def training_rows(summary: Mapping) -> Iterator[Row]:
    """What the model is and what training it cost (an ensemble: its members and their summed cost)."""
    section = "Model details, training device and budget"
    members = summary.get("members")
    if members:
        yield section, "Ensemble", f"{summary['rule']} of {', '.join(members)}"
        yield section, "Ensemble selection", summary.get("selection", "")
        if summary.get("weights"):
            yield section, "Stacking weights (fitted on validation)", json.dumps(summary["weights"])
        yield section, "Training device", "no training of its own (see its members' cards)"
    else:
        for key in ("plugin", "kind", "framework", "preset", "input_shape", "recipe_hash"):
            if summary.get(key) is not None:
                yield section, key.replace("_", " ").capitalize(), str(summary[key])
        device = summary.get("device")
        recorded = device.get("label") if isinstance(device, dict) else None
        yield section, "Training device", recorded or NOT_RECORDED
    params = summary.get("params")
    yield section, "Parameters" + (" (members' total)" if members else ""), (
        f"{int(params):,}" if params is not None else NOT_RECORDED)
    seconds = summary.get("train_seconds")
    yield section, "Training time" + (" (members' total)" if members else ""), (
        f"{seconds / 60:.1f} min" if seconds is not None else NOT_RECORDED)
    if summary.get("folds"):
        yield section, "Cross-validation", (
            f"{summary['folds']} patient-grouped folds over train+val, one model each; validation metrics are of "
            "the pooled out-of-fold scores, test scores are the fold models' mean")
        yield section, "Epochs run per fold (best epoch kept)", ", ".join(
            f"{e} ({b})" for e, b in zip(summary["fold_epochs"], summary["fold_best_epochs"]))
    elif not members:
        yield section, "Epochs run (best epoch kept)", f"{summary.get('epochs_run')} ({summary.get('best_epoch')})"


def limitation_rows(judged: verdict.Verdict, context: Mapping, evaluation: Evaluation) -> Iterator[Row]:
    """The verdict first (a model that did not learn is no result), then the phantom, data and threshold caveats."""
    section = "Limitations"
    if judged.verdict == verdict.LEARNED:
        yield section, "Verdict", f"learned: {judged.reason}"
    else:
        yield section, "Verdict", (f"{judged.verdict}: {judged.reason}. This model did not show that it learned: "
                                   "its numbers are no result and it must not be used." +
                                   (f" Hint: {judged.hint}" if judged.hint else ""))
    if context["dataset"]["phantom"]["enabled"]:
        yield section, "Phantom", ("Trained and tested on the procedural phantom: these numbers test the pipeline "
                                   "and are not clinical results.")
    test = evaluation.predictions[evaluation.predictions["split"] == "test"]
    prevalence = test["y_true"].mean() if len(test) else np.nan
    yield section, "Prevalence", (f"{prevalence:.1%} of test films are positive; PPV, NPV and net benefit depend on "
                                  "it and do not carry over to a population with another prevalence.")
    yield section, "Threshold and calibration", (
        f"Both were fitted on {evaluation.calibrator.n} validation films of one data source; recalibrate and "
        "re-choose the threshold on local data before use elsewhere.")
    yield section, "Rare types", ("Salter-Harris V cannot be derived from AO codes; types III and IV are rare, "
                                  "so their sensitivity is barely estimable (see the subgroup flags).")


def flattened(data: dict, prefix: str = "") -> dict[str, object]:
    """Nested JSON as dotted keys (``params.resize.height``)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flattened(value, f"{name}."))
        else:
            out[name] = value
    return out


def card(model: str, summary: Mapping, evaluation: Evaluation, data: Mapping, context: Mapping,
         judged: verdict.Verdict, extras: Mapping[str, dict], ci: str) -> pd.DataFrame:
    """The whole card as rows (Section, Field, Value); ``extras``: section name → JSON (run parameters,
    preprocessing recipe) listed key by key at the end."""
    rows: list[Row] = [("Model details, training device and budget", "Model", model)]
    rows += training_rows(summary)
    rows += [("Intended use", "Intended use", INTENDED_USE), ("Intended use", "Out of scope", OUT_OF_SCOPE)]
    rows += data_rows(context, data)
    rows += metric_rows(evaluation, ci)
    rows += calibration_rows(evaluation)
    rows += subgroup_summary(evaluation)
    rows += limitation_rows(judged, context, evaluation)
    for section, values in extras.items():
        rows += [(section, key, str(value)) for key, value in sorted(flattened(values).items())]
    return pd.DataFrame(rows, columns=["Section", "Field", "Value"]).astype(str)


def training_report(summary_path: str | Path, data_path: str | Path, evaluation: Evaluation,
                    outputs: Mapping[str, str], context: Mapping, model: str) -> None:
    """Training curves from ``history.parquet`` and the model card, for a model (``train_summary.json``)
    or an ensemble (``ensemble.json``, no history). ``context``: the config's dataset, target, evaluate."""
    folder = Path(summary_path).parent
    summary = json.loads(Path(summary_path).read_text())
    history = pd.read_parquet(folder / "history.parquet") if (folder / "history.parquet").is_file() else None
    figures.training_figure(pd.DataFrame({"epoch": []}) if history is None else history, outputs["curves"],
                            f"{model}: training curves", summary.get("best_epoch"))
    judged = verdict.judge(evaluation.table, evaluation.predictions, history, summary.get("members"))
    extras = {section: json.loads((folder / name).read_text())
              for name, section in (("params.json", "Run parameters"), ("recipe.json", "Preprocessing recipe"))
              if (folder / name).is_file()}
    data = json.loads(Path(data_path).read_text())
    ci = figures.ci_name(context["evaluate"]["ci_level"])
    frame = card(model, summary, evaluation, data, context, judged, extras, ci)
    figures.write_html_table(frame, outputs["card"], f"{model}: model card",
                             "After Mitchell et al. (2019): what the model is, what it is for and not for, the "
                             "data, its test metrics, calibration and subgroups, what training cost, and its "
                             "limitations.")
