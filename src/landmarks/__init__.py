from landmarks.stages import run

"""landmarks: instance-level landmark recognition (Google Landmark Recognition task).

Stages (declared in one table, ``landmarks.stages.STAGES``): demo-data / model / adapt ->
features -> whiten -> knn -> local-features -> verify -> calibrate -> predict -> validate.
``landmarks.run("predict", data_dir=..., work_dir=...)`` runs a target and what it needs.
README.md lists each stage's inputs and outputs; docs/design.md describes the files and
fingerprints.
"""

__version__ = "0.1.0"

# TensorFlow is imported through landmarks.utils.tfquiet (no C++ start-up banners, warnings kept).


def __getattr__(name):
    """``landmarks.run`` without importing the stage graph on every ``import landmarks``."""
    if name == "run":
        return run
    raise AttributeError(f"module 'landmarks' has no attribute {name!r}")
