"""Property-based tests (hypothesis) of the CSV readers, the id and label rules, the submission
writer and the GAP reader: arbitrary text, quoting, BOM, CRLF, other encodings, huge and negative
numbers, duplicate ids.  Every input gives the correct result or a one-line LandmarksError."""

from __future__ import annotations

import csv
import io
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from landmarks import predict
from landmarks.datasets import data
from landmarks.evaluation import metrics
from landmarks.utils import LandmarksError

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

valid_ids = st.from_regex(r"[A-Za-z0-9_-]{3,12}", fullmatch=True)
any_text = st.text(st.characters(codec="utf-8"), max_size=10)
pad = st.sampled_from(["", " ", "\t", "  ", "\u3000"])
padded_ids = st.tuples(pad, valid_ids, pad).map("".join)
ids_any = st.one_of(
    valid_ids, padded_ids, any_text, st.sampled_from(["../abc", "/etc/x", "a/b/c", "abc\x00", "..", "abc.jpg", "ab"])
)
labels_ok = st.integers(0, 2**63 - 1).map(str)
labels_any = st.one_of(
    labels_ok,
    st.integers(-(2**70), 2**70).map(str),
    any_text,
    st.sampled_from(["inf", "-inf", "nan", "1e3", "12.0", "007", "+5", "-0", " 5 ", "0x1f", ""]),
)
quoting = st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC])
newline = st.sampled_from(["\n", "\r\n"])


def _csv_bytes(rows, quote, nl, bom, encoding="utf-8") -> bytes:
    buf = io.StringIO()
    csv.writer(buf, quoting=quote, lineterminator=nl).writerows(rows)
    return (("\ufeff" if bom else "") + buf.getvalue()).encode(encoding)


def _one_line(e: Exception) -> None:
    assert "\n" not in str(e) and str(e), repr(e)


