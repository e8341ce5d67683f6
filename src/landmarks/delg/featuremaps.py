"""Multi-layer feature maps of the ImageNet Lite0 backbone, for Neural Best-Buddies matching.

NBB (Aberman et al., SIGGRAPH 2018) matches two images through the feature hierarchy of a
fixed ImageNet classifier (their VGG-19): mutual nearest neighbours on a deep map, refined
through shallower maps inside each match's region.  Here the classifier is the same offline
ImageNet EfficientNet-Lite0 that the default DELG model is built on (``pth_weights``); it is
used as is (no head, no fine-tuning), as the paper uses VGG-19, so the maps do not depend on
the DELG model given to the pipeline (a fine-tuned model keeps the ImageNet maps here).

:func:`map_model` builds image -> [map of each layer] (deep first); :func:`feature_maps` runs
one image at a fixed long side and returns float16 maps plus each layer's cell geometry, so a
cell (row i, column j) of layer l is centred at ``(j * stride - padding + (size - 1) / 2,
i * stride - ...)`` in the resized image (``model.receptive_field``).
"""

from __future__ import annotations

import functools

import numpy as np

from landmarks.delg.model import build_backbone, normalize_pixels, receptive_field
from landmarks.delg.pth_weights import lite0_weights_path
from landmarks.store import FeatureMaps
from landmarks.utils import LandmarksError, cache, file_digest

# Lite0 block outputs usable as NBB levels (stride in input pixels, channels): the deep ones are
# more invariant to appearance, the shallow ones localise better.
NBB_LAYERS = {
    "top_activation": (32, 1280),
    "block15_project_bn": (32, 320),
    "block14_add": (32, 192),
    "block12_add": (32, 192),
    "block10_add": (16, 112),
    "block7_add": (16, 80),
    "block4_add": (8, 40),
    "block2_add": (4, 24),
}
MAPS_VERSION = 1


def check_layers(layers) -> list[str]:
    """The NBB layers, checked: known Lite0 outputs, strides non-increasing (deep first)."""
    layers = [str(x) for x in layers]
    bad = [x for x in layers if x not in NBB_LAYERS]
    if bad or len(layers) < 1:
        raise LandmarksError(f"verify.nbb_layers: unknown layer {bad[:1]} (choose from {', '.join(NBB_LAYERS)})")
    strides = [NBB_LAYERS[x][0] for x in layers]
    if any(b > a for a, b in zip(strides, strides[1:])):
        raise LandmarksError(f"verify.nbb_layers must go from deep to shallow (strides {strides})")
    return layers


@functools.lru_cache(maxsize=1)
def _weights_digest() -> str:
    return file_digest(lite0_weights_path())


def maps_fingerprint(vcfg) -> str:
    """What stored maps depend on: the ImageNet weights file, the layers and the image size."""
    return cache.digest(
        f"nbb-maps-v{MAPS_VERSION}",
        _weights_digest(),
        ",".join(check_layers(vcfg.nbb_layers)),
        str(int(vcfg.nbb_image_size)),
    )[:12]


_MODELS: dict = {}


def map_model(layers):
    """(keras model image -> maps of `layers`, [(stride, offset)] per layer); cached per process."""
    key = tuple(check_layers(layers))
    if key not in _MODELS:
        from landmarks.utils.tfquiet import keras

        base = build_backbone("efficientnet_lite0", "imagenet")
        full = keras.Model(base.input, base.get_layer("top_activation").output)
        outs = [full.get_layer(x).output for x in key]
        model = keras.Model(full.input, outs)
        geo = []
        for x in key:
            rf = receptive_field(full, x)
            geo.append((float(rf.stride), float((rf.size - 1) / 2.0 - rf.padding)))
        _MODELS[key] = (model, geo)
    return _MODELS[key]


def feature_maps(model_geo, image: np.ndarray, size: int, scale: float = 1.0) -> FeatureMaps:
    """NBB maps of one uint8 RGB image resized to long side `size` (`scale`: the image's own resize
    factor from decoding, so centres land in original pixels)."""
    from landmarks.utils.tfquiet import tf

    model, geo = model_geo
    h, w = image.shape[:2]
    r = float(size) / max(h, w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    x = tf.image.resize(tf.constant(image[None], tf.float32), (nh, nw), method="bilinear")
    outs = model(normalize_pixels(x, "tf127"), training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    maps = [np.asarray(o[0], np.float32).astype(np.float16) for o in outs]
    # the resize is (nh / h, nw / w) per axis; both are r up to rounding
    return FeatureMaps(
        maps,
        np.array([g[0] for g in geo], np.float64),
        np.array([g[1] for g in geo], np.float64),
        float(scale) * (nw / w + nh / h) / 2.0,
        (round(h / float(scale)), round(w / float(scale))),
    )
