"""Row 3 at full GLDv2 size without holding the data twice: exact vs IVF with the database
streamed from a float32 file in chunks (``bench.knn_stream_n``; off in the default run, ~30 min
at 1.58 M x 1280 on 2 cores).

The pipeline's exact search copies the train matrix into a faiss index (16 GB at 1.58 M x 1280);
here exact search runs over database chunks of ``STEP`` rows and merges the top-K, and each IVF
variant trains on its k-means sample and adds the database chunk by chunk, so the peak is one
index (8 GB for IVF-Flat) plus a chunk.  The data are real global descriptors plus noise shaped
by their own principal components (``common.realistic_descriptors``, generated once into the file), so
recall is measured where neighbours form a continuum, not well-separated families.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from landmarks import knn
from landmarks.config import KnnConfig
from landmarks.tools.bench.common import PeakRss, realistic_descriptors
from landmarks.utils import atomic_path

STEP = 131_072  # database rows per chunk (670 MB at dim 1280)


def write_realistic(path: Path, real: np.ndarray, n: int, seed: int, noise: float, chunk: int = 65_536) -> None:
    """n rows of ``common.realistic_descriptors`` (same seed, same rows) written chunk by chunk to a raw float32 file."""

    rng = np.random.default_rng(seed)
    real = np.asarray(real, np.float32)
    _, sv, vt = np.linalg.svd(real - real.mean(0), full_matrices=False)
    std = (sv / math.sqrt(len(real))).astype(np.float32) * np.float32(noise)
    iso = np.float32(0.05 * noise * float(std.mean()))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            x = (
                real[rng.integers(0, len(real), b - a)]
                + (rng.standard_normal((b - a, len(std)), np.float32) * std) @ vt
            )
            x += rng.standard_normal(x.shape, np.float32) * iso
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(np.ascontiguousarray(x, np.float32).tobytes())


def read_rows(path: Path, a: int, b: int, d: int) -> np.ndarray:
    """Rows a..b of the raw float32 file (a plain read: the page cache holds the file, not this process)."""
    with open(path, "rb") as f:
        f.seek(a * d * 4)
        return np.fromfile(f, np.float32, (b - a) * d).reshape(b - a, d)


def exact_chunked(path: Path, n: int, d: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Exact top-k over the database chunks (faiss.knn per chunk, merged): (idx, seconds, read seconds)."""
    import faiss

    kk = min(n, k + knn.TIE_MARGIN)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    t, read = time.perf_counter(), 0.0
    for a in range(0, n, STEP):
        t1 = time.perf_counter()
        xb = read_rows(path, a, min(n, a + STEP), d)
        read += time.perf_counter() - t1
        s, i = faiss.knn(queries, xb, min(kk, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = knn.sort_rows(np.concatenate([best_s, s], 1), np.concatenate([best_i, i + a], 1), kk)
    return knn.sort_rows(best_s, best_i, k)[1], time.perf_counter() - t, read


def _ivf(kind: str, d: int, nlist: int):
    import faiss

    quant = faiss.IndexFlatIP(d)
    if kind == "flat":
        return faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT), quant
    qt = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[kind]
    return faiss.IndexIVFScalarQuantizer(quant, d, nlist, qt, faiss.METRIC_INNER_PRODUCT, False), quant


def ivf_streamed(
    path: Path,
    n: int,
    d: int,
    queries: np.ndarray,
    k: int,
    exact: np.ndarray,
    kind: str,
    nlist: int,
    nprobes,
    per_centroid: int,
) -> dict:
    """One IVF variant: k-means on per_centroid x nlist sampled rows, add in chunks, search at each nprobe."""

    kk = min(n, k + knn.TIE_MARGIN)
    with PeakRss() as mem:
        t = time.perf_counter()
        index, quant = _ivf(kind, d, nlist)
        rows = np.sort(np.random.default_rng(0).choice(n, min(n, per_centroid * nlist), replace=False))
        mm = np.memmap(path, np.float32, "r", shape=(n, d))
        sample = np.ascontiguousarray(mm[rows])
        del mm
        t1 = time.perf_counter()
        index.train(sample)
        train_s = time.perf_counter() - t1
        del sample
        for a in range(0, n, STEP):
            index.add(read_rows(path, a, min(n, a + STEP), d))
        out = {
            "kind": kind,
            "nlist": nlist,
            "train_rows": len(rows),
            "train_s": train_s,
            "build_s": time.perf_counter() - t,
            "bytes_per_vector": int(index.code_size),
            "searches": [],
        }
        for nprobe in nprobes:
            index.nprobe = min(int(nprobe), nlist)
            t = time.perf_counter()
            _, i = knn.sort_rows(*index.search(queries, kk), k)
            out["searches"].append(
                {
                    "nprobe": int(nprobe),
                    "search_s": time.perf_counter() - t,
                    "recall": _recall(exact, i, k),
                    "recall10": _recall(exact, i, min(10, k)),
                }
            )
        del index, quant
    out["mem"] = mem.delta
    return out


def hnsw_streamed(path: Path, n: int, d: int, queries: np.ndarray, k: int, exact: np.ndarray, hnsw) -> dict:
    """The graph index: HNSW-Flat as the knn stage builds it (``knn.Index``, vectors allocated once,
    rows added from the file block by block) at `hnsw` = (M, efConstruction, efSearch), searched once."""

    m, ef_construction, ef_search = (int(v) for v in hnsw)
    cfg = KnnConfig(index="hnsw", hnsw_m=m, hnsw_ef_construction=ef_construction, hnsw_ef_search=ef_search)
    with PeakRss() as mem:
        t = time.perf_counter()
        index = knn.Index(cfg, knn.Rows(path=path, shape=(n, d)))
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        _, i = index.search(queries, k)
        search_s = time.perf_counter() - t
        del index
    return {
        "kind": "hnsw",
        "nlist": f"M {m}, efC {max(40, ef_construction)}",
        "train_rows": 0,
        "train_s": 0.0,
        "build_s": build_s,
        "bytes_per_vector": 4 * d + 8 * m,  # the vector and 2·M int32 links on the base layer
        "searches": [
            {
                "nprobe": f"efSearch {max(ef_search, 2 * min(n, k + knn.TIE_MARGIN))}",
                "search_s": search_s,
                "recall": _recall(exact, i, k),
                "recall10": _recall(exact, i, min(10, k)),
            }
        ],
        "mem": mem.delta,
    }


def _recall(exact: np.ndarray, got: np.ndarray, k: int) -> float:
    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) for a, b in zip(exact, got)]) / k)


