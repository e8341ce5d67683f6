"""whiten: learned whitening from matching pairs (Lw), mined positives, the query feature
transformation, and the whiten -> knn stages with them."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks import knn, whiten
from landmarks.config import Config
from landmarks.store import load_npz, write_shard
from landmarks.utils import LandmarksError
from landmarks.utils.layout import WorkLayout

D = 32
NUISANCE = 4  # the first NUISANCE axes carry the within-landmark variation (viewpoint, light)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _landmarks(rng, n_classes, per_class, noise=1.0):
    """Rows of n_classes landmarks: a class centre in the other axes plus strong noise in the
    nuisance axes (larger than the distance between landmarks) and weak noise everywhere."""
    centres = np.zeros((n_classes, D))
    centres[:, NUISANCE:] = rng.normal(size=(n_classes, D - NUISANCE)) * 0.35
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + 0.05 * rng.normal(size=(len(labels), D))
    x[:, :NUISANCE] += noise * rng.normal(size=(len(labels), NUISANCE))
    return _unit(x), labels


def _nn_accuracy(db, db_labels, q, q_labels):
    return float(np.mean(db_labels[np.argmax(q @ db.T, axis=1)] == q_labels))


def _unseen(seed=1):
    """Landmarks the fit never saw: one database photo and three queries each."""
    rng = np.random.default_rng(seed)
    x, labels = _landmarks(rng, 40, 4)
    first = np.r_[True, labels[1:] != labels[:-1]]
    return x[first], labels[first], x[~first], labels[~first]


def test_lw_suppresses_within_landmark_directions_on_unseen_landmarks():
    x, labels = _landmarks(np.random.default_rng(0), 30, 5)
    within, dof = whiten.class_differences(x, labels)
    assert dof == 30 * 4
    w = whiten.fit_lw(x, within, dof, shrinkage=0.1)
    db, db_labels, q, q_labels = _unseen()
    raw = _nn_accuracy(db, db_labels, q, q_labels)
    lw = _nn_accuracy(whiten.apply_global(w, db), db_labels, whiten.apply_global(w, q), q_labels)
    assert raw < 0.6 and lw > raw + 0.25, (raw, lw)
    # the nuisance axes are what Lw shrinks most: their share of the projection's energy is small
    proj = w["g_proj"]
    share = np.linalg.norm(proj[:NUISANCE]) ** 2 / np.linalg.norm(proj) ** 2
    assert share < 0.2 * NUISANCE / D


def test_pair_differences_match_class_differences_for_pairs():
    x, labels = _landmarks(np.random.default_rng(2), 10, 2)
    a, b = np.arange(0, 20, 2), np.arange(1, 20, 2)
    r1, n1 = whiten.class_differences(x, labels)
    r2, n2 = whiten.pair_differences(x, a, b)
    assert n1 == n2 == 10
    np.testing.assert_allclose(r1.T @ r1 / n1, r2.T @ r2 / n2, atol=1e-10)
    assert whiten.class_differences(x, np.arange(20))[1] == 0  # no class with two rows


def test_lw_projection_is_the_inverse_square_root_of_the_shrunk_covariance():
    """The low-rank route (fewer pair rows than dimensions) and the full one agree with the
    textbook S^(-1/2), S = (1 - s) C + s tr(C) / D I."""
    rng = np.random.default_rng(8)
    x = _unit(rng.normal(size=(50, D)))
    for m in (10, 80):  # SVD route, eigh route
        rows = rng.normal(size=(m, D)) * np.linspace(2, 0.1, D)
        w = whiten.fit_lw(x, rows, m, shrinkage=0.2)
        c = rows.T @ rows / m
        s = 0.8 * c + 0.2 * np.trace(c) / D * np.eye(D)
        eig, vec = np.linalg.eigh(s)
        np.testing.assert_allclose(w["g_proj"], (vec / np.sqrt(eig)) @ vec.T, rtol=1e-4, atol=1e-4)


def test_lw_shapes_determinism_and_unit_rows():
    x, labels = _landmarks(np.random.default_rng(3), 12, 3)
    within, dof = whiten.class_differences(x, labels)
    w1 = whiten.fit_lw(x, within, dof, dim=8)
    w2 = whiten.fit_lw(x.copy(), within.copy(), dof, dim=8)
    assert w1["g_mean"].shape == (D,) and w1["g_proj"].shape == (D, 8)
    np.testing.assert_array_equal(w1["g_proj"], w2["g_proj"])
    y = whiten.apply_global(w1, x)
    assert y.shape == (len(x), 8) and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    assert whiten.apply_global(w1, x[:0]).shape == (0, 8)
    # with `dim` the top principal axes of the whitened rows: their variances decrease
    var = np.var((x - w1["g_mean"]) @ w1["g_proj"], axis=0)
    assert np.all(np.diff(var) <= 1e-9)
    with pytest.raises(LandmarksError):
        whiten.fit_lw(x[:1], within, dof)
    with pytest.raises(LandmarksError):
        whiten.fit_lw(x, within[:0], 0)


def test_mine_pairs_keeps_mutual_neighbours_above_the_threshold():
    base = _unit(np.eye(6)[:, :6] + 0.0)
    twins = _unit(base + 0.1 * np.eye(6)[[1, 2, 3, 4, 5, 0]])  # each base row's near twin
    x = np.concatenate([base[:3], twins[:3], base[3:4]])  # rows 0-2 pair with 3-5; row 6 alone
    a, b = whiten.mine_pairs(x, k=1, min_sim=0.5)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 3), (1, 4), (2, 5)]
    a, b = whiten.mine_pairs(x, k=1, min_sim=0.999)
    assert len(a) == 0 and len(b) == 0
    a2, b2 = whiten.mine_pairs(x, k=3, min_sim=0.5)
    assert set(zip(a2.tolist(), b2.tolist())) == {(0, 3), (1, 4), (2, 5)}


def test_query_transform_moves_queries_toward_their_landmark():
    x, labels = _landmarks(np.random.default_rng(4), 30, 5)
    src, dst = whiten.class_targets(x, labels)
    assert src.shape == dst.shape == (150, D)
    qt = whiten.fit_query_transform(src, dst, l2=0.1)
    assert qt["q_map"].shape == (D, D)
    db, db_labels, q, q_labels = _unseen(seed=5)
    own = db[np.searchsorted(db_labels, q_labels)]
    before = np.mean(np.sum(q * own, axis=1))
    moved = whiten.apply_query(qt, q)
    after = np.mean(np.sum(moved * own, axis=1))
    assert after > before + 0.05, (before, after)
    assert np.allclose(np.linalg.norm(moved, axis=1), 1, atol=1e-5)
    assert _nn_accuracy(db, db_labels, moved, q_labels) > _nn_accuracy(db, db_labels, q, q_labels)
    # no pairs: the identity; a strong ridge: close to it
    np.testing.assert_array_equal(whiten.fit_query_transform(src[:0], dst[:0])["q_map"], np.eye(D, dtype=np.float32))
    strong = whiten.fit_query_transform(src, dst, l2=1e5)["q_map"]
    assert np.abs(strong - np.eye(D)).max() < 1e-3
    a, b = np.array([0, 5]), np.array([1, 6])
    ps, pd_ = whiten.pair_targets(x, a, b)
    np.testing.assert_array_equal(ps[:2], x[a]) and np.testing.assert_array_equal(pd_[:2], x[b])


def test_fit_global_learned_options():
    x, labels = _landmarks(np.random.default_rng(6), 10, 3)
    cfg = Config()
    cfg.whiten.global_lw = True
    w = whiten.fit_global_learned(cfg, x, labels)
    assert set(w) == {"g_mean", "g_proj"} and w["g_proj"].shape == (D, D)
    # too few positives (every train landmark has one photo): Lw at full shrinkage, centring alone
    w1 = whiten.fit_global_learned(cfg, x, np.arange(len(x)))
    np.testing.assert_array_equal(w1["g_proj"], np.eye(D, dtype=np.float32))
    np.testing.assert_allclose(w1["g_mean"], x.mean(axis=0), atol=1e-6)
    full = whiten.fit_lw(x, *whiten.class_differences(x, labels), shrinkage=1.0)
    np.testing.assert_allclose(full["g_proj"] / full["g_proj"][0, 0], np.eye(D), atol=1e-5)
    cfg.whiten.query_transform = True
    assert set(whiten.fit_global_learned(cfg, x, labels)) == {"g_mean", "g_proj", "q_map"}
    cfg.whiten.positives = "mined"
    cfg.whiten.mine_min_sim = 0.0
    assert "q_map" in whiten.fit_global_learned(cfg, x, None)
    cfg.whiten.positives = "labels"
    with pytest.raises(LandmarksError, match="labels"):
        whiten.fit_global_learned(cfg, x, None)
    cfg.whiten.global_pca = True
    with pytest.raises(LandmarksError, match="exclusive"):
        whiten.fit_global_learned(cfg, x, labels)


def _dataset(tmp_path, x, labels, q):
    d = tmp_path / "data"
    d.mkdir()
    ids = [f"tr{i:04d}" for i in range(len(x))]
    (d / "train.csv").write_text("id,landmark_id\n" + "".join(f"{i},{c}\n" for i, c in zip(ids, labels)))
    write_shard(tmp_path / "features/train/shard-00000-of-00001.h5", ids, x, None)
    write_shard(tmp_path / "features/test/shard-00000-of-00001.h5", [f"te{i:04d}" for i in range(len(q))], q, None)
    return d


def _stage_split(tmp_path, seed):
    """20 landmarks x 4 train rows, one query near each landmark's first row, written as a dataset
    and feature stores: (rng, x, labels, q, data_dir, work)."""
    rng = np.random.default_rng(seed)
    x, labels = _landmarks(rng, 20, 4)
    q = _unit(x[::4] + 0.05 * rng.normal(size=(20, D)))
    return rng, x, labels, q, _dataset(tmp_path, x, labels, q), WorkLayout(tmp_path)


def test_whiten_and_knn_stages_with_lw_and_query_transform(tmp_path):
    rng, x, labels, q, data_dir, work = _stage_split(tmp_path, 7)
    cfg = Config()
    cfg.knn.k = 3
    cfg.knn.dba_k = 0
    cfg.whiten.global_lw = True
    cfg.whiten.query_transform = True
    assert whiten.is_on(cfg) and whiten.global_on(cfg)
    with pytest.raises(LandmarksError, match="data_dir"):
        whiten.run_whiten(cfg, work.features("train"), work.whiten(cfg))
    out = whiten.run_whiten(cfg, work.features("train"), work.whiten(cfg), data_dir)
    w = whiten.load_whiten(cfg, out, work.features("train"), "global")
    assert {"g_mean", "g_proj", "q_map"} <= set(w)
    assert whiten.load_whiten(cfg, out, work.features("train"), "local") is None
    z = load_npz(knn.run_knn(cfg, work.features("train"), work.features("test"), work.knn(cfg), out))
    top = np.array([int(str(t)[2:]) for t in z["train_ids"][z["idx"][:, 0]]])
    assert np.mean(labels[top] == labels[::4]) >= 0.9
    # the test side goes through the query transformation, the train side does not
    expected = np.sort(whiten.apply_query(w, q) @ whiten.apply_global(w, x).T, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(z["sims"], expected, atol=1e-5)
    assert not np.allclose(z["sims"], np.sort(whiten.apply_global(w, q) @ whiten.apply_global(w, x).T)[:, ::-1][:, :3])
    cfg.whiten.positives = "mined"  # another setting: its own file, no labels needed
    out2 = whiten.run_whiten(cfg, work.features("train"), work.whiten(cfg))
    assert out2 != out and out2.exists()


def test_label_positives_are_learned_from_a_seeded_sample_of_a_big_train_split(tmp_path, monkeypatch, caplog):
    """Above whiten.LABEL_SAMPLE train images (GLDv2), Lw learns from a seeded sample with its own
    labels: the labels follow the sampled ids, and the fit is the one of that sample."""
    rng, x, labels, q, data_dir, work = _stage_split(tmp_path, 3)
    cfg = Config()
    cfg.whiten.global_lw = True
    monkeypatch.setattr(whiten, "LABEL_SAMPLE", 50)
    seen = {}
    real = whiten.fit_global_learned

    def spy(cfg_, xs, ls):
        seen["x"], seen["labels"] = xs, ls
        return real(cfg_, xs, ls)

    monkeypatch.setattr(whiten, "fit_global_learned", spy)
    caplog.set_level("INFO", logger="landmarks.whiten")
    whiten.run_whiten(cfg, work.features("train"), work.whiten(cfg), data_dir)
    assert "seeded sample of 50 of 80" in caplog.text
    assert seen["x"].shape == (50, D) and len(seen["labels"]) == 50
    # each sampled row keeps its own label: rows of one label are the same landmark (near each other)
    xs, ls = np.asarray(seen["x"]), np.asarray(seen["labels"])
    same = [xs[i] @ xs[j] for i in range(50) for j in range(i + 1, 50) if ls[i] == ls[j]]
    other = [xs[i] @ xs[j] for i in range(50) for j in range(i + 1, 50) if ls[i] != ls[j]]
    assert same and np.mean(same) > np.mean(other) + 0.3


def test_relabelled_train_split_refits_the_whitening_and_reruns_knn(tmp_path, caplog):
    """Lw reads the train labels: a train.csv with other labels (same features) refits it, and the
    knn output, whose inputs include the fitted whitening's stamp, is redone; the same labels
    rewritten keep both."""
    rng, x, labels, q, data_dir, work = _stage_split(tmp_path, 5)
    cfg = Config()
    cfg.knn.k, cfg.knn.dba_k, cfg.whiten.global_lw = 3, 0, True
    train, test = work.features("train"), work.features("test")

    def run():
        out = whiten.run_whiten(cfg, train, work.whiten(cfg), data_dir)
        return out, knn.run_knn(cfg, train, test, work.knn(cfg), out)

    w_out, k_out = run()
    w_fp, proj = load_npz(w_out)["fingerprint"], load_npz(w_out)["g_proj"]
    k_fp = load_npz(k_out)["fingerprint"]
    csv = data_dir / "train.csv"
    csv.write_text(csv.read_text())  # the same labels, a new mtime: nothing is redone
    caplog.set_level("INFO", logger="landmarks")
    run()
    assert "whiten: " in caplog.text and "is up to date" in caplog.text
    assert load_npz(k_out)["fingerprint"] == k_fp
    shuffled = rng.permutation(labels)  # relabelled: other positives
    ids = [f"tr{i:04d}" for i in range(len(x))]
    csv.write_text("id,landmark_id\n" + "".join(f"{i},{c}\n" for i, c in zip(ids, shuffled)))
    w2, k2 = run()
    assert (w2, k2) == (w_out, k_out)  # same settings, same file names
    assert load_npz(w2)["fingerprint"] != w_fp and load_npz(k2)["fingerprint"] != k_fp
    assert not np.allclose(load_npz(w2)["g_proj"], proj)  # refitted on the new positives
    # the knn stage refuses a whitening fitted on other features (checked at load)
    write_shard(train / "shard-00000-of-00001.h5", [f"tr{i:04d}" for i in range(len(x))], x[::-1].copy(), None)
    with pytest.raises(LandmarksError, match="other train features"):
        whiten.load_whiten(cfg, w2, train, "global")
