"""Export DELG models in the official SavedModel signature; build the zero-training default model.

The exported ``serving_default`` signature matches Google's DELG exports (docs/design.md, "Model signature"):
inputs ``input_image`` uint8 [H,W,3], ``input_scales`` f32 [S], ``input_max_feature_num`` i32,
``input_abs_thres`` f32, ``input_global_scales_ind`` i32 [G]; outputs ``boxes`` [N,4]
(y0,x0,y1,x1 original pixels), ``features`` [N,128], ``scales`` [N], ``scores`` [N,1],
``global_descriptors`` [G,D] (not normalised).  Inside the graph, per scale: bilinear resize,
pixel normalisation of the backbone (Lite0: (x-127)/128, the normalisation its ImageNet weights
were trained with; ResNet/tiny: (x-128)/128), forward pass, local positions with score >= threshold
(``input_abs_thres`` <= 0 means the model's baked default), per-scale top-k, receptive-field boxes
divided by the actual resize ratio; then all scales merged and capped at ``input_max_feature_num``
by score.

Zero-training default (``landmarks model build --out models/default``): ImageNet Lite0 (offline
weights), global = GeM(p=3) of the last feature map (1280-d), local = activations of a stride-16
block, keypoints ranked by their L2 norm (DELF's baseline), descriptors = a FIXED projection to
128-d, chosen by ``model.local_projection``:
  block10            output of block 10 (112-d), zero-padded to 128 (identity embedding)  [default]
  block10_pcaw       same block, PCA-whitened on scikit-image's bundled photos
  pca_imagenet       expanded ReLU6 activations of block 11 (672-d), PCA to 128 on those photos
  pcaw_imagenet      same, PCA-whitened
  random_orthogonal  block 11 expanded activations, seeded random orthogonal 672->128
Measurement (mutual-NN match precision / correct matches per pair, 500 features, 11 skimage
images x 3 known similarity warps, correct = within 16 px): block10 0.453 / 87.1, block10_pcaw
0.448 / 87.5, pcaw_imagenet 0.398 / 73.3, random_orthogonal 0.367 / 64.0, pca_imagenet 0.360 / 63.7.
block10 wins and needs no fitting data at all.

One export path for every model (zero-training, adapted, trained): :func:`export_backbone` folds
the batch norms (``model.fold_batchnorm``), and :func:`path_fingerprints` records in
``landmarks_model.json`` the digest of the weights each path uses (global: backbone + global head;
local: backbone + local head), which key the stored features (``landmarks.utils.cache``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from landmarks.delg.delg_io import META_FILE, read_model_meta, serving_input_signature
from landmarks.delg.model import (
    build_backbone,
    fold_batchnorm,
    is_lite,
    lite_local_layer,
    make_gem,
    normalize_pixels,
    output_layer_name,
    preprocess_mode,
    receptive_field,
)
from landmarks.utils import LandmarksError, cache, configure_tensorflow

log = logging.getLogger(__name__)

PROJECTIONS = ("block10", "block10_pcaw", "pca_imagenet", "pcaw_imagenet", "random_orthogonal")


def _serving_class():
    from landmarks.utils.tfquiet import tf

    class DelgServing(tf.Module):
        """tf.Module around a `heads(x) -> (desc [1,h,w,d], scores [1,h,w], global [1,D])` callable."""

        def __init__(self, heads_owner, heads_name, rf, preprocess, default_thres, local_dim, global_dim):
            super().__init__(name="delg_serving")
            self.owner = heads_owner  # tracked: its variables are saved
            self._heads_name = heads_name
            self.rf_size = float(rf.size)
            self.rf_stride = float(rf.stride)
            self.rf_padding = float(rf.padding)
            self.preprocess = preprocess
            self.default_thres = tf.constant(float(default_thres), tf.float32)
            self.local_dim = int(local_dim)
            self.global_dim = int(global_dim)

        def _features_at_scale(self, heads, img, s, h, w, thres, cap):
            """One scale: resize, run the heads, keep the top `cap` cells scoring >= thres; their
            boxes (receptive fields in original-image pixels), descriptors, scores and the global."""
            nh = tf.maximum(tf.cast(tf.round(h * s), tf.int32), 1)
            nw = tf.maximum(tf.cast(tf.round(w * s), tf.int32), 1)
            x = tf.image.resize(img[None], tf.stack([nh, nw]), method="bilinear")
            x = normalize_pixels(x, self.preprocess)
            desc, sc, g = heads(x)
            desc = tf.cast(desc[0], tf.float32)
            sc = tf.cast(sc[0], tf.float32)
            fh, fw = tf.shape(sc)[0], tf.shape(sc)[1]
            ys, xs = tf.meshgrid(tf.range(fh), tf.range(fw), indexing="ij")
            ys = tf.reshape(tf.cast(ys, tf.float32), [-1])
            xs = tf.reshape(tf.cast(xs, tf.float32), [-1])
            sc = tf.reshape(sc, [-1])
            desc = tf.reshape(desc, [-1, self.local_dim])
            keep = tf.where(sc >= thres)[:, 0]
            sc, ys, xs, desc = (tf.gather(t, keep) for t in (sc, ys, xs, desc))
            k = tf.minimum(cap, tf.shape(sc)[0])
            top = tf.math.top_k(sc, k=k).indices
            sc, ys, xs, desc = (tf.gather(t, top) for t in (sc, ys, xs, desc))
            ry = tf.cast(nh, tf.float32) / h
            rx = tf.cast(nw, tf.float32) / w
            y0 = ys * self.rf_stride - self.rf_padding
            x0 = xs * self.rf_stride - self.rf_padding
            b = tf.stack([y0 / ry, x0 / rx, (y0 + self.rf_size - 1.0) / ry, (x0 + self.rf_size - 1.0) / rx], axis=1)
            return b, desc, sc, g

        @tf.function(input_signature=serving_input_signature())
        def serve(self, input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
            heads = getattr(self.owner, self._heads_name)
            img = tf.cast(input_image, tf.float32)
            hw = tf.shape(img)[:2]
            h, w = tf.cast(hw[0], tf.float32), tf.cast(hw[1], tf.float32)
            thres = tf.where(input_abs_thres > 0.0, input_abs_thres, self.default_thres)
            cap = tf.maximum(input_max_feature_num, 0)
            boxes = tf.zeros([0, 4], tf.float32)
            feats = tf.zeros([0, self.local_dim], tf.float32)
            scs = tf.zeros([0], tf.float32)
            scores = tf.zeros([0], tf.float32)
            globs = tf.zeros([0, self.global_dim], tf.float32)
            for i in tf.range(tf.shape(input_scales)[0]):
                tf.autograph.experimental.set_loop_options(
                    shape_invariants=[
                        (boxes, tf.TensorShape([None, 4])),
                        (feats, tf.TensorShape([None, self.local_dim])),
                        (scs, tf.TensorShape([None])),
                        (scores, tf.TensorShape([None])),
                        (globs, tf.TensorShape([None, self.global_dim])),
                    ]
                )
                s = input_scales[i]
                b, desc, sc, g = self._features_at_scale(heads, img, s, h, w, thres, cap)
                boxes = tf.concat([boxes, b], 0)
                feats = tf.concat([feats, desc], 0)
                scs = tf.concat([scs, tf.fill(tf.shape(sc), s)], 0)
                scores = tf.concat([scores, sc], 0)
                globs = tf.concat([globs, tf.cast(g, tf.float32)], 0)
            k = tf.minimum(cap, tf.shape(scores)[0])
            top = tf.math.top_k(scores, k=k).indices
            return {
                "boxes": tf.gather(boxes, top),
                "features": tf.gather(feats, top),
                "scales": tf.gather(scs, top),
                "scores": tf.gather(scores, top)[:, None],
                "global_descriptors": tf.gather(globs, input_global_scales_ind),
            }

    return DelgServing


def export_backbone(backbone, mc):
    """The backbone an export serves: its batch norms folded into the convolutions when
    model.fold_batchnorm (the same function up to float rounding, ~1.4x faster on CPU)."""

    return fold_batchnorm(backbone) if mc.fold_batchnorm else backbone


def _arrays(parts) -> list[np.ndarray]:
    out = []
    for p in parts:
        out.extend(np.asarray(w) for w in (p.weights if hasattr(p, "weights") else [p]))
    return out


def path_fingerprints(backbone, global_parts, local_parts, *, preprocess: str, global_graph: dict, local_graph: dict):
    """{"global_fingerprint", "local_fingerprint"} of an export: digests of the backbone's weights
    with those of each path's head (`*_parts`: layers, modules or arrays) and the settings of the
    graph around them.  An adapted model, whose backbone and GeM are the default model's, gets the
    default model's global fingerprint, so its train global descriptors are kept."""
    base = _arrays([backbone])
    common = {"format": cache.FORMATS["model"], "preprocess": preprocess}
    return {
        "global_fingerprint": cache.array_fingerprint(
            base + _arrays(global_parts), {**common, "path": "global", **global_graph}
        ),
        "local_fingerprint": cache.array_fingerprint(
            base + _arrays(local_parts), {**common, "path": "local", **local_graph}
        ),
    }


