"""`make features`: sharded, parallel, resumable DELG feature extraction.

The rows of a split's CSV (``data.load_split``) are cut into N id-hash buckets (sha1(id) mod N,
rows in CSV order, each row's CSV position stored so readers restore CSV order); each bucket is
one task that writes ``WORK_DIR/features/<split>/shard-i-of-N.h5`` atomically
(``store.write_shard``).  Tasks run in-process (1 job), on joblib loky workers (J jobs; each
worker loads the model once and keeps it), or on a Dask cluster (``--scheduler tcp://...``, the
same task function through ``client.map``).  Inside a task a thread decodes the next images
while the model runs on the current one.

Resume (``landmarks.cache``): each shard stores the fingerprints of what its rows depend on (the
global one: the model's global path and the global settings; with local features also the local
one: the model's local path and the local settings), plus a digest of the shard's ids and their
file keys.  A rerun skips shards whose fingerprint matches; shards from another N, unreadable
(half-deleted) or left as temp files by a killed run are removed and redone.  Incremental: a
redone shard keeps the rows (and failures) of its old file whose file key and row fingerprints
are unchanged, so appending 1 % of the rows, re-adapting the local head or changing a local
setting sends only the new images through the model for a global-only train split (hloc-style
skip by key, within a stable id-hash partition).

Train gets global descriptors only (``extract.train_local`` false), test gets global + local.
``ensure_local`` extracts global + local for given ids that lack local features and caches them
as ``local-cache-<digest>-i-of-N.h5`` next to the shards: the local-features stage
(``run_local_features``, after knn) calls it for the test images and their shortlisted train
images, and ``landmarks show`` for the pairs it draws; verify only reads them.  Bad images never stop the stage: they go to the shard's failures
with a short reason (see ``landmarks.images``).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from landmarks import cache
from landmarks.config import check_setting
from landmarks.store import (
    CACHE_GLOB,
    SHARD_GLOB,
    FeatureStore,
    drop_rows,
    read_attrs,
    read_keys,
    shard_name,
    write_shard,
)
from landmarks.utils import LandmarksError, available_cores, call_writing, log

# ExtractConfig fields that change what is stored (jobs/shards/scheduler/prefetch do not).
RESULT_FIELDS = (
    "global_scales",
    "local_scales",
    "max_feature_num",
    "abs_thres",
    "max_image_size",
    "max_image_pixels",
    "min_image_size",
    "local_dtype",
)
PROGRESS_REPORT_SECONDS = 0.5  # a worker reports its done-image count this often (progress_path)
WATCH_SECONDS = 0.25  # the dask driver checks which workers are alive this often

_MODELS: dict[tuple[str, str], object] = {}  # per-process model cache: (path, digest) -> DelgModel


@dataclass
class ShardTask:
    """One unit of work: extract `ids` (image files `paths`) into the shard file `out`."""

    out: str
    ids: list[str]
    paths: list[str]
    model_dir: str
    settings: dict  # the RESULT_FIELDS values
    local: bool
    threads: int = 0  # TF intra-op threads (0 = TF default)
    prefetch: int = 2
    attrs: dict = field(default_factory=dict)
    order: list | None = None  # each id's CSV row (id-hash shards; readers sort by it)
    keys: list | None = None  # each id's file key: rows of the old `out` with the same key are kept


def features_dir(work_dir: str | Path, split: str) -> Path:
    """WORK_DIR/features/<split> (the WORK_DIR layout: landmarks.layout)."""
    from landmarks.layout import WorkLayout

    return WorkLayout(work_dir).features(split)


def result_settings(cfg) -> dict:
    """The extraction settings that change stored features (RESULT_FIELDS), JSON-ready."""
    e = cfg.extract
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(e, k)) for k in RESULT_FIELDS)}


@dataclass(frozen=True)
class RowKeys:
    """What a stored row depends on besides its image (``cache.feature_fingerprints``)."""

    global_fp: str
    local_fp: str

    @staticmethod
    def of(cfg, model_dir) -> "RowKeys":
        return RowKeys(*cache.feature_fingerprints(cfg, model_dir))

    def attrs(self, local: bool) -> dict:
        return {"global_fingerprint": self.global_fp, "local_fingerprint": self.local_fp if local else ""}

    def matches(self, attrs: dict | None, local: bool) -> bool:
        """True when rows stored with `attrs` may be kept by a task that wants local features or not."""
        if attrs is None or attrs.get("global_fingerprint") != self.global_fp:
            return False
        return not local or (bool(attrs.get("has_local")) and attrs.get("local_fingerprint") == self.local_fp)


def id_bucket(ids: Sequence[str], n: int) -> np.ndarray:
    """Stable shard of each id: sha1(id) mod n (independent of CSV order and of other rows)."""
    import hashlib

    return np.fromiter(
        (int.from_bytes(hashlib.sha1(i.encode()).digest()[:8], "big") % n for i in ids), np.int64, len(ids)
    )


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def get_model(model_dir: str, threads: int):
    """Load the model once per process (cached by path and directory digest)."""
    from landmarks.delg_io import load_delg
    from landmarks.utils import configure_tensorflow

    key = (str(Path(model_dir).resolve()), cache.dir_fingerprint(model_dir))
    model = _MODELS.get(key)
    if model is None:
        configure_tensorflow(threads)
        model = _MODELS[key] = load_delg(model_dir)
    return model


def inside_image(lf, shape, scale: float):
    """Map keypoints back to original pixels and drop those whose box centre lies outside the
    image: feature-map cells past the border (ceil(H/stride) rows) have centres off the image and
    match each other spuriously between unrelated images."""
    from landmarks.store import LocalFeatures

    h, w = shape[:2]
    kp = lf.keypoints
    keep = (kp[:, 0] >= 0) & (kp[:, 0] <= w - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h - 1)
    return LocalFeatures(
        (kp[keep] / np.float32(scale)).astype(np.float32), lf.descriptors[keep], lf.scales[keep], lf.scores[keep]
    )


SCALE_DECIMALS = 4  # scales are compared after rounding (the model echoes them as float32)
ALL_FEATURES = 1 << 20  # feature cap that keeps every above-threshold cell (selection in numpy)


def model_call(settings: dict, local: bool) -> tuple[list[float], list[int], int]:
    """Scales, global-scale rows and feature cap of the one model call that serves both scale sets.

    Global-only extraction runs the backbone at the global scales alone.  With local features the
    call covers the union of both sets; when the union holds scales that are not local ones, the
    call keeps every feature and `select_local` applies the local set and the cap afterwards."""
    glob = [float(x) for x in settings["global_scales"]]
    if not local:
        return glob, list(range(len(glob))), int(settings["max_feature_num"])
    loc = [float(x) for x in settings["local_scales"]]
    union = sorted(set(glob) | set(loc))
    rows = [union.index(x) for x in glob]
    exact = set(np.round(union, SCALE_DECIMALS)) == set(np.round(loc, SCALE_DECIMALS))
    return union, rows, int(settings["max_feature_num"]) if exact else ALL_FEATURES


def select_local(lf, local_scales, cap: int):
    """Local features of the given scales: per scale the `cap` best scores, then the `cap` best of
    all (what a model call at these scales alone with this cap returns), ordered by score."""
    from landmarks.store import LocalFeatures

    sc = np.round(lf.scales.astype(np.float64), SCALE_DECIMALS)
    keep = []
    for s in np.round(np.asarray(local_scales, np.float64), SCALE_DECIMALS):
        rows = np.flatnonzero(sc == s)
        keep.append(rows[np.argsort(-lf.scores[rows], kind="stable")[:cap]])
    rows = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    rows = rows[np.argsort(-lf.scores[rows], kind="stable")[:cap]]
    return LocalFeatures(lf.keypoints[rows], lf.descriptors[rows], lf.scales[rows], lf.scores[rows])


def read_image(path: str, settings: dict) -> tuple[np.ndarray, float]:
    """The one decode rule of extraction: (upright RGB array resized to max_image_size, resize scale)."""
    from landmarks.images import load_image

    return load_image(path, settings["max_image_size"], settings["max_image_pixels"], settings["min_image_size"])


def describe_image(model, image: np.ndarray, scales, cap: int, abs_thres: float, global_rows):
    """The features core: one model call -> (per-scale global descriptors [len(global_rows), D],
    LocalFeatures of every scale in resized-image pixels, at most `cap` per scale).

    The features stage pools the rows at once (`run_model`); the hard protocol's probe keeps them
    all and pools each setting's subset later with the same `delg_io.pool_global`."""
    from landmarks.delg_io import local_features

    raw = model(image, list(scales), int(cap), abs_thres, list(global_rows))
    per_scale = np.asarray(raw["global_descriptors"], np.float32)
    return per_scale.reshape(-1, per_scale.shape[-1]), local_features(raw)


