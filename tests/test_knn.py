"""knn: faiss vs numpy neighbours, deterministic ties, DBA/QE, the run_knn stage."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks import knn, whiten
from landmarks.config import KnnConfig
from landmarks.store import load_npz, write_shard
from landmarks.utils import LandmarksError
from landmarks.utils.layout import WorkLayout
from plain import plain_config


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_faiss_and_numpy_give_same_neighbours():
    rng = np.random.default_rng(0)
    db, q = _unit(rng.normal(size=(500, 32))), _unit(rng.normal(size=(70, 32)))
    s1, i1 = knn.search(KnnConfig(index="exact", chunk_size=16), q, db, 10)
    s2, i2 = knn.search(KnnConfig(index="numpy", chunk_size=7), q, db, 10)
    assert s1.shape == (70, 10) and i1.dtype == np.int64
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    brute = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(i2, brute)
    assert np.all(np.diff(s1, axis=1) <= 1e-7)


def test_ties_resolve_by_index_in_both_backends():
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(20, 8)))
    db = np.concatenate([base, base[[3, 3, 7]], base]).astype(np.float32)  # exact duplicates
    q = base[[3, 7, 0]]
    # row 0's nearest other row is 13 (cosine 0.744, next 10 at 0.556), stored at 13 and 36
    nearest = 1 + int(np.argmax(base[1:] @ base[0]))
    assert nearest == 13
    for index in ("exact", "numpy"):
        s, i = knn.search(KnnConfig(index=index), q, db, 3)
        assert i[0].tolist() == [3, 20, 21], index  # four copies of row 3: lowest indices first
        assert i[1].tolist() == [7, 22, 30], index
        assert i[2].tolist() == [0, 23, 13], index  # two copies of row 0, then row 13's lower copy


def test_approximate_indexes_and_k_capping():
    rng = np.random.default_rng(2)
    db, q = _unit(rng.normal(size=(300, 16))), _unit(rng.normal(size=(20, 16)))
    _, exact = knn.search(KnnConfig(), q, db, 5)
    for cfg in (KnnConfig(index="hnsw"), KnnConfig(index="ivf", ivf_nlist=4, ivf_nprobe=4)):
        _, i = knn.search(cfg, q, db, 5)
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i, exact)]) > 0.9
    s, i = knn.search(KnnConfig(), q, db[:3], 10)
    assert i.shape == (20, 3)
    with pytest.raises(Exception, match="index"):
        knn.search(KnnConfig(index="bogus"), q, db, 3)
    with pytest.raises(Exception, match="sizes differ"):
        knn.search(KnnConfig(), q[:, :8], db, 3)


def test_dba_and_alpha_qe_pull_views_together():
    rng = np.random.default_rng(3)
    centres = _unit(rng.normal(size=(10, 64)))
    db = _unit(np.repeat(centres, 5, axis=0) + 0.25 * rng.normal(size=(50, 64)))
    q = _unit(centres + 0.35 * rng.normal(size=(10, 64)))
    db2 = knn.dba(db, 3, 3.0)
    assert np.allclose(np.linalg.norm(db2, axis=1), 1, atol=1e-5)
    labels = np.repeat(np.arange(10), 5)

    def intra(x):
        return np.mean([x[labels == c] @ x[labels == c].T for c in range(10)])

    assert intra(db2) > intra(db)
    s, i = knn.search(KnnConfig(), q, db, 5)
    q2 = knn.alpha_qe(q, db, s, i, 2, 3.0)

    def own(qq):
        return np.mean(np.sum(qq * centres, axis=1))

    assert own(q2) > own(q)
    np.testing.assert_array_equal(knn.alpha_qe(q, db, s, i, 0, 3.0), q)


def _stores(tmp_path, n_train=30, n_test=8, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    tr = _unit(rng.normal(size=(n_train, dim)))
    te = _unit(tr[:n_test] + 0.1 * rng.normal(size=(n_test, dim)))
    write_shard(tmp_path / "features/train/shard-00000-of-00001.h5", [f"tr{i:03d}" for i in range(n_train)], tr, None)
    write_shard(
        tmp_path / "features/test/shard-00000-of-00001.h5",
        [f"te{i:03d}" for i in range(n_test)],
        te,
        None,
        failures=[("tebad", "unreadable")],
    )
    return tr, te


def _run_knn(cfg, root):
    work = WorkLayout(root)
    whiten.run_whiten(cfg, work.features("train"), work.whiten(cfg))
    return knn.run_knn(cfg, work.features("train"), work.features("test"), work.knn(cfg), work.whiten(cfg))


def test_run_knn_writes_and_skips(tmp_path):
    _stores(tmp_path)
    cfg = plain_config()
    cfg.knn.k = 5
    out = _run_knn(cfg, tmp_path)
    z = load_npz(out)
    assert z["idx"].shape == (8, 5) and list(z["test_ids"])[:2] == ["te000", "te001"]
    assert [z["train_ids"][j] for j in z["idx"][:, 0]] == [f"tr{i:03d}" for i in range(8)]
    mtime = out.stat().st_mtime_ns
    assert _run_knn(cfg, tmp_path) == out
    assert out.stat().st_mtime_ns == mtime  # up to date: skipped
    cfg.knn.k = 4
    out4 = _run_knn(cfg, tmp_path)
    assert out4 != out and load_npz(out4)["idx"].shape == (8, 4)  # another setting: its own file
    assert out.stat().st_mtime_ns == mtime  # the k=5 output stays beside it
    cfg.knn.chunk_size = 2  # runtime-only: same name, same content
    assert _run_knn(cfg, tmp_path) == out4


def test_run_knn_redoes_stale_output(tmp_path):
    """Same settings, other train features: the file's input fingerprint no longer matches."""
    tr, _ = _stores(tmp_path)
    cfg = plain_config()
    out = _run_knn(cfg, tmp_path)
    first = load_npz(out)["sims"]  # nearest train row of te<i> is tr<i>
    write_shard(
        tmp_path / "features/train/shard-00000-of-00001.h5",
        [f"tr{i:03d}" for i in range(len(tr))],
        _unit(tr[::-1].copy()),
        None,
    )
    assert _run_knn(cfg, tmp_path) == out
    z = load_npz(out)
    assert [z["train_ids"][j] for j in z["idx"][:, 0]] == [f"tr{len(tr) - 1 - i:03d}" for i in range(8)]
    assert not np.array_equal(z["sims"], first)


