"""Hard protocol: k-shot splits, separate global/local scale sets, recall@R and inlier separation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from landmarks import features, store
from landmarks.config import Config, ImportConfig, load_config
from landmarks.datasets.dataset_import import import_dataset, plan_split
from landmarks.evaluation import hard, validate
from landmarks.store import LocalFeatures
from landmarks.utils import LandmarksError


def _landmarks(n_classes=5, sizes=(1, 2, 3, 4, 6)):
    rows = [(f"{c}{i:02d}", f"class{c}") for c, n in zip("abcdefgh"[:n_classes], sizes) for i in range(n)]
    return pd.DataFrame(rows, columns=["id", "cls"])


@pytest.mark.parametrize("k", [1, 2])
def test_plan_split_k_shot(k):
    lm = pd.concat([_landmarks(), pd.DataFrame({"id": ["x1", "x2", "x3"], "cls": ["extra"] * 3})], ignore_index=True)
    lm["extra"] = lm["cls"] == "extra"
    rows, held, class_rows, label_of = plan_split(
        lm, ImportConfig(train_per_class=k, heldout_class_fraction=0.2, seed=3)
    )
    assert len(held) == 1 and "extra" not in held  # 20 % of the 5 candidate classes; extra never held out
    for c, g in rows.groupby("cls"):
        n = len(g)
        n_train, n_test = int((g["split"] == "train").sum()), int((g["split"] == "test").sum())
        if c == "extra":
            assert (n_train, n_test) == (3, 0)
        elif c in held:
            assert (n_train, n_test) == (0, n) and (g["truth"] == "").all()
        else:
            assert (n_train, n_test) == (min(k, n), n - min(k, n))
            assert (g["truth"] == str(label_of[c])).all()
    again, *_ = plan_split(lm, ImportConfig(train_per_class=k, heldout_class_fraction=0.2, seed=3))
    pd.testing.assert_frame_equal(rows, again)
    other = [
        plan_split(lm, ImportConfig(train_per_class=k, heldout_class_fraction=0.2, seed=s))[0] for s in range(4, 9)
    ]
    assert any(not o["split"].equals(rows["split"]) for o in other)


def _write_set(root, name, classes, per_class, seed, labelled=True):
    """A photo set in the shared layout (LABELS.csv id,landmark_id,path) of textured generated images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    d = root / name
    d.mkdir(parents=True)
    rows = []
    for c in range(classes):
        base = rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)
        big = np.asarray(Image.fromarray(base).resize((96, 96), Image.NEAREST))
        for v in range(per_class):
            img = np.roll(big, (4 * v, 3 * v), axis=(0, 1)).astype(np.int16) + rng.integers(-6, 7, big.shape)
            path = d / f"c{c}_{v}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
            rows.append((f"{name}-{c}-{v}", f"{name}{c}" if labelled else "", path.name))
    pd.DataFrame(rows, columns=["id", "landmark_id", "path"]).to_csv(d / "LABELS.csv", index=False)
    return d


def test_import_k_shot_with_extra_train(tmp_path):
    root = tmp_path / "shared"
    _write_set(root, "hard", 4, 3, 0)
    _write_set(root, "extra", 2, 2, 1)
    _write_set(root, "dis", 1, 6, 2, labelled=False)
    out = import_dataset(
        Config(),
        [root / "hard/LABELS.csv"],
        tmp_path / "ds",
        distractors=[root / "dis/LABELS.csv"],
        extra_train=[root / "extra/LABELS.csv"],
        train_per_class=1,
        heldout_class_fraction=0.25,
        distractor_sample=4,
        seed=0,
    )
    counts = json.loads((out / "split.json").read_text())["counts"]
    # 3 seen landmarks keep 1 photo each, + 4 extra-train photos; test: 3x2 seen + 3 unseen + 4 distractors
    assert counts["train_images"] == 3 + 4 and counts["heldout_classes"] == 1
    assert counts["test_images"] == 6 + 3 + 4 and counts["test_landmark"] == 6
    train = pd.read_csv(out / "train.csv")
    assert train["landmark_id"].value_counts().max() == 2  # only the extra classes have 2


