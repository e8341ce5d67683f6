"""`landmarks adapt`: learn the local head from the user's own unlabelled images.

The zero-training default describes a local feature by raw ImageNet activations (Lite0 block 10)
and ranks keypoints by their L2 norm.  Here the backbone stays frozen and a small head on top of
the same local block is trained without labels, from pairs of views of each train image:

- **Pairs** (:func:`make_pair`): view A is a random crop of the image; view B is the image seen
  through a random homography of A (zoom 0.5 to 2, rotation, perspective corner jitter, shift),
  then both views get photometric changes (brightness, contrast, gamma, blur, JPEG) and B a
  random occluding rectangle.  The homography is known, so every cell of A's feature map has an
  exact position on B's map (:func:`cell_targets`).
- **Descriptor** (DELG's autoencoder place): ``desc = x @ W0 + MLP(x)`` to ``model.local_dim``
  (128; ``adapt.context``: the MLP sees 1x1 or 3x3 cells), ``W0`` initialised to the zero-padding
  identity of the default model and the MLP's last layer to zero, so training starts exactly from
  today's descriptors.  Loss: InfoNCE of each visible A cell against its true B position (bilinear
  sample of B's map) as the positive and every B cell farther than ``adapt.neg_radius`` cells as
  negatives (hard negatives of the same pair).
- **Keypoint score** (DELG's attention place): a reliability head trained with BCE to predict
  whether a cell's nearest neighbour on B is its true position (R2D2-style reliability).
  Exported score ``adapt.score``: reliability (default), the L2 norm, or their product.

The labelled DELG losses stay with ``make train`` (ArcFace + attention + reconstruction).
Export uses :func:`landmarks.delg.export.save_serving` (official DELG signature; the global descriptor
is the default model's GeM, unchanged) and records the adaptation settings and a fingerprint of
the train images in ``landmarks_model.json``.  Checkpoints (head + Adam state + history) go to
``WORK_DIR/adapt/`` with exact resume: the pairs of step k are a seeded function of k.
:func:`evaluate` measures match precision under known warps and inliers of correct vs wrong
pairs on held-out real photos, adapted against any baseline model.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from landmarks import verify
from landmarks.datasets.data import load_split
from landmarks.datasets.images import ImageError, load_image
from landmarks.delg.delg_io import load_delg, postprocess, read_model_meta
from landmarks.delg.export import export_backbone, local_graph, path_fingerprints, save_serving
from landmarks.delg.model import (
    build_backbone,
    is_lite,
    lite_local_layer,
    make_gem,
    normalize_pixels,
    output_layer_name,
    preprocess_mode,
    receptive_field,
)
from landmarks.delg.train import Checkpointer, Curves, plot_curves
from landmarks.utils import LandmarksError, atomic_path, building_dir, cache, configure_tensorflow

log = logging.getLogger(__name__)

ADAPT_CURVES = Curves(
    ("loss", "infonce", "reliability"),
    ("nn_correct", "rel_accuracy"),
    "nearest neighbour correct / reliability accuracy",
)
# adapt settings that do not change the learned head (export choice, the check, checkpoint period)
NOT_TRAINING = (
    "score",
    "checkpoint_every",
    "eval_images",
    "eval_warps",
    "eval_crop",
    "eval_features",
    "eval_tolerance",
    "eval_data",
    "reuse_overlap",
    "models_cache",
    # the step count a run uses enters the fingerprint as `steps`, or as its own input when scaled
    "pairs_per_image",
    "min_steps",
)
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ pairs


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 H with H @ [x, y, 1] ~ dst for 4 point pairs (DLT, exact)."""
    a, b = [], []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    h = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def apply_h(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply 3x3 homography to [n, 2] (x, y) points."""
    p = np.concatenate([np.asarray(pts, np.float64), np.ones((len(pts), 1))], 1) @ h.T
    return p[:, :2] / p[:, 2:3]


def _shift(d: float) -> np.ndarray:
    """Translation by (d, d) as a 3x3 homography."""
    return np.array([[1, 0, d], [0, 1, d], [0, 0, 1]], np.float64)


def random_homography(rng: np.random.Generator, size: int, ac) -> np.ndarray:
    """Random A->B homography in continuous pixel coordinates of two size x size views."""
    c = size / 2.0
    s = math.exp(rng.uniform(math.log(ac.scale_min), math.log(ac.scale_max)))
    t = math.radians(rng.uniform(-ac.max_rotation, ac.max_rotation))
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    dst = c + s * (corners - c) @ rot.T
    dst += rng.uniform(-ac.perspective, ac.perspective, (4, 2)) * size * s
    dst += rng.uniform(-ac.max_shift, ac.max_shift, 2) * size
    return homography_from_points(corners, dst)


def _photometric(img, rng: np.random.Generator, ac):
    """Brightness, contrast, gamma, then blur and JPEG round trip (PIL image in, PIL image out)."""
    from PIL import Image, ImageFilter

    x = np.asarray(img, np.float32) / 255.0
    x = np.clip((x - 0.5) * rng.uniform(0.6, 1.4) + 0.5 + rng.uniform(-0.2, 0.2), 0.0, 1.0)
    x = np.power(x, rng.uniform(0.6, 1.6))
    img = Image.fromarray((x * 255.0 + 0.5).astype(np.uint8))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(20, 90)))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def make_pair(image: np.ndarray, rng: np.random.Generator, ac, size: int, photometric: bool | None = None):
    """Two views of `image` (uint8 [h, w, 3], both sides >= size) with an exactly known warp.

    Returns (A, B, H, occ): A, B uint8 [size, size, 3]; H maps A pixel-index coordinates (x, y)
    (pixel centres at integers) to B's; occ = (x0, y0, x1, y1) occluded box on B or None.
    """
    from PIL import Image

    h, w = image.shape[:2]
    if h < size or w < size:
        raise LandmarksError(f"make_pair: image {w}x{h} smaller than the {size}px view")
    ox, oy = rng.integers(0, w - size + 1), rng.integers(0, h - size + 1)
    hc = random_homography(rng, size, ac)  # continuous coords: pixel i covers [i, i+1)
    src = Image.fromarray(image)
    a = src.crop((int(ox), int(oy), int(ox) + size, int(oy) + size))
    m = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]], np.float64) @ np.linalg.inv(hc)  # B -> source image
    m = m / m[2, 2]
    b = src.transform(
        (size, size),
        Image.Transform.PERSPECTIVE,
        tuple(m.ravel()[:8]),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    photometric = ac.photometric if photometric is None else photometric
    occ = None
    if photometric:
        a, b = _photometric(a, rng, ac), _photometric(b, rng, ac)
        if rng.random() < ac.occlusion:
            ow, oh = (rng.uniform(0.15, 0.4, 2) * size).astype(int)
            x0, y0 = int(rng.integers(0, size - ow)), int(rng.integers(0, size - oh))
            arr = np.array(b)
            arr[y0 : y0 + oh, x0 : x0 + ow] = rng.integers(0, 256, 3, dtype=np.uint8)
            b = Image.fromarray(arr)
            occ = (x0, y0, x0 + ow - 1, y0 + oh - 1)
    h_idx = _shift(-0.5) @ hc @ _shift(0.5)
    return np.asarray(a, np.uint8), np.asarray(b, np.uint8), h_idx / h_idx[2, 2], occ


def cell_targets(h: np.ndarray, rf, grid: tuple[int, int], occ=None) -> tuple[np.ndarray, np.ndarray]:
    """Where each cell of A's feature map lands on B's map (same grid size).

    Cell (i, j) is centred at stride*(i, j) + offset pixels (offset from the receptive field).
    Returns u [n, 2] (x, y) in B grid units (fractional) and valid [n] bool (inside B's map, in
    front of the camera, not under the occluder), n = rows * cols in row-major order.
    """
    rows, cols = grid
    off = -rf.padding + (rf.size - 1) / 2.0
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pts = np.stack([xs.ravel(), ys.ravel()], 1) * rf.stride + off
    p = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ h.T
    front = p[:, 2] > 1e-9
    q = p[:, :2] / np.where(front, p[:, 2], 1.0)[:, None]
    u = (q - off) / rf.stride
    valid = front & (u[:, 0] >= 0) & (u[:, 0] <= cols - 1) & (u[:, 1] >= 0) & (u[:, 1] <= rows - 1)
    if occ is not None:
        x0, y0, x1, y1 = occ
        valid &= ~((q[:, 0] >= x0) & (q[:, 0] <= x1) & (q[:, 1] >= y0) & (q[:, 1] <= y1))
    return u.astype(np.float32), valid


# ------------------------------------------------------------------------------------ images


def load_images(paths: list[str], max_side: int, min_side: int) -> tuple[list[np.ndarray], list[str]]:
    """Decode once at long side <= max_side, upscaled so the short side >= min_side; skip bad files."""
    from PIL import Image

    out, bad = [], []
    for p in paths:
        try:
            img, _ = load_image(p, max_side)
        except ImageError as e:
            bad.append(f"{p}: {getattr(e, 'reason', e)}")
            continue
        h, w = img.shape[:2]
        if min(h, w) < min_side:
            f = min_side / min(h, w)
            img = np.asarray(
                Image.fromarray(img).resize(
                    (max(min_side, round(w * f)), max(min_side, round(h * f))), Image.Resampling.BILINEAR
                )
            )
        out.append(np.ascontiguousarray(img))
    return out, bad


def make_batch(images: list[np.ndarray], step: int, ac, rf, grid) -> dict[str, np.ndarray]:
    """The pairs of training step `step`: a seeded function of (adapt.seed, step) for exact resume."""
    n = ac.batch_size
    rng = np.random.default_rng([ac.seed, step])
    picks = rng.integers(0, len(images), n)
    xa, xb, us, vs = [], [], [], []
    for k in range(n):
        r = np.random.default_rng([ac.seed, step, k])
        a, b, h, occ = make_pair(images[picks[k]], r, ac, ac.crop_size)
        u, v = cell_targets(h, rf, grid, occ)
        xa.append(a)
        xb.append(b)
        us.append(u)
        vs.append(v)
    return {
        "a": np.stack(xa).astype(np.float32),
        "b": np.stack(xb).astype(np.float32),
        "u": np.stack(us),
        "valid": np.stack(vs).astype(np.float32),
    }


# ------------------------------------------------------------------------------------ model


def build_head(channels: int, local_dim: int, hidden: int, context: int = 1):
    """Keras model: local block [b, h, w, C] -> (descriptor [b, h, w, local_dim], reliability logit [b, h, w, 1]).

    descriptor = x @ eye(C, local_dim) + b + MLP(x); the MLP's first layer sees `context` x `context`
    cells (1 = the cell alone), its last layer starts at zero, so step 0 reproduces the default model.
    """
    from landmarks.utils.tfquiet import keras

    L = keras.layers
    inp = keras.Input((None, None, channels), name="local_block")
    base = L.Dense(local_dim, use_bias=True, kernel_initializer=keras.initializers.Identity(), name="adapt_linear")(
        inp
    )  # Identity of a C x D kernel = eye(C, D): the block10 padding
    hid = L.Conv2D(hidden, context, padding="same", activation="relu", name="adapt_hidden")(inp)
    res = L.Dense(local_dim, kernel_initializer="zeros", name="adapt_residual")(hid)
    desc = L.Add(name="adapt_descriptor")([base, res])
    r = L.Conv2D(64, context, padding="same", activation="relu", name="adapt_rel_hidden")(inp)
    rel = L.Dense(1, name="adapt_reliability")(r)
    return keras.Model(inp, [desc, rel], name="adapt_head")


def _backbone(mc):
    """The backbone of model.backbone / model.init with the local block as its first output (Lite0: block 10)."""

    layer = lite_local_layer(mc.backbone) if is_lite(mc.backbone) else None
    return build_backbone(mc.backbone, mc.init, local_layer=layer)


def _heads_module(backbone, head, gem, score: str):
    """tf.Module for export.save_serving: frozen backbone -> adapted local heads + GeM global."""
    from landmarks.utils.tfquiet import tf

    class AdaptedHeads(tf.Module):
        """Frozen backbone -> (adapted descriptor, keypoint score, GeM of the last map)."""

        def __init__(self):
            super().__init__(name="adapted_heads")
            self.backbone, self.head, self.gem = backbone, head, gem

        def heads(self, x):
            local, top = self.backbone(x, training=False)
            local = tf.cast(local, tf.float32)
            desc, rel = self.head(local)
            rel = tf.sigmoid(rel[..., 0])
            norm = tf.norm(local, axis=-1)
            sc = {"reliability": rel, "norm": norm, "norm_x_reliability": norm * rel}[score]
            return desc, sc, self.gem(top)

    return AdaptedHeads()


def effective_steps(ac, n_images: int) -> int:
    """The steps an adaptation on `n_images` train images runs: adapt.steps, scaled down on a tiny
    split to about adapt.pairs_per_image warped pairs per image (never below adapt.min_steps).
    Off by default: every pair is a fresh random warp, and on the hard protocols 300 steps on a
    12-image split beat 75 steps (docs/experiments.md); it saves time where that matters more."""
    if ac.pairs_per_image <= 0:
        return ac.steps
    scaled = math.ceil(ac.pairs_per_image * n_images / ac.batch_size)
    return min(ac.steps, max(ac.min_steps, scaled))


def train_fingerprint(cfg, data_fp: str, steps: int | None = None) -> str:
    """What the learned head depends on: model + adapt settings except export/check-only keys + the
    images (+ the step count when :func:`effective_steps` scaled it below adapt.steps)."""
    scaled = [f"steps={steps}"] if steps is not None and steps != cfg.adapt.steps else []
    return cache.fingerprint(
        "adapt", cfg, [data_fp, *scaled], sections=("model", "adapt"), drop={"adapt": NOT_TRAINING}
    )


def image_keys(ids: list[str], paths: list[str], mode: str = "stat") -> list[str]:
    """The file key of each train image, sorted (the keys the features stage reuses by)."""
    pairs = sorted(zip(map(str, ids), map(str, paths)))
    return cache.file_keys([i for i, _ in pairs], [p for _, p in pairs], mode)


def plan(cfg, data_dir: str | Path):
    """The train rows an adaptation uses and its fingerprints, without TensorFlow: (df, data_fp, fp).
    The data fingerprint covers each image's file key: a replaced image re-adapts, as it re-extracts."""
    df = _adapt_images(cfg.adapt, data_dir)
    keys = image_keys(df["id"].astype(str).tolist(), df["path"].astype(str).tolist(), cfg.extract.file_key)
    data_fp = cache.digest(str(len(keys)), ",".join(keys))
    return df, data_fp, train_fingerprint(cfg, data_fp, effective_steps(cfg.adapt, len(df)))


def reusable(cfg, out_dir: str | Path, df) -> float | None:
    """Share of this adaptation's images that the export at `out_dir` was adapted on, when that
    export has the same model and adapt settings and the share is at least adapt.reuse_overlap;
    else None.  A train split that grows by a few images keeps its adapted model, so the features
    extracted with it stay valid (incremental extraction), instead of re-adapting and re-extracting
    everything for a change that cannot move the learned head."""
    old = _export_meta(out_dir)
    steps = effective_steps(cfg.adapt, len(df))
    if (
        old is None
        or not old.get("image_keys")
        or cfg.adapt.reuse_overlap >= 1
        or not _same_export(cfg, old, steps=steps)
    ):
        return None
    if old.get("settings_fingerprint") != train_fingerprint(cfg, ""):
        return None
    keys = image_keys(df["id"].astype(str).tolist(), df["path"].astype(str).tolist(), cfg.extract.file_key)
    share = len(set(keys) & set(old["image_keys"])) / max(1, len(keys))
    return share if share >= cfg.adapt.reuse_overlap else None


def _export_meta(out_dir: str | Path) -> dict | None:
    """The metadata of an adapted export at `out_dir` (None when there is none)."""

    try:
        return read_model_meta(out_dir)
    except (OSError, ValueError):
        return None


def _same_export(cfg, meta: dict, fp: str | None = None, *, steps: int) -> bool:
    """True when `meta` describes an export of this adaptation (fingerprint `fp` when given) with
    `steps` steps (:func:`effective_steps`), today's keypoint score and export format."""
    return (
        (fp is None or meta.get("fingerprint") == fp)
        and meta.get("steps") == steps
        and meta.get("keypoint_score") == cfg.adapt.score
        and meta.get("format") == cache.FORMATS["model"]
    )


def models_cache_dir(cfg, models_cache: str | Path, fp: str) -> Path:
    """Where the models cache keeps the export of adaptation `fp` with today's score and format."""
    return Path(models_cache) / f"adapt-{cache.digest(fp, cfg.adapt.score, str(cache.FORMATS['model']))}"


def _from_models_cache(cfg, models_cache, out_dir, fp: str, steps: int) -> bool:
    """Copy the export of this adaptation from the models cache to `out_dir` when it is there."""
    if not models_cache:
        return False
    src = models_cache_dir(cfg, models_cache, fp)
    meta = _export_meta(src)
    if meta is None or not _same_export(cfg, meta, fp, steps=steps):
        return False
    _copy_model(src, out_dir)
    log.info("adapt: taken from the models cache (%s -> %s): these train images were adapted on before", src, out_dir)
    return True


def _to_models_cache(cfg, models_cache, out_dir, fp: str) -> None:
    """Keep a copy of a fresh export in the models cache (a failure to write it is only logged)."""
    if not models_cache:
        return
    dst = models_cache_dir(cfg, models_cache, fp)
    try:
        _copy_model(out_dir, dst)
        log.info("adapt: export kept in the models cache %s", dst)
    except OSError as e:
        log.warning("adapt: cannot keep the export in the models cache %s (%s)", dst, e)


def _copy_model(src: Path, dst: str | Path) -> None:
    """Copy a SavedModel folder onto `dst` atomically (readers never see half a model)."""
    import shutil

    with building_dir(dst, "copying") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _done_already(cfg, data_dir, out_dir, df, fp: str, t_plan: float, models_cache=None) -> bool:
    """True when OUT holds this adaptation, or one on nearly the same images, or the models cache
    holds it (copied to OUT); logged either way."""
    n = len(df)
    steps = effective_steps(cfg.adapt, n)
    old = _export_meta(out_dir)
    if old is not None and _same_export(cfg, old, fp, steps=steps):
        log.info(
            "adapt: up to date (%s: %d steps on %d train images of %s, fingerprint %s); skipped in %.2fs",
            *(out_dir, steps, n, data_dir, fp, time.time() - t_plan),
        )
        return True
    share = reusable(cfg, out_dir, df)
    if share is not None:
        log.info(
            "adapt: kept %s: adapted with the same settings on %.1f%% of today's %d train images "
            "(adapt.reuse_overlap=%.2f; set it to 1 to re-adapt on any change)",
            *(out_dir, 100 * share, n, cfg.adapt.reuse_overlap),
        )
        return True
    return _from_models_cache(cfg, models_cache, out_dir, fp, steps)


def _checkpointer(work_dir, fp: str, restart: bool, replace_stale: bool):
    """The checkpoint folder WORK/adapt for this fingerprint, cleared on restart or, with
    `replace_stale`, when it holds a run of other inputs."""

    adapt_dir = Path(work_dir) / "adapt"
    adapt_dir.mkdir(parents=True, exist_ok=True)
    ck = Checkpointer(adapt_dir, fp)
    if not restart and replace_stale and ck.state_path.exists():
        try:
            restart = json.loads(ck.state_path.read_text()).get("fingerprint") != fp
        except (OSError, ValueError):
            restart = True
        if restart:
            log.info(
                "adapt: the checkpoint in %s is of other inputs (train split or settings changed); adapting again",
                adapt_dir,
            )
    if restart:
        ck.clear()
    return ck


def adapt(
    cfg,
    data_dir: str | Path,
    work_dir: str | Path,
    out_dir: str | Path,
    *,
    restart: bool = False,
    replace_stale: bool = False,
    stop_after: int | None = None,
    models_cache: str | Path | None = None,
) -> Path | None:
    """Adapt the local head on DATA's train images (labels unused), checkpoint in WORK/adapt, export to OUT.

    A cached stage: when OUT already holds this adaptation (same model and adapt settings, same
    train images: :func:`train_fingerprint`), or one on nearly the same images (:func:`reusable`),
    it returns at once, before TensorFlow is imported.  A checkpoint of other inputs stops the run
    (pass `restart`), or with `replace_stale` is discarded and the adaptation starts over (what
    `make predict` does).  `stop_after` ends this run after that many total steps without
    exporting (to test resuming); returns the export path, or None when stopped early.
    `models_cache`: a folder shared by WORK_DIRs (the CLI's default: adapt.models_cache) that keeps
    every export by fingerprint, so the same train images and settings are never adapted twice.
    """
    ac = cfg.adapt
    t_plan = time.time()
    df, data_fp, fp = plan(cfg, data_dir)
    if not restart and _done_already(cfg, data_dir, out_dir, df, fp, t_plan, models_cache):
        return Path(out_dir)
    from landmarks.utils.tfquiet import keras

    configure_tensorflow()
    ck = _checkpointer(work_dir, fp, restart, replace_stale)
    log.info(
        "adapt: %s (%s); fingerprint %s, %d train images of %s",
        *(
            "no adapted model yet" if _export_meta(out_dir) is None else "the adapted model is out of date",
            out_dir,
            fp,
            len(df),
            data_dir,
        ),
    )
    keras.utils.set_random_seed(ac.seed)
    net = _AdaptNet(cfg)
    step, history, resumed = ck.resume(net.head, net.optimizer)
    steps = effective_steps(ac, len(df))
    if steps < ac.steps:
        log.info(
            "adapt: %d steps, not adapt.steps=%d: %d train images need no more than adapt.pairs_per_image=%g pairs each",
            *(steps, ac.steps, len(df), ac.pairs_per_image),
        )
    end = steps if stop_after is None else min(steps, int(stop_after))
    paths = df["path"].astype(str).tolist()
    if step < end:
        step = _run_steps(cfg, net, ck, paths, step, end, history, resumed, data_dir)
    if step < steps:
        return None
    timing_path = ck.dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    ids = df["id"].astype(str).tolist()
    meta = {
        "kind": "adapted",
        "fingerprint": fp,
        "data_fingerprint": data_fp,
        "data_dir": str(data_dir),
        "train_images": len(ids),
        "steps": step,
        "settings_fingerprint": train_fingerprint(cfg, ""),
        "image_keys": image_keys(ids, paths, cfg.extract.file_key),
    }
    out = _export(cfg, net, out_dir, meta, history, timing)
    _to_models_cache(cfg, models_cache, out, fp)
    return out


def _adapt_images(ac, data_dir):
    """The train split's rows to adapt on: all, or a sample of adapt.max_images chosen by a seeded
    hash of each id, so appending images keeps most of the sample (not a fresh shuffle)."""
    import hashlib

    df = load_split(data_dir, "train")
    if df.empty:
        raise LandmarksError(f"{data_dir}: the train split is empty")
    if ac.max_images > 0 and len(df) > ac.max_images:
        rank = [hashlib.sha1(f"{ac.seed}:{i}".encode()).hexdigest() for i in df["id"].astype(str)]
        df = df.assign(_rank=rank).sort_values("_rank", kind="mergesort").head(ac.max_images)
        df = df.drop(columns="_rank").sort_index()
    return df


class _AdaptNet:
    """The frozen backbone (and its local-block sub-model), the local block's receptive field and
    feature-map grid at adapt.crop_size, the head being trained and its Adam optimizer."""

    def __init__(self, cfg):
        from landmarks.utils.tfquiet import keras, tf

        ac, mc = cfg.adapt, cfg.model
        self.backbone = _backbone(mc)
        self.backbone.trainable = False
        self.local_model = keras.Model(self.backbone.input, self.backbone.outputs[0])
        self.rf = receptive_field(self.backbone, output_layer_name(self.backbone, 0))
        channels = int(self.backbone.outputs[0].shape[-1])
        if channels > mc.local_dim:
            raise LandmarksError(
                f"adapt keeps the local block's {channels} channels inside the {mc.local_dim}-d "
                "descriptor; raise model.local_dim"
            )
        zeros = tf.zeros([1, ac.crop_size, ac.crop_size, 3])
        self.grid = tuple(int(d) for d in self.local_model(zeros).shape[1:3])
        self.head = build_head(channels, mc.local_dim, ac.hidden, ac.context)
        self.optimizer = keras.optimizers.Adam(ac.learning_rate)
        self.optimizer.build(self.head.trainable_variables)


def bilinear_sample(f, u, rows: int, cols: int):
    """Bilinear sample of f [b, rows, cols, D] at u [b, n, 2] (x, y) grid coordinates -> [b, n, D]."""
    from landmarks.utils.tfquiet import tf

    x, y = u[..., 0], u[..., 1]
    x0 = tf.clip_by_value(tf.floor(x), 0.0, cols - 1.0)
    y0 = tf.clip_by_value(tf.floor(y), 0.0, rows - 1.0)
    x1, y1 = tf.minimum(x0 + 1.0, cols - 1.0), tf.minimum(y0 + 1.0, rows - 1.0)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    flat = tf.reshape(f, [tf.shape(f)[0], rows * cols, -1])

    def g(yy, xx):
        return tf.gather(flat, tf.cast(yy * cols + xx, tf.int32), batch_dims=1)

    return (1 - wy) * ((1 - wx) * g(y0, x0) + wx * g(y0, x1)) + wy * ((1 - wx) * g(y1, x0) + wx * g(y1, x1))


def _make_train_step(cfg, net: _AdaptNet):
    """The compiled step: InfoNCE of each visible A cell against its true B position (negatives:
    B cells beyond adapt.neg_radius) + weighted reliability BCE; one Adam update of the head."""
    from landmarks.utils.tfquiet import tf

    ac = cfg.adapt
    mode = preprocess_mode(cfg.model.backbone, cfg.model.init)
    local_model, head, optimizer = net.local_model, net.head, net.optimizer
    rows, cols = net.grid
    gy, gx = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    gxy = tf.constant(np.stack([gx.ravel(), gy.ravel()], 1))  # [M, 2]
    r2 = float(ac.neg_radius) ** 2
    tau = float(ac.temperature)
    w_rel = float(ac.reliability_weight)

    @tf.function
    def train_step(xa, xb, u, valid):
        fa = tf.cast(local_model(normalize_pixels(xa, mode), training=False), tf.float32)
        fb = tf.cast(local_model(normalize_pixels(xb, mode), training=False), tf.float32)
        with tf.GradientTape() as tape:
            da, ra = head(fa)
            db, _ = head(fb)
            dp = tf.math.l2_normalize(bilinear_sample(db, u, rows, cols), -1)  # B's descriptor at A's exact position
            b = tf.shape(da)[0]
            da = tf.math.l2_normalize(tf.reshape(da, [b, rows * cols, -1]), -1)
            db = tf.math.l2_normalize(tf.reshape(db, [b, rows * cols, -1]), -1)
            sim = tf.einsum("bnd,bmd->bnm", da, db)
            pos = tf.reduce_sum(da * dp, -1)
            d2 = tf.reduce_sum(tf.square(u[:, :, None, :] - gxy[None, None]), -1)  # [b, n, m]
            neg = tf.where(d2 > r2, sim, -1e4)
            logits = tf.concat([pos[..., None], neg], -1) / tau
            ce = -tf.nn.log_softmax(logits, -1)[..., 0]
            nv = tf.maximum(tf.reduce_sum(valid), 1.0)
            nce = tf.reduce_sum(ce * valid) / nv
            nn = tf.argmax(sim, -1, output_type=tf.int32)
            correct = tf.cast(tf.gather(d2, nn, batch_dims=2) <= r2, tf.float32)
            rl = tf.reshape(ra, [b, rows * cols])
            bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.stop_gradient(correct), logits=rl)
            rel = tf.reduce_sum(bce * valid) / nv
            loss = nce + w_rel * rel
        grads = tape.gradient(loss, head.trainable_variables)
        optimizer.apply_gradients(zip(grads, head.trainable_variables))
        acc = tf.reduce_sum(tf.cast(tf.equal(tf.cast(rl > 0, tf.float32), correct), tf.float32) * valid) / nv
        return {
            "loss": loss,
            "infonce": nce,
            "reliability": rel,
            "nn_correct": tf.reduce_sum(correct * valid) / nv,
            "rel_accuracy": acc,
        }

    return train_step