def run_model(model, image: np.ndarray, settings: dict, local: bool):
    """One image through the DELG model -> (global unit vector, LocalFeatures at the local scales)."""
    from landmarks.delg_io import pool_global

    scales, rows, cap = model_call(settings, local)
    per_scale, lf = describe_image(model, image, scales, cap, settings["abs_thres"], rows)
    if local and cap == ALL_FEATURES:
        lf = select_local(lf, settings["local_scales"], int(settings["max_feature_num"]))
    return pool_global(per_scale), lf


def progress_path(shard: str | Path) -> Path:
    """Where a running shard task reports how many of its images are done (`.<shard>.progress`)."""
    shard = Path(shard)
    return shard.with_name(f".{shard.name}.progress")


def _report_progress(shard: str | Path, done: int) -> None:
    """Write a task's done-image count for the driver's progress bar (joblib and Dask alike: the
    driver reads the file; a shared filesystem is what the shards already need)."""
    try:
        path = progress_path(shard)
        tmp = path.with_name(path.name + f".{os.getpid()}")
        tmp.write_text(str(int(done)))
        os.replace(tmp, path)
    except OSError:  # progress is a courtesy: never fail a shard over it
        pass


def extract_shard(task: ShardTask) -> dict:
    """Run one shard task (in any process): write its file, return counts and timing."""
    t0 = time.time()
    kept = _reusable(task)
    run = [k for k, i in enumerate(task.ids) if i not in kept]  # rows that go through the model
    model = get_model(task.model_dir, task.threads) if run else None  # all rows kept: no model load
    _report_progress(task.out, len(kept))
    results = {**_extract_rows(task, model, run, t0, done_before=len(kept)), **kept}
    rows = [(k, i, results[i]) for k, i in enumerate(task.ids)]  # the task's (CSV) order
    ok = [(k, i, r) for k, i, r in rows if r[0] == "ok"]
    failed = [(k, i, r[1]) for k, i, r in rows if r[0] == "fail"]
    _write_rows(task, ok, failed)
    return {
        "path": task.out,
        "n": len(task.ids),
        "done": len(ok),
        "extracted": len(run),
        "kept": len(kept),
        "failures": dict(collections.Counter(reason for _, _, reason in failed)),
        "seconds": time.time() - t0,
        "worker": _worker_name(),
    }


