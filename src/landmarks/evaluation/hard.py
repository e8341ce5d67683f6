"""`make validate-hard`: the hard protocol — k-shot splits of real wide-baseline photos.

The wide-baseline scenes (few photos per landmark, day/night, seasons, wide viewpoint changes)
are the landmarks under test; the Paris and multiview scenes join train as extra classes (more
classes to confuse, as in GLDv2); a seeded sample of product photos joins test as non-landmarks.
For each K in ``hard.shots`` and each of ``hard.seeds`` seeds, ``dataset_import.plan_split``
keeps K train photos per landmark, sends the rest to test and holds a share of the landmarks out
(unseen: empty truth).  The test sets are small (a few dozen landmark queries), so decisions are
taken on the mean over seeds.

Every image of the pool goes through the model once (``probe``): per image the per-scale global
descriptors and the best local features of every probe scale are kept.  A setting's features
are then selected from the probe with the very functions the features stage uses
(``extract.select_local``, ``delg_io`` pooling), and each split is scored with the stage
functions: ``knn.search`` (+ whitening, DBA, QE), ``verify.verify_image``, ``predict.vote`` and
``metrics.score``.  So one extraction serves every split and every setting (``hard.variants``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from landmarks import calibrate, knn, whiten
from landmarks.calibrate import warp_image, warp_seed
from landmarks.config import ImportConfig, apply_updates, log_settings, parse_overrides
from landmarks.datasets import data
from landmarks.datasets.dataset_import import plan_split, read_labels, sample_distractors
from landmarks.datasets.images import describe_failure
from landmarks.delg.delg_io import pool_global
from landmarks.delg.featuremaps import maps_fingerprint
from landmarks.evaluation import metrics, validate
from landmarks.features import (
    ALL_FEATURES,
    check_model,
    describe_image,
    get_model,
    inside_image,
    read_image,
    select_local,
)
from landmarks.local_features import maps_batch
from landmarks.predict import NO_LABEL, calibrated_vote, gate_inliers, vote
from landmarks.store import FeatureMaps, ProbeRecord, maps_keys, probe_ids, read_maps, read_probe, write_probe
from landmarks.utils import LandmarksError, atomic_path, available_cores, cache, file_digest
from landmarks.verify import EVIDENCE, pca_local, verify_evidence
from landmarks.views import View, map_back, merge_views, view_affine, views_of, warp_view

log = logging.getLogger(__name__)

PROBE_VERSION = 1
VIEWS_VERSION = "views-1"  # bump when views.warp_view changes: probed views are then redone

# Named settings scored by the protocol: config overrides on top of the effective config.
# "old defaults" restores the defaults before the hard protocol existed; the levers are each
# applied alone on top of the current config, so a row shows what that one change does.
OLD_DEFAULTS = [
    "extract.global_scales=0.7071,1.0,1.4142",
    "extract.local_scales=0.7071,1.0,1.4142",
    "verify.num_to_rerank=10",
    "verify.geometry=homography",
    "vote.inlier_floor=0",
    "vote.neighbours=10",
    "vote.confidence=score",
    "vote.power=8",
    "verify.mutual_min_sim=0.0",
    "verify.ratio=1.0",
    "whiten.global_pca=false",
    "whiten.global_lw=false",
    "whiten.local_pca=false",
    "knn.dba_k=0",
    "knn.qe_k=0",
]
REFERENCE = [
    "extract.global_scales=0.3536,0.5,0.7071",
    "verify.enabled=false",
    "vote.neighbours=1",
    "vote.method=sum_power",
    "vote.confidence=score",
    "whiten.global_pca=false",
    "whiten.global_lw=false",
    "knn.dba_k=0",
    "knn.qe_k=0",
]
VARIANTS: dict[str, list[str]] = {
    "plain reference (the backbone's GeM, 512 px x 3 scales, cosine top-1)": REFERENCE,
    "old defaults": OLD_DEFAULTS,
    "old defaults, global only": OLD_DEFAULTS + ["verify.enabled=false"],
    "global only": ["verify.enabled=false"],
    # the defaults before Lw (issue 19): no learned whitening, sim**8
    "no Lw, power 8 (defaults before Lw)": ["whiten.global_lw=false", "vote.power=8"],
    "no Lw, power 8, global only": ["whiten.global_lw=false", "vote.power=8", "verify.enabled=false"],
    "global scales 0.25-0.5": ["extract.global_scales=0.25,0.3536,0.5"],
    "global scales 0.5-1.0": ["extract.global_scales=0.5,0.7071,1.0"],
    "global scales 0.71-1.41 (old)": ["extract.global_scales=0.7071,1.0,1.4142"],
    "local scales 0.71-1.41 (old)": ["extract.local_scales=0.7071,1.0,1.4142"],
    "local scales 0.5-1.0": ["extract.local_scales=0.5,0.7071,1.0"],
    "local scales 0.25-1.0": ["extract.local_scales=0.25,0.3536,0.5,0.7071,1.0"],
    "500 local features": ["extract.max_feature_num=500"],
    "rerank R=10": ["verify.num_to_rerank=10", "vote.neighbours=10"],
    "rerank R=20": ["verify.num_to_rerank=20", "vote.neighbours=20"],
    "rerank R=50": ["verify.num_to_rerank=50", "vote.neighbours=50"],
    "rerank R=100": ["verify.num_to_rerank=100", "vote.neighbours=100"],
    "fundamental matrix": ["verify.geometry=fundamental"],
    "fundamental matrix, threshold 8 px": ["verify.geometry=fundamental", "verify.reproj_threshold=8"],
    "RANSAC threshold 16 px": ["verify.reproj_threshold=16"],
    "RANSAC 5000 iterations": ["verify.max_iters=5000"],
    "inlier floor 8 (random-inlier discount)": ["vote.inlier_floor=8"],
    "confidence = margin over runner-up label": ["vote.confidence=margin"],
    "mutual NN min sim 0.5": ["verify.mutual_min_sim=0.5"],
    "ratio test 0.9": ["verify.ratio=0.9"],
    "local PCA (train)": ["whiten.local_pca=true"],
    "global PCA whitening (train)": ["whiten.global_pca=true", "whiten.global_lw=false", "vote.power=8"],
    "global PCA whitening (train) to 128-d, power 3": [
        "whiten.global_pca=true",
        "whiten.global_pca_dim=128",
        "vote.power=3",
        "whiten.global_lw=false",
    ],
    # learned whitening from matching pairs and query feature transformation (issue 19, docs/retrieval.md)
    "global only, centring on the train mean (Lw at full shrinkage)": [
        "verify.enabled=false",
        "whiten.global_lw=true",
        "whiten.lw_shrinkage=1",
        "vote.power=8",
    ],
    "global only, Lw (labels)": [
        "verify.enabled=false",
        "whiten.global_lw=true",
        "whiten.lw_shrinkage=0.3",
        "vote.power=8",
    ],
    "global only, Lw (labels) to 256-d": [
        "verify.enabled=false",
        "whiten.global_lw=true",
        "whiten.lw_dim=256",
        "whiten.lw_shrinkage=0.3",
        "vote.power=8",
    ],
    "global only, Lw (mined)": [
        "verify.enabled=false",
        "whiten.global_lw=true",
        "whiten.positives=mined",
        "whiten.lw_shrinkage=0.3",
        "vote.power=8",
    ],
    "global only, PCA whitening (train)": [
        "verify.enabled=false",
        "whiten.global_pca=true",
        "whiten.global_lw=false",
        "vote.power=8",
    ],
    "global only, query transform (labels)": [
        "verify.enabled=false",
        "whiten.query_transform=true",
        "whiten.global_lw=false",
        "vote.power=8",
    ],
    "global only, Lw + query transform (labels)": [
        "verify.enabled=false",
        "whiten.global_lw=true",
        "whiten.query_transform=true",
        "whiten.lw_shrinkage=0.3",
        "vote.power=8",
    ],
    # with verification: whitened cosines are small (0.1-0.5), so sim**8 leaves the vote to the inliers
    "Lw (labels)": ["whiten.global_lw=true", "whiten.lw_shrinkage=0.3", "vote.power=8"],
    "Lw (labels), power 1": ["whiten.global_lw=true", "vote.power=1", "whiten.lw_shrinkage=0.3"],
    "Lw (labels), shrinkage 0.6, power 0.5": ["whiten.global_lw=true", "whiten.lw_shrinkage=0.6", "vote.power=0.5"],
    "global PCA whitening (train), power 0.5": ["whiten.global_pca=true", "vote.power=0.5", "whiten.global_lw=false"],
    "centring on the train mean, power 0.5": ["whiten.global_lw=true", "whiten.lw_shrinkage=1", "vote.power=0.5"],
    "Lw (mined), shrinkage 0.6, power 0.5": [
        "whiten.global_lw=true",
        "whiten.positives=mined",
        "whiten.lw_shrinkage=0.6",
        "vote.power=0.5",
    ],
    "no DBA (k=0)": ["knn.dba_k=0"],
    "DBA k=1": ["knn.dba_k=1"],
    "DBA k=2": ["knn.dba_k=2"],
    "alpha-QE k=2": ["knn.qe_k=2"],
    # calibrated confidence (issue 23): P(same landmark | evidence) learned on each split's train pairs
    "calibrated": ["vote.method=calibrated"],
    "calibrated, label by probability": ["vote.method=calibrated", "vote.calibrated_label=probability"],
    "calibrated, label by probability, no guard": [
        "vote.method=calibrated",
        "vote.calibrated_label=probability",
        "vote.guard_significance=-5",
    ],
    "calibrated, sim + inliers (no NFA)": [
        "vote.method=calibrated",
        "calibrate.features=sim,log_inliers,log_matches,ratio,spread",
    ],
    "calibrated, sim + NFA": ["vote.method=calibrated", "calibrate.features=sim,significance"],
    "calibrated, host terms (sim**8, inliers/70)": ["vote.method=calibrated", "calibrate.features=sim8,inliers70"],
    "calibrated, ridge l2=10": ["vote.method=calibrated", "calibrate.l2=10"],
    "calibrated, no warps": ["vote.method=calibrated", "calibrate.warps=0"],
    "a-contrario gate: inliers count when NFA <= 1": ["vote.significance_gate=0"],
    # the inlier term on the Lw + power 0.5 defaults: chance inliers (5-6, the random floor) lift
    # every candidate by 0.07-0.09; discount them, or weigh real matches more
    "inlier floor 6": ["vote.inlier_floor=6"],
    "inlier floor 6, weight 2": ["vote.inlier_floor=6", "vote.inlier_weight=2"],
    "inlier weight 2": ["vote.inlier_weight=2"],
    "inlier cap 30": ["vote.inlier_cap=30"],
    "inlier floor 6, cap 30": ["vote.inlier_floor=6", "vote.inlier_cap=30"],
    # affine view synthesis of the test images (docs/view_synthesis.md)
    "views: tilt 2 at 0 deg (shared 1000)": ["extract.view_tilts=2", "extract.view_angles=0"],
    "views: tilt 2 at 0 deg, +1000 per view": [
        "extract.view_tilts=2",
        "extract.view_angles=0",
        "extract.view_features=1000",
    ],
    "views: tilt 2 at 0, 90 deg (shared 1000)": ["extract.view_tilts=2", "extract.view_angles=0,90"],
    "views: tilt 2 at 0, 90 deg, +500 per view": [
        "extract.view_tilts=2",
        "extract.view_angles=0,90",
        "extract.view_features=500",
    ],
    # Neural Best-Buddies on ImageNet Lite0 feature maps (docs/nbb.md); 8 px: the finest cells are 8 px
    # at 384 px, about 20 px in a 1024 px photo (hard mean 0.600 on 2 seeds; 4 px: 0.710; mutual 0.775)
    "NBB matcher": ["verify.matcher=nbb", "verify.reproj_threshold=8"],
    "NBB matcher, threshold 4 px": ["verify.matcher=nbb"],
    # NBB's wrong candidates keep more chance inliers (random floor 16 against 6): discount them
    "NBB matcher, inlier floor 16": ["verify.matcher=nbb", "verify.reproj_threshold=8", "vote.inlier_floor=16"],
    "NBB matcher, a-contrario gate": ["verify.matcher=nbb", "verify.reproj_threshold=8", "vote.significance_gate=0"],
}
# Pool roles that can be test images of a scored split: the only ones whose synthetic views are
# probed (the guards' test images, extra-train and demo photos, keep their own features alone).
VIEW_ROLES = ("landmark", "distractor", "nonlandmark")
DEFAULT_ROW = "current config (default)"
SHORTLIST = 20  # per-landmark table: is the right landmark among the first SHORTLIST global neighbours
QUERY_NEIGHBOURS = 10  # global neighbours kept per test image in a split's results (for show --hard-split)


# -- pool ---------------------------------------------------------------------------------------
def pool_table(hc) -> pd.DataFrame:
    """Every image the protocol may use: columns id, cls, role (landmark | extra | distractor), file."""

    root = Path(hc.shared_data)
    if not (root / hc.landmarks).is_dir():
        raise LandmarksError(f"hard protocol: {root / hc.landmarks} not found (set hard.shared_data)")

    def labels(name: str, role: str) -> pd.DataFrame:
        src = root / name / "LABELS.csv"
        return read_labels(src if src.exists() else root / name, distractors=role == "distractor").assign(role=role)

    frames = [labels(hc.landmarks, "landmark")] + [labels(n, "extra") for n in hc.extra_train]
    if hc.distractors and (hc.distractor_sample or getattr(hc, "nonlandmark_sample", 0)):
        frames.append(labels(hc.distractors, "distractor"))
    pool = pd.concat(frames, ignore_index=True)

    pool["id"] = [file_digest(f) for f in pool["file"]]
    pool = pool.drop_duplicates("id").reset_index(drop=True)
    dis = pool[pool["role"] == "distractor"]
    # one seeded permutation: the first distractor_sample products are protocol 1's non-landmarks,
    # the first nonlandmark_sample (a superset when larger) protocol 2's; role "nonlandmark" marks
    # the products only protocol 2 uses
    n_big = max(int(hc.distractor_sample), int(getattr(hc, "nonlandmark_sample", 0)))
    all_dis = dis
    if len(dis) > n_big:
        dis = sample_distractors(all_dis, n_big, 0)
    if len(all_dis) > hc.distractor_sample:
        small = set(sample_distractors(all_dis, hc.distractor_sample, 0)["id"])
        dis = dis.assign(role=np.where(dis["id"].isin(small), "distractor", "nonlandmark"))
    pool = pd.concat([pool[pool["role"] != "distractor"], dis, demo_rows(hc)], ignore_index=True)
    return pool.sort_values("id").reset_index(drop=True)[["id", "cls", "role", "file"]]


def demo_rows(hc) -> pd.DataFrame:
    """The demo dataset's images (guard set), when hard.demo_dir holds one: roles demo-train / demo-test."""

    d = Path(hc.demo_dir) if hc.demo_dir else None
    if d is None or not (d / "train.csv").exists() or not (d / "solution.csv").exists():
        return pd.DataFrame(columns=["id", "cls", "role", "file"])
    train, test = data.load_split(d, "train"), data.load_split(d, "test")
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "id": train["id"],
                    "cls": train["landmark_id"].astype(str),
                    "role": "demo-train",
                    "file": train["path"],
                }
            ),
            pd.DataFrame({"id": test["id"], "cls": "", "role": "demo-test", "file": test["path"]}),
        ],
        ignore_index=True,
    )


