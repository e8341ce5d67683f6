"""GAP (Global Average Precision) and friends, as Kaggle defines it (docs/design.md, "GAP").

One prediction (label, confidence) per test image at most.  Predictions are sorted by
confidence, descending (ties broken by id, ascending, so the score is deterministic);
GAP = (1/M) * sum_i P(i) * rel(i) with M = number of test images whose truth is not empty.
A prediction on an image with empty truth is a wrong prediction.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from landmarks.datasets.data import USAGE_KEEP, read_solution, read_submission  # noqa: F401 (readers re-exported)
from landmarks.utils import LandmarksError

log = logging.getLogger(__name__)


def _truth_sets(solution_df: pd.DataFrame) -> dict[str, set[str]]:
    return {str(i): set(str(t).split()) for i, t in zip(solution_df["id"], solution_df["landmarks"].fillna(""))}


def _ranked(solution_df: pd.DataFrame, predictions_df: pd.DataFrame):
    """Predictions joined to truth, sorted by confidence desc then id asc: (ids, conf, correct, truth)."""
    truth = _truth_sets(solution_df)
    pred = predictions_df[["id", "label", "confidence"]].copy()
    pred["id"] = pred["id"].astype(str)
    pred["label"] = pred["label"].fillna("").astype(str).str.strip()
    unknown = pred.loc[~pred["id"].isin(list(truth.keys())), "id"]
    if len(unknown):
        raise LandmarksError(
            f"{len(unknown)} predictions for ids not in the solution (first: {', '.join(unknown[:3])})"
        )
    dup = pred["id"].duplicated()
    if dup.any():
        raise LandmarksError(f"duplicate prediction for id {pred.loc[dup, 'id'].iloc[0]!r}")
    pred = pred[(pred["label"] != "") & pred["confidence"].notna()]
    pred = pred.sort_values(["confidence", "id"], ascending=[False, True], kind="mergesort")
    correct = np.fromiter((lab in truth[i] for i, lab in zip(pred["id"], pred["label"])), dtype=bool, count=len(pred))
    return pred, correct, truth


def gap(solution_df: pd.DataFrame, predictions_df: pd.DataFrame) -> float:
    """Global Average Precision of `predictions_df` (id, label, confidence) against the truth."""
    pred, correct, truth = _ranked(solution_df, predictions_df)
    m = sum(1 for t in truth.values() if t)
    if m == 0 or len(pred) == 0:
        return 0.0
    hits = np.cumsum(correct)
    prec = hits / np.arange(1, len(correct) + 1)
    return float(np.sum(prec * correct) / m)


def score(solution_df: pd.DataFrame, predictions_df: pd.DataFrame) -> dict:
    """GAP plus diagnostics: accuracy on landmark images, counts, confident wrong non-landmarks."""
    pred, correct, truth = _ranked(solution_df, predictions_df)
    n_landmark = sum(1 for t in truth.values() if t)
    is_nonlm = np.fromiter((not truth[i] for i in pred["id"]), dtype=bool, count=len(pred))
    conf = pred["confidence"].to_numpy()
    low_correct = conf[correct].min() if correct.any() else -np.inf
    out = {
        "gap": gap(solution_df, predictions_df),
        "accuracy": float(correct.sum() / n_landmark) if n_landmark else 0.0,
        "n_test": len(truth),
        "n_landmark": n_landmark,
        "n_nonlandmark": len(truth) - n_landmark,
        "n_predicted": int(len(pred)),
        "n_correct": int(correct.sum()),
        "confident_wrong_nonlandmark": int(np.sum(is_nonlm & (conf > low_correct))),
    }
    if "Usage" in solution_df.columns:
        for usage in USAGE_KEEP:
            sol_u = solution_df[solution_df["Usage"] == usage]
            pred_u = predictions_df[predictions_df["id"].astype(str).isin(set(sol_u["id"].astype(str)))]
            out[f"gap_{usage.lower()}"] = gap(sol_u, pred_u)
    return out


def format_score(s: dict) -> str:
    """The lines `landmarks gap` prints."""
    lines = [f"GAP {s['gap']:.6f}"]
    if "gap_public" in s:
        lines.append(f"GAP Public {s['gap_public']:.6f}")
        lines.append(f"GAP Private {s['gap_private']:.6f}")
    lines.append(
        f"accuracy {s['accuracy']:.6f} ({s['n_correct']}/{s['n_landmark']} landmark images; "
        f"{s['n_predicted']} predictions on {s['n_test']} test images)"
    )
    lines.append(
        f"confident wrong non-landmark predictions {s['confident_wrong_nonlandmark']} "
        f"(of {s['n_nonlandmark']} non-landmark images)"
    )
    return "\n".join(lines)


def score_files(solution_path: str | Path, submission_path: str | Path) -> dict:
    """score() of a submission file against a solution file (Ignored ids allowed, not scored)."""
    sol = read_solution(solution_path)
    ignored = sol.attrs.get("ignored_ids", [])
    sub = read_submission(submission_path, expected_ids=list(sol["id"]) + list(ignored))
    sub = sub[sub["id"].isin(set(sol["id"]))]
    return score(sol, sub)


def _cmd_gap(args, cfg) -> int:
    print(format_score(score_files(args.solution, args.submission)))
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "gap", parents=common("submission"), help="score a submission (GAP) against a solution file"
    )
    p.add_argument("--solution", required=True, help="solution CSV (id,landmarks[,Usage])")
    p.set_defaults(func=_cmd_gap)
