"""landmarks: instance-level landmark recognition (Google Landmark Recognition task).

Stages (one module each): data -> extract/store -> knn -> verify -> predict -> metrics/validate.
"""
__version__ = "0.1.0"

import os as _os

# Quiet TensorFlow's C++ start-up chatter in every process (workers included) unless asked.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