# -- probe extraction -------------------------------------------------------------------------------
def _probe_batch(
    model_dir: str,
    threads: int,
    ids: list[str],
    files: list[str],
    settings: dict,
    out: str,
    warp: int | None = None,
    view: tuple[View, tuple[float, ...]] | None = None,
) -> str:
    """Worker: every image through the features core at every probe scale -> one probe file (store).

    `warp` (a seed): probe a known warp of each image instead (calibrate.warp_image), stored
    under warp_id(id, warp): the calibration's positives where a split has no same-label pairs.
    `view` (a synthetic view and its scales): probe that view of each image at those scales
    (views.warp_view), stored in view pixels under view_id(id, view, scales)."""

    model = get_model(model_dir, threads)
    scales = [float(s) for s in (settings["probe_scales"] if view is None else view[1])]
    records = {}
    for image_id, path in zip(ids, files):
        key = image_id if warp is None else warp_id(image_id, warp)
        key = key if view is None else view_id(image_id, *view)
        try:
            image, scale = read_image(path, settings)
            if warp is not None:
                image = warp_image(image, np.random.default_rng(warp_seed(image_id, warp)))
            if view is not None:
                image, _ = warp_view(image, view[0])
            per_scale, lf = describe_image(
                model, image, scales, ALL_FEATURES, settings["abs_thres"], list(range(len(scales)))
            )
        except Exception as e:  # noqa: BLE001 - recorded, like the features stage does
            records[key] = ProbeRecord(None, None, None, 0.0, describe_failure(e))
            continue
        lf = select_local(lf, scales, int(settings["probe_features"]))
        records[key] = ProbeRecord(per_scale, lf, image.shape[:2], float(scale))
    return str(write_probe(out, records))


