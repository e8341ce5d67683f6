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
import threading
import time
from pathlib import Path

import numpy as np

from landmarks import whiten
from landmarks.delg.featuremaps import maps_fingerprint
from landmarks.shards import dask_client, run_on_dask
from landmarks.store import (
    INDEX_NAME,
    FeatureMaps,
    FeatureStore,
    LocalFeatures,
    StoreIndex,
    load_index,
    maps_keys,
    read_maps,
)
from landmarks.utils import LandmarksError, cache
from landmarks.whiten import apply_local

log = logging.getLogger(__name__)

# Geometric models: minimal sample size (that many matches prove nothing) and the pydegensac fit.
# Keys are the choices of config.VerifyConfig.geometry (a test keeps them equal).
GEOMETRIES = {"homography": (4, "findHomography"), "fundamental": (7, "findFundamentalMatrix")}
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


def match_mutual_batch(
    desc_q: np.ndarray, descs_t: list[np.ndarray], min_sim: float = 0.0, ratio: float = 1.0
) -> list[np.ndarray]:
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
        out.append(_mutual_block(sims[:, a : a + n], min_sim, ratio))
        a += n
    return out


def _match_all_kdtree(cfg, desc_q: np.ndarray, descs_t: list[np.ndarray]) -> list[np.ndarray]:
    return [match_kdtree(desc_q, d, cfg.kdtree_distance) for d in descs_t]


def _match_all_mutual(cfg, desc_q: np.ndarray, descs_t: list[np.ndarray]) -> list[np.ndarray]:
    return match_mutual_batch(desc_q, descs_t, cfg.mutual_min_sim, cfg.ratio)


