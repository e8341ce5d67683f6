"""calibrate: a-contrario significance, the monotone logistic fit, the calibrated vote and its guard,
verify's evidence, and the hard protocol's rank figures."""

from __future__ import annotations

import numpy as np

from landmarks import calibrate, predict, verify
from landmarks.config import Config, VerifyConfig, VoteConfig
from landmarks.evaluation import hard


def test_nfa_tells_noise_from_a_few_consistent_matches():
    area = 1024 * 768
    noise, strong, many = calibrate.log10_nfa([7, 7, 40], [600, 12, 600], [area] * 3, 4.0)
    assert noise > 0  # 7 inliers among 600 matches: expected by chance
    assert strong < 0  # 7 among 12: not
    assert many < strong
    k = np.arange(5, 60)
    assert np.all(np.diff(calibrate.log10_nfa(k, np.full(len(k), 300), np.full(len(k), area), 4.0)) < 0)
    # at most the minimal sample proves nothing, whatever the matches
    assert calibrate.log10_nfa([4], [4], [area], 4.0)[0] > 0


def test_logistic_fit_is_monotone_and_separates():
    rng = np.random.default_rng(0)
    n = 1500
    same = rng.random(n) < 0.2
    sims = np.where(same, rng.normal(0.7, 0.1, n), rng.normal(0.45, 0.1, n))
    k = np.where(same, rng.poisson(30, n), rng.poisson(6, n))
    ev = np.stack([k, k + rng.poisson(200, n), rng.random(n), np.full(n, 7e5)], 1)
    cfg = Config()
    model = calibrate.fit_pairs(cfg, sims, ev, same)
    mono = [j for j, f in enumerate(calibrate.FEATURES) if f in calibrate.MONOTONE]
    assert np.all(model["coef"][mono] >= 0)
    p = calibrate.candidate_probability(model, sims, ev, cfg.verify)
    assert p[same].mean() > 0.8 and p[~same].mean() < 0.1
    # more inliers among the same tentative matches never lower the probability
    ev2 = ev.copy()
    ev2[:, 0] += 5
    assert np.all(calibrate.candidate_probability(model, sims, ev2, cfg.verify) >= p - 1e-12)
    # features may be restricted: the unused ones get weight 0
    cfg.calibrate.features = ("sim", "significance")
    m2 = calibrate.fit_pairs(cfg, sims, ev, same)
    assert np.count_nonzero(m2["coef"]) <= 2


def test_calibrated_vote_guard_keeps_the_global_winner_without_significant_evidence():
    idx = np.array([[0, 1, 2]])
    labels = np.array([5, 7, 7])
    probs = np.array([[0.4, 0.6, 0.1]])
    weak = np.array([[0.0, -2.0, -3.0]])  # the challenger's inliers are not significant
    strong = np.array([[0.0, 4.0, -3.0]])
    cfg = VoteConfig(method="calibrated", guard_significance=0.0)
    lab, conf = predict.vote_calibrated(cfg, idx, labels, probs, weak)
    assert lab[0] == 5 and conf[0] == 0.4
    lab, conf = predict.vote_calibrated(cfg, idx, labels, probs, strong)
    assert lab[0] == 7 and conf[0] == 0.6
    cfg.guard_significance = -5.0  # no guard
    assert predict.vote_calibrated(cfg, idx, labels, probs, weak)[0][0] == 7
    cfg.combine, cfg.top_k = "noisy_or", 2
    lab, conf = predict.vote_calibrated(cfg, idx, labels, probs, strong)
    assert lab[0] == 7 and np.isclose(conf[0], 1 - 0.4 * 0.9)


def test_pair_evidence_counts_matches_and_spread(planted_pair):
    rng = np.random.default_rng(3)
    q, t, other = planted_pair(rng)
    cfg = VerifyConfig(mutual_min_sim=0.5)
    ev = verify.verify_evidence(cfg, q, [t, other, None])
    assert ev.shape == (3, len(verify.EVIDENCE))
    assert ev[0, 0] >= 100 and ev[0, 1] >= ev[0, 0] and ev[0, 2] > 0.5 and ev[0, 3] > 0
    assert ev[1, 0] == 0 and np.all(ev[2] == 0)
    np.testing.assert_array_equal(verify.verify_image(cfg, q, [t, other, None]), ev[:, 0].astype(np.int32))


def test_rank_figures_count_wrong_predictions_above_correct_ones():
    truth = np.array(["1", "1", "2", "", "", ""])
    labels = np.array([1, 1, 3, 4, 4, predict.NO_LABEL])
    conf = np.array([0.9, 0.5, 0.8, 0.1, 0.95, 0.99])
    r = hard.rank_figures(truth, labels, conf)
    # correct: 0.9, 0.5 (median 0.7); wrong: 0.8 (wrong label), 0.1 and 0.95 (non-landmarks); none for the last
    assert np.isclose(r["above_median"], 2 / 3) and np.isclose(r["nonlm_above_median"], 0.5)
