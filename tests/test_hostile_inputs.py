"""Issue 14: hostile ids and labels, one test (or more) per numbered item of the issue.

Each input here was accepted with a wrong result, or failed with a trace, before the fix.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from landmarks import pipeline, predict
from landmarks.cli import main
from landmarks.config import Config, ConfigError, load_config
from landmarks.datasets import data
from landmarks.evaluation import metrics
from landmarks.utils import LandmarksError

IDS = ["0123456789abcdef", "fedcba9876543210", "00112233aabbccdd"]


def _ds(root: Path, train_rows, test_ids=("aaaabbbbccccdddd",), train_header="id,landmark_id") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(
        train_header + "\n" + "".join(f"{i},{lab}\n" for i, lab in train_rows), encoding="utf-8"
    )
    (root / "sample_submission.csv").write_text(
        "id,landmarks\n" + "".join(f"{i},\n" for i in test_ids), encoding="utf-8"
    )
    return root


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# -- 1. labels that collide with internal values or wrap -----------------------------------------
@pytest.mark.parametrize(
    "label,needle",
    [
        ("-1", "has a sign"),  # the old "no label" value
        ("9223372036854775808", "too large"),  # 2**63 wrapped in int64
        ("18446744073709551617", "too large"),  # 2**64 + 1 wrapped onto 1
        ("007", "leading zero"),  # would not round-trip as written
    ],
)
def test_labels_that_collide_or_wrap_are_refused(tmp_path, label, needle):
    d = _ds(tmp_path, [(IDS[0], "1"), (IDS[1], label)])
    with pytest.raises(LandmarksError, match=f"line 3: {needle}|line 3: landmark_id '{label}' .*{needle}"):
        data.load_split(d, "train")


def test_largest_label_round_trips_to_the_submission(tmp_path):
    big = str(2**63 - 1)
    d = _ds(tmp_path, [(IDS[0], big), (IDS[1], "0")])
    tr = data.load_split(d, "train")
    assert [str(v) for v in tr["landmark_id"]] == [big, "0"]
    lab, conf = predict.vote(
        Config().vote, np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([[0, 1], [1, 0]]), tr["landmark_id"].to_numpy()
    )
    out = predict.write_submission(tmp_path / "sub.csv", ["t01", "t02"], lab, conf, ["t01", "t02"])
    rows = [line.split(",")[1].split()[0] for line in out.read_text().splitlines()[1:]]
    assert rows == [big, "0"]  # label 0 is a real label, not "no prediction"


def test_no_label_value_cannot_be_a_label():
    with pytest.raises(LandmarksError, match=">= 0"):
        predict.vote(Config().vote, np.array([[0.9]]), np.array([[0]]), np.array([-1]))
    for bad in ("-1", "None", "nan", "1e3", "12.0", -5):
        with pytest.raises(LandmarksError, match="label of 't01'"):
            predict.write_submission("/nonexistent/x.csv", ["t01"], [bad], [0.5], ["t01"])


# -- 2. ids that are not file names -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad_id,needle",
    [
        ("../../../../etc/passwd", "contains '.'"),
        ("ab/../../cd", "contains '/'"),
        ("/etc/hostname", "contains '/'"),
        ("abc\\def", "contains"),
        ("a b c", "contains ' '"),
        ("ab", "shorter than 3"),
    ],
)
def test_ids_that_escape_data_dir_are_refused_at_read(tmp_path, bad_id, needle):
    d = _ds(tmp_path, [(IDS[0], "1")], test_ids=["aaaabbbbccccdddd", bad_id])
    with pytest.raises(LandmarksError, match=f"sample_submission.csv: line 3: .*{needle}"):
        data.load_split(d, "test")
    with pytest.raises(LandmarksError):
        data.image_path(d, "test", bad_id)


def test_safe_non_hex_ids_and_planted_symlinks_are_allowed(tmp_path):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"x")
    d = _ds(tmp_path / "d", [("img_0001-A", "1"), (IDS[0], "2")])
    link = data.image_path(d, "train", "img_0001-A")
    link.parent.mkdir(parents=True)
    os.symlink(outside, link)  # as `landmarks holdout` links images
    tr = data.load_split(d, "train")
    assert tr["path"][0] == str(d / "train" / "i" / "m" / "g" / "img_0001-A.jpg")
    assert data.check_images(tr) == [IDS[0]]


# -- 3. whitespace --------------------------------------------------------------------------------
def test_whitespace_is_stripped_with_a_warning_everywhere(tmp_path, caplog):
    d = _ds(tmp_path, [(IDS[0], "1")], test_ids=[" aaaabbbbccccdddd", "bbbbccccddddeeee "])
    with caplog.at_level(logging.WARNING):
        te = data.load_split(d, "test")
    assert te["id"].tolist() == ["aaaabbbbccccdddd", "bbbbccccddddeeee"]
    assert te["path"][0].endswith("test/a/a/a/aaaabbbbccccdddd.jpg")
    assert "surrounding whitespace, stripped" in caplog.text
    sub = tmp_path / "sub.csv"
    sub.write_text("id,landmarks\n aaaabbbbccccdddd ,5 0.5\nbbbbccccddddeeee,\n")
    df = metrics.read_submission(sub, expected_ids=te["id"])
    assert df["id"].tolist() == ["aaaabbbbccccdddd", "bbbbccccddddeeee"] and df["label"][0] == "5"


def test_final_check_error_names_the_real_file_and_rule(tmp_path):
    with pytest.raises(LandmarksError) as e:
        predict.write_submission(tmp_path / "sub.csv", ["abcd "], [5], [0.5], ["abcd "])
    msg = str(e.value)
    assert ".tmp" not in msg and "not a test id" not in msg and "contains ' '" in msg
    assert not list(tmp_path.iterdir())


# -- 4. a fully quoted CSV ------------------------------------------------------------------------
def test_fully_quoted_csv(tmp_path):
    import csv

    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["id", "landmark_id", "url"])
        w.writerows([[IDS[0], "5", "http://x/a,b"], [IDS[1], "7", ""]])
    with open(tmp_path / "sample_submission.csv", "w", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows([["id", "landmarks"], ["aaaabbbbccccdddd", ""]])
    tr = data.load_split(tmp_path, "train")
    assert tr["id"].tolist() == IDS[:2] and tr["landmark_id"].tolist() == [5, 7]
    assert data.load_split(tmp_path, "test")["id"].tolist() == ["aaaabbbbccccdddd"]


# -- 5. one-line errors instead of traces ---------------------------------------------------------
@pytest.mark.parametrize("label", ["inf", "1e3", "12.0", "nan", "0x10", " ", "+5"])
def test_non_integer_labels_are_one_line_errors(tmp_path, capsys, label):
    d = _ds(tmp_path / "d", [(IDS[0], "1"), (IDS[1], label)])
    rc = main(
        ["predict", "--data-dir", str(d), "--work-dir", str(tmp_path / "w"), "--submission", str(tmp_path / "s.csv")]
    )
    err = _one_line_error(capsys)
    assert rc == 1 and "train.csv: line 3:" in err and "landmark_id" in err


def test_nul_byte_in_id_is_a_one_line_error(tmp_path):
    d = _ds(tmp_path, [(IDS[0], "1"), ("abc\x00def", "2")])
    with pytest.raises(LandmarksError, match="line 3: id 'abc\\\\x00def' contains a NUL byte"):
        data.load_split(d, "train")


def test_full_disk_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "work/knn.npz"))

    monkeypatch.setattr(metrics, "score_files", full)
    assert main(["gap", "--solution", "s.csv", "--submission", "p.csv"]) == 1
    assert "No space left on device" in _one_line_error(capsys)


def test_write_error_in_a_joblib_worker_is_a_one_line_error(tmp_path, fake_model):
    """A shard write that fails inside a loky worker (file size limit: the same OSError path as a
    full disk) ends the stage with one line, not a trace through joblib."""
    import resource

    d = _ds(tmp_path / "d", [(IDS[0], "1")], test_ids=["aaaabbbbccccdddd", "bbbbccccddddeeee"])
    for i in ("aaaabbbbccccdddd", "bbbbccccddddeeee"):
        from PIL import Image

        p = data.image_path(d, "test", i)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(p)
    limit = 4096  # bytes: enough for imports, far below a shard with local features
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "landmarks",
            "features",
            "--split",
            "test",
            "--data-dir",
            str(d),
            "--work-dir",
            str(tmp_path / "w"),
            "--model",
            str(fake_model),
            "--shards",
            "2",
            "--jobs",
            "2",
            "--set",
            "extract.max_image_size=64",
            "--set",
            "extract.intra_op_threads=1",
        ],
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    err = [ln for ln in r.stderr.splitlines() if "error:" in ln or "Traceback" in ln]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (
        len(err) == 1 and err[0].startswith("landmarks features: error: ") and "[Errno 27] File too large" in err[0]
    ), r.stderr[-3000:]


def test_broken_pipe_is_quiet(tmp_path):
    sol = tmp_path / "solution.csv"
    sol.write_text("id,landmarks\nabc,1\nabd,\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("id,landmarks\nabc,1 0.9\nabd,\n")
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # the reader (`head -1`) is gone before anything is written
    try:
        p = subprocess.run(
            [sys.executable, "-m", "landmarks", "gap", "--solution", str(sol), "--submission", str(sub)],
            stdout=w_fd,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(w_fd)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == 141


# -- 6. concurrent runs on one WORK_DIR ---------------------------------------------------------
def test_second_features_run_waits_and_leaves_the_first_runs_temp_file(tmp_path, fake_model, caplog):
    from PIL import Image

    from landmarks.features import features_dir, run_features
    from landmarks.utils.locks import stage_lock

    d = _ds(tmp_path / "d", [(IDS[0], "1")], test_ids=["aaaabbbbccccdddd"])
    p = data.image_path(d, "test", "aaaabbbbccccdddd")
    p.parent.mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(p)
    work = tmp_path / "w"
    out = features_dir(work.resolve(), "test")
    cfg = Config()
    cfg.extract.max_image_size = 64
    cfg.extract.intra_op_threads = 1
    waiting = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if "waiting for it to finish" in record.getMessage():
                waiting.set()

    handler = Seen()
    logging.getLogger("landmarks.utils.locks").addHandler(handler)
    result = {}
    try:
        with stage_lock(out, "features"):  # the first run, writing its shard
            tmp = out / f".shard-00000-of-00001.h5.{os.getpid() + 1}.tmp"
            tmp.write_bytes(b"half a shard")

            def second():
                try:
                    result["paths"] = run_features(cfg, d, work, fake_model, "test", shards=1, jobs=1)
                except BaseException as e:  # noqa: BLE001 - reported below
                    result["error"] = e

            t = threading.Thread(target=second)
            t.start()
            assert waiting.wait(120), "the second run did not wait for the lock"
            assert tmp.read_bytes() == b"half a shard"  # untouched while the first run holds the lock
            tmp.unlink()  # the first run renames its temp file into place and ends
        t.join(300)
    finally:
        logging.getLogger("landmarks.utils.locks").removeHandler(handler)
    assert "error" not in result, result.get("error")
    assert [q.name for q in result["paths"]] == ["shard-00000-of-00001.h5"]


# -- 7. late checks -------------------------------------------------------------------------------
def test_broken_sample_submission_stops_before_train_extraction(tmp_path, fake_model):
    from landmarks.features import features_dir, run_features

    d = _ds(tmp_path / "d", [(IDS[0], "1")], test_ids=["aaaabbbbccccdddd", "aaaabbbbccccdddd"])
    with pytest.raises(LandmarksError, match="sample_submission.csv: line 3: duplicate id"):
        run_features(Config(), d, tmp_path / "w", fake_model, "train", shards=1, jobs=1)
    assert not list(features_dir(tmp_path / "w", "train").glob("shard-*.h5"))


def test_broken_sample_submission_stops_predict_with_one_line(tmp_path, make_dataset):
    d, work = make_dataset(tmp_path)
    cfg = Config()
    cfg.verify.enabled = False
    pipeline.run_after_features(cfg, d, work, tmp_path / "model", tmp_path / "s.csv")
    (d / "sample_submission.csv").write_text("id,landmarks\nte0000,\nte/0001,\n")
    (tmp_path / "s.csv").unlink()
    with pytest.raises(LandmarksError, match="sample_submission.csv: line 3: id 'te/0001' contains '/'"):
        predict.run_predict(cfg, d, submission=tmp_path / "s.csv", **predict.stage_paths(cfg, work))
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    "override",
    ["vote.method=bogus", "knn.index=faiss", "verify.matcher=flann", "vote.suppression=yes", "holdout.link=copy"],
)
def test_unknown_config_choice_fails_at_load(override, tmp_path):
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(None, [override])
    section, kv = override.split(".", 1)
    key, value = kv.split("=")
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(tmp_path / "c.yaml")
