"""landmarks.utils.cache: rows keyed by their image's file key, damaged stage outputs redone, one hasher."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from landmarks import features, knn, verify, whiten
from landmarks.config import Config
from landmarks.features import run_features
from landmarks.local_features import ensure_local
from landmarks.store import INDEX_NAME, FeatureStore, LocalFeatures, load_index, write_shard
from landmarks.utils import LandmarksError, cache
from landmarks.utils.layout import WorkLayout
from plain import plain_config


def _path(root, split, i):
    return root / split / i[0] / i[1] / i[2] / f"{i}.jpg"


def _cfg(**kw):
    cfg = Config()
    cfg.extract.max_image_size = 64
    cfg.extract.max_feature_num = 50
    cfg.extract.intra_op_threads = 1
    for k, v in kw.items():
        setattr(cfg.extract, k, v)
    return cfg


@pytest.fixture
def dataset(tmp_path, write_split):
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    train = write_split(root, "train", 8, rng, bad=False)
    test = write_split(root, "test", 3, rng, bad=False)
    pd.DataFrame({"id": train, "landmark_id": np.arange(len(train)) % 3}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": test, "landmarks": ""}).to_csv(root / "sample_submission.csv", index=False)
    return root, train


# -- file keys ---------------------------------------------------------------------------------------
def _replace_same_size(path: Path) -> None:
    """Write another picture into the same file (same inode), same byte count, mtime restored."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    with Image.open(path) as im:
        w, h = im.size
    other = Image.fromarray(np.full((h, w, 3), 200, np.uint8))
    other.save(path, quality=92)
    new = path.read_bytes()
    new = new[: len(data)] + b"\0" * max(0, len(data) - len(new))  # JPEG decoders ignore trailing bytes
    path.write_bytes(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_file_keys_notice_a_replaced_image_of_same_size_and_mtime(tmp_path):
    p = tmp_path / "a.jpg"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(p)
    stat0, content0 = cache.file_keys(["a"], [p])[0], cache.file_keys(["a"], [p], "content")[0]
    assert stat0.startswith("a:") and content0.startswith("a:c")
    assert cache.file_keys(["a"], [p]) == [stat0]  # stable
    _replace_same_size(p)
    assert cache.file_keys(["a"], [p])[0] != stat0  # ctime (and ns mtime) are in the key
    assert cache.file_keys(["a"], [p], "content")[0] != content0
    assert cache.file_keys(["b"], [tmp_path / "none.jpg"]) == ["b:-"]
    with pytest.raises(LandmarksError, match="file_key"):
        cache.file_keys(["a"], [p], "mtime")


def test_settings_hash_leaves_runtime_keys_out():
    a, b = Config(), Config()
    b.knn.chunk_size = 7
    b.verify.jobs = 9
    assert cache.settings_hash(a, "knn", "verify") == cache.settings_hash(b, "knn", "verify")
    b.knn.k = 3
    assert cache.settings_hash(a, "knn") != cache.settings_hash(b, "knn")
    assert WorkLayout("w").knn(a) != WorkLayout("w").knn(b) and len(WorkLayout("w").knn(a).stem) == 4 + cache.HASH_LEN


# -- issue 21 item 1: stale rows of a replaced image are never used ------------------------------------
@pytest.mark.parametrize("same_size_and_mtime", [False, True])
def test_a_replaced_train_image_gets_fresh_global_and_local_rows(dataset, tmp_path, fake_model, same_size_and_mtime):
    root, train = dataset
    cfg, work = _cfg(), tmp_path / "work"
    want = train[:4]
    run_features(cfg, root, work, fake_model, "train", shards=2, jobs=1)
    old = ensure_local(cfg, root, work, fake_model, "train", want, jobs=1)
    old_lf = old.local([train[1]])[train[1]]
    old.close()
    p = _path(root, "train", train[1])
    if same_size_and_mtime:
        _replace_same_size(p)
    else:
        Image.fromarray(np.full((80, 90, 3), 30, np.uint8)).save(p)
    # the rerun, as make runs it: features, then the local features of the shortlist
    run_features(cfg, root, work, fake_model, "train", shards=2, jobs=1)
    new = ensure_local(cfg, root, work, fake_model, "train", want, jobs=1)
    fresh_paths = run_features(cfg, root, tmp_path / "fresh", fake_model, "train", shards=1, jobs=1, local=True)
    fresh = FeatureStore(fresh_paths[0].parent)
    ids, g = new.global_matrix()
    fids, fg = fresh.global_matrix()
    assert ids == fids
    np.testing.assert_array_equal(g, fg)  # the replaced image's global row too
    for i in want:
        a, b = new.local([i])[i], fresh.local([i])[i]
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
    assert not np.array_equal(new.local([train[1]])[train[1]].descriptors[:5], old_lf.descriptors[:5])


def test_content_file_keys_mode(dataset, tmp_path, fake_model, monkeypatch):
    """extract.file_key=content: a touched but unchanged image is kept, a changed one redone."""
    root, train = dataset
    cfg, work = _cfg(file_key="content"), tmp_path / "work"
    run_features(cfg, root, work, fake_model, "train", shards=1, jobs=1)
    done = []
    real = features.extract_shard
    monkeypatch.setattr(features, "extract_shard", lambda t: done.append(r := real(t)) or r)
    os.utime(_path(root, "train", train[0]), ns=(1, 10**18))  # another mtime, same bytes
    run_features(cfg, root, work, fake_model, "train", shards=1, jobs=1)
    assert sum(r["extracted"] for r in done) == 0
    Image.fromarray(np.full((80, 90, 3), 30, np.uint8)).save(_path(root, "train", train[0]))
    run_features(cfg, root, work, fake_model, "train", shards=1, jobs=1)
    assert sum(r["extracted"] for r in done) == 1


# -- issue 21 item 4: damaged stage outputs -----------------------------------------------------------
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _lf(rng, n=30):
    kp = rng.uniform(0, 300, (n, 2)).astype(np.float32)
    return LocalFeatures(kp, _unit(rng.normal(size=(n, 16))), np.ones(n, np.float32), np.ones(n, np.float32))


def _stores(root: Path, n_train=20, n_test=5):
    rng = np.random.default_rng(0)
    write_shard(
        root / "features/train/shard-00000-of-00001.h5",
        [f"tr{i}" for i in range(n_train)],
        _unit(rng.normal(size=(n_train, 8))),
        [_lf(rng) for _ in range(n_train)],
    )
    write_shard(
        root / "features/test/shard-00000-of-00001.h5",
        [f"te{i}" for i in range(n_test)],
        _unit(rng.normal(size=(n_test, 8))),
        [_lf(rng) for _ in range(n_test)],
    )


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    """Damage the last byte of the last array (the file still opens as a zip)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.infolist()[-1]
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    end = info.header_offset + 30 + name_len + extra_len + info.compress_size  # local header, then data
    data[end - 1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_damaged_stage_outputs_are_reported_and_redone(tmp_path, caplog, damage):
    _stores(tmp_path)
    cfg = plain_config()
    cfg.knn.k = 5
    cfg.verify.num_to_rerank = 3
    cfg.whiten.global_pca = True
    cfg.whiten.global_pca_dim = 4
    work = WorkLayout(tmp_path)
    tr, te = work.features("train"), work.features("test")

    def run_all():
        assert len(FeatureStore(tr).ids) == 20  # the id index every reader loads
        whiten.run_whiten(cfg, tr, work.whiten(cfg))
        knn.run_knn(cfg, tr, te, work.knn(cfg), work.whiten(cfg))
        return verify.run_verify(cfg, work.knn(cfg), te, tr, work.verified(cfg), work.whiten(cfg))

    run_all()
    outputs = [work.whiten(cfg), work.knn(cfg), work.verified(cfg)]
    stamps = [cache.read_stamp(p) for p in outputs]
    if damage is _truncate:  # the id index is read member by member: a cut file is what happens to it
        outputs.append(tr / INDEX_NAME)
    for p in outputs:
        damage(p)
        caplog.clear()
        caplog.set_level("WARNING")
        run_all()
        assert any(str(p) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records), p
        assert [cache.read_stamp(q) for q in outputs[:3]] == stamps  # redone, the same
        assert load_index(tr).g_ids.shape == (20,)
    # a reader of a damaged file it cannot redo says so in one line
    _truncate(work.knn(cfg))
    with pytest.raises(LandmarksError, match="damaged.*landmarks knn"):
        verify.run_verify(cfg, work.knn(cfg), te, tr, work.verified(cfg), work.whiten(cfg))
    _truncate(work.whiten(cfg))
    with pytest.raises(LandmarksError, match="landmarks whiten"):
        whiten.load_whiten(cfg, work.whiten(cfg), tr, "global")


def test_drop_rows_keeps_the_others(tmp_path):
    from landmarks.store import drop_rows, read_keys

    rng = np.random.default_rng(0)
    p = tmp_path / "local-cache-x-00000-of-00001.h5"
    lfs = [_lf(rng, n) for n in (3, 4, 5)]
    write_shard(
        p,
        ["a", "b", "c"],
        _unit(rng.normal(size=(3, 8))),
        lfs,
        failures=[("d", "missing file")],
        attrs={"fingerprint": "f"},
        keys=["a:1", "b:1", "c:1"],
        failure_keys=["d:-"],
    )
    drop_rows(p, {"b", "d"})
    assert read_keys(p) == {"a": "a:1", "c": "c:1"}
    s = FeatureStore(tmp_path)
    assert s.local_ids() == {"a", "c"} and s.failures() == {}
    np.testing.assert_array_equal(s.local(["c"])["c"].keypoints, lfs[2].keypoints)
    with h5py.File(p) as f:
        assert f.attrs["fingerprint"] == ""  # never taken as a done shard
    drop_rows(p, {"a", "c"})
    assert not p.exists()


# -- issue 24 item 1 and issue 22 item 4: adapted models --------------------------------------------
def _adapt_cfg(extra=()):
    from landmarks.config import load_config

    return load_config(
        None,
        [
            "model.backbone=tiny",
            "model.init=random",
            "adapt.batch_size=2",
            "adapt.crop_size=64",
            "adapt.max_side=128",
            "adapt.checkpoint_every=2",
            "adapt.steps=2",
            "adapt.hidden=8",
            "extract.max_image_size=96",
            "extract.max_feature_num=40",
            "extract.intra_op_threads=1",
            *extra,
        ],
    )


def _photos(root: Path, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        base = rng.integers(0, 255, (12, 14, 3)).astype(np.uint8)
        i = f"{seed:x}{k:03x}{rng.integers(0, 16**12):012x}"
        p = _path(root, "train", i)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).resize((140, 120), Image.NEAREST).save(p)
        rows.append((i, k % 3))
    return pd.DataFrame(rows, columns=["id", "landmark_id"])


def test_readapting_keeps_every_train_global_row_and_default_shares_the_global_fingerprint(tmp_path, monkeypatch):
    """22 train images, adapted model: appending 2 rows re-adapts (below adapt.reuse_overlap) and
    re-extracts only the 2 new images; a changed adapt.* setting re-adapts and re-extracts none."""
    from landmarks.adapt import adapt
    from landmarks.delg.delg_io import load_delg, postprocess
    from landmarks.delg.export import build_default_model
    from landmarks.utils.tfquiet import keras

    data, work = tmp_path / "data", tmp_path / "work"
    df = _photos(data, 24, 1)
    df.head(22).to_csv(data / "train.csv", index=False)
    model = work / "adapt" / "model"
    done = []
    real = features.extract_shard
    monkeypatch.setattr(features, "extract_shard", lambda t: done.append(r := real(t)) or r)

    def rerun(cfg):
        done.clear()
        assert adapt(cfg, data, work, model, replace_stale=True) == model
        run_features(cfg, data, work, model, "train", shards=2, jobs=1)
        return sum(r["extracted"] for r in done)

    cfg = _adapt_cfg()
    assert rerun(cfg) == 22
    meta0 = cache.model_fingerprints(model)
    df.to_csv(data / "train.csv", index=False)  # 2 rows appended: 22/24 < adapt.reuse_overlap
    assert rerun(cfg) == 2
    meta1 = cache.model_fingerprints(model)
    assert meta1[0] == meta0[0] and meta1[1] != meta0[1]  # a new local head, the same global path
    assert rerun(_adapt_cfg(["adapt.learning_rate=0.003"])) == 0
    assert cache.model_fingerprints(model)[1] != meta1[1]

    # the zero-training model of the same backbone has the adapted model's global fingerprint,
    # and the same global descriptors
    keras.utils.set_random_seed(cfg.adapt.seed)  # adapt seeds before building its (random) tiny backbone
    default = build_default_model(cfg, tmp_path / "default")
    assert cache.model_fingerprints(default)[0] == meta0[0]
    img = np.asarray(Image.open(next((data / "train").rglob("*.jpg"))).convert("RGB"))
    g = [postprocess(load_delg(m)(img, [0.5, 1.0], 10, 0.0, [0, 1]))[0] for m in (default, model)]
    np.testing.assert_array_equal(g[0], g[1])


def test_a_second_work_dir_adapts_nothing(tmp_path, caplog):
    """The models cache: the same train images and settings are adapted once across WORK_DIRs."""
    from landmarks.adapt import adapt

    data = tmp_path / "data"
    _photos(data, 4, 2).to_csv(data / "train.csv", index=False)
    cfg, models = _adapt_cfg(), tmp_path / "models-cache"
    one = adapt(cfg, data, tmp_path / "w1", tmp_path / "w1/adapt/model", models_cache=models)
    caplog.set_level("INFO", logger="landmarks.adapt")
    two = adapt(cfg, data, tmp_path / "w2", tmp_path / "w2/adapt/model", models_cache=models)
    assert "taken from the models cache" in caplog.text
    assert not (tmp_path / "w2" / "adapt" / "state.json").exists()  # no step taken
    assert (two / "saved_model.pb").read_bytes() == (one / "saved_model.pb").read_bytes()
    assert cache.model_fingerprints(two) == cache.model_fingerprints(one)
    # another setting is another entry
    adapt(_adapt_cfg(["adapt.learning_rate=0.003"]), data, tmp_path / "w3", tmp_path / "w3/m", models_cache=models)
    assert len(list(models.glob("adapt-*"))) == 2
    shutil.rmtree(tmp_path / "w1")


def test_every_export_folds_batch_norms_and_a_stale_default_model_is_rebuilt(tmp_path):
    import json
    import subprocess
    import sys

    from landmarks.adapt import adapt

    data = tmp_path / "data"
    _photos(data, 3, 3).to_csv(data / "train.csv", index=False)
    out = adapt(_adapt_cfg(), data, tmp_path / "w", tmp_path / "adapted")
    meta = json.loads((out / "landmarks_model.json").read_text())
    assert meta["fold_batchnorm"] is True and meta["global_fingerprint"] and meta["local_fingerprint"]

    base = [sys.executable, "-m", "landmarks", "model", "build", "--out", str(tmp_path / "m")]
    tiny = ["--set", "model.backbone=tiny", "--set", "model.init=random"]
    r = subprocess.run(base + tiny, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "m" / "landmarks_model.json").read_text())["fold_batchnorm"] is True
    code = (
        "import sys; from landmarks.cli import main; "
        f"rc = main({[*base[3:], *tiny]!r}); assert rc == 0 and 'tensorflow' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "up to date" in r.stdout + r.stderr, r.stderr[-2000:]
    other = [*tiny, "--set", "model.gem_p=4"]
    r = subprocess.run(base + other + ["--check"], capture_output=True, text=True)
    assert r.returncode != 0 and "other model settings" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(base + other, capture_output=True, text=True)
    assert r.returncode == 0 and "rebuilding" in r.stderr, r.stderr[-2000:]
