"""Synthetic Kaggle-layout demo dataset (`landmarks demo-data`, `make demo-data`).

Each "landmark" is a textured planar scene (facade, painting, sign or mosaic) rendered from
many viewpoints (perspective, scale, rotation, crops, lighting incl. night, blur, noise, JPEG
artefacts, occluders) on varied backgrounds.  Landmarks come in FAMILIES that share palette,
texture and element style but differ in layout, so pooled global descriptors confuse family
members while local matching + a homography tells them apart.  The test split also holds views
of landmarks absent from train and non-landmark distractors (both with empty ground truth).
Deterministic per seed: same config -> byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from landmarks.utils import LandmarksError, atomic_path, building_dir
from landmarks.utils.cache import stamp_matches

log = logging.getLogger(__name__)

KINDS = ("facade", "painting", "sign", "mosaic")
_COLOUR_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
_GRAY_TEXTURES = ("brick", "gravel", "grass", "cell", "moon")
_DISTRACTOR_SOURCES = ("camera", "coins", "page", "text", "clock", "moon", "cell", "colorwheel")
_STAMP = ".complete"


def _hex_id(seed: int, name: str) -> str:
    """Deterministic 16-hex image id of `name` (a view or distractor) for this seed."""
    return hashlib.sha1(f"demo:{seed}:{name}".encode()).hexdigest()[:16]


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator seeded by (seed, name): each scene or view draws independently of the others."""
    return np.random.default_rng(int(hashlib.sha1(f"rng:{seed}:{name}".encode()).hexdigest()[:15], 16))


def _sample(name: str) -> np.ndarray:
    """skimage bundled sample image as uint8 RGB."""
    import skimage.data

    im = np.asarray(getattr(skimage.data, name)())
    if im.dtype == bool:
        im = im.astype(np.uint8) * 255
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return np.ascontiguousarray(im[..., :3]).astype(np.uint8)