def test_run_knn_with_whitening_dba_qe(tmp_path):
    _stores(tmp_path, n_train=60, dim=16)
    cfg = plain_config()
    cfg.knn.k = 3
    cfg.knn.dba_k = 2
    cfg.knn.qe_k = 1
    cfg.whiten.global_pca = True
    z = load_npz(_run_knn(cfg, tmp_path))
    assert WorkLayout(tmp_path).whiten(cfg).exists()
    assert [z["train_ids"][j] for j in z["idx"][:, 0]] == [f"tr{i:03d}" for i in range(8)]


def test_knn_needs_the_whiten_stage_when_whitening_is_on(tmp_path):
    _stores(tmp_path, n_train=60, dim=16)
    cfg = plain_config()
    cfg.whiten.global_pca = True
    work = WorkLayout(tmp_path)
    with pytest.raises(LandmarksError, match="landmarks whiten"):
        knn.run_knn(cfg, work.features("train"), work.features("test"), work.knn(cfg), work.whiten(cfg))


def test_ivf_trains_on_a_sample_and_keeps_recall(monkeypatch):
    """k-means sees per_centroid x nlist rows (fixed sample), every row is still searchable."""
    rng = np.random.default_rng(9)
    centres = _unit(rng.normal(size=(60, 24)))
    db = _unit(centres[rng.integers(0, 60, 6000)] + 0.3 * rng.normal(size=(6000, 24)))
    q = _unit(centres[rng.integers(0, 60, 50)] + 0.3 * rng.normal(size=(50, 24)))
    sample = knn.ivf_sample(db, 16, 40)
    assert sample.shape == (640, 24) and np.array_equal(sample, knn.ivf_sample(db, 16, 40))
    assert knn.ivf_sample(db, 16, 0) is db and knn.ivf_sample(db, 200, 40) is db  # 0 = all; too few rows = all
    import faiss

    seen = []
    real = faiss.IndexIVFFlat.train
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: seen.append(len(x)) or real(self, x))
    cfg = KnnConfig(index="ivf", ivf_nlist=16, ivf_nprobe=8, ivf_train_per_centroid=40)
    _, i = knn.search(cfg, q, db, 20)
    _, exact = knn.search(KnnConfig(), q, db, 20)
    assert seen == [640]
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(i, exact)]) > 0.9


