"""`make bench` (`landmarks bench`): speed and memory of every stage against its baseline and its limit.

A tool, not a stage: nothing in the pipeline imports it.  One module per row (``bench.rows``;
each runs on its own, a failing row prints its error and the others go on):

1. ``extraction``: images/s of the full feature path (decode + resize + model + post-processing +
   shard write, ``features.extract_shard`` in this process) vs the bare backbone forward pass on
   the same images, sizes and scales; backbone FLOPs (tf.profiler) and fraction of CPU peak.
2. ``matching``: pairs/s of the host baseline (cKDTree + distance bound + pydegensac) vs the
   configured matcher + pydegensac, on real photo pairs, with mean inliers.
3. ``retrieval``: time and peak RSS of top-K for many queries against N train descriptors:
   faiss exact vs approximate vs chunked numpy, recall@K of the approximate index.
4. ``e2e``: test images/s of ``predict.run_predict`` for each NUM_TO_RERANK (features ready).
5. ``data_layer``: reading a generated GLDv2-size train.csv and building the label arrays.
6. ``verification``: time per test image at N = 1 k and 1.58 M synthetic train ids (flat: one id
   index per stage).
7. ``incremental``: time to add 1 % of rows to an extracted set vs extracting it all.
8. ``dryrun``: the GLDv2-size dry run after extraction (whiten, knn + DBA, verify, predict), wall s
   and peak RSS per stage (not in the default rows: ``--rows 8``).

``scale`` computes the "GLDv2 scale on paper" section from the measured rows; ``driver`` runs
the rows and writes the report; ``common`` holds the shared helpers.  Every timing is the median
of ``bench.repeats`` runs; ratios come from the same run.  Output: the table on stdout and
WORK_DIR/bench.md (machine, versions, inputs, the rows, the GLDv2 section).
"""

from __future__ import annotations

from landmarks.tools.bench.common import PeakRss, cpu_info, peak_gflops, versions
from landmarks.tools.bench.data_layer import make_train_csv
from landmarks.tools.bench.driver import ROW_TITLES, ROWS, parse_rows, quick_config, register_cli, run_bench
from landmarks.tools.bench.retrieval import row_knn
from landmarks.tools.bench.scale import scale_section

__all__ = [
    "ROWS",
    "ROW_TITLES",
    "PeakRss",
    "cpu_info",
    "make_train_csv",
    "parse_rows",
    "peak_gflops",
    "quick_config",
    "register_cli",
    "row_knn",
    "run_bench",
    "scale_section",
    "versions",
]
