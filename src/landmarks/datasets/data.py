"""Reader of the Kaggle GLDv2 layout (README.md, "Data"; docs/design.md), with the id and label rules.

DATA/train.csv (id, landmark_id[, url...]), DATA/sample_submission.csv (id, landmarks),
optional DATA/solution.csv, images at DATA/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg.
Built for the 1.58M-row GLDv2 train.csv: one pandas read, vectorised checks and paths.

Id rule (every CSV, every stage): after stripping surrounding whitespace (warned once per
file), an id is 1-200 ASCII letters, digits, '_' or '-' (so it is a safe file name: no
separator, no '.', no NUL); image ids (train.csv, sample_submission.csv) have at least 3.
Label rule: a landmark_id is a non-negative decimal integer below 2**63 written plainly
(no sign, no leading zero, no exponent or fraction), so it round-trips exactly through int64.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from landmarks.utils import LandmarksError

log = logging.getLogger(__name__)

SPLITS = {"train": "train.csv", "test": "sample_submission.csv"}
ID_CHARS = "A-Za-z0-9_-"
ID_MAX_LEN = 200  # '<id>.jpg' stays below the usual 255-byte file-name limit
IMAGE_ID_MIN_LEN = 3  # <a>/<b>/<c>/ directory levels
LABEL_MAX = 2**63 - 1
_ID_RE = re.compile(f"[{ID_CHARS}]+")
_LABEL_RE = re.compile(r"0|[1-9][0-9]*")
_SPACE_RE = re.compile(r"\s")
_POW10 = np.array([10**k for k in range(1, 19)], np.int64)  # digits of n = 1 + count of these <= n
ID_RULE = f"1-{ID_MAX_LEN} characters of A-Z a-z 0-9 _ -"
LABEL_RULE = "a non-negative integer below 2**63 in plain decimal"


def id_problem(value, min_len: int = 1) -> str | None:
    """Why `value` (already stripped) is not a valid id, or None when it is."""
    if not isinstance(value, str) or value == "":
        return "empty id"
    if "\x00" in value:
        return f"id {value!r} contains a NUL byte"
    if not _ID_RE.fullmatch(value):
        bad = next(c for c in value if not _ID_RE.fullmatch(c))
        return f"id {value!r} contains {bad!r} (ids are {ID_RULE})"
    if len(value) < min_len:
        return f"id {value!r} is shorter than {min_len} characters"
    if len(value) > ID_MAX_LEN:
        return f"id {value[:20]!r}... is longer than {ID_MAX_LEN} characters"
    return None


def label_problem(value) -> str | None:
    """Why `value` (already stripped text) is not a valid landmark_id, or None."""
    if not isinstance(value, str) or value == "":
        return "empty landmark_id"
    if _LABEL_RE.fullmatch(value):
        return None if int(value) <= LABEL_MAX else f"landmark_id {value!r} is too large (must be below 2**63)"
    if value.isascii() and value[:1] in "+-" and value[1:].isdigit():
        return f"landmark_id {value!r} has a sign ({LABEL_RULE})"
    if value.isascii() and value.isdigit():
        return f"landmark_id {value!r} has a leading zero; write {int(value)}"
    return f"landmark_id {value!r} is not {LABEL_RULE}"


def check_label(value) -> str:
    """A label as text, checked ('' is not a label); LandmarksError naming the rule otherwise."""
    s = str(int(value)) if isinstance(value, (int, np.integer)) else str(value).strip()
    why = label_problem(s)
    if why:
        raise LandmarksError(why)
    return s


def image_path(data_dir: str | Path, split: str, image_id: str) -> Path:
    """DATA/<split>/<a>/<b>/<c>/<id>.jpg; the id is checked and the path must stay in DATA/<split>/."""
    image_id = str(image_id)
    why = id_problem(image_id, IMAGE_ID_MIN_LEN)
    if why:
        raise LandmarksError(f"image {why}")
    root = Path(data_dir) / split
    path = root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
    _check_inside(root, path)
    return path


def _check_inside(root: Path, path: Path) -> None:
    """Refuse a path that leaves root once '..' and '.' are resolved (lexically: a symlink placed
    inside the dataset on purpose, as `landmarks holdout` makes, stays allowed)."""
    r, p = os.path.normpath(os.path.abspath(root)), os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([r, p]) != r:
        raise LandmarksError(f"image path {path} leaves {root}")


def image_paths(data_dir: str | Path, split: str, ids: pd.Series) -> pd.Series:
    """Vectorised image_path for a Series of ids already checked by check_ids (load_split)."""
    prefix = f"{Path(data_dir)}{os.sep}{split}{os.sep}"
    sep = os.sep
    vals = [f"{prefix}{i[0]}{sep}{i[1]}{sep}{i[2]}{sep}{i}.jpg" for i in ids.tolist()]
    return pd.Series(vals, index=ids.index, dtype=object)


def read_header(path: Path) -> list[str]:
    """Column names of a CSV file, parsed as CSV (quoted names allowed), stripped."""
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            row = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise LandmarksError(f"{path}: line 1: not UTF-8 text; save the file as UTF-8") from None
    except csv.Error as e:
        raise LandmarksError(f"{path}: line 1: malformed CSV header ({e})") from None
    header = [c.strip() for c in row]
    if not any(header):
        raise LandmarksError(f"{path}: empty file (expected a header line such as 'id,landmark_id')")
    return header


def _first_lines(mask, limit: int = 3) -> str:
    """Line numbers (1 = header) of the first rows where mask is true."""
    idx = np.asarray(mask).nonzero()[0][:limit]
    return ", ".join(str(i + 2) for i in idx)


def _as_text(col: pd.Series) -> pd.Series:
    """Object column of str (missing fields -> '')."""
    col = col.astype(object)
    if not all(type(v) is str for v in col.tolist()):
        col = col.map(lambda v: v if isinstance(v, str) else "")
    return col


def strip_column(col: pd.Series, path, name: str) -> pd.Series:
    """Strip surrounding whitespace, with one warning per file naming the first line."""
    if not _SPACE_RE.search("".join(col.tolist())):
        return col  # fast path: no whitespace anywhere
    stripped = col.str.strip()
    changed = stripped.ne(col).to_numpy()
    if changed.any():
        log.warning(
            "%s: %d %s value(s) had surrounding whitespace, stripped (first: line %s, %r)",
            path,
            int(changed.sum()),
            name,
            _first_lines(changed, 1),
            col[changed].iloc[0],
        )
    return stripped


def _first_problem(values: pd.Series, path, problem) -> None:
    """Raise for the first value where problem(value) says why it is bad (slow path)."""
    for k, v in enumerate(values.tolist()):
        why = problem(v)
        if why:
            raise LandmarksError(f"{path}: line {k + 2}: {why}")


def check_ids(ids: pd.Series, path, min_len: int = 1) -> None:
    """Every id follows the id rule and is unique; LandmarksError naming the first bad line."""
    lens = np.fromiter(map(len, ids.tolist()), np.int64, len(ids))
    if not (
        len(ids) and lens.min() >= min_len and lens.max() <= ID_MAX_LEN and _ID_RE.fullmatch("".join(ids.tolist()))
    ):  # all characters allowed: each id is fine
        _first_problem(ids, path, lambda v: id_problem(v, min_len))
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise LandmarksError(
            f"{path}: line {_first_lines(dup)}: duplicate id {ids[dup].iloc[0]!r} ({int(dup.sum())} duplicates in all)"
        )


def labels_to_int(labels: pd.Series, path) -> np.ndarray:
    """Checked landmark_id texts -> int64 (exact: the rule admits only canonical integers < 2**63)."""
    lens = np.fromiter(map(len, labels.tolist()), np.int64, len(labels))
    joined = "".join(labels.tolist())
    if (
        len(labels)
        and lens.min() >= 1
        and lens.max() <= 19
        and joined.isascii()
        and joined.isdigit()
        and all(int(v) <= LABEL_MAX for v in labels[lens == 19])
    ):
        values = labels.astype(np.int64).to_numpy()
        if (1 + np.searchsorted(_POW10, values, side="right") == lens).all():  # no leading zeros
            return values
    _first_problem(labels, path, label_problem)
    raise AssertionError("labels_to_int: no bad label found")  # pragma: no cover


def load_split(data_dir: str | Path, split: str) -> pd.DataFrame:
    """Ids and image paths of a split: columns id, path (+ landmark_id int64 for 'train')."""
    if split not in SPLITS:
        raise LandmarksError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    data_dir = Path(data_dir)
    path = data_dir / SPLITS[split]
    if not path.exists():
        hint = (
            "run `landmarks demo-data`, `landmarks import` or `landmarks holdout` to make one"
            if not data_dir.exists()
            else f"expected {SPLITS[split]} in it"
        )
        raise LandmarksError(f"{path} not found: {data_dir} is not a Kaggle-layout dataset ({hint})")
    header = read_header(path)
    need = ["id", "landmark_id"] if split == "train" else ["id"]
    for col in need:
        if col not in header:
            raise LandmarksError(f"{path}: missing column {col!r} (header: {','.join(header)})")
    try:
        df = pd.read_csv(
            path,
            usecols=[header.index(c) for c in need],
            dtype=object,
            encoding="utf-8-sig",
            keep_default_na=False,
            na_filter=False,
            engine="c",
            index_col=False,
        )
    except UnicodeDecodeError:
        raise LandmarksError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise LandmarksError(f"{path}: malformed CSV ({str(e).strip().splitlines()[0]})") from None
    df.columns = [header[i] for i in sorted(header.index(c) for c in need)]
    if len(df) == 0:
        raise LandmarksError(f"{path}: no rows after the header")
    ids = strip_column(_as_text(df["id"]), path, "id")
    check_ids(ids, path, IMAGE_ID_MIN_LEN)
    out = pd.DataFrame({"id": ids, "path": image_paths(data_dir, split, ids)})
    if split == "train":
        labels = strip_column(_as_text(df["landmark_id"]), path, "landmark_id")
        out["landmark_id"] = labels_to_int(labels, path)
    return out


def check_inputs(data_dir: str | Path, skip: str | None = None) -> None:
    """Read and check every input CSV of a dataset that is present (train, test, solution) before
    an expensive stage starts, so a broken file stops the run at once with a one-line error (a
    missing one is reported by the stage that needs it).  `skip`: a split the caller reads itself."""
    for split, name in SPLITS.items():
        if split != skip and (Path(data_dir) / name).exists():
            load_split(data_dir, split)
    load_solution(data_dir)


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
    """DATA/solution.csv as read_solution gives it, or None when absent."""
    path = Path(data_dir) / "solution.csv"
    if not path.exists():
        return None
    return read_solution(path)


# -- solution and submission CSVs (read by predict, validate and the scorer in metrics) ---------------
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
        raise LandmarksError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def csv_rows(path: str | Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
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
    header, rows = csv_rows(path)
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
        rid = checked_id(path, line, f[i_id], seen, warned)
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


def checked_id(path, line: int, raw: str, seen: dict, warned: set) -> str:
    """The id of one CSV row, stripped (warned once per file) and checked by the id rule of
    landmarks.datasets.data; invalid or repeated ids are errors naming the line."""
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
    header, rows = csv_rows(path)
    for col in ("id", "landmarks"):
        if col not in header:
            raise LandmarksError(f"{path}: missing column {col!r} (header: {','.join(header)}; expected id,landmarks)")
    i_id, i_lm = header.index("id"), header.index("landmarks")
    expected = None if expected_ids is None else set(map(str, expected_ids))
    ids, labels, confs, seen, warned = [], [], [], {}, set()
    for line, f in rows:
        if len(f) <= max(i_id, i_lm):
            f = f + [""] * (max(i_id, i_lm) + 1 - len(f))
        rid = checked_id(path, line, f[i_id], seen, warned)
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
                f"{path}: line {line}: landmarks {f[i_lm]!r} must be '<landmark_id> <confidence>' or empty"
            )
        ids.append(rid)
        labels.append(label)
        confs.append(conf)
    if expected is not None:
        missing = sorted(expected - set(seen))
        if missing:
            log.warning(
                "%s: %d test ids have no row (first: %s); counted as no prediction",
                path,
                len(missing),
                ", ".join(missing[:3]),
            )
            ids += missing
            labels += [""] * len(missing)
            confs += [math.nan] * len(missing)
    return pd.DataFrame(
        {
            "id": pd.Series(ids, dtype=object),
            "label": pd.Series(labels, dtype=object),
            "confidence": np.asarray(confs, dtype=np.float64),
        }
    )
