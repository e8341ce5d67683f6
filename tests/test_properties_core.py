"""Property-based tests (hypothesis) of the array cores: chunked top-k equals global top-k, shard
buckets are stable, homographies round-trip, and the vote is invariant to neighbour order and to an
order-preserving relabelling."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landmarks import knn, predict
from landmarks.adapt import apply_h, homography_from_points, random_homography
from landmarks.config import AdaptConfig, KnnConfig, VoteConfig
from landmarks.shards import id_bucket

SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- knn: chunked top-k == global top-k -------------------------------------------------------------
@SETTINGS
@given(
    nq=st.integers(0, 12),
    ndb=st.integers(1, 30),
    dim=st.integers(1, 6),
    k=st.integers(1, 35),
    chunk=st.integers(1, 15),
    index=st.sampled_from(["exact", "numpy"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunked_top_k_equals_global_top_k(nq, ndb, dim, k, chunk, index, seed):
    """Small integer vectors: inner products are exact and ties are frequent; ties go to the lower index."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (nq, dim)).astype(np.float32)
    db = rng.integers(-2, 3, (ndb, dim)).astype(np.float32)
    sims, idx = knn.search(KnnConfig(index=index, chunk_size=chunk), q, db, k)
    kk = min(k, ndb)
    assert sims.shape == idx.shape == (nq, kk)
    full = q @ db.T
    for r in range(nq):
        want = sorted(range(ndb), key=lambda j: (-full[r, j], j))[:kk]
        assert idx[r].tolist() == want
        np.testing.assert_array_equal(sims[r], full[r, want])


# -- shard buckets ----------------------------------------------------------------------------------
ids = st.lists(st.from_regex(r"[A-Za-z0-9_-]{3,20}", fullmatch=True), min_size=1, max_size=30, unique=True)


@SETTINGS
@given(ids=ids, n=st.integers(1, 64), more=ids, seed=st.integers(0, 2**32 - 1))
def test_shard_bucket_of_an_id_depends_on_the_id_alone(ids, n, more, seed):
    b = id_bucket(ids, n)
    assert b.dtype == np.int64 and ((b >= 0) & (b < n)).all()
    perm = np.random.default_rng(seed).permutation(len(ids))
    np.testing.assert_array_equal(id_bucket([ids[k] for k in perm], n), b[perm])  # CSV order does not matter
    grown = ids + [m for m in more if m not in ids]  # appended rows do not move the others
    np.testing.assert_array_equal(id_bucket(grown, n)[: len(ids)], b)
    assert [int(id_bucket([i], n)[0]) for i in ids] == b.tolist()


# -- homographies -----------------------------------------------------------------------------------
@SETTINGS
@given(
    size=st.integers(32, 1024),
    jitter=st.lists(st.floats(-0.2, 0.2), min_size=8, max_size=8),
    pts=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=10),
)
def test_homography_from_points_round_trips(size, jitter, pts):
    src = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    dst = src + np.asarray(jitter).reshape(4, 2) * size  # a convex quadrilateral: non-degenerate
    h = homography_from_points(src, dst)
    np.testing.assert_allclose(apply_h(h, src), dst, atol=1e-6 * size)
    p = np.asarray(pts) * size
    np.testing.assert_allclose(apply_h(np.linalg.inv(h), apply_h(h, p)), p, atol=1e-6 * size)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(64, 512),
    rotation=st.floats(0, 180),
    perspective=st.floats(0, 0.15),
    shift=st.floats(0, 0.3),
    scales=st.tuples(st.floats(0.5, 2), st.floats(0.5, 2)).map(sorted),
)
def test_random_homography_maps_the_view_corners_and_inverts(seed, size, rotation, perspective, shift, scales):
    ac = AdaptConfig(
        max_rotation=rotation, perspective=perspective, max_shift=shift, scale_min=scales[0], scale_max=scales[1]
    )
    h = random_homography(np.random.default_rng(seed), size, ac)
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    back = apply_h(np.linalg.inv(h), apply_h(h, corners))
    np.testing.assert_allclose(back, corners, atol=1e-6 * size)
    assert np.isfinite(h).all() and abs(np.linalg.det(h)) > 0


# -- vote invariances -------------------------------------------------------------------------------
votes = st.builds(
    VoteConfig,
    method=st.sampled_from(["sum_power", "host"]),
    neighbours=st.integers(1, 12),
    top_k=st.integers(1, 4),
    power=st.sampled_from([1.0, 3.0, 8.0]),
    confidence=st.sampled_from(["score", "margin"]),
    inlier_floor=st.integers(0, 5),
)


@st.composite
def neighbours(draw):
    q, n, n_train = draw(st.integers(1, 4)), draw(st.integers(1, 10)), draw(st.integers(1, 8))
    sims = np.array(draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]), min_size=q * n, max_size=q * n)))
    idx = np.array(draw(st.lists(st.integers(0, n_train - 1), min_size=q * n, max_size=q * n)))
    labels = np.array(draw(st.lists(st.integers(0, 5), min_size=n_train, max_size=n_train)), np.int64)
    inl = np.array(draw(st.lists(st.integers(0, 90), min_size=q * n, max_size=q * n)))
    return sims.reshape(q, n), idx.reshape(q, n), labels, inl.reshape(q, n)


@SETTINGS
@given(cfg=votes, nb=neighbours(), seed=st.integers(0, 2**32 - 1), with_inliers=st.booleans())
def test_vote_ignores_the_order_of_the_voting_neighbours(cfg, nb, seed, with_inliers):
    sims, idx, labels, inl = nb
    inl = inl if with_inliers else None
    n = min(cfg.neighbours, sims.shape[1])
    lab, conf = predict.vote(cfg, sims, idx, labels, inl)
    perm = np.concatenate([np.random.default_rng(seed).permutation(n), np.arange(n, sims.shape[1])])
    lab2, conf2 = predict.vote(cfg, sims[:, perm], idx[:, perm], labels, None if inl is None else inl[:, perm])
    np.testing.assert_array_equal(lab, lab2)
    np.testing.assert_allclose(conf, conf2, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(cfg=votes, nb=neighbours(), shift=st.integers(0, 10**6), stretch=st.integers(1, 1000))
def test_vote_follows_an_order_preserving_relabelling(cfg, nb, shift, stretch):
    """Labels are names: renaming them (keeping their order, which breaks ties) renames the answer."""
    sims, idx, labels, inl = nb
    lab, conf = predict.vote(cfg, sims, idx, labels, inl)
    lab2, conf2 = predict.vote(cfg, sims, idx, labels * stretch + shift, inl)
    np.testing.assert_array_equal(lab2, np.where(lab == predict.NO_LABEL, predict.NO_LABEL, lab * stretch + shift))
    np.testing.assert_array_equal(conf, conf2)
