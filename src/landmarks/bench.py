"""`make bench`: speed and memory of every stage against its baseline and its limit.

Rows (``bench.rows``; each runs on its own, a failing row prints its error and the others go on):

1. Extraction: images/s of the full feature path (decode + resize + model + post-processing +
   shard write, ``extract.extract_shard`` in this process) vs the bare backbone forward pass on
   the same images, sizes and scales; backbone FLOPs (tf.profiler) and fraction of CPU peak.
2. Local matching + verification: pairs/s of the host baseline (cKDTree + distance bound +
   pydegensac) vs the configured matcher + pydegensac, on real photo pairs, with mean inliers.
3. kNN: time and peak RSS of top-K for many queries against N synthetic train descriptors:
   faiss exact vs approximate vs chunked numpy, recall@K of the approximate index.
4. End to end: test images/s of ``predict.run_predict`` for each NUM_TO_RERANK (features ready).
5. Data layer: reading a generated GLDv2-size train.csv and building the label arrays.
6. Verification: time per test image at N = 1 k and 1.58 M synthetic train ids (flat: one id
   index per stage).
7. Incremental extraction: time to add 1 % of rows to an extracted set vs extracting it all.

Every timing is the median of ``bench.repeats`` runs; ratios come from the same run.  Output:
the table on stdout and WORK_DIR/bench.md (machine, versions, inputs, the rows, and the "GLDv2
scale on paper" section computed from the measured rows).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from landmarks.utils import LandmarksError, atomic_path, log

REPO = Path(__file__).resolve().parents[2]
ROW_TITLES = {
    1: "Extraction: pipeline vs bare backbone",
    2: "Local matching + verification",
    3: "kNN: exact vs approximate vs numpy",
    4: "End to end: predict",
    5: "Data layer: train.csv",
    6: "Verification vs train size N",
    7: "Incremental extraction: add 1 %",
}


# ---------------------------------------------------------------------------------- helpers
def quick_config(bc):
    """A copy of BenchConfig shrunk for a smoke run (seconds, not minutes)."""
    q = copy.deepcopy(bc)
    q.quick = True
    q.repeats = 1
    q.extract_images = min(bc.extract_images, 3)
    q.match_classes = min(bc.match_classes, 2)
    q.match_per_class = min(bc.match_per_class, 2)
    q.match_features = min(bc.match_features, 200)
    q.knn_sizes = (2000,)
    q.knn_dims = (0, 64)
    q.knn_real_images = min(bc.knn_real_images, 6)
    q.knn_queries = 200
    q.knn_timed_queries = 100
    q.e2e_rerank = (2, 4)
    q.e2e_test_images = min(bc.e2e_test_images, 8) if bc.e2e_test_images > 0 else 8
    q.csv_rows = 20_000
    q.csv_classes = 500
    q.verify_sizes = (200, 20_000)
    q.verify_test_images = 8
    q.incr_images = 8
    return q


def parse_rows(text) -> list[int]:
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    try:
        rows = sorted({int(t) for t in str(text).replace(" ", "").split(",") if t})
    except ValueError:
        raise LandmarksError(f"--rows must look like 1,3 (got {text!r})") from None
    bad = [r for r in rows if r not in ROW_TITLES]
    if bad or not rows:
        raise LandmarksError(f"--rows: unknown row(s) {bad or text!r} (rows are 1-{max(ROW_TITLES)})")
    return rows


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Peak resident memory above the level at entry, sampled every `period` seconds."""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def _gb(b) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"


def _fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process (clean peak-memory numbers); return its result."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


# ---------------------------------------------------------------------------------- machine
def cpu_info() -> dict:
    """CPU model, cores, SIMD flags and clock (GHz) from /proc/cpuinfo."""
    model, mhz, flags = platform.processor() or "unknown", 0.0, set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "model name" and model in ("unknown", "", platform.processor()):
                model = v
            elif k == "cpu MHz" and not mhz:
                mhz = float(v)
            elif k == "flags" and not flags:
                flags = set(v.split())
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        mem = 0
    return {"model": model, "cores": _cores(), "mhz": mhz, "simd": simd, "ram": mem}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("numpy", "pandas", "tensorflow-cpu", "tensorflow", "keras", "faiss-cpu", "pydegensac", "scipy",
                 "h5py"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def peak_gflops(cfg, info: dict) -> tuple[float, str]:
    """Peak FP32 GFLOP/s = cores x GHz x FLOP/cycle, with the assumption spelled out."""
    bc = cfg.bench
    ghz = bc.cpu_ghz or (info["mhz"] / 1000.0)
    if ghz <= 0:
        ghz = 2.0
        src = "assumed 2.0 GHz (no clock in /proc/cpuinfo)"
    else:
        src = "bench.cpu_ghz" if bc.cpu_ghz else "/proc/cpuinfo 'cpu MHz' (nominal; turbo not counted)"
    peak = info["cores"] * ghz * bc.flops_per_cycle
    return peak, (f"{info['cores']} cores x {ghz:.2f} GHz ({src}) x {bc.flops_per_cycle} FLOP/cycle "
                  "(AVX2: 2 FMA units x 8 fp32 x 2; AVX-512 on Zen 4 is double-pumped, same rate)")


def _model_meta(model_dir) -> dict | None:
    p = Path(model_dir) / "landmarks_model.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _model_dim(cfg, model_dir) -> int:
    meta = _model_meta(model_dir)
    return int(meta["global_dim"]) if meta and meta.get("global_dim") else int(cfg.model.global_dim)


# ---------------------------------------------------------------------------------- row 1
def _backbone_fn(meta: dict):
    """The exported model's backbone (random weights: same speed) as a frozen graph-mode function."""
    from landmarks.model import LITE0_LOCAL, build_backbone
    from landmarks.tfquiet import tf

    name = meta.get("backbone")
    if not name:
        raise LandmarksError("model metadata names no backbone")
    if name == "efficientnet_lite0":
        net = build_backbone(name, "random", local_layer=meta.get("local_layer") or LITE0_LOCAL)
    else:
        net = build_backbone(name, "random")
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: net(x, training=False), input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)])
    # frozen (weights as constants: batch norm folds into the convolutions): the fastest plain forward pass
    return net, convert_variables_to_constants_v2(fn.get_concrete_function())


def backbone_flops(net, size: int = 512) -> float:
    """FLOPs of one forward pass at size x size counted by tf.profiler (mul and add = 2)."""
    from landmarks.tfquiet import tf

    # isort: split
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    cf = tf.function(lambda x: net(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 3], tf.float32))
    frozen = convert_variables_to_constants_v2(cf)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                         options=opts)
    return float(info.total_float_ops)


def _storage(path) -> dict:
    """Bytes on disk of each dataset in an HDF5 shard, plus the file size."""
    import h5py

    out = {"file": Path(path).stat().st_size}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj.id.get_storage_size()
        f.visititems(visit)
        out["n"] = int(f["ids"].shape[0])
        out["m"] = int(f["local/descriptors"].shape[0]) if "local" in f else 0
    return out