def _tinted_texture(name: str, size: tuple[int, int], rgb, rng, strength=0.5) -> np.ndarray:
    """Gray skimage texture crop, resized to size=(w,h) and tinted towards rgb."""
    from PIL import Image

    g = _sample(name)[..., 0].astype(np.float32) / 255.0
    h0, w0 = g.shape
    cw, ch = int(rng.integers(w0 // 3, w0 + 1)), int(rng.integers(h0 // 3, h0 + 1))
    x, y = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
    crop = Image.fromarray((g[y : y + ch, x : x + cw] * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    t = np.asarray(crop, np.float32)[..., None] / 255.0
    base = np.asarray(rgb, np.float32)[None, None, :]
    return np.clip(base * ((1 - strength) + strength * 2 * t), 0, 255).astype(np.uint8)


def _font(size: int):
    """Pillow's default font at `size` px (the fixed bitmap font on old Pillow)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow without scalable default font
        return ImageFont.load_default()


def _jitter(rgb, rng, amount=25):
    """`rgb` with each channel moved by up to +-amount (clipped to 0..255)."""
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


# ----------------------------------------------------------------------------- family styles
def _family_style(seed: int, family: int) -> dict:
    """Shared look of a family: kind, palette, textures, sources."""
    rng = _rng(seed, f"family{family}")
    kind = KINDS[family % len(KINDS)]
    palette = [tuple(int(v) for v in rng.integers(30, 230, 3)) for _ in range(4)]
    return {
        "kind": kind,
        "palette": palette,
        "wall": tuple(int(v) for v in rng.integers(140, 235, 3)),
        "dark": tuple(int(v) for v in rng.integers(10, 70, 3)),
        "texture": _GRAY_TEXTURES[int(rng.integers(len(_GRAY_TEXTURES)))],
        "source": _COLOUR_SOURCES[int(rng.integers(len(_COLOUR_SOURCES)))],
        "arched": bool(rng.random() < 0.5),
        "aspect": float(rng.uniform(1.2, 1.5)) if kind != "facade" else float(rng.uniform(0.8, 1.4)),
        "tile": int(rng.integers(4, 7)),
    }


def _scene(style: dict, rng: np.random.Generator, long_side: int):
    """One landmark instance: an RGB PIL image of its planar scene, drawn by its family's kind."""
    a = style["aspect"]
    w, h = (long_side, int(long_side / a)) if a >= 1 else (int(long_side * a), long_side)
    draw = {"facade": _facade, "painting": _painting, "sign": _sign}.get(style["kind"], _mosaic)
    return draw(style, rng, w, h)


def _facade(style: dict, rng: np.random.Generator, w: int, h: int):
    """Building front: floors of windows (shutters, balconies, mullions), a door, plaques."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_tinted_texture(style["texture"], (w, h), style["wall"], rng, 0.35))
    d = ImageDraw.Draw(img)
    floors, cols = int(rng.integers(3, 7)), int(rng.integers(3, 8))
    fh, cw = h / (floors + 0.6), w / cols
    ww, wh = cw * rng.uniform(0.35, 0.6), fh * rng.uniform(0.4, 0.65)
    door = int(rng.integers(cols))
    for f in range(floors):
        y0 = h - (f + 1) * fh
        if rng.random() < 0.5:  # cornice band
            d.rectangle([0, y0 - 4, w, y0 + 2], fill=_jitter(style["wall"], rng, 40))
        for c in range(cols):
            cx, cy = (c + 0.5) * cw, y0 + fh * 0.5
            if f == 0 and c == door:
                d.rectangle(
                    [cx - ww * 0.6, h - fh * 0.85, cx + ww * 0.6, h],
                    fill=style["dark"],
                    outline=(240, 240, 230),
                    width=3,
                )
                continue
            _window(d, style, rng, cx, cy, ww, wh)
    _plaques(d, style, rng, w, h)
    return img


def _window(d, style: dict, rng: np.random.Generator, cx: float, cy: float, ww: float, wh: float) -> None:
    """One facade window centred at (cx, cy): blind, or glass with shutters, a balcony or mullions."""
    r = rng.random()
    if r < 0.12:
        return  # blind wall
    box = [cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2]
    glass = _jitter(style["dark"], rng, 30)
    if style["arched"]:
        d.pieslice([box[0], box[1] - ww / 2, box[2], box[1] + ww / 2], 180, 360, fill=glass)
    d.rectangle(box, fill=glass, outline=(235, 235, 225), width=2)
    if r < 0.45:  # shutters
        sc = _jitter(style["palette"][0], rng, 20)
        d.rectangle([box[0] - ww * 0.3, box[1], box[0], box[3]], fill=sc)
        d.rectangle([box[2], box[1], box[2] + ww * 0.3, box[3]], fill=sc)
    elif r < 0.65:  # balcony
        d.rectangle([box[0] - 5, box[3] - 6, box[2] + 5, box[3] + 6], fill=style["dark"])
        for k in range(5):
            xx = box[0] + k * ww / 4
            d.line([xx, box[3] - 6, xx, box[3] + 6], fill=(200, 200, 200), width=1)
    else:  # mullions
        d.line([cx, box[1], cx, box[3]], fill=(235, 235, 225), width=2)
        d.line([box[0], cy, box[2], cy], fill=(235, 235, 225), width=2)


def _plaques(d, style: dict, rng: np.random.Generator, w: int, h: int) -> None:
    """Ornaments and lettered plaques scattered over a facade (instance-specific detail)."""
    for _ in range(int(rng.integers(8, 14))):
        x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 24)
        col = _jitter(style["palette"][int(rng.integers(4))], rng, 30)
        if rng.random() < 0.5:
            d.ellipse([x - s, y - s, x + s, y + s], fill=col, outline=style["dark"], width=2)
        else:
            d.rectangle([x - 2 * s, y - s, x + 2 * s, y + s], fill=col, outline=style["dark"], width=2)
            d.text(
                (x - 1.8 * s, y - 0.8 * s),
                "".join(rng.choice(list("ABCDEFGHKLMNRSTV"), 3)),
                fill=style["dark"],
                font=_font(int(s * 1.2)),
            )


def _painting(style: dict, rng: np.random.Generator, w: int, h: int):
    """Framed grid of random (sometimes mirrored) crops of the family's colour photo."""
    from PIL import Image, ImageDraw

    src = _sample(style["source"])
    sh, sw = src.shape[:2]
    img = Image.new("RGB", (w, h), style["dark"])
    frame = max(6, w // 40)
    g = style["tile"]
    tw, th = (w - 2 * frame) // g, (h - 2 * frame) // g
    for i in range(g):
        for j in range(g):
            s = rng.uniform(0.12, 0.35)
            cw_, ch_ = int(sw * s), int(sh * s)
            x, y = int(rng.integers(0, sw - cw_)), int(rng.integers(0, sh - ch_))
            tile = Image.fromarray(src[y : y + ch_, x : x + cw_]).resize((tw, th), Image.BILINEAR)
            if rng.random() < 0.5:
                tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
            img.paste(tile, (frame + j * tw, frame + i * th))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w - 1, h - 1], outline=style["palette"][0], width=frame)
    return img


def _sign(style: dict, rng: np.random.Generator, w: int, h: int):
    """Bordered board of random text lines and one polygon."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), style["palette"][0])
    d = ImageDraw.Draw(img)
    bw = max(5, w // 50)
    d.rectangle([bw, bw, w - bw, h - bw], outline=style["palette"][1], width=bw)
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    y = 2 * bw
    while y < h - 3 * bw:
        size = int(rng.integers(h // 12, h // 6))
        text = " ".join("".join(rng.choice(letters, int(rng.integers(2, 7)))) for _ in range(int(rng.integers(1, 4))))
        d.text((2 * bw + rng.integers(0, w // 5), y), text, fill=style["palette"][2], font=_font(size))
        y += int(size * 1.25)
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, h / 8
    pts = [
        (cx + r * np.cos(t), cy + r * np.sin(t)) for t in np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
    ]
    d.polygon(pts, fill=style["palette"][3], outline=style["palette"][1])
    return img


def _mosaic(style: dict, rng: np.random.Generator, w: int, h: int):
    """Tinted texture covered with random ellipses, rectangles and triangles."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(_tinted_texture(style["texture"], (w, h), style["palette"][0], rng, 0.6))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(25, 45))):
        x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(w / 40, w / 12)
        col = _jitter(style["palette"][1 + int(rng.integers(3))], rng, 25)
        shape = rng.integers(3)
        if shape == 0:
            d.ellipse([x - s, y - s, x + s, y + s], fill=col, outline=style["dark"], width=2)
        elif shape == 1:
            d.rectangle([x - s, y - s * 0.6, x + s, y + s * 0.6], fill=col, outline=style["dark"], width=2)
        else:
            d.polygon([(x, y - s), (x + s, y + s), (x - s, y + s)], fill=col, outline=style["dark"])
    return img


# ----------------------------------------------------------------------------- rendering
def _background(rng, size) -> np.ndarray:
    """uint8 [h, w, 3] street-like backdrop: sky over textured ground, a texture, or soft blobs."""
    from PIL import Image

    w, h = size
    kind = rng.integers(3)
    if kind == 0:  # sky + ground
        sky = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        top, bottom = rng.uniform(120, 230, 3), rng.uniform(170, 250, 3)
        bg = (top * (1 - sky) + bottom * sky) * np.ones((h, w, 3), np.float32)
        gh = int(h * rng.uniform(0.2, 0.5))
        bg[h - gh :] = _tinted_texture(
            _GRAY_TEXTURES[int(rng.integers(len(_GRAY_TEXTURES)))], (w, gh), rng.uniform(60, 200, 3), rng, 0.7
        )
        return bg.astype(np.uint8)
    if kind == 1:
        return _tinted_texture(
            _GRAY_TEXTURES[int(rng.integers(len(_GRAY_TEXTURES)))], (w, h), rng.uniform(60, 220, 3), rng, 0.7
        )
    low = rng.uniform(30, 230, (4, 4, 3))
    low = (0.4 * low + 0.6 * low.mean(axis=2, keepdims=True)).astype(np.uint8)  # muted colours
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output (dst) points to input (src) points."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        b.append(u)
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.append(v)
    return np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64)).tolist()


def _render(scene, rng, size: int, hard: bool, bg=None) -> bytes:
    """One JPEG view of `scene` (PIL RGB, or None for a background-only image): placed in
    perspective on a background, partly occluded, then lighting, noise, blur and JPEG quality
    vary (more with `hard`: the test views)."""
    from PIL import Image, ImageDraw, ImageFilter

    portrait = rng.random() < 0.25
    w, h = (int(size * 0.75), size) if portrait else (size, int(size * 0.75))
    canvas = Image.fromarray(_background(rng, (w, h)) if bg is None else bg).convert("RGBA")
    if scene is not None:
        canvas = Image.alpha_composite(canvas, _warp_scene(scene, rng, w, h, hard))
    _occluders(ImageDraw.Draw(canvas), rng, w, h, hard)
    img = np.asarray(canvas.convert("RGB"), np.float32)
    night = hard and rng.random() < 0.1
    if night:
        img = img * rng.uniform(0.3, 0.45) * np.array([0.8, 0.9, 1.25]) + 5
    else:
        mean = img.mean()
        img = (img - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.7, 1.25)
        img = img * rng.uniform(0.88, 1.12, 3)
    img = img + rng.normal(0, rng.uniform(0, 7 if hard or night else 4), img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    r = rng.uniform(0, 1.5 if hard else 1.0)
    if r > 0.3:
        out = out.filter(ImageFilter.GaussianBlur(r))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(45, 90) if hard else rng.integers(70, 96)))
    return buf.getvalue()


