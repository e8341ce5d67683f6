"""Global retrieval: top-K train neighbours of every test image by cosine similarity.

Descriptors are unit rows, so cosine similarity is an inner product.  faiss does the search
(exact ``IndexFlatIP`` by default; IVF-Flat or HNSW for millions of train images); a numpy
fallback gives the same neighbours on small data.  Queries go in chunks so memory stays
bounded.  Rows of the result are ordered by similarity descending, ties by train index
ascending, so the output does not depend on the search backend's tie order.

Optional retrieval tricks (off by default): database-side augmentation (DBA) and alpha query
expansion (alpha-QE), Radenovic et al. / Gordo et al.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from landmarks import cache
from landmarks.store import SHARD_GLOB
from landmarks.utils import LandmarksError, l2_normalize

log = logging.getLogger("landmarks.knn")

INDEXES = ("exact", "ivf", "hnsw", "numpy")
NUMPY_BLOCK_FLOATS = 1 << 25  # similarity block budget of the numpy path (128 MiB of float32)
TIE_MARGIN = 16  # extra neighbours asked from faiss so boundary ties resolve by index


def _check(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.ascontiguousarray(queries, np.float32)
    db = np.ascontiguousarray(database, np.float32)
    if q.ndim != 2 or db.ndim != 2:
        raise LandmarksError(f"knn: queries and database must be 2-D (got {q.shape}, {db.shape})")
    if q.shape[0] and db.shape[0] and q.shape[1] != db.shape[1]:
        raise LandmarksError(f"knn: descriptor sizes differ: queries {q.shape[1]}, database {db.shape[1]}")
    if not (np.isfinite(q).all() and np.isfinite(db).all()):
        raise LandmarksError("knn: descriptors contain NaN or inf")
    return q, db


def _sort_rows(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (similarity desc, index asc) and keep k; invalid (-1) entries last."""
    s = np.where(idx < 0, -np.inf, sims).astype(np.float32)
    key_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key_idx, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(idx.astype(np.int64), order, 1)