def test_select_local_equals_a_call_at_the_local_scales_alone(fake_model):
    from landmarks.delg.delg_io import load_delg, postprocess

    model = load_delg(fake_model)
    img = np.random.default_rng(0).integers(0, 256, (70, 90, 3)).astype(np.uint8)
    settings = {"global_scales": [0.5, 0.7071], "local_scales": [1.0, 0.7071], "max_feature_num": 40, "abs_thres": 0.0}
    scales, rows, cap = features.model_call(settings, local=True)
    assert scales == [0.5, 0.7071, 1.0] and rows == [0, 1] and cap == features.ALL_FEATURES
    g, lf = features.run_model(model, img, settings, local=True)
    g_ref, _ = postprocess(model(img, [0.5, 0.7071], 40, 0.0, [0, 1]))
    _, lf_ref = postprocess(model(img, [0.7071, 1.0], 40, 0.0, [0]))
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)
    assert len(lf) == len(lf_ref) == 40

    def key(f):
        return sorted(map(tuple, np.round(np.c_[f.keypoints, f.scales], 3)))

    assert key(lf) == key(lf_ref)
    assert set(np.round(lf.scales, 4)) <= {0.7071, 1.0}
    # global-only extraction runs the global scales alone; equal sets need no selection
    assert features.model_call(settings, local=False) == ([0.5, 0.7071], [0, 1], 40)
    same = dict(settings, local_scales=[0.5, 0.7071])
    assert features.model_call(same, local=True) == ([0.5, 0.7071], [0, 1], 40)


def test_select_local_caps_per_scale_then_overall():
    lf = LocalFeatures(
        np.arange(12, dtype=np.float32).reshape(6, 2),
        np.eye(6, 4, dtype=np.float32),
        np.array([1, 1, 1, 2, 2, 0.5], np.float32),
        np.array([5, 4, 3, 9, 1, 10], np.float32),
    )
    out = features.select_local(lf, [1.0, 2.0], 2)
    assert out.scores.tolist() == [9, 5] and out.scales.tolist() == [2, 1]


def test_recall_and_separation():
    cand = np.array([["1", "2", "1"], ["3", "2", "2"], ["-1", "-1", "-1"]])
    truth = ["2", "2", ""]
    assert validate.shortlist_recall(cand, truth, [1, 2, 3]) == {1: 0.0, 2: 1.0, 3: 1.0}
    inl = np.array([[5, 40, 4], [6, 30, 20], [1, 1, 1]])
    good, bad = validate.split_inliers(cand, truth, inl)
    assert sorted(good.tolist()) == [20, 30, 40] and sorted(bad.tolist()) == [4, 5, 6]
    sep = validate.separation(good, bad)
    assert sep["auc"] == 1.0 and sep["good_at_floor"] == 0.0 and sep["good_q50"] == 30
    assert validate.separation(np.array([3, 3]), np.array([3, 3]))["auc"] == 0.5


def _hard_cfg(root, **over):
    return load_config(None, _hard_cfg_overrides(root) + [f"{k}={v}" for k, v in over.items()])


def _hard_cfg_overrides(root) -> list[str]:
    return [
        f"hard.shared_data={root}",
        "hard.landmarks=hard",
        "hard.extra_train=extra",
        "hard.distractors=dis",
        "hard.distractor_sample=3",
        "hard.shots=1,2",
        "hard.seeds=2",
        "hard.heldout_class_fraction=0.25",
        "hard.probe_scales=0.5,1.0",
        "hard.probe_features=60",
        "hard.probe_batch=5",
        "extract.global_scales=0.5,1.0",
        "extract.local_scales=1.0",
        "extract.max_feature_num=50",
        "extract.jobs=1",
        "verify.jobs=1",
        "verify.num_to_rerank=3",
        "hard.demo_dir=",
        "hard.nonlandmark_sample=0",
    ]


