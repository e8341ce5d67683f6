"""Training: tiny backbone on a handful of generated images, checkpoints, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from landmarks.utils import LandmarksError

TRAIN = ("model.global_dim=32", "train.freeze_backbone=false")  # on top of SMALL


def _make_data(root: Path, classes=3, views=3, seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for c in range(classes):
        base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
        for v in range(views):
            img = np.asarray(Image.fromarray(base).resize((96, 80), Image.NEAREST)).astype(int)
            img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
            i = f"{c:x}{v:x}{rng.integers(0, 16**14):014x}"
            p = root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(p)
            rows.append((i, 1000 + c))
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    return root


def test_train_resume_and_export(tmp_path, small_cfg):
    from landmarks.delg.delg_io import load_delg
    from landmarks.delg.train import train

    data = _make_data(tmp_path / "data")
    work, out = tmp_path / "work", tmp_path / "model"
    assert train(small_cfg(*TRAIN), data, work, out, stop_after=2) is None  # "interrupted" after 2 steps
    state = json.loads((work / "train" / "state.json").read_text())
    assert state["step"] == 2 and not out.exists()
    assert (work / "train" / state["weights"]).exists()
    assert train(small_cfg(*TRAIN), data, work, out) == out
    state = json.loads((work / "train" / "state.json").read_text())
    assert state["step"] == 4 and state["resumed_from"] == [2]
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in state["history"])
    assert (work / "train" / "curves.png").stat().st_size > 1000
    assert json.loads((work / "train" / "labels.json").read_text()) == ["1000", "1001", "1002"]
    meta = json.loads((out / "landmarks_model.json").read_text())
    assert meta["kind"] == "trained" and meta["steps"] == 4 and meta["keypoint_score"] == "attention"
    o = load_delg(out)(np.full((96, 128, 3), 90, np.uint8), [1.0, 0.5], 20, 0.0, [0, 1])
    assert o["features"].shape[1] == 128 and o["features"].shape[0] <= 20
    assert o["global_descriptors"].shape == (2, 32)
    assert np.all(o["scores"] >= 0)  # softplus attention
    mtime = (out / "saved_model.pb").stat().st_mtime
    assert train(small_cfg(*TRAIN), data, work, out) == out  # rerun: nothing to train, export up to date
    assert (out / "saved_model.pb").stat().st_mtime == mtime
    # a changed config does not silently reuse the old checkpoint
    with pytest.raises(LandmarksError, match="--restart"):
        train(small_cfg(*TRAIN, "train.steps=6"), data, work, out)


def test_class_balanced_sampling():
    from landmarks.delg.train import sample_indices

    labels = np.array([0] * 90 + [1] * 10)
    bal = labels[sample_indices(labels, 4000, 0, True)]
    plain = labels[sample_indices(labels, 4000, 0, False)]
    assert 0.45 < bal.mean() < 0.55
    assert 0.07 < plain.mean() < 0.13
    assert np.array_equal(sample_indices(labels, 50, 3, True), sample_indices(labels, 50, 3, True))


def test_train_refuses_bad_input(tmp_path, small_cfg):
    from landmarks.delg.train import train

    data = _make_data(tmp_path / "data", classes=2, views=2)
    victim = next((data / "train").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(LandmarksError, match="missing"):
        train(small_cfg(*TRAIN), data, tmp_path / "w", tmp_path / "m")
    with pytest.raises(LandmarksError):
        train(small_cfg(*TRAIN), tmp_path / "nothing", tmp_path / "w", tmp_path / "m")


def test_train_and_extract_decode_exif_orientation_alike(tmp_path):
    """A photo stored sideways with an EXIF orientation tag: training's tf.data decode gives the
    same upright pixels as extraction (images.load_image), not the stored sideways array."""
    import tensorflow as tf
    from PIL import Image

    from landmarks.datasets.images import load_image
    from landmarks.delg.train import read_train_image

    rng = np.random.default_rng(0)
    stored = np.repeat(np.repeat(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8), 8, 0), 8, 1)  # 80x48 (w x h)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)

    train_img = read_train_image(tf.constant(str(path))).numpy()
    extract_img, scale = load_image(path)
    assert scale == 1.0 and train_img.shape == (80, 48, 3)  # upright: the tag is applied
    np.testing.assert_array_equal(train_img, extract_img)
    raw = tf.io.decode_image(tf.io.read_file(str(path)), channels=3).numpy()
    assert raw.shape == (48, 80, 3)  # what the former tf.io.decode_image pipeline trained on
