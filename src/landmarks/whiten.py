"""Learned post-processing fitted on the train split, stored in WORK_DIR/whiten-<hash>.npz.

- Global: PCA-whitening (cirtorch's unsupervised "whitening" of GeM vectors): centre on the
  train mean, rotate onto the principal axes, divide by sqrt(eigenvalue + eps), optionally keep
  the top ``global_pca_dim`` axes, L2-normalise.  Flattens the dominant, uninformative
  directions that make unrelated images look alike.
- Global, learned from matching pairs (``global_lw``; the "Lw" of Radenović, Tolias, Chum,
  TPAMI 2018, cirtorch's ``whitenlearn``): whiten by the inverse square root of the covariance
  of positive-pair differences (what varies within one landmark: viewpoint, light), shrunk toward
  a scaled identity because train pairs are few, then rotate onto the principal axes of the
  whitened train data, optionally keep the top ``lw_dim``, L2-normalise.  Positives
  (``positives``): the train labels (pooled within-landmark covariance) or, without labels,
  mutual global nearest neighbours among the train images (``mine_pairs``).
- Query feature transformation (``query_transform``; Mercari's "closing the gap between query and
  database"): a ridge-regularised linear map, learned on the same positives, that sends a train
  descriptor toward the other descriptors of its landmark; applied to the test queries only.
- Local: PCA of local descriptors (DELF recipe: mean, projection to ``local_pca_dim``, no
  whitening, L2-normalise).

All are off by default (cfg.whiten.*).  Stage ``landmarks whiten`` fits them; knn, verify and
predict read the file (``load_whiten``) when they are on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from landmarks.datasets import data
from landmarks.store import SHARD_GLOB, FeatureStore
from landmarks.utils import LandmarksError, cache, l2_normalize

log = logging.getLogger(__name__)
EPS_REL = 1e-3  # eigenvalue regulariser, relative to the largest eigenvalue
LOCAL_SAMPLE = 200_000  # local descriptors used to fit the local PCA
MINE_SAMPLE = 50_000  # train images mined for positive pairs (a seeded sample above it: n^2 search)
# train images Lw / the query transform learn from with label positives: a seeded sample above it keeps
# the float64 fit at ~2 GB (GLDv2: 1.58 M images, ~19 per class, still ~2.4 per class in the sample)
LABEL_SAMPLE = 200_000
MINE_BLOCK = 2048  # rows per similarity block when mining


def _pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eig, vec = np.linalg.eigh(cov)
    order = np.argsort(eig)[::-1]
    eig, vec = np.clip(eig[order], 0, None), vec[:, order]
    # fixed sign per axis so the fit is reproducible
    signs = np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])])
    vec = vec * np.where(signs == 0, 1, signs)
    return mean, eig, vec


def fit_global(x: np.ndarray, dim: int = 0) -> dict:
    """PCA-whitening of [n, D] unit rows -> {'g_mean' [D], 'g_proj' [D, d]}."""
    if x.shape[0] < 2:
        raise LandmarksError("whiten: need at least 2 train global descriptors to fit PCA-whitening")
    mean, eig, vec = _pca(x)
    d = dim or x.shape[1]
    d = min(d, x.shape[1])
    scale = 1.0 / np.sqrt(eig[:d] + EPS_REL * max(eig[0], 1e-12))
    return {"g_mean": mean.astype(np.float32), "g_proj": (vec[:, :d] * scale).astype(np.float32)}


def class_differences(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of classes with >= 2 members minus their class mean: R with R^T R / dof the pooled
    within-class covariance (= the covariance of same-label pair differences / 2, each class
    weighted by its size).  Returns (R [m, D], dof = sum over those classes of size - 1; 0 = none)."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    if not len(x):
        return np.zeros((0, x.shape[1])), 0
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = counts[inv] >= 2
    sums = np.zeros((len(uniq), x.shape[1]))
    np.add.at(sums, inv, x)
    centred = x[keep] - (sums / counts[:, None])[inv[keep]]
    return centred, int((counts[counts >= 2] - 1).sum())


def pair_differences(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """(x[a] - x[b]) / sqrt(2) of positive pairs (the scale of class_differences) and their count."""
    x = np.asarray(x, np.float64)
    diff = (x[np.asarray(a, np.int64)] - x[np.asarray(b, np.int64)]) / np.sqrt(2.0)
    return diff, int(len(diff))


def _eig_within(rows: np.ndarray, dof: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors [D, r] of rows^T rows / dof: an economy SVD when there are
    fewer rows than dimensions (the usual few train pairs), else the covariance's eigh."""
    rows = np.asarray(rows, np.float64)
    if len(rows) < rows.shape[1]:
        _, sv, vt = np.linalg.svd(rows, full_matrices=False)
        return sv**2 / dof, vt.T
    return np.linalg.eigh(rows.T @ rows / dof)


