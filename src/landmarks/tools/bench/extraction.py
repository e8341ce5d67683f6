"""Row 1: images/s of the whole feature path against the bare backbone on the same images.

The pipeline is ``features.extract_shard`` in this process (decode + resize + model +
post-processing + shard write), the model call alone runs the loaded SavedModel on decoded
images, and the backbone is a frozen graph of the same architecture on inputs resized to the
sizes the serving graph uses.  The ratio pipeline / backbone is what the pipeline costs on top of
the network itself; FLOPs from tf.profiler put the backbone against the CPU's FP32 peak.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from landmarks import features
from landmarks.datasets.data import load_split
from landmarks.datasets.images import load_image
from landmarks.delg.model import build_backbone, fold_batchnorm, is_lite, lite_local_layer, normalize_pixels
from landmarks.tools.bench.common import cores as _cores
from landmarks.tools.bench.common import cpu_info, fmt, median, model_meta, peak_gflops, rss_bytes, storage
from landmarks.utils import LandmarksError, configure_tensorflow

TITLE = "Extraction: pipeline vs bare backbone"
AIM = 0.90  # issue 13: the pipeline at >= 0.90 of the bare backbone's images/s
GROUP = 4  # images per turn of the interleaved timing (a shard of GROUP images for the pipeline)


def _backbone_net(meta: dict):
    """The exported model's backbone architecture (random weights: same speed)."""

    name = meta.get("backbone")
    if not name:
        raise LandmarksError("model metadata names no backbone")
    if is_lite(name):
        return build_backbone(name, "random", local_layer=meta.get("local_layer") or lite_local_layer(name))
    return build_backbone(name, "random")


def _frozen(fn, specs):
    """A tf.function frozen to a graph with the weights as constants (grappler folds and fuses them)."""
    from landmarks.delg.tfcompat import freeze_function

    return freeze_function(fn.get_concrete_function(*specs))


def _backbone_fns(net, n_scales: int):
    """The two bare-backbone baselines, both frozen graphs:
    'bb': the backbone with its batch norms folded, all scales of one image in one call (the
    scales' passes may overlap, as the serving graph's loop lets them): the fastest plain forward;
    'bb_per_scale': the backbone as built, one call per scale (the baseline before issue 13)."""
    from landmarks.utils.tfquiet import tf

    spec = tf.TensorSpec([1, None, None, 3], tf.float32)
    folded = fold_batchnorm(net)
    one = _frozen(tf.function(lambda xs: [folded(x, training=False) for x in xs]), [[spec] * n_scales])
    per = _frozen(tf.function(lambda x: net(x, training=False)), [spec])
    return {"bb": lambda xs: one(*xs), "bb_per_scale": lambda xs: [per(x) for x in xs]}


def backbone_flops(net, size: int = 512) -> float:
    """FLOPs of one forward pass at size x size counted by tf.profiler (mul and add = 2)."""
    from landmarks.delg.tfcompat import freeze_function
    from landmarks.utils.tfquiet import tf

    cf = tf.function(lambda x: net(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, size, size, 3], tf.float32)
    )
    frozen = freeze_function(cf)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=opts
    )
    return float(info.total_float_ops)


def _images(cfg, data_dir) -> tuple[list[str], list[str]]:
    """Ids and paths of the first bench.extract_images train images that exist."""

    df = load_split(data_dir, "train")
    df = df[[os.path.exists(p) for p in df["path"]]].head(cfg.bench.extract_images)
    if len(df) == 0:
        raise LandmarksError(f"no train images found in {data_dir}")
    return df["id"].tolist(), df["path"].tolist()


def _pipeline_timer(cfg, ids, paths, model_dir: Path, out_dir: Path, settings: dict):
    """A function (rows, name) -> seconds of one ``extract_shard`` run over those images (test side:
    local features too), written to shard-<name>.h5."""

    def run(rows, name) -> float:
        task = features.ShardTask(
            out=str(out_dir / f"shard-{name}.h5"),
            ids=[ids[i] for i in rows],
            paths=[paths[i] for i in rows],
            model_dir=str(model_dir),
            settings=settings,
            local=True,
            threads=_cores(),
            prefetch=cfg.extract.prefetch,
        )
        t = time.perf_counter()
        r = features.extract_shard(task)
        if r["done"] == 0:
            raise LandmarksError(f"extraction produced no features ({r['failures']})")
        return time.perf_counter() - t

    return run


def _model_timer(model, images, args):
    """A function rows -> seconds of the model call alone on those decoded images (no decode, post, write)."""

    def run(rows) -> float:
        t = time.perf_counter()
        for i in rows:
            model(images[i], *args)
        return time.perf_counter() - t

    return run


