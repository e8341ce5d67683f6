"""verify.matcher=nbb: Neural Best-Buddies on feature maps (synthetic maps, then the real Lite0 maps)."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks import verify
from landmarks.config import ConfigError, VerifyConfig, load_config
from landmarks.store import FeatureMaps, LocalFeatures, maps_keys, read_maps, write_maps
from landmarks.utils import LandmarksError


def _pool2(x: np.ndarray) -> np.ndarray:
    h, w, c = x.shape
    return x[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).mean(axis=(1, 3))


def _pyramid(fine: np.ndarray, mix: list[np.ndarray]) -> FeatureMaps:
    """Three levels (strides 4, 2, 1 px) built from one fine map: each coarser level pools the one
    below and mixes its channels, as a CNN's deeper block sees a wider neighbourhood."""
    mid = np.tanh(_pool2(fine) @ mix[0])
    deep = np.tanh(_pool2(mid) @ mix[1])
    h, w = fine.shape[:2]
    return FeatureMaps([deep, mid, fine], np.array([4.0, 2.0, 1.0]), np.array([1.5, 0.5, 0.0]), 1.0, (h, w))


@pytest.fixture
def shifted_maps():
    """Maps of two 'images' cut from one scene with a known shift (dx, dy) = (16, 8) px, and of an
    unrelated scene."""
    rng = np.random.default_rng(0)
    mix = [rng.normal(size=(16, 24)) / 4, rng.normal(size=(24, 32)) / 5]
    scene = rng.normal(size=(72, 80, 16)).astype(np.float32)
    a = _pyramid(scene[0:64, 0:64], mix)
    b = _pyramid(scene[8:72, 16:80], mix)
    other = _pyramid(rng.normal(size=(64, 64, 16)).astype(np.float32), mix)
    return a, b, other


def test_nbb_matches_follow_the_shift(shifted_maps):
    a, b, other = shifted_maps
    vc = VerifyConfig(matcher="nbb", nbb_min_activation=0.0, reproj_threshold=1.0)
    xy_a, xy_b = verify.match_nbb(vc, a, b)
    assert len(xy_a) >= 200  # the fine level: many matches, not just the deep cells
    err = np.abs(xy_a - xy_b - np.array([16.0, 8.0])).max(axis=1)
    # at the fine level's own precision: most of the 56 x 48 overlapping cells, few others
    assert (err < 0.5).sum() >= 0.8 * 56 * 48 and (err < 0.5).mean() >= 0.8
    ev = verify.verify_evidence(vc, a, [b, other, None])
    assert ev[0, 0] >= 0.8 * 56 * 48 and ev[0, 0] >= 0.8 * ev[0, 1]
    assert ev[1, 0] <= 0.1 * ev[0, 0] and ev[2, 0] == 0
    assert 0.5 <= ev[0, 2] <= 1.0  # the inliers cover most of the image
    np.testing.assert_array_equal(ev, verify.verify_evidence(vc, a, [b, other, None]))  # deterministic


def test_nbb_refines_deep_matches_level_by_level(shifted_maps):
    a, b, _ = shifted_maps
    vc = VerifyConfig(matcher="nbb", nbb_min_activation=0.0)
    coarse = FeatureMaps(a.maps[:1], a.strides[:1], a.offsets[:1], 1.0, a.shape)
    coarse_b = FeatureMaps(b.maps[:1], b.strides[:1], b.offsets[:1], 1.0, b.shape)
    xy_a, xy_b = verify.match_nbb(vc, coarse, coarse_b)
    fine_a, _ = verify.match_nbb(vc, a, b)
    assert 0 < len(xy_a) < len(fine_a)  # one deep cell -> several finer best buddies
    # activation filter: a threshold of 1 keeps at most the strongest cell of each map
    assert len(verify.match_nbb(VerifyConfig(matcher="nbb", nbb_min_activation=1.0), a, b)[0]) <= 1


def test_maps_store_round_trip(tmp_path, shifted_maps):
    a, b, _ = shifted_maps
    p = write_maps(tmp_path / "nbb-maps-x-1.h5", {"a": a, "b": b, "bad": "not an image"}, {"a": "a:1"})
    assert maps_keys(p) == {"a": "a:1", "b": "", "bad": ""}
    got = read_maps([p], {"a", "bad", "absent"})
    assert set(got) == {"a", "bad"} and got["bad"] == "not an image"
    assert got["a"].shape == a.shape and len(got["a"].maps) == 3
    np.testing.assert_allclose(got["a"].maps[2], a.maps[2].astype(np.float16))
    np.testing.assert_array_equal(got["a"].strides, a.strides)


def test_nbb_config_choice():
    cfg = load_config(None, ["verify.matcher=nbb", "verify.nbb_window=2"])
    assert cfg.verify.matcher == "nbb" and cfg.verify.nbb_window == 2
    with pytest.raises(ConfigError, match="verify.nbb_min_activation"):
        load_config(None, ["verify.nbb_min_activation=2"])
    from landmarks.delg.featuremaps import check_layers

    assert check_layers(["block14_add", "block4_add"]) == ["block14_add", "block4_add"]
    with pytest.raises(LandmarksError, match="unknown layer"):
        check_layers(["conv5_3"])
    with pytest.raises(LandmarksError, match="deep to shallow"):
        check_layers(["block4_add", "block14_add"])
    lf = LocalFeatures(np.zeros((5, 2), np.float32), np.eye(5, 128, dtype=np.float32), np.ones(5), np.ones(5))
    with pytest.raises(LandmarksError, match="feature maps"):
        verify.verify_evidence(VerifyConfig(matcher="nbb"), lf, [lf])


def test_nbb_on_lite0_maps_of_a_shifted_photo():
    """The real maps: a photo and a shifted crop of it match along the shift, RANSAC keeps many;
    a different photo keeps few."""
    pytest.importorskip("skimage")
    from landmarks.delg.featuremaps import feature_maps, map_model
    from landmarks.delg.pth_weights import lite0_weights_path

    try:
        lite0_weights_path()
    except LandmarksError:
        pytest.skip("offline Lite0 weights not installed")
    from skimage import data as skdata

    photo = skdata.astronaut()  # 512 x 512
    other = skdata.coffee()
    vc = VerifyConfig(matcher="nbb", reproj_threshold=8.0)
    mg = map_model(vc.nbb_layers)
    dx, dy = 48, 32
    a = feature_maps(mg, photo[0:448, 0:448], 448)
    b = feature_maps(mg, photo[dy : dy + 448, dx : dx + 448], 448)
    c = feature_maps(mg, other[0:400, 0:448], 448)
    assert [m.shape[:2] for m in a.maps] == [(14, 14), (28, 28), (56, 56)]
    xy_a, xy_b = verify.match_nbb(vc, a, b)
    err = np.linalg.norm(xy_a - xy_b - np.array([dx, dy]), axis=1)
    assert len(xy_a) >= 50 and np.median(err) <= 8.0
    ev = verify.verify_evidence(vc, a, [b, c])
    assert ev[0, 0] >= 50 and ev[0, 0] >= 4 * ev[1, 0]
