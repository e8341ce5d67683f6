"""Small shared helpers: atomic writes, file fingerprints, logging, clear errors."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger("landmarks")


class LandmarksError(RuntimeError):
    """An error with a one-line, actionable message; the CLI prints it without a traceback."""


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with time, level and logger name (DEBUG when verbose)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@contextlib.contextmanager
def atomic_path(final: str | Path):
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """First 16 hex digits of the sha1 of a file's bytes: CSV fingerprints, and the content ids of
    imported images (byte-identical files get the same id)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()[:16]


def l2_normalize(x, axis: int = -1) -> np.ndarray:
    """`x` as float32 scaled to unit L2 norm along `axis`; all-zero rows stay zero."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def link_file(src: str | Path, dst: Path, mode: str) -> None:
    """Place the file `src` at `dst` (parent folders made) as a 'symlink' (to src's absolute
    path), a 'hardlink' or a 'copy'.  OSError when the file system refuses."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif mode == "hardlink":
        os.link(src, dst)
    elif mode == "copy":
        shutil.copyfile(src, dst)
    else:
        raise ValueError(f"unknown link mode {mode!r}")


@contextlib.contextmanager
def building_dir(final: str | Path, suffix: str = "building"):
    """Yield an empty temporary sibling folder `.NAME.SUFFIX` of `final`; when the block succeeds,
    it replaces `final` (removed first).  A failed block leaves the temporary folder, which the
    next run clears: readers never see a half-written `final`."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{suffix}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if final.exists() or final.is_symlink():
        shutil.rmtree(final)
    tmp.rename(final)


def configure_tensorflow(threads: int = 0) -> None:
    """Import TF quietly (landmarks.utils.tfquiet) and set its thread pools (call before the first TF op)."""
    from landmarks.utils.tfquiet import tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError:
            pass  # already initialised in this process


def error_text(e: BaseException) -> str:
    """One line for an error; OS errors (also h5py's, which come as RuntimeError text holding
    'errno = N') as '[Errno N] reason', with a hint when the disk is full."""
    import errno as _errno
    import re

    code = getattr(e, "errno", None)
    if not isinstance(code, int):
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if isinstance(code, int) and code > 0:
        text = f"[Errno {code}] {os.strerror(code)}"
        name = getattr(e, "filename", None)
        text += f": {name!r}" if name else ""
        if code == _errno.ENOSPC:
            text += " (disk full: free space under WORK_DIR or the output directory, or use another one)"
        return text
    return " ".join(str(e).split())[:500] or type(e).__name__


def call_writing(path: str | Path, fn, *args, **kwargs):
    """fn(*args, **kwargs), which writes the file `path`.  A failed write (full disk, file size
    limit, permissions: OSError, or RuntimeError from h5py) becomes a one-line LandmarksError naming
    `path`; the destructor messages of half-written HDF5 objects are kept off the terminal."""
    import gc
    import sys

    hooks, message = (sys.unraisablehook, sys.excepthook), None
    sys.unraisablehook = lambda u: log.debug("ignored after a failed write: %s", u.exc_value)
    sys.excepthook = lambda t, v, tb: log.debug("ignored after a failed write: %s", v)  # Cython __dealloc__
    try:
        try:
            return fn(*args, **kwargs)
        except LandmarksError:
            raise
        except (OSError, RuntimeError) as e:
            message = f"cannot write {path}: {error_text(e)}"
        gc.collect()  # free the failed writer's objects while their messages are silenced
    finally:
        sys.unraisablehook, sys.excepthook = hooks
    raise LandmarksError(message)
