"""Geometric verification of the top global candidates with local features.

For each test image and its top ``num_to_rerank`` train candidates: match local descriptors
(``kdtree``: the host baseline's scipy cKDTree with a distance bound; ``mutual``: mutual nearest
neighbours from one matrix product per test image against all its candidates at once), then fit
a homography (or fundamental matrix) with pydegensac; inliers = RANSAC mask sum.

Determinism: matches are put in a canonical order and pydegensac gets a fixed seed
(cfg.verify.seed), so two runs give identical inlier counts.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from landmarks.utils import LandmarksError, atomic_path, text_digest

log = logging.getLogger("landmarks.verify")

MATCHERS = ("mutual", "kdtree")
MODELS = {"homography": 4, "fundamental": 7}  # minimal sample size; that many matches prove nothing
BATCH_IMAGES = 16  # test images per joblib task (their local features are read together)


# -- matching ----------------------------------------------------------------------------------
def match_kdtree(desc_q: np.ndarray, desc_t: np.ndarray, distance: float, tree=None) -> np.ndarray:
    """Host baseline: for each test descriptor the nearest train descriptor within `distance`.

    Returns [m, 2] int64 (query row, train row) pairs in query order."""
    if len(desc_q) == 0 or len(desc_t) == 0:
        return np.zeros((0, 2), np.int64)
    from scipy.spatial import cKDTree

    tree = tree or cKDTree(desc_t)
    dist, nn = tree.query(desc_q, k=1, distance_upper_bound=distance)
    ok = np.isfinite(dist) & (nn < len(desc_t))
    q = np.flatnonzero(ok)
    return np.stack([q, nn[ok]], axis=1).astype(np.int64)


def _mutual_block(sims: np.ndarray, min_sim: float, ratio: float) -> np.ndarray:
    """Mutual nearest neighbours in one [nq, nt] similarity block."""
    nq, nt = sims.shape
    if nq == 0 or nt == 0:
        return np.zeros((0, 2), np.int64)
    nn12 = sims.argmax(axis=1)
    nn21 = sims.argmax(axis=0)
    q = np.arange(nq)
    best = sims[q, nn12]
    ok = (nn21[nn12] == q) & (best >= min_sim)
    if ratio < 1.0 and nt >= 2:
        second = np.partition(sims, nt - 2, axis=1)[:, nt - 2]
        d1 = np.sqrt(np.clip(2.0 - 2.0 * best, 0, None))
        d2 = np.sqrt(np.clip(2.0 - 2.0 * second, 0, None))
        ok &= d1 < ratio * d2
    return np.stack([q[ok], nn12[ok]], axis=1).astype(np.int64)


def match_mutual(desc_q: np.ndarray, desc_t: np.ndarray, min_sim: float = 0.0, ratio: float = 1.0) -> np.ndarray:
    """Mutual nearest neighbours ("best buddies") of two descriptor sets -> [m, 2] pairs."""
    return _mutual_block(np.asarray(desc_q, np.float32) @ np.asarray(desc_t, np.float32).T, min_sim, ratio)


def match_mutual_batch(desc_q: np.ndarray, descs_t: list[np.ndarray], min_sim: float = 0.0,
                       ratio: float = 1.0) -> list[np.ndarray]:
    """Mutual NN of one test image against many candidates with a single matrix product."""
    if not descs_t:
        return []
    sizes = [len(d) for d in descs_t]
    if sum(sizes) == 0 or len(desc_q) == 0:
        return [np.zeros((0, 2), np.int64) for _ in descs_t]
    dim = desc_q.shape[1]
    cat = np.concatenate([np.asarray(d, np.float32).reshape(len(d), dim) for d in descs_t])
    sims = np.asarray(desc_q, np.float32) @ cat.T
    out, a = [], 0
    for n in sizes:
        out.append(_mutual_block(sims[:, a:a + n], min_sim, ratio))
        a += n
    return out


# -- geometry ----------------------------------------------------------------------------------
def count_inliers(cfg, kp_q: np.ndarray, kp_t: np.ndarray, matches: np.ndarray) -> int:
    """RANSAC inliers of the matched keypoints (pydegensac, seeded); too few matches -> 0."""
    if cfg.geometry not in MODELS:
        raise LandmarksError(f"verify.geometry must be one of {', '.join(MODELS)} (got {cfg.geometry!r})")
    n = len(matches)
    if n <= MODELS[cfg.geometry] or n < cfg.min_matches:
        return 0
    import pydegensac

    m = matches[np.lexsort((matches[:, 1], matches[:, 0]))]  # canonical order
    src = np.ascontiguousarray(kp_q[m[:, 0]], np.float64)
    dst = np.ascontiguousarray(kp_t[m[:, 1]], np.float64)
    seed = int(cfg.seed)
    if cfg.geometry == "homography":
        _, mask = pydegensac.findHomography(src, dst, float(cfg.reproj_threshold), float(cfg.confidence),
                                            int(cfg.max_iters), seed=seed)
    else:
        _, mask = pydegensac.findFundamentalMatrix(src, dst, float(cfg.reproj_threshold), float(cfg.confidence),
                                                   int(cfg.max_iters), seed=seed)
    return int(np.asarray(mask).sum())


def verify_image(cfg, query, candidates: list) -> np.ndarray:
    """Inlier counts of one test image's LocalFeatures against candidate LocalFeatures (None = absent)."""
    out = np.zeros(len(candidates), np.int32)
    if query is None or len(query) == 0 or not candidates:
        return out
    if cfg.matcher not in MATCHERS:
        raise LandmarksError(f"verify.matcher must be one of {', '.join(MATCHERS)} (got {cfg.matcher!r})")
    present = [j for j, c in enumerate(candidates) if c is not None and len(c)]
    if cfg.matcher == "mutual":
        matches = match_mutual_batch(query.descriptors, [candidates[j].descriptors for j in present],
                                     cfg.mutual_min_sim, cfg.ratio)
    else:
        matches = [match_kdtree(query.descriptors, candidates[j].descriptors, cfg.kdtree_distance) for j in present]
    for j, m in zip(present, matches):
        out[j] = count_inliers(cfg, query.keypoints, candidates[j].keypoints, m)
    return out