def _extract_rows(task: ShardTask, model, run: list[int], t0: float, done_before: int = 0) -> dict:
    """Decode and extract the task's rows `run` (a thread decodes the next images while the model
    runs).  id -> ("ok", global, local | None) or ("fail", reason); a bad image never stops it."""
    from landmarks.images import describe_failure

    s = task.settings

    def load(path):
        return read_image(path, s)

    out: dict = {}
    run_ids, run_paths = [task.ids[k] for k in run], [task.paths[k] for k in run]
    n = len(run_ids)
    ahead = max(1, int(task.prefetch))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = collections.deque(pool.submit(load, p) for p in run_paths[:ahead])
        reported = time.time()
        for k, image_id in enumerate(run_ids):
            if time.time() - reported > PROGRESS_REPORT_SECONDS:  # the driver's bar reads it per image
                reported = time.time()
                _report_progress(task.out, done_before + k)
            fut = pending.popleft()
            if k + ahead < n:
                pending.append(pool.submit(load, run_paths[k + ahead]))
            try:
                image, scale = fut.result()
                g, lf = run_model(model, image, s, task.local)
                if not np.all(np.isfinite(g)):
                    raise FloatingPointError("non-finite global descriptor")
            except Exception as e:  # noqa: BLE001 - one bad image must not stop the shard
                reason = describe_failure(e)
                if isinstance(e, FloatingPointError):
                    reason = "model error (non-finite output)"
                out[image_id] = ("fail", reason)
                continue
            out[image_id] = ("ok", g, inside_image(lf, image.shape, scale) if task.local else None)
    return out


def _write_rows(task: ShardTask, ok: list[tuple], failed: list[tuple]) -> None:
    """Write the shard file of `task`: `ok` rows (position, id, ("ok", global, local)) and
    `failed` rows (position, id, reason), positions indexing the task's order and keys."""
    gmat = np.stack([r[1] for _, _, r in ok]).astype(np.float32) if ok else None
    attrs = dict(task.attrs)
    attrs["n_requested"] = len(task.ids)
    attrs["global_dim"] = int(gmat.shape[1]) if gmat is not None else 0
    extra = {}
    if task.order is not None:
        extra["order"] = [task.order[k] for k, _, _ in ok]
    if task.keys is not None:
        extra["keys"] = [task.keys[k] for k, _, _ in ok]
        extra["failure_keys"] = [task.keys[k] for k, _, _ in failed]
    ok_ids = [i for _, i, _ in ok]
    local = [r[2] for _, _, r in ok] if task.local else None
    failures = [(i, reason) for _, i, reason in failed]
    call_writing(
        task.out,
        write_shard,
        task.out,
        ok_ids,
        gmat,
        local,
        failures,
        attrs,
        local_dtype=task.settings["local_dtype"],
        **extra,
    )  # a full disk: one line, not a trace through joblib