def test_validate_hard_end_to_end(tmp_path, fake_model, capsys):
    root = tmp_path / "shared"
    _write_set(root, "hard", 4, 3, 0)
    _write_set(root, "extra", 2, 2, 1)
    _write_set(root, "dis", 1, 5, 2, labelled=False)
    cfg = _hard_cfg(root)
    work = tmp_path / "work"
    report = hard.run_validate_hard(cfg, work, fake_model, variants=["global only", "rerank R=50"])
    text = report.read_text()
    for needle in (
        "| current config (default) |",
        "| global only |",
        "| rerank R=50 |",
        "| K=1 seed=1 |",
        "| K=2 seed=0 |",
        "Shortlist recall@R",
        "Inlier separation",
        "## Where failures are: per landmark",
        "### global only: P1",
        "| (non-landmark products) |",
    ):
        assert needle in text
    res = json.loads((work / "hard" / "results.json").read_text())
    rows = res["global only"]["landmarks"]["extra"]
    assert {r["landmark"] for r in rows[:-1]} <= set(hard.pool_table(cfg.hard)["cls"].astype(str))
    assert sum(r["correct"] + r["wrong"] for r in rows[:-1]) > 0
    gaps = res[hard.DEFAULT_ROW]["gap"]
    assert len(gaps["1"]) == len(gaps["2"]) == 2 and all(0 <= g <= 1 for g in gaps["1"] + gaps["2"])
    assert res["global only"]["separation"] is None and res[hard.DEFAULT_ROW]["separation"]["n_good"] > 0
    assert list(res["global only"]["guards"]) == ["easy import"]  # the extra-train set split as `make import` does
    assert 0 <= res["global only"]["guards"]["easy import"] <= 1 and "| easy import |" in text
    assert "P1 K=1" in capsys.readouterr().out
    # the probe is resumable: a rerun reads the stored batches and runs no image through the model
    probes = sorted((work / "hard" / "probe").glob("probe-*.h5"))
    assert len(probes) == 4  # 4x3 + 2x2 + 3 distractors = 19 images in batches of 5 (probe files are kept by id)
    stamps = [p.stat().st_mtime_ns for p in probes]
    hard.run_validate_hard(cfg, work, fake_model, variants=["global only"])
    assert [p.stat().st_mtime_ns for p in probes] == stamps
    # a larger pool probes only the new images (skip by id), in a new file
    hard.run_validate_hard(_hard_cfg(root, **{"hard.distractor_sample": 5}), work, fake_model, variants=["global only"])
    now = sorted((work / "hard" / "probe").glob("probe-*.h5"))
    assert len(now) == 5 and [p.stat().st_mtime_ns for p in probes] == stamps
    assert len(store.probe_ids(next(p for p in now if p not in probes))) == 2


def test_validate_hard_errors(tmp_path, fake_model):
    with pytest.raises(LandmarksError, match="not found"):
        hard.run_validate_hard(_hard_cfg(tmp_path / "absent"), tmp_path / "w", fake_model)
    root = tmp_path / "shared"
    _write_set(root, "hard", 2, 2, 0)
    _write_set(root, "extra", 1, 2, 1)
    _write_set(root, "dis", 1, 2, 2, labelled=False)
    with pytest.raises(LandmarksError, match="unknown variant"):
        hard.run_validate_hard(_hard_cfg(root), tmp_path / "w", fake_model, variants=["no such row"])
    with pytest.raises(LandmarksError, match="probe scales"):
        hard.run_validate_hard(
            _hard_cfg(root, **{"extract.local_scales": "2.0"}), tmp_path / "w", fake_model, variants=["global only"]
        )