def row_extraction(cfg, data_dir, work_dir, model_dir) -> dict:
    from landmarks import extract
    from landmarks.data import load_split
    from landmarks.images import load_image
    from landmarks.tfquiet import tf
    from landmarks.utils import configure_tensorflow

    bc = cfg.bench
    cores = _cores()
    configure_tensorflow(cores)
    df = load_split(data_dir, "train")
    df = df[[os.path.exists(p) for p in df["path"]]].head(bc.extract_images)
    if len(df) == 0:
        raise LandmarksError(f"no train images found in {data_dir}")
    ids, paths = df["id"].tolist(), df["path"].tolist()
    model_dir = Path(model_dir).resolve()
    settings = extract.result_settings(cfg)
    out_dir = Path(work_dir) / "bench" / "extract"
    out_dir.mkdir(parents=True, exist_ok=True)

    def pipeline(k):
        task = extract.ShardTask(out=str(out_dir / f"shard-{k}.h5"), ids=ids, paths=paths, model_dir=str(model_dir),
                                 settings=settings, local=True, threads=cores, prefetch=cfg.extract.prefetch)
        t = time.perf_counter()
        r = extract.extract_shard(task)
        if r["done"] == 0:
            raise LandmarksError(f"extraction produced no features ({r['failures']})")
        return time.perf_counter() - t

    pipeline("warmup")  # loads the model (cached per process by extract), traces the graph
    model = extract._get_model(str(model_dir), cores)  # the very model object the pipeline used
    images = [load_image(p, settings["max_image_size"], settings["max_image_pixels"], settings["min_image_size"])[0]
              for p in paths]
    scales, rows, cap = extract.model_call(settings, local=True)  # the test-side call (global + local)
    args = (scales, cap, settings["abs_thres"], rows)

    def model_only():  # model call alone on decoded images: decode, post-processing and write excluded
        t = time.perf_counter()
        for im in images:
            model(im, *args)
        return time.perf_counter() - t

    n = len(images)
    mpix = sum(im.shape[0] * im.shape[1] for im in images) / n / 1e6
    res = {"n": n, "mpix": mpix, "scales": list(scales), "backbone": None}
    meta = _model_meta(model_dir)
    bb = None
    if meta is None:
        res["backbone_error"] = "model has no landmarks_model.json (not built here): backbone unknown"
    else:
        from landmarks.model import normalize_pixels

        net, fn = _backbone_fn(meta)
        pre = meta.get("preprocess", "tf128")
        inputs = []
        for im in images:  # the sizes the serving graph resizes to: round(h*s), round(w*s)
            h, w = im.shape[:2]
            for sc in scales:
                nh, nw = max(1, int(round(h * sc))), max(1, int(round(w * sc)))
                x = tf.image.resize(tf.cast(im, tf.float32)[None], (nh, nw), method="bilinear")
                inputs.append(normalize_pixels(x, pre))
        fn(inputs[0])

        def bb():
            t = time.perf_counter()
            for x in inputs:
                fn(x)
            return time.perf_counter() - t

    # interleaved repeats: load changes on a shared machine hit all three alike
    times = {"pipe": [], "model": [], "bb": []}
    for k in range(bc.repeats):
        times["pipe"].append(pipeline(k))
        times["model"].append(model_only())
        if bb is not None:
            times["bb"].append(bb())
    res["pipe_s"], res["model_s"] = _median(times["pipe"]), _median(times["model"])
    res["pipe_ips"], res["model_ips"] = n / res["pipe_s"], n / res["model_s"]
    store = _storage(out_dir / "shard-0.h5")
    res["store"] = store
    res["feat_per_img"] = store["m"] / max(1, store["n"])
    res["rss_peak"] = _rss_bytes()
    if bb is not None:
        ref = 512
        flops_ref = backbone_flops(net, ref)
        pixels = sum(int(x.shape[1]) * int(x.shape[2]) for x in inputs)
        flops_img = flops_ref / (ref * ref) * pixels / n
        peak, assumption = peak_gflops(cfg, cpu_info())
        res.update(backbone=meta.get("backbone"), bb_s=_median(times["bb"]), flops_img=flops_img, peak=peak,
                   peak_note=assumption, flops_ref=flops_ref)
        res["bb_ips"] = n / res["bb_s"]
        res["ratio"] = res["pipe_ips"] / res["bb_ips"]
        res["bb_gflops"] = flops_img * res["bb_ips"] / 1e9
        res["pipe_gflops"] = flops_img * res["pipe_ips"] / 1e9
    res["times"] = times
    return res


def _md_extraction(r: dict) -> list[str]:
    L = [f"Images: {r['n']} train images of the data dir, mean input {r['mpix']:.3f} MP after max_image_size, "
         f"scales {r['scales']}; {r['feat_per_img']:.0f} local features/image; TF threads = all cores, one process.",
         "", "| measurement | images/s | s/image | ratio to backbone |", "|---|---|---|---|"]
    bb = r.get("bb_ips")
    for name, key in (("full feature path (decode+resize+model+post+write)", "pipe_ips"),
                      ("model call only (decoded images)", "model_ips"), ("bare backbone forward (frozen graph, pre-resized inputs)", "bb_ips")):
        v = r.get(key)
        ratio = f"{v / bb:.3f}" if (v and bb) else "n/a"
        L.append(f"| {name} | {_fmt(v)} | {_fmt(1 / v if v else None, 3)} | {ratio} |")
    if bb:
        ok = "meets" if r["ratio"] >= 0.85 else "below"
        L += ["", f"Pipeline overhead ratio **{r['ratio']:.3f}** (aim >= 0.85: {ok}); the model-call row includes "
              "the in-graph resize, heads, top-k and the exported graph's unfolded batch norms (the frozen backbone "
              "folds them), so model - backbone = those, pipeline - model = decode + post-processing + write "
              "(decode overlaps the model in a prefetch thread).",
              f"Backbone ({r['backbone']}): {r['flops_img'] / 1e9:.2f} GFLOP/image (tf.profiler: "
              f"{r['flops_ref'] / 1e9:.2f} GFLOP at 512x512, scaled by the pixels of each scale); achieved "
              f"{r['bb_gflops']:.1f} GFLOP/s in the backbone ({100 * r['bb_gflops'] / r['peak']:.1f} % of peak), "
              f"{r['pipe_gflops']:.1f} GFLOP/s end to end ({100 * r['pipe_gflops'] / r['peak']:.1f} %). "
              f"Peak FP32 {r['peak']:.0f} GFLOP/s = {r['peak_note']}."]
    else:
        L += ["", f"Backbone: n/a ({r.get('backbone_error')})"]
    L.append("Runs (s, interleaved): " + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}"
                                                   for k, v in r.get("times", {}).items() if v))
    return L


# ---------------------------------------------------------------------------------- row 2
def _shared_dir(cfg) -> Path:
    return Path(cfg.bench.shared_data) if cfg.bench.shared_data else REPO.parent / "shared" / "data"