def centre_only(x: np.ndarray) -> dict:
    """Lw at full shrinkage (no positives to learn from): centre on the train mean, nothing else."""
    x = np.asarray(x, np.float64)
    return {"g_mean": x.mean(axis=0).astype(np.float32), "g_proj": np.eye(x.shape[1], dtype=np.float32)}


def fit_lw(x: np.ndarray, within: np.ndarray, dof: int, dim: int = 0, shrinkage: float = 0.1) -> dict:
    """Learned whitening (Lw) of [n, D] train rows given within-landmark difference rows `within`
    (class_differences or pair_differences; covariance within^T within / dof)
    -> {'g_mean' [D], 'g_proj' [D, d]} (apply_global).

    Centre on the train mean; multiply by S^(-1/2), S = the within covariance shrunk toward a
    scaled identity (directions that vary between photos of one landmark shrink, the others
    grow); with `dim` rotate onto the top `dim` principal axes of the whitened train rows (no
    second scaling, as cirtorch's whitenlearn).  Without `dim` the rotation is left out: it
    changes no cosine similarity."""
    x = np.asarray(x, np.float64)
    if x.shape[0] < 2:
        raise LandmarksError("whiten: need at least 2 train global descriptors to fit learned whitening")
    if dof < 1:
        raise LandmarksError("whiten: learned whitening needs at least one positive pair")
    d_in = x.shape[1]
    eig, vec = _eig_within(within, dof)
    eig = np.clip(eig, 0, None)
    rest = float(shrinkage) * eig.sum() / d_in  # the shrunk covariance's eigenvalue off the pairs' span
    shrunk = (1.0 - float(shrinkage)) * eig + rest
    floor = EPS_REL * max(shrunk.max(), 1e-12)
    p = (vec * (1.0 / np.sqrt(np.maximum(shrunk, floor)) - 1.0 / np.sqrt(max(rest, floor)))) @ vec.T
    p[np.diag_indices(d_in)] += 1.0 / np.sqrt(max(rest, floor))  # symmetric inverse square root of S
    mean = x.mean(axis=0)
    if not dim or dim >= d_in:
        return {"g_mean": mean.astype(np.float32), "g_proj": p.astype(np.float32)}
    z = (x - mean) @ p
    if len(z) < d_in:
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        rot = vt.T
    else:
        _, _, rot = _pca(z)
    rot = rot[:, : min(int(dim), rot.shape[1])]
    signs = np.sign(rot[np.abs(rot).argmax(axis=0), np.arange(rot.shape[1])])  # reproducible axes
    rot = rot * np.where(signs == 0, 1, signs)
    return {"g_mean": mean.astype(np.float32), "g_proj": (p @ rot).astype(np.float32)}


