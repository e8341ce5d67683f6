"""Visual diagnostics: what the pipeline saw for one test image, and plots of a dataset.

``show_case`` draws one PNG for a test image: the image itself, its keypoints coloured by
attention score, and its top global-kNN candidates (similarity, label, correct/wrong against
solution.csv when present).  For candidates within ``verify.num_to_rerank`` the local matches are
recomputed with verify.py's matchers and the RANSAC inliers drawn as lines between the two images,
so a reader sees *why* a candidate was (not) confirmed.

``show_hard_failures`` draws the worst cases of one split of the hard protocol (``landmarks
show --hard-split "P1 K=1 seed=4"``): per case the test photo and its first global neighbours,
named by landmark, with similarity, inliers when verified, and correct / wrong marks, from the
probe ``validate-hard`` stored (the scorer of ``evaluation.hard``, not a copy).

The other helpers feed the notebooks (notebooks/*.ipynb stay thin): a per-test-image prediction
table, picking a good / failed example, class-size and image-size plots, sample galleries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from landmarks import local_features, verify, whiten
from landmarks.datasets import data
from landmarks.datasets.data import image_path, load_solution, load_split
from landmarks.datasets.images import ImageError, image_size, load_image
from landmarks.evaluation import hard, metrics
from landmarks.predict import NO_LABEL, label_votes, load_inputs, predict_arrays, vote
from landmarks.stages import DEFAULT_MODEL
from landmarks.store import FeatureStore, LocalFeatures, load_npz
from landmarks.utils import LandmarksError, atomic_path
from landmarks.utils.layout import WorkLayout
from landmarks.verify import verify_fingerprint

log = logging.getLogger(__name__)

PANEL_HEIGHT = 360  # display height (px) of each image in a candidate pair
MAX_LINES = 80  # inlier lines drawn per pair (a random, seeded subset beyond that)
OK_COLOR, BAD_COLOR, NEUTRAL_COLOR = "#1a7f37", "#c62828", "#222222"


@dataclass
class Candidate:
    """One kNN candidate of the test image, with its verification when within num_to_rerank."""

    rank: int
    train_id: str
    label: int
    sim: float
    correct: bool | None  # None: no ground truth
    verified: bool = False  # within num_to_rerank (inliers computed)
    inliers: int = 0
    src: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # inlier xy, test image
    dst: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # inlier xy, candidate
    n_matches: int = 0


@dataclass
class LabelVote:
    """One label's share of the vote for the test image (``predict.label_votes``)."""

    label: int
    total: float  # what the voting compares: the sum of the label's best top_k neighbour scores
    neighbours: int  # voting neighbours with this label
    best_rank: int
    best_sim: float
    best_inliers: int | None  # None: not verified (beyond num_to_rerank, or global only)
    correct: bool | None


@dataclass
class Case:
    """Everything drawn for one test image (coordinates in original-image pixels)."""

    test_id: str
    test_path: Path
    truth: str | None  # None: no solution.csv; '' : non-landmark
    prediction: int | None
    confidence: float
    candidates: list[Candidate]
    keypoints: np.ndarray
    scores: np.ndarray
    notes: list[str] = field(default_factory=list)
    train_paths: dict = field(default_factory=dict)
    votes: list[LabelVote] = field(default_factory=list)  # largest total first
    vote_rule: str = ""  # how the votes were counted, for the panel's title


# -- geometry ------------------------------------------------------------------------------------
def inlier_matches(vcfg, query, cand) -> tuple[np.ndarray, np.ndarray, int]:
    """verify.py's match + RANSAC for one pair: (query xy, cand xy) of the inliers and the match count."""

    empty = np.zeros((0, 2), np.float32)
    if query is None or cand is None or len(query) == 0 or len(cand) == 0:
        return empty, empty, 0
    # a feature-map matcher (nbb) is drawn with the mutual matches of the local features
    (m,) = verify.MATCHERS.get(vcfg.matcher, verify.MATCHERS["mutual"])(vcfg, query.descriptors, [cand.descriptors])
    m, mask = verify.ransac_inliers(vcfg, query.keypoints, cand.keypoints, m)
    inl = m[mask]
    return query.keypoints[inl[:, 0]].astype(np.float32), cand.keypoints[inl[:, 1]].astype(np.float32), len(m)


# -- loading -------------------------------------------------------------------------------------
def _truth_map(data_dir) -> dict[str, str] | None:
    """solution.csv as {test id: truth ('' for a non-landmark)}, None without solution.csv."""

    sol = load_solution(data_dir)
    if sol is None:
        return None
    return {str(i): str(t) for i, t in zip(sol["id"], sol["landmarks"].fillna(""))}


def _is_correct(label, truth: str | None) -> bool | None:
    """Whether `label` is among the truth's ids; None without ground truth."""
    if truth is None:
        return None
    return str(int(label)) in truth.split()


def _load_verified(cfg, work, knn: dict) -> np.ndarray | None:
    """The verify stage's inliers when they belong to this knn output and config, else None."""

    path = work.verified(cfg)
    if not cfg.verify.enabled or not path.exists():
        return None
    ver = load_npz(path)
    if str(ver.get("fingerprint")) != verify_fingerprint(cfg, str(knn["fingerprint"])):
        return None
    return ver["inliers"]


def _stage_inputs(cfg, data_dir, work_dir, verified: bool | None = None) -> tuple[dict, object, dict | None]:
    """(predict.load_inputs of the knn and verify outputs, the WORK_DIR layout, the global whitening)."""

    work = WorkLayout(work_dir)
    use_verified = cfg.verify.enabled if verified is None else verified
    inputs = load_inputs(cfg, data_dir, work.knn(cfg), work.verified(cfg) if use_verified else None)
    return inputs, work, whiten.load_whiten(cfg, work.whiten(cfg), work.features("train"), "global")


