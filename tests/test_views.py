"""Affine view synthesis (views.py, features.add_views, the hard probe's views): keypoints found in
a synthetic view map back to where they are in the original image; the setting changes the test
split's local fingerprint only; the settings are checked at load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from landmarks import features
from landmarks.config import Config, ConfigError, apply_updates, check_config, parse_overrides
from landmarks.evaluation import hard
from landmarks.store import LocalFeatures
from landmarks.utils import cache
from landmarks.views import View, apply, invert, map_back, merge_views, view_affine, views_of, warp_view

VIEWS = [View(2, 0), View(2, 90), View(4, 0), View(2, 45), View(1.5, -30)]


def blob_image(h=61, w=90, points=((30.0, 20.0), (60.5, 40.2))):
    """Black RGB image with a bright Gaussian spot (sigma 3 px) at each (x, y)."""
    yy, xx = np.mgrid[:h, :w]
    v = np.zeros((h, w))
    for x0, y0 in points:
        v = np.maximum(v, np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 18.0))
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.round(v * 255).astype(np.uint8)
    return img


def spot(image: np.ndarray, near: np.ndarray, r: int = 5) -> np.ndarray:
    """Intensity centroid (x, y) of channel 0 in a window around `near`."""
    h, w = image.shape[:2]
    x0, y0 = int(round(near[0])), int(round(near[1]))
    ys, xs = slice(max(0, y0 - r), min(h, y0 + r + 1)), slice(max(0, x0 - r), min(w, x0 + r + 1))
    wgt = image[ys, xs, 0].astype(np.float64)
    yy, xx = np.mgrid[ys, xs]
    return np.array([(wgt * xx).sum() / wgt.sum(), (wgt * yy).sum() / wgt.sum()])


class PointModel:
    """A DELG-like model with one local feature per scale: the brightest pixel of the image."""

    def __call__(self, image, scales, max_feature_num, abs_thres, global_scales_ind):
        y, x = np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])
        n = len(scales)
        return {
            "boxes": np.tile(np.array([[y - 4.0, x - 4.0, y + 4.0, x + 4.0]], np.float32), (n, 1)),
            "features": np.eye(n, 128, dtype=np.float32),
            "scales": np.asarray(scales, np.float32),
            "scores": np.linspace(1.0, 0.5, n, dtype=np.float32),
            "global_descriptors": np.ones((len(global_scales_ind), 8), np.float32),
        }


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.key)
def test_affine_round_trip_is_exact(view):
    a, _ = view_affine((61, 90), view)
    p = np.random.default_rng(0).uniform(0, 60, (50, 2))
    np.testing.assert_allclose(apply(invert(a), apply(a, p)), p, atol=1e-9)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.key)
def test_a_spot_lands_where_the_affine_says_and_maps_back(view):
    img = blob_image()
    out, a = warp_view(img, view)
    assert out.shape[:2] == view_affine(img.shape, view)[1]
    if view.angle == 0:  # a pure tilt compresses x only
        assert out.shape[:2] == (61, round(90 / view.tilt))
    for p in [(30.0, 20.0), (60.5, 40.2)]:
        predicted = apply(a, [p])[0]
        found = spot(out, predicted)
        assert np.abs(found - predicted).max() < 0.35, (found, predicted)
        lf = LocalFeatures(found[None].astype(np.float32), np.ones((1, 4), np.float32), np.ones(1), np.ones(1))
        back = map_back(lf, a, out.shape).keypoints[0]
        assert np.abs(back - np.array(p)).max() < 0.5 * view.tilt, (back, p)


def test_map_back_drops_keypoints_outside_the_view():
    a, shape = view_affine((40, 80), View(2, 0))
    kp = np.array([[5, 5], [shape[1] + 3, 5], [-1, 2], [10, shape[0] - 1]], np.float32)
    lf = LocalFeatures(kp, np.eye(4, 8, dtype=np.float32), np.ones(4, np.float32), np.arange(4, dtype=np.float32))
    out = map_back(lf, a, shape)
    np.testing.assert_array_equal(out.scores, [0, 3])
    np.testing.assert_allclose(out.keypoints, apply(invert(a), kp[[0, 3]]), atol=1e-4)


def lf_of(scores, x0=0.0):
    n = len(scores)
    kp = np.stack([np.arange(n) + x0, np.zeros(n)], 1).astype(np.float32)
    return LocalFeatures(kp, np.eye(n, 8, dtype=np.float32), np.ones(n, np.float32), np.asarray(scores, np.float32))


def test_merge_shared_budget_keeps_the_best_scores_and_per_view_budget_adds():
    orig, view = lf_of([0.9, 0.5, 0.1]), lf_of([0.8, 0.2], x0=100)
    shared = merge_views(orig, [view], cap=3, per_view=0)
    np.testing.assert_allclose(shared.scores, [0.9, 0.8, 0.5])
    assert shared.keypoints[1, 0] == 100  # the view's feature, mapped keypoint kept with it
    added = merge_views(orig, [view], cap=3, per_view=2)
    assert len(added) == 5 and np.all(np.diff(added.scores) <= 0)


def test_views_of_skips_tilt_one_and_crosses_angles():
    assert views_of((), (0, 90)) == []
    assert views_of((1.0, 2.0), (0.0, 90.0)) == [View(2.0, 0.0), View(2.0, 90.0)]


def test_add_views_maps_a_point_feature_back_to_the_original_image():
    """features.add_views through a model: the view's feature lies where the spot is in the original."""
    img = blob_image(points=((61.0, 17.0),))
    settings = {
        "local_scales": [1.0],
        "max_feature_num": 10,
        "abs_thres": 0.0,
        "view_tilts": [2.0],
        "view_angles": [0.0, 90.0],
        "view_features": 5,
    }
    own = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0), np.zeros(0))
    lf = features.add_views(PointModel(), img, own, settings)
    assert len(lf) == 2  # one per view
    np.testing.assert_allclose(lf.keypoints, [[61.0, 17.0], [61.0, 17.0]], atol=1.0)


