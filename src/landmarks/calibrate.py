"""Calibrated confidence: P(test image shows the candidate's landmark | evidence), learned on train.

A verified candidate carries evidence (``verify.EVIDENCE``: inliers, tentative matches, the spread
of the inliers, the candidate's keypoint area) and its global similarity.  Adding an inlier term
to a similarity (the host formula) gives every photo the +0.07..0.11 that chance inliers bring
(DEGENSAC finds 5-8 inliers between any two photos), so a non-landmark ranks level with a correct
one-shot answer.  Here the evidence is turned into a probability instead:

- ``significance``: the a-contrario significance of the inlier set, -log10 NFA as ORSA /
  AC-RANSAC compute it (Moisan & Stival 2004, Moisan et al. 2016): the expected number of
  false alarms of k inliers among n tentative matches when a random match falls within the
  RANSAC threshold r of the model with probability alpha = pi r^2 / area.  7 inliers among 600
  matches is noise (NFA >> 1), 7 among 12 is not (NFA << 1).
- a small logistic model of P(same landmark | sim, log inliers, log matches, inlier ratio,
  spread, significance), all evidence combined in log-odds; the weights of the evidence that
  can only help (sim, inliers, inlier ratio, spread, significance) are bounded at >= 0, so it is
  monotone in them.  It is fitted on the train split itself, without test labels: train images
  are verified against their own global neighbours; same-label pairs are positives, the others
  negatives.  Where a split has too few positives (one photo per landmark), positives come
  from known warps of train images (perspective + photometric changes, features extracted by
  the same model), as ``make adapt`` makes its pairs.

Stage: ``run_calibrate(cfg, data_dir, knn_path, train_features, model_dir, out)`` ->
WORK_DIR/calibration-<settings>.npz; ``predict`` votes with the probabilities
(``vote.method=calibrated``) and reports them as the confidence.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from landmarks import knn, verify, whiten
from landmarks.datasets import data
from landmarks.datasets.images import load_image
from landmarks.delg.delg_io import load_delg
from landmarks.features import run_model
from landmarks.store import FeatureStore, LocalFeatures, load_npz, save_npz
from landmarks.utils import LandmarksError, cache, configure_tensorflow
from landmarks.verify import GEOMETRIES

log = logging.getLogger(__name__)

FORMAT = "calibration-v1"
# Columns of features(); MONOTONE: the weights that must be >= 0 (more of this never means less likely).
FEATURES = ("sim", "log_inliers", "log_matches", "ratio", "spread", "significance", "sim8", "inliers70")
MONOTONE = {"sim", "log_inliers", "ratio", "spread", "significance", "sim8", "inliers70"}
SIGNIFICANCE_CLIP = (-5.0, 30.0)  # -log10 NFA is clipped: beyond these the evidence is saturated


# -- a-contrario significance -------------------------------------------------------------------
def _log10_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    from scipy.special import gammaln

    return (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)) / math.log(10)


def log10_nfa(inliers, matches, area, threshold: float, min_sample: int = 4) -> np.ndarray:
    """log10 of the number of false alarms of k inliers among n matches (ORSA's NFA).

    NFA = (n - s) C(n, k) C(k, s) alpha^(k - s), s = the model's minimal sample, alpha = pi r^2 /
    area.  k <= s (nothing proven) gives +inf-like large values (n, i.e. as many alarms as matches)."""
    k = np.asarray(inliers, np.float64)
    n = np.maximum(np.asarray(matches, np.float64), k)
    area = np.maximum(np.asarray(area, np.float64), 1.0)
    alpha = np.clip(math.pi * float(threshold) ** 2 / area, 1e-12, 1.0)
    s = float(min_sample)
    ok = k > s
    kk, nn = np.where(ok, k, s + 1), np.where(ok, n, s + 1)
    out = (
        np.log10(np.maximum(nn - s, 1.0))
        + _log10_comb(nn, kk)
        + _log10_comb(kk, np.full_like(kk, s))
        + (kk - s) * np.log10(alpha)
    )
    return np.where(ok, out, np.log10(np.maximum(n, 1.0)) + 1.0)


def significance(evidence: np.ndarray, verify_cfg) -> np.ndarray:
    """-log10 NFA of each candidate's inlier set (evidence [..., 4] as verify.EVIDENCE), clipped."""

    ev = np.asarray(evidence, np.float64)
    s = GEOMETRIES[verify_cfg.geometry][0]
    nfa = log10_nfa(ev[..., 0], ev[..., 1], ev[..., 3], verify_cfg.reproj_threshold, s)
    return np.clip(-nfa, *SIGNIFICANCE_CLIP)


def features(sims: np.ndarray, evidence: np.ndarray, verify_cfg) -> np.ndarray:
    """FEATURES of each candidate: sims [...], evidence [..., 4] -> [..., len(FEATURES)]."""
    ev = np.asarray(evidence, np.float64)
    k, n, spread = ev[..., 0], ev[..., 1], ev[..., 2]
    return np.stack(
        [
            np.asarray(sims, np.float64),
            np.log1p(k),
            np.log1p(n),
            k / np.maximum(n, 1.0),
            spread,
            significance(ev, verify_cfg) / 10.0,
            np.clip(np.asarray(sims, np.float64), 0.0, None) ** 8,  # the host formula's two terms
            np.minimum(k, 70.0) / 70.0,
        ],
        axis=-1,
    )


# -- the model ----------------------------------------------------------------------------------------
def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, monotone: tuple = (), weights=None) -> dict:
    """L2-regularized logistic regression on standardized features; weights of the columns in
    `monotone` bounded at >= 0 (L-BFGS-B).  Returns {mean, scale, coef, intercept}."""
    from scipy.optimize import minimize

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    if len(y) == 0 or y.min() == y.max():
        raise LandmarksError("calibrate: the fit needs positive and negative pairs")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (x - mean) / scale
    d = z.shape[1]
    w = w / w.sum()

    def loss(theta):
        b, c = theta[0], theta[1:]
        t = b + z @ c
        lp = np.logaddexp(0.0, -t)  # -log p
        ln = np.logaddexp(0.0, t)  # -log (1 - p)
        f = float(np.sum(w * (y * lp + (1 - y) * ln))) + 0.5 * l2 * float(c @ c) / len(y)
        p = 1.0 / (1.0 + np.exp(-t))
        g = w * (p - y)
        return f, np.concatenate([[g.sum()], z.T @ g + l2 * c / len(y)])

    bounds = [(None, None)] + [(0.0, None) if j in monotone else (None, None) for j in range(d)]
    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return {"mean": mean, "scale": scale, "coef": res.x[1:], "intercept": float(res.x[0])}


