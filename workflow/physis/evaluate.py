"""The evaluate stage: one model's scores → calibrated probabilities, thresholded predictions, metric tables
and figures.

The raw scores are first calibrated (:mod:`physis.calibration`: Platt scaling or isotonic regression
fitted on the **validation** split only); ``score`` is then the calibrated probability and
``score_raw`` the model's own output, and every metric, curve and comparison uses the probability,
with the Brier score and ECE of the raw scores next to the calibrated ones. The operating threshold
is chosen on the calibrated **validation** probabilities only (Youden's J or a target sensitivity)
and applied unchanged to the test split. Every metric carries a CI (95% by default) from a
bootstrap that resamples **patients** (:func:`physis.stats.cluster_weights`), seeded per table
row so results do not depend on evaluation order. Test-split subgroups: Salter-Harris type
(sensitivity only, since a type exists only among positives), age band, sex and view; a
subgroup with fewer positive patients than ``min_positive_patients`` is reported with its n and
flagged as too rare to interpret.

Also here: the decision curve (net benefit, Vickers & Elkin 2006) and the gallery of explained test
films, because both belong to one model's evaluation in the report (the model card is
:mod:`physis.model_card`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from physis import calibration, figures, metrics, stats
from physis.records import CONSPICUITY
from physis.io import write_parquet

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["image_id", "patient_id", "split", "y_true", "score", "score_raw", "y_pred", "sh_type", "age",
                      "sex", "view"]
#: Columns a scores table may carry into the predictions: the phantom's truth, the study, the CV fold.
OPTIONAL_PREDICTION_COLUMNS = [CONSPICUITY, "study", "fold"]
#: The metrics reported per study (the ``study`` group of the metric table and the leaderboard's study columns).
STUDY_METRICS = ["auroc", "accuracy", "kappa", "sensitivity", "specificity", "average_precision"]
METRIC_COLUMNS = ["model", "split", "group", "subgroup", *metrics.ROW_COLUMNS]
SPLITS = ("val", "test")
SH_TYPES = {1: "SH I", 2: "SH II", 3: "SH III", 4: "SH IV"}
GROUP_LABELS = {"overall": "All films", "sh_type": "Salter-Harris type", "age": "Age band", "sex": "Sex",
                "view": "View", "conspicuity": "Fracture displacement (phantom truth)", "study": "Study level"}
#: The calibration metrics also reported on the raw scores, as ``<name>_raw`` rows.
CALIBRATION_METRICS = ("brier", "ece")
RAW_LABELS = {f"{name}_raw": f"{metrics.METRICS[name]} before calibration" for name in CALIBRATION_METRICS}


class EvaluateError(ValueError):
    """Inputs the evaluate stage cannot use (the message names the file and the problem)."""


@dataclass(frozen=True)
class Threshold:
    """The operating threshold, how it was chosen, and why a fallback was used (if it was)."""

    value: float
    rule: str
    note: str = ""


NO_SKILL = "no validation threshold beats chance (Youden's J ≤ 0)"


def pick_threshold(scores: pd.DataFrame, cfg: dict) -> Threshold:
    """Threshold from the validation films; the configured fallback when validation has one class.

    When no threshold beats chance on validation the rule's threshold is kept (Youden's rule then
    calls nothing below 1.0 positive) but flagged with :data:`NO_SKILL`, which the metrics table's
    threshold row and the leaderboard's ``threshold_note`` carry: its test metrics describe a model
    that showed no skill before it was tested.
    """
    rule = cfg["threshold"]["rule"]
    val = scores[scores["split"] == "val"]
    try:
        value = metrics.choose_threshold(val["y_true"], val["score"], rule, cfg["threshold"]["target_sensitivity"],
                                         split="val")
    except metrics.MetricError as err:
        fallback = cfg["threshold"]["fallback"]
        log.warning("%s; using the fixed fallback threshold %.3f", err, fallback)
        return Threshold(fallback, "fallback", f"{err}; fixed threshold {fallback} used instead")
    if metrics.max_youden_j(val["y_true"], val["score"]) <= 0:
        log.warning("%s; keeping threshold %.3f of rule '%s'", NO_SKILL, value, rule)
        return Threshold(value, rule, f"{NO_SKILL}; threshold {value:.3f} of rule '{rule}' kept")
    return Threshold(value, rule)


def predictions_table(scores: pd.DataFrame, threshold: Threshold) -> pd.DataFrame:
    """The prediction table: scores plus ``y_pred`` (score ≥ threshold), in the contract's columns."""
    missing = sorted(set(PREDICTION_COLUMNS) - {"y_pred"} - set(scores.columns))
    if missing:
        raise EvaluateError(f"scores table lacks column(s) {', '.join(missing)}")
    out = scores.assign(y_pred=(scores["score"] >= threshold.value).astype(int))
    optional = [c for c in OPTIONAL_PREDICTION_COLUMNS if c in out]
    return out[PREDICTION_COLUMNS + optional].reset_index(drop=True)


