"""Fine-tune DELG on a Kaggle-layout train split and export it in the official signature.

`landmarks train --data-dir D --work-dir W --out models/trained`.  Reference recipe (DELG
paper, GLDv2 on GPUs): SGD momentum 0.9, lr 0.01 decaying linearly to 0, batch 32, crop 321,
global-norm gradient clipping 10, loss = ArcFace + 1.0 * attention CE + 10 * reconstruction
MSE, ~1.5M steps for R50.  Here (CPU, small data) the defaults are batch 16, crop 224, 300
steps from the offline ImageNet Lite0 backbone, backbone frozen (``train.freeze_backbone``) and
FC whitening initialised to identity (``model.whiten_init``), so fine-tuning starts from the
zero-training descriptor.  Measured on the shared-data holdout (228 train images, 11 classes,
60 steps, global-only 1-NN GAP at 512 px): zero-training 0.986; frozen 0.989 (~0.9 s/step on
2 busy cores); whole network 0.971 (~3.4 s/step) -- too little data to move the backbone.
On a GPU with GLDv2 pass e.g. ``--set train.freeze_backbone=false --set train.batch_size=32
--set train.crop_size=321 --set train.steps=100000 --set train.mixed_precision=true
--set model.backbone=resnet50 --set model.global_dim=2048``.

Input: tf.data over the split's images (decoded by ``images.load_image`` like extraction, so
EXIF orientation is applied; random resized crop, horizontal flip, colour jitter); ``train.class_balanced`` samples labels uniformly then images within a label (GLDv2 is
long-tailed).  The sample order is a seeded function of the step, so a resumed run sees the
same batches.  Checkpoints (weights + optimizer state + history) go to ``W/train/`` every
``train.checkpoint_every`` steps; a rerun resumes from the last one (if model/train config and
labels are unchanged).  ``W/train/curves.png`` plots loss and accuracy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from landmarks.datasets.data import load_split
from landmarks.datasets.images import load_image
from landmarks.delg.delg_io import read_model_meta
from landmarks.delg.export import export_trained
from landmarks.delg.model import build_delg, normalize_pixels, preprocess_mode
from landmarks.utils import LandmarksError, atomic_path, cache, configure_tensorflow

log = logging.getLogger(__name__)


def load_labelled_split(data_dir: str | Path) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """The train split (id, path, landmark_id), its sorted landmark ids as strings and each row's
    class index; one-line errors for an empty split, missing images or fewer than 2 classes."""

    df = load_split(data_dir, "train")
    if df.empty:
        raise LandmarksError(f"{data_dir}: the train split is empty")
    missing = [p for p in df["path"] if not Path(p).exists()]
    if missing:
        raise LandmarksError(f"{len(missing)} of {len(df)} train images are missing (first: {missing[0]})")
    classes = sorted(df["landmark_id"].astype(str).unique())
    if len(classes) < 2:
        raise LandmarksError("training needs at least 2 landmark ids in train.csv")
    cls_index = {c: i for i, c in enumerate(classes)}
    labels = df["landmark_id"].astype(str).map(cls_index).to_numpy(np.int32)
    return df, classes, labels


def decode_train_image(path: str | bytes) -> np.ndarray:
    """uint8 [H, W, 3] of a train image at full resolution, decoded exactly as extraction decodes
    it (``images.load_image``: Pillow, EXIF orientation applied, alpha on white), so training and
    extraction see the same upright pixels."""

    if isinstance(path, np.ndarray):  # tf.numpy_function called eagerly passes a 0-d array
        path = path.item()
    image, _ = load_image(os.fsdecode(path), max_image_size=0)
    return image


def read_train_image(path):
    """TF op of `decode_train_image` for tf.data: string tensor path -> uint8 [H, W, 3]."""
    from landmarks.utils.tfquiet import tf

    img = tf.numpy_function(decode_train_image, [path], tf.uint8, stateful=False)
    img.set_shape([None, None, 3])
    return img


def sample_indices(labels: np.ndarray, n: int, seed: int, class_balanced: bool) -> np.ndarray:
    """`n` seeded sample indices: uniform over images, or uniform over labels then images."""
    rng = np.random.default_rng(seed)
    if not class_balanced:
        return rng.integers(0, len(labels), n)
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    p = 1.0 / counts[inv]
    return rng.choice(len(labels), size=n, p=p / p.sum())


def make_dataset(paths: np.ndarray, labels: np.ndarray, indices: np.ndarray, tc, offset: int = 0):
    """tf.data pipeline of augmented (image float [crop,crop,3] in 0..255, label) batches.

    Sample k's augmentation is seeded by (offset + k, train.seed), so a resumed run (offset =
    samples already seen) draws exactly the crops an uninterrupted run would have.
    """
    from landmarks.utils.tfquiet import tf

    crop = int(tc.crop_size)
    seed = int(tc.seed)

    def load(i, step_seed):
        """Sample k: decode, seeded random resized crop, flip and colour jitter; (image, label)."""
        img = read_train_image(tf.gather(paths, i))
        s = tf.stack([tf.cast(step_seed, tf.int32), tf.constant(seed, tf.int32)])
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(img),
            bounding_boxes=tf.zeros([1, 0, 4]),
            seed=s,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.25, 1.0),
            max_attempts=20,
            use_image_if_no_bounding_boxes=True,
        )
        img = tf.slice(img, begin, size)
        img = tf.image.resize(tf.cast(img, tf.float32), (crop, crop))
        img = tf.image.stateless_random_flip_left_right(img, s + 1)
        img = tf.image.stateless_random_brightness(img, 0.2 * 255.0, s + 2)
        img = tf.image.stateless_random_contrast(img, 0.8, 1.2, s + 3)
        img = tf.image.stateless_random_saturation(img, 0.8, 1.2, s + 4)
        return tf.clip_by_value(img, 0.0, 255.0), tf.gather(labels, i)

    paths = tf.constant(paths)
    labels = tf.constant(labels, tf.int32)
    seeds = np.arange(offset, offset + len(indices), dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((indices.astype(np.int64), seeds))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(int(tc.batch_size), drop_remainder=True).prefetch(2)


class Curves(NamedTuple):
    """What `plot_curves` draws: loss columns (left, rolling mean of 5) and score columns (right)."""

    losses: tuple[str, ...]
    scores: tuple[str, ...]
    scores_title: str
    log_loss: bool = False  # log scale for the losses
    smooth_scores: bool = False  # rolling mean of 5 for the scores too


TRAIN_CURVES = Curves(
    ("loss", "arcface", "attention", "reconstruction"),
    ("accuracy", "attention_accuracy"),
    "batch accuracy",
    log_loss=True,
    smooth_scores=True,
)


def plot_curves(history: list[dict], path: Path, curves: Curves) -> None:
    """PNG (written atomically) of a training history: losses left, scores right; nothing when
    the history is empty.  Columns missing from the history are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for col in curves.losses:
        if col in h:
            axes[0].plot(h["step"], h[col].rolling(5, min_periods=1).mean(), label=col)
    if curves.log_loss:
        axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss (rolling mean of 5)")
    axes[0].legend()
    for col in curves.scores:
        if col in h:
            axes[1].plot(
                h["step"], h[col].rolling(5, min_periods=1).mean() if curves.smooth_scores else h[col], label=col
            )
    axes[1].set_xlabel("step")
    axes[1].set_title(curves.scores_title)
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