# -- stage -------------------------------------------------------------------------------------
def _pca_local(lf, w):
    from landmarks.store import LocalFeatures
    from landmarks.whiten import apply_local

    if lf is None or w is None:
        return lf
    return LocalFeatures(lf.keypoints, apply_local(w, lf.descriptors), lf.scales, lf.scores)


_STORES: dict[str, tuple[str, object]] = {}  # per process: directory -> (index digest, FeatureStore)


def _store(directory: str, digest: str):
    """The FeatureStore of `directory` whose index has `digest`, opened once per process: the
    driver builds the index once per stage and persists it; a worker loads that file on its first
    batch and keeps the store (and its open shard handles) for the next ones."""
    from landmarks.store import INDEX_NAME, FeatureStore, StoreIndex, load_index

    have = _STORES.get(directory)
    if have is not None and have[0] == digest:
        return have[1]
    if have is not None:
        have[1].close()
    index = StoreIndex.load(Path(directory) / INDEX_NAME, digest, local_only=True) or load_index(directory)
    store = FeatureStore(directory, index=index)
    _STORES[directory] = (digest, store)
    return store


def _release_stores() -> None:
    for _, store in _STORES.values():
        store.close()
    _STORES.clear()


def _verify_batch(cfg_verify, test_dir: str, train_dir: str, test_ids: list[str], cand_ids: list[list[str]],
                  w_local: dict | None, digests: tuple[str, str] | None = None) -> np.ndarray:
    """One joblib task: read the batch's local features once, verify each test image.

    `digests`: the (test, train) index digests of this stage; None = look the stores up afresh."""
    from landmarks.store import load_index

    if digests is None:
        digests = (load_index(test_dir).digest, load_index(train_dir).digest)
    test_store, train_store = _store(str(test_dir), digests[0]), _store(str(train_dir), digests[1])
    q_local = test_store.local(test_ids)
    t_local = train_store.local(sorted({c for row in cand_ids for c in row}))
    out = np.zeros((len(test_ids), max((len(r) for r in cand_ids), default=0)), np.int32)
    for r, (tid, row) in enumerate(zip(test_ids, cand_ids)):
        q = _pca_local(q_local.get(tid), w_local)
        cands = [_pca_local(t_local.get(c), w_local) for c in row]
        out[r, :len(row)] = verify_image(cfg_verify, q, cands)
    return out


def verify_fingerprint(cfg, knn_fp: str) -> str:
    return text_digest("verify-v1", knn_fp, cfg.section_hash("verify", "whiten"))