def _weights(frame: pd.DataFrame, cfg: dict, *key: str) -> np.ndarray:
    """Patient-bootstrap weights for one table cell, seeded by the configured seed and the cell's key."""
    if frame.empty:
        return np.zeros((0, 0), dtype=int)
    seed = np.random.SeedSequence([cfg["seed"], zlib.crc32("/".join(key).encode())])
    return stats.cluster_weights(frame["patient_id"], cfg["bootstrap"], seed)


def age_bands(age: pd.Series, edges: list[float]) -> pd.Series:
    """Age in years → ordered band labels such as ``"10–14 y"`` (left-closed); missing → ``"unknown"``."""
    labels = [f"{lo:g}–{hi:g} y" for lo, hi in zip(edges[:-1], edges[1:])]
    bands = pd.cut(age, bins=edges, right=False, labels=labels).cat.add_categories("unknown")
    return bands.fillna("unknown")


def subgroups(test: pd.DataFrame, cfg: dict) -> Iterator[tuple[str, str, pd.DataFrame, list[str]]]:
    """(group, subgroup, films, metric names) for every test subgroup, in report order."""
    positives = test[test["y_true"] == 1]
    for code, label in SH_TYPES.items():
        yield "sh_type", label, positives[positives["sh_type"] == code], ["sensitivity"]
    # the phantom's ground truth, when the data has it: positives in thirds by how far the physeal fragment
    # is displaced (readers miss undisplaced Salter-Harris fractures most)
    if CONSPICUITY in positives and positives[CONSPICUITY].notna().sum() >= 3:
        thirds = conspicuity_thirds(positives[CONSPICUITY])
        for level in thirds.cat.categories:
            yield "conspicuity", str(level), positives[thirds == level], ["sensitivity"]
    columns = {"age": age_bands(test["age"], cfg["age_bands"]),
               "sex": test["sex"].fillna("unknown").astype("category"),
               "view": test["view"].fillna("unknown").astype("category")}
    for group, levels in columns.items():
        for level in levels.cat.categories:
            if (levels == level).any():
                yield group, str(level), test[levels == level], list(cfg["subgroup_metrics"])


def conspicuity_thirds(displacement: pd.Series) -> pd.Series:
    """Displacements (percent of the bone's width) in thirds of the films given: subtle, moderate, obvious."""
    edges = displacement.quantile([1 / 3, 2 / 3]).to_numpy()
    labels = [f"subtle (< {edges[0]:.1f}% of bone width)", f"moderate ({edges[0]:.1f}–{edges[1]:.1f}%)",
              f"obvious (≥ {edges[1]:.1f}%)"]
    return pd.cut(displacement, [-np.inf, edges[0], edges[1], np.inf], right=False, labels=labels)


def _rare_note(rows: pd.DataFrame, frame: pd.DataFrame, minimum: int) -> pd.Series:
    """Add the too-rare flag to the notes of a subgroup with few positive patients."""
    positive_patients = frame.loc[frame["y_true"] == 1, "patient_id"].nunique()
    if positive_patients >= minimum:
        return rows["note"]
    flag = f"too rare: {positive_patients} positive patient(s) < {minimum}; do not interpret"
    return rows["note"].map(lambda note: f"{flag}; {note}" if note else flag)


