"""predict: voting rules, non-landmark suppression, submission writing, the run_predict stage."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks import pipeline, predict
from landmarks.config import Config, VoteConfig
from landmarks.store import write_shard
from landmarks.utils import LandmarksError
from landmarks.utils.layout import WorkLayout


def test_host_vote_formula():
    cfg = VoteConfig(method="host", top_k=2, neighbours=10, inlier_cap=70)
    sims = np.array([[0.9, 0.8, 0.7, 0.6]])
    idx = np.array([[0, 1, 2, 3]])
    labels_of = np.array([5, 7, 7, 7])
    lab, conf = predict.vote(cfg, sims, idx, labels_of)
    assert lab[0] == 7 and conf[0] == pytest.approx(0.8 + 0.7)  # best 2 of label 7 beat 0.9
    inl = np.array([[140, 0, 0, 14]])  # capped at 70 -> +1.0 ; 14 -> +0.2 (label 7: 0.8 + 0.8)
    lab, conf = predict.vote(cfg, sims, idx, labels_of, inl)
    assert lab[0] == 5 and conf[0] == pytest.approx(1.9)
    lab, conf = predict.vote(VoteConfig(method="host", top_k=5, neighbours=2), sims, idx, labels_of)
    assert lab[0] == 5 and conf[0] == pytest.approx(0.9)  # only the first 2 neighbours vote


def test_sum_power_vote_and_ties():
    cfg = VoteConfig(method="sum_power", power=3.0, top_k=5, inlier_weight=0.5, inlier_cap=10)
    sims = np.array([[0.9, 0.8, 0.8, -0.2], [0.5, 0.5, 0.1, 0.0]])
    idx = np.array([[0, 1, 2, 3], [1, 0, 3, -1]])
    labels_of = np.array([5, 7, 7, 9])
    lab, conf = predict.vote(cfg, sims, idx, labels_of)
    assert lab[0] == 7 and conf[0] == pytest.approx(2 * 0.8**3)
    assert lab[1] == 5 and conf[1] == pytest.approx(0.125)  # tie 5 vs 7 -> smaller label id
    lab, conf = predict.vote(cfg, sims, idx, labels_of, np.array([[20, 0], [0, 0]]))
    assert lab[0] == 5 and conf[0] == pytest.approx(0.729 + 0.5)
    cfg.inlier_floor = 15  # 20 inliers -> 5 above the chance floor -> 0.5 * 5/10
    lab, conf = predict.vote(cfg, sims, idx, labels_of, np.array([[20, 0], [0, 0]]))
    assert lab[0] == 7 and conf[0] == pytest.approx(2 * 0.8**3)
    cfg.inlier_floor = 18
    lab, conf = predict.vote(cfg, sims, idx, labels_of, np.array([[20, 0], [0, 0]]))
    assert conf[0] == pytest.approx(max(0.729 + 0.1, 2 * 0.512))
    from typing import get_args, get_type_hints

    assert set(get_args(get_type_hints(VoteConfig)["method"])) == set(predict.METHODS)  # checked at load
    lab, conf = predict.vote(cfg, np.zeros((2, 0)), np.zeros((2, 0), np.int64), labels_of)
    assert (lab == predict.NO_LABEL).all()


@pytest.mark.parametrize(
    "method,top_k,with_inliers", [("sum_power", 1, True), ("host", 3, True), ("sum_power", 2, False)]
)
def test_label_votes_explain_vote(method, top_k, with_inliers):
    """label_votes (what `landmarks show` draws) gives, for every row, vote()'s label as its
    largest total and vote()'s confidence as that total; each neighbour is counted once."""
    rng = np.random.default_rng(3)
    q, k, r = 40, 12, 6
    sims = -np.sort(-rng.uniform(0.2, 0.95, (q, k)), axis=1)
    idx = rng.integers(0, 30, (q, k))
    idx[0, 5:] = -1  # fewer neighbours than k
    labels = rng.integers(0, 5, 30)
    inl = rng.integers(0, 90, (q, r)) if with_inliers else None
    cfg = VoteConfig(method=method, neighbours=10, top_k=top_k)
    lab, conf = predict.vote(cfg, sims, idx, labels, inl)
    for row in range(q):
        votes = predict.label_votes(cfg, sims[row], idx[row], labels, None if inl is None else inl[row])
        best = max(votes, key=lambda a: (votes[a][0], -a))
        assert best == lab[row] and votes[best][0] == pytest.approx(conf[row])
        ranks = [rank for _, ranked in votes.values() for rank, _ in ranked]
        assert sorted(ranks) == [j + 1 for j in range(10) if idx[row, j] >= 0]


