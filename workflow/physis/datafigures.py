"""Data-stage figures and tables for the report, from the convert stage's outputs.

What a reviewer checks first: how many films and patients each split holds and how many are
positive (the split is by patient), what the films and their reference boxes look like, and
what was rejected or excluded on the way in and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from physis import figures
from physis.evaluate import SH_TYPES
from physis.images import read_gray
from physis.splits import SPLITS

MAX_SIDE = 512  # example films are shown downsampled; the report does not need full resolution
MAX_REJECT_ROWS = 500


def split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Films and patients per split, with and without a positive label, in split order."""
    rows = []
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        positive_patients = part.loc[part["label"] == 1, "patient_id"].nunique()
        rows.append({"split": split, "positive films": int(part["label"].sum()),
                     "negative films": int((part["label"] == 0).sum()),
                     "patients": part["patient_id"].nunique(), "patients with a positive film": positive_patients})
    return pd.DataFrame(rows).set_index("split")


def _film(row, boxes: pd.DataFrame) -> figures.Film:
    """One original film, downsampled for display, with its reference boxes scaled alike."""
    pixels = read_gray(row.path)
    step = max(1, math.ceil(max(pixels.shape) / MAX_SIDE))
    own = boxes[boxes["image_id"] == row.image_id].copy()
    own[["x", "y", "w", "h"]] = own[["x", "y", "w", "h"]] / step
    finding = SH_TYPES.get(row.sh_type, "fracture") if row.label == 1 and not pd.isna(row.sh_type) else (
        "positive" if row.label == 1 else "negative")
    return figures.Film(image=pixels[::step, ::step], true_boxes=own,
                        caption=f"{finding} · {row.age:.0f} y {row.sex} · {row.view}")


def example_films(manifest: pd.DataFrame, boxes: pd.DataFrame, per_class: int,
                  seed: int = 0) -> list[tuple[str, list[figures.Film]]]:
    """Rows of training films to show: positives (every Salter-Harris type first), then negatives."""
    train = manifest[manifest["split"] == "train"].sample(frac=1, random_state=seed)
    positives = train[train["label"] == 1]
    one_per_type = positives.sort_values("sh_type", kind="stable").drop_duplicates("sh_type")
    positives = pd.concat([one_per_type, positives]).drop_duplicates("image_id").head(per_class)
    negatives = train[train["label"] == 0].head(per_class)
    return [(name, [_film(row, boxes) for row in films.itertuples()])
            for name, films in (("Positive", positives), ("Negative", negatives))]


def rejects_html(rejected: pd.DataFrame, summary: dict, path: str | Path) -> None:
    """Counts of rejected/excluded inputs by reason, then the list itself (file names only)."""
    counts = rejected.groupby(["level", "reason"]).size()
    by_reason = "; ".join(f"{reason} ({level}): {n}" for (level, reason), n in counts.items()) or "none"
    table = rejected.assign(source=rejected["source"].map(lambda s: Path(str(s)).name)).head(MAX_REJECT_ROWS)
    table = table[["level", "reason", "source", "image_id"]].rename(columns=str.capitalize)
    intro = (f"Images in: {summary['images_in']} = kept {summary['kept']} + rejected {summary['rejected']} + "
             f"excluded {summary['excluded']} (annotations rejected on kept images: "
             f"{summary['annotations_rejected']}). By reason: {by_reason}. Level image: the file was unusable; "
             "annotation: one annotation was dropped, the film kept; excluded: a usable film outside the target "
             "definition.")
    notes = [f"Only the first {MAX_REJECT_ROWS} of {len(rejected)} inputs are listed."] if len(
        rejected) > MAX_REJECT_ROWS else []
    figures.write_html_table(table, path, "Rejected and excluded inputs", intro, notes)


def data_figures(manifest_path: str | Path, boxes_path: str | Path, rejected_path: str | Path,
                 summary_path: str | Path, outputs: Mapping[str, str], examples: int) -> None:
    """Write the data-stage figures: class balance, patients per split, example films, rejects."""
    manifest = pd.read_parquet(manifest_path)
    counts = split_counts(manifest)
    figures.bar_figure(counts[["positive films", "negative films"]], outputs["balance"],
                       "Films per split and label", "Films")
    figures.bar_figure(counts[["patients", "patients with a positive film"]], outputs["patients"],
                       "Patients per split (the split is by patient)", "Patients")
    figures.film_grid(example_films(manifest, pd.read_parquet(boxes_path), examples), outputs["examples"],
                      "Example training films with reference boxes",
                      "Green: fracture box; dotted: other annotated objects (text, metal, …).")
    rejects_html(pd.read_parquet(rejected_path), json.loads(Path(summary_path).read_text()), outputs["rejects"])