def metric_table(predictions: pd.DataFrame, threshold: Threshold, cfg: dict, model: str) -> pd.DataFrame:
    """Long metric table: overall val and test metrics (Brier score and ECE also of the raw scores, on the
    same bootstrap replicates), test subgroups, and the threshold row."""
    options = {"level": cfg["ci_level"], "max_skipped": cfg["max_skipped"], "ece_bins": cfg["ece_bins"]}
    parts = []
    for split in SPLITS:
        films = predictions[predictions["split"] == split]
        if films["y_true"].nunique() < 2:
            log.warning("%s: the %s split has %s: metrics that need both classes are reported as undefined",
                        model, split, "no films" if films.empty else f"only class {films['y_true'].iloc[0]}")
        weights = _weights(films, cfg, split, "overall")
        raw = metrics.score_rows(films.assign(score=films["score_raw"]), weights, CALIBRATION_METRICS, **options)
        raw["metric"] += "_raw"
        rows = pd.concat([metrics.score_rows(films, weights, **options), raw], ignore_index=True)
        parts.append(rows.assign(split=split, group="overall", subgroup="all"))
    test = predictions[predictions["split"] == "test"]
    for group, level, films, names in subgroups(test, cfg):
        rows = metrics.score_rows(films, _weights(films, cfg, "test", group, level), names, **options)
        rows["note"] = _rare_note(rows, films, cfg["min_positive_patients"])
        parts.append(rows.assign(split="test", group=group, subgroup=level))
    val = predictions[predictions["split"] == "val"]
    parts.append(pd.DataFrame([{
        "metric": "threshold", "value": threshold.value, "split": "val", "group": "overall", "subgroup": "all",
        "n": len(val), "n_patients": val["patient_id"].nunique(), "n_positive": int(val["y_true"].sum()),
        "replicates": 0, "skipped": 0,
        "note": threshold.note or f"chosen on the validation split by rule '{threshold.rule}'"}]))
    table = pd.concat(parts, ignore_index=True).assign(model=model)
    return table[METRIC_COLUMNS]


def study_table(predictions: pd.DataFrame, how: str) -> pd.DataFrame:
    """One row per study (patient and study number): its score the ``how`` (max | mean) of its films'
    calibrated probabilities (and of their raw scores), positive when any of its films is. A study's
    films share a patient and so a split; ``image_id`` becomes ``<patient_id>/<study>``."""
    grouped = predictions.groupby(["patient_id", "study", "split"], sort=True)
    studies = grouped.agg(y_true=("y_true", "max"), score=("score", how), score_raw=("score_raw", how),
                          films=("image_id", "size")).reset_index()
    return studies.assign(image_id=studies["patient_id"].astype(str) + "/" + studies["study"].astype(str))


def study_rows(predictions: pd.DataFrame, cfg: dict, model: str) -> pd.DataFrame:
    """Study-level metric rows (group ``study``): the threshold chosen on the validation studies, val and
    test metrics with patient-bootstrap CIs; empty when ``study_score`` is none or the data has no studies."""
    how = cfg["study_score"]
    if how == "none" or "study" not in predictions or predictions["study"].isna().all():
        return pd.DataFrame(columns=METRIC_COLUMNS)
    studies = study_table(predictions.dropna(subset=["study"]), how)
    threshold = pick_threshold(studies, cfg)
    options = {"level": cfg["ci_level"], "max_skipped": cfg["max_skipped"], "ece_bins": cfg["ece_bins"]}
    parts = []
    for split in SPLITS:
        rows = studies[studies["split"] == split].assign(y_pred=lambda f: (f["score"] >= threshold.value).astype(int))
        parts.append(metrics.score_rows(rows, _weights(rows, cfg, split, "study"), STUDY_METRICS, **options)
                     .assign(split=split))
    val = studies[studies["split"] == "val"]
    parts.append(pd.DataFrame([{
        "metric": "threshold", "value": threshold.value, "split": "val", "n": len(val),
        "n_patients": val["patient_id"].nunique(), "n_positive": int(val["y_true"].sum()), "replicates": 0,
        "skipped": 0, "note": threshold.note or f"chosen on the validation studies by rule '{threshold.rule}'"}]))
    # subgroup: how the films' scores were combined; n: studies
    return pd.concat(parts, ignore_index=True).assign(model=model, group="study", subgroup=how)[METRIC_COLUMNS]


