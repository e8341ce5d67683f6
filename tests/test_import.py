import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks.cli import main
from landmarks.config import Config
from landmarks.datasets import data
from landmarks.datasets.dataset_import import import_dataset
from landmarks.evaluation import metrics
from landmarks.utils import LandmarksError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _img(path, k, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(k).integers(0, 255, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, fmt)


def _labels_csv(root, classes, prefix="x"):
    """LABELS.csv with len(classes[c]) images per class; one PNG among them."""
    rows, k = [], 0
    for c, n in classes.items():
        for j in range(n):
            rel = f"imgs/{c}/{j}.{'png' if k == 1 else 'jpg'}"
            _img(root / rel, zlib.crc32(f"{prefix}/{c}/{j}".encode()), "PNG" if k == 1 else "JPEG")
            rows.append((f"{prefix}{k}", c, rel))
            k += 1
    p = root / "LABELS.csv"
    pd.DataFrame(rows, columns=["id", "landmark_id", "path"]).to_csv(p, index=False)
    return p


def _distractor_dir(root, n):
    for j in range(n):
        _img(root / f"d{j}.jpg", 10_000 + j)
    return root


def test_import_split(tmp_path):
    classes = {"a": 10, "b": 5, "c": 4, "d": 1, "e": 6}
    csv = _labels_csv(tmp_path / "set1", classes)
    tree = tmp_path / "set2"  # folder-per-class input
    for j in range(3):
        _img(tree / "f" / f"{j}.jpg", 500 + j)
    dis = _distractor_dir(tmp_path / "dis", 4)
    out = import_dataset(
        Config(),
        [csv, tree],
        tmp_path / "out",
        distractors=[dis],
        test_fraction=0.4,
        heldout_class_fraction=0.2,
        seed=1,
    )
    tr, te = data.load_split(out, "train"), data.load_split(out, "test")
    assert data.check_images(tr) == [] and data.check_images(te) == []
    sol = metrics.read_solution(out / "solution.csv")
    info = json.loads((out / "split.json").read_text())
    c = info["counts"]
    assert c["classes"] == 6 and c["heldout_classes"] == 1 and c["distractors"] == 4
    assert c["train_images"] == len(tr) and c["test_images"] == len(te) == len(sol)
    lm = pd.read_csv(out / "label_map.csv")
    held = set(lm.loc[lm["held_out"], "class"])
    assert held == set(info["heldout_classes"])
    # held-out classes are absent from train; every kept class keeps >= 1 train image
    kept = lm[~lm["held_out"]]
    assert (kept["n_train"] >= 1).all() and set(tr["landmark_id"]) == set(kept["landmark_id"])
    assert kept.set_index("class").loc["d", "n_test"] == 0 if "d" in kept["class"].values else True
    # truth: non-empty exactly for test images of kept classes
    assert (sol["landmarks"] != "").sum() == kept["n_test"].sum()
    assert (sol["landmarks"] == "").sum() == 4 + lm.loc[lm["held_out"], "n_test"].sum()
    # ids are content hashes; bytes kept as they are (the PNG stays a PNG named .jpg); hard links
    for p in tr["path"].tolist() + te["path"].tolist():
        b = Path(p).read_bytes()
        assert hashlib.sha1(b).hexdigest()[:16] == Path(p).stem
    assert any(Image.open(p).format == "PNG" for p in tr["path"].tolist() + te["path"].tolist())
    assert os.stat(tr["path"][0]).st_nlink == 2


def test_import_deterministic_and_rerun(tmp_path, caplog):
    csv = _labels_csv(tmp_path / "s", {"a": 8, "b": 8, "c": 8, "d": 8})
    a = import_dataset(Config(), [csv], tmp_path / "a", seed=3, link="copy")
    b = import_dataset(Config(), [csv], tmp_path / "b", seed=3, link="symlink")
    for f in ("train.csv", "solution.csv", "sample_submission.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    te = data.load_split(b, "test")
    assert Path(te["path"][0]).is_symlink()
    c = import_dataset(Config(), [csv], tmp_path / "c", seed=4, link="copy")
    assert (a / "solution.csv").read_bytes() != (c / "solution.csv").read_bytes()
    mtime = (a / "split.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        import_dataset(Config(), [csv], a, seed=3, link="copy")
    assert "up to date" in caplog.text and (a / "split.json").stat().st_mtime_ns == mtime


def test_import_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,landmark_id,path\nx,,a.jpg\n")
    with pytest.raises(LandmarksError, match="line 2: empty landmark_id"):
        import_dataset(Config(), [bad], tmp_path / "o")
    bad.write_text("id,path\nx,a.jpg\n")
    with pytest.raises(LandmarksError, match="missing column 'landmark_id'"):
        import_dataset(Config(), [bad], tmp_path / "o")
    with pytest.raises(LandmarksError, match="not found"):
        import_dataset(Config(), [tmp_path / "nope.csv"], tmp_path / "o")
    csv = _labels_csv(tmp_path / "s", {"a": 3})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(LandmarksError, match="not empty"):
        import_dataset(Config(), [csv], tmp_path / "busy")


def test_import_cli(tmp_path, capsys):
    csv = _labels_csv(tmp_path / "s", {"a": 4, "b": 4, "c": 4})
    dis = _distractor_dir(tmp_path / "dis", 2)
    assert (
        main(
            [
                "import",
                str(csv),
                "--distractors",
                str(dis),
                "--out",
                str(tmp_path / "o"),
                "--test-fraction",
                "0.5",
                "--heldout-class-fraction",
                "0",
                "--link",
                "copy",
            ]
        )
        == 0
    )
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["train_images"] == 6 and counts["test_images"] == 8 and counts["link"] == "copy"
    # --max-per-class: a seeded choice of at most N images per class (distractors all kept)
    args = ["import", str(csv), "--distractors", str(dis), "--test-fraction", "0.5", "--heldout-class-fraction", "0"]
    assert main([*args, "--out", str(tmp_path / "m"), "--max-per-class", "2", "--link", "copy"]) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["train_images"] == 3 and counts["test_images"] == 3 + 2, counts


@pytest.mark.skipif(not (SHARED / "paris6k_subset" / "LABELS.csv").exists(), reason="shared data absent")
def test_import_shared_paris(tmp_path):
    out = import_dataset(
        Config(),
        [SHARED / "paris6k_subset" / "LABELS.csv"],
        tmp_path / "paris",
        heldout_class_fraction=0.2,
        link="symlink",
    )
    c = json.loads((out / "split.json").read_text())["counts"]
    assert c["classes"] == 5 and c["heldout_classes"] == 1 and c["train_images"] > 100
    assert data.check_images(data.load_split(out, "test")) == []
