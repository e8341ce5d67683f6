"""Row 2: local matching + geometric verification, the host baseline against the default matcher.

Real photo pairs (the shared Paris and multiview sets, else the data dir's train images), every
ordered pair verified the way ``verify`` does it for one test image's candidates: the baseline's
cKDTree with a distance bound against the configured matcher (default: mutual nearest neighbours
in one matrix product), both followed by pydegensac.  Mean inliers of same- and different-landmark
pairs show that the faster matcher separates them as well.  The extraction time of these photos
(near GLDv2 size) is the basis of the "GLDv2 scale on paper" extraction figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from landmarks import verify
from landmarks.datasets.data import load_split
from landmarks.datasets.images import load_image
from landmarks.delg.delg_io import load_delg, postprocess
from landmarks.store import LocalFeatures
from landmarks.tools.bench.common import cores, median, shared_dir
from landmarks.utils import LandmarksError, atomic_path, configure_tensorflow
from landmarks.utils.cache import digest, dir_fingerprint

TITLE = "Local matching + verification"


def _match_images(cfg, data_dir) -> tuple[list[tuple[str, str, str]], str]:
    """(id, label, path) of match_classes x match_per_class images: shared real photos, else the data dir."""
    import pandas as pd

    bc = cfg.bench
    rows, source = [], ""
    shared = shared_dir(cfg)
    sets = [shared / s for s in ("paris6k_subset", "multiview_scenes")]
    if all((s / "LABELS.csv").exists() for s in sets):
        frames = []
        for s in sets:
            d = pd.read_csv(s / "LABELS.csv", dtype=str).dropna(subset=["landmark_id"])
            d["path"] = [str(s / p) for p in d["path"]]
            frames.append(d)
        df = pd.concat(frames)
        source = f"real photos from {shared} (paris6k_subset + multiview_scenes)"
    else:
        df = load_split(data_dir, "train")
        df["landmark_id"] = df["landmark_id"].astype(str)
        source = f"train images of {data_dir} ({shared} not found)"
    df = df[[os.path.exists(p) for p in df["path"]]]
    counts = df.groupby("landmark_id").size()
    labels = sorted(counts[counts >= bc.match_per_class].index)
    if len(labels) < 2:
        raise LandmarksError(f"row 2 needs 2 landmarks with >= {bc.match_per_class} images ({source})")
    step = max(1, len(labels) // bc.match_classes)
    for lab in labels[::step][: bc.match_classes]:
        sub = df[df["landmark_id"] == lab].sort_values("id").head(bc.match_per_class)
        rows += [(str(i), str(lab), str(p)) for i, p in zip(sub["id"], sub["path"])]
    return rows, source


def _match_features(cfg, model_dir, items, cache: Path) -> tuple[list, dict]:
    """Local features of the pair images (max bench.match_features), cached by model + ids + settings.

    Also returns the extraction timing of these real photos (one pass after one warm-up image, from the
    run that filled the cache): {"s": seconds, "n": images, "mpix": mean MP after max_image_size}."""

    e = cfg.extract
    key = digest(
        dir_fingerprint(model_dir),
        json.dumps([items, list(e.local_scales), cfg.bench.match_features, e.abs_thres, e.max_image_size]),
    )
    path = cache / f"match-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            feats = [LocalFeatures(z[f"k{i}"], z[f"d{i}"], z[f"s{i}"], z[f"c{i}"]) for i in range(len(items))]
            timing = json.loads(str(z["timing"])) if "timing" in z.files else {}
            return feats, timing
    configure_tensorflow(cores())
    model = load_delg(model_dir)
    out = []
    from tqdm import tqdm

    def one(p):
        img, scale = load_image(p, e.max_image_size, e.max_image_pixels, e.min_image_size)
        _, lf = postprocess(model(img, list(e.local_scales), cfg.bench.match_features, e.abs_thres, [0]))
        lf.keypoints = (lf.keypoints / np.float32(scale)).astype(np.float32)
        return lf, img.shape[0] * img.shape[1]

    one(items[0][2])  # warm-up
    t, pix = time.perf_counter(), 0
    for _, _, p in tqdm(items, desc="bench: match features", unit="img", disable=None):
        lf, px = one(p)
        pix += px
        out.append(lf)
    timing = {"s": time.perf_counter() - t, "n": len(items), "mpix": pix / len(items) / 1e6}
    arrays = {"timing": np.array(json.dumps(timing))}
    for i, lf in enumerate(out):
        arrays.update({f"k{i}": lf.keypoints, f"d{i}": lf.descriptors, f"s{i}": lf.scales, f"c{i}": lf.scores})
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return out, timing


def _run_matcher(vc, feats, matcher: str) -> tuple[float, float, np.ndarray]:
    """Every image against all others: (matching seconds, RANSAC seconds, inliers [n, n])."""

    n = len(feats)
    inl = np.zeros((n, n), np.int32)
    t_match = t_ransac = 0.0
    for a in range(n):
        cands = [b for b in range(n) if b != a]
        t = time.perf_counter()
        if matcher == "mutual":
            ms = verify.match_mutual_batch(
                feats[a].descriptors, [feats[b].descriptors for b in cands], vc.mutual_min_sim, vc.ratio
            )
        else:
            ms = [verify.match_kdtree(feats[a].descriptors, feats[b].descriptors, vc.kdtree_distance) for b in cands]
        t_match += time.perf_counter() - t
        t = time.perf_counter()
        for b, m in zip(cands, ms):
            inl[a, b] = verify.count_inliers(vc, feats[a].keypoints, feats[b].keypoints, m)
        t_ransac += time.perf_counter() - t
    return t_match, t_ransac, inl


def row_matching(cfg, data_dir, work_dir, model_dir) -> dict:
    """Row 2: both matchers (+ pydegensac) over every ordered pair; pairs/s and mean inliers."""
    bc = cfg.bench
    items, source = _match_images(cfg, data_dir)
    feats, timing = _match_features(cfg, Path(model_dir).resolve(), items, Path(work_dir) / "bench" / "match")
    labels = np.array([lab for _, lab, _ in items])
    n = len(items)
    same = (labels[:, None] == labels[None, :]) & ~np.eye(n, dtype=bool)
    diff = labels[:, None] != labels[None, :]
    pairs = n * (n - 1)
    res = {
        "n": n,
        "pairs": pairs,
        "same": int(same.sum()),
        "diff": int(diff.sum()),
        "source": source,
        "feat_per_img": float(np.mean([len(f) for f in feats])),
        "methods": {},
        "extract": timing,
    }
    base_vc = dataclasses.replace(cfg.verify, matcher="kdtree")
    for name, vc in (
        ("baseline: cKDTree(d<%.2f) + pydegensac" % cfg.verify.kdtree_distance, base_vc),
        (f"default: {cfg.verify.matcher} + pydegensac", cfg.verify),
    ):
        runs = [_run_matcher(vc, feats, vc.matcher) for _ in range(bc.repeats)]
        tm, tr = median([r[0] for r in runs]), median([r[1] for r in runs])
        inl = runs[0][2]
        res["methods"][name] = {
            "match_s": tm,
            "ransac_s": tr,
            "pairs_s": pairs / (tm + tr),
            "inl_same": float(inl[same].mean()) if same.any() else float("nan"),
            "inl_diff": float(inl[diff].mean()) if diff.any() else float("nan"),
            "matcher": vc.matcher,
        }
    (b, base), (_, dflt) = list(res["methods"].items())
    res["speedup"] = dflt["pairs_s"] / base["pairs_s"]
    res["default_pairs_s"] = dflt["pairs_s"]
    return res


def markdown(r: dict) -> list[str]:
    """Row 2's section of bench.md."""
    L = [
        f"Pairs: {r['n']} images ({r['source']}), every ordered pair: {r['pairs']} pairs "
        f"({r['same']} same-landmark, {r['diff']} different); {r['feat_per_img']:.0f} local features/image "
        "(default model, cap bench.match_features). One query image against all others per matcher call, as "
        "verify does for its candidates.",
        "",
        "| method | pairs/s | matching s | RANSAC s | mean inliers same | mean inliers different |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in r["methods"].items():
        L.append(
            f"| {name} | {m['pairs_s']:.1f} | {m['match_s']:.3f} | {m['ransac_s']:.3f} | "
            f"{m['inl_same']:.1f} | {m['inl_diff']:.1f} |"
        )
    ex = r.get("extract") or {}
    if ex.get("n"):
        L += [
            "",
            f"Extraction of these photos (model call + decode + post-processing, one pass, from the run that "
            f"filled the cache): {ex['s'] / ex['n']:.2f} s/image at {ex['mpix']:.2f} MP "
            f"({ex['s'] / ex['n'] / ex['mpix']:.2f} s/MP).",
        ]
    ok = "meets" if r["speedup"] >= 5 else "below"
    dflt = list(r["methods"].values())[1]
    dom = "RANSAC" if dflt["ransac_s"] > dflt["match_s"] else "matching"
    L += [
        "",
        f"Speed-up of the default over the baseline: **{r['speedup']:.2f}x** (aim >= 5x: {ok}); "
        f"the default's time is dominated by {dom} "
        f"({100 * max(dflt['ransac_s'], dflt['match_s']) / (dflt['ransac_s'] + dflt['match_s']):.0f} %).",
    ]
    return L


def summary(r: dict) -> str:
    """Row 2's cell of the summary table."""
    (bn, b), (dn, d) = list(r["methods"].items())
    return (
        f"{d['pairs_s']:.1f} vs {b['pairs_s']:.1f} pairs/s baseline: {r['speedup']:.2f}x (aim >= 5x); "
        f"inliers same/diff {d['inl_same']:.1f}/{d['inl_diff']:.1f} vs {b['inl_same']:.1f}/{b['inl_diff']:.1f}"
    )