def _warp_scene(scene, rng, w: int, h: int, hard: bool):
    """`scene` seen from a random viewpoint (size, yaw, pitch, roll, shift): RGBA w x h, transparent
    around it."""
    from PIL import Image

    sw, sh = scene.size
    frac = rng.uniform(0.5, 1.3) if hard else rng.uniform(0.6, 1.0)
    pw = frac * min(w, h * sw / sh)
    ph = pw * sh / sw
    pts = np.array([[-pw / 2, -ph / 2], [pw / 2, -ph / 2], [pw / 2, ph / 2], [-pw / 2, ph / 2]])
    yaw, pitch = rng.uniform(-0.35, 0.35) if hard else rng.uniform(-0.25, 0.25), rng.uniform(-0.12, 0.12)
    pts[:, 1] *= np.where(pts[:, 0] < 0, 1 + yaw, 1 - yaw)
    pts[:, 0] *= 1 - abs(yaw) * 0.6
    pts[:, 0] *= np.where(pts[:, 1] < 0, 1 - pitch, 1 + pitch)
    ang = np.deg2rad(rng.uniform(-15, 15) if hard else rng.uniform(-8, 8))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    shift = 0.2 if hard else 0.1
    pts = pts @ rot.T + [w / 2 + rng.uniform(-shift, shift) * w, h / 2 + rng.uniform(-shift, shift) * h]
    src = np.array([[0, 0], [sw, 0], [sw, sh], [0, sh]], np.float64)
    return scene.convert("RGBA").transform(
        (w, h), Image.PERSPECTIVE, _perspective_coeffs(pts, src), Image.BICUBIC, fillcolor=(0, 0, 0, 0)
    )


