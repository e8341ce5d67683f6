"""Shard tasks on local joblib workers or a Dask cluster, with a progress bar per image.

A task is any picklable object with ``out`` (the file it writes atomically) and ``ids`` (its
images); the worker function runs one task in any process and returns a dict with ``n`` and
``path``.  Workers report their done-image count in a small file beside their output
(``progress_path``), which the driver's bar reads, so joblib and Dask runs alike move per image.
On Dask, a worker that leaves is logged with the shards it held; the scheduler reruns them.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

from landmarks.config import check_setting
from landmarks.utils import LandmarksError, available_cores, log

WATCH_SECONDS = 0.25  # the dask driver checks which workers are alive this often
RESULT_SECONDS = 60  # a finished task's result not fetched by then is computed again (run_on_dask)
RESULT_TRIES = 3  # ... at most this many times in all, then the run stops with an error
POLL_SECONDS = 0.5  # the driver's bar reads the tasks' progress files this often


def id_bucket(ids: Sequence[str], n: int) -> np.ndarray:
    """Stable shard of each id: sha1(id) mod n (independent of CSV order and of other rows)."""
    import hashlib

    return np.fromiter(
        (int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") % n for i in ids), np.int64, len(ids)
    )


def progress_path(shard: str | Path) -> Path:
    """Where a running shard task reports how many of its images are done (`.<shard>.progress`)."""
    shard = Path(shard)
    return shard.with_name(f".{shard.name}.progress")


def report_progress(shard: str | Path, done: int) -> None:
    """Write a task's done-image count for the driver's progress bar (joblib and Dask alike: the
    driver reads the file; a shared filesystem is what the shards already need)."""
    try:
        path = progress_path(shard)
        tmp = path.with_name(path.name + f".{os.getpid()}")
        tmp.write_text(str(int(done)))
        os.replace(tmp, path)
    except OSError:  # progress is a courtesy: never fail a shard over it
        pass


def worker_name() -> str:
    """The dask worker running this task (for the driver's log), else host:pid."""
    if "distributed" in sys.modules:  # only a dask worker has it loaded; never import it elsewhere
        try:
            from distributed import get_worker

            return get_worker().address
        except ValueError:
            pass
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------
def run_tasks(worker, tasks: list, jobs: int, scheduler, desc: str) -> list[dict]:
    """Run shard tasks in-process, on loky workers or on a Dask cluster; tqdm over images."""
    from tqdm import tqdm

    results: list[dict] = []
    total = sum(len(t.ids) for t in tasks)
    t0 = time.time()
    bar = tqdm(total=total, unit="img", desc=desc, disable=None, dynamic_ncols=True)
    bar.set_postfix(shards=f"0/{len(tasks)}")
    for t in tasks:  # counts left by a killed run
        progress_path(t.out).unlink(missing_ok=True)
    watcher = ProgressWatcher(tasks, bar)

    def done(r):
        results.append(r)
        watcher.finished(r)
        progress_path(r["path"]).unlink(missing_ok=True)
        bar.set_postfix(
            shards=f"{len(results)}/{len(tasks)}",
            rate=f"{sum(x['n'] for x in results) / max(time.time() - t0, 1e-9):.2f} img/s",
        )

    try:
        if not tasks:
            return results
        watcher.start()
        if scheduler:
            with dask_client(scheduler) as client:
                _run_dask(client, worker, tasks, done)
        elif jobs <= 1 or len(tasks) == 1:
            for t in tasks:
                done(worker(t))
        else:
            from joblib import Parallel, delayed

            par = Parallel(n_jobs=min(jobs, len(tasks)), backend="loky", return_as="generator_unordered")
            for r in par(delayed(worker)(t) for t in tasks):
                done(r)
    finally:
        watcher.stop()
        bar.close()
        for t in tasks:
            progress_path(t.out).unlink(missing_ok=True)
    return results


class ProgressWatcher:
    """Moves the driver's bar per image: every POLL_SECONDS it adds the done-image counts
    that running tasks report (progress_path) to the images of the finished tasks."""

    def __init__(self, tasks: list, bar):
        import threading

        self.tasks, self.bar = tasks, bar
        self.finished_n, self.finished_paths = 0, set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finished(self, result: dict) -> None:
        with self.lock:
            self.finished_n += int(result["n"])
            self.finished_paths.add(str(result["path"]))
            self._show(0)

    def _running_count(self) -> int:
        n = 0
        for t in self.tasks:
            if str(t.out) in self.finished_paths:
                continue
            try:
                n += int(progress_path(t.out).read_text() or 0)
            except (OSError, ValueError):
                pass
        return n

    def _show(self, running: int) -> None:
        self.bar.n = min(self.bar.total, self.finished_n + running)
        self.bar.refresh()

    def _loop(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            running = self._running_count()
            with self.lock:
                self._show(running)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()


def _run_dask(client, worker, tasks: list, done) -> None:
    """The shard tasks on the cluster (`run_on_dask`); each finished shard is logged with its worker.
    A shard is written atomically, so a half-run task leaves nothing behind."""
    names = [Path(t.out).name for t in tasks]
    for _, r in run_on_dask(client, worker, [(t,) for t in tasks], names, "shard"):
        log.info(
            "%s done on %s (%d extracted, %d kept)",
            Path(r["path"]).name,
            r.get("worker", "?"),
            r.get("extracted", r["n"]),
            r.get("kept", 0),
        )
        done(r)


@contextmanager
def dask_client(scheduler):
    """A Client for `scheduler` (an address, closed at the end) or the given Client itself; a clear
    error when the scheduler cannot be reached."""
    from dask.distributed import Client

    if not isinstance(scheduler, str):
        yield scheduler
        return
    try:
        client = Client(scheduler, timeout="30s")
    except (OSError, TimeoutError) as e:
        raise LandmarksError(f"cannot reach dask scheduler {scheduler}: {e}") from None
    try:
        yield client
    finally:
        client.close()


def run_on_dask(client, fn, args: list[tuple], names: list[str], what: str = "task"):
    """Yield (task number, fn(*args[k])) as the cluster finishes them, in any order.

    While waiting it watches the workers: one that leaves (killed, lost) is logged with the tasks it
    held, and the scheduler reruns them on the others (its allowed-failures bound applies; a task
    that failed on every try raises here).  A finished task whose result cannot be fetched within
    RESULT_SECONDS (its worker died while sending it) is submitted again: every task's result
    depends only on its inputs, so a rerun changes nothing."""
    from dask.distributed import wait

    number: dict = {}
    tries = [0] * len(args)

    def submit(k: int):
        fut = client.submit(fn, *args[k], pure=False)
        number[fut.key] = k
        tries[k] += 1
        return fut

    pending = {submit(k) for k in range(len(args))}

    def running() -> dict:
        try:
            return {w: [names[number[key]] for key in keys if key in number] for w, keys in client.processing().items()}
        except Exception:  # noqa: BLE001 - the watch must never break the run
            return {}

    held: dict[str, set] = {w: set(v) for w, v in running().items()}  # tasks seen on each worker, not yet done
    while pending:
        try:
            finished, pending = wait(pending, timeout=WATCH_SECONDS, return_when="FIRST_COMPLETED")
        except TimeoutError:  # nothing finished within the watch period
            finished = set()
        for fut in finished:
            k = number[fut.key]
            try:
                result = fut.result(timeout=RESULT_SECONDS)
            except TimeoutError:
                if tries[k] >= RESULT_TRIES:
                    raise LandmarksError(
                        f"dask: the result of {what} {names[k]} could not be fetched in {RESULT_TRIES} tries of "
                        f"{RESULT_SECONDS} s each: are the workers reachable from this machine?"
                    ) from None
                log.warning(
                    "dask: the result of %s %s was not fetched within %d s (its worker may have left); submitted again",
                    what,
                    names[k],
                    RESULT_SECONDS,
                )
                fut.cancel()
                pending.add(submit(k))
                continue
            for v in held.values():
                v.discard(names[k])
            yield k, result
        now = running()
        if not now:  # the scheduler did not answer: keep what we know
            continue
        for w in set(held) - set(now):
            log.warning(
                "dask worker %s left while holding %s; the scheduler retries them on %d remaining worker(s)",
                w,
                ", ".join(sorted(held[w])) or f"no {what}",
                len(now),
            )
            del held[w]
        for w, v in now.items():
            if w not in held:
                log.info("dask worker %s joined", w)
            held.setdefault(w, set()).update(v)


def resolve_jobs(cfg, jobs, scheduler, n_tasks: int) -> tuple[int, object, int]:
    """(jobs, scheduler, TF threads per worker): config defaults, the cores split between local jobs."""
    jobs = check_setting("extract.jobs", cfg.extract.jobs if jobs is None else jobs)  # --jobs, checked as at load
    scheduler = cfg.extract.scheduler if scheduler is None else scheduler
    if scheduler:
        threads = cfg.extract.intra_op_threads  # remote workers: 0 = TF default there
    else:
        threads = cfg.extract.intra_op_threads or max(1, available_cores() // max(1, min(jobs, max(n_tasks, 1))))
    return jobs, scheduler, threads
