"""The convert stage: any supported source → one validated, labelled, split data set.

Outputs (the contract every later stage relies on), all under ``results/data/``:
``manifest.parquet`` (one row per kept image), ``boxes.parquet`` (one row per box),
``rejected.parquet`` (+ ``.csv``: every input that was rejected or excluded, with a reason),
``summary.json``, ``coco/{split}.json`` and ``tfrecord/{split}-*.tfrecord``.
Counts reconcile: images in = kept + rejected + excluded.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from physis import ao, export, phantom, splits
from physis.io import write_json, write_parquet
from physis.labels import label_image
from physis.logs import progress
from physis.records import ImageRecord, Rejected

log = logging.getLogger(__name__)

FORMATS = ("grazpedwri", "voc", "dicom")
MANIFEST_COLUMNS = [
    "image_id", "patient_id", "study", "view", "laterality", "age", "sex", "path", "width", "height",
    "bit_depth", "ao_codes", "ao_unknown", "fracture_visible", "diagnosis_uncertain", "boxes_clipped", "label",
    "sh_type", "split",
]
REJECT_COLUMNS = ["source", "reason", "image_id", "level"]
BOX_COLUMNS = ["image_id", "class", "x", "y", "w", "h"]


class ConvertError(ValueError):
    """The data set as a whole cannot be used (empty, unsplittable, or rejects under ``strict``)."""


def collect(cfg: dict, work_dir: Path) -> tuple[list[ImageRecord], list[Rejected]]:
    """Run the configured source over the data set root, streaming one image at a time."""
    data_cfg = cfg["dataset"]
    if data_cfg["format"] not in FORMATS:
        raise ConvertError(f"dataset.format {data_cfg['format']!r} is not one of {', '.join(FORMATS)}")
    source = importlib.import_module(f"physis.sources.{data_cfg['format']}")
    root = Path(data_cfg["root"])
    if not root.is_dir():
        raise ConvertError(f"{root}: dataset.root is not a folder")
    records: list[ImageRecord] = []
    rejects: list[Rejected] = []
    for item in progress(source.read(root, data_cfg, work_dir), desc="convert"):
        (records if isinstance(item, ImageRecord) else rejects).append(item)
    return records, rejects


def label_records(records: list[ImageRecord], cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame, list[Rejected]]:
    """Parse AO codes and apply the target; returns kept manifest rows, boxes and exclusions."""
    target = cfg["target"]
    rows, box_rows, excluded = [], [], []
    for record in records:
        codes = [code for cell in record.ao_codes for code in ao.parse_field(cell)]
        label = label_image(codes, record.fracture_visible, target["name"], target["physeal_not_visible"],
                            record.diagnosis_uncertain, target["exclude_uncertain"])
        if label.value is None:
            excluded.append(Rejected(record.source, label.exclusion, record.image_id))
            continue
        row = asdict(record)
        row.pop("boxes")
        row.pop("source")
        row["ao_codes"] = [code.normalized for code in codes if code.kind != "unknown"]
        row["ao_unknown"] = [code.raw for code in codes if code.kind == "unknown"]
        row["boxes_clipped"] = sum(box.clipped for box in record.boxes)
        row["label"] = label.value
        row["sh_type"] = label.sh_type
        rows.append(row)
        box_rows += [{"image_id": record.image_id, "class": b.cls, "x": b.x, "y": b.y, "w": b.w, "h": b.h}
                     for b in record.boxes]
    manifest = pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c != "split"])
    manifest["sh_type"] = manifest["sh_type"].astype("Int64")
    return manifest, pd.DataFrame(box_rows, columns=BOX_COLUMNS), excluded


def reject_table(rejects: list[Rejected], excluded: list[Rejected], kept_ids: set[str]) -> pd.DataFrame:
    """One table of everything not used. ``level``: image, annotation (image kept) or excluded."""
    rows = [{**asdict(r), "level": "annotation" if r.image_id in kept_ids else "image"} for r in rejects]
    rows += [{**asdict(r), "level": "excluded"} for r in excluded]
    return pd.DataFrame(rows, columns=REJECT_COLUMNS)


def summarize(manifest: pd.DataFrame, table: pd.DataFrame) -> dict:
    levels = table["level"].value_counts()
    kept, rejected, excluded = len(manifest), int(levels.get("image", 0)), int(levels.get("excluded", 0))
    per_split = {
        name: {"images": int(len(part)), "patients": int(part["patient_id"].nunique()),
               "positives": int(part["label"].sum())}
        for name, part in manifest.groupby("split")
    }
    return {"images_in": kept + rejected + excluded, "kept": kept, "rejected": rejected, "excluded": excluded,
            "annotations_rejected": int(levels.get("annotation", 0)),
            "boxes_clipped": int(manifest["boxes_clipped"].sum()), "splits": per_split,
            "exclusion_reasons": table.loc[table["level"] == "excluded", "reason"].value_counts().to_dict()}


def reason_kind(reason: str) -> str:
    """A reject reason without its particulars (names, numbers), for counting reasons of one kind."""
    head = re.split(r"[:(]", reason, maxsplit=1)[0]
    return re.sub(r"'[^']*'|\S*\d\S*", "…", head).strip() or reason


def reason_counts(table: pd.DataFrame) -> str:
    """``"12 × unreadable image, 3 × CSV row without image"`` for the rejected (not excluded) rows."""
    counts = table.loc[table["level"] != "excluded", "reason"].map(reason_kind).value_counts()
    return ", ".join(f"{count} × {kind}" for kind, count in counts.items())


def convert(cfg: dict, out_dir: str | Path, failure_rejects: str | Path | None = None) -> dict:
    """Run the whole stage and write its outputs under ``out_dir``; return the summary.

    When the data set as a whole is unusable (:class:`ConvertError`, :class:`splits.SplitError`), the
    rejects table is still written, to ``out_dir`` and to ``failure_rejects`` (a path that survives the
    failed job, e.g. in the log folder), and the error says where.
    """
    out_dir = Path(out_dir)
    records, rejects = collect(cfg, out_dir)
    manifest, boxes, excluded = label_records(records, cfg)
    table = reject_table(rejects, excluded, set(manifest["image_id"]))
    write_parquet(table, out_dir / "rejected.parquet")
    table.to_csv(out_dir / "rejected.csv", index=False)
    try:
        manifest = check_and_split(cfg, manifest, table, len(records), len(rejects))
    except (ConvertError, splits.SplitError) as err:
        if failure_rejects is not None:
            table.to_csv(failure_rejects, index=False)
        where = failure_rejects or out_dir / "rejected.csv"
        raise type(err)(f"{err} (every rejected and excluded input, with its reason: {where})") from None
    if failure_rejects is not None:
        Path(failure_rejects).unlink(missing_ok=True)  # from an earlier failed run
    manifest = phantom.attach_truth(manifest, cfg["dataset"]["root"])  # optional columns, phantom only

    summary = summarize(manifest, table)
    export.write_coco(manifest, boxes, out_dir / "coco")
    (out_dir / "tfrecord").mkdir(parents=True, exist_ok=True)  # declared output, empty when disabled
    if cfg["convert"]["tfrecord"]:
        export.write_tfrecords(manifest, boxes, out_dir / "tfrecord", cfg["convert"]["tfrecord_shard_size"])
    write_parquet(boxes, out_dir / "boxes.parquet")
    write_json(summary, out_dir / "summary.json")
    write_parquet(manifest, out_dir / "manifest.parquet")  # last: its presence means the stage finished
    log.info(format_summary(summary))
    return summary


def check_and_split(cfg: dict, manifest: pd.DataFrame, table: pd.DataFrame, n_records: int,
                    n_rejects: int) -> pd.DataFrame:
    """Refuse a data set that cannot be used as a whole; else the manifest with its patient-level split."""
    root = cfg["dataset"]["root"]
    if not n_records:
        raise ConvertError(f"{root}: no usable image found ({n_rejects} rejected: {reason_counts(table)})")
    if cfg["convert"]["strict"] and n_rejects:
        raise ConvertError(f"convert.strict is true and {n_rejects} input(s) were rejected: {reason_counts(table)}")
    if manifest.empty:
        raise ConvertError(f"{root}: every image was excluded from target {cfg['target']['name']!r}")
    split_cfg = cfg["split"]
    if split_cfg.get("file"):
        manifest = splits.assign_folds(splits.apply_split_file(manifest, split_cfg["file"]), split_cfg["folds"],
                                       split_cfg["seed"])
    else:
        manifest = splits.assign_splits(manifest, split_cfg["fractions"], split_cfg["seed"], split_cfg["folds"])
    splits.check_splits(manifest)
    manifest["coco_id"] = range(1, len(manifest) + 1)
    return manifest


def format_summary(summary: dict) -> str:
    lines = [f"images in {summary['images_in']} = kept {summary['kept']} + rejected {summary['rejected']}"
             f" + excluded {summary['excluded']}  (annotations rejected: {summary['annotations_rejected']}; boxes "
             f"clipped to their image: {summary['boxes_clipped']})"]
    for name in splits.SPLITS:
        s = summary["splits"].get(name, {"images": 0, "patients": 0, "positives": 0})
        lines.append(f"  {name:5s}: {s['images']} images, {s['patients']} patients, {s['positives']} positives")
    return "\n".join(lines)