def _backbone_inputs(images, scales, preprocess: str) -> list[list]:
    """Per image, its inputs at each scale, resized to the serving graph's sizes (round(h*s), round(w*s))."""
    from landmarks.utils.tfquiet import tf

    out = []
    for im in images:
        h, w = im.shape[:2]
        xs = []
        for sc in scales:
            nh, nw = max(1, int(round(h * sc))), max(1, int(round(w * sc)))
            x = tf.image.resize(tf.cast(im, tf.float32)[None], (nh, nw), method="bilinear")
            xs.append(normalize_pixels(x, preprocess))
        out.append(xs)
    return out


def _backbone_timer(fn, inputs):
    """A function rows -> seconds of a backbone baseline over those images' pre-resized inputs."""
    fn(inputs[0])

    def run(rows) -> float:
        t = time.perf_counter()
        for i in rows:
            fn(inputs[i])
        return time.perf_counter() - t

    return run


def _interleaved(timers: dict, n: int, repeats: int, group: int) -> dict:
    """Per repeat, each method's total seconds over all images, the methods taking turns on each
    group of `group` images: bursts of load from other processes (seconds long on a shared
    machine) hit every method alike."""
    groups = [list(range(a, min(n, a + group))) for a in range(0, n, group)]
    times = {key: [] for key in timers}
    for k in range(repeats):
        tot = dict.fromkeys(timers, 0.0)
        for g, rows in enumerate(groups):
            for key, timer in timers.items():
                tot[key] += timer(rows, g)
        for key in timers:
            times[key].append(tot[key])
    return times


def _flops(cfg, res: dict, net, inputs, meta: dict) -> None:
    """Backbone FLOPs per image, achieved GFLOP/s and the pipeline ratio, into `res`."""
    ref = 512
    n = res["n"]
    flops_ref = backbone_flops(net, ref)
    pixels = sum(int(x.shape[1]) * int(x.shape[2]) for xs in inputs for x in xs)
    flops_img = flops_ref / (ref * ref) * pixels / n
    peak, assumption = peak_gflops(cfg, cpu_info())
    res.update(
        backbone=meta.get("backbone"),
        bb_s=median(res["times"]["bb"]),
        flops_img=flops_img,
        peak=peak,
        peak_note=assumption,
        flops_ref=flops_ref,
    )
    res["bb_ips"] = n / res["bb_s"]
    res["bb_per_scale_ips"] = n / median(res["times"]["bb_per_scale"])
    res["ratio"] = res["pipe_ips"] / res["bb_ips"]
    res["ratio_per_scale"] = res["pipe_ips"] / res["bb_per_scale_ips"]
    res["model_ratio"] = res["model_ips"] / res["bb_ips"]
    res["bb_gflops"] = flops_img * res["bb_ips"] / 1e9
    res["pipe_gflops"] = flops_img * res["pipe_ips"] / 1e9


def row_extraction(cfg, data_dir, work_dir, model_dir) -> dict:
    """Row 1: interleaved repeats of pipeline, model call and backbone; medians and ratios."""

    configure_tensorflow(_cores())
    ids, paths = _images(cfg, data_dir)
    model_dir = Path(model_dir).resolve()
    settings = features.result_settings(cfg)
    out_dir = Path(work_dir) / "bench" / "extract"
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = _pipeline_timer(cfg, ids, paths, model_dir, out_dir, settings)
    pipeline(range(len(ids)), "all")  # loads the model (cached per process by extract), traces the graph
    model = features.get_model(str(model_dir), _cores())  # the very model object the pipeline used
    images = [
        load_image(p, settings["max_image_size"], settings["max_image_pixels"], settings["min_image_size"])[0]
        for p in paths
    ]
    scales, rows, cap = features.model_call(settings, local=True)  # the test-side call (global + local)
    model_only = _model_timer(model, images, (scales, cap, settings["abs_thres"], rows))
    n = len(images)
    meta = model_meta(model_dir)
    res = {
        "n": n,
        "mpix": sum(im.shape[0] * im.shape[1] for im in images) / n / 1e6,
        "scales": list(scales),
        "backbone": None,
        "folded": (meta or {}).get("fold_batchnorm"),
        "model": f"{model_dir} ({(meta or {}).get('kind', 'kind unknown')})",  # what `make predict` uses by default
        "group": GROUP,
    }
    timers = {"pipe": lambda rows, g: pipeline(rows, f"g{g}"), "model": lambda rows, g: model_only(rows)}
    if meta is None:
        res["backbone_error"] = "model has no landmarks_model.json (not built here): backbone unknown"
    else:
        net = _backbone_net(meta)
        inputs = _backbone_inputs(images, scales, meta.get("preprocess", "tf128"))
        for key, fn in _backbone_fns(net, len(scales)).items():
            timers[key] = (lambda t: lambda rows, g: t(rows))(_backbone_timer(fn, inputs))
    times = res["times"] = _interleaved(timers, n, cfg.bench.repeats, GROUP)
    res["pipe_s"], res["model_s"] = median(times["pipe"]), median(times["model"])
    res["pipe_ips"], res["model_ips"] = n / res["pipe_s"], n / res["model_s"]
    res["store"] = storage(out_dir / "shard-all.h5")
    res["feat_per_img"] = res["store"]["m"] / max(1, res["store"]["n"])
    res["rss_peak"] = rss_bytes()
    if meta is not None:
        _flops(cfg, res, net, inputs, meta)
    return res


