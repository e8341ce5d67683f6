"""`make features`: sharded, parallel, resumable DELG feature extraction.

The rows of a split's CSV (``data.load_split``) are cut into N id-hash buckets (sha1(id) mod N,
rows in CSV order, each row's CSV position stored so readers restore CSV order); each bucket is
one task that writes ``WORK_DIR/features/<split>/shard-i-of-N.h5`` atomically
(``store.write_shard``).  Tasks run in-process (1 job), on joblib loky workers (J jobs; each
worker loads the model once and keeps it), or on a Dask cluster (``--scheduler tcp://...``, the
same task function through ``client.map``).  Inside a task a thread decodes the next images
while the model runs on the current one.

Resume (``landmarks.utils.cache``): each shard stores the fingerprints of what its rows depend on (the
global one: the model's global path and the global settings; with local features also the local
one: the model's local path and the local settings), plus a digest of the shard's ids and their
file keys.  A rerun skips shards whose fingerprint matches; shards from another N, unreadable
(half-deleted) or left as temp files by a killed run are removed and redone.  Incremental: a
redone shard keeps the rows (and failures) of its old file whose file key and row fingerprints
are unchanged, so appending 1 % of the rows, re-adapting the local head or changing a local
setting sends only the new images through the model for a global-only train split (hloc-style
skip by key, within a stable id-hash partition).

Train gets global descriptors only (``extract.train_local`` false), test gets global + local.
``local_features.ensure_local`` extracts global + local for given ids that lack local features and caches them
as ``local-cache-<digest>-i-of-N.h5`` next to the shards: the local-features stage
(``run_local_features``, after knn) calls it for the test images and their shortlisted train
images, and ``landmarks show`` for the pairs it draws; verify only reads them.  Bad images never stop the stage: they go to the shard's failures
with a short reason (see ``landmarks.datasets.images``).
"""

from __future__ import annotations

import collections
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from landmarks.config import check_setting
from landmarks.datasets.data import check_inputs, load_split
from landmarks.datasets.images import describe_failure, load_image
from landmarks.delg.delg_io import check_saved_model, load_delg, local_features, pool_global
from landmarks.shards import id_bucket, report_progress, resolve_jobs, run_tasks, worker_name
from landmarks.store import (
    CACHE_GLOB,
    SHARD_GLOB,
    LocalFeatures,
    decode_ids,
    drop_rows,
    read_attrs,
    read_keys,
    shard_name,
    write_shard,
)
from landmarks.utils import LandmarksError, cache, call_writing, configure_tensorflow, log
from landmarks.utils.layout import WorkLayout
from landmarks.utils.locks import stage_lock
from landmarks.views import map_back, merge_views, views_of, warp_view

# ExtractConfig fields that change what is stored (jobs/shards/scheduler/prefetch do not): the local
# path's fields and the global scales (the global path's other fields are among the local ones).
RESULT_FIELDS = ("global_scales", *cache.LOCAL_FIELDS)


PROGRESS_REPORT_SECONDS = 0.5  # a worker reports its done-image count this often (progress_path)


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
    """WORK_DIR/features/<split> (the WORK_DIR layout: landmarks.utils.layout)."""

    return WorkLayout(work_dir).features(split)


def result_settings(cfg, split: str = "") -> dict:
    """The extraction settings that change stored features of `split` (RESULT_FIELDS, and the
    view synthesis settings on the test split when views are on: ``cache.local_fields``), JSON-ready."""
    e = cfg.extract
    names = dict.fromkeys(RESULT_FIELDS + cache.local_fields(cfg, split))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(e, k)) for k in names)}


@dataclass(frozen=True)
class RowKeys:
    """What a stored row depends on besides its image (``cache.feature_fingerprints``)."""

    global_fp: str
    local_fp: str

    @staticmethod
    def of(cfg, model_dir, split: str = "") -> "RowKeys":
        return RowKeys(*cache.feature_fingerprints(cfg, model_dir, split))

    def attrs(self, local: bool) -> dict:
        return {"global_fingerprint": self.global_fp, "local_fingerprint": self.local_fp if local else ""}

    def matches(self, attrs: dict | None, local: bool) -> bool:
        """True when rows stored with `attrs` may be kept by a task that wants local features or not."""
        if attrs is None or attrs.get("global_fingerprint") != self.global_fp:
            return False
        return not local or (bool(attrs.get("has_local")) and attrs.get("local_fingerprint") == self.local_fp)


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def get_model(model_dir: str, threads: int):
    """Load the model once per process (cached by path and directory digest)."""

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

    return load_image(path, settings["max_image_size"], settings["max_image_pixels"], settings["min_image_size"])


def describe_image(model, image: np.ndarray, scales, cap: int, abs_thres: float, global_rows):
    """The features core: one model call -> (per-scale global descriptors [len(global_rows), D],
    LocalFeatures of every scale in resized-image pixels, at most `cap` per scale).

    The features stage pools the rows at once (`run_model`); the hard protocol's probe keeps them
    all and pools each setting's subset later with the same `delg_io.pool_global`."""

    raw = model(image, list(scales), int(cap), abs_thres, list(global_rows))
    per_scale = np.asarray(raw["global_descriptors"], np.float32)
    return per_scale.reshape(-1, per_scale.shape[-1]), local_features(raw)


