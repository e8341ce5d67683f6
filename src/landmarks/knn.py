"""Global retrieval: top-K train neighbours of every test image by cosine similarity.

Descriptors are unit rows, so cosine similarity is an inner product.  faiss does the search:
``knn.index=auto`` (default) picks exact search up to ``knn.auto_exact_max`` train rows and
IVF-Flat above it (measured crossover, docs/performance-gldv2.md), for the test queries and for
DBA alike; ``exact``, ``ivf``, ``hnsw`` and ``numpy`` force one.  Exact search runs
``faiss.knn`` on the train matrix itself (no index copy).  A train matrix bigger than
``knn.max_in_memory_gb`` stays in a float32 file next to the output, read in blocks (DBA writes
its result to a second one), so the process holds one copy at most (the IVF index).  Queries
go in chunks so memory stays bounded.  Rows of the result are ordered by similarity descending,
ties by train index ascending, so the output does not depend on the search backend's tie order.

Optional retrieval tricks: database-side augmentation (DBA, on by default) and alpha query
expansion (alpha-QE, off), Radenovic et al. / Gordo et al.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from landmarks import whiten
from landmarks.config import KnnConfig
from landmarks.store import SHARD_GLOB, FeatureStore
from landmarks.utils import LandmarksError, cache, l2_normalize

log = logging.getLogger(__name__)

INDEXES = ("auto", "exact", "ivf", "hnsw", "numpy")
NUMPY_BLOCK_FLOATS = 1 << 25  # similarity block budget of the numpy path (128 MiB of float32)
TIE_MARGIN = 16  # extra neighbours asked from faiss so boundary ties resolve by index
FILE_BLOCK = 65_536  # rows per read of a file-backed matrix (335 MB at dim 1280)
DBA_BLOCK = 16_384  # DBA rows per step: their neighbours gathered at once (168 MB at k=2, dim 1280)


class Rows:
    """The database matrix: a float32 array in memory, or a raw float32 file of [n, d] read in
    blocks with plain reads (the page cache holds the file, this process holds one block)."""

    def __init__(self, array: np.ndarray | None = None, path: str | Path | None = None, shape=None):
        self.array = None if array is None else np.ascontiguousarray(array, np.float32)
        self.path = None if path is None else Path(path)
        if self.array is not None:
            self.n, self.d = self.array.shape
        else:
            self.n, self.d = (int(shape[0]), int(shape[1]))

    @property
    def nbytes(self) -> int:
        return self.n * self.d * 4

    def block(self, a: int, b: int) -> np.ndarray:
        """Rows a..b (a view when in memory)."""
        b = min(b, self.n)
        if self.array is not None:
            return self.array[a:b]
        with open(self.path, "rb") as f:
            f.seek(a * self.d * 4)
            return np.fromfile(f, np.float32, (b - a) * self.d).reshape(b - a, self.d)

    def blocks(self, step: int = FILE_BLOCK):
        for a in range(0, self.n, step):
            yield a, self.block(a, a + step)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows idx (any shape) -> [*idx.shape, d].  A file is read row by row with pread: a
        memory map would fault in the pages around each row too (1.2 GB more RSS for one DBA
        block's 32 k neighbours at 1.58 M x 1280)."""
        if self.array is not None:
            return self.array[idx]
        idx = np.asarray(idx, np.int64)
        uniq, inv = np.unique(idx.ravel(), return_inverse=True)
        out = np.empty((len(uniq), self.d), np.float32)
        size = self.d * 4
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, r in enumerate(uniq.tolist()):
                if os.preadv(fd, [out[j]], r * size) != size:
                    raise LandmarksError(f"knn: {self.path} is shorter than {self.n} rows")
        finally:
            os.close(fd)
        return out[inv].reshape(idx.shape + (self.d,))

    def materialize(self) -> np.ndarray:
        return self.array if self.array is not None else self.block(0, self.n)


