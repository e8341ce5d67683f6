"""Learned post-processing fitted on the train split, stored in WORK_DIR/whiten-<hash>.npz.

- Global: PCA-whitening (cirtorch's unsupervised "whitening" of GeM vectors): centre on the
  train mean, rotate onto the principal axes, divide by sqrt(eigenvalue + eps), optionally keep
  the top ``global_pca_dim`` axes, L2-normalise.  Flattens the dominant, uninformative
  directions that make unrelated images look alike.
- Local: PCA of local descriptors (DELF recipe: mean, projection to ``local_pca_dim``, no
  whitening, L2-normalise).

Both are off by default (cfg.whiten.*).  Stage ``landmarks whiten`` fits them; knn, verify and
predict read the file (``load_whiten``) when they are on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from landmarks.store import SHARD_GLOB, FeatureStore
from landmarks.utils import LandmarksError, cache, l2_normalize

log = logging.getLogger(__name__)
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
        raise LandmarksError(
            "whiten: need local descriptors of train images to fit the local PCA "
            "(set extract.train_local=true or disable whiten.local_pca)"
        )
    mean, _, vec = _pca(desc)
    dim = min(dim or desc.shape[1], desc.shape[1])
    return {"l_mean": mean.astype(np.float32), "l_proj": vec[:, :dim].astype(np.float32)}


def apply_global(w: dict, x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 0:
        return np.zeros((0, w["g_proj"].shape[1]), np.float32)
    return l2_normalize((np.asarray(x, np.float32) - w["g_mean"]) @ w["g_proj"])


def apply_local(w: dict, d: np.ndarray) -> np.ndarray:
    if d.shape[0] == 0:
        return np.zeros((0, w["l_proj"].shape[1]), np.float32)
    return l2_normalize((np.asarray(d, np.float32) - w["l_mean"]) @ w["l_proj"])


def is_on(cfg) -> bool:
    return bool(cfg.whiten.global_pca or cfg.whiten.local_pca)


def whiten_fingerprint(cfg, train_features: Path) -> str:
    """Inputs of the whiten stage: the train shards and the whiten settings."""
    return cache.fingerprint("whiten", cfg, [cache.dir_fingerprint(train_features, SHARD_GLOB)])


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


def run_whiten(cfg, train_features: str | Path, out: str | Path) -> Path | None:
    """Stage: fit the whitening switched on in cfg.whiten on the train features -> `out`.

    Returns None (and writes nothing) when whitening is off; skips when `out` is up to date.
    """
    if not is_on(cfg):
        log.info("whiten: off (whiten.global_pca and whiten.local_pca are false); nothing to do")
        return None

    train_features, out = Path(train_features), Path(out)
    fp = whiten_fingerprint(cfg, train_features)
    if cache.up_to_date(out, fp):
        log.info("whiten: %s is up to date", out)
        return out
    store = FeatureStore(train_features)
    arrays: dict = {}
    if cfg.whiten.global_pca:
        _, x = store.global_matrix()
        arrays.update(fit_global(x, cfg.whiten.global_pca_dim))
    if cfg.whiten.local_pca:
        arrays.update(fit_local(_local_sample(store), cfg.whiten.local_pca_dim))
    cache.save_npz(out, fp, **arrays)
    log.info("whiten: fitted %s -> %s", ", ".join(sorted(arrays)), out)
    return out


def load_whiten(cfg, path: str | Path | None, train_features: str | Path, part: str) -> dict | None:
    """The fitted whitening a later stage needs (`part`: 'global' or 'local'): None when that part
    is off; an error when the file is missing or was fitted on other features or settings."""
    if not getattr(cfg.whiten, f"{part}_pca"):
        return None
    if path is None or not Path(path).exists():
        raise LandmarksError(f"whiten.{part}_pca is on but {path} does not exist: run `landmarks whiten` (make whiten)")
    if not cache.up_to_date(path, whiten_fingerprint(cfg, Path(train_features))):
        raise LandmarksError(
            f"{path} is damaged or was fitted on other train features or settings: rerun `landmarks whiten`"
        )
    return cache.load_npz(path, "`landmarks whiten`")
