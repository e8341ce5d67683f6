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

Input: tf.data over the split's images (decode, random resized crop, horizontal flip, colour
jitter); ``train.class_balanced`` samples labels uniformly then images within a label (GLDv2 is
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

import numpy as np
import pandas as pd

from landmarks.utils import LandmarksError, atomic_path, text_digest

log = logging.getLogger("landmarks.train")


def load_train_split(data_dir: str | Path) -> pd.DataFrame:
    """DataFrame[id, path, landmark_id] of the train split (landmarks.data, or a small fallback)."""
    try:
        from landmarks.data import load_split
    except ImportError:  # fallback while data.py is absent
        load_split = None
    if load_split is not None:
        return load_split(data_dir, "train")
    data_dir = Path(data_dir)
    csv = data_dir / "train.csv"
    if not csv.exists():
        raise LandmarksError(f"{csv} not found: {data_dir} is not a Kaggle-layout dataset")
    df = pd.read_csv(csv, dtype={"id": str})
    df["path"] = [str(data_dir / "train" / i[0] / i[1] / i[2] / f"{i}.jpg") for i in df["id"]]
    return df[["id", "path", "landmark_id"]]


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
    from landmarks.tfquiet import tf

    crop = int(tc.crop_size)
    seed = int(tc.seed)

    def load(i, step_seed):
        raw = tf.io.read_file(tf.gather(paths, i))
        img = tf.io.decode_image(raw, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        s = tf.stack([tf.cast(step_seed, tf.int32), tf.constant(seed, tf.int32)])
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(img), bounding_boxes=tf.zeros([1, 0, 4]), seed=s, min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.25, 1.0), max_attempts=20,
            use_image_if_no_bounding_boxes=True)
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


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for col in ("loss", "arcface", "attention", "reconstruction"):
        if col in h:
            axes[0].plot(h["step"], h[col].rolling(5, min_periods=1).mean(), label=col)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("loss (rolling mean of 5)")
    axes[0].legend()
    for col in ("accuracy", "attention_accuracy"):
        if col in h:
            axes[1].plot(h["step"], h[col].rolling(5, min_periods=1).mean(), label=col)
    axes[1].set_xlabel("step")
    axes[1].set_title("batch accuracy")
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


