"""Import labelled photo sets into the Kaggle layout with a holdout split (`landmarks import`).

Inputs: LABELS.csv files (id,landmark_id,path; path relative to the CSV's folder) or
folder-per-class trees; optional distractor sets (non-landmarks).  Per class a share of the
images goes to test (at least one stays in train), a share of classes is held out entirely
(their test images get empty truth, their other images are not used), distractors go to test
with empty truth.  Images are hard-linked (copy fallback) as <split>/a/b/c/<id>.jpg with ids =
sha1 of the file content; the bytes are kept as they are (readers decode by content).
Writes train.csv, sample_submission.csv, solution.csv, label_map.csv, split.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from landmarks.config import check_section
from landmarks.datasets.data import missing_report
from landmarks.utils import LandmarksError, atomic_path, building_dir, file_digest, link_file
from landmarks.utils.cache import stamp_matches

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_labels(src: str | Path, distractors: bool = False) -> pd.DataFrame:
    """One labelled source -> DataFrame(src_id, cls, file). cls is '' for distractors."""
    src = Path(src)
    if not src.exists():
        raise LandmarksError(f"import: {src} not found (give a LABELS.csv or a folder of class folders)")
    if src.is_dir():
        rows = []
        for p in sorted(src.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                rel = p.relative_to(src)
                if not distractors and len(rel.parts) < 2:
                    raise LandmarksError(
                        f"import: {p} is not inside a class folder of {src} (expected DIR/<class>/<image>)"
                    )
                rows.append((str(rel), "" if distractors else rel.parts[0], os.path.abspath(p)))
        if not rows:
            raise LandmarksError(f"import: no images ({', '.join(sorted(IMAGE_EXTS))}) under {src}")
        return pd.DataFrame(rows, columns=["src_id", "cls", "file"])
    try:
        df = pd.read_csv(src, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LandmarksError(f"import: {src}: not UTF-8 text") from None
    except pd.errors.EmptyDataError:
        raise LandmarksError(f"import: {src}: empty file (expected id,landmark_id,path)") from None
    need = ["path"] if distractors else ["path", "landmark_id"]
    for col in need:
        if col not in df.columns:
            raise LandmarksError(f"import: {src}: missing column {col!r} (expected id,landmark_id,path)")
    if len(df) == 0:
        raise LandmarksError(f"import: {src}: no rows")
    cls = (
        df["landmark_id"].str.strip()
        if "landmark_id" in df.columns and not distractors
        else pd.Series("", index=df.index)
    )
    if not distractors and (cls == "").any():
        line = int(np.flatnonzero((cls == "").to_numpy())[0]) + 2
        raise LandmarksError(f"import: {src}: line {line}: empty landmark_id (pass non-landmarks with --distractors)")
    if (df["path"].str.strip() == "").any():
        line = int(np.flatnonzero((df["path"].str.strip() == "").to_numpy())[0]) + 2
        raise LandmarksError(f"import: {src}: line {line}: empty path")
    base = src.parent
    src_id = df["id"] if "id" in df.columns else df["path"]
    return pd.DataFrame(
        {"src_id": src_id, "cls": cls, "file": [os.path.abspath(base / p) for p in df["path"].str.strip()]}
    )


def _place(src: str, dst: Path, mode: str, state: dict) -> None:
    """link_file, falling back to copies for good once hard links fail (state['copy_fallback'])."""
    if mode == "hardlink" and state.get("copy_fallback"):
        mode = "copy"
    try:
        link_file(src, dst, mode)
    except OSError as e:
        if mode != "hardlink":
            raise
        state["copy_fallback"] = True
        log.info("import: hard links impossible (%s); copying images instead", e.strerror or e)
        link_file(src, dst, "copy")


def sample_distractors(dis: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of n distractor rows (in id order)."""
    dis = dis.sort_values("id")
    pick = np.random.default_rng([int(seed), 7919]).permutation(len(dis))[:n]
    return dis.iloc[np.sort(pick)]