def _numpy_topk(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one query block: matmul + argpartition, ties at the k-th value by index."""
    sims = q @ db.T
    n = db.shape[0]
    if k >= n:
        idx = np.broadcast_to(np.arange(n), sims.shape)
        return _sort_rows(sims, idx, k)
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, part, 1).min(axis=1)
    out_s = np.empty((q.shape[0], k), np.float32)
    out_i = np.empty((q.shape[0], k), np.int64)
    for r in range(q.shape[0]):
        cand = np.flatnonzero(sims[r] >= kth[r])  # ascending index: the tie-break
        order = np.lexsort((cand, -sims[r, cand]))[:k]
        out_i[r] = cand[order]
        out_s[r] = sims[r, out_i[r]]
    return out_s, out_i


def ivf_sample(db: np.ndarray, nlist: int, per_centroid: int, seed: int = 0) -> np.ndarray:
    """The rows IVF's k-means trains on: a fixed random sample of per_centroid x nlist rows (faiss
    recommends 30 to 256 per centroid; k-means on all 1.58 M rows cost more than exact search)."""
    want = int(per_centroid) * int(nlist)
    if per_centroid <= 0 or want >= db.shape[0]:
        return db
    rows = np.sort(np.random.default_rng(seed).choice(db.shape[0], want, replace=False))
    return np.ascontiguousarray(db[rows])


def _faiss_index(cfg, db: np.ndarray):
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise at INFO
    import faiss

    n, d = db.shape
    if cfg.index == "exact":
        index = faiss.IndexFlatIP(d)
    elif cfg.index == "ivf":
        nlist = cfg.ivf_nlist or max(1, int(np.sqrt(n)))  # sqrt(N): measured best at 1.58 M (README)
        nlist = min(nlist, n)
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(ivf_sample(db, nlist, cfg.ivf_train_per_centroid))
        index.nprobe = min(cfg.ivf_nprobe, nlist)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, int(cfg.hnsw_ef_construction))
    else:
        raise LandmarksError(f"knn.index must be one of {', '.join(INDEXES)} (got {cfg.index!r})")
    index.add(db)
    return index


def search(cfg, queries: np.ndarray, database: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database rows for each query by inner product.

    `cfg` is the KnnConfig.  Returns (sims [q, k] float32, idx [q, k] int64), k capped at the
    database size; rows sorted by similarity descending, ties by index ascending.
    """
    q, db = _check(queries, database)
    k = int(cfg.k if k is None else k)
    if k <= 0:
        raise LandmarksError(f"knn: k must be positive (got {k})")
    k = min(k, db.shape[0])
    nq = q.shape[0]
    if nq == 0 or k == 0:
        return np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
    chunk = max(1, int(cfg.chunk_size))
    sims = np.empty((nq, k), np.float32)
    idx = np.empty((nq, k), np.int64)
    if cfg.index == "numpy":
        chunk = max(1, min(chunk, NUMPY_BLOCK_FLOATS // max(1, db.shape[0])))
        for a in range(0, nq, chunk):
            sims[a : a + chunk], idx[a : a + chunk] = _numpy_topk(q[a : a + chunk], db, k)
        return sims, idx
    index = _faiss_index(cfg, db)
    kk = min(db.shape[0], k + TIE_MARGIN)
    if cfg.index == "hnsw":  # faiss's default efSearch (16) caps recall far below k=100
        index.hnsw.efSearch = max(int(cfg.hnsw_ef_search), 2 * kk)
    for a in range(0, nq, chunk):
        s, i = index.search(q[a : a + chunk], kk)
        sims[a : a + chunk], idx[a : a + chunk] = _sort_rows(s, i, k)
    return sims, idx


def _weighted_sum(base: np.ndarray, db: np.ndarray, sims: np.ndarray, idx: np.ndarray, alpha: float) -> np.ndarray:
    w = np.clip(sims, 0.0, None) ** alpha  # [n, k]
    w = np.where(idx < 0, 0.0, w).astype(np.float32)
    agg = np.einsum("nk,nkd->nd", w, db[np.clip(idx, 0, None)])
    return l2_normalize(base + agg)


def dba(db: np.ndarray, k: int, alpha: float = 3.0, cfg=None) -> np.ndarray:
    """Database-side augmentation: each row becomes the sim**alpha-weighted sum of itself and
    its k nearest other database rows, re-normalised (pulls views of one landmark together)."""
    from landmarks.config import KnnConfig

    db = np.ascontiguousarray(db, np.float32)
    if k <= 0 or db.shape[0] < 2:
        return db
    cfg = cfg or KnnConfig(index="exact")
    kk = min(k + 1, db.shape[0])
    out = np.empty_like(db)
    step = 65536
    for a in range(0, db.shape[0], step):
        s, i = search(cfg, db[a : a + step], db, kk)
        rows = np.arange(a, a + s.shape[0])[:, None]
        # drop self (whichever column it sits in), keep k others
        not_self = i != rows
        order = np.argsort(~not_self, axis=1, kind="stable")[:, : kk - 1]
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        out[a : a + s.shape[0]] = _weighted_sum(db[a : a + s.shape[0]], db, s, i, alpha)
    return out


def alpha_qe(
    queries: np.ndarray, db: np.ndarray, sims: np.ndarray, idx: np.ndarray, k: int, alpha: float = 3.0
) -> np.ndarray:
    """alpha query expansion: query + sum of its top-k database neighbours weighted by sim**alpha,
    re-normalised.  Search again with the result."""
    q = np.ascontiguousarray(queries, np.float32)
    if k <= 0 or q.shape[0] == 0:
        return q
    k = min(k, idx.shape[1])
    return _weighted_sum(q, np.ascontiguousarray(db, np.float32), sims[:, :k], idx[:, :k], alpha)


# -- stage -----------------------------------------------------------------------------------
def knn_fingerprint(cfg, train_features: Path, test_features: Path) -> str:
    """Inputs of the knn stage: both splits' shards and the knn + whiten settings."""
    shards = [cache.dir_fingerprint(d, SHARD_GLOB) for d in (train_features, test_features)]
    return cache.fingerprint("knn", cfg, shards)


def neighbours(cfg, train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sims, idx) [q, k] of the test rows against the train rows, with DBA and alpha-QE when on."""
    if cfg.knn.dba_k > 0:
        train = dba(train, cfg.knn.dba_k, cfg.knn.dba_alpha, cfg.knn)
    sims, idx = search(cfg.knn, test, train, cfg.knn.k)
    if cfg.knn.qe_k > 0 and test.shape[0]:
        test = alpha_qe(test, train, sims, idx, cfg.knn.qe_k, cfg.knn.qe_alpha)
        sims, idx = search(cfg.knn, test, train, cfg.knn.k)
    return sims, idx


def run_knn(
    cfg, train_features: str | Path, test_features: str | Path, out: str | Path, whiten_path: str | Path | None = None
) -> Path:
    """Stage: top-K train neighbours of every test image -> `out` (skipped when up to date).

    Reads the global descriptors of both feature directories (and the fitted whitening when
    whiten.global_pca is on).  Output npz: test_ids [q], train_ids [n], sims [q, K] f32,
    idx [q, K] i64 (row of train_ids; -1 = none), fingerprint.
    """
    from landmarks import whiten
    from landmarks.store import FeatureStore

    train_features, test_features, out = Path(train_features), Path(test_features), Path(out)
    fp = knn_fingerprint(cfg, train_features, test_features)
    if cache.up_to_date(out, fp):
        log.info("knn: %s is up to date", out)
        return out
    train_ids, train = FeatureStore(train_features).global_matrix()
    test_ids, test = FeatureStore(test_features).global_matrix()
    if not train_ids:
        raise LandmarksError(f"knn: no train global descriptors in {train_features}")
    w = whiten.load_whiten(cfg, whiten_path, train_features, "global")
    if w is not None:
        train, test = whiten.apply_global(w, train), whiten.apply_global(w, test)
    sims, idx = neighbours(cfg, train, test)
    cache.save_npz(
        out, fp, test_ids=np.array(test_ids, dtype=str), train_ids=np.array(train_ids, dtype=str), sims=sims, idx=idx
    )
    log.info("knn: %d test x %d train, k=%d -> %s", len(test_ids), len(train_ids), sims.shape[1], out)
    return out
