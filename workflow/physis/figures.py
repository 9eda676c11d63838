"""Figures and HTML tables for the report: the drawing primitives every stage uses.

Everything is drawn with matplotlib's Agg backend into small PNGs (``DPI``) so the
self-contained HTML report stays light; tables are written as standalone HTML pages because
the report cannot render parquet. Each function draws one kind of figure from plain data
(curves, rows, arrays) and knows nothing about files upstream; :mod:`physis.evaluate`,
:mod:`physis.aggregate` and :mod:`physis.datafigures` decide what goes in.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from physis.io import atomic_path  # noqa: E402
from physis.metrics import Curve, DecisionCurve, calibration_edges, reliability  # noqa: E402

DPI = 110
COLORS = plt.get_cmap("tab10").colors


def save(fig: plt.Figure, path: str | Path) -> None:
    """Write ``fig`` as PNG atomically and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def curve_figure(kind: str, curves: Sequence[tuple[str, Curve]], path: str | Path, title: str,
                 operating_points: Sequence[tuple[str, float, float]] = ()) -> None:
    """ROC or PR (``kind``) curves, one per label, with shaded bootstrap bands and operating points."""
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    if not curves:
        ax.text(0.5, 0.5, "not computable: needs positive and negative films", ha="center", va="center")
    for i, (label, c) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        if kind == "roc":
            ax.plot(c.x, c.y, color=color, lw=1.8, label=label)
        else:
            ax.step(c.x, c.y, where="pre", color=color, lw=1.8, label=label)
        if not np.isnan(c.low).all():
            ax.fill_between(c.grid, c.low, c.high, color=color, alpha=0.2, lw=0)
    for i, (label, x, y) in enumerate(operating_points):
        ax.plot([x], [y], "o", ms=8, mfc="white", mec=COLORS[i % len(COLORS)], mew=2, label=label)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
        ax.set(xlabel="1 − specificity (false-positive rate)", ylabel="Sensitivity (true-positive rate)")
    else:
        ax.set(xlabel="Recall (sensitivity)", ylabel="Precision (PPV)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7.5, framealpha=0.9)
    save(fig, path)


def calibration_figure(y_true: np.ndarray, score: np.ndarray, bins: int, path: str | Path, title: str,
                       note: str, raw: np.ndarray | None = None) -> None:
    """Reliability diagram above a histogram of the scores, both on the ECE's bins
    (:func:`physis.metrics.calibration_bins`); ``raw``: the scores before calibration, drawn dashed."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.2), sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    series = [] if raw is None else [(raw, "--", "0.45", "before calibration")]
    series.append((score, "-", COLORS[0], "model" if raw is None else "after calibration"))
    for values, style, color, label in series:
        if len(y_true):
            films, predicted, observed = reliability(y_true, values, bins)
            filled = films > 0
            top.plot(predicted[filled], observed[filled], style, marker="o", color=color,
                     label=f"{label} (n={len(y_true)} films)")
    top.set(ylabel="Observed share of fractures", title=title, xlim=(0, 1), ylim=(-0.01, 1.01))
    top.text(0.02, 0.97, note, va="top", fontsize=8, transform=top.transAxes)
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    edges = calibration_edges(bins)
    bottom.hist([score[y_true == 1], score[y_true == 0]], bins=edges, stacked=True,
                color=[COLORS[3], COLORS[7]], label=["fracture", "no fracture"])
    bottom.set(xlabel="Predicted probability of fracture", ylabel="Films")
    bottom.legend(fontsize=7)
    save(fig, path)


def decision_curve_figure(curves: Sequence[tuple[str, DecisionCurve]], path: str | Path, title: str,
                          operating_points: Sequence[tuple[str, float]] = ()) -> None:
    """Net benefit against threshold probability, one line per model (shaded band where it has one),
    with the "treat all" and "treat none" strategies of the first curve's films and dotted operating
    thresholds."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if not curves:
        ax.text(0.5, 0.5, "not computable: no test films", ha="center", va="center")
    else:
        reference = curves[0][1]
        ax.plot(reference.thresholds, reference.treat_all, ls="--", color="0.35", lw=1.2, label="treat all")
        ax.axhline(0, color="0.15", lw=1.2, label="treat none")
        for i, (label, c) in enumerate(curves):
            color = COLORS[i % len(COLORS)]
            ax.plot(c.thresholds, c.model, color=color, lw=1.8, label=label)
            if not np.isnan(c.low).all():
                ax.fill_between(c.thresholds, c.low, c.high, color=color, alpha=0.2, lw=0)
        top = max(0.01, reference.treat_all.max(), *(np.nanmax(np.r_[c.model, c.high]) for _, c in curves))
        ax.set_ylim(-0.25 * top, 1.15 * top)
    for i, (label, threshold) in enumerate(operating_points):
        ax.axvline(threshold, ls=":", lw=1.2, color=COLORS[i % len(COLORS)], label=label)
    ax.set(xlim=(0, 1), title=title, xlabel="Threshold probability pₜ (a false positive weighs "
           "pₜ / (1 − pₜ) of a true positive)", ylabel="Net benefit (true positives per film, net)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="upper right", fontsize=7.5, framealpha=0.9)
    save(fig, path)


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path, title: str) -> None:
    """2×2 confusion matrix with counts and row percentages."""
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    display = ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=[0, 1], display_labels=["no fracture", "fracture"], cmap="Blues", ax=ax,
        colorbar=False)
    counts = display.confusion_matrix
    totals = counts.sum(axis=1, keepdims=True)
    for (i, j), text in np.ndenumerate(display.text_):
        share = counts[i, j] / totals[i, 0] if totals[i, 0] else np.nan
        text.set_text(f"{counts[i, j]}\n({share:.0%} of row)" if totals[i, 0] else f"{counts[i, j]}")
    ax.set(title=title, xlabel="Predicted", ylabel="Reference (label)")
    save(fig, path)


