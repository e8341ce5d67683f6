"""CPU seconds of verification (verify.verify_evidence through the hard Scorer, no pair cache) for the
test images of one hard split, without and with views: what the verify stage pays per test image."""

import sys
import time

import numpy as np

from landmarks.config import apply_updates, load_config, parse_overrides
from landmarks.evaluation import hard

cfg = load_config(None)
pool = hard.pool_table(cfg.hard)
paths = sorted((hard.Path("work/hard/hard/probe")).glob(f"probe-{hard.probe_fingerprint(cfg, 'models/default')}-*.h5"))
usable = set(pool["id"])
split = [s for s in hard.make_splits(cfg, pool, usable) if s.name == sys.argv[1]][0]
n = int(sys.argv[2])
lm = [i for i, t in zip(split.solution["id"], split.solution["landmarks"]) if t][: n // 2]
nl = [i for i, t in zip(split.solution["id"], split.solution["landmarks"]) if not t][: n - len(lm)]
queries = lm + nl
settings = {
    name: ov for name, ov in [("no views", [])] + [(k, v) for k, v in hard.VARIANTS.items() if k.startswith("views:")]
}
wanted = set(split.train_ids) | set(queries)
for ov in settings.values():
    c = load_config(None)
    apply_updates(c, parse_overrides(ov))
    wanted |= {hard.view_id(i, *v) for i in queries for v in hard.probe_views(c)}
probe = hard.Probe.load(paths, cfg.hard.probe_scales, wanted)
for name, ov in settings.items():
    c = load_config(None)
    apply_updates(c, parse_overrides(ov))
    scorer = hard.Scorer(probe)
    sims, idx = scorer._global(c, split, queries)
    R = int(c.verify.num_to_rerank)
    cands = [[split.train_ids[j] for j in idx[r, :R] if j >= 0] for r in range(len(queries))]
    for q in queries:  # features selected and merged before timing
        scorer._lf(c, q, views=True)
    t0, w0 = time.process_time(), time.perf_counter()
    ev = scorer.pair_evidence(c, split, queries, cands, test=True)
    cpu = time.process_time() - t0
    nq = np.mean([len(scorer._lf(c, q, views=True)) for q in queries])
    print(f"| {name} | {len(queries)} x {R} | {nq:.0f} | {cpu:.1f} | {cpu / len(queries):.3f} |", flush=True)
