"""The whole pipeline in order, for notebooks, tests and tools: what `make predict` runs.

Each step is one stage's public function with the paths of the WORK_DIR layout; nothing here
decides anything a stage does not.  From a shell, `make predict` runs the same steps as separate
commands (features, whiten, knn, local-features, verify, predict).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("landmarks.pipeline")


def run_all(cfg, data_dir, work_dir, model_dir, submission, jobs: int | None = None) -> Path:
    """features (train, test) -> whiten -> knn -> local-features -> verify -> predict -> SUBMISSION."""
    from landmarks import extract

    for split in ("train", "test"):
        extract.run_features(cfg, data_dir, work_dir, model_dir, split, jobs=jobs)
    return run_after_features(cfg, data_dir, work_dir, model_dir, submission, jobs)


def run_after_features(cfg, data_dir, work_dir, model_dir, submission, jobs: int | None = None) -> Path:
    """whiten -> knn -> local-features -> verify -> predict, from the feature shards in WORK_DIR."""
    from landmarks import calibrate, extract, knn, predict, verify, whiten
    from landmarks.layout import WorkLayout

    work = WorkLayout(work_dir)
    whiten.run_whiten(cfg, work.features("train"), work.whiten(cfg))
    knn_path = knn.run_knn(cfg, work.features("train"), work.features("test"), work.knn(cfg), work.whiten(cfg))
    verified = None
    if cfg.verify.enabled:
        extract.run_local_features(cfg, data_dir, work.root, model_dir, knn_path, jobs=jobs)
        verified = verify.run_verify(
            cfg, knn_path, work.features("test"), work.features("train"), work.verified(cfg), work.whiten(cfg)
        )
    calibration = None
    if calibrate.uses_calibration(cfg):
        calibration = calibrate.run_calibrate(
            cfg, data_dir, knn_path, work.features("train"), work.calibration(cfg), model_dir, work.whiten(cfg)
        )
    return predict.run_predict(
        cfg, data_dir, knn_path, verified, submission, work.features_root, work.whiten(cfg), calibration
    )
