"""landmarks: instance-level landmark recognition (Google Landmark Recognition task).

Stages (one module each): data -> extract/store -> knn -> verify -> predict -> metrics/validate.
"""

__version__ = "0.1.0"

# TensorFlow is imported through landmarks.tfquiet (no C++ start-up banners, warnings kept).