def warp_id(image_id: str, seed: int) -> str:
    """Probe key of the known warp `seed` of an image."""
    return f"{image_id}~warp{int(seed)}"


def view_id(image_id: str, view: View, scales) -> str:
    """Probe key of a synthetic view of an image, probed at `scales`."""
    return f"{image_id}~{view.key}~{cache.digest(VIEWS_VERSION, *(f'{float(s):.4f}' for s in scales))[:6]}"


def probe_views(cfg) -> list[tuple[View, tuple[float, ...]]]:
    """The (view, local scales) pairs a setting's test images need probed (none when views are off)."""
    e = cfg.extract
    scales = tuple(float(s) for s in e.local_scales)
    return [(v, scales) for v in views_of(e.view_tilts, e.view_angles)]


def probe_settings(cfg) -> dict:
    e, h = cfg.extract, cfg.hard
    return {
        "probe_scales": [float(s) for s in h.probe_scales],
        "probe_features": int(h.probe_features),
        "max_image_size": e.max_image_size,
        "max_image_pixels": e.max_image_pixels,
        "min_image_size": e.min_image_size,
        "abs_thres": e.abs_thres,
        "version": PROBE_VERSION,
    }


def probe_fingerprint(cfg, model_dir) -> str:
    """Probe files are named by it: both paths of the model and the probe settings."""
    return cache.digest(*cache.model_fingerprints(model_dir), json.dumps(probe_settings(cfg), sort_keys=True))[:12]


