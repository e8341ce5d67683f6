"""One typed configuration for every stage.

The dataclass tree below holds every tunable of the pipeline.  It is loaded from a
YAML/TOML file (``--config``) and then overridden by ``section.key=value`` strings from
the command line (``--set verify.num_to_rerank=100``).  Each stage hashes the section(s)
it depends on into the fingerprint of its outputs, so a changed setting redoes exactly
the stages it affects.

Every setting is checked when the config loads, before any stage's work (``check_config``):
its type (a ``Literal`` lists the choices, ``tuple[float, ...]`` the item type), its range,
declared next to the field with ``ranged(default, "[lo, hi]")`` (``(`` / ``)`` for open ends,
``inf`` for no upper bound; floats must be finite), and the few RELATIONS between settings.
A value that fails is one ConfigError line: the key, the value and what is allowed.  Command
options that stand in for a setting (``--shards``, ``--jobs``) use ``check_setting``.

Hand-written rather than pydantic: the checks are ~150 lines over the standard library, keep
the plain dataclasses every stage already uses (``dataclasses.replace``, ``asdict`` hashing),
need no new dependency, and the override syntax (``a.b=1,2``) and one-line messages would have
to be written around a schema library anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

INT_MAX = 2**31 - 1  # the upper bound of an int setting whose range is written "..., inf)"
SEED = "[0, 4294967295]"  # numpy's seed range


@dataclass(frozen=True)
class Range:
    """An interval '[lo, hi]', '(lo, hi)', ... of allowed values; hi may be 'inf' (unbounded, still finite)."""

    text: str
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        m = re.fullmatch(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])", text)
        if not m:
            raise ValueError(f"bad range {text!r}")
        return cls(text, float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")

    def holds(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below


def ranged(default: Any, interval: str, empty: bool = False) -> Any:
    """A numeric field, or a tuple of numbers (each item), whose values must lie in `interval`: checked at load.
    A tuple may be empty only when `empty` (an empty list then means "off")."""
    return field(default=default, metadata={"range": Range.parse(interval), "empty": empty})


@dataclass
class ExtractConfig:
    """DELG feature extraction (`make features`)."""

    # Scales are relative to the image resized to max_image_size; chosen on the hard protocol
    # (`make validate-hard`): an ImageNet backbone describes whole buildings best at 362-724 px.
    global_scales: tuple[float, ...] = ranged(
        (0.3536, 0.5, 0.7071), "(0, 8]"
    )  # scales pooled into the global descriptor
    local_scales: tuple[float, ...] = ranged(
        (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142), "(0, 8]"
    )  # image scales local features are taken from
    max_feature_num: int = ranged(1000, "[1, 100000]")  # local features kept per image (by score)
    abs_thres: float = ranged(0.0, "[-1e6, 1e6]")  # attention/score threshold for local features (<=0: model's own)
    max_image_size: int = ranged(1024, "[16, 65536]")  # long side is resized down to this before the model
    max_image_pixels: int = ranged(120_000_000, "[1, inf)")  # decompression-bomb guard: bigger images are refused
    train_local: bool = False  # extract local features for all train images up front
    shards: int = ranged(4, "[1, 1000000]")  # shards per split (at most one per image)
    jobs: int = ranged(2, "[1, 1024]")  # parallel worker processes (joblib)
    scheduler: str = ""  # dask scheduler address (tcp://host:8786); empty = local joblib
    file_key: Literal["stat", "content"] = "stat"  # reuse key of an image file: size+mtime_ns+inode+ctime, or its bytes
    local_dtype: Literal["float16", "float32"] = "float16"  # storage dtype of local descriptors
    intra_op_threads: int = ranged(0, "[0, 1024]")  # TF threads per worker (0 = cores / jobs)
    min_image_size: int = ranged(16, "[1, 65536]")  # images whose short side is below this are refused ("too small")
    prefetch: int = ranged(2, "[0, 1024]")  # images decoded ahead of inference by a thread inside each worker
    max_shard_images: int = ranged(
        5000, "[0, inf)"
    )  # more shards than asked when needed: bounds worker memory (0 = no cap)
    # Affine view synthesis (ASIFT/MODS, docs/view_synthesis.md), test images only: local features
    # also from views rotated by each angle and compressed along x by each tilt, mapped back.
    view_tilts: tuple[float, ...] = ranged(
        (), "[1, 16]", empty=True
    )  # simulated tilts (2 = 60 degrees off frontal); () = off
    view_angles: tuple[float, ...] = ranged((0.0, 90.0), "[-180, 180]")  # degrees rotated before each tilt
    view_features: int = ranged(
        0, "[0, 100000]"
    )  # features each view adds to max_feature_num (0: original and views share max_feature_num by score)


@dataclass
class ModelConfig:
    """Architecture of models built or trained here (`make model`, `make train`)."""

    # efficientnet_lite1/2: bigger ImageNet backbones, offline from pip like Lite0 (docs/backbones.md);
    # Lite2 is the default: hard mean 0.8262 vs Lite0 0.7697 (Lite1 0.7796), ~1.5x Lite0's FLOPs
    backbone: Literal[
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101", "tiny"
    ] = "efficientnet_lite2"
    init: Literal["imagenet", "random"] = "imagenet"
    global_dim: int = ranged(1280, "[1, 65536]")  # FC whitening output (2048 for R50)
    local_dim: int = ranged(128, "[1, 65536]")  # autoencoder / projection size of local descriptors
    gem_p: float = ranged(3.0, "(0, 100]")
    gem_trainable: bool = False
    arcface_margin: float = ranged(0.1, "[0, 3.1416]")
    arcface_scale: float = ranged(0.0, "[0, 1e4]")  # 0 -> sqrt(global_dim)
    default_abs_thres: float = ranged(0.0, "[0, 1e6]")  # score threshold baked into the zero-training export (0 = auto)
    local_projection: Literal["block10", "block10_pcaw", "pca_imagenet", "pcaw_imagenet", "random_orthogonal"] = (
        "block10"  # zero-training local descriptors
    )
    whiten_init: Literal["identity", "glorot"] = "identity"  # FC whitening init (identity when global_dim == channels)
    fold_batchnorm: bool = (
        True  # export: batch norms folded into the convolutions before them (faster; floats ~1e-6 relative)
    )


@dataclass
class TrainConfig:
    """Fine-tuning (`make train`); reference settings from the DELG paper."""

    steps: int = ranged(300, "[1, inf)")
    batch_size: int = ranged(16, "[1, 65536]")
    crop_size: int = ranged(224, "[32, 8192]")
    learning_rate: float = ranged(0.01, "(0, 100]")
    momentum: float = ranged(0.9, "[0, 1)")
    clip_norm: float = ranged(10.0, "[0, 1e6]")
    attention_loss_weight: float = ranged(1.0, "[0, 1e6]")
    reconstruction_loss_weight: float = ranged(10.0, "[0, 1e6]")
    class_balanced: bool = True
    checkpoint_every: int = ranged(50, "[1, inf)")
    mixed_precision: bool = False
    freeze_backbone: bool = True  # small-data CPU default (measured better + 4x faster); false for GLDv2
    seed: int = ranged(0, SEED)


@dataclass
class WhitenConfig:
    """Dataset-specific learned post-processing fitted on the train split."""

    global_pca: bool = False  # PCA-whitening of global descriptors
    global_pca_dim: int = ranged(0, "[0, 65536]")  # 0 = keep dimension
    # learned whitening from positive pairs (Lw, Radenovic et al.; exclusive with global_pca): whiten the
    # within-landmark covariance, rotate onto the principal axes (docs/retrieval.md)
    # on by default: hard mean 0.8747 vs 0.8262 without (Lite2, shrinkage 0.6, vote.power 0.5; docs/retrieval.md)
    global_lw: bool = True
    lw_dim: int = ranged(0, "[0, 65536]")  # Lw output dimension (0 = keep dimension)
    # within-landmark covariance shrunk toward a scaled identity (1 = centring alone); hard protocol with
    # verification: 0.6 (0.8404 on Lite0) > 0.3 (global only, 0.3 is best: 0.8065)
    lw_shrinkage: float = ranged(0.6, "[0, 1]")
    lw_min_pairs: int = ranged(10, "[0, inf)")  # fewer positives (degrees of freedom): Lw is the identity
    # positives of Lw and the query transformation: same landmark_id (train.csv) | mined without labels
    # (train images that are each other's top-mine_k global neighbours with cosine >= mine_min_sim,
    # on descriptors centred on the train mean)
    positives: Literal["labels", "mined"] = "labels"
    mine_k: int = ranged(5, "[1, 1000]")  # hard protocol, global only: k=5 > 2 > 10
    mine_min_sim: float = ranged(0.6, "[-1, 1]")  # hard protocol: 0.6 > 0.4 > 0.3
    # query feature transformation (Mercari): a ridge map of the test descriptors toward the other
    # train descriptors of their landmark, learned on the positives, applied to the test queries only
    query_transform: bool = False
    qt_l2: float = ranged(10.0, "(0, 1e6]")  # ridge toward the identity, relative to the mean eigenvalue (10 > 1, 0.1)
    local_pca: bool = False  # PCA of local descriptors
    local_pca_dim: int = ranged(128, "[1, 65536]")


@dataclass
class KnnConfig:
    """Global retrieval (`landmarks.knn`)."""

    k: int = ranged(100, "[1, 100000]")
    # auto = exact up to auto_exact_max train rows, IVF-Flat above (test queries and DBA alike)
    index: Literal["auto", "exact", "ivf", "hnsw", "numpy"] = "auto"
    auto_exact_max: int = ranged(600_000, "[0, inf)")  # exact up to this many train rows (docs/performance-gldv2.md)
    max_in_memory_gb: float = ranged(2.0, "(0, 1e6]")  # a bigger train matrix stays in a float32 file read in blocks
    chunk_size: int = ranged(4096, "[1, 16777216]")  # queries per block
    ivf_nlist: int = ranged(
        0, "[0, 16777216]"
    )  # 0 = sqrt(N) (1257 at 1.58 M: build + search 0.18-0.44x exact, recall@100 0.997)
    ivf_nprobe: int = ranged(64, "[1, 16777216]")
    ivf_train_per_centroid: int = ranged(40, "[0, inf)")  # IVF k-means trains on this many points per list (0 = all)
    hnsw_m: int = ranged(32, "[2, 4096]")
    hnsw_ef_search: int = ranged(256, "[1, inf)")  # at least 2*k is used
    hnsw_ef_construction: int = ranged(80, "[1, inf)")
    dba_k: int = ranged(2, "[0, 100000]")  # database-side augmentation neighbours (0 = off; hard protocol: 2 > 1 > 0)
    # IVF nprobe of DBA's neighbour search (0 = ivf_nprobe): DBA needs only the top dba_k; at 1.58 M
    # recall@2 is 0.81 / 0.955 / 0.98 / 0.99 at nprobe 1 / 2 / 4 / 8 (docs/performance-gldv2.md)
    dba_nprobe: int = ranged(2, "[0, 16777216]")
    qe_k: int = ranged(0, "[0, 100000]")  # alpha query expansion neighbours (0 = off)
    qe_alpha: float = ranged(3.0, "[0, 1000]")
    dba_alpha: float = ranged(3.0, "[0, 1000]")  # DBA neighbour weights sim**alpha


@dataclass
class VerifyConfig:
    """Local-feature geometric verification (`landmarks.verify`)."""

    enabled: bool = True
    num_to_rerank: int = ranged(
        20, "[1, 100000]"
    )  # top global candidates verified (hard protocol: 20 > 10 and 100; 50 level with DBA k=1)
    # mutual: mutual NN of the local descriptors | kdtree: the host baseline | nbb: Neural Best-Buddies on
    # ImageNet Lite0 feature maps, deep to shallow (docs/nbb.md; maps stored by `landmarks local-features`)
    matcher: Literal["mutual", "kdtree", "nbb"] = "mutual"
    kdtree_distance: float = ranged(0.9, "(0, 2]")  # host baseline distance bound (unit descriptors)
    mutual_min_sim: float = ranged(0.0, "[-1, 1]")  # minimum cosine similarity of a mutual-NN match
    ratio: float = ranged(1.0, "(0, 1]")  # Lowe ratio test on similarities' distances (1.0 = off)
    geometry: Literal["homography", "fundamental"] = "homography"  # geometric model fitted by RANSAC
    reproj_threshold: float = ranged(4.0, "(0, 10000]")
    confidence: float = ranged(0.99, "(0, 1]")
    max_iters: int = ranged(1000, "[1, 10000000]")
    min_matches: int = ranged(4, "[0, 100000]")  # fewer matches than this -> 0 inliers
    seed: int = ranged(0, SEED)
    jobs: int = ranged(2, "[1, 1024]")
    # nbb: Lite0 layers, deep first (delg.featuremaps.NBB_LAYERS: strides 32, 16, 8 by default)
    nbb_layers: tuple[str, ...] = ("block14_add", "block10_add", "block4_add")
    nbb_image_size: int = ranged(384, "[32, 4096]")  # nbb: long side of the image the maps are computed on
    nbb_window: int = ranged(1, "[0, 16]")  # nbb: finer cells searched around a coarse match's footprint
    nbb_min_activation: float = ranged(0.2, "[0, 1]")  # nbb: both cells' normalised activation >= this


@dataclass
class VoteConfig:
    """Turning neighbours (+ inliers) into one label and confidence per test image."""

    # calibrated: each candidate's P(same landmark | sim, evidence) from the calibrate stage's model;
    # the best label's probability is the confidence (landmarks.calibrate)
    method: Literal["sum_power", "host", "calibrated"] = "sum_power"
    neighbours: int = ranged(20, "[1, 100000]")  # nearest train images that vote (= verify.num_to_rerank; host: 10)
    top_k: int = ranged(1, "[1, 100000]")  # neighbours per label that count (1 and 2 best on demo + holdout; host: 5)
    # similarity exponent for sum_power: 0.5 with Lw (whitened cosines are 0.1-0.5: sim**8 would vanish
    # and leave the vote to chance inliers; hard protocol 0.5 > 1 > 8); 8 was best before Lw
    power: float = ranged(0.5, "[0, 64]")
    inlier_cap: int = ranged(70, "[1, 100000]")  # host formula: min(inliers, cap) / cap
    inlier_weight: float = ranged(1.0, "[0, 1e6]")  # weight of the inlier term in the default formula
    inlier_floor: int = ranged(0, "[0, 100000]")  # sum_power: inliers below this are chance matches (subtracted)
    confidence: Literal["score", "margin"] = "score"  # score: the winning label's score | margin: minus the runner-up's
    suppression: Literal["none", "test", "distractors"] = "none"
    distractors_csv: str = ""  # CSV of known non-landmark image ids/paths for suppression
    suppression_k: int = ranged(10, "[1, 100000]")
    suppression_weight: float = ranged(1.0, "[0, 1e6]")
    suppression_quantile: float = ranged(
        0.25, "[0, 1]"
    )  # 'test': test images whose best train sim is in this lowest quantile...
    suppression_max_sim: float = ranged(
        0.0, "[-1, 1]"
    )  # ...or below this similarity when > 0; they form the non-landmark pool
    # calibrated: a label other than the global winner's (nearest neighbour) wins only when its best
    # candidate's inliers are significant: -log10 NFA >= this (0 = NFA <= 1; -5 = no guard)
    guard_significance: float = ranged(0.0, "[-5, 30]")
    combine: Literal["max", "noisy_or"] = "max"  # calibrated: a label's probability from its top_k candidates
    # calibrated: the label is the sum_power score's winner (sim**power + inlier term: the best labels on the
    # hard protocols) and its probability the confidence | the label with the highest probability wins
    calibrated_label: Literal["score", "probability"] = "score"
    # a-contrario gate (sum_power / host): a candidate's inliers count only when -log10 NFA of its inlier set
    # reaches this (<= -5 = off: every inlier counts, the host formula)
    significance_gate: float = ranged(-5.0, "[-5, 30]")


@dataclass
class CalibrateConfig:
    """`landmarks calibrate`: P(same landmark | evidence) learned on the train split (landmarks.calibrate)."""

    features: tuple[str, ...] = (
        "sim",
        "log_inliers",
        "log_matches",
        "ratio",
        "spread",
        "significance",
    )  # of calibrate.FEATURES
    l2: float = ranged(1.0, "[0, 100]")  # ridge penalty of the logistic fit on standardized features
    prior: float = ranged(0.0, "[0, 1]")  # positives weighted to this share (0 = the pairs' own share)
    max_anchors: int = ranged(150, "[10, 100000]")  # train images used as anchors, a seeded hash sample of ids
    positives: int = ranged(3, "[0, 50]")  # per anchor: its nearest same-label train neighbours verified
    negatives: int = ranged(6, "[1, 100]")  # per anchor: its nearest other-label train neighbours verified
    search_depth: int = ranged(100, "[10, 10000]")  # train neighbours searched per anchor to find those
    min_positives: int = ranged(30, "[0, 10000]")  # fewer same-label pairs: add known warps as positives
    warps: int = ranged(60, "[0, 1000]")  # train images warped for those positives, at most
    seed: int = ranged(0, SEED)


@dataclass
class DemoConfig:
    """Synthetic demo dataset (`make demo-data`)."""

    seed: int = ranged(0, SEED)
    num_landmarks: int = ranged(40, "[1, 100000]")
    views_per_landmark: int = ranged(10, "[1, 10000]")
    test_views_per_landmark: int = ranged(3, "[0, 10000]")
    unseen_landmarks: int = ranged(4, "[0, 100000]")
    num_distractors: int = ranged(40, "[0, 1000000]")
    image_size: int = ranged(384, "[32, 8192]")
    families: int = ranged(8, "[1, 1000]")  # landmark families (facades, paintings, signs, mosaics) sharing style
    jobs: int = ranged(2, "[1, 1024]")  # joblib workers rendering images


@dataclass
class ImportConfig:
    """`landmarks import`: real labelled photo sets -> Kaggle layout with a holdout split."""

    test_fraction: float = ranged(0.3, "[0, 1)")  # per class, share of images moved to test (at least 1 stays in train)
    heldout_class_fraction: float = ranged(
        0.15, "[0, 1)"
    )  # share of classes removed from train (their test images: empty truth)
    seed: int = ranged(0, SEED)
    link: Literal["hardlink", "copy", "symlink"] = "hardlink"
    train_per_class: int = ranged(
        0, "[0, inf)"
    )  # k-shot splits: K train images per class, the rest to test (0 = use test_fraction)
    distractor_sample: int = ranged(0, "[0, inf)")  # use a seeded sample of this many distractors (0 = all)
    max_per_class: int = ranged(0, "[0, inf)")  # use a seeded choice of at most this many images per class (0 = all)


@dataclass
class HoldoutConfig:
    """`landmarks holdout`: offline validation split made from a train.csv alone."""

    test_images: int = ranged(
        100, "[1, inf)"
    )  # test images in all (seen classes + held-out classes; distractors on top)
    nonlandmark_share: float = ranged(0.2, "[0, 1]")  # share of test_images taken from held-out classes (empty truth)
    heldout_class_fraction: float = ranged(0.1, "[0, 1)")  # share of classes removed from train entirely
    per_class_test: int = ranged(2, "[1, inf)")  # test images taken from each sampled seen class
    min_class_images: int = ranged(3, "[1, inf)")  # classes with fewer images stay whole in train
    seed: int = ranged(0, SEED)
    link: Literal["symlink", "hardlink", "none"] = "symlink"


@dataclass
class BenchConfig:
    """`make bench`: sizes of each benchmark row (see landmarks.tools.bench); `quick` shrinks them all."""

    quick: bool = False  # tiny smoke run (CI): few images, small N, 1 repeat
    rows: str = "1,2,3,4,5,6,7"  # rows to run
    repeats: int = ranged(3, "[1, 1000]")  # timed runs per measurement (the median is reported)
    extract_images: int = ranged(16, "[1, inf)")  # row 1: images of the data dir's train split
    match_classes: int = ranged(4, "[1, inf)")  # row 2: landmarks sampled for pairs (shared data, else data dir train)
    match_per_class: int = ranged(4, "[1, inf)")  # row 2: images per landmark; every ordered pair is verified
    match_features: int = ranged(1000, "[1, 100000]")  # row 2: local features per image
    shared_data: str = ""  # row 2: real photo sets ("" = ../shared/data next to the repo)
    knn_sizes: tuple[int, ...] = ranged(
        (100_000, 1_000_000, 1_580_000), "[1, 10000000000]"
    )  # row 3: train descriptors N
    knn_dims: tuple[int, ...] = ranged((0, 2048), "[0, 65536]")  # row 3: descriptor sizes (0 = the model's global dim)
    knn_queries: int = ranged(10_000, "[1, inf)")  # row 3: queries reported
    knn_timed_queries: int = ranged(1_000, "[1, inf)")  # row 3: queries actually run (times scaled to knn_queries)
    knn_approx: Literal["ivf", "hnsw"] = "ivf"  # row 3: approximate index, project settings from knn.*
    knn_max_db_gb: float = ranged(2.0, "(0, 1e6]")  # row 3: bigger N x dim are extrapolated linearly from measured ones
    e2e_rerank: tuple[int, ...] = ranged((10, 100), "[1, 100000]")  # row 4: NUM_TO_RERANK values
    e2e_test_images: int = ranged(32, "[0, inf)")  # row 4: test images predicted (first of sample_submission; 0 = all)
    csv_rows: int = ranged(1_580_000, "[1, 1000000000]")  # row 5: rows of the generated train.csv
    csv_classes: int = ranged(81_313, "[1, 1000000000]")  # row 5: landmark ids in it (GLDv2 train clean: 81 313)
    cpu_ghz: float = ranged(0.0, "[0, 100]")  # peak FP32 = cores x GHz x flops_per_cycle (0 = read /proc/cpuinfo)
    flops_per_cycle: int = ranged(32, "[1, 4096]")  # FP32 per core per cycle: AVX2 + 2 FMA units = 2 x 8 x 2
    gpu_seconds_per_image: float = ranged(0.211, "(0, 1e4]")  # GPU assumption: DELG paper, R50 extraction on a P100
    gldv2_train: int = ranged(1_580_000, "[1, 10000000000]")
    gldv2_test: tuple[int, ...] = ranged((10_000, 100_000), "[1, 10000000000]")
    gldv2_megapixels: float = ranged(
        0.48, "(0, 1e4]"
    )  # assumed mean input size of a GLDv2 image after max_image_size (800x600)
    knn_real_images: int = ranged(
        120, "[-1, inf)"
    )  # row 3: shared real photos whose descriptors (+ noise) give realistic data (0 = stored train features, -1 = off)
    knn_real_noise: float = ranged(1.0, "[0, 1e6]")  # row 3: noise scale relative to the real descriptors' own spread
    knn_stream_n: int = ranged(
        0, "[0, 10000000000]"
    )  # row 3: also exact vs IVF at this N (e.g. 1580000), database streamed from disk (~30 min; 0 = off)
    knn_stream_kinds: tuple[Literal["flat", "sq8", "fp16", "hnsw"], ...] = (
        "flat",
        "sq8",
    )  # row 3 streamed: IVF storage variants, and hnsw (the graph index at knn.hnsw_*)
    knn_stream_nlist: int = ranged(0, "[0, 16777216]")  # row 3 streamed: IVF lists (0 = sqrt(N))
    knn_stream_nprobes: tuple[int, ...] = ranged(
        (32, 64, 128), "[1, 16777216]"
    )  # row 3 streamed: lists searched per query
    verify_sizes: tuple[int, ...] = ranged(
        (1_000, 1_580_000), "[1, 10000000000]"
    )  # row 6: synthetic train ids N (global-only shards)
    verify_test_images: int = ranged(32, "[1, inf)")  # row 6: test images verified per run
    incr_images: int = ranged(
        100, "[2, inf)"
    )  # row 7: images of the extracted set (the data dir's train split) before 1 % is added
    # row 8 (not in the default rows: an hour at full size): the GLDv2-size dry run after extraction
    dryrun_train: int = ranged(1_580_000, "[2, 10000000000]")  # row 8: real-like train global descriptors
    dryrun_test: int = ranged(10_000, "[1, 10000000000]")  # row 8: test images (global + local features)
    dryrun_features: int = ranged(1000, "[1, 100000]")  # row 8: synthetic local features per test image
    dryrun_local_gb: float = ranged(
        12.0, "(0, 1e6]"
    )  # row 8: disk for the shortlisted train images' local features (fewer per image when more are needed)
    dryrun_dir: str = ""  # row 8: its inputs and outputs ("" = WORK_DIR/bench/dryrun; kept for a rerun)


@dataclass
class AdaptConfig:
    """`make adapt`: label-free local head learned on the train images (landmarks.adapt)."""

    steps: int = ranged(300, "[1, inf)")  # optimisation steps (batch_size pairs each), at most
    batch_size: int = ranged(8, "[1, 65536]")  # image pairs per step
    # fewer steps on tiny splits: at most this many warped pairs per train image (steps scale down to
    # ceil(pairs_per_image x images / batch_size), never below min_steps). 0 = always `steps`: on the
    # hard protocols 300 steps on 12 images beat 75 (hard mean 0.7842 vs 0.7671; docs/experiments.md)
    pairs_per_image: float = ranged(0.0, "[0, 1e6]")
    min_steps: int = ranged(40, "[1, inf)")
    crop_size: int = ranged(256, "[64, 8192]")  # side of each view fed to the frozen backbone (<= max_side)
    max_side: int = ranged(512, "[64, 65536]")  # train images are decoded once and cached at this long side
    max_images: int = ranged(
        2000, "[0, inf)"
    )  # a seeded sample of at most this many train images, decoded in memory (0 = all)
    reuse_overlap: float = ranged(
        0.95, "[0, 1]"
    )  # keep an adapted model whose images cover this share of today's (1 = re-adapt on any change)
    learning_rate: float = ranged(0.001, "(0, 100]")  # Adam
    temperature: float = ranged(0.07, "(0, 100]")  # InfoNCE temperature on cosine similarities
    neg_radius: float = ranged(
        1.5, "[0, 10000]"
    )  # B cells closer than this (in cells) to the true position are not negatives
    hidden: int = ranged(256, "[1, 65536]")  # hidden units of the residual projection MLP
    context: int = ranged(
        3, "[1, 15]"
    )  # the MLP's first layer sees context x context cells (1 = pointwise, 3 = neighbours)
    reliability_weight: float = ranged(1.0, "[0, 1e6]")  # weight of the keypoint (reliability) BCE
    score: Literal["reliability", "norm", "norm_x_reliability"] = "reliability"  # exported keypoint score
    scale_min: float = ranged(0.5, "(0, 100]")  # zoom of view B against view A (log-uniform; <= scale_max)
    scale_max: float = ranged(2.0, "(0, 100]")
    max_rotation: float = ranged(30.0, "[0, 180]")  # degrees
    perspective: float = ranged(0.15, "[0, 1]")  # corner jitter as a share of the view side
    max_shift: float = ranged(0.2, "[0, 1]")  # translation as a share of the view side
    photometric: bool = True  # brightness, contrast, gamma, blur, JPEG, occlusion
    occlusion: float = ranged(0.5, "[0, 1]")  # probability of an occluding rectangle on view B
    checkpoint_every: int = ranged(50, "[1, inf)")
    seed: int = ranged(0, SEED)
    eval_images: int = ranged(24, "[0, inf)")  # match-precision check: held-out photos
    eval_warps: int = ranged(2, "[1, 1000]")  # known warps per photo
    eval_crop: int = ranged(384, "[32, 8192]")  # view side in the check
    eval_features: int = ranged(500, "[1, 100000]")  # local features per view in the check
    eval_tolerance: float = ranged(
        16.0, "(0, 10000]"
    )  # a match is correct within this many pixels of its true position
    eval_data: str = ""  # check photos ("" = ../shared/data/wide_baseline_scenes if present, else DATA_DIR test)
    models_cache: str = "models/cache"  # CLI: adapted exports kept here by fingerprint, shared by WORK_DIRs ("" = none)


@dataclass
class HardConfig:
    """The hard protocol (`make validate-hard`): k-shot splits of the shared wide-baseline photos."""

    shared_data: str = "../shared/data"  # folder holding the photo sets below
    landmarks: str = "wide_baseline_scenes"  # the landmarks under test
    extra_train: tuple[str, ...] = ("paris6k_subset", "multiview_scenes")  # extra train classes (always in train)
    distractors: str = "distractors_products"  # non-landmark test photos
    distractor_sample: int = ranged(100, "[0, inf)")  # seeded sample of distractors put in every split's test set
    # protocol 2 ("mostly non-landmarks"): the landmarks alone in train (no extra classes) and this many
    # product photos in test, ~90 % of the test images (0 = protocol 2 off; the set holds 1006)
    nonlandmark_sample: int = ranged(400, "[0, inf)")
    shots: tuple[int, ...] = ranged((1, 2), "[1, 10000]")  # K train photos per landmark
    seeds: int = ranged(5, "[1, 10000]")  # splits per K
    heldout_class_fraction: float = ranged(0.2, "[0, 1)")  # landmarks left out of train (unseen)
    probe_scales: tuple[float, ...] = ranged(
        (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142), "(0, 8]"
    )  # every scale a scored setting may use
    probe_features: int = ranged(
        1000, "[1, 100000]"
    )  # local features kept per probe scale (>= extract.max_feature_num)
    probe_batch: int = ranged(16, "[1, 100000]")  # images per probe file (the unit of resume)
    recall_at: tuple[int, ...] = ranged((1, 5, 10, 20, 50, 100), "[1, 100000]")  # shortlist recall@R reported
    demo_dir: str = "data/demo"  # the demo dataset, scored as a guard when present ("" = skip)


@dataclass
class Config:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    vote: VoteConfig = field(default_factory=VoteConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    dataset_import: ImportConfig = field(default_factory=ImportConfig)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    hard: HardConfig = field(default_factory=HardConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


class ConfigError(ValueError):
    """A setting that cannot be used: one line naming the key, the value and what is allowed."""


def _show(value: Any) -> str:
    """A value as the user wrote it, quoted when text, cut short, on one line."""
    text = repr(value) if isinstance(value, str) else str(value)
    text = " ".join(text.split()) if not isinstance(value, str) else text
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed(typ: Any, meta: Any) -> str:
    """What a field accepts, in words: 'an integer in [1, 100000]', 'a tuple of floats in (0, 8]', ..."""
    rng = meta.get("range")
    where = f" in {_range_text(rng, typ)}" if rng else ""
    if get_origin(typ) is tuple:
        item = get_args(typ)[0]
        if get_origin(item) is Literal:
            return "a comma-separated list of " + ", ".join(get_args(item))
        return f"a comma-separated list of {_NAMES[item]}s{where}{' (may be empty)' if meta.get('empty') else ''}"
    if get_origin(typ) is Literal:
        return "one of " + ", ".join(get_args(typ))
    return f"{'an' if typ is int else 'a'} {_NAMES[typ]}{where}"


# Refused in text settings: control characters, line separators, and the surrogates that undecodable bytes
# of a command line become (they cannot be written to a file, a log or a terminal).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMES = {int: "integer", float: "finite number", bool: "boolean (true/false)", str: "text without control characters"}


def _range_text(rng: Range, typ: Any) -> str:
    if (get_args(typ)[0] if get_origin(typ) is tuple else typ) is int and math.isinf(rng.hi):
        return rng.text.replace("inf)", f"{INT_MAX}]")
    return rng.text


def _scalar(value: Any, typ: Any) -> Any:
    """Convert one file/CLI value to `typ` (bool, int, float, str or a Literal); ValueError when it is not one."""
    if isinstance(value, (dict, list, tuple, set)) or (typ is not bool and isinstance(value, bool)):
        raise ValueError(value)
    if get_origin(typ) is Literal:
        text = "" if value is None else str(value).strip()
        if text not in get_args(typ):
            raise ValueError(value)
        return text
    if typ is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if typ is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        number = float(value)  # '5.0' and 5.0 are 5; 5.5, nan and inf are not integers
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if typ is float:
        if not isinstance(value, (int, float, str)):
            raise ValueError(value)
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return str(value)
    raise ValueError(value)


def _coerce(value: Any, typ: Any, key: str, meta: Any = None) -> Any:
    """Convert a file/CLI value to the declared field type: bool, int, float, str, a Literal or a tuple of these."""
    meta, given = meta or {}, value
    try:
        if get_origin(typ) is tuple:
            if isinstance(value, str):
                value = [p.strip() for p in re.sub(r"[\[\]()]", "", value).split(",") if p.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]  # a single number from a file: a tuple of one
            return tuple(_scalar(v, get_args(typ)[0]) for v in value)
        return _scalar(value, typ)
    except (TypeError, ValueError, OverflowError):
        if get_origin(typ) is Literal:
            raise ConfigError(f"config key {key!r}: {_show(given)} is not one of {', '.join(get_args(typ))}") from None
        raise ConfigError(f"config key {key!r}: cannot read {_show(given)} as {_allowed(typ, meta)}") from None


def _problem(value: Any, typ: Any, meta: Any) -> str | None:
    """Why a field value is not allowed (wrong type, out of range, not finite, bad text), or None."""
    if get_origin(typ) is tuple:
        if not isinstance(value, tuple):
            return "is not a tuple"
        if "range" in meta and not value and not meta.get("empty"):
            return "is empty"
        item = get_args(typ)[0]
        return next((p for p in (_problem(v, item, meta) for v in value) if p), None)
    if get_origin(typ) is Literal:
        return None if value in get_args(typ) else "is not allowed"
    if typ is bool:
        return None if isinstance(value, bool) else "is not a boolean"
    if typ is str:
        if not isinstance(value, str):
            return "is not text"
        return "holds a control character" if CONTROL.search(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and not isinstance(value, int)):
        return "has the wrong type"
    if not math.isfinite(value):
        return "is not finite"
    rng = meta.get("range")
    hi = INT_MAX if typ is int and rng and math.isinf(rng.hi) else None
    if rng and (not rng.holds(value) or (hi is not None and value > hi)):
        return "is out of range"
    return None


# Settings that depend on each other: (keys, test, what must hold), checked after the single fields.
RELATIONS = [
    (
        ("adapt.scale_min", "adapt.scale_max"),
        lambda c: c.adapt.scale_min <= c.adapt.scale_max,
        "scale_min <= scale_max",
    ),
    (("adapt.crop_size", "adapt.max_side"), lambda c: c.adapt.crop_size <= c.adapt.max_side, "crop_size <= max_side"),
]


def check_config(cfg: Config) -> Config:
    """Every setting within its type, range and choices, and the RELATIONS between settings; else a ConfigError
    naming the first key that is not (key, value, what is allowed). Runs at load, before any stage's work."""
    for sec in fields(cfg):
        check_section(sec.name, getattr(cfg, sec.name))
    for keys, holds, rule in RELATIONS:
        if not holds(cfg):
            values = ", ".join(f"{k}={_show(_get(cfg, k))}" for k in keys)
            raise ConfigError(f"config keys {values}: {rule} must hold")
    return cfg