def _run_steps(
    cfg, net: _AdaptNet, ck, paths: list[str], step: int, end: int, history: list, resumed: list, data_dir
) -> int:
    """Decode the images once, then train from `step` to `end` (the next batch's pairs are made
    while a step runs), checkpointing and plotting every adapt.checkpoint_every steps and at `end`;
    writes timing.json.  Returns `end`."""
    from tqdm import tqdm

    from landmarks.utils.tfquiet import tf

    ac = cfg.adapt
    train_step = _make_train_step(cfg, net)
    t0 = time.time()
    images, bad = load_images(paths, ac.max_side, ac.crop_size)
    if bad:
        log.warning("adapt: %d of %d train images unusable (first: %s)", len(bad), len(paths), bad[0])
    if not images:
        raise LandmarksError(f"{data_dir}: no usable train image to adapt on")
    log.info(
        "adapt: %d images decoded in %.1fs; %d steps x %d pairs of %dpx views",
        len(images),
        time.time() - t0,
        end - step,
        ac.batch_size,
        ac.crop_size,
    )
    t0, done = time.time(), 0
    bar = tqdm(total=end - step, desc="adapt", unit="step", disable=None)
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(make_batch, images, step, ac, net.rf, net.grid)
        while step < end:
            batch = nxt.result()
            if step + 1 < end:
                nxt = pool.submit(make_batch, images, step + 1, ac, net.rf, net.grid)
            m = {
                k: float(v)
                for k, v in train_step(
                    tf.constant(batch["a"]),
                    tf.constant(batch["b"]),
                    tf.constant(batch["u"]),
                    tf.constant(batch["valid"]),
                ).items()
            }
            if not np.isfinite(m["loss"]):
                raise LandmarksError(f"adaptation diverged at step {step + 1}; lower adapt.learning_rate")
            step += 1
            done += 1
            history.append({"step": step, **m})
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", nn=f"{m['nn_correct']:.2f}")
            if step % max(1, ac.checkpoint_every) == 0 or step == end:
                ck.save(
                    net.head,
                    net.optimizer,
                    {"step": step, "history": history, "resumed_from": resumed, "images": len(images)},
                )
                plot_curves(history, ck.dir / "curves.png", ADAPT_CURVES)
    bar.close()
    dt = time.time() - t0
    ips = 2 * done * ac.batch_size / max(dt, 1e-9)
    log.info(
        "adapted %d steps in %.1fs: %.1f views/s (%d px, pairs made + backbone + head)", done, dt, ips, ac.crop_size
    )
    with atomic_path(ck.dir / "timing.json") as tmp:
        tmp.write_text(json.dumps({"seconds": round(dt, 1), "views_per_s": round(ips, 2), "steps": done}))
    return step


