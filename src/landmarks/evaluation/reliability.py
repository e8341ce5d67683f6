"""Is the confidence a probability?  Reliability diagram and non-landmark confidence quantiles.

GAP ranks predictions by confidence; a confidence that means P(correct) ranks them right on any
test set.  ``reliability_section`` adds to the `make validate` report, for the default setting
(and global only, for comparison): predictions binned by confidence (equal-count bins) with the
mean predicted confidence against the observed precision in each bin, and the confidence
quantiles of the predictions on non-landmark images against those of the correct answers, as
numbers and as a picture (WORK_DIR/plots/reliability.png).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from landmarks.utils import atomic_path

log = logging.getLogger(__name__)


def outcomes(truth: dict, df) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, non-landmark) of each prediction of a frame id, label, confidence;
    `truth` maps id -> set of true labels (empty = non-landmark)."""
    d = df.dropna(subset=["confidence"])
    conf = d["confidence"].to_numpy(np.float64)
    correct = np.array([lab in truth.get(i, set()) for i, lab in zip(d["id"], d["label"])], bool)
    nonlm = np.array([not truth.get(i) for i in d["id"]], bool)
    return conf, correct, nonlm


def reliability_bins(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-count confidence bins: n, mean confidence, observed precision, range."""
    if not len(conf):
        return []
    order = np.argsort(conf, kind="mergesort")
    out = []
    for part in np.array_split(order, min(bins, len(conf))):
        if len(part):
            out.append(
                {
                    "n": int(len(part)),
                    "lo": float(conf[part].min()),
                    "hi": float(conf[part].max()),
                    "confidence": float(conf[part].mean()),
                    "precision": float(correct[part].mean()),
                }
            )
    return out


def quantiles(x: np.ndarray, qs=(0.1, 0.5, 0.9, 0.99)) -> dict:
    return {q: (float(np.quantile(x, q)) if len(x) else float("nan")) for q in qs}


def reliability_section(plot_dir: str | Path, solution, frames: dict, bins: int = 10) -> list[str]:
    """Report lines (tables + the picture) for the named prediction frames {name: df}."""
    truth = {str(i): set(str(t).split()) for i, t in zip(solution["id"], solution["landmarks"].fillna(""))}
    lines = [
        "## Reliability: predicted confidence against observed precision",
        "",
        "Predictions binned by confidence (equal-count bins). A calibrated confidence sits on the diagonal "
        "(precision = confidence); whatever the scale, precision should rise with confidence.",
        "",
    ]
    data = {}
    for name, df in frames.items():
        conf, correct, nonlm = outcomes(truth, df)
        rb = reliability_bins(conf, correct, bins)
        data[name] = (conf, correct, nonlm, rb)
        lines += [
            f"**{name}**",
            "",
            "| bin | predictions | confidence range | mean confidence | observed precision |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {k + 1} | {b['n']} | {b['lo']:.3g}-{b['hi']:.3g} | {b['confidence']:.3f} | {b['precision']:.3f} |"
            for k, b in enumerate(rb)
        ]
        lines.append("")
    lines += [
        "## Non-landmark confidences against correct answers",
        "",
        "Quantiles of the confidence of predictions on non-landmark test images and of correct predictions; "
        "`non-landmarks above correct median`: share of non-landmark predictions ranked above half of the "
        "correct answers.",
        "",
        "| setting | non-landmark q50 / q90 / q99 | correct q10 / q50 | non-landmarks above correct median |",
        "|---|---|---|---|",
    ]
    for name, (conf, correct, nonlm, _) in data.items():
        nq, cq = quantiles(conf[nonlm]), quantiles(conf[correct])
        above = float((conf[nonlm] > cq[0.5]).mean()) if nonlm.any() and correct.any() else float("nan")
        lines.append(
            f"| {name} | {nq[0.5]:.3g} / {nq[0.9]:.3g} / {nq[0.99]:.3g} | {cq[0.1]:.3g} / {cq[0.5]:.3g} | {above:.3f} |"
        )
    lines.append("")
    try:
        png = plot_reliability(Path(plot_dir), data)
        lines += [f"![reliability](plots/{png})", ""]
    except Exception as e:  # noqa: BLE001 - the numbers above stand without the picture
        log.warning("reliability plot failed: %s", e)
    return lines


def plot_reliability(plot_dir: Path, data: dict) -> str:
    """Reliability diagram (left) and confidence distributions by outcome (right) -> reliability.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (conf, correct, nonlm, rb) in data.items():
        if rb:
            ax.plot([b["confidence"] for b in rb], [b["precision"] for b in rb], "o-", label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("mean predicted confidence (bin)")
    ax.set_ylabel("observed precision")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Reliability diagram")
    pos = 0
    ticks, names = [], []
    for name, (conf, correct, nonlm, _) in data.items():
        groups = [(conf[correct], "tab:green"), (conf[~correct & ~nonlm], "tab:orange"), (conf[nonlm], "tab:red")]
        for k, (vals, color) in enumerate(groups):
            if len(vals):
                bp = bx.boxplot([vals], positions=[pos + k], widths=0.6, patch_artist=True, showfliers=False)
                bp["boxes"][0].set_facecolor(color)
        ticks.append(pos + 1)
        names.append(name)
        pos += 4
    bx.set_xticks(ticks, names, fontsize=8)
    bx.set_yscale("symlog", linthresh=0.01)
    bx.set_ylabel("confidence")
    bx.set_title("correct (green), wrong label (orange), non-landmark (red)")
    path = plot_dir / "reliability.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name
