"""Reader of the Kaggle GLDv2 layout (CONVENTIONS.md).

DATA/train.csv (id, landmark_id[, url...]), DATA/sample_submission.csv (id, landmarks),
optional DATA/solution.csv, images at DATA/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg.
Built for the 1.58M-row GLDv2 train.csv: one pandas read with dtype hints, vectorised paths.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from landmarks.utils import LandmarksError

SPLITS = {"train": "train.csv", "test": "sample_submission.csv"}


def image_path(data_dir: str | Path, split: str, image_id: str) -> Path:
    """DATA/<split>/<a>/<b>/<c>/<id>.jpg"""
    image_id = str(image_id)
    if len(image_id) < 3:
        raise LandmarksError(f"image id {image_id!r} is shorter than 3 characters (GLDv2 ids are 16 hex digits)")
    return Path(data_dir) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def image_paths(data_dir: str | Path, split: str, ids: pd.Series) -> pd.Series:
    """Vectorised image_path for a Series of ids (strings)."""
    prefix = f"{Path(data_dir)}{os.sep}{split}{os.sep}"
    sep = os.sep
    vals = [f"{prefix}{i[0]}{sep}{i[1]}{sep}{i[2]}{sep}{i}.jpg" for i in ids.tolist()]
    return pd.Series(vals, index=ids.index, dtype=object)


def _header(path: Path) -> list[str]:
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            line = f.readline()
    except UnicodeDecodeError:
        raise LandmarksError(f"{path}: line 1: not UTF-8 text; save the file as UTF-8") from None
    if not line.strip():
        raise LandmarksError(f"{path}: empty file (expected a header line such as 'id,landmark_id')")
    return [c.strip() for c in line.rstrip("\r\n").split(",")]


def _first_lines(mask: pd.Series, limit: int = 3) -> str:
    """Line numbers (1 = header) of the first rows where mask is true."""
    idx = mask.to_numpy().nonzero()[0][:limit]
    return ", ".join(str(i + 2) for i in idx)


def load_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    """Ids and image paths of a split: columns id, path (+ landmark_id int64 for 'train')."""
    if split not in SPLITS:
        raise LandmarksError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    data_dir = Path(data_dir)
    path = data_dir / SPLITS[split]
    if not path.exists():
        hint = "run `landmarks demo-data`, `landmarks import` or `landmarks holdout` to make one" \
            if not data_dir.exists() else f"expected {SPLITS[split]} in it"
        raise LandmarksError(f"{path} not found: {data_dir} is not a Kaggle-layout dataset ({hint})")
    header = _header(path)
    need = ["id", "landmark_id"] if split == "train" else ["id"]
    for col in need:
        if col not in header:
            raise LandmarksError(f"{path}: missing column {col!r} (header: {','.join(header)})")
    def read(lm_dtype):
        return pd.read_csv(path, usecols=need, dtype={"id": object, "landmark_id": lm_dtype}, encoding="utf-8-sig",
                           keep_default_na=False, na_filter=False, engine="c", skipinitialspace=True)

    try:
        try:
            df = read("int64")  # fast path: well-formed integers
        except (ValueError, TypeError, OverflowError):
            df = read(object)  # re-read as text to name the bad row below
    except UnicodeDecodeError:
        raise LandmarksError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except pd.errors.ParserError as e:
        raise LandmarksError(f"{path}: malformed CSV ({str(e).strip()})") from None
    if len(df) == 0:
        raise LandmarksError(f"{path}: no rows after the header")
    ids = df["id"].astype(object)
    if ids.map(type).ne(str).any():
        ids = ids.astype(str)
    bad = ids.str.len() < 3
    if bad.any():
        raise LandmarksError(f"{path}: line {_first_lines(bad)}: empty or too short id (need >= 3 characters)")
    dup = ids.duplicated()
    if dup.any():
        raise LandmarksError(f"{path}: line {_first_lines(dup)}: duplicate id {ids[dup].iloc[0]!r} "
                             f"({int(dup.sum())} duplicates in all)")
    out = pd.DataFrame({"id": ids, "path": image_paths(data_dir, split, ids)})
    if split == "train":
        lm = df["landmark_id"]
        if lm.dtype != "int64":
            num = pd.to_numeric(lm.astype(str).str.strip(), errors="coerce")
            bad = num.isna() | (num != num.round())
            if bad.any():
                raise LandmarksError(f"{path}: line {_first_lines(bad)}: landmark_id {lm[bad].iloc[0]!r} "
                                     "is not an integer")
            lm = num
        out["landmark_id"] = lm.astype("int64")
    return out


def check_images(df: pd.DataFrame) -> list[str]:
    """Ids whose image file is missing (callers log missing_report(...) and continue)."""
    exists = os.path.exists
    return [i for i, p in zip(df["id"], df["path"]) if not exists(p)]


def missing_report(ids: list[str], limit: int = 3) -> str:
    """'N images missing (first: a, b, c)'"""
    if not ids:
        return "0 images missing"
    return f"{len(ids)} images missing (first: {', '.join(map(str, ids[:limit]))})"


def load_solution(data_dir: str | Path) -> pd.DataFrame | None:
    """DATA/solution.csv as metrics.read_solution gives it, or None when absent."""
    path = Path(data_dir) / "solution.csv"
    if not path.exists():
        return None
    from landmarks.metrics import read_solution

    return read_solution(path)