def _worker_name() -> str:
    """The dask worker running this task (for the driver's log), else host:pid."""
    if "distributed" in sys.modules:  # only a dask worker has it loaded; never import it elsewhere
        try:
            from distributed import get_worker

            return get_worker().address
        except ValueError:
            pass
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _reusable(task: ShardTask) -> dict:
    """Rows of the shard file already at `task.out` that this task may keep instead of extracting:
    same global fingerprint (and local one when the task stores local features: RowKeys), same
    file key.  id -> ("ok", global, local | None) or ("fail", reason)."""
    if task.keys is None or not os.path.exists(task.out):
        return {}
    import h5py

    from landmarks.store import _decode

    want = dict(zip(task.ids, task.keys))
    out: dict = {}
    try:
        with h5py.File(task.out, "r") as f:
            row_keys = RowKeys(task.attrs["global_fingerprint"], task.attrs["local_fingerprint"])
            if not row_keys.matches(dict(f.attrs), task.local) or "keys" not in f or "keys" not in f["failures"]:
                return {}
            ids, keys = _decode(f["ids"][:]), _decode(f["keys"][:])
            rows = [r for r, (i, key) in enumerate(zip(ids, keys)) if want.get(i) == key]
            if rows:
                g = f["global"][:] if "global" in f else None
                if task.local:
                    from landmarks.store import LocalFeatures

                    lg = f["local"]
                    offs = lg["offsets"][:]
                    kp, de, sc, so = (lg[k][:] for k in ("keypoints", "descriptors", "scales", "scores"))
                for r in rows:
                    lf = None
                    if task.local:
                        a0, b0 = offs[r], offs[r + 1]
                        lf = LocalFeatures(kp[a0:b0], de[a0:b0].astype(np.float32), sc[a0:b0], so[a0:b0])
                    out[ids[r]] = ("ok", g[r] if g is not None else None, lf)
            for i, reason, key in zip(
                _decode(f["failures/ids"][:]), _decode(f["failures/reasons"][:]), _decode(f["failures/keys"][:])
            ):
                if want.get(i) == key:
                    out[i] = ("fail", reason)
    except (OSError, KeyError):  # unreadable: nothing is kept, everything is extracted again
        return {}
    return out


# --------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------
def _run_tasks(tasks: list[ShardTask], jobs: int, scheduler, desc: str) -> list[dict]:
    """Run shard tasks in-process, on loky workers or on a Dask cluster; tqdm over images."""
    from tqdm import tqdm

    results: list[dict] = []
    total = sum(len(t.ids) for t in tasks)
    t0 = time.time()
    bar = tqdm(total=total, unit="img", desc=desc, disable=None, dynamic_ncols=True)
    bar.set_postfix(shards=f"0/{len(tasks)}")
    for t in tasks:  # counts left by a killed run
        progress_path(t.out).unlink(missing_ok=True)
    watcher = _ProgressWatcher(tasks, bar)

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
            from dask.distributed import Client

            own = isinstance(scheduler, str)
            try:
                client = Client(scheduler, timeout="30s") if own else scheduler
            except (OSError, TimeoutError) as e:
                raise LandmarksError(f"cannot reach dask scheduler {scheduler}: {e}") from None
            try:
                _run_dask(client, tasks, done)
            finally:
                if own:
                    client.close()
        elif jobs <= 1 or len(tasks) == 1:
            for t in tasks:
                done(extract_shard(t))
        else:
            from joblib import Parallel, delayed

            par = Parallel(n_jobs=min(jobs, len(tasks)), backend="loky", return_as="generator_unordered")
            for r in par(delayed(extract_shard)(t) for t in tasks):
                done(r)
    finally:
        watcher.stop()
        bar.close()
        for t in tasks:
            progress_path(t.out).unlink(missing_ok=True)
    return results


class _ProgressWatcher:
    """Moves the driver's bar per image: every PROGRESS_REPORT_SECONDS it adds the done-image counts
    that running tasks report (progress_path) to the images of the finished tasks."""

    def __init__(self, tasks: list[ShardTask], bar):
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
        while not self.stopping.wait(PROGRESS_REPORT_SECONDS):
            running = self._running_count()
            with self.lock:
                self._show(running)

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()


