"""The stage graph (landmarks.stages): `landmarks run`, `landmarks.run` and `make predict` are one
path; stages that are off are skipped alike; checks come first and fail in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from landmarks import stages
from landmarks.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "extract.max_image_size=64",
    "extract.max_feature_num=50",
    "extract.intra_op_threads=1",
    "extract.jobs=1",
    "verify.jobs=1",
    "verify.num_to_rerank=3",
    "knn.k=5",
]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}


def lm(*args, cwd=None):
    """`landmarks ARGS` in a subprocess: (returncode, stdout, stderr)."""
    r = subprocess.run(
        [sys.executable, "-m", "landmarks", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=_env()
    )
    return r.returncode, r.stdout, r.stderr


def make(*args):
    """`make ARGS` in the repository (the venv's install step is taken as done)."""
    venv = Path(sys.executable).parent.parent
    r = subprocess.run(
        ["make", "--no-print-directory", "-o", f"{venv}/.installed", f"VENV={venv}", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    return r.returncode, r.stdout, r.stderr


def _sets():
    return [a for s in SETS for a in ("--set", s)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_split):
    root = tmp_path_factory.mktemp("graph") / "data"
    rng = np.random.default_rng(3)
    train = write_split(root, "train", 12, rng, bad=False)
    test = write_split(root, "test", 6, rng, bad=False)
    pd.DataFrame({"id": train, "landmark_id": np.arange(len(train)) % 3}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test, "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    return root


def test_plan_order_and_off_stages():
    names = [s.name for s in stages.plan("predict")]
    assert names == [
        "demo-data",
        "model",
        "adapt",
        "features",
        "whiten",
        "knn",
        "local-features",
        "verify",
        "calibrate",
        "predict",
    ]
    assert [s.name for s in stages.plan("predict", after="features")] == [
        "whiten",
        "knn",
        "local-features",
        "verify",
        "calibrate",
        "predict",
    ]
    on = stages.Run(Config(), "d", "w")
    assert on.uses_adapted and on.model_dir == Path("w/adapt/model")
    off = stages.Run(load_config(None, ["verify.enabled=false"]), "d", "w")
    enabled = [s.name for s in stages.plan("predict") if s.enabled(off)]
    # verification off: no local features, nothing adapted, the zero-training model
    assert "adapt" not in enabled and "local-features" not in enabled and "verify" not in enabled
    assert off.model_dir == stages.DEFAULT_MODEL and "model" in enabled
    assert stages.Run(Config(), "d", "w2").submission == Path("w2/submission.csv")
    assert stages.Run(Config(), "d", "work").submission == Path("submission/submission.csv")


def test_run_cli_python_and_make_give_the_same_submission(data, tmp_path, fake_model):
    # the command line
    sub_cli = tmp_path / "cli.csv"
    common = ["--data-dir", data, "--model", fake_model, "--shards", 1, *_sets()]
    rc, out, err = lm("run", "predict", *common, "--work-dir", tmp_path / "w1", "--submission", sub_cli)
    assert rc == 0, err[-3000:]
    lines = err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "features",
        "whiten",
        "knn",
        "local-features",
        "verify",
        "calibrate",
        "predict",
    ]
    assert "Traceback" not in err and out.strip() == str(sub_cli)
    assert "settings:" in (tmp_path / "w1" / "logs" / "run.log").read_text()  # full settings in the log

    # the documented Python function, in another WORK_DIR
    import landmarks

    sub_py = landmarks.run(
        "predict",
        data_dir=data,
        work_dir=tmp_path / "w2",
        model=fake_model,
        submission=tmp_path / "py.csv",
        shards=1,
        overrides=SETS,
        echo=False,
    )
    assert sub_py.read_bytes() == sub_cli.read_bytes()

    # make predict: the same command; all up to date, so a few quiet lines
    sub_make = tmp_path / "make.csv"
    t0 = time.time()
    rc, out, err = make(
        "predict",
        f"DATA_DIR={data}",
        f"WORK_DIR={tmp_path / 'w1'}",
        f"MODEL={fake_model}",
        f"SUBMISSION={sub_make}",
        "SHARDS=1",
        "SET=" + " ".join(SETS),
    )
    assert rc == 0, err[-3000:]
    assert sub_make.read_bytes() == sub_cli.read_bytes()
    printed = (out + err).strip().splitlines()
    assert len(printed) <= 12, printed
    assert all("up to date" in line for line in printed if line.startswith(("knn", "verify"))), printed
    assert time.time() - t0 < 60


def test_verify_off_extracts_no_local_features_and_adapts_nothing(data, tmp_path, monkeypatch):
    """Through `landmarks run` (what `make predict SET=verify.enabled=false` calls), without a model
    given: the graph picks models/default (no adaptation), and no local features are made."""
    from landmarks import cli, local_features
    from landmarks.store import FeatureStore

    calls = []
    monkeypatch.setattr(stages, "adapt", lambda *a, **k: calls.append("adapt"))
    monkeypatch.setattr(stages, "ensure_default_model", lambda cfg, out, force=False: calls.append("model") or out)
    monkeypatch.setattr(local_features, "ensure_local", lambda *a, **k: calls.append("local"))
    monkeypatch.setattr(
        stages, "run_features", lambda cfg, d, w, m, split, **k: calls.append((split, str(m), k["local"])) or []
    )
    monkeypatch.setattr(stages, "check_inputs", lambda run, planned: None)  # no model at models/default here
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w"
    rc = cli.main(
        ["run", "features", "--data-dir", str(data), "--work-dir", str(work), "--set", "verify.enabled=false"]
    )
    assert rc == 0
    assert calls == ["model", ("train", "models/default", False), ("test", "models/default", False)]
    assert not (work / "adapt").exists()
    assert not list(work.glob("features/*/local-cache-*"))
    assert FeatureStore is not None


def test_verify_off_end_to_end_no_local(data, tmp_path, fake_model):
    rc, _, err = lm(
        "run",
        "predict",
        "--data-dir",
        data,
        "--work-dir",
        tmp_path / "w",
        "--model",
        fake_model,
        "--shards",
        1,
        *_sets(),
        "--set",
        "verify.enabled=false",
    )
    assert rc == 0, err[-3000:]
    assert "local-features: off (verify.enabled=false)" in err and "verify: off" in err
    from landmarks.store import FeatureStore

    store = FeatureStore(tmp_path / "w" / "features" / "test")
    ids = pd.read_csv(data / "sample_submission.csv", dtype=str)["id"]
    assert not any(store.has_local(i) for i in ids)
    assert not list((tmp_path / "w").glob("features/*/local-cache-*")) and not (tmp_path / "w" / "adapt").exists()
    assert (tmp_path / "w" / "submission.csv").exists()  # the per-WORK_DIR default


@pytest.mark.parametrize("how", ["cli", "make"])
def test_missing_sample_submission_fails_first_in_one_line(data, tmp_path, how):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text((data / "train.csv").read_text())
    os.symlink(data / "train", bad / "train")
    t0 = time.time()
    if how == "cli":
        rc, _, err = lm("run", "predict", "--data-dir", bad, "--work-dir", tmp_path / "w")
    else:
        rc, _, err = make("predict", f"DATA_DIR={bad}", f"WORK_DIR={tmp_path / 'w'}")
    assert rc != 0 and time.time() - t0 < 30
    lines = [x for x in err.strip().splitlines() if not x.startswith("make")]
    assert len(lines) == 1 and lines[0].startswith("landmarks run: error:"), err
    assert "sample_submission.csv not found" in lines[0]
    assert not (tmp_path / "w" / "adapt").exists() and not (tmp_path / "w" / "features").exists()


def test_set_typo_and_make_variable_typo_fail_in_one_line(tmp_path):
    rc, _, err = lm("run", "predict", "--work-dir", tmp_path / "w", "--set", "verify.num_to_rerankk=3")
    assert rc == 1 and err.strip().count("\n") == 0 and "verify.num_to_rerankk" in err, err
    assert err.startswith("landmarks run: error:")
    rc, _, err = make("predict", f"WORK_DIR={tmp_path / 'w'}", "SET=verify.num_to_rerankk=3")
    lines = [x for x in err.strip().splitlines() if not x.startswith("make")]
    assert rc != 0 and lines == [x for x in lines if x.startswith("landmarks run: error:")] and len(lines) == 1, err
    rc, out, err = make("predict", "DATADIR=x")
    assert rc != 0 and "DATADIR" in err and "did you mean DATA_DIR" in err and err.strip().count("\n") == 0, err
    rc, out, _ = make("help")
    assert rc == 0 and "DATA_DIR=data/demo" in out and "SUBMISSION=" in out


def test_output_may_not_overwrite_an_input(data, tmp_path):
    rc, _, err = lm("run", "--data-dir", data, "--work-dir", tmp_path / "w", "--submission", data / "train.csv")
    assert rc == 1 and "inside DATA_DIR" in err and err.strip().count("\n") == 0, err
    assert (data / "train.csv").read_text().startswith("id,landmark_id")


def test_ctrl_c_says_what_is_kept_without_traceback(data, tmp_path, monkeypatch, capsys, fake_model):
    from landmarks import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_knn", interrupted)
    work = tmp_path / "w"
    (work / "features" / "train").mkdir(parents=True)
    (work / "features" / "test").mkdir(parents=True)
    for i in range(2):
        (work / "features" / "train" / f"shard-{i:05d}-of-00004.h5").write_bytes(b"")
    knn_alone = ["--set", "whiten.global_lw=false"]  # no whiten stage run first
    rc = cli.main(["knn", "--data-dir", str(data), "--work-dir", str(work), "--model", str(fake_model), *knn_alone])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.count("\n") == 0, err
    assert err.startswith("interrupted during knn") and "rerun the same command to resume" in err
    assert stages._shards_kept(stages.Run(Config(), data, work)) == "2 of 4 train shards kept"


def test_subcommand_help_lists_only_its_options():
    from landmarks.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "import" in a.choices).choices
    text = sub["import"].format_help()
    assert "--model" not in text and "--work-dir" not in text and "--max-per-class" in text
    assert "--link" in sub["holdout"].format_help() and "--link" in text
    assert "(default: data/demo)" in sub["run"].format_help()
    rc, out, _ = lm("--version")
    assert rc == 0 and out.startswith("landmarks ")
