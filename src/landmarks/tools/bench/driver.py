"""Run the selected rows, each on its own (a failing row prints its error, the others go on),
print the summary table and write WORK_DIR/bench.md with the machine, the rows' sections and
the GLDv2 section computed from them.
"""

from __future__ import annotations

import copy
import platform
import time
import traceback
from pathlib import Path

from landmarks.tools.bench import data_layer, dryrun, e2e, extraction, incremental, matching, retrieval, verification
from landmarks.tools.bench.common import cpu_info, gb, model_meta, versions
from landmarks.tools.bench.scale import scale_section
from landmarks.utils import LandmarksError, atomic_path, log

_MODULES = {
    1: extraction,
    2: matching,
    3: retrieval,
    4: e2e,
    5: data_layer,
    6: verification,
    7: incremental,
    8: dryrun,
}
ROW_TITLES = {i: m.TITLE for i, m in _MODULES.items()}
# row -> (measure(cfg, data_dir, work_dir, model_dir) -> dict, markdown(result) -> lines)
ROWS = {
    1: (extraction.row_extraction, extraction.markdown),
    2: (matching.row_matching, matching.markdown),
    3: (retrieval.row_knn, retrieval.markdown),
    4: (e2e.row_e2e, e2e.markdown),
    5: (data_layer.row_data, data_layer.markdown),
    6: (verification.row_verify, verification.markdown),
    7: (incremental.row_incremental, incremental.markdown),
    8: (dryrun.row_dryrun, dryrun.markdown),
}


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
    q.knn_stream_n = min(bc.knn_stream_n, 5000)
    q.dryrun_train = min(bc.dryrun_train, 5000)
    q.dryrun_test = min(bc.dryrun_test, 50)
    q.dryrun_features = min(bc.dryrun_features, 100)
    return q


def parse_rows(text) -> list[int]:
    """'3,1, 3' or (2, 5) -> sorted unique row numbers; a one-line error for anything else."""
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


def _measure(cfg, selected, data_dir, work_dir, model_dir) -> tuple[dict, dict, dict]:
    """Each selected row: its result or its one-line error, and its wall time."""
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
    return results, errors, walls


def _summary_table(selected, results, errors, walls) -> list[str]:
    table = ["| row | measurement | result | wall s |", "|---|---|---|---|"]
    for i in selected:
        res = f"ERROR: {errors[i]}" if i in errors else _MODULES[i].summary(results[i])
        table.append(f"| {i} | {ROW_TITLES[i]} | {res.replace('|', '/')} | {walls[i]:.0f} |")
    return table


def _head(cfg, data_dir, work_dir, model_dir, total: float) -> list[str]:
    """Title, date, machine, versions, inputs and the settings that shape the timings."""
    info, v, e = cpu_info(), versions(), cfg.extract
    return [
        f"# Benchmark ({'quick smoke run' if cfg.bench.quick else 'full'})",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time {total:.0f} s",
        f"- machine: {info['model']}, {info['cores']} cores, {info['mhz'] / 1000:.2f} GHz, "
        f"SIMD {' '.join(info['simd']) or 'unknown'}, RAM {gb(info['ram'])}; {platform.platform()}",
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        f"- inputs: data {data_dir}, model {model_dir} ({(model_meta(model_dir) or {}).get('backbone', 'foreign')}),"
        f" work {work_dir}; repeats {cfg.bench.repeats} (medians)",
        f"- settings: global scales {list(e.global_scales)}, local scales {list(e.local_scales)}, max_image_size "
        f"{e.max_image_size}, max_feature_num {e.max_feature_num}; knn k {cfg.knn.k}, dba_k {cfg.knn.dba_k}; "
        f"verify {cfg.verify.matcher}, num_to_rerank {cfg.verify.num_to_rerank}",
        "",
    ]


def run_bench(cfg, data_dir, work_dir, model_dir, rows=None, out: str | Path | None = None) -> Path:
    """Run the selected rows (default bench.rows), print the table, write WORK_DIR/bench.md."""
    if cfg.bench.quick:
        cfg = copy.deepcopy(cfg)
        cfg.bench = quick_config(cfg.bench)
    selected = parse_rows(rows if rows is not None else cfg.bench.rows)
    work_dir = Path(work_dir)
    out = Path(out) if out else work_dir / "bench.md"
    t_all = time.perf_counter()
    results, errors, walls = _measure(cfg, selected, data_dir, work_dir, model_dir)
    total = time.perf_counter() - t_all
    table = _summary_table(selected, results, errors, walls)
    body = ["## Summary", ""] + table + [""]
    for i in selected:
        body += [f"## Row {i}: {ROW_TITLES[i]}", ""]
        body += [f"ERROR: {errors[i]}", ""] if i in errors else ROWS[i][1](results[i]) + [""]
    body += scale_section(cfg, results)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(_head(cfg, data_dir, work_dir, model_dir, total) + body) + "\n")
    print("\n".join(table))
    print(f"bench: {len(results)}/{len(selected)} rows in {total:.0f} s -> {out}")
    return out


def register_cli(subparsers, common) -> None:
    """`landmarks bench [--quick] [--rows 1,3] [--out PATH]`."""
    p = subparsers.add_parser(
        "bench",
        parents=common("data_dir", "work_dir", "model"),
        help="benchmark every stage against its baseline -> WORK_DIR/bench.md",
    )
    p.add_argument("--quick", action="store_true", default=None, help="tiny smoke run (bench.quick)")
    p.add_argument("--rows", default=None, help="rows to run, e.g. 1,3 (default: bench.rows)")
    p.add_argument("--out", default=None, help="report path (default: WORK_DIR/bench.md)")
    p.set_defaults(func=_cli)


def _cli(args, cfg) -> int:
    if args.quick:
        cfg.bench.quick = True
    run_bench(cfg, args.data_dir, args.work_dir, args.model, rows=args.rows, out=args.out)
    return 0
