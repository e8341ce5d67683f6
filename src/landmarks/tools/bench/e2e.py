"""Row 4: end to end, test images/s of ``predict.run_predict`` (kNN + verification + voting) for
each NUM_TO_RERANK, with the features extracted beforehand; the stored shards' sizes feed the
disk figures of the GLDv2 section.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from landmarks import features, pipeline
from landmarks.datasets.data import load_split
from landmarks.evaluation import metrics
from landmarks.tools.bench.common import fmt, median, storage
from landmarks.utils import LandmarksError

TITLE = "End to end: predict"


def _e2e_data(src: Path, dst: Path, n_test: int) -> Path:
    """The data dir with only the first n_test test ids (0 = all): CSVs rewritten, image trees linked."""
    import pandas as pd

    if n_test <= 0:
        return src
    if not (src / "sample_submission.csv").exists():
        raise LandmarksError(f"{src} has no sample_submission.csv")
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        link = dst / split
        if not link.is_symlink() or link.resolve() != (src / split).resolve():
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src / split, target_is_directory=True)
    (dst / "train.csv").write_bytes((src / "train.csv").read_bytes())
    sub = pd.read_csv(src / "sample_submission.csv", dtype=str, keep_default_na=False).head(n_test)
    sub.to_csv(dst / "sample_submission.csv", index=False)
    if (src / "solution.csv").exists():
        sol = pd.read_csv(src / "solution.csv", dtype=str, keep_default_na=False)
        sol[sol["id"].isin(set(sub["id"]))].to_csv(dst / "solution.csv", index=False)
    else:
        (dst / "solution.csv").unlink(missing_ok=True)
    return dst


def row_e2e(cfg, data_dir, work_dir, model_dir) -> dict:

    bc = cfg.bench
    e2e = Path(work_dir).resolve() / "bench" / "e2e"
    data_dir = _e2e_data(Path(data_dir).resolve(), e2e / "data", int(bc.e2e_test_images))
    t = time.perf_counter()
    for split in ("train", "test"):  # train local features up front: predict time excludes extraction
        features.run_features(cfg, data_dir, e2e, model_dir, split, local=True)
    extract_s = time.perf_counter() - t
    n_test = len(load_split(data_dir, "test"))
    res = {"n_test": n_test, "n_train": len(load_split(data_dir, "train")), "extract_s": extract_s, "runs": []}
    for R in bc.e2e_rerank:
        c = copy.deepcopy(cfg)
        c.verify.num_to_rerank = int(R)
        times = []
        for _ in range(bc.repeats):
            for f in [*e2e.glob("knn-*.npz"), *e2e.glob("verified-*.npz")]:
                f.unlink()
            t = time.perf_counter()
            sub = pipeline.run_after_features(c, data_dir, e2e, model_dir, e2e / f"submission-R{R}.csv")
            times.append(time.perf_counter() - t)
        gap = None
        sol = Path(data_dir) / "solution.csv"
        if sol.exists():
            try:
                gap = metrics.score_files(sol, sub)["gap"]
            except Exception:  # noqa: BLE001 - GAP is a bonus here
                gap = None
        res["runs"].append({"R": int(R), "s": median(times), "ips": n_test / median(times), "gap": gap})
    sizes = {}
    for split in ("train", "test"):
        shards = sorted((e2e / "features" / split).glob("shard-*.h5"))
        st = [storage(p) for p in shards]
        n = sum(s["n"] for s in st)
        sizes[split] = {
            "n": n,
            "file": sum(s["file"] for s in st),
            "global": sum(s.get("global", 0) for s in st),
            "local": sum(sum(v for kk, v in s.items() if kk.startswith("local/")) for s in st),
            "m": sum(s["m"] for s in st),
            "files": len(st),
            "ids": sum(s.get("ids", 0) for s in st),
            "datasets": sum(sum(v for kk, v in s.items() if kk not in ("file", "n", "m")) for s in st),
        }
    res["sizes"] = sizes
    res["knn_bytes"] = sum(p.stat().st_size for p in e2e.glob("knn-*.npz"))
    res["ver_bytes"] = sum(p.stat().st_size for p in e2e.glob("verified-*.npz"))
    return res


def markdown(r: dict) -> list[str]:
    """Row 4's section of bench.md."""
    L = [
        f"`landmarks predict` (knn + verify + vote + submission) on {r['n_test']} test (bench.e2e_test_images) / "
        f"{r['n_train']} train images of the data dir; features (train with local) extracted beforehand ({r['extract_s']:.1f} s, skipped when "
        "done); the knn and verified outputs deleted before each run.",
        "",
        "| NUM_TO_RERANK | predict s | test images/s | GAP |",
        "|---|---|---|---|",
    ]
    for run in r["runs"]:
        L.append(f"| {run['R']} | {run['s']:.2f} | {run['ips']:.1f} | {fmt(run['gap'], 4)} |")
    return L


def summary(r: dict) -> str:
    """Row 4's cell of the summary table."""
    return "; ".join(f"R={x['R']}: {x['ips']:.1f} test img/s" for x in r["runs"])