def _occluders(d, rng, w: int, h: int, hard: bool) -> None:
    """Draw 0 to 2 (hard: 3) occluders: poles, trees, people, cars."""
    for _ in range(int(rng.integers(0, 4 if hard else 3))):
        kind = rng.integers(4)
        col = tuple(int(v) for v in rng.integers(10, 120, 3)) + (255,)
        x, y = rng.uniform(0, w), rng.uniform(0.3 * h, h)
        if kind == 0:
            d.rectangle([x, 0, x + rng.uniform(4, 14), h], fill=col)
        elif kind == 1:
            r = rng.uniform(0.08, 0.22) * h
            d.ellipse(
                [x - r, y - 1.3 * r, x + r, y + r],
                fill=(int(rng.integers(20, 80)), int(rng.integers(70, 140)), 30, 255),
            )
        elif kind == 2:
            s = rng.uniform(0.1, 0.25) * h
            d.rounded_rectangle([x - s / 4, y - s, x + s / 4, h], radius=int(s / 5), fill=col)
        else:
            s = rng.uniform(0.15, 0.35) * w
            d.rounded_rectangle([x - s / 2, h - s / 2.5, x + s / 2, h], radius=int(s / 8), fill=col)


def _write(out_dir: Path, split: str, image_id: str, payload: bytes) -> None:
    """Write one JPEG at the Kaggle path <split>/a/b/c/<id>.jpg."""
    p = out_dir / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(payload)