def mine_pairs(x: np.ndarray, k: int = 2, min_sim: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Positive pairs without labels: rows that are each other's top-`k` neighbours (cosine, self
    left out) with similarity >= `min_sim`.  Returns (a, b) with a < b, sorted; deterministic."""
    x = np.asarray(x, np.float32)
    n = len(x)
    if n < 2 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k = min(int(k), n - 1)
    nbr = np.empty((n, k), np.int64)
    for a0 in range(0, n, MINE_BLOCK):
        sims = x[a0 : a0 + MINE_BLOCK] @ x.T
        sims[np.arange(len(sims)), np.arange(a0, a0 + len(sims))] = -np.inf
        sims[sims < min_sim] = -np.inf
        order = np.lexsort((np.broadcast_to(np.arange(n), sims.shape), -sims), axis=1)[:, :k]
        ok = np.take_along_axis(sims, order, 1) > -np.inf
        nbr[a0 : a0 + len(sims)] = np.where(ok, order, -1)
    a = np.repeat(np.arange(n), k)
    b = nbr.ravel()
    good = b >= 0
    a, b = a[good], b[good]
    edges = set(zip(a.tolist(), b.tolist()))
    mutual = [(i, j) for i, j in edges if i < j and (j, i) in edges]
    mutual.sort()
    if not mutual:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.asarray(mutual, np.int64)
    return arr[:, 0], arr[:, 1]


def class_targets(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regression pairs from labels: each row of a class with >= 2 rows, and the normalised mean of
    the other rows of its class (what a query should look like to find its landmark)."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    keep = counts[inv] >= 2
    sums = np.zeros((len(uniq), x.shape[1]))
    np.add.at(sums, inv, x)
    others = sums[inv[keep]] - x[keep]
    return x[keep], l2_normalize(others).astype(np.float64)


def pair_targets(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regression pairs from positive pairs, both ways: (x[a], x[b]) and (x[b], x[a])."""
    x = np.asarray(x, np.float64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return np.concatenate([x[a], x[b]]), np.concatenate([x[b], x[a]])


def fit_query_transform(src: np.ndarray, dst: np.ndarray, l2: float = 1.0) -> dict:
    """Query feature transformation: W minimising |src W - dst|^2 + lam |W - I|^2 (ridge toward the
    identity, lam = l2 x the mean eigenvalue of src^T src) -> {'q_map' [D, D]}.  With no pairs W = I."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    d = src.shape[1]
    if not len(src):
        return {"q_map": np.eye(d, dtype=np.float32)}
    gram = src.T @ src
    lam = float(l2) * max(np.trace(gram) / d, 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(d), src.T @ dst + lam * np.eye(d))
    return {"q_map": w.astype(np.float32)}


def apply_query(w: dict, x: np.ndarray) -> np.ndarray:
    """Test-side descriptors: the global whitening, then the query transformation when fitted."""
    x = apply_global(w, x)
    if "q_map" not in w or x.shape[0] == 0:
        return x
    return l2_normalize(x @ w["q_map"])


def fit_global_learned(cfg, x: np.ndarray, labels: np.ndarray | None) -> dict:
    """The global part of cfg.whiten fitted on train rows x [n, D] (labels [n] when
    whiten.positives is 'labels'): PCA-whitening or Lw, then the query transformation, each when
    on.  The one entry point of the whiten stage and of the hard protocol."""
    wc = cfg.whiten
    if wc.global_pca and wc.global_lw:
        raise LandmarksError("whiten.global_pca and whiten.global_lw are exclusive: switch one off")
    out: dict = {}
    a = b = None
    if wc.global_lw or wc.query_transform:
        if wc.positives == "labels":
            if labels is None:
                raise LandmarksError("whiten.positives=labels needs the train labels")
        else:
            # mined on the centred rows: raw GeM vectors share a large common component (cosine
            # > 0.6 between different landmarks), centred ones do not
            a, b = mine_pairs(l2_normalize(x - np.mean(x, axis=0)), int(wc.mine_k), float(wc.mine_min_sim))
    if wc.global_pca:
        out.update(fit_global(x, wc.global_pca_dim))
    elif wc.global_lw:
        within, n = class_differences(x, labels) if a is None else pair_differences(x, a, b)
        if n < max(1, int(wc.lw_min_pairs)):  # expected with one train photo per landmark: not a problem
            log.info(
                "whiten: %d positives (< whiten.lw_min_pairs %d): Lw at full shrinkage (centring on the train mean)",
                n,
                wc.lw_min_pairs,
            )
            out.update(centre_only(x))
        else:
            out.update(fit_lw(x, within, n, int(wc.lw_dim), float(wc.lw_shrinkage)))
        log.info("whiten: Lw from %d %s positives", n, wc.positives)
    if wc.query_transform:
        xw = apply_global(out, x) if out else np.asarray(x, np.float32)
        src, dst = class_targets(xw, labels) if a is None else pair_targets(xw, a, b)
        out.update(fit_query_transform(src, dst, float(wc.qt_l2)))
        log.info("whiten: query transformation from %d regression pairs", len(src))
    return out


def fit_local(desc: np.ndarray, dim: int = 128) -> dict:
    """PCA (no whitening) of local descriptors -> {'l_mean' [d0], 'l_proj' [d0, dim]}."""
    if desc.shape[0] < 2:
        raise LandmarksError(
            "whiten: need local descriptors of train images to fit the local PCA "
            "(set extract.train_local=true or disable whiten.local_pca)"
        )
    mean, _, vec = _pca(desc)
    dim = min(dim or desc.shape[1], desc.shape[1])
    return {"l_mean": mean.astype(np.float32), "l_proj": vec[:, :dim].astype(np.float32)}


def apply_global(w: dict, x: np.ndarray) -> np.ndarray:
    """Whitened unit rows (x itself when `w` holds no global whitening, e.g. the query transform alone)."""
    if "g_proj" not in w:
        return np.asarray(x, np.float32)
    if x.shape[0] == 0:
        return np.zeros((0, w["g_proj"].shape[1]), np.float32)
    return l2_normalize((np.asarray(x, np.float32) - w["g_mean"]) @ w["g_proj"])


def apply_local(w: dict, d: np.ndarray) -> np.ndarray:
    if d.shape[0] == 0:
        return np.zeros((0, w["l_proj"].shape[1]), np.float32)
    return l2_normalize((np.asarray(d, np.float32) - w["l_mean"]) @ w["l_proj"])


def global_on(cfg) -> bool:
    """Whether the whiten stage fits anything for the global descriptors."""
    wc = cfg.whiten
    return bool(wc.global_pca or wc.global_lw or wc.query_transform)


def is_on(cfg) -> bool:
    return bool(global_on(cfg) or cfg.whiten.local_pca)


def uses_labels(cfg) -> bool:
    """True when the fit reads the train labels (Lw or the query transformation from labels)."""
    wc = cfg.whiten
    return bool(global_on(cfg) and (wc.global_lw or wc.query_transform) and wc.positives == "labels")


def labels_fingerprint(cfg, data_dir: str | Path | None) -> str:
    """The content digest of the train.csv the fit reads its labels from; '' when it reads none.
    A relabelled train.csv with the same features refits the whitening (and so reruns knn)."""
    if not uses_labels(cfg) or data_dir is None:
        return ""
    path = Path(data_dir) / data.SPLITS["train"]
    return cache.content_digest(path) if path.exists() else ""


def whiten_fingerprint(cfg, train_features: Path, labels_fp: str = "") -> str:
    """Inputs of the whiten stage: the train shards, the train labels when the fit reads them
    (`labels_fp`, ``labels_fingerprint``) and the whiten settings."""
    inputs = [cache.dir_fingerprint(train_features, SHARD_GLOB)] + ([f"labels:{labels_fp}"] if labels_fp else [])
    return cache.fingerprint("whiten", cfg, inputs)


def output_fingerprint(cfg, path: str | Path | None) -> str:
    """The fingerprint stamped in the fitted whitening a later stage reads ('' when whitening is
    off or not fitted yet): part of knn's inputs, so a refit (other labels) reruns knn and what follows."""
    if not global_on(cfg) or path is None:
        return ""
    return cache.read_stamp(path, check=False) or ""


def _local_sample(store) -> np.ndarray:
    """Up to LOCAL_SAMPLE train local descriptors, from images in a seeded random order."""
    ids = sorted(store.local_ids())
    rng = np.random.default_rng(0)
    blocks, total = [], 0
    for i in rng.permutation(len(ids)):
        lf = store.local([ids[i]]).get(ids[i])
        if lf is not None and len(lf):
            blocks.append(lf.descriptors)
            total += len(lf)
        if total >= LOCAL_SAMPLE:
            break
    return np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)