def check_section(name: str, section: Any) -> None:
    """One section's fields (e.g. one changed in code, or by a command's own options) checked as at load."""
    for f in fields(section):
        check_setting(f"{name}.{f.name}", getattr(section, f.name))


def check_setting(key: str, value: Any) -> Any:
    """`value` for the setting `key` ('extract.shards'), checked as at load: returned, or a ConfigError.
    For a command-line option that stands in for a setting (`--shards`, `--jobs`)."""
    typ, meta = _declared(key)
    why = _problem(value, typ, meta)
    if why:
        shown = _show(list(value) if isinstance(value, tuple) else value)
        raise ConfigError(f"config key {key!r}: {shown} {why}; allowed: {_allowed(typ, meta)}")
    return value


@functools.cache
def _declared(key: str) -> tuple[Any, Any]:
    """(type, metadata) of the setting 'section.name'."""
    section_name, name = key.split(".")
    section = type(getattr(Config(), section_name))
    return get_type_hints(section)[name], next(f.metadata for f in fields(section) if f.name == name)


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def apply_updates(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    by_name = {f.name: f for f in fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in by_name:
            raise ConfigError(f"unknown config key {_show(full)} (known: {', '.join(sorted(by_name))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            if value is None:
                continue  # an empty section in a file
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a section; give {full}.<key>=value")
            apply_updates(current, value, prefix=f"{full}.")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a value, not a section")
            setattr(obj, key, _coerce(value, hints[key], full, by_name[key].metadata))


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ['knn.k=50', 'verify.enabled=false'] into a nested dict."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {_show(item)} must look like section.key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for n, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {_show('.'.join(parts[: n + 1]))} is a value, not a section")
        node[parts[-1]] = value
    return out


def read_config_file(path: str | Path) -> dict:
    """The sections of a YAML (or .toml) file; a ConfigError naming the file when it cannot be one."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a file")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file (a FIFO, device or socket)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror or e})") from None
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (binary? byte {e.start})") from None
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: bad TOML: {' '.join(str(e).split())}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            what = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"config file {p}: bad YAML{where}: {' '.join(str(what).split())}") from None
        except RecursionError:
            raise ConfigError(f"config file {p}: bad YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (got {type(data).__name__})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- file (YAML or TOML) <- command-line overrides, then every setting checked (check_config)."""
    cfg = Config()
    if path:
        try:
            apply_updates(cfg, read_config_file(path))
        except ConfigError as e:
            raise ConfigError(f"{e} (in {path})" if str(path) not in str(e) else str(e)) from None
    apply_updates(cfg, parse_overrides(overrides))
    return check_config(cfg)


def dump_config(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def settings_line(cfg: Config, *sections: str) -> str:
    """The effective settings of the named sections on one line: 'knn: k=100 index=exact ...'."""
    d = cfg.to_dict()
    return "; ".join(f"{s}: " + " ".join(f"{k}={v}" for k, v in d[s].items()) for s in sections)


def log_settings(log, cfg: Config, *sections: str) -> None:
    """Log a stage's effective settings at its start, so a log says what produced an output."""
    log.info("settings: %s", settings_line(cfg, *sections))