def _export(cfg, net: _AdaptNet, out_dir, meta: dict, history: list, timing: dict) -> Path:
    """Save the adapted heads in the official DELG signature with their metadata."""

    ac, mc = cfg.adapt, cfg.model
    last = history[-1] if history else {}
    meta = {
        **meta,
        "adapt": cfg.to_dict()["adapt"],
        "backbone": mc.backbone,
        "init": mc.init,
        "local_layer": output_layer_name(net.backbone, 0),
        "local_projection": "adapted (identity + residual MLP, InfoNCE under known homographies)",
        "keypoint_score": ac.score,
        "global": f"GeM(p={mc.gem_p}) of last map",
        "final": {k: round(v, 4) for k, v in last.items() if k != "step"},
        "timing": timing,
    }
    served = export_backbone(net.backbone, mc)  # batch norms folded, as in every export
    rf, layer = net.rf, output_layer_name(net.backbone, 0)
    global_dim = int(net.backbone.outputs[1].shape[-1])
    meta.update(
        fold_batchnorm=bool(mc.fold_batchnorm),
        format=cache.FORMATS["model"],
        **path_fingerprints(
            served,
            [],
            [net.head],
            preprocess=preprocess_mode(mc.backbone, mc.init),
            global_graph={"gem_p": mc.gem_p, "global_dim": global_dim},
            local_graph=local_graph(rf, mc, ac.score, layer),
        ),
    )
    heads = _heads_module(served, net.head, make_gem(mc.gem_p, False), ac.score)
    out = save_serving(
        heads,
        "heads",
        net.rf,
        preprocess_mode(mc.backbone, mc.init),
        out_dir,
        local_dim=mc.local_dim,
        global_dim=global_dim,
        default_thres=mc.default_abs_thres,
        meta=meta,
    )
    log.info("adapted model -> %s", out)
    return out


