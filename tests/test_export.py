"""Export in the official DELG signature, the zero-training default model, and load_delg paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from landmarks.utils import LandmarksError


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    from landmarks.config import Config
    from landmarks.delg.export import build_default_model

    return build_default_model(Config(), tmp_path_factory.mktemp("m") / "default")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from landmarks.config import load_config
    from landmarks.delg.export import build_default_model

    cfg = load_config(None, ["model.backbone=tiny", "model.init=random", "model.local_projection=random_orthogonal"])
    return build_default_model(cfg, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def loaded(default_model):
    from landmarks.delg.delg_io import load_delg

    return load_delg(default_model)


def _resize(img, h, w):
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def test_exported_model_loads_in_a_fresh_process(tiny_model):
    """Fresh interpreter (nothing from this process cached); the small tiny-backbone export keeps it fast."""
    code = (
        "import json, sys, numpy as np\n"
        "from landmarks.delg.delg_io import load_delg\n"
        "m = load_delg(sys.argv[1])\n"
        "img = (np.arange(150*200*3) % 251).astype(np.uint8).reshape(150, 200, 3)\n"
        "o = m(img, [0.5, 1.0], 50, 0.0, [1])\n"
        "print(json.dumps({'kind': m.kind, **{k: [list(v.shape), str(v.dtype)] for k, v in o.items()}}))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kind"] == "tf2-signature"
    n = out["boxes"][0][0]
    assert 0 < n <= 50
    assert out["boxes"] == [[n, 4], "float32"]
    assert out["features"] == [[n, 128], "float32"]
    assert out["scales"] == [[n], "float32"] and out["scores"] == [[n, 1], "float32"]
    assert out["global_descriptors"] == [[1, 32], "float32"]
    meta = json.loads((tiny_model / "landmarks_model.json").read_text())
    assert meta["receptive_field"]["stride"] == 16 and meta["local_projection"] == "random_orthogonal"


def test_default_model_metadata(default_model):
    meta = json.loads((default_model / "landmarks_model.json").read_text())
    # the default backbone, EfficientNet-Lite2: its stride-16 local block (block14_add) sees 475 px
    assert meta["backbone"] == "efficientnet_lite2"
    assert meta["receptive_field"] == {"size": 475, "stride": 16, "padding": 222.0}
    assert meta["local_projection"] == "block10" and meta["preprocess"] == "tf127"
    assert meta["fold_batchnorm"] is True


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "resnet50"])
def test_fold_batchnorm_is_the_same_function_without_bn(name):
    """Folding removes every BN (Lite0: 49, ResNet50: 53, convs with and without bias, depthwise
    ones) and keeps outputs, their layer names and the receptive field; floats move ~1e-6 relative."""
    import tensorflow as tf

    from landmarks.delg.model import LITE0_LOCAL, build_backbone, fold_batchnorm, output_layer_name, receptive_field

    net = build_backbone(name, "random", **({"local_layer": LITE0_LOCAL} if name != "resnet50" else {}))
    rng = np.random.default_rng(0)
    for layer in net.layers:  # non-trivial BN statistics, as trained weights have
        if type(layer).__name__ == "BatchNormalization":
            c = layer.moving_mean.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 2, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c), rng.uniform(0.2, 3, c)]
            )
    folded = fold_batchnorm(net)
    kinds = lambda m: [type(layer).__name__ for layer in m.layers]  # noqa: E731
    assert "BatchNormalization" in kinds(net) and "BatchNormalization" not in kinds(folded)
    assert [output_layer_name(folded, i) for i in (0, 1)] == [output_layer_name(net, i) for i in (0, 1)]
    assert receptive_field(folded, output_layer_name(folded, 0)) == receptive_field(net, output_layer_name(net, 0))
    x = tf.random.uniform((1, 96, 128, 3), -1, 1, seed=1)
    for a, b in zip(net(x, training=False), folded(x, training=False)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def test_folded_and_unfolded_exports_agree(default_model, tmp_path):
    """model.fold_batchnorm=false exports the BN layers as they are; both give the same features."""
    from landmarks.config import load_config
    from landmarks.delg.delg_io import load_delg, postprocess
    from landmarks.delg.export import build_default_model

    plain = build_default_model(load_config(None, ["model.fold_batchnorm=false"]), tmp_path / "plain")
    assert json.loads((plain / "landmarks_model.json").read_text())["fold_batchnorm"] is False
    img = (np.random.default_rng(3).random((200, 260, 3)) * 255).astype(np.uint8)
    outs = [postprocess(load_delg(m)(img, [0.5, 1.0], 300, 0.0, [0, 1])) for m in (default_model, plain)]
    (ga, la), (gb, lb) = outs
    assert float(ga @ gb) > 1 - 1e-5

    def key(lf):
        return {
            (round(float(x), 1), round(float(y), 1), round(float(s), 3)): d
            for (x, y), s, d in zip(lf.keypoints, lf.scales, lf.descriptors)
        }

    ka, kb = key(la), key(lb)
    common = set(ka) & set(kb)
    assert len(common) >= 0.99 * len(ka)  # the same cells selected (a near-tie at the cap may swap)
    assert min(float(ka[c] @ kb[c]) for c in common) > 1 - 1e-5


def test_signature_names_and_dtypes(default_model):
    from landmarks.utils.tfquiet import tf

    sig = tf.saved_model.load(str(default_model)).signatures["serving_default"]
    _, kw = sig.structured_input_signature
    assert {k: (v.dtype, v.shape.as_list() if v.shape.rank is not None else None) for k, v in kw.items()} == {
        "input_image": (tf.uint8, [None, None, 3]),
        "input_scales": (tf.float32, [None]),
        "input_max_feature_num": (tf.int32, []),
        "input_abs_thres": (tf.float32, []),
        "input_global_scales_ind": (tf.int32, [None]),
    }
    assert set(sig.structured_outputs) == {"boxes", "features", "scales", "scores", "global_descriptors"}


def test_cap_threshold_and_scales(loaded):
    from skimage import data

    img = _resize(data.astronaut(), 256, 256)
    o = loaded(img, [0.5, 1.0, 2.0], 40, 0.0, [0, 2])
    assert o["boxes"].shape == (40, 4) and o["global_descriptors"].shape == (2, 1280)
    assert set(np.unique(o["scales"])) <= {0.5, 1.0, 2.0}
    assert np.all(np.diff(o["scores"][:, 0]) <= 1e-6)  # sorted by score
    assert np.all(o["boxes"][:, 2] > o["boxes"][:, 0]) and np.all(o["boxes"][:, 3] > o["boxes"][:, 1])
    # boxes divide by the scale: the same receptive field is smaller in original pixels at scale 2
    side = o["boxes"][:, 2] - o["boxes"][:, 0] + 1
    assert np.allclose(side * o["scales"], side[0] * o["scales"][0], rtol=0.02)
    none = loaded(img, [1.0], 100, 1e9, [0])
    assert none["boxes"].shape == (0, 4) and none["features"].shape == (0, 128) and none["scores"].shape == (0, 1)
    g1 = loaded(img, [1.0], 10, 0.0, [0])["global_descriptors"]
    assert g1.shape == (1, 1280) and np.all(g1 > 0)  # GeM of ReLU6 maps, not normalised


def test_keypoints_scale_with_the_image(loaded):
    from skimage import data

    from landmarks.delg.delg_io import postprocess

    big = _resize(data.astronaut(), 384, 384)
    small = _resize(big, 192, 192)
    _, a = postprocess(loaded(small, [1.0], 60, 0.0, [0]))
    _, b = postprocess(loaded(big, [1.0], 200, 0.0, [0]))
    d = np.linalg.norm((a.keypoints * 2.0)[:, None] - b.keypoints[None], axis=2).min(1)
    assert np.median(d) <= 16.0, np.median(d)  # within one stride of the big image
    # and the big image at scale 0.5 inside the graph agrees (boxes come back in original pixels)
    _, c = postprocess(loaded(big, [0.5], 60, 0.0, [0]))
    d2 = np.linalg.norm(c.keypoints[:, None] - (a.keypoints * 2.0)[None], axis=2).min(1)
    assert np.median(d2) <= 16.0, np.median(d2)
    assert c.keypoints.max() > 250  # not left in the resized image's pixels


def test_global_descriptor_crop_closer_than_other_image(loaded):
    from skimage import data

    from landmarks.delg.delg_io import postprocess

    def g(img):
        return postprocess(loaded(img, [0.7071, 1.0], 10, 0.0, [0, 1]))[0]

    a = data.astronaut()
    crop = a[20:-15, 12:-25]
    other = data.coffee()
    ga, gc, go = g(a), g(crop), g(other)
    assert float(ga @ gc) > float(ga @ go) + 0.05


def test_cli_model_build_tiny(tmp_path):
    from landmarks.cli import main

    out = tmp_path / "tiny"
    args = [
        "model",
        "build",
        "--out",
        str(out),
        "--backbone",
        "tiny",
        "--init",
        "random",
        "--local-projection",
        "random_orthogonal",
    ]
    assert main(args) == 0
    assert (out / "saved_model.pb").exists()
    mtime = (out / "saved_model.pb").stat().st_mtime
    assert main(args) == 0  # rerun skips
    assert (out / "saved_model.pb").stat().st_mtime == mtime
    from landmarks.delg.delg_io import load_delg

    o = load_delg(out)(np.full((64, 80, 3), 100, np.uint8), [1.0], 100, 0.0, [0])
    assert o["features"].shape[1] == 128 and o["global_descriptors"].shape == (1, 32)
    assert main(["model", "build", "--out", str(tmp_path / "r"), "--backbone", "nope"]) == 1


def test_load_delg_tf1_prune_path(tmp_path):
    from landmarks.delg.delg_io import load_delg
    from landmarks.utils.tfquiet import tf

    export_dir = str(tmp_path / "tf1")
    g = tf.Graph()
    with g.as_default():
        v1 = tf.compat.v1
        img = v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = v1.placeholder(tf.float32, [None], name="input_scales")
        maxf = v1.placeholder(tf.int32, [], name="input_max_feature_num")
        thres = v1.placeholder(tf.float32, [], name="input_abs_thres")
        gind = v1.placeholder(tf.int32, [None], name="input_global_scales_ind")
        w = v1.Variable(np.ones((3, 16), np.float32), name="w")
        mean = tf.reduce_mean(tf.cast(img, tf.float32), axis=[0, 1])
        glob = tf.tile((mean[None] @ w), [tf.size(gind), 1]) * tf.reduce_max(scales)
        n = maxf
        tf.identity(glob, name="global_descriptors")
        tf.identity(tf.zeros([n, 4]) + thres, name="boxes")
        tf.identity(tf.ones([n, 128]), name="features")
        tf.identity(tf.ones([n]), name="scales")
        tf.identity(tf.ones([n, 1]), name="scores")
        with v1.Session(graph=g) as sess:
            sess.run(v1.global_variables_initializer())
            b = v1.saved_model.Builder(export_dir)
            b.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING])
            b.save()
    m = load_delg(export_dir)
    assert m.kind == "tf1-prune"
    o = m(np.full((8, 8, 3), 2, np.uint8), [1.0, 2.0], 7, 0.5, [0, 1, 1])
    assert o["global_descriptors"].shape == (3, 16) and np.allclose(o["global_descriptors"], 2.0 * 3 * 2.0)
    assert o["boxes"].shape == (7, 4) and np.allclose(o["boxes"], 0.5)
    assert o["features"].shape == (7, 128)


def test_load_delg_rejects_non_models(tmp_path):
    from landmarks.delg.delg_io import load_delg

    with pytest.raises(LandmarksError):
        load_delg(tmp_path)
