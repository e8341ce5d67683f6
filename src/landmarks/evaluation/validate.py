"""`make validate`: GAP of the pipeline's variants on a dataset with solution.csv, plus plots.

Reads the knn and verify stages' outputs (voting variants are cheap; nothing is re-extracted)
and scores: global only (no verification), global + verification (the configured default),
host-baseline voting, and, for each option that is on, the same run with that option off (a
knn-level option off is one more knn output, named after its settings beside the default's).
Writes WORK_DIR/report.md and PNG plots in WORK_DIR/plots/.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from landmarks import whiten
from landmarks.config import VoteConfig
from landmarks.datasets import data
from landmarks.evaluation import metrics
from landmarks.evaluation.reliability import reliability_section
from landmarks.knn import run_knn
from landmarks.predict import NO_LABEL, load_inputs, predict_arrays, stage_paths
from landmarks.store import load_npz
from landmarks.utils import LandmarksError, atomic_path
from landmarks.utils.layout import WorkLayout

log = logging.getLogger(__name__)


# -- shortlist and verification diagnostics (also used by the hard protocol) --------------------------
def shortlist_recall(cand_labels: np.ndarray, truth, at) -> dict[int, float]:
    """Share of landmark test images with a correct-class train image among the top R neighbours."""
    truth = np.asarray(truth, dtype=str)
    lm = truth != ""
    if not lm.any():
        return {int(r): float("nan") for r in at}
    hit = cand_labels[lm] == truth[lm][:, None]
    return {int(r): float(hit[:, :r].any(axis=1).mean()) for r in at}


def split_inliers(cand_labels: np.ndarray, truth, inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inliers of correct-class candidates and of wrong ones (landmark test images only)."""
    truth = np.asarray(truth, dtype=str)
    lm = truth != ""
    same = cand_labels[lm] == truth[lm][:, None]
    inl = inliers[lm]
    return inl[same].astype(np.int64), inl[~same].astype(np.int64)


def separation(good: np.ndarray, bad: np.ndarray) -> dict:
    """Quantiles of correct and wrong inliers, ROC AUC (correct above wrong) and the random floor."""

    def q(x, p):
        return float(np.quantile(x, p)) if len(x) else float("nan")

    if len(good) and len(bad):
        both = np.concatenate([good, bad]).astype(np.float64)
        from scipy.stats import rankdata

        ranks = rankdata(both)
        auc = float((ranks[: len(good)].sum() - len(good) * (len(good) + 1) / 2) / (len(good) * len(bad)))
    else:
        auc = float("nan")
    return {
        "n_good": len(good),
        "n_bad": len(bad),
        "good_q10": q(good, 0.1),
        "good_q50": q(good, 0.5),
        "good_q90": q(good, 0.9),
        "bad_q50": q(bad, 0.5),
        "bad_q90": q(bad, 0.9),
        "floor": q(bad, 0.95),
        "auc": auc,
        "good_at_floor": float(np.mean(good <= q(bad, 0.95))) if len(good) and len(bad) else float("nan"),
    }


