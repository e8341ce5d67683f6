"""Row 3: kNN at GLDv2 scale: faiss exact against the approximate index and the numpy fallback.

Each (N, dim) cell runs in a fresh process (clean peak memory): N database vectors and the
queries are generated in float32 chunks, either two-level synthetic families or, when real
global descriptors are at hand, real descriptors plus noise shaped like them (views of one photo
overlap those of others, as real landmarks do).  Times of index build and search, peak RSS above
the data and recall@K of the approximate index against exact; cells over bench.knn_max_db_gb are
extrapolated linearly in N from the largest measured one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from landmarks import knn
from landmarks.config import KnnConfig
from landmarks.datasets.images import load_image
from landmarks.delg.delg_io import load_delg, postprocess
from landmarks.store import FeatureStore
from landmarks.tools.bench import knn_stream
from landmarks.tools.bench.common import PeakRss, cores, gb, in_child, model_dim, realistic_descriptors, shared_dir
from landmarks.utils import LandmarksError, atomic_path, configure_tensorflow, log
from landmarks.utils.cache import digest, dir_fingerprint
from landmarks.utils.layout import WorkLayout

TITLE = "kNN: exact vs approximate vs numpy"


def _synthetic(
    n: int, d: int, seed: int, chunk: int = 65536, centres: np.ndarray | None = None, noise: float = 0.8
) -> np.ndarray:
    """Unit vectors in float32 chunks: cluster centre (a 'landmark') + gaussian noise, normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = rng.standard_normal((b - a, d), dtype=np.float32) * np.float32(noise / math.sqrt(d))
        if centres is not None:
            x += centres[rng.integers(0, len(centres), b - a)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def _shared_photo_paths(cfg) -> tuple[list[str], list[Path]]:
    """Every bench.knn_real_images-th photo of the shared sets with labels (sorted by id), and the sets."""
    import pandas as pd

    shared = shared_dir(cfg)
    sets = [shared / s for s in ("paris6k_subset", "multiview_scenes", "wide_baseline_scenes")]
    sets = [s for s in sets if (s / "LABELS.csv").exists()]
    paths = []
    for s in sets:
        d = pd.read_csv(s / "LABELS.csv", dtype=str).sort_values("id")
        paths += [str(s / p) for p in d["path"] if (s / p).exists()]
    step = max(1, len(paths) // max(1, cfg.bench.knn_real_images))
    return paths[::step][: cfg.bench.knn_real_images], sets


def _extract_globals(cfg, model_dir, paths: list[str], cache: Path) -> None:
    """Global descriptors of the photos at scale 1.0 into the .npy `cache` (bad photos left out)."""
    from tqdm import tqdm

    e = cfg.extract
    configure_tensorflow(cores())
    model = load_delg(model_dir)
    rows = []
    for p in tqdm(paths, desc="bench: real global descriptors", unit="img", disable=None):
        try:
            img, _ = load_image(p, e.max_image_size, e.max_image_pixels, e.min_image_size)
            g, _ = postprocess(model(img, (1.0,), 1, e.abs_thres, (0,)))
            rows.append(np.asarray(g, np.float32))
        except Exception:  # noqa: BLE001 - a bad photo is just left out
            continue
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.stack(rows))


def _real_globals(cfg, data_dir, work_dir, model_dir) -> tuple[np.ndarray | None, str]:
    """Real global descriptors to give row 3 realistic structure: the shared real photos (first
    bench.knn_real_images, one scale, cached), else the work dir's stored train features."""

    if cfg.bench.knn_real_images > 0 and (Path(model_dir) / "saved_model.pb").exists():
        paths, sets = _shared_photo_paths(cfg)
        if sets:
            key = digest(dir_fingerprint(model_dir), json.dumps([paths, cfg.extract.max_image_size]))
            cache = Path(work_dir).resolve() / "bench" / f"real-globals-{key}.npy"
            if not cache.exists():
                _extract_globals(cfg, model_dir, paths, cache)
            return np.load(cache), f"{len(paths)} shared real photos ({', '.join(s.name for s in sets)}; scale 1.0)"
    train = WorkLayout(work_dir).features("train")
    if train.is_dir():
        ids, x = FeatureStore(train).global_matrix()
        if len(ids) >= 10:
            return x, f"{len(ids)} stored train descriptors of {work_dir}"
    return None, "none found: synthetic families only"


def knn_child(
    n: int,
    d: int,
    q: int,
    k: int,
    knn_cfg: dict,
    approx: str,
    seed: int = 0,
    real_path: str | None = None,
    real_noise: float = 1.0,
) -> dict:
    """One (N, dim) kNN measurement (run in a fresh process): time, peak RSS delta, recall@k.

    `real_path`: .npy of real descriptors of dim d: data and queries are real descriptors plus
    noise shaped like them (``common.realistic_descriptors``), else two-level synthetic families."""

    kc = KnnConfig(**knn_cfg)
    t = time.perf_counter()
    if real_path:
        real = np.load(real_path)
        db = realistic_descriptors(real, n, seed + 2, real_noise)
        queries = realistic_descriptors(real, q, seed + 3, real_noise)
    else:
        # two levels like landmarks in a region: families of 1000, clusters ('landmarks') of 10 images
        families = _synthetic(max(1, n // 1000), d, seed + 1, noise=math.sqrt(d))  # random unit directions
        centres = _synthetic(max(1, n // 10), d, seed + 4, centres=families, noise=0.7)
        db = _synthetic(n, d, seed + 2, centres=centres)
        queries = _synthetic(q, d, seed + 3, centres=centres)
    gen_s = time.perf_counter() - t
    out = {"gen_s": gen_s, "db_bytes": db.nbytes}
    results = {}
    for method in ("exact", approx, "numpy"):
        c = dataclasses.replace(kc, index=method)
        with PeakRss() as mem:
            t = time.perf_counter()
            build = 0.0
            # knn.search, with index build (ivf, hnsw; none for exact and numpy) and search timed apart
            index = knn.Index(c, knn.Rows(db), method)
            build = time.perf_counter() - t
            s, i = index.search(queries, k)
            del index
            total = time.perf_counter() - t
        results[method] = i
        out[method] = {"build_s": build, "search_s": total - build, "mem": mem.delta}
    ex = results["exact"]
    out["recall"] = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ex, results[approx])]) / ex.shape[1])
    k10 = min(10, ex.shape[1])
    out["recall10"] = float(np.mean([len(np.intersect1d(a[:k10], b[:k10])) for a, b in zip(ex, results[approx])]) / k10)
    out["numpy_agree"] = float(np.mean(results["numpy"] == ex))
    return out


def row_knn(cfg, data_dir, work_dir, model_dir) -> dict:
    """Row 3: every (N, dim) cell measured in a fresh process, or extrapolated linearly from a measured one."""
    bc = cfg.bench
    dims = [int(d) or model_dim(cfg, model_dir) for d in bc.knn_dims]
    k = int(cfg.knn.k)
    approx = bc.knn_approx
    if approx not in ("ivf", "hnsw"):
        raise LandmarksError(f"bench.knn_approx must be ivf or hnsw (got {approx!r})")
    qt = min(int(bc.knn_timed_queries), int(bc.knn_queries))
    scale = bc.knn_queries / qt
    knn_cfg = dataclasses.asdict(cfg.knn)
    real, real_src = _real_globals(cfg, data_dir, work_dir, model_dir) if bc.knn_real_images >= 0 else (None, "off")
    real_path = None
    if real is not None:
        real_path = Path(work_dir).resolve() / "bench" / "knn-real.npy"
        real_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(real_path, real)
    cells = []
    for d in dict.fromkeys(dims):
        rp = str(real_path) if real is not None and real.shape[1] == d else None
        measured = None
        for n in sorted(bc.knn_sizes):
            cell = {"n": int(n), "d": d}
            fits = n * d * 4 <= bc.knn_max_db_gb * 1e9
            # the smallest N is measured even a little over the budget, so larger ones have a basis
            basis = measured is None and n == min(bc.knn_sizes) and n * d * 4 <= 4 * bc.knn_max_db_gb * 1e9
            if fits or basis:
                t = time.perf_counter()
                log.info("bench kNN: N=%d dim=%d, %d queries", n, d, qt)
                m = in_child(knn_child, int(n), d, qt, k, knn_cfg, approx, 0, rp, float(bc.knn_real_noise))
                cell.update(m, measured=True, wall=time.perf_counter() - t, data="real+noise" if rp else "synthetic")
                measured = cell
            elif measured is not None:  # brute force is linear in N; memory too
                f = n / measured["n"]
                cell.update(measured=False, from_n=measured["n"], recall=None, db_bytes=n * d * 4)
                for meth in ("exact", approx, "numpy"):
                    mm = measured[meth]
                    cell[meth] = {"build_s": mm["build_s"] * f, "search_s": mm["search_s"] * f, "mem": mm["mem"] * f}
            else:
                cell.update(measured=False, skipped=True)
            for meth in ("exact", approx, "numpy"):
                if meth in cell:
                    cell[meth]["search_total_s"] = cell[meth]["search_s"] * scale
            cells.append(cell)
    stream = _stream(cfg, work_dir, real, real_path, k, qt)
    return {
        "cells": cells,
        "k": k,
        "approx": approx,
        "queries": bc.knn_queries,
        "timed": qt,
        "scale": scale,
        "stream": stream,
        "real_src": real_src,
        "real_noise": bc.knn_real_noise,
        "approx_desc": (
            f"IVF-Flat nlist={cfg.knn.ivf_nlist or 'sqrt(N)'} nprobe={cfg.knn.ivf_nprobe}"
            if approx == "ivf"
            else f"HNSW-Flat M={cfg.knn.hnsw_m}"
        ),
    }


def _stream(cfg, work_dir, real, real_path, k: int, q: int) -> dict | None:
    """The streamed GLDv2-size measurement (bench.knn_stream_n > 0, real descriptors needed)."""

    bc = cfg.bench
    if bc.knn_stream_n <= 0 or real is None:
        return None
    path = Path(work_dir).resolve() / "bench" / f"knn-stream-{bc.knn_stream_n}-{real.shape[1]}.f32"
    log.info("bench kNN streamed: N=%d dim=%d, %d queries", bc.knn_stream_n, real.shape[1], q)
    out = in_child(
        knn_stream.stream_child,
        int(bc.knn_stream_n),
        q,
        k,
        str(real_path),
        float(bc.knn_real_noise),
        str(path),
        tuple(bc.knn_stream_kinds),
        int(bc.knn_stream_nlist),
        tuple(bc.knn_stream_nprobes),
        int(cfg.knn.ivf_train_per_centroid) or 40,
        (int(cfg.knn.hnsw_m), int(cfg.knn.hnsw_ef_construction), int(cfg.knn.hnsw_ef_search)),
    )
    path.unlink(missing_ok=True)  # GBs of generated data: not kept
    return out


def markdown(r: dict) -> list[str]:
    """Row 3's section of bench.md."""
    L = [
        f"Top-{r['k']} of {r['queries']} queries (timed on {r['timed']}, search times x{r['scale']:g}); synthetic "
        f"unit vectors (N/1000 random families, N/10 clusters of 10 around them, each vector = its cluster centre + noise, "
        f"so a query's top-{r['k']} is mostly its family; float32, generated in chunks); approximate = "
        f"{r['approx_desc']}; memory = peak RSS above the generated data, sampled every 10 ms; rows marked * are "
        "extrapolated linearly in N from the measured N (over bench.knn_max_db_gb). Data 'real+noise': "
        f"real global descriptors ({r.get('real_src', 'n/a')}) plus noise drawn from their own principal "
        f"components x {r.get('real_noise', 1.0)} (bench.knn_real_noise), queries likewise: views of one photo overlap "
        "those of others as real landmarks do. IVF k-means trains on knn.ivf_train_per_centroid points per list.",
        "",
        "| N | dim | data | method | build s | search s | peak RSS + data | recall@K |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cells"]:
        if c.get("skipped"):
            L.append(f"| {c['n']:,} | {c['d']} | | (skipped: over bench.knn_max_db_gb) | | | | |")
            continue
        star = "" if c["measured"] else "*"
        for meth in ("exact", r["approx"], "numpy"):
            m = c[meth]
            rec = f"{c['recall']:.3f} (@10: {c['recall10']:.3f})" if meth == r["approx"] and c["measured"] else ""
            L.append(
                f"| {c['n']:,}{star} | {c['d']} | {c.get('data', '')} | {meth} | {m['build_s']:.1f} | {m['search_total_s']:.1f} | "
                f"{gb(m['mem'])} + {gb(c['db_bytes'])} | {rec} |"
            )
    if r.get("stream"):
        L += knn_stream.markdown(r["stream"], r["queries"])
    return L


def summary(r: dict) -> str:
    """Row 3's cell of the summary table: the first three cells."""
    parts = []
    for c in r["cells"]:
        if c.get("skipped"):
            continue
        star = "" if c["measured"] else "*"
        e, a, n = c["exact"], c[r["approx"]], c["numpy"]
        rec = f" r@{r['k']} {c['recall']:.3f} r@10 {c['recall10']:.3f}" if c.get("recall") is not None else ""
        ratio = (a["build_s"] + a["search_total_s"]) / max(e["build_s"] + e["search_total_s"], 1e-9)
        parts.append(
            f"N={c['n']:,}{star}/d{c['d']}{'/real' if c.get('data') == 'real+noise' else ''}: exact "
            f"{e['search_total_s']:.0f}s, {r['approx']} {a['build_s'] + a['search_total_s']:.0f}s "
            f"({ratio:.2f}x exact){rec}, numpy {n['search_total_s']:.0f}s"
        )
    text = "; ".join(parts[:3]) + (" ..." if len(parts) > 3 else "")
    if r.get("stream"):
        b = knn_stream.best(r["stream"], r["queries"])
        n = r["stream"]["n"]
        text += (
            f"; streamed N={n:,}: ivf-{b['kind']} nlist {b['nlist']} nprobe {b['nprobe']} build + search "
            f"{b['total_s']:.0f}s vs exact {b['exact_s']:.0f}s ({b['ratio']:.2f}x), r@{r['k']} {b['recall']:.3f}"
            if b
            else f"; streamed N={n:,}: no IVF setting reached recall 0.95"
        )
    return text