def _match_images(cfg, data_dir) -> tuple[list[tuple[str, str, str]], str]:
    """(id, label, path) of match_classes x match_per_class images: shared real photos, else the data dir."""
    import pandas as pd

    bc = cfg.bench
    rows, source = [], ""
    shared = _shared_dir(cfg)
    sets = [shared / s for s in ("paris6k_subset", "multiview_scenes")]
    if all((s / "LABELS.csv").exists() for s in sets):
        frames = []
        for s in sets:
            d = pd.read_csv(s / "LABELS.csv", dtype=str).dropna(subset=["landmark_id"])
            d["path"] = [str(s / p) for p in d["path"]]
            frames.append(d)
        df = pd.concat(frames)
        source = f"real photos from {shared} (paris6k_subset + multiview_scenes)"
    else:
        from landmarks.data import load_split

        df = load_split(data_dir, "train")
        df["landmark_id"] = df["landmark_id"].astype(str)
        source = f"train images of {data_dir} ({shared} not found)"
    df = df[[os.path.exists(p) for p in df["path"]]]
    counts = df.groupby("landmark_id").size()
    labels = sorted(counts[counts >= bc.match_per_class].index)
    if len(labels) < 2:
        raise LandmarksError(f"row 2 needs 2 landmarks with >= {bc.match_per_class} images ({source})")
    step = max(1, len(labels) // bc.match_classes)
    for lab in labels[::step][:bc.match_classes]:
        sub = df[df["landmark_id"] == lab].sort_values("id").head(bc.match_per_class)
        rows += [(str(i), str(lab), str(p)) for i, p in zip(sub["id"], sub["path"])]
    return rows, source


def _match_features(cfg, model_dir, items, cache: Path) -> tuple[list, dict]:
    """Local features of the pair images (max bench.match_features), cached by model + ids + settings.

    Also returns the extraction timing of these real photos (one pass after one warm-up image, from the
    run that filled the cache): {"s": seconds, "n": images, "mpix": mean MP after max_image_size}."""
    from landmarks.delg_io import load_delg, postprocess
    from landmarks.images import load_image
    from landmarks.store import LocalFeatures
    from landmarks.utils import configure_tensorflow, dir_digest, text_digest

    e = cfg.extract
    key = text_digest(dir_digest(model_dir), json.dumps([items, list(e.local_scales), cfg.bench.match_features,
                                                         e.abs_thres, e.max_image_size]))
    path = cache / f"match-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            feats = [LocalFeatures(z[f"k{i}"], z[f"d{i}"], z[f"s{i}"], z[f"c{i}"]) for i in range(len(items))]
            timing = json.loads(str(z["timing"])) if "timing" in z.files else {}
            return feats, timing
    configure_tensorflow(_cores())
    model = load_delg(model_dir)
    out = []
    from tqdm import tqdm

    def one(p):
        img, scale = load_image(p, e.max_image_size, e.max_image_pixels, e.min_image_size)
        _, lf = postprocess(model(img, list(e.local_scales), cfg.bench.match_features, e.abs_thres, [0]))
        lf.keypoints = (lf.keypoints / np.float32(scale)).astype(np.float32)
        return lf, img.shape[0] * img.shape[1]

    one(items[0][2])  # warm-up
    t, pix = time.perf_counter(), 0
    for _, _, p in tqdm(items, desc="bench: match features", unit="img", disable=None):
        lf, px = one(p)
        pix += px
        out.append(lf)
    timing = {"s": time.perf_counter() - t, "n": len(items), "mpix": pix / len(items) / 1e6}
    arrays = {"timing": np.array(json.dumps(timing))}
    for i, lf in enumerate(out):
        arrays.update({f"k{i}": lf.keypoints, f"d{i}": lf.descriptors, f"s{i}": lf.scales, f"c{i}": lf.scores})
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return out, timing


def _run_matcher(vc, feats, matcher: str) -> tuple[float, float, np.ndarray]:
    """Every image against all others: (matching seconds, RANSAC seconds, inliers [n, n])."""
    from landmarks import verify

    n = len(feats)
    inl = np.zeros((n, n), np.int32)
    t_match = t_ransac = 0.0
    for a in range(n):
        cands = [b for b in range(n) if b != a]
        t = time.perf_counter()
        if matcher == "mutual":
            ms = verify.match_mutual_batch(feats[a].descriptors, [feats[b].descriptors for b in cands],
                                           vc.mutual_min_sim, vc.ratio)
        else:
            ms = [verify.match_kdtree(feats[a].descriptors, feats[b].descriptors, vc.kdtree_distance) for b in cands]
        t_match += time.perf_counter() - t
        t = time.perf_counter()
        for b, m in zip(cands, ms):
            inl[a, b] = verify.count_inliers(vc, feats[a].keypoints, feats[b].keypoints, m)
        t_ransac += time.perf_counter() - t
    return t_match, t_ransac, inl


def row_matching(cfg, data_dir, work_dir, model_dir) -> dict:
    bc = cfg.bench
    items, source = _match_images(cfg, data_dir)
    feats, timing = _match_features(cfg, Path(model_dir).resolve(), items, Path(work_dir) / "bench" / "match")
    labels = np.array([lab for _, lab, _ in items])
    n = len(items)
    same = (labels[:, None] == labels[None, :]) & ~np.eye(n, dtype=bool)
    diff = labels[:, None] != labels[None, :]
    pairs = n * (n - 1)
    res = {"n": n, "pairs": pairs, "same": int(same.sum()), "diff": int(diff.sum()), "source": source,
           "feat_per_img": float(np.mean([len(f) for f in feats])), "methods": {}, "extract": timing}
    base_vc = dataclasses.replace(cfg.verify, matcher="kdtree")
    for name, vc in (("baseline: cKDTree(d<%.2f) + pydegensac" % cfg.verify.kdtree_distance, base_vc),
                     (f"default: {cfg.verify.matcher} + pydegensac", cfg.verify)):
        runs = [_run_matcher(vc, feats, vc.matcher) for _ in range(bc.repeats)]
        tm, tr = _median([r[0] for r in runs]), _median([r[1] for r in runs])
        inl = runs[0][2]
        res["methods"][name] = {"match_s": tm, "ransac_s": tr, "pairs_s": pairs / (tm + tr),
                                "inl_same": float(inl[same].mean()) if same.any() else float("nan"),
                                "inl_diff": float(inl[diff].mean()) if diff.any() else float("nan"),
                                "matcher": vc.matcher}
    (b, base), (_, dflt) = list(res["methods"].items())
    res["speedup"] = dflt["pairs_s"] / base["pairs_s"]
    res["default_pairs_s"] = dflt["pairs_s"]
    return res


def _md_matching(r: dict) -> list[str]:
    L = [f"Pairs: {r['n']} images ({r['source']}), every ordered pair: {r['pairs']} pairs "
         f"({r['same']} same-landmark, {r['diff']} different); {r['feat_per_img']:.0f} local features/image "
         "(default model, cap bench.match_features). One query image against all others per matcher call, as "
         "verify does for its candidates.", "",
         "| method | pairs/s | matching s | RANSAC s | mean inliers same | mean inliers different |",
         "|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        L.append(f"| {name} | {m['pairs_s']:.1f} | {m['match_s']:.3f} | {m['ransac_s']:.3f} | "
                 f"{m['inl_same']:.1f} | {m['inl_diff']:.1f} |")
    ex = r.get("extract") or {}
    if ex.get("n"):
        L += ["", f"Extraction of these photos (model call + decode + post-processing, one pass, from the run that "
              f"filled the cache): {ex['s'] / ex['n']:.2f} s/image at {ex['mpix']:.2f} MP "
              f"({ex['s'] / ex['n'] / ex['mpix']:.2f} s/MP)."]
    ok = "meets" if r["speedup"] >= 5 else "below"
    dflt = list(r["methods"].values())[1]
    dom = "RANSAC" if dflt["ransac_s"] > dflt["match_s"] else "matching"
    L += ["", f"Speed-up of the default over the baseline: **{r['speedup']:.2f}x** (aim >= 5x: {ok}); "
          f"the default's time is dominated by {dom} "
          f"({100 * max(dflt['ransac_s'], dflt['match_s']) / (dflt['ransac_s'] + dflt['match_s']):.0f} %)."]
    return L


# ---------------------------------------------------------------------------------- row 3
def _synthetic(n: int, d: int, seed: int, chunk: int = 65536, centres: np.ndarray | None = None,
               noise: float = 0.8) -> np.ndarray:
    """Unit vectors in float32 chunks: cluster centre (a 'landmark') + gaussian noise, normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = rng.standard_normal((b - a, d), dtype=np.float32) * np.float32(noise / math.sqrt(d))
        if centres is not None:
            x += centres[rng.integers(0, len(centres), b - a)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def _realistic(real: np.ndarray, n: int, seed: int, noise: float, chunk: int = 65536) -> np.ndarray:
    """n unit vectors with the structure of real descriptors: a random real descriptor plus noise
    drawn from the real set's own principal components and variances (x noise), so copies of
    different photos overlap as views of real landmarks do, in the real set's low-dimensional span."""
    rng = np.random.default_rng(seed)
    real = np.asarray(real, np.float32)
    _, sv, vt = np.linalg.svd(real - real.mean(0), full_matrices=False)
    std = (sv / math.sqrt(len(real))).astype(np.float32) * np.float32(noise)
    iso = np.float32(0.05 * noise * float(std.mean()))  # a little full-rank noise on top
    out = np.empty((n, real.shape[1]), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = real[rng.integers(0, len(real), b - a)] + (rng.standard_normal((b - a, len(std)), np.float32) * std) @ vt
        x += rng.standard_normal(x.shape, np.float32) * iso
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a:b] = x
    return out


def _real_globals(cfg, data_dir, work_dir, model_dir) -> tuple[np.ndarray | None, str]:
    """Real global descriptors to give row 3 realistic structure: the shared real photos (first
    bench.knn_real_images, one scale, cached), else the work dir's stored train features."""
    import pandas as pd

    from landmarks.utils import dir_digest, text_digest

    bc = cfg.bench
    shared = _shared_dir(cfg)
    sets = [shared / s for s in ("paris6k_subset", "multiview_scenes", "wide_baseline_scenes")]
    sets = [s for s in sets if (s / "LABELS.csv").exists()]
    if sets and bc.knn_real_images > 0 and (Path(model_dir) / "saved_model.pb").exists():
        paths = []
        for s in sets:
            d = pd.read_csv(s / "LABELS.csv", dtype=str).sort_values("id")
            paths += [str(s / p) for p in d["path"] if (s / p).exists()]
        step = max(1, len(paths) // bc.knn_real_images)
        paths = paths[::step][:bc.knn_real_images]
        e = cfg.extract
        key = text_digest(dir_digest(model_dir), json.dumps([paths, e.max_image_size]))
        cache = Path(work_dir).resolve() / "bench" / f"real-globals-{key}.npy"
        if not cache.exists():
            from tqdm import tqdm

            from landmarks.delg_io import load_delg, postprocess
            from landmarks.images import load_image
            from landmarks.utils import configure_tensorflow

            configure_tensorflow(_cores())
            model = load_delg(model_dir)
            rows = []
            for p in tqdm(paths, desc="bench: real global descriptors", unit="img", disable=None):
                try:
                    img, _ = load_image(p, e.max_image_size, e.max_image_pixels, e.min_image_size)
                    g, _ = postprocess(model(img, (1.0,), 1, e.abs_thres, (0,)))
                    rows.append(np.asarray(g, np.float32))
                except Exception:  # noqa: BLE001 - a bad photo is just left out
                    continue
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.stack(rows))
        return np.load(cache), f"{len(paths)} shared real photos ({', '.join(s.name for s in sets)}; scale 1.0)"
    train = Path(work_dir) / "features" / "train"
    if train.is_dir():
        from landmarks.store import FeatureStore

        ids, x = FeatureStore(train).global_matrix()
        if len(ids) >= 10:
            return x, f"{len(ids)} stored train descriptors of {work_dir}"
    return None, "none found: synthetic families only"


def knn_child(n: int, d: int, q: int, k: int, knn_cfg: dict, approx: str, seed: int = 0,
              real_path: str | None = None, real_noise: float = 1.0) -> dict:
    """One (N, dim) kNN measurement (run in a fresh process): time, peak RSS delta, recall@k.

    `real_path`: .npy of real descriptors of dim d: data and queries are real descriptors plus
    noise shaped like them (``_realistic``), else two-level synthetic families."""
    from landmarks import knn
    from landmarks.config import KnnConfig

    kc = KnnConfig(**knn_cfg)
    t = time.perf_counter()
    if real_path:
        real = np.load(real_path)
        db = _realistic(real, n, seed + 2, real_noise)
        queries = _realistic(real, q, seed + 3, real_noise)
    else:
        # two levels like landmarks in a region: families of 1000, clusters ('landmarks') of 10 images
        families = _synthetic(max(1, n // 1000), d, seed + 1, noise=math.sqrt(d))  # random unit directions
        centres = _synthetic(max(1, n // 10), d, seed + 4, centres=families, noise=0.7)
        db = _synthetic(n, d, seed + 2, centres=centres)
        queries = _synthetic(q, d, seed + 3, centres=centres)
    gen_s = time.perf_counter() - t
    out = {"gen_s": gen_s, "db_bytes": db.nbytes}
    results = {}
    for method in ("exact", approx, "numpy"):
        c = dataclasses.replace(kc, index=method)
        with PeakRss() as mem:
            t = time.perf_counter()
            build = 0.0
            if method == "numpy":
                s, i = knn.search(c, queries, db, k)
            else:  # knn.search, with index build and search timed apart
                index = knn._faiss_index(c, db)
                build = time.perf_counter() - t
                kk = min(n, k + knn.TIE_MARGIN)
                s = np.empty((q, k), np.float32)
                i = np.empty((q, k), np.int64)
                for a in range(0, q, c.chunk_size):
                    s0, i0 = index.search(queries[a:a + c.chunk_size], kk)
                    s[a:a + c.chunk_size], i[a:a + c.chunk_size] = knn._sort_rows(s0, i0, k)
                del index
            total = time.perf_counter() - t
        results[method] = i
        out[method] = {"build_s": build, "search_s": total - build, "mem": mem.delta}
    ex = results["exact"]
    out["recall"] = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(ex, results[approx])]) / ex.shape[1])
    k10 = min(10, ex.shape[1])
    out["recall10"] = float(np.mean([len(np.intersect1d(a[:k10], b[:k10])) for a, b in zip(ex, results[approx])]) / k10)
    out["numpy_agree"] = float(np.mean(results["numpy"] == ex))
    return out


def row_knn(cfg, data_dir, work_dir, model_dir) -> dict:
    bc = cfg.bench
    dims = [int(d) or _model_dim(cfg, model_dir) for d in bc.knn_dims]
    k = int(cfg.knn.k)
    approx = bc.knn_approx
    if approx not in ("ivf", "hnsw"):
        raise LandmarksError(f"bench.knn_approx must be ivf or hnsw (got {approx!r})")
    qt = min(int(bc.knn_timed_queries), int(bc.knn_queries))
    scale = bc.knn_queries / qt
    knn_cfg = dataclasses.asdict(cfg.knn)
    real, real_src = _real_globals(cfg, data_dir, work_dir, model_dir) if bc.knn_real_images >= 0 else (None, "off")
    real_path = None
    if real is not None:
        real_path = Path(work_dir).resolve() / "bench" / "knn-real.npy"
        real_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(real_path, real)
    cells = []
    for d in dict.fromkeys(dims):
        rp = str(real_path) if real is not None and real.shape[1] == d else None
        measured = None
        for n in sorted(bc.knn_sizes):
            cell = {"n": int(n), "d": d}
            fits = n * d * 4 <= bc.knn_max_db_gb * 1e9
            # the smallest N is measured even a little over the budget, so larger ones have a basis
            basis = measured is None and n == min(bc.knn_sizes) and n * d * 4 <= 4 * bc.knn_max_db_gb * 1e9
            if fits or basis:
                t = time.perf_counter()
                log.info("bench kNN: N=%d dim=%d, %d queries", n, d, qt)
                m = _in_child(knn_child, int(n), d, qt, k, knn_cfg, approx, 0, rp, float(bc.knn_real_noise))
                cell.update(m, measured=True, wall=time.perf_counter() - t, data="real+noise" if rp else "synthetic")
                measured = cell
            elif measured is not None:  # brute force is linear in N; memory too
                f = n / measured["n"]
                cell.update(measured=False, from_n=measured["n"], recall=None, db_bytes=n * d * 4)
                for meth in ("exact", approx, "numpy"):
                    mm = measured[meth]
                    cell[meth] = {"build_s": mm["build_s"] * f, "search_s": mm["search_s"] * f, "mem": mm["mem"] * f}
            else:
                cell.update(measured=False, skipped=True)
            for meth in ("exact", approx, "numpy"):
                if meth in cell:
                    cell[meth]["search_total_s"] = cell[meth]["search_s"] * scale
            cells.append(cell)
    return {"cells": cells, "k": k, "approx": approx, "queries": bc.knn_queries, "timed": qt, "scale": scale,
            "real_src": real_src, "real_noise": bc.knn_real_noise,
            "approx_desc": (f"IVF-Flat nlist={cfg.knn.ivf_nlist or '4*sqrt(N)'} nprobe={cfg.knn.ivf_nprobe}"
                            if approx == "ivf" else f"HNSW-Flat M={cfg.knn.hnsw_m}")}


def _md_knn(r: dict) -> list[str]:
    L = [f"Top-{r['k']} of {r['queries']} queries (timed on {r['timed']}, search times x{r['scale']:g}); synthetic "
         f"unit vectors (N/1000 random families, N/10 clusters of 10 around them, each vector = its cluster centre + noise, "
         f"so a query's top-{r['k']} is mostly its family; float32, generated in chunks); approximate = "
         f"{r['approx_desc']}; memory = peak RSS above the generated data, sampled every 10 ms; rows marked * are "
         "extrapolated linearly in N from the measured N (over bench.knn_max_db_gb). Data 'real+noise': "
         f"real global descriptors ({r.get('real_src', 'n/a')}) plus noise drawn from their own principal "
         f"components x {r.get('real_noise', 1.0)} (bench.knn_real_noise), queries likewise: views of one photo overlap "
         "those of others as real landmarks do. IVF k-means trains on knn.ivf_train_per_centroid points per list.", "",
         "| N | dim | data | method | build s | search s | peak RSS + data | recall@K |", "|---|---|---|---|---|---|---|---|"]
    for c in r["cells"]:
        if c.get("skipped"):
            L.append(f"| {c['n']:,} | {c['d']} | | (skipped: over bench.knn_max_db_gb) | | | | |")
            continue
        star = "" if c["measured"] else "*"
        for meth in ("exact", r["approx"], "numpy"):
            m = c[meth]
            rec = (f"{c['recall']:.3f} (@10: {c['recall10']:.3f})" if meth == r["approx"] and c["measured"]
                   else "")
            L.append(f"| {c['n']:,}{star} | {c['d']} | {c.get('data', '')} | {meth} | {m['build_s']:.1f} | {m['search_total_s']:.1f} | "
                     f"{_gb(m['mem'])} + {_gb(c['db_bytes'])} | {rec} |")
    return L


# ---------------------------------------------------------------------------------- row 4
def _e2e_data(src: Path, dst: Path, n_test: int) -> Path:
    """The data dir with only the first n_test test ids (0 = all): CSVs rewritten, image trees linked."""
    import pandas as pd

    if n_test <= 0:
        return src
    if not (src / "sample_submission.csv").exists():
        raise LandmarksError(f"{src} has no sample_submission.csv")
    dst.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        link = dst / split
        if not link.is_symlink() or link.resolve() != (src / split).resolve():
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src / split, target_is_directory=True)
    (dst / "train.csv").write_bytes((src / "train.csv").read_bytes())
    sub = pd.read_csv(src / "sample_submission.csv", dtype=str, keep_default_na=False).head(n_test)
    sub.to_csv(dst / "sample_submission.csv", index=False)
    if (src / "solution.csv").exists():
        sol = pd.read_csv(src / "solution.csv", dtype=str, keep_default_na=False)
        sol[sol["id"].isin(set(sub["id"]))].to_csv(dst / "solution.csv", index=False)
    else:
        (dst / "solution.csv").unlink(missing_ok=True)
    return dst


def row_e2e(cfg, data_dir, work_dir, model_dir) -> dict:
    from landmarks import extract, predict
    from landmarks.data import load_split

    bc = cfg.bench
    e2e = Path(work_dir).resolve() / "bench" / "e2e"
    data_dir = _e2e_data(Path(data_dir).resolve(), e2e / "data", int(bc.e2e_test_images))
    t = time.perf_counter()
    for split in ("train", "test"):  # train local features up front: predict time excludes extraction
        extract.run_features(cfg, data_dir, e2e, model_dir, split, local=True)
    extract_s = time.perf_counter() - t
    n_test = len(load_split(data_dir, "test"))
    res = {"n_test": n_test, "n_train": len(load_split(data_dir, "train")), "extract_s": extract_s, "runs": []}
    for R in bc.e2e_rerank:
        c = copy.deepcopy(cfg)
        c.verify.num_to_rerank = int(R)
        times = []
        for _ in range(bc.repeats):
            for f in ("knn.npz", "verified.npz"):
                (e2e / f).unlink(missing_ok=True)
            t = time.perf_counter()
            sub = predict.run_predict(c, data_dir, e2e, model_dir, e2e / f"submission-R{R}.csv")
            times.append(time.perf_counter() - t)
        gap = None
        sol = Path(data_dir) / "solution.csv"
        if sol.exists():
            try:
                from landmarks import metrics

                gap = metrics.score_files(sol, sub)["gap"]
            except Exception:  # noqa: BLE001 - GAP is a bonus here
                gap = None
        res["runs"].append({"R": int(R), "s": _median(times), "ips": n_test / _median(times), "gap": gap})
    sizes = {}
    for split in ("train", "test"):
        shards = sorted((e2e / "features" / split).glob("shard-*.h5"))
        st = [_storage(p) for p in shards]
        n = sum(s["n"] for s in st)
        sizes[split] = {"n": n, "file": sum(s["file"] for s in st),
                        "global": sum(s.get("global", 0) for s in st),
                        "local": sum(sum(v for kk, v in s.items() if kk.startswith("local/")) for s in st),
                        "m": sum(s["m"] for s in st), "files": len(st),
                        "ids": sum(s.get("ids", 0) for s in st),
                        "datasets": sum(sum(v for kk, v in s.items() if kk not in ("file", "n", "m")) for s in st)}
    res["sizes"] = sizes
    res["knn_bytes"] = (e2e / "knn.npz").stat().st_size if (e2e / "knn.npz").exists() else 0
    res["ver_bytes"] = (e2e / "verified.npz").stat().st_size if (e2e / "verified.npz").exists() else 0
    return res


def _md_e2e(r: dict) -> list[str]:
    L = [f"`landmarks predict` (knn + verify + vote + submission) on {r['n_test']} test (bench.e2e_test_images) / "
         f"{r['n_train']} train images of the data dir; features (train with local) extracted beforehand ({r['extract_s']:.1f} s, skipped when "
         "done); knn.npz and verified.npz deleted before each run.", "",
         "| NUM_TO_RERANK | predict s | test images/s | GAP |", "|---|---|---|---|"]
    for run in r["runs"]:
        L.append(f"| {run['R']} | {run['s']:.2f} | {run['ips']:.1f} | {_fmt(run['gap'], 4)} |")
    return L


# ---------------------------------------------------------------------------------- row 5
def make_train_csv(path: Path, rows: int, classes: int, seed: int = 0) -> Path:
    """GLDv2-like train.csv: 16-hex ids, long-tailed landmark ids (reused when already there)."""
    path = Path(path)
    marker = path.with_suffix(".json")
    want = {"rows": rows, "classes": classes, "seed": seed}
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return path
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2 ** 63, rows, dtype=np.int64)
    ids = np.unique(ids)
    while len(ids) < rows:
        ids = np.unique(np.concatenate([ids, rng.integers(0, 2 ** 63, rows - len(ids), dtype=np.int64)]))
    ids = rng.permutation(ids)
    w = 1.0 / np.arange(1, classes + 1) ** 0.8  # long tail like GLDv2
    labels = rng.choice(classes, rows, p=w / w.sum()) * 7 + 1
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("id,landmark_id\n")
            step = 200_000
            for a in range(0, rows, step):
                f.write("".join(f"{i:016x},{lab}\n" for i, lab in zip(ids[a:a + step].tolist(),
                                                                        labels[a:a + step].tolist())))
    marker.write_text(json.dumps(want))
    return path


