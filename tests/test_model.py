"""DELG model: torch-free Lite0/1/2 conversion, receptive fields, heads."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks.utils import LandmarksError


@pytest.fixture(scope="module")
def lite0_classifier():
    from landmarks.delg.model import build_lite0_classifier

    return build_lite0_classifier("imagenet")


def _top5(model, img, side: int = 224):
    from landmarks.utils.tfquiet import tf

    x = tf.image.resize(tf.cast(img, tf.float32)[None], (side, side))
    logits = np.asarray(model((x - 127.0) / 128.0, training=False))[0]
    return list(np.argsort(-logits)[:5])


def test_read_pth_matches_the_documented_file():
    from landmarks.delg.pth_weights import lite0_weights_path, read_pth

    sd = read_pth(lite0_weights_path())
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280) and sd["_fc.weight"].dtype == np.float32
    blocks = {k.split(".")[1] for k in sd if k.startswith("_blocks.")}
    assert len(blocks) == 16
    assert not any("_se_" in k for k in sd)  # Lite: no squeeze-excite
    assert np.all(sd["_bn0.running_var"] >= 0) and np.isfinite(sd["_fc.bias"]).all()


def test_read_pth_rejects_other_files(tmp_path):
    from landmarks.delg.pth_weights import read_pth

    p = tmp_path / "x.pth"
    p.write_bytes(b"PK\x03\x04zipdata")
    with pytest.raises(LandmarksError, match="zip"):
        read_pth(p)
    with pytest.raises(LandmarksError, match="not found"):
        read_pth(tmp_path / "missing.pth")


def test_lite0_conversion_classifies_imagenet_photos(lite0_classifier):
    from skimage import data

    cat = _top5(lite0_classifier, data.chelsea())
    assert set(cat) & {281, 282, 283, 284, 285}, cat
    assert cat[0] == 285
    cup = _top5(lite0_classifier, data.coffee())
    assert {967, 968} & set(cup), cup


LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name", LITES[1:])
def test_bigger_lite_conversion_classifies_imagenet_photos(name):
    """Lite1/2 at their ImageNet resolution: chelsea is an Egyptian cat (285), coffee an espresso (967)."""
    from skimage import data

    from landmarks.delg.model import LITE_SPECS, build_lite_classifier

    model = build_lite_classifier(name, "imagenet")
    side = LITE_SPECS[name].resolution
    cat = _top5(model, data.chelsea(), side)
    assert cat[0] == 285 and set(cat[:3]) <= {281, 282, 283, 284, 285}, cat
    cup = _top5(model, data.coffee(), side)
    assert cup[0] == 967 and 968 in cup, cup


@pytest.mark.parametrize("name", LITES)
def test_lite_stages_match_the_checkpoint(name):
    """The scaled stage table (width/depth rules) rebuilds every block's tensor shapes of the file."""
    from landmarks.delg.model import lite_stages
    from landmarks.delg.pth_weights import lite_weights_path, read_pth

    sd = read_pth(lite_weights_path(name))
    assert not any("_se_" in k for k in sd)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)  # stem not scaled
    cin, b = 32, 0
    for k, s, e, cout, reps in lite_stages(name):
        for _ in range(reps):
            p = f"_blocks.{b}"
            assert sd[f"{p}._depthwise_conv.weight"].shape == (cin * e, 1, k, k), p
            assert sd[f"{p}._project_conv.weight"].shape == (cout, cin * e, 1, 1), p
            assert (f"{p}._expand_conv.weight" in sd) == (e != 1), p
            cin, b = cout, b + 1
    assert f"_blocks.{b}._depthwise_conv.weight" not in sd  # no block left over
    assert sd["_conv_head.weight"].shape == (1280, cin, 1, 1)  # head stays 1280


def test_lite_backbone_shapes_and_local_layers():
    from landmarks.delg.model import (
        LITE0_LOCAL,
        LITE0_LOCAL_EXPANDED,
        build_backbone,
        lite_local_layer,
        output_layer_name,
        receptive_field,
    )

    assert lite_local_layer("efficientnet_lite0") == LITE0_LOCAL
    assert lite_local_layer("efficientnet_lite0", expanded=True) == LITE0_LOCAL_EXPANDED
    x = np.zeros((1, 96, 128, 3), np.float32)
    want = {"efficientnet_lite1": (112, 672), "efficientnet_lite2": (120, 720)}
    for name, (local_c, expanded_c) in want.items():
        assert lite_local_layer(name) == "block14_add"
        net = build_backbone(name, "random")
        local, top = net(x)
        assert tuple(local.shape) == (1, 6, 8, local_c) and tuple(top.shape) == (1, 3, 4, 1280)
        assert receptive_field(net, output_layer_name(net, 0)).stride == 16
        wide = build_backbone(name, "random", local_layer=lite_local_layer(name, expanded=True))
        assert wide.outputs[0].shape[-1] == expanded_c
    with pytest.raises(LandmarksError, match="no offline ImageNet weights"):
        from landmarks.delg.pth_weights import lite_weights_path

        lite_weights_path("efficientnet_lite4")


def _positive_tiny():
    from landmarks.delg.model import build_backbone

    m = build_backbone("tiny", "random")
    for layer in m.layers:
        ws = layer.get_weights()
        if ws:
            layer.set_weights([np.full_like(ws[0], 1.0 / ws[0][..., 0].size)] + [np.zeros_like(w) for w in ws[1:]])
    return m


