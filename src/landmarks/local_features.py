"""`landmarks local-features`: local features of the test images and of the shortlisted train images.

Reads the knn output, finds the test images and the top ``verify.num_to_rerank`` train
neighbours of each that lack local features, and extracts global + local features for them
through the features stage's worker, cached as ``local-cache-<digest>-i-of-N.h5`` next to the
shards (``ensure_local``).  Verification then reads them from the store.

With ``verify.matcher=nbb`` the same images also get their NBB feature maps (``ensure_maps``):
the ImageNet Lite0 maps of ``verify.nbb_layers`` at long side ``verify.nbb_image_size``, stored
as ``nbb-maps-<maps fingerprint>-<digest>.h5`` beside the shards, each row with its image's file
key (a replaced image is redone).  The maps do not depend on the DELG model (docs/nbb.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np

from landmarks.datasets.data import load_split
from landmarks.datasets.images import describe_failure, load_image
from landmarks.delg.featuremaps import feature_maps, map_model, maps_fingerprint
from landmarks.features import (
    RowKeys,
    cap_shards,
    check_model,
    clean_dir,
    drop_stale_rows,
    extract_shard,
    features_dir,
    plan,
    summary,
)
from landmarks.shards import resolve_jobs, run_tasks
from landmarks.store import SHARD_GLOB, FeatureStore, drop_maps, load_index, maps_keys, write_maps
from landmarks.utils import LandmarksError, cache, log
from landmarks.utils.locks import stage_lock


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

    out_dir = features_dir(Path(work_dir).resolve(), split)
    wanted = list(dict.fromkeys(str(i) for i in ids))
    with stage_lock(out_dir, "features"):
        path_of = {}
        if data_dir is not None:  # without data nothing can be keyed (nor extracted)
            df = load_split(Path(data_dir).resolve(), split)
            path_of = dict(zip(df["id"].astype(str), df["path"].astype(str)))
        known = [i for i in wanted if i in path_of]
        keys = cache.file_keys(known, [path_of[i] for i in known], cfg.extract.file_key)
        drop_stale_rows(out_dir, dict(zip(known, keys)))
        row_keys = None
        if model_dir is not None and (Path(model_dir) / "saved_model.pb").exists():
            model_dir = check_model(model_dir)
            row_keys = RowKeys.of(cfg, model_dir, split)
            clean_dir(out_dir, {p.name for p in out_dir.glob(SHARD_GLOB)}, row_keys)  # caches of another model
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
        row_keys = RowKeys.of(cfg, model_dir, split)
        _extract_local(cfg, model_dir, split, need, [path_of[i] for i in need], out_dir, row_keys, jobs, scheduler)
    return FeatureStore(out_dir, index=load_index(out_dir, local_only=local_only))


def _extract_local(cfg, model_dir, split, need, paths, out_dir, row_keys: RowKeys, jobs, scheduler) -> None:
    """ensure_local's extraction of the `need` ids (called with the split's directory lock held)."""
    name = cache.digest(*row_keys.attrs(True).values(), *need)
    n_shards = cap_shards(cfg, max(1, min(int(cfg.extract.shards), len(need))), len(need))
    jobs, scheduler, threads = resolve_jobs(cfg, jobs, scheduler, n_shards)
    t0 = time.time()
    _, todo = plan(
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
        results = run_tasks(extract_shard, todo, jobs, scheduler, f"local {split}")
        log.info(summary(f"{split} (local cache)", results, n_shards - len(todo), time.time() - t0))


MAPS_BATCH = 64  # images per NBB maps file (the unit of resume)


def maps_files(vcfg, directory: str | Path) -> list[Path]:
    """The NBB maps files of these settings (``maps_fingerprint``) in a directory."""
    return sorted(Path(directory).glob(f"nbb-maps-{maps_fingerprint(vcfg)}-*.h5"))


def maps_batch(vcfg, ids: list[str], files: list[str], out: str | Path, keys: dict | None = None, **limits) -> Path:
    """The maps core: each image decoded at long side verify.nbb_image_size, through the ImageNet
    Lite0 map model -> one maps file (a bad image is recorded as a failure, never stops it).
    `limits`: load_image's max_pixels / min_size."""
    model_geo = map_model(vcfg.nbb_layers)
    size = int(vcfg.nbb_image_size)
    records: dict = {}
    for image_id, path in zip(ids, files):
        try:
            image, scale = load_image(path, size, **limits)
            records[image_id] = feature_maps(model_geo, image, size, scale)
        except Exception as e:  # noqa: BLE001 - recorded, like the features stage does
            records[image_id] = describe_failure(e)
    return write_maps(out, records, keys)


def ensure_maps(cfg, directory: str | Path, ids: list[str], paths: list[str], keys: list[str]) -> list[Path]:
    """NBB maps of the given images in `directory`: ids whose stored row has another file key (or
    none) are extracted in files of MAPS_BATCH images; returns every maps file of these settings."""
    vc, e = cfg.verify, cfg.extract
    directory = Path(directory)
    key_of = dict(zip(ids, keys))
    have: dict[str, str] = {}
    for p in maps_files(vc, directory):
        old = maps_keys(p)
        stale = {i for i, k in old.items() if i in key_of and key_of[i] != k}
        if stale:  # a replaced image: its old record goes, the new one is extracted below
            drop_maps(p, stale)
        have.update({i: k for i, k in old.items() if i not in stale})
    todo = [k for k, (i, key) in enumerate(zip(ids, keys)) if have.get(i) != key]
    if todo:
        t0 = time.time()
        fp = maps_fingerprint(vc)
        for a in range(0, len(todo), MAPS_BATCH):
            rows = todo[a : a + MAPS_BATCH]
            b_ids = [ids[k] for k in rows]
            out = directory / f"nbb-maps-{fp}-{cache.digest(*b_ids, *(keys[k] for k in rows))}.h5"
            maps_batch(
                vc,
                b_ids,
                [paths[k] for k in rows],
                out,
                {ids[k]: keys[k] for k in rows},
                max_pixels=e.max_image_pixels,
                min_size=e.min_image_size,
            )
        log.info("local-features: NBB maps of %d images in %.1f s -> %s", len(todo), time.time() - t0, directory)
    return maps_files(vc, directory)


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
        if cfg.verify.matcher == "nbb":
            df = load_split(Path(data_dir).resolve(), split)
            path_of = dict(zip(df["id"].astype(str), df["path"].astype(str)))
            known = [i for i in ids if i in path_of]
            paths = [path_of[i] for i in known]
            ensure_maps(cfg, directory, known, paths, cache.file_keys(known, paths, cfg.extract.file_key))
        log.info(
            "local-features: %s: %d of %d images have local features%s",
            split,
            len(ids) - len(missing),
            len(ids),
            " (the others failed extraction)" if missing else "",
        )
        out.append(directory)
    return out
