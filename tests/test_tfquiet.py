"""landmarks.utils.tfquiet: TensorFlow's C++ start-up banners (absl, oneDNN, CUDA) are dropped in every
process that imports it (the CLI and its joblib workers included); real warnings still show."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

BANNER_WORDS = ("onednn", "absl", "cuda", "cpu_feature_guard", "rebuild tensorflow")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(extra)
    return env


def _banners(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if any(w in ln.lower() for w in BANNER_WORDS)]


STAND_IN = """
import os, types, warnings
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
os.write(2, b"I0000 00:00:1.2 5651 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
os.write(2, b"E0000 00:00:1.3 77 cuda_fft.cc:467] Unable to register cuFFT factory: Attempting ...\\n")
DRIVER and os.write(2, b"I0000 00:00:1.3 77 cudart_stub.cc:31] Could not find cuda drivers on your machine\\n")
os.write(2, b"W0000 00:00:1.4 77 some_op.cc:1] a real C++ warning\\n")
warnings.warn("a real Python warning at import", UserWarning)
constant = object()
config = types.SimpleNamespace(list_physical_devices=lambda: os.write(
    2, b"E0000 00:00:1.5 77 cuda_platform.cc:52] failed call to cuInit: CUDA error (303)\\n"))
"""


@pytest.mark.parametrize("driver", [False, True])
def test_filter_drops_banners_and_replays_everything_else(tmp_path, driver):
    """A stand-in `tensorflow` writes the real banners and two real lines to fd 2 while it is
    imported: only the real lines come back, after the import, on stderr. The CUDA build's cuInit
    error is noise only when it has just said that there is no driver at all."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(STAND_IN.replace("DRIVER and", "False and" if driver else "True and"))
    code = (
        "import sys, os; from landmarks.utils.tfquiet import import_tensorflow; tf = import_tensorflow(); "
        "assert tf is import_tensorflow(); print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"  # C++ INFO off, warnings and errors on
    kept = _banners(r.stderr)  # a driver is there: its cuInit error is a real one
    assert ["failed call to cuInit" in ln for ln in kept] == ([True] if driver else []), r.stderr
    assert "a real C++ warning" in r.stderr and "a real Python warning at import" in r.stderr


def test_real_tensorflow_import_is_quiet_and_warnings_still_show():
    code = (
        "import warnings; from landmarks.utils.tfquiet import tf; tf.constant(1.0) + 1.0; "
        "warnings.warn('kept after the import', UserWarning)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert _banners(r.stderr) == [], r.stderr
    assert "UserWarning: kept after the import" in r.stderr


def test_cli_with_joblib_workers_prints_no_banners(tmp_path, fake_model, write_split):
    """`landmarks features --jobs 2` (two loky worker processes load the model): stderr has the
    stage's log lines and no TensorFlow start-up banner; stderr is not a terminal, so no bar either."""
    root = tmp_path / "data"
    ids = write_split(root, "train", 6, np.random.default_rng(0), bad=False)
    pd.DataFrame({"id": ids, "landmark_id": np.arange(6) % 2}).to_csv(root / "train.csv", index=False)
    (root / "sample_submission.csv").write_text("id,landmarks\naaaabbbbccccdddd,\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "landmarks",
            "features",
            "--data-dir",
            str(root),
            "--work-dir",
            str(tmp_path / "w"),
            "--model",
            str(fake_model),
            "--split",
            "train",
            "--shards",
            "2",
            "--jobs",
            "2",
            "--set",
            "extract.max_image_size=64",
            "--set",
            "extract.intra_op_threads=1",
        ],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    assert _banners(r.stdout + r.stderr) == [], r.stderr
    assert "img/s" not in r.stderr and "\r" not in r.stderr  # tqdm is off when stderr is not a terminal
