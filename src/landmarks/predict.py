"""Voting: kNN neighbours (+ verified inliers) -> one label and confidence per test image.

Methods (cfg.vote.method):
- ``host``: the Landmark Recognition 2020 host baseline: each of the nearest ``neighbours`` train
  images scores min(inliers, cap)/cap + global similarity; per label the best ``top_k`` scores are
  summed; the label with the largest sum wins, the sum is the confidence.
- ``sum_power`` (default): each neighbour scores max(sim, 0)**power + inlier_weight *
  min(max(inliers - floor, 0), cap)/cap; per label the best ``top_k`` are summed.  The power sharpens the gap
  between near duplicates of one landmark and merely similar-looking images.

Non-landmark suppression (cfg.vote.suppression): a set of images known or presumed to show no
landmark ('distractors': a CSV of ids whose global features are stored; 'test': test images whose
best train similarity is lowest) scores like one extra label; a test image's confidence is
lowered by weight x that score, so confident predictions on non-landmarks drop in the ranking.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from landmarks import calibrate, whiten
from landmarks.calibrate import uses_calibration
from landmarks.datasets import data
from landmarks.datasets.data import check_label, id_problem, read_submission
from landmarks.knn import search
from landmarks.store import FeatureStore, load_npz
from landmarks.utils import LandmarksError, atomic_path
from landmarks.utils.layout import WorkLayout
from landmarks.verify import verify_fingerprint

log = logging.getLogger(__name__)

NO_LABEL = -1  # "no prediction" in vote()'s int64 output; never a label: labels are >= 0 (data.py rule, checked here)


def _host_scores(cfg, sims: np.ndarray) -> tuple[np.ndarray, float, int]:
    return sims.copy(), 1.0, 0


def _sum_power_scores(cfg, sims: np.ndarray) -> tuple[np.ndarray, float, int]:
    return np.clip(sims, 0.0, None) ** cfg.power, cfg.inlier_weight, max(0, int(cfg.inlier_floor))


def _calibrated_fallback_scores(cfg, sims: np.ndarray) -> tuple[np.ndarray, float, int]:
    """'calibrated' without a calibration (global only): sim ** power, never an added inlier term."""
    return np.clip(sims, 0.0, None) ** cfg.power, 0.0, 0


# Voting methods: similarities -> (base scores, inlier weight, inlier floor).  Keys are the choices of
# config.VoteConfig.method (a test keeps them equal).  'calibrated' votes with vote_calibrated() when
# a calibration and the verified evidence are at hand.
METHODS = {"host": _host_scores, "sum_power": _sum_power_scores, "calibrated": _calibrated_fallback_scores}


def _neighbour_scores(cfg, sims: np.ndarray, inliers: np.ndarray | None) -> np.ndarray:
    """Score of each of the first `n` neighbours, [q, n]."""
    base, weight, floor = METHODS[cfg.method](cfg, np.asarray(sims, np.float64))
    if inliers is not None and inliers.size:
        r = min(inliers.shape[1], base.shape[1])
        cap = max(1, int(cfg.inlier_cap))
        base[:, :r] += weight * np.minimum(np.clip(inliers[:, :r] - floor, 0, None), cap) / cap
    return base


def gate_inliers(cfg, inliers: np.ndarray | None, evidence: np.ndarray | None) -> np.ndarray | None:
    """Inliers that count in the score: with vote.significance_gate > -5, a candidate whose inlier set
    is not significant (-log10 NFA below the gate: chance inliers) counts 0 inliers."""
    if inliers is None or evidence is None or cfg.vote.significance_gate <= -5:
        return inliers

    sig = calibrate.significance(evidence[:, : inliers.shape[1]], cfg.verify)
    return np.where(sig >= cfg.vote.significance_gate, inliers, 0).astype(inliers.dtype)


def vote(
    cfg, knn_sims: np.ndarray, knn_idx: np.ndarray, train_labels: np.ndarray, inliers: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Labels ([q] int64, NO_LABEL = none) and confidences ([q] float64) from the neighbours.

    `cfg` is the VoteConfig; knn_idx indexes `train_labels`; `inliers` [q, R] covers the first R
    neighbours (None = global only).  Ties between labels go to the smaller label id.
    """
    q = knn_sims.shape[0]
    n = min(int(cfg.neighbours), knn_sims.shape[1])
    labels = np.full(q, NO_LABEL, np.int64)
    conf = np.zeros(q, np.float64)
    if n <= 0 or q == 0:
        return labels, conf
    if inliers is not None and inliers.shape[0] != q:
        raise LandmarksError(f"vote: inliers have {inliers.shape[0]} rows, knn has {q}")
    scores = _neighbour_scores(cfg, knn_sims[:, :n], None if inliers is None else inliers[:, :n])
    idx = knn_idx[:, :n]
    train_labels = np.asarray(train_labels, np.int64)
    if train_labels.size and train_labels.min() < 0:
        raise LandmarksError(f"vote: train labels must be >= 0 (got {int(train_labels.min())})")
    top_k = max(1, int(cfg.top_k))
    for r in range(q):
        per: dict[int, list[float]] = {}
        for s, j in zip(scores[r], idx[r]):
            if j < 0:
                continue
            per.setdefault(int(train_labels[j]), []).append(float(s))
        if not per:
            continue
        best_label, best, second = NO_LABEL, -np.inf, 0.0
        for lab in sorted(per):
            total = float(np.sum(sorted(per[lab], reverse=True)[:top_k]))
            if total > best:
                best_label, best, second = lab, total, max(best, second)
            else:
                second = max(second, total)
        labels[r], conf[r] = best_label, best - second if cfg.confidence == "margin" else best
    return labels, conf