def _candidate_labels(solution, inputs) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(label of every kNN candidate as text, truth, knn rows) of the test images in solution.csv."""
    truth_of = dict(zip(solution["id"].astype(str), solution["landmarks"].fillna("").astype(str)))
    rows = [r for r, t in enumerate(inputs["test_ids"]) if t in truth_of]
    truth = np.array([truth_of[inputs["test_ids"][r]] for r in rows], dtype=str)
    idx = np.asarray(inputs["knn"]["idx"])[rows]
    labels = np.asarray(inputs["train_labels"])
    cand = np.where(idx >= 0, labels[np.clip(idx, 0, None)], -1).astype(str)
    return cand, truth, rows


def diagnostics_section(cfg, solution, inputs) -> list[str]:
    """Report lines: shortlist recall@R of the global kNN and the inlier separation of verification."""
    cand, truth, rows = _candidate_labels(solution, inputs)
    at = [r for r in cfg.hard.recall_at if r <= cand.shape[1]] or [cand.shape[1]]
    rec = shortlist_recall(cand, truth, at)
    out = [
        "## Shortlist recall@R (global kNN)",
        "",
        "Share of landmark test images with a correct-class train image among the top R neighbours "
        f"({int((truth != '').sum())} landmark test images).",
        "",
        "| " + " | ".join(f"R@{r}" for r in at) + " |",
        "|" + "---|" * len(at),
        "| " + " | ".join(f"{rec[r]:.3f}" for r in at) + " |",
        "",
    ]
    if inputs["inliers"] is None:
        return out
    inl = np.asarray(inputs["inliers"])[rows]
    sep = separation(*split_inliers(cand[:, : inl.shape[1]], truth, inl))
    out += [
        "## Inlier separation (verification)",
        "",
        f"Inliers of the top {inl.shape[1]} candidates of landmark test images: correct-class against wrong "
        "candidates. The random floor is what a non-matching pair gets (wrong candidates' 95th percentile).",
        "",
        "| correct n | correct q10 / q50 / q90 | wrong n | wrong q50 / q90 | random floor | correct at or below floor | ROC AUC |",
        "|---|---|---|---|---|---|---|",
        f"| {sep['n_good']} | {sep['good_q10']:.0f} / {sep['good_q50']:.0f} / {sep['good_q90']:.0f} | {sep['n_bad']} | "
        f"{sep['bad_q50']:.0f} / {sep['bad_q90']:.0f} | {sep['floor']:.0f} | {sep['good_at_floor']:.3f} | {sep['auc']:.3f} |",
        "",
    ]
    return out


def _predictions_df(test_ids, labels, conf, solution):
    import pandas as pd

    keep = set(solution["id"].astype(str))
    rows = [
        (i, str(int(lab)) if lab != NO_LABEL else "", float(c) if lab != NO_LABEL else np.nan)
        for i, lab, c in zip(test_ids, labels, conf)
        if i in keep
    ]
    return pd.DataFrame(rows, columns=["id", "label", "confidence"])


def _variants(cfg, inputs) -> list[tuple[str, object, object]]:
    """(name, cfg, inliers) of every variant to score; inliers None = global only."""

    inl = inputs["inliers"]
    out = []
    verified = inl is not None
    out.append(("global only" + (" (no verification)" if verified else ""), cfg, None))
    if verified:
        out.append(("global + verification", cfg, inl))
    host = copy.deepcopy(cfg)
    host.vote = VoteConfig(method="host", neighbours=10, top_k=5, inlier_cap=70)
    if cfg.vote != host.vote:
        out.append(("host baseline voting" + (" + verification" if verified else ""), host, inl))
        if verified:
            out.append(("host baseline voting, global only", host, None))
    if cfg.vote.suppression != "none":
        off = copy.deepcopy(cfg)
        off.vote.suppression = "none"
        out.append((f"without suppression ({cfg.vote.suppression} off)", off, inl))
    else:
        on = copy.deepcopy(cfg)
        on.vote.suppression = "test"
        out.append(("+ suppression=test (option, off by default)", on, inl))
    return out


def _default_name(cfg, inputs) -> str:
    return "global + verification" if inputs["inliers"] is not None else "global only"


def _knn_ablations(cfg, work, inputs) -> list[tuple[str, object, dict]]:
    """Global-only runs with each knn-level option that is on switched off (knn outputs of their own)."""

    out = []
    for name, field, off in (
        ("whiten.global_pca", ("whiten", "global_pca"), False),
        ("knn.dba_k", ("knn", "dba_k"), 0),
        ("knn.qe_k", ("knn", "qe_k"), 0),
    ):
        if getattr(getattr(cfg, field[0]), field[1]):
            c = copy.deepcopy(cfg)
            setattr(getattr(c, field[0]), field[1], off)
            knn = load_npz(run_knn(c, work.features("train"), work.features("test"), work.knn(c), work.whiten(cfg)))
            if list(knn["train_ids"]) != list(inputs["knn"]["train_ids"]):
                continue
            out.append((f"global only, {name} off", c, {**inputs, "knn": knn, "inliers": None}))
    return out


def _plots(plot_dir: Path, solution, inputs, default, glob, gaps: dict | None = None) -> dict[str, str]:
    """The report's PNGs: precision vs rank, inliers of correct vs wrong candidates, scores.

    `gaps` ({"default": GAP, "global only": GAP}) goes into the legends and titles when given."""
    import matplotlib

    matplotlib.use("Agg")
    plot_dir.mkdir(parents=True, exist_ok=True)
    gaps = gaps or {}
    truth = {str(i): set(str(t).split()) for i, t in zip(solution["id"], solution["landmarks"].fillna(""))}
    files = {"precision": _plot_precision(plot_dir, truth, default, glob, gaps)}
    if inputs["inliers"] is not None:
        files["inliers"] = _plot_inliers(plot_dir, solution, inputs)
    files["scores"] = _plot_scores(plot_dir, truth, default, gaps.get("default"))
    return files


def _plot_precision(plot_dir: Path, truth: dict, default, glob, gaps: dict) -> str:
    """Precision among the first i predictions (sorted by confidence) of the default and global-only runs."""
    import matplotlib.pyplot as plt

    n_landmark = sum(1 for t in truth.values() if t)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, df, color in (("default", default, "tab:blue"), ("global only", glob, "tab:gray")):
        d = df.dropna(subset=["confidence"]).sort_values(
            ["confidence", "id"], ascending=[False, True], kind="mergesort"
        )
        corr = np.array([lab in truth[i] for i, lab in zip(d["id"], d["label"])], float)
        label = name + (f": GAP {gaps[name]:.4f}" if name in gaps else "")
        if len(corr):
            ax.plot(
                np.arange(1, len(corr) + 1), np.cumsum(corr) / np.arange(1, len(corr) + 1), label=label, color=color
            )
    if n_landmark:
        ax.axvline(n_landmark, color="black", ls=":", lw=1)
        ax.text(n_landmark, 0.03, f" {n_landmark} landmark\n test images", fontsize=8, va="bottom")
    ax.set_xlabel("rank (predictions sorted by confidence, most confident first)")
    ax.set_ylabel("precision of the first i predictions")
    ax.set_ylim(0, 1.04)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("Precision vs rank: a perfect run stays at 1.0 up to the dotted line", fontsize=10)
    return _save(fig, plot_dir / "precision_vs_rank.png")


def _plot_inliers(plot_dir: Path, solution, inputs) -> str:
    """Inliers of correct-class vs wrong candidates: the same candidates and random floor as the
    report's inlier-separation table (landmark test images only)."""
    import matplotlib.pyplot as plt

    cand, truth, rows = _candidate_labels(solution, inputs)
    inl = np.asarray(inputs["inliers"])[rows]
    good, bad = split_inliers(cand[:, : inl.shape[1]], truth, inl)
    sep = separation(good, bad)
    n_lm, n_non = int((truth != "").sum()), int((truth == "").sum())
    fig, ax = plt.subplots(figsize=(6.4, 4))
    top = int(max([1, *good, *bad]))
    width = max(1, int(np.ceil((top + 1) / 60)))
    bins = np.arange(0, top + width + 1, width)
    for vals, name, color in (
        (bad, f"wrong-class candidates ({len(bad)})", "tab:red"),
        (good, f"correct-class candidates ({len(good)})", "tab:green"),
    ):
        if len(vals):
            share = np.full(len(vals), 1.0 / len(vals))
            ax.hist(vals, bins=bins, weights=share, histtype="step", lw=2, color=color, label=name)
    if sep["floor"] == sep["floor"]:
        ax.axvline(sep["floor"], color="black", ls="--", lw=1.2, label=f"random floor: {sep['floor']:.0f} inliers")
    ax.set_xlabel("RANSAC inliers")
    ax.set_ylabel("share of the group's candidates")
    ax.grid(alpha=0.3)
    ax.legend()
    note = f"; {n_non} non-landmark queries left out" if n_non else ""
    ax.set_title(
        f"Inliers of the top {inl.shape[1]} candidates of {n_lm} landmark queries{note}\n"
        f"ROC AUC {sep['auc']:.3f}; correct at or below the floor: {sep['good_at_floor']:.3f}",
        fontsize=10,
    )
    return _save(fig, plot_dir / "inliers_correct_vs_wrong.png")


