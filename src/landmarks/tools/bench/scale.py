"""'GLDv2 scale on paper': what a full GLDv2 run costs on this machine and on a GPU box, computed
from the measured rows (never hand-typed), so the README's figures follow the code and the
machine they were measured on.
"""

from __future__ import annotations

import math

from landmarks.tools.bench import knn_stream
from landmarks.tools.bench.common import cpu_info, gb


def hours(s: float) -> str:
    """Seconds as hours, with days past 48 h."""
    return f"{s / 3600:.2f} h" if s < 48 * 3600 else f"{s / 3600:.0f} h ({s / 86400:.1f} days)"


def _header(bc) -> list[str]:
    return [
        "## GLDv2 scale on paper",
        "",
        f"Computed from the rows above (not hand-typed). Train {bc.gldv2_train:,} images, test "
        f"{' / '.join(f'{q:,}' for q in bc.gldv2_test)}. Assumptions: a GLDv2 image is "
        f"{bc.gldv2_megapixels} MP after max_image_size (bench.gldv2_megapixels), extraction time scales with "
        f"pixels; GPU box = {bc.gpu_seconds_per_image * 1000:.0f} ms/image extraction (DELG paper, R50 "
        "global+local on a P100, scaled by the same pixel factors; no GPU here, bench.gpu_seconds_per_image); "
        "kNN, verification and voting stay on CPU.",
        "",
    ]


def extraction_basis(cfg, res: dict) -> tuple[float | None, str]:
    """Seconds per GLDv2 image here and where that comes from: row 2's real photos, else row 1."""
    r1, r2 = res.get(1), res.get(2)
    ex = (r2 or {}).get("extract") or {}
    if ex.get("n"):  # real photos near GLDv2 size are the better basis than small demo images
        s_mp = ex["s"] / ex["n"] / ex["mpix"]
        basis = f"row 2's real photos ({ex['mpix']:.2f} MP; decode + model + post-processing, no shard write)"
    elif r1:
        s_mp, basis = 1 / r1["pipe_ips"] / r1["mpix"], f"row 1 ({r1['mpix']:.2f} MP images)"
    else:
        return None, ""
    spi = s_mp * cfg.bench.gldv2_megapixels
    f_train, f_test = pixel_factors(cfg)
    return spi, (
        f"Extraction basis: {s_mp:.2f} s per megapixel from {basis} at the local scales, so {spi:.2f} s "
        f"per GLDv2 image here; time scales with the pixels over the scales of the call: x{f_train:.2f} for "
        f"train (extract.global_scales), x{f_test:.2f} for test (global + local scales)."
    )


def pixel_factors(cfg) -> tuple[float, float]:
    """Extraction time relative to the basis (a model call at the local scales) for train (global
    scales only, the default) and test (the union of both sets): the sum of scale^2 of each call."""
    e = cfg.extract
    pix = lambda scales: sum(float(x) ** 2 for x in scales)  # noqa: E731
    base = pix(e.local_scales) or 1.0
    union = set(map(float, e.global_scales)) | set(map(float, e.local_scales))
    train = pix(union if e.train_local else e.global_scales)
    return train / base, pix(union) / base


def _extraction_rows(cfg, spi: float) -> list[tuple]:
    bc = cfg.bench
    gpu = bc.gpu_seconds_per_image
    f_train, f_test = pixel_factors(cfg)
    return [
        (
            "extract train" + ("" if cfg.extract.train_local else " (global scales only)"),
            hours(bc.gldv2_train * spi * f_train),
            hours(bc.gldv2_train * gpu * f_train),
        )
    ] + [(f"extract test {q:,}", hours(q * spi * f_test), hours(q * gpu * f_test)) for q in bc.gldv2_test]


def _knn_cell(r3: dict) -> dict | None:
    """Row 3's largest N at the first dim (measured or extrapolated)."""
    d0 = r3["cells"][0]["d"]
    top = max(x["n"] for x in r3["cells"] if x["d"] == d0)
    return next((c for c in r3["cells"] if c["d"] == d0 and c["n"] == top and not c.get("skipped")), None)