def _run_dask(client, tasks: list[ShardTask], done) -> None:
    """client.map the tasks; while waiting, watch the workers: when one leaves (killed, lost), log
    which shards it was running: the scheduler reruns them on the remaining workers (its
    allowed-failures bound applies), and since a shard is written atomically a half-run task
    leaves nothing behind."""
    from dask.distributed import wait

    futures = client.map(extract_shard, tasks, pure=False)
    shard_of = {f.key: Path(t.out).name for f, t in zip(futures, tasks)}
    pending = set(futures)

    def running() -> dict:
        try:
            return {w: [shard_of[k] for k in keys if k in shard_of] for w, keys in client.processing().items()}
        except Exception:  # noqa: BLE001 - the watch must never break the run
            return {}

    held: dict[str, set] = {w: set(v) for w, v in running().items()}  # shards seen on each worker, not yet done
    while pending:
        try:
            finished, pending = wait(pending, timeout=WATCH_SECONDS, return_when="FIRST_COMPLETED")
        except TimeoutError:  # nothing finished within the watch period
            finished = set()
        for fut in finished:
            r = fut.result()  # a task that failed on every try raises here
            log.info(
                "%s done on %s (%d extracted, %d kept)",
                Path(r["path"]).name,
                r.get("worker", "?"),
                r.get("extracted", r["n"]),
                r.get("kept", 0),
            )
            done(r)
            for v in held.values():
                v.discard(Path(r["path"]).name)
        now = running()
        if not now:  # the scheduler did not answer: keep what we know
            continue
        for w in set(held) - set(now):
            log.warning(
                "dask worker %s left while holding %s; the scheduler retries them on %d remaining worker(s)",
                w,
                ", ".join(sorted(held[w])) or "no shard",
                len(now),
            )
            del held[w]
        for w, v in now.items():
            if w not in held:
                log.info("dask worker %s joined", w)
            held.setdefault(w, set()).update(v)


def check_model(model_dir: str | Path) -> Path:
    """The model directory, checked to hold a SavedModel, made absolute (dask workers may run in
    another directory)."""
    from landmarks.delg_io import check_saved_model

    return check_saved_model(Path(model_dir).resolve())


def _clean_dir(out_dir: Path, keep: set[str], row_keys: RowKeys) -> int:
    """Remove temp files of killed runs, shards not in `keep`, caches from another model/config."""
    removed = 0
    for p in list(out_dir.glob(".shard-*.tmp")) + list(out_dir.glob(".local-cache-*.tmp")):
        p.unlink(missing_ok=True)
        removed += 1
    for p in out_dir.glob(SHARD_GLOB):
        if p.name not in keep:
            log.info("removing stale shard %s", p.name)
            p.unlink(missing_ok=True)
            removed += 1
    for p in out_dir.glob(CACHE_GLOB):
        if not row_keys.matches(read_attrs(p), True):
            log.info("removing stale local cache %s", p.name)
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def _plan(
    ids: Sequence[str],
    paths: Sequence[str],
    n_shards: int,
    name_fn,
    split: str,
    local: bool,
    cfg,
    model_dir: Path,
    row_keys: RowKeys,
    threads: int,
    out_dir: Path,
    kind: str,
    by_hash: bool = False,
):
    """Cut rows into shards; return (all paths, tasks still to run).

    Contiguous row ranges, or (`by_hash`) id-hash buckets: an id's shard never depends on the
    other rows, and a changed shard keeps the rows of its old file whose file key is unchanged,
    so appending or removing rows only sends the new images through the model.  Every row is
    stored with its file key (``cache.file_keys``)."""
    settings = result_settings(cfg)
    all_paths, todo = [], []
    keys_all = cache.file_keys(ids, paths, cfg.extract.file_key)
    if by_hash:
        bucket = id_bucket(ids, n_shards)
        members = [np.flatnonzero(bucket == i) for i in range(n_shards)]
    else:
        bounds = np.linspace(0, len(ids), n_shards + 1).round().astype(int)
        members = [np.arange(int(bounds[i]), int(bounds[i + 1])) for i in range(n_shards)]
    for i in range(n_shards):
        rows = members[i].tolist()
        sid, spath = [ids[r] for r in rows], [paths[r] for r in rows]
        out = out_dir / name_fn(i, n_shards)
        skeys = [keys_all[r] for r in rows]
        content = cache.digest("rows", *(f"{r}:{k}" for r, k in zip(rows, skeys)))
        row_fps = row_keys.attrs(local)
        fp = cache.digest(*row_fps.values(), split, kind, f"{i}/{n_shards}", f"local={int(local)}", content)
        all_paths.append(out)
        attrs = read_attrs(out) if out.exists() else None
        if attrs is not None and attrs.get("fingerprint") == fp:
            continue
        if out.exists():
            log.info("redoing %s (%s)", out.name, "unreadable" if attrs is None else "fingerprint changed")
        todo.append(
            ShardTask(
                out=str(out),
                ids=sid,
                paths=spath,
                model_dir=str(model_dir),
                settings=settings,
                local=local,
                threads=threads,
                prefetch=cfg.extract.prefetch,
                attrs={
                    "fingerprint": fp,
                    **row_fps,
                    "split": split,
                    "shard": i,
                    "num_shards": n_shards,
                    "kind": kind,
                    "model": str(model_dir),
                    "settings": json.dumps(settings, sort_keys=True),
                },
                order=rows if by_hash else None,
                keys=skeys,
            )
        )
    return all_paths, todo


