"""`landmarks adapt`: exact pair correspondences, adapt -> export -> load_delg, exact resume, the warp check,
the cached stage (skip / re-adapt by fingerprint) and its place as the default model of `make predict`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from landmarks.config import ConfigError
from landmarks.utils import LandmarksError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _ramp(h=200, w=240):
    """Image whose red/green values are its own pixel x/y: a dense grid of known coordinates."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)


def test_pair_correspondences_are_exact():
    """Warp a coordinate grid: every B pixel holds the source pixel the homography says."""
    from landmarks.adapt import apply_h, make_pair
    from landmarks.config import Config

    ac = Config().adapt
    img = _ramp()
    checked = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        a, b, h, occ = make_pair(img, rng, ac, 128, photometric=False)
        assert occ is None and a.shape == b.shape == (128, 128, 3)
        # A is a crop: its pixel (x, y) is source pixel (x + ox, y + oy)
        ox, oy = int(a[0, 0, 0]), int(a[0, 0, 1])
        assert np.array_equal(a[..., 0], (np.arange(128)[None, :] + ox).repeat(128, 0))
        # B pixel q came from A pixel H^-1(q), i.e. source pixel H^-1(q) + (ox, oy)
        ys, xs = np.meshgrid(np.arange(128), np.arange(128), indexing="ij")
        q = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
        src = apply_h(np.linalg.inv(h), q) + [ox, oy]
        inside = (src[:, 0] > 1) & (src[:, 0] < img.shape[1] - 2) & (src[:, 1] > 1) & (src[:, 1] < img.shape[0] - 2)
        got = b.reshape(-1, 3)[inside, :2].astype(np.float64) + 0.5  # PIL truncates to uint8: +0.5 centres it
        err = np.abs(got - src[inside])
        assert inside.sum() > 500
        assert err.max() <= 0.55, (seed, err.max())  # a 0.5 px convention slip would show as up to ~1.5 px
        assert np.median(err) <= 0.3
        checked += inside.sum()
    assert checked > 10_000


def test_pair_warps_vary_and_cell_targets_follow_h():
    from landmarks.adapt import apply_h, cell_targets, make_pair
    from landmarks.config import Config
    from landmarks.delg.model import ReceptiveField

    ac = Config().adapt
    rf = ReceptiveField(size=339, stride=16, padding=154.0)
    img = _ramp()
    hs = [make_pair(img, np.random.default_rng(s), ac, 128)[2] for s in range(5)]
    assert len({round(float(h[0, 0]), 6) for h in hs}) == 5  # random, seeded warps
    a1 = make_pair(img, np.random.default_rng(3), ac, 128)
    a2 = make_pair(img, np.random.default_rng(3), ac, 128)
    assert np.array_equal(a1[1], a2[1]) and np.array_equal(a1[2], a2[2])  # deterministic per seed
    h = hs[0]
    u, valid = cell_targets(h, rf, (8, 8))
    off = -rf.padding + (rf.size - 1) / 2
    centre = np.array([[3 * 16 + off, 5 * 16 + off]])  # cell row 5, column 3
    want = (apply_h(h, centre)[0] - off) / 16
    assert np.allclose(u[5 * 8 + 3], want, atol=1e-4)
    assert valid.dtype == bool and valid.shape == (64,)
    # identity warp: every cell maps onto itself and is valid
    u, valid = cell_targets(np.eye(3), rf, (8, 8))
    assert valid.all() and np.allclose(u[9], [1, 1])
    # an occluder over the whole view invalidates every cell
    _, valid = cell_targets(np.eye(3), rf, (8, 8), occ=(-1000, -1000, 1000, 1000))
    assert not valid.any()


