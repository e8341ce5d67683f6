"""Load any DELG SavedModel (ours or Google's) and turn its raw outputs into features.

Two export generations exist:
- TF2 exports: ``loaded.signatures['serving_default']`` takes the inputs by name;
- TF1-era exports (the Kaggle DELG models): the graph is pruned from tensor names
  ``input_image:0`` ... to ``global_descriptors:0``, ``boxes:0``, ``features:0`` ...

Post-processing follows the reference: each scale's global row is L2-normalised, the rows
are summed and L2-normalised again; a local keypoint is its box centre (x, y), descriptors
are L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from landmarks.store import LocalFeatures
from landmarks.utils import LandmarksError, l2_normalize
from landmarks.utils.cache import MODEL_META

INPUT_NAMES = ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres", "input_global_scales_ind")
OUTPUT_NAMES = ("boxes", "features", "scales", "scores", "global_descriptors")
META_FILE = MODEL_META  # our exports' settings and fingerprints, beside saved_model.pb (landmarks.utils.cache)


def serving_input_signature() -> list:
    """TensorSpecs of the official DELG inputs, in signature order (for exports and test models)."""
    from landmarks.utils.tfquiet import tf

    shapes = ([None, None, 3], [None], [], [], [None])
    dtypes = (tf.uint8, tf.float32, tf.int32, tf.float32, tf.int32)
    return [tf.TensorSpec(sh, dt, name=n) for sh, dt, n in zip(shapes, dtypes, INPUT_NAMES)]


@dataclass
class DelgModel:
    """A loaded DELG model: call it with the five official inputs, get the five outputs."""

    path: str
    kind: str  # "tf2-signature" | "tf1-prune"
    _fn: Callable
    _keep: object  # the loaded SavedModel, kept alive

    def __call__(
        self, image: np.ndarray, scales, max_feature_num: int, abs_thres: float, global_scales_ind
    ) -> dict[str, np.ndarray]:
        from landmarks.utils.tfquiet import tf

        feeds = (
            tf.constant(image, tf.uint8),
            tf.constant(np.asarray(scales, np.float32)),
            tf.constant(int(max_feature_num), tf.int32),
            tf.constant(float(abs_thres), tf.float32),
            tf.constant(np.asarray(global_scales_ind, np.int32)),
        )
        out = self._fn(*feeds)
        return {k: np.asarray(v) for k, v in out.items()}


def check_saved_model(model_dir: str | Path) -> Path:
    """`model_dir` as a Path; a one-line LandmarksError when it holds no saved_model.pb."""
    model_dir = Path(model_dir)
    if not (model_dir / "saved_model.pb").exists():
        raise LandmarksError(
            f"{model_dir} is not a SavedModel (no saved_model.pb): run `make model` "
            "or pass MODEL=<DELG SavedModel dir> (--model on the command line)"
        )
    return model_dir


def damage(model_dir: Path, e: BaseException) -> str:
    """What is wrong with a SavedModel that TensorFlow failed to load, in words, on one line."""
    try:
        return _damage(model_dir, e)
    except OSError:  # the files changed or vanished while we looked
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _damage(model_dir: Path, e: BaseException) -> str:
    pb, var = model_dir / "saved_model.pb", model_dir / "variables"
    index, data = var / "variables.index", sorted(var.glob("variables.data-*"))
    msg = " ".join(str(e).split())
    first = msg.split(" [[")[0].split(". ")[0][:200] or type(e).__name__
    if pb.stat().st_size == 0:
        return "saved_model.pb is empty"
    if not index.exists() or not data:
        return f"{'variables/variables.index' if not index.exists() else 'variables/variables.data-*'} is missing"
    empty = [p.name for p in data + [index] if p.stat().st_size == 0]
    if empty:
        return f"variables/{empty[0]} is empty"
    if "Read less bytes" in msg or "truncated" in msg.lower():
        return f"variables/{data[0].name if len(data) == 1 else 'variables.data-*'} is truncated ({first})"
    if type(e).__name__ == "DecodeError" or ("saved_model.pb" in msg and "parse" in msg.lower()):
        return f"saved_model.pb is damaged ({msg.rsplit(': ', 1)[-1][:120]})"
    if "sstable" in msg or "checksum" in msg.lower() or "corrupt" in msg.lower():
        return f"variables/variables.index is damaged ({first})"
    return f"{type(e).__name__}: {first} (damaged or incomplete files? rebuild it: make model)"


def read_model_meta(model_dir: str | Path) -> dict | None:
    """The metadata our exports write beside the SavedModel (META_FILE), or None when
    `model_dir` holds no complete export of ours (no saved_model.pb or no metadata file)."""
    import json

    model_dir = Path(model_dir)
    meta = model_dir / META_FILE
    if not (model_dir / "saved_model.pb").exists() or not meta.exists():
        return None
    try:
        out = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise LandmarksError(f"model {model_dir}: {META_FILE} is damaged ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(out, dict):
        raise LandmarksError(f"model {model_dir}: {META_FILE} is damaged (not a JSON object)")
    return out


def load_delg(model_dir: str | Path) -> DelgModel:
    """Load a DELG SavedModel of either generation; clear error when it is not one."""
    from landmarks.utils.tfquiet import tf

    model_dir = check_saved_model(model_dir)
    try:
        loaded = tf.saved_model.load(str(model_dir))
    except Exception as e:  # noqa: BLE001 - TF raises IndexError, OpError, DecodeError, ... for damaged files
        raise LandmarksError(f"model {model_dir} cannot be loaded: {damage(model_dir, e)}") from None
    sig = getattr(loaded, "signatures", {}).get("serving_default")
    if sig is not None:
        _, kwargs = sig.structured_input_signature
        if set(INPUT_NAMES) <= set(kwargs):

            def fn(*feeds):
                out = sig(**dict(zip(INPUT_NAMES, feeds)))
                missing = [k for k in OUTPUT_NAMES if k not in out]
                if missing:
                    raise LandmarksError(f"{model_dir}: signature lacks outputs {missing}")
                return {k: out[k] for k in OUTPUT_NAMES}

            return DelgModel(str(model_dir), "tf2-signature", fn, loaded)
    if hasattr(loaded, "prune"):
        try:
            pruned = loaded.prune([f"{n}:0" for n in INPUT_NAMES], [f"{n}:0" for n in OUTPUT_NAMES])
        except (KeyError, ValueError) as e:
            raise LandmarksError(f"{model_dir}: TF1 graph lacks the DELG tensor names ({e})") from None

        def fn(*feeds):
            return dict(zip(OUTPUT_NAMES, pruned(*feeds)))

        return DelgModel(str(model_dir), "tf1-prune", fn, loaded)
    raise LandmarksError(
        f"{model_dir}: neither a 'serving_default' signature with the DELG inputs "
        f"{list(INPUT_NAMES)} nor a TF1 graph to prune"
    )


def pool_global(per_scale: np.ndarray) -> np.ndarray:
    """Per-scale global descriptors [S, D] -> one unit vector [D]: the sum of the unit rows, normalised.

    The one pooling rule: the features stage (through `postprocess`) and the hard protocol's probe,
    which keeps every scale and pools a setting's subset later, both call it."""
    g = np.asarray(per_scale, np.float32)
    return l2_normalize(l2_normalize(g.reshape(-1, g.shape[-1])).sum(axis=0))


def postprocess(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, LocalFeatures]:
    """Raw DELG outputs -> (global [D] unit vector, LocalFeatures with (x, y) keypoints)."""
    return pool_global(outputs["global_descriptors"]), local_features(outputs)


def local_features(outputs: dict[str, np.ndarray]) -> LocalFeatures:
    """The local part of raw DELG outputs: LocalFeatures with (x, y) keypoints and unit descriptors."""
    boxes = np.asarray(outputs["boxes"], np.float32).reshape(-1, 4)
    yx = (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0
    keypoints = yx[:, ::-1].copy()  # (x, y)
    desc = np.asarray(outputs["features"], np.float32)
    desc = (
        l2_normalize(desc.reshape(boxes.shape[0], -1))
        if boxes.shape[0]
        else desc.reshape(0, desc.shape[-1] if desc.ndim == 2 else 128)
    )
    return LocalFeatures(
        keypoints=keypoints,
        descriptors=desc,
        scales=np.asarray(outputs["scales"], np.float32).reshape(-1),
        scores=np.asarray(outputs["scores"], np.float32).reshape(-1),
    )
