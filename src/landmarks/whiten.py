"""Learned post-processing fitted on the train split, stored in WORK_DIR/whiten.npz.

- Global: PCA-whitening (cirtorch's unsupervised "whitening" of GeM vectors): centre on the
  train mean, rotate onto the principal axes, divide by sqrt(eigenvalue + eps), optionally keep
  the top ``global_pca_dim`` axes, L2-normalise.  Flattens the dominant, uninformative
  directions that make unrelated images look alike.
- Local: PCA of local descriptors (DELF recipe: mean, projection to ``local_pca_dim``, no
  whitening, L2-normalise).

Both are off by default (cfg.whiten.*); knn and verify apply them when on.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from landmarks.utils import LandmarksError, atomic_path, text_digest

log = logging.getLogger("landmarks.whiten")
EPS_REL = 1e-3  # eigenvalue regulariser, relative to the largest eigenvalue
LOCAL_SAMPLE = 200_000  # local descriptors used to fit the local PCA


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


def fit_local(desc: np.ndarray, dim: int = 128) -> dict:
    """PCA (no whitening) of local descriptors -> {'l_mean' [d0], 'l_proj' [d0, dim]}."""
    if desc.shape[0] < 2:
        raise LandmarksError("whiten: need local descriptors of train images to fit the local PCA "
                             "(set extract.train_local=true or disable whiten.local_pca)")
    mean, _, vec = _pca(desc)
    dim = min(dim or desc.shape[1], desc.shape[1])
    return {"l_mean": mean.astype(np.float32), "l_proj": vec[:, :dim].astype(np.float32)}


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def apply_global(w: dict, x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 0:
        return np.zeros((0, w["g_proj"].shape[1]), np.float32)
    return _l2((np.asarray(x, np.float32) - w["g_mean"]) @ w["g_proj"])


def apply_local(w: dict, d: np.ndarray) -> np.ndarray:
    if d.shape[0] == 0:
        return np.zeros((0, w["l_proj"].shape[1]), np.float32)
    return _l2((np.asarray(d, np.float32) - w["l_mean"]) @ w["l_proj"])


def whiten_fingerprint(cfg, work_dir: Path) -> str:
    from landmarks.knn import shards_digest

    return text_digest("whiten-v1", shards_digest(Path(work_dir) / "features" / "train"),
                       cfg.section_hash("whiten"))


def ensure_whiten(cfg, work_dir: str | Path) -> dict:
    """Fit (or reuse) WORK_DIR/whiten.npz for the parts switched on in cfg.whiten."""
    from landmarks.knn import load_npz, npz_fingerprint
    from landmarks.store import FeatureStore

    work_dir = Path(work_dir)
    out = work_dir / "whiten.npz"
    fp = whiten_fingerprint(cfg, work_dir)
    if out.exists() and npz_fingerprint(out) == fp:
        return load_npz(out)
    store = FeatureStore(work_dir / "features" / "train")
    arrays: dict = {}
    if cfg.whiten.global_pca:
        _, x = store.global_matrix()
        arrays.update(fit_global(x, cfg.whiten.global_pca_dim))
    if cfg.whiten.local_pca:
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
        desc = np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)
        arrays.update(fit_local(desc, cfg.whiten.local_pca_dim))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fp), **arrays)
    log.info("whiten: fitted %s -> %s", ", ".join(sorted(arrays)), out)
    return arrays
