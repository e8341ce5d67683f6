"""Issue 21, round two of hostile inputs: damaged models, shard counts, splits where every image
fails, damaged shards, and things that are not image files where an image is expected.

Each case goes through `landmarks ...` (what `make` runs) where the exit code matters, and
asserts one error line and no traceback, or the same result as a clean run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from landmarks.datasets.data import image_path
from landmarks.datasets.images import ImageError, load_image
from landmarks.features import features_dir, run_features
from landmarks.store import FeatureStore
from landmarks.utils import LandmarksError


def _landmarks(*args, timeout=300):
    cmd = [sys.executable, "-m", "landmarks", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _error_line(r) -> str:
    """The run failed with exit 1 and one error line (info log lines may come before it), no traceback."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    return errors[0]


@pytest.fixture
def tiny(tmp_path, write_split):
    """A dataset of 6 good train and 6 good test images."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    train = write_split(root, "train", 6, rng, bad=False)
    test = write_split(root, "test", 6, rng, bad=False)
    pd.DataFrame({"id": train, "landmark_id": np.arange(6) % 2}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test, "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    return root, train, test


def _features(root, work, model, *extra):
    return _landmarks(
        "features", "--split", "test", "--data-dir", root, "--work-dir", work, "--model", model,
        "--set", "extract.max_image_size=64", "--set", "extract.intra_op_threads=1", *extra,
    )  # fmt: skip


# -- 3. a damaged model is one line: which model, what is wrong ---------------------------------------
def _damage(model: Path, how: str) -> None:
    var = model / "variables"
    data = next(var.glob("variables.data-*"))
    if how == "emptied variables.data":
        data.write_bytes(b"")
    elif how == "truncated variables.data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "bad variables.index":
        (var / "variables.index").write_bytes(os.urandom(2000))
    elif how == "missing saved_model.pb":
        (model / "saved_model.pb").unlink()
    elif how == "truncated saved_model.pb":
        pb = model / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[:1000])


@pytest.mark.parametrize(
    "how,needle,jobs",
    [
        ("emptied variables.data", "variables.data-00000-of-00001 is empty", 1),
        ("truncated variables.data", "variables.data-00000-of-00001 is truncated", 2),  # loky workers report it
        ("bad variables.index", "variables.index is damaged", 1),
        ("missing saved_model.pb", "no saved_model.pb", 1),
        ("truncated saved_model.pb", "saved_model.pb is damaged", 1),
    ],
)
def test_damaged_model_is_one_line(tiny, tmp_path, fake_model, how, needle, jobs):
    root, _, _ = tiny
    model = tmp_path / "model"
    shutil.copytree(fake_model, model)
    _damage(model, how)
    err = _error_line(_features(root, tmp_path / "work", model, "--jobs", jobs))
    assert str(model) in err and needle in err, err
    assert "model error" not in err  # a model problem, not a per-image failure


# -- 7. the shard count is capped by the image count ---------------------------------------------------
def test_shard_count_is_capped_by_the_image_count(tiny, tmp_path, fake_model):
    root, _, test = tiny
    r = _features(root, tmp_path / "work", fake_model, "--shards", 100000, "--jobs", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    shards = sorted(features_dir(tmp_path / "work", "test").glob("shard-*.h5"))
    assert len(shards) == len(test) and shards[0].name == f"shard-00000-of-{len(test):05d}.h5"
    assert sorted(FeatureStore(features_dir(tmp_path / "work", "test")).ids) == sorted(test)


# -- features exits non-zero when every image failed ---------------------------------------------------
def test_every_image_failed_is_a_failed_run(tiny, tmp_path, fake_model):
    root, _, test = tiny
    for i in test:
        image_path(root, "test", i).write_text("not a picture\n")
    work = tmp_path / "work"
    err = _error_line(_features(root, work, fake_model, "--jobs", 1))
    assert f"all {len(test)} images failed (not an image: {len(test)})" in err
    err = _error_line(_features(root, work, fake_model, "--jobs", 1))  # rerun: the shards are up to date
    assert f"all {len(test)} images failed" in err


# -- a damaged byte range inside a shard names the file ------------------------------------------------
def test_damaged_shard_rows_name_the_file(tiny, tmp_path, fake_model):
    root, _, _ = tiny
    work = tmp_path / "work"
    cfg_args = dict(shards=2, jobs=1)
    from landmarks.config import load_config

    cfg = load_config(None, ["extract.max_image_size=64", "extract.intra_op_threads=1"])
    for split in ("train", "test"):
        run_features(cfg, root, work, fake_model, split, **cfg_args)
    shard = sorted(features_dir(work, "train").glob("shard-*.h5"))[1]
    with h5py.File(shard, "r") as f:
        offset = f["global"].id.get_offset()
    with open(shard, "r+b") as fh:  # 0xff bytes decode to NaN: a damaged byte range inside the data
        fh.seek(offset + 4 * 10)
        fh.write(b"\xff" * 64)
    with pytest.raises(LandmarksError, match=f"{shard}: 1 global descriptor row"):
        FeatureStore(features_dir(work, "train")).global_matrix()
    # knn alone (no whiten stage run first): the learned whitening off
    r = _landmarks(
        "knn", "--data-dir", root, "--work-dir", work, "--model", fake_model, "--set", "whiten.global_lw=false"
    )
    err = _error_line(r)
    assert str(shard) in err and "NaN or inf" in err, err


# -- not an image file where an image is expected ------------------------------------------------------
def test_things_that_are_not_image_files_are_named(tiny, tmp_path, fake_model):
    """A FIFO (not opened: it would block), a folder, a device, a broken symlink, X.JPG for X.jpg."""
    root, _, test = tiny
    paths = [image_path(root, "test", i) for i in test]
    for p in paths[:5]:
        p.unlink()
    os.mkfifo(paths[0])
    paths[1].mkdir()
    paths[2].symlink_to("/dev/null")
    paths[3].symlink_to(tmp_path / "nowhere.jpg")
    (paths[4].parent / (paths[4].stem + ".JPG")).write_bytes(paths[5].read_bytes())
    r = _features(root, tmp_path / "work", fake_model, "--jobs", 1)
    assert r.returncode == 0, r.stderr[-2000:]  # one image is fine: a run with failures, not a failed run
    fails = FeatureStore(features_dir(tmp_path / "work", "test")).failures()
    assert fails[test[0]] == "a FIFO, not an image file"
    assert fails[test[1]] == "a directory, not an image file"
    assert fails[test[2]] == "a device, not an image file"
    assert fails[test[3]] == "broken symlink"
    assert fails[test[4]].startswith(
        f"missing file (found {test[4]}.JPG: ids and the .jpg extension are case-sensitive"
    )
    with pytest.raises(ImageError, match="a FIFO"):
        load_image(paths[0])