class RowsWriter:
    """Builds a Rows block by block: into an array, or appended to a float32 file."""

    def __init__(self, n: int, d: int, path: str | Path | None = None):
        self.n, self.d, self.path = n, d, None if path is None else Path(path)
        self.array = np.empty((n, d), np.float32) if path is None else None
        self._f = None if path is None else open(self.path, "wb")
        self.filled = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, np.float32)
        if self._f is None:
            self.array[self.filled : self.filled + len(block)] = block
        else:
            self._f.write(block.tobytes())
        self.filled += len(block)

    def close(self) -> Rows:
        if self.filled != self.n:
            raise LandmarksError(f"knn: wrote {self.filled} of {self.n} rows")
        if self._f is None:
            return Rows(self.array)
        self._f.close()
        return Rows(path=self.path, shape=(self.n, self.d))


def as_rows(database) -> Rows:
    return database if isinstance(database, Rows) else Rows(np.asarray(database, np.float32))


def choose_index(cfg, n: int) -> str:
    """The index `cfg.index` means for n database rows: auto = exact up to auto_exact_max, else ivf."""
    if cfg.index not in INDEXES:
        raise LandmarksError(f"knn.index must be one of {', '.join(INDEXES)} (got {cfg.index!r})")
    if cfg.index != "auto":
        return cfg.index
    return "exact" if n <= int(cfg.auto_exact_max) else "ivf"


def ivf_nlist(cfg, n: int) -> int:
    nlist = cfg.ivf_nlist or max(1, int(np.sqrt(n)))  # sqrt(N): measured best at 1.58 M (README)
    return max(1, min(nlist, n))


def dba_nprobe(cfg, n: int) -> int:
    """IVF nprobe of DBA's neighbour search at n rows: knn.dba_nprobe (0 = knn.ivf_nprobe), at most nlist."""
    want = int(getattr(cfg, "dba_nprobe", 0)) or int(cfg.ivf_nprobe)
    return max(1, min(want, ivf_nlist(cfg, n)))


def describe_choice(cfg, n: int) -> str:
    """One line: which index the database of n rows gets, and why."""
    kind = choose_index(cfg, n)
    why = (
        f"auto: {n:,} train rows {'<=' if kind == 'exact' else '>'} knn.auto_exact_max {int(cfg.auto_exact_max):,}"
        if cfg.index == "auto"
        else "set by knn.index"
    )
    extra = ""
    if kind == "ivf":
        nlist = ivf_nlist(cfg, n)
        extra = f", IVF-Flat nlist {nlist} nprobe {min(cfg.ivf_nprobe, nlist)}"
        if int(getattr(cfg, "dba_k", 0)) > 0:
            extra += f", DBA nprobe {dba_nprobe(cfg, n)}"
    elif kind == "hnsw":
        extra = f", HNSW-Flat M {cfg.hnsw_m} efSearch >= {cfg.hnsw_ef_search}"
    return f"index {kind} ({why}{extra})"


def _check(queries: np.ndarray, db: Rows) -> np.ndarray:
    q = np.ascontiguousarray(queries, np.float32)
    if q.ndim != 2 or (db.array is not None and db.array.ndim != 2):
        raise LandmarksError(f"knn: queries and database must be 2-D (got {q.shape}, {(db.n, db.d)})")
    if q.shape[0] and db.n and q.shape[1] != db.d:
        raise LandmarksError(f"knn: descriptor sizes differ: queries {q.shape[1]}, database {db.d}")
    if not np.isfinite(q).all() or (db.array is not None and not np.isfinite(db.array).all()):
        raise LandmarksError("knn: descriptors contain NaN or inf")
    return q