class Checkpointer:
    """Weights (.weights.h5) + optimizer variables (.npz) + state.json in WORK/train/."""

    def __init__(self, train_dir: Path, fingerprint: str):
        self.dir = train_dir
        self.state_path = train_dir / "state.json"
        self.fingerprint = fingerprint

    def clear(self) -> None:
        """Forget every checkpoint (--restart)."""
        for p in list(self.dir.glob("ckpt-*")) + [self.state_path]:
            if p.exists():
                p.unlink()

    def load_state(self) -> dict | None:
        """The saved state (step, history, file names), None when there is none; an error when it
        belongs to another model/train config or label set."""
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise LandmarksError(
                f"{self.state_path} belongs to a different model/train config or label set; "
                "pass --restart to start over (or use another --work-dir)"
            )
        return state

    def save(self, net, optimizer, state: dict) -> None:
        """Write weights, optimizer variables and `state` (the step's checkpoint), then drop older ones."""
        step = state["step"]
        w = self.dir / f"ckpt-{step}.weights.h5"
        o = self.dir / f"ckpt-{step}.opt.npz"
        tmp_w = self.dir / f".tmp-{os.getpid()}.weights.h5"
        net.save_weights(str(tmp_w))
        os.replace(tmp_w, w)
        with atomic_path(o) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, *[np.asarray(v) for v in optimizer.variables])
        state = {**state, "weights": w.name, "optimizer": o.name, "fingerprint": self.fingerprint}
        with atomic_path(self.state_path) as tmp:
            tmp.write_text(json.dumps(state))
        for p in self.dir.glob("ckpt-*"):
            if p.name not in (w.name, o.name):
                p.unlink()

    def resume(self, net, optimizer) -> tuple[int, list, list]:
        """Restore the last checkpoint if there is one: (step, history, steps resumed from)."""
        state = self.load_state()
        if state is None:
            return 0, [], []
        self.restore(net, optimizer, state)
        step = int(state["step"])
        log.info("resuming from step %d (%s)", step, self.dir)
        return step, state.get("history", []), state.get("resumed_from", []) + [step]

    def restore(self, net, optimizer, state: dict) -> None:
        """Load the weights and optimizer variables of the checkpoint `state` names."""
        net.load_weights(str(self.dir / state["weights"]))
        data = np.load(self.dir / state["optimizer"])
        values = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(values) != len(optimizer.variables):
            raise LandmarksError("checkpoint optimizer state does not match this model; pass --restart")
        for var, val in zip(optimizer.variables, values):
            var.assign(val)


