"""One typed configuration for every stage.

The dataclass tree below holds every tunable of the pipeline.  It is loaded from a
YAML/TOML file (``--config``) and then overridden by ``section.key=value`` strings from
the command line (``--set verify.num_to_rerank=100``).  Each stage hashes the section(s)
it depends on into the fingerprint of its outputs, so a changed setting redoes exactly
the stages it affects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints


@dataclass
class ExtractConfig:
    """DELG feature extraction (`make features`)."""

    # Scales are relative to the image resized to max_image_size; chosen on the hard protocol
    # (`make validate-hard`): an ImageNet backbone describes whole buildings best at 362-724 px.
    global_scales: tuple = (0.3536, 0.5, 0.7071)  # image scales pooled into the global descriptor
    local_scales: tuple = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142)  # image scales local features are taken from
    max_feature_num: int = 1000  # local features kept per image (by score)
    abs_thres: float = 0.0  # attention/score threshold for local features (<=0: model's own default)
    max_image_size: int = 1024  # long side is resized down to this before the model
    max_image_pixels: int = 120_000_000  # decompression-bomb guard: bigger images are refused
    train_local: bool = False  # extract local features for all train images up front
    shards: int = 4  # shards per split
    jobs: int = 2  # parallel worker processes (joblib)
    scheduler: str = ""  # dask scheduler address (tcp://host:8786); empty = local joblib
    local_dtype: Literal["float16", "float32"] = "float16"  # storage dtype of local descriptors
    intra_op_threads: int = 0  # TF threads per worker (0 = cores / jobs)
    min_image_size: int = 16  # images whose short side is below this are refused ("too small")
    prefetch: int = 2  # images decoded ahead of inference by a thread inside each worker
    max_shard_images: int = 5000  # more shards than asked when needed: bounds worker memory (0 = no cap)


@dataclass
class ModelConfig:
    """Architecture of models built or trained here (`make model`, `make train`)."""

    backbone: Literal["efficientnet_lite0", "resnet50", "resnet101", "tiny"] = "efficientnet_lite0"
    init: Literal["imagenet", "random"] = "imagenet"
    global_dim: int = 1280  # FC whitening output (2048 for R50)
    local_dim: int = 128  # autoencoder / projection size of local descriptors
    gem_p: float = 3.0
    gem_trainable: bool = False
    arcface_margin: float = 0.1
    arcface_scale: float = 0.0  # 0 -> sqrt(global_dim)
    default_abs_thres: float = 0.0  # score threshold baked into the zero-training export (0 = auto)
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

    steps: int = 300
    batch_size: int = 16
    crop_size: int = 224
    learning_rate: float = 0.01
    momentum: float = 0.9
    clip_norm: float = 10.0
    attention_loss_weight: float = 1.0
    reconstruction_loss_weight: float = 10.0
    class_balanced: bool = True
    checkpoint_every: int = 50
    mixed_precision: bool = False
    freeze_backbone: bool = True  # small-data CPU default (measured better + 4x faster); false for GLDv2
    seed: int = 0


@dataclass
class WhitenConfig:
    """Dataset-specific learned post-processing fitted on the train split."""

    global_pca: bool = False  # PCA-whitening of global descriptors
    global_pca_dim: int = 0  # 0 = keep dimension
    local_pca: bool = False  # PCA of local descriptors
    local_pca_dim: int = 128


@dataclass
class KnnConfig:
    """Global retrieval (`landmarks.knn`)."""

    k: int = 100
    # auto = exact up to auto_exact_max train rows, IVF-Flat above (test queries and DBA alike)
    index: Literal["auto", "exact", "ivf", "hnsw", "numpy"] = "auto"
    auto_exact_max: int = 600_000  # >= 0; exact up to this many train rows (docs/performance-gldv2.md)
    max_in_memory_gb: float = 2.0  # > 0; a bigger train matrix stays in a float32 file read in blocks
    chunk_size: int = 4096  # queries per block
    ivf_nlist: int = 0  # 0 = sqrt(N) (1257 at 1.58 M: build + search 0.18-0.44x exact, recall@100 0.997)
    ivf_nprobe: int = 64
    ivf_train_per_centroid: int = 40  # IVF k-means trains on a sample of this many points per list (0 = all)
    hnsw_m: int = 32
    hnsw_ef_search: int = 256  # at least 2*k is used
    hnsw_ef_construction: int = 80
    dba_k: int = 2  # database-side augmentation neighbours (0 = off; hard protocol: 2 > 1 > 0)
    qe_k: int = 0  # alpha query expansion neighbours (0 = off)
    qe_alpha: float = 3.0
    dba_alpha: float = 3.0  # DBA neighbour weights sim**alpha


@dataclass
class VerifyConfig:
    """Local-feature geometric verification (`landmarks.verify`)."""

    enabled: bool = True
    num_to_rerank: int = 20  # top global candidates verified (hard protocol: 20 > 10 and 100; 50 level with DBA k=1)
    matcher: Literal["mutual", "kdtree"] = "mutual"
    kdtree_distance: float = 0.9  # host baseline distance bound (unit descriptors)
    mutual_min_sim: float = 0.0  # minimum cosine similarity of a mutual-NN match
    ratio: float = 1.0  # Lowe ratio test on similarities' distances (1.0 = off)
    geometry: Literal["homography", "fundamental"] = "homography"  # geometric model fitted by RANSAC
    reproj_threshold: float = 4.0
    confidence: float = 0.99
    max_iters: int = 1000
    min_matches: int = 4  # fewer matches than this -> 0 inliers
    seed: int = 0
    jobs: int = 2


@dataclass
class VoteConfig:
    """Turning neighbours (+ inliers) into one label and confidence per test image."""

    method: Literal["sum_power", "host"] = "sum_power"
    neighbours: int = 20  # nearest train images that vote (= verify.num_to_rerank; host baseline: 10)
    top_k: int = 1  # neighbours per label that count (1 and 2 best on demo + shared holdout; host uses 5)
    power: float = 8.0  # similarity exponent for sum_power (8 > 3 on demo + shared holdout)
    inlier_cap: int = 70  # host formula: min(inliers, cap) / cap
    inlier_weight: float = 1.0  # weight of the inlier term in the default formula
    inlier_floor: int = 0  # sum_power: inliers below this are chance matches (subtracted before the cap)
    confidence: Literal["score", "margin"] = "score"  # score: the winning label's score | margin: minus the runner-up's
    suppression: Literal["none", "test", "distractors"] = "none"
    distractors_csv: str = ""  # CSV of known non-landmark image ids/paths for suppression
    suppression_k: int = 10
    suppression_weight: float = 1.0
    suppression_quantile: float = 0.25  # 'test': test images whose best train sim is in this lowest quantile...
    suppression_max_sim: float = 0.0  # ...or below this similarity when > 0; they form the non-landmark pool


@dataclass
class DemoConfig:
    """Synthetic demo dataset (`make demo-data`)."""

    seed: int = 0
    num_landmarks: int = 40
    views_per_landmark: int = 10
    test_views_per_landmark: int = 3
    unseen_landmarks: int = 4
    num_distractors: int = 40
    image_size: int = 384
    families: int = 8  # landmark families (facades, paintings, signs, mosaics) sharing style within a family
    jobs: int = 2  # joblib workers rendering images


@dataclass
class ImportConfig:
    """`landmarks import`: real labelled photo sets -> Kaggle layout with a holdout split."""

    test_fraction: float = 0.3  # per class, share of images moved to test (at least 1 stays in train)
    heldout_class_fraction: float = 0.15  # share of classes removed from train (their test images: empty truth)
    seed: int = 0
    link: Literal["hardlink", "copy", "symlink"] = "hardlink"
    train_per_class: int = 0  # k-shot splits: K train images per class, the rest to test (0 = use test_fraction)
    distractor_sample: int = 0  # use a seeded sample of this many distractors (0 = all)


@dataclass
class HoldoutConfig:
    """`landmarks holdout`: offline validation split made from a train.csv alone."""

    test_images: int = 100  # test images in all (seen classes + held-out classes; distractors come on top)
    nonlandmark_share: float = 0.2  # share of test_images taken from held-out classes (empty truth)
    heldout_class_fraction: float = 0.1  # share of classes removed from train entirely
    per_class_test: int = 2  # test images taken from each sampled seen class
    min_class_images: int = 3  # classes with fewer images stay whole in train
    seed: int = 0
    link: Literal["symlink", "hardlink", "none"] = "symlink"


@dataclass
class BenchConfig:
    """`make bench`: sizes of each benchmark row (see landmarks.bench); `quick` shrinks them all."""

    quick: bool = False  # tiny smoke run (CI): few images, small N, 1 repeat
    rows: str = "1,2,3,4,5,6,7"  # rows to run
    repeats: int = 3  # timed runs per measurement (the median is reported)
    extract_images: int = 16  # row 1: images of the data dir's train split
    match_classes: int = 4  # row 2: landmarks sampled for pairs (shared data, else data dir train)
    match_per_class: int = 4  # row 2: images per landmark; every ordered pair is verified
    match_features: int = 1000  # row 2: local features per image
    shared_data: str = ""  # row 2: real photo sets ("" = ../shared/data next to the repo)
    knn_sizes: tuple = (100_000, 1_000_000, 1_580_000)  # row 3: train descriptors N
    knn_dims: tuple = (0, 2048)  # row 3: descriptor sizes (0 = the model's global dim)
    knn_queries: int = 10_000  # row 3: queries reported
    knn_timed_queries: int = 1_000  # row 3: queries actually run (times scaled to knn_queries)
    knn_approx: Literal["ivf", "hnsw"] = "ivf"  # row 3: approximate index, project settings from knn.*
    knn_max_db_gb: float = 2.0  # row 3: bigger N x dim are extrapolated linearly from measured ones
    e2e_rerank: tuple = (10, 100)  # row 4: NUM_TO_RERANK values
    e2e_test_images: int = 32  # row 4: test images predicted (first of sample_submission; 0 = all)
    csv_rows: int = 1_580_000  # row 5: rows of the generated train.csv
    csv_classes: int = 81_313  # row 5: landmark ids in it (GLDv2 train clean: 81 313)
    cpu_ghz: float = 0.0  # peak FP32 = cores x GHz x flops_per_cycle (0 = read /proc/cpuinfo)
    flops_per_cycle: int = 32  # FP32 per core per cycle: AVX2 + 2 FMA units = 2 x 8 x 2
    gpu_seconds_per_image: float = 0.211  # GPU assumption: DELG paper, R50 extraction on a P100
    gldv2_train: int = 1_580_000
    gldv2_test: tuple = (10_000, 100_000)
    gldv2_megapixels: float = 0.48  # assumed mean input size of a GLDv2 image after max_image_size (800x600)
    knn_real_images: int = 120  # row 3: shared real photos whose descriptors (+ noise) give realistic data (0 = stored train features, -1 = off)
    knn_real_noise: float = 1.0  # row 3: noise scale relative to the real descriptors' own spread
    knn_stream_n: int = (
        0  # row 3: also exact vs IVF at this N (e.g. 1580000), database streamed from disk (~30 min; 0 = off)
    )
    knn_stream_kinds: tuple = ("flat", "sq8")  # row 3 streamed: IVF storage variants (flat, sq8, fp16)
    knn_stream_nlist: int = 0  # row 3 streamed: IVF lists (0 = sqrt(N))
    knn_stream_nprobes: tuple = (32, 64, 128)  # row 3 streamed: lists searched per query
    verify_sizes: tuple = (1_000, 1_580_000)  # row 6: synthetic train ids N (global-only shards)
    verify_test_images: int = 32  # row 6: test images verified per run
    incr_images: int = 100  # row 7: images of the extracted set (the data dir's train split) before 1 % is added


@dataclass
class AdaptConfig:
    """`make adapt`: label-free local head learned on the train images (landmarks.adapt)."""

    steps: int = 300  # optimisation steps (batch_size pairs each)
    batch_size: int = 8  # image pairs per step
    crop_size: int = 256  # side of each view fed to the frozen backbone
    max_side: int = 512  # train images are decoded once and cached at this long side
    max_images: int = 2000  # a seeded sample of at most this many train images, decoded in memory (0 = all)
    reuse_overlap: float = (
        0.95  # keep an adapted model whose images cover this share of today's (1 = re-adapt on any change)
    )
    learning_rate: float = 0.001  # Adam
    temperature: float = 0.07  # InfoNCE temperature on cosine similarities
    neg_radius: float = 1.5  # B cells closer than this (in cells) to the true position are not negatives
    hidden: int = 256  # hidden units of the residual projection MLP
    context: int = 3  # the MLP's first layer sees context x context cells (1 = pointwise, 3 = neighbours)
    reliability_weight: float = 1.0  # weight of the keypoint (reliability) BCE
    score: str = "reliability"  # exported keypoint score: reliability | norm | norm_x_reliability
    scale_min: float = 0.5  # zoom of view B against view A (log-uniform)
    scale_max: float = 2.0
    max_rotation: float = 30.0  # degrees
    perspective: float = 0.15  # corner jitter as a share of the view side
    max_shift: float = 0.2  # translation as a share of the view side
    photometric: bool = True  # brightness, contrast, gamma, blur, JPEG, occlusion
    occlusion: float = 0.5  # probability of an occluding rectangle on view B
    checkpoint_every: int = 50
    seed: int = 0
    eval_images: int = 24  # match-precision check: held-out photos
    eval_warps: int = 2  # known warps per photo
    eval_crop: int = 384  # view side in the check
    eval_features: int = 500  # local features per view in the check
    eval_tolerance: float = 16.0  # a match is correct within this many pixels of its true position
    eval_data: str = ""  # check photos ("" = ../shared/data/wide_baseline_scenes if present, else DATA_DIR test)


@dataclass
class HardConfig:
    """The hard protocol (`make validate-hard`): k-shot splits of the shared wide-baseline photos."""

    shared_data: str = "../shared/data"  # folder holding the photo sets below
    landmarks: str = "wide_baseline_scenes"  # the landmarks under test
    extra_train: tuple = ("paris6k_subset", "multiview_scenes")  # extra train classes (always in train)
    distractors: str = "distractors_products"  # non-landmark test photos
    distractor_sample: int = 100  # seeded sample of distractors put in every split's test set
    shots: tuple = (1, 2)  # K train photos per landmark
    seeds: int = 5  # splits per K
    heldout_class_fraction: float = 0.2  # landmarks left out of train (unseen)
    probe_scales: tuple = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142)  # every scale a scored setting may use
    probe_features: int = 1000  # local features kept per probe scale (>= extract.max_feature_num)
    probe_batch: int = 16  # images per probe file (the unit of resume)
    recall_at: tuple = (1, 5, 10, 20, 50, 100)  # shortlist recall@R reported
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

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def section_hash(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none given)."""
        d = self.to_dict()
        payload = {s: d[s] for s in (sections or sorted(d))}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


class ConfigError(ValueError):
    pass


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a file/CLI value to the declared field type; a Literal field takes one of its choices."""
    if get_origin(typ) is Literal:
        choices = get_args(typ)
        text = "" if value is None else str(value).strip()
        if text not in choices:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(choices)}")
        return text
    origin = typ if isinstance(typ, type) else None
    try:
        if typ is bool or origin is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
        if typ is tuple:
            if isinstance(value, str):
                parts = [
                    p
                    for p in value.replace("[", "").replace("]", "").replace("(", "").replace(")", "").split(",")
                    if p.strip()
                ]
                value = [_number_or_text(p.strip()) for p in parts]
            return tuple(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def _number_or_text(text: str) -> Any:
    """One item of a comma-separated tuple value: an int, a float, or else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r} is a section; give {full}.<key>=value")
            _apply(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_overrides(items: list[str] | None) -> dict:
    """Turn ['knn.k=50', 'verify.enabled=false'] into a nested dict."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- file (YAML or TOML) <- command-line overrides."""
    cfg = Config()
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        _apply(cfg, data)
    _apply(cfg, parse_overrides(overrides))
    return cfg


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