def test_auto_picks_exact_below_the_threshold_and_ivf_above():
    kc = KnnConfig(auto_exact_max=100)
    assert knn.choose_index(kc, 100) == "exact" and knn.choose_index(kc, 101) == "ivf"
    assert knn.choose_index(KnnConfig(index="hnsw", auto_exact_max=100), 5) == "hnsw"
    line = knn.describe_choice(kc, 10_000)
    assert (
        line.startswith("index ivf (auto: 10,000 train rows > knn.auto_exact_max 100") and "nlist 100 nprobe 64" in line
    )
    assert knn.describe_choice(kc, 50).startswith("index exact (auto: 50 train rows <= knn.auto_exact_max 100")


def test_exact_search_reads_the_matrix_without_an_index_copy(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "IndexFlatIP", lambda *a: (_ for _ in ()).throw(AssertionError("copied")))
    rng = np.random.default_rng(3)
    db, q = _unit(rng.normal(size=(200, 16))), _unit(rng.normal(size=(9, 16)))
    _, i = knn.search(KnnConfig(index="exact"), q, db, 7)
    np.testing.assert_array_equal(i, np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :7])
    knn.dba(db, 2, 3.0, KnnConfig(index="auto"))  # auto below the threshold: exact, no copy either


def test_file_backed_train_matrix_gives_the_in_memory_result(tmp_path, monkeypatch, caplog):
    """A train matrix over knn.max_in_memory_gb goes through a float32 file in blocks (exact
    search merged over blocks, DBA written to a second file): same neighbours as in memory."""
    rng = np.random.default_rng(4)
    tr = _unit(rng.normal(size=(300, 16)))
    te = _unit(tr[:20] + 0.2 * rng.normal(size=(20, 16)))
    order = rng.permutation(300)  # CSV order interleaved across two shards
    for s, rows in enumerate((order[:140], order[140:])):
        write_shard(
            tmp_path / f"features/train/shard-{s:05d}-of-00002.h5",
            [f"tr{i:03d}" for i in rows],
            tr[rows],
            None,
            order=rows,
        )
    write_shard(tmp_path / "features/test/shard-00000-of-00001.h5", [f"te{i:03d}" for i in range(20)], te, None)
    cfg = plain_config()
    cfg.knn.k, cfg.knn.dba_k, cfg.knn.qe_k = 10, 2, 1
    z1 = load_npz(_run_knn_at(cfg, tmp_path, "a"))
    monkeypatch.setattr(knn, "FILE_BLOCK", 64)
    monkeypatch.setattr(knn, "DBA_BLOCK", 50)
    cfg.knn.max_in_memory_gb = 1e-6
    with caplog.at_level("INFO", logger="landmarks.knn"):
        z2 = load_npz(_run_knn_at(cfg, tmp_path, "b"))
    assert "train matrix in a float32 file" in caplog.text and "index exact (auto" in caplog.text
    assert list(z1["train_ids"]) == list(z2["train_ids"]) == [f"tr{i:03d}" for i in range(300)]
    np.testing.assert_array_equal(z1["idx"], z2["idx"])
    np.testing.assert_allclose(z1["sims"], z2["sims"], atol=1e-6)
    assert not list((tmp_path / "b").glob(".*scratch*"))  # the scratch files are gone
    cfg.knn.auto_exact_max = 100  # above it: IVF, also file-backed (DBA probing every list: exact DBA)
    cfg.knn.dba_nprobe = 0
    with caplog.at_level("INFO", logger="landmarks.knn"):
        z3 = load_npz(_run_knn_at(cfg, tmp_path, "c"))
    assert "index ivf (auto: 300 train rows > knn.auto_exact_max 100" in caplog.text
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(z1["idx"], z3["idx"])]) > 0.9


def _run_knn_at(cfg, root, name):
    work = WorkLayout(root)
    return knn.run_knn(cfg, work.features("train"), work.features("test"), root / name / "knn.npz", None)