def logit(model: dict, x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64) - model["mean"]) / model["scale"]
    return z @ np.asarray(model["coef"]) + float(model["intercept"])


def probability(model: dict, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logit(model, x)))


def fit_pairs(cfg, sims: np.ndarray, evidence: np.ndarray, same: np.ndarray, prior: float | None = None) -> dict:
    """The calibration model from labelled train pairs (sims [m], evidence [m, 4], same [m] bool).

    Positives and negatives are weighted so that the model's prior is `prior`
    (calibrate.prior; None = the pairs' own share)."""
    cc = cfg.calibrate
    x = features(sims, evidence, cfg.verify)
    y = np.asarray(same, bool)
    if prior is None:
        prior = float(cc.prior)
    wts = None
    if prior > 0 and y.any() and (~y).any():
        wts = np.where(y, prior / y.mean(), (1 - prior) / (1 - y.mean()))
    mono = tuple(j for j, f in enumerate(FEATURES) if f in MONOTONE)
    used = [j for j, f in enumerate(FEATURES) if f in set(cc.features)]
    m = fit_logistic(x[:, used], y, cc.l2, tuple(used.index(j) for j in mono if j in used), wts)
    coef = np.zeros(len(FEATURES))
    mean = np.zeros(len(FEATURES))
    scale = np.ones(len(FEATURES))
    coef[used], mean[used], scale[used] = m["coef"], m["mean"], m["scale"]
    return {
        "mean": mean,
        "scale": scale,
        "coef": coef,
        "intercept": m["intercept"],
        "n_pos": int(y.sum()),
        "n_neg": int((~y).sum()),
    }


