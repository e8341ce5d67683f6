"""store.load_index: one id index per stage, persisted beside the shards, invalidated by them."""

from __future__ import annotations

import os

import numpy as np

from landmarks import knn, store, verify
from landmarks.store import INDEX_NAME, FeatureStore, LocalFeatures, load_index, load_npz, write_shard
from landmarks.utils.layout import WorkLayout
from plain import plain_config


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lf(rng, n=40):
    return LocalFeatures(
        rng.uniform(0, 300, (n, 2)).astype(np.float32),
        _unit(rng.normal(size=(n, 16))),
        np.ones(n, np.float32),
        np.ones(n, np.float32),
    )


def test_index_persisted_ordered_and_invalidated(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    d = tmp_path / "train"
    # two id-hash shards whose rows interleave in CSV order
    write_shard(
        d / "shard-00000-of-00002.h5",
        ["b", "d"],
        _unit(rng.normal(size=(2, 4))),
        None,
        failures=[("x", "missing file")],
        order=[1, 3],
    )
    write_shard(d / "shard-00001-of-00002.h5", ["a", "c"], _unit(rng.normal(size=(2, 4))), None, order=[0, 2])
    builds = []
    real = store.StoreIndex.build
    monkeypatch.setattr(store.StoreIndex, "build", staticmethod(lambda *a: builds.append(1) or real(*a)))
    s = FeatureStore(d)
    assert s.ids == ["a", "b", "c", "d"] and s.failures() == {"x": "missing file"}
    ids, g = s.global_matrix()
    assert ids == s.ids and g.shape == (4, 4)
    assert (d / INDEX_NAME).exists() and len(builds) == 1
    FeatureStore(d)  # persisted: no second scan
    assert len(builds) == 1
    # a rewritten shard (atomic replace: new mtime) invalidates the persisted index
    st = (d / "shard-00001-of-00002.h5").stat()
    write_shard(d / "shard-00001-of-00002.h5", ["a", "c", "e"], _unit(rng.normal(size=(3, 4))), None, order=[0, 2, 4])
    os.utime(d / "shard-00001-of-00002.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert FeatureStore(d).ids == ["a", "b", "c", "d", "e"] and len(builds) == 2
    # a local cache file joins the index; its ids have local features
    write_shard(d / "local-cache-abc-00000-of-00001.h5", ["b"], _unit(rng.normal(size=(1, 4))), [_lf(rng)])
    s = FeatureStore(d)
    assert len(builds) == 3 and s.local_ids() == {"b"} and len(s.local(["b", "a"])["b"]) == 40
    # a damaged index file is rebuilt, not trusted
    (d / INDEX_NAME).write_bytes(b"junk")
    assert load_index(d).digest == s.index.digest and len(builds) == 4


def test_verify_builds_each_index_once_per_stage(tmp_path, monkeypatch):
    """Many batches, one index build per split (the rebuild per batch is gone)."""
    rng = np.random.default_rng(1)
    n_test, n_train = 3 * verify.BATCH_IMAGES + 5, 30
    tr_g, te_g = _unit(rng.normal(size=(n_train, 8))), _unit(rng.normal(size=(n_test, 8)))
    write_shard(
        tmp_path / "features/train/shard-00000-of-00001.h5",
        [f"tr{i}" for i in range(n_train)],
        tr_g,
        [_lf(rng) for _ in range(n_train)],
    )
    write_shard(
        tmp_path / "features/test/shard-00000-of-00001.h5",
        [f"te{i}" for i in range(n_test)],
        te_g,
        [_lf(rng) for _ in range(n_test)],
    )
    cfg = plain_config()
    cfg.knn.k = 5
    cfg.verify.num_to_rerank = 3
    work = WorkLayout(tmp_path)
    knn_path = knn.run_knn(cfg, work.features("train"), work.features("test"), work.knn(cfg))
    for split in ("train", "test"):  # knn built and persisted them: start from no index at all
        (tmp_path / "features" / split / INDEX_NAME).unlink()
    builds = []
    real = store.StoreIndex.build
    monkeypatch.setattr(store.StoreIndex, "build", staticmethod(lambda *a: builds.append(a[0]) or real(*a)))
    out = verify.run_verify(cfg, knn_path, work.features("test"), work.features("train"), tmp_path / "v.npz")
    assert sorted(p.name for p in builds) == ["test", "train"]  # 4 batches, one build per split
    assert not verify._STORES  # handles closed at the end of the stage
    first = load_npz(out)["inliers"]
    # the persisted indexes serve a second stage (here with 2 joblib workers) without a scan
    cfg.verify.jobs = 2
    out2 = verify.run_verify(cfg, knn_path, work.features("test"), work.features("train"), tmp_path / "v2.npz")
    assert len(builds) == 2
    np.testing.assert_array_equal(load_npz(out2)["inliers"], first)


def test_global_matrix_reads_a_sample_of_rows_shard_by_shard(tmp_path):
    """global_matrix(rows=...) is the full matrix's rows (CSV order, across shards written out of
    order), read without the rest: what whiten's seeded sample of a big split reads."""
    rng = np.random.default_rng(4)
    x = _unit(rng.normal(size=(90, 8)))
    ids = [f"id{i:03d}" for i in range(90)]
    order = rng.permutation(90)
    for s, part in enumerate(np.array_split(order, 3)):
        write_shard(tmp_path / f"shard-{s:05d}-of-00003.h5", [ids[i] for i in part], x[part], None, order=part)
    full_ids, full = FeatureStore(tmp_path).global_matrix()
    assert full_ids == ids and np.array_equal(full, x)
    rows = np.sort(rng.choice(90, 17, replace=False))
    got_ids, got = FeatureStore(tmp_path).global_matrix(rows=rows)
    assert got_ids == [ids[i] for i in rows] and np.array_equal(got, x[rows])
    assert FeatureStore(tmp_path).global_matrix(rows=np.arange(0))[1].shape == (0, 8)
