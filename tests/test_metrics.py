import math

import pandas as pd
import pytest

from landmarks.cli import main
from landmarks.evaluation import metrics
from landmarks.utils import LandmarksError

TRUTH = {
    "id_001": "123",
    "id_002": "",
    "id_003": "999",
    "id_004": "123",
    "id_005": "999",
    "id_006": "888",
    "id_007": "666",
    "id_008": "666",
    "id_009": "",
    "id_010": "666",
}
PREDS = {
    "id_001": ("123", 0.15),
    "id_002": ("123", 0.10),
    "id_003": ("999", 0.30),
    "id_005": ("999", 0.40),
    "id_007": ("555", 0.60),
    "id_008": ("666", 0.70),
    "id_010": ("666", 0.99),
}


def _sol():
    return pd.DataFrame({"id": list(TRUTH), "landmarks": list(TRUTH.values())})


def _pred(preds=PREDS):
    return pd.DataFrame(
        {"id": list(preds), "label": [v[0] for v in preds.values()], "confidence": [v[1] for v in preds.values()]}
    )


def _write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def _files(tmp_path):
    sol = _write(tmp_path, "solution.csv", "id,landmarks\n" + "".join(f"{k},{v}\n" for k, v in TRUTH.items()))
    sub = _write(
        tmp_path,
        "sub.csv",
        "id,landmarks\n" + "".join(f"{k},{PREDS[k][0]} {PREDS[k][1]}\n" if k in PREDS else f"{k},\n" for k in TRUTH),
    )
    return sol, sub


def test_worked_example():
    assert metrics.gap(_sol(), _pred()) == pytest.approx(0.5479166667, abs=1e-9)


def test_worked_example_from_files(tmp_path, capsys):
    sol, sub = _files(tmp_path)
    s = metrics.score(metrics.read_solution(sol), metrics.read_submission(sub))
    assert s["gap"] == pytest.approx(0.5479166667, abs=1e-9)
    assert s["n_test"] == 10 and s["n_landmark"] == 8 and s["n_nonlandmark"] == 2 and s["n_predicted"] == 7
    assert s["accuracy"] == pytest.approx(5 / 8)
    # lowest correct confidence is 0.15; the non-landmark id_002 got 0.10 -> not confident-wrong
    assert s["confident_wrong_nonlandmark"] == 0
    assert main(["gap", "--solution", str(sol), "--submission", str(sub)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GAP 0.547917"
    assert out[1].startswith("accuracy 0.625000")


def test_perfect_and_empty():
    perfect = {k: (v, 0.5) for k, v in TRUTH.items() if v}
    assert metrics.gap(_sol(), _pred(perfect)) == pytest.approx(1.0)
    assert metrics.gap(_sol(), _pred({})) == 0.0
    # predicting everything correctly except the non-landmarks scored above: precision drops
    worse = dict(perfect, id_002=("123", 0.9))
    s = metrics.score(_sol(), _pred(worse))
    assert s["gap"] < 1.0 and s["confident_wrong_nonlandmark"] == 1


def test_ties_are_broken_by_id():
    sol = pd.DataFrame({"id": ["a", "b"], "landmarks": ["1", "2"]})
    # same confidence: 'a' (wrong) ranks first -> P(2)=1/2 for the correct 'b'
    pred = pd.DataFrame({"id": ["b", "a"], "label": ["2", "9"], "confidence": [0.5, 0.5]})
    assert metrics.gap(sol, pred) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "body,needle",
    [
        ("id,landmarks\nid_001,123 0.5\nid_xyz,1 0.2\n", "line 3: unknown id"),
        ("id,landmarks\nid_001,123 0.5\nid_001,1 0.2\n", "line 3: duplicate id"),
        ("id,landmarks\nid_001,123 0.5\nid_003,999 high\n", "line 3: confidence 'high'"),
        ("id,landmarks\nid_001,123\n", "line 2: landmarks"),
        ("id,landmarks\nid_001,123 nan\n", "line 2: confidence"),
        ("id,predictions\nid_001,123 0.5\n", "missing column 'landmarks'"),
        ("", "empty file"),
    ],
)
def test_malformed_submission(tmp_path, body, needle):
    p = _write(tmp_path, "bad.csv", body)
    with pytest.raises(LandmarksError, match=needle):
        metrics.read_submission(p, expected_ids=list(TRUTH))


def test_non_utf8_submission(tmp_path):
    p = _write(tmp_path, "bad.csv", b"id,landmarks\nid_001,123 0.5\nid_\xe9\xff,1 0.2\n")
    with pytest.raises(LandmarksError, match="line 3: not UTF-8"):
        metrics.read_submission(p)


def test_missing_ids_are_no_prediction(tmp_path):
    p = _write(tmp_path, "sub.csv", "id,landmarks\nid_010,666 0.99\n")
    sub = metrics.read_submission(p, expected_ids=list(TRUTH))
    assert (
        len(sub) == 10
        and sub["label"].eq("").sum() == 9
        and math.isnan(sub.set_index("id").loc["id_001", "confidence"])
    )


def test_official_format_multi_id_and_ignored(tmp_path, capsys):
    sol = _write(
        tmp_path,
        "solution.csv",
        (
            "id,landmarks,Usage\n"
            "a,1 2,Public\n"  # multi-id truth: either label is correct
            "b,,Public\n"  # non-landmark
            "c,3,Private\n"
            "d,4,Ignored\n"  # not scored
            "e,5,Private\n"
        ),
    )
    df = metrics.read_solution(sol)
    assert list(df["id"]) == ["a", "b", "c", "e"] and df.attrs["ignored_ids"] == ["d"]
    sub = _write(tmp_path, "sub.csv", "id,landmarks\na,2 0.9\nb,7 0.8\nc,3 0.7\nd,4 0.95\ne,9 0.6\n")
    s = metrics.score_files(sol, sub)
    # ranking a(ok) b(x) c(ok) e(x): (1 + 2/3) / 3 landmarks
    assert s["gap"] == pytest.approx((1 + 2 / 3) / 3)
    assert s["gap_public"] == pytest.approx(1.0)  # a correct, b wrong after it
    assert s["gap_private"] == pytest.approx(0.5)  # c correct, e wrong
    assert s["confident_wrong_nonlandmark"] == 1
    assert main(["gap", "--solution", str(sol), "--submission", str(sub)]) == 0
    out = capsys.readouterr().out
    assert "GAP Public 1.000000" in out and "GAP Private 0.500000" in out


def test_solution_errors(tmp_path):
    with pytest.raises(LandmarksError, match="line 3: duplicate id"):
        metrics.read_solution(_write(tmp_path, "s.csv", "id,landmarks\na,1\na,2\n"))
    with pytest.raises(LandmarksError, match="missing column 'id'"):
        metrics.read_solution(_write(tmp_path, "s2.csv", "image,landmarks\na,1\n"))
    with pytest.raises(LandmarksError, match="line 2: unknown Usage"):
        metrics.read_solution(_write(tmp_path, "s3.csv", "id,landmarks,Usage\na,1,Secret\n"))
