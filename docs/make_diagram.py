"""Draw docs/pipeline.png, the stage diagram of the README (run by `make docs`).

Boxes and arrows in matplotlib, no graph library: grey boxes are inputs, blue ones are stages
(one command and one Make target each, with the file it writes), dashed ones are off by default.
Keep it in step with the stage table of README.md.

    python docs/make_diagram.py [--out docs/pipeline.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

W, H = 2.3, 0.95  # box size (data units = inches at the figure's scale)
STAGE, DATA, TOOL = "#dbe9f6", "#ececec", "#e8f4e1"

# name: (x, y, title, file written / what it is, colour, dashed)
BOXES = {
    "model": (1.25, 4.9, "models/default", "zero-training DELG\n(make model)", DATA, False),
    "train": (1.25, 3.2, "DATA_DIR train", "train.csv + train/ images", DATA, False),
    "test": (1.25, 1.5, "DATA_DIR test", "sample_submission.csv\n+ test/ images", DATA, False),
    "adapt": (3.85, 4.9, "adapt", "WORK_DIR/adapt/model\n(local head, no labels)", STAGE, False),
    "ftrain": (3.85, 3.2, "features (train)", "features/train/shard-*.h5\nglobal descriptors", STAGE, False),
    "ftest": (3.85, 1.5, "features (test)", "features/test/shard-*.h5\nglobal + local", STAGE, False),
    "whiten": (6.45, 3.2, "whiten", "whiten-<h>.npz\n(off by default)", STAGE, True),
    "knn": (8.95, 2.35, "knn", "knn-<h>.npz\ntop-100 train ids, sims", STAGE, False),
    "local": (11.45, 2.35, "local-features", "local-cache-*.h5\nshortlisted train images", STAGE, False),
    "verify": (13.95, 2.35, "verify", "verified-<h>.npz\nRANSAC inliers of top 20", STAGE, False),
    "calibrate": (13.95, 4.1, "calibrate", "calibration-<h>.npz\n(vote.method=calibrated)", STAGE, True),
    "predict": (16.45, 2.35, "predict", "SUBMISSION\nid,landmarks (vote)", STAGE, False),
    "solution": (13.95, 0.55, "solution.csv", "DATA_DIR ground truth\n(optional)", DATA, False),
    "validate": (16.45, 0.55, "validate", "report.md + plots/\nGAP of every setting", TOOL, False),
}
# (from, to, label); the model feeds every extracting stage
ARROWS = [
    ("model", "adapt", ""),
    ("train", "adapt", "images"),
    ("adapt", "ftrain", "MODEL"),
    ("train", "ftrain", ""),
    ("test", "ftest", ""),
    ("ftrain", "whiten", ""),
    ("whiten", "knn", ""),
    ("ftrain", "knn", ""),
    ("ftest", "knn", ""),
    ("knn", "local", ""),
    ("local", "verify", ""),
    ("verify", "predict", ""),
    ("verify", "calibrate", ""),
    ("calibrate", "predict", ""),
    ("predict", "validate", ""),
    ("solution", "validate", ""),
]


def _box(ax, x, y, title, text, colour, dashed):
    ax.add_patch(
        FancyBboxPatch(
            (x - W / 2, y - H / 2),
            W,
            H,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            fc=colour,
            ec="#34495e",
            lw=1.2,
            ls="--" if dashed else "-",
        )
    )
    ax.text(x, y + H / 2 - 0.2, title, ha="center", va="center", fontsize=11, weight="bold")
    ax.text(x, y - 0.12, text, ha="center", va="center", fontsize=8, family="monospace", linespacing=1.2)


def _edge_point(a, b):
    """Where the segment from box a's centre towards box b's centre leaves box a."""
    (xa, ya), (xb, yb) = a, b
    dx, dy = xb - xa, yb - ya
    sx = (W / 2 + 0.03) / abs(dx) if dx else float("inf")
    sy = (H / 2 + 0.03) / abs(dy) if dy else float("inf")
    s = min(sx, sy)
    return xa + dx * s, ya + dy * s


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(17.8, 5.9))
    ax.set_xlim(0, 17.8)
    ax.set_ylim(-0.2, 5.7)
    ax.set_axis_off()
    for x, y, title, text, colour, dashed in BOXES.values():
        _box(ax, x, y, title, text, colour, dashed)
    for a, b, label in ARROWS:
        pa, pb = BOXES[a][:2], BOXES[b][:2]
        start, end = _edge_point(pa, pb), _edge_point(pb, pa)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#34495e"))
        if label:
            ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2, label, fontsize=8, color="#34495e")
    # the (adapted) model also runs the test features and the local features of the shortlist
    ax.plot([3.85 + W / 2 + 0.03, 11.45], [4.9, 4.9], color="#34495e", lw=1.0, ls=":")
    ax.add_patch(
        FancyArrowPatch((11.45, 4.9), (11.45, 2.35 + H / 2 + 0.03), arrowstyle="-|>", mutation_scale=12, lw=1.0, ls=":")
    )
    ax.text(5.3, 5.0, "MODEL: the adapted model (ADAPT=0: models/default) runs every extraction", fontsize=8)
    ax.text(
        0.1,
        5.55,
        "make predict runs the blue stages in order; each writes one file named after its settings and "
        "skips itself when that file is up to date.  make validate adds the green one; dashed ones are off by default.",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("pipeline.png")))
    print(draw(Path(p.parse_args().out)))


if __name__ == "__main__":
    main()