def vote_calibrated(
    cfg,
    knn_idx: np.ndarray,
    train_labels: np.ndarray,
    probs: np.ndarray,
    significance: np.ndarray | None = None,
    fixed_labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidences from calibrated candidate probabilities `probs` [q, n] (first n
    neighbours of knn_idx): a label's probability is its best candidate's (combine=max) or the
    noisy-OR of its top_k; the best label wins and its probability is the confidence.

    Guard: a label other than the nearest neighbour's wins only when its best candidate's
    `significance` (-log10 NFA, [q, n]) reaches cfg.guard_significance; otherwise the nearest
    neighbour's label stays, with its own probability.  `fixed_labels` [q] (NO_LABEL = none): the
    labels are given; each gets its probability as the confidence."""
    q, n = probs.shape
    labels = np.full(q, NO_LABEL, np.int64)
    conf = np.zeros(q, np.float64)
    idx = knn_idx[:, :n]
    if fixed_labels is not None:  # the label is decided elsewhere: its probability is the confidence
        train_labels = np.asarray(train_labels, np.int64)
        for r in range(q):
            if fixed_labels[r] == NO_LABEL:
                continue
            ps = [float(probs[r, j]) for j in range(n) if idx[r, j] >= 0 and train_labels[idx[r, j]] == fixed_labels[r]]
            if ps:
                ps = sorted(ps, reverse=True)[: max(1, int(cfg.top_k))]
                labels[r] = fixed_labels[r]
                conf[r] = ps[0] if cfg.combine == "max" else 1.0 - float(np.prod([1.0 - p for p in ps]))
        return labels, conf
    train_labels = np.asarray(train_labels, np.int64)
    top_k = max(1, int(cfg.top_k))
    for r in range(q):
        per: dict[int, list[tuple[float, float]]] = {}
        for j in range(n):
            t = idx[r, j]
            if t < 0:
                continue
            sig = np.inf if significance is None else float(significance[r, j])
            per.setdefault(int(train_labels[t]), []).append((float(probs[r, j]), sig))
        if not per:
            continue
        score, sig_of = {}, {}
        for lab, items in per.items():
            ps = sorted((p for p, _ in items), reverse=True)[:top_k]
            score[lab] = ps[0] if cfg.combine == "max" else 1.0 - float(np.prod([1.0 - p for p in ps]))
            sig_of[lab] = max(s for _, s in items)
        best = min(score, key=lambda lab: (-score[lab], lab))
        first = int(train_labels[idx[r, 0]]) if idx[r, 0] >= 0 else best
        if best != first and first in score and sig_of[best] < cfg.guard_significance:
            best = first
        labels[r], conf[r] = best, score[best]
    return labels, conf


def calibrated_vote(
    cfg, knn_sims: np.ndarray, knn_idx: np.ndarray, train_labels: np.ndarray, evidence: np.ndarray, model: dict
) -> tuple[np.ndarray, np.ndarray]:
    """vote.method=calibrated: P(same landmark) of the first min(neighbours, R) candidates from
    their similarity and verified evidence [q, R, 4] (calibrate.candidate_probability), then
    vote_calibrated()."""

    n = min(int(cfg.vote.neighbours), knn_sims.shape[1], evidence.shape[1])
    if n <= 0:
        return np.full(knn_sims.shape[0], NO_LABEL, np.int64), np.zeros(knn_sims.shape[0])
    ev = evidence[:, :n]
    probs = calibrate.candidate_probability(model, knn_sims[:, :n], ev, cfg.verify)
    sig = calibrate.significance(ev, cfg.verify)
    fixed = None
    if cfg.vote.calibrated_label == "score":
        import copy

        vc = copy.copy(cfg.vote)
        vc.method = "sum_power"
        fixed, _ = vote(vc, knn_sims, knn_idx, train_labels, evidence[..., 0].astype(np.int32))
    return vote_calibrated(cfg.vote, knn_idx[:, :n], train_labels, probs, sig, fixed)


def label_votes(
    cfg, sims: np.ndarray, idx: np.ndarray, train_labels: np.ndarray, inliers: np.ndarray | None = None
) -> dict[int, tuple[float, list[tuple[int, float]]]]:
    """One test row's votes, for diagnostics (``landmarks show``): label -> (its total, the
    (rank, score) of each of its neighbours, best first).  The total is what `vote` compares: the
    sum of the best ``top_k`` scores; the largest total wins (ties: the smaller label)."""
    n = min(int(cfg.neighbours), len(sims))
    if n <= 0:
        return {}
    inl = None if inliers is None else np.asarray(inliers)[None, :n]
    scores = _neighbour_scores(cfg, np.asarray(sims)[None, :n], inl)[0]
    per: dict[int, list[tuple[int, float]]] = {}
    for rank, (s, j) in enumerate(zip(scores, np.asarray(idx)[:n]), start=1):
        if j >= 0:
            per.setdefault(int(train_labels[j]), []).append((rank, float(s)))
    top_k = max(1, int(cfg.top_k))
    out = {}
    for lab in sorted(per):
        ranked = sorted(per[lab], key=lambda t: -t[1])
        out[lab] = (float(np.sum(sorted((s for _, s in ranked), reverse=True)[:top_k])), ranked)
    return out


# -- non-landmark suppression --------------------------------------------------------------------
def nonlandmark_score(
    cfg_vote, cfg_knn, queries: np.ndarray, query_ids: list[str], pool: np.ndarray, pool_ids: list[str]
) -> np.ndarray:
    """Per query: the vote score the non-landmark pool gets as one label (self matches excluded)."""

    q = queries.shape[0]
    if q == 0 or pool.shape[0] == 0:
        return np.zeros(q, np.float64)
    k = min(max(int(cfg_vote.suppression_k), 1) + 1, pool.shape[0])
    sims, idx = search(cfg_knn, queries, pool, k)
    pool_ids_arr = np.asarray(pool_ids, dtype=object)
    self_hit = pool_ids_arr[idx] == np.asarray(query_ids, dtype=object)[:, None]
    sims = np.where(self_hit, -np.inf, sims)
    sims = -np.sort(-sims, axis=1)[:, : k - 1 if k > 1 else 1]
    sims = np.where(np.isfinite(sims), sims, 0.0)
    top = sims[:, : max(1, int(cfg_vote.top_k))]
    if cfg_vote.method == "host":
        return np.clip(top, 0, None).sum(axis=1)
    return (np.clip(top, 0.0, None) ** cfg_vote.power).sum(axis=1)


def _global_matrix(cfg, directory: Path, whitening: dict | None) -> tuple[list[str], np.ndarray]:
    """Global descriptors of one feature directory, PCA-whitened when whiten.global_pca is on."""

    ids, x = FeatureStore(directory).global_matrix()
    if whitening is not None and len(ids):
        x = whiten.apply_global(whitening, x)
    return ids, x


def suppression_penalty(
    cfg, features_root: str | Path, test_ids: list[str], best_train_sim: np.ndarray, whitening: dict | None = None
) -> np.ndarray:
    """weight x non-landmark score per test image (zeros when suppression is 'none').

    `features_root` holds the feature directories (test, and distractors/train for 'distractors');
    `whitening` is the fitted whitening when whiten.global_pca is on."""
    vc = cfg.vote
    q = len(test_ids)
    if vc.suppression == "none" or q == 0:
        return np.zeros(q, np.float64)
    features_root = Path(features_root)
    ids, x = _global_matrix(cfg, features_root / "test", whitening)
    pos = {i: r for r, i in enumerate(ids)}
    if any(i not in pos for i in test_ids):
        raise LandmarksError("suppression: knn test ids are missing from the test store; rerun `landmarks knn`")
    queries = x[[pos[i] for i in test_ids]]
    if vc.suppression == "test":
        best = np.asarray(best_train_sim, np.float64)
        thr = (
            vc.suppression_max_sim if vc.suppression_max_sim > 0 else float(np.quantile(best, vc.suppression_quantile))
        )
        mask = best <= thr
        pool_ids = [i for i, m in zip(test_ids, mask) if m]
        pool = queries[mask]
        log.info("suppression: %d test images (best train sim <= %.3f) form the non-landmark pool", len(pool_ids), thr)
    else:
        pool_ids, pool = _distractor_pool(cfg, features_root, whitening)
    return vc.suppression_weight * nonlandmark_score(vc, cfg.knn, queries, list(test_ids), pool, pool_ids)


def _read_distractor_ids(cfg) -> tuple[Path, list[str]]:
    """(path, ids) of cfg.vote.distractors_csv, ids checked by the id rule."""

    path = Path(cfg.vote.distractors_csv)
    if not cfg.vote.distractors_csv or not path.exists():
        raise LandmarksError(f"vote.suppression=distractors needs vote.distractors_csv (not found: {path})")
    header, rows = data.csv_rows(path)
    if "id" not in header:
        raise LandmarksError(f"{path}: needs an 'id' column")
    i_id, seen, warned = header.index("id"), {}, set()
    return path, [data.checked_id(path, line, f[i_id] if len(f) > i_id else "", seen, warned) for line, f in rows]


def _distractor_pool(cfg, features_root: Path, whitening: dict | None) -> tuple[list[str], np.ndarray]:
    """Global descriptors of the ids in cfg.vote.distractors_csv (features/distractors, test or train store)."""
    path, want = _read_distractor_ids(cfg)
    found: dict[str, np.ndarray] = {}
    for split in ("distractors", "test", "train"):
        d = features_root / split
        if not d.is_dir() or not any(d.glob("shard-*.h5")):
            continue
        ids, x = _global_matrix(cfg, d, whitening)
        for i, row in zip(ids, x):
            found.setdefault(i, row)
    missing = [i for i in want if i not in found]
    if missing:
        raise LandmarksError(
            f"{len(missing)} distractor ids of {path} have no stored global features "
            f"(e.g. {missing[0]}); extract them into {features_root / 'distractors'}"
        )
    if not want:
        raise LandmarksError(f"{path} lists no distractor ids")
    return want, np.stack([found[i] for i in want]).astype(np.float32)


# -- submission ----------------------------------------------------------------------------------
def _label_str(label) -> str:
    """Submission text of one predicted label: '' for none (None, '' or NO_LABEL from vote), else
    the label checked by the label rule (a non-negative integer, written exactly)."""

    if label is None or (isinstance(label, str) and not label.strip()):
        return ""
    if isinstance(label, (int, np.integer)) and int(label) == NO_LABEL:
        return ""
    return check_label(label)


def write_submission(path: str | Path, test_ids, labels, confidences, expected_ids) -> Path:
    """Write `id,landmarks` with one row per expected id in that order; ids without a prediction
    (no features, NO_LABEL) get an empty value.  Checked against `expected_ids` before writing."""

    expected = [str(i) for i in expected_ids]
    if len(set(expected)) != len(expected):
        raise LandmarksError("submission: sample_submission ids are not unique")
    for i in expected:
        why = id_problem(i)
        if why:
            raise LandmarksError(f"submission: test {why}")
    test_ids = [str(i) for i in test_ids]
    if not (len(test_ids) == len(labels) == len(confidences)):
        raise LandmarksError("submission: ids, labels and confidences differ in length")
    exp_set = set(expected)
    pred: dict[str, str] = {}
    for i, lab, c in zip(test_ids, labels, confidences):
        if i not in exp_set:
            raise LandmarksError(f"submission: test id {i!r} is not in sample_submission")
        if i in pred:
            raise LandmarksError(f"submission: test id {i!r} predicted twice")
        try:
            s = _label_str(lab)
        except LandmarksError as e:
            raise LandmarksError(f"submission: label of {i!r}: {e}") from None
        if s and not np.isfinite(float(c)):
            raise LandmarksError(f"submission: confidence of {i!r} is not finite")
        pred[i] = f"{s} {float(c):.6f}" if s else ""
    rows = [(i, pred.get(i, "")) for i in expected]
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["id", "landmarks"])
            w.writerows(rows)
        try:
            _check_written(tmp, expected)
        except LandmarksError as e:  # name the final file, not the temp one about to be removed
            raise LandmarksError(
                f"submission {path} not written: its check failed: {str(e).replace(str(tmp), 'the written file')}"
            ) from None
    return path


def _check_written(path: Path, expected: list[str]) -> None:
    """Re-read the written file with the scorer's reader before it is renamed in place."""

    read_submission(path, expected)