def data_child(data_dir: str) -> dict:
    """Read train.csv and build the label arrays the way predict does (fresh process)."""
    from landmarks.data import load_split

    import pandas  # noqa: F401 - imported before the baseline so the peak is the data's

    with PeakRss(0.005) as mem:  # sampled: ru_maxrss would include the parent's peak (kept over fork+exec)
        t = time.perf_counter()
        df = load_split(data_dir, "train")
        t_read = time.perf_counter() - t
        lab = dict(zip(df["id"].astype(str), df["landmark_id"].astype(np.int64)))  # as predict.load_inputs
        labels = np.array([lab[i] for i in df["id"]], np.int64)
        classes, label_index, counts = np.unique(labels, return_inverse=True, return_counts=True)
        total = time.perf_counter() - t
    return {"rows": len(df), "classes": len(classes), "read_s": t_read, "total_s": total, "mem": mem.delta}


def row_data(cfg, data_dir, work_dir, model_dir) -> dict:
    bc = cfg.bench
    d = Path(work_dir).resolve() / "bench" / "csv"
    t = time.perf_counter()
    make_train_csv(d / "train.csv", bc.csv_rows, bc.csv_classes)
    gen = time.perf_counter() - t
    runs = [_in_child(data_child, str(d)) for _ in range(bc.repeats)]
    return {"rows": runs[0]["rows"], "classes": runs[0]["classes"], "gen_s": gen,
            "read_s": _median([r["read_s"] for r in runs]), "total_s": _median([r["total_s"] for r in runs]),
            "mem": max(r["mem"] for r in runs), "bytes": (d / "train.csv").stat().st_size}