def overall_html(table: pd.DataFrame, threshold: Threshold, calibrator: calibration.Calibrator, path: str | Path,
                 model: str, ci: str) -> None:
    """Overall metrics, validation next to test, as an HTML table for the report (``ci``: "95% CI")."""
    overall = table[(table["group"] == "overall") & (table["metric"] != "threshold")]
    labels = {**metrics.METRICS, **RAW_LABELS}
    frame = pd.DataFrame({"Metric": list(labels.values())})
    for split, label in (("val", "Validation"), ("test", "Test")):
        rows = overall[overall["split"] == split].set_index("metric").reindex(list(labels))
        frame[f"{label} ({ci})"] = [figures.format_ci(r.value, r.ci_low, r.ci_high) for r in rows.itertuples()]
        frame[f"{label} note"] = rows["note"].fillna("").to_numpy()
    studies = table[(table["group"] == "study") & (table["metric"] != "threshold")]
    for metric in STUDY_METRICS if len(studies) else []:
        row = {"Metric": f"Study level: {metrics.METRICS[metric]}"}
        for split, label in (("val", "Validation"), ("test", "Test")):
            cell = studies[(studies["split"] == split) & (studies["metric"] == metric)].iloc[0]
            row[f"{label} ({ci})"] = figures.format_ci(cell.value, cell.ci_low, cell.ci_high)
            row[f"{label} note"] = f"{int(cell.n)} studies" + (f"; {cell.note}" if cell.note else "")
        frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    counts = overall.groupby("split")[["n", "n_patients", "n_positive"]].first()
    intro = (f"Probabilities: {calibrator.describe()}. Threshold {threshold.value:.3f} ({threshold.rule}), chosen "
             "on the calibrated validation probabilities and applied unchanged to test. " + "; ".join(
                 f"{s}: {int(c.n)} films, {int(c.n_patients)} patients, {int(c.n_positive)} positive films"
                 for s, c in counts.iterrows()) + ".")
    notes = [threshold.note] if threshold.note else []
    if len(studies):
        notes.append(f"Study level: a study is one patient's films of one visit; its probability is the "
                     f"{studies['subgroup'].iloc[0]} of its films' and it is positive when any film is; its own "
                     "threshold was chosen on the validation studies.")
    notes += [f"{ci}s: percentile bootstrap resampling patients, not films.",
              "Validation Brier score and ECE after calibration are in-sample (the calibrator was fitted on "
              "those films); the test values are the honest ones."]
    figures.write_html_table(frame, path, f"{model}: metrics", intro, notes)