# ----------------------------------------------------------------------------------- evaluate


def eval_photos(cfg, data_dir) -> tuple[list[str], str]:
    """Held-out real photos for the check: adapt.eval_data, else the shared wide-baseline set, else DATA test."""
    import pandas as pd

    src = cfg.adapt.eval_data or str(REPO.parent / "shared" / "data" / "wide_baseline_scenes")
    labels = Path(src) / "LABELS.csv" if Path(src).is_dir() else Path(src)
    if labels.name == "LABELS.csv" and labels.exists():
        d = pd.read_csv(labels, dtype=str)
        paths = sorted(str(labels.parent / p) for p in d["path"])
        source = f"{labels.parent}"
    else:
        paths = sorted(load_split(data_dir, "test")["path"].astype(str))
        source = f"{data_dir} test split"
    rng = np.random.default_rng(cfg.adapt.seed + 7)
    if len(paths) > cfg.adapt.eval_images:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), cfg.adapt.eval_images, replace=False))]
    return paths, source


def evaluate(cfg, models: dict[str, str | Path], photos: list[str]) -> dict[str, dict]:
    """Match precision under known warps of real photos, per model.

    For each photo and each of adapt.eval_warps seeded warps (with the photometric changes), both
    views go through the model's official signature (extract.local_scales, adapt.eval_features);
    mutual nearest neighbours are correct when within adapt.eval_tolerance px of the true position.
    Also pydegensac inliers of each true pair against those of a wrong pair (view A of this photo,
    view B of the next photo).
    """

    ac, e = cfg.adapt, cfg.extract
    images, bad = load_images(photos, max(ac.eval_crop, 640), ac.eval_crop)
    if len(images) < 2:
        raise LandmarksError(f"the match-precision check needs 2 readable photos ({len(bad)} unusable)")
    pairs = []
    for i, img in enumerate(images):
        for k in range(ac.eval_warps):
            a, b, h, occ = make_pair(img, np.random.default_rng([ac.seed + 10_000, i, k]), ac, ac.eval_crop)
            pairs.append((i, a, b, h, occ))
    res = {}
    for name, path in models.items():
        model = load_delg(path)

        def feats(x):
            _, lf = postprocess(model(x, list(e.local_scales), ac.eval_features, e.abs_thres, [0]))
            return lf

        fa = [feats(a) for _, a, _, _, _ in pairs]
        fb = [feats(b) for _, _, b, _, _ in pairs]
        n_m = n_c = 0
        inl_ok, inl_wrong, correct_per_pair = [], [], []
        for j, (i, _, _, h, occ) in enumerate(pairs):
            m = verify.match_mutual(fa[j].descriptors, fb[j].descriptors, cfg.verify.mutual_min_sim, cfg.verify.ratio)
            if len(m):
                q = apply_h(h, fa[j].keypoints[m[:, 0]])
                ok = np.linalg.norm(q - fb[j].keypoints[m[:, 1]], axis=1) <= ac.eval_tolerance
                n_m, n_c = n_m + len(m), n_c + int(ok.sum())
                correct_per_pair.append(int(ok.sum()))
            else:
                correct_per_pair.append(0)
            inl_ok.append(verify.count_inliers(cfg.verify, fa[j].keypoints, fb[j].keypoints, m))
            jw = next(t for t in range(j + 1, j + len(pairs)) if pairs[t % len(pairs)][0] != i) % len(pairs)
            mw = verify.match_mutual(fa[j].descriptors, fb[jw].descriptors, cfg.verify.mutual_min_sim, cfg.verify.ratio)
            inl_wrong.append(verify.count_inliers(cfg.verify, fa[j].keypoints, fb[jw].keypoints, mw))
        res[name] = {
            "pairs": len(pairs),
            "precision": n_c / max(n_m, 1),
            "matches_per_pair": n_m / len(pairs),
            "correct_per_pair": float(np.mean(correct_per_pair)),
            "inliers_true": float(np.mean(inl_ok)),
            "inliers_wrong": float(np.mean(inl_wrong)),
            "true_above_all_wrong": float(np.mean(np.asarray(inl_ok) > max(inl_wrong))),
        }
    return res