def _unknown_id_error(data_dir, work, test_id: str) -> LandmarksError:
    """The error for a test id absent from the knn output: unknown id, failed extraction or no features yet."""

    test = load_split(data_dir, "test")
    if test_id not in set(test["id"].astype(str)):
        return LandmarksError(f"unknown test id {test_id!r}: not in {Path(data_dir) / 'sample_submission.csv'}")
    reason = FeatureStore(work.features("test")).failures().get(test_id)
    why = f" (extraction failed: {reason})" if reason else " (run `make predict` first)"
    return LandmarksError(f"test image {test_id} has no features in {work.features('test')}{why}")


def load_case(cfg, data_dir, work_dir, model_dir, test_id: str, top: int = 5) -> Case:
    """Gather the kNN candidates, verification and keypoints of one test image."""

    data_dir, work = Path(data_dir), WorkLayout(work_dir)
    test_id = str(test_id).strip()
    if not work.knn(cfg).exists():
        raise LandmarksError(f"{work.knn(cfg)} not found: run `make predict` (or `landmarks knn`) first")
    knn = load_npz(work.knn(cfg))
    test_ids = [str(i) for i in knn["test_ids"]]
    if test_id not in test_ids:
        raise _unknown_id_error(data_dir, work, test_id)
    r = test_ids.index(test_id)
    train_ids, labels, path_of = _train_rows(data_dir, work.root, knn)
    truth_map = _truth_map(data_dir)
    truth = None if truth_map is None else truth_map.get(test_id, "")
    inliers = _load_verified(cfg, work, knn)
    notes = []
    if cfg.verify.enabled and inliers is None:
        notes.append(f"{work.verified(cfg).name} missing or stale: inliers recomputed for the drawn pairs only")
    row_inl = None if inliers is None else inliers[r : r + 1]
    lab, conf = vote(cfg.vote, knn["sims"][r : r + 1], knn["idx"][r : r + 1], labels, row_inl)
    votes = _votes(cfg.vote, knn["sims"][r], knn["idx"][r], labels, None if row_inl is None else row_inl[0], truth)
    if cfg.vote.suppression != "none":
        notes.append(f"confidence before {cfg.vote.suppression} suppression")

    cands = _candidates(cfg, knn["sims"][r], knn["idx"][r], train_ids, labels, truth, top)
    q, t_local = _local_features(cfg, data_dir, work, model_dir, test_id, [c.train_id for c in cands if c.verified])
    q_match, t_match = _whitened(cfg, work, q, t_local)
    for c in cands:
        if not c.verified:
            continue
        src, dst, n = inlier_matches(cfg.verify, q_match, t_match.get(c.train_id))
        c.src, c.dst, c.n_matches, c.inliers = src, dst, n, len(src)
        if c.train_id not in t_match:
            notes.append(f"candidate {c.train_id} has no local features")
    if q is None:
        notes.append("test image has no local features")
    return Case(
        test_id=test_id,
        test_path=data.image_path(data_dir, "test", test_id),
        truth=truth,
        prediction=None if lab[0] == NO_LABEL else int(lab[0]),
        confidence=float(conf[0]),
        candidates=cands,
        keypoints=np.zeros((0, 2), np.float32) if q is None else q.keypoints,
        scores=np.zeros((0,), np.float32) if q is None else q.scores,
        notes=notes,
        train_paths={c.train_id: Path(path_of[c.train_id]) for c in cands},
        votes=votes,
        vote_rule=(
            f"{cfg.vote.method}: best {max(1, int(cfg.vote.top_k))} of each label's neighbours, "
            f"{min(int(cfg.vote.neighbours), knn['sims'].shape[1])} voting"
            + (", inliers counted" if row_inl is not None else ", global only")
        ),
    )


def _votes(vcfg, sims, idx, labels, inliers, truth: str | None) -> list[LabelVote]:
    """The per-label vote of one test row, largest total first (``predict.label_votes``)."""

    out = []
    for lab, (total, ranked) in label_votes(vcfg, sims, idx, labels, inliers).items():
        rank = ranked[0][0]
        inl = None if inliers is None or rank > len(inliers) else int(inliers[rank - 1])
        out.append(LabelVote(lab, total, len(ranked), rank, float(sims[rank - 1]), inl, _is_correct(lab, truth)))
    return sorted(out, key=lambda v: (-v.total, v.label))


def _train_rows(data_dir: Path, work_dir: Path, knn: dict) -> tuple[list[str], np.ndarray, dict]:
    """The kNN database's train ids, their labels and id -> image path; an error when WORK_DIR's
    features hold ids absent from DATA_DIR/train.csv (another dataset)."""

    train = data.load_split(data_dir, "train")
    label_of = dict(zip(train["id"].astype(str), train["landmark_id"].astype(np.int64)))
    path_of = dict(zip(train["id"].astype(str), train["path"]))
    train_ids = [str(i) for i in knn["train_ids"]]
    missing = [i for i in train_ids if i not in label_of]
    if missing:
        raise LandmarksError(
            f"{len(missing)} train feature ids are not in {data_dir}/train.csv "
            f"(e.g. {missing[0]}): {work_dir} belongs to another dataset"
        )
    return train_ids, np.array([label_of[i] for i in train_ids], np.int64), path_of


