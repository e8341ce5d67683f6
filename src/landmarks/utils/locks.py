"""One run at a time per WORK_DIR stage directory.

A stage that cleans and rewrites a directory (``features/<split>``: it removes the temp files of
killed runs before writing shards) takes an advisory lock on ``<dir>/.<name>.lock`` first.  A
second run on the same directory waits for the first to finish (logging who holds the lock) and
then finds its shards done, instead of deleting the temp files the first run is writing.  The
kernel drops the lock when its process ends, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, as before
    fcntl = None


@contextlib.contextmanager
def stage_lock(directory: str | Path, name: str):
    """Hold the lock `name` of `directory` for the block; wait while another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{name}.lock"
    if fcntl is None:  # pragma: no cover
        yield path
        return
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            log.warning(
                "%s: another run (pid %s) is working in %s; waiting for it to finish (lock %s)",
                name,
                holder,
                directory,
                path.name,
            )
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield path
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