# -- stage ---------------------------------------------------------------------------------------
def load_inputs(
    cfg, data_dir, knn_path: str | Path, verified_path: str | Path | None, calibration_path: str | Path | None = None
) -> dict:
    """The knn output, the verified inliers and evidence (None when `verified_path` is None: global
    only), the calibration model (when `calibration_path` is given) and the train labels aligned to
    the knn's train ids."""

    train = data.load_split(data_dir, "train")  # input CSVs first: a broken file stops before the npz reads
    test = data.load_split(data_dir, "test")
    knn = _read_output(knn_path, "knn")
    lab = dict(zip(train["id"].astype(str), train["landmark_id"].astype(np.int64)))
    train_ids = [str(i) for i in knn["train_ids"]]
    missing = [i for i in train_ids if i not in lab]
    if missing:
        raise LandmarksError(
            f"{len(missing)} train feature ids are not in {data_dir}/train.csv (e.g. {missing[0]}): "
            "features belong to another dataset; use another WORK_DIR"
        )
    inliers = evidence = calibration = None
    if verified_path is not None:
        ver = _read_output(verified_path, "verify")
        if str(ver["fingerprint"]) != verify_fingerprint(cfg, str(knn["fingerprint"])):
            raise LandmarksError(
                f"{verified_path} was made from another knn output or settings: rerun `landmarks verify` (make verify)"
            )
        inliers = ver["inliers"]
        evidence = ver.get("evidence")
        if calibration_path is not None:
            calibration = calibrate.load(calibration_path)
    return {
        "knn": knn,
        "inliers": inliers,
        "evidence": evidence,
        "calibration": calibration,
        "train_labels": np.array([lab[i] for i in train_ids], np.int64),
        "test_ids": [str(i) for i in knn["test_ids"]],
        "expected_ids": [str(i) for i in test["id"]],
    }


