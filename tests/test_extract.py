"""landmarks.features: sharded, resumable extraction with a fake DELG model on a tiny dataset."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks.features import features_dir, run_features
from landmarks.local_features import ensure_local
from landmarks.store import FeatureStore
from landmarks.utils import LandmarksError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BAD = {"missing file", "empty file", "truncated", "not an image", "too small (5x5)"}


def _path(root, split, i):
    return root / split / i[0] / i[1] / i[2] / f"{i}.jpg"


@pytest.fixture
def dataset(tmp_path, write_split):
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    train = write_split(root, "train", 14, rng)
    test = write_split(root, "test", 9, rng)
    pd.DataFrame({"id": train, "landmark_id": np.arange(len(train)) % 3}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test, "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    return root, train, test


def _contents(paths):
    """Everything stored in a list of shards, as comparable numpy arrays."""
    out = {}
    for p in paths:
        with h5py.File(p, "r") as f:

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    out[f"{Path(p).name}/{name}"] = obj[()]

            f.visititems(visit)
            out[f"{Path(p).name}/fingerprint"] = f.attrs["fingerprint"]
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            assert np.array_equal(np.asarray(x), np.asarray(y)), k


def test_end_to_end_every_id_accounted_and_resume(dataset, tmp_path, fake_model, small_cfg):
    root, train, test = dataset
    work = tmp_path / "work"
    cfg = small_cfg()
    paths = run_features(cfg, root, work, fake_model, "train", shards=3, jobs=1)
    assert [p.name for p in paths] == [f"shard-{i:05d}-of-00003.h5" for i in range(3)]
    store = FeatureStore(features_dir(work, "train"))
    fails = store.failures()
    assert set(store.ids) | set(fails) == set(train) and not set(store.ids) & set(fails)
    assert set(fails) == set(train[-5:]) and set(fails.values()) == BAD
    assert store.ids == [i for i in train if i not in fails]  # contiguous CSV order
    ids, g = store.global_matrix()
    assert g.shape == (9, 48) and np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
    assert not store.local_ids()  # train: global only by default
    assert len({tuple(np.round(r, 4)) for r in g}) == len(ids)  # image-dependent

    tpaths = run_features(cfg, root, work, fake_model, "test", shards=2, jobs=1)
    tstore = FeatureStore(features_dir(work, "test"))
    assert set(tstore.ids) | set(tstore.failures()) == set(test)
    loc = tstore.local(tstore.ids)
    assert set(loc) == set(tstore.ids)
    for i, lf in loc.items():
        w, h = Image.open(_path(root, "test", i)).size
        assert 0 < len(lf) <= 50
        assert np.allclose(np.linalg.norm(lf.descriptors, axis=1), 1, atol=1e-2)
        # original pixels (the model saw a 64 px image): keypoints span beyond 64 but stay inside
        assert lf.keypoints[:, 0].max() <= w and lf.keypoints[:, 1].max() <= h
        assert max(lf.keypoints[:, 0].max(), lf.keypoints[:, 1].max()) > 64
        assert (w > h) == (lf.keypoints[:, 0].max() > lf.keypoints[:, 1].max())  # x is the width axis
        assert np.all(np.diff(lf.scores) <= 0)  # sorted by score as the model returned them

    # rerun: nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in paths + tpaths}
    assert run_features(cfg, root, work, fake_model, "train", shards=3, jobs=1) == paths
    run_features(cfg, root, work, fake_model, "test", shards=2, jobs=1)
    assert {p: p.stat().st_mtime_ns for p in paths + tpaths} == before


def test_config_change_and_reshard_invalidate(dataset, tmp_path, fake_model, small_cfg):
    root, train, _ = dataset
    work = tmp_path / "work"
    paths = run_features(small_cfg(), root, work, fake_model, "train", shards=2, jobs=1)
    fp = [h5py.File(p, "r").attrs["fingerprint"] for p in paths]
    # a setting that does not change results (jobs, prefetch) keeps the shards
    mtimes = [p.stat().st_mtime_ns for p in paths]
    run_features(small_cfg("extract.prefetch=5"), root, work, fake_model, "train", shards=2, jobs=2)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # a result-affecting setting redoes them
    run_features(small_cfg("extract.max_image_size=48"), root, work, fake_model, "train", shards=2, jobs=1)
    fp2 = [h5py.File(p, "r").attrs["fingerprint"] for p in paths]
    assert all(a != b for a, b in zip(fp, fp2))
    # another shard count removes the old files
    new = run_features(small_cfg("extract.max_image_size=48"), root, work, fake_model, "train", shards=3, jobs=1)
    assert sorted(p.name for p in features_dir(work, "train").glob("*.h5")) == [p.name for p in new]
    assert set(FeatureStore(features_dir(work, "train")).ids) == set(train[:-5])
    # a changed image file invalidates only its shard
    mt = [p.stat().st_mtime_ns for p in new]
    img = _path(root, "train", train[0])
    Image.fromarray(np.full((70, 90, 3), 77, np.uint8)).save(img)
    run_features(small_cfg("extract.max_image_size=48"), root, work, fake_model, "train", shards=3, jobs=1)
    after = [p.stat().st_mtime_ns for p in new]
    assert after[0] != mt[0] and after[1:] == mt[1:]


def test_killed_and_damaged_shards_are_redone(dataset, tmp_path, fake_model, small_cfg):
    root, _, _ = dataset
    work = tmp_path / "work"
    cfg = small_cfg()
    paths = run_features(cfg, root, work, fake_model, "train", shards=3, jobs=1)
    ref = _contents(paths)
    d = features_dir(work, "train")
    paths[1].unlink()
    (d / f".{paths[1].name}.12345.tmp").write_bytes(b"half written")  # killed mid-write
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # damaged file
    m0 = paths[0].stat().st_mtime_ns
    run_features(cfg, root, work, fake_model, "train", shards=3, jobs=1)
    assert not list(d.glob(".*.tmp"))
    assert paths[0].stat().st_mtime_ns == m0
    _assert_same(_contents(paths), ref)


def test_parallel_and_dask_give_identical_shards(dataset, tmp_path, fake_model, small_cfg):
    root, _, _ = dataset
    cfg = small_cfg()
    one = run_features(cfg, root, tmp_path / "w1", fake_model, "test", shards=3, jobs=1)
    two = run_features(cfg, root, tmp_path / "w2", fake_model, "test", shards=3, jobs=2)
    ref = _contents(one)
    _assert_same(_contents(two), ref)

    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        dk = run_features(cfg, root, tmp_path / "w3", fake_model, "test", shards=3, scheduler=cluster.scheduler_address)
    _assert_same(_contents(dk), ref)


def test_ensure_local_extracts_and_caches(dataset, tmp_path, fake_model, small_cfg):
    root, train, _ = dataset
    work = tmp_path / "work"
    cfg = small_cfg()
    run_features(cfg, root, work, fake_model, "train", shards=2, jobs=1)
    want = [train[0], train[3], train[-1]]  # the last one is a missing file: left alone
    store = ensure_local(cfg, root, work, fake_model, "train", want, jobs=1)
    assert store.local_ids() == {train[0], train[3]}
    caches = sorted(features_dir(work, "train").glob("local-cache-*.h5"))
    assert caches
    lf = store.local([train[0]])[train[0]]
    # same features as a test-style extraction of that image
    ref = run_features(cfg, root, tmp_path / "w2", fake_model, "train", shards=1, jobs=1, local=True)
    ref_lf = FeatureStore(ref[0].parent).local([train[0]])[train[0]]
    np.testing.assert_array_equal(lf.keypoints, ref_lf.keypoints)
    # second call: nothing new
    mt = [p.stat().st_mtime_ns for p in caches]
    store2 = ensure_local(cfg, root, work, fake_model, "train", want, jobs=1)
    assert sorted(features_dir(work, "train").glob("local-cache-*.h5")) == caches
    assert [p.stat().st_mtime_ns for p in caches] == mt
    assert store2.ids == store.ids  # caches do not duplicate global rows
    with pytest.raises(LandmarksError, match="not in the train split"):
        ensure_local(cfg, root, work, fake_model, "train", ["ffffffffffffffff"], jobs=1)
    # a model/config change drops caches made with the old one
    ensure_local(small_cfg("extract.max_feature_num=20"), root, work, fake_model, "train", [train[1]], jobs=1)
    assert not set(caches) & set(features_dir(work, "train").glob("local-cache-*.h5"))


def test_missing_model_is_a_clear_error(dataset, tmp_path, small_cfg):
    root, _, _ = dataset
    with pytest.raises(LandmarksError, match="not a SavedModel"):
        run_features(small_cfg(), root, tmp_path / "w", tmp_path / "nomodel", "train")


def test_cli_features(dataset, tmp_path, fake_model, capsys):
    from landmarks.cli import main

    root, _, test = dataset
    work = tmp_path / "work"
    rc = main(
        [
            "features",
            "--split",
            "test",
            "--shards",
            "2",
            "--jobs",
            "1",
            "--data-dir",
            str(root),
            "--work-dir",
            str(work),
            "--model",
            str(fake_model),
            "--set",
            "extract.max_image_size=64",
            "--no-local",
        ]
    )
    assert rc == 0
    store = FeatureStore(features_dir(work, "test"))
    assert set(store.ids) | set(store.failures()) == set(test) and not store.local_ids()
    assert (
        main(
            [
                "features",
                "--split",
                "test",
                "--data-dir",
                str(root),
                "--work-dir",
                str(work),
                "--model",
                str(tmp_path / "none"),
            ]
        )
        == 1
    )


@pytest.mark.skipif(not (SHARED / "paris6k_subset" / "LABELS.csv").exists(), reason="shared data absent")
def test_real_photos_from_shared_data(tmp_path, fake_model, small_cfg):
    labels = pd.read_csv(SHARED / "paris6k_subset" / "LABELS.csv").head(4)
    root = tmp_path / "data"
    ids = [f"{k:016x}" for k in range(1000, 1000 + len(labels))]
    for i, rel in zip(ids, labels["path"]):
        p = _path(root, "test", i)
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(SHARED / "paris6k_subset" / rel, p)
    pd.DataFrame({"id": ids, "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ids[:1], "landmark_id": [0]}).to_csv(
        root / "train.csv", index=False
    )  # inputs are checked together
    cfg = small_cfg("extract.max_image_size=256")
    run_features(cfg, root, tmp_path / "w", fake_model, "test", shards=1, jobs=1)
    store = FeatureStore(features_dir(tmp_path / "w", "test"))
    assert store.ids == ids and not store.failures()
    for i, lf in store.local(ids).items():
        w, h = Image.open(_path(root, "test", i)).size
        assert lf.keypoints[:, 0].max() <= w and lf.keypoints[:, 0].max() > 256 * 0.8


def test_model_loaded_once_per_process_and_empty_shards(dataset, tmp_path, fake_model, monkeypatch, small_cfg):
    import landmarks.delg.delg_io as delg_io
    from landmarks import features

    calls = []
    real = delg_io.load_delg
    monkeypatch.setattr(features, "load_delg", lambda p: calls.append(p) or real(p))  # where get_model calls it
    monkeypatch.setattr(features, "_MODELS", {})
    root, _, test = dataset
    paths = run_features(small_cfg(), root, tmp_path / "w", fake_model, "test", shards=12, jobs=1)  # 9 rows
    assert len(paths) == 9 and len(calls) == 1  # at most one shard per image; some of them empty
    store = FeatureStore(features_dir(tmp_path / "w", "test"))
    assert set(store.ids) | set(store.failures()) == set(test)
    ids, g = store.global_matrix()
    assert g.shape == (4, 48) and ids == store.ids


def test_shards_raised_to_bound_memory(dataset, tmp_path, fake_model, small_cfg):
    root, _, test = dataset
    paths = run_features(
        small_cfg("extract.max_shard_images=4"), root, tmp_path / "w", fake_model, "test", shards=1, jobs=1
    )
    assert [p.name for p in paths] == [f"shard-{i:05d}-of-00003.h5" for i in range(3)]  # 9 rows / 4
    assert set(FeatureStore(paths[0].parent).ids) | set(FeatureStore(paths[0].parent).failures()) == set(test)


def test_keypoints_outside_the_image_are_dropped_and_mapped_to_original_pixels():
    """Feature-map cells past the border have box centres off the image: they are dropped, the
    rest are mapped from resized to original pixels (scale = resized / original)."""
    from landmarks.features import inside_image
    from landmarks.store import LocalFeatures

    kp = np.array([[10, 10], [99, 49], [100, 20], [-1, 5], [50, 50], [30, 60]], np.float32)
    lf = LocalFeatures(kp, np.eye(6, 128, dtype=np.float32), np.ones(6, np.float32), np.arange(6, dtype=np.float32))
    out = inside_image(lf, (50, 100, 3), scale=0.5)  # resized image: 50 rows x 100 columns
    assert out.scores.tolist() == [0.0, 1.0]
    np.testing.assert_allclose(out.keypoints, [[20, 20], [198, 98]])
    assert out.descriptors.shape == (2, 128) and out.scales.shape == (2,)


def _counting_model(monkeypatch):
    """Wrap the per-process model so every image sent through it is recorded."""
    from landmarks import features

    calls = []
    real = features.get_model

    def get(model_dir, threads):
        m = real(model_dir, threads)
        return lambda image, *a: calls.append(image.shape) or m(image, *a)

    monkeypatch.setattr(features, "get_model", get)
    return calls


def test_incremental_append_and_remove_only_new_images_hit_the_model(
    tmp_path, fake_model, monkeypatch, write_split, small_cfg
):
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    ids = write_split(root, "train", 100, rng, bad=False)
    broken = ids[10]
    _path(root, "train", broken).write_bytes(b"")  # a stored failure is kept too, not retried
    csv = root / "train.csv"
    pd.DataFrame({"id": ids, "landmark_id": np.arange(100) % 5}).to_csv(csv, index=False)
    cfg, work = small_cfg(), tmp_path / "w"
    calls = _counting_model(monkeypatch)
    paths = run_features(cfg, root, work, fake_model, "train", shards=4, jobs=1)
    assert len(calls) == 99  # the empty file fails before the model
    ref_ids, ref_g = FeatureStore(paths[0].parent).global_matrix()

    # append 1 % (one row): only that image goes through the model, the CSV order is kept
    new = write_split(root, "train", 1, rng, bad=False)
    pd.DataFrame({"id": ids + new, "landmark_id": np.arange(101) % 5}).to_csv(csv, index=False)
    calls.clear()
    run_features(cfg, root, work, fake_model, "train", shards=4, jobs=1)
    assert len(calls) == 1
    store = FeatureStore(paths[0].parent)
    got_ids, got_g = store.global_matrix()
    assert got_ids == ref_ids + new and store.failures() == {broken: "empty file"}
    np.testing.assert_array_equal(got_g[:-1], ref_g)
    # the same set extracted from scratch: identical shards (kept rows = extracted rows)
    fresh = run_features(cfg, root, tmp_path / "w2", fake_model, "train", shards=4, jobs=1)
    _assert_same(_contents(paths), _contents(fresh))

    # remove rows (and change one image): only the changed image is extracted again
    keep = [i for k, i in enumerate(ids + new) if k % 10 != 3]
    Image.fromarray(np.full((70, 90, 3), 77, np.uint8)).save(_path(root, "train", keep[0]))
    pd.DataFrame({"id": keep, "landmark_id": np.arange(len(keep)) % 5}).to_csv(csv, index=False)
    calls.clear()
    run_features(cfg, root, work, fake_model, "train", shards=4, jobs=1)
    assert len(calls) == 1
    assert FeatureStore(paths[0].parent).ids == [i for i in keep if i != broken]
    # another model or result setting keeps nothing
    calls.clear()
    run_features(small_cfg("extract.max_image_size=48"), root, work, fake_model, "train", shards=4, jobs=1)
    assert len(calls) == len(keep) - 1


def test_shard_count_raised_by_the_cap_sticks_while_rows_grow_a_little(tmp_path, small_cfg):
    """Appending 1 % must not re-bucket every id: the count on disk stays within 1.25 x the cap."""
    from landmarks.features import sticky_shards
    from landmarks.store import write_shard

    cfg = small_cfg("extract.max_shard_images=4")
    d = tmp_path / "f"
    assert sticky_shards(d, 1, 3, 9, cfg) == 3  # nothing on disk: the capped count
    for i in range(3):
        write_shard(d / f"shard-{i:05d}-of-00003.h5", [], None, None, attrs={"num_shards": 3})
    assert sticky_shards(d, 1, 4, 13, cfg) == 3  # 13 rows <= 1.25 x 4 x 3: keep 3 shards
    assert sticky_shards(d, 1, 5, 17, cfg) == 5  # too many rows for 3 shards: re-bucket
    assert sticky_shards(d, 4, 4, 13, cfg) == 4  # an explicit --shards is obeyed


def test_progress_is_reported_per_image_and_cleaned_up(dataset, tmp_path, fake_model, monkeypatch, small_cfg):
    """Workers report their done-image count per image (a file beside the shard that the driver's bar
    reads, for joblib and Dask alike); nothing of it is left once the stage ends."""
    from landmarks import features, shards

    root, train, _ = dataset
    monkeypatch.setattr(features, "PROGRESS_REPORT_SECONDS", 0.0)
    seen = []
    real = features.run_model

    def spying(model, image, settings, local):
        (progress,) = (tmp_path / "w" / "features" / "train").glob(".shard-*.progress")
        seen.append(int(progress.read_text()))
        return real(model, image, settings, local)

    monkeypatch.setattr(features, "run_model", spying)
    run_features(small_cfg("extract.shards=1"), root, tmp_path / "w", fake_model, "train", jobs=1)
    assert seen == list(range(len(seen))) and len(seen) == len(train) - 5  # the five broken images never decode
    assert not list((tmp_path / "w" / "features" / "train").glob(".*progress*"))
    # the driver's watcher sums what running tasks report
    task = features.ShardTask.__new__(features.ShardTask)
    task.out = str(tmp_path / "shard-x.h5")
    shards.progress_path(task.out).write_text("7")
    bar = type("Bar", (), {"n": 0, "total": 100, "refresh": lambda self: None})()
    watcher = shards.ProgressWatcher([task], bar)
    assert watcher._running_count() == 7
    watcher.finished({"n": 10, "path": task.out})
    assert bar.n == 10 and watcher._running_count() == 0
