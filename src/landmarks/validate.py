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

from landmarks.utils import LandmarksError, atomic_path

log = logging.getLogger("landmarks.validate")


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


def diagnostics_section(cfg, solution, inputs) -> list[str]:
    """Report lines: shortlist recall@R of the global kNN and the inlier separation of verification."""
    truth_of = dict(zip(solution["id"].astype(str), solution["landmarks"].fillna("").astype(str)))
    rows = [r for r, t in enumerate(inputs["test_ids"]) if t in truth_of]
    truth = np.array([truth_of[inputs["test_ids"][r]] for r in rows], dtype=str)
    idx = np.asarray(inputs["knn"]["idx"])[rows]
    labels = np.asarray(inputs["train_labels"])
    cand = np.where(idx >= 0, labels[np.clip(idx, 0, None)], -1).astype(str)
    at = [r for r in cfg.hard.recall_at if r <= idx.shape[1]] or [idx.shape[1]]
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

    from landmarks.predict import NO_LABEL

    keep = set(solution["id"].astype(str))
    rows = [
        (i, str(int(lab)) if lab != NO_LABEL else "", float(c) if lab != NO_LABEL else np.nan)
        for i, lab, c in zip(test_ids, labels, conf)
        if i in keep
    ]
    return pd.DataFrame(rows, columns=["id", "label", "confidence"])


def _variants(cfg, inputs) -> list[tuple[str, object, object]]:
    """(name, cfg, inliers) of every variant to score; inliers None = global only."""
    from landmarks.config import VoteConfig

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
    from landmarks.knn import run_knn
    from landmarks.store import load_npz

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


def _plots(plot_dir: Path, solution, inputs, default, glob) -> dict[str, str]:
    """The report's three PNGs: precision vs rank, inliers of correct vs wrong candidates, scores."""
    import matplotlib

    matplotlib.use("Agg")
    plot_dir.mkdir(parents=True, exist_ok=True)
    truth = {str(i): set(str(t).split()) for i, t in zip(solution["id"], solution["landmarks"].fillna(""))}
    files = {"precision": _plot_precision(plot_dir, truth, default, glob)}
    if inputs["inliers"] is not None:
        files["inliers"] = _plot_inliers(plot_dir, truth, inputs)
    files["scores"] = _plot_scores(plot_dir, truth, default)
    return files


def _plot_precision(plot_dir: Path, truth: dict, default, glob) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, df in (("default", default), ("global only", glob)):
        d = df.dropna(subset=["confidence"]).sort_values(
            ["confidence", "id"], ascending=[False, True], kind="mergesort"
        )
        corr = np.array([lab in truth[i] for i, lab in zip(d["id"], d["label"])], float)
        if len(corr):
            ax.plot(np.arange(1, len(corr) + 1), np.cumsum(corr) / np.arange(1, len(corr) + 1), label=name)
    ax.set_xlabel("rank (predictions sorted by confidence)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Precision vs rank")
    return _save(fig, plot_dir / "precision_vs_rank.png")


def _plot_inliers(plot_dir: Path, truth: dict, inputs) -> str:
    import matplotlib.pyplot as plt

    knn, inl = inputs["knn"], inputs["inliers"]
    R = inl.shape[1]
    lab = inputs["train_labels"][np.clip(knn["idx"][:, :R], 0, None)]
    good, bad = [], []
    for r, tid in enumerate(inputs["test_ids"]):
        t = truth.get(tid)
        if t is None:
            continue
        for j in range(R):
            if knn["idx"][r, j] >= 0:
                (good if str(lab[r, j]) in t else bad).append(inl[r, j])
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([1, *good, *bad])
    bins = np.unique(np.concatenate([[0, 1, 2, 4, 6, 8, 10, 15, 20, 30, 40, 60, 80, 120, 200, 400, 1000], [top + 1]]))
    bins = bins[bins <= top + 1]
    ax.hist(
        [good, bad],
        bins=bins,
        label=[f"correct candidates ({len(good)})", f"wrong candidates ({len(bad)})"],
        color=["tab:green", "tab:red"],
        alpha=0.8,
    )
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("log")
    ax.set_xlabel("RANSAC inliers")
    ax.set_ylabel("candidates")
    ax.legend()
    ax.set_title("Inliers: correct vs wrong top candidates")
    return _save(fig, plot_dir / "inliers_correct_vs_wrong.png")


def _plot_scores(plot_dir: Path, truth: dict, default) -> str:
    import matplotlib.pyplot as plt

    d = default.dropna(subset=["confidence"])
    is_lm = np.array([bool(truth[i]) for i in d["id"]])
    corr = np.array([lab in truth[i] for i, lab in zip(d["id"], d["label"])])
    conf = d["confidence"].to_numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = [
        (conf[is_lm & corr], "landmark, correct", "tab:green"),
        (conf[is_lm & ~corr], "landmark, wrong", "tab:orange"),
        (conf[~is_lm], "non-landmark", "tab:red"),
    ]
    allc = conf if len(conf) else np.zeros(1)
    bins = np.linspace(allc.min(), allc.max() + 1e-9, 40)
    for vals, name, color in groups:
        if len(vals):
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{name} ({len(vals)})", color=color)
    ax.set_yscale("log")
    ax.set_xlabel("confidence (default setting)")
    ax.set_ylabel("test images")
    ax.legend()
    ax.set_title("Scores: landmark vs non-landmark test images")
    return _save(fig, plot_dir / "score_distribution.png")


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _score_variants(cfg, work, inputs, solution, whitening) -> tuple[list, dict]:
    """(name, scores) rows and the prediction frames of every variant."""
    from landmarks import metrics
    from landmarks.predict import predict_arrays

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
    from landmarks import metrics

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
    from landmarks import data, whiten
    from landmarks.layout import WorkLayout
    from landmarks.predict import load_inputs, stage_paths
    from landmarks.reliability import reliability_section

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
    plots = _plots(work.plots, solution, inputs, frames[default_name], frames[glob_name])
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
