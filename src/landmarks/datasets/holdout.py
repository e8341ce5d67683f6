"""Offline validation split from a train.csv alone (`landmarks holdout`, issue 8).

Test = a few images of each sampled seen class (classes with fewer than min_class_images
stay whole in train) + images of a share of classes removed from train entirely (empty truth)
+ optional distractors (empty truth).  Nothing is copied: train/ is one symlink to the source
train folder (symlink mode) or per-file hard links; test images are linked one by one, and
missing source files are skipped with a count.  Vectorised pandas: a 1.58M-row train.csv
splits in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from landmarks.config import check_section
from landmarks.datasets.data import load_split
from landmarks.datasets.dataset_import import read_labels, split_up_to_date
from landmarks.utils import LandmarksError, atomic_path, building_dir, file_digest, link_file

log = logging.getLogger(__name__)


def split_train(train: pd.DataFrame, hc) -> tuple[pd.DataFrame, pd.DataFrame, list[int]]:
    """Split train rows (id, landmark_id[, path]) -> (new train, test with 'truth', held-out labels)."""
    rng = np.random.default_rng(hc.seed)
    sizes = train["landmark_id"].value_counts().sort_index()
    classes = sizes.index.to_numpy()
    n_held = min(int(round(hc.heldout_class_fraction * len(classes))), max(0, len(classes) - 1))
    held = np.sort(rng.permutation(classes)[:n_held])
    n_nonlm = int(round(hc.test_images * hc.nonlandmark_share)) if n_held else 0
    n_seen = hc.test_images - n_nonlm

    order = rng.permutation(len(train))  # one random order for every row (input order is fixed by train.csv)
    shuffled = train.iloc[order]
    is_held = shuffled["landmark_id"].isin(held).to_numpy()

    # seen classes: sample classes big enough, take per_class_test images each (>= 1 stays in train)
    eligible = sizes[(sizes >= max(2, hc.min_class_images)) & ~sizes.index.isin(held)]
    take = np.minimum(hc.per_class_test, eligible.to_numpy() - 1)
    cls_order = rng.permutation(len(eligible))
    cum = np.cumsum(take[cls_order])
    n_cls = int(np.searchsorted(cum, n_seen) + 1) if len(cum) else 0
    chosen = pd.Series(take[cls_order[:n_cls]], index=eligible.index[cls_order[:n_cls]])
    rank = shuffled.groupby("landmark_id", sort=False).cumcount().to_numpy()
    quota = shuffled["landmark_id"].map(chosen).fillna(0).to_numpy()
    seen_test = np.flatnonzero(rank < quota)[:n_seen]
    if len(seen_test) < n_seen:
        log.warning("holdout: only %d seen-class test images available (asked %d)", len(seen_test), n_seen)
    held_rows = np.flatnonzero(is_held)[:n_nonlm]
    if n_held and len(held_rows) < n_nonlm:
        log.warning("holdout: only %d held-out-class images available (asked %d)", len(held_rows), n_nonlm)
    in_test = np.zeros(len(shuffled), bool)
    in_test[seen_test] = True
    in_test[held_rows] = True
    test = shuffled[in_test].assign(truth=np.where(is_held[in_test], "", shuffled["landmark_id"][in_test].astype(str)))
    new_train = shuffled[~in_test & ~is_held].sort_index()
    return new_train, test.sort_values("id"), held.tolist()


def _link(src: str, dst: Path, mode: str) -> None:
    """link_file with a one-line error that names the other link mode to try."""
    try:
        link_file(src, dst, mode)
    except OSError as e:
        other = "--link hardlink" if mode == "symlink" else "--link symlink"
        raise LandmarksError(
            f"holdout: cannot {mode} {src} -> {dst} ({e.strerror or e}); try {other} or --no-images"
        ) from None


def make_holdout(cfg, data_dir, out_dir, distractors=None, **overrides) -> Path:
    """Build a Kaggle-layout validation dataset in out_dir from data_dir/train.csv; returns out_dir.

    `cfg` is the Config; its `holdout` section gives the defaults, `overrides` (test_images,
    nonlandmark_share, heldout_class_fraction, per_class_test, min_class_images, seed, link) win.
    """

    hc = _holdout_settings(cfg, overrides)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if data_dir.resolve() == out_dir.resolve():
        raise LandmarksError("holdout: --out must differ from --data-dir")
    params = {
        **dataclasses.asdict(hc),
        "data_dir": str(data_dir.resolve()),
        "train_csv": file_digest(data_dir / "train.csv") if (data_dir / "train.csv").exists() else None,
        "distractors": str(distractors) if distractors else None,
    }
    if split_up_to_date(out_dir, params, "holdout"):
        return out_dir

    train = load_split(data_dir, "train")
    new_train, test, held = split_train(train, hc)
    dis = _read_distractors(distractors, train) if distractors else None
    test_ids = test["id"].tolist() + ([] if dis is None else dis["id"].tolist())
    truth = test["truth"].tolist() + ([] if dis is None else [""] * len(dis))
    with building_dir(out_dir) as tmp:
        linked, missing = 0, 0
        if hc.link != "none":
            test_srcs = test["path"].tolist() + ([] if dis is None else dis["file"].tolist())
            linked, missing = _link_images(tmp, data_dir, new_train, test_srcs, test_ids, hc.link)
        order = np.argsort(np.asarray(test_ids, dtype=object), kind="stable")
        test_ids = [test_ids[i] for i in order]
        truth = [truth[i] for i in order]
        new_train[["id", "landmark_id"]].to_csv(tmp / "train.csv", index=False)
        pd.DataFrame({"id": test_ids, "landmarks": ""}).to_csv(tmp / "sample_submission.csv", index=False)
        pd.DataFrame({"id": test_ids, "landmarks": truth}).to_csv(tmp / "solution.csv", index=False)
        counts = {
            "train_images": len(new_train),
            "train_classes": int(new_train["landmark_id"].nunique()),
            "test_images": len(test_ids),
            "test_landmark": int(sum(1 for t in truth if t)),
            "test_nonlandmark": int(sum(1 for t in truth if not t)),
            "heldout_classes": len(held),
            "heldout_test_images": int((test["truth"] == "").sum()),
            "distractors": 0 if dis is None else len(dis),
            "seen_test_classes": int(test.loc[test["truth"] != "", "landmark_id"].nunique()),
            "linked": linked,
            "missing_images": missing,
        }
        with atomic_path(tmp / "split.json") as p:
            p.write_text(
                json.dumps(
                    {"params": params, "counts": counts, "heldout_classes": [int(h) for h in held][:10000]}, indent=1
                )
            )
    log.info(
        "holdout: %d train / %d test images (%d landmark, %d non-landmark; %d held-out classes) -> %s",
        counts["train_images"],
        counts["test_images"],
        counts["test_landmark"],
        counts["test_nonlandmark"],
        counts["heldout_classes"],
        out_dir,
    )
    return out_dir


def _holdout_settings(cfg, overrides: dict):
    """The holdout config section with the given (non-None) overrides, checked."""
    hc = dataclasses.replace(cfg.holdout, **{k: v for k, v in overrides.items() if v is not None})
    check_section("holdout", hc)  # the command's options, checked as the config is at load
    return hc


def _read_distractors(distractors, train: pd.DataFrame) -> pd.DataFrame:
    """Distractor images (file, id = content digest), missing files and duplicates left out; an
    error when one has the id of a train image."""

    dis = read_labels(distractors, distractors=True)
    ok = np.fromiter((os.path.isfile(f) for f in dis["file"]), bool, len(dis))
    if not ok.all():
        log.warning(
            "holdout: %d distractor files missing, left out (first: %s)", int((~ok).sum()), dis.loc[~ok, "file"].iloc[0]
        )
        dis = dis[ok]
    dis = dis.assign(id=[file_digest(f) for f in dis["file"]]).drop_duplicates("id")
    clash = dis["id"].isin(set(train["id"]))
    if clash.any():
        raise LandmarksError(f"holdout: distractor {dis.loc[clash, 'file'].iloc[0]} has the id of a train image")
    return dis


def _link_images(
    tmp: Path, data_dir: Path, new_train: pd.DataFrame, test_srcs: list[str], test_ids: list[str], mode: str
) -> tuple[int, int]:
    """Link the train images (symlink mode: one link to the whole source train folder) and the test
    images into tmp; returns (files linked, source files missing)."""
    from tqdm import tqdm

    linked, missing = 0, 0
    if mode == "symlink":
        if (data_dir / "train").is_dir():
            os.symlink(os.path.abspath(data_dir / "train"), tmp / "train")  # lazy: one link for all train images
    else:
        for src, iid in tqdm(
            list(zip(new_train["path"], new_train["id"])), desc="linking train", unit="img", disable=None
        ):
            if os.path.exists(src):
                _link(src, tmp / "train" / iid[0] / iid[1] / iid[2] / f"{iid}.jpg", mode)
                linked += 1
            else:
                missing += 1
    for src, iid in zip(test_srcs, test_ids):
        if os.path.exists(src):
            _link(src, tmp / "test" / iid[0] / iid[1] / iid[2] / f"{iid}.jpg", mode)
            linked += 1
        else:
            missing += 1
    if missing:
        log.warning("holdout: %d source images missing; not linked", missing)
    return linked, missing


def _cmd_holdout(args, cfg) -> int:
    out = make_holdout(
        cfg,
        args.data_dir,
        args.out,
        distractors=args.distractors,
        test_images=args.test_images,
        nonlandmark_share=args.nonlandmark_share,
        heldout_class_fraction=args.heldout_class_fraction,
        per_class_test=args.per_class_test,
        seed=args.seed,
        link="none" if args.no_images else args.link,
    )
    print(json.dumps(json.loads((out / "split.json").read_text())["counts"]))
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "holdout", parents=common("data_dir"), help="make an offline validation split from train.csv"
    )
    p.add_argument("--out", default="data/holdout", help="output dataset directory")
    p.add_argument("--test-images", type=int, default=None, help="test images from seen + held-out classes")
    p.add_argument("--nonlandmark-share", type=float, default=None, help="share of test images from held-out classes")
    p.add_argument("--heldout-class-fraction", type=float, default=None, help="share of classes removed from train")
    p.add_argument("--per-class-test", type=int, default=None, help="test images per sampled seen class")
    p.add_argument("--distractors", default=None, metavar="CSV|DIR", help="non-landmark images added to test")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--link", choices=["symlink", "hardlink"], default=None, help="how images are placed in OUT (config: symlink)"
    )
    p.add_argument("--no-images", action="store_true", help="write the CSVs only, link no images")
    p.set_defaults(func=_cmd_holdout)