def run_model(model, image: np.ndarray, settings: dict, local: bool):
    """One image through the DELG model -> (global unit vector, LocalFeatures at the local scales;
    with synthetic views (settings ``view_tilts``, test split) their features merged in)."""

    scales, rows, cap = model_call(settings, local)
    per_scale, lf = describe_image(model, image, scales, cap, settings["abs_thres"], rows)
    if local and cap == ALL_FEATURES:
        lf = select_local(lf, settings["local_scales"], int(settings["max_feature_num"]))
    if local and settings.get("view_tilts"):
        lf = add_views(model, image, lf, settings)
    return pool_global(per_scale), lf


def view_budget(settings: dict) -> int:
    """Features taken from each synthetic view: view_features, or max_feature_num when they share it."""
    return int(settings.get("view_features") or 0) or int(settings["max_feature_num"])


def add_views(model, image: np.ndarray, lf, settings: dict):
    """`lf` (the image's own local features) merged with those of its synthetic views
    (``views``: ASIFT tilts): each view goes through the same model call at the local scales,
    its keypoints are mapped back to `image` pixels, and ``views.merge_views`` keeps the best."""
    extra = []
    for view in views_of(settings["view_tilts"], settings["view_angles"]):
        warped, a = warp_view(image, view)
        _, vlf = describe_image(
            model, warped, settings["local_scales"], view_budget(settings), settings["abs_thres"], [0]
        )
        extra.append(map_back(vlf, a, warped.shape))
    return merge_views(lf, extra, int(settings["max_feature_num"]), int(settings.get("view_features") or 0))


def extract_shard(task: ShardTask) -> dict:
    """Run one shard task (in any process): write its file, return counts and timing."""
    t0 = time.time()
    kept = _reusable(task)
    run = [k for k, i in enumerate(task.ids) if i not in kept]  # rows that go through the model
    model = get_model(task.model_dir, task.threads) if run else None  # all rows kept: no model load
    report_progress(task.out, len(kept))
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
        "worker": worker_name(),
    }


def _extract_rows(task: ShardTask, model, run: list[int], t0: float, done_before: int = 0) -> dict:
    """Decode and extract the task's rows `run` (a thread decodes the next images while the model
    runs).  id -> ("ok", global, local | None) or ("fail", reason); a bad image never stops it."""

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
                report_progress(task.out, done_before + k)
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


def _reusable(task: ShardTask) -> dict:
    """Rows of the shard file already at `task.out` that this task may keep instead of extracting:
    same global fingerprint (and local one when the task stores local features: RowKeys), same
    file key.  id -> ("ok", global, local | None) or ("fail", reason)."""
    if task.keys is None or not os.path.exists(task.out):
        return {}
    import h5py

    want = dict(zip(task.ids, task.keys))
    out: dict = {}
    try:
        with h5py.File(task.out, "r") as f:
            row_keys = RowKeys(task.attrs["global_fingerprint"], task.attrs["local_fingerprint"])
            if not row_keys.matches(dict(f.attrs), task.local) or "keys" not in f or "keys" not in f["failures"]:
                return {}
            ids, keys = decode_ids(f["ids"][:]), decode_ids(f["keys"][:])
            rows = [r for r, (i, key) in enumerate(zip(ids, keys)) if want.get(i) == key]
            if rows:
                g = f["global"][:] if "global" in f else None
                if task.local:
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
                decode_ids(f["failures/ids"][:]),
                decode_ids(f["failures/reasons"][:]),
                decode_ids(f["failures/keys"][:]),
            ):
                if want.get(i) == key:
                    out[i] = ("fail", reason)
    except (OSError, KeyError):  # unreadable: nothing is kept, everything is extracted again
        return {}
    return out


def check_model(model_dir: str | Path) -> Path:
    """The model directory, checked to hold a SavedModel, made absolute (dask workers may run in
    another directory)."""

    return check_saved_model(Path(model_dir).resolve())


def clean_dir(out_dir: Path, keep: set[str], row_keys: RowKeys) -> int:
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


def plan(
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
    settings = result_settings(cfg, split)
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


def summary(split: str, results: list[dict], skipped: int, seconds: float) -> str:
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


def cap_shards(cfg, n_shards: int, n_rows: int) -> int:
    """A shard is held in memory until written: raise N so no shard exceeds max_shard_images."""
    cap = int(cfg.extract.max_shard_images)
    if cap > 0 and n_rows > cap * n_shards:
        wanted = -(-n_rows // cap)
        log.info(
            "%d images: using %d shards instead of %d (extract.max_shard_images=%d)", n_rows, wanted, n_shards, cap
        )
        return wanted
    return n_shards


def sticky_shards(out_dir: Path, asked: int, capped: int, n_rows: int, cfg) -> int:
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
    n_shards = sticky_shards(out_dir, n_shards, cap_shards(cfg, n_shards, len(df)), len(df), cfg)
    row_keys = RowKeys.of(cfg, model_dir, split)
    keep = {shard_name(i, n_shards) for i in range(n_shards)}
    clean_dir(out_dir, keep, row_keys)
    ids, paths = df["id"].tolist(), df["path"].tolist()
    jobs, scheduler, threads = resolve_jobs(cfg, jobs, scheduler, n_shards)
    all_paths, todo = plan(
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
    results = run_tasks(extract_shard, todo, jobs, scheduler, f"features {split}")
    log.info(summary(split, results, skipped, time.time() - t0))
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


def drop_stale_rows(out_dir: Path, key_of: dict[str, str]) -> None:
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