def test_real_hard_protocol_splits():
    """On the shared photos (when present): every K-shot split has the protocol's shape."""
    cfg = Config()
    from pathlib import Path

    if not (Path(cfg.hard.shared_data) / cfg.hard.landmarks).is_dir():
        pytest.skip("../shared/data is absent")
    pool = hard.pool_table(cfg.hard)
    splits = hard.make_splits(cfg, pool, set(pool["id"]))
    assert len(splits) == 2 * len(cfg.hard.shots) * cfg.hard.seeds  # both protocols
    lm = pool[pool["role"] == "landmark"]
    extra = set(pool.loc[pool["role"] == "extra", "id"])
    assert int((pool["role"] == "distractor").sum()) == cfg.hard.distractor_sample
    assert int(pool["role"].isin(["distractor", "nonlandmark"]).sum()) == cfg.hard.nonlandmark_sample
    for s in splits:
        n_lm = int((s.solution["landmarks"] != "").sum())
        assert 10 <= n_lm < len(lm)  # a few dozen landmark queries at most
        if s.protocol == "extra":
            assert extra <= set(s.train_ids) and not extra & set(s.test_ids)
        else:  # protocol 2: no extra classes, about 90 % of the test images are non-landmarks
            assert not extra & (set(s.train_ids) | set(s.test_ids))
            assert (s.solution["landmarks"] == "").mean() > 0.85


@pytest.mark.parametrize("confidence, expected", [("score", 0.9), ("margin", 0.9 - 0.8)])
def test_vote_confidence_score_or_margin(confidence, expected):
    from landmarks.config import VoteConfig
    from landmarks.predict import vote

    cfg = VoteConfig(power=1.0, neighbours=3, top_k=1, confidence=confidence)
    labels, conf = vote(
        cfg, np.array([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3]]), np.array([[0, 1, 2], [0, 3, 3]]), np.array([5, 6, 7, 5])
    )
    assert labels.tolist() == [5, 5]
    assert conf[0] == pytest.approx(expected)
    assert conf[1] == pytest.approx(0.5)  # one label only: nothing to subtract
    from landmarks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="vote.confidence"):  # a bad choice stops at load, not in vote
        load_config(None, ["vote.confidence=odds"])


def _write_split_dataset(split, pool: pd.DataFrame, out):
    """One hard split as a Kaggle-layout dataset (images linked from the pool), as `landmarks import` writes it."""
    import os

    from landmarks.datasets.data import image_path

    files = dict(zip(pool["id"], pool["file"]))
    out.mkdir(parents=True)
    for name, ids in (("train", split.train_ids), ("test", split.test_ids)):
        for i in ids:
            p = image_path(out, name, i)
            p.parent.mkdir(parents=True, exist_ok=True)
            os.link(files[i], p)
    pd.DataFrame({"id": split.train_ids, "landmark_id": split.train_labels}).to_csv(out / "train.csv", index=False)
    pd.DataFrame({"id": split.test_ids, "landmarks": ""}).to_csv(out / "sample_submission.csv", index=False)
    split.solution.to_csv(out / "solution.csv", index=False)
    return out


@pytest.mark.parametrize("verify", [True, False])
def test_probe_reproduces_the_pipeline(tmp_path, fake_model, verify):
    """The hard protocol's probe scores a setting exactly as the real stages do on the same split:
    same neighbours, same inliers, same submission, hence the same GAP."""
    from landmarks import pipeline
    from landmarks.datasets.data import read_submission
    from landmarks.evaluation import metrics

    root = tmp_path / "shared"
    _write_set(root, "hard", 4, 3, 0)
    _write_set(root, "extra", 2, 2, 1)
    _write_set(root, "dis", 1, 5, 2, labelled=False)
    cfg = _hard_cfg(root, **{"verify.enabled": verify, "extract.local_scales": "0.5,1.0"})
    pool = hard.pool_table(cfg.hard)
    probe = hard.Probe.load(
        hard.extract_probe(cfg, pool, fake_model, tmp_path / "hard"), cfg.hard.probe_scales, set(pool["id"])
    )
    split = hard.make_splits(cfg, pool, set(probe.globals_))[0]
    probed = hard.Scorer(probe).score(cfg, split)

    data_dir = _write_split_dataset(split, pool, tmp_path / "ds")
    submission = pipeline.run_all(cfg, data_dir, tmp_path / "work", fake_model, tmp_path / "sub.csv", jobs=1)
    staged = metrics.score(split.solution, read_submission(submission, split.test_ids))
    assert 0 < probed["gap"] < 1  # a split where the ranking matters
    assert staged["gap"] == pytest.approx(probed["gap"], abs=1e-9)
    assert staged["accuracy"] == pytest.approx(probed["accuracy"], abs=1e-9)