def _summary(split: str, results: list[dict], skipped: int, seconds: float) -> str:
    """One log line: images extracted, failures by reason, shards run / kept / skipped, speed."""
    n = sum(r["n"] for r in results)
    done = sum(r["done"] for r in results)
    kept = sum(r.get("kept", 0) for r in results)
    fails: collections.Counter = collections.Counter()
    for r in results:
        fails.update(r["failures"])
    why = ", ".join(f"{k}: {v}" for k, v in sorted(fails.items())) or "none"
    return (
        f"features {split}: {done}/{n} images extracted, {sum(fails.values())} failed ({why}), "
        f"{len(results)} shards run ({kept} rows kept from them), {skipped} skipped as done, {seconds:.1f} s, "
        f"{n / max(seconds, 1e-9):.2f} images/s"
    )


def _resolve_jobs(cfg, jobs, scheduler, n_tasks: int) -> tuple[int, object, int]:
    """(jobs, scheduler, TF threads per worker): config defaults, the cores split between local jobs."""
    jobs = check_setting("extract.jobs", cfg.extract.jobs if jobs is None else jobs)  # --jobs, checked as at load
    scheduler = cfg.extract.scheduler if scheduler is None else scheduler
    if scheduler:
        threads = cfg.extract.intra_op_threads  # remote workers: 0 = TF default there
    else:
        threads = cfg.extract.intra_op_threads or max(1, available_cores() // max(1, min(jobs, max(n_tasks, 1))))
    return jobs, scheduler, threads


def _cap_shards(cfg, n_shards: int, n_rows: int) -> int:
    """A shard is held in memory until written: raise N so no shard exceeds max_shard_images."""
    cap = int(cfg.extract.max_shard_images)
    if cap > 0 and n_rows > cap * n_shards:
        wanted = -(-n_rows // cap)
        log.info(
            "%d images: using %d shards instead of %d (extract.max_shard_images=%d)", n_rows, wanted, n_shards, cap
        )
        return wanted
    return n_shards


def _sticky_shards(out_dir: Path, asked: int, capped: int, n_rows: int, cfg) -> int:
    """When max_shard_images raised the shard count, keep the count already on disk while its
    shards stay within 1.25 x the cap: adding 1 % of rows must not re-bucket every id."""
    if capped == asked:
        return capped
    counts = {a.get("num_shards") for a in (read_attrs(p) for p in sorted(out_dir.glob(SHARD_GLOB))[:1]) if a}
    old = int(next(iter(counts))) if counts else 0
    if old >= asked and n_rows <= 1.25 * int(cfg.extract.max_shard_images) * old:
        return old
    return capped


def run_features(
    cfg,
    data_dir,
    work_dir,
    model_dir,
    split: str,
    shards: int | None = None,
    jobs: int | None = None,
    scheduler=None,
    local: bool | None = None,
) -> list[Path]:
    """_run_features after checking every input CSV (a broken one stops the run before any
    extraction), holding the split's directory lock (one run at a time per WORK_DIR split)."""
    from landmarks.data import check_inputs
    from landmarks.locks import stage_lock

    check_inputs(data_dir, skip=split)
    with stage_lock(features_dir(Path(work_dir).resolve(), split), "features"):
        return _run_features(cfg, data_dir, work_dir, model_dir, split, shards, jobs, scheduler, local)


def _run_features(
    cfg,
    data_dir,
    work_dir,
    model_dir,
    split: str,
    shards: int | None = None,
    jobs: int | None = None,
    scheduler=None,
    local: bool | None = None,
) -> list[Path]:
    """Extract features of one split into WORK_DIR/features/<split>/shard-i-of-N.h5 (resumable).

    `scheduler`: a dask address (tcp://host:8786) or Client; `local`: store local features
    (default: test yes, train only when extract.train_local).  Returns the N shard paths.
    """
    from landmarks.data import load_split

    t0 = time.time()
    model_dir = check_model(model_dir)
    n_shards = check_setting("extract.shards", cfg.extract.shards if shards is None else shards)  # as at load
    if local is None:
        local = True if split == "test" else bool(cfg.extract.train_local)
    df = load_split(Path(data_dir).resolve(), split)
    if n_shards > max(1, len(df)):  # an empty shard is a file for nothing (--shards 100000 on 20 images)
        log.info("features %s: %d images: %d shard(s) instead of %d", split, len(df), max(1, len(df)), n_shards)
        n_shards = max(1, len(df))
    out_dir = features_dir(Path(work_dir).resolve(), split)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = _sticky_shards(out_dir, n_shards, _cap_shards(cfg, n_shards, len(df)), len(df), cfg)
    row_keys = RowKeys.of(cfg, model_dir)
    keep = {shard_name(i, n_shards) for i in range(n_shards)}
    _clean_dir(out_dir, keep, row_keys)
    ids, paths = df["id"].tolist(), df["path"].tolist()
    jobs, scheduler, threads = _resolve_jobs(cfg, jobs, scheduler, n_shards)
    all_paths, todo = _plan(
        ids,
        paths,
        n_shards,
        shard_name,
        split,
        bool(local),
        cfg,
        model_dir,
        row_keys,
        threads,
        out_dir,
        "shard",
        by_hash=True,
    )
    skipped = n_shards - len(todo)
    if not todo:
        log.info("features %s: all %d shards up to date in %s", split, n_shards, out_dir)
        _check_some_succeeded(split, all_paths, len(df), [])
        return all_paths
    where = f"dask {scheduler}" if scheduler else f"{min(jobs, len(todo))} job(s)"
    log.info(
        "features %s: %d images in %d shard(s) to run (%d up to date), %s, local=%s",
        split,
        sum(len(t.ids) for t in todo),
        len(todo),
        skipped,
        where,
        bool(local),
    )
    results = _run_tasks(todo, jobs, scheduler, f"features {split}")
    log.info(_summary(split, results, skipped, time.time() - t0))
    _check_some_succeeded(split, all_paths, len(df), results)
    return all_paths


def _check_some_succeeded(split: str, paths: list[Path], n_images: int, results: list[dict]) -> None:
    """A split whose every image failed is a failed run (non-zero exit), not an empty success."""
    import h5py

    stored = 0
    for p in paths:
        with h5py.File(p, "r") as f:
            stored += int(f["ids"].shape[0]) if "global" in f else 0
    if n_images and not stored:
        fails: collections.Counter = collections.Counter()
        for r in results:
            fails.update(r["failures"])
        why = ", ".join(f"{k}: {v}" for k, v in fails.most_common(3)) or "failures recorded by an earlier run"
        raise LandmarksError(f"features {split}: all {n_images} images failed ({why}); nothing to match")


def _cache_name(digest: str):
    """Shard file name function of the local-feature cache for one request digest."""
    return lambda i, n: f"local-cache-{digest}-{i:05d}-of-{n:05d}.h5"


def ensure_local(
    cfg,
    data_dir,
    work_dir,
    model_dir,
    split: str,
    ids: Iterable[str],
    jobs: int | None = None,
    scheduler=None,
    local_only: bool = False,
) -> FeatureStore:
    """Make sure the given ids have local features in the split's store; return the store.

    Cached rows of these ids whose image's file key changed since they were extracted are dropped
    first (``store.drop_rows``); ids then holding local features, or known to have failed, are
    left alone; the others are extracted (global + local) and cached as
    local-cache-<digest>-i-of-N.h5 (resumable).  Holds the split directory's lock.  `local_only`:
    the store returned is opened for local features only (its 1.58 M global ids are not read).
    """
    from landmarks.data import load_split
    from landmarks.locks import stage_lock
    from landmarks.store import load_index

    out_dir = features_dir(Path(work_dir).resolve(), split)
    wanted = list(dict.fromkeys(str(i) for i in ids))
    with stage_lock(out_dir, "features"):
        path_of = {}
        if data_dir is not None:  # without data nothing can be keyed (nor extracted)
            df = load_split(Path(data_dir).resolve(), split)
            path_of = dict(zip(df["id"].astype(str), df["path"].astype(str)))
        known = [i for i in wanted if i in path_of]
        keys = cache.file_keys(known, [path_of[i] for i in known], cfg.extract.file_key)
        _drop_stale_rows(out_dir, dict(zip(known, keys)))
        row_keys = None
        if model_dir is not None and (Path(model_dir) / "saved_model.pb").exists():
            model_dir = check_model(model_dir)
            row_keys = RowKeys.of(cfg, model_dir)
            _clean_dir(out_dir, {p.name for p in out_dir.glob(SHARD_GLOB)}, row_keys)  # caches of another model
        store = FeatureStore(out_dir, index=load_index(out_dir, local_only=True))  # 1.58 M global ids unread
        need = [i for i in wanted if not store.has_local(i)]
        if need:
            failed = FeatureStore(out_dir).failures()
            need = sorted(i for i in need if i not in failed)
        if not need and local_only:
            return store
        store.close()
        if not need:
            return FeatureStore(out_dir)
        unknown = [i for i in need if i not in path_of]
        if unknown:
            raise LandmarksError(
                f"{len(unknown)} id(s) not in the {split} split of {data_dir} (first: {', '.join(unknown[:3])})"
            )
        if model_dir is None:
            raise LandmarksError(f"{len(need)} {split} image(s) need local features and no model was given (--model)")
        model_dir = check_model(model_dir)
        row_keys = RowKeys.of(cfg, model_dir)
        _extract_local(cfg, model_dir, split, need, [path_of[i] for i in need], out_dir, row_keys, jobs, scheduler)
    return FeatureStore(out_dir, index=load_index(out_dir, local_only=local_only))


def _drop_stale_rows(out_dir: Path, key_of: dict[str, str]) -> None:
    """Drop the local-cache rows (and failures) of ids whose file key is no longer `key_of[id]`: a
    replaced image must not keep the features of the old picture.  Caches without keys go whole."""
    for p in sorted(out_dir.glob(CACHE_GLOB)):
        keys = read_keys(p)
        if keys is None:
            log.info("removing local cache %s (no file keys)", p.name)
            p.unlink(missing_ok=True)
            continue
        stale = {i for i, k in keys.items() if i in key_of and key_of[i] != k}
        if stale:
            log.info("%s: %d cached image(s) changed on disk; their local features are redone", p.name, len(stale))
            drop_rows(p, stale)


def _extract_local(cfg, model_dir, split, need, paths, out_dir, row_keys: RowKeys, jobs, scheduler) -> None:
    """ensure_local's extraction of the `need` ids (called with the split's directory lock held)."""
    name = cache.digest(*row_keys.attrs(True).values(), *need)
    n_shards = _cap_shards(cfg, max(1, min(int(cfg.extract.shards), len(need))), len(need))
    jobs, scheduler, threads = _resolve_jobs(cfg, jobs, scheduler, n_shards)
    t0 = time.time()
    _, todo = _plan(
        need,
        paths,
        n_shards,
        _cache_name(name),
        split,
        True,
        cfg,
        model_dir,
        row_keys,
        threads,
        out_dir,
        "local-cache",
    )
    if todo:
        results = _run_tasks(todo, jobs, scheduler, f"local {split}")
        log.info(_summary(f"{split} (local cache)", results, n_shards - len(todo), time.time() - t0))


def shortlist(cfg, knn_path: str | Path) -> tuple[list[str], list[str]]:
    """(test ids, shortlisted train ids) of a knn output: the train images that verification
    compares, the top verify.num_to_rerank neighbours of each test image."""
    knn = cache.load_npz(knn_path, "`landmarks knn`")
    train_ids = knn["train_ids"]
    top = knn["idx"][:, : max(0, int(cfg.verify.num_to_rerank))]
    wanted = np.unique(top[top >= 0])
    return [str(i) for i in knn["test_ids"]], [str(train_ids[j]) for j in wanted]


def run_local_features(
    cfg, data_dir, work_dir, model_dir, knn_path: str | Path, jobs: int | None = None, scheduler=None
) -> list[Path]:
    """Stage: local features of every image verification will compare, read from a knn output.

    Train extraction is global-only (1.58 M images); verification needs local features of the
    test images and of their shortlisted train neighbours only.  Those that lack them are
    extracted and cached beside the shards (local-cache-*.h5); cached rows of images changed on
    disk are redone; the rest is skipped.  Returns the two feature directories.
    """
    test_ids, train_ids = shortlist(cfg, knn_path)
    out = []
    for split, ids in (("test", test_ids), ("train", train_ids)):
        directory = features_dir(work_dir, split)
        store = ensure_local(
            cfg, data_dir, work_dir, model_dir, split, ids, jobs=jobs, scheduler=scheduler, local_only=True
        )
        missing = [i for i in ids if not store.has_local(i)]
        store.close()
        log.info(
            "local-features: %s: %d of %d images have local features%s",
            split,
            len(ids) - len(missing),
            len(ids),
            " (the others failed extraction)" if missing else "",
        )
        out.append(directory)
    return out