def test_receptive_field_matches_brute_force_on_tiny():
    """Spike one input pixel per batch item; the local units that change are those whose RF holds it."""
    from landmarks.delg.model import receptive_field

    m = _positive_tiny()
    rf = receptive_field(m, "t_local")
    assert rf.stride == 16
    size = 128
    base = np.ones((size, size, 3), np.float32)
    col = 70
    batch = np.repeat(base[None], size, 0)
    for p in range(size):
        batch[p, p, col, :] = 1000.0  # spike at (y=p, x=col)
    ref = np.asarray(m(base[None])[0])[0, ..., 0]
    out = np.asarray(m(batch)[0])[..., 0]  # [size(p), h, w]
    jx = int(round((col + rf.padding - (rf.size - 1) / 2) / rf.stride))  # unit column whose RF centre is near col
    for i in (0, 2, 4):
        changed = np.where(np.abs(out[:, i, jx] - ref[i, jx]) > 1e-3)[0]
        box = rf.boxes_np(np.array([i]), np.array([jx]))[0]
        assert changed.min() == max(0, int(box[0])), (i, changed.min(), box)
        assert changed.max() == min(size - 1, int(box[2])), (i, changed.max(), box)
    # the global block's field is wider with twice the stride
    rg = receptive_field(m, "t_global")
    assert rg.stride == 32 and rg.size > rf.size


def test_receptive_fields_of_real_backbones():
    from landmarks.delg.model import LITE0_LOCAL_EXPANDED, build_backbone, output_layer_name, receptive_field

    r50 = build_backbone("resnet50", "random")
    rf = receptive_field(r50, output_layer_name(r50, 0))
    assert (rf.size, rf.stride, rf.padding) == (291, 16, 145.0)  # reference value for R50 block3
    assert receptive_field(r50, output_layer_name(r50, 1)).stride == 32
    lite = build_backbone("efficientnet_lite0", "random", local_layer=LITE0_LOCAL_EXPANDED)
    rl = receptive_field(lite, output_layer_name(lite, 0))
    assert rl.stride == 16 and rl.size > 200
    assert receptive_field(lite, "top_activation").stride == 32
    with pytest.raises(LandmarksError):
        receptive_field(lite, "no_such_layer")


def test_resnet_imagenet_offline_fails_clearly(monkeypatch):
    import urllib.error

    from keras.src.applications import resnet

    from landmarks.delg.model import build_backbone

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(resnet.file_utils, "get_file", offline)
    with pytest.raises(LandmarksError, match="--init imagenet"):
        build_backbone("resnet50", "imagenet")
    with pytest.raises(LandmarksError, match="unknown backbone"):
        build_backbone("vgg", "random")


def test_delg_heads_shapes_and_arcface_margin():
    from landmarks.config import ModelConfig
    from landmarks.delg.model import build_delg
    from landmarks.utils.tfquiet import tf

    mc = ModelConfig(backbone="tiny", init="random", global_dim=16, local_dim=8)
    net = build_delg(mc, num_classes=5)
    x = tf.random.uniform([2, 64, 64, 3], -1, 1)
    y = tf.constant([1, 3])
    out = net(x, training=False, labels=y)
    assert out["global"].shape == (2, 16)
    assert out["logits"].shape == (2, 5) and out["att_logits"].shape == (2, 5)
    plain = np.asarray(net.arcface(out["global"]))
    marg = np.asarray(out["logits"])
    assert np.allclose(np.delete(plain, [1, 8]), np.delete(marg, [1, 8]), atol=1e-5)  # other classes untouched
    assert marg[0, 1] < plain[0, 1] and marg[1, 3] < plain[1, 3]  # margin lowers the true-class logit
    assert abs(net.arcface.s - 4.0) < 1e-6  # sqrt(16)
    desc, att, g = net.serving_heads(x)
    assert desc.shape == (2, 4, 4, 8) and att.shape == (2, 4, 4) and g.shape == (2, 16)
    assert float(tf.reduce_min(att)) >= 0.0  # softplus
    # attention/autoencoder gradients stop at the local block
    with tf.GradientTape() as tape:
        local, _ = net.backbone(x)
        _, recon, a = net.local_heads(local)
        loss = tf.reduce_sum(a)
    grads = tape.gradient(loss, net.backbone.trainable_variables)
    assert all(g is None for g in grads)


def test_whitening_starts_from_identity_when_sizes_match():
    from landmarks.config import ModelConfig
    from landmarks.delg.model import build_delg
    from landmarks.utils.tfquiet import tf

    net = build_delg(ModelConfig(backbone="tiny", init="random", global_dim=32), num_classes=3)
    x = tf.random.uniform([1, 64, 64, 3], -1, 1)
    net(x)
    assert np.allclose(net.whiten.get_weights()[0], np.eye(32))
    _, top = net.backbone(x)
    assert np.allclose(np.asarray(net.serving_heads(x)[2]), np.asarray(net.gem(top)), atol=1e-5)
    other = build_delg(ModelConfig(backbone="tiny", init="random", global_dim=16), num_classes=3)
    other(x)
    assert other.whiten.get_weights()[0].shape == (32, 16)
