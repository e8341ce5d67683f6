"""show: one readable PNG per test image (candidates, inlier lines, keypoint scores); data plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks import cli, pipeline, verify
from landmarks.datasets.data import image_path
from landmarks.store import LocalFeatures, write_shard
from landmarks.tools import show
from landmarks.utils import LandmarksError
from plain import PLAIN

H = np.array([[0.9, 0.05, 15.0], [-0.05, 0.95, 10.0], [1e-4, 0.0, 1.0]])


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lf(kp, desc, rng):
    return LocalFeatures(
        kp.astype(np.float32), desc, np.ones(len(kp), np.float32), rng.uniform(0, 1, len(kp)).astype(np.float32)
    )


def make_case_data(tmp_path, small_cfg):
    """2 classes x 2 train images, 2 test images (one of class A, one non-landmark).

    Test image t0 shares 60 planted features (related by H) with train a0, none with the others;
    globals make a0 its nearest neighbour.  Images are 240x180 random textures."""
    rng = np.random.default_rng(0)
    data, work = tmp_path / "data", tmp_path / "work"
    train = [("a0" * 8, 11), ("a1" * 8, 11), ("b0" * 8, 22), ("b1" * 8, 22)]
    test = [("c0" * 8, "11"), ("d0" * 8, "")]
    for split, ids in (("train", [t[0] for t in train]), ("test", [t[0] for t in test])):
        for i in ids:
            p = image_path(data, split, i)
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)).save(p)
    pd.DataFrame(train, columns=["id", "landmark_id"]).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"id": [t[0] for t in test], "landmarks": ""}).to_csv(data / "sample_submission.csv", index=False)
    pd.DataFrame(test, columns=["id", "landmarks"]).to_csv(data / "solution.csv", index=False)

    n, shared = 150, 60
    kp_q = rng.uniform(10, 150, (n, 2))
    d_q = _unit(rng.normal(size=(n, 128)))
    pts = np.c_[kp_q[:shared], np.ones(shared)] @ H.T
    kp_t = np.concatenate([pts[:, :2] / pts[:, 2:], rng.uniform(10, 170, (n - shared, 2))])
    d_t = np.concatenate(
        [_unit(d_q[:shared] + 0.05 * rng.normal(size=(shared, 128))), _unit(rng.normal(size=(n - shared, 128)))]
    )

    def rand():
        return _lf(rng.uniform(0, 170, (n, 2)), _unit(rng.normal(size=(n, 128))), rng)

    tr_local = [_lf(kp_t, d_t, rng), rand(), rand(), rand()]
    te_local = [_lf(kp_q, d_q, rng), rand()]
    g = _unit(rng.normal(size=(4, 16)))
    te_g = _unit(np.stack([g[0] + 0.1 * g[1], g[2] + g[3]]))
    write_shard(work / "features/train/shard-00000-of-00001.h5", [t[0] for t in train], g, tr_local)
    write_shard(work / "features/test/shard-00000-of-00001.h5", [t[0] for t in test], te_g, te_local)
    pipeline.run_after_features(
        small_cfg("verify.mutual_min_sim=0.5", *PLAIN), data, work, None, tmp_path / "submission.csv"
    )  # show reads the outputs
    return data, work


def test_show_case_png_and_inliers(tmp_path, small_cfg):
    data, work = make_case_data(tmp_path, small_cfg)
    cfg = small_cfg("verify.mutual_min_sim=0.5", *PLAIN)
    case = show.load_case(cfg, data, work, tmp_path / "no-model", "c0" * 8, top=3)
    assert [c.train_id for c in case.candidates][0] == "a0" * 8
    first = case.candidates[0]
    assert first.correct is True and first.verified and first.inliers >= 50
    assert all(c.inliers < 10 for c in case.candidates[1:])
    assert case.candidates[2].correct is False  # class 22 is wrong for truth 11
    # the drawn inliers are verify.py's count for the pair
    from landmarks.store import FeatureStore

    q = FeatureStore(work / "features/test").local(["c0" * 8])["c0" * 8]
    t = FeatureStore(work / "features/train").local(["a0" * 8])["a0" * 8]
    m = verify.match_mutual(q.descriptors, t.descriptors, cfg.verify.mutual_min_sim)
    assert first.inliers == verify.count_inliers(cfg.verify, q.keypoints, t.keypoints, m)
    assert np.allclose(
        np.c_[first.src, np.ones(len(first.src))]
        @ H.T[:, :2]
        / (np.c_[first.src, np.ones(len(first.src))] @ H.T[:, 2:]),
        first.dst,
        atol=1.0,
    )
    assert case.prediction == 11 and len(case.keypoints) == 150
    # the per-label votes: the prediction has the largest total, which is its confidence
    assert case.votes[0].label == 11 and case.votes[0].total == pytest.approx(case.confidence)
    assert case.votes[0].correct is True and all(v.correct is False for v in case.votes[1:])
    assert case.votes[0].best_rank == 1 and case.votes[0].best_inliers == first.inliers
    assert sum(v.neighbours for v in case.votes) == 4  # every train image votes once

    out = show.render_case(case, tmp_path / "case.png")
    with Image.open(out) as im:
        w, h = im.size
    assert 700 < w < 2000 and 350 < h < 1500


def test_cli_show_and_unknown_id(tmp_path, capsys, small_cfg):
    data, work = make_case_data(tmp_path, small_cfg)
    common = [
        "--data-dir",
        str(data),
        "--work-dir",
        str(work),
        "--model",
        str(tmp_path / "none"),
        "--set",
        "verify.jobs=1",
        "--set",
        "verify.mutual_min_sim=0.5",
        *(a for kv in PLAIN for a in ("--set", kv)),
    ]
    assert cli.main(["show", "d0" * 8, *common]) == 0
    png = work / "show" / f"{'d0' * 8}.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    with Image.open(png) as im:
        assert im.size[0] > 700  # 3 rows of panels for 4 candidates + test image
    capsys.readouterr()
    assert cli.main(["show", "ffffffffffffffff", *common]) == 1
    err = capsys.readouterr().err
    assert "unknown test id 'ffffffffffffffff'" in err and "sample_submission.csv" in err
    assert cli.main(["show", *common]) == 1
    assert "TEST_ID" in capsys.readouterr().err
    # --docs picks the correct, verified example
    assert cli.main(["show", "--docs", *common, "--out", str(tmp_path / "docs" / "ex.png")]) == 0
    assert (tmp_path / "docs" / "ex.png").exists()
    assert show.pick_docs_example(small_cfg("verify.mutual_min_sim=0.5", *PLAIN), data, work, None) == "c0" * 8


def test_test_id_without_features_is_explained(tmp_path, small_cfg):
    data, work = make_case_data(tmp_path, small_cfg)
    extra = "e0" * 8
    sub = pd.read_csv(data / "sample_submission.csv", dtype=str, keep_default_na=False)
    pd.concat([sub, pd.DataFrame({"id": [extra], "landmarks": [""]})]).to_csv(
        data / "sample_submission.csv", index=False
    )
    with pytest.raises(LandmarksError, match="has no features"):
        show.load_case(small_cfg("verify.mutual_min_sim=0.5", *PLAIN), data, work, None, extra)


def test_tables_and_data_plots(tmp_path, small_cfg):
    data, work = make_case_data(tmp_path, small_cfg)
    cfg = small_cfg("verify.mutual_min_sim=0.5", *PLAIN)
    table = show.predictions_table(cfg, data, work, None)
    assert set(table["id"]) == {"c0" * 8, "d0" * 8}
    row = table.set_index("id").loc["c0" * 8]
    assert row["correct"] == True and row["top1_inliers"] >= 50  # noqa: E712
    cases = show.pick_cases(table)
    assert cases == {"good": "c0" * 8, "failed": "d0" * 8}
    comp = show.compare_verification(cfg, data, work, None)
    assert list(comp.index) == ["global only", "global + verification"]
    assert comp.loc["global + verification", "GAP"] == pytest.approx(1.0)
    s = show.split_summary(data)["count"]
    assert s["train images"] == 4 and s["test non-landmark images"] == 1
    sizes = show.image_sizes(data, "train")
    assert (sizes["width"] == 240).all() and (sizes["height"] == 180).all()
    for fig in (
        show.plot_class_sizes(data),
        show.plot_class_samples(data, classes=2, per_class=2),
        show.plot_image_sizes(data),
        show.plot_test_gallery(data, table, "all"),
    ):
        fig.savefig(tmp_path / "fig.png")
        assert (tmp_path / "fig.png").stat().st_size > 1000


def test_render_case_rows_without_gaps(tmp_path):
    """Candidates of very different shapes: each row is as tall as its tallest image, so no white
    band taller than a title line separates the rows."""
    rng = np.random.default_rng(1)
    paths = {}
    for name, (h, w) in {"test": (180, 240), "wide": (120, 400), "tall": (400, 150), "square": (200, 200)}.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[name])
    cands = [
        show.Candidate(k + 1, name, 7, 0.9 - 0.1 * k, k == 0, verified=True, inliers=5)
        for k, name in enumerate(["wide", "tall", "square", "wide", "tall"])
    ]
    votes = [show.LabelVote(7, 1.5, 5, 1, 0.9, 5, True)]
    case = show.Case(
        "t" * 16, paths["test"], "7", 7, 1.5, cands, np.zeros((0, 2)), np.zeros(0), votes=votes, vote_rule="sum_power"
    )
    case.train_paths = {c.train_id: paths[c.train_id] for c in cands}
    dpi = 60
    out = show.render_case(case, tmp_path / "rows.png", dpi=dpi)
    with Image.open(out) as im:
        white = (np.asarray(im.convert("L")) > 245).all(axis=1)
    longest = max(len(run) for run in "".join("1" if w else "0" for w in white).split("0"))
    assert longest < 0.45 * dpi
