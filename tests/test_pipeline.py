"""End to end with the real zero-training default model: small demo -> model -> features ->
whiten -> knn -> local-features -> verify -> predict -> validate through the CLI, the way
`make predict` / `make validate` chain them."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest


def lm(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "landmarks", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"landmarks {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data, work, model, sub = root / "data", root / "work", root / "model", root / "submission.csv"
    small = [
        "--set",
        "demo.num_landmarks=6",
        "--set",
        "demo.views_per_landmark=4",
        "--set",
        "demo.test_views_per_landmark=2",
        "--set",
        "demo.unseen_landmarks=1",
        "--set",
        "demo.num_distractors=4",
        "--set",
        "demo.image_size=256",
        "--set",
        "demo.families=2",
    ]
    lm("demo-data", "--out", data, *small)
    lm("model", "build", "--out", model)
    common = [
        "--data-dir",
        data,
        "--work-dir",
        work,
        "--model",
        model,
        "--submission",
        sub,
        "--set",
        "extract.global_scales=0.7071,1.0",
        "--set",
        "extract.local_scales=0.7071,1.0",
        "--set",
        "extract.max_feature_num=300",
        "--set",
        "extract.intra_op_threads=2",
    ]
    for split in ("train", "test"):
        lm("features", *common, "--split", split, "--shards", 2, "--jobs", 1)
    for stage in ("whiten", "knn", "local-features", "verify", "predict"):
        lm(stage, *common)
    val = lm("validate", *common)
    return dict(root=root, data=data, work=work, model=model, sub=sub, common=common, validate=val)


def test_submission_has_every_test_id_once(run):
    sample = pd.read_csv(run["data"] / "sample_submission.csv", dtype=str)
    sub = pd.read_csv(run["sub"], dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["id", "landmarks"]
    assert list(sub["id"]) == list(sample["id"])
    preds = [x for x in sub["landmarks"] if x]
    assert preds, "no predictions at all"
    for x in preds:
        label, conf = x.split()
        int(label), float(conf)


def test_report_and_gap(run):
    report = (run["work"] / "report.md").read_text()
    assert "global only" in report and "verification" in report
    for png in ("precision_vs_rank.png", "inliers_correct_vs_wrong.png", "score_distribution.png"):
        assert (run["work"] / "plots" / png).stat().st_size > 1000
    r = lm("gap", "--solution", run["data"] / "solution.csv", "--submission", run["sub"])
    gap = float(r.stdout.split()[1])
    # Obtained by running this module (2026-11-23, tensorflow 2.21.0 on x86-64 with AVX-512):
    # GAP 0.720238, accuracy 9/12, the same on every run. Everything before it is deterministic
    # (seeded demo, fixed model weights, TF threads pinned above, exact kNN, seeded RANSAC); another
    # TF build or CPU kernel path may move a descriptor by float round-off and flip a close vote.
    # 2026-12-02, with the learned whitening (Lw) and vote.power 0.5 as defaults: GAP 0.719907, 9/12.
    assert round(gap, 4) == 0.7199, r.stdout


def test_rerun_skips_and_is_byte_identical(run):
    before = run["sub"].read_bytes()
    shards = sorted((run["work"] / "features" / "test").glob("shard-*.h5"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    lm("features", *run["common"], "--split", "test", "--shards", 2, "--jobs", 1)
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    (verified,) = run["work"].glob("verified-*.npz")
    verified.unlink()
    with pytest.raises(AssertionError, match="not found: run `landmarks verify` first"):
        lm("predict", *run["common"])
    lm("verify", *run["common"])
    lm("predict", *run["common"])
    assert run["sub"].read_bytes() == before


def test_calibrated_confidence_stage(run, tmp_path):
    """`landmarks calibrate` learns P(same landmark | evidence) from the train split; predict then
    reports it as the confidence (a probability), and validate shows the reliability section."""
    sub = tmp_path / "calibrated.csv"
    common = [a if a != run["sub"] else sub for a in run["common"]] + ["--set", "vote.method=calibrated"]
    lm("calibrate", *common)
    (cal,) = run["work"].glob("calibration-*.npz")
    mtime = cal.stat().st_mtime_ns
    lm("calibrate", *common)  # up to date: skipped
    assert cal.stat().st_mtime_ns == mtime
    lm("predict", *common)
    got = pd.read_csv(sub, dtype=str, keep_default_na=False)
    conf = [float(x.split()[1]) for x in got["landmarks"] if x]
    assert conf and all(0.0 <= c <= 1.0 for c in conf)
    lm("validate", *common)
    report = (run["work"] / "report.md").read_text()
    assert "Reliability" in report and (run["work"] / "plots" / "reliability.png").stat().st_size > 1000


def test_nbb_matcher_stages(run, tmp_path):
    """verify.matcher=nbb through the CLI: verify asks for local-features, which then stores the NBB
    maps beside the shards; verify and predict run on them, their output beside the mutual one's."""
    sub = tmp_path / "nbb.csv"
    common = [a if a != run["sub"] else sub for a in run["common"]]
    common += ["--set", "verify.matcher=nbb", "--set", "verify.reproj_threshold=8"]
    r = lm("verify", *common, check=False)
    assert r.returncode != 0 and "no NBB feature maps" in r.stderr and "local-features" in r.stderr
    lm("local-features", *common)
    for split in ("test", "train"):
        assert list((run["work"] / "features" / split).glob("nbb-maps-*.h5"))
    lm("verify", *common)
    assert len(list(run["work"].glob("verified-*.npz"))) == 2
    lm("predict", *common)
    got = pd.read_csv(sub, dtype=str, keep_default_na=False)
    want = pd.read_csv(run["sub"], dtype=str, keep_default_na=False)
    assert list(got["id"]) == list(want["id"]) and (got["landmarks"] != "").any()