def subgroup_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Test subgroup rows (one per subgroup and metric) with the labels the report shows."""
    rows = table[(table["split"] == "test") & ~table["group"].isin(["overall", "study"])].copy()
    rows["Group"] = rows["group"].map(GROUP_LABELS)
    rows["Metric"] = rows["metric"].map(metrics.METRICS)
    return rows


def subgroup_html(table: pd.DataFrame, path: str | Path, model: str, ci: str) -> None:
    """Test-split subgroup metrics as an HTML table."""
    rows = subgroup_rows(table)
    frame = pd.DataFrame({
        "Group": rows["Group"], "Subgroup": rows["subgroup"], "Metric": rows["Metric"],
        f"Value ({ci})": [figures.format_ci(r.value, r.ci_low, r.ci_high) for r in rows.itertuples()],
        "Films": rows["n"], "Patients": rows["n_patients"], "Positive films": rows["n_positive"],
        "Note": rows["note"]})
    figures.write_html_table(frame, path, f"{model}: test subgroups", "Salter-Harris rows give the share of "
                             "positive films of that type the model detected (sensitivity).")


def subgroup_figure(table: pd.DataFrame, path: str | Path, model: str, ci: str) -> None:
    """Forest plot of test sensitivity and specificity per subgroup; too-rare subgroups in grey."""
    rows = subgroup_rows(table)
    rows = rows[rows["metric"].isin(["sensitivity", "specificity"])]
    forest = pd.DataFrame({
        "label": rows["Group"] + ": " + rows["subgroup"] + " · " + rows["Metric"],
        "value": rows["value"].to_numpy(float), "low": rows["ci_low"].to_numpy(float),
        "high": rows["ci_high"].to_numpy(float),
        "annotation": [f"n={r.n} films, {r.n_positive} pos" for r in rows.itertuples()],
        "flagged": rows["note"].str.startswith("too rare").to_numpy()})
    figures.forest_figure(forest, path, f"{model}: test sensitivity / specificity by subgroup ({ci})",
                          "Sensitivity or specificity (grey: too few positive patients)")


def _describe(films: pd.DataFrame, label: str, stat: pd.Series, stat_name: str) -> str:
    text = f"{label}: {len(films)} films, {films['patient_id'].nunique()} patients, {int(films['y_true'].sum())} pos"
    if not np.isnan(stat["value"]):
        text += f",\n{stat_name} {figures.format_ci(stat['value'], stat['ci_low'], stat['ci_high'])}"
    return text


def evaluation_figures(evaluation: Evaluation, cfg: dict, outputs: Mapping[str, str], model: str, ci: str) -> None:
    """ROC and PR curves with bands, calibration, decision curve, confusion matrix and subgroup forest."""
    predictions, table, threshold = evaluation.predictions, evaluation.table, evaluation.threshold
    test = predictions[predictions["split"] == "test"]
    val = predictions[predictions["split"] == "val"]
    overall = table[(table["group"] == "overall")].set_index(["split", "metric"])
    test_weights = _weights(test, cfg, "test", "overall")
    sens, spec, ppv = (overall.loc[("test", m), "value"] for m in ("sensitivity", "specificity", "ppv"))
    operating = f"test at threshold {threshold.value:.3f} ({threshold.rule})"
    for kind, summary, stat_name, point in (("roc", "auroc", "AUROC", (1 - spec, sens)),
                                            ("pr", "average_precision", "AP", (sens, ppv))):
        curves = []
        for films, split, label, weights in ((test, "test", f"test ({ci} band)", test_weights),
                                             (val, "val", "validation", np.zeros((0, len(val)), dtype=int))):
            if films["y_true"].nunique() == 2:
                curve = metrics.curve(kind, films["y_true"], films["score"], weights, cfg["ci_level"],
                                      cfg["max_skipped"])
                curves.append((_describe(films, label, overall.loc[(split, summary)], stat_name), curve))
        points = [] if np.isnan(sens) else [(operating, *point)]
        name = "ROC" if kind == "roc" else "Precision–recall"
        figures.curve_figure(kind, curves, outputs[kind], f"{model}: {name} curve", points)
    raw = evaluation.calibrator.method != "none"
    after = ", ".join(f"{name} {overall.loc[('test', metric), 'value']:.3f}" + (
        f" (raw {overall.loc[('test', f'{metric}_raw'), 'value']:.3f})" if raw else "")
        for name, metric in (("Brier", "brier"), ("ECE", "ece")))
    figures.calibration_figure(test["y_true"].to_numpy(), test["score"].to_numpy(), cfg["ece_bins"],
                               outputs["calibration"], f"{model}: calibration on test",
                               f"{after}\n{evaluation.calibrator.describe()}\n({cfg['ece_bins']} equal-width bins)",
                               test["score_raw"].to_numpy() if raw else None)
    curves = [] if test.empty else [(f"{model} ({ci} band)", metrics.decision_curve(
        test["y_true"], test["score"], test_weights, cfg["ci_level"], cfg["max_skipped"]))]
    figures.decision_curve_figure(curves, outputs["decision_curve"],
                                  f"{model}: decision curve on test ({len(test)} films)",
                                  [(f"operating threshold {threshold.value:.3f}", threshold.value)])
    figures.confusion_figure(test["y_true"].to_numpy(), test["y_pred"].to_numpy(), outputs["confusion"],
                             f"{model}: test, threshold {threshold.value:.3f}")
    subgroup_figure(table, outputs["subgroups"], model, ci)


@dataclass(frozen=True)
class Evaluation:
    """One model's evaluation: its calibrator, threshold, prediction table and metric table."""

    calibrator: calibration.Calibrator
    threshold: Threshold
    predictions: pd.DataFrame
    table: pd.DataFrame