def _knn_costs(cfg, r3: dict) -> tuple[dict, str] | None:
    """(method -> (build s at GLDv2 N, search s per query), source): the streamed full-size
    measurement and its fastest IVF setting with recall >= 0.95 when row 3 ran it, else the largest cell."""

    s = r3.get("stream")
    if s:
        f_n = cfg.bench.gldv2_train / s["n"]
        b = knn_stream.best(s, s["q"])
        # exact: reading the chunked database once counts as its 'build'
        costs = {"exact": (s["exact_read_s"] * f_n, (s["exact_s"] - s["exact_read_s"]) * f_n / s["q"])}
        if b:
            costs[f"ivf-{b['kind']} nlist {b['nlist']} nprobe {b['nprobe']}, recall@{s['k']} {b['recall']:.3f}"] = (
                b["build_s"] * f_n,
                b["search_s"] * f_n / s["q"],
            )
        return costs, f"dim {s['d']}, measured at N={s['n']:,}"
    cell = _knn_cell(r3)
    if not cell:
        return None
    f_n = cfg.bench.gldv2_train / cell["n"]
    costs = {
        m: (cell[m]["build_s"] * f_n, cell[m]["search_total_s"] * f_n / r3["queries"]) for m in ("exact", r3["approx"])
    }
    return costs, f"dim {cell['d']}"


def _knn_rows(cfg, r3: dict) -> list[tuple]:
    """kNN per test count, and DBA over the train set (every train row is a query once per stage)."""
    bc = cfg.bench
    got = _knn_costs(cfg, r3)
    if not got:
        return []
    costs, src = got
    rows = []
    for q in bc.gldv2_test:
        for meth, (build, per_q) in costs.items():
            rows.append((f"kNN {meth}: {q:,} test ({src})", hours(build + per_q * q), "same (CPU)"))
    if cfg.knn.dba_k > 0:
        for meth, (build, per_q) in costs.items():
            rows.append(
                (
                    f"DBA (knn.dba_k={cfg.knn.dba_k}, default): {bc.gldv2_train:,} train rows as queries, {meth}",
                    hours(build + per_q * bc.gldv2_train),
                    "same (CPU)",
                )
            )
    return rows


def _verify_rows(cfg, res: dict, spi: float | None) -> list[tuple]:
    """Verification (row 2 pairs/s, row 6 per test image) and the train locals extracted on demand."""
    bc, R = cfg.bench, cfg.verify.num_to_rerank
    r2, r6 = res.get(2), res.get(6)
    rows = []
    if r2:
        for q in bc.gldv2_test:
            rows.append((f"verify {q:,} x {R} pairs", hours(q * R / r2["default_pairs_s"]), "same (CPU)"))
            if spi:
                n_loc = min(q * R, bc.gldv2_train)
                rows.append(
                    (
                        f"train locals on demand (<= {n_loc:,} images)",
                        hours(n_loc * spi * pixel_factors(cfg)[1]),
                        hours(n_loc * bc.gpu_seconds_per_image * pixel_factors(cfg)[1]),
                    )
                )
    if r6:
        big = r6["cells"][-1]
        for q in bc.gldv2_test:
            rows.append(
                (
                    f"verify stage {q:,} test at N={big['n']:,} (row 6: {1000 * big['per_img']:.0f} ms/test image, "
                    f"R={r6['R']}, synthetic features)",
                    hours(q * big["per_img"]),
                    "same (CPU)",
                )
            )
    return rows