def test_validate_hard_second_protocol_and_calibrated_rows(tmp_path, fake_model):
    """Protocol 2 (landmarks alone in train, more non-landmarks) is scored beside protocol 1; the
    calibrated row learns its model on each split's train pairs, with known warps where a split
    has one photo per landmark; the report ranks wrong predictions against correct ones."""
    root = tmp_path / "shared"
    _write_set(root, "hard", 4, 3, 0)
    _write_set(root, "extra", 2, 2, 1)
    _write_set(root, "dis", 1, 6, 2, labelled=False)
    cfg = _hard_cfg(root, **{"hard.nonlandmark_sample": 5, "hard.seeds": 1, "calibrate.min_positives": 3})
    work = tmp_path / "work"
    pool = hard.pool_table(cfg.hard)
    roles = pool["role"].value_counts()
    assert roles["distractor"] == 3 and roles["nonlandmark"] == 2  # protocol 1's 3 are among protocol 2's 5
    splits = hard.make_splits(cfg, pool, set(pool["id"]))
    p2 = [s for s in splits if s.protocol == "nonlandmark"]
    assert len(p2) == 2 and all(s.name.startswith("P2 ") for s in p2)
    extra_ids = set(pool.loc[pool["role"] == "extra", "id"])
    assert all(not (set(s.train_ids) & extra_ids) for s in p2)  # no extra train classes
    assert all(sum(s.solution["landmarks"] == "") >= 5 for s in p2)
    report = hard.run_validate_hard(cfg, work, fake_model, variants=["calibrated"])
    text = report.read_text()
    for needle in ("| P2 K=1 seed=0 |", "**mean**", "Ranking of wrong predictions", "| calibrated | P2 |"):
        assert needle in text
    res = json.loads((work / "hard" / "results.json").read_text())
    assert set(res["calibrated"]["protocol_means"]) == {"extra", "nonlandmark"}
    assert 0 <= res["calibrated"]["mean"] <= 1
    assert list((work / "hard" / "probe").glob("probe-*-warp0-*.h5"))  # the known warps were probed


def _queries(ids, truth, label, conf, shortlisted):
    return {
        "ids": ids,
        "truth": np.asarray(truth, dtype=str),
        "label": np.asarray(label, np.int64),
        "conf": np.asarray(conf, float),
        "shortlisted": np.asarray(shortlisted, bool),
    }