class _Dir:
    """A temporary dataset folder per example (pytest's tmp_path is per test, not per example)."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="lm-prop-"))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


# -- id and label rules ---------------------------------------------------------------------------
@SETTINGS
@given(ids_any)
def test_id_rule_and_image_paths_stay_inside(s):
    why = data.id_problem(s, 3)
    if why is None:
        assert s.isascii() and 3 <= len(s) <= data.ID_MAX_LEN and all(c.isalnum() or c in "_-" for c in s)
        p = data.image_path("D", "test", s)
        assert p.parent.parent.parent.parent == Path("D/test") and p.name == f"{s}.jpg"
    else:
        _one_line(LandmarksError(why))
        with pytest.raises(LandmarksError):
            data.image_path("D", "test", s)


@SETTINGS
@given(st.integers(-(2**80), 2**80))
def test_label_rule_on_integers(n):
    ok = data.label_problem(str(n)) is None
    assert ok == (0 <= n < 2**63)


@SETTINGS
@given(labels_any)
def test_accepted_labels_round_trip_exactly(s):
    if data.label_problem(s) is None:
        assert str(int(s)) == s and 0 <= int(s) < 2**63


# -- data.load_split ----------------------------------------------------------------------------
@SETTINGS
@given(
    rows=st.lists(st.tuples(ids_any, labels_any, any_text), min_size=1, max_size=6),
    quote=quoting,
    nl=newline,
    bom=st.booleans(),
)
def test_train_csv_any_text(rows, quote, nl, bom):
    """Arbitrary ids and labels: a one-line error, or exactly the stripped ids and int labels."""
    with _Dir() as d:
        (d / "train.csv").write_bytes(_csv_bytes([("id", "landmark_id", "url")] + rows, quote, nl, bom))
        try:
            df = data.load_split(d, "train")
        except LandmarksError as e:
            _one_line(e)
            event("error")
            return
    event("read")
    assert df["id"].tolist() == [r[0].strip() for r in rows]
    assert df["landmark_id"].tolist() == [int(r[1].strip()) for r in rows]
    assert df["id"].is_unique and all(data.id_problem(i, 3) is None for i in df["id"])


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(padded_ids, labels_ok, any_text.filter(lambda t: "\r" not in t)),
        min_size=1,
        max_size=6,
        unique_by=lambda r: r[0].strip(),
    ),
    quote=quoting,
    nl=newline,
    bom=st.booleans(),
    url_first=st.booleans(),
)
def test_train_csv_valid_rows_are_read_exactly(rows, quote, nl, bom, url_first):
    """Valid ids (whitespace-padded), labels up to 2**63-1, any quoting, CRLF, BOM, column order."""
    header = ["url", "id", "landmark_id"] if url_first else ["id", "landmark_id", "url"]
    body = [(u, i, lab) if url_first else (i, lab, u) for i, lab, u in rows]
    with _Dir() as d:
        (d / "train.csv").write_bytes(_csv_bytes([header] + body, quote, nl, bom))
        df = data.load_split(d, "train")
        assert df["id"].tolist() == [r[0].strip() for r in rows]
        assert [str(v) for v in df["landmark_id"]] == [r[1] for r in rows]
        assert all(p.startswith(str(d / "train") + "/") for p in df["path"])


byte_pieces = st.one_of(
    st.binary(max_size=6),
    valid_ids.map(str.encode),
    valid_ids.map(str.encode),
    st.sampled_from([b"\n", b"\r\n", b"\r", b",", b'"', b"\xef\xbb\xbf", b"\x00", b" ", b"\xff"]),
)


@SETTINGS
@given(st.lists(byte_pieces, max_size=12).map(b"".join))
def test_any_bytes_as_sample_submission(raw):
    with _Dir() as d:
        (d / "sample_submission.csv").write_bytes(b"id,landmarks\n" + raw)
        try:
            df = data.load_split(d, "test")
        except LandmarksError as e:
            _one_line(e)
            event("error")
            return
        event("read")
        assert df["id"].is_unique and all(data.id_problem(i, 3) is None for i in df["id"])


@SETTINGS
@given(
    ids=st.lists(valid_ids, min_size=1, max_size=5, unique=True),
    enc=st.sampled_from(["latin-1", "utf-16"]),
    extra=st.text(st.characters(min_codepoint=0xA0, max_codepoint=0xFF), min_size=1, max_size=3),
)
def test_other_encodings_are_one_line_errors(ids, enc, extra):
    with _Dir() as d:
        rows = [("id", "landmarks")] + [(i + extra if k == 0 else i, "") for k, i in enumerate(ids)]
        (d / "sample_submission.csv").write_bytes(_csv_bytes(rows, csv.QUOTE_MINIMAL, "\n", False, enc))
        with pytest.raises(LandmarksError) as e:
            data.load_split(d, "test")
        _one_line(e.value)


# -- GAP reader -----------------------------------------------------------------------------------
@SETTINGS
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(valid_ids, padded_ids, ids_any),
            st.one_of(
                st.just(""),
                labels_any,
                st.tuples(st.one_of(labels_ok, labels_any), st.one_of(st.floats(), st.floats(-9, 9), any_text)).map(
                    lambda t: f"{t[0]} {t[1]}"
                ),
            ),
        ),
        max_size=6,
    ),
    quote=quoting,
    nl=newline,
    bom=st.booleans(),
)
@example(rows=[("", "")], quote=csv.QUOTE_MINIMAL, nl="\n", bom=False)  # ',' was skipped as a blank line
def test_submission_reader_any_text(rows, quote, nl, bom):
    with _Dir() as d:
        p = d / "sub.csv"
        p.write_bytes(_csv_bytes([("id", "landmarks")] + rows, quote, nl, bom))
        try:
            df = metrics.read_submission(p)
        except LandmarksError as e:
            _one_line(e)
            event("error")
            return
    event("read")
    assert df["id"].tolist() == [r[0].strip() for r in rows] and df["id"].is_unique
    for lab, conf, (_, text) in zip(df["label"], df["confidence"], rows):
        parts = text.split()
        assert (lab, math.isnan(conf)) == ("", True) if not parts else (lab == parts[0] and conf == float(parts[1]))


truth = st.lists(labels_ok, max_size=2).map(" ".join)


@SETTINGS
@given(
    table=st.dictionaries(
        valid_ids,
        st.tuples(truth, st.one_of(st.none(), st.tuples(labels_ok, st.floats(-1e6, 1e6, allow_nan=False)))),
        min_size=1,
        max_size=8,
    ),
    quote=quoting,
    nl=newline,
    bom=st.booleans(),
    dropped=st.integers(0, 3),
)
def test_gap_from_files_equals_gap_from_frames(table, quote, nl, bom, dropped):
    """score_files reads back exactly what score() gets in memory; every test id counted once."""
    ids = list(table)
    sol_rows = [(i, t) for i, (t, _) in table.items()]
    preds = {i: p for i, (_, p) in table.items() if p is not None}
    sub_rows = [(i, f"{p[0]} {p[1]!r}" if p else "") for i, p in ((i, preds.get(i)) for i in ids)]
    sub_rows = sub_rows[: max(0, len(sub_rows) - dropped)]  # missing rows count as no prediction
    with _Dir() as d:
        (d / "solution.csv").write_bytes(_csv_bytes([("id", "landmarks")] + sol_rows, quote, nl, bom))
        (d / "sub.csv").write_bytes(_csv_bytes([("id", "landmarks")] + sub_rows, quote, nl, bom))
        got = metrics.score_files(d / "solution.csv", d / "sub.csv")
        sub = metrics.read_submission(d / "sub.csv", expected_ids=ids)
    assert sorted(sub["id"]) == sorted(ids)
    kept = {r[0] for r in sub_rows}
    frame = pd.DataFrame(
        [(i, p[0], p[1]) for i, p in preds.items() if i in kept], columns=["id", "label", "confidence"]
    )
    sol = pd.DataFrame(sol_rows, columns=["id", "landmarks"])
    assert got["gap"] == pytest.approx(metrics.gap(sol, frame), abs=1e-12)
    assert 0.0 <= got["gap"] <= 1.0 and got["n_test"] == len(ids)


# -- submission writer ----------------------------------------------------------------------------
label_values = st.one_of(
    st.none(),
    st.just(predict.NO_LABEL),
    st.integers(0, 2**63 - 1),
    labels_ok,
    labels_ok,
    st.integers(-(2**64), 2**64),
    labels_any,
)
conf_values = st.one_of(st.floats(-1e9, 1e9), st.floats(-1e9, 1e9), st.floats())


@SETTINGS
@given(
    expected=st.lists(st.one_of(valid_ids, valid_ids, valid_ids, ids_any), min_size=1, max_size=6),
    picks=st.lists(st.tuples(st.integers(0, 6), label_values, conf_values), max_size=6, unique_by=lambda t: t[0]),
)
def test_submission_writer(expected, picks):
    """One row per expected id, in order, exactly once; labels written exactly; or a one-line error."""
    test_ids = [expected[k] if k < len(expected) else f"zz{k}zz" for k, _, _ in picks]
    labels = [lab for _, lab, _ in picks]
    conf = [c for _, _, c in picks]
    with _Dir() as d:
        try:
            out = predict.write_submission(d / "sub.csv", test_ids, labels, conf, expected)
        except LandmarksError as e:
            _one_line(e)
            assert not (d / "sub.csv").exists()
            event("error")
            return
        event("written")
        back = metrics.read_submission(out, expected_ids=expected)
        rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [r[0] for r in rows[1:]] == list(expected) == back["id"].tolist()
    pred = dict(zip(test_ids, zip(labels, conf)))
    for i, lab, c in zip(back["id"], back["label"], back["confidence"]):
        want = pred.get(i, (None, 0.0))[0]
        if want is None or want == predict.NO_LABEL or (isinstance(want, str) and not want.strip()):
            assert lab == "" and math.isnan(c)
        else:
            assert lab == str(want).strip() and c == pytest.approx(float(pred[i][1]), abs=1e-6)
            assert data.label_problem(lab) is None
    assert np.isfinite(back["confidence"].dropna()).all()
