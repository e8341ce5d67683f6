"""validate: report with the GAP table and plots from knn/verified results."""

from __future__ import annotations

import numpy as np
import pytest

from landmarks import pipeline
from landmarks.evaluation import validate
from landmarks.store import write_shard
from landmarks.utils import LandmarksError
from plain import plain_config


def test_validate_global_only(tmp_path, capsys, make_dataset):
    data, work = make_dataset(tmp_path)
    cfg = plain_config()
    cfg.verify.enabled = False
    sub = pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "sub.csv")
    out = validate.run_validate(cfg, data, work, tmp_path / "model", sub)
    text = out.read_text()
    assert "| global only **(default)** | 1.0000 |" in text
    assert "host baseline voting" in text and "suppression=test" in text
    assert "Submission" in text and "GAP 1.0000" in text
    for name in ("precision_vs_rank.png", "score_distribution.png"):
        assert (work / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    assert "| setting | GAP |" in capsys.readouterr().out
    (data / "solution.csv").unlink()
    with pytest.raises(LandmarksError, match="solution.csv"):
        validate.run_validate(cfg, data, work, tmp_path / "model", sub)


def test_validate_with_verification_and_options(tmp_path, make_dataset, planted_pair, monkeypatch):
    """Two look-alike classes: global kNN confuses them, planted local geometry tells them apart."""
    rng = np.random.default_rng(5)
    data, work = make_dataset(tmp_path, n_classes=2, per_class=1, n_distract=2)
    import h5py

    with h5py.File(work / "features/train/shard-00000-of-00001.h5") as f:
        tr_ids, tr = [i.decode() for i in f["ids"][:]], f["global"][:]
    with h5py.File(work / "features/test/shard-00000-of-00001.h5") as f:
        te_ids, te = [i.decode() for i in f["ids"][:]], f["global"][:]
    te[0] = te[1] = (tr[0] + tr[1]) / np.linalg.norm(tr[0] + tr[1])  # equally close to both classes
    te[0] += 1e-3 * (tr[1] - tr[0])  # globally nearer the wrong class
    te[1] += 1e-3 * (tr[0] - tr[1])
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    p0, p1 = planted_pair(rng, n=100, shared=50), planted_pair(rng, n=100, shared=50)
    q_local = [p0[0], p1[0], p0[2], p1[2]]
    write_shard(work / "features/train/shard-00000-of-00001.h5", tr_ids, tr, [p0[1], p1[1]])
    write_shard(
        work / "features/test/shard-00000-of-00001.h5", te_ids, te, q_local, failures=[("fail0001", "unreadable image")]
    )
    cfg = plain_config()
    cfg.verify.jobs = 1
    cfg.verify.mutual_min_sim = 0.5
    cfg.knn.qe_k = 1
    cfg.vote.suppression = "test"
    sub = pipeline.run_after_features(cfg, data, work, tmp_path / "model", tmp_path / "sub.csv")
    drawn = {}
    save = validate._save

    def record(fig, path):  # the plots' legend texts and titles, read before the figure is closed
        ax = fig.axes[0]
        drawn[path.name] = (ax.get_legend_handles_labels()[1], ax.get_title())
        return save(fig, path)

    monkeypatch.setattr(validate, "_save", record)
    text = validate.run_validate(cfg, data, work, tmp_path / "model", sub).read_text()

    def row(name):
        return next(ln for ln in text.splitlines() if ln.startswith(f"| {name}"))

    assert float(row("global + verification **(default)**").split("|")[3]) == 1.0  # accuracy
    assert float(row("global only (no verification)").split("|")[3]) == 0.0
    assert "knn.qe_k off" in text and "without suppression" in text
    assert (work / "plots" / "inliers_correct_vs_wrong.png").exists()
    # the inlier plot counts the candidates of the report's separation table, and draws its floor
    sep = next(ln for ln in text.splitlines() if ln.startswith("| ") and "/" in ln and "correct n" not in ln)
    n_good, n_bad, floor = sep.split("|")[1].strip(), sep.split("|")[3].strip(), sep.split("|")[5].strip()
    labels, title = drawn["inliers_correct_vs_wrong.png"]
    assert f"correct-class candidates ({n_good})" in labels and f"wrong-class candidates ({n_bad})" in labels
    assert f"random floor: {floor} inliers" in labels and "2 non-landmark queries left out" in title
    # the score plot names the GAP of the default setting and its cutoff line
    labels, title = drawn["score_distribution.png"]
    assert title.startswith("GAP 1.0000") and any(lab.startswith("lowest correct") for lab in labels)
    labels, _ = drawn["precision_vs_rank.png"]
    assert "default: GAP 1.0000" in labels
