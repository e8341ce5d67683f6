"""Verify on a loopback Dask cluster against local joblib workers (docs/performance-gldv2.md).

2,000 test images x 8 candidates of random local features (RANSAC runs every iteration), verified
with verify.jobs=1, verify.jobs=2 and on a `dask scheduler` + 2 single-thread `dask worker`
processes on 127.0.0.1 (the cluster the tests start); pairs/s per run and whether every run's
inliers are identical.

    PYTHONPATH=src .venv/bin/python docs/verify_cluster_vs_local.py [--test-images 2000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the loopback cluster of tests/test_cluster.py

from landmarks import verify  # noqa: E402
from landmarks.config import Config  # noqa: E402
from landmarks.store import load_npz  # noqa: E402
from landmarks.tools.bench.verification import verify_set  # noqa: E402
from test_cluster import Cluster  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    verify_set(tmp / "vset", n=int(1.5 * a.test_images), n_test=a.test_images, R=8, cap=200, n_feat=300)
    inputs = (tmp / "vset" / "knn.npz", tmp / "vset" / "features" / "test", tmp / "vset" / "features" / "train")
    inliers = {}

    def run(tag: str, jobs: int, scheduler=None) -> None:
        cfg = Config()
        cfg.verify.num_to_rerank, cfg.verify.jobs = 8, jobs
        t0 = time.time()
        out = verify.run_verify(cfg, *inputs, tmp / f"{len(inliers)}.npz", scheduler=scheduler)
        dt = time.time() - t0
        inliers[tag] = load_npz(out)["inliers"]
        print(f"{tag}: {dt:.1f} s, {a.test_images * 8 / dt:.0f} pairs/s", flush=True)

    (tmp / "cluster").mkdir()
    cluster = Cluster(tmp / "cluster").start()
    try:
        for rep in range(a.repeats):
            run(f"local verify.jobs=1 #{rep}", 1)
            run(f"local verify.jobs=2 #{rep}", 2)
            run(f"dask, 2 workers #{rep}", 1, cluster.address)
    finally:
        cluster.stop()
    ref = next(iter(inliers.values()))
    print("every run's inliers identical:", all(np.array_equal(v, ref) for v in inliers.values()))


if __name__ == "__main__":
    main()