def _make_data(root: Path, n=4, seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        base = rng.integers(0, 255, (12, 14, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize((140, 120), Image.NEAREST))
        i = f"{k:x}{rng.integers(0, 16**15):015x}"
        p = root / "train" / i[0] / i[1] / i[2] / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        rows.append((i, 1 + k % 2))
    pd.DataFrame(rows, columns=["id", "landmark_id"]).to_csv(root / "train.csv", index=False)
    return root


def _head_weights(work: Path) -> list[np.ndarray]:
    import h5py

    state = json.loads((work / "adapt" / "state.json").read_text())
    out = []
    with h5py.File(work / "adapt" / state["weights"], "r") as f:
        f.visititems(lambda name, obj: out.append(np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_adapt_resumes_exactly_and_exports(tmp_path, small_cfg):
    from landmarks.adapt import adapt
    from landmarks.delg.delg_io import load_delg

    data = _make_data(tmp_path / "data")
    work, out = tmp_path / "work", tmp_path / "model"
    assert adapt(small_cfg(), data, work, out, stop_after=2) is None  # "interrupted" after 2 steps
    state = json.loads((work / "adapt" / "state.json").read_text())
    assert state["step"] == 2 and not out.exists()
    assert adapt(small_cfg(), data, work, out) == out  # rerun resumes at step 2
    state = json.loads((work / "adapt" / "state.json").read_text())
    assert state["step"] == 4 and state["resumed_from"] == [2]
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in state["history"])
    assert (work / "adapt" / "curves.png").stat().st_size > 1000
    resumed = _head_weights(work)
    # the same 4 steps without interruption give the same head
    work2 = tmp_path / "work2"
    assert adapt(small_cfg(), data, work2, tmp_path / "model2") == tmp_path / "model2"
    straight = _head_weights(work2)
    assert len(resumed) == len(straight) > 0
    assert all(np.allclose(r, s, rtol=1e-5, atol=1e-6) for r, s in zip(resumed, straight))

    meta = json.loads((out / "landmarks_model.json").read_text())
    assert meta["kind"] == "adapted" and meta["steps"] == 4 and meta["train_images"] == 4
    assert meta["adapt"]["crop_size"] == 64 and len(meta["data_fingerprint"]) == 16
    assert meta["keypoint_score"] == "reliability"
    o = load_delg(out)(np.full((96, 128, 3), 90, np.uint8), [1.0, 0.5], 20, 0.0, [0, 1])
    assert o["features"].shape[1] == 128 and 0 < o["features"].shape[0] <= 20
    assert o["global_descriptors"].shape == (2, 32)
    assert np.all((o["scores"] > 0) & (o["scores"] < 1))  # reliability probabilities
    mtime = (out / "saved_model.pb").stat().st_mtime
    assert adapt(small_cfg(), data, work, out) == out  # up to date: nothing retrained or re-exported
    assert (out / "saved_model.pb").stat().st_mtime == mtime
    # another exported score is a re-export of the same head, not a new adaptation
    assert adapt(small_cfg("adapt.score=norm"), data, work, out) == out
    assert json.loads((out / "landmarks_model.json").read_text())["keypoint_score"] == "norm"
    assert json.loads((work / "adapt" / "state.json").read_text())["resumed_from"] == [2]
    with pytest.raises(LandmarksError, match="--restart"):  # other settings never reuse the checkpoint
        adapt(small_cfg("adapt.steps=6"), data, work, out)


def test_adapt_refuses_bad_input(tmp_path, small_cfg):
    from landmarks.adapt import adapt

    with pytest.raises(LandmarksError):
        adapt(small_cfg(), tmp_path / "nothing", tmp_path / "w", tmp_path / "m")
    with pytest.raises(ConfigError, match="adapt.score"):  # refused when the config loads, before any work
        small_cfg("adapt.score=magic")


def test_warp_check_identity_is_perfect(tmp_path):
    """The match-precision check itself: with no warp and no photometric change, matches are correct."""
    from landmarks.adapt import evaluate
    from landmarks.config import load_config
    from landmarks.delg.export import build_default_model

    cfg = load_config(
        None,
        [
            "model.backbone=tiny",
            "model.init=random",
            "model.local_projection=random_orthogonal",
            "adapt.scale_min=1",
            "adapt.scale_max=1",
            "adapt.max_rotation=0",
            "adapt.perspective=0",
            "adapt.max_shift=0",
            "adapt.photometric=false",
            "adapt.eval_crop=96",
            "adapt.eval_warps=1",
            "adapt.eval_features=50",
            "extract.local_scales=1.0",
        ],
    )
    model = build_default_model(cfg, tmp_path / "m")
    data = _make_data(tmp_path / "d", n=3)
    photos = sorted(str(p) for p in (data / "train").rglob("*.jpg"))
    res = evaluate(cfg, {"m": model}, photos)["m"]
    assert res["pairs"] == 3 and res["matches_per_pair"] > 5
    assert res["precision"] > 0.9 and res["inliers_true"] > res["inliers_wrong"]


@pytest.mark.skipif(
    not (SHARED / "wide_baseline_scenes" / "LABELS.csv").exists(),
    reason="shared real photos (../shared/data) not present",
)
def test_eval_photos_reads_shared_set():
    from landmarks.adapt import eval_photos
    from landmarks.config import Config

    cfg = Config()
    cfg.adapt.eval_data = str(SHARED / "wide_baseline_scenes")
    paths, source = eval_photos(cfg, "unused")
    assert len(paths) == cfg.adapt.eval_images and all(Path(p).exists() for p in paths)
    assert "wide_baseline_scenes" in source


def test_adapt_stage_skips_when_unchanged_and_readapts_on_a_new_train_split(tmp_path, caplog, small_cfg):
    """The cached stage of `make predict`: same inputs -> skipped before TensorFlow is even imported;
    another train split -> adapted again from step 0 (the stale checkpoint replaced, not resumed)."""
    from landmarks.adapt import adapt

    data = _make_data(tmp_path / "data")
    work, out = tmp_path / "work", tmp_path / "work" / "adapt" / "model"
    assert adapt(small_cfg(), data, work, out, replace_stale=True) == out
    state = json.loads((work / "adapt" / "state.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4] and state["resumed_from"] == []
    meta = json.loads((out / "landmarks_model.json").read_text())
    mtime = (out / "saved_model.pb").stat().st_mtime_ns

    caplog.set_level("INFO", logger="landmarks.adapt")
    t0 = time.perf_counter()
    assert adapt(small_cfg(), data, work, out, replace_stale=True) == out
    assert time.perf_counter() - t0 < 2.0
    assert "adapt: up to date" in caplog.text and "skipped" in caplog.text
    assert (out / "saved_model.pb").stat().st_mtime_ns == mtime
    assert json.loads((work / "adapt" / "state.json").read_text()) == state  # no step taken, nothing saved

    # the CLI run make uses: no TensorFlow import, well under the 2 s of a TF start
    code = (
        "import sys, time; t = time.perf_counter(); from landmarks.cli import main; "
        f"rc = main(['adapt', '--data-dir', {str(data)!r}, '--work-dir', {str(work)!r}, '--out', {str(out)!r}, "
        "'--no-eval', '--replace-stale', '--set', 'model.backbone=tiny', '--set', 'model.init=random', "
        "'--set', 'adapt.batch_size=2', '--set', 'adapt.crop_size=64', '--set', 'adapt.max_side=128', "
        "'--set', 'adapt.checkpoint_every=2', '--set', 'adapt.steps=4', '--set', 'adapt.hidden=16']); "
        "assert rc == 0 and 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m)[:3]; "
        "print('elapsed', time.perf_counter() - t)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "up to date" in r.stderr and (out / "saved_model.pb").stat().st_mtime_ns == mtime

    # one more train image: other inputs, so a new adaptation (from step 0) and a new export
    rows = pd.read_csv(data / "train.csv", dtype=str)
    more = _make_data(tmp_path / "more", n=1, seed=5)
    new = pd.read_csv(more / "train.csv", dtype=str)
    src = next((more / "train").rglob("*.jpg"))
    dst = data / src.relative_to(more)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    pd.concat([rows, new]).to_csv(data / "train.csv", index=False)
    with pytest.raises(LandmarksError, match="--restart"):  # the strict CLI default keeps the old checkpoint
        adapt(small_cfg(), data, work, out)
    caplog.clear()
    assert adapt(small_cfg(), data, work, out, replace_stale=True) == out
    assert "of other inputs" in caplog.text
    state2 = json.loads((work / "adapt" / "state.json").read_text())
    assert state2["fingerprint"] != state["fingerprint"] and state2["resumed_from"] == []
    assert [h["step"] for h in state2["history"]] == [1, 2, 3, 4]
    meta2 = json.loads((out / "landmarks_model.json").read_text())
    assert meta2["train_images"] == 5 and meta2["data_fingerprint"] != meta["data_fingerprint"]
    # other adapt settings re-adapt too; a regenerated image (new size/mtime) changes the data fingerprint
    assert adapt(small_cfg("adapt.learning_rate=0.002"), data, work, out, replace_stale=True) == out
    assert json.loads((out / "landmarks_model.json").read_text())["fingerprint"] != meta2["fingerprint"]
    from landmarks.adapt import plan

    fp_before = plan(small_cfg(), data)[1]
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((120, 140, 3), np.uint8)).save(dst)
    os.utime(dst, (1, 1))
    assert plan(small_cfg(), data)[1] != fp_before


def test_a_train_split_that_grows_a_little_keeps_its_adapted_model(tmp_path, caplog, small_cfg):
    """adapt.reuse_overlap: an export adapted with the same settings on most of today's images is
    kept (no step, export untouched), so features extracted with it stay valid; below the share,
    or at reuse_overlap=1, the stage adapts again."""
    from landmarks.adapt import _adapt_images, adapt

    data = _make_data(tmp_path / "data")
    work, out = tmp_path / "work", tmp_path / "work" / "adapt" / "model"
    loose = ["adapt.reuse_overlap=0.75"]
    assert adapt(small_cfg(*loose), data, work, out, replace_stale=True) == out
    mtime = (out / "saved_model.pb").stat().st_mtime_ns
    rows = pd.read_csv(data / "train.csv", dtype=str)
    more = _make_data(tmp_path / "more", n=1, seed=5)
    src = next((more / "train").rglob("*.jpg"))
    dst = data / src.relative_to(more)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    pd.concat([rows, pd.read_csv(more / "train.csv", dtype=str)]).to_csv(data / "train.csv", index=False)
    caplog.set_level("INFO", logger="landmarks.adapt")
    assert adapt(small_cfg(*loose), data, work, out, replace_stale=True) == out  # 4 of 5 images = 0.8 >= 0.75
    assert "kept" in caplog.text and "80.0%" in caplog.text
    assert (out / "saved_model.pb").stat().st_mtime_ns == mtime
    assert adapt(small_cfg("adapt.reuse_overlap=1.0"), data, work, out, replace_stale=True) == out
    assert (out / "saved_model.pb").stat().st_mtime_ns != mtime  # strict: adapted again

    # the sample of a large split is chosen by id hash: appending rows keeps it, a shuffle would not
    cfg = small_cfg("adapt.max_images=3")
    before = set(_adapt_images(cfg.adapt, data)["id"])
    assert len(before) == 3
    rows = pd.read_csv(data / "train.csv", dtype=str)
    outside = [i for i in rows["id"] if i not in before]
    rows[rows["id"] != outside[0]].to_csv(data / "train.csv", index=False)  # drop an image outside the sample
    assert set(_adapt_images(cfg.adapt, data)["id"]) == before
    rows.to_csv(data / "train.csv", index=False)


def test_steps_scale_down_on_a_tiny_train_split(tmp_path, caplog, small_cfg):
    """adapt.pairs_per_image: a tiny split runs fewer steps (never below min_steps), a large one
    adapt.steps; the unscaled fingerprint ignores the new knobs, so large splits keep their models."""
    import dataclasses

    from landmarks.adapt import adapt, effective_steps, plan
    from landmarks.config import Config

    assert effective_steps(Config().adapt, 12) == Config().adapt.steps  # off by default (measured)
    ac = dataclasses.replace(Config().adapt, pairs_per_image=50)
    assert effective_steps(ac, 400) == ac.steps  # the demo's 400 train images: unchanged
    tiny = effective_steps(ac, 12)
    assert ac.min_steps <= tiny < ac.steps
    assert tiny == max(ac.min_steps, -(-int(ac.pairs_per_image * 12) // ac.batch_size))
    assert effective_steps(dataclasses.replace(ac, pairs_per_image=0), 12) == ac.steps  # 0 = off
    assert effective_steps(dataclasses.replace(ac, min_steps=10_000), 12) == ac.steps  # capped by steps

    data = _make_data(tmp_path / "data")  # 4 images, adapt.batch_size=2 in SMALL
    scaled = small_cfg("adapt.steps=6", "adapt.pairs_per_image=1", "adapt.min_steps=3")
    assert effective_steps(scaled.adapt, 4) == 3
    fp_off = plan(small_cfg("adapt.steps=6", "adapt.pairs_per_image=0"), data)[2]
    fp_big = plan(small_cfg("adapt.steps=6", "adapt.pairs_per_image=100", "adapt.min_steps=5"), data)[2]
    assert fp_off == fp_big  # both run 6 steps: same adaptation, same fingerprint
    assert plan(scaled, data)[2] != fp_off
    caplog.set_level("INFO", logger="landmarks.adapt")
    out = tmp_path / "model"
    assert adapt(scaled, data, tmp_path / "work", out) == out
    assert "3 steps, not adapt.steps=6" in caplog.text
    state = json.loads((tmp_path / "work" / "adapt" / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]) == 3
    assert json.loads((out / "landmarks_model.json").read_text())["steps"] == 3
    caplog.clear()
    assert adapt(scaled, data, tmp_path / "work", out) == out  # up to date at its scaled steps
    assert "up to date" in caplog.text and "3 steps on 4 train images" in caplog.text


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_predict_adapts_by_default_and_opts_out():
    """`make predict` runs the graph, which adapts by default and extracts with the export;
    MODEL=... or ADAPT=0 do not adapt."""
    from landmarks.config import Config
    from landmarks.stages import DEFAULT_MODEL, Run, plan

    def dry(*args):
        r = subprocess.run(
            ["make", "-n", "-C", str(REPO), "predict", "WORK_DIR=/tmp/w", *args], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        (line,) = [line for line in r.stdout.splitlines() if "landmarks run" in line]
        return line

    def enabled(run):
        return [s.name for s in plan("predict") if s.enabled(run)]

    line = dry()
    assert "run predict" in line and "--model" not in line and "--no-adapt" not in line
    run = Run(Config(), "data/demo", "/tmp/w")
    names = enabled(run)
    assert names.index("adapt") < names.index("features") < names.index("predict") and "model" not in names
    assert run.model_dir == Path("/tmp/w/adapt/model")
    assert "--model models/default" in dry("MODEL=models/default") and "--no-adapt" in dry("ADAPT=0")
    for run in (Run(Config(), "d", "/tmp/w", model="models/default"), Run(Config(), "d", "/tmp/w", adapt=False)):
        assert "adapt" not in enabled(run) and run.model_dir == DEFAULT_MODEL
    run = Run(Config(), "d", "/tmp/w", model="/somewhere/delg")
    assert "adapt" not in enabled(run) and "model" not in enabled(run) and run.model_dir == Path("/somewhere/delg")


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_validate_hard_keeps_the_zero_training_model_unless_given():
    """The hard protocol builds its own splits: it does not adapt on DATA_DIR; a given MODEL is used."""

    def hard(*args):
        r = subprocess.run(["make", "-n", "-C", str(REPO), "validate-hard", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = hard()
    assert "landmarks adapt" not in out and "--model models/default" in out
    assert "--model /x/adapted" in hard("MODEL=/x/adapted")