def test_store_writes_the_global_matrix_to_a_file_in_csv_order(tmp_path):
    from landmarks.store import FeatureStore

    rng = np.random.default_rng(5)
    x = _unit(rng.normal(size=(50, 8)))
    order = rng.permutation(50)
    write_shard(
        tmp_path / "shard-00000-of-00002.h5", [f"i{j}" for j in order[:20]], x[order[:20]], None, order=order[:20]
    )
    write_shard(
        tmp_path / "shard-00001-of-00002.h5", [f"i{j}" for j in order[20:]], x[order[20:]], None, order=order[20:]
    )
    store = FeatureStore(tmp_path)
    ids, mat = store.global_matrix()
    assert ids == [f"i{j}" for j in range(50)] and np.array_equal(mat, x) and store.global_shape() == (50, 8)
    ids2 = store.write_global_matrix(tmp_path / "m.f32", transform=lambda a: 2 * a[:, :4])
    assert ids2 == ids
    np.testing.assert_array_equal(np.fromfile(tmp_path / "m.f32", np.float32).reshape(50, 4), 2 * x[:, :4])


def test_ivf_lists_sized_once_search_like_add(monkeypatch):
    """The IVF index filled list by list (each list allocated at its final size) holds what
    index.add would: same neighbours and similarities, also when the rows come in blocks."""
    import faiss

    rng = np.random.default_rng(6)
    db, q = _unit(rng.normal(size=(3000, 16))), _unit(rng.normal(size=(40, 16)))
    cfg = KnnConfig(index="ivf", ivf_nlist=20, ivf_nprobe=5)
    monkeypatch.setattr(knn, "FILE_BLOCK", 700)
    ours = knn.Index(cfg, knn.Rows(db))
    assert ours.index.ntotal == 3000 and ours.index.invlists.compute_ntotal() == 3000
    ref = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 20, faiss.METRIC_INNER_PRODUCT)
    ref.train(knn.ivf_sample(db, 20, cfg.ivf_train_per_centroid))
    ref.add(db)
    ref.nprobe = 5
    s1, i1 = ours.raw_search(q, 30)
    s2, i2 = ref.search(q, 30)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_dba_probes_its_own_nprobe_and_says_so(monkeypatch):
    """knn.dba_nprobe (0 = ivf_nprobe, at most nlist) is the probe of DBA's index, not of the
    test queries'; the stage's choice line names it."""
    kc = KnnConfig(auto_exact_max=100, ivf_nlist=50, ivf_nprobe=40, dba_nprobe=3)
    assert knn.dba_nprobe(kc, 10_000) == 3
    assert knn.dba_nprobe(KnnConfig(ivf_nprobe=40, ivf_nlist=50, dba_nprobe=0), 10_000) == 40
    assert knn.dba_nprobe(KnnConfig(ivf_nlist=50), 10_000) == 2  # the default
    assert knn.dba_nprobe(KnnConfig(ivf_nlist=50, dba_nprobe=500), 10_000) == 50
    line = knn.describe_choice(kc, 10_000)
    assert "nlist 50 nprobe 40, DBA nprobe 3" in line
    assert "DBA" not in knn.describe_choice(KnnConfig(auto_exact_max=100, dba_k=0), 10_000)
    rng = np.random.default_rng(8)
    db = _unit(rng.normal(size=(400, 16)))
    built = []
    real_build = knn.Index._build

    def spy(self):
        index = real_build(self)
        built.append(index.nprobe)
        return index

    monkeypatch.setattr(knn.Index, "_build", spy)
    cfg = KnnConfig(index="ivf", ivf_nlist=10, ivf_nprobe=7, dba_nprobe=2)
    knn.dba(db, 2, 3.0, cfg)
    knn.search(cfg, db[:5], db, 10)
    assert built == [2, 7]  # DBA's index at dba_nprobe, the queries' at ivf_nprobe


def test_dba_through_ivf_at_full_probe_is_exact_dba():
    """With every list probed, DBA through IVF finds the exact neighbours: the same result."""
    rng = np.random.default_rng(9)
    db = _unit(np.repeat(rng.normal(size=(60, 16)), 5, axis=0) + 0.3 * rng.normal(size=(300, 16)))
    exact = knn.dba(db, 2, 3.0, KnnConfig(index="exact"))
    ivf = knn.dba(db, 2, 3.0, KnnConfig(index="ivf", ivf_nlist=12, dba_nprobe=12))
    np.testing.assert_allclose(ivf, exact, atol=1e-5)
    ie = knn.dba_neighbours(knn.Index(KnnConfig(index="exact"), knn.Rows(db)), db, np.arange(300), 2)[1]
    cfg = KnnConfig(index="ivf", ivf_nlist=12)
    ii = knn.dba_neighbours(knn.Index(cfg, knn.Rows(db), nprobe=12), db, np.arange(300), 2)[1]
    np.testing.assert_array_equal(ii, ie)
    assert not (ie == np.arange(300)[:, None]).any()  # self is never its own neighbour