# -- Neural Best-Buddies on feature maps ---------------------------------------------------------
def _standardise(f: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per region (first axis) and channel: zero mean, unit std over the valid cells, then unit rows.

    NBB's "common appearance": both regions are mapped to one mean and spread per channel before
    comparing (the paper's target is the pair's average; here zero / one, which cosine similarity
    compares the same way), so a global change of light or colour cancels out."""
    w = mask[..., None].astype(np.float32)
    n = np.maximum(w.sum(axis=1, keepdims=True), 1.0)
    mu = (f * w).sum(axis=1, keepdims=True) / n
    sd = np.sqrt((((f - mu) * w) ** 2).sum(axis=1, keepdims=True) / n) + 1e-5
    z = (f - mu) / sd * w
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def _window_cells(r: np.ndarray, c: np.ndarray, k: int, radius: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """Flat cell indices [m, n] (n = (k + 2 radius)^2) of the finer map inside each coarse cell's
    footprint (k x k children) widened by `radius` cells, and which of them lie on the map."""
    d = np.arange(-radius, k + radius)
    rows = r[:, None] * k + d[None, :]
    cols = c[:, None] * k + d[None, :]
    rr = np.repeat(rows, len(d), axis=1)
    cc = np.tile(cols, (1, len(d)))
    ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    return np.where(ok, rr * shape[1] + cc, 0), ok


def _region_buddies(fa, fb, ia, ib, oka, okb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours inside each pair of regions: flat cells (a, b) and their cosine."""
    ga = _standardise(fa[ia], oka)
    gb = _standardise(fb[ib], okb)
    sims = np.einsum("mic,mjc->mij", ga, gb)
    sims = np.where(oka[:, :, None] & okb[:, None, :], sims, -np.inf)
    nn12 = sims.argmax(axis=2)  # [m, na]
    nn21 = sims.argmax(axis=1)  # [m, nb]
    m_idx, i_idx = np.nonzero(oka)
    j = nn12[m_idx, i_idx]
    mutual = (nn21[m_idx, j] == i_idx) & okb[m_idx, j]
    m_idx, i_idx, j = m_idx[mutual], i_idx[mutual], j[mutual]
    return ia[m_idx, i_idx], ib[m_idx, j], sims[m_idx, i_idx, j]


def _one_to_one(a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping regions may pair a cell twice: keep each cell's most similar pair only."""
    order = np.argsort(-sim, kind="stable")
    a, b = a[order], b[order]
    _, first_a = np.unique(a, return_index=True)
    a, b = a[np.sort(first_a)], b[np.sort(first_a)]
    _, first_b = np.unique(b, return_index=True)
    keep = np.sort(first_b)
    return a[keep], b[keep]


def match_nbb(vcfg, fa, fb) -> tuple[np.ndarray, np.ndarray]:
    """Neural Best-Buddies (Aberman et al. 2018) of two images' FeatureMaps -> (xy_a, xy_b) [n, 2]
    in original-image pixels, row i of each being one match.

    Deepest layer: mutual nearest neighbours over the whole maps (cells standardised per channel
    over each map).  Each next, shallower layer: for every match of the layer above, mutual
    nearest neighbours among the finer cells inside the two coarse cells' footprints widened by
    verify.nbb_window cells (the paper searches the receptive field; the footprint plus a margin is
    the simplified search region), standardised per region pair.  At every layer a pair is kept
    only when both cells' activation (normalised L2 norm) reaches verify.nbb_min_activation."""

    gamma = float(vcfg.nbb_min_activation)
    levels = len(fa.maps)
    flat_a, flat_b = fa.flat(0)[0], fb.flat(0)[0]
    ia, ib = np.arange(len(flat_a))[None], np.arange(len(flat_b))[None]
    a, b, sim = _region_buddies(flat_a, flat_b, ia, ib, np.ones_like(ia, bool), np.ones_like(ib, bool))
    for lev in range(levels):
        keep = (fa.flat(lev)[1][a] >= gamma) & (fb.flat(lev)[1][b] >= gamma)
        a, b, sim = a[keep], b[keep], sim[keep]
        if lev:
            a, b = _one_to_one(a, b, sim)
        if lev + 1 == levels or not len(a):
            break
        wa, wb = fa.maps[lev].shape[1], fb.maps[lev].shape[1]
        k = max(1, int(round(fa.strides[lev] / fa.strides[lev + 1])))
        ia, oka = _window_cells(a // wa, a % wa, k, int(vcfg.nbb_window), fa.maps[lev + 1].shape[:2])
        ib, okb = _window_cells(b // wb, b % wb, k, int(vcfg.nbb_window), fb.maps[lev + 1].shape[:2])
        a, b, sim = _region_buddies(fa.flat(lev + 1)[0], fb.flat(lev + 1)[0], ia, ib, oka, okb)
    wa, wb = fa.maps[lev].shape[1], fb.maps[lev].shape[1]
    return fa.centres(lev, a // wa, a % wa), fb.centres(lev, b // wb, b % wb)


def nbb_evidence(vcfg, query, candidates: list) -> np.ndarray:
    """EVIDENCE rows of one test image's FeatureMaps against candidates' (None = absent: zeros).

    The matched cell centres are the keypoints; each image's corners join its keypoints so that
    `area` and `spread` measure against the whole image, as the local features' extent does."""
    out = np.zeros((len(candidates), len(EVIDENCE)), np.float64)
    if query is None:
        return out
    for j, cand in enumerate(candidates):
        if cand is None:
            continue
        xy_q, xy_t = match_nbb(vcfg, query, cand)
        n = len(xy_q)
        kp_q = np.concatenate([xy_q, query.extent()])
        kp_t = np.concatenate([xy_t, cand.extent()])
        out[j] = pair_evidence(vcfg, kp_q, kp_t, np.stack([np.arange(n), np.arange(n)], axis=1))
    return out


# Matchers: one test image's descriptors against its candidates' -> [matches (i_q, i_t)] per candidate.
# Keys are the choices of config.VerifyConfig.matcher (a test keeps them equal).
MATCHERS = {"mutual": _match_all_mutual, "kdtree": _match_all_kdtree}
# Matchers of feature maps rather than descriptors: (cfg, query FeatureMaps, [candidate FeatureMaps]) -> EVIDENCE
# rows.  MATCHERS and MAP_MATCHERS together are the choices of config.VerifyConfig.matcher.
MAP_MATCHERS = {"nbb": lambda cfg, query, candidates: nbb_evidence(cfg, query, candidates)}


# -- geometry ----------------------------------------------------------------------------------
def ransac_inliers(cfg, kp_q: np.ndarray, kp_t: np.ndarray, matches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(matches in canonical order, RANSAC inlier mask) of one pair (pydegensac, seeded).

    Too few matches to prove anything (the model's minimal sample, or verify.min_matches) give an
    all-false mask.  The canonical order and the fixed seed make two runs identical."""
    min_sample, fit_name = GEOMETRIES[cfg.geometry]
    m = np.asarray(matches).reshape(-1, 2)
    m = m[np.lexsort((m[:, 1], m[:, 0]))]
    n = len(m)
    if n <= min_sample or n < cfg.min_matches:
        return m, np.zeros(n, bool)
    import pydegensac

    src = np.ascontiguousarray(kp_q[m[:, 0]], np.float64)
    dst = np.ascontiguousarray(kp_t[m[:, 1]], np.float64)
    fit = getattr(pydegensac, fit_name)
    _, mask = fit(src, dst, float(cfg.reproj_threshold), float(cfg.confidence), int(cfg.max_iters), seed=int(cfg.seed))
    return m, np.asarray(mask, bool).reshape(-1)


def count_inliers(cfg, kp_q: np.ndarray, kp_t: np.ndarray, matches: np.ndarray) -> int:
    """RANSAC inliers of the matched keypoints; too few matches -> 0."""
    return int(ransac_inliers(cfg, kp_q, kp_t, matches)[1].sum())


# Evidence of one verified pair, the columns of verify_evidence() and of the verify stage's `evidence`:
# inliers; tentative matches; spread = sqrt(bbox area of the inliers / bbox area of all keypoints), the
# smaller of the two images (inliers piled on one corner prove less than inliers over the building);
# area = bbox area of the candidate's keypoints in pixels (the a-contrario error model's image area).
EVIDENCE = ("inliers", "matches", "spread", "area")


def _bbox_area(pts: np.ndarray) -> float:
    if len(pts) < 2:
        return 0.0
    span = pts.max(axis=0) - pts.min(axis=0)
    return float(span[0] * span[1])


def pair_evidence(cfg, kp_q: np.ndarray, kp_t: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """EVIDENCE of one pair: [inliers, matches, spread, area] (float64)."""
    m, mask = ransac_inliers(cfg, kp_q, kp_t, matches)
    area_t = _bbox_area(np.asarray(kp_t, np.float64))
    k = int(mask.sum())
    spread = 0.0
    if k >= 2:
        area_q = _bbox_area(np.asarray(kp_q, np.float64))
        s_q = _bbox_area(np.asarray(kp_q, np.float64)[m[mask, 0]]) / max(area_q, 1e-9)
        s_t = _bbox_area(np.asarray(kp_t, np.float64)[m[mask, 1]]) / max(area_t, 1e-9)
        spread = float(np.sqrt(np.clip(min(s_q, s_t), 0.0, 1.0)))
    return np.array([k, len(m), spread, area_t], np.float64)


def verify_evidence(cfg, query, candidates: list) -> np.ndarray:
    """EVIDENCE rows [n, 4] of one test image's LocalFeatures against candidates (None = absent: zeros);
    with verify.matcher=nbb, of its FeatureMaps against the candidates' FeatureMaps."""
    if cfg.matcher in MAP_MATCHERS:
        if query is not None and not isinstance(query, FeatureMaps):
            raise LandmarksError("verify.matcher=nbb compares feature maps, not local features (docs/nbb.md)")
        return MAP_MATCHERS[cfg.matcher](cfg, query, candidates)
    out = np.zeros((len(candidates), len(EVIDENCE)), np.float64)
    if query is None or len(query) == 0 or not candidates:
        return out
    present = [j for j, c in enumerate(candidates) if c is not None and len(c)]
    matches = MATCHERS[cfg.matcher](cfg, query.descriptors, [candidates[j].descriptors for j in present])
    for j, m in zip(present, matches):
        out[j] = pair_evidence(cfg, query.keypoints, candidates[j].keypoints, m)
    return out


def verify_image(cfg, query, candidates: list) -> np.ndarray:
    """Inlier counts of one test image's LocalFeatures against candidate LocalFeatures (None = absent)."""
    return verify_evidence(cfg, query, candidates)[:, 0].astype(np.int32)


# -- stage -------------------------------------------------------------------------------------
def pca_local(lf, w):

    if lf is None or w is None:
        return lf
    return LocalFeatures(lf.keypoints, apply_local(w, lf.descriptors), lf.scales, lf.scores)


_STORES: dict[str, tuple[str, object]] = {}  # per process: directory -> (index digest, FeatureStore)
_STORES_LOCK = threading.Lock()  # a dask worker runs its tasks in threads of one process


def _store(directory: str, digest: str):
    """The FeatureStore of `directory` whose index has `digest`, opened once per process: the
    driver builds the index once per stage and persists it; a worker (joblib process or dask
    worker) loads that file on its first batch and keeps the store (and its open shard handles)
    for the next ones."""

    with _STORES_LOCK:
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


def _verify_batch(
    cfg_verify,
    test_dir: str,
    train_dir: str,
    test_ids: list[str],
    cand_ids: list[list[str]],
    w_local: dict | None,
    digests: tuple[str, str] | None = None,
) -> np.ndarray:
    """One joblib task: read the batch's local features once, verify each test image -> EVIDENCE
    [b, R, 4] per candidate.

    `digests`: the (test, train) index digests of this stage; None = look the stores up afresh."""

    if cfg_verify.matcher == "nbb":
        return _nbb_batch(cfg_verify, test_dir, train_dir, test_ids, cand_ids)
    if digests is None:
        digests = (load_index(test_dir).digest, load_index(train_dir).digest)
    test_store, train_store = _store(str(test_dir), digests[0]), _store(str(train_dir), digests[1])
    q_local = test_store.local(test_ids)
    t_local = train_store.local(sorted({c for row in cand_ids for c in row}))
    out = np.zeros((len(test_ids), max((len(r) for r in cand_ids), default=0), len(EVIDENCE)), np.float64)
    for r, (tid, row) in enumerate(zip(test_ids, cand_ids)):
        q = pca_local(q_local.get(tid), w_local)
        cands = [pca_local(t_local.get(c), w_local) for c in row]
        out[r, : len(row)] = verify_evidence(cfg_verify, q, cands)
    return out


def _maps_paths(vc, directory) -> list[Path]:
    return sorted(Path(directory).glob(f"nbb-maps-{maps_fingerprint(vc)}-*.h5"))


def _nbb_batch(vc, test_dir: str, train_dir: str, test_ids: list[str], cand_ids: list[list[str]]) -> np.ndarray:
    """One batch with verify.matcher=nbb: the NBB maps of the batch's images, read once -> EVIDENCE."""
    q_maps = read_maps(_maps_paths(vc, test_dir), set(test_ids))
    t_maps = read_maps(_maps_paths(vc, train_dir), {c for row in cand_ids for c in row})
    out = np.zeros((len(test_ids), max((len(r) for r in cand_ids), default=0), len(EVIDENCE)), np.float64)
    for r, (tid, row) in enumerate(zip(test_ids, cand_ids)):
        q = q_maps.get(tid)
        cands = [t_maps.get(c) for c in row]
        out[r, : len(row)] = nbb_evidence(
            vc, q if isinstance(q, FeatureMaps) else None, [c if isinstance(c, FeatureMaps) else None for c in cands]
        )
    return out


def _check_maps(vc, test_features: Path, train_features: Path, test_ids: list[str], cand: list[list[str]]) -> None:
    """verify.matcher=nbb: every image to compare has a maps row (failures count as present)."""
    for split, directory, wanted in (
        ("test", test_features, test_ids),
        ("train", train_features, sorted({c for row in cand for c in row})),
    ):
        have: set[str] = set()
        for p in _maps_paths(vc, directory):
            have |= set(maps_keys(p))
        missing = [i for i in wanted if i not in have]
        if missing:
            raise LandmarksError(
                f"verify: {len(missing)} {split} images to compare have no NBB feature maps "
                f"(e.g. {missing[0]}): run `landmarks local-features` with verify.matcher=nbb first"
            )


def verify_fingerprint(cfg, knn_fp: str) -> str:
    """Inputs of the verify stage: the knn output's fingerprint and the verify + whiten settings."""
    return cache.fingerprint("verify", cfg, [knn_fp])


def _open_stores(
    test_features: Path, train_features: Path, test_ids: list[str], cand: list[list[str]]
) -> tuple[str, str]:
    """Open both stores once for the stage (the persisted id index), check that every image to
    compare has its local features, and return the index digests the batches use."""

    digests = []
    for split, directory, wanted in (
        ("test", test_features, test_ids),
        ("train", train_features, sorted({c for row in cand for c in row})),
    ):
        store = FeatureStore(directory, index=load_index(directory, local_only=True))
        missing = [i for i in wanted if not store.has_local(i)]
        if missing:  # images whose extraction failed are compared as featureless, not re-asked for
            failed = FeatureStore(directory).failures()
            missing = [i for i in missing if i not in failed]
        if missing:
            store.close()
            raise LandmarksError(
                f"verify: {len(missing)} {split} images to compare have no local features "
                f"(e.g. {missing[0]}): run `landmarks local-features` first (make local-features)"
            )
        _STORES[str(directory)] = (store.index.digest, store)  # the in-process batches use it as is
        digests.append(store.index.digest)
    return digests[0], digests[1]


def _run_batches(
    vc,
    test_features: Path,
    train_features: Path,
    test_ids: list[str],
    cand: list[list[str]],
    w_local: dict | None,
    digests: tuple[str, str],
    R: int,
    scheduler=None,
) -> np.ndarray:
    """EVIDENCE [q, R, 4]: batches of BATCH_IMAGES test images, in worker processes when verify.jobs > 1,
    or as tasks on a Dask cluster when `scheduler` (an address or a Client) is given."""
    from tqdm import tqdm

    batches = [list(range(a, min(a + BATCH_IMAGES, len(test_ids)))) for a in range(0, len(test_ids), BATCH_IMAGES)]
    args = [
        (
            vc,
            str(Path(test_features).resolve()),  # absolute: dask workers may run in another directory
            str(Path(train_features).resolve()),
            [test_ids[r] for r in b],
            [cand[r] for r in b],
            w_local,
            digests,
        )
        for b in batches
    ]
    evidence = np.zeros((len(test_ids), R, len(EVIDENCE)), np.float64)
    with tqdm(total=len(test_ids), desc=f"verify ({vc.matcher})", unit="img", disable=None) as bar:
        for k, res in _batch_results(args, int(vc.jobs), scheduler):
            b = batches[k]
            evidence[b, : res.shape[1]] = res
            bar.update(len(b))
    return evidence


def _batch_results(args: list[tuple], jobs: int, scheduler):
    """(batch number, evidence) of every batch: in this process, on joblib workers, or on Dask."""
    if scheduler:
        yield from _dask_results(args, scheduler)
        return
    jobs = max(1, jobs)
    if jobs > 1:
        from joblib import Parallel, delayed

        yield from enumerate(Parallel(n_jobs=jobs, return_as="generator")(delayed(_verify_batch)(*a) for a in args))
        return
    for k, a in enumerate(args):
        yield k, _verify_batch(*a)


def _dask_results(args: list[tuple], scheduler):
    """The batches as tasks on a Dask cluster (each worker opens the stores' persisted id index
    once, ``_store``); `shards.run_on_dask` watches the workers and reruns what a lost one held.  A
    batch's result depends only on its inputs, so the output equals a local run's."""
    with dask_client(scheduler) as client:
        log.info(
            "verify: %d batches of <= %d test images on dask %s (%d workers)",
            len(args),
            BATCH_IMAGES,
            client.scheduler.address,
            len(client.scheduler_info().get("workers", {})),
        )
        names = [f"batch-{k}" for k in range(len(args))]
        yield from run_on_dask(client, _verify_batch, args, names, "batch")


def run_verify(
    cfg,
    knn_path: str | Path,
    test_features: str | Path,
    train_features: str | Path,
    out: str | Path,
    whiten_path: str | Path | None = None,
    timing: dict | None = None,
    scheduler=None,
) -> Path:
    """Stage: inliers of the top verify.num_to_rerank candidates of a knn output -> `out`.

    Needs the local features of the test images and their shortlisted train images
    (`landmarks local-features`).  `timing` (optional dict) receives setup_s (knn output + id
    indexes, once per stage) and batches_s (the verification batches) for the benchmark.
    `scheduler`: a dask address (tcp://host:8786) or Client to run the batches on (default:
    extract.scheduler, the features' cluster; empty = local joblib workers, verify.jobs).
    Output npz: test_ids [q], inliers [q, R] int32 (column j = knn column j), evidence [q, R, 4]
    float32 (columns verify.EVIDENCE: inliers, tentative matches, spread, area), fingerprint.
    """

    t_start = time.perf_counter()
    test_features, train_features, out = Path(test_features), Path(train_features), Path(out)
    knn = cache.load_npz(knn_path, "`landmarks knn`")
    fp = verify_fingerprint(cfg, str(knn["fingerprint"]))
    if cache.up_to_date(out, fp):
        log.info("verify: %s is up to date", out)
        return out
    vc = cfg.verify
    test_ids = [str(x) for x in knn["test_ids"]]
    train_ids = knn["train_ids"]  # 1.58 M ids: only the shortlisted ones are turned into str below
    R = min(int(vc.num_to_rerank), knn["idx"].shape[1])
    cand = [[str(train_ids[j]) for j in row if j >= 0] for row in knn["idx"][:, :R]]
    try:
        if vc.matcher == "nbb":
            _check_maps(vc, test_features, train_features, test_ids, cand)
        digests = _open_stores(test_features, train_features, test_ids, cand)
        w_local = whiten.load_whiten(cfg, whiten_path, train_features, "local")
        t_batches = time.perf_counter()
        scheduler = cfg.extract.scheduler if scheduler is None else scheduler
        evidence = _run_batches(vc, test_features, train_features, test_ids, cand, w_local, digests, R, scheduler)
    finally:
        _release_stores()
    if timing is not None:
        timing.update(setup_s=t_batches - t_start, batches_s=time.perf_counter() - t_batches)
    cache.save_npz(
        out,
        fp,
        test_ids=np.array(test_ids, dtype=str),
        inliers=evidence[..., 0].astype(np.int32),
        evidence=evidence.astype(np.float32),
        evidence_columns=np.array(EVIDENCE),
    )
    log.info("verify: %d test images x %d candidates -> %s", len(test_ids), R, out)
    return out
