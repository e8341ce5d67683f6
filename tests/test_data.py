from pathlib import Path

import pytest

from landmarks.datasets import data
from landmarks.utils import LandmarksError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ds(
    tmp_path,
    train="id,url,landmark_id\n0123456789abcdef,u,5\nfedcba9876543210,u,7\n",
    test="id,landmarks\naaaabbbbccccdddd,\n",
):
    if train is not None:
        (tmp_path / "train.csv").write_bytes(train.encode() if isinstance(train, str) else train)
    if test is not None:
        (tmp_path / "sample_submission.csv").write_text(test)
    return tmp_path


def test_image_path():
    assert data.image_path("D", "train", "0123456789abcdef") == Path("D/train/0/1/2/0123456789abcdef.jpg")


def test_load_train_and_test(tmp_path):
    d = _ds(tmp_path)
    tr = data.load_split(d, "train")
    assert list(tr.columns) == ["id", "path", "landmark_id"]
    assert str(tr["landmark_id"].dtype) == "int64" and tr["landmark_id"].tolist() == [5, 7]
    assert tr["path"][1] == str(data.image_path(d, "train", "fedcba9876543210"))
    te = data.load_split(d, "test")
    assert list(te.columns) == ["id", "path"] and te["path"][0].endswith("test/a/a/a/aaaabbbbccccdddd.jpg")


@pytest.mark.parametrize(
    "train,needle",
    [
        (None, "train.csv not found"),
        ("", "empty file"),
        ("id,url\nabc,u\n", "missing column 'landmark_id'"),
        ("landmark_id\n1\n", "missing column 'id'"),
        ("id,landmark_id\nabcd,1\nabce,2\nabcd,3\n", "line 4: duplicate id 'abcd'"),
        ("id,landmark_id\nabcd,1\nabce,x\n", "line 3: landmark_id 'x'"),
        ("id,landmark_id\n", "no rows"),
        (b"id,landmark_id\nab\xe9\xffcd,1\n", "not UTF-8"),
    ],
)
def test_load_errors(tmp_path, train, needle):
    d = _ds(tmp_path, train=train)
    with pytest.raises(LandmarksError, match=needle):
        data.load_split(d, "train")


def test_check_images_and_report(tmp_path):
    d = _ds(tmp_path)
    tr = data.load_split(d, "train")
    p = Path(tr["path"][0])
    p.parent.mkdir(parents=True)
    p.write_bytes(b"x")
    missing = data.check_images(tr)
    assert missing == ["fedcba9876543210"]
    assert data.missing_report(missing) == "1 images missing (first: fedcba9876543210)"
    assert data.missing_report(["a", "b", "c", "d"]) == "4 images missing (first: a, b, c)"


def test_load_solution(tmp_path):
    d = _ds(tmp_path)
    assert data.load_solution(d) is None
    (d / "solution.csv").write_text("id,landmarks\naaaabbbbccccdddd,5\n")
    assert data.load_solution(d)["landmarks"].tolist() == ["5"]


def test_large_csv_takes_the_vectorised_path(tmp_path, monkeypatch):
    """200,000 valid rows are checked and converted column-wise: the per-row checkers (the slow path
    that only runs to name the first bad line) are never called, and every value comes back exact."""
    import numpy as np

    n = 200_000
    ids = np.char.mod("%016x", np.random.default_rng(0).integers(0, 2**62, n, dtype=np.int64))
    labels = np.arange(n, dtype=np.int64) % 1000 * 9_009_009_009_009_009  # 1 to 19 digits, < 2**63
    with open(tmp_path / "train.csv", "w") as f:
        f.write("id,landmark_id\n")
        f.writelines(f"{i},{lab}\n" for i, lab in zip(ids.tolist(), labels.tolist()))
    last_path = str(data.image_path(tmp_path, "train", ids[-1]))

    def per_row(*args, **kwargs):
        raise AssertionError("a per-row check ran on valid input")

    for name in ("id_problem", "label_problem", "image_path", "_first_problem"):
        monkeypatch.setattr(data, name, per_row)
    df = data.load_split(tmp_path, "train")
    assert df["id"].tolist() == ids.tolist()
    assert df["landmark_id"].dtype == np.int64
    np.testing.assert_array_equal(df["landmark_id"].to_numpy(), labels)
    assert df["path"].iloc[-1] == last_path