def training_figure(history: pd.DataFrame, path: str | Path, title: str, best_epoch: int | None) -> None:
    """Loss, AUROC and accuracy per epoch for the training and validation sets."""
    panels = [(name, label) for name, label in (("loss", "Loss"), ("auroc", "AUROC"), ("accuracy", "Accuracy"))
              if name in history or f"val_{name}" in history]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.8), squeeze=False,
                             layout="constrained")
    # a cross-validated model's history holds every fold's epochs (column fold): one colour per fold
    runs = list(history.groupby("fold")) if "fold" in history else [(None, history)]
    for ax, (name, label) in zip(axes[0], panels):
        for n, (fold, run) in enumerate(runs):
            for column, style, legend in ((name, "-", "training"), (f"val_{name}", "--", "validation")):
                if column in run:
                    ax.plot(run["epoch"], run[column], style, marker=".",
                            color=None if fold is None else COLORS[n % len(COLORS)],
                            label=legend if fold is None else f"{legend}, fold {fold}")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", label=f"best epoch ({best_epoch})")
        ax.set(xlabel="Epoch", ylabel=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no training history recorded", ha="center", va="center")
        axes[0, 0].set_axis_off()
    fig.suptitle(title)
    save(fig, path)


def forest_figure(rows: pd.DataFrame, path: str | Path, title: str, xlabel: str,
                  reference: float | None = None) -> None:
    """Point estimates with CIs, one line each; flagged rows are grey.

    ``rows``: label, value, low, high, annotation (text at the right), flagged (bool).
    """
    fig, ax = plt.subplots(figsize=(7.2, 0.8 + 0.32 * max(len(rows), 1)))
    positions = np.arange(len(rows))[::-1]
    for y, row in zip(positions, rows.itertuples()):
        color = "0.6" if row.flagged else COLORS[0]
        if not np.isnan(row.low):
            ax.plot([row.low, row.high], [y, y], color=color, lw=2)
        ax.plot([row.value], [y], "s", color=color, ms=6)
        ax.text(1.02, y, row.annotation, va="center", fontsize=7.5, transform=ax.get_yaxis_transform())
    if reference is not None:
        ax.axvline(reference, color="grey", ls=":", lw=1)
    ax.set_yticks(positions, rows["label"].tolist(), fontsize=8)
    ax.set(xlim=(-0.02, 1.02), xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)


def bar_figure(frame: pd.DataFrame, path: str | Path, title: str, ylabel: str,
               errors: pd.DataFrame | None = None, hatched: Sequence[str] = (), fmt: str = "{:.0f}",
               ylim: tuple[float, float] | None = None, muted: Sequence[str] = ()) -> None:
    """Grouped bars: one group per index entry, one bar per column, values written on the bars.

    ``errors``: optional (low, high) columns per series as ``{series}_low``/``{series}_high``.
    Columns named in ``hatched`` are drawn hatched (e.g. numbers from another data set); the other
    columns' bars of the groups named in ``muted`` are grey (e.g. models that did not learn).
    """
    groups, series = frame.index.tolist(), frame.columns.tolist()
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(len(series), 1) * 0.6 + 2), 4.2))
    for i, name in enumerate(series):
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        values = frame[name].to_numpy(dtype=float)
        yerr = None
        if errors is not None and f"{name}_low" in errors:
            yerr = np.vstack([values - errors[f"{name}_low"].to_numpy(float),
                              errors[f"{name}_high"].to_numpy(float) - values])
            yerr = np.where(np.isnan(yerr), 0, yerr)
        colors = [COLORS[i % len(COLORS)] if name in hatched or group not in muted else "0.7" for group in groups]
        bars = ax.bar(x, np.nan_to_num(values), width, label=name, color=colors,
                      hatch="//" if name in hatched else None, alpha=0.6 if name in hatched else 1.0,
                      yerr=yerr, capsize=3)
        for bar, value in zip(bars, values):
            if not np.isnan(value):
                ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(np.arange(len(groups)), [str(g) for g in groups], rotation=20 if len(groups) > 4 else 0)
    ax.set(ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def cost_figure(frame: pd.DataFrame, path: str | Path, title: str, ci: str) -> None:
    """Test AUROC (with CI) against training time and against parameter count, one dot per model.

    ``frame``: model, train_seconds, params, auroc, auroc_ci_low, auroc_ci_high.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, column, label in ((axes[0], "train_seconds", "Training time (s, log scale)"),
                              (axes[1], "params", "Parameters (log scale)")):
        for i, row in enumerate(frame.itertuples()):
            x = getattr(row, column)
            if x is None or pd.isna(x) or pd.isna(row.auroc):
                continue
            low = row.auroc - row.auroc_ci_low if not pd.isna(row.auroc_ci_low) else 0
            high = row.auroc_ci_high - row.auroc if not pd.isna(row.auroc_ci_high) else 0
            ax.errorbar([x], [row.auroc], yerr=[[low], [high]], fmt="o", color=COLORS[i % len(COLORS)], capsize=3)
            ax.annotate(row.model, (x, row.auroc), fontsize=8, xytext=(5, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.25)
        ax.set(xlabel=label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set(ylabel=f"Test AUROC ({ci})", ylim=(0, 1.02))
    fig.suptitle(title)
    save(fig, path)


@dataclass
class Film:
    """One film panel: a grey image, optional heat map, reference and predicted boxes, a caption."""

    image: np.ndarray  # 2-D, any range (displayed with a 1–99 percentile window)
    caption: str
    heatmap: np.ndarray | None = None  # 2-D in [0, 1], same height × width
    true_boxes: pd.DataFrame | None = None  # x, y, w, h, class (pixels)
    pred_boxes: np.ndarray | None = None  # rows x, y, w, h, score (pixels)
    notes: list[str] = field(default_factory=list)


def draw_film(ax: plt.Axes, film: Film) -> None:
    """Draw a film with its heat map (jet, translucent), reference boxes (green) and predictions (orange)."""
    low, high = np.percentile(film.image, [1, 99])
    ax.imshow(film.image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
    if film.heatmap is not None:
        ax.imshow(np.ma.masked_less(film.heatmap, 0.1), cmap="jet", alpha=0.4, vmin=0, vmax=1,
                  extent=(-0.5, film.image.shape[1] - 0.5, film.image.shape[0] - 0.5, -0.5))
    if film.true_boxes is not None:
        for x, y, w, h, cls in film.true_boxes[["x", "y", "w", "h", "class"]].itertuples(index=False, name=None):
            is_fracture = cls == "fracture"
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.6 if is_fracture else 0.8,
                                   ec="lime" if is_fracture else "khaki", ls="-" if is_fracture else ":"))
    if film.pred_boxes is not None:
        for x, y, w, h, score in np.asarray(film.pred_boxes, dtype=float).reshape(-1, 5):
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.4, ec="orange", ls="--"))
            ax.text(x, y, f"{score:.2f}", color="orange", fontsize=6, va="bottom")
    ax.set_title(film.caption, fontsize=7)
    ax.set_axis_off()


def film_grid(rows: Sequence[tuple[str, Sequence[Film]]], path: str | Path, title: str, legend: str) -> None:
    """A grid of films, one labelled row per group (e.g. true positives, false positives …)."""
    columns = max([len(films) for _, films in rows] + [1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.3 * columns + 0.6, 2.9 * len(rows) + 0.4),
                             squeeze=False)
    for r, (name, films) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            if c < len(films):
                draw_film(ax, films[c])
            else:
                ax.set_axis_off()
                if c == 0:
                    ax.text(0.5, 0.5, "none at this threshold", ha="center", va="center", fontsize=8)
        axes[r, 0].text(-0.12, 0.5, name, rotation=90, ha="center", va="center", fontsize=9,
                        transform=axes[r, 0].transAxes, weight="bold")
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, legend, ha="center", fontsize=7)
    save(fig, path)


_CSS = """body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#f0f0f0;vertical-align:bottom}td{max-width:28em}tr:nth-child(even){background:#fafafa}
p,li{max-width:60em;font-size:13px}"""


def write_html_table(frame: pd.DataFrame, path: str | Path, title: str, intro: str = "",
                     notes: Sequence[str] = ()) -> None:
    """A standalone HTML page with one table (the report shows it in a frame)."""
    table = frame.to_html(index=False, na_rep="–", border=0, escape=True)
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h2>{html.escape(title)}</h2>"
            f"{f'<p>{html.escape(intro)}</p>' if intro else ''}{table}"
            f"{f'<ul>{items}</ul>' if items else ''}</body></html>\n")
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def ci_name(level: float) -> str:
    """``"95% CI"`` for level 0.95: how intervals are labelled in tables and figures."""
    return f"{level:.0%} CI"


def format_ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """``0.912 (0.874–0.941)``; the interval is left out when it is missing."""
    if pd.isna(value):
        return "–"
    if pd.isna(low) or pd.isna(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"
