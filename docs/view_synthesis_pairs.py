"""Wide-baseline correct pairs, pair by pair: inliers of each landmark test image against its
shortlisted correct-class train images (P1 splits), default against view settings; optional
near-duplicate removal of view features (cosine > DEDUPE to an original feature) as an experiment."""

import sys
import time

import numpy as np

from landmarks import views as V
from landmarks.config import apply_updates, load_config, parse_overrides
from landmarks.evaluation import hard, validate
from landmarks.store import LocalFeatures

cfg = load_config(None)
pool = hard.pool_table(cfg.hard)
paths = sorted(hard.Path("work/hard/hard/probe").glob(f"probe-{hard.probe_fingerprint(cfg, 'models/default')}-*.h5"))
splits = [s for s in hard.make_splits(cfg, pool, set(pool["id"])) if s.protocol == "extra"]
orig_merge = V.merge_views


def dedupe_merge(thr):
    def merge(original, views, cap, per_view):
        kept = []
        for v in views:
            if len(v) and len(original):
                sim = (v.descriptors @ original.descriptors.T).max(axis=1)
                keep = sim < thr
                v = LocalFeatures(v.keypoints[keep], v.descriptors[keep], v.scales[keep], v.scores[keep])
            kept.append(v)
        return orig_merge(original, kept, cap, per_view)

    return merge


SETTINGS = [("default", [], None)] + [
    (a, b, c)
    for a, b, c in [
        ("t2a0 +1000", ["extract.view_tilts=2", "extract.view_angles=0", "extract.view_features=1000"], None),
        ("t2a0 +1000 dedupe 0.9", ["extract.view_tilts=2", "extract.view_angles=0", "extract.view_features=1000"], 0.9),
        ("t2a0 +1000 dedupe 0.8", ["extract.view_tilts=2", "extract.view_angles=0", "extract.view_features=1000"], 0.8),
        ("t2a0,90 +500", ["extract.view_tilts=2", "extract.view_angles=0,90", "extract.view_features=500"], None),
        (
            "t2a0,90 +500 dedupe 0.9",
            ["extract.view_tilts=2", "extract.view_angles=0,90", "extract.view_features=500"],
            0.9,
        ),
    ]
    if a in sys.argv[1:]
]
for arg in sys.argv[1:]:  # generic "t<T>a<A,B>+<N>": tilt T at angles A, B, N features per view
    if arg.startswith("t") and "+" in arg:
        t, rest = arg[1:].split("a")
        ang, n = rest.split("+")
        SETTINGS.append(
            (arg, [f"extract.view_tilts={t}", f"extract.view_angles={ang}", f"extract.view_features={n}"], None)
        )
queries = sorted({q for s in splits for q, t in zip(s.solution["id"], s.solution["landmarks"]) if t})
wanted = {i for s in splits for i in s.train_ids} | set(queries)
for _, ov, _ in SETTINGS:
    c = load_config(None)
    apply_updates(c, parse_overrides(ov))
    wanted |= {hard.view_id(i, *v) for i in queries for v in hard.probe_views(c)}
rows = pool[pool["id"].isin(queries)]
for _, ov, _ in SETTINGS:
    c = load_config(None)
    apply_updates(c, parse_overrides(ov))
    for v in hard.probe_views(c):
        paths = hard.extract_probe(c, rows, "models/default", "work/hard/hard", view=v)
probe = hard.Probe.load(paths, cfg.hard.probe_scales, wanted)
base = None
for name, ov, thr in SETTINGS:
    c = load_config(None)
    apply_updates(c, parse_overrides(ov))
    hard.merge_views = dedupe_merge(thr) if thr else orig_merge
    scorer = hard.Scorer(probe)
    t0 = time.process_time()
    good, bad = [], []
    for s in splits:
        lm = [i for i, t in zip(s.solution["id"], s.solution["landmarks"]) if t]
        truth = np.array([t for t in s.solution["landmarks"] if t])
        sims, idx = scorer._global(c, s, lm)
        R = int(c.verify.num_to_rerank)
        cands = [[s.train_ids[j] for j in idx[r, :R] if j >= 0] for r in range(len(lm))]
        ev = scorer.pair_evidence(c, s, lm, cands, test=True)
        labels = np.where(idx[:, :R] >= 0, s.train_labels[np.clip(idx[:, :R], 0, None)], -1).astype(str)
        g, b = validate.split_inliers(labels, truth, ev[..., 0].astype(np.int64))
        good.append(g)
        bad.append(b)
    g, b = np.concatenate(good), np.concatenate(bad)
    sep = validate.separation(g, b)
    nq = np.mean([len(scorer._lf(c, q, views=True)) for q in queries])
    line = f"| {name} | {nq:.0f} | {sep['good_q10']:.0f}/{sep['good_q50']:.0f}/{sep['good_q90']:.0f} | {sep['floor']:.0f} | {sep['good_at_floor']:.3f} | {sep['auc']:.3f} |"
    if base is None:
        base = (g, b, sep["floor"])
    else:
        g0, b0, f0 = base
        line += f" {int((g0 > f0).sum())} -> {int((g > f0).sum())} | {int(((g0 <= f0) & (g > f0)).sum())} / {int(((g0 > f0) & (g <= f0)).sum())} | {int((b0 > f0).sum())} -> {int((b > f0).sum())} |"
    print(line + f" {time.process_time() - t0:.0f} s", flush=True)
