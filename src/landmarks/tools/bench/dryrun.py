"""Row 8: the GLDv2-size dry run of every stage after extraction, at the defaults.

Inputs (cached in bench.dryrun_dir, reused when their complete.json matches): bench.dryrun_train
real-like train global descriptors (``gldv2.write_store``, as row 3's data: the work dir's stored
descriptors plus noise shaped like them), bench.dryrun_test test ids with global descriptors and
bench.dryrun_features synthetic local features each, and a train.csv / test.csv with synthetic
labels.  Then ``whiten -> knn (with DBA) -> verify -> predict`` run through the stage shells
(``stages.stage(name).run``, what the CLI runs), each in a fresh process: its wall s, peak RSS
(``VmHWM``: its own, not the parent's, which ``ru_maxrss`` keeps over exec) and the load average
around it.  Between knn and verify, synthetic local features
are written for the train images the knn output shortlists (``verify.num_to_rerank`` per test
image), as the local-features stage would leave them, at most bench.dryrun_local_gb of them (fewer
features per train image when the shortlist touches many images).  Not in the default rows: an
hour on a small machine (``landmarks bench --rows 8``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from landmarks.store import load_npz, write_shard
from landmarks.tools.bench.common import gb, in_child, peak_rss_own
from landmarks.tools.bench.gldv2 import real_descriptors, synthetic_local, write_store
from landmarks.utils import atomic_path
from landmarks.utils.layout import WorkLayout

TITLE = "GLDv2-size dry run after extraction (whiten, knn + DBA, verify, predict)"
STAGE_NAMES = ("whiten", "knn", "verify", "predict")
LOCAL_BYTES = 2 * 4 + 128 * 2 + 4 + 4  # one stored local feature: keypoint, float16 descriptor, scale, score
CACHE_ROWS = 5000  # train ids per synthetic local-cache file


def write_csvs(data_dir: Path, n_train: int, n_test: int, classes: int = 81_313) -> Path:
    """train.csv (ids as write_store names them, synthetic long-tail labels) and the test split's
    sample_submission.csv."""
    data_dir.mkdir(parents=True, exist_ok=True)
    marker = data_dir / "complete.json"
    want = {"train": int(n_train), "test": int(n_test), "classes": int(classes), "v": 2}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return data_dir
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, classes + 1) ** 0.8
    labels = rng.choice(classes, n_train, p=w / w.sum()) + 1
    with atomic_path(data_dir / "train.csv") as tmp:
        with open(tmp, "w") as f:
            f.write("id,landmark_id\n")
            f.writelines(f"tr{i:014x},{lab}\n" for i, lab in enumerate(labels.tolist()))
    with atomic_path(data_dir / "sample_submission.csv") as tmp:
        with open(tmp, "w") as f:
            f.write("id,landmarks\n")
            f.writelines(f"te{i:014x},\n" for i in range(n_test))
    marker.write_text(json.dumps(want))
    return data_dir


def write_train_local(train_dir: Path, knn_path: Path, rerank: int, n_feat: int, budget_gb: float) -> dict:
    """Synthetic local features of the train ids shortlisted in the knn output (top `rerank` of
    each test image) as local-cache files; features per image capped so they fit `budget_gb`."""
    for p in train_dir.glob("local-cache-dryrun-*.h5"):
        p.unlink()
    z = load_npz(knn_path)
    rows = np.unique(z["idx"][:, :rerank])
    rows = rows[rows >= 0]
    ids = [str(i) for i in z["train_ids"][rows]]
    per = int(min(n_feat, budget_gb * 1e9 // max(1, LOCAL_BYTES * len(ids))))
    rng = np.random.default_rng(4)
    n_files = max(1, -(-len(ids) // CACHE_ROWS))
    for c in range(n_files):
        chunk = ids[c * CACHE_ROWS : (c + 1) * CACHE_ROWS]
        name = f"local-cache-dryrun-{c:05d}-of-{n_files:05d}.h5"
        write_shard(train_dir / name, chunk, None, [synthetic_local(rng, per) for _ in chunk])
    return {"shortlisted": len(ids), "features_per_image": per, "bytes": len(ids) * per * LOCAL_BYTES}


def _stage_child(name: str, data_dir: str, work_dir: str, settings: list[str]) -> dict:
    import logging

    from landmarks import stages
    from landmarks.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(None, settings)
    run = stages.Run(cfg, data_dir=data_dir, work_dir=work_dir, demo=False)
    st = stages.stage(name)
    load0 = os.getloadavg()[0]
    if not st.enabled(run):
        return {"stage": name, "off": st.off, "wall_s": 0.0, "peak_rss": 0, "load": [load0, load0]}
    t = time.perf_counter()
    out = st.run(run)
    wall = time.perf_counter() - t
    rss = peak_rss_own()
    return {"stage": name, "wall_s": wall, "peak_rss": rss, "load": [load0, os.getloadavg()[0]], "out": out}


def dry_run(root, real: np.ndarray, n_train: int, n_test: int, n_feat: int, local_gb: float, settings=()) -> dict:
    """Inputs at `root` (kept when complete), then each stage in a fresh process."""
    root = Path(root)
    work = WorkLayout(root)
    t = time.perf_counter()
    write_store(work.features("train"), real, n_train, 2)
    write_store(work.features("test"), real, n_test, 3, prefix="te", local=n_feat)
    data_dir = write_csvs(root / "data", n_train, n_test)
    res = {"n_train": n_train, "n_test": n_test, "features": n_feat, "gen_s": time.perf_counter() - t, "stages": []}
    for name in STAGE_NAMES:
        if name == "verify":
            from landmarks.config import load_config

            cfg = load_config(None, list(settings))
            t = time.perf_counter()
            res["train_local"] = write_train_local(
                work.features("train"), work.knn(cfg), int(cfg.verify.num_to_rerank), n_feat, local_gb
            )
            res["train_local"]["gen_s"] = time.perf_counter() - t
        r = in_child(_stage_child, name, str(data_dir), str(root), list(settings))
        res["stages"].append(r)
        print(json.dumps(r), flush=True)
    return res


def row_dryrun(cfg, data_dir, work_dir, model_dir) -> dict:
    """Row 8: the dry run at bench.dryrun_* sizes, seeded by the work dir's stored descriptors."""
    bc = cfg.bench
    root = Path(bc.dryrun_dir) if bc.dryrun_dir else Path(work_dir).resolve() / "bench" / "dryrun"
    real = real_descriptors(work_dir)
    return dry_run(root, real, int(bc.dryrun_train), int(bc.dryrun_test), int(bc.dryrun_features), bc.dryrun_local_gb)