def markdown(r: dict) -> list[str]:
    """Row 1's section of bench.md."""
    L = [
        f"Images: {r['n']} train images of the data dir, mean input {r['mpix']:.3f} MP after max_image_size, "
        f"scales {r['scales']}; {r['feat_per_img']:.0f} local features/image; TF threads = all cores, one process; "
        f"the methods take turns on each group of {r.get('group', 'all')} images (the pipeline writes a shard per group). "
        f"Model: {r.get('model', 'not recorded')}.",
        "",
        "| measurement | images/s | s/image | ratio to backbone |",
        "|---|---|---|---|",
    ]
    bb = r.get("bb_ips")
    for name, key in (
        ("full feature path (decode+resize+model+post+write)", "pipe_ips"),
        ("model call only (decoded images)", "model_ips"),
        ("bare backbone: BN folded, frozen graph, all scales of an image in one call", "bb_ips"),
        ("bare backbone as built, frozen graph, one call per scale (the baseline before issue 13)", "bb_per_scale_ips"),
    ):
        v = r.get(key)
        ratio = f"{v / bb:.3f}" if (v and bb) else "n/a"
        L.append(f"| {name} | {fmt(v)} | {fmt(1 / v if v else None, 3)} | {ratio} |")
    if bb:
        ok = "meets" if r["ratio"] >= AIM else "below"
        folded = {True: "folded at export", False: "NOT folded (model.fold_batchnorm=false)"}.get(
            r.get("folded"), "unknown"
        )
        L += [
            "",
            f"Pipeline overhead ratio **{r['ratio']:.3f}** against the fastest bare backbone (aim >= {AIM:.2f}: "
            f"{ok}); {r['ratio_per_scale']:.3f} against the per-scale baseline. The model's batch norms are {folded}. "
            "The model-call row includes the in-graph resize, heads, thresholds and top-k, so model - backbone = "
            "those, pipeline - model = decode + post-processing + write (decode overlaps the model in a prefetch "
            "thread).",
            f"Backbone ({r['backbone']}): {r['flops_img'] / 1e9:.2f} GFLOP/image (tf.profiler: "
            f"{r['flops_ref'] / 1e9:.2f} GFLOP at 512x512, scaled by the pixels of each scale); achieved "
            f"{r['bb_gflops']:.1f} GFLOP/s in the backbone ({100 * r['bb_gflops'] / r['peak']:.1f} % of peak), "
            f"{r['pipe_gflops']:.1f} GFLOP/s end to end ({100 * r['pipe_gflops'] / r['peak']:.1f} %). "
            f"Peak FP32 {r['peak']:.0f} GFLOP/s = {r['peak_note']}.",
        ]
    else:
        L += ["", f"Backbone: n/a ({r.get('backbone_error')})"]
    L.append(
        "Runs (s per repeat, all images): "
        + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in r.get("times", {}).items() if v)
    )
    return L


def summary(r: dict) -> str:
    """Row 1's cell of the summary table."""
    ratio = f"{r['ratio']:.3f}" if r.get("ratio") else "n/a"
    extra = f"; backbone {100 * r['bb_gflops'] / r['peak']:.1f} % of peak FP32" if r.get("bb_gflops") else ""
    more = (
        f"; model call {r['model_ratio']:.3f}; vs per-scale backbone {r['ratio_per_scale']:.3f}"
        if r.get("model_ratio")
        else ""
    )
    return (
        f"{r['pipe_ips']:.2f} img/s pipeline vs {fmt(r.get('bb_ips'))} backbone; ratio {ratio} "
        f"(aim >= {AIM:.2f}){more}{extra}"
    )