def cap_per_class(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most n images per class (a seeded choice per class, independent of the other classes);
    rows without a class (distractors) are kept.  n = 0: all."""
    if n <= 0:
        return rows
    keep = np.ones(len(rows), bool)
    for cls, idx in rows[rows["cls"] != ""].sort_values("id").groupby("cls").indices.items():
        if len(idx) > n:
            order = rows[rows["cls"] != ""].sort_values("id").index.to_numpy()[idx]
            drop = order[_class_order(cls, seed, len(idx))[n:]]
            keep[rows.index.get_indexer(drop)] = False
    return rows[keep]


def _class_order(cls: str, seed: int, n: int) -> np.ndarray:
    """Seeded permutation of a class's n images (its own generator: independent of the others)."""
    return np.random.default_rng([int(seed), int(hashlib.sha1(cls.encode()).hexdigest()[:8], 16)]).permutation(n)


def plan_split(lm: pd.DataFrame, ic) -> tuple[pd.DataFrame, set, list[dict], dict]:
    """Assign each landmark image (columns id, cls[, extra]) to train, test or unused.

    Deterministic for a seed: classes and ids are sorted, each class has its own generator.
    `ic.train_per_class` K > 0: a class keeps exactly K images in train (all when it has <= K),
    the rest go to test (k-shot); otherwise `ic.test_fraction` of each class goes to test and at
    least one image stays in train.  A share `ic.heldout_class_fraction` of the classes is unseen:
    k-shot sends all their images to test, the fraction mode its test share (the rest unused);
    their truth is empty.  Rows with extra=True (extra train classes) all go to train.
    Returns (rows with split and truth, held-out classes, per-class counts, class -> label id).
    """
    extra = lm["extra"].astype(bool) if "extra" in lm.columns else pd.Series(False, index=lm.index)
    classes = sorted(lm["cls"].unique())
    label_of = {c: i for i, c in enumerate(classes)}
    extra_classes = set(lm.loc[extra, "cls"])
    candidates = [c for c in classes if c not in extra_classes]
    rng = np.random.default_rng(ic.seed)
    n_held = int(round(ic.heldout_class_fraction * len(candidates)))
    n_held = min(n_held, max(0, len(classes) - 1))  # keep at least one class in train
    held = set(rng.permutation(candidates)[:n_held].tolist()) if n_held else set()
    k = int(getattr(ic, "train_per_class", 0) or 0)
    parts, class_rows = [], []
    for c in classes:
        g = lm[lm["cls"] == c].sort_values("id")
        n = len(g)
        order = _class_order(c, ic.seed, n)
        if c in extra_classes:
            n_test = 0
        elif k > 0:
            n_test = n if c in held else n - min(k, n)
        else:
            n_test = int(round(ic.test_fraction * n))
            n_test = (max(1, n_test) if ic.test_fraction > 0 else 0) if c in held else min(n_test, n - 1)
        is_test = np.zeros(n, bool)
        is_test[order[:n_test]] = True
        split = np.where(is_test, "test", "unused" if c in held else "train")
        parts.append(g.assign(split=split, truth="" if c in held else str(label_of[c])))
        class_rows.append(
            {
                "class": c,
                "landmark_id": label_of[c],
                "held_out": c in held,
                "extra_train": c in extra_classes,
                "n_train": int((split == "train").sum()),
                "n_test": int(is_test.sum()),
                "n_images": n,
            }
        )
    return pd.concat(parts, ignore_index=True), held, class_rows, label_of


def split_up_to_date(out_dir: Path, params: dict, stage: str) -> bool:
    """True when out_dir/split.json records `params` (the split is done); a LandmarksError when
    out_dir holds other files but no split.json (never overwrite a folder that is not ours)."""
    split_file = out_dir / "split.json"
    if stamp_matches(split_file, "params", params):
        log.info("%s: %s is up to date; skipping", stage, out_dir)
        return True
    if out_dir.exists() and any(out_dir.iterdir()) and not split_file.exists():
        raise LandmarksError(f"{stage}: {out_dir} is not empty and holds no split.json; choose another --out")
    return False


def import_dataset(
    cfg,
    label_csvs_or_dirs,
    out_dir,
    distractors=(),
    test_fraction=None,
    heldout_class_fraction=None,
    seed=None,
    link=None,
    extra_train=(),
    train_per_class=None,
    distractor_sample=None,
    max_per_class=None,
) -> Path:
    """Build a Kaggle-layout dataset in out_dir from labelled sets (+ distractors); returns out_dir.

    `cfg` is the Config (its `dataset_import` section gives defaults for the keyword arguments).
    `extra_train` sets only add train classes (all their images go to train; more classes to
    confuse, as in GLDv2); `train_per_class` K > 0 makes a k-shot split (see `plan_split`);
    `max_per_class` N > 0 uses a seeded choice of at most N images of each class.
    """
    ic = _import_settings(
        cfg,
        dict(
            test_fraction=test_fraction,
            heldout_class_fraction=heldout_class_fraction,
            seed=seed,
            link=link,
            train_per_class=train_per_class,
            distractor_sample=distractor_sample,
            max_per_class=max_per_class,
        ),
    )
    sources = [os.path.abspath(s) for s in label_csvs_or_dirs]
    extra_train = [os.path.abspath(s) for s in extra_train]
    distractors = [os.path.abspath(d) for d in distractors]
    if not sources:
        raise LandmarksError("import: give at least one LABELS.csv or class-folder tree")
    out_dir = Path(out_dir)
    allrows = cap_per_class(_read_sources(sources, extra_train, distractors), ic.max_per_class, ic.seed)
    params = {
        "sources": sources,
        "extra_train": extra_train,
        "distractors": [str(d) for d in distractors],
        **dataclasses.asdict(ic),
        "inputs": hashlib.sha1("\n".join(sorted(allrows["id"] + allrows["cls"])).encode()).hexdigest()[:16],
    }
    if not ic.max_per_class:
        params.pop("max_per_class")  # imports made before the option existed stay up to date
    if split_up_to_date(out_dir, params, "import"):
        return out_dir

    parts, held, class_rows, label_of = plan_split(allrows[allrows["cls"] != ""], ic)
    dis = allrows[allrows["cls"] == ""].assign(split="test", truth="")
    if ic.distractor_sample and len(dis) > ic.distractor_sample:
        dis = sample_distractors(dis, ic.distractor_sample, ic.seed)
    table = pd.concat([parts, dis], ignore_index=True)
    with building_dir(out_dir, "importing") as tmp:
        counts = _write_import(tmp, table, class_rows, label_of, held, ic.link)
        with atomic_path(tmp / "split.json") as p:
            p.write_text(
                json.dumps(
                    {"params": params, "counts": counts, "heldout_classes": sorted(held), "label_map": label_of},
                    indent=1,
                )
            )
    log.info(
        "import: %d train / %d test images (%d landmark, %d non-landmark), %d classes (%d held out), "
        "%d distractors -> %s",
        counts["train_images"],
        counts["test_images"],
        counts["test_landmark"],
        counts["test_nonlandmark"],
        counts["classes"],
        counts["heldout_classes"],
        counts["distractors"],
        out_dir,
    )
    return out_dir


def _import_settings(cfg, overrides: dict):
    """The dataset_import config section with the given (non-None) overrides, checked."""
    ic = dataclasses.replace(cfg.dataset_import)
    for k, v in overrides.items():
        if v is not None:
            setattr(ic, k, v)
    check_section("dataset_import", ic)  # the command's options, checked as the config is at load
    return ic


def _read_sources(sources: list[str], extra_train: list[str], distractors: list[str]) -> pd.DataFrame:
    """All input images (src_id, cls, file, source, extra, id = content digest), missing files and
    byte-identical copies of an earlier image left out with a warning."""
    from tqdm import tqdm

    frames = [read_labels(s).assign(source=s, extra=False) for s in sources]
    frames += [read_labels(s).assign(source=s, extra=True) for s in extra_train]
    frames += [read_labels(s, distractors=True).assign(source=s, extra=False) for s in distractors]
    allrows = pd.concat(frames, ignore_index=True)
    exists = np.fromiter((os.path.isfile(f) for f in allrows["file"]), bool, len(allrows))
    if not exists.all():
        miss = allrows.loc[~exists, "file"].tolist()
        log.warning("import: %s; they are left out", missing_report(miss))
        allrows = allrows[exists].reset_index(drop=True)
    allrows["id"] = [file_digest(f) for f in tqdm(allrows["file"], desc="hashing images", unit="img", disable=None)]
    dup = allrows["id"].duplicated()
    if dup.any():
        first = allrows.loc[dup, "file"].iloc[0]
        log.warning(
            "import: %d images are byte-identical to an earlier one and are left out (first: %s)", int(dup.sum()), first
        )
        allrows = allrows[~dup].reset_index(drop=True)
    return allrows


def _write_import(tmp: Path, table: pd.DataFrame, class_rows: list[dict], label_of: dict, held: set, link: str) -> dict:
    """Link the used images of `table` into tmp and write its CSVs; returns the split's counts."""
    from tqdm import tqdm

    used = table[table["split"] != "unused"]
    state: dict = {}
    for iid, sp, f in tqdm(
        list(zip(used["id"], used["split"], used["file"])), desc="linking images", unit="img", disable=None
    ):
        _place(f, tmp / sp / iid[0] / iid[1] / iid[2] / f"{iid}.jpg", link, state)
    train = used[used["split"] == "train"].sort_values("id")
    test = used[used["split"] == "test"].sort_values("id")
    pd.DataFrame({"id": train["id"], "landmark_id": train["cls"].map(label_of)}).to_csv(tmp / "train.csv", index=False)
    pd.DataFrame({"id": test["id"], "landmarks": ""}).to_csv(tmp / "sample_submission.csv", index=False)
    pd.DataFrame({"id": test["id"], "landmarks": test["truth"]}).to_csv(tmp / "solution.csv", index=False)
    pd.DataFrame(class_rows).to_csv(tmp / "label_map.csv", index=False)
    table[["id", "split", "cls", "src_id", "source", "file"]].sort_values("id").to_csv(tmp / "sources.csv", index=False)
    return {
        "train_images": len(train),
        "test_images": len(test),
        "test_landmark": int((test["truth"] != "").sum()),
        "test_nonlandmark": int((test["truth"] == "").sum()),
        "classes": len(label_of),
        "train_classes": len(label_of) - len(held),
        "heldout_classes": len(held),
        "heldout_test_images": int(((test["cls"] != "") & (test["truth"] == "")).sum()),
        "distractors": int((table["cls"] == "").sum()),
        "unused_images": int((table["split"] == "unused").sum()),
        "link": "copy" if state.get("copy_fallback") else link,
    }


def _cmd_import(args, cfg) -> int:
    out = import_dataset(
        cfg,
        args.labels,
        args.out,
        distractors=args.distractors or [],
        test_fraction=args.test_fraction,
        heldout_class_fraction=args.heldout_class_fraction,
        seed=args.seed,
        link=args.link,
        extra_train=args.extra_train or [],
        train_per_class=args.train_per_class,
        distractor_sample=args.distractor_sample,
        max_per_class=args.max_per_class,
    )
    counts = json.loads((out / "split.json").read_text())["counts"]
    print(json.dumps(counts))
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser("import", parents=common(), help="import labelled photo sets as a Kaggle-layout holdout")
    p.add_argument(
        "labels", nargs="+", metavar="LABELS.csv|DIR", help="landmark sets (id,landmark_id,path or class folders)"
    )
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument(
        "--distractors", nargs="+", default=[], metavar="LABELS.csv|DIR", help="non-landmark sets (test, empty truth)"
    )
    p.add_argument("--test-fraction", type=float, default=None, help="per class share of images to test (config: 0.3)")
    p.add_argument("--heldout-class-fraction", type=float, default=None, help="share of classes held out of train")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--extra-train",
        nargs="+",
        default=[],
        metavar="LABELS.csv|DIR",
        help="sets whose classes only join train (all their images)",
    )
    p.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        metavar="K",
        help="k-shot: exactly K train images per class, the rest to test (config: 0 = off)",
    )
    p.add_argument(
        "--distractor-sample",
        type=int,
        default=None,
        metavar="N",
        help="use a seeded sample of N distractor images (config: 0 = all)",
    )
    p.add_argument(
        "--max-per-class",
        type=int,
        default=None,
        metavar="N",
        help="use a seeded choice of at most N images of each class (config: 0 = all)",
    )
    p.add_argument(
        "--link",
        choices=["hardlink", "copy", "symlink"],
        default=None,
        help="how images are placed in OUT (config: hardlink; copy when the file system refuses links)",
    )
    p.set_defaults(func=_cmd_import)