class _Checkpointer:
    """Weights (.weights.h5) + optimizer variables (.npz) + state.json in WORK/train/."""

    def __init__(self, train_dir: Path, fingerprint: str):
        self.dir = train_dir
        self.state_path = train_dir / "state.json"
        self.fingerprint = fingerprint

    def load_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        state = json.loads(self.state_path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise LandmarksError(f"{self.state_path} belongs to a different model/train config or label set; "
                                 "pass --restart to start over (or use another --work-dir)")
        return state

    def save(self, net, optimizer, state: dict) -> None:
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
        net.load_weights(str(self.dir / state["weights"]))
        data = np.load(self.dir / state["optimizer"])
        values = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(values) != len(optimizer.variables):
            raise LandmarksError("checkpoint optimizer state does not match this model; pass --restart")
        for var, val in zip(optimizer.variables, values):
            var.assign(val)


def train(cfg, data_dir: str | Path, work_dir: str | Path, out_dir: str | Path, *,
          restart: bool = False, stop_after: int | None = None) -> Path | None:
    """Train DELG on DATA's train split, checkpointing in WORK/train; export to OUT when done.

    `stop_after` ends this run after that many total steps without exporting (used to test
    resuming); returns the export path, or None when stopped early.
    """
    from tqdm import tqdm

    from landmarks.export import export_trained
    from landmarks.model import build_delg, normalize_pixels, preprocess_mode
    from landmarks.tfquiet import keras, tf

    tc, mc = cfg.train, cfg.model
    if tc.steps <= 0 or tc.batch_size <= 0 or tc.crop_size < 32:
        raise LandmarksError("train.steps and train.batch_size must be > 0 and train.crop_size >= 32")
    df = load_train_split(data_dir)
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
    paths = df["path"].astype(str).to_numpy()

    train_dir = Path(work_dir) / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    fp = text_digest(cfg.section_hash("model", "train"), ",".join(classes), str(len(df)))
    ck = _Checkpointer(train_dir, fp)
    if restart:
        for p in list(train_dir.glob("ckpt-*")) + [ck.state_path]:
            if p.exists():
                p.unlink()
    with atomic_path(train_dir / "labels.json") as tmp:
        tmp.write_text(json.dumps(classes))

    gpus = tf.config.list_physical_devices("GPU")
    if tc.mixed_precision:
        if gpus:
            keras.mixed_precision.set_global_policy("mixed_float16")
        else:
            log.warning("train.mixed_precision ignored: no GPU")
    keras.utils.set_random_seed(tc.seed)

    net = build_delg(mc, len(classes))
    if tc.freeze_backbone:
        net.backbone.trainable = False
    crop = int(tc.crop_size)
    net(tf.zeros([1, crop, crop, 3]), training=False, labels=tf.zeros([1], tf.int32))
    schedule = keras.optimizers.schedules.PolynomialDecay(tc.learning_rate, tc.steps, end_learning_rate=0.0, power=1.0)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=tc.momentum,
                                     global_clipnorm=tc.clip_norm if tc.clip_norm > 0 else None)
    if tc.mixed_precision and gpus:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(net.trainable_variables)

    step, history, resumed = ck.resume(net, optimizer)
    mode = preprocess_mode(mc.backbone, mc.init)
    w_att, w_rec = float(tc.attention_loss_weight), float(tc.reconstruction_loss_weight)

    @tf.function
    def train_step(x, y):
        x = normalize_pixels(x, mode)
        with tf.GradientTape() as tape:
            out = net(x, training=True, labels=y)
            arc = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=tf.cast(out["logits"], tf.float32)))
            att = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=tf.cast(out["att_logits"], tf.float32)))
            rec = tf.cast(out["recon_mse"], tf.float32)
            loss = arc + w_att * att + w_rec * rec
            scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
        grads = tape.gradient(scaled, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out["logits"], -1, output_type=tf.int32), y), tf.float32))
        att_acc = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(out["att_logits"], -1, output_type=tf.int32), y),
                                         tf.float32))
        return {"loss": loss, "arcface": arc, "attention": att, "reconstruction": rec, "accuracy": acc,
                "attention_accuracy": att_acc}

    end = tc.steps if stop_after is None else min(tc.steps, int(stop_after))
    if step < end:
        idx = sample_indices(labels, tc.steps * tc.batch_size, tc.seed, tc.class_balanced)
        idx = idx[step * tc.batch_size:end * tc.batch_size]
        ds = make_dataset(paths, labels, idx, tc, offset=step * tc.batch_size)
        t0 = time.time()
        bar = tqdm(total=end - step, desc="train", unit="step", disable=None)
        for x, y in ds:
            m = {k: float(v) for k, v in train_step(x, y).items()}
            if not np.isfinite(m["loss"]):
                raise LandmarksError(f"training diverged at step {step + 1} (loss {m['loss']}); "
                                     "lower train.learning_rate")
            step += 1
            history.append({"step": step, **m})
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
            if step % max(1, tc.checkpoint_every) == 0 or step == end:
                ck.save(net, optimizer, {"step": step, "history": history, "resumed_from": resumed,
                                         "num_classes": len(classes), "images": len(df)})
                _plot(history, train_dir / "curves.png")
        bar.close()
        log.info("trained %d steps in %.1fs", len(idx) // tc.batch_size, time.time() - t0)
    if step < tc.steps:
        return None
    meta_path = Path(out_dir) / "landmarks_model.json"
    if meta_path.exists() and (Path(out_dir) / "saved_model.pb").exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") == fp and old.get("steps") == step:
            log.info("%s is up to date (trained %d steps)", out_dir, step)
            return Path(out_dir)
    meta = {"fingerprint": fp, "num_classes": len(classes), "steps": step, "train_images": len(df),
            "data_dir": str(data_dir)}
    return export_trained(net, cfg, out_dir, meta=meta)


def _cmd_train(args, cfg) -> int:
    from landmarks.utils import configure_tensorflow

    configure_tensorflow()
    if args.steps is not None:
        cfg.train.steps = args.steps
    out = train(cfg, args.data_dir, args.work_dir, args.out, restart=args.restart)
    print(out)
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser("train", parents=[common], help="fine-tune DELG and export it (official signature)")
    p.add_argument("--out", default="models/trained", help="exported SavedModel directory")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in WORK_DIR/train")
    p.set_defaults(func=_cmd_train)