def _sort_rows(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (similarity desc, index asc) and keep k; invalid (-1) entries last."""
    s = np.where(idx < 0, -np.inf, sims).astype(np.float32)
    key_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key_idx, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(idx.astype(np.int64), order, 1)


def sort_rows(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Public name of the result order (similarity desc, index asc, -1 last), for the bench."""
    return _sort_rows(sims, idx, k)


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


def ivf_sample(db, nlist: int, per_centroid: int, seed: int = 0) -> np.ndarray:
    """The rows IVF's k-means trains on: a fixed random sample of per_centroid x nlist rows (faiss
    recommends 30 to 256 per centroid; k-means on all 1.58 M rows cost more than exact search).
    `db`: an array (returned as it is when the sample would be all of it) or a Rows."""
    rows = db if isinstance(db, Rows) else None
    n = rows.n if rows is not None else db.shape[0]
    want = int(per_centroid) * int(nlist)
    if per_centroid <= 0 or want >= n:
        return rows.materialize() if rows is not None else db
    pick = np.sort(np.random.default_rng(seed).choice(n, want, replace=False))
    return rows.take(pick) if rows is not None else np.ascontiguousarray(db[pick])


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its AVX probing is noise at INFO
    import faiss

    return faiss


def _fill_ivf(index, db: Rows) -> None:
    """``index.add`` of every row, with each inverted list allocated once at its final size.

    add() grows the lists block by block (vector doubling): 11.2 GB peak RSS for the 8.1 GB of
    codes at 1.58 M x 1280.  Here a first pass assigns every row to its list, the lists are sized
    from the counts, and a second pass copies each row into place: the same lists in the same
    order (rows ascending) as add(), so the same search results, at the size of the codes."""
    faiss = _faiss()
    assign = np.empty(db.n, np.int64)
    for a, blk in db.blocks():
        assign[a : a + len(blk)] = index.quantizer.assign(blk, 1).ravel()
    counts = np.bincount(assign, minlength=index.nlist)
    inv = index.invlists
    for lst in np.flatnonzero(counts):
        inv.resize(int(lst), int(counts[lst]))
    filled = np.zeros(index.nlist, np.int64)
    for a, blk in db.blocks():
        lab = assign[a : a + len(blk)]
        order = np.argsort(lab, kind="stable")
        lists, starts = np.unique(lab[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        for lst, s0, s1 in zip(lists.tolist(), starts.tolist(), ends.tolist()):
            rows = order[s0:s1]
            ids = np.ascontiguousarray(rows + a, np.int64)
            codes = np.ascontiguousarray(blk[rows], np.float32).view(np.uint8)
            inv.update_entries(lst, int(filled[lst]), len(rows), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            filled[lst] += len(rows)
    index.ntotal = db.n


class Index:
    """A searchable database: `kind` exact / numpy search the Rows themselves (no copy; blocks of
    a file-backed matrix), ivf / hnsw build a faiss index from its blocks."""

    def __init__(self, cfg, db: Rows, kind: str | None = None, nprobe: int | None = None):
        self.cfg, self.db, self.nprobe = cfg, db, nprobe
        self.kind = kind or choose_index(cfg, db.n)
        self.index = None
        if self.kind in ("ivf", "hnsw"):
            self.index = self._build()
        elif self.kind not in ("exact", "numpy"):
            raise LandmarksError(f"knn.index must be one of {', '.join(INDEXES)} (got {self.kind!r})")

    def _build(self):
        faiss, cfg, db = _faiss(), self.cfg, self.db
        d = db.d
        if self.kind == "ivf":
            nlist = ivf_nlist(cfg, db.n)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(ivf_sample(db, nlist, cfg.ivf_train_per_centroid))
            index.nprobe = min(self.nprobe or cfg.ivf_nprobe, nlist)
            _fill_ivf(index, db)
            return index
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, int(cfg.hnsw_ef_construction))
        # the vectors allocated once at their final size: add() grows them by vector doubling,
        # old and new buffers at once (12.0 GB peak for the 8.1 GB of vectors at 1.58 M x 1280)
        flat = faiss.downcast_index(index.storage)
        flat.codes.resize(db.n * flat.code_size)
        flat.codes.resize(0)  # size 0, capacity kept
        for _, blk in db.blocks():
            index.add(blk)
        return index

    def raw_search(self, q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to kk (sims, idx) per query, any order among equals."""
        if self.index is not None:
            if self.kind == "hnsw":  # faiss's default efSearch (16) caps recall far below k=100
                self.index.hnsw.efSearch = max(int(self.cfg.hnsw_ef_search), 2 * kk)
            return self.index.search(q, kk)
        faiss = _faiss() if self.kind == "exact" else None

        def one(block):
            if faiss is None:
                return _numpy_topk(q, block, min(kk, len(block)))
            return faiss.knn(q, block, min(kk, len(block)), metric=faiss.METRIC_INNER_PRODUCT)

        if self.db.array is not None:
            return one(self.db.array)
        best_s, best_i = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        for a, blk in self.db.blocks():  # merge the blocks' top-kk
            s, i = one(blk)
            best_s, best_i = _sort_rows(np.concatenate([best_s, s], 1), np.concatenate([best_i, i + a], 1), kk)
        return best_s, best_i

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (sims, idx) per query, sorted by similarity desc, ties by index asc."""
        n, nq = self.db.n, len(queries)
        k = min(int(k), n)
        sims, idx = np.empty((nq, k), np.float32), np.empty((nq, k), np.int64)
        if nq == 0 or k == 0:
            return sims, idx
        chunk = max(1, int(self.cfg.chunk_size))
        if self.kind == "numpy":
            chunk = max(1, min(chunk, NUMPY_BLOCK_FLOATS // max(1, min(n, FILE_BLOCK))))
            kk = k
        else:
            kk = min(n, k + TIE_MARGIN)
        for a in range(0, nq, chunk):
            s, i = self.raw_search(queries[a : a + chunk], kk)
            sims[a : a + chunk], idx[a : a + chunk] = _sort_rows(s, i, k)
        return sims, idx


def search(cfg, queries: np.ndarray, database, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database rows for each query by inner product.

    `cfg` is the KnnConfig (its index: auto picks by database size); `database` an array or a
    Rows.  Returns (sims [q, k] float32, idx [q, k] int64), k capped at the database size; rows
    sorted by similarity descending, ties by index ascending.
    """
    db = as_rows(database)
    q = _check(queries, db)
    k = int(cfg.k if k is None else k)
    if k <= 0:
        raise LandmarksError(f"knn: k must be positive (got {k})")
    kind = choose_index(cfg, db.n)
    if q.shape[0] == 0 or db.n == 0:
        kk = min(k, db.n)
        return np.zeros((q.shape[0], kk), np.float32), np.zeros((q.shape[0], kk), np.int64)
    index = Index(cfg, db, kind)
    if kind == "ivf":  # each list read once for all queries (same candidates as faiss's search)
        return search_by_list(index, q, k)
    return index.search(q, k)


def _weighted_sum(base: np.ndarray, db: Rows, sims: np.ndarray, idx: np.ndarray, alpha: float) -> np.ndarray:
    w = np.clip(sims, 0.0, None) ** alpha  # [n, k]
    w = np.where(idx < 0, 0.0, w).astype(np.float32)
    agg = np.einsum("nk,nkd->nd", w, db.take(np.clip(idx, 0, None)))
    return l2_normalize(base + agg)


def dba_neighbours(index: Index, rows: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sims, idx) [n, k] of the k nearest other database rows of `rows` (database rows `own`):
    k + 1 searched, self dropped from whichever column it sits in."""
    s, i = index.search(rows, min(k + 1, index.db.n))
    order = np.argsort(i == np.asarray(own)[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _ivf_lists(index) -> tuple[list, list]:
    """Views of an IVF-Flat index's lists (no copy of the codes): codes [m, d] float32 (None when
    empty) and ids [m] int64, per list."""
    faiss = _faiss()
    inv, d = index.invlists, index.d
    codes, ids = [], []
    for lst in range(index.nlist):
        m = int(inv.list_size(lst))
        codes.append(faiss.rev_swig_ptr(inv.get_codes(lst), m * d * 4).view(np.float32).reshape(m, d) if m else None)
        ids.append(faiss.rev_swig_ptr(inv.get_ids(lst), m).copy() if m else np.zeros(0, np.int64))
    return codes, ids


def _scan_lists(codes, ids, probe, fetch, k, home=None, off=None, step=4096):
    """The core of the list-by-list IVF search: rows r = 0..n-1 probe the lists probe[r]; each
    list meets all the rows that probe it in one matrix product (fetch(rows) -> their vectors).
    `home`/`off` (database rows only): a row's own list and slot, masked so a row is not its own
    neighbour.  Returns (sims, idx) [n, k], similarity desc, ties by index asc, missing -1."""
    n, nlist = len(probe), len(codes)
    order = np.argsort(probe.ravel(), kind="stable")
    bounds = np.searchsorted(probe.ravel()[order], np.arange(nlist + 1))
    best_s, best_i = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    for lst in range(nlist):
        m = len(ids[lst])
        rows_all = order[bounds[lst] : bounds[lst + 1]] // probe.shape[1]
        if not m or not len(rows_all):
            continue
        for a in range(0, len(rows_all), step):
            rows = rows_all[a : a + step]
            g = fetch(rows) @ codes[lst].T
            if home is not None:
                mine = np.flatnonzero(home[rows] == lst)
                g[mine, off[rows[mine]]] = -np.inf  # a row is not its own neighbour
            c = min(m, k + TIE_MARGIN)  # boundary ties resolved by index, as in the search
            cand = np.argpartition(-g, c - 1, axis=1)[:, :c] if c < m else np.broadcast_to(np.arange(m), g.shape)
            cand_i = np.where(np.isneginf(np.take_along_axis(g, cand, 1)), -1, ids[lst][cand])
            best_s[rows], best_i[rows] = _sort_rows(
                np.concatenate([best_s[rows], np.take_along_axis(g, cand, 1)], 1),
                np.concatenate([best_i[rows], cand_i], 1),
                k,
            )
    return best_s, best_i


def search_by_list(index: Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (sims, idx) of external queries through an IVF Index, list by list: the candidates
    of faiss's IVF search at the index's nprobe (the lists of each query's nearest centroids),
    scored by one matrix product per list, so each list is read once for all queries instead of
    once per query (the test-query search at 1.58 M: memory bandwidth, ~22 ms per query at nprobe
    64).  Sorted by similarity desc, ties by index asc; missing neighbours are idx -1 (sim -inf),
    as ``Index.search`` returns them."""
    ivf = index.index
    q = np.ascontiguousarray(queries, np.float32)
    k = min(int(k), index.db.n)
    if not len(q) or not k:
        return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)
    nprobe = max(1, min(int(ivf.nprobe), ivf.nlist))
    codes, ids = _ivf_lists(ivf)
    probe = ivf.quantizer.search(q, nprobe)[1]
    return _scan_lists(codes, ids, probe, lambda rows: q[rows], k)


def neighbours_by_list(index: Index, k: int, nprobe: int, step: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(sims, idx) [n, k] of every database row's k nearest other rows through its IVF index at
    `nprobe`: the candidates are the lists of the row's nprobe nearest centroids, exactly as an
    IVF search of the rows themselves would scan them, but computed list by list: each list meets
    all the rows that probe it in one matrix product (BLAS speed), where the search scans the list
    once per row (memory bandwidth: ~22 ms per row at nprobe 64 and 1.58 M rows).  Ordered by
    similarity desc, ties by index asc; missing neighbours are idx -1."""
    ivf, d, n = index.index, index.db.d, index.db.n
    nprobe = max(1, min(int(nprobe), ivf.nlist))
    codes, ids = _ivf_lists(ivf)
    home, off = np.empty(n, np.int64), np.empty(n, np.int64)
    for lst, i in enumerate(ids):
        home[i], off[i] = lst, np.arange(len(i))
    probe = home[:, None]
    if nprobe > 1:  # each row's nearest centroids, as the search's quantizer picks them
        probe = np.empty((n, nprobe), np.int64)
        for lst, x in enumerate(codes):
            if x is not None:
                probe[ids[lst]] = ivf.quantizer.search(x, nprobe)[1]

    def fetch(rows):
        xq = np.empty((len(rows), d), np.float32)
        for h in np.unique(home[rows]).tolist():
            sel = home[rows] == h
            xq[sel] = codes[h][off[rows[sel]]]
        return xq

    best_s, best_i = _scan_lists(codes, ids, probe, fetch, k, home, off, step)
    return np.where(best_i < 0, 0.0, best_s).astype(np.float32), best_i


def dba(db, k: int, alpha: float = 3.0, cfg=None, out: str | Path | None = None):
    """Database-side augmentation: each row becomes the sim**alpha-weighted sum of itself and
    its k nearest other database rows, re-normalised (pulls views of one landmark together).

    `db`: an array (an array is returned) or a Rows (a Rows is returned; a file-backed one writes
    its result block by block to the float32 file `out`).  The neighbours come from `cfg`'s index (auto: by size)."""

    rows_in = isinstance(db, Rows)
    rows = as_rows(db)
    if k <= 0 or rows.n < 2:
        return db if rows_in else rows.array
    cfg = cfg or KnnConfig(index="exact")
    kk = min(k + 1, rows.n)
    index = Index(cfg, rows, nprobe=dba_nprobe(cfg, rows.n))
    writer = RowsWriter(rows.n, rows.d, out if rows.array is None else None)
    by_list = None
    if index.kind == "ivf":  # the IVF search's neighbours, one matrix product per list
        t0 = time.perf_counter()
        by_list = neighbours_by_list(index, kk - 1, index.index.nprobe)
        log.info(
            "knn: DBA neighbours list by list (IVF nprobe %d) in %.0f s", index.index.nprobe, time.perf_counter() - t0
        )
    t0 = time.perf_counter()
    for a in range(0, rows.n, DBA_BLOCK):
        if a:  # progress of a long DBA (1.58 M rows: hours on a small machine)
            rate = a / max(time.perf_counter() - t0, 1e-9)
            log.info("knn: DBA %d / %d rows (%.0f rows/s, %.1f min left)", a, rows.n, rate, (rows.n - a) / rate / 60)
        blk = rows.block(a, a + DBA_BLOCK)
        if by_list is None:
            s, i = dba_neighbours(index, blk, np.arange(a, a + len(blk)), kk - 1)
        else:
            s, i = by_list[0][a : a + len(blk)], by_list[1][a : a + len(blk)]
        writer.write(_weighted_sum(blk, rows, s, i, alpha))
    del index
    res = writer.close()
    return res if rows_in else res.array


def alpha_qe(queries: np.ndarray, db, sims: np.ndarray, idx: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """alpha query expansion: query + sum of its top-k database neighbours weighted by sim**alpha,
    re-normalised.  Search again with the result."""
    q = np.ascontiguousarray(queries, np.float32)
    if k <= 0 or q.shape[0] == 0:
        return q
    k = min(k, idx.shape[1])
    return _weighted_sum(q, as_rows(db), sims[:, :k], idx[:, :k], alpha)


# -- stage -----------------------------------------------------------------------------------
def knn_fingerprint(cfg, train_features: Path, test_features: Path, whiten_path: str | Path | None = None) -> str:
    """Inputs of the knn stage: both splits' shards, the knn + whiten settings and, when the
    global whitening is on, the fitted whitening's own stamp (a refit on other labels reruns knn)."""
    inputs = [cache.dir_fingerprint(d, SHARD_GLOB) for d in (train_features, test_features)]
    fitted = whiten.output_fingerprint(cfg, whiten_path)
    return cache.fingerprint("knn", cfg, inputs + ([f"whiten:{fitted}"] if fitted else []))


def neighbours(cfg, train, test: np.ndarray, scratch: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sims, idx) [q, k] of the test rows against the train rows (an array or a Rows), with DBA
    and alpha-QE when on.  `scratch`: where DBA writes a file-backed train matrix's result."""
    kc = cfg.knn
    if kc.dba_k > 0:
        out = Path(scratch) / "dba.f32" if scratch is not None else None
        train = dba(train, kc.dba_k, kc.dba_alpha, kc, out=out)
    sims, idx = search(kc, test, train, kc.k)
    if kc.qe_k > 0 and test.shape[0]:
        test = alpha_qe(test, train, sims, idx, kc.qe_k, kc.qe_alpha)
        sims, idx = search(kc, test, train, kc.k)
    return sims, idx


def _train_rows(cfg, store, w, scratch: Path) -> tuple[list[str], Rows]:
    """The train matrix (whitened when on): in memory up to knn.max_in_memory_gb, else a float32
    file in `scratch` written shard by shard (never the whole matrix in this process)."""

    n, d = store.global_shape()
    out_d = d if w is None else int(w["g_proj"].shape[1])
    if n * out_d * 4 <= float(cfg.knn.max_in_memory_gb) * 1e9:
        ids, train = store.global_matrix()
        if w is not None:
            train = whiten.apply_global(w, train)
        return ids, Rows(train)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "train.f32"
    ids = store.write_global_matrix(path, None if w is None else (lambda x: whiten.apply_global(w, x)))
    return ids, Rows(path=path, shape=(len(ids), out_d))


def run_knn(
    cfg, train_features: str | Path, test_features: str | Path, out: str | Path, whiten_path: str | Path | None = None
) -> Path:
    """Stage: top-K train neighbours of every test image -> `out` (skipped when up to date).

    Reads the global descriptors of both feature directories (and the fitted whitening when
    whiten.global_pca / global_lw / query_transform is on; the query transformation moves the
    test side only).  Output npz: test_ids [q], train_ids [n], sims [q, K] f32,
    idx [q, K] i64 (row of train_ids; -1 = none), fingerprint.  Logs the index it chose.
    """

    train_features, test_features, out = Path(train_features), Path(test_features), Path(out)
    fp = knn_fingerprint(cfg, train_features, test_features, whiten_path)
    if cache.up_to_date(out, fp):
        log.info("knn: %s is up to date", out)
        return out
    store = FeatureStore(train_features)
    if not store.global_shape()[0]:
        raise LandmarksError(f"knn: no train global descriptors in {train_features}")
    w = whiten.load_whiten(cfg, whiten_path, train_features, "global")
    scratch = out.parent / f".{out.stem}.scratch"  # file-backed matrices (GBs): removed after, and before
    shutil.rmtree(scratch, ignore_errors=True)  # (a killed run's leftovers)
    try:
        train_ids, train = _train_rows(cfg, store, w, scratch)
        test_ids, test = FeatureStore(test_features).global_matrix()
        if w is not None:  # the whitening, and the query transformation when fitted
            test = whiten.apply_query(w, test)
        where = "in memory" if train.array is not None else f"in a float32 file ({train.nbytes / 1e9:.2f} GB)"
        dba_note = f"DBA k={cfg.knn.dba_k} and the test queries" if cfg.knn.dba_k > 0 else "the test queries"
        log.info("knn: %s for %s; train matrix %s", describe_choice(cfg.knn, train.n), dba_note, where)
        sims, idx = neighbours(cfg, train, test, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cache.save_npz(
        out, fp, test_ids=np.array(test_ids, dtype=str), train_ids=np.array(train_ids, dtype=str), sims=sims, idx=idx
    )
    log.info("knn: %d test x %d train, k=%d -> %s", len(test_ids), len(train_ids), sims.shape[1], out)
    return out