def stream_child(
    n: int,
    q: int,
    k: int,
    real_path: str,
    noise: float,
    data_path: str,
    kinds,
    nlist: int,
    nprobes,
    per_centroid: int,
    hnsw=(32, 80, 256),
) -> dict:
    """The whole streamed measurement (run in a fresh process): data file, exact, each IVF variant
    (kinds flat / sq8 / fp16) and the graph index (kind hnsw, at `hnsw` = M, efConstruction, efSearch)."""

    real = np.load(real_path)
    d = real.shape[1]
    path = Path(data_path)
    t = time.perf_counter()
    if not path.exists() or path.stat().st_size != n * d * 4:
        write_realistic(path, real, n, 2, noise)  # seed 2: the rows row 3's in-memory cells would generate
    out = {"n": n, "d": d, "q": q, "k": k, "gen_s": time.perf_counter() - t, "db_bytes": n * d * 4}
    queries = realistic_descriptors(real, q, 3, noise)
    nlist = nlist or max(1, int(round(math.sqrt(n))))
    with PeakRss() as mem:
        exact, out["exact_s"], out["exact_read_s"] = exact_chunked(path, n, d, queries, k)
    out["exact_mem"] = mem.delta
    out["ivf"] = [
        hnsw_streamed(path, n, d, queries, k, exact, hnsw)
        if kind == "hnsw"
        else ivf_streamed(path, n, d, queries, k, exact, kind, nlist, nprobes, per_centroid)
        for kind in kinds
    ]
    return out


def markdown(s: dict, queries: int) -> list[str]:
    """The streamed measurement's table (times scaled from the timed queries to `queries`)."""
    f = queries / s["q"]
    ex = (s["exact_s"] - s["exact_read_s"]) * f + s["exact_read_s"]
    L = [
        "",
        f"Streamed at N = {s['n']:,} x {s['d']} (bench.knn_stream_n; database {s['db_bytes'] / 1e9:.2f} GB in a "
        f"float32 file read in chunks of {STEP:,} rows; {s['q']:,} timed queries, search times x{f:g} to {queries:,}; "
        f"exact = faiss.knn per chunk, merged, {s['exact_read_s']:.0f} s of it reading the file once):",
        "",
        "| method | nlist | nprobe | bytes/vector | k-means s (rows) | build s | search s | build + search s | "
        "vs exact | recall@100 | recall@10 | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| exact (chunked) | | | {4 * s['d']} | | | {ex:.0f} | {ex:.0f} | 1.00 | 1 | 1 | "
        f"{s['exact_mem'] / 1e9:.2f} GB |",
    ]
    for v in s["ivf"]:
        for r in v["searches"]:
            tot = v["build_s"] + r["search_s"] * f
            L.append(
                f"| {'hnsw' if v['kind'] == 'hnsw' else 'ivf-' + v['kind']} | {v['nlist']} | {r['nprobe']} | {v['bytes_per_vector']} | {v['train_s']:.0f} "
                f"({v['train_rows']:,}) | {v['build_s']:.0f} | {r['search_s'] * f:.0f} | {tot:.0f} | {tot / ex:.2f} | "
                f"{r['recall']:.4f} | {r['recall10']:.4f} | {v['mem'] / 1e9:.2f} GB |"
            )
    return L


def best(s: dict, queries: int, min_recall: float = 0.95) -> dict | None:
    """The fastest IVF setting (HNSW rows left out) with recall@K >= min_recall: {kind, nlist, nprobe, total_s, ratio, recall}."""
    f = queries / s["q"]
    ex = (s["exact_s"] - s["exact_read_s"]) * f + s["exact_read_s"]
    cands = [
        {
            "kind": v["kind"],
            "nlist": v["nlist"],
            "nprobe": r["nprobe"],
            "build_s": v["build_s"],
            "search_s": r["search_s"] * f,
            "total_s": v["build_s"] + r["search_s"] * f,
            "recall": r["recall"],
            "exact_s": ex,
        }
        for v in s["ivf"]
        if v["kind"] != "hnsw"  # the knn stage builds its index twice (DBA): IVF's build is the cheap one
        for r in v["searches"]
        if r["recall"] >= min_recall
    ]
    if not cands:
        return None
    b = min(cands, key=lambda c: c["total_s"])
    b["ratio"] = b["total_s"] / ex
    return b
