"""Row 7: incremental extraction: adding 1 % of rows to an extracted set sends only the new
images through the model (the shards keep every row whose image key is unchanged).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from landmarks import features
from landmarks.store import FeatureStore
from landmarks.utils import LandmarksError

TITLE = "Incremental extraction: add 1 %"


def _setup(cfg, data_dir, work_dir) -> tuple:
    """(train.csv rows, n, rows to add, bench dir, its data dir with the train images linked, shards)."""
    import shutil

    import pandas as pd

    src = Path(data_dir).resolve()
    df = pd.read_csv(src / "train.csv", dtype=str, keep_default_na=False)
    n = min(int(cfg.bench.incr_images), len(df) - 1)
    if n < 2:
        raise LandmarksError(f"row 7 needs at least 3 train rows in {src}")
    d = Path(work_dir).resolve() / "bench" / "incr"
    shutil.rmtree(d, ignore_errors=True)
    data = d / "data"
    data.mkdir(parents=True)
    (data / "train").symlink_to(src / "train", target_is_directory=True)
    return df, n, max(1, n // 100), d, data, max(1, min(int(cfg.extract.shards), n))


@contextlib.contextmanager
def _counting_model_calls():
    """Count the images that go through the model (extract's per-process model, wrapped)."""

    counts = {"n": 0}
    real = features.get_model

    def counting(model_dir_, threads):
        m = real(model_dir_, threads)

        def call(image, *a):
            counts["n"] += 1
            return m(image, *a)

        return call

    features.get_model = counting
    try:
        yield counts
    finally:
        features.get_model = real


def row_incremental(cfg, data_dir, work_dir, model_dir) -> dict:
    """Time to extract a set, then to add 1 % of rows to it (and to remove them again), with the
    number of images that went through the model each time."""

    df, n, add, d, data, shards = _setup(cfg, data_dir, work_dir)

    def run(rows: int) -> tuple[float, int]:
        df.head(rows).to_csv(data / "train.csv", index=False)
        counts["n"] = 0
        t = time.perf_counter()
        features.run_features(cfg, data, d, model_dir, "train", shards=shards, jobs=1)
        s = time.perf_counter() - t
        st = FeatureStore(features.features_dir(d, "train"))
        assert len(st.ids) + len(st.failures()) == rows
        return s, counts["n"]

    with _counting_model_calls() as counts:
        full_s, full_calls = run(n)
        add_s, add_calls = run(n + add)
        rm_s, rm_calls = run(n)
    return {
        "n": n,
        "add": add,
        "shards": shards,
        "full_s": full_s,
        "add_s": add_s,
        "rm_s": rm_s,
        "full_calls": full_calls,
        "add_calls": add_calls,
        "rm_calls": rm_calls,
        "ratio": add_s / full_s,
    }


def markdown(r: dict) -> list[str]:
    """Row 7's section of bench.md."""
    return [
        f"`run_features` on the first {r['n']} train rows of the data dir ({r['shards']} id-hash shards, 1 job, "
        f"the project model), then {r['add']} row(s) appended (1 %), then removed again; model calls counted.",
        "",
        "| step | s | images through the model |",
        "|---|---|---|",
        f"| extract {r['n']} images | {r['full_s']:.2f} | {r['full_calls']} |",
        f"| add {r['add']} (1 %) | {r['add_s']:.2f} | {r['add_calls']} |",
        f"| remove them again | {r['rm_s']:.2f} | {r['rm_calls']} |",
        "",
        f"Ratio add-1 % / full extraction: **{r['ratio']:.3f}** (every shard is rewritten: kept rows are copied, "
        "only new images run the model).",
    ]


def summary(r: dict) -> str:
    """Row 7's cell of the summary table."""
    return (
        f"add 1 % ({r['add']} img): {r['add_s']:.1f} s, {r['add_calls']} model calls, vs {r['full_s']:.1f} s "
        f"for all {r['n']}: ratio {r['ratio']:.3f}"
    )