def _landmark_task(dc: dict, out_dir: str, index: int, name: str, n_train: int, n_test: int) -> list[tuple]:
    """Render one landmark's views; returns rows (id, split, name)."""
    seed, size = dc["seed"], dc["image_size"]
    family = index % max(1, dc["families"])
    style = _family_style(seed, family)
    scene = _scene(style, _rng(seed, f"scene:{name}"), int(size * 1.5))
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for v in range(n):
            view = f"{name}/{split}/{v}"
            iid = _hex_id(seed, view)
            _write(Path(out_dir), split, iid, _render(scene, _rng(seed, view), size, hard=split == "test"))
            rows.append((iid, split, name))
    return rows


def _distractor_task(dc: dict, out_dir: str, k: int) -> list[tuple]:
    """Non-landmark test image: plain street background, a natural photo, or an unseen family-style scene."""
    from PIL import Image

    seed, size = dc["seed"], dc["image_size"]
    name = f"distractor{k:04d}"
    rng = _rng(seed, name)
    kind = k % 3
    if kind == 0:
        payload = _render(None, rng, size, hard=True)
    elif kind == 1:
        src = Image.fromarray(_sample(_DISTRACTOR_SOURCES[int(rng.integers(len(_DISTRACTOR_SOURCES)))]))
        payload = _render(src, rng, size, hard=False)
    else:
        style = _family_style(seed, int(rng.integers(max(1, dc["families"]))))
        payload = _render(_scene(style, rng, int(size * 1.5)), rng, size, hard=True)
    iid = _hex_id(seed, name)
    _write(Path(out_dir), "test", iid, payload)
    return [(iid, "test", name)]


def _demo_key(dc) -> dict:
    """The config that determines the output (the stamp's key); jobs is left out."""
    d = asdict(dc)
    d.pop("jobs", None)  # parallelism does not change the output
    return d


def make_demo(dc, out_dir: str | Path) -> Path:
    """Write a synthetic Kaggle-layout dataset to out_dir (skipped when already complete, same config)."""
    out_dir = Path(out_dir)
    key = _demo_key(dc)
    stamp = out_dir / _STAMP
    if stamp_matches(stamp, "config", key):
        log.info("demo data in %s is complete (same config); skipping", out_dir)
        return out_dir
    if dc.num_landmarks < 1 or dc.views_per_landmark < 1 or dc.image_size < 64:
        raise LandmarksError("demo: need num_landmarks >= 1, views_per_landmark >= 1 and image_size >= 64")
    if out_dir.exists() and any(out_dir.iterdir()) and not stamp.exists() and not (out_dir / "demo.json").exists():
        raise LandmarksError(f"demo: {out_dir} exists, is not empty and is not a demo dataset; choose another --out")
    with building_dir(out_dir) as tmp:
        counts = _write_tables(dc, tmp, _render_views(dc, tmp))
    with atomic_path(stamp) as p:  # written last: the Makefile target
        p.write_text(json.dumps({"config": key, "counts": counts}))
    log.info(
        "demo data: %d train, %d test (%d non-landmark) images in %s",
        counts["train"],
        counts["test"],
        counts["test_nonlandmark"],
        out_dir,
    )
    return out_dir