def train(
    cfg,
    data_dir: str | Path,
    work_dir: str | Path,
    out_dir: str | Path,
    *,
    restart: bool = False,
    stop_after: int | None = None,
) -> Path | None:
    """Train DELG on DATA's train split, checkpointing in WORK/train; export to OUT when done.

    `stop_after` ends this run after that many total steps without exporting (used to test
    resuming); returns the export path, or None when stopped early.
    """

    tc = cfg.train
    df, classes, labels = load_labelled_split(data_dir)
    train_dir = Path(work_dir) / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    fp = cache.fingerprint("train", cfg, [",".join(classes), str(len(df))], sections=("model", "train"))
    ck = Checkpointer(train_dir, fp)
    if restart:
        ck.clear()
    with atomic_path(train_dir / "labels.json") as tmp:
        tmp.write_text(json.dumps(classes))

    net, optimizer = _build_model(cfg, len(classes))
    step, history, resumed = ck.resume(net, optimizer)
    end = tc.steps if stop_after is None else min(tc.steps, int(stop_after))
    if step < end:
        paths = df["path"].astype(str).to_numpy()
        state = {"resumed_from": resumed, "num_classes": len(classes), "images": len(df)}
        step = _run_steps(cfg, net, optimizer, ck, paths, labels, step, end, history, state)
    if step < tc.steps:
        return None
    old = read_model_meta(out_dir)
    if old is not None and old.get("fingerprint") == fp and old.get("steps") == step:
        log.info("%s is up to date (trained %d steps)", out_dir, step)
        return Path(out_dir)
    meta = {
        "fingerprint": fp,
        "num_classes": len(classes),
        "steps": step,
        "train_images": len(df),
        "data_dir": str(data_dir),
    }
    return export_trained(net, cfg, out_dir, meta=meta)