def train_labels(data_dir: str | Path | None, ids: list[str]) -> np.ndarray:
    """landmark_id of each train id from DATA_DIR/train.csv (-1 where absent)."""
    if data_dir is None:
        raise LandmarksError("whiten.positives=labels needs the dataset (train.csv): pass data_dir")
    train = data.load_split(data_dir, "train")
    label_of = dict(zip(train["id"].astype(str), train["landmark_id"].astype(np.int64)))
    labels = np.array([label_of.get(i, -1) for i in ids], np.int64)
    # images without a label (-1) get a class of their own each: no positives
    free = labels < 0
    labels[free] = labels.max(initial=0) + 1 + np.arange(int(free.sum()))
    return labels


def run_whiten(cfg, train_features: str | Path, out: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """Stage: fit the whitening switched on in cfg.whiten on the train features -> `out`.

    `data_dir` (train.csv) is read when Lw or the query transformation take their positives from
    the labels.  Returns None (and writes nothing) when whitening is off; skips when `out` is up to date.
    """
    if not is_on(cfg):
        log.info("whiten: off (whiten.global_pca, global_lw, query_transform and local_pca are false); nothing to do")
        return None

    train_features, out = Path(train_features), Path(out)
    labels_fp = labels_fingerprint(cfg, data_dir)
    fp = whiten_fingerprint(cfg, train_features, labels_fp)
    if cache.up_to_date(out, fp):
        log.info("whiten: %s is up to date", out)
        return out
    store = FeatureStore(train_features)
    arrays: dict = {}
    if global_on(cfg):
        wc = cfg.whiten
        labels = None
        learned = wc.global_lw or wc.query_transform
        cap = LABEL_SAMPLE if wc.positives == "labels" else MINE_SAMPLE
        n = store.global_shape()[0]
        if learned and n > cap:  # only the sample is read (GLDv2: 1 GB of 8)
            pick = np.sort(np.random.default_rng(0).choice(n, cap, replace=False))
            log.info(
                "whiten: learning from a seeded sample of %d of %d train images (%s positives)",
                cap,
                n,
                wc.positives,
            )
            ids, x = store.global_matrix(rows=pick)
        else:
            ids, x = store.global_matrix()
        if learned and wc.positives == "labels":
            labels = train_labels(data_dir, ids)
        arrays.update(fit_global_learned(cfg, x, labels))
    if cfg.whiten.local_pca:
        arrays.update(fit_local(_local_sample(store), cfg.whiten.local_pca_dim))
    cache.save_npz(out, fp, labels_fingerprint=np.array(labels_fp), **arrays)
    log.info("whiten: fitted %s -> %s", ", ".join(sorted(arrays)), out)
    return out


def load_whiten(cfg, path: str | Path | None, train_features: str | Path, part: str) -> dict | None:
    """The fitted whitening a later stage needs (`part`: 'global' or 'local'): None when that part
    is off; an error when the file is missing or was fitted on other features or settings."""
    if not (global_on(cfg) if part == "global" else cfg.whiten.local_pca):
        return None
    if path is None or not Path(path).exists():
        raise LandmarksError(f"whiten ({part}) is on but {path} does not exist: run `landmarks whiten` (make whiten)")
    arrays = cache.load_npz(path, "`landmarks whiten`")
    labels_fp = str(arrays.get("labels_fingerprint", ""))  # checked by the whiten stage itself
    if str(arrays.get("fingerprint", "")) != whiten_fingerprint(cfg, Path(train_features), labels_fp):
        raise LandmarksError(
            f"{path} is damaged or was fitted on other train features or settings: rerun `landmarks whiten`"
        )
    return arrays