def test_nonlandmark_score_excludes_self_and_ranks_distractors_high():
    rng = np.random.default_rng(0)
    prod = rng.normal(size=(1, 16)) + 0.3 * rng.normal(size=(6, 16))  # a tight cluster of "products"
    land = rng.normal(size=(4, 16))
    x = np.concatenate([prod, land])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"id{i}" for i in range(10)]
    cfg = VoteConfig(top_k=3, suppression_k=5)
    s = predict.nonlandmark_score(cfg, Config().knn, x, ids, x[:6], ids[:6])
    assert s[:6].min() > s[6:].max()
    alone = predict.nonlandmark_score(cfg, Config().knn, x[:1], ids[:1], x[:1], ids[:1])
    assert alone[0] == 0.0  # its own copy does not count


def test_write_submission(tmp_path):
    from landmarks.evaluation.metrics import read_submission

    expected = ["aaa", "bbb", "ccc", "ddd"]
    out = predict.write_submission(
        tmp_path / "s/sub.csv", ["ccc", "aaa", "ddd"], [3, 12, -1], [0.5, 1.23456789, 0.9], expected
    )
    assert out.read_text() == "id,landmarks\naaa,12 1.234568\nbbb,\nccc,3 0.500000\nddd,\n"
    df = read_submission(out, expected)
    assert list(df["id"]) == expected
    with pytest.raises(LandmarksError, match="not in sample_submission"):
        predict.write_submission(tmp_path / "x.csv", ["zzz"], [1], [1.0], expected)
    with pytest.raises(LandmarksError, match="twice"):
        predict.write_submission(tmp_path / "x.csv", ["aaa", "aaa"], [1, 2], [1.0, 1.0], expected)
    assert not (tmp_path / "x.csv").exists()


def test_run_predict_end_to_end_and_deterministic(tmp_path, make_dataset):
    data, work = make_dataset(tmp_path)
    cfg = Config()
    cfg.verify.enabled = False
    cfg.vote.suppression = "test"
    cfg.vote.suppression_quantile = 0.45
    a = pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "a.csv").read_bytes()
    b = pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "b.csv").read_bytes()
    assert a == b
    lines = a.decode().splitlines()
    assert lines[0] == "id,landmarks" and lines[-1] == "fail0001,"
    rows = dict(line.split(",") for line in lines[1:])
    assert [rows[f"te{i:04d}"].split()[0] for i in range(4)] == ["100", "101", "102", "103"]
    lm = min(float(rows[f"te{i:04d}"].split()[1]) for i in range(4))
    dx = max(float(rows[f"dx{i:04d}"].split()[1]) for i in range(3))
    assert dx < lm  # suppression pushes the distractor cluster below the landmarks

    cfg.vote.suppression = "distractors"
    (tmp_path / "d.csv").write_text("id\ndx0000\ndx0001\n")
    cfg.vote.distractors_csv = str(tmp_path / "d.csv")
    pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("id\nnope0001\n")
    with pytest.raises(LandmarksError, match="no stored global features"):
        pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "c.csv")


def test_run_predict_rejects_foreign_features(tmp_path, make_dataset):
    data, work = make_dataset(tmp_path)
    (data / "train.csv").write_text("id,landmark_id\nzzz0,1\n")
    cfg = Config()
    cfg.verify.enabled = False
    with pytest.raises(LandmarksError, match="not in .*train.csv"):
        pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "a.csv")


def test_run_predict_with_verification_is_byte_identical(tmp_path, make_dataset, planted_pair):
    """Verification on planted local features, twice (jobs 2 then 1): identical submissions."""
    data, work = make_dataset(tmp_path, n_classes=2, per_class=2, n_distract=1)
    rng = np.random.default_rng(7)
    import h5py

    def reshard(split, n_local):
        path = work / f"features/{split}/shard-00000-of-00001.h5"
        with h5py.File(path) as f:
            ids, g = [i.decode() for i in f["ids"][:]], f["global"][:]
        pairs = [planted_pair(rng, n=80, shared=30, noise=0.2) for _ in range(n_local)]
        write_shard(path, ids, g, [p[0] for p in pairs], failures=[("fail0001", "x")] if split == "test" else ())

    reshard("train", 4)
    reshard("test", 3)
    cfg = Config()
    cfg.vote.suppression = "test"
    outs = []
    for jobs in (2, 1):
        cfg.verify.jobs = jobs
        WorkLayout(work).verified(cfg).unlink(missing_ok=True)
        outs.append(
            pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / f"{jobs}.csv").read_bytes()
        )
    assert outs[0] == outs[1]
    assert len(outs[0].decode().splitlines()) == 5
