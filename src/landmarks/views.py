"""Affine view synthesis (ASIFT, MODS): local features of simulated tilts of an image.

A photo of a facade taken from far to the side sees it foreshortened: a local descriptor learned
on frontal views no longer matches.  ASIFT (Morel and Yu 2009) and MODS (Mishkin et al. 2015)
simulate such views: the image is rotated by an angle phi, then compressed along x by a tilt
t (t = 1 / cos(viewing angle): t = 2 is 60 degrees off frontal), features are extracted from
the synthetic view, and their keypoints are mapped back to the original image by the inverse
affine.  The merged features then match a train photo taken at that angle.

This module is the pure core: the affine of a view (``view_affine``), the warp
(``warp_view``: PIL, anti-aliased along the compressed axis), the keypoint back-mapping
(``map_back``) and the merge with the original view's features (``merge_views``).  The model
call is the features stage's (``features.add_views``); the hard protocol's probe stores the raw
view features and applies the same functions (``evaluation.hard``).

Coordinates are pixel centres: pixel (i, j) is the point x = j, y = i, as the keypoints of
``delg_io.local_features`` are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from landmarks.store import LocalFeatures


@dataclass(frozen=True)
class View:
    """One simulated view: rotate by `angle` degrees, then compress x by `tilt`."""

    tilt: float
    angle: float

    @property
    def key(self) -> str:
        """Short stable name (probe ids, file names)."""
        return f"t{self.tilt:g}a{self.angle:g}"


def views_of(tilts, angles) -> list[View]:
    """The views of settings `view_tilts` x `view_angles` (a tilt of 1 is the original: skipped)."""
    return [View(float(t), float(a)) for t in tilts if abs(float(t) - 1.0) > 1e-9 for a in angles]


def rotation_affine(shape, angle: float) -> tuple[np.ndarray, tuple[int, int]]:
    """(A [2, 3], canvas shape (rows, columns)) of a rotation by `angle` degrees that keeps the
    whole image of `shape`: the canvas is the bounding box of the rotated pixel centres."""
    h, w = int(shape[0]), int(shape[1])
    phi = math.radians(angle)
    rot = np.round(np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]]), 12)
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64) @ rot.T
    lo = corners.min(axis=0)
    width, height = (int(math.ceil(e - 1e-6)) + 1 for e in corners.max(axis=0) - lo)
    return np.hstack([rot, -lo[:, None]]), (height, width)


def view_affine(shape, view: View) -> tuple[np.ndarray, tuple[int, int]]:
    """(A [2, 3], view shape (rows, columns)): A maps a point (x, y) of an image of `shape` to
    the view.  The rotation keeps the whole image (``rotation_affine``), the tilt shrinks the
    canvas width W to round(W / tilt) (the exact factor is W' / W, as the resize maps it)."""
    a_rot, (height, width) = rotation_affine(shape, view.angle)
    new_w = max(1, int(round(width / float(view.tilt))))
    sx = new_w / width  # a resize maps pixel centres: x' = (x + 0.5) * sx - 0.5
    tilt = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, 1.0, 0.0]])
    return compose(tilt, a_rot), (height, new_w)


def compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The affine `a` after `b` (both [2, 3])."""
    m = np.vstack([a, [0.0, 0.0, 1.0]]) @ np.vstack([b, [0.0, 0.0, 1.0]])
    return m[:2]


def invert(a: np.ndarray) -> np.ndarray:
    """The inverse of an affine [2, 3]."""
    return np.linalg.inv(np.vstack([a, [0.0, 0.0, 1.0]]))[:2]


def apply(a: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points [n, 2] (x, y) through the affine `a`."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return p @ a[:, :2].T + a[:, 2]


def warp_view(image: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """(the synthetic view of an RGB image, its affine A from image to view pixels).

    The rotation is a bilinear affine warp (black outside the image); the tilt is a Lanczos
    resize along x, which low-pass filters before it subsamples (ASIFT's anti-aliasing blur)."""
    from PIL import Image

    a, (vh, vw) = view_affine(image.shape, view)
    img = Image.fromarray(image)
    a_rot, (height, width) = rotation_affine(image.shape, view.angle)
    if not np.allclose(a_rot, [[1, 0, 0], [0, 1, 0]]):
        # PIL maps output pixel corners to input ones: the corner form of a_rot, inverted
        corner = np.hstack([a_rot[:, :2], (a_rot[:, 2] + 0.5 - a_rot[:, :2] @ [0.5, 0.5])[:, None]])
        img = img.transform(
            (width, height),
            Image.Transform.AFFINE,
            tuple(invert(corner).reshape(-1)),
            resample=Image.Resampling.BILINEAR,
            fillcolor=(0, 0, 0),
        )
    if vw != width:
        img = img.resize((vw, vh), Image.Resampling.LANCZOS)
    return np.asarray(img, np.uint8), a


def inside(lf: LocalFeatures, shape) -> LocalFeatures:
    """The features whose keypoint lies inside an image of `shape` (cells past the border of the
    view's feature map have centres off the view)."""
    h, w = shape[:2]
    kp = lf.keypoints
    keep = (kp[:, 0] >= 0) & (kp[:, 0] <= w - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h - 1)
    return LocalFeatures(kp[keep], lf.descriptors[keep], lf.scales[keep], lf.scores[keep])


def map_back(lf: LocalFeatures, a: np.ndarray, view_shape) -> LocalFeatures:
    """The features of a view inside it, keypoints mapped to the original image by A^-1."""
    lf = inside(lf, view_shape)
    kp = apply(invert(a), lf.keypoints).astype(np.float32)
    return LocalFeatures(kp, lf.descriptors, lf.scales, lf.scores)


def merge_views(original: LocalFeatures, views: list[LocalFeatures], cap: int, per_view: int) -> LocalFeatures:
    """The original view's features with the synthetic views' (keypoints already mapped back).

    `per_view` 0: all views share the `cap` best scores (the count, hence the verification cost,
    stays as without views); `per_view` > 0: the original keeps its features and each view adds
    its own (already capped at `per_view`).  Ordered by score, the original first on ties."""
    parts = [original, *views]
    kp = np.concatenate([p.keypoints.astype(np.float32) for p in parts])
    de = np.concatenate([p.descriptors.astype(np.float32) for p in parts])
    sc = np.concatenate([p.scales.astype(np.float32) for p in parts])
    so = np.concatenate([p.scores.astype(np.float32) for p in parts])
    order = np.argsort(-so, kind="stable")
    if per_view <= 0:
        order = order[: int(cap)]
    return LocalFeatures(kp[order], de[order], sc[order], so[order])