def evaluate_scores(scores: pd.DataFrame, cfg: dict, model: str) -> Evaluation:
    """Calibrate on validation, choose the threshold on the calibrated validation probabilities, score."""
    calibrator = calibration.fit_on_validation(scores, cfg["calibration"])
    log.info("%s: %s", model, calibrator.describe())
    calibrated = calibration.calibrate(scores, calibrator)
    threshold = pick_threshold(calibrated, cfg)
    predictions = predictions_table(calibrated, threshold)
    table, studies = metric_table(predictions, threshold, cfg, model), study_rows(predictions, cfg, model)
    if len(studies):
        table = pd.concat([table, studies], ignore_index=True)
    return Evaluation(calibrator, threshold, predictions, table)


def evaluate_model(scores_path: str | Path, outputs: Mapping[str, str], cfg: dict, model: str,
                   detection_path: str | Path | None = None) -> Evaluation:
    """Run the whole stage for one model or ensemble; write predictions, metrics (parquet + HTML), figures
    and ``calibration.json`` (the calibrator and the threshold, for ``physis predict``).

    ``detection_path``: the predict rule's COCO AP rows (empty for classifiers), added to the table.
    """
    evaluation = evaluate_scores(pd.read_parquet(scores_path), cfg, model)
    detection = pd.read_parquet(detection_path) if detection_path else pd.DataFrame()
    if len(detection):
        detection = detection.assign(model=model, group="overall", subgroup="all", replicates=0,
                                     note="COCO AP of the fracture class (pycocotools); n = reference boxes")
        evaluation = replace(evaluation, table=pd.concat([evaluation.table, detection],
                                                         ignore_index=True)[METRIC_COLUMNS])
    table = evaluation.table
    write_parquet(evaluation.predictions, outputs["predictions"])
    write_parquet(table, outputs["metrics"])
    calibration.save(evaluation.calibrator, asdict(evaluation.threshold), outputs["calibrator"])
    ci = figures.ci_name(cfg["ci_level"])
    overall_html(table, evaluation.threshold, evaluation.calibrator, outputs["metrics_html"], model, ci)
    subgroup_html(table, outputs["subgroups_html"], model, ci)
    evaluation_figures(evaluation, cfg, outputs, model, ci)
    headline = table[(table["split"] == "test") & (table["group"] == "overall")].set_index("metric")
    log.info("%s test: %s", model, ", ".join(
        f"{name} {figures.format_ci(r.value, r.ci_low, r.ci_high)}" for name, r in headline.iterrows()))
    return evaluation


GALLERY_ROWS = {"True positives": (1, 1, False), "False positives": (0, 1, False), "False negatives": (1, 0, True)}


def gallery_selection(predictions: pd.DataFrame, per_row: int) -> dict[str, pd.DataFrame]:
    """Test films to show: the most confident true positives, false positives and missed fractures.

    One film per patient per row, so a row shows different children.
    """
    test = predictions[predictions["split"] == "test"]
    chosen = {}
    for name, (truth, predicted, ascending) in GALLERY_ROWS.items():
        films = test[(test["y_true"] == truth) & (test["y_pred"] == predicted)]
        films = films.sort_values(["score", "image_id"], ascending=[ascending, True])
        chosen[name] = films.drop_duplicates("patient_id").head(per_row)
    return chosen