def _candidates(
    cfg, sims: np.ndarray, idx: np.ndarray, train_ids: list[str], labels: np.ndarray, truth: str | None, top: int
) -> list[Candidate]:
    """The first `top` kNN candidates of one test row; those within verify.num_to_rerank are
    marked for verification."""
    R = min(int(cfg.verify.num_to_rerank), len(idx)) if cfg.verify.enabled else 0
    cands = []
    for j in range(min(int(top), len(idx))):
        if idx[j] < 0:
            continue
        tid = train_ids[int(idx[j])]
        cands.append(
            Candidate(
                j + 1, tid, int(labels[idx[j]]), float(sims[j]), _is_correct(labels[idx[j]], truth), verified=j < R
            )
        )
    return cands


def _local_features(cfg, data_dir: Path, work, model_dir, test_id: str, train_ids: list[str]):
    """Local features of the test image (or None) and of the given train images (id -> features),
    extracted and cached first when missing and `model_dir` holds a model."""

    can_extract = model_dir is not None and Path(model_dir).exists()
    test_store = FeatureStore(work.features("test"))
    q = test_store.local([test_id]).get(test_id)
    test_store.close()
    if q is None and can_extract:
        q = (
            local_features.ensure_local(cfg, data_dir, work.root, model_dir, "test", [test_id])
            .local([test_id])
            .get(test_id)
        )
    train_store = FeatureStore(work.features("train"))
    t_local = train_store.local(train_ids)
    train_store.close()
    lacking = [i for i in train_ids if i not in t_local]
    if lacking and can_extract:
        st = local_features.ensure_local(cfg, data_dir, work.root, model_dir, "train", lacking)
        t_local.update(st.local(lacking))
        st.close()
    return q, t_local


def _whitened(cfg, work, q, t_local: dict):
    """The local features as verification matches them: PCA-whitened when whiten.local_pca."""
    if not cfg.whiten.local_pca or (q is None and not t_local):
        return q, t_local

    w = whiten.load_whiten(cfg, work.whiten(cfg), work.features("train"), "local")

    def pca(lf):
        return LocalFeatures(lf.keypoints, whiten.apply_local(w, lf.descriptors), lf.scales, lf.scores)

    return None if q is None else pca(q), {k: pca(v) for k, v in t_local.items()}


# -- drawing -------------------------------------------------------------------------------------
def _load_display(path: Path, height: int = PANEL_HEIGHT) -> tuple[np.ndarray, float, str | None]:
    """RGB array resized to `height` rows, the scale (display px per original px), and an error."""
    from PIL import Image

    try:
        img, s0 = load_image(path, max_image_size=2048)
    except ImageError as e:
        blank = np.full((height, height, 3), 200, np.uint8)
        return blank, 1.0, getattr(e, "reason", str(e))
    s1 = height / img.shape[0]
    w = max(1, int(round(img.shape[1] * s1)))
    img = np.asarray(Image.fromarray(img).resize((w, height), Image.BILINEAR))
    return img, s0 * s1, None


def _mark(correct: bool | None) -> tuple[str, str]:
    """Text and colour of a correct / wrong mark (nothing without ground truth)."""
    if correct is None:
        return "", NEUTRAL_COLOR
    return ("\u2713 correct", OK_COLOR) if correct else ("\u2717 wrong", BAD_COLOR)


def _draw_pair(ax, test_img, test_s, cand: Candidate, shown, gap: int = 12) -> None:
    """The test image and one candidate side by side, inlier lines between them, titled with the
    candidate's rank, label, similarity and verification."""
    timg, ts, err = shown
    h = test_img.shape[0]
    canvas = np.full((h, test_img.shape[1] + gap + timg.shape[1], 3), 255, np.uint8)
    canvas[:, : test_img.shape[1]] = test_img
    x0 = test_img.shape[1] + gap
    canvas[:, x0:] = timg
    ax.imshow(canvas)
    ax.set_xlim(0, canvas.shape[1])
    ax.set_ylim(canvas.shape[0], 0)
    if len(cand.src):
        sel = np.arange(len(cand.src))
        if len(sel) > MAX_LINES:
            sel = np.sort(np.random.default_rng(0).choice(sel, MAX_LINES, replace=False))
        p, q = cand.src[sel] * test_s, cand.dst[sel] * ts
        for (xa, ya), (xb, yb) in zip(p, q):
            ax.plot([xa, x0 + xb], [ya, yb], "-", color="#00e676", lw=0.9, alpha=0.85)
        ax.plot(p[:, 0], p[:, 1], "o", ms=2.5, color="#ffeb3b", mec="black", mew=0.3)
        ax.plot(x0 + q[:, 0], q[:, 1], "o", ms=2.5, color="#ffeb3b", mec="black", mew=0.3)
    mark, color = _mark(cand.correct)
    if cand.verified:
        ver = f"{cand.inliers} inliers / {cand.n_matches} matches"
    else:
        ver = "not verified (beyond num_to_rerank)"
    title = f"#{cand.rank}  label {cand.label}  sim {cand.sim:.3f}  {mark}\n{ver}   train {cand.train_id}"
    if err:
        title += f"  [image: {err}]"
    ax.set_title(title, fontsize=11, color=color)
    ax.set_axis_off()


def _draw_keypoints(fig, ax, test_img: np.ndarray, test_s: float, case: Case) -> None:
    """The test image faded, its keypoints coloured by score (strongest on top), a colour bar."""
    ax.imshow((test_img * 0.45 + 140 * 0.55).astype(np.uint8))
    if len(case.keypoints):
        order = np.argsort(case.scores)  # strongest drawn last (on top)
        kp = case.keypoints[order] * test_s
        sc = ax.scatter(kp[:, 0], kp[:, 1], c=case.scores[order], cmap="inferno", s=14, alpha=0.9, linewidths=0)
        cax = ax.inset_axes([0.1, -0.06, 0.8, 0.035])
        cb = fig.colorbar(sc, cax=cax, orientation="horizontal")
        cb.ax.tick_params(labelsize=8, length=2)
        cb.set_label("keypoint score (the model's; higher = kept first)", fontsize=9)
        ax.set_xlim(0, test_img.shape[1])
        ax.set_ylim(test_img.shape[0], 0)
    ax.set_title(f"keypoint scores ({len(case.keypoints)} local features)", fontsize=11)
    ax.set_axis_off()


