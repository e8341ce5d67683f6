"""verify.matcher=nbb: Neural Best-Buddies on feature maps (synthetic maps, then the real Lite0 maps)."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks import verify
from landmarks.config import ConfigError, VerifyConfig, load_config
from landmarks.store import FeatureMaps, LocalFeatures, maps_keys, read_maps, write_maps
from landmarks.utils import LandmarksError
from plain import plain_config


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


def test_run_verify_stage_with_nbb(tmp_path, planted_pair):
    """The verify stage with verify.matcher=nbb reads the maps files beside the shards (named by the
    maps fingerprint): the true pairs get many inliers, the others few; no maps -> the stage to run."""
    from landmarks.delg.featuremaps import maps_fingerprint
    from landmarks.store import load_npz, write_shard
    from test_verify import run_knn_verify

    rng = np.random.default_rng(5)
    mix = [rng.normal(size=(16, 24)) / 4, rng.normal(size=(24, 32)) / 5]
    scenes = [rng.normal(size=(72, 80, 16)).astype(np.float32) for _ in range(3)]
    train = {f"tr{i}": _pyramid(s[0:64, 0:64], mix) for i, s in enumerate(scenes)}
    test = {f"te{i}": _pyramid(s[8:72, 16:80], mix) for i, s in enumerate(scenes[:2])}
    g = rng.normal(size=(3, 8))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    lf = [planted_pair(rng, n=30, shared=5)[0] for _ in range(5)]
    write_shard(tmp_path / "features/train/shard-00000-of-00001.h5", list(train), g.astype(np.float32), lf[:3])
    write_shard(tmp_path / "features/test/shard-00000-of-00001.h5", list(test), g[:2].astype(np.float32), lf[3:])
    cfg = plain_config()
    cfg.knn.k = 3
    cfg.verify.num_to_rerank = 3
    cfg.verify.jobs = 1
    cfg.verify.matcher = "nbb"
    cfg.verify.nbb_min_activation = 0.0
    cfg.verify.reproj_threshold = 1.0
    with pytest.raises(LandmarksError, match="no NBB feature maps.*local-features"):
        run_knn_verify(cfg, tmp_path)
    fp = maps_fingerprint(cfg.verify)
    write_maps(tmp_path / f"features/train/nbb-maps-{fp}-a.h5", train)
    write_maps(tmp_path / f"features/test/nbb-maps-{fp}-a.h5", test)
    out = load_npz(run_knn_verify(cfg, tmp_path))
    knn_out = np.load(next((tmp_path).glob("knn-*.npz")))
    for r, tid in enumerate(out["test_ids"]):
        cands = [str(knn_out["train_ids"][j]) for j in knn_out["idx"][r, :3]]
        for c, n in zip(cands, out["inliers"][r]):
            assert (n >= 1000) == (c == tid.replace("te", "tr")), (tid, cands, out["inliers"][r])


def test_ensure_maps_extracts_once_and_redoes_a_replaced_image(tmp_path):
    """local-features' maps step: maps files beside the shards, resumed by file key."""
    pytest.importorskip("skimage")
    from PIL import Image
    from skimage import data as skdata

    from landmarks.local_features import ensure_maps
    from landmarks.utils import cache

    cfg = plain_config()
    cfg.verify.matcher = "nbb"
    cfg.verify.nbb_image_size = 128
    paths = []
    for name, img in (("a", skdata.astronaut()), ("b", skdata.coffee())):
        p = tmp_path / f"{name}.jpg"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    ids, paths = ["a", "b", "bad"], paths + [str(tmp_path / "bad.jpg")]
    out = tmp_path / "features"
    out.mkdir()
    files = ensure_maps(cfg, out, ids, paths, cache.file_keys(ids, paths))
    got = read_maps(files, set(ids))
    assert isinstance(got["bad"], str) and got["a"].maps[0].shape[:2] == (4, 4)  # 128 px / stride 32
    assert np.allclose(got["b"].shape, (400, 600), atol=3)  # the original size, from the resize factor
    again = ensure_maps(cfg, out, ids, paths, cache.file_keys(ids, paths))
    assert again == files  # nothing redone
    Image.fromarray(skdata.chelsea()).save(paths[0])  # a replaced image: its row is redone
    files2 = ensure_maps(cfg, out, ids, paths, cache.file_keys(ids, paths))
    assert len(files2) == 2 and set(files) < set(files2)
    assert np.allclose(read_maps(files2, {"a"})["a"].shape, (300, 451), atol=3)


def test_hard_scorer_verifies_nbb_pairs_on_the_pool_maps(shifted_maps, monkeypatch):
    """The hard protocol's Scorer: a setting with matcher=nbb verifies its pairs on the pool's maps,
    once (the pair cache answers the second time)."""
    from types import SimpleNamespace

    from landmarks.delg.featuremaps import maps_fingerprint
    from landmarks.evaluation import hard

    a, b, other = shifted_maps
    cfg = plain_config()
    cfg.verify.matcher = "nbb"
    cfg.verify.nbb_min_activation = 0.0
    cfg.verify.reproj_threshold = 1.0
    scorer = hard.Scorer(probe=None)
    scorer.maps[maps_fingerprint(cfg.verify)] = {"q": a, "t": b, "o": other}
    split = SimpleNamespace(name="s")
    ev = scorer.pair_evidence(cfg, split, ["q"], [["t", "o", "missing"]])
    assert ev.shape == (1, 3, 4) and ev[0, 0, 0] >= 1000 and ev[0, 1, 0] < 0.1 * ev[0, 0, 0] and ev[0, 2, 0] == 0
    monkeypatch.setattr(hard, "verify_evidence", lambda *a: pytest.fail("verified twice"))
    np.testing.assert_array_equal(scorer.pair_evidence(cfg, split, ["q"], [["t", "o", "missing"]]), ev)
