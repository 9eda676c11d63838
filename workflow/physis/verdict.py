"""Did a model learn? One verdict per model, from more than one number, for the leaderboard and report.

A ranked table invites reading every row as a result. On the phantom at CPU budgets most networks
stay at chance, and two failure modes look better than chance on a single number: constant scores
give accuracy equal to the majority class's share, and near-constant scores can give an AUROC whose
confidence interval just excludes 0.5. The rule:

1. **learned**: the validation AUROC's confidence interval lies above 0.5, *and* the test split confirms it: the
   test AUROC's CI lies above 0.5 and so does Cohen's κ's above 0 at the validation-chosen threshold
   (the threshold carries information, not only the ranking). Validation chose the epoch and the
   threshold, so it is optimistic on its own; test only confirms, it never ranks or tunes.
2. **degenerate**: not learned, and the model's output barely varies: the spread of its validation
   and test scores (5th to 95th percentile) is below :data:`MIN_SPREAD`, or every validation or test
   film falls on the same side of the threshold (a single predicted class).
3. **no evidence of learning**: everything else. Decided on validation alone when its AUROC CI
   includes 0.5; when validation looks better than chance but test does not confirm it, the
   reason says so.
4. **not configured**: a service without credentials (the aggregate stage gives the reason). A model
   whose job failed has no row: the run fails and names the job, and `--keep-going` trains the others.

Each model that did not learn gets a one-line hint drawn from its training history (an ensemble,
which has none, a hint about its members). The spread is that of the model's raw output
(``score_raw``): calibration may shrink a weak model's probabilities towards the prevalence, which
says nothing about whether its output varies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

LEARNED = "learned"
NO_EVIDENCE = "no evidence of learning"
DEGENERATE = "degenerate"
NOT_CONFIGURED = "not configured"
#: Order in which the leaderboard lists verdicts: results first, then what is no result.
ORDER = (LEARNED, NO_EVIDENCE, DEGENERATE, NOT_CONFIGURED)
#: The verdicts as figure labels name them.
SHORT = {LEARNED: "learned", NO_EVIDENCE: "no evidence", DEGENERATE: "degenerate", NOT_CONFIGURED: "not configured"}
#: Scores whose 5th-95th percentile range is narrower than this are near-constant.
MIN_SPREAD = 0.05
#: How the report states the rule (methods section and leaderboard notes).
RULE = ("Verdict: learned = validation AUROC CI above 0.5, confirmed on test (test AUROC CI above "
        f"0.5 and Cohen's kappa CI above 0); degenerate = not learned and near-constant scores (5th-95th "
        f"percentile range < {MIN_SPREAD}) or a single predicted class; otherwise no evidence of learning. "
        "Models without evidence of learning are listed below the ones that learned and are not results.")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    hint: str = ""


def _row(table: pd.DataFrame, metric: str, split: str) -> pd.Series:
    rows = table[(table["metric"] == metric) & (table["split"] == split) & (table["group"] == "overall")]
    return rows.iloc[0] if len(rows) else pd.Series({"value": np.nan, "ci_low": np.nan, "ci_high": np.nan})


def _ci(row: pd.Series) -> str:
    if pd.isna(row["value"]):
        return "undefined"
    if pd.isna(row["ci_low"]):
        return f"{row['value']:.3f} (no CI)"
    return f"{row['value']:.3f} ({row['ci_low']:.3f}-{row['ci_high']:.3f})"


def _above(row: pd.Series, chance: float) -> bool:
    return bool(pd.notna(row["ci_low"]) and row["ci_low"] > chance)


def judge(metrics: pd.DataFrame, predictions: pd.DataFrame, history: pd.DataFrame | None = None,
          members: Sequence[str] | None = None) -> Verdict:
    """The verdict of one evaluated model from its metrics table, its val/test predictions and its history
    (``members``: an ensemble's, which has no history)."""
    val_auroc, test_auroc = _row(metrics, "auroc", "val"), _row(metrics, "auroc", "test")
    test_kappa = _row(metrics, "kappa", "test")
    hint = history_hint(history, members)
    if _above(val_auroc, 0.5) and _above(test_auroc, 0.5) and _above(test_kappa, 0.0):
        return Verdict(LEARNED, f"val AUROC {_ci(val_auroc)}, test AUROC {_ci(test_auroc)}, "
                                f"test kappa {_ci(test_kappa)}")
    scored = predictions[predictions["split"].isin(["val", "test"])]
    raw = scored["score_raw"] if "score_raw" in scored else scored["score"]
    low, high = np.percentile(raw, [5, 95]) if len(scored) else (np.nan, np.nan)
    one_class = [split for split, films in scored.groupby("split") if films["y_pred"].nunique() == 1]
    if high - low < MIN_SPREAD or one_class:
        what = (f"near-constant scores (5th-95th percentile {low:.3f}-{high:.3f})" if high - low < MIN_SPREAD
                else f"a single predicted class on {' and '.join(one_class)}")
        return Verdict(DEGENERATE, f"{what}; test AUROC {_ci(test_auroc)}", hint)
    if not _above(val_auroc, 0.5):
        return Verdict(NO_EVIDENCE, f"val AUROC {_ci(val_auroc)} includes chance (0.5)", hint)
    return Verdict(NO_EVIDENCE, f"val AUROC {_ci(val_auroc)} is above chance but test does not confirm it "
                                f"(test AUROC {_ci(test_auroc)}, kappa {_ci(test_kappa)})", hint)


def history_hint(history: pd.DataFrame | None, members: Sequence[str] | None = None) -> str:
    """What the training curves say about a model that did not learn, in one line (an ensemble: its members)."""
    if members:
        return (f"an ensemble trains nothing itself: combining {', '.join(dict.fromkeys(members))} gave no ranking "
                "that validation and test confirm; see the members' verdicts, and ensemble models that learned")
    if history is None or "val_auroc" not in history or history["val_auroc"].isna().all():
        return "no validation AUROC was recorded during training"
    if "fold" in history:  # cross-validation: the first fold's curve stands for the others
        history = history[history["fold"] == history["fold"].min()]
    epochs = len(history)
    best = history["val_auroc"].max()
    curve = f"validation AUROC never rose above {best:.2f} in {epochs} epoch{'s' if epochs != 1 else ''}"
    if "auroc" in history and history["auroc"].iloc[-1] - history["auroc"].iloc[0] > 0.15 and best < 0.65:
        curve += f" while training AUROC rose to {history['auroc'].iloc[-1]:.2f} (memorising the training films)"
    return (f"{curve}; this plugin needs a larger (GPU) budget or pretrained weights "
            "(see config/grazpedwri.yaml)")
