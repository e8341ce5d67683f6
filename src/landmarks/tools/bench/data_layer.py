"""Row 5: the data layer at GLDv2 size: reading a generated 1.58 M-row train.csv and building the
label arrays the way predict does, in a fresh process (peak memory of the data alone).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from landmarks.datasets.data import load_split
from landmarks.tools.bench.common import PeakRss, gb, in_child, median
from landmarks.utils import atomic_path

TITLE = "Data layer: train.csv"


def make_train_csv(path: Path, rows: int, classes: int, seed: int = 0) -> Path:
    """GLDv2-like train.csv: 16-hex ids, long-tailed landmark ids (reused when already there)."""
    path = Path(path)
    marker = path.with_suffix(".json")
    want = {"rows": rows, "classes": classes, "seed": seed}
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == want:
        return path
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**63, rows, dtype=np.int64)
    ids = np.unique(ids)
    while len(ids) < rows:
        ids = np.unique(np.concatenate([ids, rng.integers(0, 2**63, rows - len(ids), dtype=np.int64)]))
    ids = rng.permutation(ids)
    w = 1.0 / np.arange(1, classes + 1) ** 0.8  # long tail like GLDv2
    labels = rng.choice(classes, rows, p=w / w.sum()) * 7 + 1
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("id,landmark_id\n")
            step = 200_000
            for a in range(0, rows, step):
                f.write(
                    "".join(
                        f"{i:016x},{lab}\n" for i, lab in zip(ids[a : a + step].tolist(), labels[a : a + step].tolist())
                    )
                )
    marker.write_text(json.dumps(want))
    return path


def data_child(data_dir: str) -> dict:
    """Read train.csv and build the label arrays the way predict does (fresh process)."""
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
    """Row 5: a GLDv2-size train.csv (generated once) read in fresh processes; medians and peak memory."""
    bc = cfg.bench
    d = Path(work_dir).resolve() / "bench" / "csv"
    t = time.perf_counter()
    make_train_csv(d / "train.csv", bc.csv_rows, bc.csv_classes)
    gen = time.perf_counter() - t
    runs = [in_child(data_child, str(d)) for _ in range(bc.repeats)]
    return {
        "rows": runs[0]["rows"],
        "classes": runs[0]["classes"],
        "gen_s": gen,
        "read_s": median([r["read_s"] for r in runs]),
        "total_s": median([r["total_s"] for r in runs]),
        "mem": max(r["mem"] for r in runs),
        "bytes": (d / "train.csv").stat().st_size,
    }


def markdown(r: dict) -> list[str]:
    """Row 5's section of bench.md."""
    return [
        f"Generated train.csv: {r['rows']:,} rows, {r['classes']:,} landmark ids, {gb(r['bytes'])} "
        f"(generated once in {r['gen_s']:.1f} s, reused); each run in a fresh process.",
        "",
        "| step | s | peak RSS delta |",
        "|---|---|---|",
        f"| data.load_split (read + validate + paths) | {r['read_s']:.2f} | |",
        f"| + label arrays (id->label dict as predict, np.unique) | {r['total_s']:.2f} | {gb(r['mem'])} |",
    ]


def summary(r: dict) -> str:
    """Row 5's cell of the summary table."""
    return f"{r['rows']:,} rows in {r['total_s']:.2f} s, peak +{gb(r['mem'])}"