def markdown(r: dict) -> list[str]:
    """Row 8's section of bench.md."""
    tl = r.get("train_local", {})
    L = [
        f"{r['n_train']:,} real-like train global descriptors, {r['n_test']:,} test images with "
        f"{r['features']} synthetic local features each; {tl.get('shortlisted', 0):,} shortlisted train images "
        f"with {tl.get('features_per_image', 0)} synthetic local features each ({gb(tl.get('bytes', 0))}). "
        "Each stage through its shell (what the CLI runs) in a fresh process, at the defaults.",
        "",
        "| stage | wall s | peak RSS | load average (1 min) before / after |",
        "|---|---|---|---|",
    ]
    for s in r["stages"]:
        if s.get("off"):
            L.append(f"| {s['stage']} | {s['off']} | - | - |")
        else:
            L.append(
                f"| {s['stage']} | {s['wall_s']:.0f} | {gb(s['peak_rss'])} | {s['load'][0]:.1f} / {s['load'][1]:.1f} |"
            )
    return L


def summary(r: dict) -> str:
    """Row 8's cell of the summary table."""
    on = [s for s in r["stages"] if not s.get("off")]
    total = sum(s["wall_s"] for s in on)
    peak = max((s["peak_rss"] for s in on), default=0)
    return f"{r['n_train']:,} train x {r['n_test']:,} test: {total:.0f} s for {len(on)} stages, peak RSS {gb(peak)}"
