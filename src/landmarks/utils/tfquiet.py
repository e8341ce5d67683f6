"""Import TensorFlow without its C++ start-up banners, keeping real warnings and errors.

`import tensorflow` prints, on fd 2 and whatever TF_CPP_MIN_LOG_LEVEL says, lines such as
``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR``,
``I0000 ... port.cc] oneDNN custom operations are on ...`` (twice) and, with the CUDA build on a
machine without a GPU, ``Unable to register cuDNN factory`` / ``Could not find cuda drivers``.
Every process that imports TF (the CLI, joblib and Dask workers, notebooks) would print them.

`import_tensorflow()` sets TF_CPP_MIN_LOG_LEVEL=1 unless it is set (C++ INFO off, warnings and
errors on; the Python `tensorflow` logger likewise at WARNING unless set), points fd 2 at a
temporary file only while `import tensorflow` and the device probe
(`tf.config.list_physical_devices()`, where the CUDA build looks for a driver) run, then writes
back to stderr every captured line that is not one of those banners (Python warnings raised
during the import included). oneDNN stays on. Every module of the package gets TensorFlow
through it:

    from landmarks.utils.tfquiet import tf      # or: tf = import_tensorflow()
    from landmarks.utils.tfquiet import keras
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading

# Start-up lines that say nothing about the run (matched on each captured line).
BANNERS = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
    r"|Could not find cuda drivers"
    r"|cudart_stub\.cc"
    r"|TF-TRT Warning: Could not find TensorRT"
)
# With no NVIDIA driver at all ("Could not find cuda drivers"), the CUDA build's device probe then
# fails with this error line: noise there, a real diagnostic on a machine that has a driver.
NO_DRIVER = re.compile(r"Could not find cuda drivers")
NO_DRIVER_ONLY = re.compile(r"failed call to cuInit")
_LOCK = threading.Lock()


def _kept(text: str) -> list[str]:
    """The captured lines worth showing."""
    no_driver = bool(NO_DRIVER.search(text))
    return [
        ln
        for ln in text.splitlines(keepends=True)
        if not BANNERS.search(ln) and not (no_driver and NO_DRIVER_ONLY.search(ln))
    ]


def import_tensorflow():
    """`import tensorflow` without the start-up banners; returns the module (cached after the first call)."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "constant"):
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with _LOCK:
        tf = sys.modules.get("tensorflow")
        if tf is not None and hasattr(tf, "constant"):  # another thread finished it meanwhile
            return tf
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to keep quiet
            import tensorflow as tf

            return tf
        with tempfile.TemporaryFile() as buf:
            os.dup2(buf.fileno(), 2)
            try:
                import tensorflow as tf

                # probe the devices now (the CUDA build logs its driver search here, not at import);
                # thread pools and GPU memory growth can still be set after this
                tf.config.list_physical_devices()
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                buf.seek(0)
                text = buf.read().decode("utf-8", "replace")
                kept = _kept(text)
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
    tf_log = logging.getLogger("tensorflow")
    if tf_log.level == logging.NOTSET:  # its INFO lines ("Assets written to: ...") are chatter too
        tf_log.setLevel(logging.WARNING)
    return tf


def import_keras():
    """`import keras` (its TensorFlow backend imported quietly first)."""
    import_tensorflow()
    import keras

    return keras


def __getattr__(name: str):
    """`from landmarks.utils.tfquiet import tf` / `... import keras`: the quietly imported module."""
    if name == "tf":
        return import_tensorflow()
    if name == "keras":
        return import_keras()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