def run_verify(cfg, data_dir, work_dir, model_dir, out: str | Path | None = None,
               knn_path: str | Path | None = None, timing: dict | None = None) -> Path:
    """Verify the top num_to_rerank candidates of knn.npz; write WORK_DIR/verified.npz.

    `timing` (optional dict) receives setup_s (knn.npz + id indexes, once per stage) and
    batches_s (the verification batches) for the benchmark.

    verified.npz: test_ids [q], inliers [q, R] int32 (column j = knn column j), fingerprint.
    Train local features missing from the store are extracted on demand (extract.ensure_local).
    """
    from joblib import Parallel, delayed
    from tqdm import tqdm

    from landmarks.knn import load_npz
    from landmarks.store import FeatureStore, load_index

    t_start = time.perf_counter()
    work_dir = Path(work_dir)
    out = Path(out) if out else work_dir / "verified.npz"
    knn = load_npz(Path(knn_path) if knn_path else work_dir / "knn.npz")
    fp = verify_fingerprint(cfg, str(knn["fingerprint"]))
    if out.exists():
        from landmarks.knn import npz_fingerprint

        if npz_fingerprint(out) == fp:
            log.info("verify: %s is up to date", out)
            return out
    vc = cfg.verify
    if vc.matcher not in MATCHERS:
        raise LandmarksError(f"verify.matcher must be one of {', '.join(MATCHERS)} (got {vc.matcher!r})")
    if vc.geometry not in MODELS:
        raise LandmarksError(f"verify.geometry must be one of {', '.join(MODELS)} (got {vc.geometry!r})")
    test_ids = [str(x) for x in knn["test_ids"]]
    train_ids = knn["train_ids"]  # 1.58 M ids: only the shortlisted ones are turned into str below
    R = min(int(vc.num_to_rerank), knn["idx"].shape[1])
    cand = [[str(train_ids[j]) for j in row if j >= 0] for row in knn["idx"][:, :R]]
    test_dir, train_dir = work_dir / "features" / "test", work_dir / "features" / "train"

    digests = []
    for split, directory, wanted in (("test", test_dir, test_ids),
                                     ("train", train_dir, sorted({c for row in cand for c in row}))):
        # the stage's one index build, or the load of the persisted one (its local part is all we need)
        store = FeatureStore(directory, index=load_index(directory, local_only=True))
        missing = [i for i in wanted if not store.has_local(i)]
        if missing:
            store.close()
            log.info("verify: %d %s images lack local features; extracting them", len(missing), split)
            from landmarks import extract

            store = extract.ensure_local(cfg, data_dir, work_dir, model_dir, split, missing)
        _STORES[str(directory)] = (store.index.digest, store)  # the in-process batches use it as is
        digests.append(store.index.digest)
    digests = tuple(digests)

    w_local = None
    if cfg.whiten.local_pca:
        from landmarks import whiten

        w_local = whiten.ensure_whiten(cfg, work_dir)

    t_batches = time.perf_counter()
    batches = [list(range(a, min(a + BATCH_IMAGES, len(test_ids)))) for a in range(0, len(test_ids), BATCH_IMAGES)]
    tasks = (delayed(_verify_batch)(vc, str(test_dir), str(train_dir), [test_ids[r] for r in b],
                                    [cand[r] for r in b], w_local, digests) for b in batches)
    jobs = max(1, int(vc.jobs))
    inliers = np.zeros((len(test_ids), R), np.int32)
    results = Parallel(n_jobs=jobs, return_as="generator")(tasks) if jobs > 1 else (
        _verify_batch(vc, str(test_dir), str(train_dir), [test_ids[r] for r in b], [cand[r] for r in b], w_local,
                      digests)
        for b in batches)
    try:
        with tqdm(total=len(test_ids), desc=f"verify ({vc.matcher})", unit="img", disable=None) as bar:
            for b, res in zip(batches, results):
                inliers[b, :res.shape[1]] = res
                bar.update(len(b))
    finally:
        _release_stores()
    if timing is not None:
        timing.update(setup_s=t_batches - t_start, batches_s=time.perf_counter() - t_batches)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, test_ids=np.array(test_ids, dtype=str), inliers=inliers, fingerprint=np.array(fp))
    log.info("verify: %d test images x %d candidates -> %s", len(test_ids), R, out)
    return out
