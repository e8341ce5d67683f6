"""GAP (Global Average Precision) and friends, exactly as in CONVENTIONS.md.

One prediction (label, confidence) per test image at most.  Predictions are sorted by
confidence, descending (ties broken by id, ascending, so the score is deterministic);
GAP = (1/M) * sum_i P(i) * rel(i) with M = number of test images whose truth is not empty.
A prediction on an image with empty truth is a wrong prediction.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from landmarks.utils import LandmarksError

log = logging.getLogger("landmarks.metrics")

USAGE_KEEP = ("Public", "Private")


def _read_text(path: str | Path) -> str:
    """File text as UTF-8 (BOM tolerated); non-UTF-8 -> error naming the line."""
    path = Path(path)
    if not path.exists():
        raise LandmarksError(f"file not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LandmarksError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def _rows(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) of a CSV file; blank (or whitespace-only) lines skipped."""
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line; ',' is a row with an empty id (an error, not skipped)
            if header is None:
                header = [h.strip() for h in fields]
                continue
            rows.append((reader.line_num, fields))
    except csv.Error as e:
        raise LandmarksError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise LandmarksError(f"{path}: empty file (expected a header line)")
    return header, rows


def _truth_labels(path, line: int, value: str) -> str:
    """Space-separated true landmark ids of a solution row, each checked by the label rule."""
    from landmarks.data import label_problem

    parts = str(value).split()
    for p in parts:
        why = label_problem(p)
        if why:
            raise LandmarksError(f"{path}: line {line}: {why}")
    return " ".join(parts)


def read_solution(path: str | Path) -> pd.DataFrame:
    """Ground truth: columns id, landmarks ('' = no landmark; several ids space-separated), [Usage].

    Accepts our `id,landmarks` files and Kaggle's official `id,landmarks,Usage`; rows with
    Usage 'Ignored' are dropped (Kaggle does not score them).
    """
    header, rows = _rows(path)
    if "id" not in header:
        raise LandmarksError(f"{path}: missing column 'id' (header: {','.join(header)})")
    lm_col = "landmarks" if "landmarks" in header else ("landmark_id" if "landmark_id" in header else None)
    if lm_col is None:
        raise LandmarksError(f"{path}: missing column 'landmarks' (header: {','.join(header)})")
    i_id, i_lm = header.index("id"), header.index(lm_col)
    i_use = header.index("Usage") if "Usage" in header else None
    ids, lms, uses, ignored, seen, warned = [], [], [], [], {}, set()
    for line, f in rows:
        if len(f) < len(header):
            f = f + [""] * (len(header) - len(f))
        rid = _row_id(path, line, f[i_id], seen, warned)
        use = f[i_use].strip() if i_use is not None else None
        if use is not None and use not in USAGE_KEEP + ("Ignored",):
            raise LandmarksError(f"{path}: line {line}: unknown Usage {use!r} (expected Public, Private or Ignored)")
        if use == "Ignored":
            ignored.append(rid)
            continue
        ids.append(rid)
        lms.append(_truth_labels(path, line, f[i_lm]))
        uses.append(use)
    df = pd.DataFrame({"id": pd.Series(ids, dtype=object), "landmarks": pd.Series(lms, dtype=object)})
    if i_use is not None:
        df["Usage"] = pd.Series(uses, dtype=object)
    df.attrs["ignored_ids"] = ignored
    return df


def _row_id(path, line: int, raw: str, seen: dict, warned: set) -> str:
    """The id of one CSV row, stripped (warned once per file) and checked by the id rule of
    landmarks.data; invalid or repeated ids are errors naming the line."""
    from landmarks.data import id_problem

    rid = raw.strip()
    if rid != raw and "strip" not in warned:
        warned.add("strip")
        log.warning("%s: line %d: id %r has surrounding whitespace, stripped (warned once per file)", path, line, raw)
    why = id_problem(rid)
    if why:
        raise LandmarksError(f"{path}: line {line}: {why}")
    if rid in seen:
        raise LandmarksError(f"{path}: line {line}: duplicate id {rid!r} (first on line {seen[rid]})")
    seen[rid] = line
    return rid


def read_submission(path: str | Path, expected_ids=None) -> pd.DataFrame:
    """Submission `id,landmarks` ("<label> <confidence>" or empty) -> id, label, confidence.

    Empty predictions have label '' and confidence NaN.  Malformed rows raise LandmarksError
    naming the line.  With `expected_ids`, unknown ids are errors and expected ids absent from
    the file are added as empty predictions (with a warning).
    """
    from landmarks.data import label_problem

    header, rows = _rows(path)
    for col in ("id", "landmarks"):
        if col not in header:
            raise LandmarksError(f"{path}: missing column {col!r} (header: {','.join(header)}; expected id,landmarks)")
    i_id, i_lm = header.index("id"), header.index("landmarks")
    expected = None if expected_ids is None else set(map(str, expected_ids))
    ids, labels, confs, seen, warned = [], [], [], {}, set()
    for line, f in rows:
        if len(f) <= max(i_id, i_lm):
            f = f + [""] * (max(i_id, i_lm) + 1 - len(f))
        rid = _row_id(path, line, f[i_id], seen, warned)
        if expected is not None and rid not in expected:
            raise LandmarksError(f"{path}: line {line}: unknown id {rid!r} (not among the {len(expected)} test ids)")
        parts = f[i_lm].split()
        if not parts:
            label, conf = "", math.nan
        elif len(parts) == 2:
            label = parts[0]
            why = label_problem(label)
            if why:
                raise LandmarksError(f"{path}: line {line}: {why}")
            try:
                conf = float(parts[1])
            except ValueError:
                raise LandmarksError(f"{path}: line {line}: confidence {parts[1]!r} is not a number") from None
            if not math.isfinite(conf):
                raise LandmarksError(f"{path}: line {line}: confidence {parts[1]!r} is not finite")
        else:
            raise LandmarksError(
                f"{path}: line {line}: landmarks {f[i_lm]!r} must be '<landmark_id> <confidence>' or empty")
        ids.append(rid)
        labels.append(label)
        confs.append(conf)
    if expected is not None:
        missing = sorted(expected - set(seen))
        if missing:
            log.warning("%s: %d test ids have no row (first: %s); counted as no prediction",
                        path, len(missing), ", ".join(missing[:3]))
            ids += missing
            labels += [""] * len(missing)
            confs += [math.nan] * len(missing)
    return pd.DataFrame({"id": pd.Series(ids, dtype=object), "label": pd.Series(labels, dtype=object),
                         "confidence": np.asarray(confs, dtype=np.float64)})


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
        raise LandmarksError(f"{len(unknown)} predictions for ids not in the solution (first: {', '.join(unknown[:3])})")
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
    lines.append(f"accuracy {s['accuracy']:.6f} ({s['n_correct']}/{s['n_landmark']} landmark images; "
                 f"{s['n_predicted']} predictions on {s['n_test']} test images)")
    lines.append(f"confident wrong non-landmark predictions {s['confident_wrong_nonlandmark']} "
                 f"(of {s['n_nonlandmark']} non-landmark images)")
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
    p = subparsers.add_parser("gap", parents=[common], help="score a submission (GAP) against a solution file")
    p.add_argument("--solution", required=True, help="solution CSV (id,landmarks[,Usage])")
    p.set_defaults(func=_cmd_gap)