def _render_views(dc, out_dir: Path) -> list[tuple]:
    """Render every image (seen and unseen landmarks, distractors) into out_dir in parallel;
    returns the rows (id, split, landmark name)."""
    from joblib import Parallel, delayed
    from tqdm import tqdm

    n_seen = dc.num_landmarks
    tasks = [
        delayed(_landmark_task)(
            _demo_key(dc), str(out_dir), i, f"lm{i:03d}", dc.views_per_landmark, dc.test_views_per_landmark
        )
        for i in range(n_seen)
    ]
    tasks += [
        delayed(_landmark_task)(
            _demo_key(dc), str(out_dir), n_seen + j, f"unseen{j:03d}", 0, dc.test_views_per_landmark
        )
        for j in range(dc.unseen_landmarks)
    ]
    tasks += [delayed(_distractor_task)(_demo_key(dc), str(out_dir), k) for k in range(dc.num_distractors)]
    results = Parallel(n_jobs=max(1, dc.jobs), return_as="generator")(tasks)
    return [r for res in tqdm(results, total=len(tasks), desc="demo images", unit="task", disable=None) for r in res]


def _write_tables(dc, out_dir: Path, rows: list[tuple]) -> dict:
    """train.csv, sample_submission.csv, solution.csv and demo.json (seeded landmark ids, each
    landmark's family and kind); returns the image counts."""
    import pandas as pd

    n_seen = dc.num_landmarks
    labels = np.sort(_rng(dc.seed, "labels").choice(np.arange(1, 200_000), size=n_seen, replace=False))
    label_of = {f"lm{i:03d}": int(labels[i]) for i in range(n_seen)}
    train = [(i, label_of[n]) for i, s, n in rows if s == "train"]
    test = sorted((i, str(label_of.get(n, ""))) for i, s, n in rows if s == "test")
    pd.DataFrame(train, columns=["id", "landmark_id"]).to_csv(out_dir / "train.csv", index=False)
    pd.DataFrame({"id": [t[0] for t in test], "landmarks": ""}).to_csv(out_dir / "sample_submission.csv", index=False)
    pd.DataFrame(test, columns=["id", "landmarks"]).to_csv(out_dir / "solution.csv", index=False)
    meta = [
        {
            "name": f"lm{i:03d}",
            "landmark_id": int(labels[i]),
            "family": i % max(1, dc.families),
            "kind": KINDS[(i % max(1, dc.families)) % len(KINDS)],
        }
        for i in range(n_seen)
    ]
    meta += [
        {
            "name": f"unseen{j:03d}",
            "landmark_id": None,
            "family": (n_seen + j) % max(1, dc.families),
            "kind": KINDS[((n_seen + j) % max(1, dc.families)) % len(KINDS)],
        }
        for j in range(dc.unseen_landmarks)
    ]
    counts = {
        "train": len(train),
        "test": len(test),
        "test_landmark": sum(1 for t in test if t[1]),
        "test_nonlandmark": sum(1 for t in test if not t[1]),
        "landmarks": n_seen,
        "unseen_landmarks": dc.unseen_landmarks,
        "distractors": dc.num_distractors,
    }
    (out_dir / "demo.json").write_text(
        json.dumps({"config": _demo_key(dc), "counts": counts, "landmarks": meta}, indent=1)
    )
    return counts


def _cmd_demo(args, cfg) -> int:
    make_demo(cfg.demo, args.out)
    return 0


def register_cli(subparsers, common) -> None:
    p = subparsers.add_parser("demo-data", parents=common(), help="generate the synthetic demo dataset")
    p.add_argument("--out", default="data/demo", help="output directory (Kaggle layout)")
    p.set_defaults(func=_cmd_demo)