def _plot_scores(plot_dir: Path, truth: dict, default, gap: float | None = None) -> str:
    """Stacked histogram of the default setting's confidences: correct, wrong-label and non-landmark
    predictions, with the lowest correct confidence (a wrong prediction above it costs GAP)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    d = default.dropna(subset=["confidence"])
    is_lm = np.array([bool(truth[i]) for i in d["id"]], bool)
    corr = np.array([lab in truth[i] for i, lab in zip(d["id"], d["label"])], bool)
    conf = d["confidence"].to_numpy(float)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    groups = [
        (conf[~is_lm], "non-landmark (any prediction is wrong)", "#7f8c9a"),
        (conf[is_lm & ~corr], "landmark, wrong label", "#d62728"),
        (conf[is_lm & corr], "landmark, correct", "#2ca02c"),
    ]
    allc = conf if len(conf) else np.zeros(1)
    bins = np.linspace(allc.min(), allc.max() + 1e-9, 40)
    kept = [(v, f"{n} ({len(v)})", c) for v, n, c in groups if len(v)]
    if kept:
        ax.hist(
            [v for v, _, _ in kept],
            bins=bins,
            stacked=True,
            label=[n for _, n, _ in kept],
            color=[c for _, _, c in kept],
            edgecolor="white",
            linewidth=0.4,
        )
    if corr.any():
        low = float(conf[corr].min())
        non, lab = int(np.sum(~is_lm & (conf > low))), int(np.sum(is_lm & ~corr & (conf > low)))
        ax.axvline(
            low,
            color="black",
            ls="--",
            lw=1.2,
            label=f"lowest correct {low:.2f}: above it {non} non-landmark, {lab} wrong label",
        )
    ax.set_xlabel("confidence (default setting)")
    ax.set_ylabel("test images")
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.6)  # headroom: the legend never covers a bar
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="upper left")
    head = f"GAP {gap:.4f}: " if gap is not None else ""
    ax.set_title(
        f"{head}{int(corr.sum())} of {int(is_lm.sum())} landmark images correct, {int((~is_lm).sum())} non-landmarks",
        fontsize=10,
    )
    return _save(fig, plot_dir / "score_distribution.png")


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _score_variants(cfg, work, inputs, solution, whitening) -> tuple[list, dict]:
    """(name, scores) rows and the prediction frames of every variant."""

    rows, frames = [], {}
    variants = [(n, c, {**inputs, "inliers": i}) for n, c, i in _variants(cfg, inputs)]
    variants += _knn_ablations(cfg, work, inputs)
    for name, c, inp in variants:
        labels, conf, _ = predict_arrays(c, inp, work.features_root, whitening, inliers=inp["inliers"])
        df = _predictions_df(inp["test_ids"], labels, conf, solution)
        frames[name] = df
        rows.append((name, metrics.score(solution, df)))
    return rows, frames


def _submission_line(data_dir, submission) -> str:
    """GAP of the submission file itself, when there is one."""

    if not Path(submission).exists():
        return ""
    try:
        sub = metrics.score_files(Path(data_dir) / "solution.csv", submission)
        return f"Submission `{submission}`: GAP {sub['gap']:.4f}."
    except LandmarksError as e:
        return f"Submission `{submission}` could not be scored: {e}"


def _settings_text(cfg) -> str:
    v, k, w = cfg.verify, cfg.knn, cfg.vote
    return (
        f"Settings: knn k={k.k} index={k.index} dba_k={k.dba_k} qe_k={k.qe_k}; "
        f"verify enabled={v.enabled} matcher={v.matcher} num_to_rerank={v.num_to_rerank} "
        f"mutual_min_sim={v.mutual_min_sim} ratio={v.ratio} geometry={v.geometry} "
        f"reproj={v.reproj_threshold} iters={v.max_iters}; vote method={w.method} neighbours={w.neighbours} "
        f"top_k={w.top_k} power={w.power} inlier_weight={w.inlier_weight} cap={w.inlier_cap} "
        f"suppression={w.suppression} (weight {w.suppression_weight}); whiten global={cfg.whiten.global_pca} "
        f"local={cfg.whiten.local_pca}."
    )


def _gap_table(rows, default_name: str) -> list[str]:
    table = [
        "| setting | GAP | accuracy | predicted | correct | confident wrong non-landmarks |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        mark = " **(default)**" if name == default_name else ""
        table.append(
            f"| {name}{mark} | {s['gap']:.4f} | {s['accuracy']:.4f} | {s['n_predicted']} | "
            f"{s['n_correct']} | {s['confident_wrong_nonlandmark']} |"
        )
    return table


def run_validate(cfg, data_dir, work_dir, model_dir, submission) -> Path:
    """Score the variants from the knn and verify outputs; write WORK_DIR/report.md and plots;
    print the GAP table.  `model_dir` is named in the report only."""

    work = WorkLayout(work_dir)
    solution = data.load_solution(data_dir)
    if solution is None:
        raise LandmarksError(
            f"{data_dir}/solution.csv not found: validate needs a dataset with ground truth "
            "(demo data, `landmarks holdout` or `landmarks import`)"
        )
    paths = stage_paths(cfg, work.root)
    inputs = load_inputs(cfg, data_dir, paths["knn_path"], paths["verified_path"], paths.get("calibration_path"))
    whitening = whiten.load_whiten(cfg, paths["whiten_path"], work.features("train"), "global")
    rows, frames = _score_variants(cfg, work, inputs, solution, whitening)
    default_name = _default_name(cfg, inputs)
    default_score = dict(rows)[default_name]
    glob_name = next(n for n, _ in rows if n.startswith("global only"))
    gaps = {"default": default_score["gap"], "global only": dict(rows)[glob_name]["gap"]}
    plots = _plots(work.plots, solution, inputs, frames[default_name], frames[glob_name], gaps)
    table = _gap_table(rows, default_name)
    lines = [
        "# Validation report",
        "",
        f"Dataset `{data_dir}`: {default_score['n_test']} scored test images "
        f"({default_score['n_landmark']} landmark, {default_score['n_nonlandmark']} non-landmark); "
        f"{len(inputs['knn']['train_ids'])} train images with features. Model `{model_dir}`.",
        "",
        *table,
        "",
        '"confident wrong non-landmarks": predictions on non-landmark images whose confidence is above '
        "the lowest-confidence correct prediction.",
        "",
        _settings_text(cfg),
        "",
    ]
    sub_line = _submission_line(data_dir, submission)
    if sub_line:
        lines += [sub_line, ""]
    lines += diagnostics_section(cfg, solution, inputs)
    lines += reliability_section(work.plots, solution, {n: frames[n] for n in dict.fromkeys([default_name, glob_name])})
    lines += ["## Plots", ""] + [f"![{key}](plots/{name})" for key, name in plots.items()] + [""]
    with atomic_path(work.report) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(table))
    log.info("validate: report -> %s", work.report)
    return work.report