def test_run_model_adds_views_only_when_the_settings_hold_them():
    img = blob_image()
    cfg = Config()
    apply_updates(cfg, parse_overrides(["extract.local_scales=1.0", "extract.global_scales=1.0"]))
    plain = features.run_model(PointModel(), img, features.result_settings(cfg, "test"), True)[1]
    apply_updates(cfg, parse_overrides(["extract.view_tilts=2", "extract.view_features=3"]))
    train = features.run_model(PointModel(), img, features.result_settings(cfg, "train"), True)[1]
    test = features.run_model(PointModel(), img, features.result_settings(cfg, "test"), True)[1]
    assert len(plain) == len(train) == 1 and len(test) == 3  # the original + two views (0 and 90 degrees)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / cache.MODEL_META).write_text(json.dumps({"global_fingerprint": "g1", "local_fingerprint": "l1"}))
    return tmp_path


def test_views_change_the_test_local_fingerprint_only(model_dir):
    cfg = Config()
    before = {s: cache.feature_fingerprints(cfg, model_dir, s) for s in ("", "train", "test")}
    assert len(set(before.values())) == 1  # off: every split keyed as before views existed
    for setting in ["extract.view_tilts=2", "extract.view_angles=0", "extract.view_features=500"]:
        apply_updates(cfg, parse_overrides([setting]))
        now = {s: cache.feature_fingerprints(cfg, model_dir, s) for s in ("", "train", "test")}
        assert now["train"] == before["train"] and now[""] == before[""]
        assert now["test"][0] == before["test"][0]  # the global path does not see views
        assert now["test"][1] != before["test"][1]
        before = now
    assert "view_tilts" in features.result_settings(cfg, "test")
    assert "view_tilts" not in features.result_settings(cfg, "train")


def test_view_settings_are_checked_at_load():
    cfg = Config()
    apply_updates(cfg, parse_overrides(["extract.view_tilts=2,4", "extract.view_angles=-45,0,90"]))
    check_config(cfg)
    apply_updates(cfg, parse_overrides(["extract.view_tilts="]))  # empty: off
    assert check_config(cfg).extract.view_tilts == ()
    for bad in ["extract.view_tilts=0.5", "extract.view_tilts=20", "extract.view_angles=", "extract.view_angles=181"]:
        c = Config()
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            apply_updates(c, parse_overrides([bad]))
            check_config(c)
    with pytest.raises(ConfigError, match="local_scales"):  # other tuples may still not be empty
        c = Config()
        apply_updates(c, parse_overrides(["extract.local_scales="]))
        check_config(c)


def test_hard_probe_merges_probed_views_as_the_features_stage_does():
    """Probe.local with views: the same select -> map back -> merge -> to-original-pixels path."""
    img = blob_image(points=((61.0, 17.0),))
    cfg = Config()
    apply_updates(cfg, parse_overrides(["extract.view_tilts=2", "extract.view_angles=0", "extract.view_features=4"]))
    e = cfg.extract
    scales = [1.0]
    model = PointModel()
    _, own = features.describe_image(model, img, scales, 10, 0.0, [0])
    ((view, vscales),) = [(v, tuple(scales)) for v, _ in hard.probe_views(cfg)]
    warped, _ = warp_view(img, view)
    _, vlf = features.describe_image(model, warped, vscales, 10, 0.0, [0])
    probe = hard.Probe(
        np.asarray(scales),
        {},
        {"a": (own, img.shape[:2], 0.5), hard.view_id("a", view, vscales): (vlf, warped.shape[:2], 0.5)},
        {},
    )
    alone = probe.local("a", scales, 10)
    merged = probe.local("a", scales, 10, e)
    settings = {**features.result_settings(cfg, "test"), "local_scales": scales, "max_feature_num": 10}
    stage = features.inside_image(features.add_views(model, img, own, settings), img.shape, 0.5)
    assert len(alone) == 1 and len(merged) == 2
    np.testing.assert_allclose(merged.keypoints, stage.keypoints)
    np.testing.assert_allclose(merged.keypoints[1], [122.0, 34.0], atol=2.0)  # original pixels: / resize 0.5
