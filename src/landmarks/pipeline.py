"""The whole pipeline in order, for notebooks, tests and tools: the stage graph's `predict` target.

Both functions run the stages of :mod:`landmarks.stages` with a given model (no adaptation: the
model is the caller's); ``landmarks.run`` / ``landmarks run`` / ``make predict`` are the same graph
with the model chosen for you.  Nothing here wires stages: the graph does.
"""

from __future__ import annotations

from pathlib import Path

from landmarks.stages import Run, run_target


def run_all(cfg, data_dir, work_dir, model_dir, submission, jobs: int | None = None) -> Path:
    """features (train, test) -> whiten -> knn -> local-features -> verify -> predict -> SUBMISSION."""
    run = Run(cfg, data_dir, work_dir, model_dir, submission, adapt=False, demo=False, jobs=jobs)
    return run_target("predict", run, echo=False).output


def run_after_features(cfg, data_dir, work_dir, model_dir, submission, jobs: int | None = None) -> Path:
    """whiten -> knn -> local-features -> verify -> predict, from the feature shards in WORK_DIR."""
    run = Run(cfg, data_dir, work_dir, model_dir, submission, adapt=False, demo=False, jobs=jobs)
    return run_target("predict", run, after="features", echo=False).output