def model_settings_fingerprint(cfg) -> str:
    """What the zero-training model is built from: the model settings it uses and the export format."""
    train_only = ("global_dim", "gem_trainable", "arcface_margin", "arcface_scale", "whiten_init")
    return cache.digest(
        f"model-v{cache.FORMATS['model']}", str(cache.settings(cfg, "model", drop={"model": train_only}))
    )


def save_serving(
    heads_owner,
    heads_name: str,
    rf,
    preprocess: str,
    out_dir: str | Path,
    *,
    local_dim: int,
    global_dim: int,
    default_thres: float = 0.0,
    meta: dict | None = None,
) -> Path:
    """Save `heads_owner.<heads_name>` as a DELG SavedModel at `out_dir` (atomic: temp dir, then rename)."""
    from landmarks.utils.tfquiet import tf

    out_dir = Path(out_dir)
    module = _serving_class()(heads_owner, heads_name, rf, preprocess, default_thres, local_dim, global_dim)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.WARNING)  # silence "input names renamed" chatter of the while loop
    try:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
    finally:
        absl_log.setLevel(level)
    info = {
        "receptive_field": {"size": rf.size, "stride": rf.stride, "padding": rf.padding},
        "preprocess": preprocess,
        "local_dim": local_dim,
        "global_dim": global_dim,
        "default_abs_thres": default_thres,
        **(meta or {}),
    }
    (tmp / META_FILE).write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------- zero-training default