def _caption(row) -> str:
    finding = SH_TYPES.get(row.sh_type, "fracture") if row.y_true == 1 and not pd.isna(row.sh_type) else (
        "fracture" if row.y_true == 1 else "no fracture")
    age = "" if pd.isna(row.age) else f"{row.age:.0f} y "
    return f"p = {row.score:.2f} · {finding}\n{age}{row.sex} · {row.view}"


def write_gallery(predictions_path: str | Path, model_dir: str | Path, preset_dir: str | Path,
                  output: str | Path, per_row: int, model: str) -> None:
    """Draw the gallery: chosen test films with the plugin's explanation and the reference boxes.

    The plugin's ``explain`` hook is used when it has one; Keras classifiers without one get the
    generic Grad-CAM of :mod:`physis.explain`; other plugins are shown without an overlay. A
    cross-validated model is explained by its fold 0 model (an explanation is one network's).
    """
    from physis import crossval, inference, pipeline
    from physis.explain import explainer

    predictions = pd.read_parquet(predictions_path)
    chosen = gallery_selection(predictions, per_row)
    folds = crossval.fold_dirs(model_dir)
    plugin, network, model_cfg = inference.load_trained(folds[0] if folds else model_dir)
    explain, how = explainer(plugin, model_cfg)
    preset_dir = Path(preset_dir)
    index = pd.read_parquet(preset_dir / "index.parquet")[["image_id", "path"]]
    boxes = pd.read_parquet(preset_dir / "boxes.parquet")
    rows = []
    for name, films in chosen.items():
        if films.empty:
            rows.append((f"{name} (0)", []))
            continue
        frame = films.merge(index, on="image_id", how="left").assign(label=films["y_true"].to_numpy())
        if frame["path"].isna().any():
            raise EvaluateError(f"{preset_dir}/index.parquet lacks preprocessed films for {model}'s predictions")
        images = pipeline.image_dataset(frame, model_cfg.spec.channels, 1, training=False, seed=model_cfg.seed)
        panels = []
        for row, (image, _) in zip(frame.itertuples(), images):
            pixels = np.asarray(image[0])
            explanation = explain(network, pixels, model_cfg) if explain else None
            panels.append(figures.Film(
                image=pixels[..., 0], caption=_caption(row),
                heatmap=None if explanation is None else explanation.heatmap,
                pred_boxes=None if explanation is None else explanation.boxes,
                true_boxes=boxes[boxes["image_id"] == row.image_id]))
        rows.append((f"{name} ({len(films)})", panels))
    legend = (f"Overlay: {how}{' of the fold 0 model' if folds else ''} (warmer = more influence on the score). "
              "Green: reference fracture box; dotted: other annotated objects; orange dashed: predicted boxes "
              "with scores.")
    figures.film_grid(rows, output, f"{model}: test films at the validation-chosen threshold", legend)


def detection_metrics(pred_boxes: pd.DataFrame, true_boxes: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """COCO AP50 and AP50:95 of the fracture class per split (pycocotools), in the metrics layout.

    ``pred_boxes``: a detector's raw boxes (image_id, split, x, y, w, h, score); ``true_boxes``:
    the preset's boxes (same pixel frame); ``scores``: the evaluated films (image_id, split). No
    confidence interval: the COCO protocol has none, so ci_low/ci_high stay empty.
    """
    from physis.detection import coco_ap

    rows = []
    for split, films in scores.groupby("split"):
        result = coco_ap(pred_boxes[pred_boxes["split"] == split], true_boxes, films["image_id"])
        for metric in ("ap50", "ap50_95"):
            rows.append({"metric": metric, "split": split, "value": result[metric], "ci_low": np.nan,
                         "ci_high": np.nan, "n": result["n_gt"]})
    return pd.DataFrame(rows, columns=["metric", "split", "value", "ci_low", "ci_high", "n"])
