"""Pairs/s of verify.matcher=nbb against mutual on the same hard-protocol pairs (docs/nbb.md).

Usage (after `landmarks validate-hard --work-dir work/hard --variant "NBB matcher"`, whose pair
cache and maps probe it reads):
    PYTHONPATH=src .venv/bin/python docs/nbb_pairs_per_second.py work/hard models/default [N]

Takes a seeded sample of test images from the pair cache with all their shortlisted candidates
(about N pairs, default 400; a test image against its candidates, as the verify stage batches
them), loads their local
features from the probe (the default settings) and their NBB maps from the maps probe, then times
`verify.verify_evidence` (matching + RANSAC) per query for each matcher, back to back.  Loading is
not timed; the NBB maps' float32 copies are made inside the timed part, as in a run.
"""

from __future__ import annotations

import copy
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from landmarks.config import load_config
from landmarks.evaluation.hard import Probe, probe_fingerprint
from landmarks.local_features import maps_files
from landmarks.store import FeatureMaps, read_maps
from landmarks.verify import verify_evidence


def main(work: str, model: str, n: int = 400) -> None:
    cfg = load_config(None, [])
    hard_dir = Path(work) / "hard"
    pairs = pickle.loads((hard_dir / f"pairs-{probe_fingerprint(cfg, model)}.pkl").read_bytes())
    cands: dict[str, set[str]] = {}
    for _, q, c in pairs:
        cands.setdefault(q, set()).add(c)
    queries = sorted(cands)
    rng = np.random.default_rng(0)
    groups: dict[str, list[str]] = {}
    for i in rng.permutation(len(queries)):
        if sum(map(len, groups.values())) >= n:
            break
        groups[queries[i]] = sorted(cands[queries[i]])
    ids = {q for q in groups} | {c for cs in groups.values() for c in cs}
    probe = Probe.load(
        sorted((hard_dir / "probe").glob(f"probe-{probe_fingerprint(cfg, model)}-*.h5")), cfg.hard.probe_scales, ids
    )
    e = cfg.extract
    lf = {i: probe.local(i, e.local_scales, int(e.max_feature_num)) for i in ids if i in probe.raw_local}
    nbb = copy.deepcopy(cfg.verify)
    nbb.matcher = "nbb"
    nbb8 = copy.deepcopy(nbb)
    nbb8.reproj_threshold = 8.0
    maps = {
        k: v for k, v in read_maps(maps_files(nbb, hard_dir / "probe-nbb"), ids).items() if isinstance(v, FeatureMaps)
    }
    for name, vc, feats in (("mutual", cfg.verify, lf), ("nbb", nbb, maps), ("nbb, 8 px", nbb8, maps)):
        t0 = time.perf_counter()
        done = 0
        for q, cs in groups.items():
            verify_evidence(vc, feats.get(q), [feats.get(c) for c in cs])
            done += len(cs)
        dt = time.perf_counter() - t0
        print(f"{name}: {done} pairs in {dt:.1f} s = {done / dt:.1f} pairs/s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 400)
