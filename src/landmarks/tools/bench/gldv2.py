"""GLDv2-size inputs for the stages after extraction, and their measurement in a fresh process.

``write_store`` writes N real-like global descriptors (``common.realistic_descriptors``: real descriptors
plus noise drawn from their own principal components) as global-only feature shards, the way
extraction leaves a train split, so the real stage functions (``knn.run_knn`` ...) read them.
``measure_stage`` runs one stage function in a fresh process and reports its wall seconds and
peak RSS (``VmHWM`` of that process: every byte it held, data included).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from landmarks import knn
from landmarks.config import KnnConfig, load_config
from landmarks.store import FeatureStore, LocalFeatures, shard_name, write_shard
from landmarks.tools.bench.common import in_child, peak_rss_own, realistic_descriptors
from landmarks.utils.layout import WorkLayout


def synthetic_local(rng: np.random.Generator, n_feat: int, dim: int = 128) -> LocalFeatures:
    """Random local features of one image (unit descriptors: RANSAC finds no model and runs its
    full iterations, the slow case of verification)."""
    desc = rng.standard_normal((n_feat, dim), np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    return LocalFeatures(
        rng.uniform(0, 800, (n_feat, 2)).astype(np.float32),
        desc,
        np.ones(n_feat, np.float32),
        rng.random(n_feat, np.float32),
    )


def write_store(
    directory: str | Path,
    real: np.ndarray,
    n: int,
    seed: int,
    noise: float = 1.0,
    shard_rows: int = 5000,
    prefix="tr",
    local: int = 0,
) -> Path:
    """N real-like unit descriptors as shards of `shard_rows` global-only rows (ids prefix + hex,
    CSV order = row order), generated chunk by chunk; kept when complete.json matches.
    `local` > 0: each row also gets that many synthetic local features (a test split)."""

    directory = Path(directory)
    want = {"n": int(n), "seed": int(seed), "noise": float(noise), "rows": int(shard_rows), "real": real.shape}
    if local:
        want["local"] = int(local)
    want = json.loads(json.dumps(want))
    marker = directory / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == want:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for p in directory.glob("*"):
        p.unlink()
    rng = np.random.default_rng(seed)
    real = np.asarray(real, np.float32)
    _, sv, vt = np.linalg.svd(real - real.mean(0), full_matrices=False)
    std = (sv / math.sqrt(len(real))).astype(np.float32) * np.float32(noise)
    iso = np.float32(0.05 * noise * float(std.mean()))
    shards = max(1, -(-n // shard_rows))
    for s in range(shards):
        a, b = s * shard_rows, min(n, (s + 1) * shard_rows)
        x = real[rng.integers(0, len(real), b - a)] + (rng.standard_normal((b - a, len(std)), np.float32) * std) @ vt
        x += rng.standard_normal(x.shape, np.float32) * iso
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        lf = [synthetic_local(rng, int(local)) for _ in range(b - a)] if local else None
        write_shard(
            directory / shard_name(s, shards), [f"{prefix}{i:014x}" for i in range(a, b)], x, lf, order=range(a, b)
        )
    marker.write_text(json.dumps(want))
    return directory


def _stage_child(fn_path: str, args: tuple, settings: list[str]) -> dict:
    import importlib
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    mod, _, name = fn_path.rpartition(".")
    fn = getattr(importlib.import_module(mod), name)
    cfg = load_config(None, settings)
    t = time.perf_counter()
    out = fn(cfg, *args)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "peak_rss": peak_rss_own(), "out": str(out)}


def measure_stage(fn_path: str, args: tuple, settings: list[str]) -> dict:
    """Run the stage function `fn_path` (e.g. 'landmarks.knn.run_knn') as fn(cfg, *args) in a fresh
    process with the config of `settings` (['knn.k=100', ...]): its wall s and peak RSS."""

    return in_child(_stage_child, fn_path, tuple(str(a) for a in args), list(settings))


# -- measurements behind knn.auto_exact_max and the graph index (docs/performance-gldv2.md) --------
def real_descriptors(work_dir: str | Path) -> np.ndarray:
    """The stored global descriptors of a work dir's train and test features (the seed of the
    real-like data: ``common.realistic_descriptors``)."""

    work = WorkLayout(work_dir)
    return np.concatenate([FeatureStore(work.features(s)).global_matrix()[1] for s in ("train", "test")])


def crossover(real: np.ndarray, n: int, queries: int = 1000, k: int = 100) -> dict:
    """Exact (faiss.knn on the matrix) against IVF-Flat at the knn defaults (nlist sqrt(N), nprobe
    64, k-means on 40 rows per list) at N real-like rows: ms per query, IVF build s, recall@k, and
    the knn stage with DBA (N + 10 k queries; IVF built twice, before and after DBA) both ways."""
    import faiss

    q = realistic_descriptors(real, queries, 3, 1.0)
    db = realistic_descriptors(real, n, 2, 1.0)
    kk = k + knn.TIE_MARGIN
    t = time.perf_counter()
    _, ie = faiss.knn(q, db, kk, metric=faiss.METRIC_INNER_PRODUCT)
    te = time.perf_counter() - t
    t = time.perf_counter()
    index = knn.Index(KnnConfig(index="ivf"), knn.Rows(db))
    tb = time.perf_counter() - t
    t = time.perf_counter()
    _, ii = index.search(q, k)
    ts = time.perf_counter() - t
    nq = n + 10_000
    return {
        "n": n,
        "exact_ms_per_q": 1e3 * te / queries,
        "ivf_build_s": tb,
        "ivf_ms_per_q": 1e3 * ts / queries,
        "recall100": _recall(ie, ii, k),
        "stage_exact_s": te / queries * nq,
        "stage_ivf_s": 2 * tb + ts / queries * nq,
    }


def graph(real: np.ndarray, n: int, queries: int = 1000, k: int = 100) -> dict:
    """HNSW-Flat at the knn defaults (M 32, efConstruction 80, efSearch max(256, 2 k)) against exact
    at N real-like rows: build s, search s per 10 k queries, recall@k, peak RSS of the process."""

    import faiss

    q = realistic_descriptors(real, queries, 3, 1.0)
    db = realistic_descriptors(real, n, 2, 1.0)
    t = time.perf_counter()
    _, ie = faiss.knn(q, db, k + knn.TIE_MARGIN, metric=faiss.METRIC_INNER_PRODUCT)
    te = time.perf_counter() - t
    t = time.perf_counter()
    index = knn.Index(KnnConfig(index="hnsw"), knn.Rows(db))
    tb = time.perf_counter() - t
    t = time.perf_counter()
    _, ii = index.search(q, k)
    ts = time.perf_counter() - t
    return {
        "n": n,
        "exact_s_per_10k": te * 10_000 / queries,
        "hnsw_build_s": tb,
        "hnsw_search_s_per_10k": ts * 10_000 / queries,
        "recall100": _recall(ie, ii, k),
        "peak_rss": peak_rss_own(),
        "data_bytes": int(db.nbytes),
    }


def train_file_rows(train_dir: str | Path, scratch: str | Path) -> knn.Rows:
    """A train store's global matrix as a float32 file in `scratch` (written once, kept for a
    rerun: GBs at GLDv2 size), read in blocks as the knn stage reads its own."""
    store = FeatureStore(train_dir)
    n, d = store.global_shape()
    path = Path(scratch) / "train.f32"
    if not path.exists() or path.stat().st_size != n * d * 4:
        Path(scratch).mkdir(parents=True, exist_ok=True)
        store.write_global_matrix(path)
    return knn.Rows(path=path, shape=(n, d))


def graph_store(
    train_dir: str | Path, test_dir: str | Path, scratch: str | Path, queries: int = 1000, k: int = 100
) -> dict:
    """The graph index at the size of a written train store (the GLDv2 dry run's 1.58 M rows):
    HNSW-Flat at the knn defaults built from the float32 matrix file block by block, as the knn
    stage builds it, against exact search on the same file; `queries` rows of the test store.
    Build s, search s per 10 k queries, recall@k, peak RSS of the process (one index copy)."""

    rows = train_file_rows(train_dir, scratch)
    n, d = rows.n, rows.d
    q = np.ascontiguousarray(FeatureStore(test_dir).global_matrix()[1][:queries], np.float32)
    t = time.perf_counter()
    _, ie = knn.Index(KnnConfig(index="exact"), rows).search(q, k)
    te = time.perf_counter() - t
    print(json.dumps({"n": n, "exact_s_per_10k": te * 10_000 / len(q)}), flush=True)
    t = time.perf_counter()
    index = knn.Index(KnnConfig(index="hnsw"), rows)
    tb = time.perf_counter() - t
    print(json.dumps({"n": n, "hnsw_build_s": tb}), flush=True)
    t = time.perf_counter()
    _, ii = index.search(q, k)
    ts = time.perf_counter() - t
    return {
        "n": n,
        "queries": len(q),
        "exact_s_per_10k": te * 10_000 / len(q),
        "hnsw_build_s": tb,
        "hnsw_search_s_per_10k": ts * 10_000 / len(q),
        "recall100": _recall(ie, ii, k),
        "peak_rss": peak_rss_own(),
        "data_bytes": int(n * d * 4),
    }


def dba_probe(
    train_dir: str | Path, scratch: str | Path, nprobes=(1, 2, 4, 8, 16, 64), sample: int = 1000, k: int = 2
) -> dict:
    """DBA's neighbour search at the size of a train store: recall of the k nearest other rows
    (``knn.dba_neighbours``, as DBA asks them) through IVF-Flat at each nprobe against exact
    search, on `sample` random rows, with ms per query and the DBA search time that implies for
    all N rows.  `scratch` holds the train matrix as a float32 file (kept for a rerun)."""

    rows = train_file_rows(train_dir, scratch)
    n = rows.n
    own = np.sort(np.random.default_rng(0).choice(n, min(sample, n), replace=False))
    q = rows.take(own)
    t = time.perf_counter()
    _, ie = knn.dba_neighbours(knn.Index(KnnConfig(index="exact"), rows), q, own, k)
    out = {"n": n, "sample": len(own), "k": k, "exact_ms_per_q": 1e3 * (time.perf_counter() - t) / len(own)}
    cfg = KnnConfig(index="ivf")
    t = time.perf_counter()
    index = knn.Index(cfg, rows)
    out["ivf_build_s"], out["nlist"], out["probes"] = time.perf_counter() - t, knn.ivf_nlist(cfg, n), []
    for p in nprobes:
        index.index.nprobe = min(int(p), out["nlist"])
        t = time.perf_counter()
        _, ii = knn.dba_neighbours(index, q, own, k)
        ms = 1e3 * (time.perf_counter() - t) / len(own)
        rec = _recall(ie, ii, k)
        out["probes"].append({"nprobe": int(p), "recall": rec, "ms_per_q": ms, "dba_search_min": ms * n / 6e4})
        print(json.dumps(out["probes"][-1]), flush=True)
    out["peak_rss"] = peak_rss_own()
    return out


def _recall(exact: np.ndarray, got: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) for a, b in zip(exact, got)]) / k)


def main(argv=None) -> int:
    """python -m landmarks.tools.bench.gldv2 {crossover,graph} --work-dir W N [N ...]: one JSON line per N,
    each N in a fresh process (clean peak RSS).  ``dba --train DIR --scratch DIR P [P ...]``: DBA's
    neighbour recall and time at each IVF nprobe P on a written train store (``dba_probe``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m landmarks.tools.bench.gldv2")
    p.add_argument("what", choices=["crossover", "graph", "graph-store", "dba"])
    p.add_argument("sizes", type=int, nargs="+", help="N (crossover, graph) or nprobe values (dba)")
    p.add_argument("--work-dir", default="work", help="work dir whose stored features seed the data")
    p.add_argument("--train", default="", help="dba: the train feature store (e.g. written by write_store)")
    p.add_argument("--test", default="", help="graph-store: the test feature store whose rows are the queries")
    p.add_argument("--scratch", default="", help="dba, graph-store: where the float32 train matrix is written")
    a = p.parse_args(argv)
    if a.what == "dba":
        print(json.dumps(in_child(dba_probe, a.train, a.scratch, tuple(a.sizes))), flush=True)
        return 0
    if a.what == "graph-store":  # sizes: the number of queries
        print(json.dumps(in_child(graph_store, a.train, a.test, a.scratch, a.sizes[0])), flush=True)
        return 0
    real = real_descriptors(a.work_dir)
    fn = crossover if a.what == "crossover" else graph
    for n in a.sizes:
        print(json.dumps(in_child(fn, real, n)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