def candidate_probability(model: dict, sims: np.ndarray, evidence: np.ndarray, verify_cfg) -> np.ndarray:
    """P(same landmark) of each candidate [q, n] from its similarity and evidence."""
    return probability(model, features(sims, evidence, verify_cfg))


# -- training pairs -----------------------------------------------------------------------------------
def train_pairs(
    train_sims: np.ndarray,
    train_idx: np.ndarray,
    anchors: np.ndarray,
    labels: np.ndarray,
    positives: int,
    negatives: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (anchor, neighbour, sim, same) of train images and their own nearest train neighbours
    (row r of train_sims / train_idx belongs to train image anchors[r]; self excluded): per anchor
    its `positives` nearest same-label and `negatives` nearest other-label neighbours (the hard
    ones, as a test image's wrong candidates are).  Indices are train rows."""
    labels = np.asarray(labels)
    a, b, s = [], [], []
    for r, me in enumerate(np.asarray(anchors, np.int64)):
        n_pos = n_neg = 0
        for sim, j in zip(train_sims[r], train_idx[r]):
            if j < 0 or j == me:
                continue
            same = labels[j] == labels[me]
            if (same and n_pos >= positives) or (not same and n_neg >= negatives):
                continue
            n_pos, n_neg = n_pos + int(same), n_neg + int(not same)
            a.append(int(me))
            b.append(int(j))
            s.append(float(sim))
            if n_pos >= positives and n_neg >= negatives:
                break
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return a, b, np.asarray(s, np.float64), labels[a] == labels[b] if len(a) else np.zeros(0, bool)


def pick_anchors(ids: list[str], seed: int, n: int) -> np.ndarray:
    """Rows of `n` train images chosen by a seeded hash of their ids: a split that shares images with
    another picks the same ones (their verified pairs are reused)."""
    keys = [cache.digest(f"{int(seed)}:{i}") for i in ids]
    return np.sort(np.argsort(keys, kind="stable")[: int(n)])


def warp_image(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A known warp of a photo: a perspective change (zoom 0.6-1, rotation, corner jitter) and a
    photometric one (brightness, contrast, gamma, blur): a positive pair without labels."""
    from PIL import Image, ImageFilter

    h, w = image.shape[:2]
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    c = corners.mean(axis=0)
    s = rng.uniform(0.6, 1.0)
    t = math.radians(rng.uniform(-15, 15) * strength)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    dst = c + s * (corners - c) @ rot.T + rng.uniform(-0.12, 0.12, (4, 2)) * strength * np.array([w, h])
    # PIL wants the output->input map: solve the 8 coefficients of dst -> corners
    a_rows, b_rows = [], []
    for (x, y), (u, v) in zip(dst, corners):
        a_rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b_rows += [u, v]
    coeffs = np.linalg.solve(np.asarray(a_rows), np.asarray(b_rows))
    img = Image.fromarray(image).transform(
        (w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    x = np.asarray(img, np.float32) / 255.0
    x = np.clip((x - 0.5) * rng.uniform(0.6, 1.4) + 0.5 + rng.uniform(-0.2, 0.2), 0.0, 1.0)
    x = np.power(x, rng.uniform(0.6, 1.6))
    img = Image.fromarray((x * 255.0 + 0.5).astype(np.uint8))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    return np.asarray(img, np.uint8)


def warp_seed(image_id: str, seed: int) -> list[int]:
    return [int(seed), int(cache.digest(image_id)[:8], 16)]


# -- stage ------------------------------------------------------------------------------------------
def uses_calibration(cfg) -> bool:
    """True when predict votes with the calibrate stage's model (vote.method=calibrated, verified)."""
    return bool(cfg.verify.enabled and cfg.vote.method == "calibrated")


def calibration_fingerprint(cfg, knn_fp: str) -> str:
    return cache.digest(FORMAT, knn_fp, cache.settings_hash(cfg, *cache.SECTIONS["calibrate"]))


def save(path: str | Path, fingerprint: str, model: dict) -> Path:

    return save_npz(
        path,
        fingerprint,
        features=np.array(FEATURES),
        mean=np.asarray(model["mean"], np.float64),
        scale=np.asarray(model["scale"], np.float64),
        coef=np.asarray(model["coef"], np.float64),
        intercept=np.array(float(model["intercept"])),
        n_pos=np.array(int(model["n_pos"])),
        n_neg=np.array(int(model["n_neg"])),
        n_warp=np.array(int(model.get("n_warp", 0))),
    )


def load(path: str | Path) -> dict:

    if not Path(path).exists():
        raise LandmarksError(f"{path} not found: run `landmarks calibrate` first (make calibrate)")
    z = load_npz(path)
    if tuple(str(f) for f in z["features"]) != FEATURES:
        raise LandmarksError(f"{path} was made with other calibration features: rerun `landmarks calibrate`")
    return {k: (z[k] if z[k].ndim else z[k].item()) for k in z}


def _warp_features(cfg, model_dir, paths: list[str], ids: list[str]) -> tuple[list[int], np.ndarray, list]:
    """Global descriptors and LocalFeatures of the known warp of each image (extract's settings)."""

    e = cfg.extract
    settings = {
        "global_scales": list(e.global_scales),
        "local_scales": list(e.local_scales),
        "max_feature_num": int(e.max_feature_num),
        "abs_thres": e.abs_thres,
    }
    configure_tensorflow(0)
    model = load_delg(model_dir)
    ok, gs, lfs = [], [], []
    for r, (path, image_id) in enumerate(zip(paths, ids)):
        try:
            image, scale = load_image(path, e.max_image_size, e.max_image_pixels, e.min_image_size)
            image = warp_image(image, np.random.default_rng(warp_seed(image_id, cfg.calibrate.seed)))
            g, lf = run_model(model, image, settings, local=True)
        except Exception as err:  # noqa: BLE001 - a photo that fails only gives one positive less
            log.warning("calibrate: warp of %s failed (%s)", image_id, err)
            continue
        h, w = image.shape[:2]
        kp = lf.keypoints
        keep = (kp[:, 0] >= 0) & (kp[:, 0] <= w - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h - 1)
        lfs.append(LocalFeatures(kp[keep] / np.float32(scale), lf.descriptors[keep], lf.scales[keep], lf.scores[keep]))
        gs.append(g)
        ok.append(r)
    return ok, np.asarray(gs, np.float32).reshape(len(gs), -1), lfs


def run_calibrate(
    cfg,
    data_dir,
    knn_path: str | Path,
    train_features: str | Path,
    out: str | Path,
    model_dir: str | Path | None = None,
    whiten_path: str | Path | None = None,
) -> Path:
    """Stage: the calibration model P(same landmark | sim, evidence) of DATA_DIR's train split -> `out`.

    Train images with stored local features (the shortlisted ones, after `landmarks
    local-features`) are verified against their own nearest train neighbours (the knn stage's
    database, DBA included): same landmark_id = positive.  With fewer positives than
    calibrate.min_positives, up to calibrate.warps train images are warped and extracted with
    `model_dir` (known positives).  Skipped when `out` holds this fingerprint."""

    out, train_features = Path(out), Path(train_features)
    knn_out = load_npz(knn_path)
    fp = calibration_fingerprint(cfg, str(knn_out["fingerprint"]))
    if cache.up_to_date(out, fp):
        log.info("calibrate: %s is up to date", out)
        return out
    cc = cfg.calibrate
    train = data.load_split(data_dir, "train")
    label_of = dict(zip(train["id"].astype(str), train["landmark_id"].astype(np.int64)))
    path_of = dict(zip(train["id"].astype(str), train["path"].astype(str)))
    store = FeatureStore(train_features)
    ids, x = store.global_matrix()
    w = whiten.load_whiten(cfg, whiten_path, train_features, "global")
    if w is not None:
        x = whiten.apply_global(w, x)
    db = knn.dba(x, cfg.knn.dba_k, cfg.knn.dba_alpha, cfg.knn) if cfg.knn.dba_k > 0 else x
    labels = np.array([label_of.get(i, -1) for i in ids], np.int64)
    with_local = np.array([store.has_local(i) for i in ids], bool)
    rng = np.random.default_rng(int(cc.seed))
    pool = np.flatnonzero(with_local & (labels >= 0))
    anchors = pool[pick_anchors([ids[i] for i in pool], cc.seed, cc.max_anchors)]
    m = min(len(ids), int(cc.search_depth))
    sims, idx = knn.search(cfg.knn, x[anchors], db, m) if len(anchors) else (np.zeros((0, 0)), np.zeros((0, 0), int))
    idx = np.where(np.isin(idx, pool), idx, -1)  # neighbours without local features are not compared
    a, b, sim, same = train_pairs(sims, idx, anchors, labels, int(cc.positives), int(cc.negatives))
    need = sorted({ids[i] for i in np.concatenate([a, b])})
    local = store.local(need)
    ev = np.zeros((len(a), len(verify.EVIDENCE)))
    for anchor in np.unique(a):
        rows = np.flatnonzero(a == anchor)
        ev[rows] = verify.verify_evidence(cfg.verify, local.get(ids[anchor]), [local.get(ids[j]) for j in b[rows]])
    n_warp = 0
    if int(same.sum()) < int(cc.min_positives) and int(cc.warps) > 0 and model_dir is not None and len(pool):
        pick = np.sort(rng.permutation(pool)[: int(cc.warps)])
        ok, wg, wl = _warp_features(cfg, model_dir, [path_of[ids[t]] for t in pick], [ids[t] for t in pick])
        pick = pick[ok]
        if len(pick):
            if w is not None:
                wg = whiten.apply_global(w, wg)
            ws, wi = knn.search(cfg.knn, wg, db, min(len(ids), int(cc.negatives) + 1))
            extra_local = store.local(sorted({ids[j] for j in wi.ravel() if j >= 0 and with_local[j]}))
            local.update(extra_local)
            for r, t in enumerate(pick):
                row = [int(j) for j in wi[r] if j >= 0 and with_local[j] and j != t]
                cand = [int(t)] + row[: int(cc.negatives)]
                csim = [float(wl_s) for wl_s in (db[cand] @ wg[r])]
                e = verify.verify_evidence(cfg.verify, wl[r], [local.get(ids[j]) for j in cand])
                sim = np.concatenate([sim, csim])
                ev = np.concatenate([ev, e])
                same = np.concatenate([same, labels[cand] == labels[t]])
            n_warp = len(pick)
    if not same.any() or same.all():
        raise LandmarksError(
            f"calibrate: {int(same.sum())} positive and {int((~same).sum())} negative train pairs; "
            "the fit needs both (more train images with local features, or calibrate.warps with a model)"
        )
    model = fit_pairs(cfg, sim, ev, same)
    model["n_warp"] = n_warp
    save(out, fp, model)
    log.info(
        "calibrate: %d positive, %d negative train pairs (%d warped images) -> %s",
        model["n_pos"],
        model["n_neg"],
        n_warp,
        out,
    )
    return out
