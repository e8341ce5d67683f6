"""GLDv2-size inputs for the stages after extraction, and their measurement in a fresh process.

``write_store`` writes N real-like global descriptors (``retrieval._realistic``: real descriptors
plus noise drawn from their own principal components) as global-only feature shards, the way
extraction leaves a train split, so the real stage functions (``knn.run_knn`` ...) read them.
``measure_stage`` runs one stage function in a fresh process and reports its wall seconds and
peak RSS (``ru_maxrss`` of that process: every byte it held, data included).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np


def write_store(
    directory: str | Path, real: np.ndarray, n: int, seed: int, noise: float = 1.0, shard_rows: int = 5000, prefix="tr"
) -> Path:
    """N real-like unit descriptors as shards of `shard_rows` global-only rows (ids prefix + hex,
    CSV order = row order), generated chunk by chunk; kept when complete.json matches."""
    from landmarks.store import shard_name, write_shard

    directory = Path(directory)
    want = {"n": int(n), "seed": int(seed), "noise": float(noise), "rows": int(shard_rows), "real": real.shape}
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
        write_shard(
            directory / shard_name(s, shards), [f"{prefix}{i:014x}" for i in range(a, b)], x, None, order=range(a, b)
        )
    marker.write_text(json.dumps(want))
    return directory


def _stage_child(fn_path: str, args: tuple, settings: list[str]) -> dict:
    import importlib
    import logging
    import resource

    from landmarks.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    mod, _, name = fn_path.rpartition(".")
    fn = getattr(importlib.import_module(mod), name)
    cfg = load_config(None, settings)
    t = time.perf_counter()
    out = fn(cfg, *args)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "out": str(out)}


def measure_stage(fn_path: str, args: tuple, settings: list[str]) -> dict:
    """Run the stage function `fn_path` (e.g. 'landmarks.knn.run_knn') as fn(cfg, *args) in a fresh
    process with the config of `settings` (['knn.k=100', ...]): its wall s and peak RSS."""
    from landmarks.bench.common import in_child

    return in_child(_stage_child, fn_path, tuple(str(a) for a in args), list(settings))
