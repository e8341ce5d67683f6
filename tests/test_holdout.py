import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks.cli import main
from landmarks.config import Config
from landmarks.datasets import data
from landmarks.datasets.holdout import make_holdout
from landmarks.evaluation import metrics
from landmarks.utils import LandmarksError


def _dataset(root, sizes, images=True, skip=()):
    """train.csv with sizes[c] images for class label c*10; tiny JPEGs unless images=False."""
    rows = []
    for c, n in enumerate(sizes):
        for j in range(n):
            rows.append((f"{c:04x}{j:04x}00000000", c * 10))
    df = pd.DataFrame(rows, columns=["id", "landmark_id"])
    root.mkdir(parents=True, exist_ok=True)
    df.assign(url="http://x").to_csv(root / "train.csv", index=False)
    if images:
        for k, i in enumerate(df["id"]):
            if i in skip:
                continue
            p = data.image_path(root, "train", i)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), k % 255, np.uint8)).save(p)
    return root


SIZES = [1, 2, 5, 5, 6, 8, 3, 4, 7, 9, 5, 4]


def test_holdout_split(tmp_path):
    src = _dataset(tmp_path / "src", SIZES)
    out = make_holdout(
        Config(),
        src,
        tmp_path / "h",
        test_images=10,
        nonlandmark_share=0.3,
        heldout_class_fraction=0.17,
        per_class_test=2,
        min_class_images=3,
        seed=5,
    )
    info = json.loads((out / "split.json").read_text())
    held = set(info["heldout_classes"])
    assert len(held) == 2
    tr, te = data.load_split(out, "train"), data.load_split(out, "test")
    sol = metrics.read_solution(out / "solution.csv")
    orig = pd.read_csv(src / "train.csv", dtype={"id": str})
    label = dict(zip(orig["id"], orig["landmark_id"]))
    assert len(te) == len(sol) == 10 and set(sol["id"]) == set(te["id"])
    assert not set(tr["id"]) & set(te["id"])
    assert not held & set(tr["landmark_id"])  # held-out classes removed from train
    emp = sol[sol["landmarks"] == ""]
    assert len(emp) == 3 and all(label[i] in held for i in emp["id"])
    seen = sol[sol["landmarks"] != ""]
    assert all(int(t) == label[i] for i, t in zip(seen["id"], seen["landmarks"]))
    counts = tr["landmark_id"].value_counts()
    for i in seen["id"]:
        assert counts[label[i]] >= 1  # >= 1 image stays in train
    small = {c * 10 for c, n in enumerate(SIZES) if n < 3} - held
    assert not small & {label[i] for i in seen["id"]}  # small classes stay whole
    for c in small:
        assert counts[c] == SIZES[c // 10]
    assert seen.merge(orig, on="id")["landmark_id"].value_counts().max() <= 2
    # images: train/ is one symlink to the source folder, test images linked one by one
    assert (out / "train").is_symlink()
    assert data.check_images(tr) == [] and data.check_images(te) == []
    assert Path(te["path"][0]).is_symlink()
    # deterministic per seed
    again = make_holdout(
        Config(),
        src,
        tmp_path / "h2",
        test_images=10,
        nonlandmark_share=0.3,
        heldout_class_fraction=0.17,
        per_class_test=2,
        min_class_images=3,
        seed=5,
    )
    assert (again / "solution.csv").read_bytes() == (out / "solution.csv").read_bytes()
    other = make_holdout(
        Config(),
        src,
        tmp_path / "h3",
        test_images=10,
        nonlandmark_share=0.3,
        heldout_class_fraction=0.17,
        per_class_test=2,
        min_class_images=3,
        seed=6,
    )
    assert (other / "solution.csv").read_bytes() != (out / "solution.csv").read_bytes()


def test_holdout_hardlinks_skip_missing(tmp_path, caplog):
    orig = _dataset(tmp_path / "probe", SIZES, images=False)
    ids = pd.read_csv(orig / "train.csv", dtype={"id": str})["id"]
    src = _dataset(tmp_path / "src", SIZES, skip=set(ids[::7]))
    with caplog.at_level("WARNING"):
        out = make_holdout(Config(), src, tmp_path / "h", link="hardlink", test_images=12, seed=1)
    info = json.loads((out / "split.json").read_text())["counts"]
    tr, te = data.load_split(out, "train"), data.load_split(out, "test")
    used = set(tr["id"]) | set(te["id"])
    assert info["missing_images"] == len(used & set(ids[::7])) > 0 and "source images missing" in caplog.text
    assert sorted(data.check_images(tr) + data.check_images(te)) == sorted(used & set(ids[::7]))
    present = [p for p in tr["path"] if os.path.exists(p)]
    assert present and os.stat(present[0]).st_nlink == 2 and not (out / "train").is_symlink()


def test_holdout_cli_distractors_and_rerun(tmp_path, capsys):
    src = _dataset(tmp_path / "src", SIZES)
    dis = tmp_path / "dis"
    dis.mkdir()
    for j in range(3):
        Image.fromarray(np.full((5, 5, 3), 100 + j, np.uint8)).save(dis / f"{j}.png")
    args = [
        "holdout",
        "--data-dir",
        str(src),
        "--out",
        str(tmp_path / "h"),
        "--test-images",
        "8",
        "--distractors",
        str(dis),
        "--seed",
        "2",
    ]
    assert main(args) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["distractors"] == 3 and counts["test_images"] == 11
    sol = metrics.read_solution(tmp_path / "h" / "solution.csv")
    assert (sol["landmarks"] == "").sum() == counts["test_nonlandmark"] >= 3
    mtime = (tmp_path / "h" / "split.json").stat().st_mtime_ns
    assert main(args) == 0 and (tmp_path / "h" / "split.json").stat().st_mtime_ns == mtime


def test_holdout_errors(tmp_path):
    src = _dataset(tmp_path / "src", SIZES, images=False)
    with pytest.raises(LandmarksError, match="must differ"):
        make_holdout(Config(), src, src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(LandmarksError, match="not empty"):
        make_holdout(Config(), src, busy)
    with pytest.raises(LandmarksError, match="train.csv not found"):
        make_holdout(Config(), tmp_path / "nothing", tmp_path / "o")


def test_holdout_large_csv_no_images(tmp_path):
    n = 300_000
    rng = np.random.default_rng(0)
    ids = np.char.mod("%016x", rng.integers(0, 2**62, n, dtype=np.int64))
    lab = (rng.pareto(1.0, n) * 10).astype(np.int64) % 20_000
    (tmp_path / "src").mkdir()
    pd.DataFrame({"id": ids, "landmark_id": lab}).to_csv(tmp_path / "src" / "train.csv", index=False)
    t = time.time()
    out = make_holdout(Config(), tmp_path / "src", tmp_path / "h", link="none", test_images=2000, seed=0)
    assert time.time() - t < 30
    c = json.loads((out / "split.json").read_text())["counts"]
    assert c["test_images"] == 2000 and c["test_nonlandmark"] == 400 and c["linked"] == 0
    assert c["train_images"] + c["test_images"] <= n
    assert not (out / "train").exists()