def test_landmark_table_on_a_tiny_result():
    """Two seeds of one protocol pooled: counts per landmark, held-out queries apart, products last,
    the landmark with most wrong answers first."""
    pool = pd.DataFrame(
        {
            "id": ["a1", "a2", "b1", "b2", "p1", "p2"],
            "cls": ["arch", "arch", "bridge", "bridge", "cup", "pen"],
            "role": ["landmark", "landmark", "landmark", "landmark", "distractor", "nonlandmark"],
        }
    )
    seed0 = {"queries": _queries(["a1", "b1", "p1"], ["0", "1", ""], [0, 0, 1], [0.9, 0.8, 0.4], [1, 1, 0])}
    # seed 1: bridge held out (empty truth), arch answered wrong with the right landmark out of the top 20
    seed1 = {"queries": _queries(["a2", "b2", "p2"], ["0", "", ""], [1, 0, 0], [0.3, 0.7, 0.2], [0, 0, 0])}
    df = hard.landmark_table(pool, [None, None], [seed0, seed1])
    assert list(df.columns) == hard.LANDMARK_COLUMNS
    assert list(df["landmark"]) == ["bridge", "arch", "(non-landmark products)"]  # bridge: 1 wrong at 0.8
    bridge, arch, prod = (df.iloc[i] for i in range(3))
    assert (bridge["queries"], bridge["correct"], bridge["wrong"], bridge["in top 20"]) == (1, 0, 1, 1)
    assert bridge["held-out queries"] == 1 and bridge["median conf held-out"] == pytest.approx(0.7)
    assert (arch["queries"], arch["correct"], arch["wrong"], arch["in top 20"]) == (2, 1, 1, 1)
    assert arch["median conf correct"] == pytest.approx(0.9) and arch["median conf wrong"] == pytest.approx(0.3)
    assert prod["held-out queries"] == 2 and prod["median conf held-out"] == pytest.approx(0.3)
    assert np.isnan(prod["queries"])


def test_worst_cases_order():
    """Wrong labels on landmark queries by falling confidence, then predictions on photos with no
    train landmark (held-out landmark or product) by falling confidence; right answers never."""
    from landmarks.tools.show import worst_cases

    q = _queries(
        ["a", "b", "c", "d", "e"], ["1", "1", "", "", "2"], [1, 2, 1, 2, 1], [0.9, 0.2, 0.5, 0.8, 0.4], [0] * 5
    )
    roles = {"c": "landmark", "d": "distractor"}
    assert worst_cases(q, roles, 10) == [
        (4, "wrong landmark"),
        (1, "wrong landmark"),
        (3, "non-landmark"),
        (2, "held-out landmark"),
    ]
    assert worst_cases(q, roles, 1) == [(4, "wrong landmark")]


def test_show_hard_split_draws_the_worst_cases(tmp_path, fake_model):
    """`landmarks show --hard-split` on a generated pool: the split's failures with their neighbours
    (named by landmark, marked right / wrong) and the right landmark's photo, in one PNG."""
    from PIL import Image

    from landmarks.cli import main
    from landmarks.tools import show

    root = tmp_path / "shared"
    _write_set(root, "hard", 4, 3, 0)
    _write_set(root, "extra", 2, 2, 1)
    _write_set(root, "dis", 1, 5, 2, labelled=False)
    cfg = _hard_cfg(root)
    work = tmp_path / "work"
    name, setting, cases = show.hard_cases(cfg, work, fake_model, "P1 K=1 seed=0", worst=50, top=3)
    assert name == "K=1 seed=0" and setting == hard.DEFAULT_ROW
    assert cases and all(len(c.neighbours) <= 3 for c in cases)
    pool = hard.pool_table(cfg.hard)
    names = set(pool["cls"].astype(str))
    for c in cases:
        assert c.kind in ("wrong landmark", "held-out landmark", "non-landmark")
        assert all(nm in names for _, _, nm, _, _, _ in c.neighbours)
        assert all(ok == (nm == c.truth_name and c.kind == "wrong landmark") for _, _, nm, _, _, ok in c.neighbours)
        assert (c.right is not None) == (c.kind == "wrong landmark")
        assert c.prediction != c.truth_name or c.kind != "wrong landmark"
    with pytest.raises(LandmarksError, match="no split"):
        show.hard_cases(cfg, work, fake_model, "K=9 seed=0")
    out = tmp_path / "f.png"
    args = ["show", "--hard-split", "K=2 seed=1", "--work-dir", str(work), "--model", str(fake_model)]
    sets = [x for o in _hard_cfg_overrides(root) for x in ("--set", o)]
    assert main([*args, "--variant", "global only", "--worst", "2", "--out", str(out), *sets]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 400 and im.size[1] > 200