def _build_model(cfg, num_classes: int):
    """DELG with its variables created (seeded, backbone frozen if asked) and its SGD optimizer
    (linear decay, gradient clipping; loss scaling under mixed precision on a GPU)."""
    from landmarks.utils.tfquiet import keras, tf

    tc = cfg.train
    gpus = tf.config.list_physical_devices("GPU")
    if tc.mixed_precision:
        if gpus:
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            log.warning("train.mixed_precision ignored: no GPU")
    keras.utils.set_random_seed(tc.seed)

    net = build_delg(cfg.model, num_classes)
    if tc.freeze_backbone:
        net.backbone.trainable = False
    crop = int(tc.crop_size)
    net(tf.zeros([1, crop, crop, 3]), training=False, labels=tf.zeros([1], tf.int32))
    schedule = keras.optimizers.schedules.PolynomialDecay(tc.learning_rate, tc.steps, end_learning_rate=0.0, power=1.0)
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule, momentum=tc.momentum, global_clipnorm=tc.clip_norm if tc.clip_norm > 0 else None
    )
    if tc.mixed_precision and gpus:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(net.trainable_variables)
    return net, optimizer


def _make_train_step(cfg, net, optimizer):
    """The compiled step: DELG's loss (ArcFace + weighted attention CE + weighted reconstruction
    MSE), one optimizer update; returns the losses and batch accuracies."""
    from landmarks.utils.tfquiet import tf

    mode = preprocess_mode(cfg.model.backbone, cfg.model.init)
    w_att, w_rec = float(cfg.train.attention_loss_weight), float(cfg.train.reconstruction_loss_weight)

    def accuracy(logits, y):
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32))

    @tf.function
    def train_step(x, y):
        x = normalize_pixels(x, mode)
        with tf.GradientTape() as tape:
            out = net(x, training=True, labels=y)
            arc = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(out["logits"], tf.float32))
            )
            att = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=tf.cast(out["att_logits"], tf.float32))
            )
            rec = tf.cast(out["recon_mse"], tf.float32)
            loss = arc + w_att * att + w_rec * rec
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        grads = tape.gradient(scaled, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return {
            "loss": loss,
            "arcface": arc,
            "attention": att,
            "reconstruction": rec,
            "accuracy": accuracy(out["logits"], y),
            "attention_accuracy": accuracy(out["att_logits"], y),
        }

    return train_step


def _run_steps(
    cfg,
    net,
    optimizer,
    ck: Checkpointer,
    paths: np.ndarray,
    labels: np.ndarray,
    step: int,
    end: int,
    history: list,
    state: dict,
) -> int:
    """Train from `step` to `end` on the seeded sample order, appending to `history`; checkpoint
    (with `state`) and plot every train.checkpoint_every steps and at `end`.  Returns `end`."""
    from tqdm import tqdm

    tc = cfg.train
    train_step = _make_train_step(cfg, net, optimizer)
    idx = sample_indices(labels, tc.steps * tc.batch_size, tc.seed, tc.class_balanced)
    idx = idx[step * tc.batch_size : end * tc.batch_size]
    ds = make_dataset(paths, labels, idx, tc, offset=step * tc.batch_size)
    t0 = time.time()
    bar = tqdm(total=end - step, desc="train", unit="step", disable=None)
    for x, y in ds:
        m = {k: float(v) for k, v in train_step(x, y).items()}
        if not np.isfinite(m["loss"]):
            raise LandmarksError(f"training diverged at step {step + 1} (loss {m['loss']}); lower train.learning_rate")
        step += 1
        history.append({"step": step, **m})
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
        if step % max(1, tc.checkpoint_every) == 0 or step == end:
            ck.save(net, optimizer, {"step": step, "history": history, **state})
            plot_curves(history, ck.dir / "curves.png", TRAIN_CURVES)
    bar.close()
    log.info("trained %d steps in %.1fs", len(idx) // tc.batch_size, time.time() - t0)
    return step


def _cmd_train(args, cfg) -> int:

    configure_tensorflow()
    if args.steps is not None:
        cfg.train.steps = args.steps
    out = train(cfg, args.data_dir, args.work_dir, args.out, restart=args.restart)
    print(out)
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "train", parents=common("data_dir", "work_dir"), help="fine-tune DELG and export it (official signature)"
    )
    p.add_argument("--out", default="models/trained", help="exported SavedModel directory")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in WORK_DIR/train")
    p.set_defaults(func=_cmd_train)