def _headline(case: Case) -> tuple[str, str]:
    """The figure title (test id, prediction with confidence and mark, truth) and its colour."""
    if case.truth is None:
        truth = "no solution.csv"
    else:
        truth = f"truth {case.truth}" if case.truth else "truth: non-landmark"
    if case.prediction is None:
        pred, color = "no prediction", NEUTRAL_COLOR
    else:
        mark, color = _mark(_is_correct(case.prediction, case.truth))
        pred = f"prediction {case.prediction} (confidence {case.confidence:.3f}) {mark}"
    return f"test {case.test_id}: {pred}; {truth}", color


def _draw_votes(ax, case: Case, top: int = 6) -> None:
    """Horizontal bars: each label's vote total (the prediction is the longest), coloured by
    correctness, with its neighbour count and its best neighbour's similarity and inliers."""
    votes = case.votes[:top]
    if not votes:
        ax.text(0.5, 0.5, "no votes (no neighbours)", ha="center", va="center")
        ax.set_axis_off()
        return
    y = np.arange(len(votes))[::-1]
    colors = [_mark(v.correct)[1] if v.correct is not None else "#5b6b7a" for v in votes]
    ax.barh(y, [v.total for v in votes], color=colors, height=0.65)
    right = max(v.total for v in votes)
    for yy, v in zip(y, votes):
        inl = "not verified" if v.best_inliers is None else f"{v.best_inliers} inliers"
        n = f"{v.neighbours} neighbour{'s' if v.neighbours != 1 else ''}"
        ax.text(
            v.total + 0.02 * right,
            yy,
            f"{v.total:.3f}  ({n}; best #{v.best_rank}: sim {v.best_sim:.3f}, {inl})",
            va="center",
            fontsize=9,
        )
    ax.set_yticks(
        y, [f"label {v.label}" + (f" {_mark(v.correct)[0][0]}" if v.correct is not None else "") for v in votes]
    )
    for tick, color in zip(ax.get_yticklabels(), colors):
        tick.set_color(color)
    ax.set_xlim(0, right * 2.1)
    ax.set_xlabel("vote total (the largest is the prediction)", fontsize=9)
    ax.tick_params(labelsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    more = f"; {len(case.votes) - len(votes)} more labels" if len(case.votes) > len(votes) else ""
    ax.set_title(f"votes per label ({case.vote_rule}{more})", fontsize=10)


def render_case(case: Case, out: str | Path, dpi: int = 90, colors: int = 0) -> Path:
    """Draw a Case into one PNG (written atomically) and return its path.

    Row 0: the test image, its keypoint scores and the per-label votes; then the candidate pairs,
    two per row.  Each row is as tall as its tallest image, so rows follow each other without gaps.
    `colors` > 0 quantizes the PNG to that many colours (a several times smaller file, for docs)."""
    test_img, test_s, err = _load_display(case.test_path)
    shown = {c.train_id: _load_display(case.train_paths[c.train_id]) for c in case.candidates}
    width, pad, title_h, head_h, max_h = 15.0, 0.15, 0.5, 0.4, 5.0
    cbar_h = 0.6 if len(case.keypoints) else 0.1  # room for the keypoint colour bar and its label
    half = (width - pad) / 2
    quarter = (half - pad) / 2

    def shown_h(w_in: float, img_w: int, img_h: int) -> float:
        return min(w_in * img_h / max(img_w, 1), max_h)

    pair_w = {c.train_id: test_img.shape[1] + 12 + shown[c.train_id][0].shape[1] for c in case.candidates}
    row0_h = min(max(shown_h(quarter, test_img.shape[1], test_img.shape[0]), 2.5), max_h)
    pair_rows = [case.candidates[i : i + 2] for i in range(0, len(case.candidates), 2)]
    rows_h = [max(shown_h(half, pair_w[c.train_id], test_img.shape[0]) for c in row) for row in pair_rows]
    height = head_h + row0_h + title_h + cbar_h + sum(h + title_h for h in rows_h) + (0.3 if case.notes else 0.05)
    fig = _figure(figsize=(width, height))

    def add(x: float, top: float, w: float, h: float):  # inches from the top-left corner
        ax = fig.add_axes((x / width, 1 - (top + h) / height, w / width, h / height))
        ax.set_anchor("N")  # images hang from the row's top: titles in line, no gap above a short one
        return ax

    top = head_h + title_h
    ax = add(0, top, quarter, row0_h)
    ax.imshow(test_img)
    ax.set_title("test image" + (f" [{err}]" if err else ""), fontsize=11)
    ax.set_axis_off()
    _draw_keypoints(fig, add(quarter + pad, top, quarter, row0_h), test_img, test_s, case)
    _draw_votes(add(half + pad + 1.1, top + 0.1, half - 1.2, row0_h - 0.5), case)
    top += row0_h + cbar_h
    for row, h in zip(pair_rows, rows_h):
        top += title_h
        x0 = 0.0 if len(row) == 2 else (width - half) / 2  # a lone last pair is centred
        for k, cand in enumerate(row):
            _draw_pair(add(x0 + k * (half + pad), top, half, h), test_img, test_s, cand, shown[cand.train_id])
        top += h
    title, color = _headline(case)
    fig.suptitle(title, fontsize=14, color=color, y=1 - 0.1 / height)
    if case.notes:
        fig.text(0.5, 0.002, "; ".join(dict.fromkeys(case.notes)), ha="center", fontsize=8, color="#555555")
    return save_png(fig, out, dpi, colors)


def save_png(fig, out, dpi: int, colors: int) -> Path:
    """Write `fig` to `out` atomically; `colors` > 0 quantises it to that many colours (small docs PNGs)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        if colors > 0:
            from PIL import Image

            with Image.open(tmp) as im:
                small = im.convert("RGB").quantize(colors=int(colors), method=Image.Quantize.MEDIANCUT)
            small.save(tmp, format="PNG", optimize=True)
    return out


def show_case(
    cfg,
    data_dir,
    work_dir,
    model_dir,
    test_id: str,
    out: str | Path | None = None,
    top: int = 5,
    dpi: int = 90,
    colors: int = 0,
) -> Path:
    """One PNG for `test_id` (default WORK_DIR/show/<id>.png); returns its path."""
    case = load_case(cfg, data_dir, work_dir, model_dir, test_id, top=top)
    out = Path(out) if out else WorkLayout(work_dir).tool("show") / f"{case.test_id}.png"
    path = render_case(case, out, dpi=dpi, colors=colors)
    log.info("show: %s -> %s", case.test_id, path)
    return path


# -- hard protocol: worst cases of a split --------------------------------------------------------
@dataclass
class HardCase:
    """One failure of a hard split: the test photo, what it is, the prediction and its neighbours."""

    kind: str  # "wrong landmark" | "held-out landmark" | "non-landmark"
    test_id: str
    test_file: Path
    truth_name: str  # the photo's landmark (pool class) or product name
    prediction: str  # predicted landmark name
    confidence: float
    neighbours: list[tuple[str, Path, str, float, int | None, bool]]  # id, file, name, sim, inliers, correct
    right: tuple[Path, int, float] | None = None  # the right landmark's best train photo: file, rank (0: beyond), sim


def worst_cases(queries: dict, role_of: dict, n: int) -> list[tuple[int, str]]:
    """(row, kind) of the `n` worst failures of a split's per-query results: wrong labels on
    landmark queries by falling confidence first (the answers GAP punishes most), then the most
    confident predictions on photos without a train landmark (held-out landmarks, products)."""
    truth, label, conf = queries["truth"], queries["label"], queries["conf"]
    pred = label != NO_LABEL
    wrong = [i for i in range(len(truth)) if truth[i] != "" and (not pred[i] or str(label[i]) != truth[i])]
    empty = [i for i in range(len(truth)) if truth[i] == "" and pred[i]]
    out = [(i, "wrong landmark") for i in sorted(wrong, key=lambda i: -conf[i])]
    for i in sorted(empty, key=lambda i: -conf[i]):
        kind = (
            "non-landmark" if role_of.get(queries["ids"][i]) in ("distractor", "nonlandmark") else "held-out landmark"
        )
        out.append((i, kind))
    return out[: max(0, int(n))]


def hard_cases(cfg, work_dir, model_dir, split_name: str, worst: int = 4, top: int = 5, variant: str | None = None):
    """The `worst` failures of a hard split under the config (or one of hard.VARIANTS), with their
    first `top` global neighbours; the probe is validate-hard's (WORK_DIR/hard/probe, extracted
    where missing).  Returns (split name, setting name, cases)."""
    name, c = hard.variant_configs(cfg, [variant])[-1] if variant else (hard.DEFAULT_ROW, cfg)
    st = hard.setup(c, [(name, c)], model_dir, Path(work_dir) / "hard")
    split = st.split(split_name)
    res = st.scorer.score(c, split)
    st.scorer.save_pairs(st.pair_cache)
    q = res["queries"]
    cls = dict(zip(st.pool["id"], st.pool["cls"].astype(str)))
    file_of = dict(zip(st.pool["id"], st.pool["file"]))
    role_of = dict(zip(st.pool["id"], st.pool["role"]))
    name_of = {int(lab): cls[t] for t, lab in zip(split.train_ids, split.train_labels)}
    cases = []
    for i, kind in worst_cases(q, role_of, worst):
        tid = q["ids"][i]
        nbrs = []
        for r in range(min(int(top), q["idx"].shape[1])):
            j = int(q["idx"][i, r])
            if j < 0:
                continue
            nid = split.train_ids[j]
            inl = None if q["inliers"] is None else int(q["inliers"][i, r])
            ok = q["truth"][i] != "" and str(int(split.train_labels[j])) == q["truth"][i]
            nbrs.append((nid, Path(file_of[nid]), cls[nid], float(q["sims"][i, r]), inl, bool(ok)))
        pred = "none" if q["label"][i] == NO_LABEL else name_of.get(int(q["label"][i]), str(q["label"][i]))
        right = None
        if q["truth"][i] != "":  # what it should have found: the right landmark's nearest train photo
            j = int(q["right_idx"][i])
            if j < 0:  # beyond the shortlist: any train photo of the landmark
                j = int(np.flatnonzero(split.train_labels.astype(str) == q["truth"][i])[0])
            right = (Path(file_of[split.train_ids[j]]), int(q["right_rank"][i]), float(q["right_sim"][i]))
        cases.append(HardCase(kind, tid, Path(file_of[tid]), cls[tid], pred, float(q["conf"][i]), nbrs, right))
    return split.name, name, cases


def render_hard_cases(split_name: str, setting: str, cases: list[HardCase], out, dpi: int = 80, colors: int = 0):
    """One row per failure: the test photo (its landmark, the prediction and confidence) and its
    global neighbours (landmark, similarity, inliers), green where the neighbour is the right
    landmark, red where not.  Written atomically; returns the path."""
    thumb = 200
    cols = 2 + max((len(c.neighbours) for c in cases), default=0)  # test, neighbours, the right photo
    fig = _figure(figsize=(2.9 * cols, 3.05 * max(1, len(cases)) + 0.5))
    if not cases:
        ax = fig.subplots()
        ax.text(0.5, 0.5, f"{split_name}: no failures", ha="center", va="center")
        ax.set_axis_off()
    else:
        axes = fig.subplots(len(cases), cols, squeeze=False)
        for r, case in enumerate(cases):
            img, _, err = _load_display(case.test_file, height=thumb)
            ax = axes[r, 0]
            ax.imshow(img)
            head = {"wrong landmark": "truth", "held-out landmark": "held out", "non-landmark": "product"}[case.kind]
            ax.set_title(
                f"TEST ({case.kind})\n{head}: {case.truth_name}\n"
                f"pred {case.prediction} ({case.confidence:.3g}) \u2717" + (f"\n[{err}]" if err else ""),
                fontsize=9,
                color=BAD_COLOR,
                fontweight="bold",
            )
            for k in range(1, cols):
                ax = axes[r, k]
                ax.set_axis_off()
                if k == cols - 1 and case.right is not None:
                    path, rank, sim = case.right
                    img, _, err = _load_display(path, height=thumb)
                    ax.imshow(img)
                    where = f"#{rank}, sim {sim:.3f}" if rank else "not in the shortlist"
                    ax.set_title(f"RIGHT: {case.truth_name}\nits nearest photo: {where}", fontsize=9, color=OK_COLOR)
                    continue
                if k > len(case.neighbours):
                    continue
                nid, path, nm, sim, inl, ok = case.neighbours[k - 1]
                img, _, err = _load_display(path, height=thumb)
                ax.imshow(img)
                mark = "\u2713" if ok else "\u2717"
                ver = "" if inl is None else f", {inl} inl"
                ax.set_title(
                    f"#{k} {nm} {mark}\nsim {sim:.3f}{ver}" + (f"\n[{err}]" if err else ""),
                    fontsize=9,
                    color=OK_COLOR if ok else BAD_COLOR,
                )
            axes[r, 0].set_axis_off()
    fig.suptitle(f"hard split {split_name!r}, {setting}: the {len(cases)} worst cases", fontsize=12)
    fig.tight_layout()
    return save_png(fig, out, dpi, colors)


def show_hard_failures(
    cfg,
    work_dir,
    model_dir,
    split_name: str,
    out=None,
    worst: int = 4,
    top: int = 5,
    variant: str | None = None,
    dpi: int = 80,
    colors: int = 0,
) -> Path:
    """PNG of the worst cases of a hard split (default WORK_DIR/hard/show/<split>.png)."""
    name, setting, cases = hard_cases(cfg, work_dir, model_dir, split_name, worst, top, variant)
    slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
    out = Path(out) if out else Path(work_dir) / "hard" / "show" / f"{slug}.png"
    path = render_hard_cases(name, setting, cases, out, dpi=dpi, colors=colors)
    log.info("show: hard split %s (%s), %d cases -> %s", name, setting, len(cases), path)
    return path


# -- tables and picks ----------------------------------------------------------------------------
def predictions_table(cfg, data_dir, work_dir, model_dir):
    """One row per test image with features: prediction, confidence (after suppression), truth,
    correctness, top-1 candidate with its similarity and inliers.  Runs knn/verify when stale."""
    import pandas as pd

    inputs, work, whitening = _stage_inputs(cfg, data_dir, work_dir)
    labels, conf, penalty = predict_arrays(cfg, inputs, work.features_root, whitening)
    knn, inl = inputs["knn"], inputs["inliers"]
    truth_map = _truth_map(data_dir)
    train_ids = [str(i) for i in knn["train_ids"]]
    rows = []
    for r, tid in enumerate(inputs["test_ids"]):
        truth = None if truth_map is None else truth_map.get(tid, "")
        has = labels[r] != NO_LABEL
        j = int(knn["idx"][r, 0]) if knn["idx"].shape[1] else -1
        rows.append(
            {
                "id": tid,
                "label": int(labels[r]) if has else None,
                "confidence": float(conf[r]) if has else np.nan,
                "penalty": float(penalty[r]),
                "truth": truth,
                "is_landmark": None if truth is None else bool(truth),
                "correct": None if truth is None else bool(has and str(int(labels[r])) in truth.split()),
                "top1_train_id": train_ids[j] if j >= 0 else None,
                "top1_label": int(inputs["train_labels"][j]) if j >= 0 else None,
                "top1_sim": float(knn["sims"][r, 0]) if j >= 0 else np.nan,
                "top1_inliers": int(inl[r, 0]) if inl is not None and inl.shape[1] else None,
            }
        )
    df = pd.DataFrame(rows)
    return df.sort_values("confidence", ascending=False, kind="mergesort").reset_index(drop=True)


def compare_verification(cfg, data_dir, work_dir, model_dir):
    """GAP, accuracy and counts of global-only vs global + verification voting (same knn, same
    config otherwise).  Needs solution.csv."""
    import pandas as pd

    solution = load_solution(data_dir)
    if solution is None:
        raise LandmarksError(f"{Path(data_dir) / 'solution.csv'} not found: GAP needs ground truth")
    inputs, work, whitening = _stage_inputs(cfg, data_dir, work_dir, verified=True)
    rows = []
    for name, inl in (("global only", None), ("global + verification", inputs["inliers"])):
        labels, conf, _ = predict_arrays(cfg, inputs, work.features_root, whitening, inliers=inl)
        keep = set(solution["id"].astype(str))
        pred = pd.DataFrame(
            [
                (i, str(int(lab)), float(c))
                for i, lab, c in zip(inputs["test_ids"], labels, conf)
                if lab != NO_LABEL and i in keep
            ],
            columns=["id", "label", "confidence"],
        )
        s = metrics.score(solution, pred)
        rows.append(
            {
                "setting": name,
                "GAP": s["gap"],
                "accuracy": s["accuracy"],
                "predicted": s["n_predicted"],
                "correct": s["n_correct"],
                "confident wrong non-landmarks": s["confident_wrong_nonlandmark"],
            }
        )
    return pd.DataFrame(rows).set_index("setting")


def pick_cases(table) -> dict[str, str | None]:
    """Test ids of a 'good' case (most confident correct prediction) and a 'failed' one (most
    confident wrong prediction on a landmark image, else on a non-landmark)."""
    t = table.dropna(subset=["confidence"])
    if t["correct"].isna().all():
        return {"good": t["id"].iloc[0] if len(t) else None, "failed": None}
    good = t[t["correct"] == True]  # noqa: E712 (object column)
    wrong = t[t["correct"] == False]  # noqa: E712
    wrong_lm = wrong[wrong["is_landmark"] == True]  # noqa: E712
    failed = wrong_lm if len(wrong_lm) else wrong
    return {"good": good["id"].iloc[0] if len(good) else None, "failed": failed["id"].iloc[0] if len(failed) else None}


def pick_docs_example(cfg, data_dir, work_dir, model_dir) -> str:
    """A demo-friendly test id: correct top-1 confirmed by many inliers, ideally with a wrong
    candidate in the top 5 for contrast; falls back to the most confident prediction."""
    t = predictions_table(cfg, data_dir, work_dir, model_dir).dropna(subset=["confidence"])
    if not len(t):
        raise LandmarksError("show --docs: no test image has a prediction")
    if t["correct"].notna().any():
        ok = t[(t["correct"] == True) & (t["top1_label"] == t["label"])]  # noqa: E712
        if len(ok):
            t = ok
    key = t["top1_inliers"].fillna(0).astype(float) + t["top1_sim"].fillna(0)
    t = t.assign(_key=key).sort_values(["_key", "id"], ascending=[False, True], kind="mergesort")
    return str(t["id"].iloc[0])


# -- dataset plots (notebook 01) -----------------------------------------------------------------
def _figure(**kw):
    """A matplotlib Figure outside pyplot: no global state, no backend switch (notebooks display
    it once as a cell result; scripts call savefig)."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_class_sizes(data_dir):
    """Images per landmark class, sorted (log scale): the long tail of GLDv2-like data."""

    counts = load_split(data_dir, "train")["landmark_id"].value_counts().to_numpy()
    fig = _figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 2)
    axes[0].plot(np.arange(1, len(counts) + 1), counts, "-", color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (axes[0].xaxis, axes[0].yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    axes[0].set_xlabel("class rank")
    axes[0].set_ylabel("train images")
    axes[0].set_title(f"class sizes ({len(counts)} classes, {counts.sum()} images)")
    axes[1].hist(counts, bins=min(40, max(5, len(np.unique(counts)))), color="tab:blue")
    axes[1].set_xlabel("train images per class")
    axes[1].set_ylabel("classes")
    axes[1].set_title(f"median {np.median(counts):.0f}, max {counts.max()}, min {counts.min()}")
    fig.tight_layout()
    return fig


def plot_class_samples(data_dir, classes: int = 4, per_class: int = 5, seed: int = 0):
    """A few train images of a few random classes (one row per class)."""

    train = load_split(data_dir, "train")
    rng = np.random.default_rng(seed)
    labs = train["landmark_id"].unique()
    labs = rng.choice(labs, size=min(classes, len(labs)), replace=False)
    fig = _figure(figsize=(2.4 * per_class, 2.4 * len(labs)))
    axes = fig.subplots(len(labs), per_class, squeeze=False)
    for r, lab in enumerate(labs):
        rows = train[train["landmark_id"] == lab]
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(rows):
                img, _, err = _load_display(Path(rows["path"].iloc[c]), height=200)
                ax.imshow(img)
                ax.set_title(f"class {lab}" if c == 0 else (err or ""), fontsize=9)
    fig.tight_layout()
    return fig


def image_sizes(data_dir, split: str = "train", max_images: int = 500, seed: int = 0):
    """(width, height) of up to max_images images of a split, read from headers only."""
    import pandas as pd

    df = load_split(data_dir, split)
    if len(df) > max_images:
        df = df.sample(max_images, random_state=seed)
    rows = []
    for i, p in zip(df["id"], df["path"]):
        try:
            w, h = image_size(p)
        except Exception as e:  # noqa: BLE001 - report, don't stop the notebook
            rows.append((i, np.nan, np.nan, type(e).__name__))
            continue
        rows.append((i, w, h, ""))
    return pd.DataFrame(rows, columns=["id", "width", "height", "error"])


def plot_image_sizes(data_dir, max_images: int = 500):
    """Scatter of image widths vs heights for train and test."""
    fig = _figure(figsize=(5, 4))
    ax = fig.subplots()
    for split, color, marker in (("train", "tab:blue", "o"), ("test", "tab:orange", "s")):
        s = image_sizes(data_dir, split, max_images).dropna(subset=["width"])
        g = s.groupby(["width", "height"]).size().reset_index(name="n")  # identical sizes: one bigger marker
        ax.scatter(
            g["width"],
            g["height"],
            s=12 + 300 * g["n"] / max(1, g["n"].max()),
            alpha=0.5,
            color=color,
            marker=marker,
            label=f"{split} ({len(s)} images, {len(g)} sizes)",
        )
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("image sizes (marker area ~ number of images)")
    ax.legend()
    fig.tight_layout()
    return fig


def split_summary(data_dir):
    """Counts of the holdout split: train/test images, landmark vs non-landmark test images,
    test classes absent from train."""
    import pandas as pd

    train = load_split(data_dir, "train")
    test = load_split(data_dir, "test")
    truth = _truth_map(data_dir)
    rows = {"train images": len(train), "train classes": train["landmark_id"].nunique(), "test images": len(test)}
    if truth is not None:
        lab = [t for t in truth.values() if t]
        known = set(train["landmark_id"].astype(str))
        rows.update(
            {
                "test landmark images": len(lab),
                "test non-landmark images": sum(1 for t in truth.values() if not t),
                "test classes": len(set(lab)),
                "test landmark images of classes absent from train": sum(1 for t in lab if not set(t.split()) & known),
            }
        )
    return pd.Series(rows, name=str(data_dir)).to_frame("count")


def plot_test_gallery(data_dir, table, title: str, n: int = 6):
    """Test images (top row) with their top-1 train candidate (bottom row) for the first n rows of a
    predictions_table slice."""

    t = table.head(n)
    if not len(t):
        fig = _figure(figsize=(4, 1))
        ax = fig.subplots()
        ax.text(0.5, 0.5, f"{title}: none", ha="center", va="center")
        ax.set_axis_off()
        return fig
    fig = _figure(figsize=(2.6 * len(t), 5.6))
    axes = fig.subplots(2, len(t), squeeze=False)
    for c, (_, row) in enumerate(t.iterrows()):
        img, _, _ = _load_display(image_path(data_dir, "test", row["id"]), height=200)
        axes[0, c].imshow(img)
        truth = row["truth"] if row["truth"] else "none"
        axes[0, c].set_title(
            f"{row['id'][:8]}\npred {row['label']} ({row['confidence']:.2f})\ntruth {truth}",
            fontsize=8,
            color=BAD_COLOR if row["correct"] is False else NEUTRAL_COLOR,
        )
        if row["top1_train_id"]:
            img, _, _ = _load_display(image_path(data_dir, "train", row["top1_train_id"]), height=200)
            axes[1, c].imshow(img)
            inl = (
                ""
                if row["top1_inliers"] is None or row["top1_inliers"] != row["top1_inliers"]
                else f", {int(row['top1_inliers'])} inl"
            )
            axes[1, c].set_title(f"top-1: {row['top1_label']}\nsim {row['top1_sim']:.2f}{inl}", fontsize=8)
        for r in (0, 1):
            axes[r, c].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- CLI -----------------------------------------------------------------------------------------
def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "show",
        parents=common("data_dir", "work_dir", "model"),
        help="PNG of one test image: top kNN candidates, inlier lines, keypoint scores",
    )
    p.add_argument("test_id", nargs="?", default=None, help="test image id (from sample_submission.csv)")
    p.add_argument(
        "--out", default=None, help="PNG path (default WORK_DIR/show/<id>.png; with --docs docs/show_example.png)"
    )
    p.add_argument("--docs", action="store_true", help="pick a good demo example automatically (for the README)")
    p.add_argument("--top", type=int, default=5, help="candidates drawn (default 5)")
    p.add_argument(
        "--hard-split",
        default=None,
        metavar="NAME",
        help="draw the worst cases of this hard-protocol split instead (e.g. 'P1 K=1 seed=4', 'P2 K=2 seed=0'; "
        "probe of `validate-hard --work-dir WORK_DIR`; --model default models/default)",
    )
    p.add_argument("--variant", default=None, help="with --hard-split: score under this hard.VARIANTS setting")
    p.add_argument("--worst", type=int, default=4, help="with --hard-split: cases drawn (default 4)")
    p.add_argument("--dpi", type=int, default=None, help="PNG resolution (default 90; 70 with --docs)")
    p.add_argument(
        "--colors",
        type=int,
        default=None,
        help="quantize the PNG to this many colours, 0 = off (default 0; 128 with --docs: small file)",
    )
    p.set_defaults(func=_cli)


def _cli(args, cfg) -> int:
    if args.hard_split:
        if args.test_id or args.docs:
            raise LandmarksError("give --hard-split alone, without TEST_ID or --docs")
        if args.top < 1 or args.worst < 1:
            raise LandmarksError("--top and --worst must be >= 1")
        path = show_hard_failures(
            cfg,
            args.work_dir,
            args.model or DEFAULT_MODEL,
            args.hard_split,
            out=args.out,
            worst=args.worst,
            top=args.top,
            variant=args.variant,
            dpi=args.dpi or 80,
            colors=args.colors or 0,
        )
        print(path)
        return 0
    if args.variant:
        raise LandmarksError("--variant goes with --hard-split")
    if args.docs and args.test_id:
        raise LandmarksError("give either TEST_ID or --docs, not both")
    if not args.docs and not args.test_id:
        raise LandmarksError("give a TEST_ID (see DATA/sample_submission.csv) or --docs")
    if args.top < 1:
        raise LandmarksError(f"--top must be >= 1 (got {args.top})")
    test_id = args.test_id
    out = args.out
    dpi = args.dpi or (70 if args.docs else 90)
    colors = args.colors if args.colors is not None else (128 if args.docs else 0)
    if args.docs:
        test_id = pick_docs_example(cfg, args.data_dir, args.work_dir, args.model)
        out = out or "docs/show_example.png"
    path = show_case(
        cfg, args.data_dir, args.work_dir, args.model, test_id, out=out, top=args.top, dpi=dpi, colors=colors
    )
    print(path)
    return 0