def format_eval(res: dict[str, dict], source: str, cfg) -> str:
    """Markdown table of `evaluate`'s results, one row per model."""
    ac = cfg.adapt
    lines = [
        f"Match precision under known warps: {source}, {next(iter(res.values()))['pairs']} pairs "
        f"({ac.eval_warps} warps per photo, {ac.eval_crop}px views, {ac.eval_features} features, "
        f"correct within {ac.eval_tolerance:g} px)",
        "",
        "| model | precision | correct matches / pair | matches / pair | inliers true pair | "
        "inliers wrong pair | true > every wrong |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | {r['precision']:.3f} | {r['correct_per_pair']:.1f} | {r['matches_per_pair']:.1f} | "
            f"{r['inliers_true']:.1f} | {r['inliers_wrong']:.1f} | {r['true_above_all_wrong']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- CLI


def _cmd_adapt(args, cfg) -> int:

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.steps is not None:
        cfg.adapt.steps = args.steps
    if args.out is None:
        args.out = str(Path(args.work_dir) / "adapt" / "model")
    if not args.eval_only:
        models_cache = cfg.adapt.models_cache if args.models_cache is None else args.models_cache
        out = adapt(
            cfg,
            args.data_dir,
            args.work_dir,
            args.out,
            restart=args.restart,
            replace_stale=args.replace_stale,
            models_cache=models_cache or None,
        )
        print(out)
    if args.no_eval:
        return 0
    configure_tensorflow()
    if not (Path(args.out) / "saved_model.pb").exists():
        raise LandmarksError(f"{args.out} holds no adapted model: run `landmarks adapt` first")
    photos, source = eval_photos(cfg, args.data_dir)
    models = {f"zero-training ({args.model})": args.model, f"adapted ({args.out})": args.out}
    text = format_eval(evaluate(cfg, models, photos), source, cfg)
    path = Path(args.work_dir) / "adapt" / "eval.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print(text, end="")
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "adapt",
        parents=common("data_dir", "work_dir", "zero_model"),
        help="learn the local head from DATA_DIR's unlabelled train images, export it",
    )
    p.add_argument(
        "--out",
        default=None,
        help="exported SavedModel directory (default WORK_DIR/adapt/model, the default MODEL of `make predict`)",
    )
    p.add_argument("--steps", type=int, default=None, help="override adapt.steps")
    p.add_argument(
        "--models-cache",
        default=None,
        metavar="DIR",
        help="exports kept by fingerprint across WORK_DIRs (default: adapt.models_cache; empty = none)",
    )
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in WORK_DIR/adapt")
    p.add_argument(
        "--replace-stale",
        action="store_true",
        help="a checkpoint of other inputs (train split, model or adapt settings) is discarded "
        "instead of stopping the run (the cached stage of `make predict`)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the match-precision check against --model")
    p.add_argument("--eval-only", action="store_true", help="only compare OUT against --model under known warps")
    p.set_defaults(func=_cmd_adapt)
