"""Shared fixtures. Test files take these as arguments and never import from each other.

- `small_cfg(*overrides)`: a Config loaded (and checked) as `landmarks --set ...` does, with the
  cheap SMALL settings (tiny images, tiny models, one job) and then `overrides` ('section.key=value').
- `fake_model`: the tiny deterministic DELG-signature SavedModel of tests/fake_delg.py, built once.
- `write_split(root, split, n, rng, bad=True)`: n small random JPEGs in the Kaggle layout, the last
  five broken in five ways (missing, empty, truncated, text, 5x5) unless `bad=False`; their ids.
- `make_dataset(tmp_path, ...)`: a Kaggle-layout dataset dir (CSVs, no images) and a work dir with
  one stored global-feature shard per split: test images near their class, distractors in a cluster.
- `planted_pair(rng, ...)`: local features of a query and a train image sharing features related by
  the homography `PLANTED_H`, and of an unrelated image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/fake_delg.py, whatever the import mode

# Cheap settings for every test that runs a stage: tiny images and models, few steps, one job.
SMALL = (
    "extract.max_image_size=64",  # test images are 96 px: keypoints must be mapped back
    "extract.max_feature_num=50",
    "extract.intra_op_threads=1",
    "extract.jobs=1",
    "verify.jobs=1",
    "model.backbone=tiny",
    "model.init=random",
    "train.batch_size=4",
    "train.crop_size=64",
    "train.checkpoint_every=2",
    "train.steps=4",
    "adapt.batch_size=2",
    "adapt.crop_size=64",
    "adapt.max_side=128",
    "adapt.checkpoint_every=2",
    "adapt.steps=4",
    "adapt.hidden=16",
    "demo.seed=3",
    "demo.num_landmarks=6",
    "demo.views_per_landmark=3",
    "demo.test_views_per_landmark=2",
    "demo.unseen_landmarks=1",
    "demo.num_distractors=3",
    "demo.image_size=96",
    "demo.families=2",
    "demo.jobs=1",
)

PLANTED_H = np.array([[0.9, 0.1, 20.0], [-0.05, 1.1, -10.0], [2e-4, 1e-4, 1.0]])


@pytest.fixture(scope="session")
def small_cfg():
    """small_cfg(*overrides) -> Config: SMALL, then `overrides`, loaded and checked by load_config."""
    from landmarks.config import load_config

    return lambda *overrides: load_config(None, [*SMALL, *overrides])


@pytest.fixture(scope="session")
def fake_model(tmp_path_factory):
    from fake_delg import build_fake_delg

    return build_fake_delg(tmp_path_factory.mktemp("model") / "fake_delg")


# -- images ----------------------------------------------------------------------------------------
def _write_split(root, split, n, rng, bad=True):
    from PIL import Image

    from landmarks.datasets.data import image_path

    ids = [f"{rng.integers(0, 2**63):016x}" for _ in range(n)]
    for k, i in enumerate(ids):
        p = image_path(root, split, i)
        p.parent.mkdir(parents=True, exist_ok=True)
        w, h = (96, 72) if k % 2 == 0 else (72, 96)
        small = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(p, quality=92)
    if bad:  # the last five images are broken in five different ways
        image_path(root, split, ids[-1]).unlink()  # missing
        image_path(root, split, ids[-2]).write_bytes(b"")  # zero bytes
        d = image_path(root, split, ids[-3]).read_bytes()
        image_path(root, split, ids[-3]).write_bytes(d[: len(d) // 2])  # truncated
        image_path(root, split, ids[-4]).write_text("hello\n" * 50)  # text named .jpg
        Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(image_path(root, split, ids[-5]))  # 5x5
    return ids


@pytest.fixture(scope="session")
def write_split():
    return _write_split


# -- stored global features ------------------------------------------------------------------------
def _make_dataset(tmp_path, n_classes=4, per_class=3, n_distract=3, dim=16, seed=0):
    from landmarks.store import write_shard

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))

    def unit(a):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    tr = unit(np.repeat(centres, per_class, 0) + 0.3 * rng.normal(size=(n_classes * per_class, dim)))
    tr_ids = [f"tr{i:04d}" for i in range(len(tr))]
    tr_lab = np.repeat(np.arange(100, 100 + n_classes), per_class)
    te = unit(centres + 0.4 * rng.normal(size=(n_classes, dim)))
    prod = unit(rng.normal(size=(1, dim)) + 0.2 * rng.normal(size=(n_distract, dim)))
    te_ids = [f"te{i:04d}" for i in range(n_classes)] + [f"dx{i:04d}" for i in range(n_distract)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("id,landmark_id\n" + "".join(f"{i},{lab}\n" for i, lab in zip(tr_ids, tr_lab)))
    sample = te_ids[::-1] + ["fail0001"]
    (data / "sample_submission.csv").write_text("id,landmarks\n" + "".join(f"{i},\n" for i in sample))
    (data / "solution.csv").write_text(
        "id,landmarks\n"
        + "".join(f"{i},{100 + n if i.startswith('te') else ''}\n" for n, i in enumerate(te_ids))
        + "fail0001,\n"
    )
    work = tmp_path / "work"
    write_shard(work / "features/train/shard-00000-of-00001.h5", tr_ids, tr, None)
    write_shard(
        work / "features/test/shard-00000-of-00001.h5",
        te_ids,
        np.concatenate([te, prod]),
        None,
        failures=[("fail0001", "unreadable image")],
    )
    return data, work


@pytest.fixture(scope="session")
def make_dataset():
    return _make_dataset


# -- local features ----------------------------------------------------------------------------------
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lf(kp, desc):
    from landmarks.store import LocalFeatures

    n = len(kp)
    return LocalFeatures(kp.astype(np.float32), desc.astype(np.float32), np.ones(n, np.float32), np.ones(n, np.float32))


def _planted_pair(rng, n=300, shared=120, dim=128, noise=0.05):
    kp_q = rng.uniform(0, 500, (n, 2))
    d_q = _unit(rng.normal(size=(n, dim)))
    pts = np.c_[kp_q[:shared], np.ones(shared)] @ PLANTED_H.T
    kp_t = np.concatenate(
        [pts[:, :2] / pts[:, 2:] + rng.normal(0, 0.5, (shared, 2)), rng.uniform(0, 500, (n - shared, 2))]
    )
    d_t = np.concatenate(
        [_unit(d_q[:shared] + noise * rng.normal(size=(shared, dim))), _unit(rng.normal(size=(n - shared, dim)))]
    )
    perm = rng.permutation(n)
    other = _lf(rng.uniform(0, 500, (n, 2)), _unit(rng.normal(size=(n, dim))))
    return _lf(kp_q, d_q), _lf(kp_t[perm], d_t[perm]), other


@pytest.fixture(scope="session")
def planted_pair():
    return _planted_pair