def _md_data(r: dict) -> list[str]:
    return [f"Generated train.csv: {r['rows']:,} rows, {r['classes']:,} landmark ids, {_gb(r['bytes'])} "
            f"(generated once in {r['gen_s']:.1f} s, reused); each run in a fresh process.", "",
            "| step | s | peak RSS delta |", "|---|---|---|",
            f"| data.load_split (read + validate + paths) | {r['read_s']:.2f} | |",
            f"| + label arrays (id->label dict as predict, np.unique) | {r['total_s']:.2f} | {_gb(r['mem'])} |"]


# ---------------------------------------------------------------------------------- row 6
def _verify_set(d: Path, n: int, n_test: int, R: int, cap: int, n_feat: int, seed: int = 0) -> None:
    """A synthetic stage at N train ids: global-only train shards of `cap` ids (4-d globals:
    verification never reads them), local features for the shortlisted ids only (a local cache,
    as predict leaves it), test shard with local features, and knn.npz.  Built once per N."""
    from landmarks.store import LocalFeatures, write_shard
    from landmarks.utils import text_digest

    marker = d / "complete.json"
    want = {"n": n, "test": n_test, "R": R, "cap": cap, "feat": n_feat, "seed": seed, "v": 1}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return
    import shutil

    shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(seed)
    tr, te = d / "features" / "train", d / "features" / "test"
    train_ids = [f"{k:016x}" for k in range(n)]
    n_sh = max(1, -(-n // cap))
    for i in range(n_sh):
        ids = train_ids[i * cap:(i + 1) * cap]
        g = np.zeros((len(ids), 4), np.float32)
        g[:, 0] = 1
        write_shard(tr / f"shard-{i:05d}-of-{n_sh:05d}.h5", ids, g, None, order=range(i * cap, i * cap + len(ids)))
    idx = rng.choice(n, (n_test, R), replace=n < n_test * R)
    for r in range(n_test):  # distinct candidates per row
        idx[r] = rng.choice(n, R, replace=False)

    def lf():
        desc = rng.standard_normal((n_feat, 128)).astype(np.float32)
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        return LocalFeatures(rng.uniform(0, 800, (n_feat, 2)).astype(np.float32), desc,
                             np.ones(n_feat, np.float32), rng.random(n_feat).astype(np.float32))

    short = sorted(set(idx.ravel().tolist()))
    write_shard(tr / "local-cache-bench-00000-of-00001.h5", [train_ids[j] for j in short],
                np.ones((len(short), 4), np.float32), [lf() for _ in short])
    test_ids = [f"t{k:015x}" for k in range(n_test)]
    write_shard(te / "shard-00000-of-00001.h5", test_ids, np.ones((n_test, 4), np.float32),
                [lf() for _ in test_ids], order=range(n_test))
    with atomic_path(d / "knn.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, test_ids=np.array(test_ids, dtype=str), train_ids=np.array(train_ids, dtype=str),
                     sims=np.ones((n_test, R), np.float32), idx=idx.astype(np.int64),
                     fingerprint=np.array(text_digest("bench-knn", json.dumps(want))))
    marker.write_text(json.dumps(want))


def row_verify(cfg, data_dir, work_dir, model_dir) -> dict:
    """Verification time per test image at small and GLDv2-size N: flat when the id index is
    built once per stage (it was rebuilt for every batch of 16 test images)."""
    from landmarks import verify
    from landmarks.store import INDEX_NAME

    bc = cfg.bench
    R, T = int(cfg.verify.num_to_rerank), int(bc.verify_test_images)
    cap = max(1, int(cfg.extract.max_shard_images) or 5000)
    dirs, gen = {}, {}
    for n in bc.verify_sizes:
        d = dirs[n] = Path(work_dir).resolve() / "bench" / f"verify-{n}"
        t = time.perf_counter()
        _verify_set(d, int(n), T, R, cap, min(int(cfg.extract.max_feature_num), 1000))
        gen[n] = time.perf_counter() - t
    runs: dict = {n: [] for n in dirs}
    cold: dict = {}
    for k in range(bc.repeats + 1):  # sizes interleaved: load drift on a shared machine hits both alike
        for n, d in dirs.items():
            if k == 0:  # first run: no persisted index, the stage builds it once
                for split in ("train", "test"):
                    (d / "features" / split / INDEX_NAME).unlink(missing_ok=True)
            out = d / "verified.npz"
            out.unlink(missing_ok=True)
            tm: dict = {}
            t = time.perf_counter()
            verify.run_verify(cfg, data_dir, d, model_dir, out=out, timing=tm)
            tm["total_s"] = time.perf_counter() - t
            if k == 0:
                cold[n] = tm
            else:
                runs[n].append(tm)
    cells = []
    for n, d in dirs.items():
        med = {key: _median([r[key] for r in runs[n]]) for key in ("total_s", "setup_s", "batches_s")}
        cells.append({"n": int(n), "shards": len(list((d / "features" / "train").glob("shard-*.h5"))), "gen_s": gen[n],
                      "per_img": med["batches_s"] / T, "total_per_img": med["total_s"] / T,
                      "setup_s": med["setup_s"], "cold_setup_s": cold[n]["setup_s"]})
    small, big = cells[0], cells[-1]
    return {"cells": cells, "T": T, "R": R, "ratio": big["per_img"] / small["per_img"],
            "total_ratio": big["total_per_img"] / small["total_per_img"]}


def _md_verify(r: dict) -> list[str]:
    L = [f"`verify.run_verify` on {r['T']} test images x {r['R']} candidates against N synthetic train ids in "
         "global-only shards (extract.max_shard_images ids each) plus a local cache holding only the shortlisted "
         "ids; random local features (RANSAC does its full iterations). Per test image = the verification batches "
         "(16 test images each: this is where the index used to be rebuilt); stage setup = knn.npz + the id "
         "indexes, once per stage: 'warm' loads the index persisted by an earlier stage, 'cold' builds it.", "",
         "| N | shards | s/test image (batches) | s/test image (whole stage) | stage setup s warm | stage setup s cold |",
         "|---|---|---|---|---|---|"]
    for c in r["cells"]:
        L.append(f"| {c['n']:,} | {c['shards']} | {c['per_img']:.4f} | {c['total_per_img']:.4f} | {c['setup_s']:.2f} | "
                 f"{c['cold_setup_s']:.2f} |")
    ok = "flat" if abs(r["ratio"] - 1) <= 0.10 else "NOT flat"
    L += ["", f"Ratio largest / smallest N, per test image: **{r['ratio']:.3f}** ({ok}: aim within 10 %); whole "
          f"stage {r['total_ratio']:.3f} (the once-per-stage setup is spread over only {r['T']} test images here; "
          "over 10,000 it is negligible)."]
    return L


# ---------------------------------------------------------------------------------- row 7
def row_incremental(cfg, data_dir, work_dir, model_dir) -> dict:
    """Time to extract a set, then to add 1 % of rows to it (and to remove them again), with the
    number of images that went through the model each time."""
    import shutil

    import pandas as pd

    from landmarks import extract

    bc = cfg.bench
    src = Path(data_dir).resolve()
    df = pd.read_csv(src / "train.csv", dtype=str, keep_default_na=False)
    n = min(int(bc.incr_images), len(df) - 1)
    add = max(1, n // 100)
    if n < 2:
        raise LandmarksError(f"row 7 needs at least 3 train rows in {src}")
    d = Path(work_dir).resolve() / "bench" / "incr"
    shutil.rmtree(d, ignore_errors=True)
    data = d / "data"
    data.mkdir(parents=True)
    (data / "train").symlink_to(src / "train", target_is_directory=True)
    shards = max(1, min(int(cfg.extract.shards), n))

    def run(rows: int) -> tuple[float, int]:
        df.head(rows).to_csv(data / "train.csv", index=False)
        t = time.perf_counter()
        extract.run_features(cfg, data, d, model_dir, "train", shards=shards, jobs=1)
        s = time.perf_counter() - t
        from landmarks.store import FeatureStore

        st = FeatureStore(extract.features_dir(d, "train"))
        assert len(st.ids) + len(st.failures()) == rows
        return s, rows

    counts = {}
    real = extract._get_model

    def counting(model_dir_, threads):
        m = real(model_dir_, threads)

        def call(image, *a):
            counts["n"] = counts.get("n", 0) + 1
            return m(image, *a)
        return call

    extract._get_model = counting
    try:
        counts.clear()
        full_s, _ = run(n)
        full_calls = counts.get("n", 0)
        counts.clear()
        add_s, _ = run(n + add)
        add_calls = counts.get("n", 0)
        counts.clear()
        rm_s, _ = run(n)
        rm_calls = counts.get("n", 0)
    finally:
        extract._get_model = real
    return {"n": n, "add": add, "shards": shards, "full_s": full_s, "add_s": add_s, "rm_s": rm_s,
            "full_calls": full_calls, "add_calls": add_calls, "rm_calls": rm_calls, "ratio": add_s / full_s}


def _md_incremental(r: dict) -> list[str]:
    return [f"`run_features` on the first {r['n']} train rows of the data dir ({r['shards']} id-hash shards, 1 job, "
            f"the project model), then {r['add']} row(s) appended (1 %), then removed again; model calls counted.", "",
            "| step | s | images through the model |", "|---|---|---|",
            f"| extract {r['n']} images | {r['full_s']:.2f} | {r['full_calls']} |",
            f"| add {r['add']} (1 %) | {r['add_s']:.2f} | {r['add_calls']} |",
            f"| remove them again | {r['rm_s']:.2f} | {r['rm_calls']} |", "",
            f"Ratio add-1 % / full extraction: **{r['ratio']:.3f}** (every shard is rewritten: kept rows are copied, "
            "only new images run the model)."]


# ---------------------------------------------------------------------------------- scale
def scale_section(cfg, res: dict) -> list[str]:
    """'GLDv2 scale on paper': what a full run costs here and on a GPU box, from the measured rows."""
    bc = cfg.bench
    info = cpu_info()
    L = ["## GLDv2 scale on paper", "",
         f"Computed from the rows above (not hand-typed). Train {bc.gldv2_train:,} images, test "
         f"{' / '.join(f'{q:,}' for q in bc.gldv2_test)}. Assumptions: a GLDv2 image is "
         f"{bc.gldv2_megapixels} MP after max_image_size (bench.gldv2_megapixels), extraction time scales with "
         f"pixels; GPU box = {bc.gpu_seconds_per_image * 1000:.0f} ms/image extraction (DELG paper, R50 global+local "
         "on a P100; no GPU here, bench.gpu_seconds_per_image); kNN, verification and voting stay on CPU.", ""]
    r1, r2, r3, r5, r4 = (res.get(i) for i in (1, 2, 3, 5, 4))
    hrs = lambda s: f"{s / 3600:.2f} h" if s < 48 * 3600 else f"{s / 3600:.0f} h ({s / 86400:.1f} days)"  # noqa: E731
    rows = []
    ex = (r2 or {}).get("extract") or {}
    if ex.get("n") or r1:
        if ex.get("n"):  # real photos near GLDv2 size are the better basis than small demo images
            s_mp = ex["s"] / ex["n"] / ex["mpix"]
            basis = f"row 2's real photos ({ex['mpix']:.2f} MP; decode + model + post-processing, no shard write)"
        else:
            s_mp, basis = 1 / r1["pipe_ips"] / r1["mpix"], f"row 1 ({r1['mpix']:.2f} MP images)"
        spi = s_mp * bc.gldv2_megapixels
        L.insert(-1, f"Extraction basis: {s_mp:.2f} s per megapixel from {basis}, so {spi:.2f} s per GLDv2 image "
                 "here.")
        for name, n in [("extract train", bc.gldv2_train)] + [(f"extract test {q:,}", q) for q in bc.gldv2_test]:
            rows.append((name, hrs(n * spi), hrs(n * bc.gpu_seconds_per_image)))
        total_img = bc.gldv2_train + max(bc.gldv2_test)
        workers = math.ceil(total_img * spi / 3600)
        gpu_workers = math.ceil(total_img * bc.gpu_seconds_per_image / 3600)
        cap = max(1, cfg.extract.max_shard_images)
        shards = max(math.ceil(total_img / cap), 4 * workers)
    else:
        spi = None
    if r3:
        cell = next((c for c in r3["cells"] if c["d"] == r3["cells"][0]["d"] and c["n"] == max(
            x["n"] for x in r3["cells"] if x["d"] == r3["cells"][0]["d"]) and not c.get("skipped")), None)
        if cell:
            f_n = bc.gldv2_train / cell["n"]
            for q in bc.gldv2_test:
                f = f_n * q / r3["queries"]
                for meth in ("exact", r3["approx"]):
                    m = cell[meth]
                    rows.append((f"kNN {meth} {q:,} test (dim {cell['d']})",
                                 hrs(m["build_s"] * f_n + m["search_total_s"] * f), "same (CPU)"))
    if r2:
        for q in bc.gldv2_test:
            pairs = q * cfg.verify.num_to_rerank
            rows.append((f"verify {q:,} x {cfg.verify.num_to_rerank} pairs", hrs(pairs / r2["default_pairs_s"]),
                         "same (CPU)"))
            if spi:
                n_loc = min(q * cfg.verify.num_to_rerank, bc.gldv2_train)
                rows.append((f"train locals on demand (<= {n_loc:,} images)", hrs(n_loc * spi),
                             hrs(n_loc * bc.gpu_seconds_per_image)))
    r6, r7 = res.get(6), res.get(7)
    if r6:
        big = r6["cells"][-1]
        for q in bc.gldv2_test:
            rows.append((f"verify stage {q:,} test at N={big['n']:,} (row 6: {1000 * big['per_img']:.0f} ms/test image, "
                         f"R={r6['R']}, synthetic features)", hrs(q * big["per_img"]), "same (CPU)"))
    if spi and r7:
        add = math.ceil(bc.gldv2_train / 100)
        rows.append((f"add 1 % to train ({add:,} new images; row 7: only they run the model)", hrs(add * spi),
                     hrs(add * bc.gpu_seconds_per_image)))
    if r5:
        rows.append(("read train.csv + labels", f"{r5['total_s']:.1f} s", "same"))
    if rows:
        L += ["| stage | this machine | GPU box |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    else:
        L.append("(no timing rows ran)")
    L.append("")
    # disk
    if r4:
        tr, te = r4["sizes"]["train"], r4["sizes"]["test"]
        g_img = tr["global"] / max(1, tr["n"])
        # per image: its id; per file: HDF5 structure, spread over a full shard at GLDv2 scale
        per_file = max(0.0, (tr["file"] - tr["datasets"]) / max(1, tr["files"]))
        over = tr["ids"] / max(1, tr["n"]) + per_file / max(1, cfg.extract.max_shard_images)
        loc_feat = (tr["local"] + te["local"]) / max(1, tr["m"] + te["m"])
        fpi = r2["feat_per_img"] if r2 else cfg.extract.max_feature_num
        L += [f"Disk (bytes from the stored shards of row 4: {g_img:.0f} B global/image, {over:.0f} B id + "
              f"file overhead/image ({per_file / 1e3:.0f} kB/shard spread over {cfg.extract.max_shard_images} images), {loc_feat:.1f} B per local feature; {fpi:.0f} local features per real image "
              f"{'(row 2)' if r2 else '(max_feature_num)'}):", "",
              "| stage | disk |", "|---|---|",
              f"| train features (global only) | {_gb(bc.gldv2_train * (g_img + over))} |"]
        for q in bc.gldv2_test:
            L.append(f"| test features {q:,} (global + local) | {_gb(q * (g_img + over + fpi * loc_feat))} |")
            n_loc = min(q * cfg.verify.num_to_rerank, bc.gldv2_train)
            L.append(f"| train local cache for {q:,} x {cfg.verify.num_to_rerank} candidates (upper bound) | "
                     f"{_gb(n_loc * (g_img + over + fpi * loc_feat))} |")
            L.append(f"| knn.npz {q:,} x K={cfg.knn.k} | {_gb(q * cfg.knn.k * 12 + (q + bc.gldv2_train) * 16)} |")
        L.append("")
    # RAM
    ram = []
    if r1:
        ram.append(f"extraction process (TF + model, row 1): {_gb(r1['rss_peak'])} RSS per worker")
    if r3:
        big = [c for c in r3["cells"] if not c.get("skipped")]
        if big:
            c = max(big, key=lambda x: (x["d"] == big[0]["d"], x["n"]))
            m = c["exact"]
            ram.append(f"kNN exact N={c['n']:,} dim {c['d']}: {_gb(c['db_bytes'] + m['mem'])} "
                       f"(train matrix + index copy{'' if c['measured'] else ', extrapolated'})")
    if r5:
        ram.append(f"train.csv + labels ({r5['rows']:,} rows): {_gb(r5['mem'])}")
    if ram:
        L += ["RAM peak per stage: " + "; ".join(ram) + ".", ""]
    if spi:
        L += [f"Dask: extraction of {total_img:,} images takes {total_img * spi / 3600:.1f} h on one worker like "
              f"this machine ({info['cores']} cores, {spi:.2f} s/image); to finish in one hour use **{workers}** such "
              f"workers (or {gpu_workers} GPU workers) and at least **{shards}** shards (>= 4 per worker for load "
              f"balance, <= extract.max_shard_images={cfg.extract.max_shard_images} images each): "
              f"`landmarks features --split train --shards {shards} --scheduler tcp://HOST:8786`.", ""]
    return L


# ---------------------------------------------------------------------------------- driver
ROWS = {1: (row_extraction, _md_extraction), 2: (row_matching, _md_matching), 3: (row_knn, _md_knn),
        4: (row_e2e, _md_e2e), 5: (row_data, _md_data), 6: (row_verify, _md_verify),
        7: (row_incremental, _md_incremental)}


def _summary_line(i: int, r: dict | None, cfg) -> str:
    if r is None:
        return ""
    if i == 1:
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "n/a"
        extra = f"; backbone {100 * r['bb_gflops'] / r['peak']:.1f} % of peak FP32" if r.get("bb_gflops") else ""
        return f"{r['pipe_ips']:.2f} img/s pipeline vs {_fmt(r.get('bb_ips'))} backbone; ratio {ratio} (aim >= 0.85){extra}"
    if i == 2:
        (bn, b), (dn, d) = list(r["methods"].items())
        return (f"{d['pairs_s']:.1f} vs {b['pairs_s']:.1f} pairs/s baseline: {r['speedup']:.2f}x (aim >= 5x); "
                f"inliers same/diff {d['inl_same']:.1f}/{d['inl_diff']:.1f} vs {b['inl_same']:.1f}/{b['inl_diff']:.1f}")
    if i == 3:
        parts = []
        for c in r["cells"]:
            if c.get("skipped"):
                continue
            star = "" if c["measured"] else "*"
            e, a, n = c["exact"], c[r["approx"]], c["numpy"]
            rec = (f" r@{r['k']} {c['recall']:.3f} r@10 {c['recall10']:.3f}" if c.get("recall") is not None
                   else "")
            ratio = (a["build_s"] + a["search_total_s"]) / max(e["build_s"] + e["search_total_s"], 1e-9)
            parts.append(f"N={c['n']:,}{star}/d{c['d']}{'/real' if c.get('data') == 'real+noise' else ''}: exact "
                         f"{e['search_total_s']:.0f}s, {r['approx']} {a['build_s'] + a['search_total_s']:.0f}s "
                         f"({ratio:.2f}x exact){rec}, numpy {n['search_total_s']:.0f}s")
        return "; ".join(parts[:3]) + (" ..." if len(parts) > 3 else "")
    if i == 4:
        return "; ".join(f"R={x['R']}: {x['ips']:.1f} test img/s" for x in r["runs"])
    if i == 5:
        return f"{r['rows']:,} rows in {r['total_s']:.2f} s, peak +{_gb(r['mem'])}"
    if i == 6:
        a, b = r["cells"][0], r["cells"][-1]
        return (f"{1000 * a['per_img']:.1f} ms/test image at N={a['n']:,} vs {1000 * b['per_img']:.1f} at "
                f"N={b['n']:,}: ratio {r['ratio']:.3f} (aim within 10 %)")
    if i == 7:
        return (f"add 1 % ({r['add']} img): {r['add_s']:.1f} s, {r['add_calls']} model calls, vs {r['full_s']:.1f} s "
                f"for all {r['n']}: ratio {r['ratio']:.3f}")
    return ""


def run_bench(cfg, data_dir, work_dir, model_dir, rows=None, out: str | Path | None = None) -> Path:
    """Run the selected rows (default bench.rows), print the table, write WORK_DIR/bench.md."""
    if cfg.bench.quick:
        cfg = copy.deepcopy(cfg)
        cfg.bench = quick_config(cfg.bench)
    if cfg.bench.repeats < 1:
        raise LandmarksError(f"bench.repeats must be >= 1 (got {cfg.bench.repeats})")
    selected = parse_rows(rows if rows is not None else cfg.bench.rows)
    work_dir = Path(work_dir)
    out = Path(out) if out else work_dir / "bench.md"
    info = cpu_info()
    t_all = time.perf_counter()
    results, errors, walls = {}, {}, {}
    for i in selected:
        fn, _ = ROWS[i]
        log.info("bench row %d: %s", i, ROW_TITLES[i])
        t = time.perf_counter()
        try:
            results[i] = fn(cfg, data_dir, work_dir, model_dir)
        except Exception as e:  # noqa: BLE001 - a failing row must not stop the others
            errors[i] = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("bench row %d failed: %s", i, errors[i])
            log.debug("%s", traceback.format_exc())
        walls[i] = time.perf_counter() - t
    total = time.perf_counter() - t_all

    table = ["| row | measurement | result | wall s |", "|---|---|---|---|"]
    for i in selected:
        res = f"ERROR: {errors[i]}" if i in errors else _summary_line(i, results[i], cfg)
        table.append(f"| {i} | {ROW_TITLES[i]} | {res.replace('|', '/')} | {walls[i]:.0f} |")
    v = versions()
    head = [f"# Benchmark ({'quick smoke run' if cfg.bench.quick else 'full'})", "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {total:.0f} s",
            f"- machine: {info['model']}, {info['cores']} cores, {info['mhz'] / 1000:.2f} GHz, "
            f"SIMD {' '.join(info['simd']) or 'unknown'}, RAM {_gb(info['ram'])}; {platform.platform()}",
            "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
            f"- inputs: data {data_dir}, model {model_dir} ({(_model_meta(model_dir) or {}).get('backbone', 'foreign')}),"
            f" work {work_dir}; repeats {cfg.bench.repeats} (medians)",
            f"- settings: global scales {list(cfg.extract.global_scales)}, local scales {list(cfg.extract.local_scales)}, max_image_size {cfg.extract.max_image_size}, "
            f"max_feature_num {cfg.extract.max_feature_num}; knn k {cfg.knn.k}; verify {cfg.verify.matcher}, "
            f"num_to_rerank {cfg.verify.num_to_rerank}", ""]
    body = ["## Summary", ""] + table + [""]
    for i in selected:
        body += [f"## Row {i}: {ROW_TITLES[i]}", ""]
        if i in errors:
            body += [f"ERROR: {errors[i]}", ""]
        else:
            body += ROWS[i][1](results[i]) + [""]
    body += scale_section(cfg, results)
    text = "\n".join(head + body) + "\n"
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    print("\n".join(table))
    print(f"bench: {len(results)}/{len(selected)} rows in {total:.0f} s -> {out}")
    return out


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser("bench", parents=[common],
                              help="benchmark every stage against its baseline -> WORK_DIR/bench.md")
    p.add_argument("--quick", action="store_true", default=None, help="tiny smoke run (bench.quick)")
    p.add_argument("--rows", default=None, help="rows to run, e.g. 1,3 (default: bench.rows)")
    p.add_argument("--out", default=None, help="report path (default: WORK_DIR/bench.md)")
    p.set_defaults(func=_cli)


def _cli(args, cfg) -> int:
    if args.quick:
        cfg.bench.quick = True
    run_bench(cfg, args.data_dir, args.work_dir, args.model, rows=args.rows, out=args.out)
    return 0

