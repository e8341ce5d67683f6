import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from landmarks.cli import main
from landmarks.datasets import data, demo
from landmarks.evaluation import metrics
from landmarks.utils import LandmarksError


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_demo_layout_and_truth(tmp_path, small_cfg):
    out = demo.make_demo(small_cfg().demo, tmp_path / "demo")
    assert (out / ".complete").exists()
    tr, te = data.load_split(out, "train"), data.load_split(out, "test")
    assert len(tr) == 18 and tr["landmark_id"].nunique() == 6
    assert len(te) == 6 * 2 + 1 * 2 + 3
    assert data.check_images(tr) == [] and data.check_images(te) == []
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in tr["id"])
    sol = metrics.read_solution(out / "solution.csv")
    assert set(sol["id"]) == set(te["id"])
    empty = sol["landmarks"] == ""
    assert empty.sum() == 2 + 3  # unseen-landmark views + distractors
    assert set(sol.loc[~empty, "landmarks"].astype(int)) == set(tr["landmark_id"])
    im = Image.open(te["path"][0])
    assert im.format == "JPEG" and max(im.size) == 96
    # views of one landmark differ (random viewpoints), images are not blank
    a = np.asarray(Image.open(tr["path"][0]), np.float32)
    b = np.asarray(Image.open(tr["path"][1]), np.float32)
    assert a.std() > 5 and np.abs(a - b).mean() > 5
    meta = json.loads((out / "demo.json").read_text())
    assert meta["counts"]["test_nonlandmark"] == 5 and len(meta["landmarks"]) == 7


def test_demo_deterministic_and_skips(tmp_path, caplog, small_cfg):
    a = demo.make_demo(small_cfg().demo, tmp_path / "a")
    b = demo.make_demo(small_cfg("demo.jobs=2").demo, tmp_path / "b")
    assert _digests(a) == _digests(b)
    stamp_time = (a / ".complete").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        demo.make_demo(small_cfg().demo, a)
    assert (a / ".complete").stat().st_mtime_ns == stamp_time and "skipping" in caplog.text
    c = demo.make_demo(small_cfg("demo.seed=4").demo, a)  # changed config -> rebuilt in place
    assert _digests(c) != _digests(b)


def test_demo_refuses_foreign_dir(tmp_path, small_cfg):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(LandmarksError, match="not a demo dataset"):
        demo.make_demo(small_cfg().demo, tmp_path)


def test_demo_cli(tmp_path):
    out = tmp_path / "cli"
    sets = [
        "--set",
        "demo.num_landmarks=2",
        "--set",
        "demo.views_per_landmark=2",
        "--set",
        "demo.num_distractors=1",
        "--set",
        "demo.unseen_landmarks=0",
        "--set",
        "demo.image_size=80",
        "--set",
        "demo.jobs=1",
    ]
    assert main(["demo-data", "--out", str(out)] + sets) == 0
    assert len(data.load_split(out, "train")) == 4


def test_families_share_style_but_differ_in_layout():
    """Family members have near-identical colour statistics (confusing a pooled descriptor) yet differ pixelwise."""

    def hist(im):
        a = np.asarray(im.resize((64, 48))).reshape(-1, 3) // 64
        h = np.bincount(a[:, 0] * 16 + a[:, 1] * 4 + a[:, 2], minlength=64).astype(float)
        return h / h.sum()

    scenes = {}
    for f in range(4):
        style = demo._family_style(0, f)
        for i in range(2):
            scenes[f, i] = demo._scene(style, demo._rng(0, f"t{f}/{i}"), 160)
    within = [np.abs(hist(scenes[f, 0]) - hist(scenes[f, 1])).sum() for f in range(4)]
    across = [np.abs(hist(scenes[f, 0]) - hist(scenes[g, 0])).sum() for f in range(4) for g in range(f + 1, 4)]
    assert max(within) < min(across)
    for f in range(4):
        a, b = (np.asarray(scenes[f, i], np.float32) for i in range(2))
        assert a.shape == b.shape and np.abs(a - b).mean() > 10