def _read_output(path: str | Path, stage: str) -> dict:
    """A previous stage's npz output, or an error that names the stage to run."""

    if not Path(path).exists():
        raise LandmarksError(f"{path} not found: run `landmarks {stage}` first (make {stage})")
    return load_npz(path)


def predict_arrays(
    cfg, inputs: dict, features_root: str | Path, whitening: dict | None = None, inliers="default"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, confidences after suppression, penalty) for the knn test ids."""
    knn = inputs["knn"]
    inl = inputs["inliers"] if isinstance(inliers, str) else inliers
    ev, model = inputs.get("evidence"), inputs.get("calibration")
    if cfg.vote.method == "calibrated" and model is not None and ev is not None and inl is not None:
        labels, conf = calibrated_vote(cfg, knn["sims"], knn["idx"], inputs["train_labels"], ev, model)
    else:
        inl = gate_inliers(cfg, inl, ev if inl is not None else None)
        labels, conf = vote(cfg.vote, knn["sims"], knn["idx"], inputs["train_labels"], inl)
    best = knn["sims"][:, 0] if knn["sims"].shape[1] else np.zeros(len(labels))
    penalty = suppression_penalty(cfg, features_root, inputs["test_ids"], best, whitening)
    return labels, conf - penalty, penalty


def run_predict(
    cfg,
    data_dir,
    knn_path: str | Path,
    verified_path: str | Path | None,
    submission: str | Path,
    features_root: str | Path,
    whiten_path: str | Path | None = None,
    calibration_path: str | Path | None = None,
) -> Path:
    """Stage: vote over the knn neighbours (+ verified inliers) -> SUBMISSION, every test id once.

    `verified_path` None = global only.  `features_root` and `whiten_path` are read only for
    non-landmark suppression (vote.suppression) and whitening, when those are on.
    `calibration_path` (vote.method=calibrated): the calibrate stage's model; the confidence is
    then the calibrated probability."""

    data.load_solution(data_dir)  # a broken solution.csv stops here, not in validate
    if cfg.vote.suppression == "distractors":
        _read_distractor_ids(cfg)
    inputs = load_inputs(cfg, data_dir, knn_path, verified_path, calibration_path)
    w = whiten.load_whiten(cfg, whiten_path, Path(features_root) / "train", "global")
    labels, conf, _ = predict_arrays(cfg, inputs, features_root, w)
    path = write_submission(submission, inputs["test_ids"], labels, conf, inputs["expected_ids"])
    n_pred = int((labels != NO_LABEL).sum())
    log.info("predict: %d of %d test images predicted -> %s", n_pred, len(inputs["expected_ids"]), path)
    return path


def stage_paths(cfg, work_dir) -> dict:
    """The inputs `run_predict` reads for this config, from the WORK_DIR layout."""

    work = WorkLayout(work_dir)
    return {
        "knn_path": work.knn(cfg),
        "verified_path": work.verified(cfg) if cfg.verify.enabled else None,
        "features_root": work.features_root,
        "whiten_path": work.whiten(cfg),
        "calibration_path": work.calibration(cfg) if uses_calibration(cfg) else None,
    }