def _time_table(cfg, res: dict, spi: float | None) -> list[str]:
    bc = cfg.bench
    rows = _extraction_rows(cfg, spi) if spi else []
    if res.get(3):
        rows += _knn_rows(cfg, res[3])
    rows += _verify_rows(cfg, res, spi)
    if spi and res.get(7):
        add = math.ceil(bc.gldv2_train / 100)
        rows.append(
            (
                f"add 1 % to train ({add:,} new images; row 7: only they run the model)",
                hours(add * spi * pixel_factors(cfg)[0]),
                hours(add * bc.gpu_seconds_per_image * pixel_factors(cfg)[0]),
            )
        )
    if res.get(5):
        rows.append(("read train.csv + labels", f"{res[5]['total_s']:.1f} s", "same"))
    if not rows:
        return ["(no timing rows ran)", ""]
    return ["| stage | this machine | GPU box |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]


def _disk(cfg, r4: dict, r2: dict | None) -> list[str]:
    """Disk per stage from the bytes of row 4's stored shards."""
    bc, R = cfg.bench, cfg.verify.num_to_rerank
    tr, te = r4["sizes"]["train"], r4["sizes"]["test"]
    g_img = tr["global"] / max(1, tr["n"])
    # per image: its id; per file: HDF5 structure, spread over a full shard at GLDv2 scale
    per_file = max(0.0, (tr["file"] - tr["datasets"]) / max(1, tr["files"]))
    over = tr["ids"] / max(1, tr["n"]) + per_file / max(1, cfg.extract.max_shard_images)
    loc_feat = (tr["local"] + te["local"]) / max(1, tr["m"] + te["m"])
    fpi = r2["feat_per_img"] if r2 else cfg.extract.max_feature_num
    L = [
        f"Disk (bytes from the stored shards of row 4: {g_img:.0f} B global/image, {over:.0f} B id + "
        f"file overhead/image ({per_file / 1e3:.0f} kB/shard spread over {cfg.extract.max_shard_images} images), "
        f"{loc_feat:.1f} B per local feature; {fpi:.0f} local features per real image "
        f"{'(row 2)' if r2 else '(max_feature_num)'}):",
        "",
        "| stage | disk |",
        "|---|---|",
        f"| train features (global only) | {gb(bc.gldv2_train * (g_img + over))} |",
    ]
    for q in bc.gldv2_test:
        n_loc = min(q * R, bc.gldv2_train)
        L += [
            f"| test features {q:,} (global + local) | {gb(q * (g_img + over + fpi * loc_feat))} |",
            f"| train local cache for {q:,} x {R} candidates (upper bound) | "
            f"{gb(n_loc * (g_img + over + fpi * loc_feat))} |",
            f"| knn-<hash>.npz {q:,} x K={cfg.knn.k} | {gb(q * cfg.knn.k * 12 + (q + bc.gldv2_train) * 16)} |",
        ]
    return L + [""]


def _ram(res: dict) -> list[str]:
    """Peak RAM per stage from rows 1, 3 and 5."""
    r1, r3, r5 = res.get(1), res.get(3), res.get(5)
    ram = []
    if r1:
        ram.append(f"extraction process (TF + model, row 1): {gb(r1['rss_peak'])} RSS per worker")
    if r3:
        big = [c for c in r3["cells"] if not c.get("skipped")]
        if big:
            c = max(big, key=lambda x: (x["d"] == big[0]["d"], x["n"]))
            m = c["exact"]
            ram.append(
                f"kNN exact N={c['n']:,} dim {c['d']}: {gb(c['db_bytes'] + m['mem'])} "
                f"(train matrix + index copy{'' if c['measured'] else ', extrapolated'})"
            )
    if r5:
        ram.append(f"train.csv + labels ({r5['rows']:,} rows): {gb(r5['mem'])}")
    return ["RAM peak per stage: " + "; ".join(ram) + ".", ""] if ram else []


def _dask(cfg, spi: float) -> list[str]:
    """Workers and shards for a one-hour extraction of train + the larger test set."""
    bc = cfg.bench
    total_img = bc.gldv2_train + max(bc.gldv2_test)
    f_train, f_test = pixel_factors(cfg)
    total_s = spi * (bc.gldv2_train * f_train + max(bc.gldv2_test) * f_test)
    workers = math.ceil(total_s / 3600)
    gpu_workers = math.ceil(total_s / spi * bc.gpu_seconds_per_image / 3600)
    cap = max(1, cfg.extract.max_shard_images)
    shards = max(math.ceil(total_img / cap), 4 * workers)
    return [
        f"Dask: extraction of {total_img:,} images takes {total_s / 3600:.1f} h on one worker like "
        f"this machine ({cpu_info()['cores']} cores, {total_s / total_img:.2f} s/image on average); to finish in one hour use **{workers}** "
        f"such workers (or {gpu_workers} GPU workers) and at least **{shards}** shards (>= 4 per worker for load "
        f"balance, <= extract.max_shard_images={cfg.extract.max_shard_images} images each): "
        f"`landmarks features --split train --shards {shards} --scheduler tcp://HOST:8786`.",
        "",
    ]


def scale_section(cfg, res: dict) -> list[str]:
    """'GLDv2 scale on paper': time, disk, RAM and Dask sizing from the measured rows."""
    L = _header(cfg.bench)
    spi, basis = extraction_basis(cfg, res)
    if basis:
        L.insert(-1, basis)
    L += _time_table(cfg, res, spi)
    if res.get(4):
        L += _disk(cfg, res[4], res.get(2))
    L += _ram(res)
    if spi:
        L += _dask(cfg, spi)
    return L