@pytest.mark.parametrize("nprobe", [1, 2, 5])
def test_dba_list_by_list_is_the_ivf_search_result(nprobe):
    """DBA through IVF computes each list against all rows that probe it, one product per list:
    the same neighbours as searching every row through the index at that nprobe, the same DBA."""
    rng = np.random.default_rng(10)
    db = _unit(np.repeat(rng.normal(size=(80, 16)), 6, axis=0) + 0.4 * rng.normal(size=(480, 16)))
    cfg = KnnConfig(index="ivf", ivf_nlist=15, dba_nprobe=nprobe)
    index = knn.Index(cfg, knn.Rows(db), nprobe=nprobe)
    s1, i1 = knn.neighbours_by_list(index, 2, nprobe)
    s2, i2 = knn.dba_neighbours(index, db, np.arange(480), 2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    got = knn.dba(db, 2, 3.0, cfg)
    expect = knn.l2_normalize(db + np.einsum("nk,nkd->nd", np.clip(s2, 0, None) ** 3.0, knn.Rows(db).take(i2)))
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_dba_list_by_list_pads_short_lists():
    rng = np.random.default_rng(11)
    db = _unit(rng.normal(size=(220, 16)))
    few = knn.Index(KnnConfig(index="ivf", ivf_nlist=100, ivf_train_per_centroid=0), knn.Rows(db), nprobe=1)
    lists = few.index.quantizer.assign(db, 1).ravel()
    sizes = np.bincount(lists, minlength=100)[lists]
    valid = (knn.neighbours_by_list(few, 3, 1)[1] >= 0).sum(axis=1)
    np.testing.assert_array_equal(valid, np.minimum(3, sizes - 1))  # short lists: the rest is -1
    assert (sizes < 4).any()


@pytest.mark.parametrize("nprobe", [1, 3, 15])
def test_test_queries_list_by_list_are_the_ivf_search_result(nprobe):
    """knn.search through IVF scores each list against all the queries that probe it: the same
    neighbours (and similarities) as faiss's IVF search of each query at that nprobe, also where
    short lists leave fewer than k candidates."""
    rng = np.random.default_rng(12)
    db = _unit(np.repeat(rng.normal(size=(70, 16)), 6, axis=0) + 0.4 * rng.normal(size=(420, 16)))
    q = _unit(rng.normal(size=(90, 16)))
    cfg = KnnConfig(index="ivf", ivf_nlist=15, ivf_nprobe=nprobe)
    s1, i1 = knn.search(cfg, q, db, 40)
    s2, i2 = knn.Index(cfg, knn.Rows(db)).search(q, 40)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    if nprobe == 1:
        assert (i1 < 0).any() and np.isneginf(s1[i1 < 0]).all()  # short lists: the rest is missing
    if nprobe == 15:  # every list probed: exact search
        np.testing.assert_array_equal(i1, knn.search(KnnConfig(index="exact"), q, db, 40)[1])


def test_hnsw_built_in_blocks_into_storage_sized_once(monkeypatch, tmp_path):
    """HNSW from a file-backed matrix, block by block, into vectors allocated once at their
    final size: every row is there once, and the search finds the near-duplicates."""
    rng = np.random.default_rng(13)
    base = _unit(rng.normal(size=(200, 16)))
    db = _unit(np.concatenate([base, base + 0.01 * rng.normal(size=(200, 16))]))
    path = tmp_path / "db.f32"
    db.tofile(path)
    monkeypatch.setattr(knn, "FILE_BLOCK", 70)
    index = knn.Index(KnnConfig(index="hnsw"), knn.Rows(path=path, shape=db.shape))
    assert index.index.ntotal == 400
    stored = index.index.storage.reconstruct_n(0, 400)
    np.testing.assert_array_equal(stored, db)
    _, i = index.search(db[:200], 2)
    assert (i[:, 1] == np.arange(200) + 200).mean() > 0.95