def extract_probe(
    cfg, pool: pd.DataFrame, model_dir, work_dir, warp: int | None = None, view: tuple | None = None
) -> list[Path]:
    """Probe the pool images that no stored probe file holds yet (skip by id, as a rerun or a larger
    pool needs); returns every probe file of this model and these settings.  `warp`: probe the
    known warp of that seed of each pool image instead (ids warp_id(id, warp)); `view`: probe that
    (synthetic view, scales) of each pool image instead (ids view_id(id, *view))."""
    from joblib import Parallel, delayed
    from tqdm import tqdm

    model_dir = check_model(model_dir)
    settings = probe_settings(cfg)
    fp = probe_fingerprint(cfg, model_dir)
    out_dir = Path(work_dir) / "probe"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {i for p in out_dir.glob(f"probe-{fp}-*.h5") for i in probe_ids(p)}
    keys = pool["id"] if warp is None else pool["id"].map(lambda i: warp_id(i, warp))
    keys = keys if view is None else pool["id"].map(lambda i: view_id(i, *view))
    todo_rows = pool[~keys.isin(done)]
    size = max(1, int(cfg.hard.probe_batch))
    todo = [todo_rows.iloc[a : a + size] for a in range(0, len(todo_rows), size)]
    if todo:
        jobs = max(1, min(int(cfg.extract.jobs), len(todo)))
        threads = max(1, available_cores() // jobs)
        log.info(
            "hard: probing %d of %d pool images%s at scales %s (%d jobs)",
            len(todo_rows),
            len(pool),
            "" if view is None else f" (view {view[0].key})",
            settings["probe_scales"] if view is None else list(view[1]),
            jobs,
        )
        tasks = (
            delayed(_probe_batch)(
                str(model_dir),
                threads,
                list(b["id"]),
                list(b["file"]),
                settings,
                str(out_dir / f"probe-{fp}-{_probe_tag(warp, view)}{cache.digest(*b['id'])}.h5"),
                warp,
                view,
            )
            for b in todo
        )
        with tqdm(total=len(todo), desc="hard: probe batches", unit="batch", disable=None) as bar:
            for _ in Parallel(n_jobs=jobs, return_as="generator_unordered")(tasks):
                bar.update(1)
    return sorted(out_dir.glob(f"probe-{fp}-*.h5"))


def _probe_tag(warp: int | None, view: tuple | None) -> str:
    if view is not None:
        return f"{view_id('', *view)[1:].replace('~', '-')}-"
    return "" if warp is None else f"warp{warp}-"


@dataclass
class Probe:
    """Probe outputs of the pool, in memory: per-scale globals and per-scale top local features."""

    scales: np.ndarray  # [S] probe scales
    globals_: dict  # id -> [S, D]
    raw_local: dict  # id -> (LocalFeatures in resized-image pixels, image shape, resize scale)
    failures: dict  # id -> reason

    @classmethod
    def load(cls, paths: list[Path], scales, wanted: set[str] | None = None) -> "Probe":

        g, loc, fail = {}, {}, {}
        for p in paths:
            for image_id, r in read_probe(p, wanted).items():
                if r.failure:
                    fail[image_id] = r.failure
                    continue
                g[image_id] = r.per_scale
                loc[image_id] = (r.local, r.shape, r.scale)
        return cls(np.asarray(scales, np.float64), g, loc, fail)

    def _rows(self, wanted) -> list[int]:
        rows = []
        for s in wanted:
            hit = np.flatnonzero(np.isclose(self.scales, float(s), atol=1e-3))
            if not len(hit):
                raise LandmarksError(
                    f"hard: scale {s} is not among the probe scales {list(self.scales)} (add it to hard.probe_scales)"
                )
            rows.append(int(hit[0]))
        return rows

    def global_matrix(self, ids: list[str], scales) -> np.ndarray:
        """Global descriptors pooled over `scales` by the features stage's rule (delg_io.pool_global)."""

        rows = self._rows(scales)
        return np.stack([pool_global(self.globals_[i][rows]) for i in ids]).astype(np.float32)

    def local(self, image_id: str, scales, cap: int, extract=None):
        """Local features at `scales` with `cap`, as the features stage stores them; with the
        synthetic views of `extract` (an ExtractConfig whose view_tilts are set) merged in as
        ``features.add_views`` merges them, when the probe holds every view of this image."""

        self._rows(scales)
        lf, shape, scale = self.raw_local[image_id]
        lf = select_local(lf, scales, cap)
        views = views_of(extract.view_tilts, extract.view_angles) if extract is not None else []
        extra = []
        for v in views:
            rec = self.raw_local.get(view_id(image_id, v, scales))
            if rec is None:  # not probed (an image no scored split tests): its own features alone
                return inside_image(lf, shape, scale)
            vlf, vshape, _ = rec
            a, expect = view_affine(shape, v)
            if tuple(vshape) != tuple(expect):
                raise LandmarksError(f"hard: view {v.key} of {image_id} has shape {vshape}, expected {expect}")
            budget = int(extract.view_features) or int(cap)
            extra.append(map_back(select_local(vlf, scales, budget), a, vshape))
        if extra:
            lf = merge_views(lf, extra, cap, int(extract.view_features))
        return inside_image(lf, shape, scale)


# -- splits -----------------------------------------------------------------------------------------
@dataclass
class Split:
    name: str
    shots: int
    seed: int
    train_ids: list[str]
    train_labels: np.ndarray  # int64 class codes
    test_ids: list[str]
    solution: pd.DataFrame  # id, landmarks (empty = non-landmark)
    protocol: str = "extra"  # "extra" (protocol 1: extra train classes) | "nonlandmark" (protocol 2)


# The two standing protocols: name in the report, and what each split holds.
PROTOCOLS = {
    "extra": "P1: + extra train classes, 100 products",
    "nonlandmark": "P2: no extra classes, mostly non-landmarks",
}


def make_splits(cfg, pool: pd.DataFrame, usable: set[str]) -> list[Split]:
    """k-shot splits for every K in hard.shots and seed in range(hard.seeds) (dataset_import.plan_split)."""

    hc = cfg.hard
    pool = pool[pool["id"].isin(usable)]
    lm_all = pool[pool["role"].isin(["landmark", "extra"])].assign(extra=lambda d: d["role"] == "extra")
    protocols = [("extra", lm_all, pool[pool["role"] == "distractor"], "")]
    if int(getattr(hc, "nonlandmark_sample", 0)) > 0:
        protocols.append(
            ("nonlandmark", lm_all[~lm_all["extra"]], pool[pool["role"].isin(["distractor", "nonlandmark"])], "P2 ")
        )
    out = []
    for protocol, lm, dis, prefix in protocols:
        for k in hc.shots:
            for seed in range(int(hc.seeds)):
                ic = ImportConfig(train_per_class=int(k), seed=seed, heldout_class_fraction=hc.heldout_class_fraction)
                rows, _, _, label_of = plan_split(lm, ic)
                train = rows[rows["split"] == "train"].sort_values("id")
                test = rows[rows["split"] == "test"].sort_values("id")
                test_ids = list(test["id"]) + list(dis["id"])
                truth = list(test["truth"]) + [""] * len(dis)
                out.append(
                    Split(
                        f"{prefix}K={k} seed={seed}",
                        int(k),
                        seed,
                        list(train["id"]),
                        train["cls"].map(label_of).to_numpy(np.int64),
                        test_ids,
                        pd.DataFrame({"id": test_ids, "landmarks": truth}),
                        protocol,
                    )
                )
    return out


def guard_splits(cfg, pool: pd.DataFrame, usable: set[str]) -> list[Split]:
    """The easy sets as guards: the `make import` split of the extra-train sets (+ the product sample),
    and the demo dataset when present.  A change must not make them worse."""

    pool = pool[pool["id"].isin(usable)]
    out = []
    easy = pool[pool["role"] == "extra"]
    if len(easy):
        rows, _, _, label_of = plan_split(easy, cfg.dataset_import)
        train = rows[rows["split"] == "train"].sort_values("id")
        test = rows[rows["split"] == "test"].sort_values("id")
        dis = pool[pool["role"] == "distractor"]
        ids, truth = list(test["id"]) + list(dis["id"]), list(test["truth"]) + [""] * len(dis)
        out.append(
            Split(
                "easy import",
                0,
                cfg.dataset_import.seed,
                list(train["id"]),
                train["cls"].map(label_of).to_numpy(np.int64),
                ids,
                pd.DataFrame({"id": ids, "landmarks": truth}),
            )
        )
    demo_train = pool[pool["role"] == "demo-train"]
    if len(demo_train):
        sol = data.load_solution(cfg.hard.demo_dir)
        sol = sol[sol["id"].isin(usable)]
        out.append(
            Split(
                "demo",
                0,
                0,
                list(demo_train["id"]),
                demo_train["cls"].astype(np.int64).to_numpy(),
                list(sol["id"]),
                sol[["id", "landmarks"]].fillna("").reset_index(drop=True),
            )
        )
    return out


# -- scoring ----------------------------------------------------------------------------------------
def _local_key(cfg, views: bool = False) -> str:
    """What a local-feature selection depends on; `views`: the query side, with synthetic views."""
    e = cfg.extract
    key = [list(e.local_scales), e.max_feature_num, cfg.whiten.local_pca, cfg.whiten.local_pca_dim]
    if views and e.view_tilts:
        key.append([list(e.view_tilts), list(e.view_angles), e.view_features])
    return json.dumps(key)


PAIRS_SAVE_EVERY = 5000  # newly verified pairs between saves of the pair cache


class Scorer:
    """Scores settings on splits with the stage functions; caches local features and pair inliers."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self._local: dict = {}
        self._pairs: dict = {}
        self._new_pairs = 0
        self._pairs_path: Path | None = None  # the pair cache file (load_pairs): saved as it grows
        self._calib: dict = {}
        self._whiten: dict = {}
        self.verify_seconds = 0.0
        self.maps: dict = {}  # maps fingerprint -> id -> FeatureMaps (verify.matcher=nbb)

    def _lf(self, cfg, image_id: str, w_local=None, tag: str = "", views: bool = False):
        """Local features of one image under cfg (PCA-projected with w_local, fitted on split `tag`);
        `views`: as a test image (with the synthetic views of extract.view_tilts when set)."""
        key = (_local_key(cfg, views), tag if w_local is not None else "", image_id)
        lf = self._local.get(key)
        if lf is None:
            e = cfg.extract
            lf = self.probe.local(image_id, e.local_scales, int(e.max_feature_num), e if views else None)
            if w_local is not None:
                lf = pca_local(lf, w_local)
            self._local[key] = lf
        return lf

    def _global(self, cfg, split: Split, queries: list[str] | None = None):
        """(sims, idx) of the split's test images (or of `queries`) against its train database: the knn
        stage's core on the probe's descriptors (whitening fitted on the split's train images when on,
        then `knn.neighbours`: DBA, search, QE exactly as `landmarks knn` runs them)."""

        db = self.probe.global_matrix(split.train_ids, cfg.extract.global_scales)
        q = self.probe.global_matrix(split.test_ids if queries is None else queries, cfg.extract.global_scales)
        if whiten.global_on(cfg):
            w = self.whitening(cfg, split)
            db = whiten.apply_global(w, db)
            # the query transformation moves the test queries only (as the knn stage does)
            q = whiten.apply_query(w, q) if queries is None else whiten.apply_global(w, q)
        return knn.neighbours(cfg, db, q)

    def whitening(self, cfg, split: Split) -> dict:
        """The global part of the whiten stage fitted on the split's train images and labels
        (whiten.fit_global_learned: PCA-whitening or Lw, and the query transformation)."""
        key = json.dumps([split.name, cache.settings_hash(cfg, "whiten"), list(cfg.extract.global_scales)])
        if key not in self._whiten:
            db = self.probe.global_matrix(split.train_ids, cfg.extract.global_scales)
            self._whiten[key] = whiten.fit_global_learned(cfg, db, split.train_labels)
        return self._whiten[key]

    def calibration(self, cfg, split: Split) -> dict:
        """The calibration model of a split, learned on its train images alone (calibrate.fit_pairs):
        train images verified against their own global neighbours, same label = positive; known
        warps of train images (when probed) add positives where same-label pairs are too few."""

        cc = cfg.calibrate
        key = json.dumps(
            [
                split.name,
                cache.settings_hash(cfg, "calibrate", "verify", "knn", "whiten"),
                _local_key(cfg),
                cfg.extract.global_scales,
            ]
        )
        if key in self._calib:
            return self._calib[key]
        n = len(split.train_ids)
        anchors = calibrate.pick_anchors(split.train_ids, cc.seed, cc.max_anchors)
        m = min(n, int(cc.search_depth))
        sims, idx = self._global(cfg, split, [split.train_ids[a] for a in anchors])
        a, b, sim, same = calibrate.train_pairs(
            sims[:, :m], idx[:, :m], anchors, split.train_labels, int(cc.positives), int(cc.negatives)
        )
        groups: dict[int, list[int]] = {}
        for r, ai in enumerate(a):
            groups.setdefault(int(ai), []).append(r)
        qids = [split.train_ids[ai] for ai in groups]
        cands = [[split.train_ids[b[r]] for r in rows] for rows in groups.values()]
        ev_rows = self.pair_evidence(cfg, split, qids, cands)
        ev = np.zeros((len(a), ev_rows.shape[2]))
        for g, rows in enumerate(groups.values()):
            ev[rows] = ev_rows[g, : len(rows)]
        n_warp = 0
        if int(same.sum()) < int(cc.min_positives) and int(cc.warps) > 0:
            pick = calibrate.pick_anchors(split.train_ids, cc.seed + 1, cc.warps)
            wid = [(int(t), warp_id(split.train_ids[t], int(cc.seed))) for t in pick]
            wid = [(t, w) for t, w in wid if w in self.probe.globals_]
            if wid:
                ws, wi = self._global(cfg, split, [w for _, w in wid])
                wsim, wsame = [], []
                qids, cands = [], []
                for r, (t, w) in enumerate(wid):
                    row = [int(j) for j in wi[r, : int(cc.negatives) + 1] if j >= 0]
                    if t not in row:  # the original must be among the candidates: it is the positive
                        row = [t] + row[: int(cc.negatives)]
                    qids.append(w)
                    cands.append([split.train_ids[j] for j in row])
                    sim_of = dict(zip(wi[r].tolist(), ws[r].tolist()))
                    for j in row:
                        wsim.append(sim_of.get(j, float("nan")))
                        wsame.append(split.train_labels[j] == split.train_labels[t])
                wev = self.pair_evidence(cfg, split, qids, cands)
                flat = np.concatenate([wev[r, : len(c)] for r, c in enumerate(cands)])
                wsim = np.asarray(wsim)
                ok = np.isfinite(wsim)
                sim = np.concatenate([sim, wsim[ok]])
                ev = np.concatenate([ev, flat[ok]])
                same = np.concatenate([same, np.asarray(wsame, bool)[ok]])
                n_warp = len(wid)
        if same.all() or not same.any():
            model = None
        else:
            model = calibrate.fit_pairs(cfg, sim, ev, same)
            model["n_warp"] = n_warp
        self._calib[key] = model
        return model

    def _vkey(self, cfg, split: Split, views: bool = False):
        """(pair-cache key of the verify settings, local PCA fitted on the split's train or None);
        `views`: the queries are test images (with synthetic views when on)."""

        w_local = None
        if cfg.whiten.local_pca:
            desc = np.concatenate([self._lf(cfg, i).descriptors for i in split.train_ids])
            w_local = whiten.fit_local(desc, cfg.whiten.local_pca_dim)
        vkey = json.dumps(
            [_local_key(cfg, views), split.name if w_local is not None else "", cache.settings_hash(cfg, "verify")]
        )
        return vkey, w_local

    def pair_evidence(
        self, cfg, split: Split, queries: list[str], cands: list[list[str]], test: bool = False
    ) -> np.ndarray:
        """verify.EVIDENCE of each (query, candidate) pair [q, R, 4]; pairs are verified once per run
        (and across runs through the pair cache file).  `test`: the queries are test images (their
        local features include the synthetic views when extract.view_tilts is set; train images'
        never do, as in the pipeline)."""

        vkey, w_local = self._vkey(cfg, split, test)
        R = max((len(c) for c in cands), default=0)
        ev = np.zeros((len(queries), R, len(EVIDENCE)), np.float64)
        t0 = time.time()
        for r, (qid, cand) in enumerate(zip(queries, cands)):
            todo = [c for c in cand if (vkey, qid, c) not in self._pairs]
            if todo:
                if cfg.verify.matcher == "nbb":  # the pool's feature maps (extract_maps_probe)
                    maps = self.maps[maps_fingerprint(cfg.verify)]
                    q, lfs = maps.get(qid), [maps.get(c) for c in todo]
                else:
                    q = self._lf(cfg, qid, w_local, split.name, views=test)
                    lfs = [self._lf(cfg, c, w_local, split.name) for c in todo]
                for c, e in zip(todo, verify_evidence(cfg.verify, q, lfs)):
                    self._pairs[(vkey, qid, c)] = e
                    self._new_pairs += 1
                if self._pairs_path is not None and self._new_pairs >= PAIRS_SAVE_EVERY:
                    self.save_pairs(self._pairs_path)  # a slow setting killed midway keeps its pairs
            if cand:
                ev[r, : len(cand)] = [self._pairs[(vkey, qid, c)] for c in cand]
        self.verify_seconds += time.time() - t0
        return ev

    def _evidence(self, cfg, split: Split, idx: np.ndarray) -> np.ndarray:
        R = min(int(cfg.verify.num_to_rerank), idx.shape[1])
        cands = [[split.train_ids[j] for j in idx[r, :R] if j >= 0] for r in range(len(split.test_ids))]
        ev = self.pair_evidence(cfg, split, split.test_ids, cands, test=True)
        if ev.shape[1] < R:
            ev = np.concatenate([ev, np.zeros((ev.shape[0], R - ev.shape[1], ev.shape[2]))], axis=1)
        return ev

    def load_pairs(self, path: Path) -> None:
        import pickle

        self._pairs_path = path
        if path.exists():
            try:
                self._pairs.update(pickle.loads(path.read_bytes()))
            except Exception as e:  # noqa: BLE001 - a broken cache is only slower
                log.warning("hard: pair cache %s unreadable (%s); verifying afresh", path, e)

    def save_pairs(self, path: Path) -> None:
        import pickle

        if self._new_pairs:
            with atomic_path(path) as tmp:
                tmp.write_bytes(pickle.dumps(self._pairs, protocol=4))
            self._new_pairs = 0

    def score(self, cfg, split: Split) -> dict:
        """GAP, accuracy, recall@R and the inliers of correct and wrong candidates on one split."""

        sims, idx = self._global(cfg, split)
        ev = self._evidence(cfg, split, idx) if cfg.verify.enabled else None
        inl = None if ev is None else ev[..., 0].astype(np.int32)
        model = self.calibration(cfg, split) if ev is not None and cfg.vote.method == "calibrated" else None
        if model is not None:
            labels, conf = calibrated_vote(cfg, sims, idx, split.train_labels, ev, model)
        else:
            labels, conf = vote(cfg.vote, sims, idx, split.train_labels, gate_inliers(cfg, inl, ev))
        ok = labels != NO_LABEL
        preds = pd.DataFrame(
            {"id": np.asarray(split.test_ids)[ok], "label": labels[ok].astype(str), "confidence": conf[ok]}
        )
        s = metrics.score(split.solution, preds)
        truth = split.solution["landmarks"].to_numpy()
        cand_labels = np.where(idx >= 0, split.train_labels[np.clip(idx, 0, None)], -1).astype(str)
        s["recall"] = validate.shortlist_recall(cand_labels, truth, cfg.hard.recall_at)
        if inl is not None:
            s["good"], s["bad"] = validate.split_inliers(cand_labels[:, : inl.shape[1]], truth, inl)
        s["ranks"] = rank_figures(truth, labels, conf)
        s["conf"] = prediction_outcomes(truth, labels, conf)
        keep = min(idx.shape[1], QUERY_NEIGHBOURS)
        hit = cand_labels == truth.astype(str)[:, None]  # neighbour of the right landmark
        first, rows = hit.argmax(axis=1), np.arange(len(truth))
        found = hit.any(axis=1)
        s["queries"] = {  # per test image, for the per-landmark table and `landmarks show --hard-split`
            "ids": list(split.test_ids),
            "truth": truth.astype(str),
            "label": labels,
            "conf": conf,
            "shortlisted": (cand_labels[:, :SHORTLIST] == truth.astype(str)[:, None]).any(axis=1),
            "idx": idx[:, :keep],
            "sims": sims[:, :keep],
            "inliers": None if inl is None else inl[:, :keep],
            "right_rank": np.where(found, first + 1, 0),  # 1-based rank of the right landmark's first photo, 0: none
            "right_idx": np.where(found, idx[rows, first], -1),
            "right_sim": np.where(found, sims[rows, first], np.nan),
        }
        return s


def prediction_outcomes(truth, labels: np.ndarray, conf: np.ndarray) -> dict:
    """Confidences of the predictions by outcome: correct, wrong label (landmark queries), non-landmark."""

    truth = np.asarray(truth, dtype=str)
    pred = labels != NO_LABEL
    lab = labels.astype(str)
    correct = pred & (truth != "") & (lab == truth)
    wrong = pred & (truth != "") & (lab != truth)
    nonlm = pred & (truth == "")
    return {"correct": conf[correct], "wrong": conf[wrong], "nonlandmark": conf[nonlm]}


def rank_figures(truth, labels: np.ndarray, conf: np.ndarray) -> dict:
    """How wrong predictions (non-landmarks and wrong labels) rank against correct ones: the share of
    them above the correct answers' median and above their 10th percentile (ranks, not raw values,
    are comparable across scoring rules)."""
    o = prediction_outcomes(truth, labels, conf)
    bad = np.concatenate([o["wrong"], o["nonlandmark"]])
    if not len(o["correct"]) or not len(bad):
        return {"above_median": float("nan"), "above_q10": float("nan"), "nonlm_above_median": float("nan")}
    med, q10 = np.quantile(o["correct"], 0.5), np.quantile(o["correct"], 0.1)
    nl = o["nonlandmark"]
    return {
        "above_median": float((bad > med).mean()),
        "above_q10": float((bad > q10).mean()),
        "nonlm_above_median": float((nl > med).mean()) if len(nl) else float("nan"),
    }


def landmark_table(pool: pd.DataFrame, splits, per) -> pd.DataFrame:
    """Where failures are: one row per landmark (pool class), pooled over the given splits (a
    protocol's seeds and K): its queries (test photos with the landmark in train), how many were
    predicted right and wrong, how often the right landmark was in the global top SHORTLIST, the
    median confidence of its right and wrong predictions, and its held-out queries (the landmark
    kept out of train: any prediction is a false positive) with their median confidence.  A last
    row pools the non-landmark products.  Worst first: most wrong, then most confident wrong."""

    cls = dict(zip(pool["id"], pool["cls"].astype(str)))
    role = dict(zip(pool["id"], pool["role"]))
    rows: dict[str, dict] = {}
    products = []
    for _, p in zip(splits, per):
        q = p["queries"]
        for i, image_id in enumerate(q["ids"]):
            if role.get(image_id) in ("distractor", "nonlandmark"):
                products.append(float(q["conf"][i]))
                continue
            r = rows.setdefault(cls.get(image_id, "?"), {"right": [], "wrong": [], "shortlisted": 0, "heldout": []})
            if q["truth"][i] == "":
                r["heldout"].append(float(q["conf"][i]))
                continue
            ok = q["label"][i] != NO_LABEL and str(q["label"][i]) == q["truth"][i]
            r["right" if ok else "wrong"].append(float(q["conf"][i]))
            r["shortlisted"] += bool(q["shortlisted"][i])

    def med(x):
        return float(np.median(x)) if len(x) else float("nan")

    out = [
        {
            "landmark": name,
            "queries": len(r["right"]) + len(r["wrong"]),
            "correct": len(r["right"]),
            "wrong": len(r["wrong"]),
            f"in top {SHORTLIST}": r["shortlisted"],
            "median conf correct": med(r["right"]),
            "median conf wrong": med(r["wrong"]),
            "held-out queries": len(r["heldout"]),
            "median conf held-out": med(r["heldout"]),
        }
        for name, r in rows.items()
    ]
    df = pd.DataFrame(out, columns=LANDMARK_COLUMNS)
    df = df.sort_values(
        ["wrong", "median conf wrong", "landmark"], ascending=[False, False, True], na_position="last"
    ).reset_index(drop=True)
    if products:
        nl = {c: float("nan") for c in LANDMARK_COLUMNS}
        nl.update({"landmark": "(non-landmark products)", "held-out queries": len(products)})
        nl["median conf held-out"] = med(products)
        df = pd.concat([df, pd.DataFrame([nl], columns=LANDMARK_COLUMNS)], ignore_index=True)
    return df


LANDMARK_COLUMNS = [
    "landmark",
    "queries",
    "correct",
    "wrong",
    f"in top {SHORTLIST}",
    "median conf correct",
    "median conf wrong",
    "held-out queries",
    "median conf held-out",
]


# -- stage ----------------------------------------------------------------------------------------
def variant_configs(cfg, names=None) -> list[tuple[str, object]]:

    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        raise LandmarksError(f"hard: unknown variant {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    out = [(DEFAULT_ROW, cfg)]
    for name in names or VARIANTS:  # in the order asked
        overrides = VARIANTS[name]
        c = copy.deepcopy(cfg)
        apply_updates(c, parse_overrides(overrides))
        out.append((name, c))
    return out


@dataclass
class Setup:
    """What scoring needs, ready: the pool, the k-shot splits and guards, a Scorer over the loaded
    probe (pair cache read) and the pair cache's path."""

    pool: pd.DataFrame
    splits: list[Split]
    guards: list[Split]
    scorer: Scorer
    pair_cache: Path

    def split(self, name: str) -> Split:
        """The split (or guard) called `name`; protocol 1's may be given as 'P1 K=1 seed=4'."""
        want = name.strip()
        if want.startswith("P1 "):
            want = want[3:]
        for s in self.splits + self.guards:
            if s.name == want:
                return s
        known = ", ".join(f"'{s.name}'" for s in self.splits + self.guards)
        raise LandmarksError(f"hard: no split {name!r} (known: {known})")


def setup(cfg, configs, model_dir, tool_dir) -> Setup:
    """Probe the pool with the model (only the images no probe file holds yet; known warps when a
    calibrated setting needs them), load it, make the splits and a Scorer with the pair cache."""
    tool_dir = Path(tool_dir)
    pool = pool_table(cfg.hard)
    paths = extract_probe(cfg, pool, model_dir, tool_dir)
    wanted = set(pool["id"])
    warp_pool = warp_candidates(cfg, configs, pool, set(wanted))
    if len(warp_pool):
        paths = extract_probe(cfg, warp_pool, model_dir, tool_dir, warp=int(cfg.calibrate.seed))
        wanted |= {warp_id(i, int(cfg.calibrate.seed)) for i in warp_pool["id"]}
    view_rows = pool[pool["role"].isin(VIEW_ROLES)]
    for view in dict.fromkeys(v for _, c in configs if c.verify.enabled for v in probe_views(c)):
        paths = extract_probe(cfg, view_rows, model_dir, tool_dir, view=view)
        wanted |= {view_id(i, *view) for i in view_rows["id"]}
    probe = Probe.load(paths, cfg.hard.probe_scales, wanted)
    if probe.failures:
        log.warning(
            "hard: %d pool images failed and are left out: %s",
            len(probe.failures),
            ", ".join(f"{k}: {v}" for k, v in list(probe.failures.items())[:3]),
        )
    splits = make_splits(cfg, pool, set(probe.globals_))
    guards = guard_splits(cfg, pool, set(probe.globals_))
    scorer = Scorer(probe)
    for name, c in configs:  # NBB settings: the maps of the pool, once per maps setting
        if c.verify.enabled and c.verify.matcher == "nbb" and maps_fingerprint(c.verify) not in scorer.maps:
            scorer.maps[maps_fingerprint(c.verify)] = extract_maps_probe(c.verify, pool, tool_dir)
    pair_cache = tool_dir / f"pairs-{probe_fingerprint(cfg, model_dir)}.pkl"
    scorer.load_pairs(pair_cache)
    return Setup(pool, splits, guards, scorer, pair_cache)


def run_validate_hard(cfg, work_dir, model_dir, variants=None) -> Path:
    """Score every variant on every k-shot split; write WORK_DIR/hard/report.md (+ results.json)."""
    work_dir = Path(work_dir) / "hard"
    configs = variant_configs(cfg, variants)
    st = setup(cfg, configs, model_dir, work_dir)
    pool, splits, guards, scorer, pair_cache = st.pool, st.splits, st.guards, st.scorer, st.pair_cache
    results = {}
    for name, c in configs:
        t0, v0 = time.time(), scorer.verify_seconds
        per = [scorer.score(c, s) for s in splits]
        results[name] = {
            "splits": per,
            "guards": {g.name: scorer.score(c, g)["gap"] for g in guards},
            "seconds": time.time() - t0,
            "verify_seconds": scorer.verify_seconds - v0,
        }
        scorer.save_pairs(pair_cache)
        log.info(
            "hard: %-60s %s  mean %.4f  %s",
            name,
            "  ".join(
                f"{pr} K={k}: {_mean(per, splits, k, protocol=pr):.4f}"
                for pr in _protocols(splits)
                for k in cfg.hard.shots
            ),
            _both(per, splits),
            "  ".join(f"{g}: {v:.4f}" for g, v in results[name]["guards"].items()),
        )
        if len(results) < len(configs):  # a partial report survives a later failure
            write_report(cfg, work_dir, pool, splits, results, model_dir, echo=False)
    return write_report(cfg, work_dir, pool, splits, results, model_dir)


def extract_maps_probe(vcfg, pool: pd.DataFrame, work_dir) -> dict:
    """NBB feature maps of the pool (``local_features.maps_batch``), cached in WORK_DIR/probe-nbb/ as
    nbb-maps-<maps fingerprint>-<digest>.h5 (resumed by id, like the probe); id -> FeatureMaps."""
    fp = maps_fingerprint(vcfg)
    out_dir = Path(work_dir) / "probe-nbb"
    out_dir.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    for p in out_dir.glob(f"nbb-maps-{fp}-*.h5"):
        done |= set(maps_keys(p))
    todo = pool[~pool["id"].isin(done)]
    if len(todo):
        log.info("hard: NBB maps of %d of %d pool images (%s)", len(todo), len(pool), ", ".join(vcfg.nbb_layers))
        from tqdm import tqdm

        size = 64
        for a in tqdm(range(0, len(todo), size), desc="hard: NBB maps", unit="batch", disable=None):
            b = todo.iloc[a : a + size]
            maps_batch(vcfg, list(b["id"]), list(b["file"]), out_dir / f"nbb-maps-{fp}-{cache.digest(*b['id'])}.h5")
    maps = read_maps(sorted(out_dir.glob(f"nbb-maps-{fp}-*.h5")), set(pool["id"]))
    return {k: v for k, v in maps.items() if isinstance(v, FeatureMaps)}


def warp_candidates(cfg, configs, pool: pd.DataFrame, usable: set[str]) -> pd.DataFrame:
    """Pool rows whose known warps a calibrated setting needs: the train images of the splits with
    fewer same-label train pairs than calibrate.min_positives (one photo per landmark)."""
    if not any(c.verify.enabled and c.vote.method == "calibrated" and c.calibrate.warps > 0 for _, c in configs):
        return pool.iloc[:0]
    need: set[str] = set()
    for s in make_splits(cfg, pool, usable) + guard_splits(cfg, pool, usable):
        counts = pd.Series(s.train_labels).value_counts()
        if int((counts * (counts - 1)).sum()) < int(cfg.calibrate.min_positives):
            need |= set(s.train_ids)
    return pool[pool["id"].isin(need)]


def _protocols(splits) -> list[str]:
    return list(dict.fromkeys(s.protocol for s in splits))


def _values(per, splits, k=None, key="gap", protocol=None) -> list[float]:
    return [
        p[key]
        for p, s in zip(per, splits)
        if (k is None or s.shots == k) and (protocol is None or s.protocol == protocol)
    ]


def _mean(per, splits, k=None, key="gap", protocol="extra") -> float:
    return float(np.mean(_values(per, splits, k, key, protocol)))


def _both(per, splits, key="gap") -> float:
    """The decision figure: the mean of the protocols' means (each over its K and seeds)."""
    return float(np.mean([_mean(per, splits, None, key, pr) for pr in _protocols(splits)]))


def _span(per, splits, k, key="gap", protocol="extra") -> str:
    v = _values(per, splits, k, key, protocol)
    return f"{np.mean(v):.4f} ({np.min(v):.3f}-{np.max(v):.3f})"


def _gap_lines(cfg, pool, splits, results, model_dir) -> list[str]:
    """Header and the GAP table: one row per named setting, mean (min-max) over seeds per protocol
    and K, each protocol's mean, the mean of the protocols' means (the decision figure), guards."""
    shots = list(cfg.hard.shots)
    prs = _protocols(splits)
    guard_names = list(next(iter(results.values()))["guards"])
    n_nl = int(pool["role"].isin(["distractor", "nonlandmark"]).sum())
    lines = [
        "# Hard protocol report",
        "",
        f"Pool: {int((pool['role'] == 'landmark').sum())} wide-baseline photos, "
        f"{int((pool['role'] == 'extra').sum())} extra-train photos, {n_nl} product photos; model `{model_dir}`; "
        f"{len(splits)} splits (K in {shots}, {cfg.hard.seeds} seeds, held-out class share "
        f"{cfg.hard.heldout_class_fraction}).",
        "",
        "Protocols: **P1** = the wide-baseline landmarks K-shot + the Paris and multiview scenes as extra train "
        f"classes + {int(cfg.hard.distractor_sample)} product photos as non-landmarks; **P2** = the wide-baseline "
        f"landmarks K-shot alone in train + {int(getattr(cfg.hard, 'nonlandmark_sample', 0))} product photos "
        "(about 90 % of the test images are non-landmarks, as in real test sets).  Decide on `mean`, the mean "
        "of the two protocols' means.",
        "",
        "## GAP, mean (min-max) over seeds",
        "",
        "Guard columns (GAP on one split each): `easy import` is the `make import` split of the Paris and "
        "multiview scenes with the product sample as non-landmarks; `demo` is the demo dataset.",
        "",
        "| setting | "
        + " | ".join(f"{pr[:1].upper()}{prs.index(pr) + 1} K={k}" for pr in prs for k in shots)
        + " | "
        + " | ".join(f"P{i + 1} mean" for i in range(len(prs)))
        + " | **mean** | "
        + " | ".join(f"P{i + 1} accuracy" for i in range(len(prs)))
        + " | "
        + "".join(f"{g} | " for g in guard_names)
        + "verify s |",
        "|---|" + "---|" * (len(prs) * len(shots) + 2 * len(prs) + 1 + len(guard_names) + 1),
    ]
    lines[-2] = lines[-2].replace("E1 ", "P1 ").replace("N2 ", "P2 ")
    for name, r in results.items():
        per = r["splits"]
        lines.append(
            f"| {name} | "
            + " | ".join(_span(per, splits, k, protocol=pr) for pr in prs for k in shots)
            + " | "
            + " | ".join(f"{_mean(per, splits, protocol=pr):.4f}" for pr in prs)
            + f" | **{_both(per, splits):.4f}** | "
            + " | ".join(f"{_mean(per, splits, key='accuracy', protocol=pr):.3f}" for pr in prs)
            + " | "
            + "".join(f"{r['guards'][g]:.4f} | " for g in guard_names)
            + f"{r['verify_seconds']:.1f} |"
        )
    return lines


def _rank_lines(splits, results) -> list[str]:
    """Per protocol: how wrong predictions rank against correct ones, and confidence quantiles."""
    lines = [
        "",
        "## Ranking of wrong predictions against correct ones (per protocol, all K and seeds)",
        "",
        "`wrong > median` / `wrong > q10`: share of the wrong predictions (non-landmarks and wrong labels) "
        "whose confidence is above the correct answers' median / 10th percentile, per split, averaged. "
        "Raw confidences are not comparable across scoring rules; these shares are.  Confidence quantiles "
        "pooled over the protocol's splits.",
        "",
        "| setting | protocol | wrong > median | wrong > q10 | non-landmarks > median | correct q10 / q50 "
        "| non-landmark q50 / q90 / q99 | wrong-label q50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for i, pr in enumerate(_protocols(splits)):
            per = [p for p, s in zip(r["splits"], splits) if s.protocol == pr]
            rk = {k: float(np.nanmean([p["ranks"][k] for p in per])) for k in per[0]["ranks"]}
            c = {k: np.concatenate([p["conf"][k] for p in per]) for k in per[0]["conf"]}

            def q(x, a):
                return f"{np.quantile(x, a):.3g}" if len(x) else "-"

            lines.append(
                f"| {name} | P{i + 1} | {rk['above_median']:.3f} | {rk['above_q10']:.3f} | "
                f"{rk['nonlm_above_median']:.3f} | {q(c['correct'], 0.1)} / {q(c['correct'], 0.5)} | "
                f"{q(c['nonlandmark'], 0.5)} / {q(c['nonlandmark'], 0.9)} / {q(c['nonlandmark'], 0.99)} | "
                f"{q(c['wrong'], 0.5)} |"
            )
    return lines


def _recall_lines(cfg, splits, results) -> list[str]:
    """Per-split figures of the default row, then shortlist recall@R per distinct shortlist."""
    shots, at = list(cfg.hard.shots), list(cfg.hard.recall_at)
    lines = [
        "",
        f"## Per split ({DEFAULT_ROW})",
        "",
        "| split | landmark queries | test images | GAP | accuracy | " + " | ".join(f"R@{r}" for r in at) + " |",
        "|---|---|---|---|---|" + "---|" * len(at),
    ]
    for s, p in zip(splits, results[DEFAULT_ROW]["splits"]):
        n_lm = int((s.solution["landmarks"] != "").sum())
        lines.append(
            f"| {s.name} | {n_lm} | {len(s.test_ids)} | {p['gap']:.4f} | {p['accuracy']:.3f} | "
            + " | ".join(f"{p['recall'][r]:.3f}" for r in at)
            + " |"
        )
    lines += [
        "",
        "## Shortlist recall@R (mean over seeds; rows with the same shortlist as a row above are left out)",
        "",
        "| setting | K | " + " | ".join(f"R@{r}" for r in at) + " |",
        "|---|---|" + "---|" * len(at),
    ]
    seen_recall = set()
    for name, r in results.items():
        key = json.dumps([p["recall"] for p in r["splits"]])
        if key in seen_recall:  # same shortlist as a row above (settings that leave the global kNN alone)
            continue
        seen_recall.add(key)
        for k in shots:
            per = [p for p, s in zip(r["splits"], splits) if s.shots == k]
            lines.append(
                f"| {name} | {k} | " + " | ".join(f"{np.mean([p['recall'][a] for p in per]):.3f}" for a in at) + " |"
            )
    return lines


def _separation_lines(results) -> tuple[list[str], dict]:
    """Inlier separation of every verified setting, all splits pooled; and the figures by name."""

    lines = [
        "",
        "## Inlier separation (all splits pooled): correct-class against wrong candidates",
        "",
        "| setting | correct q10/q50/q90 | wrong q50/q90 | random floor (wrong q95) | correct at or below floor | ROC AUC |",
        "|---|---|---|---|---|---|",
    ]
    summary = {}
    for name, r in results.items():
        if "good" not in r["splits"][0]:
            continue
        sep = validate.separation(
            np.concatenate([p["good"] for p in r["splits"]]), np.concatenate([p["bad"] for p in r["splits"]])
        )
        summary[name] = sep
        lines.append(
            f"| {name} | {sep['good_q10']:.0f}/{sep['good_q50']:.0f}/{sep['good_q90']:.0f} | "
            f"{sep['bad_q50']:.0f}/{sep['bad_q90']:.0f} | {sep['floor']:.0f} | {sep['good_at_floor']:.3f} | "
            f"{sep['auc']:.3f} |"
        )
    return lines, summary


def _landmark_lines(pool, splits, results) -> tuple[list[str], dict]:
    """The per-landmark tables of every setting and protocol (``landmark_table``), and the same as
    records by setting and protocol for results.json."""

    lines = [
        "",
        "## Where failures are: per landmark (each protocol's splits pooled, all K and seeds)",
        "",
        f"`queries`: test photos whose landmark is in train; `in top {SHORTLIST}`: of those, how many had "
        f"the right landmark among the first {SHORTLIST} global neighbours (a wrong answer with it there is a "
        "verification / voting failure, without it a retrieval failure); `held-out`: photos of the landmark "
        "while it was kept out of train (any confident prediction is a false positive).  Worst landmark first; "
        "`landmarks show --hard-split NAME` draws a split's worst cases.",
    ]
    tables: dict = {}

    def cell(v):
        if isinstance(v, str):
            return v
        if v != v:  # nan
            return "-"
        return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.3g}"

    for name, r in results.items():
        tables[name] = {}
        for i, pr in enumerate(_protocols(splits)):
            pick = [(s, p) for s, p in zip(splits, r["splits"]) if s.protocol == pr]
            df = landmark_table(pool, [s for s, _ in pick], [p for _, p in pick])
            tables[name][pr] = json.loads(df.to_json(orient="records"))
            lines += ["", f"### {name}: P{i + 1}", "", "| " + " | ".join(df.columns) + " |"]
            lines.append("|---" * len(df.columns) + "|")
            for row in df.itertuples(index=False):
                lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return lines, tables


def _paired_lines(results) -> list[str]:
    """Correct-class pairs of each verified setting against the default's, pair by pair: only for
    settings with the default's shortlist (same pairs, same order), e.g. other local features."""

    base = results.get(DEFAULT_ROW)
    if base is None or "good" not in base["splits"][0]:
        return []
    g0 = np.concatenate([p["good"] for p in base["splits"]])
    b0 = np.concatenate([p["bad"] for p in base["splits"]])
    floor = validate.separation(g0, b0)["floor"]
    lines = [
        "",
        f"## Correct pairs against the default, pair by pair (same shortlist; all splits pooled; "
        f"the default's random floor = {floor:.0f} inliers)",
        "",
        "| setting | correct pairs | inliers mean / median change | correct above floor: default -> setting "
        "| moved above / fell to the floor | wrong pairs above floor: default -> setting |",
        "|---|---|---|---|---|---|",
    ]
    same_list = json.dumps([p["recall"] for p in base["splits"]])
    for name, r in results.items():
        if name == DEFAULT_ROW or "good" not in r["splits"][0]:
            continue
        if json.dumps([p["recall"] for p in r["splits"]]) != same_list:
            continue
        g = np.concatenate([p["good"] for p in r["splits"]])
        b = np.concatenate([p["bad"] for p in r["splits"]])
        if g.shape != g0.shape or b.shape != b0.shape:
            continue
        up = int(((g0 <= floor) & (g > floor)).sum())
        down = int(((g0 > floor) & (g <= floor)).sum())
        d = g.astype(np.int64) - g0
        lines.append(
            f"| {name} | {len(g)} | {d.mean():+.1f} / {np.median(d):+.0f} | {int((g0 > floor).sum())} -> "
            f"{int((g > floor).sum())} | {up} / {down} | {int((b0 > floor).sum())} -> {int((b > floor).sum())} |"
        )
    return lines if len(lines) > 6 else []


def write_report(cfg, work_dir: Path, pool, splits, results, model_dir, echo: bool = True) -> Path:
    """WORK_DIR/report.md (GAP, per split, recall, separation) and results.json; prints the GAP table."""
    shots = list(cfg.hard.shots)
    gap_lines = _gap_lines(cfg, pool, splits, results, model_dir)
    sep_lines, summary = _separation_lines(results)
    lm_lines, lm_tables = _landmark_lines(pool, splits, results)
    lines = (
        gap_lines
        + _rank_lines(splits, results)
        + _recall_lines(cfg, splits, results)
        + sep_lines
        + _paired_lines(results)
        + lm_lines
    )
    out = work_dir / "report.md"
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    js = {
        name: {
            "gap": {str(k): _values(r["splits"], splits, k, protocol="extra") for k in shots},  # P1
            "gap_by_protocol": {
                pr: {str(k): _values(r["splits"], splits, k, protocol=pr) for k in shots} for pr in _protocols(splits)
            },
            "protocol_means": {pr: _mean(r["splits"], splits, protocol=pr) for pr in _protocols(splits)},
            "mean": _both(r["splits"], splits),
            "ranks": {
                pr: {
                    k: float(np.nanmean([p["ranks"][k] for p, s in zip(r["splits"], splits) if s.protocol == pr]))
                    for k in r["splits"][0]["ranks"]
                }
                for pr in _protocols(splits)
            },
            "guards": r["guards"],
            "verify_seconds": r["verify_seconds"],
            "separation": summary.get(name),
            "landmarks": lm_tables.get(name),
        }
        for name, r in results.items()
    }
    with atomic_path(work_dir / "results.json") as tmp:
        tmp.write_text(json.dumps(js, indent=1), encoding="utf-8")
    if echo:
        print("\n".join(gap_lines))
        log.info("hard: report -> %s", out)
    return out


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "validate-hard",
        parents=common("work_dir", "zero_model"),
        help="hard protocol: k-shot splits of the wide-baseline photos -> WORK_DIR/hard/report.md",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME[;NAME...]",
        help="score only these named variants (repeatable, or ';'-separated; default: all); "
        "the current config is always scored",
    )
    p.set_defaults(func=_cli)


def _cli(args, cfg) -> int:

    log_settings(log, cfg, "hard")
    names = [n.strip() for v in args.variant or [] for n in v.split(";") if n.strip()]
    run_validate_hard(cfg, args.work_dir, args.model, names or None)
    return 0