def skimage_photos() -> list[np.ndarray]:
    """RGB uint8 natural photos bundled with scikit-image (no download needed)."""
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            img = getattr(data, name)()
        except Exception:  # a photo that needs a download in this skimage version
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    if len(out) < 3:
        raise LandmarksError("scikit-image's bundled photos are missing; cannot fit the local projection")
    return out


def _activations(backbone, images, preprocess, max_side=512):
    from landmarks.utils.tfquiet import tf

    acts = []
    for img in images:
        h, w = img.shape[:2]
        s = min(1.0, max_side / max(h, w))
        x = tf.image.resize(tf.cast(img, tf.float32)[None], (max(1, round(h * s)), max(1, round(w * s))))
        local, _ = backbone(normalize_pixels(x, preprocess), training=False)
        acts.append(np.asarray(local).reshape(-1, local.shape[-1]))
    return np.concatenate(acts, 0)


def fit_projection(kind: str, backbone, preprocess: str, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed local projection (W [C, dim], b [dim]) so that desc = act @ W + b."""
    c = int(backbone.outputs[0].shape[-1])
    if kind in ("pca_imagenet", "pcaw_imagenet", "block10_pcaw"):
        a = _activations(backbone, skimage_photos(), preprocess).astype(np.float64)
        mu = a.mean(0)
        cov = np.cov(a - mu, rowvar=False)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][:dim]
        w = evecs[:, order]
        if kind != "pca_imagenet":  # PCA-whitening, regularised so near-empty directions stay small
            ev = np.maximum(evals[order], 0.0)
            w = w / np.sqrt(ev + 1e-2 * ev.max())
        if w.shape[1] < dim:
            w = np.pad(w, ((0, 0), (0, dim - w.shape[1])))
        return w.astype(np.float32), (-mu @ w).astype(np.float32)
    if kind == "random_orthogonal":
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((max(c, dim), max(c, dim))))
        return q[:c, :dim].astype(np.float32), np.zeros(dim, np.float32)
    if kind == "block10":
        if c > dim:
            raise LandmarksError(
                f"local_projection block10 keeps the local block as is and needs <= {dim} channels, "
                f"got {c}: use --set model.local_projection=pca_imagenet"
            )
        return np.eye(c, dim, dtype=np.float32), np.zeros(dim, np.float32)
    raise LandmarksError(f"unknown model.local_projection {kind!r} (choose from {', '.join(PROJECTIONS)})")


def _zero_training_heads(backbone, w, b, gem):
    from landmarks.utils.tfquiet import tf

    class ZeroTrainingHeads(tf.Module):
        """Backbone activations -> (fixed projection, activation L2 norm, GeM of last map)."""

        def __init__(self):
            super().__init__(name="zero_training_heads")
            self.backbone = backbone
            self.gem = gem
            self.proj_w = tf.Variable(w, trainable=False, name="proj_w")
            self.proj_b = tf.Variable(b, trainable=False, name="proj_b")

        def heads(self, x):
            local, top = self.backbone(x, training=False)
            local = tf.cast(local, tf.float32)
            score = tf.norm(local, axis=-1)
            desc = tf.tensordot(local, self.proj_w, axes=1) + self.proj_b
            return desc, score, self.gem(top)

    return ZeroTrainingHeads()


def local_graph(rf, mc, score: str, layer: str) -> dict:
    """The settings of an export's local path around its weights (for path_fingerprints)."""
    return {
        "rf": [rf.size, rf.stride, rf.padding],
        "local_dim": mc.local_dim,
        "default_abs_thres": mc.default_abs_thres,
        "score": score,
        "layer": layer,
    }


def build_default_model(cfg, out_dir: str | Path) -> Path:
    """Build the zero-training DELG model (no dataset) and export it in the official signature."""

    mc = cfg.model
    t0 = time.time()
    if mc.local_projection not in PROJECTIONS:
        raise LandmarksError(
            f"unknown model.local_projection {mc.local_projection!r} (choose from {', '.join(PROJECTIONS)})"
        )
    if is_lite(mc.backbone):  # "block10" = the stride-16 stage's last block (Lite1/2: block 14)
        layer = lite_local_layer(mc.backbone, expanded=not mc.local_projection.startswith("block10"))
        backbone = build_backbone(mc.backbone, mc.init, local_layer=layer)
    else:
        backbone = build_backbone(mc.backbone, mc.init)
    preprocess = preprocess_mode(mc.backbone, mc.init)
    rf = receptive_field(backbone, output_layer_name(backbone, 0))
    w, b = fit_projection(mc.local_projection, backbone, preprocess, mc.local_dim)
    gem = make_gem(mc.gem_p, False)
    served = export_backbone(backbone, mc)
    heads = _zero_training_heads(served, w, b, gem)
    global_dim = int(backbone.outputs[1].shape[-1])
    meta = {
        "kind": "zero-training",
        "config_hash": model_settings_fingerprint(cfg),
        **path_fingerprints(
            served,
            [],
            [w, b],
            preprocess=preprocess,
            global_graph={"gem_p": mc.gem_p, "global_dim": global_dim},
            local_graph=local_graph(rf, mc, "L2 norm", output_layer_name(backbone, 0)),
        ),
        "backbone": mc.backbone,
        "init": mc.init,
        "local_layer": output_layer_name(backbone, 0),
        "local_projection": mc.local_projection,
        "keypoint_score": "L2 norm of local activations",
        "global": f"GeM(p={mc.gem_p}) of last map",
        "fold_batchnorm": bool(mc.fold_batchnorm),
    }
    out = save_serving(
        heads,
        "heads",
        rf,
        preprocess,
        out_dir,
        local_dim=mc.local_dim,
        global_dim=global_dim,
        default_thres=mc.default_abs_thres,
        meta=meta,
    )
    log.info("zero-training model (%s, %s) -> %s in %.1fs", mc.backbone, mc.local_projection, out, time.time() - t0)
    return out


def export_trained(net, cfg, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Export a trained :func:`landmarks.delg.model.build_delg` network (attention scores, autoencoder locals)."""
    from landmarks.utils.tfquiet import tf

    mc = cfg.model
    layer = output_layer_name(net.backbone, 0)
    rf = receptive_field(net.backbone, layer)
    preprocess = preprocess_mode(mc.backbone, mc.init)
    served = export_backbone(net.backbone, mc)

    class TrainedHeads(tf.Module):
        """The trained heads of `net` on the served (folded) backbone."""

        def __init__(self):
            super().__init__(name="trained_heads")
            self.backbone = served
            self.parts = [net.gem, net.whiten, net.encoder, net.decoder, net.att_conv1, net.att_bn, net.att_conv2]

        def heads(self, x):
            local, top = self.backbone(x, training=False)
            desc, _, att = net.local_heads(local, training=False)
            return desc, att[..., 0], net.whiten(net.gem(top))

    local_parts = [net.encoder, net.decoder, net.att_conv1, net.att_bn, net.att_conv2]
    info = {
        "kind": "trained",
        "backbone": mc.backbone,
        "init": mc.init,
        "local_layer": layer,
        "keypoint_score": "attention",
        "fold_batchnorm": bool(mc.fold_batchnorm),
        **path_fingerprints(
            served,
            [net.gem, net.whiten],
            local_parts,
            preprocess=preprocess,
            global_graph={"gem_p": mc.gem_p, "global_dim": mc.global_dim, "head": "trained"},
            local_graph=local_graph(rf, mc, "attention", layer),
        ),
        **(meta or {}),
    }
    return save_serving(
        TrainedHeads(),
        "heads",
        rf,
        preprocess,
        out_dir,
        local_dim=mc.local_dim,
        global_dim=mc.global_dim,
        default_thres=mc.default_abs_thres,
        meta=info,
    )


# ------------------------------------------------------------------------------------- CLI


def stale_reason(cfg, out: str | Path) -> str | None:
    """None when `out` holds the zero-training model today's settings build; else why not."""
    if not (Path(out) / "saved_model.pb").exists():
        return "does not exist"
    try:
        meta = read_model_meta(out)
    except (OSError, ValueError):
        meta = None
    if meta is None or meta.get("kind") != "zero-training":
        return "is not a zero-training model built here (no landmarks_model.json of kind zero-training)"
    if meta.get("config_hash") != model_settings_fingerprint(cfg):
        return "was built with other model settings or an older export format"
    return None


def ensure_default_model(cfg, out: str | Path, force: bool = False, check: bool = False) -> Path:
    """The zero-training model at `out`, built unless it is there already with today's model
    settings hash (the model stage of the graph and `landmarks model build`).  A model built
    otherwise is rebuilt (logged), or with `check` refused in one line: never used silently."""
    out = Path(out)
    stale = stale_reason(cfg, out)
    if stale is None and not force:
        log.info("model: %s is up to date (use --force to rebuild)", out)
        return out
    if stale is not None and (out / "saved_model.pb").exists():
        if check:
            raise LandmarksError(f"{out} {stale}: rebuild it with `landmarks model build --out {out}` (make model)")
        log.info("model: %s %s: rebuilding it", out, stale)

    configure_tensorflow()
    build_default_model(cfg, out)
    log.info("model: built -> %s", out)
    return out


def _cmd_model_build(args, cfg) -> int:
    for key in ("backbone", "init", "local_projection"):
        v = getattr(args, key, None)
        if v:
            setattr(cfg.model, key, v)
    print(ensure_default_model(cfg, args.out, force=args.force, check=args.check))
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser("model", parents=common(), help="build the zero-training DELG model (official signature)")
    p.add_argument("action", choices=["build"])
    p.add_argument("--out", default="models/default", help="SavedModel output directory")
    p.add_argument(
        "--backbone",
        default=None,
        help="override model.backbone (efficientnet_lite0|efficientnet_lite1|efficientnet_lite2|resnet50|resnet101|tiny)",
    )
    p.add_argument("--init", default=None, choices=["imagenet", "random"], help="override model.init")
    p.add_argument(
        "--local-projection",
        dest="local_projection",
        default=None,
        choices=PROJECTIONS,
        help="override model.local_projection",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    p.add_argument(
        "--check", action="store_true", help="refuse (one line, exit 1) instead of rebuilding an OUT built otherwise"
    )
    p.set_defaults(func=_cmd_model_build)
